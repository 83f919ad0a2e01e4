//! One guard in front of every route, run before any byte of the body is
//! read: the `Host` allow-list (DNS rebinding), the `Origin` check on the
//! routes a page on another site could drive with a visitor's browser, and
//! the API key (header, Bearer, or a single-use ticket where browsers cannot
//! set headers).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use poem::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use poem::web::Json;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The API key, kept as its SHA-256 digest: comparing two digests of equal
/// length in constant time tells nothing about the key's length, and the
/// key itself is not kept in memory. Its `Debug` shows nothing either.
#[derive(Clone)]
pub struct ApiKey([u8; 32]);

impl ApiKey {
    /// # Errors
    /// An empty key: "auth on with an empty key" is a configuration mistake,
    /// never a way to turn auth off.
    pub fn new(key: &str) -> Result<Self, &'static str> {
        if key.is_empty() {
            Err("AUTOPOIESIS_API_KEY is set but empty; unset it to turn auth off")
        } else {
            Ok(Self(Sha256::digest(key.as_bytes()).into()))
        }
    }

    /// The key tickets are signed with: the same on every instance that
    /// has this API key, and not the key (nor its digest) itself.
    #[must_use]
    pub fn ticket_secret(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(b"autopoiesis connection tickets v1\0");
        hasher.update(self.0);
        hasher.finalize().into()
    }

    fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&presented).into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Single-use tickets that stand in for the key on WebSocket and SSE URLs,
/// which browsers open without custom headers.
///
/// A ticket is `NONCE.EXPIRES.MAC`: 122 random bits, its expiry (Unix
/// milliseconds) and an HMAC-SHA-256 of both under a secret derived from
/// the API key ([`ApiKey::ticket_secret`]). Every instance with the same
/// key accepts a ticket any of them issued (SPEC B12), without asking the
/// others. Each instance takes a ticket once: a ticket issued by one
/// instance could open one connection on each of the others within its
/// 30 s, which only its holder (who has the key-bearing page) can do.
pub struct TicketBook {
    ttl: Duration,
    /// Tickets issued here, and tickets of other instances redeemed here,
    /// not yet expired: at most this many of each.
    capacity: usize,
    secret: [u8; 32],
    issued: Mutex<Issued>,
}

#[derive(Default)]
struct Issued {
    /// Ticket -> when it stops being valid.
    valid: HashMap<String, Instant>,
    /// Every ticket issued within the last `ttl`, oldest first: all tickets
    /// live equally long, so this is also the order in which they expire,
    /// and expiring them costs only the ones that expire.
    by_expiry: VecDeque<(Instant, String)>,
    /// Tickets of other instances taken here, until they expire.
    spent: HashMap<String, Instant>,
    spent_by_expiry: VecDeque<(Instant, String)>,
}

impl Issued {
    fn expire(&mut self, now: Instant) {
        while let Some((expires, _)) = self.by_expiry.front()
            && *expires <= now
        {
            if let Some((_, ticket)) = self.by_expiry.pop_front() {
                self.valid.remove(&ticket);
            }
        }
        while let Some((expires, _)) = self.spent_by_expiry.front()
            && *expires <= now
        {
            if let Some((_, ticket)) = self.spent_by_expiry.pop_front() {
                self.spent.remove(&ticket);
            }
        }
    }
}

type TicketMac = hmac::Hmac<Sha256>;

fn unix_millis(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Too many tickets are outstanding; the client should retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Too many connection tickets are outstanding ({0}); try again shortly")]
pub struct TicketsExhausted(pub usize);

impl TicketBook {
    /// Tickets outstanding at once by default: a browser needs one per
    /// connection it opens, for 30 s.
    pub const DEFAULT_CAPACITY: usize = 10_000;

    /// Tickets signed with `secret` ([`ApiKey::ticket_secret`]).
    #[must_use]
    pub fn new(ttl: Duration, secret: [u8; 32]) -> Arc<Self> {
        Self::with_capacity(ttl, Self::DEFAULT_CAPACITY, secret)
    }

    #[must_use]
    pub fn with_capacity(ttl: Duration, capacity: usize, secret: [u8; 32]) -> Arc<Self> {
        Arc::new(Self {
            ttl,
            capacity,
            secret,
            issued: Mutex::default(),
        })
    }

    fn mac(&self, signed: &str) -> TicketMac {
        use hmac::KeyInit;
        let mut mac = <TicketMac as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        hmac::Mac::update(&mut mac, signed.as_bytes());
        mac
    }

    /// When a ticket expires, if it is one this server's key signed.
    fn verify(&self, ticket: &str) -> Option<u64> {
        let (signed, tag) = ticket.rsplit_once('.')?;
        let (_, expires) = signed.split_once('.')?;
        let expires: u64 = expires.parse().ok()?;
        let tag = hex::decode(tag).ok()?;
        hmac::Mac::verify_slice(self.mac(signed), &tag).ok()?;
        Some(expires)
    }

    /// How long a ticket stays valid.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new ticket (122 random bits).
    ///
    /// # Errors
    /// [`TicketsExhausted`] when as many tickets as the capacity were issued
    /// within the last `ttl` (redeemed ones included).
    pub fn issue(&self) -> Result<String, TicketsExhausted> {
        let now = Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued.expire(now);
        if issued.by_expiry.len() >= self.capacity {
            return Err(TicketsExhausted(self.capacity));
        }
        let expires = unix_millis(std::time::SystemTime::now() + self.ttl);
        let signed = format!("{}.{expires}", uuid::Uuid::new_v4().simple());
        let tag = hex::encode(hmac::Mac::finalize(self.mac(&signed)).into_bytes());
        let ticket = format!("{signed}.{tag}");
        issued.valid.insert(ticket.clone(), now + self.ttl);
        issued.by_expiry.push_back((now + self.ttl, ticket.clone()));
        Ok(ticket)
    }

    /// Takes the ticket: true once, if this or another instance with the
    /// same key issued it and it has not expired.
    pub fn redeem(&self, ticket: &str) -> bool {
        let Some(expires) = self.verify(ticket) else {
            return false;
        };
        let left = expires.saturating_sub(unix_millis(std::time::SystemTime::now()));
        if left == 0 {
            return false;
        }
        let now = Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued.expire(now);
        if issued.spent.contains_key(ticket) {
            return false;
        }
        let here = issued.valid.remove(ticket);
        // Tickets of other instances are taken up to the capacity at once,
        // besides this instance's own.
        if here.is_none() && issued.spent.len() >= 2 * self.capacity {
            return false;
        }
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let until = now + Duration::from_millis(left.min(ttl));
        issued.spent.insert(ticket.to_owned(), until);
        issued.spent_by_expiry.push_back((until, ticket.to_owned()));
        here.is_none_or(|valid_until| valid_until > now)
    }
}

/// Which `Host` names the server answers to (DNS-rebinding protection: a
/// page on a name the attacker rebinds to 127.0.0.1 sends that name).
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    /// Names (any port) or `name:port`; `*` accepts any. An IP literal is
    /// always accepted: a browser sends one only to a page loaded from
    /// that very address, which is no rebinding.
    pub allowed: Vec<String>,
}

/// Splits `name[:port]`, `[v6]:port` or a bare IPv6 address.
fn split_host(host: &str) -> (&str, Option<&str>) {
    // Only a bare IPv6 address has more than one colon.
    if host.matches(':').nth(1).is_some() && host.parse::<IpAddr>().is_ok() {
        return (host, None);
    }
    if let Some(rest) = host.strip_prefix('[')
        && let Some((name, after)) = rest.split_once(']')
    {
        return (name, after.strip_prefix(':'));
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}

impl HostPolicy {
    /// A request without `Host` (HTTP/1.0) is not a browser's and passes.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get("host").and_then(|h| h.to_str().ok()) else {
            return true;
        };
        let (name, port) = split_host(host);
        if name.as_bytes().first().is_some_and(u8::is_ascii_digit) || name.contains(':') {
            // Looks like an IP literal: the common case on loopback.
            if name.parse::<IpAddr>().is_ok() {
                return true;
            }
        }
        self.allowed.iter().any(|allowed| {
            if allowed == "*" {
                return true;
            }
            let (allowed_name, allowed_port) = split_host(allowed);
            allowed_name.eq_ignore_ascii_case(name) && allowed_port.is_none_or(|p| Some(p) == port)
        })
    }
}

/// Which foreign origins may open WebSockets and `/mcp` from a browser.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Exact origins (`https://app.example.com`) allowed besides the server's
    /// own; `*` allows any.
    pub allowed: Vec<String>,
}

impl OriginPolicy {
    /// A request without `Origin` is not from a browser page and passes;
    /// one whose origin is the server itself (same scheme, same `Host`)
    /// passes too. The scheme is `http`, or what a TLS-terminating proxy
    /// says in `X-Forwarded-Proto` (a page cannot set that header on a
    /// WebSocket, and a cross-site request that sets it must pass a CORS
    /// preflight this server never grants).
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get("origin").and_then(|o| o.to_str().ok()) else {
            return true;
        };
        let scheme = headers
            .get("x-forwarded-proto")
            .and_then(|p| p.to_str().ok())
            .unwrap_or("http");
        let same_origin = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .zip(origin.split_once("://"))
            .is_some_and(|(host, (origin_scheme, authority))| {
                origin_scheme.eq_ignore_ascii_case(scheme) && host.eq_ignore_ascii_case(authority)
            });
        same_origin
            || self
                .allowed
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    }
}

/// Paths anyone may read: the health check, and the API description (it is
/// generated from public code and holds nothing secret; client generators
/// and test tools fetch it before they have a key). Also what the spec
/// says needs no key ([`super::spec`]).
pub(super) fn is_public(method: &Method, path: &str) -> bool {
    let reads = method == Method::GET || method == Method::HEAD;
    // The console's page and assets hold no data (like `/docs`); every
    // call they make needs the key.
    (reads
        && (path == "/api/health"
            || path == "/openapi.json"
            || path == "/"
            || path.starts_with("/console/")))
        || path == "/docs"
        || path.starts_with("/docs/")
}

/// The URLs a browser opens with `WebSocket`/`EventSource`: the only ones
/// that take `?ticket=`.
pub(super) fn takes_ticket(path: &str) -> bool {
    path.starts_with("/api/ws/")
        || (path.starts_with("/api/sessions/") && path.ends_with("/events"))
        || path == "/api/stream"
}

/// The requests a page on another site could make with the visitor's
/// browser and act on: every one that changes state (a browser sends
/// simple cross-site POSTs without asking), the WebSocket (no CORS
/// applies to it) and `/mcp`. They check `Origin`.
pub(super) fn checks_origin(method: &Method, path: &str) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        || path.starts_with("/api/ws/")
        || path == "/mcp"
        || path.starts_with("/mcp/")
}

/// The key a request presents: `X-API-Key`, or `Authorization: Bearer`
/// (the scheme name is case-insensitive, RFC 9110).
fn presented_key(req: &Request) -> Option<&str> {
    if let Some(key) = req.headers().get("x-api-key") {
        return key.to_str().ok();
    }
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

#[derive(Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

fn ticket_param(req: &Request) -> Option<String> {
    req.params::<TicketQuery>().ok()?.ticket
}

/// The challenge every 401 carries (RFC 9110 section 11.6.1). Without one,
/// OAuth-aware clients (the MCP Inspector) take a bare 401 for "OAuth
/// required". The key goes as a Bearer token, so the challenge is Bearer;
/// the other way to send it, `X-API-Key`, has no challenge scheme, so the
/// description names it.
pub const CHALLENGE: &str = "Bearer realm=\"autopoiesis\", error=\"invalid_token\", \
     error_description=\"send the API key in X-API-Key or as a Bearer token\"";

/// Why the guard refused a request.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Host,
    Origin,
    Key,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Self::Host | Self::Origin => StatusCode::FORBIDDEN,
            Self::Key => StatusCode::UNAUTHORIZED,
        }
    }

    fn detail(self) -> &'static str {
        match self {
            Self::Host => "Host not allowed",
            Self::Origin => "Origin not allowed",
            Self::Key => "Invalid or missing API key",
        }
    }

    /// The OpenAI error `code` of the refusal, for `/v1`.
    fn openai_code(self) -> &'static str {
        match self {
            Self::Host => "host_not_allowed",
            Self::Origin => "origin_not_allowed",
            Self::Key => "invalid_api_key",
        }
    }

    /// The answer: `{"detail"}` like every other error of the server, but
    /// OpenAI's error object on the OpenAI facade, which is what its
    /// clients parse (a 401 becomes the SDKs' `AuthenticationError`).
    fn response(self, path: &str) -> Response {
        let mut response = if super::openai_facade::serves(path) {
            super::openai_facade::refusal(self.status(), self.openai_code(), self.detail())
        } else {
            Json(json!({ "detail": self.detail() }))
                .with_status(self.status())
                .into_response()
        };
        if matches!(self, Self::Key) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(CHALLENGE),
            );
        }
        response
    }
}

/// Everything the guard needs.
#[derive(Clone)]
pub struct Guard {
    pub key: Option<ApiKey>,
    pub tickets: Arc<TicketBook>,
    pub origins: OriginPolicy,
    pub hosts: HostPolicy,
}

impl<E: Endpoint> Middleware<E> for Guard {
    type Output = GuardEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        GuardEndpoint {
            inner,
            guard: self.clone(),
        }
    }
}

pub struct GuardEndpoint<E> {
    inner: E,
    guard: Guard,
}

impl Guard {
    /// Refuses a request before any handler (or body parser) runs, so a
    /// refused request has no side effect.
    fn check(&self, req: &Request) -> Option<Response> {
        let path = req.uri().path();
        if !self.hosts.admits(req.headers()) {
            return Some(Refusal::Host.response(path));
        }
        if checks_origin(req.method(), path) && !self.origins.admits(req.headers()) {
            return Some(Refusal::Origin.response(path));
        }
        let key = self.key.as_ref()?;
        if is_public(req.method(), path) || presented_key(req).is_some_and(|k| key.matches(k)) {
            return None;
        }
        if takes_ticket(path) && ticket_param(req).is_some_and(|t| self.tickets.redeem(&t)) {
            return None;
        }
        Some(Refusal::Key.response(path))
    }
}

impl<E: Endpoint> Endpoint for GuardEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        if let Some(refusal) = self.guard.check(&req) {
            return Ok(refusal);
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_good_once() {
        let book = TicketBook::new(Duration::from_secs(30), [7; 32]);
        let ticket = book.issue().unwrap();
        assert!(book.redeem(&ticket));
        assert!(!book.redeem(&ticket));
        assert!(!book.redeem("made-up"));
    }

    #[test]
    fn a_ticket_of_another_instance_with_the_same_key_is_good_once_there() {
        let key = ApiKey::new("k").unwrap().ticket_secret();
        let (a, b) = (
            TicketBook::new(Duration::from_secs(30), key),
            TicketBook::new(Duration::from_secs(30), key),
        );
        let ticket = a.issue().unwrap();
        assert!(b.redeem(&ticket), "issued by A, taken by B");
        assert!(!b.redeem(&ticket), "once");
        let other = TicketBook::new(
            Duration::from_secs(30),
            ApiKey::new("other").unwrap().ticket_secret(),
        );
        assert!(!other.redeem(&a.issue().unwrap()), "another key's ticket");
        let fresh = a.issue().unwrap();
        let (signed, tag) = fresh.rsplit_once('.').unwrap();
        let (nonce, _) = signed.split_once('.').unwrap();
        let later = format!("{nonce}.{}.{tag}", u64::MAX);
        assert!(!b.redeem(&later), "an expiry moved by hand breaks the MAC");
    }

    #[test]
    fn tickets_beyond_the_capacity_are_refused_until_old_ones_expire() {
        let book = TicketBook::with_capacity(Duration::from_millis(50), 3, [7; 32]);
        for _ in 0..3 {
            book.issue().unwrap();
        }
        assert_eq!(book.issue(), Err(TicketsExhausted(3)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(book.issue().is_ok());
        let issued = book.issued.lock().unwrap();
        assert_eq!((issued.valid.len(), issued.by_expiry.len()), (1, 1));
    }

    #[test]
    fn the_host_allow_list_takes_names_ports_and_any_ip_literal() {
        let policy = HostPolicy {
            allowed: vec!["localhost".into(), "proxy.example:443".into()],
        };
        let admits = |host: &str| policy.admits(&headers(None, host));
        assert!(admits("localhost:8420"));
        assert!(admits("LOCALHOST"));
        assert!(admits("proxy.example:443"));
        assert!(admits("127.0.0.1:8420"));
        assert!(admits("[::1]:8420"));
        assert!(admits("10.0.0.7"));
        assert!(!admits("proxy.example:8443"));
        assert!(!admits("rebind.attacker.example:8420"));
        assert!(!admits("localhost.attacker.example"));
        assert!(HostPolicy::default().admits(&HeaderMap::new()));
    }

    #[test]
    fn the_key_matches_only_itself_whatever_the_length() {
        let key = ApiKey::new("s3cret").unwrap();
        assert!(key.matches("s3cret"));
        assert!(!key.matches("s3cre"));
        assert!(!key.matches("s3cret "));
        assert!(!key.matches(""));
    }

    #[test]
    fn an_expired_ticket_is_refused() {
        let book = TicketBook::new(Duration::ZERO, [7; 32]);
        let ticket = book.issue().unwrap();
        assert!(!book.redeem(&ticket));
    }

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", host.parse().unwrap());
        if let Some(origin) = origin {
            headers.insert("origin", origin.parse().unwrap());
        }
        headers
    }

    #[test]
    fn origins_pass_when_absent_same_or_allowed() {
        let policy = OriginPolicy {
            allowed: vec!["https://app.example".into()],
        };
        assert!(policy.admits(&headers(None, "127.0.0.1:8420")));
        assert!(policy.admits(&headers(Some("http://127.0.0.1:8420"), "127.0.0.1:8420")));
        assert!(policy.admits(&headers(Some("https://app.example"), "127.0.0.1:8420")));
        assert!(!policy.admits(&headers(Some("https://evil.example"), "127.0.0.1:8420")));
        assert!(!policy.admits(&headers(Some("null"), "127.0.0.1:8420")));
    }

    #[test]
    fn the_same_origin_test_compares_the_scheme_too() {
        let policy = OriginPolicy::default();
        assert!(!policy.admits(&headers(Some("https://127.0.0.1:8420"), "127.0.0.1:8420")));
        let mut behind_tls = headers(Some("https://app.example"), "app.example");
        behind_tls.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(policy.admits(&behind_tls));
    }
}

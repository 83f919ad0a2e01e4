//! One guard in front of every route: the API key (header, Bearer, or a
//! single-use ticket where browsers cannot set headers), and the `Origin`
//! check on the routes a browser page could open cross-site.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use poem::http::{HeaderMap, Method, StatusCode};
use poem::web::Json;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

/// The API key. Its `Debug` never shows it, so it cannot leak into a log.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// # Errors
    /// An empty key: "auth on with an empty key" is a configuration mistake,
    /// never a way to turn auth off.
    pub fn new(key: &str) -> Result<Self, &'static str> {
        if key.is_empty() {
            Err("AUTOPOIESIS_API_KEY is set but empty; unset it to turn auth off")
        } else {
            Ok(Self(key.into()))
        }
    }

    fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Single-use tickets that stand in for the key on WebSocket and SSE URLs,
/// which browsers open without custom headers.
pub struct TicketBook {
    ttl: Duration,
    /// Ticket -> when it stops being valid.
    issued: Mutex<HashMap<String, Instant>>,
}

impl TicketBook {
    #[must_use]
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            ttl,
            issued: Mutex::default(),
        })
    }

    /// How long a ticket stays valid.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new ticket (122 random bits).
    pub fn issue(&self) -> String {
        let ticket = uuid::Uuid::new_v4().simple().to_string();
        let now = Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued.retain(|_, expires| *expires > now);
        issued.insert(ticket.clone(), now + self.ttl);
        ticket
    }

    /// Takes the ticket: true once, if it was issued and has not expired.
    pub fn redeem(&self, ticket: &str) -> bool {
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        issued
            .remove(ticket)
            .is_some_and(|expires| expires > Instant::now())
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
    /// one whose origin is the server itself (its `Host`) passes too.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get("origin").and_then(|o| o.to_str().ok()) else {
            return true;
        };
        let same_origin = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .zip(origin.split_once("://").map(|(_, authority)| authority))
            .is_some_and(|(host, authority)| host.eq_ignore_ascii_case(authority));
        same_origin
            || self
                .allowed
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    }
}

/// Paths anyone may read: the health check, and the API description (it is
/// generated from public code and holds nothing secret; client generators
/// and test tools fetch it before they have a key).
fn is_public(req: &Request) -> bool {
    let path = req.uri().path();
    (req.method() == Method::GET && (path == "/api/health" || path == "/openapi.json"))
        || path == "/docs"
        || path.starts_with("/docs/")
}

/// The URLs a browser opens with `WebSocket`/`EventSource`: the only ones
/// that take `?ticket=`.
fn takes_ticket(path: &str) -> bool {
    path.starts_with("/api/ws/")
        || (path.starts_with("/api/sessions/") && path.ends_with("/events"))
        || path == "/api/stream"
}

/// The routes a page on another site could drive with the visitor's
/// browser: they check `Origin`.
fn checks_origin(path: &str) -> bool {
    path.starts_with("/api/ws/") || path == "/mcp" || path.starts_with("/mcp/")
}

/// The key a request presents: `X-API-Key`, or `Authorization: Bearer`.
fn presented_key(req: &Request) -> Option<&str> {
    if let Some(key) = req.headers().get("x-api-key") {
        return key.to_str().ok();
    }
    req.headers()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

#[derive(Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

fn ticket_param(req: &Request) -> Option<String> {
    req.params::<TicketQuery>().ok()?.ticket
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    Json(json!({ "detail": detail }))
        .with_status(status)
        .into_response()
}

/// Everything the guard needs.
#[derive(Clone)]
pub struct Guard {
    pub key: Option<ApiKey>,
    pub tickets: Arc<TicketBook>,
    pub origins: OriginPolicy,
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
        if checks_origin(path) && !self.origins.admits(req.headers()) {
            return Some(refuse(StatusCode::FORBIDDEN, "Origin not allowed"));
        }
        let key = self.key.as_ref()?;
        if is_public(req) || presented_key(req).is_some_and(|k| key.matches(k)) {
            return None;
        }
        if takes_ticket(path) && ticket_param(req).is_some_and(|t| self.tickets.redeem(&t)) {
            return None;
        }
        Some(refuse(
            StatusCode::UNAUTHORIZED,
            "Invalid or missing API key",
        ))
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
        let book = TicketBook::new(Duration::from_secs(30));
        let ticket = book.issue();
        assert!(book.redeem(&ticket));
        assert!(!book.redeem(&ticket));
        assert!(!book.redeem("made-up"));
    }

    #[test]
    fn an_expired_ticket_is_refused() {
        let book = TicketBook::new(Duration::ZERO);
        let ticket = book.issue();
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
}

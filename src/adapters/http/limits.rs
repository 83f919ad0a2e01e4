//! The request body: read only after the guard let the request through,
//! limited in size while it streams (413) and in time (408), and refused
//! (400) when it is JSON with a key given twice.
//!
//! poem's own `SizeLimit` refuses every request without `Content-Length`
//! (411), GETs included; this one reads what the client sends, with or
//! without `Content-Length`, up to the limit, so a handler never waits on a
//! client that stops sending.

use std::time::Duration;

use poem::http::{Method, StatusCode, header};
use poem::web::headers::{ContentLength, HeaderMapExt};
use poem::{Body, Endpoint, IntoResponse, Middleware, Request, Response, Result};

use crate::adapters::json::{JsonCheck, check_unique_keys};

/// A JSON body naming one key twice in an object, refused before any
/// handler reads it.
#[derive(Debug, thiserror::Error)]
#[error("Invalid JSON body: the key {0:?} appears twice in one object")]
pub struct KeyGivenTwice(pub String);

pub struct BodyLimit {
    max_bytes: usize,
    timeout: Duration,
}

impl BodyLimit {
    #[must_use]
    pub fn new(max_bytes: usize, timeout: Duration) -> Self {
        Self { max_bytes, timeout }
    }
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        BodyLimitEndpoint {
            inner,
            max_bytes: self.max_bytes,
            timeout: self.timeout,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    max_bytes: usize,
    timeout: Duration,
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| {
            let media = media.trim();
            media.eq_ignore_ascii_case("application/json")
                || (media.len() > 5 && media[media.len() - 5..].eq_ignore_ascii_case("+json"))
        })
}

/// Whether a request's body is read (and so limited): a GET's or HEAD's
/// body means nothing here and is never read. Also where the spec declares
/// the 413 and 408 ([`super::spec`]).
pub(super) fn reads_body(method: &Method) -> bool {
    method != Method::GET && method != Method::HEAD
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        if reads_body(req.method()) {
            if let Some(ContentLength(length)) = req.headers().typed_get::<ContentLength>()
                && usize::try_from(length).map_or(true, |length| length > self.max_bytes)
            {
                return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
            }
            let body = req.take_body().into_bytes_limit(self.max_bytes);
            let body = match tokio::time::timeout(self.timeout, body).await {
                Err(_) => return Err(poem::Error::from_status(StatusCode::REQUEST_TIMEOUT)),
                Ok(Err(_)) => return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE)),
                Ok(Ok(body)) => body,
            };
            if is_json(&req)
                && let JsonCheck::DuplicateKey(key) = check_unique_keys(&body)
            {
                // An error, not an answer: the routes' error mapping gives
                // it the shape the operation declares for a 400.
                return Err(poem::Error::new(
                    KeyGivenTwice(key),
                    StatusCode::BAD_REQUEST,
                ));
            }
            req.set_body(Body::from_bytes(body));
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

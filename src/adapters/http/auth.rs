//! One auth layer for every route: the API key, compared in constant time.

use std::fmt;
use std::sync::Arc;

use poem::http::{Method, StatusCode};
use poem::web::Json;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
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

/// Paths anyone may read: the health check, and the API description (it is
/// generated from public code and holds nothing secret; client generators
/// and test tools fetch it before they have a key).
fn is_public(req: &Request) -> bool {
    let path = req.uri().path();
    (req.method() == Method::GET && (path == "/api/health" || path == "/openapi.json"))
        || path == "/docs"
        || path.starts_with("/docs/")
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

/// Refuses requests without the key before any handler (or body parser) runs,
/// so a refused request has no side effect.
pub struct ApiKeyAuth {
    key: Option<ApiKey>,
}

impl ApiKeyAuth {
    #[must_use]
    pub fn new(key: Option<ApiKey>) -> Self {
        Self { key }
    }
}

impl<E: Endpoint> Middleware<E> for ApiKeyAuth {
    type Output = ApiKeyAuthEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        ApiKeyAuthEndpoint {
            inner,
            key: self.key.clone(),
        }
    }
}

pub struct ApiKeyAuthEndpoint<E> {
    inner: E,
    key: Option<ApiKey>,
}

impl<E: Endpoint> Endpoint for ApiKeyAuthEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        if let Some(key) = &self.key
            && !is_public(&req)
            && !presented_key(&req).is_some_and(|k| key.matches(k))
        {
            return Ok(Json(json!({"detail": "Invalid or missing API key"}))
                .with_status(StatusCode::UNAUTHORIZED)
                .into_response());
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

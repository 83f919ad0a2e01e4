//! The `Allow` header on 405 answers (RFC 9110 requires it), computed from
//! the route table: the spec's operations plus the plain routes.

use std::sync::Arc;

use poem::http::{HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use serde_json::Value;

/// Path templates (`{id}` and `:id` segments match anything) and their methods.
#[derive(Clone, Default)]
pub struct AllowHeader {
    routes: Arc<Vec<(Vec<String>, String)>>,
}

impl AllowHeader {
    /// Builds the table from a spec (`paths`) and extra `(method, path)` routes.
    #[must_use]
    pub fn new(spec: &Value, plain: &[(&str, &str)]) -> Self {
        let mut table: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        let mut add = |path: &str, method: String| {
            let segments: Vec<String> = path.split('/').map(str::to_owned).collect();
            match table.iter_mut().find(|(s, _)| *s == segments) {
                Some((_, methods)) => methods.push(method),
                None => table.push((segments, vec![method])),
            }
        };
        if let Some(paths) = spec["paths"].as_object() {
            for (path, operations) in paths {
                for method in operations.as_object().into_iter().flat_map(|o| o.keys()) {
                    add(path, method.to_uppercase());
                }
            }
        }
        for (method, path) in plain {
            add(path, (*method).to_owned());
        }
        Self {
            routes: Arc::new(
                table
                    .into_iter()
                    .map(|(segments, methods)| (segments, methods.join(", ")))
                    .collect(),
            ),
        }
    }

    fn allowed(&self, path: &str) -> Option<&str> {
        let segments: Vec<&str> = path.split('/').collect();
        self.routes
            .iter()
            .find(|(template, _)| {
                template.len() == segments.len()
                    && template
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| t == s || t.starts_with('{') || t.starts_with(':'))
            })
            .map(|(_, methods)| methods.as_str())
    }
}

impl<E: Endpoint> Middleware<E> for AllowHeader {
    type Output = AllowHeaderEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        AllowHeaderEndpoint {
            inner,
            table: self.clone(),
        }
    }
}

pub struct AllowHeaderEndpoint<E> {
    inner: E,
    table: AllowHeader,
}

impl<E: Endpoint> Endpoint for AllowHeaderEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        // A `Uri` clone shares its bytes: no copy on the hot path.
        let uri = req.uri().clone();
        let mut response = self.inner.call(req).await?.into_response();
        if response.status() == StatusCode::METHOD_NOT_ALLOWED
            && let Some(methods) = self.table.allowed(uri.path())
            && let Ok(value) = HeaderValue::from_str(methods)
        {
            response.headers_mut().insert("allow", value);
        }
        Ok(response)
    }
}

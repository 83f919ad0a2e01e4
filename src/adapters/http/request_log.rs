//! A span per request (and a `debug` line with method, path and status when
//! it ends), tied together by a request id that is kept from `x-request-id` or generated, and returned on
//! every response; request counts and latencies go to `/metrics`.
//!
//! Only the path is logged: query strings may carry tickets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};
use std::time::Instant;

use metrics::{Counter, Histogram};

use poem::PathPattern;
use poem::http::{HeaderValue, Method};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

pub struct RequestLog;

impl<E: Endpoint> Middleware<E> for RequestLog {
    type Output = RequestLogEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RequestLogEndpoint {
            inner,
            series: RwLock::default(),
        }
    }
}

/// A metric series: method, route pattern (`None`: no route matched), status.
type Series = (&'static str, Option<Arc<str>>, u16);

pub struct RequestLogEndpoint<E> {
    inner: E,
    /// Handles of the series seen so far. Building a labelled key costs
    /// several allocations per request; a handle is an `Arc`. Bounded:
    /// methods outside the standard ones share one label, routes are
    /// patterns, statuses are numbers.
    series: RwLock<HashMap<Series, (Counter, Histogram)>>,
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

impl<E> RequestLogEndpoint<E> {
    fn instruments(&self, series: Series) -> (Counter, Histogram) {
        if let Some(found) = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&series)
        {
            return found.clone();
        }
        let (method, route, status) = series.clone();
        let route = route.map_or_else(|| "unmatched".to_owned(), |r| r.to_string());
        let made = (
            metrics::counter!("autopoiesis_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string()),
            metrics::histogram!("autopoiesis_http_request_duration_seconds", "method" => method, "route" => route),
        );
        self.series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(series, made.clone());
        made
    }
}

/// A client's id is kept when it is a short printable token; anything else
/// is replaced, so log lines cannot be forged through it.
fn request_id(req: &Request) -> HeaderValue {
    req.headers()
        .get(REQUEST_ID)
        .filter(|v| {
            v.len() <= 128
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        })
        .cloned()
        .unwrap_or_else(generated_id)
}

/// 32 lowercase hex characters: a random prefix drawn once per process and
/// a counter. Unique within the process and distinct across restarts, which
/// is all an id that ties log lines together needs; it costs a counter
/// increment, not a draw from the random generator per request.
fn generated_id() -> HeaderValue {
    static PREFIX: LazyLock<u64> = LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = [0u8; 32];
    hex::encode_to_slice([PREFIX.to_be_bytes(), n.to_be_bytes()].concat(), &mut text)
        .unwrap_or_default();
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

impl<E: Endpoint> Endpoint for RequestLogEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        let id = request_id(&req);
        // One field: the subscriber formats every span field when the span
        // opens, on every request, whether or not a line is ever logged in
        // it; the request id alone ties the lines together. Method and path
        // are on the `debug` line below.
        // The health check logs nothing and is the route polled most (load
        // balancers, orchestrators): it keeps its id and its metrics but
        // opens no span.
        let span = if req.uri().path() == "/api/health" {
            tracing::Span::none()
        } else {
            tracing::info_span!("request", request.id = id.to_str().unwrap_or_default())
        };
        let method = method_label(req.method());
        let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
        async move {
            let started = Instant::now();
            let mut response = match self.inner.call(req).await {
                Ok(output) => output.into_response(),
                Err(error) => error.into_response(),
            };
            let elapsed = started.elapsed();
            let status = response.status().as_u16();
            // The route's pattern, not its path, keeps label values bounded.
            let route = response.data::<PathPattern>().map(|p| Arc::clone(&p.0));
            let (requests, latency) = self.instruments((method, route, status));
            requests.increment(1);
            latency.record(elapsed.as_secs_f64());
            // At debug, like tower-http's TraceLayer: one line per request
            // costs a fifth of a fast route's CPU, and failures are logged
            // at info or above where they are handled. The span above stays
            // at info so every line logged inside a request has its id.
            tracing::debug!(
                http.method = method,
                http.path = path.as_deref().unwrap_or_default(),
                http.status = status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "request finished"
            );
            response.headers_mut().insert(REQUEST_ID, id);
            Ok(response)
        }
        .instrument(span)
        .await
    }
}

//! The web console (SPEC B13): the files of `console/`, embedded in the
//! binary at build time (`rust-embed`), served at `GET /` (the page) and
//! `GET /console/{file}` (its scripts and styles). Building and running
//! need no Node and no network; the files are plain ES modules and CSS.
//!
//! The page and its assets hold no data, so they need no key (like
//! `/docs`); everything they fetch does. Every answer carries a
//! `Content-Security-Policy` of `'self'` only (no inline script, no eval,
//! no other origin), a strong `ETag` (the file's SHA-256) that a
//! revalidation answers with 304, and `Cache-Control: no-cache`: the files
//! are not fingerprinted, so a browser revalidates each load (a 304 costs
//! no body), and a new binary's console is seen at once.

use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::web::Path;
use poem::{Endpoint, IntoResponse, Request, Response, handler};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "console/"]
struct Assets;

/// What the console's pages may load and connect to: this origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'";

/// The console's page at `/` (GET and HEAD), in front of `inner` (the
/// API, nested at the root) for every other request.
pub struct Root<E> {
    inner: E,
}

impl<E> Root<E> {
    pub fn new(inner: E) -> Self {
        Self { inner }
    }
}

impl<E: Endpoint> Endpoint for Root<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if req.uri().path() == "/" && matches!(*req.method(), Method::GET | Method::HEAD) {
            return Ok(serve(&req, "index.html"));
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

/// `GET /console/{file}`: one of its assets.
#[handler]
pub fn asset(req: &Request, Path(file): Path<String>) -> Response {
    serve(req, &file)
}

fn serve(req: &Request, name: &str) -> Response {
    let Some(file) = Assets::get(name) else {
        return (
            StatusCode::NOT_FOUND,
            poem::web::Json(serde_json::json!({"detail": "Not Found"})),
        )
            .into_response();
    };
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .finish()
    } else {
        let body = if req.method() == Method::HEAD {
            Vec::new()
        } else {
            file.data.into_owned()
        };
        Response::builder()
            .header(header::CONTENT_TYPE, content_type(file.metadata.mimetype()))
            .body(body)
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Text types say their charset (the files are UTF-8).
fn content_type(mime: &str) -> HeaderValue {
    let typed = if mime.starts_with("text/") || mime == "application/javascript" {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_owned()
    };
    HeaderValue::from_str(&typed).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

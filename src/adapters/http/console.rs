//! The web console (SPEC B13): the files of `console/`, embedded in the
//! binary at build time (`rust-embed`), served at `GET /` (the page) and
//! `GET /console/{file}` (its scripts and styles). Building and running
//! need no Node and no network; the files are plain ES modules and CSS.
//!
//! The page and its assets hold no data, so they need no key (like
//! `/docs`); everything they fetch does. Every answer carries a
//! `Content-Security-Policy` of `'self'` only (no inline script, no eval,
//! no other origin) and a strong `ETag` (the SHA-256 of what is sent) that a
//! revalidation answers with 304.
//!
//! **Caching.** The page refers to each asset by a fingerprinted name
//! (`/console/app.<hash>.js`, the hash of its content, fixed at the first
//! request): those answers are `immutable` for a year, as a new binary with
//! a changed file names it differently. The page itself, and an asset asked
//! for by its plain name, are `no-cache`: revalidated on each load (a 304
//! costs no body), so a new binary's console is seen at once.

use std::collections::HashMap;
use std::sync::OnceLock;

use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::web::Path;
use poem::{Endpoint, IntoResponse, Request, Response, handler};
use rust_embed::RustEmbed;
use sha2::{Digest, Sha256};

#[derive(RustEmbed)]
#[folder = "console/"]
struct Assets;

/// What the console's pages may load and connect to: this origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'";

/// The console's page at `/` (GET and HEAD), in front of `inner` (the
/// API, nested at the root) for every other request.
pub struct Root<E> {
    inner: E,
    /// Whether the API needs the key: the page says so, so that it asks
    /// for the key before any call instead of finding out from a 401.
    key_required: bool,
}

impl<E> Root<E> {
    pub fn new(inner: E, key_required: bool) -> Self {
        Self {
            inner,
            key_required,
        }
    }
}

impl<E: Endpoint> Endpoint for Root<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if req.uri().path() == "/" && matches!(*req.method(), Method::GET | Method::HEAD) {
            let page = if self.key_required { KEY_PAGE } else { PAGE };
            return Ok(serve(&req, page));
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

/// `GET /console/{file}`: one of its assets.
#[handler]
pub fn asset(req: &Request, Path(file): Path<String>) -> Response {
    serve(req, &file)
}

/// One file as it is served.
struct Served {
    body: Vec<u8>,
    content_type: HeaderValue,
    /// Quoted hex SHA-256 of `body`.
    etag: String,
    /// Whether its name carries its content's hash (cached for good).
    fingerprinted: bool,
}

/// The page's name among the embedded files, and as served when the API
/// needs no key.
const PAGE: &str = "index.html";
/// The page as served when the API needs the key.
const KEY_PAGE: &str = "index.html;key";
/// What the page says about the key: `<meta name="autopoiesis-auth">`.
const AUTH_OPEN: &str = r#"<meta name="autopoiesis-auth" content="open">"#;
const AUTH_KEY: &str = r#"<meta name="autopoiesis-auth" content="key">"#;
/// Hex digits of the content hash in a fingerprinted name.
const FINGERPRINT_DIGITS: usize = 12;
/// `Cache-Control` for a fingerprinted asset: its name changes with it.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Every file of the console by the names it is served under: each asset
/// by its plain and its fingerprinted name, the page with its references
/// rewritten to the fingerprinted ones.
fn site() -> &'static HashMap<String, Served> {
    static SITE: OnceLock<HashMap<String, Served>> = OnceLock::new();
    SITE.get_or_init(|| {
        let mut files = HashMap::new();
        let mut renames = Vec::new();
        for name in Assets::iter().filter(|name| name != PAGE) {
            let Some(file) = Assets::get(&name) else {
                continue;
            };
            let hash = hex::encode(file.metadata.sha256_hash());
            let fingerprinted = match name.rsplit_once('.') {
                Some((stem, ext)) => format!("{stem}.{}.{ext}", &hash[..FINGERPRINT_DIGITS]),
                None => format!("{name}.{}", &hash[..FINGERPRINT_DIGITS]),
            };
            let content_type = content_type(file.metadata.mimetype());
            let body = file.data.into_owned();
            let etag = format!("\"{hash}\"");
            files.insert(
                fingerprinted.clone(),
                Served {
                    body: body.clone(),
                    content_type: content_type.clone(),
                    etag: etag.clone(),
                    fingerprinted: true,
                },
            );
            files.insert(
                name.to_string(),
                Served {
                    body,
                    content_type,
                    etag,
                    fingerprinted: false,
                },
            );
            renames.push((
                format!("/console/{name}\""),
                format!("/console/{fingerprinted}\""),
            ));
        }
        if let Some(page) = Assets::get(PAGE) {
            let mut html = String::from_utf8_lossy(&page.data).into_owned();
            for (plain, fingerprinted) in &renames {
                html = html.replace(plain, fingerprinted);
            }
            for (name, html) in [
                (PAGE, html.clone()),
                (KEY_PAGE, html.replace(AUTH_OPEN, AUTH_KEY)),
            ] {
                let body = html.into_bytes();
                files.insert(
                    name.to_owned(),
                    Served {
                        etag: format!("\"{}\"", hex::encode(Sha256::digest(&body))),
                        content_type: content_type(page.metadata.mimetype()),
                        body,
                        fingerprinted: false,
                    },
                );
            }
        }
        files
    })
}

fn serve(req: &Request, name: &str) -> Response {
    let Some(file) = site().get(name) else {
        return (
            StatusCode::NOT_FOUND,
            poem::web::Json(serde_json::json!({"detail": "Not Found"})),
        )
            .into_response();
    };
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim() == file.etag || t.trim() == "*")
        });
    let mut response = if fresh {
        Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .finish()
    } else {
        let body = if req.method() == Method::HEAD {
            Vec::new()
        } else {
            file.body.clone()
        };
        Response::builder()
            .header(header::CONTENT_TYPE, file.content_type.clone())
            .body(body)
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&file.etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if file.fingerprinted {
            IMMUTABLE
        } else {
            "no-cache"
        }),
    );
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

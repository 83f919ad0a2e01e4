//! The request body limit, answered with the API's JSON error shape.
//!
//! poem's own `SizeLimit` refuses every request without `Content-Length`
//! (411), GETs included; this one checks the header when there is one and
//! reads a chunked body up to the limit when there is not.

use poem::http::{Method, StatusCode};
use poem::web::headers::{ContentLength, HeaderMapExt};
use poem::{Body, Endpoint, Middleware, Request, Result};

pub struct BodyLimit {
    max_bytes: usize,
}

impl BodyLimit {
    #[must_use]
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes }
    }
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        BodyLimitEndpoint {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    max_bytes: usize,
}

fn too_large() -> poem::Error {
    poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE)
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        match req.headers().typed_get::<ContentLength>() {
            Some(ContentLength(length))
                if usize::try_from(length).map_or(true, |length| length > self.max_bytes) =>
            {
                return Err(too_large());
            }
            Some(_) => {}
            None if req.method() != Method::GET && req.method() != Method::HEAD => {
                let body = req
                    .take_body()
                    .into_bytes_limit(self.max_bytes)
                    .await
                    .map_err(|_| too_large())?;
                req.set_body(Body::from_bytes(body));
            }
            None => {}
        }
        self.inner.call(req).await
    }
}

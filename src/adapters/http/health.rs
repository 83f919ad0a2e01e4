//! `GET /api/health`: is the process up. Never needs the key.
//!
//! Load balancers and orchestrators poll this route more than any other,
//! so requests are answered by [`fast_health`], a plain poem handler with a
//! body rendered once, mounted ahead of the OpenAPI service. [`HealthApi`]
//! stays the route's description in the spec; a test checks that the two
//! answer the same.

use std::sync::LazyLock;

use poem::{Response, handler};
use poem_openapi::{ApiResponse, OpenApi, payload::Json};

use super::ApiTags;
use super::dto::HealthResponse;

pub struct HealthApi;

#[derive(ApiResponse)]
enum HealthReply {
    /// The server is up.
    #[oai(status = 200)]
    Ok(Json<HealthResponse>),
}

fn health() -> HealthResponse {
    HealthResponse {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[OpenApi]
impl HealthApi {
    /// Health check
    ///
    /// Answers 200 while the process serves requests, whether or not the
    /// agent runtime could be initialised.
    #[oai(
        path = "/api/health",
        method = "get",
        operation_id = "health",
        tag = "ApiTags::System"
    )]
    async fn health(&self) -> HealthReply {
        HealthReply::Ok(Json(health()))
    }
}

/// The health answer, served without the OpenAPI machinery.
#[handler]
pub fn fast_health() -> Response {
    static BODY: LazyLock<String> = LazyLock::new(|| {
        let body = health();
        serde_json::json!({"status": body.status, "version": body.version}).to_string()
    });
    Response::builder()
        .content_type("application/json; charset=utf-8")
        .body(BODY.as_str())
}

#[cfg(test)]
mod tests {
    use poem::http::header::CONTENT_TYPE;
    use poem::test::TestClient;

    use super::*;

    #[tokio::test]
    async fn the_fast_health_route_answers_what_the_spec_describes() {
        let fast = TestClient::new(poem::Route::new().at("/api/health", poem::get(fast_health)));
        let described = TestClient::new(poem_openapi::OpenApiService::new(HealthApi, "t", "1"));
        let fast = fast.get("/api/health").send().await;
        let described = described.get("/api/health").send().await;
        assert_eq!(fast.0.status(), described.0.status());
        assert_eq!(
            fast.0.headers().get(CONTENT_TYPE),
            described.0.headers().get(CONTENT_TYPE)
        );
        let fast: serde_json::Value = fast.0.into_body().into_json().await.unwrap();
        let described: serde_json::Value = described.0.into_body().into_json().await.unwrap();
        assert_eq!(fast, described);
    }
}

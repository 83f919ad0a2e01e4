//! `GET /api/health`: is the process up. Never needs the key.

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
        HealthReply::Ok(Json(HealthResponse {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}

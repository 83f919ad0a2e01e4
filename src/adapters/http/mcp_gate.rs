//! Refuses an MCP `initialize` beyond the session cap, or beyond the
//! server's client limit, with 429 and a JSON `detail`, before rmcp sees it:
//! rmcp answers its session manager's refusal with a bare 500.

use std::sync::Arc;

use poem::http::{Method, StatusCode};
use poem::web::Json;
use poem::{Body, Endpoint, IntoResponse, Middleware, Request, Response, Result};
use serde::Deserialize;
use serde_json::json;

use crate::adapters::mcp::CountedSessions;

pub struct McpSessionGate {
    pub sessions: Arc<CountedSessions>,
}

impl<E: Endpoint> Middleware<E> for McpSessionGate {
    type Output = McpSessionGateEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        McpSessionGateEndpoint {
            inner,
            sessions: Arc::clone(&self.sessions),
        }
    }
}

pub struct McpSessionGateEndpoint<E> {
    inner: E,
    sessions: Arc<CountedSessions>,
}

/// The one field of a JSON-RPC message the gate reads.
#[derive(Deserialize)]
struct JsonRpc {
    method: Option<String>,
}

fn is_initialize(body: &[u8]) -> bool {
    serde_json::from_slice::<JsonRpc>(body)
        .is_ok_and(|message| message.method.as_deref() == Some("initialize"))
}

impl<E: Endpoint> Endpoint for McpSessionGateEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        // Only a POST without a session can open one; the body is read
        // (already within the body limit) only when there is no room.
        if req.method() == Method::POST
            && !req.headers().contains_key("mcp-session-id")
            && let Some(why) = self.sessions.refusal()
        {
            let body = req.take_body().into_bytes().await?;
            if is_initialize(&body) {
                return Ok(Json(json!({ "detail": why }))
                    .with_status(StatusCode::TOO_MANY_REQUESTS)
                    .into_response());
            }
            req.set_body(Body::from_bytes(body));
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::is_initialize;

    #[test]
    fn only_an_initialize_request_opens_a_session() {
        assert!(is_initialize(
            br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#
        ));
        for other in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"server/discover"}"#[..],
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            br#"[{"method":"initialize"}]"#,
            b"not json",
        ] {
            assert!(!is_initialize(other), "{}", String::from_utf8_lossy(other));
        }
    }
}

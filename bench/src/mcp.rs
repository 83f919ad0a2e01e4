//! A minimal MCP client over Streamable HTTP, plain JSON-RPC on `POST /mcp`:
//! `initialize` (the answer's `Mcp-Session-Id` header names the session),
//! `notifications/initialized`, then `tools/call`. Answers may come as JSON
//! or as an SSE stream of `data:` lines; both are read.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::{Value, json};

use crate::load::{self, Workload};

pub const PATH: &str = "/mcp";
const ACCEPT: &str = "application/json, text/event-stream";
const PROTOCOL_VERSION: &str = "2025-06-18";

/// An initialised MCP session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: Option<String>,
    pub protocol_version: String,
}

fn post(address: SocketAddr, session: Option<&Session>, body: Vec<u8>) -> Request<Full<Bytes>> {
    let mut request = Request::post(PATH)
        .header(hyper::header::HOST, address.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, ACCEPT);
    if let Some(session) = session {
        request = request.header("mcp-protocol-version", session.protocol_version.as_str());
        if let Some(id) = &session.id {
            request = request.header("mcp-session-id", id.as_str());
        }
    }
    request
        .body(Full::new(Bytes::from(body)))
        .expect("a POST with valid headers")
}

/// Opens a session; `Ok(None)` when the server has no `/mcp` (404).
pub async fn open(address: SocketAddr) -> anyhow::Result<Option<Session>> {
    let mut send = load::connect(address).await?;
    let initialize = json!({
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "autopoiesis-bench", "version": env!("CARGO_PKG_VERSION")},
        },
    });
    let request = post(address, None, serde_json::to_vec(&initialize)?);
    send.ready().await?;
    let response = send.send_request(request).await?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let id = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await?
        .to_bytes();
    if status != StatusCode::OK {
        bail!("initialize: {status}: {}", String::from_utf8_lossy(&body));
    }
    let answer = rpc_answer(&body).context("initialize: no JSON-RPC answer")?;
    let result = answer
        .get("result")
        .with_context(|| format!("initialize failed: {answer}"))?;
    let session = Session {
        id,
        protocol_version: result["protocolVersion"]
            .as_str()
            .unwrap_or(PROTOCOL_VERSION)
            .to_owned(),
    };
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, body) = load::exchange(
        &mut send,
        post(address, Some(&session), serde_json::to_vec(&initialized)?),
    )
    .await?;
    if !status.is_success() {
        bail!(
            "notifications/initialized: {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(Some(session))
}

/// The JSON-RPC answer in a body: the body itself, or the last `data:` line
/// of an SSE stream that holds an answer (`result` or `error`).
pub fn rpc_answer(body: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text).ok();
    }
    text.lines()
        .rev()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find(|v| v.get("result").is_some() || v.get("error").is_some())
}

/// A successful `tools/call`: a result not flagged as a tool error, whose
/// text is not an `error.*` envelope (the tools answer failures that way,
/// e.g. `error.runtime_uninitialized`, without a protocol error).
fn tool_call_succeeded(status: StatusCode, body: &[u8]) -> bool {
    let Some(result) = (status == StatusCode::OK)
        .then(|| rpc_answer(body))
        .flatten()
        .and_then(|mut answer| answer.get_mut("result").map(Value::take))
    else {
        return false;
    };
    if result.get("isError") == Some(&Value::Bool(true)) {
        return false;
    }
    let envelope_type = result["content"][0]["text"]
        .as_str()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|envelope| envelope["type"].as_str().map(str::to_owned));
    !envelope_type.is_some_and(|kind| kind.starts_with("error."))
}

/// `tools/call dashboard.status` on connection `conn`'s own session.
pub fn dashboard_status(address: SocketAddr, sessions: Vec<Session>) -> Workload {
    let sessions = Arc::new(sessions);
    Workload {
        build: Box::new(move |conn, i| {
            let call = json!({
                "jsonrpc": "2.0",
                "id": i + 1,
                "method": "tools/call",
                "params": {"name": "dashboard.status", "arguments": {}},
            });
            let body = serde_json::to_vec(&call).unwrap_or_default();
            post(address, Some(&sessions[conn % sessions.len()]), body)
        }),
        check: tool_call_succeeded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_json_and_from_sse() {
        let json = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
        assert!(tool_call_succeeded(StatusCode::OK, json));
        let sse = b"id: 0\ndata: \n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"content\":[],\"isError\":false}}\n\n";
        assert!(tool_call_succeeded(StatusCode::OK, sse));
        let failed = br#"data: {"jsonrpc":"2.0","id":1,"result":{"isError":true}}"#;
        assert!(!tool_call_succeeded(StatusCode::OK, failed));
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#;
        assert!(!tool_call_succeeded(StatusCode::OK, error));
        let envelope = |kind: &str| {
            let text = json!({"type": kind, "data": {}}).to_string();
            json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}]}})
                .to_string()
        };
        assert!(tool_call_succeeded(
            StatusCode::OK,
            envelope("dashboard.status").as_bytes()
        ));
        assert!(!tool_call_succeeded(
            StatusCode::OK,
            envelope("error.runtime_uninitialized").as_bytes()
        ));
        assert!(!tool_call_succeeded(StatusCode::NOT_FOUND, json.as_slice()));
    }
}

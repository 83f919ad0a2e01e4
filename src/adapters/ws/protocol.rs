//! The session stream's wire format, shared by WebSocket and SSE.
//!
//! Outgoing frames are `{"op", "data", "seq", "turn_id"}` for broadcast events
//! and `{"op", "data"}` for replies to one client. Incoming WebSocket frames
//! are `{"op", "data"}`.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::adapters::json::{JsonCheck, check_unique_keys};
use crate::domain::events::{APPROVAL_RECORDED_MESSAGE, APPROVAL_UNSUPPORTED_CODE, SessionEvent};
use crate::domain::session::TurnId;

/// The wire name and `data` object of an event.
#[must_use]
pub fn encode_event(event: &SessionEvent, turn: Option<&TurnId>) -> (&'static str, Value) {
    match event {
        SessionEvent::Token { content } => ("token", json!({ "content": content })),
        SessionEvent::ThinkingStart => ("thinking_start", json!({})),
        SessionEvent::Thinking { content } => ("thinking", json!({ "content": content })),
        SessionEvent::ThinkingDone => ("thinking_done", json!({})),
        SessionEvent::ToolCall {
            tool_call_id,
            name,
            details,
        } => (
            "tool_call",
            json!({"tool_call_id": tool_call_id, "name": name, "details": details}),
        ),
        SessionEvent::ToolResult {
            tool_call_id,
            status,
            details,
        } => (
            "tool_result",
            json!({"tool_call_id": tool_call_id, "status": status, "details": details}),
        ),
        SessionEvent::Done { content } => ("done", json!({ "content": content })),
        SessionEvent::Error { code, message } => {
            let mut data = Map::new();
            if let Some(code) = code {
                data.insert("code".into(), json!(code));
            }
            data.insert("message".into(), json!(message));
            ("error", Value::Object(data))
        }
        SessionEvent::ApprovalRecorded { approval_id } => (
            "error",
            json!({
                "code": APPROVAL_UNSUPPORTED_CODE,
                "message": APPROVAL_RECORDED_MESSAGE,
                "approval_id": approval_id,
            }),
        ),
        SessionEvent::Cancelled { partial } => (
            "cancelled",
            json!({"turn_id": turn.map(TurnId::as_str), "partial": partial}),
        ),
    }
}

/// A frame for the whole session: carries its sequence number and turn.
#[must_use]
pub fn broadcast_frame(op: &str, data: Value, seq: u64, turn: Option<&TurnId>) -> String {
    json!({"op": op, "data": data, "seq": seq, "turn_id": turn.map(TurnId::as_str)}).to_string()
}

/// A frame for one client only (no `seq`: it is not part of the session log).
#[must_use]
pub fn direct_frame(op: &str, data: Value) -> String {
    json!({"op": op, "data": data}).to_string()
}

/// An `error` frame for one client.
#[must_use]
pub fn direct_error(message: &str) -> String {
    direct_frame("error", json!({ "message": message }))
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Message { content: String },
    Approve,
    Cancel,
    Unknown(String),
}

/// Why an incoming frame was refused; the text is the `error` frame's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncomingError {
    #[error("Invalid message format")]
    InvalidFormat,
    #[error("Invalid message format: content must be a string")]
    ContentNotString,
}

#[derive(Deserialize)]
struct RawIncoming {
    op: String,
    #[serde(default)]
    data: Option<Value>,
}

/// Parses an incoming text frame.
///
/// # Errors
/// [`IncomingError`] when the frame is not `{"op": string, "data": object?}`
/// (a key given twice in one object included) or a `message`'s `content`
/// is not a string.
pub fn parse_incoming(text: &str) -> Result<Incoming, IncomingError> {
    if let JsonCheck::DuplicateKey(_) = check_unique_keys(text.as_bytes()) {
        return Err(IncomingError::InvalidFormat);
    }
    let raw: RawIncoming = serde_json::from_str(text).map_err(|_| IncomingError::InvalidFormat)?;
    let data = match raw.data {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(IncomingError::InvalidFormat),
    };
    Ok(match raw.op.as_str() {
        "message" => match data.get("content") {
            None | Some(Value::Null) => Incoming::Message {
                content: String::new(),
            },
            Some(Value::String(content)) => Incoming::Message {
                content: content.clone(),
            },
            Some(_) => return Err(IncomingError::ContentNotString),
        },
        "approve" => Incoming::Approve,
        "cancel" => Incoming::Cancel,
        other => Incoming::Unknown(other.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_frames_parse_into_ops() {
        assert_eq!(
            parse_incoming(r#"{"op":"message","data":{"content":"hi"}}"#),
            Ok(Incoming::Message {
                content: "hi".into()
            })
        );
        assert_eq!(parse_incoming(r#"{"op":"approve"}"#), Ok(Incoming::Approve));
        assert_eq!(
            parse_incoming(r#"{"op":"cancel","data":{}}"#),
            Ok(Incoming::Cancel)
        );
        assert_eq!(
            parse_incoming(r#"{"op":"dance","data":{}}"#),
            Ok(Incoming::Unknown("dance".into()))
        );
    }

    #[test]
    fn malformed_frames_are_invalid_format() {
        for bad in [
            "",
            "nope",
            "[]",
            r#"{"data":{}}"#,
            r#"{"op":1}"#,
            r#"{"op":"message","data":[1]}"#,
            r#"{"op":"message","op":"cancel","data":{}}"#,
            r#"{"op":"message","data":{"content":"a","content":"b"}}"#,
        ] {
            assert_eq!(
                parse_incoming(bad),
                Err(IncomingError::InvalidFormat),
                "{bad}"
            );
        }
        assert_eq!(
            parse_incoming(r#"{"op":"message","data":{"content":5}}"#),
            Err(IncomingError::ContentNotString)
        );
    }

    #[test]
    fn error_events_carry_a_code_only_when_they_have_one() {
        let (op, data) = encode_event(&SessionEvent::approval_unsupported(), None);
        assert_eq!(op, "error");
        assert_eq!(data["code"], "approval_unsupported");
        let (_, data) = encode_event(
            &SessionEvent::Error {
                code: None,
                message: "boom".into(),
            },
            None,
        );
        assert_eq!(data, json!({"message": "boom"}));
    }
}

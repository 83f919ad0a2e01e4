//! The WebSocket side of the session stream's protocol: the ops a client
//! sends (`{"op", "data"}`) and the `error` replies meant for that client
//! only. The frames every client receives are encoded by
//! [`crate::adapters::stream::frames`].

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::adapters::json::{JsonCheck, check_unique_keys};
use crate::adapters::stream::frames::direct_frame;

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
}

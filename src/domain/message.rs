//! Conversation history in pydantic-ai's `ModelMessage` JSON shape.
//!
//! The Python original stored pydantic-ai messages and its clients read them,
//! so the shape *is* the contract: these types carry serde attributes that
//! produce exactly that JSON, and nothing else in the crate defines it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A session's history, oldest first. Shared, not copied: a turn reads it
/// while the store keeps it, and the store copies it on write only if a turn
/// still holds the old one.
pub type History = std::sync::Arc<Vec<ModelMessage>>;

/// One message of a session's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelMessage {
    /// What was sent to the model: the user's prompt, tool returns.
    Request { parts: Vec<RequestPart> },
    /// What the model answered.
    Response {
        parts: Vec<ResponsePart>,
        model_name: Option<String>,
        timestamp: DateTime<Utc>,
    },
}

/// A part of a request message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "part_kind", rename_all = "kebab-case")]
pub enum RequestPart {
    UserPrompt {
        content: String,
        timestamp: DateTime<Utc>,
    },
    ToolReturn {
        tool_name: String,
        content: Value,
        tool_call_id: String,
        timestamp: DateTime<Utc>,
    },
}

/// A part of a response message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "part_kind", rename_all = "kebab-case")]
pub enum ResponsePart {
    Text {
        content: String,
    },
    Thinking {
        content: String,
    },
    ToolCall {
        tool_name: String,
        args: Value,
        tool_call_id: String,
    },
}

impl ModelMessage {
    /// The bytes of text the message holds (prompts, answers, thinking,
    /// tool names, arguments and returns): what the history cap counts.
    #[must_use]
    pub fn size(&self) -> usize {
        let value_size = |value: &Value| serde_json::to_vec(value).map_or(0, |v| v.len());
        match self {
            Self::Request { parts } => parts
                .iter()
                .map(|part| match part {
                    RequestPart::UserPrompt { content, .. } => content.len(),
                    RequestPart::ToolReturn {
                        tool_name,
                        content,
                        tool_call_id,
                        ..
                    } => tool_name.len() + value_size(content) + tool_call_id.len(),
                })
                .sum(),
            Self::Response { parts, .. } => parts
                .iter()
                .map(|part| match part {
                    ResponsePart::Text { content } | ResponsePart::Thinking { content } => {
                        content.len()
                    }
                    ResponsePart::ToolCall {
                        tool_name,
                        args,
                        tool_call_id,
                    } => tool_name.len() + value_size(args) + tool_call_id.len(),
                })
                .sum(),
        }
    }

    /// A request holding just the user's prompt.
    #[must_use]
    pub fn user_prompt(content: impl Into<String>, timestamp: DateTime<Utc>) -> Self {
        Self::Request {
            parts: vec![RequestPart::UserPrompt {
                content: content.into(),
                timestamp,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn history_serialises_in_pydantic_ai_shape() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let messages = vec![
            ModelMessage::user_prompt("hi", at),
            ModelMessage::Response {
                parts: vec![
                    ResponsePart::Thinking {
                        content: "hm".into(),
                    },
                    ResponsePart::Text {
                        content: "hello".into(),
                    },
                    ResponsePart::ToolCall {
                        tool_name: "execute".into(),
                        args: json!({"command": "ls"}),
                        tool_call_id: "c1".into(),
                    },
                ],
                model_name: Some("echo".into()),
                timestamp: at,
            },
        ];
        assert_eq!(
            serde_json::to_value(&messages).unwrap(),
            json!([
                {"kind": "request", "parts": [
                    {"part_kind": "user-prompt", "content": "hi", "timestamp": "2026-01-02T03:04:05Z"}
                ]},
                {"kind": "response", "model_name": "echo", "timestamp": "2026-01-02T03:04:05Z", "parts": [
                    {"part_kind": "thinking", "content": "hm"},
                    {"part_kind": "text", "content": "hello"},
                    {"part_kind": "tool-call", "tool_name": "execute", "args": {"command": "ls"}, "tool_call_id": "c1"}
                ]}
            ])
        );
    }
}

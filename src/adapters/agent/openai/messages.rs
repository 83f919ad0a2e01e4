//! History to messages: the session's history (pydantic-ai shape) and the
//! new prompt as the `messages` of a Chat Completions request.

use serde_json::{Value, json};

use crate::domain::message::{ModelMessage, RequestPart, ResponsePart};

/// What a tool call the model never got an answer to is told, so the next
/// request is valid: the API rejects an assistant `tool_calls` message that
/// is not followed by a `tool` message for each call, and this server defers
/// every tool call without running it.
const UNANSWERED_TOOL_CALL: &str =
    "Not run: this tool call needed a human's approval, which was not given.";

/// The request's `messages`: the history, then the new prompt.
///
/// Tool calls left without a return (this server defers them all) get a
/// synthetic `tool` answer before the conversation moves on, because the API
/// rejects a history where they have none.
pub(super) fn openai_messages(history: &[ModelMessage], prompt: &str) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut unanswered: Vec<String> = Vec::new();
    for message in history {
        match message {
            ModelMessage::Request { parts } => {
                // Tool returns first: they must directly follow the
                // assistant message that made the calls.
                for part in parts {
                    if let RequestPart::ToolReturn {
                        content,
                        tool_call_id,
                        ..
                    } = part
                    {
                        unanswered.retain(|id| id != tool_call_id);
                        messages.push(json!({
                            "role": "tool",
                            "tool_call_id": tool_call_id,
                            "content": text_or_json(content),
                        }));
                    }
                }
                answer_unanswered(&mut messages, &mut unanswered);
                for part in parts {
                    if let RequestPart::UserPrompt { content, .. } = part {
                        messages.push(json!({"role": "user", "content": content}));
                    }
                }
            }
            ModelMessage::Response { parts, .. } => {
                answer_unanswered(&mut messages, &mut unanswered);
                if let Some(assistant) = assistant_message(parts) {
                    unanswered = parts
                        .iter()
                        .filter_map(|part| match part {
                            ResponsePart::ToolCall { tool_call_id, .. } => {
                                Some(tool_call_id.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    messages.push(assistant);
                }
            }
        }
    }
    answer_unanswered(&mut messages, &mut unanswered);
    messages.push(json!({"role": "user", "content": prompt}));
    messages
}

fn answer_unanswered(messages: &mut Vec<Value>, unanswered: &mut Vec<String>) {
    for tool_call_id in unanswered.drain(..) {
        messages.push(json!({
            "role": "tool",
            "tool_call_id": tool_call_id,
            "content": UNANSWERED_TOOL_CALL,
        }));
    }
}

/// A response as one assistant message; `None` when it holds neither text
/// nor tool calls (only thinking, which is not sent back), because the API
/// rejects an assistant message with neither.
fn assistant_message(parts: &[ResponsePart]) -> Option<Value> {
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for part in parts {
        match part {
            ResponsePart::Text { content } => {
                text.get_or_insert_with(String::new).push_str(content)
            }
            ResponsePart::Thinking { .. } => {}
            ResponsePart::ToolCall {
                tool_name,
                args,
                tool_call_id,
            } => tool_calls.push(json!({
                "id": tool_call_id,
                "type": "function",
                "function": {"name": tool_name, "arguments": text_or_json(args)},
            })),
        }
    }
    if text.is_none() && tool_calls.is_empty() {
        return None;
    }
    let mut message = json!({"role": "assistant", "content": text});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    Some(message)
}

/// A string as itself, anything else as its JSON text: tool arguments the
/// model got wrong are kept as the raw string it sent, and go back verbatim.
fn text_or_json(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn response(parts: Vec<ResponsePart>) -> ModelMessage {
        ModelMessage::Response {
            parts,
            model_name: Some("m".into()),
            timestamp: at(),
        }
    }

    #[test]
    fn history_becomes_user_assistant_and_tool_messages_then_the_prompt() {
        let history = vec![
            ModelMessage::user_prompt("list files", at()),
            response(vec![
                ResponsePart::Thinking {
                    content: "hm".into(),
                },
                ResponsePart::Text {
                    content: "Sure.".into(),
                },
                ResponsePart::ToolCall {
                    tool_name: "execute".into(),
                    args: json!({"command": "ls"}),
                    tool_call_id: "c1".into(),
                },
            ]),
            ModelMessage::Request {
                parts: vec![RequestPart::ToolReturn {
                    tool_name: "execute".into(),
                    content: json!({"stdout": "a b"}),
                    tool_call_id: "c1".into(),
                    timestamp: at(),
                }],
            },
            response(vec![ResponsePart::Text {
                content: "a and b".into(),
            }]),
        ];
        assert_eq!(
            openai_messages(&history, "thanks"),
            vec![
                json!({"role": "user", "content": "list files"}),
                json!({"role": "assistant", "content": "Sure.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "execute", "arguments": "{\"command\":\"ls\"}"}}
                ]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "{\"stdout\":\"a b\"}"}),
                json!({"role": "assistant", "content": "a and b"}),
                json!({"role": "user", "content": "thanks"}),
            ]
        );
    }

    #[test]
    fn a_tool_call_with_no_text_sends_null_content_and_raw_string_arguments_verbatim() {
        let history = vec![response(vec![ResponsePart::ToolCall {
            tool_name: "execute".into(),
            args: json!("{not json"),
            tool_call_id: "c1".into(),
        }])];
        let messages = openai_messages(&history, "next");
        assert_eq!(messages[0]["content"], Value::Null);
        assert_eq!(
            messages[0]["tool_calls"][0]["function"]["arguments"],
            "{not json"
        );
    }

    #[test]
    fn a_deferred_tool_call_gets_a_synthetic_answer_before_the_next_prompt() {
        let history = vec![
            ModelMessage::user_prompt("go", at()),
            response(vec![ResponsePart::ToolCall {
                tool_name: "execute".into(),
                args: json!({}),
                tool_call_id: "c1".into(),
            }]),
        ];
        let messages = openai_messages(&history, "and now?");
        assert_eq!(
            messages[2],
            json!({"role": "tool", "tool_call_id": "c1", "content": UNANSWERED_TOOL_CALL})
        );
        assert_eq!(messages[3], json!({"role": "user", "content": "and now?"}));
        assert_eq!(messages.len(), 4);
    }

    #[test]
    fn a_response_with_only_thinking_is_not_sent() {
        let history = vec![
            ModelMessage::user_prompt("hi", at()),
            response(vec![ResponsePart::Thinking {
                content: "hm".into(),
            }]),
        ];
        let messages = openai_messages(&history, "again");
        assert_eq!(
            messages,
            vec![
                json!({"role": "user", "content": "hi"}),
                json!({"role": "user", "content": "again"}),
            ]
        );
    }
}

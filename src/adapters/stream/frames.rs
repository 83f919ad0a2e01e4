//! The session stream's outgoing frames, the same JSON whichever transport
//! (WebSocket or SSE) carries them.
//!
//! Broadcast events are `{"op", "data", "seq", "turn_id"}`; frames for one
//! client only (a `gap` notice, a WebSocket reply) are `{"op", "data"}`.

use serde_json::{Map, Value, json};

use crate::domain::events::{APPROVAL_RECORDED_MESSAGE, APPROVAL_UNSUPPORTED_CODE, SessionEvent};
use crate::domain::session::TurnId;

/// The wire name and `data` object of an event.
#[must_use]
pub fn encode_event(event: &SessionEvent, turn: Option<&TurnId>) -> (&'static str, Value) {
    match event {
        SessionEvent::Prompt { content } => ("prompt", json!({ "content": content })),
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

/// The wire names of the events a stream stores, as the `'static` names
/// frames carry; `None` for a name this version does not write.
#[must_use]
pub fn known_op(op: &str) -> Option<&'static str> {
    const OPS: [&str; 9] = [
        "token",
        "thinking_start",
        "thinking",
        "thinking_done",
        "tool_call",
        "tool_result",
        "done",
        "error",
        "cancelled",
    ];
    OPS.into_iter().find(|known| *known == op)
}

/// Whether a stream client's `?events=` list (comma-separated) asks for
/// `prompt` frames (SPEC B13), the one extra kind of event there is.
///
/// # Errors
/// The message for the client when the list names a kind this server does
/// not have: a typo should not silently mean "nothing extra".
pub fn asks_for_prompts(events: Option<&str>) -> Result<bool, String> {
    let Some(events) = events else {
        return Ok(false);
    };
    let mut prompts = false;
    for kind in events.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        if kind != "prompt" {
            let kind: String = kind.chars().take(40).collect();
            return Err(format!(
                "Unknown event kind '{kind}' in events: the one this server offers is 'prompt'"
            ));
        }
        prompts = true;
    }
    Ok(prompts)
}

/// A frame for the whole session: carries its sequence number and turn.
#[must_use]
pub fn broadcast_frame(op: &str, data: Value, seq: u64, turn: Option<&TurnId>) -> String {
    json!({"op": op, "data": data, "seq": seq, "turn_id": turn.map(TurnId::as_str)}).to_string()
}

/// A turn's `prompt` frame (SPEC B13): it names its turn but carries no
/// `seq`, as it is not numbered (clients that do not ask for prompts see
/// the stream's seqs without a hole).
#[must_use]
pub fn prompt_frame(data: Value, turn: Option<&TurnId>) -> String {
    json!({"op": "prompt", "data": data, "turn_id": turn.map(TurnId::as_str)}).to_string()
}

/// A frame for one client only (no `seq`: it is not part of the session log).
#[must_use]
pub fn direct_frame(op: &str, data: Value) -> String {
    json!({"op": op, "data": data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_list_asks_for_prompts_and_refuses_unknown_kinds() {
        assert_eq!(asks_for_prompts(None), Ok(false));
        assert_eq!(asks_for_prompts(Some("")), Ok(false));
        assert_eq!(asks_for_prompts(Some("prompt")), Ok(true));
        assert_eq!(asks_for_prompts(Some(" prompt ,")), Ok(true));
        let refused = asks_for_prompts(Some("prompt,tokens")).unwrap_err();
        assert!(refused.contains("'tokens'"), "{refused}");
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

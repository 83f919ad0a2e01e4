//! The tool catalogue: the names `/mcp` and `/api/tools` list, their
//! argument structs and the JSON schemas made from them (the doc comments
//! become the schema text).

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

/// Arguments of `approval.decide`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideArgs {
    /// The approval to decide: its envelope `id` or its `nonce`, as listed
    /// by `approval.list`.
    pub approval_id: String,
    /// `true` approves the tool calls (the envelope is consumed); `false`
    /// rejects them (the envelope expires).
    pub approved: bool,
    /// Why, in a few words; kept with the decision.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Arguments of `approval.list`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// At most this many approvals in the page: 1 to 500, 100 when absent.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Where the page starts: the `next_cursor` of the page before, as it
    /// was answered (opaque). Absent for the first page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Arguments of `chat.send`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatSendArgs {
    /// The message to send to the agent. Must not be empty.
    pub content: String,
    /// The session to continue (1-128 characters of A-Z a-z 0-9 . _ : -);
    /// a new session is created when absent or unknown.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Arguments of a tool that takes none.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// What clients are told about a tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of the arguments.
    pub input_schema: Value,
}

fn schema<T: JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or_else(|_| json!({"type": "object"}))
}

/// The tools, in the order they are listed.
#[must_use]
pub fn tools() -> Vec<ToolInfo> {
    vec![
        ToolInfo {
            name: "dashboard.status",
            description: "Runtime health: the active agent, its shell tier, whether approvals are unlocked (an approval key is loaded) and how many approvals are pending.",
            input_schema: schema::<NoArgs>(),
        },
        ToolInfo {
            name: "approval.list",
            description: "Pending approval envelopes, oldest first: the tool calls a model asked for that wait for a human's decision. One page at a time (limit, default 100); next_cursor, when not null, fetches the next page; count is the total pending.",
            input_schema: schema::<ListArgs>(),
        },
        ToolInfo {
            name: "approval.decide",
            description: "Approve or reject a pending approval envelope by its id or nonce. Exactly one decision wins; a second one finds nothing pending.",
            input_schema: schema::<DecideArgs>(),
        },
        ToolInfo {
            name: "system.info",
            description: "Server version, uptime and the configured agents.",
            input_schema: schema::<NoArgs>(),
        },
        ToolInfo {
            name: "chat.send",
            description: "Send a message to the agent and wait for its full reply. A reply that needs tool approval answers error.approval_unsupported.",
            input_schema: schema::<ChatSendArgs>(),
        },
        ToolInfo {
            name: "session.list",
            description: "The chat sessions, oldest first, with their message counts.",
            input_schema: schema::<NoArgs>(),
        },
    ]
}

//! Agents: who answers a chat turn, with which tools, and what a turn yields.

use std::fmt;
use std::str::FromStr;

use serde_json::{Value, json};

use super::message::ResponsePart;

/// How much a human must be involved before the agent's shell runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellTier {
    Free,
    Review,
    Approve,
}

impl ShellTier {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Review => "review",
            Self::Approve => "approve",
        }
    }
}

impl fmt::Display for ShellTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A shell tier name that is none of `free`, `review`, `approve`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown shell_tier {0:?} (expected free, review or approve)")]
pub struct UnknownShellTier(pub String);

impl FromStr for ShellTier {
    type Err = UnknownShellTier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Self::Free),
            "review" => Ok(Self::Review),
            "approve" => Ok(Self::Approve),
            other => Err(UnknownShellTier(other.to_owned())),
        }
    }
}

/// A tool the agent may ask for: what the model is told about it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the tool's arguments, as offered to the model.
    pub parameters: Value,
}

/// The built-in tool catalogue. The server runs none of these itself: a call
/// to any of them is a deferred request that a human must approve.
#[must_use]
pub fn tool_catalogue() -> Vec<ToolSpec> {
    let string = |description: &str| json!({"type": "string", "description": description});
    vec![
        ToolSpec {
            name: "execute".into(),
            description: "Run a shell command on the host and return its output.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"command": string("The shell command line to run.")},
                "required": ["command"],
                "additionalProperties": false
            }),
        },
        ToolSpec {
            name: "read_file".into(),
            description: "Read a text file and return its contents.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"path": string("Path of the file to read.")},
                "required": ["path"],
                "additionalProperties": false
            }),
        },
        ToolSpec {
            name: "write_file".into(),
            description: "Write text to a file, replacing what it held.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "path": string("Path of the file to write."),
                    "content": string("The complete new contents of the file.")
                },
                "required": ["path", "content"],
                "additionalProperties": false
            }),
        },
    ]
}

/// One configured agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub name: String,
    /// Picks the runtime adapter: `echo`, `openai:gpt-4o-mini`, ...
    pub model: String,
    pub shell_tier: ShellTier,
    /// Tools offered to the model, resolved against [`tool_catalogue`].
    pub tools: Vec<ToolSpec>,
}

impl AgentConfig {
    /// The agent used when no agents file is given: `default`, model `echo`.
    #[must_use]
    pub fn builtin() -> Self {
        Self {
            name: "default".into(),
            model: "echo".into(),
            shell_tier: ShellTier::Review,
            tools: tool_catalogue()
                .into_iter()
                .filter(|t| t.name == "execute")
                .collect(),
        }
    }
}

/// What a runtime reports while a turn streams.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    Token(String),
    ThinkingStart,
    Thinking(String),
    ThinkingDone,
    /// The model asked for a tool; `args` is the JSON it produced.
    ToolCall {
        tool_call_id: String,
        name: String,
        args: Value,
    },
}

/// The model's complete answer to one turn.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReply {
    pub model_name: String,
    pub parts: Vec<ResponsePart>,
}

/// Why a turn failed inside the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// A tool call needs approval but the approval key is locked.
    #[error("approval needed but the approval key is locked")]
    DeferredApprovalLocked,
    /// The model provider failed (unreachable, an error status, a broken stream).
    #[error("{0}")]
    Provider(String),
    /// The prompt asks for something the agent cannot do as asked (an
    /// unknown tool, arguments that are not JSON): the user's input is at
    /// fault, not the provider, and sending it again will not help.
    #[error("{0}")]
    InvalidRequest(String),
}

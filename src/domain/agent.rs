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

/// Longest provider message a client is shown, in characters.
const CLIENT_MESSAGE_CHARS: usize = 300;

/// A provider's error text as clients see it (SPEC B14): one line, without
/// a traceback or file paths, at most [`CLIENT_MESSAGE_CHARS`] characters.
/// Proxies such as LiteLLM put a Python traceback, with the paths of their
/// installation, in the error they answer; the runtime logs that whole text
/// once, and clients get the line that says what went wrong.
///
/// The line kept is the first one that is not part of a traceback (and
/// within it, what comes before `Traceback (most recent call last)`); a text
/// that is only a traceback keeps its last line (the exception). Words that
/// look like file paths become `…`.
#[must_use]
pub fn provider_message_for_clients(text: &str) -> String {
    // A traceback inside a line (a runtime that folded the text) ends it too.
    const TRACEBACK: &str = "Traceback (most recent call last)";
    let text = match text.split_once(TRACEBACK) {
        Some((before, _)) if !before.trim().is_empty() => before,
        _ => text,
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let in_traceback = |line: &str| {
        let trimmed = line.trim_start();
        line.starts_with(char::is_whitespace)
            || trimmed.starts_with(TRACEBACK)
            || trimmed.starts_with("File \"")
            || trimmed.starts_with("During handling of the above exception")
            || trimmed.starts_with("The above exception was the direct cause")
            || trimmed.starts_with("at ")
    };
    let line = lines
        .iter()
        .find(|l| !in_traceback(l))
        .or(lines.last())
        .map_or("", |l| l.trim());
    let words: Vec<String> = line
        .split_whitespace()
        .map(|word| {
            if looks_like_a_path(word) {
                "…".to_owned()
            } else {
                word.to_owned()
            }
        })
        .collect();
    let one_line = words.join(" ");
    let message = if one_line.chars().count() > CLIENT_MESSAGE_CHARS {
        let cut: String = one_line.chars().take(CLIENT_MESSAGE_CHARS - 1).collect();
        format!("{cut}…")
    } else {
        one_line
    };
    if message.is_empty() {
        "The model provider failed".to_owned()
    } else {
        message
    }
}

/// `/usr/lib/python3/site-packages/litellm/main.py`, `"/app/x.py",`,
/// `C:\srv\app.py`, `./src/lib.rs:12`: not a URL (`https://...`).
fn looks_like_a_path(word: &str) -> bool {
    let word = word.trim_matches(|c: char| "\"'(),;:[]".contains(c));
    if word.contains("://") {
        return false;
    }
    let rooted = word.starts_with('/') && word[1..].contains('/');
    let relative = (word.starts_with("./") || word.starts_with("../")) && word.len() > 3;
    let windows =
        word.len() > 3 && word.as_bytes()[0].is_ascii_alphabetic() && word[1..].starts_with(":\\");
    rooted || relative || windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_litellm_traceback_reaches_clients_as_its_one_line_without_paths() {
        let text = "litellm.BadRequestError: OpenAIException - Error code: 400 - model `gpt-9` does not exist\n\
Traceback (most recent call last):\n  File \"/usr/lib/python3.11/site-packages/litellm/main.py\", line 1012, in completion\n    response = openai_chat_completions.completion(\n  File \"/usr/lib/python3.11/site-packages/litellm/llms/openai.py\", line 88, in completion\n    raise OpenAIError(status_code=400, message=str(e))\nlitellm.llms.openai.OpenAIError: model `gpt-9` does not exist";
        assert_eq!(
            provider_message_for_clients(text),
            "litellm.BadRequestError: OpenAIException - Error code: 400 - model `gpt-9` does not exist"
        );
    }

    #[test]
    fn a_traceback_folded_into_one_line_is_cut_off_there() {
        let text = "the provider answered 400: litellm.BadRequestError: not allowed Traceback (most recent call last): File \"/srv/x.py\", line 3";
        assert_eq!(
            provider_message_for_clients(text),
            "the provider answered 400: litellm.BadRequestError: not allowed"
        );
    }

    #[test]
    fn a_bare_traceback_keeps_its_exception_line_and_paths_go() {
        let text = "Traceback (most recent call last):\n  File \"/srv/proxy/app.py\", line 3, in <module>\nRuntimeError: cannot read /etc/proxy/config.yaml";
        assert_eq!(
            provider_message_for_clients(text),
            "RuntimeError: cannot read …"
        );
    }

    #[test]
    fn urls_and_short_messages_stay_and_long_ones_are_cut() {
        let text = "provider answered 503 at https://api.example.com/v1/chat/completions";
        assert_eq!(provider_message_for_clients(text), text);
        let long = "x".repeat(1000);
        let cut = provider_message_for_clients(&long);
        assert_eq!(cut.chars().count(), CLIENT_MESSAGE_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(
            provider_message_for_clients(" \n "),
            "The model provider failed"
        );
    }
}

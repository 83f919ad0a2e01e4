//! What every client of a session sees while turns run on it.

use serde_json::Value;

/// The code clients match on when a turn needs an approval the server cannot
/// take yet.
pub const APPROVAL_UNSUPPORTED_CODE: &str = "approval_unsupported";
/// The message that goes with [`APPROVAL_UNSUPPORTED_CODE`].
pub const APPROVAL_UNSUPPORTED_MESSAGE: &str =
    "Deferred approvals are not supported in server mode yet.";
/// The message that goes with [`APPROVAL_UNSUPPORTED_CODE`] when the turn's
/// tool calls were recorded as a pending approval (approvals unlocked): a
/// human can decide it, but the turn does not resume yet.
pub const APPROVAL_RECORDED_MESSAGE: &str = "This turn's tool calls were recorded as a pending approval for a human to decide; the turn does not resume after the decision yet (server mode does not run tools).";

/// The message of a turn that needs an approval: whether its calls were
/// `recorded` as a pending one decides which.
#[must_use]
pub fn approval_unsupported_message(recorded: bool) -> &'static str {
    if recorded {
        APPROVAL_RECORDED_MESSAGE
    } else {
        APPROVAL_UNSUPPORTED_MESSAGE
    }
}

/// One event of a session's stream. Transports give each a wire name
/// (`token`, `done`, ...) and, for broadcast events, a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A turn's prompt, published when the turn starts (SPEC B13). Not part
    /// of the numbered stream: only clients that ask for prompts get it,
    /// right before the turn's first numbered event.
    Prompt {
        content: String,
    },
    Token {
        content: String,
    },
    ThinkingStart,
    Thinking {
        content: String,
    },
    ThinkingDone,
    ToolCall {
        tool_call_id: String,
        name: String,
        details: Value,
    },
    ToolResult {
        tool_call_id: String,
        status: String,
        details: Value,
    },
    /// The turn ended with this full text.
    Done {
        content: String,
    },
    /// The turn (or a request on the session) failed; `code` is set for
    /// failures a client is expected to handle by kind.
    Error {
        code: Option<&'static str>,
        message: String,
    },
    /// The turn was stopped; `partial` is the text streamed until then.
    Cancelled {
        partial: String,
    },
    /// The turn ended deferred and its tool calls wait as this pending
    /// approval: an `approval_unsupported` error naming it.
    ApprovalRecorded {
        approval_id: String,
    },
}

impl SessionEvent {
    /// The error every client gets when a turn needs an approval.
    #[must_use]
    pub fn approval_unsupported() -> Self {
        Self::Error {
            code: Some(APPROVAL_UNSUPPORTED_CODE),
            message: APPROVAL_UNSUPPORTED_MESSAGE.into(),
        }
    }

    /// True for the events that end a turn: exactly one per turn.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Done { .. }
                | Self::Error { .. }
                | Self::Cancelled { .. }
                | Self::ApprovalRecorded { .. }
        )
    }
}

//! The agent runtime port: something that turns a prompt and a history into
//! a streamed answer. The server contains no model; it drives one through
//! this trait.

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::agent::{AgentError, AgentEvent, AgentReply};
use crate::domain::message::History;

/// Receives a turn's events as the runtime produces them.
///
/// `emit` is synchronous and must not block: the domain's sink forwards to
/// bounded per-client queues that never wait on a slow client.
#[cfg_attr(test, mockall::automock)]
pub trait EventSink: Send + Sync {
    fn emit(&self, event: AgentEvent);
}

/// The input of one turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnInput {
    pub prompt: String,
    /// The session's history before this turn, oldest first.
    pub history: History,
}

/// Runs chat turns against a model.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait AgentRuntime: Send + Sync {
    /// Runs one turn, streaming its events to `sink`.
    ///
    /// Dropping the returned future cancels the turn: implementations must
    /// hold no state that a drop would leave inconsistent.
    ///
    /// # Errors
    /// - [`AgentError::DeferredApprovalLocked`] when the turn needs an
    ///   approval and the approval key is locked;
    /// - [`AgentError::Provider`] when the model provider fails: connection
    ///   refused, an error status, a malformed stream, a timeout. The message
    ///   says what failed and never contains credentials;
    /// - [`AgentError::InvalidRequest`] when the prompt itself cannot be
    ///   carried out (the user's input, not the provider, is at fault).
    async fn run_turn(
        &self,
        input: TurnInput,
        sink: Arc<dyn EventSink>,
    ) -> Result<AgentReply, AgentError>;

    /// The model name this runtime's replies carry, for answers that end
    /// without a reply (a cancelled or timed-out turn's partial text).
    fn model_name(&self) -> String;
}

//! MCP sessions of the `initialize` era, counted: rmcp's in-memory session
//! manager, with each session holding a place among the server's live
//! clients (the hub's count, shared with WebSocket, SSE and dashboard
//! streams) and at most `max_sessions` of them at once.
//!
//! rmcp answers a session manager's error with a 500, so the refusal
//! clients see (429) is given before rmcp, by [`CountedSessions::refusal`];
//! the check here only covers the few requests that race past it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard, PoisonError};

use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::SessionId;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionManager,
};

use crate::adapters::stream::{ClientSlot, SessionHub};

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CountedSessionError {
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
    /// No place for a new session.
    #[error("{0}")]
    Full(String),
}

/// [`LocalSessionManager`] with every session counted.
pub struct CountedSessions {
    inner: LocalSessionManager,
    hub: Arc<SessionHub>,
    max_sessions: usize,
    /// The place each live session holds, freed when it closes (DELETE,
    /// idle timeout, shutdown: rmcp closes every ending session here).
    slots: Mutex<HashMap<SessionId, ClientSlot>>,
}

impl CountedSessions {
    /// Sessions ending after `idle` without traffic, at most `max_sessions`
    /// of them, each counted by `hub`.
    #[must_use]
    pub fn new(hub: Arc<SessionHub>, max_sessions: usize, idle: std::time::Duration) -> Self {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = Some(idle);
        Self {
            inner,
            hub,
            max_sessions,
            slots: Mutex::default(),
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<SessionId, ClientSlot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why a new session would be refused now, if it would: the MCP
    /// session cap or the server's client limit is reached.
    #[must_use]
    pub fn refusal(&self) -> Option<String> {
        self.admit().err()
    }

    fn admit(&self) -> Result<ClientSlot, String> {
        if self.slots().len() >= self.max_sessions {
            return Err(format!(
                "The server has too many MCP sessions ({}); end one (DELETE /mcp) or try again later",
                self.max_sessions
            ));
        }
        self.hub.admit_client().map_err(|e| e.to_string())
    }
}

impl SessionManager for CountedSessions {
    type Error = CountedSessionError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let slot = self.admit().map_err(CountedSessionError::Full)?;
        let (id, transport) = self.inner.create_session().await?;
        self.slots().insert(id.clone(), slot);
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        // The place is free from here, whatever closing the worker says.
        self.slots().remove(id);
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_stream(id, message).await?)
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_standalone_stream(id).await?)
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        // A session another instance began holds a place here too.
        let slot = self.admit().map_err(CountedSessionError::Full)?;
        let outcome = self.inner.restore_session(id.clone()).await?;
        if matches!(outcome, RestoreOutcome::Restored(_)) {
            self.slots().insert(id, slot);
        }
        Ok(outcome)
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.resume(id, last_event_id).await?)
    }
}

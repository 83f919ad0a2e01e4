//! The session store port: session metadata and message history.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::message::{History, ModelMessage};
use crate::domain::session::{SessionId, SessionInfo};

/// Why a session store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionStoreError {
    #[error("session not found")]
    NotFound,
    /// The backing storage failed; the message is for logs, not clients.
    #[error("session storage unavailable: {0}")]
    Unavailable(String),
    /// Creating the session would pass the store's cap on sessions.
    #[error("The server holds as many sessions as it may ({0}); delete some or try later")]
    TooManySessions(usize),
}

/// Keeps sessions: who exists, when they were last used, what was said.
///
/// Implementations are shared by every request and must be safe to call
/// concurrently.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Returns the session, creating it (empty, `created_at = now`) if missing.
    /// Marks it active at `now`.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails;
    /// [`SessionStoreError::TooManySessions`] when the session is missing and
    /// the store holds as many as it may.
    async fn get_or_create(
        &self,
        id: &SessionId,
        now: DateTime<Utc>,
    ) -> Result<SessionInfo, SessionStoreError>;

    /// Every session, oldest first.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails.
    async fn list(&self) -> Result<Vec<SessionInfo>, SessionStoreError>;

    /// The session's history, oldest first.
    ///
    /// # Errors
    /// [`SessionStoreError::NotFound`] for an unknown id.
    async fn history(&self, id: &SessionId) -> Result<History, SessionStoreError>;

    /// Appends messages to the history and marks the session active at `now`.
    ///
    /// # Errors
    /// [`SessionStoreError::NotFound`] for an unknown id (it was deleted).
    async fn append(
        &self,
        id: &SessionId,
        messages: Vec<ModelMessage>,
        now: DateTime<Utc>,
    ) -> Result<(), SessionStoreError>;

    /// Deletes the session with everything stored for it: its history, its
    /// stream's events and reserved seq, its turn records.
    ///
    /// # Errors
    /// [`SessionStoreError::NotFound`] for an unknown id.
    async fn delete(&self, id: &SessionId) -> Result<(), SessionStoreError>;

    /// Sessions not active since `idle_since`, oldest first.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails.
    async fn idle_since(
        &self,
        idle_since: DateTime<Utc>,
    ) -> Result<Vec<SessionId>, SessionStoreError>;

    /// True when sessions outlive the process: the idle sweeper then only
    /// evicts them from memory, and deletes them after the retention time.
    fn is_durable(&self) -> bool;
}

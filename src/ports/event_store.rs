//! The event log port: where each session's stream is kept so that a
//! restart (or a crash) loses nothing a client was told (SPEC B10, B11).
//!
//! The stream adapter numbers events and caches the hot window in memory;
//! this port stores them. Frames are opaque text here: what they say is the
//! stream adapter's business.

use async_trait::async_trait;

use crate::domain::session::SessionId;

/// Why the event log could not be read or written. The message is for
/// logs, not clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event log unavailable: {0}")]
pub struct EventStoreError(pub String);

/// One stored frame of a session's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    /// The turn it belongs to, if any.
    pub turn_id: Option<String>,
    /// Its wire name (`token`, `done`, ...).
    pub op: String,
    /// The complete JSON text sent to clients.
    pub frame: String,
    /// The `prompt` frame of the turn this event is the first of (SPEC
    /// B13): it comes right before this event for the clients that ask for
    /// prompts, and carries no seq of its own, so the others see the
    /// stream's seqs without a hole.
    pub prelude: Option<String>,
}

/// What is stored of a session's stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// The newest stored events, oldest first (at most the `limit` asked for).
    pub events: Vec<StoredEvent>,
    /// The highest seq handed out or reserved by any earlier life of the
    /// server: numbering continues above it. 0 for a stream never written.
    pub reserved: u64,
}

/// What one group commit writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBatch {
    /// Events to insert, per session, in seq order.
    pub events: Vec<(SessionId, StoredEvent)>,
    /// Set a session's reserved high-water mark to this seq (the batch's
    /// last one for a session wins): raised ahead of use, lowered to what
    /// was handed out when a stream stops gracefully.
    pub reserve: Vec<(SessionId, u64)>,
    /// Delete a session's events with a seq at or below this one (they left
    /// the retained window).
    pub trim: Vec<(SessionId, u64)>,
    /// Streams `owner` stops numbering ([`EventStore::acquire`]), with the
    /// reservation set down to the last seq it handed out: another
    /// instance may number them from here on.
    pub release: Vec<(SessionId, u64)>,
    /// The instance writing the batch (whose holds `release` ends).
    pub owner: Option<String>,
}

impl EventBatch {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.reserve.is_empty()
            && self.trim.is_empty()
            && self.release.is_empty()
    }
}

/// Keeps session streams.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait EventStore: Send + Sync {
    /// The newest `limit` stored events of the session and its reserved
    /// high-water mark. A session with nothing stored: an empty state.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails. A stored row that cannot be
    /// read is left out and logged, never an error for the whole stream.
    async fn load(&self, session: &SessionId, limit: usize)
    -> Result<StreamState, EventStoreError>;

    /// Writes a batch in one transaction: all of it or nothing. An event
    /// that ends a turn (`done`, `error`, `cancelled` with a `turn_id`)
    /// also removes that turn's record ([`crate::ports::TurnStore`]) in the
    /// same transaction: a turn's ending is stored exactly when its record
    /// goes.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails (nothing of the batch is kept).
    async fn write(&self, batch: EventBatch) -> Result<(), EventStoreError>;

    /// The stored `token` text of one turn, concatenated in seq order: what a
    /// turn cut short by a crash had said.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails.
    async fn turn_text(
        &self,
        session: &SessionId,
        turn_id: &str,
    ) -> Result<String, EventStoreError>;

    /// With several instances on one database (SPEC B12): makes `owner` the
    /// one instance that numbers the session's events, unless another
    /// holds the stream with a lease that has not run out, and reserves
    /// `block` seqs above everything reserved before. Returns the new
    /// reserved mark (numbering continues at `mark - block + 1`), or `None`
    /// while another instance holds the stream.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails.
    async fn acquire(
        &self,
        session: &SessionId,
        owner: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
        block: u64,
    ) -> Result<Option<u64>, EventStoreError>;

    /// Extends `owner`'s hold on these streams to `lease_until`.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails.
    async fn renew(
        &self,
        owner: &str,
        sessions: &[SessionId],
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), EventStoreError>;

    /// Stored events of the session with a seq above `after`, oldest
    /// first, at most `limit`: what another instance published.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails.
    async fn events_after(
        &self,
        session: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, EventStoreError>;

    /// The seq of the newest stored event of each of `sessions` that has
    /// one (the polling fallback of cross-instance delivery).
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails.
    async fn heads(&self, sessions: &[SessionId])
    -> Result<Vec<(SessionId, u64)>, EventStoreError>;
}

//! The turn record port: every running turn has a stored record with its
//! owner and a lease, so a turn cut short by a crash is found and ended
//! (SPEC B10), by the next start or, with several instances, by another
//! instance once the lease runs out (B12). The record is also where a turn
//! parked for an approval will wait (B15).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::session::{SessionId, TurnId};

/// Why a turn record could not be read or written. The message is for
/// logs, not clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("turn records unavailable: {0}")]
pub struct TurnStoreError(pub String);

/// A running turn, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnRecord {
    pub turn_id: TurnId,
    pub session_id: SessionId,
    /// The instance running it ([`TurnStore`] users pick a random id per
    /// process).
    pub owner: String,
    /// The user's prompt: it goes into the history if the turn is cut short.
    pub prompt: String,
    pub started_at: DateTime<Utc>,
    /// The owner renews this while the turn runs; past it, the turn is
    /// orphaned.
    pub lease_until: DateTime<Utc>,
    /// False while the turn waits in its session's queue behind others
    /// ([`TurnStore::enqueue`]): it has not run, so nothing of it is kept
    /// if its owner dies.
    pub running: bool,
}

/// Where [`TurnStore::enqueue`] put a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// No turn of its session is before it: it runs now.
    First,
    /// Others are before it; [`TurnStore::claim`] says when its time comes.
    Waiting,
    /// Its session already has more than the cap waiting; nothing stored.
    Full,
}

/// What [`TurnStore::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The turn is its session's first now, and marked running.
    Running,
    /// Turns are still before it.
    Waiting,
    /// Its record is gone (its session was deleted, or it was taken as an
    /// orphan): it must not run.
    Gone,
}

/// Keeps the records of running turns.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait TurnStore: Send + Sync {
    /// Stores the record of a turn that starts now.
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails: the turn must not start.
    async fn begin(&self, record: &TurnRecord) -> Result<(), TurnStoreError>;

    /// Removes the record of a turn that ended (its history and terminal
    /// event are stored).
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails.
    async fn end(&self, turn_id: &TurnId) -> Result<(), TurnStoreError>;

    /// Extends the lease of every turn `owner` runs to `until`.
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails.
    async fn renew(&self, owner: &str, until: DateTime<Utc>) -> Result<(), TurnStoreError>;

    /// Running turns not owned by `owner` whose lease ran out before `now`
    /// (every one not owned by `owner` when `now` is `None`), and hands each
    /// to `owner` with a lease until `lease_until`, so that two instances
    /// never both end the same turn.
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails.
    async fn claim_orphans(
        &self,
        owner: &str,
        now: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<TurnRecord>, TurnStoreError>;

    /// With several instances on one database (SPEC B12): stores the
    /// record of a turn that arrived now at the end of its session's queue
    /// (arrival order across instances), unless more than `max_waiting`
    /// turns of the session are stored already. A turn stored
    /// [`Enqueued::First`] is marked running.
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails: the turn must not start.
    async fn enqueue(
        &self,
        record: &TurnRecord,
        max_waiting: usize,
    ) -> Result<Enqueued, TurnStoreError>;

    /// Marks an enqueued turn running if no turn of its session is before
    /// it.
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails.
    async fn claim(&self, turn_id: &TurnId) -> Result<Claim, TurnStoreError>;

    /// Asks whichever instance runs the session's turn to cancel it (and
    /// tells it at once where the database can). The running turn's id, or
    /// `None` when none runs.
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails.
    async fn request_cancel(&self, session: &SessionId) -> Result<Option<TurnId>, TurnStoreError>;

    /// Running turns of `owner` that a cancel was asked for (the fallback
    /// for a cancel whose notice did not arrive).
    ///
    /// # Errors
    /// [`TurnStoreError`] when storage fails.
    async fn cancel_requests(&self, owner: &str) -> Result<Vec<TurnId>, TurnStoreError>;
}

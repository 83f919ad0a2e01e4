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
}

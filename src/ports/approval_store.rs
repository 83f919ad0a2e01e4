//! The approval store port: where approval envelopes wait for a decision.

use async_trait::async_trait;

use crate::domain::approvals::{ApprovalCursor, ApprovalDecision, ApprovalEnvelope};

/// Why an approval store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalStoreError {
    /// No envelope matched, or none that the operation may change.
    #[error("approval not found")]
    NotFound,
    /// The database failed or could not be reached; the message is for logs,
    /// not clients, and names no credentials.
    #[error("approval storage unavailable: {0}")]
    Unavailable(String),
}

/// Keeps approval envelopes. Instants are epoch seconds, UTC.
///
/// Implementations are shared by every request and must be safe to call
/// concurrently, from several processes too (two servers on one database).
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait ApprovalStore: Send + Sync {
    /// Stores a new envelope as given (it is `pending`).
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails, including when
    /// the id or nonce is taken.
    async fn insert(&self, envelope: &ApprovalEnvelope) -> Result<(), ApprovalStoreError>;

    /// How many envelopes are still `pending` and expire after `now`.
    ///
    /// MUST be counted by the database (`COUNT(*)`), not by reading the
    /// envelopes: dashboards and metrics ask often, and envelopes are big.
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails.
    async fn count_pending(&self, now: i64) -> Result<u64, ApprovalStoreError>;

    /// At most `limit` envelopes still `pending` and expiring after `now`,
    /// ordered by `issued_at` then `envelope_id`, starting just after
    /// `after` in that order (from the first when `None`).
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails.
    async fn list_pending(
        &self,
        now: i64,
        after: Option<ApprovalCursor>,
        limit: u64,
    ) -> Result<Vec<ApprovalEnvelope>, ApprovalStoreError>;

    /// Applies `decision` to the envelope whose id or nonce is `approval_id`
    /// if it is `pending` and expires after `decision.decided_at`: its state
    /// becomes consumed (approved) or expired (rejected), `consumed_at` the
    /// decision time and `signed_object_json` the decision. Returns the
    /// envelope as it is now.
    ///
    /// MUST be one atomic conditional write, so that of any number of
    /// concurrent decisions on one envelope, across processes, exactly one
    /// succeeds.
    ///
    /// # Errors
    /// [`ApprovalStoreError::NotFound`] when no envelope qualifies (unknown,
    /// already decided, expired); [`ApprovalStoreError::Unavailable`] when
    /// storage fails.
    async fn decide(
        &self,
        approval_id: &str,
        decision: &ApprovalDecision,
    ) -> Result<ApprovalEnvelope, ApprovalStoreError>;

    /// Deletes every envelope whose `expires_at` is before `cutoff`, whatever
    /// its state. Returns how many went.
    ///
    /// # Errors
    /// [`ApprovalStoreError::Unavailable`] when storage fails.
    async fn prune_expired_before(&self, cutoff: i64) -> Result<u64, ApprovalStoreError>;
}

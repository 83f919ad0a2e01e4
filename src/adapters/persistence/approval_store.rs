//! [`ApprovalStore`] over sea-orm: one table, `approval_envelopes`.

use async_trait::async_trait;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Select,
};

use super::entity::{ActiveModel, Column, Entity, Model};
use super::file::{self, DatabaseFile};
use super::{ConnectError, ConnectSettings, connect};
use crate::domain::approvals::{
    ApprovalCursor, ApprovalDecision, ApprovalEnvelope, ApprovalState, ToolCallRequest,
};
use crate::ports::{ApprovalStore, ApprovalStoreError};

/// Approval envelopes in a SQLite or PostgreSQL database.
#[derive(Clone)]
pub struct SeaOrmApprovalStore {
    db: DatabaseConnection,
    /// The SQLite file, as it was when the store opened: each operation
    /// first checks that it is still there (see [`super::file`]).
    file: Option<DatabaseFile>,
}

impl SeaOrmApprovalStore {
    /// A store over an open, migrated connection to `url` (see [`connect`]).
    #[must_use]
    pub fn new(db: DatabaseConnection, url: &str) -> Self {
        Self {
            db,
            file: DatabaseFile::of(url),
        }
    }

    /// Connects to `url`, migrates, and returns the store.
    ///
    /// # Errors
    /// As [`connect`].
    pub async fn open(url: &str, settings: &ConnectSettings) -> Result<Self, ConnectError> {
        let db = connect(url, settings).await?;
        Ok(Self::new(db, url))
    }

    /// Fails when the SQLite file is gone (see [`Self::file`]).
    fn check_file(&self) -> Result<(), ApprovalStoreError> {
        file::check(self.file.as_ref()).map_err(ApprovalStoreError::Unavailable)
    }
}

const PENDING: &str = "pending";

/// Rows still pending at `now`.
fn pending(now: i64) -> Select<Entity> {
    Entity::find()
        .filter(Column::State.eq(PENDING))
        .filter(Column::ExpiresAt.gt(now))
}

fn unavailable(error: DbErr) -> ApprovalStoreError {
    ApprovalStoreError::Unavailable(error.to_string())
}

fn to_envelope(row: Model) -> Result<ApprovalEnvelope, ApprovalStoreError> {
    let state = row.state.parse::<ApprovalState>().map_err(|why| {
        ApprovalStoreError::Unavailable(format!("envelope {}: {why}", row.envelope_id))
    })?;
    Ok(ApprovalEnvelope {
        // The original wrote scope_json itself; text that is not JSON is
        // kept as a string rather than hiding the envelope.
        scope: serde_json::from_str(&row.scope_json)
            .unwrap_or(serde_json::Value::String(row.scope_json)),
        tool_calls: ToolCallRequest::list_from_json(&row.tool_calls_json),
        decision: row
            .signed_object_json
            .as_deref()
            .and_then(ApprovalDecision::from_json),
        envelope_id: row.envelope_id,
        nonce: row.nonce,
        plan_hash: row.plan_hash,
        key_id: row.key_id,
        signature_hex: row.signature_hex,
        state,
        issued_at: row.issued_at,
        expires_at: row.expires_at,
        consumed_at: row.consumed_at,
    })
}

#[async_trait]
impl ApprovalStore for SeaOrmApprovalStore {
    async fn insert(&self, envelope: &ApprovalEnvelope) -> Result<(), ApprovalStoreError> {
        self.check_file()?;
        let row = ActiveModel {
            envelope_id: Set(envelope.envelope_id.clone()),
            nonce: Set(envelope.nonce.clone()),
            scope_json: Set(envelope.scope_json()),
            tool_calls_json: Set(envelope.tool_calls_json()),
            plan_hash: Set(envelope.plan_hash.clone()),
            key_id: Set(envelope.key_id.clone()),
            signed_object_json: Set(envelope
                .decision
                .as_ref()
                .map(ApprovalDecision::to_canonical_json)),
            signature_hex: Set(envelope.signature_hex.clone()),
            state: Set(envelope.state.as_str().to_owned()),
            issued_at: Set(envelope.issued_at),
            expires_at: Set(envelope.expires_at),
            consumed_at: Set(envelope.consumed_at),
        };
        let _gate = file::write_gate(self.file.as_ref()).await;
        Entity::insert(row)
            .exec_without_returning(&self.db)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn count_pending(&self, now: i64) -> Result<u64, ApprovalStoreError> {
        self.check_file()?;
        pending(now).count(&self.db).await.map_err(unavailable)
    }

    async fn list_pending(
        &self,
        now: i64,
        after: Option<ApprovalCursor>,
        limit: u64,
    ) -> Result<Vec<ApprovalEnvelope>, ApprovalStoreError> {
        self.check_file()?;
        let mut rows = pending(now);
        if let Some(after) = after {
            // (issued_at, envelope_id) > (after.issued_at, after.envelope_id),
            // spelt out: both backends run it, and it uses the index.
            rows = rows.filter(
                Condition::any()
                    .add(Column::IssuedAt.gt(after.issued_at))
                    .add(
                        Condition::all()
                            .add(Column::IssuedAt.eq(after.issued_at))
                            .add(Column::EnvelopeId.gt(after.envelope_id)),
                    ),
            );
        }
        rows.order_by_asc(Column::IssuedAt)
            // Envelopes issued in the same second still list in a stable order.
            .order_by_asc(Column::EnvelopeId)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(to_envelope)
            .collect()
    }

    async fn decide(
        &self,
        approval_id: &str,
        decision: &ApprovalDecision,
    ) -> Result<ApprovalEnvelope, ApprovalStoreError> {
        self.check_file()?;
        let state = ApprovalState::after_decision(decision.approved);
        // One conditional UPDATE ... RETURNING: the database serialises
        // racing decisions, and only the first finds the row still pending.
        // Ids are hyphenated uuids and nonces plain hex, so one string
        // never names two envelopes.
        let _gate = file::write_gate(self.file.as_ref()).await;
        let updated = Entity::update_many()
            .col_expr(Column::State, Expr::value(state.as_str()))
            .col_expr(Column::ConsumedAt, Expr::value(decision.decided_at))
            .col_expr(
                Column::SignedObjectJson,
                Expr::value(decision.to_canonical_json()),
            )
            .filter(
                Condition::any()
                    .add(Column::EnvelopeId.eq(approval_id))
                    .add(Column::Nonce.eq(approval_id)),
            )
            .filter(Column::State.eq(PENDING))
            .filter(Column::ExpiresAt.gt(decision.decided_at))
            .exec_with_returning(&self.db)
            .await
            .map_err(unavailable)?;
        let row = updated
            .into_iter()
            .next()
            .ok_or(ApprovalStoreError::NotFound)?;
        to_envelope(row)
    }

    async fn prune_expired_before(&self, cutoff: i64) -> Result<u64, ApprovalStoreError> {
        self.check_file()?;
        let _gate = file::write_gate(self.file.as_ref()).await;
        let deleted = Entity::delete_many()
            .filter(Column::ExpiresAt.lt(cutoff))
            .exec(&self.db)
            .await
            .map_err(unavailable)?;
        Ok(deleted.rows_affected)
    }
}

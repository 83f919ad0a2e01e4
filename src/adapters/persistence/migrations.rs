//! Schema migrations of the approval database, run at startup by
//! [`super::connect`].
//!
//! The first migration creates `approval_envelopes` only if it is missing:
//! a database written by the Python original already has it, with the same
//! columns, and is adopted unchanged (sea-orm-migration adds its own
//! `seaql_migrations` bookkeeping table beside it).

use sea_orm_migration::prelude::*;

/// Every migration, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateApprovalEnvelopes),
            Box::new(IndexPendingApprovals),
        ]
    }
}

#[derive(DeriveIden)]
enum ApprovalEnvelopes {
    Table,
    EnvelopeId,
    Nonce,
    ScopeJson,
    ToolCallsJson,
    PlanHash,
    KeyId,
    SignedObjectJson,
    SignatureHex,
    State,
    IssuedAt,
    ExpiresAt,
    ConsumedAt,
}

/// The original's table, as its `CREATE TABLE` wrote it. Instants are big
/// integers: `integer` on SQLite (64-bit there, as the original's), `bigint`
/// on PostgreSQL, whose `integer` would not hold an `i64`.
#[derive(DeriveMigrationName)]
struct CreateApprovalEnvelopes;

#[async_trait::async_trait]
impl MigrationTrait for CreateApprovalEnvelopes {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use ApprovalEnvelopes as T;
        manager
            .create_table(
                Table::create()
                    .table(T::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(T::EnvelopeId)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(T::Nonce).text().not_null().unique_key())
                    .col(ColumnDef::new(T::ScopeJson).text().not_null())
                    .col(ColumnDef::new(T::ToolCallsJson).text().not_null())
                    .col(ColumnDef::new(T::PlanHash).text().not_null())
                    .col(ColumnDef::new(T::KeyId).text().not_null())
                    .col(ColumnDef::new(T::SignedObjectJson).text().null())
                    .col(ColumnDef::new(T::SignatureHex).text().null())
                    .col(ColumnDef::new(T::State).text().not_null())
                    .col(ColumnDef::new(T::IssuedAt).big_integer().not_null())
                    .col(ColumnDef::new(T::ExpiresAt).big_integer().not_null())
                    .col(ColumnDef::new(T::ConsumedAt).big_integer().null())
                    .to_owned(),
            )
            .await
    }
}

/// Counting and paging the pending envelopes (`WHERE state = 'pending'
/// ORDER BY issued_at, envelope_id`) read this index, not the table. An
/// index beside the original's table leaves it readable by the original.
struct IndexPendingApprovals;

// Named by hand: the derive names a migration after its file, which
// would give both migrations here one name.
impl MigrationName for IndexPendingApprovals {
    fn name(&self) -> &str {
        "m20261201_000002_index_pending_approvals"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for IndexPendingApprovals {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use ApprovalEnvelopes as T;
        manager
            .create_index(
                Index::create()
                    .name("idx_approval_envelopes_pending")
                    .table(T::Table)
                    .if_not_exists()
                    .col(T::State)
                    .col(T::IssuedAt)
                    .col(T::EnvelopeId)
                    .to_owned(),
            )
            .await
    }
}

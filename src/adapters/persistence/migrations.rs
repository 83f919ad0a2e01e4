//! Schema migrations of the approval database, run at startup by
//! [`super::connect`].
//!
//! The first migration creates `approval_envelopes` only if it is missing:
//! a database written by the Python original already has it, with the same
//! columns, and is adopted unchanged (sea-orm-migration adds its own
//! `seaql_migrations` bookkeeping table beside it).
//!
//! Later migrations only add tables and indexes beside it, each `IF NOT
//! EXISTS`: the original can still read its table, and a start cut short
//! between two statements of a migration migrates again cleanly.

use sea_orm_migration::prelude::*;

use super::schema::{McpSessions, SessionEvents, SessionMessages, SessionStreams, Sessions, Turns};

/// Every migration, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateApprovalEnvelopes),
            Box::new(IndexPendingApprovals),
            Box::new(CreateDurableSessions),
            Box::new(ShareAmongInstances),
            Box::new(KeepPrompts),
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

/// The tables of durable sessions (SPEC B10): `sessions`, their
/// `session_messages`, the `session_events` of their streams with the
/// `session_streams` high-water marks, and the `turns` running. No foreign
/// keys: SQLite enforces them only with a pragma per connection, and
/// deleting a session clears its rows from every table in one transaction
/// anyway.
struct CreateDurableSessions;

impl MigrationName for CreateDurableSessions {
    fn name(&self) -> &str {
        "m20261202_000003_create_durable_sessions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateDurableSessions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Sessions::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Sessions::Id).text().not_null().primary_key())
                    .col(ColumnDef::new(Sessions::CreatedAt).big_integer().not_null())
                    .col(
                        ColumnDef::new(Sessions::LastActive)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Sessions::MessageCount)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Sessions::HistoryBytes)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // The idle sweeper asks for sessions by last use.
        manager
            .create_index(
                Index::create()
                    .name("idx_sessions_last_active")
                    .table(Sessions::Table)
                    .if_not_exists()
                    .col(Sessions::LastActive)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SessionMessages::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(SessionMessages::SessionId).text().not_null())
                    .col(
                        ColumnDef::new(SessionMessages::Idx)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SessionMessages::MessageJson)
                            .text()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(SessionMessages::SessionId)
                            .col(SessionMessages::Idx),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SessionStreams::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SessionStreams::SessionId)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SessionStreams::LastSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SessionStreams::ReservedSeq)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SessionEvents::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(SessionEvents::SessionId).text().not_null())
                    .col(ColumnDef::new(SessionEvents::Seq).big_integer().not_null())
                    .col(ColumnDef::new(SessionEvents::TurnId).text().null())
                    .col(ColumnDef::new(SessionEvents::Op).text().not_null())
                    .col(ColumnDef::new(SessionEvents::Frame).text().not_null())
                    .primary_key(
                        Index::create()
                            .col(SessionEvents::SessionId)
                            .col(SessionEvents::Seq),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Turns::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Turns::TurnId)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Turns::SessionId).text().not_null())
                    .col(ColumnDef::new(Turns::Owner).text().not_null())
                    .col(ColumnDef::new(Turns::Prompt).text().not_null())
                    .col(ColumnDef::new(Turns::StartedAt).big_integer().not_null())
                    .col(ColumnDef::new(Turns::LeaseUntil).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        // Finding orphans asks for turns by lease.
        manager
            .create_index(
                Index::create()
                    .name("idx_turns_lease_until")
                    .table(Turns::Table)
                    .if_not_exists()
                    .col(Turns::LeaseUntil)
                    .to_owned(),
            )
            .await
    }
}

/// Adds `column` to `table` unless it is there already (SQLite has no
/// `ADD COLUMN IF NOT EXISTS`), so a migration cut short runs again cleanly.
async fn add_column(
    manager: &SchemaManager<'_>,
    table: impl Iden + Copy + 'static,
    column: ColumnDef,
) -> Result<(), DbErr> {
    let name = column.get_column_name();
    if manager.has_column(table.to_string(), name).await? {
        return Ok(());
    }
    manager
        .alter_table(
            Table::alter()
                .table(table)
                .add_column(column.to_owned())
                .to_owned(),
        )
        .await
}

/// What several instances on one database need (SPEC B12): each stream's
/// writer and its lease, the turn queue's order and cancel flag, and the
/// MCP sessions any instance may restore.
struct ShareAmongInstances;

impl MigrationName for ShareAmongInstances {
    fn name(&self) -> &str {
        "m20261202_000004_share_among_instances"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ShareAmongInstances {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_column(
            manager,
            SessionStreams::Table,
            ColumnDef::new(SessionStreams::Writer)
                .text()
                .null()
                .to_owned(),
        )
        .await?;
        add_column(
            manager,
            SessionStreams::Table,
            ColumnDef::new(SessionStreams::WriterUntil)
                .big_integer()
                .null()
                .to_owned(),
        )
        .await?;
        add_column(
            manager,
            Turns::Table,
            ColumnDef::new(Turns::Position)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
        )
        .await?;
        // Records written before this migration are of running turns.
        add_column(
            manager,
            Turns::Table,
            ColumnDef::new(Turns::Running)
                .small_integer()
                .not_null()
                .default(1)
                .to_owned(),
        )
        .await?;
        add_column(
            manager,
            Turns::Table,
            ColumnDef::new(Turns::CancelRequested)
                .small_integer()
                .not_null()
                .default(0)
                .to_owned(),
        )
        .await?;
        // A turn asks whether it is its session's first.
        manager
            .create_index(
                Index::create()
                    .name("idx_turns_session_position")
                    .table(Turns::Table)
                    .if_not_exists()
                    .col(Turns::SessionId)
                    .col(Turns::Position)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(McpSessions::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(McpSessions::Id)
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(McpSessions::StateJson).text().not_null())
                    .col(
                        ColumnDef::new(McpSessions::UpdatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// The `prompt` frame a turn's first event brings for the clients that ask
/// for prompts (SPEC B13), kept with that event so that a client resuming
/// from storage, or reading through another instance, gets it too.
struct KeepPrompts;

impl MigrationName for KeepPrompts {
    fn name(&self) -> &str {
        "m20261203_000005_keep_prompts"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for KeepPrompts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_column(
            manager,
            SessionEvents::Table,
            ColumnDef::new(SessionEvents::Prelude)
                .text()
                .null()
                .to_owned(),
        )
        .await
    }
}

//! Names of the durable-session tables and their columns, and how values
//! are stored in them: shared by the migration that creates the tables and
//! the stores that query them.
//!
//! Instants are epoch microseconds in `bigint` columns: one representation
//! on both backends, ordered and compared as integers, and fine enough that
//! two turns a millisecond apart still sort in order. Counts and seqs are
//! `bigint` too and read as `i64`.

use chrono::{DateTime, Utc};
use sea_orm::DeriveIden;

/// One row per session: its metadata.
#[derive(DeriveIden, Clone, Copy)]
pub(super) enum Sessions {
    Table,
    Id,
    CreatedAt,
    LastActive,
    MessageCount,
    HistoryBytes,
}

/// A session's history, one row per message, append-only, `idx` from 0.
#[derive(DeriveIden, Clone, Copy)]
pub(super) enum SessionMessages {
    Table,
    SessionId,
    Idx,
    /// The message in the A3 (pydantic-ai) shape.
    MessageJson,
}

/// The high-water marks of a session's stream.
#[derive(DeriveIden, Clone, Copy)]
pub(super) enum SessionStreams {
    Table,
    SessionId,
    /// The highest seq of an event ever stored.
    LastSeq,
    /// The highest seq the stream adapter reserved (handed out, maybe not
    /// stored yet).
    ReservedSeq,
    /// The instance that numbers the stream's events now (NULL: none); with
    /// several instances on one database only it may (SPEC B12).
    Writer,
    /// Until when `writer` holds the stream without renewing (epoch µs).
    WriterUntil,
}

/// The retained window of a session's stream.
#[derive(DeriveIden, Clone, Copy)]
pub(super) enum SessionEvents {
    Table,
    SessionId,
    Seq,
    TurnId,
    Op,
    Frame,
    Prelude,
}

/// Records of running turns.
#[derive(DeriveIden, Clone, Copy)]
pub(super) enum Turns {
    Table,
    TurnId,
    SessionId,
    Owner,
    Prompt,
    StartedAt,
    LeaseUntil,
    /// Arrival order among the session's turns, from 1 (B12's queue).
    Position,
    /// 1 once the turn runs, 0 while it waits for the ones before it.
    Running,
    /// 1 once a cancel was asked for on any instance.
    CancelRequested,
}

/// `initialize`-era MCP sessions, so that any instance can restore one.
#[derive(DeriveIden, Clone, Copy)]
pub(super) enum McpSessions {
    Table,
    Id,
    /// rmcp's session state (the client's `initialize` parameters), JSON.
    StateJson,
    UpdatedAt,
}

/// How an instant is stored.
pub(super) fn to_micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// A stored instant; `None` outside chrono's range.
pub(super) fn from_micros(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// `at` as it reads back once stored: truncated to the microsecond.
pub(super) fn stored(at: DateTime<Utc>) -> DateTime<Utc> {
    from_micros(to_micros(at)).unwrap_or(at)
}

/// SQLite builds before 3.32 refuse a statement with more than 999 bound
/// parameters (later ones allow 32766). Multi-row inserts are cut into
/// statements under the lower limit: at the batch sizes here it costs
/// nothing, and a database opened by an older system library still works.
pub(super) const MAX_BIND_PARAMETERS: usize = 999;

//! Names of the durable-session tables and their columns: shared by the
//! migration that creates the tables and the stores that query them.

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
}

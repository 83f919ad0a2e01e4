//! The port turns publish their events to: whatever numbers, keeps and
//! delivers a session's stream to its clients (WebSocket, SSE).

use std::collections::HashSet;

use async_trait::async_trait;

use crate::domain::events::SessionEvent;
use crate::domain::session::{SessionId, TurnId};
use crate::ports::EventStoreError;

/// Numbers, keeps and delivers the events of every session.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait SessionEvents: Send + Sync {
    /// Makes the session's stream ready for events: loads what is stored of
    /// it (its window, where its numbering continues) unless it is loaded
    /// already. A session that was [forgotten](Self::forget) is a new stream
    /// from here on. Turns call this before their first event.
    ///
    /// With several instances on one database, only one numbers a stream at
    /// a time: this also waits until no other instance does, and holds the
    /// stream for this one until the hold ends. Every `open` is paired with
    /// exactly one hold's end: a [`publish_durable`](Self::publish_durable)
    /// (a turn's terminal event, or a notice outside turns) or a
    /// [`close`](Self::close).
    ///
    /// # Errors
    /// [`EventStoreError`] when the stored stream cannot be read: no event
    /// may be numbered then, so the turn must not start.
    async fn open(&self, session: &SessionId) -> Result<(), EventStoreError>;

    /// Broadcasts `event` to every client of `session`. `turn` is `None` for
    /// events that belong to no turn (an `approve` answered on the session).
    ///
    /// Must not block and must not fail: a client that cannot keep up is the
    /// adapter's problem, never the turn's. Storing the event is batched and
    /// may lag it by a few milliseconds.
    fn publish(&self, session: &SessionId, turn: Option<TurnId>, event: SessionEvent);

    /// Like [`publish`](Self::publish), but no client sees the event (nor
    /// any later one of the session) before it is stored: for the terminal
    /// event of a turn, whose history is already stored. Storing a turn's
    /// terminal event also removes the turn's record (see
    /// [`crate::ports::EventStore::write`]): `Ok` means the record is gone.
    /// It ends one hold taken by [`open`](Self::open), stored or not.
    ///
    /// # Errors
    /// [`EventStoreError`] when it could not be stored; clients then see a
    /// `storage_unavailable` error in its place.
    async fn publish_durable(
        &self,
        session: &SessionId,
        turn: Option<TurnId>,
        event: SessionEvent,
    ) -> Result<(), EventStoreError>;

    /// Ends one hold taken by [`open`](Self::open) without an event (a turn
    /// that ended with nothing to tell).
    fn close(&self, session: &SessionId);

    /// The text a turn streamed (its `token` events) as far as it is stored:
    /// what a turn cut short by a crash had said.
    ///
    /// # Errors
    /// [`EventStoreError`] when storage fails.
    async fn turn_text(
        &self,
        session: &SessionId,
        turn: &TurnId,
    ) -> Result<String, EventStoreError>;

    /// The seq of the newest event of a stream loaded in this process.
    fn last_seq(&self, session: &SessionId) -> Option<u64>;

    /// The sessions that have at least one live client; the sweeper spares them.
    fn live_sessions(&self) -> HashSet<SessionId>;

    /// The session is going: drop what is kept for it, close its clients,
    /// and return once nothing of it is left to store (so deleting its
    /// stored rows afterwards deletes them all). Events published for it
    /// afterwards are dropped, until it is [opened](Self::open) again.
    async fn forget(&self, session: &SessionId);

    /// The session is deleted from storage (after [`forget`](Self::forget)
    /// and the store's delete, here or on another instance): tell whoever
    /// watches every session. Must not block.
    fn deleted(&self, session: &SessionId);

    /// The session is idle: let go of its stream's memory (it stays stored
    /// and loads again on use). Does nothing while the stream has clients.
    fn evict(&self, session: &SessionId);
}

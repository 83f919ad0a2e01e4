//! The port turns publish their events to: whatever delivers a session's
//! stream to its clients (WebSocket, SSE).

use std::collections::HashSet;

use crate::domain::events::SessionEvent;
use crate::domain::session::{SessionId, TurnId};

/// Delivers session events to every client watching a session.
#[cfg_attr(test, mockall::automock)]
pub trait SessionEvents: Send + Sync {
    /// Broadcasts `event` to every client of `session`. `turn` is `None` for
    /// events that belong to no turn (an `approve` answered on the session).
    ///
    /// Must not block and must not fail: a client that cannot keep up is the
    /// adapter's problem, never the turn's.
    fn publish(&self, session: &SessionId, turn: Option<TurnId>, event: SessionEvent);

    /// The sessions that have at least one live client; the sweeper spares them.
    fn live_sessions(&self) -> HashSet<SessionId>;

    /// The session is gone: drop what is kept for it and close its clients.
    /// Events published for it afterwards are dropped, until it is
    /// [opened](Self::opened) again.
    fn forget(&self, session: &SessionId);

    /// The session exists (again): events published for it from now on are
    /// kept, even if it was forgotten before. Called when a turn creates or
    /// reuses the session.
    fn opened(&self, session: &SessionId);
}

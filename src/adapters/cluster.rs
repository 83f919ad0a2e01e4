//! Several instances on one PostgreSQL database (SPEC B12): the one
//! connection per instance that listens for the others.
//!
//! Nothing but PostgreSQL carries messages between instances. Two
//! channels, both named after the schema the instance works in (so that
//! instances sharing a database but not a schema do not hear each other):
//!
//! - **events** (`autopoiesis_events:SCHEMA`): pointers, lines of
//!   `session seq`, sent by the group commit with each batch that stored
//!   events (one notification per batch, however many tokens it carries).
//!   The events themselves are read from their table: a pointer only says
//!   where to look ([`SessionHub::notified`]).
//! - **control** (`autopoiesis_control:SCHEMA`): `cancel TURN` (a cancel
//!   that reached another instance than the turn's), `deleted OWNER
//!   SESSION` (stop its turn, close its clients), `approvals OWNER`
//!   (dashboards and MCP clients refresh).
//!
//! The listener has a connection of its own, outside the pool. When it
//! drops (a restart of PostgreSQL, `pg_terminate_backend`, a network cut),
//! it connects again with a growing pause and then re-reads every loaded
//! stream from its last seq ([`SessionHub::resync`]) and refreshes the
//! approval listeners: what was said while it was away is not lost, only
//! late. The hub's own poll does the same every half second for
//! notifications lost any other way (a pooler that drops `LISTEN`).

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::adapters::approval_broadcast::ApprovalBroadcast;
use crate::adapters::persistence::{CONTROL_CHANNEL, EVENTS_CHANNEL, channel_name};
use crate::adapters::stream::SessionHub;
use crate::domain::chat::ChatService;
use crate::domain::session::{SessionId, TurnId};
use crate::ports::SessionEvents;

/// The pause before connecting again grows from this...
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// ...up to this.
const LAST_RETRY: Duration = Duration::from_secs(5);

/// What the listener acts on.
pub struct Cluster {
    /// The database URL (its `search_path` option, if any, picks the schema).
    pub url: String,
    /// This instance's name in storage and in control messages.
    pub owner: String,
    pub hub: Arc<SessionHub>,
    pub chat: Arc<ChatService>,
    pub approvals: Arc<ApprovalBroadcast>,
}

impl Cluster {
    /// Listens until `shutdown` fires, reconnecting whenever the
    /// connection drops.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut retry = FIRST_RETRY;
        let mut connected_before = false;
        loop {
            let listener = tokio::select! {
                () = shutdown.cancelled() => return,
                listener = connect(&self.url) => listener,
            };
            let mut listener = match listener {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, retry_ms = retry.as_millis(), "cluster listener not connected; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(LAST_RETRY);
                    continue;
                }
            };
            retry = FIRST_RETRY;
            if connected_before {
                metrics::counter!("autopoiesis_cluster_listener_reconnects_total").increment(1);
                tracing::info!("cluster listener connected again; reading what was missed");
                self.hub.resync().await;
                self.approvals.changed_elsewhere();
            } else {
                tracing::info!("cluster listener connected");
            }
            connected_before = true;
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = listener.try_recv() => next,
                };
                match next {
                    Ok(Some(notification)) => {
                        metrics::counter!("autopoiesis_cluster_notifications_received_total")
                            .increment(1);
                        self.dispatch(notification.channel(), notification.payload())
                            .await;
                    }
                    Ok(None) => {
                        tracing::warn!("cluster listener connection lost");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cluster listener connection failed");
                        break;
                    }
                }
            }
        }
    }

    async fn dispatch(&self, channel: &str, payload: &str) {
        if channel.starts_with(EVENTS_CHANNEL) {
            for line in payload.lines() {
                if let Some((session, seq)) = pointer(line) {
                    self.hub.notified(&session, seq);
                }
            }
            return;
        }
        let mut words = payload.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("cancel"), Some(turn), None) => {
                self.chat.cancel_turn(&TurnId::from(turn));
            }
            (Some("deleted"), Some(owner), Some(session)) if owner != self.owner => {
                if let Ok(session) = SessionId::parse(session) {
                    self.chat.end_session(&session);
                    self.hub.forget(&session).await;
                    self.hub.deleted(&session);
                }
            }
            (Some("approvals"), Some(owner), None) if owner != self.owner => {
                self.approvals.changed_elsewhere();
            }
            _ => {}
        }
    }
}

/// `session seq`.
fn pointer(line: &str) -> Option<(SessionId, u64)> {
    let (session, seq) = line.split_once(' ')?;
    Some((SessionId::parse(session).ok()?, seq.parse().ok()?))
}

/// A listener on both channels of the schema `url` works in.
async fn connect(url: &str) -> Result<PgListener, sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    let schema: (String,) = sea_orm::sqlx::query_as("SELECT current_schema()::text")
        .fetch_one(&mut listener)
        .await?;
    let channels = [
        channel_name(EVENTS_CHANNEL, &schema.0),
        channel_name(CONTROL_CHANNEL, &schema.0),
    ];
    listener
        .listen_all(channels.iter().map(String::as_str))
        .await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pointer_is_a_session_and_a_seq() {
        let (session, seq) = pointer("s-1 42").unwrap();
        assert_eq!((session.as_str(), seq), ("s-1", 42));
        assert!(pointer("s-1").is_none());
        assert!(pointer("s-1 x").is_none());
        assert!(pointer(" 3").is_none());
    }
}

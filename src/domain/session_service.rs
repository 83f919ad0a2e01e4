//! Session management: listing, creating, reading and deleting sessions, and
//! sweeping away the ones nobody uses any more.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::chat::ChatService;
use super::message::History;
use super::session::{SessionId, SessionInfo};
use crate::ports::{SessionEvents, SessionStore, SessionStoreError};

/// When idle sessions leave memory, and when they are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    /// A session unused for this long leaves memory: a durable store keeps
    /// it (it loads again on use), an in-memory store deletes it...
    pub idle_ttl: Duration,
    /// ...by a sweep that runs this often.
    pub interval: Duration,
    /// A durable store deletes sessions unused for this long (`None`:
    /// never; `--session-retention 0`).
    pub retention: Option<Duration>,
}

impl Default for SweepPolicy {
    fn default() -> Self {
        Self {
            idle_ttl: Duration::from_secs(30 * 60),
            interval: Duration::from_secs(5 * 60),
            retention: Some(Duration::from_secs(30 * 24 * 60 * 60)),
        }
    }
}

/// The instant `age` before now (the distant past when `age` is huge).
fn before_now(age: Duration) -> chrono::DateTime<Utc> {
    let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
    Utc::now()
        .checked_sub_signed(age)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
}

/// Session operations offered to every transport.
pub struct SessionService {
    store: Arc<dyn SessionStore>,
    events: Arc<dyn SessionEvents>,
    /// The turns of each session: a delete ends them, the sweeper spares
    /// sessions that have some.
    chat: Arc<ChatService>,
}

impl SessionService {
    #[must_use]
    pub fn new(
        store: Arc<dyn SessionStore>,
        events: Arc<dyn SessionEvents>,
        chat: Arc<ChatService>,
    ) -> Self {
        Self {
            store,
            events,
            chat,
        }
    }

    /// Every session, oldest first.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails.
    pub async fn list(&self) -> Result<Vec<SessionInfo>, SessionStoreError> {
        let mut sessions = self.store.list().await?;
        for info in &mut sessions {
            // A stream open here is ahead of what storage says by the
            // events still in the group commit queue.
            if let Some(last) = self.events.last_seq(&info.id) {
                info.last_seq = info.last_seq.max(last);
            }
        }
        Ok(sessions)
    }

    /// A new, empty session with a server-chosen id.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails.
    pub async fn create(&self) -> Result<SessionInfo, SessionStoreError> {
        self.store
            .get_or_create(&SessionId::generate(), Utc::now())
            .await
    }

    /// Opens a session for a client that names it (a WebSocket connect),
    /// creating it when missing.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails.
    pub async fn open(&self, id: &SessionId) -> Result<SessionInfo, SessionStoreError> {
        self.store.get_or_create(id, Utc::now()).await
    }

    /// The session's history.
    ///
    /// # Errors
    /// [`SessionStoreError::NotFound`] for an unknown id.
    pub async fn history(&self, id: &SessionId) -> Result<History, SessionStoreError> {
        self.store.history(id).await
    }

    /// Deletes the session, ends its running and queued turns (nothing of
    /// theirs is published or saved afterwards) and closes its clients.
    ///
    /// # Errors
    /// [`SessionStoreError::NotFound`] for an unknown id.
    pub async fn delete(&self, id: &SessionId) -> Result<(), SessionStoreError> {
        // Its turns end first (nothing of theirs is published or saved from
        // here on), then its stream is let go of and the last of its events
        // written, so the store's delete leaves no row of it behind.
        self.chat.end_session(id);
        self.events.forget(id).await;
        self.store.delete(id).await?;
        self.events.deleted(id);
        Ok(())
    }

    /// Sessions idle for longer than `policy.idle_ttl` that have neither a
    /// live client nor a turn running or queued leave memory: with a
    /// durable store their streams are evicted (they load again on use) and
    /// only sessions idle past `policy.retention` are deleted; with an
    /// in-memory store, leaving memory is deletion. Returns how many
    /// sessions were deleted.
    ///
    /// # Errors
    /// [`SessionStoreError::Unavailable`] when storage fails.
    pub async fn sweep(&self, policy: &SweepPolicy) -> Result<usize, SessionStoreError> {
        let durable = self.store.is_durable();
        let idle = self.store.idle_since(before_now(policy.idle_ttl)).await?;
        if idle.is_empty() {
            return Ok(0);
        }
        let live = self.events.live_sessions();
        let busy = self.chat.busy_sessions();
        let spared = |id: &SessionId| live.contains(id) || busy.contains(id);
        let doomed = if durable {
            for id in idle.iter().filter(|id| !spared(id)) {
                self.events.evict(id);
            }
            match policy.retention {
                Some(retention) => self.store.idle_since(before_now(retention)).await?,
                None => Vec::new(),
            }
        } else {
            idle
        };
        let mut removed = 0;
        for id in doomed.iter().filter(|id| !spared(id)) {
            match self.delete(id).await {
                Ok(()) => removed += 1,
                // Deleted by a client meanwhile: nothing left to do.
                Err(SessionStoreError::NotFound) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(removed)
    }

    /// Sweeps every `policy.interval` until `shutdown` fires.
    pub async fn run_sweeper(
        &self,
        policy: SweepPolicy,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(policy.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.sweep(&policy).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(sessions.removed = removed, "idle sessions swept"),
                Err(error) => tracing::warn!(%error, "session sweep failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::domain::chat::RuntimeSlot;
    use crate::ports::session_events::MockSessionEvents;
    use crate::ports::session_store::MockSessionStore;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    /// The service over these mocks, with a chat service that runs nothing.
    fn service(store: MockSessionStore, events: MockSessionEvents) -> SessionService {
        let store: Arc<dyn SessionStore> = Arc::new(store);
        let events: Arc<dyn SessionEvents> = Arc::new(events);
        let chat = Arc::new(ChatService::new(
            RuntimeSlot::Unavailable("unused".into()),
            store.clone(),
            events.clone(),
            None,
        ));
        SessionService::new(store, events, chat)
    }

    #[tokio::test]
    async fn sweep_removes_idle_sessions_but_spares_those_with_live_clients() {
        let mut store = MockSessionStore::new();
        store.expect_is_durable().return_const(false);
        store
            .expect_idle_since()
            .returning(|_| Ok(vec![id("idle"), id("watched")]));
        store
            .expect_delete()
            .withf(|s| s == &id("idle"))
            .times(1)
            .returning(|_| Ok(()));
        let mut events = MockSessionEvents::new();
        events
            .expect_live_sessions()
            .returning(|| HashSet::from([id("watched")]));
        events
            .expect_forget()
            .withf(|s| s == &id("idle"))
            .times(1)
            .return_const(());
        events
            .expect_deleted()
            .withf(|s| s == &id("idle"))
            .times(1)
            .return_const(());
        events.expect_evict().never();
        let sessions = service(store, events);
        let policy = SweepPolicy {
            idle_ttl: Duration::from_secs(60),
            ..SweepPolicy::default()
        };
        assert_eq!(sessions.sweep(&policy).await, Ok(1));
    }

    #[tokio::test]
    async fn with_a_durable_store_the_sweep_evicts_idle_sessions_and_deletes_only_those_past_retention()
     {
        let mut store = MockSessionStore::new();
        store.expect_is_durable().return_const(true);
        store.expect_idle_since().returning(|cutoff| {
            // The retention cutoff is an hour back, the idle one a minute.
            if cutoff < Utc::now() - chrono::Duration::minutes(30) {
                Ok(vec![id("ancient")])
            } else {
                Ok(vec![id("ancient"), id("idle"), id("watched")])
            }
        });
        store
            .expect_delete()
            .withf(|s| s == &id("ancient"))
            .times(1)
            .returning(|_| Ok(()));
        let mut events = MockSessionEvents::new();
        events
            .expect_live_sessions()
            .returning(|| HashSet::from([id("watched")]));
        events
            .expect_evict()
            .withf(|s| s == &id("idle") || s == &id("ancient"))
            .times(2)
            .return_const(());
        events
            .expect_forget()
            .withf(|s| s == &id("ancient"))
            .times(1)
            .return_const(());
        events
            .expect_deleted()
            .withf(|s| s == &id("ancient"))
            .times(1)
            .return_const(());
        let sessions = service(store, events);
        let policy = SweepPolicy {
            idle_ttl: Duration::from_secs(60),
            interval: Duration::from_secs(1),
            retention: Some(Duration::from_secs(3600)),
        };
        assert_eq!(sessions.sweep(&policy).await, Ok(1));
    }
}

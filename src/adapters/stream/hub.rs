//! The connection hub: implements [`SessionEvents`] by numbering each
//! session's events, keeping the recent ones in a ring for resuming clients,
//! and fanning them out to every subscribed client (WebSocket or SSE).
//!
//! Each client has a bounded queue. Publishing never waits: a client whose
//! queue is full is kicked (its transport closes it with 1013) and may come
//! back with `after_seq`. Frames are encoded once and shared by all clients.
//!
//! A forgotten (deleted) session's log is gone for good: a late `publish`
//! for it is dropped rather than opening a log nobody would remove, until a
//! client subscribes to that id again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::frames::{broadcast_frame, direct_frame, encode_event};
use crate::domain::events::SessionEvent;
use crate::domain::session::{SessionId, TurnId};
use crate::ports::SessionEvents;

/// Sizes of the stream's buffers and how many clients it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Events kept per session for clients that resume (`after_seq`).
    pub ring_capacity: usize,
    /// Bytes of encoded frames kept per session at most: the oldest events
    /// leave the window first when a burst of big ones would pass it.
    pub ring_bytes: usize,
    /// Frames queued per client before it counts as too slow and is closed.
    pub client_queue: usize,
    /// Clients one session may have at once.
    pub max_clients_per_session: usize,
    /// Clients the whole server may have at once.
    pub max_clients: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            ring_capacity: 1024,
            ring_bytes: 4 * 1024 * 1024,
            client_queue: 256,
            max_clients_per_session: 2048,
            max_clients: 20_000,
        }
    }
}

/// Why a client was not subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("This session has too many live connections ({0}); try again later")]
    SessionFull(usize),
    #[error("The server has too many live connections ({0}); try again later")]
    ServerFull(usize),
}

/// One encoded frame of a session's stream.
#[derive(Debug)]
pub struct Frame {
    /// `None` for frames that are not part of the log (a `gap` notice).
    pub seq: Option<u64>,
    pub op: &'static str,
    /// The complete JSON text sent to clients.
    pub json: String,
}

/// Why the hub closed a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its queue filled up: it was not reading fast enough.
    Lagged,
    /// Its session was deleted.
    SessionGone,
    /// The server is shutting down.
    Shutdown,
}

/// What the hub and a client's transport share about that client.
#[derive(Debug, Default)]
struct ClientState {
    reason: OnceLock<CloseReason>,
    kicked: CancellationToken,
}

impl ClientState {
    fn kick(&self, reason: CloseReason) {
        // The first reason wins; later ones describe the same closing.
        let _ = self.reason.set(reason);
        self.kicked.cancel();
    }
}

struct Client {
    id: u64,
    tx: mpsc::Sender<Arc<Frame>>,
    state: Arc<ClientState>,
}

struct SessionLog {
    next_seq: u64,
    ring: VecDeque<Arc<Frame>>,
    /// Sum of the ring's frame sizes.
    ring_bytes: usize,
    clients: Vec<Client>,
}

impl SessionLog {
    fn new() -> Self {
        Self {
            next_seq: 1,
            ring: VecDeque::new(),
            ring_bytes: 0,
            clients: Vec::new(),
        }
    }
}

/// Forgotten sessions remembered at most, so a late `publish` does not open
/// their log again. Such a publish comes from a turn that was running when
/// its session was deleted, within that turn's last events (the chat service
/// ends it first), so the most recent deletions are the ones that matter.
const FORGOTTEN_KEPT: usize = 1024;

#[derive(Default)]
struct Sessions {
    logs: HashMap<SessionId, Arc<Mutex<SessionLog>>>,
    /// Sessions forgotten lately and not subscribed to since: `publish`
    /// drops their events instead of opening a log nobody would remove.
    forgotten: HashSet<SessionId>,
    /// The same sessions, oldest first, to let go of past [`FORGOTTEN_KEPT`].
    forgotten_order: VecDeque<SessionId>,
}

impl Sessions {
    fn remember_forgotten(&mut self, session: &SessionId) {
        if self.forgotten.insert(session.clone()) {
            self.forgotten_order.push_back(session.clone());
        }
        while self.forgotten_order.len() > FORGOTTEN_KEPT {
            if let Some(oldest) = self.forgotten_order.pop_front() {
                self.forgotten.remove(&oldest);
            }
        }
    }

    fn clear_forgotten(&mut self, session: &SessionId) {
        if self.forgotten.remove(session) {
            self.forgotten_order.retain(|s| s != session);
        }
    }
}

/// The hub. Cheap to share: hold it in an `Arc`.
pub struct SessionHub {
    settings: StreamSettings,
    sessions: Mutex<Sessions>,
    next_client: AtomicU64,
    /// Subscriptions alive now, across sessions.
    clients: AtomicUsize,
}

/// A client's view of a session's stream.
pub struct Subscription {
    /// Retained events after the requested `after_seq` (preceded by a `gap`
    /// frame when some were no longer retained), sent before `live`.
    replay: VecDeque<Arc<Frame>>,
    /// Events published after the subscription, in order.
    live: mpsc::Receiver<Arc<Frame>>,
    state: Arc<ClientState>,
    hub: Arc<SessionHub>,
    session: SessionId,
    id: u64,
}

impl Subscription {
    /// The next frame: replayed ones first, then live ones. `None` once the
    /// hub has closed this client ([`Self::reason`] says why).
    pub async fn next(&mut self) -> Option<Arc<Frame>> {
        if let Some(frame) = self.replay.pop_front() {
            return Some(frame);
        }
        tokio::select! {
            biased;
            () = self.state.kicked.cancelled() => None,
            frame = self.live.recv() => frame,
        }
    }

    /// Fires when the hub closes this client, so a transport blocked on a
    /// client that does not read can give up at once.
    #[must_use]
    pub fn kicked(&self) -> CancellationToken {
        self.state.kicked.clone()
    }

    /// Why the hub closed this client, if it did.
    #[must_use]
    pub fn reason(&self) -> Option<CloseReason> {
        self.state.reason.get().copied()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.session, self.id);
    }
}

/// A place among the server's live clients ([`SessionHub::admit_client`]),
/// given back when dropped.
pub struct ClientSlot {
    hub: Arc<SessionHub>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.hub.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent, so a lock
    // poisoned by a panic elsewhere is still safe to use.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SessionHub {
    #[must_use]
    pub fn new(settings: StreamSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            sessions: Mutex::default(),
            next_client: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
        })
    }

    /// The session's log, opened when missing: a client subscribing means
    /// the session exists (again, if it was forgotten).
    fn log(&self, session: &SessionId) -> Arc<Mutex<SessionLog>> {
        let mut sessions = lock(&self.sessions);
        sessions.clear_forgotten(session);
        Arc::clone(
            sessions
                .logs
                .entry(session.clone())
                .or_insert_with(|| Arc::new(Mutex::new(SessionLog::new()))),
        )
    }

    /// The log a `publish` goes to: opened when missing, unless the session
    /// was forgotten and nobody subscribed since.
    fn log_to_publish(&self, session: &SessionId) -> Option<Arc<Mutex<SessionLog>>> {
        let mut sessions = lock(&self.sessions);
        if let Some(log) = sessions.logs.get(session) {
            return Some(Arc::clone(log));
        }
        if sessions.forgotten.contains(session) {
            return None;
        }
        let log = Arc::new(Mutex::new(SessionLog::new()));
        sessions.logs.insert(session.clone(), Arc::clone(&log));
        Some(log)
    }

    /// Subscribes a client to `session`. With `after_seq`, the retained
    /// events after it are replayed first; replay and live events are taken
    /// under one lock, so nothing is missed or sent twice.
    ///
    /// # Errors
    /// [`SubscribeError`] when the session or the server has as many clients
    /// as the settings allow.
    pub fn subscribe(
        self: &Arc<Self>,
        session: &SessionId,
        after_seq: Option<u64>,
    ) -> Result<Subscription, SubscribeError> {
        let log = self.log(session);
        let mut log = lock(&log);
        if log.clients.len() >= self.settings.max_clients_per_session {
            return Err(SubscribeError::SessionFull(
                self.settings.max_clients_per_session,
            ));
        }
        let max = self.settings.max_clients;
        self.clients
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| SubscribeError::ServerFull(max))?;
        let (tx, live) = mpsc::channel(self.settings.client_queue);
        let state = Arc::new(ClientState::default());
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let mut replay = VecDeque::new();
        if let Some(after) = after_seq {
            let first_retained = log.ring.front().and_then(|f| f.seq).unwrap_or(log.next_seq);
            let last_published = log.next_seq - 1;
            if after.saturating_add(1) < first_retained && after < last_published {
                replay.push_back(Arc::new(Frame {
                    seq: None,
                    op: "gap",
                    json: direct_frame(
                        "gap",
                        json!({"missed_from": after + 1, "missed_to": first_retained - 1}),
                    ),
                }));
            }
            replay.extend(
                log.ring
                    .iter()
                    .filter(|f| f.seq.is_some_and(|seq| seq > after))
                    .cloned(),
            );
        }
        log.clients.push(Client {
            id,
            tx,
            state: Arc::clone(&state),
        });
        Ok(Subscription {
            replay,
            live,
            state,
            hub: Arc::clone(self),
            session: session.clone(),
            id,
        })
    }

    /// Counts a client that subscribes to no session (a dashboard stream,
    /// an MCP session) against `max_clients` for as long as the returned
    /// slot lives.
    ///
    /// # Errors
    /// [`SubscribeError::ServerFull`] when the server has as many clients as
    /// the settings allow.
    pub fn admit_client(self: &Arc<Self>) -> Result<ClientSlot, SubscribeError> {
        let max = self.settings.max_clients;
        self.clients
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| SubscribeError::ServerFull(max))?;
        Ok(ClientSlot {
            hub: Arc::clone(self),
        })
    }

    fn unsubscribe(&self, session: &SessionId, id: u64) {
        self.clients.fetch_sub(1, Ordering::SeqCst);
        let log = lock(&self.sessions).logs.get(session).cloned();
        if let Some(log) = log {
            lock(&log).clients.retain(|c| c.id != id);
        }
    }

    /// Number of clients subscribed to `session`.
    #[must_use]
    pub fn client_count(&self, session: &SessionId) -> usize {
        let log = lock(&self.sessions).logs.get(session).cloned();
        log.map_or(0, |log| lock(&log).clients.len())
    }

    /// Number of clients subscribed now, across sessions (a kicked client
    /// counts until its transport lets go of it).
    #[must_use]
    pub fn clients_total(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    /// Closes every client (server shutdown) and waits, up to `limit`, for
    /// their transports to let go, so close frames go out before the process
    /// ends.
    pub async fn close_all_and_wait(&self, limit: std::time::Duration) {
        self.close_all();
        let deadline = tokio::time::Instant::now() + limit;
        while self.clients.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Closes every client (server shutdown).
    pub fn close_all(&self) {
        let logs: Vec<_> = lock(&self.sessions).logs.values().cloned().collect();
        for log in logs {
            for client in lock(&log).clients.drain(..) {
                client.state.kick(CloseReason::Shutdown);
            }
        }
    }
}

impl SessionEvents for SessionHub {
    fn publish(&self, session: &SessionId, turn: Option<TurnId>, event: SessionEvent) {
        let turn = turn.as_ref();
        let Some(log) = self.log_to_publish(session) else {
            tracing::debug!(session.id = %session, "event for a forgotten session dropped");
            return;
        };
        let (op, data) = encode_event(&event, turn);
        let mut log = lock(&log);
        let seq = log.next_seq;
        log.next_seq += 1;
        let frame = Arc::new(Frame {
            seq: Some(seq),
            op,
            json: broadcast_frame(op, data, seq, turn),
        });
        if self.settings.ring_capacity > 0 {
            log.ring_bytes += frame.json.len();
            log.ring.push_back(Arc::clone(&frame));
        }
        // The newest frame stays even when it alone is over the byte cap:
        // a client resuming right after it must still get it.
        while log.ring.len() > self.settings.ring_capacity
            || (log.ring_bytes > self.settings.ring_bytes && log.ring.len() > 1)
        {
            if let Some(old) = log.ring.pop_front() {
                log.ring_bytes -= old.json.len();
            }
        }
        log.clients.retain(|client| match client.tx.try_send(Arc::clone(&frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!(session.id = %session, client.id = client.id, "slow client closed");
                metrics::counter!("autopoiesis_stream_slow_clients_closed_total").increment(1);
                client.state.kick(CloseReason::Lagged);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    fn live_sessions(&self) -> HashSet<SessionId> {
        let logs: Vec<_> = lock(&self.sessions)
            .logs
            .iter()
            .map(|(id, log)| (id.clone(), Arc::clone(log)))
            .collect();
        logs.into_iter()
            .filter(|(_, log)| !lock(log).clients.is_empty())
            .map(|(id, _)| id)
            .collect()
    }

    fn opened(&self, session: &SessionId) {
        lock(&self.sessions).clear_forgotten(session);
    }

    fn forget(&self, session: &SessionId) {
        let log = {
            let mut sessions = lock(&self.sessions);
            sessions.remember_forgotten(session);
            sessions.logs.remove(session)
        };
        if let Some(log) = log {
            for client in lock(&log).clients.drain(..) {
                client.state.kick(CloseReason::SessionGone);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid() -> SessionId {
        SessionId::parse("s").unwrap()
    }

    fn token(n: usize) -> SessionEvent {
        SessionEvent::Token {
            content: n.to_string(),
        }
    }

    fn hub(ring_capacity: usize, client_queue: usize) -> Arc<SessionHub> {
        SessionHub::new(StreamSettings {
            ring_capacity,
            client_queue,
            ..StreamSettings::default()
        })
    }

    #[test]
    fn subscriptions_beyond_the_limits_are_refused_and_freed_on_drop() {
        let hub = SessionHub::new(StreamSettings {
            max_clients_per_session: 2,
            max_clients: 3,
            ..StreamSettings::default()
        });
        let other = SessionId::parse("other").unwrap();
        let a = hub.subscribe(&sid(), None).unwrap();
        let _b = hub.subscribe(&sid(), None).unwrap();
        assert_eq!(
            hub.subscribe(&sid(), None).err(),
            Some(SubscribeError::SessionFull(2))
        );
        let _c = hub.subscribe(&other, None).unwrap();
        assert_eq!(
            hub.subscribe(&other, None).err(),
            Some(SubscribeError::ServerFull(3))
        );
        drop(a);
        assert!(hub.subscribe(&sid(), None).is_ok());
    }

    fn seqs(frames: &VecDeque<Arc<Frame>>) -> Vec<Option<u64>> {
        frames.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn events_are_numbered_from_one_without_gaps() {
        let hub = hub(8, 8);
        let mut sub = hub.subscribe(&sid(), None).unwrap();
        for n in 0..3 {
            hub.publish(&sid(), None, token(n));
        }
        let got: Vec<_> = (0..3).map(|_| sub.live.try_recv().unwrap().seq).collect();
        assert_eq!(got, vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn resuming_replays_exactly_the_retained_events_after_the_seq() {
        let hub = hub(8, 8);
        for n in 0..5 {
            hub.publish(&sid(), None, token(n));
        }
        let mut sub = hub.subscribe(&sid(), Some(3)).unwrap();
        assert_eq!(seqs(&sub.replay), vec![Some(4), Some(5)]);
        hub.publish(&sid(), None, token(5));
        assert_eq!(sub.live.try_recv().unwrap().seq, Some(6));
    }

    #[test]
    fn the_window_drops_its_oldest_events_past_its_byte_cap() {
        let hub = SessionHub::new(StreamSettings {
            ring_capacity: 100,
            ring_bytes: 1000,
            ..StreamSettings::default()
        });
        let big = SessionEvent::Token {
            content: "x".repeat(300),
        };
        for _ in 0..10 {
            hub.publish(&sid(), None, big.clone());
        }
        let sub = hub.subscribe(&sid(), Some(0)).unwrap();
        let seqs = seqs(&sub.replay);
        // A gap notice, then the newest that fit in 1000 bytes (each frame
        // is the 300 bytes of text plus its JSON).
        assert_eq!(seqs, vec![None, Some(9), Some(10)]);
        let log = hub.log(&sid());
        let log = lock(&log);
        assert!(log.ring_bytes <= 1000);
        assert_eq!(
            log.ring_bytes,
            log.ring.iter().map(|f| f.json.len()).sum::<usize>()
        );
    }

    #[test]
    fn resuming_from_before_the_ring_starts_with_a_gap() {
        let hub = hub(2, 8);
        for n in 0..5 {
            hub.publish(&sid(), None, token(n));
        }
        let sub = hub.subscribe(&sid(), Some(1)).unwrap();
        assert_eq!(seqs(&sub.replay), vec![None, Some(4), Some(5)]);
        assert!(sub.replay[0].json.contains(r#""missed_from":2"#));
        assert!(sub.replay[0].json.contains(r#""missed_to":3"#));
    }

    #[test]
    fn resuming_when_up_to_date_replays_nothing() {
        let hub = hub(2, 8);
        for n in 0..5 {
            hub.publish(&sid(), None, token(n));
        }
        assert!(hub.subscribe(&sid(), Some(5)).unwrap().replay.is_empty());
    }

    #[test]
    fn a_client_whose_queue_fills_is_kicked_and_the_others_keep_receiving() {
        let hub = hub(8, 2);
        let slow = hub.subscribe(&sid(), None).unwrap();
        let mut fast = hub.subscribe(&sid(), None).unwrap();
        for n in 0..3 {
            hub.publish(&sid(), None, token(n));
            fast.live.try_recv().unwrap();
        }
        assert_eq!(slow.reason(), Some(CloseReason::Lagged));
        assert_eq!(hub.client_count(&sid()), 1);
    }

    #[test]
    fn dropped_subscriptions_leave_the_session_and_its_live_set() {
        let hub = hub(8, 8);
        let sub = hub.subscribe(&sid(), None).unwrap();
        assert!(hub.live_sessions().contains(&sid()));
        drop(sub);
        assert!(hub.live_sessions().is_empty());
    }

    #[test]
    fn forgetting_a_session_closes_its_clients() {
        let hub = hub(8, 8);
        let sub = hub.subscribe(&sid(), None).unwrap();
        hub.forget(&sid());
        assert_eq!(sub.reason(), Some(CloseReason::SessionGone));
    }

    #[test]
    fn a_publish_after_forget_keeps_nothing_and_a_new_subscriber_starts_afresh() {
        let hub = hub(8, 8);
        hub.publish(&sid(), None, token(0));
        hub.forget(&sid());
        // A turn that outlived its session's deletion.
        hub.publish(&sid(), None, token(1));
        assert!(lock(&hub.sessions).logs.is_empty());
        let mut sub = hub.subscribe(&sid(), Some(0)).unwrap();
        assert!(sub.replay.is_empty());
        hub.publish(&sid(), None, token(2));
        assert_eq!(sub.live.try_recv().unwrap().seq, Some(1));
    }

    #[test]
    fn forgotten_sessions_are_remembered_only_up_to_a_bound() {
        let hub = hub(8, 8);
        let ids: Vec<_> = (0..=FORGOTTEN_KEPT)
            .map(|n| SessionId::parse(&format!("s{n}")).unwrap())
            .collect();
        for id in &ids {
            hub.forget(id);
        }
        let sessions = lock(&hub.sessions);
        assert_eq!(sessions.forgotten.len(), FORGOTTEN_KEPT);
        assert_eq!(sessions.forgotten_order.len(), FORGOTTEN_KEPT);
        assert!(!sessions.forgotten.contains(&ids[0]));
        assert!(sessions.logs.is_empty());
    }
}

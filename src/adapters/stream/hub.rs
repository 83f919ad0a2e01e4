//! The session hub: implements [`SessionEvents`] by numbering each
//! session's events, keeping the retained window of the stream in memory,
//! storing every event through the [`EventStore`] port (group commit, see
//! [`super::writer`]), and letting each client read the window through its
//! own cursor (SPEC B4, B11).
//!
//! **Delivery by cursor.** A client holds no copy of the stream: it keeps the
//! seq it wants next and reads the frames the window holds from there, a few
//! at a time, then waits for the head to move. Replay and live delivery are
//! the same loop, so a resume never misses or repeats an event, and a slow
//! reader costs nothing until the window moves past its cursor; only then is
//! it closed (1013), and it may come back with `after_seq` and a `gap`.
//!
//! **Numbering that survives restarts.** A stream loaded from storage goes on
//! above the highest seq any earlier life of the server reserved. Seqs are
//! reserved in blocks ahead of use, so a token never waits for a disk; a
//! graceful stop (and an eviction) gives back the unused part of the block,
//! so numbering after a SIGTERM continues exactly. After a crash the unused
//! part, and any event sent but not yet stored, is a hole: a client reading
//! across it gets a `gap` frame, never silence and never a reused seq.
//!
//! **Durable endings.** A turn's terminal event is held back from clients
//! (and every event after it) until it is stored: a `done` a client sees
//! survives any crash.
//!
//! A forgotten (deleted) session's stream is gone for good: a late `publish`
//! for it is dropped rather than opening a stream nobody would remove, until
//! it is opened or subscribed to again; then it starts afresh from seq 1, and
//! a client resuming from the old stream gets a `reset` first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use serde_json::json;
use tokio::sync::{OnceCell, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::activity::{Activities, Activity, ActivityKind, Ending};
use super::frames::{broadcast_frame, direct_frame, encode_event, known_op, prompt_frame};
use super::writer::{self, Queued, Write};
use crate::domain::events::SessionEvent;
use crate::domain::session::{SessionId, TurnId};
use crate::ports::{EventStore, EventStoreError, SessionEvents, StoredEvent};

/// Sizes of the stream's window and how many clients it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Events retained per session (`--event-buffer`): in memory, in
    /// storage, and for clients that resume (`after_seq`). At least 1.
    pub ring_capacity: usize,
    /// Bytes of encoded frames kept in memory per session at most: the
    /// oldest events leave the window first when a burst of big ones would
    /// pass it.
    pub ring_bytes: usize,
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
            max_clients_per_session: 2048,
            max_clients: 20_000,
        }
    }
}

/// How the hub shares streams with other instances on one database
/// (SPEC B12).
///
/// Only one instance numbers a session's events at a time: the one that
/// holds the stream in storage ([`EventStore::acquire`]), from a turn's
/// start to its stored end (or for one notice). Every other instance reads
/// the stream from storage: a pointer notification (session, seq) from the
/// listener ([`SessionHub::notified`]) makes it fetch at once, and a poll of
/// every loaded stream's stored head catches what a lost notification
/// missed, a poll interval later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharing {
    /// This instance's name in storage (random per start).
    pub owner: String,
    /// How long a hold lasts without renewal (`--instance-lease`): renewed
    /// every third of it, taken over by another instance once it runs out.
    pub lease: std::time::Duration,
    /// How often loaded streams are checked for events another instance
    /// stored (the fallback for lost notifications).
    pub poll: std::time::Duration,
}

/// How long an instance waits before asking again for a stream another
/// instance holds.
const ACQUIRE_RETRY: std::time::Duration = std::time::Duration::from_millis(25);

/// Seqs reserved in storage ahead of use, per block.
const RESERVE_BLOCK: u64 = 1024;
/// Frames a cursor takes from the window per lock.
const READ_BATCH: usize = 64;
/// Stored events are trimmed to the window every this many events.
const TRIM_EVERY: u64 = 64;

/// Why a client was not subscribed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("This session has too many live connections ({0}); try again later")]
    SessionFull(usize),
    #[error("The server has too many live connections ({0}); try again later")]
    ServerFull(usize),
    /// The stored stream could not be read; the message is for logs.
    #[error("{0}")]
    Unavailable(EventStoreError),
}

/// One encoded frame of a session's stream.
#[derive(Debug)]
pub struct Frame {
    /// `None` for frames that are not part of the log (`gap`, `reset`).
    pub seq: Option<u64>,
    pub op: &'static str,
    /// The complete JSON text sent to clients.
    pub json: String,
    /// The `prompt` frame of the turn this event is the first of: clients
    /// that ask for prompts get it right before this one (SPEC B13).
    pub prompt: Option<Arc<Frame>>,
}

impl Frame {
    fn direct(op: &'static str, data: serde_json::Value) -> Arc<Self> {
        Arc::new(Self {
            seq: None,
            op,
            json: direct_frame(op, data),
            prompt: None,
        })
    }

    fn prompt(json: String) -> Arc<Self> {
        Arc::new(Self {
            seq: None,
            op: "prompt",
            json,
            prompt: None,
        })
    }

    /// The bytes it keeps in the window, with its prompt.
    fn size(&self) -> usize {
        self.json.len() + self.prompt.as_ref().map_or(0, |prompt| prompt.json.len())
    }

    fn gap(from: u64, to: u64) -> Arc<Self> {
        Self::direct("gap", json!({"missed_from": from, "missed_to": to}))
    }
}

/// Why the hub closed a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The window moved past its cursor: it was not reading fast enough.
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
    /// The seq the client reads next, so the hub can tell, as the window
    /// moves, whose unread events it just dropped.
    cursor: AtomicU64,
}

impl ClientState {
    fn kick(&self, reason: CloseReason) {
        // The first reason wins; later ones describe the same closing.
        let _ = self.reason.set(reason);
        self.kicked.cancel();
    }
}

struct SessionLog {
    /// The seq the next event gets.
    next_seq: u64,
    /// The retained window, oldest first, in seq order (with holes only
    /// where a crash lost events).
    ring: VecDeque<Arc<Frame>>,
    /// Sum of the ring's frame sizes.
    ring_bytes: usize,
    /// Seqs of durable events not stored yet, oldest first: clients read
    /// only up to the first of them.
    held: VecDeque<u64>,
    /// The highest seq reserved in storage (`u64::MAX` without storage).
    reserved: u64,
    /// A reservation of the next block is on its way to storage.
    reserving: bool,
    /// Whether a publish past the reservation was logged already.
    overrun_logged: bool,
    /// The highest seq clients may read; cursors wait on it.
    head: watch::Sender<u64>,
    clients: Vec<(u64, Arc<ClientState>)>,
    /// Whether this instance numbers the stream's events: always alone on
    /// its database; with [`Sharing`], while it holds the stream.
    writing: bool,
    /// Holds taken by [`SessionEvents::open`] and not ended yet (with
    /// [`Sharing`]; the stream is released when the last one ends).
    holders: usize,
    /// With [`Sharing`]: the highest seq any instance may have handed out,
    /// as far as this one knows (stored or not yet). A client resuming
    /// below it is not from a deleted stream, only ahead of storage.
    bound: u64,
    /// The prompt of a turn that has published no numbered event yet: it
    /// goes with the next one ([`Frame::prompt`]), and clients that ask for
    /// prompts and have read everything get it at once.
    prompt: Option<Arc<Frame>>,
}

impl SessionLog {
    fn new(next_seq: u64, reserved: u64) -> Self {
        Self {
            writing: true,
            holders: 0,
            bound: 0,
            next_seq,
            ring: VecDeque::new(),
            ring_bytes: 0,
            held: VecDeque::new(),
            reserved,
            reserving: false,
            overrun_logged: false,
            prompt: None,
            head: watch::Sender::new(next_seq - 1),
            clients: Vec::new(),
        }
    }

    /// The highest seq clients may read now.
    fn visible(&self) -> u64 {
        self.held.front().map_or(self.next_seq - 1, |held| held - 1)
    }

    fn first_retained(&self) -> u64 {
        self.ring
            .front()
            .and_then(|f| f.seq)
            .unwrap_or(self.next_seq)
    }

    fn wake_readers(&self) {
        let visible = self.visible();
        self.head.send_if_modified(|head| {
            let moved = *head != visible;
            *head = visible;
            moved
        });
    }

    /// Adds a frame to the window, dropping the oldest past the caps. The
    /// newest frame stays even when it alone is over the byte cap: a client
    /// resuming right after it must still get it.
    ///
    /// A client whose unread events leave the window is closed at once
    /// (not when it next reads: a client that stopped reading may never).
    fn retain(&mut self, frame: Arc<Frame>, settings: &StreamSettings) {
        self.ring_bytes += frame.size();
        self.ring.push_back(frame);
        let mut dropped = None;
        while self.ring.len() > settings.ring_capacity
            || (self.ring_bytes > settings.ring_bytes && self.ring.len() > 1)
        {
            if let Some(old) = self.ring.pop_front() {
                self.ring_bytes -= old.size();
                dropped = old.seq.or(dropped);
            }
        }
        if let Some(dropped) = dropped {
            self.clients.retain(|(_, client)| {
                if client.cursor.load(Ordering::Acquire) <= dropped {
                    kick_lagged(client);
                    false
                } else {
                    true
                }
            });
        }
    }
}

type SharedLog = Arc<Mutex<SessionLog>>;

/// An event [`SessionHub::append`]ed: its stream, its seq, and for a
/// durable one, the answer of its storage.
type Appended = (
    SharedLog,
    u64,
    Option<oneshot::Receiver<Result<(), EventStoreError>>>,
);

/// A session's place in the hub: its log, once loaded.
#[derive(Default)]
struct Slot {
    log: OnceCell<SharedLog>,
    /// With [`Sharing`]: taken to acquire the stream or fetch what other
    /// instances stored, one at a time.
    sync: tokio::sync::Mutex<()>,
    /// A fetch was asked for since the running one started.
    dirty: std::sync::atomic::AtomicBool,
    /// A fetch task runs.
    fetching: std::sync::atomic::AtomicBool,
}

/// Forgotten sessions remembered at most, so a late `publish` does not open
/// their log again. Such a publish comes from a turn that was running when
/// its session was deleted, within that turn's last events (the chat service
/// ends it first), so the most recent deletions are the ones that matter.
const FORGOTTEN_KEPT: usize = 1024;

#[derive(Default)]
struct Sessions {
    slots: HashMap<SessionId, Arc<Slot>>,
    /// Sessions forgotten lately and not opened since: `publish` drops
    /// their events instead of opening a log nobody would remove.
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

    fn loaded(&self, session: &SessionId) -> Option<SharedLog> {
        self.slots
            .get(session)
            .and_then(|slot| slot.log.get().cloned())
    }

    fn loaded_slot(&self, session: &SessionId) -> Option<(Arc<Slot>, SharedLog)> {
        let slot = self.slots.get(session)?;
        let log = slot.log.get()?;
        Some((Arc::clone(slot), Arc::clone(log)))
    }
}

/// Where the hub stores streams: the store (for reads) and the group
/// commit queue in front of it (for writes).
struct Storage {
    store: Arc<dyn EventStore>,
    queue: mpsc::Sender<Queued>,
}

/// The hub. Cheap to share: hold it in an `Arc`.
pub struct SessionHub {
    settings: StreamSettings,
    sessions: Mutex<Sessions>,
    storage: Option<Storage>,
    /// Set when other instances share the database.
    sharing: Option<Sharing>,
    next_client: AtomicU64,
    /// Subscriptions alive now, across sessions.
    clients: AtomicUsize,
    /// Turns started and ended, sessions deleted: for observers of every
    /// session (see [`Self::activities`]).
    activities: Activities,
}

/// A client's cursor over a session's stream.
pub struct Subscription {
    log: SharedLog,
    head: watch::Receiver<u64>,
    /// The seq this client reads next.
    cursor: u64,
    /// Frames taken from the window (and notices for this client: `reset`,
    /// `gap`), not handed out yet: at most a read batch.
    ready: VecDeque<Arc<Frame>>,
    state: Arc<ClientState>,
    hub: Arc<SessionHub>,
    id: u64,
    /// Whether this client asked for `prompt` frames (SPEC B13).
    prompts: bool,
    /// The last prompt handed out and the seq it came before, so that a
    /// prompt read while its turn had no event yet is not read again with
    /// that event.
    prompt_read: Option<(u64, Arc<Frame>)>,
}

impl Subscription {
    /// Makes this client get each turn's `prompt` frame right before the
    /// turn's first event (SPEC B13); without it, it reads exactly the
    /// numbered stream.
    #[must_use]
    pub fn with_prompts(mut self, prompts: bool) -> Self {
        self.prompts = prompts;
        self
    }

    /// Hands out `prompt`, which comes before seq `before`, unless this
    /// client does not ask for prompts or has it already.
    fn read_prompt(&mut self, before: u64, prompt: &Arc<Frame>) {
        if !self.prompts {
            return;
        }
        let read = self.prompt_read.as_ref().is_some_and(|(seq, last)| {
            *seq == before && (Arc::ptr_eq(last, prompt) || last.json == prompt.json)
        });
        if !read {
            self.ready.push_back(Arc::clone(prompt));
            self.prompt_read = Some((before, Arc::clone(prompt)));
        }
    }

    /// The next frame, replayed or live: one loop for both. `None` once the
    /// hub has closed this client ([`Self::reason`] says why).
    pub async fn next(&mut self) -> Option<Arc<Frame>> {
        loop {
            if self.state.kicked.is_cancelled() {
                return None;
            }
            if let Some(frame) = self.ready.pop_front() {
                return Some(frame);
            }
            self.head.borrow_and_update();
            self.read_window();
            if !self.ready.is_empty() || self.state.kicked.is_cancelled() {
                continue;
            }
            tokio::select! {
                biased;
                () = self.state.kicked.cancelled() => return None,
                changed = self.head.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Takes the next frames at the cursor, up to what clients may read.
    fn read_window(&mut self) {
        let shared = Arc::clone(&self.log);
        let log = lock(&shared);
        let visible = log.visible();
        if self.cursor > visible {
            // Everything is read: a turn that started and has not numbered
            // an event yet may have its prompt waiting.
            if self.cursor == log.next_seq
                && log.held.is_empty()
                && let Some(prompt) = &log.prompt
            {
                self.read_prompt(log.next_seq, prompt);
            }
            return;
        }
        if self.cursor < log.first_retained() {
            drop(log);
            kick_lagged(&self.state);
            return;
        }
        let start = log
            .ring
            .partition_point(|f| f.seq.is_some_and(|seq| seq < self.cursor));
        for frame in log.ring.range(start..) {
            let Some(seq) = frame.seq else { continue };
            if seq > visible || self.ready.len() >= READ_BATCH {
                break;
            }
            if seq > self.cursor {
                // Events a crash lost before they were stored.
                self.ready.push_back(Frame::gap(self.cursor, seq - 1));
            }
            if let Some(prompt) = &frame.prompt {
                self.read_prompt(seq, prompt);
            }
            self.ready.push_back(Arc::clone(frame));
            self.cursor = seq + 1;
        }
        self.state.cursor.store(self.cursor, Ordering::Release);
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
        self.hub.clients.fetch_sub(1, Ordering::SeqCst);
        lock(&self.log).clients.retain(|(id, _)| *id != self.id);
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

fn kick_lagged(client: &ClientState) {
    tracing::info!("slow client closed");
    metrics::counter!("autopoiesis_stream_slow_clients_closed_total").increment(1);
    client.kick(CloseReason::Lagged);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent, so a lock
    // poisoned by a panic elsewhere is still safe to use.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SessionHub {
    /// A hub whose streams live in memory only (`--session-store memory`).
    #[must_use]
    pub fn new(settings: StreamSettings) -> Arc<Self> {
        Self::build(settings, None, None)
    }

    /// A hub that stores every stream in `store` and loads them from it.
    /// Spawns the group commit task: call from within a tokio runtime.
    #[must_use]
    pub fn stored(settings: StreamSettings, store: Arc<dyn EventStore>) -> Arc<Self> {
        Self::with_storage(settings, store, None)
    }

    /// A stored hub on a database that other instances share (see
    /// [`Sharing`]). Spawns the group commit task and the task that polls
    /// for other instances' events and renews this one's holds.
    #[must_use]
    pub fn shared(
        settings: StreamSettings,
        store: Arc<dyn EventStore>,
        sharing: Sharing,
    ) -> Arc<Self> {
        let hub = Self::with_storage(settings, store, Some(sharing));
        tokio::spawn(sharing_task(Arc::downgrade(&hub)));
        hub
    }

    fn with_storage(
        settings: StreamSettings,
        store: Arc<dyn EventStore>,
        sharing: Option<Sharing>,
    ) -> Arc<Self> {
        let (queue, receiver) = mpsc::channel(writer::QUEUE);
        let owner = sharing.as_ref().map(|s| s.owner.clone());
        let hub = Self::build(
            settings,
            Some(Storage {
                store: Arc::clone(&store),
                queue,
            }),
            sharing,
        );
        tokio::spawn(writer::run(store, receiver, Arc::downgrade(&hub), owner));
        hub
    }

    fn build(
        settings: StreamSettings,
        storage: Option<Storage>,
        sharing: Option<Sharing>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sharing,
            settings: StreamSettings {
                ring_capacity: settings.ring_capacity.max(1),
                ..settings
            },
            sessions: Mutex::default(),
            storage,
            next_client: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
            activities: Activities::default(),
        })
    }

    /// Every session's turns starting and ending (once their ending is
    /// visible to clients) and deletions, from now on, as this instance
    /// sees them: its own turns, and other instances' turns on streams it
    /// has loaded. Holding a receiver costs the hub nothing per client.
    #[must_use]
    pub fn activities(&self) -> tokio::sync::broadcast::Receiver<Activity> {
        self.activities.subscribe()
    }

    /// The session's log, loaded from storage when it is not in memory. A
    /// session opened is no longer forgotten.
    async fn open_log(&self, session: &SessionId) -> Result<SharedLog, EventStoreError> {
        self.open_slot(session).await.map(|(_, log)| log)
    }

    async fn open_slot(
        &self,
        session: &SessionId,
    ) -> Result<(Arc<Slot>, SharedLog), EventStoreError> {
        let slot = {
            let mut sessions = lock(&self.sessions);
            sessions.clear_forgotten(session);
            Arc::clone(sessions.slots.entry(session.clone()).or_default())
        };
        let log = slot.log.get_or_try_init(|| self.load(session)).await;
        if log.is_err() {
            // Nothing was loaded: the next open tries again.
            let mut sessions = lock(&self.sessions);
            if sessions
                .slots
                .get(session)
                .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.log.get().is_none())
            {
                sessions.slots.remove(session);
            }
        }
        let log = log.cloned()?;
        Ok((slot, log))
    }

    /// Reads the stored window and reserves the first block of seqs above
    /// everything handed out before, before any of them is used.
    async fn load(&self, session: &SessionId) -> Result<SharedLog, EventStoreError> {
        let Some(storage) = &self.storage else {
            return Ok(Arc::new(Mutex::new(SessionLog::new(1, u64::MAX))));
        };
        // Whatever is queued for this stream (the release of an eviction
        // a moment ago) lands before it is read, and the new reservation
        // goes through the same queue, so no older write overtakes it.
        self.flush(std::time::Duration::from_secs(5)).await;
        let state = storage
            .store
            .load(session, self.settings.ring_capacity)
            .await?;
        if self.sharing.is_some() {
            // Another instance may be numbering it: read it as it is
            // stored, and number only once it is held (`open`).
            // Its head is the newest stored event: what another instance
            // reserved ahead says nothing of what it sent.
            let head = state.events.last().map_or(0, |e| e.seq);
            let mut log = SessionLog::new(head + 1, 0);
            log.writing = false;
            log.bound = state.reserved;
            self.retain_stored(session, &mut log, state.events);
            return Ok(Arc::new(Mutex::new(log)));
        }
        let next_seq = state.reserved + 1;
        let reserved = state.reserved + RESERVE_BLOCK;
        let (ack, stored) = oneshot::channel();
        self.enqueue(Write::Reserve(session.clone(), reserved), Some(ack));
        stored
            .await
            .unwrap_or_else(|_| Err(EventStoreError("the event writer stopped".into())))?;
        let mut log = SessionLog::new(next_seq, reserved);
        self.retain_stored(session, &mut log, state.events);
        Ok(Arc::new(Mutex::new(log)))
    }

    /// Adds stored events to the window, in seq order; those at or below
    /// its head are there already.
    fn retain_stored(&self, session: &SessionId, log: &mut SessionLog, events: Vec<StoredEvent>) {
        for event in events {
            if log.ring.back().and_then(|f| f.seq) >= Some(event.seq) {
                continue;
            }
            log.next_seq = log.next_seq.max(event.seq + 1);
            log.bound = log.bound.max(event.seq);
            let Some(op) = known_op(&event.op) else {
                tracing::error!(session.id = %session, seq = event.seq, op = %event.op, "stored event of an unknown kind skipped");
                continue;
            };
            log.retain(
                Arc::new(Frame {
                    seq: Some(event.seq),
                    op,
                    json: event.frame,
                    prompt: event.prelude.map(Frame::prompt),
                }),
                &self.settings,
            );
        }
    }

    /// With [`Sharing`]: takes the stream for this instance (waiting while
    /// another holds it), after reading everything stored of it, or adds a
    /// hold to the one this instance has.
    async fn hold(&self, session: &SessionId) -> Result<(), EventStoreError> {
        let (Some(sharing), Some(storage)) = (&self.sharing, &self.storage) else {
            return self.open_log(session).await.map(|_| ());
        };
        loop {
            let (slot, log) = self.open_slot(session).await?;
            {
                let _sync = slot.sync.lock().await;
                {
                    let mut guard = lock(&log);
                    if guard.writing {
                        guard.holders += 1;
                        return Ok(());
                    }
                }
                let until = chrono::Utc::now()
                    + chrono::Duration::from_std(sharing.lease).unwrap_or_default();
                let acquired = storage
                    .store
                    .acquire(session, &sharing.owner, until, RESERVE_BLOCK)
                    .await?;
                if let Some(mark) = acquired {
                    // Everything the last holder stored is read first, so
                    // this instance numbers right after it.
                    self.fetch_locked(session, &log).await?;
                    let mut guard = lock(&log);
                    guard.next_seq = guard.next_seq.max(mark - RESERVE_BLOCK + 1);
                    guard.reserved = mark;
                    guard.reserving = false;
                    guard.bound = guard.bound.max(mark);
                    guard.writing = true;
                    guard.holders = 1;
                    return Ok(());
                }
            }
            tokio::time::sleep(ACQUIRE_RETRY).await;
        }
    }

    /// Ends one hold; the last one releases the stream (after everything
    /// queued before, so the next holder reads it all).
    fn end_hold(&self, session: &SessionId, log: &mut SessionLog) {
        if self.sharing.is_none() || !log.writing {
            return;
        }
        log.holders = log.holders.saturating_sub(1);
        if log.holders == 0 {
            log.writing = false;
            self.enqueue(Write::Release(session.clone(), log.next_seq - 1), None);
        }
    }

    /// Reads what other instances stored of the stream after its head.
    async fn fetch_locked(
        &self,
        session: &SessionId,
        log: &SharedLog,
    ) -> Result<(), EventStoreError> {
        let Some(storage) = &self.storage else {
            return Ok(());
        };
        loop {
            let after = {
                let guard = lock(log);
                if guard.writing {
                    return Ok(());
                }
                guard.next_seq - 1
            };
            let limit = self.settings.ring_capacity;
            let events = storage.store.events_after(session, after, limit).await?;
            let fetched = events.len();
            let mut guard = lock(log);
            if guard.writing {
                return Ok(());
            }
            let news: Vec<(Option<TurnId>, ActivityKind)> = events
                .iter()
                .filter(|event| event.seq >= guard.next_seq)
                .flat_map(|event| {
                    let turn = event.turn_id.as_deref().map(TurnId::from);
                    let started = event
                        .prelude
                        .is_some()
                        .then(|| (turn.clone(), ActivityKind::TurnStarted));
                    let ended = Ending::of_frame(&event.op, &event.frame)
                        .map(|ending| (turn, ActivityKind::TurnEnded(ending)));
                    started.into_iter().chain(ended)
                })
                .collect();
            self.retain_stored(session, &mut guard, events);
            guard.wake_readers();
            drop(guard);
            for (turn, kind) in news {
                self.activities.tell(session, turn.as_ref(), kind);
            }
            metrics::counter!("autopoiesis_cluster_events_fetched_total").increment(fetched as u64);
            if fetched < limit {
                return Ok(());
            }
        }
    }

    /// Fetches the stream's new stored events in a task of its own, unless
    /// one is on it: asks made while it runs make it go round once more.
    fn schedule_fetch(self: &Arc<Self>, session: &SessionId, slot: Arc<Slot>, log: SharedLog) {
        slot.dirty.store(true, Ordering::SeqCst);
        if slot.fetching.swap(true, Ordering::SeqCst) {
            return;
        }
        let hub = Arc::clone(self);
        let session = session.clone();
        tokio::spawn(async move {
            loop {
                slot.dirty.store(false, Ordering::SeqCst);
                let fetched = {
                    let _sync = slot.sync.lock().await;
                    hub.fetch_locked(&session, &log).await
                };
                if let Err(error) = fetched {
                    tracing::warn!(session.id = %session, %error, "events of other instances not read yet");
                }
                slot.fetching.store(false, Ordering::SeqCst);
                if !slot.dirty.load(Ordering::SeqCst) || slot.fetching.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            }
        });
    }

    /// A pointer from another instance (or this one): the session's stream
    /// has stored events up to `seq`. A stream loaded here and numbered
    /// elsewhere reads them.
    pub fn notified(self: &Arc<Self>, session: &SessionId, seq: u64) {
        let Some((slot, log)) = lock(&self.sessions).loaded_slot(session) else {
            return;
        };
        {
            let guard = lock(&log);
            if guard.writing || seq < guard.next_seq {
                return;
            }
        }
        self.schedule_fetch(session, slot, log);
    }

    /// Checks every stream loaded here and numbered elsewhere against its
    /// stored head, and reads those behind: the fallback for notifications
    /// that did not arrive (and the catch-up after the listener
    /// reconnects).
    pub async fn resync(self: &Arc<Self>) {
        let Some(storage) = &self.storage else { return };
        let readers: Vec<(SessionId, Arc<Slot>, SharedLog)> = {
            let sessions = lock(&self.sessions);
            sessions
                .slots
                .iter()
                .filter_map(|(id, slot)| {
                    let log = slot.log.get()?;
                    (!lock(log).writing).then(|| (id.clone(), Arc::clone(slot), Arc::clone(log)))
                })
                .collect()
        };
        if readers.is_empty() {
            return;
        }
        let ids: Vec<SessionId> = readers.iter().map(|(id, _, _)| id.clone()).collect();
        let heads: HashMap<SessionId, u64> = match storage.store.heads(&ids).await {
            Ok(heads) => heads.into_iter().collect(),
            Err(error) => {
                tracing::warn!(%error, "stored stream heads not read");
                return;
            }
        };
        for (id, slot, log) in readers {
            let behind = heads
                .get(&id)
                .is_some_and(|head| *head >= lock(&log).next_seq);
            if behind {
                self.schedule_fetch(&id, slot, log);
            }
        }
    }

    /// Extends this instance's hold on every stream it numbers now.
    async fn renew_holds(&self) {
        let (Some(sharing), Some(storage)) = (&self.sharing, &self.storage) else {
            return;
        };
        let held: Vec<SessionId> = self
            .loaded_logs()
            .into_iter()
            .filter(|(_, log)| lock(log).writing)
            .map(|(id, _)| id)
            .collect();
        if held.is_empty() {
            return;
        }
        let until =
            chrono::Utc::now() + chrono::Duration::from_std(sharing.lease).unwrap_or_default();
        if let Err(error) = storage.store.renew(&sharing.owner, &held, until).await {
            tracing::warn!(%error, "stream holds not renewed");
        }
    }

    /// Subscribes a client to `session`. With `after_seq`, the retained
    /// events after it come first (after a `gap` notice for any that left
    /// the window, or a `reset` when `after_seq` is beyond this stream's
    /// head: it came from a deleted stream of the same id); without it, the
    /// client reads from the next event on.
    ///
    /// # Errors
    /// [`SubscribeError`] when the session or the server has as many clients
    /// as the settings allow, or the stored stream cannot be read.
    pub async fn subscribe(
        self: &Arc<Self>,
        session: &SessionId,
        after_seq: Option<u64>,
    ) -> Result<Subscription, SubscribeError> {
        let (slot, log) = self
            .open_slot(session)
            .await
            .map_err(SubscribeError::Unavailable)?;
        if self.sharing.is_some() {
            // Catch up with what other instances stored, so that a client
            // resuming here from another instance is placed right.
            let _sync = slot.sync.lock().await;
            self.fetch_locked(session, &log)
                .await
                .map_err(SubscribeError::Unavailable)?;
        }
        let mut guard = lock(&log);
        if guard.clients.len() >= self.settings.max_clients_per_session {
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
        let head_seq = guard.next_seq - 1;
        let mut ready = VecDeque::new();
        let mut cursor = match after_seq {
            None => guard.next_seq,
            Some(after) if after > head_seq.max(guard.bound) => {
                ready.push_back(Frame::direct("reset", json!({ "head_seq": head_seq })));
                1
            }
            Some(after) => after + 1,
        };
        let first = guard.first_retained();
        if cursor < first {
            ready.push_back(Frame::gap(cursor, first - 1));
            cursor = first;
        }
        let state = Arc::new(ClientState {
            cursor: AtomicU64::new(cursor),
            ..ClientState::default()
        });
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        guard.clients.push((id, Arc::clone(&state)));
        let head = guard.head.subscribe();
        drop(guard);
        Ok(Subscription {
            log,
            head,
            cursor,
            ready,
            state,
            hub: Arc::clone(self),
            id,
            prompts: false,
            prompt_read: None,
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

    /// Number of clients subscribed to `session`.
    #[must_use]
    pub fn client_count(&self, session: &SessionId) -> usize {
        let log = lock(&self.sessions).loaded(session);
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
    /// ends. Then gives back every stream's unused reserved seqs and waits
    /// for the event queue to be written, so numbering after a restart
    /// continues exactly.
    pub async fn close_all_and_wait(&self, limit: std::time::Duration) {
        self.close_all();
        let deadline = tokio::time::Instant::now() + limit;
        while self.clients.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let logs = self.loaded_logs();
        for (session, log) in logs {
            self.release(&session, &lock(&log));
        }
        self.flush(limit).await;
    }

    /// Every stream loaded in memory now, with its session.
    fn loaded_logs(&self) -> Vec<(SessionId, SharedLog)> {
        let sessions = lock(&self.sessions);
        sessions
            .slots
            .iter()
            .filter_map(|(id, slot)| slot.log.get().map(|log| (id.clone(), Arc::clone(log))))
            .collect()
    }

    /// Waits, up to `limit`, until every event queued so far is written.
    pub async fn flush(&self, limit: std::time::Duration) {
        let Some(storage) = &self.storage else { return };
        let (done, written) = oneshot::channel();
        let queued = Queued {
            write: Write::Flush(done),
            ack: None,
        };
        if storage.queue.send(queued).await.is_ok() {
            let _ = tokio::time::timeout(limit, written).await;
        }
    }

    /// Closes every client (server shutdown).
    pub fn close_all(&self) {
        for (_, log) in self.loaded_logs() {
            for (_, client) in lock(&log).clients.drain(..) {
                client.kick(CloseReason::Shutdown);
            }
        }
    }

    /// Sets the stream's reservation down to what it handed out, so the
    /// next life of the server continues right above it.
    fn release(&self, session: &SessionId, log: &SessionLog) {
        if self.sharing.is_some() {
            // Only the holder may touch the reservation; a reader leaves
            // it to whoever numbers the stream.
            if log.writing {
                self.enqueue(Write::Release(session.clone(), log.next_seq - 1), None);
            }
        } else if self.storage.is_some() && log.reserved != u64::MAX {
            self.enqueue(Write::Reserve(session.clone(), log.next_seq - 1), None);
        }
    }

    /// Queues a write without waiting. A full queue means storage is far
    /// behind: the write is dropped and counted (an event dropped so is a
    /// hole after a crash, announced by `gap`).
    fn enqueue(&self, write: Write, ack: Option<oneshot::Sender<Result<(), EventStoreError>>>) {
        let Some(storage) = &self.storage else { return };
        if let Err(error) = storage.queue.try_send(Queued { write, ack }) {
            metrics::counter!("autopoiesis_stream_events_unstored_total").increment(1);
            if let mpsc::error::TrySendError::Full(queued) = error
                && let Some(ack) = queued.ack
            {
                let _ = ack.send(Err(EventStoreError("the event queue is full".into())));
            }
        }
    }

    /// The group commit task stored (or failed to store) a reservation.
    pub(super) fn reservation_stored(&self, session: &SessionId, upto: u64, stored: bool) {
        let Some(log) = lock(&self.sessions).loaded(session) else {
            return;
        };
        let mut log = lock(&log);
        log.reserving = false;
        if stored && upto >= log.next_seq - 1 {
            log.reserved = upto;
        }
    }

    /// The stream events of `session` go to: opened already (a stream
    /// without storage opens here); `None` for a forgotten session or a
    /// stream that is not open, whose events are dropped.
    fn open_for_events(&self, session: &SessionId) -> Option<SharedLog> {
        let mut sessions = lock(&self.sessions);
        match sessions.loaded(session) {
            Some(log) => Some(log),
            None if sessions.forgotten.contains(session) => {
                tracing::debug!(session.id = %session, "event for a forgotten session dropped");
                None
            }
            None if self.storage.is_none() => {
                // In memory, a stream needs no loading: open it here.
                let log: SharedLog = Arc::new(Mutex::new(SessionLog::new(1, u64::MAX)));
                let slot = sessions.slots.entry(session.clone()).or_default();
                let _ = slot.log.set(Arc::clone(&log));
                Some(slot.log.get().cloned().unwrap_or(log))
            }
            None => {
                tracing::warn!(session.id = %session, "event for a stream that is not open dropped");
                None
            }
        }
    }

    /// Keeps a turn's prompt for its first numbered event and wakes the
    /// clients that may read it now.
    fn stage_prompt(&self, session: &SessionId, turn: Option<&TurnId>, event: &SessionEvent) {
        let Some(log) = self.open_for_events(session) else {
            return;
        };
        let (_, data) = encode_event(event, turn);
        let mut guard = lock(&log);
        if !guard.writing {
            return;
        }
        guard.prompt = Some(Frame::prompt(prompt_frame(data, turn)));
        // The head stays; readers look again and find the prompt.
        guard.head.send_modify(|_| {});
        drop(guard);
        self.activities
            .tell(session, turn, ActivityKind::TurnStarted);
    }

    /// Numbers `event`, adds it to the window and queues it for storage;
    /// `durable` holds it back from readers until it is stored (the
    /// returned receiver answers then). `None` when the session's stream
    /// is not open (forgotten, or never opened with storage behind it).
    fn append(
        &self,
        session: &SessionId,
        turn: Option<&TurnId>,
        event: &SessionEvent,
        durable: bool,
    ) -> Option<Appended> {
        let log = self.open_for_events(session)?;
        let (op, data) = encode_event(event, turn);
        let mut guard = lock(&log);
        if !guard.writing {
            tracing::warn!(session.id = %session, "event for a stream another instance numbers dropped");
            return None;
        }
        let seq = guard.next_seq;
        guard.next_seq += 1;
        let frame = Arc::new(Frame {
            seq: Some(seq),
            op,
            json: broadcast_frame(op, data, seq, turn),
            prompt: guard.prompt.take(),
        });
        let mut stored = None;
        if self.storage.is_some() {
            if seq > guard.reserved && !guard.overrun_logged {
                guard.overrun_logged = true;
                tracing::warn!(session.id = %session, seq, "seq handed out past its stored reservation: storage is behind");
            }
            if !guard.reserving && seq + RESERVE_BLOCK / 2 >= guard.reserved {
                guard.reserving = true;
                let upto = guard.reserved.max(seq) + RESERVE_BLOCK;
                self.enqueue(Write::Reserve(session.clone(), upto), None);
            }
            let (ack, receiver) = if durable {
                let (ack, receiver) = oneshot::channel();
                guard.held.push_back(seq);
                (Some(ack), Some(receiver))
            } else {
                (None, None)
            };
            stored = receiver;
            self.enqueue(
                Write::Event(
                    session.clone(),
                    StoredEvent {
                        seq,
                        turn_id: turn.map(|t| t.as_str().to_owned()),
                        op: op.to_owned(),
                        frame: frame.json.clone(),
                        prelude: frame.prompt.as_ref().map(|prompt| prompt.json.clone()),
                    },
                ),
                ack,
            );
            let capacity = self.settings.ring_capacity as u64;
            if seq % TRIM_EVERY == 0 && seq > capacity {
                self.enqueue(Write::Trim(session.clone(), seq - capacity), None);
            }
            if durable {
                self.end_hold(session, &mut guard);
            }
        }
        guard.retain(frame, &self.settings);
        guard.wake_readers();
        drop(guard);
        Some((log, seq, stored))
    }
}

#[async_trait::async_trait]
impl SessionEvents for SessionHub {
    async fn open(&self, session: &SessionId) -> Result<(), EventStoreError> {
        self.hold(session).await
    }

    fn close(&self, session: &SessionId) {
        if let Some(log) = lock(&self.sessions).loaded(session) {
            let mut guard = lock(&log);
            self.end_hold(session, &mut guard);
            if self.sharing.is_none() || !guard.writing {
                // A turn that ended with nothing to tell: its prompt goes
                // with no event.
                guard.prompt = None;
            }
        }
    }

    fn publish(&self, session: &SessionId, turn: Option<TurnId>, event: SessionEvent) {
        if matches!(event, SessionEvent::Prompt { .. }) {
            self.stage_prompt(session, turn.as_ref(), &event);
        } else {
            self.append(session, turn.as_ref(), &event, false);
        }
    }

    async fn publish_durable(
        &self,
        session: &SessionId,
        turn: Option<TurnId>,
        event: SessionEvent,
    ) -> Result<(), EventStoreError> {
        let Some((log, seq, stored)) = self.append(session, turn.as_ref(), &event, true) else {
            // Dropped (its stream is gone): with storage behind the hub,
            // nothing was stored, and the caller must know.
            return match self.storage {
                Some(_) => Err(EventStoreError("the session's stream is not open".into())),
                None => Ok(()),
            };
        };
        // Observers hear of a turn's ending once clients can read it.
        let ended = |stored: bool| {
            let ending = match Ending::of_event(&event) {
                Some(_) if !stored => Ending::Failed {
                    code: Some("storage_unavailable".to_owned()),
                    message: "this turn's ending was not stored".to_owned(),
                },
                Some(ending) => ending,
                None => return,
            };
            if turn.is_some() {
                self.activities
                    .tell(session, turn.as_ref(), ActivityKind::TurnEnded(ending));
            }
        };
        let Some(stored) = stored else {
            ended(true);
            return Ok(());
        };
        let result = stored
            .await
            .unwrap_or_else(|_| Err(EventStoreError("the event writer stopped".into())));
        let mut guard = lock(&log);
        guard.held.retain(|held| *held != seq);
        if result.is_err() {
            // Not stored: clients must not read a `done` a crash could take
            // back. They read that the turn's ending was not stored instead.
            let (op, data) = encode_event(
                &SessionEvent::Error {
                    code: Some("storage_unavailable"),
                    message: "Session storage is unavailable; this turn's ending was not stored"
                        .into(),
                },
                turn.as_ref(),
            );
            let index = guard
                .ring
                .partition_point(|f| f.seq.is_some_and(|s| s < seq));
            if guard.ring.get(index).is_some_and(|f| f.seq == Some(seq)) {
                let replaced = Arc::new(Frame {
                    seq: Some(seq),
                    op,
                    json: broadcast_frame(op, data, seq, turn.as_ref()),
                    prompt: guard.ring[index].prompt.clone(),
                });
                guard.ring_bytes = guard.ring_bytes - guard.ring[index].size() + replaced.size();
                guard.ring[index] = replaced;
            }
        }
        guard.wake_readers();
        drop(guard);
        ended(result.is_ok());
        result
    }

    async fn turn_text(
        &self,
        session: &SessionId,
        turn: &TurnId,
    ) -> Result<String, EventStoreError> {
        match &self.storage {
            Some(storage) => storage.store.turn_text(session, turn.as_str()).await,
            None => Ok(String::new()),
        }
    }

    fn last_seq(&self, session: &SessionId) -> Option<u64> {
        let log = lock(&self.sessions).loaded(session)?;
        Some(lock(&log).next_seq - 1)
    }

    fn live_sessions(&self) -> HashSet<SessionId> {
        let logs = self.loaded_logs();
        logs.into_iter()
            .filter(|(_, log)| !lock(log).clients.is_empty())
            .map(|(id, _)| id)
            .collect()
    }

    async fn forget(&self, session: &SessionId) {
        let slot = {
            let mut sessions = lock(&self.sessions);
            sessions.remember_forgotten(session);
            sessions.slots.remove(session)
        };
        if let Some(log) = slot.and_then(|slot| slot.log.get().cloned()) {
            for (_, client) in lock(&log).clients.drain(..) {
                client.kick(CloseReason::SessionGone);
            }
            // Its events still queued must land before its rows go.
            self.flush(std::time::Duration::from_secs(5)).await;
        }
    }

    fn deleted(&self, session: &SessionId) {
        self.activities.tell(session, None, ActivityKind::Deleted);
    }

    fn evict(&self, session: &SessionId) {
        let mut sessions = lock(&self.sessions);
        let Some(log) = sessions.loaded(session) else {
            return;
        };
        let guard = lock(&log);
        if !guard.clients.is_empty() || !guard.held.is_empty() || guard.holders > 0 {
            return;
        }
        self.release(session, &guard);
        drop(guard);
        sessions.slots.remove(session);
    }
}

/// With [`Sharing`]: polls for other instances' events and renews this
/// one's holds, until the hub is gone.
async fn sharing_task(hub: std::sync::Weak<SessionHub>) {
    let Some((poll, lease)) = hub
        .upgrade()
        .and_then(|hub| hub.sharing.as_ref().map(|s| (s.poll, s.lease)))
    else {
        return;
    };
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed = tokio::time::Instant::now();
    loop {
        ticks.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        hub.resync().await;
        if renewed.elapsed() >= lease / 3 {
            renewed = tokio::time::Instant::now();
            hub.renew_holds().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ports::event_store::MockEventStore;
    use crate::ports::{EventBatch, StreamState};

    fn sid() -> SessionId {
        SessionId::parse("s").unwrap()
    }

    fn token(n: usize) -> SessionEvent {
        SessionEvent::Token {
            content: n.to_string(),
        }
    }

    fn hub(ring_capacity: usize) -> Arc<SessionHub> {
        SessionHub::new(StreamSettings {
            ring_capacity,
            ..StreamSettings::default()
        })
    }

    /// The frames a subscription has ready now, without waiting.
    async fn drain(sub: &mut Subscription) -> Vec<Arc<Frame>> {
        let mut frames = Vec::new();
        while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_millis(20), sub.next()).await
        {
            frames.push(frame);
        }
        frames
    }

    fn seqs(frames: &[Arc<Frame>]) -> Vec<Option<u64>> {
        frames.iter().map(|f| f.seq).collect()
    }

    #[tokio::test]
    async fn subscriptions_beyond_the_limits_are_refused_and_freed_on_drop() {
        let hub = SessionHub::new(StreamSettings {
            max_clients_per_session: 2,
            max_clients: 3,
            ..StreamSettings::default()
        });
        let other = SessionId::parse("other").unwrap();
        let a = hub.subscribe(&sid(), None).await.unwrap();
        let _b = hub.subscribe(&sid(), None).await.unwrap();
        assert_eq!(
            hub.subscribe(&sid(), None).await.err(),
            Some(SubscribeError::SessionFull(2))
        );
        let _c = hub.subscribe(&other, None).await.unwrap();
        assert_eq!(
            hub.subscribe(&other, None).await.err(),
            Some(SubscribeError::ServerFull(3))
        );
        drop(a);
        assert!(hub.subscribe(&sid(), None).await.is_ok());
    }

    #[tokio::test]
    async fn events_are_numbered_from_one_without_gaps() {
        let hub = hub(8);
        let mut sub = hub.subscribe(&sid(), None).await.unwrap();
        for n in 0..3 {
            hub.publish(&sid(), None, token(n));
        }
        assert_eq!(
            seqs(&drain(&mut sub).await),
            vec![Some(1), Some(2), Some(3)]
        );
    }

    #[tokio::test]
    async fn resuming_replays_exactly_the_retained_events_after_the_seq_then_live_ones() {
        let hub = hub(8);
        for n in 0..5 {
            hub.publish(&sid(), None, token(n));
        }
        let mut sub = hub.subscribe(&sid(), Some(3)).await.unwrap();
        assert_eq!(seqs(&drain(&mut sub).await), vec![Some(4), Some(5)]);
        hub.publish(&sid(), None, token(5));
        assert_eq!(seqs(&drain(&mut sub).await), vec![Some(6)]);
    }

    #[tokio::test]
    async fn the_window_drops_its_oldest_events_past_its_byte_cap() {
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
        let mut sub = hub.subscribe(&sid(), Some(0)).await.unwrap();
        // A gap notice, then the newest that fit in 1000 bytes (each frame
        // is the 300 bytes of text plus its JSON).
        assert_eq!(seqs(&drain(&mut sub).await), vec![None, Some(9), Some(10)]);
        let log = lock(&hub.sessions).loaded(&sid()).unwrap();
        let log = lock(&log);
        assert!(log.ring_bytes <= 1000);
        assert_eq!(
            log.ring_bytes,
            log.ring.iter().map(|f| f.json.len()).sum::<usize>()
        );
    }

    #[tokio::test]
    async fn resuming_from_before_the_window_starts_with_a_gap() {
        let hub = hub(2);
        for n in 0..5 {
            hub.publish(&sid(), None, token(n));
        }
        let mut sub = hub.subscribe(&sid(), Some(1)).await.unwrap();
        let frames = drain(&mut sub).await;
        assert_eq!(seqs(&frames), vec![None, Some(4), Some(5)]);
        assert!(frames[0].json.contains(r#""missed_from":2"#));
        assert!(frames[0].json.contains(r#""missed_to":3"#));
    }

    #[tokio::test]
    async fn resuming_when_up_to_date_replays_nothing() {
        let hub = hub(2);
        for n in 0..5 {
            hub.publish(&sid(), None, token(n));
        }
        let mut sub = hub.subscribe(&sid(), Some(5)).await.unwrap();
        assert!(drain(&mut sub).await.is_empty());
    }

    #[tokio::test]
    async fn a_reader_slower_than_a_burst_but_within_the_window_gets_every_event() {
        let hub = hub(1024);
        let mut slow = hub.subscribe(&sid(), None).await.unwrap();
        for n in 0..900 {
            hub.publish(&sid(), None, token(n));
        }
        let got = drain(&mut slow).await;
        assert_eq!(got.len(), 900);
        assert_eq!(slow.reason(), None);
    }

    #[tokio::test]
    async fn a_reader_the_window_moved_past_is_closed_and_the_others_keep_reading() {
        let hub = hub(4);
        let mut slow = hub.subscribe(&sid(), None).await.unwrap();
        let mut fast = hub.subscribe(&sid(), None).await.unwrap();
        for n in 0..6 {
            hub.publish(&sid(), None, token(n));
            assert_eq!(fast.next().await.unwrap().seq, Some(n as u64 + 1));
        }
        assert!(slow.next().await.is_none());
        assert_eq!(slow.reason(), Some(CloseReason::Lagged));
        assert_eq!(fast.reason(), None);
    }

    #[tokio::test]
    async fn dropped_subscriptions_leave_the_session_and_its_live_set() {
        let hub = hub(8);
        let sub = hub.subscribe(&sid(), None).await.unwrap();
        assert!(hub.live_sessions().contains(&sid()));
        drop(sub);
        assert!(hub.live_sessions().is_empty());
        assert_eq!(hub.clients_total(), 0);
    }

    #[tokio::test]
    async fn forgetting_a_session_closes_its_clients() {
        let hub = hub(8);
        let mut sub = hub.subscribe(&sid(), None).await.unwrap();
        hub.forget(&sid()).await;
        assert!(sub.next().await.is_none());
        assert_eq!(sub.reason(), Some(CloseReason::SessionGone));
    }

    #[tokio::test]
    async fn a_publish_after_forget_keeps_nothing_and_a_stale_cursor_gets_a_reset() {
        let hub = hub(8);
        for n in 0..3 {
            hub.publish(&sid(), None, token(n));
        }
        hub.forget(&sid()).await;
        // A turn that outlived its session's deletion.
        hub.publish(&sid(), None, token(9));
        assert!(lock(&hub.sessions).slots.is_empty());
        hub.open(&sid()).await.unwrap();
        hub.publish(&sid(), None, token(0));
        let mut sub = hub.subscribe(&sid(), Some(3)).await.unwrap();
        let frames = drain(&mut sub).await;
        assert_eq!(frames[0].op, "reset");
        assert!(frames[0].json.contains(r#""head_seq":1"#));
        assert_eq!(seqs(&frames[1..]), vec![Some(1)]);
    }

    #[tokio::test]
    async fn observers_hear_a_turn_start_and_end_and_a_deletion_but_no_token() {
        let hub = hub(8);
        let mut activities = hub.activities();
        let turn = TurnId::generate();
        hub.open(&sid()).await.unwrap();
        hub.publish(
            &sid(),
            Some(turn.clone()),
            SessionEvent::Prompt {
                content: "hi".into(),
            },
        );
        hub.publish(&sid(), Some(turn.clone()), token(1));
        hub.publish_durable(
            &sid(),
            Some(turn.clone()),
            SessionEvent::Done {
                content: "1".into(),
            },
        )
        .await
        .unwrap();
        hub.forget(&sid()).await;
        hub.deleted(&sid());
        let mut heard = Vec::new();
        while let Ok(activity) = activities.try_recv() {
            heard.push((activity.session, activity.turn, activity.kind));
        }
        assert_eq!(
            heard,
            vec![
                (sid(), Some(turn.clone()), ActivityKind::TurnStarted),
                (sid(), Some(turn), ActivityKind::TurnEnded(Ending::Done)),
                (sid(), None, ActivityKind::Deleted),
            ]
        );
    }

    #[tokio::test]
    async fn forgotten_sessions_are_remembered_only_up_to_a_bound() {
        let hub = hub(8);
        let ids: Vec<_> = (0..=FORGOTTEN_KEPT)
            .map(|n| SessionId::parse(&format!("s{n}")).unwrap())
            .collect();
        for id in &ids {
            hub.forget(id).await;
        }
        let sessions = lock(&hub.sessions);
        assert_eq!(sessions.forgotten.len(), FORGOTTEN_KEPT);
        assert_eq!(sessions.forgotten_order.len(), FORGOTTEN_KEPT);
        assert!(!sessions.forgotten.contains(&ids[0]));
        assert!(sessions.slots.is_empty());
    }

    fn stored(seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            turn_id: None,
            op: "token".into(),
            frame: format!(
                r#"{{"op":"token","data":{{"content":"{seq}"}},"seq":{seq},"turn_id":null}}"#
            ),
            prelude: None,
        }
    }

    /// A store holding events 1-3 of a stream whose earlier life reserved
    /// up to 10, recording every batch written.
    fn store_after_a_crash(batches: Arc<Mutex<Vec<EventBatch>>>) -> MockEventStore {
        let mut store = MockEventStore::new();
        store.expect_load().returning(|_, _| {
            Ok(StreamState {
                events: (1..=3).map(stored).collect(),
                reserved: 10,
            })
        });
        store.expect_write().returning(move |batch| {
            batches.lock().unwrap().push(batch);
            Ok(())
        });
        store
    }

    #[tokio::test]
    async fn a_stream_loaded_after_a_crash_goes_on_above_its_reservation_and_announces_the_hole() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let hub = SessionHub::stored(
            StreamSettings::default(),
            Arc::new(store_after_a_crash(batches.clone())),
        );
        let mut sub = hub.subscribe(&sid(), Some(2)).await.unwrap();
        // Reserved before any seq above 10 is handed out.
        assert_eq!(
            batches.lock().unwrap()[0].reserve,
            vec![(sid(), 10 + RESERVE_BLOCK)]
        );
        hub.publish(&sid(), None, token(0));
        let frames = drain(&mut sub).await;
        assert_eq!(seqs(&frames), vec![Some(3), None, Some(11)]);
        assert!(frames[1].json.contains(r#""missed_from":4"#));
        assert!(frames[1].json.contains(r#""missed_to":10"#));
    }

    // The store's write blocks a worker until released: two workers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_event_and_those_after_it_wait_until_it_is_stored() {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let mut store = MockEventStore::new();
        store
            .expect_load()
            .returning(|_, _| Ok(StreamState::default()));
        store.expect_write().returning(move |batch| {
            // Batches with the `done` wait for the test's signal.
            if batch.events.iter().any(|(_, e)| e.op == "done")
                && let Ok(mut slot) = released.try_lock()
                && let Some(released) = slot.take()
            {
                futures::executor::block_on(async { released.await.ok() });
            }
            Ok(())
        });
        let hub = SessionHub::stored(StreamSettings::default(), Arc::new(store));
        let mut sub = hub.subscribe(&sid(), None).await.unwrap();
        hub.publish(&sid(), None, token(0));
        let durable = tokio::spawn({
            let hub = Arc::clone(&hub);
            async move {
                hub.publish_durable(
                    &sid(),
                    None,
                    SessionEvent::Done {
                        content: "0".into(),
                    },
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        hub.publish(&sid(), None, token(1));
        assert_eq!(seqs(&drain(&mut sub).await), vec![Some(1)]);
        release.send(()).unwrap();
        durable.await.unwrap().unwrap();
        assert_eq!(seqs(&drain(&mut sub).await), vec![Some(2), Some(3)]);
    }

    #[tokio::test]
    async fn a_durable_event_that_cannot_be_stored_reads_as_a_storage_error() {
        let mut store = MockEventStore::new();
        store
            .expect_load()
            .returning(|_, _| Ok(StreamState::default()));
        store.expect_write().returning(|batch| {
            if batch.events.is_empty() {
                Ok(())
            } else {
                Err(EventStoreError("disk full".into()))
            }
        });
        let hub = SessionHub::stored(StreamSettings::default(), Arc::new(store));
        let mut sub = hub.subscribe(&sid(), None).await.unwrap();
        let result = hub
            .publish_durable(
                &sid(),
                None,
                SessionEvent::Done {
                    content: "x".into(),
                },
            )
            .await;
        assert!(result.is_err());
        let frames = drain(&mut sub).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].op, "error");
        assert!(
            frames[0].json.contains("storage_unavailable"),
            "{}",
            frames[0].json
        );
    }

    #[tokio::test]
    async fn a_graceful_stop_gives_back_the_unused_reservation() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let hub = SessionHub::stored(
            StreamSettings::default(),
            Arc::new(store_after_a_crash(batches.clone())),
        );
        hub.open(&sid()).await.unwrap();
        hub.publish(&sid(), None, token(0));
        hub.close_all_and_wait(Duration::from_secs(1)).await;
        let batches = batches.lock().unwrap();
        let last = batches.iter().flat_map(|b| b.reserve.clone()).last();
        assert_eq!(last, Some((sid(), 11)));
    }

    /// Two hubs on one store, as two instances on one database are.
    async fn shared_pair() -> (Arc<SessionHub>, Arc<SessionHub>, tempfile::TempDir) {
        use crate::adapters::persistence::{
            ConnectSettings, SeaOrmEventStore, connect, sqlite_url,
        };
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir.path().join("shared.sqlite"));
        let db = connect(&url, &ConnectSettings::default()).await.unwrap();
        let store: Arc<dyn EventStore> = Arc::new(SeaOrmEventStore::new(db, &url));
        // The poll is an hour away: only what a test does moves a reader.
        let sharing = |owner: &str| Sharing {
            owner: owner.into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_secs(3600),
        };
        let a = SessionHub::shared(StreamSettings::default(), Arc::clone(&store), sharing("a"));
        let b = SessionHub::shared(StreamSettings::default(), store, sharing("b"));
        (a, b, dir)
    }

    fn done() -> SessionEvent {
        SessionEvent::Done {
            content: "12".into(),
        }
    }

    #[tokio::test]
    async fn a_hub_sharing_the_store_reads_the_other_hubs_events_with_their_seqs_when_told() {
        let (a, b, _dir) = shared_pair().await;
        let mut on_a = a.subscribe(&sid(), Some(0)).await.unwrap();
        let mut on_b = b.subscribe(&sid(), Some(0)).await.unwrap();
        a.open(&sid()).await.unwrap();
        let turn = TurnId::generate();
        a.publish(&sid(), Some(turn.clone()), token(1));
        a.publish(&sid(), Some(turn.clone()), token(2));
        a.publish_durable(&sid(), Some(turn), done()).await.unwrap();
        let seen_a = drain(&mut on_a).await;
        assert_eq!(seqs(&seen_a), [Some(1), Some(2), Some(3)]);
        assert!(drain(&mut on_b).await.is_empty(), "nothing until told");
        b.notified(&sid(), 3);
        let seen_b = drain(&mut on_b).await;
        let json =
            |frames: &[Arc<Frame>]| frames.iter().map(|f| f.json.clone()).collect::<Vec<_>>();
        assert_eq!(json(&seen_b), json(&seen_a), "the same frames, same seqs");
        assert_eq!(b.last_seq(&sid()), Some(3));
    }

    #[tokio::test]
    async fn one_hub_numbers_a_shared_stream_at_a_time_and_the_next_goes_on_above_it() {
        let (a, b, _dir) = shared_pair().await;
        a.open(&sid()).await.unwrap();
        a.publish(&sid(), None, token(1));
        // B waits while A holds the stream...
        let waiting = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.open(&sid()).await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiting.is_finished(), "B numbers nothing while A holds it");
        // ...and takes it once A's hold ends, numbering right above A.
        a.publish_durable(&sid(), None, done()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("B takes the stream once A let go")
            .unwrap()
            .unwrap();
        let mut on_a = a.subscribe(&sid(), Some(2)).await.unwrap();
        b.publish_durable(&sid(), None, token(3)).await.unwrap();
        a.notified(&sid(), 3);
        assert_eq!(seqs(&drain(&mut on_a).await), [Some(3)]);
        // A's hold needs nobody to wait for now: B let go with its notice.
        tokio::time::timeout(Duration::from_secs(5), a.open(&sid()))
            .await
            .unwrap()
            .unwrap();
        a.close(&sid());
    }

    fn prompt(content: &str) -> SessionEvent {
        SessionEvent::Prompt {
            content: content.into(),
        }
    }

    fn ops(frames: &[Arc<Frame>]) -> Vec<&'static str> {
        frames.iter().map(|f| f.op).collect()
    }

    #[tokio::test]
    async fn only_clients_that_ask_for_prompts_get_them_and_the_seqs_stay_gapless() {
        let hub = hub(16);
        let mut plain = hub.subscribe(&sid(), None).await.unwrap();
        let mut asking = hub
            .subscribe(&sid(), None)
            .await
            .unwrap()
            .with_prompts(true);
        let turn = TurnId::generate();
        hub.publish(&sid(), Some(turn.clone()), prompt("hi <b>"));
        // The prompt is there before the turn's first event is.
        let early = drain(&mut asking).await;
        assert_eq!(ops(&early), ["prompt"]);
        let json: serde_json::Value = serde_json::from_str(&early[0].json).unwrap();
        assert_eq!(
            json,
            json!({"op": "prompt", "data": {"content": "hi <b>"}, "turn_id": turn.as_str()})
        );
        hub.publish(&sid(), Some(turn.clone()), token(1));
        hub.publish(&sid(), Some(turn), done());
        let later = drain(&mut asking).await;
        assert_eq!(seqs(&later), [Some(1), Some(2)], "the prompt comes once");
        let seen = drain(&mut plain).await;
        assert_eq!(ops(&seen), ["token", "done"]);
        assert_eq!(seqs(&seen), [Some(1), Some(2)]);
    }

    #[tokio::test]
    async fn a_client_resuming_before_a_turn_gets_its_prompt_and_one_resuming_inside_it_does_not() {
        let hub = hub(16);
        for (n, content) in [(1, "first"), (3, "second")] {
            let turn = TurnId::generate();
            hub.publish(&sid(), Some(turn.clone()), prompt(content));
            hub.publish(&sid(), Some(turn.clone()), token(n));
            hub.publish(&sid(), Some(turn), done());
        }
        let mut from_start = hub
            .subscribe(&sid(), Some(0))
            .await
            .unwrap()
            .with_prompts(true);
        let frames = drain(&mut from_start).await;
        assert_eq!(
            ops(&frames),
            ["prompt", "token", "done", "prompt", "token", "done"]
        );
        assert_eq!(
            seqs(&frames),
            [None, Some(1), Some(2), None, Some(3), Some(4)]
        );
        assert!(frames[3].json.contains("second"));
        let mut inside = hub
            .subscribe(&sid(), Some(3))
            .await
            .unwrap()
            .with_prompts(true);
        assert_eq!(ops(&drain(&mut inside).await), ["done"]);
    }

    #[tokio::test]
    async fn a_stored_prompt_comes_back_with_its_event_after_a_restart() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let hub = SessionHub::stored(
            StreamSettings::default(),
            Arc::new(store_after_a_crash(batches.clone())),
        );
        hub.open(&sid()).await.unwrap();
        let turn = TurnId::generate();
        hub.publish(&sid(), Some(turn.clone()), prompt("again"));
        hub.publish(&sid(), Some(turn.clone()), token(0));
        hub.publish_durable(&sid(), Some(turn), done())
            .await
            .unwrap();
        let events: Vec<StoredEvent> = batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.events.iter().map(|(_, e)| e.clone()))
            .collect();
        assert_eq!(events.len(), 2, "the prompt is no row of its own");
        let prelude = events[0]
            .prelude
            .clone()
            .expect("kept with the first event");
        assert!(prelude.contains(r#""op":"prompt""#) && !prelude.contains("seq"));
        assert_eq!(events[1].prelude, None);

        // A later life loads them: the prompt comes back before its event.
        let mut store = MockEventStore::new();
        store.expect_load().returning(move |_, _| {
            Ok(StreamState {
                events: events.clone(),
                reserved: 20,
            })
        });
        store.expect_write().returning(|_| Ok(()));
        let restarted = SessionHub::stored(StreamSettings::default(), Arc::new(store));
        let mut asking = restarted
            .subscribe(&sid(), Some(10))
            .await
            .unwrap()
            .with_prompts(true);
        let frames = drain(&mut asking).await;
        assert_eq!(ops(&frames), ["prompt", "token", "done"]);
        assert_eq!(frames[0].json, prelude);
        let mut plain = restarted.subscribe(&sid(), Some(10)).await.unwrap();
        assert_eq!(ops(&drain(&mut plain).await), ["token", "done"]);
    }

    #[tokio::test]
    async fn a_hub_reading_another_hubs_stream_gets_its_prompts_too() {
        let (a, b, _dir) = shared_pair().await;
        let mut on_b = b
            .subscribe(&sid(), Some(0))
            .await
            .unwrap()
            .with_prompts(true);
        a.open(&sid()).await.unwrap();
        let turn = TurnId::generate();
        a.publish(&sid(), Some(turn.clone()), prompt("from A"));
        a.publish(&sid(), Some(turn.clone()), token(1));
        a.publish_durable(&sid(), Some(turn), done()).await.unwrap();
        b.notified(&sid(), 2);
        let frames = drain(&mut on_b).await;
        assert_eq!(ops(&frames), ["prompt", "token", "done"]);
        assert!(frames[0].json.contains("from A"));
    }
}

//! The chat turn: one prompt in, one streamed answer out, with the
//! deferred-approval policy and per-session ordering.
//!
//! Every turn publishes its events to the [`SessionEvents`] port and ends with
//! exactly one terminal event (`done`, `error` or `cancelled`), whichever
//! transport started it. Turns on one session run one at a time, in the order
//! they were submitted (each waits for the one before it); different sessions
//! run in parallel.
//!
//! A turn runs in a task of its own, detached from whoever submitted it: a
//! caller that goes away (a client disconnect, a reset HTTP/2 stream) stops
//! waiting for the answer, never the turn (stopping is [`ChatService::cancel`]).
//! What a turn holds on its session (its place in the queue, its cancel
//! handle) is released by drop guards, however the task ends.
//!
//! A deleted session ([`ChatService::end_session`]) stops its running turn and
//! drops its queued ones; nothing of those turns reaches the session's
//! clients or history afterwards, so the session cannot come back from them.
//!
//! Turns are counted through the `metrics` facade, which like `tracing` names
//! no technology: the binary decides where the figures go.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::agent::{AgentError, AgentEvent, AgentReply, provider_message_for_clients};
use super::approvals::{ApprovalScope, ApprovalService, RecordError, ToolCallRequest};
use super::events::SessionEvent;
use super::message::{ModelMessage, ResponsePart};
use super::session::{SessionId, SessionInfo, TurnId};
use crate::ports::{
    AgentRuntime, Claim, Enqueued, EventSink, SessionEvents, SessionStore, SessionStoreError,
    TurnInput, TurnRecord, TurnStore,
};

/// The code of the error that ends a turn cut short by a crash.
pub const TURN_INTERRUPTED_CODE: &str = "turn_interrupted";
/// The message that goes with [`TURN_INTERRUPTED_CODE`].
pub const TURN_INTERRUPTED_MESSAGE: &str = "The server stopped while this turn ran; it was interrupted. Its prompt and the text streamed so far are in the history.";

/// Queued turns a session takes by default, besides the running one.
pub const DEFAULT_MAX_QUEUED_TURNS: usize = 8;

/// The runtime the server drives, or why there is none.
///
/// The server starts even when the runtime cannot be built (a provider
/// without its settings): chat then answers "unavailable" with the reason.
#[derive(Clone)]
pub enum RuntimeSlot {
    Ready(Arc<dyn AgentRuntime>),
    Unavailable(String),
}

/// A completed turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatReply {
    pub session_id: SessionId,
    pub content: String,
}

/// Why a chat turn did not produce a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("Empty message")]
    EmptyMessage,
    #[error("{0}")]
    RuntimeUnavailable(String),
    /// The turn ended with tool calls that need a human's approval (or the
    /// approval key is locked). The history was saved. `approval_id` names
    /// the pending approval the calls were recorded as, when they were.
    #[error("{}", super::events::approval_unsupported_message(approval_id.is_some()))]
    ApprovalUnsupported {
        session_id: SessionId,
        approval_id: Option<String>,
    },
    /// The model provider failed; the session stays usable.
    #[error("{message}")]
    Provider {
        session_id: SessionId,
        message: String,
    },
    /// The prompt cannot be carried out as written (an unknown tool, tool
    /// arguments that are not JSON): the user's input is at fault. Nothing
    /// was saved; the session stays usable.
    #[error("{message}")]
    InvalidRequest {
        session_id: SessionId,
        message: String,
    },
    /// The turn was cancelled; `partial` was saved in the history.
    #[error("the turn was cancelled")]
    Cancelled {
        session_id: SessionId,
        partial: String,
    },
    /// The turn ran past the configured timeout; the partial text was saved.
    #[error("the turn timed out after {} s", after.as_secs())]
    TimedOut {
        session_id: SessionId,
        after: Duration,
    },
    #[error("session storage unavailable")]
    Storage(#[from] SessionStoreError),
    /// The server is shutting down and starts no new turn.
    #[error("The server is shutting down")]
    ShuttingDown,
    /// The session's history has reached the cap: no turn runs on it.
    #[error("This session's history is full ({limit} bytes); start a new session")]
    HistoryFull { limit: usize },
    /// The turn ended deferred but its approval request could not be
    /// recorded: the approval store is unavailable. The history was saved.
    #[error("Approval storage is unavailable; the approval request was not recorded")]
    ApprovalStorage { session_id: SessionId },
    /// The session already has as many turns waiting as it may queue.
    #[error(
        "This session already has {max} queued turns; wait for one to finish before sending more"
    )]
    TooManyQueued { max: usize },
    /// The session was deleted before or while the turn ran: the turn ended
    /// and nothing of it was kept or published.
    #[error("The session was deleted; the turn was dropped")]
    SessionDeleted { session_id: SessionId },
}

/// Where deferred turns are recorded when approvals are unlocked.
pub struct ApprovalRecording {
    /// Records the envelope and tells its listeners.
    pub service: Arc<ApprovalService>,
    /// The agent named in each envelope's scope.
    pub agent: String,
}

/// Why a cancel request did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("Session not found")]
    SessionNotFound,
    #[error("No turn is running on this session")]
    NothingRunning,
    /// The session store failed while looking the session up: whether it
    /// exists is unknown. The message is for logs, not clients.
    #[error("session storage unavailable")]
    Storage(#[source] SessionStoreError),
}

/// A turn that can be cancelled from anywhere.
struct Running {
    turn_id: TurnId,
    cancel: CancellationToken,
}

/// The turns of one session: who is queued, and whether the session still
/// exists for them.
struct Lane {
    /// Changed only under the lanes map's lock.
    queue: Mutex<Queue>,
    /// False once the session is deleted. Events and history of the lane's
    /// turns are written under this lock after checking it, so nothing of
    /// theirs lands after [`ChatService::end_session`].
    alive: Mutex<bool>,
    /// Fires when the session is deleted: the running turn stops, queued
    /// ones end without running.
    ended: CancellationToken,
    /// Woken when one of the lane's turns leaves it: with several
    /// instances, the next one asks at once whether its time has come.
    turn_left: tokio::sync::Notify,
}

#[derive(Default)]
struct Queue {
    /// Turns admitted and not finished, the running one included.
    turns: usize,
    /// Fires when the last admitted turn has finished: the next one waits
    /// for it.
    tail: Option<oneshot::Receiver<()>>,
}

impl Lane {
    fn new() -> Self {
        Self {
            queue: Mutex::default(),
            alive: Mutex::new(true),
            ended: CancellationToken::new(),
            turn_left: tokio::sync::Notify::new(),
        }
    }

    /// Publishes unless the session was deleted.
    fn publish(
        &self,
        events: &dyn SessionEvents,
        session_id: &SessionId,
        turn_id: &TurnId,
        event: SessionEvent,
    ) {
        let alive = lock(&self.alive);
        if *alive {
            events.publish(session_id, Some(turn_id.clone()), event);
        }
    }

    fn is_alive(&self) -> bool {
        *lock(&self.alive)
    }
}

/// What every turn task shares with the service.
struct Core {
    runtime: RuntimeSlot,
    sessions: Arc<dyn SessionStore>,
    events: Arc<dyn SessionEvents>,
    /// The sessions with a turn running or queued. Entries are removed when
    /// their last turn leaves, or when the session is deleted.
    lanes: Mutex<HashMap<SessionId, Arc<Lane>>>,
    /// The turn running on each session, for cancel requests.
    running: Mutex<HashMap<SessionId, Running>>,
    /// A turn running longer than this ends with an error (`None`: no limit).
    turn_timeout: Option<Duration>,
    /// Set at shutdown: no new turn starts, queued ones included.
    closing: AtomicBool,
    /// Unset when the server keeps no approval store.
    approvals: OnceLock<ApprovalRecording>,
    /// Where running turns are recorded; `None` with in-memory sessions.
    turns: Option<TurnRecords>,
    /// Orphaned turns claimed but not ended yet (storage failed meanwhile).
    unrecovered: Mutex<Vec<TurnRecord>>,
}

/// The records of running turns, and who this instance is in them.
pub struct TurnRecords {
    pub store: Arc<dyn TurnStore>,
    /// This process's name in the records (random per start).
    pub owner: String,
    /// How long a record stays claimed without a renewal.
    pub lease: Duration,
    /// Other instances share the store (SPEC B12): every turn takes its
    /// place in its session's stored queue when it arrives, and runs when
    /// it is first there, whichever instance took the turns before it.
    pub shared: bool,
}

/// How often a turn waiting behind another instance's turn asks whether its
/// time has come (a turn of this instance wakes it at once).
const QUEUE_POLL: Duration = Duration::from_millis(50);

/// Runs chat turns.
pub struct ChatService {
    core: Arc<Core>,
    /// Turns a session may have waiting behind its running one, whatever
    /// transport sent them.
    max_queued_turns: usize,
    /// A session whose history holds this many bytes takes no new turn.
    max_history_bytes: usize,
}

enum Outcome {
    Finished(Result<AgentReply, AgentError>),
    Cancelled,
    TimedOut(Duration),
    Deleted,
}

/// A submitted turn. Awaiting [`TurnHandle::outcome`] waits for its end;
/// dropping the handle leaves the turn running.
pub struct TurnHandle {
    task: tokio::task::JoinHandle<Result<ChatReply, ChatError>>,
    turn_id: TurnId,
}

impl TurnHandle {
    /// The id its events carry on the session's stream, from its first
    /// (the turn may still wait behind others).
    #[must_use]
    pub fn turn_id(&self) -> &TurnId {
        &self.turn_id
    }

    /// How the turn ended.
    ///
    /// # Errors
    /// See [`ChatError`].
    pub async fn outcome(self) -> Result<ChatReply, ChatError> {
        match self.task.await {
            Ok(result) => result,
            // A panicking turn is a bug: surface it where it would have been
            // had the turn run in the caller's task.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Only the async runtime going away aborts a turn task.
            Err(_) => Err(ChatError::ShuttingDown),
        }
    }
}

impl ChatService {
    #[must_use]
    pub fn new(
        runtime: RuntimeSlot,
        sessions: Arc<dyn SessionStore>,
        events: Arc<dyn SessionEvents>,
        turn_timeout: Option<Duration>,
    ) -> Self {
        Self {
            core: Arc::new(Core {
                runtime,
                sessions,
                events,
                lanes: Mutex::default(),
                running: Mutex::default(),
                turn_timeout,
                closing: AtomicBool::new(false),
                approvals: OnceLock::new(),
                turns: None,
                unrecovered: Mutex::default(),
            }),
            max_queued_turns: DEFAULT_MAX_QUEUED_TURNS,
            max_history_bytes: usize::MAX,
        }
    }

    /// Caps a session's history: once it holds `bytes`, its next turn is
    /// refused with [`ChatError::HistoryFull`]. The turn that crosses the
    /// cap is kept whole: a cap never cuts an answer.
    #[must_use]
    pub fn with_history_limit(mut self, bytes: usize) -> Self {
        self.max_history_bytes = bytes;
        self
    }

    /// Records deferred turns as pending approval envelopes.
    #[must_use]
    pub fn with_approvals(self, approvals: ApprovalRecording) -> Self {
        // Built once at startup, before any turn: the cell is empty.
        let _ = self.core.approvals.set(approvals);
        self
    }

    /// Records every running turn with an owner and a lease, so that one a
    /// crash cuts short is found and ended ([`Self::recover`]).
    ///
    /// # Panics
    /// When called after the service was shared (it is built once, at
    /// startup).
    #[must_use]
    pub fn with_turn_records(mut self, turns: TurnRecords) -> Self {
        Arc::get_mut(&mut self.core)
            .expect("turn records are set before the service is shared")
            .turns = Some(turns);
        self
    }

    /// Caps the turns a session may have waiting behind its running one.
    #[must_use]
    pub fn with_max_queued_turns(mut self, max: usize) -> Self {
        self.max_queued_turns = max;
        self
    }

    /// Why the runtime is unavailable, if it is.
    #[must_use]
    pub fn unavailable_reason(&self) -> Option<&str> {
        match &self.core.runtime {
            RuntimeSlot::Ready(_) => None,
            RuntimeSlot::Unavailable(why) => Some(why),
        }
    }

    /// Runs one turn on `session_id` (a new session when `None`, created when
    /// missing) and waits for its end. Dropping the returned future stops
    /// the wait, not the turn.
    ///
    /// # Errors
    /// See [`ChatError`]: the variant says how the turn ended. Errors raised
    /// before the turn starts (empty message, no runtime, a full queue,
    /// storage) publish nothing; every other ending has been published to
    /// the session.
    pub async fn send(
        &self,
        session_id: Option<SessionId>,
        content: String,
    ) -> Result<ChatReply, ChatError> {
        check_prompt(&content)?;
        if self.core.is_closing() {
            return Err(ChatError::ShuttingDown);
        }
        let runtime = match &self.core.runtime {
            RuntimeSlot::Ready(runtime) => Arc::clone(runtime),
            RuntimeSlot::Unavailable(why) => {
                return Err(ChatError::RuntimeUnavailable(why.clone()));
            }
        };
        let session_id = session_id.unwrap_or_else(SessionId::generate);
        let info = self
            .core
            .sessions
            .get_or_create(&session_id, Utc::now())
            .await?;
        self.admit(runtime, session_id, content, Some(info))?
            .outcome()
            .await
    }

    /// Queues a turn on an open session (a WebSocket's) and returns at once.
    /// Turns submitted one after another run in that order.
    ///
    /// Without a runtime, the turn's `error` is published to every client of
    /// the session (as any turn's ending would be) and returned.
    ///
    /// # Errors
    /// [`ChatError::EmptyMessage`], [`ChatError::ShuttingDown`] and
    /// [`ChatError::TooManyQueued`] (published to nobody: the sender alone
    /// should hear), [`ChatError::RuntimeUnavailable`] (published).
    pub fn submit(&self, session_id: &SessionId, content: String) -> Result<TurnHandle, ChatError> {
        check_prompt(&content)?;
        if self.core.is_closing() {
            return Err(ChatError::ShuttingDown);
        }
        match &self.core.runtime {
            RuntimeSlot::Ready(runtime) => {
                self.admit(Arc::clone(runtime), session_id.clone(), content, None)
            }
            RuntimeSlot::Unavailable(why) => {
                let core = Arc::clone(&self.core);
                let session_id = session_id.clone();
                let message = why.clone();
                tokio::spawn(async move {
                    let event = SessionEvent::Error {
                        code: None,
                        message,
                    };
                    core.notice(&session_id, Some(TurnId::generate()), event)
                        .await;
                });
                Err(ChatError::RuntimeUnavailable(why.clone()))
            }
        }
    }

    /// Takes the turn into the session's queue, or refuses it when the
    /// queue is full, and starts its task.
    ///
    /// `known` is the session as the caller just read it: a turn that runs
    /// at once (nothing queued before it) checks its history cap on that,
    /// instead of reading the session again.
    fn admit(
        &self,
        runtime: Arc<dyn AgentRuntime>,
        session_id: SessionId,
        content: String,
        known: Option<SessionInfo>,
    ) -> Result<TurnHandle, ChatError> {
        let (done, wait, lane) = {
            let mut lanes = lock(&self.core.lanes);
            let lane = Arc::clone(
                lanes
                    .entry(session_id.clone())
                    .or_insert_with(|| Arc::new(Lane::new())),
            );
            let mut queue = lock(&lane.queue);
            if queue.turns > self.max_queued_turns {
                metrics::counter!("autopoiesis_turns_refused_total", "reason" => "queue_full")
                    .increment(1);
                return Err(ChatError::TooManyQueued {
                    max: self.max_queued_turns,
                });
            }
            queue.turns += 1;
            let (done, finished) = oneshot::channel();
            let wait = queue.tail.replace(finished);
            drop(queue);
            (done, wait, lane)
        };
        let place = Place {
            core: Arc::clone(&self.core),
            session_id: session_id.clone(),
            lane: Arc::clone(&lane),
            done: Some(done),
        };
        let core = Arc::clone(&self.core);
        let max_history_bytes = self.max_history_bytes;
        let max_queued_turns = self.max_queued_turns;
        let turn_id = TurnId::generate();
        let handle_turn_id = turn_id.clone();
        let task = tokio::spawn(async move {
            let mut place = place;
            let mut known = known;
            if let Some(before) = wait {
                // Whatever the caller read is stale once other turns ran.
                known = None;
                tokio::select! {
                    _ = before => {}
                    () = lane.ended.cancelled() => {}
                }
            }
            if !lane.is_alive() {
                return Err(ChatError::SessionDeleted { session_id });
            }
            if core.is_closing() {
                return Err(ChatError::ShuttingDown);
            }
            let queued = core.shared_turns().is_some();
            if queued {
                let first = core
                    .take_place(&session_id, &turn_id, &content, max_queued_turns)
                    .await?;
                // The next turn of this instance may take its place now.
                place.done = None;
                if !first {
                    known = None;
                    core.await_turn(&lane, &session_id, &turn_id).await?;
                }
            }
            let (result, ended) = core
                .run_queued(
                    runtime.as_ref(),
                    &place.lane,
                    &session_id,
                    turn_id.clone(),
                    content,
                    known,
                    max_history_bytes,
                )
                .await;
            if queued && !ended {
                core.leave_queue(&turn_id).await;
            }
            drop(place);
            result
        });
        Ok(TurnHandle {
            task,
            turn_id: handle_turn_id,
        })
    }

    /// Stops the turn running on `session_id`. Its clients get `cancelled`
    /// and its partial text is kept in the history.
    ///
    /// # Errors
    /// [`CancelError::NothingRunning`] when no turn runs on the session,
    /// [`CancelError::SessionNotFound`] when the session does not exist,
    /// [`CancelError::Storage`] when the store cannot say.
    pub async fn cancel(&self, session_id: &SessionId) -> Result<TurnId, CancelError> {
        let cancelled = lock(&self.core.running).get(session_id).map(|running| {
            running.cancel.cancel();
            running.turn_id.clone()
        });
        if let Some(turn_id) = cancelled {
            return Ok(turn_id);
        }
        if let Some(turns) = self.core.shared_turns() {
            // Running on another instance, maybe: it is told.
            match turns.store.request_cancel(session_id).await {
                Ok(Some(turn_id)) => return Ok(turn_id),
                Ok(None) => {}
                Err(error) => {
                    return Err(CancelError::Storage(SessionStoreError::Unavailable(
                        error.to_string(),
                    )));
                }
            }
        }
        match self.core.sessions.history(session_id).await {
            Ok(_) => Err(CancelError::NothingRunning),
            Err(SessionStoreError::NotFound) => Err(CancelError::SessionNotFound),
            Err(error) => Err(CancelError::Storage(error)),
        }
    }

    /// Stops the turn `turn_id` if it runs here: another instance was asked
    /// to cancel it (SPEC B12). True if it was running here.
    pub fn cancel_turn(&self, turn_id: &TurnId) -> bool {
        let running = lock(&self.core.running);
        let found = running.values().find(|r| &r.turn_id == turn_id);
        if let Some(found) = found {
            found.cancel.cancel();
        }
        found.is_some()
    }

    /// The session is being deleted: its running turn stops, its queued
    /// turns end without running, and none of them publishes or saves
    /// anything from now on. Turns submitted afterwards start a new queue.
    pub fn end_session(&self, session_id: &SessionId) {
        let lane = lock(&self.core.lanes).remove(session_id);
        if let Some(lane) = lane {
            *lock(&lane.alive) = false;
            lane.ended.cancel();
        }
    }

    /// Turns running or queued on `session_id`.
    #[must_use]
    pub fn queued_turns(&self, session_id: &SessionId) -> usize {
        let lane = lock(&self.core.lanes).get(session_id).cloned();
        lane.map_or(0, |lane| lock(&lane.queue).turns)
    }

    /// An `approve` request on a session: the server cannot take approvals
    /// yet, so every client of the session is told so.
    ///
    /// Published from a task of its own: with several instances it may wait
    /// for a turn another instance runs on the session, and the caller (a
    /// WebSocket's reader, with a cancel maybe next) must not.
    pub fn approve_unsupported(&self, session_id: &SessionId) {
        let core = Arc::clone(&self.core);
        let session_id = session_id.clone();
        tokio::spawn(async move {
            core.notice(&session_id, None, SessionEvent::approval_unsupported())
                .await;
        });
    }

    /// Graceful shutdown: starts no new turn, lets running ones finish for
    /// up to `grace`, then cancels the rest (their partial text is saved, as
    /// for any cancel) and waits for them to wind up.
    pub async fn shutdown(&self, grace: Duration) {
        self.core.closing.store(true, Ordering::SeqCst);
        if !self.wait_idle(grace).await {
            let cancelled = {
                let running = lock(&self.core.running);
                running.values().for_each(|r| r.cancel.cancel());
                running.len()
            };
            tracing::info!(
                turns = cancelled,
                "grace period over: running turns cancelled"
            );
            self.wait_idle(Duration::from_secs(5)).await;
        }
    }

    /// Waits up to `limit` for no turn to be running or winding up (its
    /// ending and record still being stored); true if none is.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if lock(&self.core.running).is_empty() && lock(&self.core.lanes).is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Ends the turns left running by a server that is gone: an earlier
    /// life of this one (`all`: every record not owned by this process, for
    /// a database only one server uses) or, with several instances on one
    /// database, one whose lease ran out. Each ends with a stored
    /// `error` `{"code":"turn_interrupted"}` on its stream; its prompt, and
    /// the text it had streamed as far as that was stored, go into the
    /// history; its session takes new turns. Returns how many were ended.
    /// A turn that cannot be ended now (storage failing) is retried by the
    /// next call.
    pub async fn recover(&self, all: bool) -> usize {
        let Some(turns) = &self.core.turns else {
            return 0;
        };
        let now = Utc::now();
        let lease_until = now + chrono::Duration::from_std(turns.lease).unwrap_or_default();
        let claimed = turns
            .store
            .claim_orphans(&turns.owner, (!all).then_some(now), lease_until)
            .await;
        let mut orphans = std::mem::take(&mut *lock(&self.core.unrecovered));
        match claimed {
            Ok(claimed) => orphans.extend(claimed),
            Err(error) => tracing::warn!(%error, "orphaned turns not looked up"),
        }
        let mut ended = 0;
        for record in orphans {
            match self.core.interrupt(&record).await {
                Ok(()) => ended += 1,
                Err(error) => {
                    tracing::warn!(turn.id = %record.turn_id, %error, "orphaned turn not ended yet");
                    lock(&self.core.unrecovered).push(record);
                }
            }
        }
        if ended > 0 {
            tracing::info!(
                turns = ended,
                "turns left running by a server that stopped were ended as interrupted"
            );
        }
        ended
    }

    /// Keeps this process's turn records claimed (renewing their lease a
    /// few times per lease) and ends orphaned ones whose lease ran out,
    /// until `shutdown` fires.
    pub async fn run_leases(&self, shutdown: CancellationToken) {
        let Some(turns) = &self.core.turns else {
            return;
        };
        let mut ticks = tokio::time::interval(turns.lease / 3);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Ending another instance's turns may wait for its stream's lease to
        // run out too: never in the way of this instance's renewals.
        let mut recovering: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // Retried by whichever instance runs the next recovery.
                    if let Some(task) = recovering {
                        task.abort();
                    }
                    return;
                }
                _ = ticks.tick() => {}
            }
            if !lock(&self.core.running).is_empty() {
                let until =
                    Utc::now() + chrono::Duration::from_std(turns.lease).unwrap_or_default();
                if let Err(error) = turns.store.renew(&turns.owner, until).await {
                    tracing::warn!(%error, "turn leases not renewed");
                }
            }
            if turns.shared {
                // Queued turns hold their places with the same lease.
                if lock(&self.core.running).is_empty() && !lock(&self.core.lanes).is_empty() {
                    let until =
                        Utc::now() + chrono::Duration::from_std(turns.lease).unwrap_or_default();
                    if let Err(error) = turns.store.renew(&turns.owner, until).await {
                        tracing::warn!(%error, "turn leases not renewed");
                    }
                }
                // Cancels asked for on other instances whose notice was lost.
                match turns.store.cancel_requests(&turns.owner).await {
                    Ok(asked) => asked.iter().for_each(|turn| {
                        self.cancel_turn(turn);
                    }),
                    Err(error) => tracing::warn!(%error, "cancel requests not read"),
                }
            }
            if recovering
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
            {
                let chat = self.clone_for_recovery();
                recovering = Some(tokio::spawn(async move {
                    chat.recover(false).await;
                }));
            }
        }
    }

    /// A handle on the same service for a background recovery.
    fn clone_for_recovery(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            max_queued_turns: self.max_queued_turns,
            max_history_bytes: self.max_history_bytes,
        }
    }

    /// Sessions with a turn running or queued; the sweeper spares them.
    #[must_use]
    pub fn busy_sessions(&self) -> HashSet<SessionId> {
        lock(&self.core.lanes).keys().cloned().collect()
    }
}

impl Core {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// The turn records, when other instances share them.
    fn shared_turns(&self) -> Option<&TurnRecords> {
        self.turns.as_ref().filter(|turns| turns.shared)
    }

    /// Publishes one event outside any turn to every instance's clients of
    /// the session (with several instances it waits for a turn running on
    /// another one to end: one instance numbers a stream at a time).
    async fn notice(&self, session: &SessionId, turn: Option<TurnId>, event: SessionEvent) {
        if let Err(error) = self.events.open(session).await {
            tracing::error!(session.id = %session, %error, "notice not published");
            return;
        }
        if let Err(error) = self.events.publish_durable(session, turn, event).await {
            tracing::error!(session.id = %session, %error, "notice not stored");
        }
    }

    /// Stores the turn's place at the end of its session's queue, shared by
    /// every instance. True if it is first (it runs now).
    async fn take_place(
        &self,
        session: &SessionId,
        turn_id: &TurnId,
        prompt: &str,
        max_queued: usize,
    ) -> Result<bool, ChatError> {
        let Some(turns) = &self.turns else {
            return Ok(true);
        };
        let now = Utc::now();
        let record = TurnRecord {
            turn_id: turn_id.clone(),
            session_id: session.clone(),
            owner: turns.owner.clone(),
            prompt: prompt.to_owned(),
            started_at: now,
            lease_until: now + chrono::Duration::from_std(turns.lease).unwrap_or_default(),
            running: false,
        };
        match turns
            .store
            .enqueue(&record, max_queued)
            .await
            .map_err(storage_unavailable)?
        {
            Enqueued::First => Ok(true),
            Enqueued::Waiting => Ok(false),
            Enqueued::Full => {
                metrics::counter!("autopoiesis_turns_refused_total", "reason" => "queue_full")
                    .increment(1);
                Err(ChatError::TooManyQueued { max: max_queued })
            }
        }
    }

    /// Waits until the turn is its session's first among every instance's
    /// turns (and marks it running). A turn of this instance leaving the
    /// lane wakes it at once; one of another instance, within
    /// [`QUEUE_POLL`].
    async fn await_turn(
        &self,
        lane: &Lane,
        session_id: &SessionId,
        turn_id: &TurnId,
    ) -> Result<(), ChatError> {
        let Some(turns) = &self.turns else {
            return Ok(());
        };
        loop {
            tokio::select! {
                biased;
                () = lane.ended.cancelled() => break,
                () = lane.turn_left.notified() => {}
                () = tokio::time::sleep(QUEUE_POLL) => {}
            }
            if self.is_closing() {
                self.leave_queue(turn_id).await;
                return Err(ChatError::ShuttingDown);
            }
            match turns.store.claim(turn_id).await {
                Ok(Claim::Running) => return Ok(()),
                Ok(Claim::Waiting) => {}
                Ok(Claim::Gone) => break,
                Err(error) => {
                    tracing::warn!(turn.id = %turn_id, %error, "turn queue not read; asking again")
                }
            }
        }
        Err(ChatError::SessionDeleted {
            session_id: session_id.clone(),
        })
    }

    /// Removes a turn that will not run (or whose ending was not stored)
    /// from its session's queue.
    async fn leave_queue(&self, turn_id: &TurnId) {
        if let Some(turns) = &self.turns
            && let Err(error) = turns.store.end(turn_id).await
        {
            tracing::error!(turn.id = %turn_id, %error, "turn record not removed");
        }
    }

    /// The part of a turn after its place in the queue came: checks the
    /// session, opens its stream, runs the turn. True when the turn's
    /// ending was stored (which removed its record).
    #[allow(clippy::too_many_arguments)]
    async fn run_queued(
        &self,
        runtime: &dyn AgentRuntime,
        lane: &Arc<Lane>,
        session_id: &SessionId,
        turn_id: TurnId,
        content: String,
        known: Option<SessionInfo>,
        max_history_bytes: usize,
    ) -> (Result<ChatReply, ChatError>, bool) {
        // Checked when the turn's time comes, so turns queued before the
        // history filled up are refused too.
        let info = match known {
            Some(info) => info,
            None => match self.sessions.get_or_create(session_id, Utc::now()).await {
                Ok(info) => info,
                Err(error) => return (Err(error.into()), false),
            },
        };
        if info.history_bytes >= max_history_bytes {
            return (
                Err(ChatError::HistoryFull {
                    limit: max_history_bytes,
                }),
                false,
            );
        }
        // A session deleted before and used again is a new stream; a
        // stream that cannot be loaded cannot number the turn's events.
        if let Err(error) = self.events.open(session_id).await {
            return (Err(storage_unavailable(error)), false);
        }
        let (turn, input, request) = match self
            .start(runtime, lane, session_id, turn_id, content)
            .await
        {
            Ok(started) => started,
            Err(error) => {
                self.events.close(session_id);
                return (Err(error), false);
            }
        };
        // First on the stream, for the clients that show prompts sent from
        // another device (SPEC B13).
        turn.publish(
            &*self.events,
            SessionEvent::Prompt {
                content: input.prompt.clone(),
            },
        );
        let (outcome, partial) = self.await_outcome(&turn, input).await;
        self.finish(turn, request, outcome, partial).await
    }

    /// Ends one orphaned turn: history first, then its stored `error`, which
    /// removes its record in the same transaction (so a failure part way is
    /// retried whole, a turn whose ending is stored is never ended twice,
    /// and a history already holding the prompt is not appended to again).
    async fn interrupt(&self, record: &TurnRecord) -> Result<(), String> {
        if !record.running {
            // It never ran, and whoever sent it went with its instance.
            self.leave_queue(&record.turn_id).await;
            return Ok(());
        }
        let session = &record.session_id;
        self.events.open(session).await.map_err(|e| e.to_string())?;
        let mut published = false;
        let ended = self.end_interrupted(record, &mut published).await;
        if !published {
            self.events.close(session);
        }
        ended
    }

    /// [`Self::interrupt`] on a stream held open; `published` is set once
    /// the ending went to be published (which ends the hold, stored or not).
    async fn end_interrupted(
        &self,
        record: &TurnRecord,
        published: &mut bool,
    ) -> Result<(), String> {
        let session = &record.session_id;
        let text = self
            .events
            .turn_text(session, &record.turn_id)
            .await
            .map_err(|e| e.to_string())?;
        let model_name = match &self.runtime {
            RuntimeSlot::Ready(runtime) => Some(runtime.model_name()),
            RuntimeSlot::Unavailable(_) => None,
        };
        let mut messages = vec![ModelMessage::user_prompt(
            record.prompt.clone(),
            record.started_at,
        )];
        if let Some(parts) = text_parts(&text) {
            messages.push(ModelMessage::Response {
                parts,
                model_name,
                timestamp: Utc::now(),
            });
        }
        let history = match self.sessions.history(session).await {
            Ok(history) => Some(history),
            Err(SessionStoreError::NotFound) => None,
            Err(error) => return Err(error.to_string()),
        };
        let saved = history
            .as_ref()
            .is_some_and(|history| history.iter().rev().take(2).any(|m| m == &messages[0]));
        if history.is_some() && !saved {
            match self.sessions.append(session, messages, Utc::now()).await {
                Ok(()) | Err(SessionStoreError::NotFound) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        if history.is_some() {
            *published = true;
            self.events
                .publish_durable(
                    session,
                    Some(record.turn_id.clone()),
                    SessionEvent::Error {
                        code: Some(TURN_INTERRUPTED_CODE),
                        message: TURN_INTERRUPTED_MESSAGE.into(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
        } else if let Some(turns) = &self.turns {
            // Nothing to tell (the session is gone): the record goes alone.
            turns
                .store
                .end(&record.turn_id)
                .await
                .map_err(|e| e.to_string())?;
        }
        metrics::counter!("autopoiesis_turns_finished_total", "outcome" => "interrupted")
            .increment(1);
        Ok(())
    }

    /// Registers the turn as running, with what the runtime gets and the
    /// prompt message to save.
    async fn start<'a>(
        &'a self,
        runtime: &'a dyn AgentRuntime,
        lane: &'a Arc<Lane>,
        session_id: &'a SessionId,
        turn_id: TurnId,
        content: String,
    ) -> Result<(Turn<'a>, TurnInput, ModelMessage), ChatError> {
        // A session deleted while the turn waited has nothing to run on.
        let history = match self.sessions.history(session_id).await {
            Ok(history) => history,
            Err(SessionStoreError::NotFound) => {
                return Err(ChatError::SessionDeleted {
                    session_id: session_id.clone(),
                });
            }
            Err(error) => return Err(error.into()),
        };
        if let Some(turns) = self.turns.as_ref().filter(|turns| !turns.shared) {
            let now = Utc::now();
            let record = TurnRecord {
                turn_id: turn_id.clone(),
                session_id: session_id.clone(),
                owner: turns.owner.clone(),
                prompt: content.clone(),
                started_at: now,
                lease_until: now + chrono::Duration::from_std(turns.lease).unwrap_or_default(),
                running: true,
            };
            turns
                .store
                .begin(&record)
                .await
                .map_err(storage_unavailable)?;
        }
        let cancel = CancellationToken::new();
        lock(&self.running).insert(
            session_id.clone(),
            Running {
                turn_id: turn_id.clone(),
                cancel: cancel.clone(),
            },
        );
        let running = RunningGuard {
            running: &self.running,
            session_id,
            turn_id: turn_id.clone(),
        };
        let started = std::time::Instant::now();
        metrics::counter!("autopoiesis_turns_started_total").increment(1);
        tracing::debug!(session.id = %session_id, turn.id = %turn_id, "turn started");

        let request = ModelMessage::user_prompt(content.clone(), Utc::now());
        let input = TurnInput {
            prompt: content,
            history,
        };
        let turn = Turn {
            runtime,
            lane,
            session_id,
            id: turn_id,
            cancel,
            started,
            running: Some(running),
        };
        Ok((turn, input, request))
    }

    /// Runs the runtime until it answers, the turn is cancelled or times
    /// out, or the session is deleted; with the text streamed so far.
    async fn await_outcome(&self, turn: &Turn<'_>, input: TurnInput) -> (Outcome, String) {
        let sink = Arc::new(TurnSink {
            session_id: turn.session_id.clone(),
            turn_id: turn.id.clone(),
            events: Arc::clone(&self.events),
            lane: Arc::clone(turn.lane),
            partial: Mutex::default(),
        });
        let answer = turn.runtime.run_turn(input, sink.clone());
        let outcome = tokio::select! {
            // A stop asked for wins over an answer that is ready too.
            biased;
            () = turn.lane.ended.cancelled() => Outcome::Deleted,
            () = turn.cancel.cancelled() => Outcome::Cancelled,
            result = with_timeout(self.turn_timeout, answer) => result,
        };
        // Deleted while the answer came in: it has nowhere to go either.
        let outcome = if turn.lane.is_alive() {
            outcome
        } else {
            Outcome::Deleted
        };
        let partial = std::mem::take(&mut *lock(&sink.partial));
        (outcome, partial)
    }

    /// Ends the turn: saves what is kept, tells the clients, counts and
    /// logs it. The turn stops being the running one when this returns.
    async fn finish(
        &self,
        turn: Turn<'_>,
        request: ModelMessage,
        outcome: Outcome,
        partial: String,
    ) -> (Result<ChatReply, ChatError>, bool) {
        let (mut result, terminal) = self.settle(&turn, request, outcome, partial).await;
        let mut turn = turn;
        turn.running = None;
        // Storing the ending removes the turn's record with it.
        let mut ending_stored = false;
        let mut published = false;
        if let Some(event) = terminal
            && turn.lane.is_alive()
        {
            published = true;
            let stored = self
                .events
                .publish_durable(turn.session_id, Some(turn.id.clone()), event)
                .await;
            match stored {
                Ok(()) => ending_stored = true,
                Err(error) => {
                    tracing::error!(session.id = %turn.session_id, turn.id = %turn.id, %error, "turn's ending not stored");
                    if result.is_ok() {
                        result = Err(storage_unavailable(error));
                    }
                }
            }
        }
        if !published {
            self.events.close(turn.session_id);
        }
        if !ending_stored {
            self.leave_queue(&turn.id).await;
        }
        let outcome = result.as_ref().map_or_else(error_kind, |_| "done");
        metrics::counter!("autopoiesis_turns_finished_total", "outcome" => outcome).increment(1);
        metrics::histogram!("autopoiesis_turn_duration_seconds", "outcome" => outcome)
            .record(turn.started.elapsed().as_secs_f64());
        tracing::info!(
            session.id = %turn.session_id,
            turn.id = %turn.id,
            duration_ms = turn.started.elapsed().as_millis(),
            outcome,
            "turn finished"
        );
        (result, true)
    }

    /// What each outcome keeps and answers, and the terminal event its
    /// clients get (`None` when the session is gone: nobody to tell). Only
    /// events that do not end the turn are published here; the terminal one
    /// goes out once stored ([`Self::finish`]).
    async fn settle(
        &self,
        turn: &Turn<'_>,
        request: ModelMessage,
        outcome: Outcome,
        partial: String,
    ) -> (Result<ChatReply, ChatError>, Option<SessionEvent>) {
        let session = turn.session_id.clone();
        match outcome {
            Outcome::Finished(Ok(reply)) => self.answered(turn, request, reply).await,
            Outcome::Finished(Err(AgentError::DeferredApprovalLocked)) => {
                if let Err(error) = self.save_partial(turn, request, &partial).await {
                    return storage_failed(error);
                }
                (
                    Err(ChatError::ApprovalUnsupported {
                        session_id: session,
                        approval_id: None,
                    }),
                    Some(SessionEvent::approval_unsupported()),
                )
            }
            Outcome::Finished(Err(AgentError::Provider(text))) => {
                // The failed exchange is not kept: the next turn starts from
                // the last good state, as if this one had not been sent.
                // The runtime logged the whole text; clients get one line.
                let message = provider_message_for_clients(&text);
                let event = SessionEvent::Error {
                    code: None,
                    message: message.clone(),
                };
                (
                    Err(ChatError::Provider {
                        session_id: session,
                        message,
                    }),
                    Some(event),
                )
            }
            Outcome::Finished(Err(AgentError::InvalidRequest(message))) => {
                // Not kept either: the prompt could not be carried out.
                let event = SessionEvent::Error {
                    code: Some("invalid_request"),
                    message: message.clone(),
                };
                (
                    Err(ChatError::InvalidRequest {
                        session_id: session,
                        message,
                    }),
                    Some(event),
                )
            }
            Outcome::Cancelled => {
                if let Err(error) = self.save_partial(turn, request, &partial).await {
                    return storage_failed(error);
                }
                let event = SessionEvent::Cancelled {
                    partial: partial.clone(),
                };
                (
                    Err(ChatError::Cancelled {
                        session_id: session,
                        partial,
                    }),
                    Some(event),
                )
            }
            Outcome::TimedOut(after) => {
                if let Err(error) = self.save_partial(turn, request, &partial).await {
                    return storage_failed(error);
                }
                let error = ChatError::TimedOut {
                    session_id: session,
                    after,
                };
                let event = SessionEvent::Error {
                    code: Some("turn_timeout"),
                    message: error.to_string(),
                };
                (Err(error), Some(event))
            }
            // The session is gone with its clients and history: there is no
            // one to tell and nowhere to save.
            Outcome::Deleted => (
                Err(ChatError::SessionDeleted {
                    session_id: session,
                }),
                None,
            ),
        }
    }

    /// Saves the prompt with what was streamed of the answer.
    async fn save_partial(
        &self,
        turn: &Turn<'_>,
        request: ModelMessage,
        partial: &str,
    ) -> Result<(), SessionStoreError> {
        // Partial answers carry the name full ones would have.
        let model_name = Some(turn.runtime.model_name());
        self.save(
            turn.lane,
            turn.session_id,
            request,
            text_parts(partial),
            model_name,
        )
        .await
    }

    /// A complete answer: saved, then `done`, or, when it asks for tools,
    /// deferred to a human (the server executes no tool itself: that is the
    /// deferred-approval policy).
    async fn answered(
        &self,
        turn: &Turn<'_>,
        request: ModelMessage,
        reply: AgentReply,
    ) -> (Result<ChatReply, ChatError>, Option<SessionEvent>) {
        let session = turn.session_id.clone();
        let requests = tool_requests(&reply);
        let text = reply_text(&reply);
        if let Err(error) = self
            .save(
                turn.lane,
                turn.session_id,
                request,
                Some(reply.parts),
                Some(reply.model_name),
            )
            .await
        {
            return storage_failed(error);
        }
        if requests.is_empty() {
            let event = SessionEvent::Done {
                content: text.clone(),
            };
            return (
                Ok(ChatReply {
                    session_id: session,
                    content: text,
                }),
                Some(event),
            );
        }
        for request in &requests {
            turn.publish(
                &*self.events,
                SessionEvent::ToolResult {
                    tool_call_id: request.tool_call_id.clone(),
                    status: "deferred".into(),
                    details: json!({"reason": "needs a human's approval"}),
                },
            );
        }
        match self.record(turn.session_id, &turn.id, requests).await {
            Ok(approval_id) => {
                let event = approval_id
                    .clone()
                    .map_or_else(SessionEvent::approval_unsupported, |approval_id| {
                        SessionEvent::ApprovalRecorded { approval_id }
                    });
                (
                    Err(ChatError::ApprovalUnsupported {
                        session_id: session,
                        approval_id,
                    }),
                    Some(event),
                )
            }
            Err(()) => {
                let error = ChatError::ApprovalStorage {
                    session_id: session,
                };
                let event = SessionEvent::Error {
                    code: Some("approval_storage_unavailable"),
                    message: error.to_string(),
                };
                (Err(error), Some(event))
            }
        }
    }

    /// Records a deferred turn's tool calls for approval when approvals are
    /// unlocked: the pending approval's id, `None` when nothing was due
    /// (no approval store, or locked), `Err` when recording was due and
    /// failed.
    async fn record(
        &self,
        session_id: &SessionId,
        turn_id: &TurnId,
        requests: Vec<ToolCallRequest>,
    ) -> Result<Option<String>, ()> {
        let Some(approvals) = self.approvals.get() else {
            return Ok(None);
        };
        let scope = ApprovalScope {
            session_id: session_id.clone(),
            agent: approvals.agent.clone(),
            turn_id: turn_id.clone(),
        };
        match approvals
            .service
            .record_deferred(&scope, requests, Utc::now())
            .await
        {
            Ok(envelope) => Ok(Some(envelope.envelope_id)),
            // Locked: nothing is recorded, as with DeferredApprovalLocked.
            Err(RecordError::Locked) => Ok(None),
            // Over a cap: the turn answers as if locked, nothing is recorded,
            // and the operator reads why here.
            Err(refused @ (RecordError::TooLarge { .. } | RecordError::TooManyPending { .. })) => {
                tracing::warn!(session.id = %session_id, reason = %refused, "approval request refused");
                Ok(None)
            }
            Err(RecordError::Unavailable(why)) => {
                tracing::error!(session.id = %session_id, error = %why, "approval request not recorded");
                Err(())
            }
        }
    }

    /// Appends the turn's request and, when there is one, its response,
    /// unless the session was deleted meanwhile. (A delete racing past the
    /// check finds the store's session gone: appending to a missing session
    /// fails, it never creates one.)
    ///
    /// # Errors
    /// The store failed: nothing of the turn is kept.
    async fn save(
        &self,
        lane: &Lane,
        session_id: &SessionId,
        request: ModelMessage,
        response: Option<Vec<ResponsePart>>,
        model_name: Option<String>,
    ) -> Result<(), SessionStoreError> {
        if !lane.is_alive() {
            return Ok(());
        }
        let mut messages = vec![request];
        if let Some(parts) = response {
            messages.push(ModelMessage::Response {
                parts,
                model_name,
                timestamp: Utc::now(),
            });
        }
        match self.sessions.append(session_id, messages, Utc::now()).await {
            // Deleted meanwhile: there is nowhere to keep it, as intended.
            Ok(()) | Err(SessionStoreError::NotFound) => Ok(()),
            Err(error) => {
                tracing::error!(session.id = %session_id, %error, "turn history not saved");
                Err(error)
            }
        }
    }
}

/// A storage port other than the session store failed (the stream, the
/// turn records): for the client, session storage is unavailable.
fn storage_unavailable(error: impl std::fmt::Display) -> ChatError {
    ChatError::Storage(SessionStoreError::Unavailable(error.to_string()))
}

/// A turn whose history could not be stored: it answers 503 and its clients
/// read why, never a `done` a restart would take back.
fn storage_failed(
    error: SessionStoreError,
) -> (Result<ChatReply, ChatError>, Option<SessionEvent>) {
    (
        Err(ChatError::Storage(error)),
        Some(SessionEvent::Error {
            code: Some("storage_unavailable"),
            message: "Session storage is unavailable; this turn was not saved".into(),
        }),
    )
}

/// A turn's place in its session's queue, held by its task: dropping it
/// (however the task ends) lets the next turn run and, for the last turn,
/// removes the session's queue.
struct Place {
    core: Arc<Core>,
    session_id: SessionId,
    lane: Arc<Lane>,
    /// Dropped when the next turn of the lane may go on: once this one
    /// finished, or (several instances) once it took its stored place.
    done: Option<oneshot::Sender<()>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.lane.turn_left.notify_waiters();
        let mut lanes = lock(&self.core.lanes);
        let mut queue = lock(&self.lane.queue);
        queue.turns -= 1;
        if queue.turns == 0
            && lanes
                .get(&self.session_id)
                .is_some_and(|lane| Arc::ptr_eq(lane, &self.lane))
        {
            lanes.remove(&self.session_id);
        }
    }
}

/// Refuses a prompt no turn should run for, before anything else happens,
/// so the sender hears at once.
///
/// # Errors
/// [`ChatError::EmptyMessage`] for an empty or blank prompt.
pub fn check_prompt(content: &str) -> Result<(), ChatError> {
    if content.trim().is_empty() {
        Err(ChatError::EmptyMessage)
    } else {
        Ok(())
    }
}

fn error_kind(error: &ChatError) -> &'static str {
    match error {
        ChatError::EmptyMessage => "empty",
        ChatError::RuntimeUnavailable(_) => "unavailable",
        ChatError::ApprovalUnsupported { .. } => "deferred",
        ChatError::Provider { .. } => "provider_error",
        ChatError::InvalidRequest { .. } => "invalid_request",
        ChatError::Cancelled { .. } => "cancelled",
        ChatError::TimedOut { .. } => "timed_out",
        ChatError::Storage(_) => "storage_error",
        ChatError::ShuttingDown => "shutting_down",
        ChatError::HistoryFull { .. } => "history_full",
        ChatError::ApprovalStorage { .. } => "approval_storage_error",
        ChatError::TooManyQueued { .. } => "queue_full",
        ChatError::SessionDeleted { .. } => "session_deleted",
    }
}

async fn with_timeout<F>(timeout: Option<Duration>, turn: F) -> Outcome
where
    F: Future<Output = Result<AgentReply, AgentError>>,
{
    match timeout {
        Some(after) => tokio::time::timeout(after, turn)
            .await
            .map_or(Outcome::TimedOut(after), Outcome::Finished),
        None => Outcome::Finished(turn.await),
    }
}

fn tool_requests(reply: &AgentReply) -> Vec<ToolCallRequest> {
    reply
        .parts
        .iter()
        .filter_map(|part| match part {
            ResponsePart::ToolCall {
                tool_name,
                args,
                tool_call_id,
            } => Some(ToolCallRequest {
                tool_call_id: tool_call_id.clone(),
                tool_name: tool_name.clone(),
                args: args.clone(),
            }),
            _ => None,
        })
        .collect()
}

fn reply_text(reply: &AgentReply) -> String {
    reply
        .parts
        .iter()
        .filter_map(|part| match part {
            ResponsePart::Text { content } => Some(content.as_str()),
            _ => None,
        })
        .collect()
}

fn text_parts(partial: &str) -> Option<Vec<ResponsePart>> {
    (!partial.is_empty()).then(|| {
        vec![ResponsePart::Text {
            content: partial.to_owned(),
        }]
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps guarded here stay consistent whatever panicked while holding
    // them, so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A started turn, from [`Core::start`] to the end of [`Core::finish`].
struct Turn<'a> {
    runtime: &'a dyn AgentRuntime,
    /// Its session's lane: publishing and saving check it is still alive.
    lane: &'a Arc<Lane>,
    session_id: &'a SessionId,
    id: TurnId,
    /// Fired by [`ChatService::cancel`] and at the end of a shutdown's grace.
    cancel: CancellationToken,
    started: std::time::Instant,
    /// Keeps the turn the session's running one until it ends: dropped
    /// before its terminal event goes out (a client that sees the ending
    /// and cancels hears that nothing runs), or with the turn.
    running: Option<RunningGuard<'a>>,
}

impl Turn<'_> {
    /// Publishes one of this turn's events, unless its session was deleted.
    fn publish(&self, events: &dyn SessionEvents, event: SessionEvent) {
        self.lane.publish(events, self.session_id, &self.id, event);
    }
}

/// Removes the running-turn entry however the turn ends (even if dropped),
/// unless a newer turn of a re-created session took its place.
struct RunningGuard<'a> {
    running: &'a Mutex<HashMap<SessionId, Running>>,
    session_id: &'a SessionId,
    turn_id: TurnId,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut running = lock(self.running);
        if running
            .get(self.session_id)
            .is_some_and(|r| r.turn_id == self.turn_id)
        {
            running.remove(self.session_id);
        }
    }
}

/// Forwards the runtime's events to the session's clients (while the
/// session exists) and keeps the streamed text, so a cancelled turn can
/// save what was said.
struct TurnSink {
    session_id: SessionId,
    turn_id: TurnId,
    events: Arc<dyn SessionEvents>,
    lane: Arc<Lane>,
    partial: Mutex<String>,
}

impl EventSink for TurnSink {
    fn emit(&self, event: AgentEvent) {
        let event = match event {
            AgentEvent::Token(content) => {
                lock(&self.partial).push_str(&content);
                SessionEvent::Token { content }
            }
            AgentEvent::ThinkingStart => SessionEvent::ThinkingStart,
            AgentEvent::Thinking(content) => SessionEvent::Thinking { content },
            AgentEvent::ThinkingDone => SessionEvent::ThinkingDone,
            AgentEvent::ToolCall {
                tool_call_id,
                name,
                args,
            } => SessionEvent::ToolCall {
                tool_call_id,
                name,
                details: args,
            },
        };
        self.lane
            .publish(self.events.as_ref(), &self.session_id, &self.turn_id, event);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mockall::predicate::eq;
    use serde_json::json;

    use super::*;
    use crate::domain::message::RequestPart;
    use crate::domain::session::SessionInfo;
    use crate::ports::agent_runtime::MockAgentRuntime;
    use crate::ports::session_events::MockSessionEvents;
    use crate::ports::session_store::MockSessionStore;

    fn sid() -> SessionId {
        SessionId::parse("s1").unwrap()
    }

    fn info() -> SessionInfo {
        SessionInfo {
            id: sid(),
            created_at: Utc::now(),
            message_count: 0,
            history_bytes: 0,
            last_seq: 0,
        }
    }

    /// A store that has the session, with an empty history, and records
    /// what is appended.
    fn store(appended: Arc<Mutex<Vec<ModelMessage>>>) -> MockSessionStore {
        let mut store = MockSessionStore::new();
        store.expect_get_or_create().returning(|_, _| Ok(info()));
        store.expect_history().returning(|_| Ok(Arc::default()));
        store.expect_append().returning(move |_, messages, _| {
            appended.lock().unwrap().extend(messages);
            Ok(())
        });
        store
    }

    /// Events published, as (op-ish name, event).
    fn recorder(published: Arc<Mutex<Vec<SessionEvent>>>) -> MockSessionEvents {
        let mut events = MockSessionEvents::new();
        let durable = Arc::clone(&published);
        events.expect_publish().returning(move |_, _, event| {
            published.lock().unwrap().push(event);
        });
        events
            .expect_publish_durable()
            .returning(move |_, _, event| {
                durable.lock().unwrap().push(event);
                Ok(())
            });
        events.expect_open().returning(|_| Ok(()));
        events.expect_close().return_const(());
        events
    }

    fn reply(parts: Vec<ResponsePart>) -> AgentReply {
        AgentReply {
            model_name: "mock".into(),
            parts,
        }
    }

    /// What a deferred turn on `s1` fails with when no approval was recorded
    /// for it (the fixture's service has no approval store).
    fn unsupported_without_approval() -> ChatError {
        ChatError::ApprovalUnsupported {
            session_id: sid(),
            approval_id: None,
        }
    }

    /// A runtime whose every turn ends as `answer` says.
    fn answering(
        answer: impl FnMut(TurnInput, Arc<dyn EventSink>) -> Result<AgentReply, AgentError>
        + Send
        + 'static,
    ) -> MockAgentRuntime {
        let mut runtime = MockAgentRuntime::new();
        runtime.expect_run_turn().returning(answer);
        runtime
    }

    struct Fixture {
        appended: Arc<Mutex<Vec<ModelMessage>>>,
        published: Arc<Mutex<Vec<SessionEvent>>>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                appended: Arc::default(),
                published: Arc::default(),
            }
        }

        fn service(&self, runtime: MockAgentRuntime) -> ChatService {
            ChatService::new(
                RuntimeSlot::Ready(Arc::new(runtime)),
                Arc::new(store(self.appended.clone())),
                Arc::new(recorder(self.published.clone())),
                None,
            )
        }

        /// One turn on session `s1` with `runtime`, recorded by this fixture.
        async fn send(
            &self,
            runtime: MockAgentRuntime,
            prompt: &str,
        ) -> Result<ChatReply, ChatError> {
            self.service(runtime).send(Some(sid()), prompt.into()).await
        }

        fn published(&self) -> Vec<SessionEvent> {
            self.published.lock().unwrap().clone()
        }

        fn appended(&self) -> Vec<ModelMessage> {
            self.appended.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn a_text_turn_streams_tokens_saves_both_messages_and_ends_with_done() {
        let fx = Fixture::new();
        let mut runtime = MockAgentRuntime::new();
        runtime
            .expect_run_turn()
            .withf(|input, _| input.prompt == "hi" && input.history.is_empty())
            .returning(|_, sink| {
                sink.emit(AgentEvent::Token("hel".into()));
                sink.emit(AgentEvent::Token("lo".into()));
                Ok(reply(vec![ResponsePart::Text {
                    content: "hello".into(),
                }]))
            });
        let reply = fx.send(runtime, "hi").await.unwrap();
        assert_eq!(reply.content, "hello");
        assert_eq!(
            fx.published(),
            vec![
                SessionEvent::Prompt {
                    content: "hi".into()
                },
                SessionEvent::Token {
                    content: "hel".into()
                },
                SessionEvent::Token {
                    content: "lo".into()
                },
                SessionEvent::Done {
                    content: "hello".into()
                },
            ]
        );
        let saved = fx.appended();
        assert_eq!(saved.len(), 2);
        assert!(
            matches!(&saved[0], ModelMessage::Request { parts } if matches!(&parts[0], RequestPart::UserPrompt { content, .. } if content == "hi"))
        );
        assert!(
            matches!(&saved[1], ModelMessage::Response { model_name: Some(m), .. } if m == "mock")
        );
    }

    #[tokio::test]
    async fn a_deferred_turn_is_approval_unsupported_and_its_history_is_saved() {
        let fx = Fixture::new();
        let runtime = answering(|_, _| {
            Ok(reply(vec![ResponsePart::ToolCall {
                tool_name: "execute".into(),
                args: json!({"command": "ls"}),
                tool_call_id: "c1".into(),
            }]))
        });
        let err = fx.send(runtime, "do it").await.unwrap_err();
        assert_eq!(err, unsupported_without_approval());
        let published = fx.published();
        assert_eq!(
            published[0],
            SessionEvent::Prompt {
                content: "do it".into()
            }
        );
        assert!(
            matches!(&published[1], SessionEvent::ToolResult { tool_call_id, status, .. } if tool_call_id == "c1" && status == "deferred")
        );
        assert_eq!(published[2], SessionEvent::approval_unsupported());
        assert_eq!(published.len(), 3, "exactly one terminal event");
        let saved = fx.appended();
        assert_eq!(saved.len(), 2);
        assert!(
            matches!(&saved[1], ModelMessage::Response { parts, .. } if matches!(parts[0], ResponsePart::ToolCall { .. }))
        );
    }

    #[tokio::test]
    async fn a_locked_turn_is_approval_unsupported_too_and_keeps_the_prompt() {
        let fx = Fixture::new();
        let mut runtime = answering(|_, _| Err(AgentError::DeferredApprovalLocked));
        runtime.expect_model_name().return_const("mock".to_owned());
        let err = fx.send(runtime, "do it").await.unwrap_err();
        assert_eq!(err, unsupported_without_approval());
        assert_eq!(
            fx.published(),
            vec![
                SessionEvent::Prompt {
                    content: "do it".into()
                },
                SessionEvent::approval_unsupported()
            ]
        );
        assert_eq!(fx.appended().len(), 1, "the prompt is kept");
    }

    #[tokio::test]
    async fn a_provider_failure_is_published_and_nothing_is_saved() {
        let fx = Fixture::new();
        let runtime = answering(|_, _| Err(AgentError::Provider("model down".into())));
        let err = fx.send(runtime, "hi").await.unwrap_err();
        assert_eq!(
            err,
            ChatError::Provider {
                session_id: sid(),
                message: "model down".into()
            }
        );
        assert_eq!(
            fx.published(),
            vec![
                SessionEvent::Prompt {
                    content: "hi".into()
                },
                SessionEvent::Error {
                    code: None,
                    message: "model down".into()
                }
            ]
        );
        assert!(fx.appended().is_empty());
    }

    #[tokio::test]
    async fn a_missing_runtime_refuses_before_touching_the_session() {
        let mut store = MockSessionStore::new();
        store.expect_get_or_create().never();
        let mut events = MockSessionEvents::new();
        events.expect_publish().never();
        let chat = ChatService::new(
            RuntimeSlot::Unavailable("no provider settings".into()),
            Arc::new(store),
            Arc::new(events),
            None,
        );
        assert_eq!(
            chat.send(Some(sid()), "hi".into()).await,
            Err(ChatError::RuntimeUnavailable("no provider settings".into()))
        );
        assert_eq!(chat.unavailable_reason(), Some("no provider settings"));
    }

    #[tokio::test]
    async fn an_empty_prompt_is_refused_before_anything_else() {
        let fx = Fixture::new();
        let mut runtime = MockAgentRuntime::new();
        runtime.expect_run_turn().never();
        let chat = fx.service(runtime);
        assert_eq!(
            chat.send(None, "  ".into()).await,
            Err(ChatError::EmptyMessage)
        );
        assert!(fx.published().is_empty());
    }

    #[tokio::test]
    async fn the_history_before_the_turn_is_given_to_the_runtime() {
        let earlier = vec![ModelMessage::user_prompt("before", Utc::now())];
        let mut store = MockSessionStore::new();
        store.expect_get_or_create().returning(|_, _| Ok(info()));
        let history = earlier.clone();
        store
            .expect_history()
            .with(eq(sid()))
            .returning(move |_| Ok(Arc::new(history.clone())));
        store.expect_append().returning(|_, _, _| Ok(()));
        let mut runtime = MockAgentRuntime::new();
        runtime
            .expect_run_turn()
            .withf(move |input, _| *input.history == earlier)
            .returning(|_, _| Ok(reply(vec![])));
        let mut events = MockSessionEvents::new();
        events.expect_publish().return_const(());
        events.expect_publish_durable().returning(|_, _, _| Ok(()));
        events.expect_open().returning(|_| Ok(()));
        events.expect_close().return_const(());
        let chat = ChatService::new(
            RuntimeSlot::Ready(Arc::new(runtime)),
            Arc::new(store),
            Arc::new(events),
            None,
        );
        chat.send(Some(sid()), "now".into()).await.unwrap();
    }

    /// A runtime that counts turns running at once on its own.
    struct Overlap {
        running: AtomicUsize,
        most: AtomicUsize,
        order: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl AgentRuntime for Overlap {
        async fn run_turn(
            &self,
            input: TurnInput,
            _sink: Arc<dyn EventSink>,
        ) -> Result<AgentReply, AgentError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            self.order.lock().unwrap().push(input.prompt);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(reply(vec![]))
        }

        fn model_name(&self) -> String {
            "overlap".into()
        }
    }

    #[tokio::test]
    async fn turns_on_one_session_never_overlap_and_keep_their_order() {
        let runtime = Arc::new(Overlap {
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            order: Mutex::default(),
        });
        let fx = Fixture::new();
        let chat = Arc::new(ChatService::new(
            RuntimeSlot::Ready(runtime.clone()),
            Arc::new(store(fx.appended.clone())),
            Arc::new(recorder(fx.published.clone())),
            None,
        ));
        let mut turns = Vec::new();
        for n in 0..5 {
            let chat = chat.clone();
            turns.push(tokio::spawn(async move {
                chat.send(Some(sid()), format!("turn {n}")).await
            }));
            // Each turn is queued before the next one is sent.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for turn in turns {
            turn.await.unwrap().unwrap();
        }
        assert_eq!(runtime.most.load(Ordering::SeqCst), 1);
        assert_eq!(
            *runtime.order.lock().unwrap(),
            (0..5).map(|n| format!("turn {n}")).collect::<Vec<_>>()
        );
        assert!(
            chat.busy_sessions().is_empty(),
            "the session's gate is released"
        );
    }

    /// A runtime that streams `hello` then waits until released.
    struct Stalled {
        release: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl AgentRuntime for Stalled {
        async fn run_turn(
            &self,
            input: TurnInput,
            sink: Arc<dyn EventSink>,
        ) -> Result<AgentReply, AgentError> {
            sink.emit(AgentEvent::Token("hello".into()));
            self.release.notified().await;
            sink.emit(AgentEvent::Token(" again".into()));
            Ok(reply(vec![ResponsePart::Text {
                content: format!("hello again ({})", input.prompt),
            }]))
        }

        fn model_name(&self) -> String {
            "stalled".into()
        }
    }

    fn stalled_service(fx: &Fixture) -> (Arc<ChatService>, Arc<Stalled>) {
        let runtime = Arc::new(Stalled {
            release: tokio::sync::Notify::new(),
        });
        let chat = Arc::new(ChatService::new(
            RuntimeSlot::Ready(runtime.clone()),
            Arc::new(store(fx.appended.clone())),
            Arc::new(recorder(fx.published.clone())),
            None,
        ));
        (chat, runtime)
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn a_turn_whose_caller_goes_away_still_ends_saves_and_frees_its_session() {
        let fx = Fixture::new();
        let (chat, runtime) = stalled_service(&fx);
        let send = chat.send(Some(sid()), "hi".into());
        // The caller waits a moment, then drops its future (a disconnect).
        assert!(
            tokio::time::timeout(Duration::from_millis(20), send)
                .await
                .is_err()
        );
        runtime.release.notify_one();
        until("the turn ends", || chat.busy_sessions().is_empty()).await;
        assert!(matches!(
            fx.published().last(),
            Some(SessionEvent::Done { content }) if content == "hello again (hi)"
        ));
        assert_eq!(fx.appended().len(), 2, "prompt and answer are saved");
    }

    #[tokio::test]
    async fn ending_a_session_stops_its_turns_and_nothing_of_them_is_published_or_saved() {
        let fx = Fixture::new();
        let (chat, runtime) = stalled_service(&fx);
        let running = chat.submit(&sid(), "first".into()).unwrap();
        let queued = chat.submit(&sid(), "second".into()).unwrap();
        until("the first token", || fx.published().len() >= 2).await;
        chat.end_session(&sid());
        runtime.release.notify_waiters();
        assert_eq!(
            running.outcome().await,
            Err(ChatError::SessionDeleted { session_id: sid() })
        );
        assert_eq!(
            queued.outcome().await,
            Err(ChatError::SessionDeleted { session_id: sid() })
        );
        assert_eq!(
            fx.published(),
            vec![
                SessionEvent::Prompt {
                    content: "first".into()
                },
                SessionEvent::Token {
                    content: "hello".into()
                }
            ],
            "nothing after the delete"
        );
        assert!(fx.appended().is_empty());
        assert!(chat.busy_sessions().is_empty());
    }

    #[tokio::test]
    async fn a_session_queues_at_most_the_cap_behind_its_running_turn() {
        let fx = Fixture::new();
        let runtime = Arc::new(Stalled {
            release: tokio::sync::Notify::new(),
        });
        let chat = ChatService::new(
            RuntimeSlot::Ready(runtime.clone()),
            Arc::new(store(fx.appended.clone())),
            Arc::new(recorder(fx.published.clone())),
            None,
        )
        .with_max_queued_turns(2);
        let turns: Vec<_> = (0..3)
            .map(|n| chat.submit(&sid(), format!("t{n}")).unwrap())
            .collect();
        assert_eq!(chat.queued_turns(&sid()), 3);
        assert_eq!(
            chat.submit(&sid(), "one too many".into()).err(),
            Some(ChatError::TooManyQueued { max: 2 })
        );
        let other = SessionId::parse("s2").unwrap();
        assert!(
            chat.submit(&other, "elsewhere".into()).is_ok(),
            "the cap is per session"
        );
        for turn in turns {
            let mut outcome = std::pin::pin!(turn.outcome());
            loop {
                runtime.release.notify_waiters();
                if let Ok(result) =
                    tokio::time::timeout(Duration::from_millis(5), &mut outcome).await
                {
                    result.unwrap();
                    break;
                }
            }
        }
        assert_eq!(chat.queued_turns(&sid()), 0);
    }

    fn cancel_service(history: Result<(), SessionStoreError>) -> ChatService {
        let mut store = MockSessionStore::new();
        store
            .expect_history()
            .returning(move |_| history.clone().map(|()| Arc::default()));
        ChatService::new(
            RuntimeSlot::Ready(Arc::new(MockAgentRuntime::new())),
            Arc::new(store),
            Arc::new(MockSessionEvents::new()),
            None,
        )
    }

    #[tokio::test]
    async fn cancel_on_an_unknown_session_is_session_not_found() {
        let chat = cancel_service(Err(SessionStoreError::NotFound));
        assert_eq!(chat.cancel(&sid()).await, Err(CancelError::SessionNotFound));
    }

    #[tokio::test]
    async fn cancel_while_the_session_store_is_down_is_a_storage_error_not_session_not_found() {
        let chat = cancel_service(Err(SessionStoreError::Unavailable("disk gone".into())));
        assert!(
            matches!(chat.cancel(&sid()).await, Err(CancelError::Storage(_))),
            "a storage outage is not a missing session"
        );
    }

    fn records(store: crate::ports::turn_store::MockTurnStore) -> TurnRecords {
        TurnRecords {
            store: Arc::new(store),
            owner: "me".into(),
            lease: Duration::from_secs(10),
            shared: false,
        }
    }

    #[tokio::test]
    async fn a_turn_is_recorded_before_it_runs_and_its_stored_ending_removes_the_record() {
        let fx = Fixture::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        let begun = Arc::clone(&order);
        turns.expect_begin().times(1).returning(move |record| {
            assert_eq!(
                (record.owner.as_str(), record.prompt.as_str()),
                ("me", "hi")
            );
            begun.lock().unwrap().push("begin");
            Ok(())
        });
        // Storing the `done` removed the record in the same transaction.
        turns.expect_end().never();
        let ran = Arc::clone(&order);
        let runtime = answering(move |_, _| {
            ran.lock().unwrap().push("run");
            Ok(reply(vec![ResponsePart::Text {
                content: "hello".into(),
            }]))
        });
        let chat = fx.service(runtime).with_turn_records(records(turns));
        assert!(chat.send(Some(sid()), "hi".into()).await.is_ok());
        assert_eq!(*order.lock().unwrap(), ["begin", "run"]);
        assert!(fx.published().last().is_some_and(SessionEvent::is_terminal));
    }

    fn shared_records(store: crate::ports::turn_store::MockTurnStore) -> TurnRecords {
        TurnRecords {
            shared: true,
            ..records(store)
        }
    }

    #[tokio::test]
    async fn with_shared_records_a_turn_behind_another_instances_runs_only_once_claimed() {
        let fx = Fixture::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        let queued = Arc::clone(&order);
        turns
            .expect_enqueue()
            .times(1)
            .returning(move |record, max| {
                assert!(!record.running && record.prompt == "hi", "{record:?}");
                assert_eq!(max, DEFAULT_MAX_QUEUED_TURNS);
                queued.lock().unwrap().push("enqueue");
                Ok(Enqueued::Waiting)
            });
        // Another instance's turn is before it twice, then gone.
        let claims = Arc::new(Mutex::new(0));
        let claimed = Arc::clone(&order);
        turns.expect_claim().returning(move |_| {
            let mut n = claims.lock().unwrap();
            *n += 1;
            claimed.lock().unwrap().push("claim");
            Ok(if *n < 3 {
                Claim::Waiting
            } else {
                Claim::Running
            })
        });
        // Already on record: no second record, and the stored `done` removes it.
        turns.expect_begin().never();
        turns.expect_end().never();
        let ran = Arc::clone(&order);
        let runtime = answering(move |_, _| {
            ran.lock().unwrap().push("run");
            Ok(reply(vec![ResponsePart::Text {
                content: "hello".into(),
            }]))
        });
        let chat = fx.service(runtime).with_turn_records(shared_records(turns));
        assert!(chat.send(Some(sid()), "hi".into()).await.is_ok());
        assert_eq!(
            *order.lock().unwrap(),
            ["enqueue", "claim", "claim", "claim", "run"]
        );
    }

    #[tokio::test]
    async fn with_shared_records_a_session_queue_full_across_instances_refuses_the_turn() {
        let fx = Fixture::new();
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        turns.expect_enqueue().returning(|_, _| Ok(Enqueued::Full));
        turns.expect_claim().never();
        let mut runtime = MockAgentRuntime::new();
        runtime.expect_run_turn().never();
        let chat = fx.service(runtime).with_turn_records(shared_records(turns));
        assert!(matches!(
            chat.send(Some(sid()), "hi".into()).await,
            Err(ChatError::TooManyQueued { .. })
        ));
        assert!(fx.published().is_empty());
    }

    #[tokio::test]
    async fn with_shared_records_a_cancel_for_a_turn_running_elsewhere_is_passed_on() {
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        turns
            .expect_request_cancel()
            .times(1)
            .returning(|_| Ok(Some(TurnId::from("t-elsewhere"))));
        let chat = Fixture::new()
            .service(MockAgentRuntime::new())
            .with_turn_records(shared_records(turns));
        assert_eq!(chat.cancel(&sid()).await, Ok(TurnId::from("t-elsewhere")));
    }

    #[tokio::test]
    async fn a_turn_whose_record_cannot_be_stored_does_not_run_and_answers_storage() {
        let fx = Fixture::new();
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        turns
            .expect_begin()
            .returning(|_| Err(crate::ports::TurnStoreError("disk full".into())));
        turns.expect_end().never();
        let mut runtime = MockAgentRuntime::new();
        runtime.expect_run_turn().never();
        let chat = fx.service(runtime).with_turn_records(records(turns));
        assert!(matches!(
            chat.send(Some(sid()), "hi".into()).await,
            Err(ChatError::Storage(SessionStoreError::Unavailable(_)))
        ));
        assert!(fx.published().is_empty());
        assert!(fx.appended().is_empty());
    }

    #[tokio::test]
    async fn an_answer_whose_ending_cannot_be_stored_is_a_storage_error_not_a_reply() {
        let appended = Arc::new(Mutex::new(Vec::new()));
        let mut events = MockSessionEvents::new();
        events.expect_open().returning(|_| Ok(()));
        events.expect_close().return_const(());
        events.expect_publish().return_const(());
        events
            .expect_publish_durable()
            .returning(|_, _, _| Err(crate::ports::EventStoreError("disk full".into())));
        let runtime = answering(|_, _| {
            Ok(reply(vec![ResponsePart::Text {
                content: "hello".into(),
            }]))
        });
        let chat = ChatService::new(
            RuntimeSlot::Ready(Arc::new(runtime)),
            Arc::new(store(appended)),
            Arc::new(events),
            None,
        );
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        turns.expect_begin().returning(|_| Ok(()));
        // The ending was not stored, so the record did not go with it.
        turns.expect_end().times(1).returning(|_| Ok(()));
        let chat = chat.with_turn_records(records(turns));
        assert!(matches!(
            chat.send(Some(sid()), "hi".into()).await,
            Err(ChatError::Storage(_))
        ));
    }

    #[tokio::test]
    async fn a_history_that_cannot_be_stored_ends_the_turn_with_storage_unavailable() {
        let published = Arc::new(Mutex::new(Vec::new()));
        let mut store = MockSessionStore::new();
        store.expect_get_or_create().returning(|_, _| Ok(info()));
        store.expect_history().returning(|_| Ok(Arc::default()));
        store
            .expect_append()
            .returning(|_, _, _| Err(SessionStoreError::Unavailable("disk full".into())));
        let runtime = answering(|_, _| {
            Ok(reply(vec![ResponsePart::Text {
                content: "hello".into(),
            }]))
        });
        let chat = ChatService::new(
            RuntimeSlot::Ready(Arc::new(runtime)),
            Arc::new(store),
            Arc::new(recorder(published.clone())),
            None,
        );
        assert!(matches!(
            chat.send(Some(sid()), "hi".into()).await,
            Err(ChatError::Storage(_))
        ));
        let last = published.lock().unwrap().last().cloned();
        assert!(
            matches!(
                last,
                Some(SessionEvent::Error {
                    code: Some("storage_unavailable"),
                    ..
                })
            ),
            "{last:?}"
        );
    }

    fn orphan() -> TurnRecord {
        TurnRecord {
            turn_id: TurnId::from("t-dead"),
            session_id: sid(),
            owner: "earlier".into(),
            prompt: "unfinished".into(),
            started_at: Utc::now(),
            lease_until: Utc::now(),
            running: true,
        }
    }

    #[tokio::test]
    async fn recovery_ends_an_orphaned_turn_with_its_prompt_and_stored_text_in_the_history() {
        let fx = Fixture::new();
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        turns
            .expect_claim_orphans()
            .withf(|owner, now, _| owner == "me" && now.is_none())
            .returning(|_, _, _| Ok(vec![orphan()]));
        // The stored `turn_interrupted` removes the record with it.
        turns.expect_end().never();
        let published = Arc::clone(&fx.published);
        let mut events = recorder(published);
        events
            .expect_turn_text()
            .returning(|_, _| Ok("half an ans".into()));
        let mut runtime = MockAgentRuntime::new();
        runtime.expect_model_name().return_const("mock".to_owned());
        let chat = ChatService::new(
            RuntimeSlot::Ready(Arc::new(runtime)),
            Arc::new(store(fx.appended.clone())),
            Arc::new(events),
            None,
        )
        .with_turn_records(records(turns));
        assert_eq!(chat.recover(true).await, 1);
        let appended = fx.appended();
        assert!(matches!(&appended[0], ModelMessage::Request { parts }
            if matches!(&parts[0], RequestPart::UserPrompt { content, .. } if content == "unfinished")));
        assert!(matches!(&appended[1], ModelMessage::Response { parts, .. }
            if parts == &[ResponsePart::Text { content: "half an ans".into() }]));
        assert_eq!(
            fx.published(),
            [SessionEvent::Error {
                code: Some(TURN_INTERRUPTED_CODE),
                message: TURN_INTERRUPTED_MESSAGE.into(),
            }]
        );
    }

    #[tokio::test]
    async fn an_orphan_that_cannot_be_ended_now_is_retried_by_the_next_recovery() {
        let fx = Fixture::new();
        let mut turns = crate::ports::turn_store::MockTurnStore::new();
        let claims = AtomicUsize::new(0);
        turns.expect_claim_orphans().returning(move |_, _, _| {
            // Claimed once: the second call finds it only in memory.
            Ok(if claims.fetch_add(1, Ordering::SeqCst) == 0 {
                vec![orphan()]
            } else {
                vec![]
            })
        });
        turns.expect_end().never();
        let mut events = recorder(Arc::clone(&fx.published));
        let failures = AtomicUsize::new(0);
        events.expect_turn_text().returning(move |_, _| {
            if failures.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(crate::ports::EventStoreError("down".into()))
            } else {
                Ok(String::new())
            }
        });
        let chat = ChatService::new(
            RuntimeSlot::Unavailable("none".into()),
            Arc::new(store(fx.appended.clone())),
            Arc::new(events),
            None,
        )
        .with_turn_records(records(turns));
        assert_eq!(chat.recover(false).await, 0);
        assert_eq!(chat.recover(false).await, 1);
        assert_eq!(
            fx.appended().len(),
            1,
            "the prompt alone: nothing was streamed"
        );
    }
}

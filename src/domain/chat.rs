//! The chat turn: one prompt in, one streamed answer out, with the
//! deferred-approval policy and per-session ordering.
//!
//! Every turn publishes its events to the [`SessionEvents`] port and ends with
//! exactly one terminal event (`done`, `error` or `cancelled`), whichever
//! transport started it. Turns on one session run one at a time, in the order
//! they arrived (a fair lock per session); different sessions run in parallel.
//!
//! Turns are counted through the `metrics` facade, which like `tracing` names
//! no technology: the binary decides where the figures go.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::agent::{AgentError, AgentEvent, AgentReply};
use super::approvals::{ApprovalScope, ApprovalService, RecordError, ToolCallRequest};
use super::events::SessionEvent;
use super::message::{ModelMessage, ResponsePart};
use super::session::{SessionId, TurnId};
use crate::ports::{
    AgentRuntime, ApprovalEvents, EventSink, SessionEvents, SessionStore, SessionStoreError,
    TurnInput,
};

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
    /// approval key is locked). The history was saved.
    #[error("{}", super::events::APPROVAL_UNSUPPORTED_MESSAGE)]
    ApprovalUnsupported { session_id: SessionId },
    /// The model provider failed; the session stays usable.
    #[error("{message}")]
    Provider {
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
    /// The turn ended deferred but its approval request could not be
    /// recorded: the approval store is unavailable. The history was saved.
    #[error("Approval storage is unavailable; the approval request was not recorded")]
    ApprovalStorage { session_id: SessionId },
}

/// Where deferred turns are recorded when approvals are unlocked.
pub struct ApprovalRecording {
    pub service: Arc<ApprovalService>,
    pub events: Arc<dyn ApprovalEvents>,
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
}

/// A turn that can be cancelled from anywhere.
struct Running {
    turn_id: TurnId,
    cancel: CancellationToken,
}

/// Runs chat turns.
pub struct ChatService {
    runtime: RuntimeSlot,
    sessions: Arc<dyn SessionStore>,
    events: Arc<dyn SessionEvents>,
    /// One fair lock per session with a turn running or queued: it orders the
    /// session's turns. Entries are removed when the last turn leaves.
    gates: Mutex<HashMap<SessionId, Arc<tokio::sync::Mutex<()>>>>,
    /// The turn running on each session, for cancel requests.
    running: Mutex<HashMap<SessionId, Running>>,
    /// A turn running longer than this ends with an error (`None`: no limit).
    turn_timeout: Option<Duration>,
    /// Set at shutdown: no new turn starts, queued ones included.
    closing: std::sync::atomic::AtomicBool,
    /// `None` when the server keeps no approval store.
    approvals: Option<ApprovalRecording>,
}

enum Outcome {
    Finished(Result<AgentReply, AgentError>),
    Cancelled,
    TimedOut(Duration),
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
            runtime,
            sessions,
            events,
            gates: Mutex::default(),
            running: Mutex::default(),
            turn_timeout,
            closing: std::sync::atomic::AtomicBool::new(false),
            approvals: None,
        }
    }

    /// Records deferred turns as pending approval envelopes.
    #[must_use]
    pub fn with_approvals(mut self, approvals: ApprovalRecording) -> Self {
        self.approvals = Some(approvals);
        self
    }

    /// Why the runtime is unavailable, if it is.
    #[must_use]
    pub fn unavailable_reason(&self) -> Option<&str> {
        match &self.runtime {
            RuntimeSlot::Ready(_) => None,
            RuntimeSlot::Unavailable(why) => Some(why),
        }
    }

    /// Runs one turn on `session_id` (a new session when `None`, created when
    /// missing) and waits for its end.
    ///
    /// # Errors
    /// See [`ChatError`]: the variant says how the turn ended. Errors raised
    /// before the turn starts (empty message, no runtime, storage) publish
    /// nothing; every other ending has been published to the session.
    pub async fn send(
        &self,
        session_id: Option<SessionId>,
        content: String,
    ) -> Result<ChatReply, ChatError> {
        check_prompt(&content)?;
        if self.is_closing() {
            return Err(ChatError::ShuttingDown);
        }
        let runtime = match &self.runtime {
            RuntimeSlot::Ready(runtime) => Arc::clone(runtime),
            RuntimeSlot::Unavailable(why) => {
                return Err(ChatError::RuntimeUnavailable(why.clone()));
            }
        };
        let session_id = session_id.unwrap_or_else(SessionId::generate);
        self.sessions.get_or_create(&session_id, Utc::now()).await?;

        let gate = self.gate(&session_id);
        let result = {
            let _turn = gate.lock().await;
            if self.is_closing() {
                Err(ChatError::ShuttingDown)
            } else {
                self.run_turn(runtime.as_ref(), &session_id, content).await
            }
        };
        self.release_gate(&session_id, gate);
        result
    }

    /// Stops the turn running on `session_id`. Its clients get `cancelled`
    /// and its partial text is kept in the history.
    ///
    /// # Errors
    /// [`CancelError::NothingRunning`] when no turn runs on the session,
    /// [`CancelError::SessionNotFound`] when the session does not exist.
    pub async fn cancel(&self, session_id: &SessionId) -> Result<TurnId, CancelError> {
        let cancelled = lock(&self.running).get(session_id).map(|running| {
            running.cancel.cancel();
            running.turn_id.clone()
        });
        if let Some(turn_id) = cancelled {
            return Ok(turn_id);
        }
        match self.sessions.history(session_id).await {
            Ok(_) => Err(CancelError::NothingRunning),
            Err(_) => Err(CancelError::SessionNotFound),
        }
    }

    /// An `approve` request on a session: the server cannot take approvals
    /// yet, so every client of the session is told so.
    pub fn approve_unsupported(&self, session_id: &SessionId) {
        self.events
            .publish(session_id, None, SessionEvent::approval_unsupported());
    }

    /// Graceful shutdown: starts no new turn, lets running ones finish for
    /// up to `grace`, then cancels the rest (their partial text is saved, as
    /// for any cancel) and waits for them to wind up.
    pub async fn shutdown(&self, grace: Duration) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.wait_idle(grace).await {
            let cancelled = {
                let running = lock(&self.running);
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

    fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits up to `limit` for no turn to be running; true if none is.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if lock(&self.running).is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sessions with a turn running or queued; the sweeper spares them.
    #[must_use]
    pub fn busy_sessions(&self) -> HashSet<SessionId> {
        lock(&self.gates).keys().cloned().collect()
    }

    async fn run_turn(
        &self,
        runtime: &dyn AgentRuntime,
        session_id: &SessionId,
        content: String,
    ) -> Result<ChatReply, ChatError> {
        let turn_id = TurnId::generate();
        let cancel = CancellationToken::new();
        lock(&self.running).insert(
            session_id.clone(),
            Running {
                turn_id: turn_id.clone(),
                cancel: cancel.clone(),
            },
        );
        let _running = RunningGuard {
            running: &self.running,
            session_id,
        };
        let started = std::time::Instant::now();
        metrics::counter!("turns_started_total").increment(1);
        tracing::debug!(session.id = %session_id, turn.id = %turn_id, "turn started");

        // A session deleted between creation and now simply starts empty.
        let history = self.sessions.history(session_id).await.unwrap_or_default();
        let request = ModelMessage::user_prompt(content.clone(), Utc::now());
        let sink = Arc::new(TurnSink {
            session_id: session_id.clone(),
            turn_id: turn_id.clone(),
            events: Arc::clone(&self.events),
            partial: Mutex::default(),
        });
        let turn = runtime.run_turn(
            TurnInput {
                prompt: content,
                history,
            },
            sink.clone(),
        );
        let outcome = tokio::select! {
            result = with_timeout(self.turn_timeout, turn) => result,
            () = cancel.cancelled() => Outcome::Cancelled,
        };
        let partial = std::mem::take(&mut *lock(&sink.partial));
        let publish = |event| {
            self.events
                .publish(session_id, Some(turn_id.clone()), event)
        };
        let session = session_id.clone();

        let result = match outcome {
            Outcome::Finished(Ok(reply)) => {
                // The server executes no tool itself, so every call is
                // deferred to a human: that is the deferred-approval policy.
                let requests = tool_requests(&reply);
                let text = reply_text(&reply);
                self.save(
                    session_id,
                    request,
                    Some(reply.parts),
                    Some(reply.model_name),
                )
                .await;
                if requests.is_empty() {
                    publish(SessionEvent::Done {
                        content: text.clone(),
                    });
                    Ok(ChatReply {
                        session_id: session,
                        content: text,
                    })
                } else {
                    for request in &requests {
                        publish(SessionEvent::ToolResult {
                            tool_call_id: request.tool_call_id.clone(),
                            status: "deferred".into(),
                            details: json!({"reason": "needs a human's approval"}),
                        });
                    }
                    if self.record(session_id, &turn_id, requests).await {
                        publish(SessionEvent::approval_unsupported());
                        Err(ChatError::ApprovalUnsupported {
                            session_id: session,
                        })
                    } else {
                        let error = ChatError::ApprovalStorage {
                            session_id: session,
                        };
                        publish(SessionEvent::Error {
                            code: Some("approval_storage_unavailable"),
                            message: error.to_string(),
                        });
                        Err(error)
                    }
                }
            }
            Outcome::Finished(Err(AgentError::DeferredApprovalLocked)) => {
                self.save(session_id, request, text_parts(&partial), None)
                    .await;
                publish(SessionEvent::approval_unsupported());
                Err(ChatError::ApprovalUnsupported {
                    session_id: session,
                })
            }
            Outcome::Finished(Err(AgentError::Provider(message))) => {
                // The failed exchange is not kept: the next turn starts from
                // the last good state, as if this one had not been sent.
                publish(SessionEvent::Error {
                    code: None,
                    message: message.clone(),
                });
                Err(ChatError::Provider {
                    session_id: session,
                    message,
                })
            }
            Outcome::Cancelled => {
                self.save(session_id, request, text_parts(&partial), None)
                    .await;
                publish(SessionEvent::Cancelled {
                    partial: partial.clone(),
                });
                Err(ChatError::Cancelled {
                    session_id: session,
                    partial,
                })
            }
            Outcome::TimedOut(after) => {
                self.save(session_id, request, text_parts(&partial), None)
                    .await;
                let error = ChatError::TimedOut {
                    session_id: session,
                    after,
                };
                publish(SessionEvent::Error {
                    code: Some("turn_timeout"),
                    message: error.to_string(),
                });
                Err(error)
            }
        };
        let outcome = result.as_ref().map_or_else(error_kind, |_| "done");
        metrics::counter!("turns_finished_total", "outcome" => outcome).increment(1);
        metrics::histogram!("turn_duration_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            session.id = %session_id,
            turn.id = %turn_id,
            duration_ms = started.elapsed().as_millis(),
            outcome,
            "turn finished"
        );
        result
    }

    /// Records a deferred turn's tool calls for approval when approvals are
    /// unlocked. False only when recording was due and failed.
    async fn record(
        &self,
        session_id: &SessionId,
        turn_id: &TurnId,
        requests: Vec<ToolCallRequest>,
    ) -> bool {
        let Some(approvals) = &self.approvals else {
            return true;
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
            Ok(_) => {
                approvals.events.approvals_changed();
                true
            }
            // Locked: nothing is recorded, as with DeferredApprovalLocked.
            Err(RecordError::Locked) => true,
            // Over a cap: the turn answers as if locked, nothing is recorded,
            // and the operator reads why here.
            Err(refused @ (RecordError::TooLarge { .. } | RecordError::TooManyPending { .. })) => {
                tracing::warn!(session.id = %session_id, reason = %refused, "approval request refused");
                true
            }
            Err(RecordError::Unavailable(why)) => {
                tracing::error!(session.id = %session_id, error = %why, "approval request not recorded");
                false
            }
        }
    }

    /// Appends the turn's request and, when there is one, its response.
    async fn save(
        &self,
        session_id: &SessionId,
        request: ModelMessage,
        response: Option<Vec<ResponsePart>>,
        model_name: Option<String>,
    ) {
        let mut messages = vec![request];
        if let Some(parts) = response {
            messages.push(ModelMessage::Response {
                parts,
                model_name,
                timestamp: Utc::now(),
            });
        }
        if let Err(error) = self.sessions.append(session_id, messages, Utc::now()).await {
            tracing::warn!(session.id = %session_id, %error, "turn history not saved");
        }
    }

    fn gate(&self, session_id: &SessionId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.gates).entry(session_id.clone()).or_default())
    }

    fn release_gate(&self, session_id: &SessionId, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut gates = lock(&self.gates);
        // Clones are only made under this lock, so the count cannot grow
        // here: two means the map's and ours, no other turn waits.
        if Arc::strong_count(&gate) == 2 {
            gates.remove(session_id);
        }
    }
}

/// Refuses a prompt no turn should run for. Transports that queue prompts
/// call it first, so the sender hears at once.
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
        ChatError::Cancelled { .. } => "cancelled",
        ChatError::TimedOut { .. } => "timed_out",
        ChatError::Storage(_) => "storage_error",
        ChatError::ShuttingDown => "shutting_down",
        ChatError::ApprovalStorage { .. } => "approval_storage_error",
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

/// Removes the running-turn entry however the turn ends (even if dropped).
struct RunningGuard<'a> {
    running: &'a Mutex<HashMap<SessionId, Running>>,
    session_id: &'a SessionId,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        lock(self.running).remove(self.session_id);
    }
}

/// Forwards the runtime's events to the session's clients and keeps the
/// streamed text, so a cancelled turn can save what was said.
struct TurnSink {
    session_id: SessionId,
    turn_id: TurnId,
    events: Arc<dyn SessionEvents>,
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
        self.events
            .publish(&self.session_id, Some(self.turn_id.clone()), event);
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
        events.expect_publish().returning(move |_, _, event| {
            published.lock().unwrap().push(event);
        });
        events
    }

    fn reply(parts: Vec<ResponsePart>) -> AgentReply {
        AgentReply {
            model_name: "mock".into(),
            parts,
        }
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
        let reply = fx
            .service(runtime)
            .send(Some(sid()), "hi".into())
            .await
            .unwrap();
        assert_eq!(reply.content, "hello");
        assert_eq!(
            fx.published(),
            vec![
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
        let mut runtime = MockAgentRuntime::new();
        runtime.expect_run_turn().returning(|_, _| {
            Ok(reply(vec![ResponsePart::ToolCall {
                tool_name: "execute".into(),
                args: json!({"command": "ls"}),
                tool_call_id: "c1".into(),
            }]))
        });
        let err = fx
            .service(runtime)
            .send(Some(sid()), "do it".into())
            .await
            .unwrap_err();
        assert_eq!(err, ChatError::ApprovalUnsupported { session_id: sid() });
        let published = fx.published();
        assert!(
            matches!(&published[0], SessionEvent::ToolResult { tool_call_id, status, .. } if tool_call_id == "c1" && status == "deferred")
        );
        assert_eq!(published[1], SessionEvent::approval_unsupported());
        assert_eq!(published.len(), 2, "exactly one terminal event");
        let saved = fx.appended();
        assert_eq!(saved.len(), 2);
        assert!(
            matches!(&saved[1], ModelMessage::Response { parts, .. } if matches!(parts[0], ResponsePart::ToolCall { .. }))
        );
    }

    #[tokio::test]
    async fn a_locked_turn_is_approval_unsupported_too_and_keeps_the_prompt() {
        let fx = Fixture::new();
        let mut runtime = MockAgentRuntime::new();
        runtime
            .expect_run_turn()
            .returning(|_, _| Err(AgentError::DeferredApprovalLocked));
        let err = fx
            .service(runtime)
            .send(Some(sid()), "do it".into())
            .await
            .unwrap_err();
        assert_eq!(err, ChatError::ApprovalUnsupported { session_id: sid() });
        assert_eq!(fx.published(), vec![SessionEvent::approval_unsupported()]);
        assert_eq!(fx.appended().len(), 1, "the prompt is kept");
    }

    #[tokio::test]
    async fn a_provider_failure_is_published_and_nothing_is_saved() {
        let fx = Fixture::new();
        let mut runtime = MockAgentRuntime::new();
        runtime
            .expect_run_turn()
            .returning(|_, _| Err(AgentError::Provider("model down".into())));
        let err = fx
            .service(runtime)
            .send(Some(sid()), "hi".into())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ChatError::Provider {
                session_id: sid(),
                message: "model down".into()
            }
        );
        assert_eq!(
            fx.published(),
            vec![SessionEvent::Error {
                code: None,
                message: "model down".into()
            }]
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
}

//! The control plane: what operators and their tools may ask of a running
//! server (its status, the pending approvals and their decisions, system
//! info, a chat message, the sessions) as typed operations with one error
//! type. `/mcp` and the dashboard REST routes both reach [`ControlPlane`]
//! through one adapter (`crate::adapters::control`), which owns the tool
//! names and the JSON envelopes; every rule is written once, here.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::agent::{AgentConfig, ShellTier};
use super::approvals::{
    ApprovalEnvelope, ApprovalService, DecideError, PageError, PageRequest, PendingPage,
};
use super::chat::{ChatError, ChatReply, ChatService, TurnHandle, check_prompt};
use super::session::{SessionId, SessionInfo};
use super::session_service::SessionService;

/// The runtime's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The active agent.
    pub agent_name: String,
    pub shell_tier: ShellTier,
    /// Whether an approval key is loaded.
    pub approval_unlocked: bool,
    pub pending_approvals: u64,
}

/// The server and its agents.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemInfo {
    /// The crate's version, as `/api/health` answers it.
    pub version: &'static str,
    pub uptime: Duration,
    /// The active agent.
    pub agent_name: String,
    /// Every configured agent, the active one included.
    pub agents: Vec<AgentConfig>,
}

/// A store the control plane reads, named in its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Approvals,
    Sessions,
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Approvals => "approval",
            Self::Sessions => "session",
        })
    }
}

/// Why a control operation gave no answer. The messages are for clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The runtime could not be set up (no agent runtime, or no approval
    /// store): every operation answers this, even one that needs neither
    /// (SPEC A5).
    #[error("{0}")]
    RuntimeUninitialized(String),
    /// No pending, unexpired approval has this id or nonce.
    #[error("No pending approval has this id or nonce")]
    ApprovalNotFound { approval_id: String },
    /// A page of approvals out of range, or a cursor not answered before.
    #[error(transparent)]
    InvalidPage(#[from] PageError),
    /// The request cannot be carried out as written.
    #[error("{0}")]
    InvalidArguments(String),
    /// The message's turn ended with tool calls that need a human's
    /// approval; `approval_id` names the pending approval when one was
    /// recorded.
    #[error("{}", super::events::approval_unsupported_message(approval_id.is_some()))]
    ApprovalUnsupported {
        session_id: SessionId,
        approval_id: Option<String>,
    },
    /// A store failed (the cause is logged where it happened).
    #[error("The {0} store is unavailable; try again shortly")]
    StorageUnavailable(Store),
    /// The message's turn failed (provider, timeout, cancel, ...).
    #[error("{0}")]
    TurnFailed(String),
}

/// The control plane's services.
pub struct ControlPlane {
    chat: Arc<ChatService>,
    sessions: Arc<SessionService>,
    /// `None` when the approval store could not be opened (the runtime is
    /// then uninitialised, and the chat service says why).
    approvals: Option<Arc<ApprovalService>>,
    /// The active agent.
    agent: AgentConfig,
    /// Every configured agent, the active one included.
    agents: Vec<AgentConfig>,
    started: Instant,
}

impl ControlPlane {
    #[must_use]
    pub fn new(
        chat: Arc<ChatService>,
        sessions: Arc<SessionService>,
        approvals: Option<Arc<ApprovalService>>,
        agent: AgentConfig,
        agents: Vec<AgentConfig>,
    ) -> Self {
        Self {
            chat,
            sessions,
            approvals,
            agent,
            agents,
            started: Instant::now(),
        }
    }

    /// The approval service, if the runtime is there.
    fn runtime(&self) -> Result<&ApprovalService, ControlError> {
        match (self.chat.unavailable_reason(), &self.approvals) {
            (None, Some(approvals)) => Ok(approvals),
            (Some(why), _) => Err(ControlError::RuntimeUninitialized(why.to_owned())),
            (None, None) => Err(ControlError::RuntimeUninitialized(
                "the approval store is not open".to_owned(),
            )),
        }
    }

    /// How many approvals are pending, refreshing the
    /// `autopoiesis_approvals_pending` gauge (a metrics scrape asks this).
    ///
    /// # Errors
    /// [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`].
    pub async fn count_pending(&self) -> Result<u64, ControlError> {
        self.counted().await.map(|(_, count)| count)
    }

    async fn counted(&self) -> Result<(&ApprovalService, u64), ControlError> {
        let approvals = self.runtime()?;
        let count = approvals
            .count_pending(Utc::now())
            .await
            .map_err(|e| storage(Store::Approvals, &e))?;
        metrics::gauge!("autopoiesis_approvals_pending").set(count as f64);
        Ok((approvals, count))
    }

    fn status_of(&self, approvals: &ApprovalService, pending: u64) -> Status {
        Status {
            agent_name: self.agent.name.clone(),
            shell_tier: self.agent.shell_tier,
            approval_unlocked: approvals.is_unlocked(),
            pending_approvals: pending,
        }
    }

    /// The runtime's health.
    ///
    /// # Errors
    /// [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`].
    pub async fn status(&self) -> Result<Status, ControlError> {
        let (approvals, count) = self.counted().await?;
        Ok(self.status_of(approvals, count))
    }

    /// One page of pending approvals, oldest first, of `limit` (default 100,
    /// at most 500) after `cursor` (a `next_cursor` answered before),
    /// refreshing the gauge with their total.
    ///
    /// # Errors
    /// [`ControlError::InvalidPage`], [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`].
    pub async fn pending_approvals(
        &self,
        limit: Option<u64>,
        cursor: Option<&str>,
    ) -> Result<PendingPage, ControlError> {
        let page = PageRequest::new(limit, cursor)?;
        self.page(&page).await.map(|(_, page)| page)
    }

    async fn page(
        &self,
        page: &PageRequest,
    ) -> Result<(&ApprovalService, PendingPage), ControlError> {
        let approvals = self.runtime()?;
        let page = approvals
            .list_pending(Utc::now(), page)
            .await
            .map_err(|e| storage(Store::Approvals, &e))?;
        metrics::gauge!("autopoiesis_approvals_pending").set(page.count as f64);
        Ok((approvals, page))
    }

    /// The status and the first page of pending approvals from one listing
    /// and one count, for dashboards that show both.
    ///
    /// # Errors
    /// As [`Self::status`].
    pub async fn snapshot(&self) -> Result<(Status, PendingPage), ControlError> {
        let (approvals, page) = self.page(&PageRequest::default()).await?;
        Ok((self.status_of(approvals, page.count), page))
    }

    /// Approves or rejects the pending approval whose id or nonce is
    /// `approval_id`; its listeners are told by the approval service.
    ///
    /// # Errors
    /// [`ControlError::ApprovalNotFound`],
    /// [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`].
    pub async fn decide(
        &self,
        approval_id: &str,
        approved: bool,
        reason: Option<String>,
    ) -> Result<ApprovalEnvelope, ControlError> {
        let approvals = self.runtime()?;
        approvals
            .decide(approval_id, approved, reason, Utc::now())
            .await
            .map_err(|error| match error {
                DecideError::NotFound { approval_id } => {
                    ControlError::ApprovalNotFound { approval_id }
                }
                DecideError::Unavailable(why) => storage(Store::Approvals, &why),
            })
    }

    /// The server's version, uptime and agents. Without a runtime it is
    /// [`ControlError::RuntimeUninitialized`] like every operation (A5),
    /// although it needs none.
    ///
    /// # Errors
    /// [`ControlError::RuntimeUninitialized`].
    pub fn system_info(&self) -> Result<SystemInfo, ControlError> {
        self.runtime()?;
        Ok(SystemInfo {
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            agent_name: self.agent.name.clone(),
            agents: self.agents.clone(),
        })
    }

    /// Runs a chat turn on `session_id` (validated here; a new session when
    /// absent or unknown) and waits for its reply.
    ///
    /// # Errors
    /// [`ControlError::InvalidArguments`] for a malformed session id or an
    /// empty or unrunnable message, [`ControlError::ApprovalUnsupported`],
    /// [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`], [`ControlError::TurnFailed`].
    pub async fn send_message(
        &self,
        content: String,
        session_id: Option<&str>,
    ) -> Result<ChatReply, ControlError> {
        let session_id = session_id.map(parse_session).transpose()?;
        self.chat
            .send(session_id, content)
            .await
            .map_err(chat_failure)
    }

    /// The first step of [`Self::send_message`] for a caller that watches
    /// the turn's stream as it runs (progress for an MCP client): checks
    /// `content` and the runtime, then opens `session_id` (a new session
    /// when absent, created when unknown) and returns it, so the caller can
    /// subscribe to its stream before [`Self::submit_message`].
    ///
    /// # Errors
    /// As [`Self::send_message`] before its turn starts:
    /// [`ControlError::InvalidArguments`],
    /// [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`].
    pub async fn open_chat(
        &self,
        content: &str,
        session_id: Option<&str>,
    ) -> Result<SessionId, ControlError> {
        check_prompt(content).map_err(chat_failure)?;
        if let Some(why) = self.chat.unavailable_reason() {
            return Err(ControlError::RuntimeUninitialized(why.to_owned()));
        }
        let session_id = match session_id {
            Some(id) => parse_session(id)?,
            None => SessionId::generate(),
        };
        self.sessions
            .open(&session_id)
            .await
            .map_err(|e| chat_failure(ChatError::Storage(e)))?;
        Ok(session_id)
    }

    /// Queues a turn on a session [opened](Self::open_chat) for it; its
    /// events carry the handle's [`TurnHandle::turn_id`] on the stream.
    ///
    /// # Errors
    /// [`ControlError::InvalidArguments`],
    /// [`ControlError::RuntimeUninitialized`], [`ControlError::TurnFailed`]
    /// (a full queue, shutting down).
    pub fn submit_message(
        &self,
        session_id: &SessionId,
        content: String,
    ) -> Result<TurnHandle, ControlError> {
        self.chat.submit(session_id, content).map_err(chat_failure)
    }

    /// Waits for a [submitted](Self::submit_message) turn's reply.
    ///
    /// # Errors
    /// As [`Self::send_message`].
    pub async fn reply(&self, turn: TurnHandle) -> Result<ChatReply, ControlError> {
        turn.outcome().await.map_err(chat_failure)
    }

    /// The chat sessions, oldest first.
    ///
    /// # Errors
    /// [`ControlError::RuntimeUninitialized`],
    /// [`ControlError::StorageUnavailable`].
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ControlError> {
        self.runtime()?;
        self.sessions
            .list()
            .await
            .map_err(|e| storage(Store::Sessions, &e))
    }
}

fn parse_session(id: &str) -> Result<SessionId, ControlError> {
    SessionId::parse(id).map_err(|e| ControlError::InvalidArguments(e.to_string()))
}

/// How a chat turn's failure is told by the control plane.
fn chat_failure(error: ChatError) -> ControlError {
    match error {
        ChatError::ApprovalUnsupported {
            session_id,
            approval_id,
        } => ControlError::ApprovalUnsupported {
            session_id,
            approval_id,
        },
        ChatError::RuntimeUnavailable(why) => ControlError::RuntimeUninitialized(why),
        e @ (ChatError::EmptyMessage | ChatError::InvalidRequest { .. }) => {
            ControlError::InvalidArguments(e.to_string())
        }
        ChatError::Storage(e) => storage(Store::Sessions, &e),
        e @ ChatError::ApprovalStorage { .. } => storage(Store::Approvals, &e),
        e => ControlError::TurnFailed(e.to_string()),
    }
}

/// A store failure, logged once here with its cause; clients are told only
/// which store.
fn storage(store: Store, cause: &dyn fmt::Display) -> ControlError {
    tracing::error!(%store, error = %cause, "control plane storage failed");
    ControlError::StorageUnavailable(store)
}

/// A control plane over mocked ports, for this module's tests and its
/// adapter's.
#[cfg(test)]
pub(crate) mod mocked {
    use super::*;
    use crate::domain::approvals::ApprovalPolicy;
    use crate::domain::chat::RuntimeSlot;
    use crate::ports::agent_runtime::MockAgentRuntime;
    use crate::ports::approval_events::MockApprovalEvents;
    use crate::ports::approval_store::MockApprovalStore;
    use crate::ports::session_events::MockSessionEvents;
    use crate::ports::session_store::MockSessionStore;

    /// The ports a control plane is built over, to be set up by each test.
    pub(crate) struct Ports {
        pub runtime: RuntimeSlot,
        pub sessions: MockSessionStore,
        /// `None`: the approval store could not be opened.
        pub approvals: Option<MockApprovalStore>,
        pub events: MockApprovalEvents,
    }

    impl Ports {
        pub fn new() -> Self {
            Self {
                runtime: RuntimeSlot::Ready(Arc::new(MockAgentRuntime::new())),
                sessions: MockSessionStore::new(),
                approvals: Some(MockApprovalStore::new()),
                events: MockApprovalEvents::new(),
            }
        }

        pub fn control(self) -> ControlPlane {
            let store = Arc::new(self.sessions);
            let stream = Arc::new(MockSessionEvents::new());
            let chat = Arc::new(ChatService::new(
                self.runtime,
                store.clone(),
                stream.clone(),
                None,
            ));
            let sessions = Arc::new(SessionService::new(store, stream, chat.clone()));
            let events = Arc::new(self.events);
            let approvals = self.approvals.map(|store| {
                Arc::new(ApprovalService::new(
                    Arc::new(store),
                    None,
                    ApprovalPolicy::default(),
                    events,
                ))
            });
            let agent = AgentConfig::builtin();
            ControlPlane::new(chat, sessions, approvals, agent.clone(), vec![agent])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mocked::Ports;
    use super::*;
    use crate::domain::chat::RuntimeSlot;
    use crate::ports::approval_store::MockApprovalStore;
    use crate::ports::{ApprovalStoreError, SessionStoreError};

    fn unavailable_approvals() -> MockApprovalStore {
        let mut store = MockApprovalStore::new();
        store
            .expect_count_pending()
            .returning(|_| Err(ApprovalStoreError::Unavailable("disk gone".into())));
        store
            .expect_list_pending()
            .returning(|_, _, _| Err(ApprovalStoreError::Unavailable("disk gone".into())));
        store
            .expect_decide()
            .returning(|_, _| Err(ApprovalStoreError::Unavailable("disk gone".into())));
        store
    }

    #[tokio::test]
    async fn status_names_the_agent_and_counts_the_pending_approvals() {
        let mut ports = Ports::new();
        let mut store = MockApprovalStore::new();
        store.expect_count_pending().times(1).returning(|_| Ok(3));
        ports.approvals = Some(store);
        let status = ports.control().status().await.unwrap();
        assert_eq!(
            status,
            Status {
                agent_name: "default".into(),
                shell_tier: ShellTier::Review,
                approval_unlocked: false,
                pending_approvals: 3,
            }
        );
    }

    #[tokio::test]
    async fn without_a_runtime_every_operation_is_runtime_uninitialized_and_no_store_is_asked() {
        let mut ports = Ports::new();
        ports.runtime = RuntimeSlot::Unavailable("no provider configured".into());
        let control = ports.control();
        let uninitialized = ControlError::RuntimeUninitialized("no provider configured".into());
        assert_eq!(control.status().await.unwrap_err(), uninitialized);
        assert_eq!(control.count_pending().await.unwrap_err(), uninitialized);
        assert_eq!(
            control.pending_approvals(None, None).await.unwrap_err(),
            uninitialized
        );
        assert_eq!(control.snapshot().await.unwrap_err(), uninitialized);
        assert_eq!(
            control.decide("a", true, None).await.unwrap_err(),
            uninitialized
        );
        assert_eq!(control.system_info().unwrap_err(), uninitialized);
        assert_eq!(control.sessions().await.unwrap_err(), uninitialized);
        assert_eq!(
            control.send_message("hi".into(), None).await.unwrap_err(),
            uninitialized
        );
    }

    #[tokio::test]
    async fn without_an_approval_store_the_runtime_is_uninitialized() {
        let mut ports = Ports::new();
        ports.approvals = None;
        let control = ports.control();
        let uninitialized =
            ControlError::RuntimeUninitialized("the approval store is not open".into());
        assert_eq!(control.status().await.unwrap_err(), uninitialized);
        assert_eq!(control.sessions().await.unwrap_err(), uninitialized);
    }

    #[tokio::test]
    async fn an_approval_store_failure_is_storage_unavailable_naming_the_approval_store() {
        let mut ports = Ports::new();
        ports.approvals = Some(unavailable_approvals());
        let control = ports.control();
        let down = ControlError::StorageUnavailable(Store::Approvals);
        assert_eq!(control.status().await.unwrap_err(), down);
        assert_eq!(
            control.pending_approvals(None, None).await.unwrap_err(),
            down
        );
        assert_eq!(control.snapshot().await.unwrap_err(), down);
        assert_eq!(control.decide("a", true, None).await.unwrap_err(), down);
        assert_eq!(
            ControlError::StorageUnavailable(Store::Approvals).to_string(),
            "The approval store is unavailable; try again shortly"
        );
    }

    #[tokio::test]
    async fn a_session_store_failure_is_storage_unavailable_naming_the_session_store() {
        let mut ports = Ports::new();
        ports
            .sessions
            .expect_list()
            .returning(|| Err(SessionStoreError::Unavailable("disk gone".into())));
        ports
            .sessions
            .expect_get_or_create()
            .returning(|_, _| Err(SessionStoreError::Unavailable("disk gone".into())));
        let control = ports.control();
        let down = ControlError::StorageUnavailable(Store::Sessions);
        assert_eq!(control.sessions().await.unwrap_err(), down);
        assert_eq!(
            control
                .send_message("hi".into(), Some("s1"))
                .await
                .unwrap_err(),
            down
        );
        assert_eq!(
            ControlError::StorageUnavailable(Store::Sessions).to_string(),
            "The session store is unavailable; try again shortly"
        );
    }

    #[tokio::test]
    async fn deciding_an_approval_nobody_is_waiting_for_is_approval_not_found() {
        let mut ports = Ports::new();
        let mut store = MockApprovalStore::new();
        store
            .expect_decide()
            .returning(|_, _| Err(ApprovalStoreError::NotFound));
        ports.approvals = Some(store);
        assert_eq!(
            ports.control().decide("gone", false, None).await,
            Err(ControlError::ApprovalNotFound {
                approval_id: "gone".into()
            })
        );
    }

    #[tokio::test]
    async fn a_decision_tells_the_listeners_once_through_the_approval_service() {
        let mut ports = Ports::new();
        let mut store = MockApprovalStore::new();
        store.expect_decide().times(1).returning(|id, decision| {
            Ok(ApprovalEnvelope {
                envelope_id: id.to_owned(),
                nonce: "n".into(),
                plan_hash: "ab".repeat(32),
                key_id: "k".into(),
                signature_hex: None,
                scope: serde_json::json!({}),
                tool_calls: Vec::new(),
                state: crate::domain::approvals::ApprovalState::after_decision(decision.approved),
                issued_at: 0,
                expires_at: i64::MAX,
                consumed_at: None,
                decision: Some(decision.clone()),
            })
        });
        ports.approvals = Some(store);
        ports
            .events
            .expect_approvals_changed()
            .times(1)
            .return_const(());
        let decided = ports.control().decide("a", true, None).await.unwrap();
        assert_eq!(decided.envelope_id, "a");
    }

    #[tokio::test]
    async fn a_page_out_of_range_is_invalid_and_the_store_is_not_asked() {
        let control = Ports::new().control();
        assert_eq!(
            control.pending_approvals(Some(0), None).await,
            Err(ControlError::InvalidPage(PageError::Limit))
        );
        assert_eq!(
            control.pending_approvals(None, Some("not a cursor")).await,
            Err(ControlError::InvalidPage(PageError::Cursor))
        );
    }

    #[tokio::test]
    async fn a_malformed_session_id_or_an_empty_message_is_invalid_arguments() {
        let control = Ports::new().control();
        assert!(matches!(
            control.send_message("hi".into(), Some("no spaces")).await,
            Err(ControlError::InvalidArguments(_))
        ));
        assert_eq!(
            control.send_message(String::new(), None).await,
            Err(ControlError::InvalidArguments("Empty message".into()))
        );
    }

    #[tokio::test]
    async fn opening_a_chat_refuses_a_bad_message_or_a_missing_runtime_before_any_session_is_made()
    {
        // The session store expects nothing: a call would panic.
        let control = Ports::new().control();
        assert_eq!(
            control.open_chat("  ", None).await,
            Err(ControlError::InvalidArguments("Empty message".into()))
        );
        assert!(matches!(
            control.open_chat("hi", Some("no spaces")).await,
            Err(ControlError::InvalidArguments(_))
        ));
        let mut ports = Ports::new();
        ports.runtime = RuntimeSlot::Unavailable("no provider configured".into());
        assert_eq!(
            ports.control().open_chat("hi", Some("s")).await,
            Err(ControlError::RuntimeUninitialized(
                "no provider configured".into()
            ))
        );
    }

    #[tokio::test]
    async fn opening_a_chat_opens_the_named_session_or_a_new_one() {
        let mut ports = Ports::new();
        ports
            .sessions
            .expect_get_or_create()
            .times(2)
            .returning(|id, now| {
                Ok(SessionInfo {
                    id: id.clone(),
                    created_at: now,
                    message_count: 0,
                    history_bytes: 0,
                    last_seq: 0,
                })
            });
        let control = ports.control();
        assert_eq!(
            control
                .open_chat("hi", Some("named"))
                .await
                .unwrap()
                .as_str(),
            "named"
        );
        let fresh = control.open_chat("hi", None).await.unwrap();
        assert_ne!(fresh.as_str(), "named");
    }

    #[tokio::test]
    async fn opening_a_chat_on_a_failing_session_store_is_storage_unavailable() {
        let mut ports = Ports::new();
        ports
            .sessions
            .expect_get_or_create()
            .returning(|_, _| Err(SessionStoreError::Unavailable("disk gone".into())));
        assert_eq!(
            ports.control().open_chat("hi", Some("s")).await,
            Err(ControlError::StorageUnavailable(Store::Sessions))
        );
    }

    #[test]
    fn system_info_lists_every_agent() {
        let info = Ports::new().control().system_info().unwrap();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.agent_name, "default");
        assert_eq!(info.agents, vec![AgentConfig::builtin()]);
    }
}

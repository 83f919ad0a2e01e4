//! The control plane: runtime status, approvals, system info, chat and
//! sessions as named tools that answer JSON envelopes
//! (`{"type", "data", "meta"}`). MCP clients call them through `/mcp`, web
//! front ends through `/api/*`; both transports call [`ControlPlane`], so
//! every rule is written once, here.

use std::sync::Arc;
use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::agent::AgentConfig;
use super::approvals::{
    ApprovalEnvelope, ApprovalService, DecideError, MAX_PAGE_SIZE, PageRequest, PendingPage,
};
use super::chat::{ChatError, ChatService};
use super::events::APPROVAL_UNSUPPORTED_CODE;
use super::session::SessionId;
use super::sessions::SessionService;
use crate::ports::ApprovalEvents;

/// A tool's answer: `type` says what `data` holds (`error.*` for failures).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub kind: String,
    pub data: Value,
    pub meta: Map<String, Value>,
}

impl Envelope {
    /// An envelope of type `kind` answered by `tool`.
    #[must_use]
    pub fn new(tool: &str, kind: &str, data: Value) -> Self {
        let mut meta = Map::new();
        meta.insert("tool".into(), json!(tool));
        meta.insert(
            "timestamp".into(),
            json!(Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
        Self {
            kind: kind.to_owned(),
            data,
            meta,
        }
    }

    /// An `error.<kind>` envelope; `extra` fields join `message` in `data`.
    #[must_use]
    pub fn error(tool: &str, kind: ErrorKind, message: &str, extra: Value) -> Self {
        let mut data = match extra {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        data.insert("message".into(), json!(message));
        Self::new(
            tool,
            &format!("error.{}", kind.as_str()),
            Value::Object(data),
        )
    }

    /// The error kind, for envelopes of type `error.<kind>`.
    #[must_use]
    pub fn error_kind(&self) -> Option<ErrorKind> {
        ErrorKind::ALL
            .into_iter()
            .find(|kind| self.kind.strip_prefix("error.") == Some(kind.as_str()))
    }

    /// The envelope as JSON.
    #[must_use]
    pub fn to_json(&self) -> Value {
        json!({"type": self.kind, "data": self.data, "meta": self.meta})
    }
}

/// The kinds of error envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    RuntimeUninitialized,
    ApprovalNotFound,
    ApprovalUnsupported,
    StorageUnavailable,
    InvalidArguments,
    ToolFailed,
    MissingField,
    UnknownAction,
    UnknownTool,
}

impl ErrorKind {
    const ALL: [Self; 9] = [
        Self::RuntimeUninitialized,
        Self::ApprovalNotFound,
        Self::ApprovalUnsupported,
        Self::StorageUnavailable,
        Self::InvalidArguments,
        Self::ToolFailed,
        Self::MissingField,
        Self::UnknownAction,
        Self::UnknownTool,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RuntimeUninitialized => "runtime_uninitialized",
            Self::ApprovalNotFound => "approval_not_found",
            Self::ApprovalUnsupported => "approval_unsupported",
            Self::StorageUnavailable => "storage_unavailable",
            Self::InvalidArguments => "invalid_arguments",
            Self::ToolFailed => "tool_failed",
            Self::MissingField => "missing_field",
            Self::UnknownAction => "unknown_action",
            Self::UnknownTool => "unknown_tool",
        }
    }
}

/// Arguments of `approval.decide`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideArgs {
    /// The approval to decide: its envelope `id` or its `nonce`, as listed
    /// by `approval.list`.
    pub approval_id: String,
    /// `true` approves the tool calls (the envelope is consumed); `false`
    /// rejects them (the envelope expires).
    pub approved: bool,
    /// Why, in a few words; kept with the decision.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Arguments of `approval.list`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// At most this many approvals in the page: 1 to 500, 100 when absent.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Where the page starts: the `next_cursor` of the page before, as it
    /// was answered (opaque). Absent for the first page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Arguments of `chat.send`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatSendArgs {
    /// The message to send to the agent. Must not be empty.
    pub content: String,
    /// The session to continue (1-128 characters of A-Z a-z 0-9 . _ : -);
    /// a new session is created when absent or unknown.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Arguments of a tool that takes none.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// What clients are told about a tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of the arguments.
    pub input_schema: Value,
}

fn schema<T: JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or_else(|_| json!({"type": "object"}))
}

/// The tools, in the order they are listed.
#[must_use]
pub fn tools() -> Vec<ToolInfo> {
    vec![
        ToolInfo {
            name: "dashboard.status",
            description: "Runtime health: the active agent, its shell tier, whether approvals are unlocked (an approval key is loaded) and how many approvals are pending.",
            input_schema: schema::<NoArgs>(),
        },
        ToolInfo {
            name: "approval.list",
            description: "Pending approval envelopes, oldest first: the tool calls a model asked for that wait for a human's decision. One page at a time (limit, default 100); next_cursor, when not null, fetches the next page; count is the total pending.",
            input_schema: schema::<ListArgs>(),
        },
        ToolInfo {
            name: "approval.decide",
            description: "Approve or reject a pending approval envelope by its id or nonce. Exactly one decision wins; a second one finds nothing pending.",
            input_schema: schema::<DecideArgs>(),
        },
        ToolInfo {
            name: "system.info",
            description: "Server version, uptime and the configured agents.",
            input_schema: schema::<NoArgs>(),
        },
        ToolInfo {
            name: "chat.send",
            description: "Send a message to the agent and wait for its full reply. A reply that needs tool approval answers error.approval_unsupported.",
            input_schema: schema::<ChatSendArgs>(),
        },
        ToolInfo {
            name: "session.list",
            description: "The chat sessions, oldest first, with their message counts.",
            input_schema: schema::<NoArgs>(),
        },
    ]
}

/// The tool named does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tool: {0}")]
pub struct UnknownTool(pub String);

/// The control plane's services.
pub struct ControlPlane {
    chat: Arc<ChatService>,
    sessions: Arc<SessionService>,
    /// `None` when the approval store could not be opened (the runtime is
    /// then uninitialised, and the chat service says why).
    approvals: Option<Arc<ApprovalService>>,
    events: Arc<dyn ApprovalEvents>,
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
        events: Arc<dyn ApprovalEvents>,
        agent: AgentConfig,
        agents: Vec<AgentConfig>,
    ) -> Self {
        Self {
            chat,
            sessions,
            approvals,
            events,
            agent,
            agents,
            started: Instant::now(),
        }
    }

    /// Calls the tool `name` with JSON `args` (`null` counts as `{}`).
    ///
    /// # Errors
    /// [`UnknownTool`] when no tool has that name. Every other failure is an
    /// `error.*` envelope.
    pub async fn call(&self, name: &str, args: Value) -> Result<Envelope, UnknownTool> {
        let args = if args.is_null() { json!({}) } else { args };
        Ok(match name {
            "dashboard.status" => no_args(name, args, self.status()).await,
            "system.info" => no_args(name, args, async { self.system_info() }).await,
            "session.list" => no_args(name, args, self.session_list()).await,
            "approval.list" => match parse::<ListArgs>(name, args) {
                Ok(a) => self.approval_list(a.limit, a.cursor.as_deref()).await,
                Err(envelope) => envelope,
            },
            "approval.decide" => match parse::<DecideArgs>(name, args) {
                Ok(a) => self.decide(&a.approval_id, a.approved, a.reason).await,
                Err(envelope) => envelope,
            },
            "chat.send" => match parse::<ChatSendArgs>(name, args) {
                Ok(a) => self.send_message(name, a.content, a.session_id).await,
                Err(envelope) => envelope,
            },
            other => return Err(UnknownTool(other.to_owned())),
        })
    }

    /// The approval service, or the envelope saying the runtime is missing.
    fn runtime(&self, tool: &str) -> Result<&ApprovalService, Envelope> {
        match (self.chat.unavailable_reason(), &self.approvals) {
            (None, Some(approvals)) => Ok(approvals),
            (Some(why), _) => Err(uninitialized(tool, why)),
            (None, None) => Err(uninitialized(tool, "the approval store is not open")),
        }
    }

    /// How many approvals are pending (refreshing the `autopoiesis_approvals_pending`
    /// gauge), or the envelope `tool` answers when they cannot be counted.
    async fn count(&self, tool: &str) -> Result<(&ApprovalService, u64), Envelope> {
        let approvals = self.runtime(tool)?;
        let count = approvals
            .count_pending(Utc::now())
            .await
            .map_err(|e| storage(tool, &e.to_string()))?;
        metrics::gauge!("autopoiesis_approvals_pending").set(count as f64);
        Ok((approvals, count))
    }

    /// One page of pending approvals (refreshing the gauge with its total),
    /// or the envelope `tool` answers when they cannot be read.
    async fn page(
        &self,
        tool: &str,
        page: &PageRequest,
    ) -> Result<(&ApprovalService, PendingPage), Envelope> {
        let approvals = self.runtime(tool)?;
        let page = approvals
            .list_pending(Utc::now(), page)
            .await
            .map_err(|e| storage(tool, &e.to_string()))?;
        metrics::gauge!("autopoiesis_approvals_pending").set(page.count as f64);
        Ok((approvals, page))
    }

    fn status_envelope(&self, approvals: &ApprovalService, pending: u64) -> Envelope {
        const TOOL: &str = "dashboard.status";
        Envelope::new(
            TOOL,
            TOOL,
            json!({
                "initialized": true,
                "agent_name": self.agent.name,
                "shell_tier": self.agent.shell_tier.as_str(),
                "approval_unlocked": approvals.is_unlocked(),
                "pending_approvals_count": pending,
            }),
        )
    }

    /// `dashboard.status`.
    pub async fn status(&self) -> Envelope {
        match self.count("dashboard.status").await {
            Ok((approvals, count)) => self.status_envelope(approvals, count),
            Err(envelope) => envelope,
        }
    }

    /// `approval.list`: one page of pending envelopes, oldest first, of
    /// `limit` (default 100, at most 500) after `cursor` (a `next_cursor`
    /// answered before).
    pub async fn approval_list(&self, limit: Option<u64>, cursor: Option<&str>) -> Envelope {
        const TOOL: &str = "approval.list";
        let page = match PageRequest::new(limit, cursor) {
            Ok(page) => page,
            Err(e) => {
                return Envelope::error(
                    TOOL,
                    ErrorKind::InvalidArguments,
                    &e.to_string(),
                    json!({"max_limit": MAX_PAGE_SIZE}),
                );
            }
        };
        match self.page(TOOL, &page).await {
            Ok((_, page)) => list_envelope(&page),
            Err(envelope) => envelope,
        }
    }

    /// `dashboard.status` and the first page of `approval.list` from one
    /// listing and one count, for dashboards that show both.
    pub async fn snapshot(&self) -> (Envelope, Envelope) {
        match self.page("dashboard.status", &PageRequest::default()).await {
            Ok((approvals, page)) => (
                self.status_envelope(approvals, page.count),
                list_envelope(&page),
            ),
            // One failure, told once per view; the store is not asked again.
            Err(envelope) => (envelope.clone(), envelope),
        }
    }

    /// Refreshes the `autopoiesis_approvals_pending` gauge (for a metrics scrape); the
    /// count, or `None` when it cannot be read.
    pub async fn count_pending(&self) -> Option<u64> {
        self.count("metrics").await.ok().map(|(_, count)| count)
    }

    /// `approval.decide`.
    pub async fn decide(
        &self,
        approval_id: &str,
        approved: bool,
        reason: Option<String>,
    ) -> Envelope {
        const TOOL: &str = "approval.decide";
        let approvals = match self.runtime(TOOL) {
            Ok(approvals) => approvals,
            Err(envelope) => return envelope,
        };
        match approvals
            .decide(approval_id, approved, reason, Utc::now())
            .await
        {
            Ok(envelope) => {
                let notified = self.events.approvals_changed();
                let mut answer = Envelope::new(
                    TOOL,
                    "approval.decision",
                    json!({
                        "id": envelope.envelope_id,
                        "nonce": envelope.nonce,
                        "state": envelope.state.as_str(),
                        "approved": approved,
                        "plan_hash_prefix": envelope.plan_hash_prefix(),
                    }),
                );
                answer
                    .meta
                    .insert("notification_emitted".into(), json!(notified));
                answer
            }
            Err(DecideError::NotFound { approval_id }) => Envelope::error(
                TOOL,
                ErrorKind::ApprovalNotFound,
                "No pending approval has this id or nonce",
                json!({ "approval_id": approval_id }),
            ),
            Err(DecideError::Unavailable(why)) => storage(TOOL, &why),
        }
    }

    /// `system.info`. Without a runtime it answers
    /// `error.runtime_uninitialized` like every tool (A5), although it needs
    /// none.
    fn system_info(&self) -> Envelope {
        const TOOL: &str = "system.info";
        if let Err(envelope) = self.runtime(TOOL) {
            return envelope;
        }
        let configs: Vec<Value> = self
            .agents
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "model": a.model,
                    "shell_tier": a.shell_tier.as_str(),
                    "tools": a.tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect();
        Envelope::new(
            TOOL,
            TOOL,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": self.started.elapsed().as_secs(),
                "agent_name": self.agent.name,
                "agent_configs": configs,
            }),
        )
    }

    /// `chat.send` (and the dashboard's `send_message` action, named `tool`).
    pub async fn send_message(
        &self,
        tool: &str,
        content: String,
        session_id: Option<String>,
    ) -> Envelope {
        let session_id = match session_id.map(|raw| SessionId::parse(&raw)).transpose() {
            Ok(id) => id,
            Err(e) => {
                return Envelope::error(
                    tool,
                    ErrorKind::InvalidArguments,
                    &e.to_string(),
                    json!({}),
                );
            }
        };
        let kind = if tool == "chat.send" {
            "chat.reply"
        } else {
            "action.send_message"
        };
        match self.chat.send(session_id, content).await {
            Ok(reply) => Envelope::new(
                tool,
                kind,
                json!({"session_id": reply.session_id.as_str(), "content": reply.content}),
            ),
            Err(
                ref e @ ChatError::ApprovalUnsupported {
                    ref session_id,
                    ref approval_id,
                },
            ) => {
                let mut data =
                    json!({"code": APPROVAL_UNSUPPORTED_CODE, "session_id": session_id.as_str()});
                if let Some(id) = approval_id {
                    data["approval_id"] = json!(id);
                }
                Envelope::error(tool, ErrorKind::ApprovalUnsupported, &e.to_string(), data)
            }
            Err(ChatError::RuntimeUnavailable(why)) => uninitialized(tool, &why),
            Err(e @ (ChatError::EmptyMessage | ChatError::InvalidRequest { .. })) => {
                Envelope::error(tool, ErrorKind::InvalidArguments, &e.to_string(), json!({}))
            }
            Err(e @ (ChatError::Storage(_) | ChatError::ApprovalStorage { .. })) => {
                storage(tool, &e.to_string())
            }
            Err(e) => Envelope::error(tool, ErrorKind::ToolFailed, &e.to_string(), json!({})),
        }
    }

    /// A dashboard action: `approve` / `reject` an approval, or
    /// `send_message` (`payload`: `{"content", "session_id"?}`).
    pub async fn action(
        &self,
        action: &str,
        approval_id: Option<String>,
        reason: Option<String>,
        payload: &Value,
    ) -> Envelope {
        const TOOL: &str = "dashboard.action";
        match action {
            "approve" | "reject" => match approval_id.filter(|id| !id.trim().is_empty()) {
                Some(id) => self.decide(&id, action == "approve", reason).await,
                None => missing(TOOL, "approval_id"),
            },
            "send_message" => match payload.get("content").and_then(Value::as_str) {
                Some(content) => {
                    let session_id = payload
                        .get("session_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    self.send_message("action.send_message", content.to_owned(), session_id)
                        .await
                }
                None => missing(TOOL, "payload.content"),
            },
            other => Envelope::error(
                TOOL,
                ErrorKind::UnknownAction,
                "Unknown action; expected approve, reject or send_message",
                json!({ "action": other }),
            ),
        }
    }

    /// `session.list` (`error.runtime_uninitialized` without a runtime, as
    /// every tool).
    pub async fn session_list(&self) -> Envelope {
        const TOOL: &str = "session.list";
        if let Err(envelope) = self.runtime(TOOL) {
            return envelope;
        }
        match self.sessions.list().await {
            Ok(list) => {
                let items: Vec<Value> = list
                    .iter()
                    .map(|s| {
                        json!({
                            "id": s.id.as_str(),
                            "created_at": s.created_at.to_rfc3339(),
                            "message_count": s.message_count,
                        })
                    })
                    .collect();
                Envelope::new(TOOL, TOOL, json!({"count": items.len(), "items": items}))
            }
            Err(e) => storage(TOOL, &e.to_string()),
        }
    }
}

fn list_envelope(page: &PendingPage) -> Envelope {
    const TOOL: &str = "approval.list";
    let items: Vec<Value> = page.items.iter().map(approval_item).collect();
    Envelope::new(
        TOOL,
        TOOL,
        json!({
            "count": page.count,
            "items": items,
            "next_cursor": page.next.as_ref().map(|cursor| cursor.encode()),
        }),
    )
}

/// Answers `answer` for a tool that takes no arguments, once `args` says so.
async fn no_args(tool: &str, args: Value, answer: impl Future<Output = Envelope>) -> Envelope {
    match parse::<NoArgs>(tool, args) {
        Ok(NoArgs {}) => answer.await,
        Err(envelope) => envelope,
    }
}

fn parse<T: serde::de::DeserializeOwned>(tool: &str, args: Value) -> Result<T, Envelope> {
    serde_json::from_value(args).map_err(|e| invalid(tool, &e))
}

fn approval_item(envelope: &ApprovalEnvelope) -> Value {
    json!({
        "id": envelope.envelope_id,
        "nonce": envelope.nonce,
        "plan_hash_prefix": envelope.plan_hash_prefix(),
        "issued_at": envelope.issued_at,
        "expires_at": envelope.expires_at,
        "tool_count": envelope.tool_calls.len(),
        "requests": envelope.tool_calls.iter().map(|c| json!({
            "tool_call_id": c.tool_call_id,
            "tool_name": c.tool_name,
            "args": c.args,
        })).collect::<Vec<_>>(),
    })
}

fn missing(tool: &str, field: &str) -> Envelope {
    Envelope::error(
        tool,
        ErrorKind::MissingField,
        &format!("{field} is required"),
        json!({ "field": field }),
    )
}

fn uninitialized(tool: &str, why: &str) -> Envelope {
    Envelope::error(tool, ErrorKind::RuntimeUninitialized, why, json!({}))
}

fn storage(tool: &str, why: &str) -> Envelope {
    tracing::error!(tool, error = %why, "approval storage failed");
    Envelope::error(
        tool,
        ErrorKind::StorageUnavailable,
        "The approval store is unavailable; try again shortly",
        json!({}),
    )
}

fn invalid(tool: &str, error: &serde_json::Error) -> Envelope {
    Envelope::error(
        tool,
        ErrorKind::InvalidArguments,
        &format!("invalid arguments: {error}"),
        json!({}),
    )
}

//! The control plane's answers as JSON envelopes `{"type", "data", "meta"}`
//! (SPEC A5, A8): the data of each success, and `error.<kind>` for each
//! failure, named from the typed error so that transports match on it.

use chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::domain::approvals::{ApprovalEnvelope, MAX_PAGE_SIZE, PendingPage};
use crate::domain::chat::ChatReply;
use crate::domain::control::{ControlError, Status, SystemInfo};
use crate::domain::events::APPROVAL_UNSUPPORTED_CODE;
use crate::domain::session::SessionInfo;

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

    /// The envelope as JSON.
    #[must_use]
    pub fn to_json(&self) -> Value {
        json!({"type": self.kind, "data": self.data, "meta": self.meta})
    }
}

/// Why a tool call or a dashboard action failed: the control plane's
/// errors, and the protocol's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A dashboard action without a field it needs.
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("Unknown action; expected approve, reject or send_message")]
    UnknownAction(String),
    #[error("Unknown tool: {0}")]
    UnknownTool(String),
}

/// The kinds of error envelope (`error.<kind>`).
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

impl Failure {
    /// The envelope kind this failure is told as.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Control(error) => match error {
                ControlError::RuntimeUninitialized(_) => ErrorKind::RuntimeUninitialized,
                ControlError::ApprovalNotFound { .. } => ErrorKind::ApprovalNotFound,
                ControlError::InvalidPage(_) | ControlError::InvalidArguments(_) => {
                    ErrorKind::InvalidArguments
                }
                ControlError::ApprovalUnsupported { .. } => ErrorKind::ApprovalUnsupported,
                ControlError::StorageUnavailable(_) => ErrorKind::StorageUnavailable,
                ControlError::TurnFailed(_) => ErrorKind::ToolFailed,
            },
            Self::MissingField(_) => ErrorKind::MissingField,
            Self::UnknownAction(_) => ErrorKind::UnknownAction,
            Self::UnknownTool(_) => ErrorKind::UnknownTool,
        }
    }

    /// The fields that join `message` in the error envelope's `data`.
    fn details(&self) -> Map<String, Value> {
        let details = match self {
            Self::Control(ControlError::ApprovalNotFound { approval_id }) => {
                json!({ "approval_id": approval_id })
            }
            Self::Control(ControlError::InvalidPage(_)) => json!({ "max_limit": MAX_PAGE_SIZE }),
            Self::Control(ControlError::ApprovalUnsupported {
                session_id,
                approval_id,
            }) => {
                let mut data =
                    json!({"code": APPROVAL_UNSUPPORTED_CODE, "session_id": session_id.as_str()});
                if let Some(id) = approval_id {
                    data["approval_id"] = json!(id);
                }
                data
            }
            Self::MissingField(field) => json!({ "field": field }),
            Self::UnknownAction(action) => json!({ "action": action }),
            Self::UnknownTool(name) => json!({ "name": name }),
            Self::Control(_) => json!({}),
        };
        match details {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

/// A failed call: what failed, and the tool that answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub tool: &'static str,
    pub error: Failure,
}

impl Failed {
    #[must_use]
    pub fn new(tool: &'static str, error: impl Into<Failure>) -> Self {
        Self {
            tool,
            error: error.into(),
        }
    }

    /// The `error.<kind>` envelope: `data` holds `message` and the
    /// failure's details.
    #[must_use]
    pub fn envelope(&self) -> Envelope {
        let mut data = self.error.details();
        data.insert("message".into(), json!(self.error.to_string()));
        Envelope::new(
            self.tool,
            &format!("error.{}", self.error.kind().as_str()),
            Value::Object(data),
        )
    }
}

/// What a tool or action answers.
pub type Answer = Result<Envelope, Failed>;

/// The envelope to send, whether the call succeeded or not.
#[must_use]
pub fn envelope_of(answer: &Answer) -> Envelope {
    match answer {
        Ok(envelope) => envelope.clone(),
        Err(failed) => failed.envelope(),
    }
}

pub(super) fn status(status: &Status) -> Envelope {
    const TOOL: &str = "dashboard.status";
    Envelope::new(
        TOOL,
        TOOL,
        json!({
            "initialized": true,
            "agent_name": status.agent_name,
            "shell_tier": status.shell_tier.as_str(),
            "approval_unlocked": status.approval_unlocked,
            "pending_approvals_count": status.pending_approvals,
        }),
    )
}

pub(super) fn approval_list(page: &PendingPage) -> Envelope {
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

/// `approval.decision`; `notified` is `meta.notification_emitted`.
pub(super) fn decision(envelope: &ApprovalEnvelope, approved: bool, notified: bool) -> Envelope {
    let mut answer = Envelope::new(
        "approval.decide",
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

pub(super) fn system_info(info: &SystemInfo) -> Envelope {
    const TOOL: &str = "system.info";
    let configs: Vec<Value> = info
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
            "version": info.version,
            "uptime_seconds": info.uptime.as_secs(),
            "agent_name": info.agent_name,
            "agent_configs": configs,
        }),
    )
}

/// A chat reply answered by `tool` as `kind`.
pub(super) fn reply(tool: &str, kind: &str, reply: &ChatReply) -> Envelope {
    Envelope::new(
        tool,
        kind,
        json!({"session_id": reply.session_id.as_str(), "content": reply.content}),
    )
}

/// `session.list`; its `data` is also what the MCP sessions resource reads.
#[must_use]
pub fn sessions(list: &[SessionInfo]) -> Envelope {
    const TOOL: &str = "session.list";
    let items: Vec<Value> = list
        .iter()
        .map(|s| {
            json!({
                "id": s.id.as_str(),
                "created_at": s.created_at.to_rfc3339(),
                "message_count": s.message_count,
                "last_seq": s.last_seq,
            })
        })
        .collect();
    Envelope::new(TOOL, TOOL, json!({"count": items.len(), "items": items}))
}

//! The dashboard API for web front ends (SPEC A8): the control plane's
//! envelopes over plain REST and SSE. Every answer comes from
//! [`ControlPlane`], the same service `/mcp` calls.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use poem::web::sse::Event;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::ApiTags;
use crate::adapters::approval_broadcast::ApprovalBroadcast;
use crate::domain::dashboard::{ControlPlane, Envelope, ErrorKind, UnknownTool, tools};

pub struct DashboardApi {
    pub control: Arc<ControlPlane>,
    pub events: Arc<ApprovalBroadcast>,
    /// `/api/stream` pushes at least this often, changes or not.
    pub refresh: Duration,
}

/// A control-plane answer: `type` names what `data` holds; failures are
/// `error.<kind>` with `data.message`.
#[derive(Debug, Object)]
#[oai(rename = "Envelope")]
pub struct EnvelopeBody {
    #[oai(rename = "type")]
    pub kind: String,
    pub data: Value,
    /// `tool`, `timestamp` (RFC 3339) and tool-specific fields such as
    /// `notification_emitted`.
    pub meta: Value,
}

impl From<Envelope> for EnvelopeBody {
    fn from(envelope: Envelope) -> Self {
        Self {
            kind: envelope.kind,
            data: envelope.data,
            meta: Value::Object(envelope.meta),
        }
    }
}

/// `POST /api/actions` body. Which fields an action needs depends on the
/// action: `approval_id` for approve/reject, `payload.content` for
/// send_message; a missing one is `error.missing_field`.
#[derive(Debug, Object)]
pub struct ActionBody {
    /// `approve`, `reject` or `send_message` (anything else is
    /// `error.unknown_action`).
    pub action: String,
    /// The approval's id or nonce (approve, reject).
    pub approval_id: Option<String>,
    /// Why (approve, reject).
    pub reason: Option<String>,
    /// `send_message`: `{"content": str, "session_id": str?}`.
    pub payload: Option<Value>,
}

#[derive(ApiResponse)]
enum EnvelopeReply {
    /// The envelope (an `error.*` one when the runtime is uninitialised).
    #[oai(status = 200)]
    Ok(Json<EnvelopeBody>),
    /// `error.invalid_arguments`: a `limit` out of range or a `cursor` that
    /// `approval.list` did not answer.
    #[oai(status = 400)]
    BadRequest(Json<EnvelopeBody>),
    /// `error.storage_unavailable`: the approval database is down.
    #[oai(status = 503)]
    Unavailable(Json<EnvelopeBody>),
}

impl From<Envelope> for EnvelopeReply {
    fn from(envelope: Envelope) -> Self {
        match envelope.error_kind() {
            Some(ErrorKind::StorageUnavailable) => Self::Unavailable(Json(envelope.into())),
            Some(ErrorKind::InvalidArguments) => Self::BadRequest(Json(envelope.into())),
            _ => Self::Ok(Json(envelope.into())),
        }
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_action")]
enum ActionReply {
    /// `approval.decision` or `action.send_message`.
    #[oai(status = 200)]
    Ok(Json<EnvelopeBody>),
    /// `error.missing_field`, `error.unknown_action`, `error.invalid_arguments`,
    /// or a body that is not an action object.
    #[oai(status = 400)]
    BadRequest(Json<EnvelopeBody>),
    /// `error.approval_not_found`: no pending approval has that id or nonce.
    #[oai(status = 404)]
    NotFound(Json<EnvelopeBody>),
    /// `error.approval_unsupported`: the message's turn needs an approval.
    #[oai(status = 409)]
    Conflict(Json<EnvelopeBody>),
    /// `error.tool_failed`: the turn failed.
    #[oai(status = 500)]
    Failed(Json<EnvelopeBody>),
    /// `error.runtime_uninitialized` or `error.storage_unavailable`.
    #[oai(status = 503)]
    Unavailable(Json<EnvelopeBody>),
}

fn invalid_body(tool: &str, error: &poem::Error) -> Json<EnvelopeBody> {
    Json(
        Envelope::error(
            tool,
            ErrorKind::InvalidArguments,
            &error.to_string(),
            json!({}),
        )
        .into(),
    )
}

fn bad_action(error: poem::Error) -> ActionReply {
    ActionReply::BadRequest(invalid_body("dashboard.action", &error))
}

impl From<Envelope> for ActionReply {
    fn from(envelope: Envelope) -> Self {
        let kind = envelope.error_kind();
        let body = Json(envelope.into());
        match kind {
            None => Self::Ok(body),
            Some(
                ErrorKind::MissingField
                | ErrorKind::UnknownAction
                | ErrorKind::InvalidArguments
                | ErrorKind::UnknownTool,
            ) => Self::BadRequest(body),
            Some(ErrorKind::ApprovalNotFound) => Self::NotFound(body),
            Some(ErrorKind::ApprovalUnsupported) => Self::Conflict(body),
            Some(ErrorKind::ToolFailed) => Self::Failed(body),
            Some(ErrorKind::RuntimeUninitialized | ErrorKind::StorageUnavailable) => {
                Self::Unavailable(body)
            }
        }
    }
}

/// One tool as listed.
#[derive(Debug, Object)]
pub struct ToolBody {
    pub name: String,
    pub description: String,
    /// JSON Schema of the tool's arguments.
    #[oai(rename = "inputSchema")]
    pub input_schema: Value,
}

/// `tools.list` data.
#[derive(Debug, Object)]
pub struct ToolsListData {
    pub count: u64,
    pub tools: Vec<ToolBody>,
}

/// `GET /api/tools` answer.
#[derive(Debug, Object)]
pub struct ToolsListBody {
    /// `tools.list`.
    #[oai(rename = "type")]
    pub kind: String,
    pub data: ToolsListData,
    pub meta: Value,
}

#[derive(ApiResponse)]
enum ToolsReply {
    /// The tools `/mcp` offers, with their argument schemas.
    #[oai(status = 200)]
    Ok(Json<ToolsListBody>),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_tool_call")]
enum ToolCallReply {
    /// The tool's envelope (its own `error.*` envelopes included, such as
    /// `error.approval_not_found`).
    #[oai(status = 200)]
    Ok(Json<EnvelopeBody>),
    /// The body is not JSON, or the arguments do not fit the tool's schema.
    #[oai(status = 400)]
    BadRequest(Json<EnvelopeBody>),
    /// No tool has this name.
    #[oai(status = 404)]
    NotFound(Json<EnvelopeBody>),
    /// `error.tool_failed`.
    #[oai(status = 500)]
    Failed(Json<EnvelopeBody>),
    /// `error.runtime_uninitialized` or `error.storage_unavailable`.
    #[oai(status = 503)]
    Unavailable(Json<EnvelopeBody>),
}

fn bad_tool_call(error: poem::Error) -> ToolCallReply {
    ToolCallReply::BadRequest(invalid_body("tools.call", &error))
}

impl From<Envelope> for ToolCallReply {
    fn from(envelope: Envelope) -> Self {
        let kind = envelope.error_kind();
        let body = Json(envelope.into());
        match kind {
            Some(ErrorKind::InvalidArguments) => Self::BadRequest(body),
            Some(ErrorKind::UnknownTool) => Self::NotFound(body),
            Some(ErrorKind::ToolFailed) => Self::Failed(body),
            Some(ErrorKind::RuntimeUninitialized | ErrorKind::StorageUnavailable) => {
                Self::Unavailable(body)
            }
            _ => Self::Ok(body),
        }
    }
}

#[derive(ApiResponse)]
enum StreamReply {
    /// `stream.connected`, then the `dashboard.status` and `approval.list`
    /// envelopes, again whenever an approval is created or decided and at
    /// least every 5 s. `event:` is the envelope's type, `data:` the envelope.
    #[oai(status = 200)]
    Ok(EventStream<BoxStream<'static, EnvelopeBody>>),
}

#[OpenApi]
impl DashboardApi {
    /// Runtime status
    #[oai(
        path = "/api/status",
        method = "get",
        operation_id = "dashboard_status",
        tag = "ApiTags::Dashboard"
    )]
    async fn status(&self) -> EnvelopeReply {
        self.control.status().await.into()
    }

    /// Pending approvals
    ///
    /// One page, oldest first; `data.next_cursor`, when not null, is the
    /// `cursor` of the next page, and `data.count` the total pending.
    #[oai(
        path = "/api/approvals",
        method = "get",
        operation_id = "list_approvals",
        tag = "ApiTags::Dashboard"
    )]
    async fn approvals(
        &self,
        /// At most this many approvals: 1 to 500, default 100.
        limit: Query<Option<u64>>,
        /// The `next_cursor` of the page before (opaque); absent for the first.
        cursor: Query<Option<String>>,
    ) -> EnvelopeReply {
        self.control
            .approval_list(limit.0, cursor.0.as_deref())
            .await
            .into()
    }

    /// Act: approve, reject, send a message
    #[oai(
        path = "/api/actions",
        method = "post",
        operation_id = "dashboard_action",
        tag = "ApiTags::Dashboard"
    )]
    async fn action(&self, body: Json<ActionBody>) -> ActionReply {
        let ActionBody {
            action,
            approval_id,
            reason,
            payload,
        } = body.0;
        self.control
            .action(
                &action,
                approval_id,
                reason,
                &payload.unwrap_or(Value::Null),
            )
            .await
            .into()
    }

    /// List the control tools
    #[oai(
        path = "/api/tools",
        method = "get",
        operation_id = "list_tools",
        tag = "ApiTags::Dashboard"
    )]
    async fn tools(&self) -> ToolsReply {
        let tools: Vec<ToolBody> = tools()
            .into_iter()
            .map(|t| ToolBody {
                name: t.name.into(),
                description: t.description.into(),
                input_schema: t.input_schema,
            })
            .collect();
        ToolsReply::Ok(Json(ToolsListBody {
            kind: "tools.list".into(),
            data: ToolsListData {
                count: tools.len() as u64,
                tools,
            },
            meta: json!({"timestamp": chrono::Utc::now().to_rfc3339()}),
        }))
    }

    /// Call a control tool
    ///
    /// The body is the tool's arguments (`{}` for tools that take none).
    #[oai(
        path = "/api/tools/:name",
        method = "post",
        operation_id = "call_tool",
        tag = "ApiTags::Dashboard"
    )]
    async fn call_tool(&self, name: Path<String>, args: Json<Value>) -> ToolCallReply {
        match self.control.call(&name, args.0).await {
            Ok(envelope) => envelope.into(),
            Err(UnknownTool(unknown)) => Envelope::error(
                "tools.call",
                ErrorKind::UnknownTool,
                &format!("Unknown tool: {unknown}"),
                json!({ "name": unknown }),
            )
            .into(),
        }
    }

    /// Live dashboard (SSE)
    #[oai(
        path = "/api/stream",
        method = "get",
        operation_id = "dashboard_stream",
        tag = "ApiTags::Dashboard"
    )]
    async fn stream(&self) -> StreamReply {
        let state = StreamState {
            control: Arc::clone(&self.control),
            changes: self.events.subscribe(),
            refresh: self.refresh,
            queue: Vec::new(),
            phase: Phase::Connect,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let next = state.next().await;
            Some((EnvelopeBody::from(next), state))
        })
        .boxed();
        StreamReply::Ok(EventStream::new(stream).to_event(|body: EnvelopeBody| {
            let data = json!({"type": body.kind, "data": body.data, "meta": body.meta});
            Event::message(data.to_string()).event_type(body.kind)
        }))
    }
}

enum Phase {
    /// `stream.connected` is next.
    Connect,
    /// The first snapshot is next, without waiting.
    FirstSnapshot,
    /// Snapshots follow changes, or the refresh interval.
    Live,
}

/// Where a dashboard stream is: envelopes queued to send, and what wakes it.
struct StreamState {
    control: Arc<ControlPlane>,
    changes: watch::Receiver<u64>,
    refresh: Duration,
    /// Envelopes still to send, last first.
    queue: Vec<Envelope>,
    phase: Phase,
}

impl StreamState {
    async fn next(&mut self) -> Envelope {
        if let Some(envelope) = self.queue.pop() {
            return envelope;
        }
        match self.phase {
            Phase::Connect => {
                self.phase = Phase::FirstSnapshot;
                self.changes.mark_unchanged();
                return Envelope::new("dashboard.stream", "stream.connected", json!({}));
            }
            Phase::FirstSnapshot => self.phase = Phase::Live,
            Phase::Live => {
                if let Ok(Err(_)) = tokio::time::timeout(self.refresh, self.changes.changed()).await
                {
                    // The server is going away: no more changes, only ticks.
                    tokio::time::sleep(self.refresh).await;
                }
                self.changes.mark_unchanged();
            }
        }
        let (status, list) = self.control.snapshot().await;
        self.queue = vec![list];
        status
    }
}

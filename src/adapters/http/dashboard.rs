//! The dashboard API for web front ends (SPEC A8): the control plane's
//! envelopes over plain REST and SSE. Every answer comes from
//! [`ControlTools`], the same tools `/mcp` calls; the status codes come from
//! matching their typed failures.
//!
//! `/api/stream` clients share one [`DashboardFeed`]: one refresher reads
//! the store once per change (and per refresh interval) and encodes the
//! snapshot once; every stream sends that same text. A stream counts as a
//! live client of the server and ends when the server shuts down.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use poem::web::sse::Event;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{ToJSON, Type};
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::ApiTags;
use super::dto::{ErrorBody, self_raw_value};
use crate::adapters::approval_broadcast::{ApprovalBroadcast, ApprovalListener};
use crate::adapters::control::{
    Answer, ControlTools, Envelope, ErrorKind, Failed, envelope_of, tools,
};
use crate::adapters::stream::{ClientSlot, SessionHub};
use crate::domain::control::ControlError;

pub struct DashboardApi {
    pub control: Arc<ControlTools>,
    /// The snapshot every `/api/stream` client sends.
    pub feed: Arc<DashboardFeed>,
    /// Counts `/api/stream` clients against the server's client limit.
    pub hub: Arc<SessionHub>,
    /// Cancelled at shutdown: open streams end then.
    pub close_streams: CancellationToken,
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
#[oai(bad_request_handler = "bad_query")]
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

/// A query parameter that does not parse (`?limit=abc`) is answered with the
/// same `error.invalid_arguments` envelope as one out of range.
fn bad_query(error: poem::Error) -> EnvelopeReply {
    EnvelopeReply::BadRequest(invalid_body("approval.list", &error))
}

impl From<Answer> for EnvelopeReply {
    fn from(answer: Answer) -> Self {
        let body = Json(envelope_of(&answer).into());
        match answer.err().map(|failed| failed.error.kind()) {
            Some(ErrorKind::StorageUnavailable) => Self::Unavailable(body),
            Some(ErrorKind::InvalidArguments) => Self::BadRequest(body),
            _ => Self::Ok(body),
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

fn invalid_body(tool: &'static str, error: &poem::Error) -> Json<EnvelopeBody> {
    let error = ControlError::InvalidArguments(error.to_string());
    Json(Failed::new(tool, error).envelope().into())
}

/// A 400 raised for `path` before its operation ran (a key given twice,
/// [`super::limits::KeyGivenTwice`]) in the shape the operation declares:
/// its tool's `error.invalid_arguments` envelope. `None` for the paths
/// whose 400 is no envelope.
pub(super) fn refused_body(path: &str, error: &poem::Error) -> Option<poem::Response> {
    use poem::IntoResponse;
    let tool = match path {
        "/api/actions" => "dashboard.action",
        _ if path.starts_with("/api/tools/") => "tools.call",
        _ => return None,
    };
    Some(
        invalid_body(tool, error)
            .with_status(poem::http::StatusCode::BAD_REQUEST)
            .into_response(),
    )
}

fn bad_action(error: poem::Error) -> ActionReply {
    ActionReply::BadRequest(invalid_body("dashboard.action", &error))
}

impl From<Answer> for ActionReply {
    fn from(answer: Answer) -> Self {
        let body = Json(envelope_of(&answer).into());
        match answer.err().map(|failed| failed.error.kind()) {
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

impl From<Answer> for ToolCallReply {
    fn from(answer: Answer) -> Self {
        let body = Json(envelope_of(&answer).into());
        match answer.err().map(|failed| failed.error.kind()) {
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
    /// (first page) envelopes, again whenever an approval is created or
    /// decided and at least every 5 s. `event:` is the envelope's type,
    /// `data:` the envelope. The stream ends when the server shuts down.
    #[oai(status = 200)]
    Ok(EventStream<BoxStream<'static, EncodedEnvelope>>),
    /// The server has as many live clients as `--max-clients` allows.
    #[oai(status = 429)]
    TooManyClients(Json<ErrorBody>),
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
        self.control.call(&name, args.0).await.into()
    }

    /// Live dashboard (SSE)
    #[oai(
        path = "/api/stream",
        method = "get",
        operation_id = "dashboard_stream",
        tag = "ApiTags::Dashboard"
    )]
    async fn stream(&self) -> StreamReply {
        let slot = match self.hub.admit_client() {
            Ok(slot) => slot,
            Err(e) => return StreamReply::TooManyClients(Json(ErrorBody::new(e.to_string()))),
        };
        let state = StreamState {
            _watching: self.feed.watching(),
            snapshots: self.feed.subscribe(),
            wake: Arc::clone(&self.feed.wake),
            queue: vec![EncodedEnvelope::encode(&Envelope::new(
                "dashboard.stream",
                "stream.connected",
                json!({}),
            ))],
            sent_snapshot: false,
            _slot: slot,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let next = state.next().await?;
            Some((next, state))
        })
        .take_until(self.close_streams.clone().cancelled_owned())
        .boxed();
        StreamReply::Ok(
            EventStream::new(stream).to_event(|envelope: EncodedEnvelope| {
                Event::message(&*envelope.json).event_type(&*envelope.kind)
            }),
        )
    }
}

/// An envelope encoded once, sent as is by every stream.
///
/// Its schema is [`EnvelopeBody`]'s; `Type` is written by hand so that the
/// text is not decoded and encoded again for each client.
#[derive(Debug, Clone)]
pub struct EncodedEnvelope {
    kind: Arc<str>,
    json: Arc<str>,
}

impl EncodedEnvelope {
    fn encode(envelope: &Envelope) -> Self {
        Self {
            kind: envelope.kind.as_str().into(),
            json: envelope.to_json().to_string().into(),
        }
    }
}

impl Type for EncodedEnvelope {
    self_raw_value!();

    fn name() -> Cow<'static, str> {
        EnvelopeBody::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        EnvelopeBody::schema_ref()
    }

    fn register(registry: &mut Registry) {
        EnvelopeBody::register(registry);
    }
}

impl ToJSON for EncodedEnvelope {
    fn to_json(&self) -> Option<Value> {
        serde_json::from_str(&self.json).ok()
    }
}

/// What every dashboard stream sends: `dashboard.status` then
/// `approval.list`.
type Snapshot = [EncodedEnvelope; 2];

/// The one snapshot all `/api/stream` clients share.
///
/// A refresher task, started by the first client, reads the control plane
/// whenever approvals change, a client asks for a first snapshot, or the
/// refresh interval passes, and only while some client watches: with no
/// client it drops the snapshot and reads nothing. It ends with the feed.
pub struct DashboardFeed {
    /// `None` while nobody watches (or before the first read).
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Asks the refresher for a snapshot now.
    wake: Arc<Notify>,
    /// The refresher, until the first client starts it.
    refresher: Mutex<Option<Refresher>>,
    /// Open streams: whether a decision is heard by a dashboard.
    streams: Arc<AtomicUsize>,
}

struct Refresher {
    control: Arc<ControlTools>,
    changes: watch::Receiver<u64>,
    refresh: Duration,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    wake: Arc<Notify>,
}

impl DashboardFeed {
    /// A feed of `control`'s snapshots, fresh on each of `events`' changes
    /// and at least every `refresh`; `events` also learns whether a stream
    /// is open.
    #[must_use]
    pub fn new(control: Arc<ControlTools>, events: &ApprovalBroadcast, refresh: Duration) -> Self {
        let (sender, snapshots) = watch::channel(None);
        let wake = Arc::new(Notify::new());
        let streams = Arc::new(AtomicUsize::new(0));
        events.add_listener(Box::new(OpenStreams(Arc::downgrade(&streams))));
        Self {
            streams,
            snapshots,
            wake: Arc::clone(&wake),
            refresher: Mutex::new(Some(Refresher {
                control,
                changes: events.subscribe(),
                refresh,
                snapshots: sender,
                wake,
            })),
        }
    }

    /// Counts a stream as open while the guard lives.
    fn watching(&self) -> Watching {
        self.streams.fetch_add(1, Ordering::SeqCst);
        Watching(Arc::clone(&self.streams))
    }

    /// A receiver of the snapshots, starting the refresher if it is the
    /// first. Must be called inside the runtime.
    fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let receiver = self.snapshots.clone();
        let refresher = self
            .refresher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(refresher) = refresher {
            tokio::spawn(refresher.run());
        }
        receiver
    }
}

impl Refresher {
    async fn run(mut self) {
        let mut changes_open = true;
        loop {
            // Seen before reading, so that a change made during the read
            // wakes the next one.
            self.changes.mark_unchanged();
            // The feed's own receiver watches nothing.
            if self.snapshots.receiver_count() > 1 {
                let (status, list) = self.control.snapshot().await;
                let snapshot = [
                    EncodedEnvelope::encode(&status),
                    EncodedEnvelope::encode(&list),
                ];
                self.snapshots.send_replace(Some(Arc::new(snapshot)));
            } else if self.snapshots.borrow().is_some() {
                self.snapshots.send_replace(None);
            }
            tokio::select! {
                () = self.snapshots.closed() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.refresh) => {}
                changed = self.changes.changed(), if changes_open => {
                    // Gone: the server is going away; only ticks from now.
                    changes_open = changed.is_ok();
                }
            }
        }
    }
}

/// The open streams as an approval listener: they wake on the broadcast's
/// version, so there is nothing more to tell them. Weak: the broadcast
/// outlives a feed built and dropped.
struct OpenStreams(Weak<AtomicUsize>);

impl ApprovalListener for OpenStreams {
    fn approvals_changed(&self) {}

    fn is_listening(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|streams| streams.load(Ordering::SeqCst) > 0)
    }
}

/// Counts one open stream.
struct Watching(Arc<AtomicUsize>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where one dashboard stream is.
struct StreamState {
    /// Counts the stream as open (a listener of approval changes).
    _watching: Watching,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    wake: Arc<Notify>,
    /// Envelopes still to send, last first.
    queue: Vec<EncodedEnvelope>,
    /// Whether this stream has sent a snapshot: later ones wait for a change.
    sent_snapshot: bool,
    /// Counts the stream as a live client while it is open.
    _slot: ClientSlot,
}

impl StreamState {
    /// The next envelope; `None` when the feed is gone.
    async fn next(&mut self) -> Option<EncodedEnvelope> {
        if let Some(envelope) = self.queue.pop() {
            return Some(envelope);
        }
        if self.sent_snapshot {
            self.snapshots.changed().await.ok()?;
        }
        let snapshot = loop {
            if let Some(snapshot) = self.snapshots.borrow_and_update().clone() {
                break snapshot;
            }
            // Nobody watched until now: ask for a first snapshot.
            self.wake.notify_one();
            self.snapshots.changed().await.ok()?;
        };
        self.sent_snapshot = true;
        let [status, list] = &*snapshot;
        self.queue = vec![list.clone()];
        Some(status.clone())
    }
}

//! An OpenAI-compatible facade (SPEC B14): `GET /v1/models` and
//! `POST /v1/chat/completions`, so that any OpenAI client (the official
//! SDKs, Open WebUI, LibreChat) talks to the agent with
//! `OPENAI_BASE_URL=http://HOST:PORT/v1` and the API key as its key.
//!
//! What it maps, and what it decides where OpenAI's API and ours differ:
//! - **Sessions.** The conversation is the session named by the request's
//!   `X-Session-Id` header, created when missing; without the header each
//!   request is a new session. The answer names the session in its own
//!   `X-Session-Id` header, so a client can continue it.
//! - **Messages.** The last `user` message is the prompt. Earlier messages
//!   are not replayed: the session's stored history is the conversation
//!   (an OpenAI client resends the whole conversation each time; the agent
//!   already has it).
//! - **Models.** `/v1/models` lists the configured agents. A request for
//!   the agent this server runs (or for no particular model: an empty
//!   `model`) runs a turn; an agent that is configured but not the active
//!   one is refused with 400 `model_not_active`, anything else with 404
//!   `model_not_found`.
//! - **Streaming** (`"stream": true`): the turn's tokens as
//!   `chat.completion.chunk` frames, then `data: [DONE]`. It is the same
//!   turn every other client of the session sees live: the frames come from
//!   the session's stream, filtered to this turn. Reasoning goes out as
//!   `delta.reasoning_content` (what Open WebUI and others show as
//!   thinking). A turn that ends badly after the first frame ends with one
//!   `data: {"error": {...}}` frame, as OpenAI's servers do. Leaving early
//!   does not stop the turn (B3).
//! - **Usage** counts are estimates: about four characters per token, of
//!   the prompt and of the answer (the agent's provider may not report
//!   any, and the history the agent also reads is not counted).
//! - **Errors** are OpenAI-shaped, `{"error": {"message", "type", "param",
//!   "code"}}`, with the status `/api/chat` would give (a turn that needs
//!   an approval: 409 `approval_unsupported`, with `x-should-retry: false`
//!   so that the SDKs, which retry a 409 by default, do not send the turn
//!   again).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::stream::BoxStream;
use poem::http::{HeaderValue, StatusCode};
use poem::web::sse::{Event, SSE};
use poem::web::{Data, Json};
use poem::{IntoResponse, Request, Response, handler};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapters::stream::{SessionHub, Subscription};
use crate::domain::chat::{ChatError, ChatReply, ChatService, TurnHandle};
use crate::domain::control::ControlPlane;
use crate::domain::events::APPROVAL_UNSUPPORTED_CODE;
use crate::domain::session::SessionId;
use crate::domain::session_service::SessionService;
use crate::ports::SessionStoreError;

/// The header naming the session a completion continues (and answers).
pub const SESSION_HEADER: &str = "x-session-id";

/// What the facade's handlers share.
pub struct Facade {
    pub chat: Arc<ChatService>,
    pub sessions: Arc<SessionService>,
    pub hub: Arc<SessionHub>,
    pub control: Arc<ControlPlane>,
}

/// An OpenAI error answer.
struct OpenAiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl OpenAiError {
    fn invalid(
        code: &'static str,
        message: impl Into<String>,
        param: Option<&'static str>,
    ) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            message: message.into(),
            param,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let conflict = self.status == StatusCode::CONFLICT;
        let mut response = Json(self.body()).with_status(self.status).into_response();
        if conflict {
            // OpenAI's SDKs retry a 409 unless told not to; sending the same
            // turn again would only record the same approval again.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

/// Whether `path` is the facade's: its errors are OpenAI's error object,
/// whoever raises them (the guard, the body limit, the router).
pub(super) fn serves(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// An error raised outside a facade handler (an unknown `/v1` path, a wrong
/// method, a body too large or too slow), as OpenAI's servers answer it.
pub(super) fn route_error(status: StatusCode, message: &str) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        _ if status.is_server_error() => "server_error",
        _ => "invalid_request",
    };
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    OpenAiError {
        status,
        kind,
        code,
        message: message.to_owned(),
        param: None,
    }
    .into_response()
}

/// A refusal of the guard (`super::auth`) on a `/v1` route, as OpenAI's
/// servers answer it: a 401 is what the SDKs parse into
/// `AuthenticationError`, a 403 into `PermissionDeniedError`.
pub(super) fn refusal(status: StatusCode, code: &'static str, message: &str) -> Response {
    OpenAiError {
        status,
        kind: "invalid_request_error",
        code,
        message: message.to_owned(),
        param: None,
    }
    .into_response()
}

impl From<ChatError> for OpenAiError {
    fn from(error: ChatError) -> Self {
        let (status, kind, code) = match &error {
            ChatError::EmptyMessage => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "empty_message",
            ),
            ChatError::InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            ChatError::TooManyQueued { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too_many_queued_turns",
            ),
            ChatError::Storage(SessionStoreError::TooManySessions(_)) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too_many_sessions",
            ),
            ChatError::ApprovalUnsupported { .. } => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                APPROVAL_UNSUPPORTED_CODE,
            ),
            ChatError::SessionDeleted { .. } => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "session_deleted",
            ),
            ChatError::Cancelled { .. } => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "turn_cancelled",
            ),
            ChatError::HistoryFull { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "history_full",
            ),
            ChatError::Provider { .. } => {
                (StatusCode::BAD_GATEWAY, "server_error", "provider_error")
            }
            ChatError::TimedOut { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", "turn_timeout")
            }
            ChatError::RuntimeUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "runtime_unavailable",
            ),
            ChatError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
            ),
            ChatError::ApprovalStorage { .. } | ChatError::Storage(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "storage_unavailable",
            ),
        };
        let message = match &error {
            ChatError::Storage(SessionStoreError::TooManySessions(_)) => error.to_string(),
            ChatError::Storage(e) => {
                tracing::error!(error = %e, "session store failed during a completion");
                "Session storage is unavailable".to_owned()
            }
            _ => error.to_string(),
        };
        Self {
            status,
            kind,
            code,
            message,
            param: None,
        }
    }
}

/// One message of a completion request: only the roles and the text matter.
#[derive(Deserialize)]
struct RequestMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `"text"` or `[{"type": "text", "text": "..."}, ...]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of `POST /v1/chat/completions` the facade reads; the rest
/// (temperature, tools, ...) is the agent's business and ignored.
#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: String,
    messages: Vec<RequestMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// About four characters per token: an estimate, said so in the module doc.
fn estimated_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

fn usage(prompt: &str, answer: &str) -> Value {
    let (prompt, completion) = (estimated_tokens(prompt), estimated_tokens(answer));
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// `GET /v1/models`: the configured agents.
#[handler]
pub fn models(facade: Data<&Arc<Facade>>) -> Response {
    let info = match facade.control.system_info() {
        Ok(info) => info,
        Err(error) => {
            return OpenAiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: "runtime_unavailable",
                message: error.to_string(),
                param: None,
            }
            .into_response();
        }
    };
    let created = unix_now().saturating_sub(info.uptime.as_secs());
    let data: Vec<Value> = info
        .agents
        .iter()
        .map(|agent| {
            json!({
                "id": agent.name,
                "object": "model",
                "created": created,
                "owned_by": "autopoiesis",
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `POST /v1/chat/completions`.
#[handler]
pub async fn completions(req: &Request, body: poem::Body, facade: Data<&Arc<Facade>>) -> Response {
    match complete(req, body, &facade).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// The agent a request asks for, checked against the configured ones.
fn check_model(facade: &Facade, model: &str) -> Result<String, OpenAiError> {
    let info = facade.control.system_info().map_err(|error| OpenAiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        code: "runtime_unavailable",
        message: error.to_string(),
        param: None,
    })?;
    if model.is_empty() || model == info.agent_name {
        return Ok(info.agent_name);
    }
    if info.agents.iter().any(|agent| agent.name == model) {
        return Err(OpenAiError::invalid(
            "model_not_active",
            format!(
                "Agent '{model}' is configured, but this server runs '{}'",
                info.agent_name
            ),
            Some("model"),
        ));
    }
    Err(OpenAiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "model_not_found",
        message: format!(
            "The model '{model}' does not exist; GET /v1/models lists this server's agents"
        ),
        param: Some("model"),
    })
}

async fn complete(
    req: &Request,
    body: poem::Body,
    facade: &Facade,
) -> Result<Response, OpenAiError> {
    let bytes = body.into_bytes().await.map_err(|error| {
        OpenAiError::invalid("invalid_body", format!("Unreadable body: {error}"), None)
    })?;
    let request: CompletionRequest = serde_json::from_slice(&bytes).map_err(|error| {
        OpenAiError::invalid(
            "invalid_body",
            format!("The body is not a chat completion request: {error}"),
            None,
        )
    })?;
    let model = check_model(facade, &request.model)?;
    let prompt = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_ref())
        .map(Content::text)
        .ok_or_else(|| {
            OpenAiError::invalid(
                "no_user_message",
                "messages has no user message: the last one is the prompt",
                Some("messages"),
            )
        })?;
    let session_id = match req.headers().get(SESSION_HEADER) {
        Some(raw) => raw
            .to_str()
            .ok()
            .and_then(|raw| SessionId::parse(raw).ok())
            .ok_or_else(|| {
                OpenAiError::invalid(
                    "invalid_session_id",
                    "X-Session-Id must be 1-128 characters of [A-Za-z0-9._:-]",
                    None,
                )
            })?,
        None => SessionId::generate(),
    };
    facade
        .sessions
        .open(&session_id)
        .await
        .map_err(|error| OpenAiError::from(ChatError::Storage(error)))?;
    // Subscribed before the turn is queued, so none of its events is missed.
    let subscription = if request.stream {
        Some(
            facade
                .hub
                .subscribe(&session_id, None)
                .await
                .map_err(|error| OpenAiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    kind: "rate_limit_error",
                    code: "too_many_connections",
                    message: error.to_string(),
                    param: None,
                })?,
        )
    } else {
        None
    };
    let turn = facade.chat.submit(&session_id, prompt.clone())?;
    let id = format!("chatcmpl-{}", turn.turn_id());
    let created = unix_now();
    let mut response = match subscription {
        None => {
            let reply = turn.outcome().await?;
            Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": "stop",
                }],
                "usage": usage(&prompt, &reply.content),
            }))
            .into_response()
        }
        Some(subscription) => {
            let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
            let chunks = Chunks {
                id,
                created,
                model,
                prompt,
                include_usage,
            };
            SSE::new(chunks.stream(subscription, turn)).into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(session_id.as_str()) {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    Ok(response)
}

/// What every chunk of one streamed completion repeats.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    prompt: String,
    include_usage: bool,
}

/// Where a streamed completion is.
#[derive(Clone, Copy)]
enum Step {
    /// The role chunk goes first.
    Start,
    /// Reading the session's stream for this turn's events.
    Streaming,
    /// The turn's terminal event came: its ending, then `[DONE]`.
    Ending,
    Done,
}

impl Chunks {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    fn event(value: &Value) -> Event {
        Event::message(value.to_string())
    }

    /// The completion's frames: a role chunk, a chunk per token (and per
    /// piece of reasoning) of this turn, the finishing chunk (or an error),
    /// the usage chunk when asked for, `[DONE]`.
    fn stream(self, subscription: Subscription, turn: TurnHandle) -> BoxStream<'static, Event> {
        let state = Streamed {
            turn_id: turn.turn_id().to_string(),
            chunks: self,
            subscription,
            outcome: Some(Box::pin(turn.outcome())),
            ended: None,
            step: Step::Start,
            text: String::new(),
        };
        futures::stream::unfold(state, |mut state| async move {
            let events = state.advance().await?;
            Some((futures::stream::iter(events), state))
        })
        .flatten()
        .boxed()
    }
}

type Outcome = Pin<Box<dyn Future<Output = Result<ChatReply, ChatError>> + Send>>;

/// How long the stream still reads after the turn ended without its
/// terminal event in view: a turn refused before it ran publishes nothing.
const AFTER_THE_END: Duration = Duration::from_millis(200);

/// A streamed completion as it goes.
struct Streamed {
    turn_id: String,
    chunks: Chunks,
    subscription: Subscription,
    /// The turn's ending, until it came.
    outcome: Option<Outcome>,
    ended: Option<Result<ChatReply, ChatError>>,
    step: Step,
    /// The answer so far, for the usage estimate.
    text: String,
}

impl Streamed {
    /// The next frames to send; `None` once `[DONE]` went.
    async fn advance(&mut self) -> Option<Vec<Event>> {
        let chunks = &self.chunks;
        let mut events = Vec::new();
        self.step = match self.step {
            Step::Start => {
                let role = json!({"role": "assistant", "content": ""});
                events.push(Chunks::event(&chunks.chunk(role, None)));
                Step::Streaming
            }
            Step::Streaming => loop {
                let frame = match self.outcome.as_mut() {
                    Some(outcome) => tokio::select! {
                        biased;
                        frame = self.subscription.next() => frame,
                        ended = outcome => {
                            self.ended = Some(ended);
                            self.outcome = None;
                            continue;
                        }
                    },
                    None => tokio::time::timeout(AFTER_THE_END, self.subscription.next())
                        .await
                        .ok()
                        .flatten(),
                };
                // Closed by the hub (this client did not read), or over:
                // the turn's ending says how it went.
                let Some(frame) = frame else {
                    break Step::Ending;
                };
                let Ok(frame) = serde_json::from_str::<Value>(&frame.json) else {
                    continue;
                };
                if frame["turn_id"].as_str() != Some(self.turn_id.as_str()) {
                    continue;
                }
                let content = frame["data"]["content"].as_str().unwrap_or_default();
                match frame["op"].as_str() {
                    Some("token") => {
                        self.text.push_str(content);
                        let delta = json!({"content": content});
                        events.push(Chunks::event(&chunks.chunk(delta, None)));
                        break Step::Streaming;
                    }
                    Some("thinking") => {
                        let delta = json!({"reasoning_content": content});
                        events.push(Chunks::event(&chunks.chunk(delta, None)));
                        break Step::Streaming;
                    }
                    Some("done" | "error" | "cancelled") => break Step::Ending,
                    _ => {}
                }
            },
            Step::Ending => {
                let ended = match (self.ended.take(), self.outcome.take()) {
                    (Some(ended), _) => ended,
                    (None, Some(outcome)) => outcome.await,
                    (None, None) => Err(ChatError::ShuttingDown),
                };
                match ended {
                    Ok(_) => {
                        events.push(Chunks::event(&chunks.chunk(json!({}), Some("stop"))));
                        if chunks.include_usage {
                            let mut last = chunks.chunk(json!({}), None);
                            last["choices"] = json!([]);
                            last["usage"] = usage(&chunks.prompt, &self.text);
                            events.push(Chunks::event(&last));
                        }
                    }
                    Err(error) => events.push(Chunks::event(&OpenAiError::from(error).body())),
                }
                events.push(Event::message("[DONE]"));
                Step::Done
            }
            Step::Done => return None,
        };
        Some(events)
    }
}

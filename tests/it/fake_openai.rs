//! A fake OpenAI-compatible Chat Completions server: a real HTTP server on
//! 127.0.0.1 that answers `POST /v1/chat/completions` from a script, so the
//! `openai` runtime (and the server above it) can be tested over a real
//! socket without a model.
//!
//! ```ignore
//! let fake = FakeOpenAi::start(vec![Reply::text(["Hel", "lo"])]).await;
//! // point the runtime at fake.base_url, run a turn, then:
//! assert_eq!(fake.requests()[0]["messages"][0]["content"], "hi");
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use poem::http::{HeaderMap, StatusCode, header};
use poem::listener::TcpAcceptor;
use poem::web::{Data, Json};
use poem::{Body, EndpointExt, Response, Route, Server, handler, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The model name every streamed chunk carries, so a test can tell it from
/// the model name the request asked for.
pub const SERVED_MODEL: &str = "fake-gpt-served";

/// One scripted answer; each request takes the next one.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Streams each piece as a content delta, then `finish_reason: "stop"`,
    /// a usage chunk with no choices, and `[DONE]`.
    Text(Vec<String>),
    /// Streams `reasoning` as `reasoning_content` deltas, then `text` as
    /// content deltas, then `stop` and `[DONE]`.
    Thinking {
        reasoning: Vec<String>,
        text: Vec<String>,
    },
    /// Streams one tool call, its arguments split across several deltas,
    /// then `finish_reason: "tool_calls"` and `[DONE]`. Its id is
    /// `call_fake_N`, N being the request's 0-based number.
    ToolCall { name: String, args_json: String },
    /// Answers this status with this body (as JSON when it parses as JSON).
    Status(u16, String),
    /// Sends the response head, then nothing until the fake is dropped.
    Hang,
    /// Sends a chunk that is not JSON.
    Malformed,
    /// Sends these chunks as they are, then `[DONE]` only when `done`: for
    /// error chunks and streams that end early or without `[DONE]`.
    Chunks { chunks: Vec<Value>, done: bool },
}

impl Reply {
    pub fn text<S: Into<String>>(tokens: impl IntoIterator<Item = S>) -> Self {
        Self::Text(strings(tokens))
    }

    pub fn thinking<R: Into<String>, T: Into<String>>(
        reasoning: impl IntoIterator<Item = R>,
        text: impl IntoIterator<Item = T>,
    ) -> Self {
        Self::Thinking {
            reasoning: strings(reasoning),
            text: strings(text),
        }
    }

    pub fn tool_call(name: impl Into<String>, args_json: impl Into<String>) -> Self {
        Self::ToolCall {
            name: name.into(),
            args_json: args_json.into(),
        }
    }

    pub fn status(status: u16, body: impl Into<String>) -> Self {
        Self::Status(status, body.into())
    }
}

/// A stream chunk with one choice carrying `delta`, as the fake sends them;
/// for building [`Reply::Chunks`].
pub fn chunk(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
}

/// A base URL where nothing listens: connecting to it is refused.
pub fn unreachable_base_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = listener.local_addr().expect("the port's address");
    drop(listener);
    format!("http://{addr}/v1")
}

/// What the fake received.
#[derive(Debug, Clone)]
struct Recorded {
    body: Value,
    authorization: Option<String>,
}

struct State {
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Recorded>>,
    /// Pause between streamed chunks, to watch streaming and cancellation.
    token_delay: Duration,
    /// Ends hanging answers when the fake is dropped.
    shutdown: CancellationToken,
}

/// A running fake; dropping it stops the server.
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`: what `OPENAI_BASE_URL` would hold.
    pub base_url: String,
    state: Arc<State>,
}

impl FakeOpenAi {
    /// Starts a fake that answers with `replies`, in order, and with a 500
    /// once they run out.
    pub async fn start(replies: Vec<Reply>) -> Self {
        Self::start_with_token_delay(replies, Duration::ZERO).await
    }

    /// Like [`FakeOpenAi::start`], pausing `token_delay` between chunks.
    pub async fn start_with_token_delay(replies: Vec<Reply>, token_delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake OpenAI server");
        let addr = listener.local_addr().expect("the fake's address");
        let acceptor = TcpAcceptor::from_tokio(listener).expect("accept on the fake's listener");
        let state = Arc::new(State {
            script: Mutex::new(replies.into()),
            received: Mutex::default(),
            token_delay,
            shutdown: CancellationToken::new(),
        });
        let app = Route::new()
            .at("/v1/chat/completions", post(chat_completions))
            .data(Arc::clone(&state));
        let shutdown = state.shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            // Dropped with the test's runtime at the latest; an error here
            // shows up as the test's requests failing.
            let _ = Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_secs(1)))
                .await;
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            state,
        }
    }

    /// Appends a reply to the script.
    pub fn push(&self, reply: Reply) {
        lock(&self.state.script).push_back(reply);
    }

    /// The JSON bodies of the requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.state.received)
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// The `Authorization` header of each request received so far.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        lock(&self.state.received)
            .iter()
            .map(|r| r.authorization.clone())
            .collect()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

/// A test that panicked while holding a lock should not hide the records.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Vec<String> {
    items.into_iter().map(Into::into).collect()
}

#[handler]
fn chat_completions(
    state: Data<&Arc<State>>,
    headers: &HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let number = {
        let mut received = lock(&state.received);
        received.push(Recorded {
            body,
            authorization,
        });
        received.len() - 1
    };
    let Some(reply) = lock(&state.script).pop_front() else {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(format!(
                "fake openai: no scripted reply left for request {number}"
            ));
    };
    match reply {
        Reply::Status(status, body) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = if serde_json::from_str::<Value>(&body).is_ok() {
                "application/json"
            } else {
                "text/plain"
            };
            Response::builder()
                .status(status)
                .content_type(content_type)
                .body(body)
        }
        Reply::Hang => {
            let shutdown = state.shutdown.clone();
            let nothing = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>()
                .take_until(shutdown.cancelled_owned());
            event_stream(Body::from_bytes_stream(nothing))
        }
        other => {
            let events = sse_events(other, number);
            let delay = state.token_delay;
            let paced = futures::stream::iter(events.into_iter().enumerate()).then(
                move |(i, event)| async move {
                    if i > 0 && !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, std::io::Error>(event.into_bytes())
                },
            );
            event_stream(Body::from_bytes_stream(paced))
        }
    }
}

fn event_stream(body: Body) -> Response {
    Response::builder()
        .content_type("text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

/// The SSE events of a streamed reply, each one complete with its blank line.
fn sse_events(reply: Reply, number: usize) -> Vec<String> {
    let data = |chunk: &Value| format!("data: {chunk}\n\n");
    let done = "data: [DONE]\n\n".to_owned();
    let opening = chunk(json!({"role": "assistant", "content": ""}), None);
    let mut events = vec![data(&opening)];
    match reply {
        Reply::Text(tokens) => {
            events.extend(
                tokens
                    .iter()
                    .map(|t| data(&chunk(json!({"content": t}), None))),
            );
            events.push(data(&chunk(json!({}), Some("stop"))));
            let usage = json!({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                "model": SERVED_MODEL, "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": tokens.len(), "total_tokens": 1 + tokens.len()},
            });
            events.push(data(&usage));
            events.push(done);
        }
        Reply::Thinking { reasoning, text } => {
            events.extend(
                reasoning
                    .iter()
                    .map(|r| data(&chunk(json!({"reasoning_content": r}), None))),
            );
            events.extend(
                text.iter()
                    .map(|t| data(&chunk(json!({"content": t}), None))),
            );
            events.push(data(&chunk(json!({}), Some("stop"))));
            events.push(done);
        }
        Reply::ToolCall { name, args_json } => {
            let id = format!("call_fake_{number}");
            events.push(data(&chunk(
                json!({"tool_calls": [{"index": 0, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None,
            )));
            events.extend(thirds(&args_json).into_iter().map(|piece| {
                data(&chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    None,
                ))
            }));
            events.push(data(&chunk(json!({}), Some("tool_calls"))));
            events.push(done);
        }
        Reply::Malformed => {
            events.push("data: {\"choices\": [{\"delta\": {\"content\": \"oops\"\n\n".to_owned());
            events.push(done);
        }
        Reply::Chunks {
            chunks,
            done: with_done,
        } => {
            events = chunks.iter().map(data).collect();
            if with_done {
                events.push(done);
            }
        }
        Reply::Status(..) | Reply::Hang => unreachable!("answered without a stream"),
    }
    events
}

/// `text` cut into three pieces at character boundaries, as a model streams
/// tool arguments.
fn thirds(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(3).max(1);
    chars
        .chunks(size)
        .map(|piece| piece.iter().collect())
        .collect()
}

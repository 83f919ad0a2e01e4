//! The `openai` runtime: an adapter behind the [`AgentRuntime`] port that
//! drives any OpenAI-compatible Chat Completions endpoint (OpenAI, Ollama,
//! vLLM, llama.cpp server, OpenRouter, LM Studio), streaming over SSE.
//!
//! One turn is one `POST {base_url}/chat/completions` with `stream: true`.
//! The session's history (pydantic-ai shape) is translated into OpenAI
//! messages here, and the streamed deltas are translated back into
//! [`AgentEvent`]s and one [`AgentReply`]; nothing outside this file knows
//! the wire format.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use crate::domain::agent::{AgentError, AgentEvent, AgentReply, ToolSpec};
use crate::domain::message::{ModelMessage, RequestPart, ResponsePart};
use crate::ports::{AgentRuntime, EventSink, TurnInput};

/// Where requests go when `OPENAI_BASE_URL` is not set.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The idle timeout used when the settings give zero: a zero timeout would
/// fail every turn at once, and `ProviderEnv::default()` holds zero.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a tool call the model never got an answer to is told, so the next
/// request is valid: the API rejects an assistant `tool_calls` message that
/// is not followed by a `tool` message for each call, and this server defers
/// every tool call without running it.
const UNANSWERED_TOOL_CALL: &str =
    "Not run: this tool call needed a human's approval, which was not given.";

/// How much of an error body is read, and how much of it is quoted.
const ERROR_BODY_LIMIT: usize = 8 * 1024;
const ERROR_SNIPPET_CHARS: usize = 200;

/// How to reach the provider and what to offer the model.
#[derive(Clone)]
pub struct OpenAiSettings {
    /// The API root, e.g. `https://api.openai.com/v1` or
    /// `http://localhost:11434/v1`; `/chat/completions` is appended.
    pub base_url: String,
    /// Sent as a bearer token when set; local servers usually need none.
    pub api_key: Option<String>,
    /// The provider's model name (`gpt-4o-mini`, `llama3.2`, ...).
    pub model: String,
    /// Tools offered to the model; empty means the request offers none.
    pub tools: Vec<ToolSpec>,
    /// Longest wait for any one step: connecting, the response head, the next
    /// bytes of the stream. Zero means [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

/// Hand-written so the key (and whatever secret the base URL holds) never
/// reaches a log line.
impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &provider_origin(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("tools", &self.tools)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

pub struct OpenAiRuntime {
    /// Built once so connections (and TLS sessions) are reused across turns.
    client: reqwest::Client,
    /// The provider as clients may see it: scheme, host and port only. A
    /// base URL can carry credentials (`user:password@`, `?api-key=`), and
    /// error messages reach every client of a session.
    provider: String,
    /// `{base_url}/chat/completions`, with the base URL's query kept.
    endpoint: reqwest::Url,
    api_key: Option<String>,
    /// Secrets of the base URL (its password, query values), cut
    /// from any message that might quote them back.
    url_secrets: Vec<String>,
    model: String,
    /// The `tools` array of every request, rendered once.
    tools: Vec<Value>,
    idle_timeout: Duration,
}

impl OpenAiRuntime {
    /// Checks the settings and builds the HTTP client.
    ///
    /// # Errors
    /// A message when the base URL is not an http(s) URL or the HTTP client
    /// cannot be built.
    pub fn new(settings: OpenAiSettings) -> Result<Self, String> {
        // These messages become the runtime's "unavailable" reason, which
        // clients see: they never quote the URL, which may hold secrets.
        let mut endpoint = reqwest::Url::parse(settings.base_url.trim())
            .map_err(|e| format!("the base URL (OPENAI_BASE_URL) is not a URL: {e}"))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(format!(
                "the base URL (OPENAI_BASE_URL) is not an http(s) URL (scheme {:?})",
                endpoint.scheme()
            ));
        }
        let path = format!("{}/chat/completions", endpoint.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        let mut url_secrets: Vec<String> = endpoint
            .query_pairs()
            .map(|(_, value)| value.into_owned())
            .chain(endpoint.password().map(str::to_owned))
            // Shorter values (`?v=1`) are no secret and would mangle messages.
            .filter(|secret| secret.len() >= 4)
            .collect();
        if let Some(query) = endpoint.query() {
            url_secrets.push(query.to_owned());
        }
        let idle_timeout = if settings.idle_timeout.is_zero() {
            DEFAULT_IDLE_TIMEOUT
        } else {
            settings.idle_timeout
        };
        let client = reqwest::Client::builder()
            .connect_timeout(idle_timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", root_cause(&e)))?;
        Ok(Self {
            client,
            provider: origin(&endpoint),
            endpoint,
            api_key: settings.api_key.filter(|key| !key.is_empty()),
            url_secrets,
            model: settings.model,
            tools: settings.tools.iter().map(tool_json).collect(),
            idle_timeout,
        })
    }

    fn request_body(&self, input: &TurnInput) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": openai_messages(&input.history, &input.prompt),
            "stream": true,
        });
        if !self.tools.is_empty() {
            body["tools"] = Value::Array(self.tools.clone());
        }
        body
    }

    /// Sends the request and waits for the response head.
    async fn send(&self, body: &Value) -> Result<reqwest::Response, String> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        match tokio::time::timeout(self.idle_timeout, request.send()).await {
            Err(_) => Err(format!(
                "the model provider at {} did not answer within {}",
                self.provider,
                seconds(self.idle_timeout)
            )),
            Ok(Err(e)) if e.is_connect() => Err(format!(
                "cannot reach the model provider at {}: {}",
                self.provider,
                root_cause(&e)
            )),
            Ok(Err(e)) => Err(format!(
                "the request to the model provider at {} failed: {}",
                self.provider,
                root_cause(&e)
            )),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Describes an error status, quoting what the provider said about it.
    async fn status_error(&self, response: reqwest::Response) -> String {
        let status = response.status();
        let body = self.read_error_body(response).await;
        let snippet = error_snippet(&body);
        if snippet.is_empty() {
            format!("the model provider at {} answered {status}", self.provider)
        } else {
            format!(
                "the model provider at {} answered {status}: {snippet}",
                self.provider
            )
        }
    }

    /// The start of an error body; whatever arrived if it stalls or breaks,
    /// since the status alone already says what failed.
    async fn read_error_body(&self, response: reqwest::Response) -> String {
        let mut body = Vec::new();
        let mut chunks = pin!(tokio_stream::StreamExt::timeout(
            response.bytes_stream(),
            self.idle_timeout
        ));
        while let Some(Ok(Ok(chunk))) = chunks.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= ERROR_BODY_LIMIT {
                break;
            }
        }
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Reads the SSE stream to its end, feeding each chunk to `assembly`.
    async fn read_stream(
        &self,
        response: reqwest::Response,
        assembly: &mut Assembly,
        sink: &dyn EventSink,
    ) -> Result<(), String> {
        let bytes = tokio_stream::StreamExt::timeout(response.bytes_stream(), self.idle_timeout)
            .map(|item| match item {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(e)) => Err(ReadError::Http(e)),
                Err(_) => Err(ReadError::Idle),
            });
        let mut events = pin!(bytes.eventsource());
        let mut done = false;
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| self.describe_read_error(e))?;
            if event.event == "error" {
                return Err(format!(
                    "the model provider reported an error: {}",
                    error_snippet(&event.data)
                ));
            }
            if event.data.trim() == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Value = serde_json::from_str(&event.data)
                .map_err(|e| format!("the model provider sent a malformed stream chunk: {e}"))?;
            assembly.apply(&chunk, sink)?;
        }
        // Some servers end the stream after the finish_reason without
        // `[DONE]`; only a stream with neither was cut short.
        if done || assembly.finished {
            Ok(())
        } else {
            Err("the model provider's stream ended before the answer was complete".into())
        }
    }

    fn describe_read_error(&self, error: EventStreamError<ReadError>) -> String {
        match error {
            EventStreamError::Transport(ReadError::Idle) => format!(
                "the model provider's stream sent nothing for {}",
                seconds(self.idle_timeout)
            ),
            EventStreamError::Transport(ReadError::Http(e)) => {
                format!("the model provider's stream broke: {}", root_cause(&e))
            }
            EventStreamError::Utf8(e) => {
                format!("the model provider's stream is not UTF-8: {e}")
            }
            EventStreamError::Parser(e) => {
                format!("the model provider's stream is not valid SSE: {:?}", e.code)
            }
        }
    }

    /// Every message leaves through here, so neither the key nor a secret
    /// of the base URL can be in one, whatever a provider echoes back. The
    /// log gets the endpoint's path too (still without secrets).
    fn provider_error(&self, message: String) -> AgentError {
        let message = self
            .api_key
            .iter()
            .chain(&self.url_secrets)
            .fold(message, |message, secret| {
                message.replace(secret.as_str(), "<redacted>")
            });
        tracing::warn!(
            provider.url = %format_args!("{}{}", self.provider, self.endpoint.path()),
            error = %message,
            "model provider failed"
        );
        AgentError::Provider(message)
    }
}

#[async_trait]
impl AgentRuntime for OpenAiRuntime {
    async fn run_turn(
        &self,
        input: TurnInput,
        sink: Arc<dyn EventSink>,
    ) -> Result<AgentReply, AgentError> {
        let sink = sink.as_ref();
        let body = self.request_body(&input);
        let response = self.send(&body).await.map_err(|m| self.provider_error(m))?;
        if !response.status().is_success() {
            let message = self.status_error(response).await;
            return Err(self.provider_error(message));
        }
        let mut assembly = Assembly::default();
        self.read_stream(response, &mut assembly, sink)
            .await
            .map_err(|m| self.provider_error(m))?;
        Ok(assembly.finish(&self.model, sink))
    }

    fn model_name(&self) -> String {
        self.model.clone()
    }
}

/// Scheme, host and port of a URL: all of it that clients may see.
fn origin(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// [`origin`] of a URL not parsed yet (for `Debug`).
fn provider_origin(base_url: &str) -> String {
    reqwest::Url::parse(base_url).map_or_else(|_| "<not a URL>".to_owned(), |url| origin(&url))
}

/// Why the byte stream under the SSE parser stopped.
#[derive(Debug)]
enum ReadError {
    Http(reqwest::Error),
    /// No bytes for the idle timeout.
    Idle,
}

/// One offered tool, as the `tools` array wants it.
fn tool_json(tool: &ToolSpec) -> Value {
    json!({
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        }
    })
}

/// The request's `messages`: the history, then the new prompt.
///
/// Tool calls left without a return (this server defers them all) get a
/// synthetic `tool` answer before the conversation moves on, because the API
/// rejects a history where they have none.
fn openai_messages(history: &[ModelMessage], prompt: &str) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut unanswered: Vec<String> = Vec::new();
    for message in history {
        match message {
            ModelMessage::Request { parts } => {
                // Tool returns first: they must directly follow the
                // assistant message that made the calls.
                for part in parts {
                    if let RequestPart::ToolReturn {
                        content,
                        tool_call_id,
                        ..
                    } = part
                    {
                        unanswered.retain(|id| id != tool_call_id);
                        messages.push(json!({
                            "role": "tool",
                            "tool_call_id": tool_call_id,
                            "content": text_or_json(content),
                        }));
                    }
                }
                answer_unanswered(&mut messages, &mut unanswered);
                for part in parts {
                    if let RequestPart::UserPrompt { content, .. } = part {
                        messages.push(json!({"role": "user", "content": content}));
                    }
                }
            }
            ModelMessage::Response { parts, .. } => {
                answer_unanswered(&mut messages, &mut unanswered);
                if let Some(assistant) = assistant_message(parts) {
                    unanswered = parts
                        .iter()
                        .filter_map(|part| match part {
                            ResponsePart::ToolCall { tool_call_id, .. } => {
                                Some(tool_call_id.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    messages.push(assistant);
                }
            }
        }
    }
    answer_unanswered(&mut messages, &mut unanswered);
    messages.push(json!({"role": "user", "content": prompt}));
    messages
}

fn answer_unanswered(messages: &mut Vec<Value>, unanswered: &mut Vec<String>) {
    for tool_call_id in unanswered.drain(..) {
        messages.push(json!({
            "role": "tool",
            "tool_call_id": tool_call_id,
            "content": UNANSWERED_TOOL_CALL,
        }));
    }
}

/// A response as one assistant message; `None` when it holds neither text
/// nor tool calls (only thinking, which is not sent back), because the API
/// rejects an assistant message with neither.
fn assistant_message(parts: &[ResponsePart]) -> Option<Value> {
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for part in parts {
        match part {
            ResponsePart::Text { content } => {
                text.get_or_insert_with(String::new).push_str(content)
            }
            ResponsePart::Thinking { .. } => {}
            ResponsePart::ToolCall {
                tool_name,
                args,
                tool_call_id,
            } => tool_calls.push(json!({
                "id": tool_call_id,
                "type": "function",
                "function": {"name": tool_name, "arguments": text_or_json(args)},
            })),
        }
    }
    if text.is_none() && tool_calls.is_empty() {
        return None;
    }
    let mut message = json!({"role": "assistant", "content": text});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    Some(message)
}

/// A string as itself, anything else as its JSON text: tool arguments the
/// model got wrong are kept as the raw string it sent, and go back verbatim.
fn text_or_json(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A tool call being put together from its deltas.
#[derive(Debug, Default)]
struct PartialToolCall {
    id: String,
    name: String,
    arguments: String,
}

/// The answer being put together from the stream's chunks, emitting events
/// as they come.
#[derive(Debug, Default)]
struct Assembly {
    /// The model that actually answered, as the chunks name it.
    model: Option<String>,
    text: String,
    thinking: String,
    /// Whether a `ThinkingStart` awaits its `ThinkingDone`.
    thinking_open: bool,
    /// By the `index` the deltas carry: calls may interleave.
    tool_calls: BTreeMap<u64, PartialToolCall>,
    /// A choice carried a `finish_reason`.
    finished: bool,
}

impl Assembly {
    /// Takes in one parsed chunk.
    ///
    /// # Errors
    /// The provider's message when the chunk is an error report.
    fn apply(&mut self, chunk: &Value, sink: &dyn EventSink) -> Result<(), String> {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(format!(
                "the model provider reported an error: {}",
                error_message(error)
            ));
        }
        if let Some(model) = chunk
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            self.model = Some(model.to_owned());
        }
        // Usage chunks have no choices; only the first choice is asked for.
        let Some(choice) = chunk.pointer("/choices/0") else {
            return Ok(());
        };
        if let Some(delta) = choice.get("delta") {
            self.apply_delta(delta, sink);
        }
        if choice.get("finish_reason").is_some_and(|r| !r.is_null()) {
            self.finished = true;
        }
        Ok(())
    }

    fn apply_delta(&mut self, delta: &Value, sink: &dyn EventSink) {
        // DeepSeek and vLLM say `reasoning_content`; Ollama and OpenRouter
        // say `reasoning`.
        let reasoning = ["reasoning_content", "reasoning"].iter().find_map(|key| {
            delta
                .get(*key)
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
        });
        if let Some(reasoning) = reasoning {
            if !self.thinking_open {
                self.thinking_open = true;
                sink.emit(AgentEvent::ThinkingStart);
            }
            self.thinking.push_str(reasoning);
            sink.emit(AgentEvent::Thinking(reasoning.to_owned()));
        }
        if let Some(content) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
        {
            self.close_thinking(sink);
            self.text.push_str(content);
            sink.emit(AgentEvent::Token(content.to_owned()));
        }
        if let Some(calls) = delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty())
        {
            self.close_thinking(sink);
            for (position, call) in calls.iter().enumerate() {
                self.apply_tool_call_delta(position, call);
            }
        }
    }

    fn apply_tool_call_delta(&mut self, position: usize, delta: &Value) {
        let id = delta
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty());
        let index = match delta.get("index").and_then(Value::as_u64) {
            Some(index) => index,
            // A few servers omit `index`: a new id starts a new call, and
            // anything else continues the latest one.
            None => {
                let last = self.tool_calls.keys().next_back().copied();
                match (id, last) {
                    (Some(id), Some(last)) if self.tool_calls.values().all(|c| c.id != id) => {
                        last + 1
                    }
                    (_, Some(last)) => last,
                    (_, None) => position as u64,
                }
            }
        };
        let call = self.tool_calls.entry(index).or_default();
        if let Some(id) = id
            && call.id.is_empty()
        {
            id.clone_into(&mut call.id);
        }
        // The name comes whole in one delta; some servers repeat it in every
        // delta, so only the first one counts.
        if let Some(name) = delta.pointer("/function/name").and_then(Value::as_str)
            && call.name.is_empty()
        {
            name.clone_into(&mut call.name);
        }
        match delta.pointer("/function/arguments") {
            Some(Value::String(fragment)) => call.arguments.push_str(fragment),
            // Some servers send the arguments as an object, not as JSON text.
            Some(Value::Null) | None => {}
            Some(other) => call.arguments.push_str(&other.to_string()),
        }
    }

    fn close_thinking(&mut self, sink: &dyn EventSink) {
        if self.thinking_open {
            self.thinking_open = false;
            sink.emit(AgentEvent::ThinkingDone);
        }
    }

    /// Ends the answer: closes the thinking, emits the assembled tool calls
    /// and builds the reply.
    fn finish(mut self, fallback_model: &str, sink: &dyn EventSink) -> AgentReply {
        self.close_thinking(sink);
        let mut parts = Vec::new();
        if !self.thinking.is_empty() {
            parts.push(ResponsePart::Thinking {
                content: self.thinking,
            });
        }
        if !self.text.is_empty() {
            parts.push(ResponsePart::Text { content: self.text });
        }
        for call in self.tool_calls.into_values() {
            let tool_call_id = if call.id.is_empty() {
                // llama.cpp and some Ollama versions send no id; the history
                // needs one to pair the call with its return.
                format!("call_{}", uuid::Uuid::new_v4().simple())
            } else {
                call.id
            };
            let args = parse_arguments(&call.arguments);
            sink.emit(AgentEvent::ToolCall {
                tool_call_id: tool_call_id.clone(),
                name: call.name.clone(),
                args: args.clone(),
            });
            parts.push(ResponsePart::ToolCall {
                tool_name: call.name,
                args,
                tool_call_id,
            });
        }
        AgentReply {
            model_name: self.model.unwrap_or_else(|| fallback_model.to_owned()),
            parts,
        }
    }
}

/// The model's tool arguments as JSON: none means `{}`, and text that is not
/// JSON is kept as a string so the human who approves sees what was asked.
fn parse_arguments(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(Map::new());
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_owned()))
}

/// What an error body says, in one short line: the provider's `error.message`
/// (or `error` string, as Ollama sends) when it is JSON, else its start.
fn error_snippet(body: &str) -> String {
    let said = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|json| json.get("error").map(error_message))
        .unwrap_or_else(|| body.to_owned());
    let line = said.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(ERROR_SNIPPET_CHARS) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

fn error_message(error: &Value) -> String {
    match error {
        Value::String(message) => message.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| other.to_string(), str::to_owned),
    }
}

/// The innermost cause, which is the one that says what happened
/// ("Connection refused") where the outer ones say "error sending request".
fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::{DateTime, Utc};

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<AgentEvent>>);

    impl EventSink for Recorder {
        fn emit(&self, event: AgentEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    impl Recorder {
        fn events(&self) -> Vec<AgentEvent> {
            self.0.lock().unwrap().clone()
        }
    }

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn response(parts: Vec<ResponsePart>) -> ModelMessage {
        ModelMessage::Response {
            parts,
            model_name: Some("m".into()),
            timestamp: at(),
        }
    }

    fn feed(chunks: &[Value]) -> (Assembly, Recorder) {
        let sink = Recorder::default();
        let mut assembly = Assembly::default();
        for chunk in chunks {
            assembly.apply(chunk, &sink).unwrap();
        }
        (assembly, sink)
    }

    fn delta(delta: Value) -> Value {
        json!({"model": "served", "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
    }

    #[test]
    fn history_becomes_user_assistant_and_tool_messages_then_the_prompt() {
        let history = vec![
            ModelMessage::user_prompt("list files", at()),
            response(vec![
                ResponsePart::Thinking {
                    content: "hm".into(),
                },
                ResponsePart::Text {
                    content: "Sure.".into(),
                },
                ResponsePart::ToolCall {
                    tool_name: "execute".into(),
                    args: json!({"command": "ls"}),
                    tool_call_id: "c1".into(),
                },
            ]),
            ModelMessage::Request {
                parts: vec![RequestPart::ToolReturn {
                    tool_name: "execute".into(),
                    content: json!({"stdout": "a b"}),
                    tool_call_id: "c1".into(),
                    timestamp: at(),
                }],
            },
            response(vec![ResponsePart::Text {
                content: "a and b".into(),
            }]),
        ];
        assert_eq!(
            openai_messages(&history, "thanks"),
            vec![
                json!({"role": "user", "content": "list files"}),
                json!({"role": "assistant", "content": "Sure.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "execute", "arguments": "{\"command\":\"ls\"}"}}
                ]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "{\"stdout\":\"a b\"}"}),
                json!({"role": "assistant", "content": "a and b"}),
                json!({"role": "user", "content": "thanks"}),
            ]
        );
    }

    #[test]
    fn a_tool_call_with_no_text_sends_null_content_and_raw_string_arguments_verbatim() {
        let history = vec![response(vec![ResponsePart::ToolCall {
            tool_name: "execute".into(),
            args: json!("{not json"),
            tool_call_id: "c1".into(),
        }])];
        let messages = openai_messages(&history, "next");
        assert_eq!(messages[0]["content"], Value::Null);
        assert_eq!(
            messages[0]["tool_calls"][0]["function"]["arguments"],
            "{not json"
        );
    }

    #[test]
    fn a_deferred_tool_call_gets_a_synthetic_answer_before_the_next_prompt() {
        let history = vec![
            ModelMessage::user_prompt("go", at()),
            response(vec![ResponsePart::ToolCall {
                tool_name: "execute".into(),
                args: json!({}),
                tool_call_id: "c1".into(),
            }]),
        ];
        let messages = openai_messages(&history, "and now?");
        assert_eq!(
            messages[2],
            json!({"role": "tool", "tool_call_id": "c1", "content": UNANSWERED_TOOL_CALL})
        );
        assert_eq!(messages[3], json!({"role": "user", "content": "and now?"}));
        assert_eq!(messages.len(), 4);
    }

    #[test]
    fn a_response_with_only_thinking_is_not_sent() {
        let history = vec![
            ModelMessage::user_prompt("hi", at()),
            response(vec![ResponsePart::Thinking {
                content: "hm".into(),
            }]),
        ];
        let messages = openai_messages(&history, "again");
        assert_eq!(
            messages,
            vec![
                json!({"role": "user", "content": "hi"}),
                json!({"role": "user", "content": "again"}),
            ]
        );
    }

    #[test]
    fn tools_are_offered_as_functions_and_omitted_when_there_are_none() {
        let settings = |tools| OpenAiSettings {
            base_url: "http://127.0.0.1:1/v1/".into(),
            api_key: None,
            model: "m".into(),
            tools,
            idle_timeout: Duration::from_secs(1),
        };
        let input = TurnInput {
            prompt: "hi".into(),
            history: vec![].into(),
        };
        let with = OpenAiRuntime::new(settings(crate::domain::agent::tool_catalogue())).unwrap();
        let body = with.request_body(&input);
        assert_eq!(
            with.endpoint.as_str(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
        assert_eq!(body["stream"], true);
        assert_eq!(body["tools"][0]["type"], "function");
        assert_eq!(body["tools"][0]["function"]["name"], "execute");
        assert!(body["tools"][0]["function"]["parameters"].is_object());
        let without = OpenAiRuntime::new(settings(vec![])).unwrap();
        assert!(without.request_body(&input).get("tools").is_none());
    }

    #[test]
    fn only_http_and_https_base_urls_are_accepted() {
        let settings = |base_url: &str| OpenAiSettings {
            base_url: base_url.into(),
            api_key: Some("sk-secret".into()),
            model: "m".into(),
            tools: vec![],
            idle_timeout: Duration::ZERO,
        };
        assert!(OpenAiRuntime::new(settings("ftp://example.com")).is_err());
        assert!(OpenAiRuntime::new(settings("not a url")).is_err());
        let runtime = OpenAiRuntime::new(settings("https://example.com/v1")).unwrap();
        assert_eq!(runtime.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert!(!format!("{:?}", settings("x")).contains("sk-secret"));
    }

    #[tokio::test]
    async fn provider_errors_name_only_the_scheme_host_and_port_of_the_base_url() {
        let runtime = OpenAiRuntime::new(OpenAiSettings {
            base_url: "http://alice:hunter2@127.0.0.1:1/v1?api-key=zz-query-secret".into(),
            api_key: None,
            model: "m".into(),
            tools: vec![],
            idle_timeout: Duration::from_secs(2),
        })
        .unwrap();
        let input = TurnInput {
            prompt: "hi".into(),
            history: vec![].into(),
        };
        let Err(AgentError::Provider(message)) =
            runtime.run_turn(input, Arc::new(Recorder::default())).await
        else {
            panic!("a refused connection is a provider error");
        };
        assert!(message.contains("http://127.0.0.1:1"), "{message}");
        for secret in ["alice", "hunter2", "zz-query-secret", "api-key", "/v1"] {
            assert!(!message.contains(secret), "{secret} in {message}");
        }
        let bad = OpenAiRuntime::new(OpenAiSettings {
            base_url: "ftp://alice:hunter2@example.com/v1".into(),
            api_key: None,
            model: "m".into(),
            tools: vec![],
            idle_timeout: Duration::ZERO,
        });
        let Err(message) = bad else {
            panic!("ftp is refused")
        };
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn tool_call_fragments_are_assembled_by_index() {
        let (assembly, sink) = feed(&[
            delta(json!({"tool_calls": [
                {"index": 0, "id": "c1", "type": "function", "function": {"name": "execute", "arguments": ""}},
            ]})),
            delta(json!({"tool_calls": [
                {"index": 0, "function": {"arguments": "{\"comm"}},
                {"index": 1, "id": "c2", "function": {"name": "read_file", "arguments": "{\"path\""}},
            ]})),
            delta(json!({"tool_calls": [
                {"index": 1, "function": {"arguments": ":\"a\"}"}},
                {"index": 0, "function": {"arguments": "and\":\"ls\"}"}},
            ]})),
        ]);
        assert!(
            sink.events().is_empty(),
            "tool calls wait for the stream's end"
        );
        let reply = assembly.finish("fallback", &sink);
        assert_eq!(
            sink.events(),
            vec![
                AgentEvent::ToolCall {
                    tool_call_id: "c1".into(),
                    name: "execute".into(),
                    args: json!({"command": "ls"}),
                },
                AgentEvent::ToolCall {
                    tool_call_id: "c2".into(),
                    name: "read_file".into(),
                    args: json!({"path": "a"}),
                },
            ]
        );
        assert_eq!(reply.model_name, "served");
        assert_eq!(reply.parts.len(), 2);
    }

    #[test]
    fn tool_calls_without_index_or_id_still_get_assembled_and_an_id() {
        let (assembly, sink) = feed(&[
            delta(
                json!({"tool_calls": [{"id": "a", "function": {"name": "execute", "arguments": "{}"}}]}),
            ),
            delta(
                json!({"tool_calls": [{"function": {"name": "read_file", "arguments": {"path": "x"}}}]}),
            ),
        ]);
        // The second delta has no id and no index, so it continues the first call.
        let reply = assembly.finish("fallback", &sink);
        assert_eq!(reply.parts.len(), 1);

        let (assembly, sink) = feed(&[delta(
            json!({"tool_calls": [{"function": {"name": "execute", "arguments": ""}}]}),
        )]);
        let reply = assembly.finish("fallback", &sink);
        let [
            ResponsePart::ToolCall {
                tool_call_id, args, ..
            },
        ] = reply.parts.as_slice()
        else {
            panic!("expected one tool call, got {:?}", reply.parts);
        };
        assert!(tool_call_id.starts_with("call_"));
        assert_eq!(args, &json!({}));
    }

    #[test]
    fn arguments_that_are_not_json_are_kept_as_a_string() {
        assert_eq!(parse_arguments(""), json!({}));
        assert_eq!(parse_arguments(" \n"), json!({}));
        assert_eq!(parse_arguments("{\"a\":1}"), json!({"a": 1}));
        assert_eq!(parse_arguments("{\"a\":"), json!("{\"a\":"));
    }

    #[test]
    fn reasoning_deltas_are_bracketed_by_thinking_start_and_done() {
        let (assembly, sink) = feed(&[
            delta(json!({"role": "assistant", "content": ""})),
            delta(json!({"reasoning_content": "let me "})),
            delta(json!({"reasoning_content": "", "reasoning": "see", "content": null})),
            delta(json!({"content": "Hi"})),
            delta(json!({"content": "!"})),
        ]);
        let reply = assembly.finish("fallback", &sink);
        assert_eq!(
            sink.events(),
            vec![
                AgentEvent::ThinkingStart,
                AgentEvent::Thinking("let me ".into()),
                AgentEvent::Thinking("see".into()),
                AgentEvent::ThinkingDone,
                AgentEvent::Token("Hi".into()),
                AgentEvent::Token("!".into()),
            ]
        );
        assert_eq!(
            reply.parts,
            vec![
                ResponsePart::Thinking {
                    content: "let me see".into()
                },
                ResponsePart::Text {
                    content: "Hi!".into()
                },
            ]
        );
    }

    #[test]
    fn thinking_still_open_at_the_end_is_closed() {
        let (assembly, sink) = feed(&[delta(json!({"reasoning": "only thoughts"}))]);
        assembly.finish("fallback", &sink);
        assert_eq!(sink.events().last(), Some(&AgentEvent::ThinkingDone));
    }

    #[test]
    fn usage_chunks_are_ignored_and_finish_reason_is_noted() {
        let (assembly, _) = feed(&[
            json!({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"total_tokens": 3}}),
        ]);
        assert!(assembly.finished);
        assert_eq!(
            assembly.finish("fallback", &Recorder::default()).model_name,
            "fallback"
        );
    }

    #[test]
    fn an_error_chunk_fails_with_the_providers_message() {
        let mut assembly = Assembly::default();
        let error = assembly
            .apply(
                &json!({"error": {"message": "overloaded", "code": 529}}),
                &Recorder::default(),
            )
            .unwrap_err();
        assert!(error.contains("overloaded"), "{error}");
    }

    #[test]
    fn error_snippets_prefer_the_providers_message_and_stay_short() {
        assert_eq!(
            error_snippet(r#"{"error":{"message":"bad key"}}"#),
            "bad key"
        );
        assert_eq!(
            error_snippet(r#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(error_snippet("  plain\n text "), "plain text");
        assert_eq!(
            error_snippet(&"x".repeat(1000)).len(),
            ERROR_SNIPPET_CHARS + 3
        );
    }
}

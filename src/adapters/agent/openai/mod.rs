//! The `openai` runtime: an adapter behind the [`AgentRuntime`] port that
//! drives any OpenAI-compatible Chat Completions endpoint (OpenAI, Ollama,
//! vLLM, llama.cpp server, OpenRouter, LM Studio), streaming over SSE.
//!
//! One turn is one `POST {base_url}/chat/completions` with `stream: true`.
//! This module holds the settings, the runtime and the turn that ties its
//! three steps together: [`client`] builds and sends the request and
//! describes HTTP failures, [`messages`] translates the session's history
//! (pydantic-ai shape) into OpenAI messages, and [`stream`] turns the
//! streamed deltas back into agent events and one [`AgentReply`]. Nothing
//! outside this module knows the wire format.

mod client;
mod messages;
mod stream;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::domain::agent::{AgentError, AgentReply, ToolSpec};
use crate::ports::{AgentRuntime, EventSink, TurnInput};

use self::client::{root_cause, tool_json};
use self::stream::Assembly;

/// Where requests go when `OPENAI_BASE_URL` is not set.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The idle timeout used when the settings give zero: a zero timeout would
/// fail every turn at once, and `ProviderEnv::default()` holds zero.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why [`OpenAiRuntime::new`] refuses its settings. The messages become the
/// runtime's "unavailable" reason, which clients see: they never quote the
/// URL, which may hold secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenAiSetupError {
    /// The URL parser's reason.
    #[error("the base URL (OPENAI_BASE_URL) is not a URL: {0}")]
    NotAUrl(String),
    /// The scheme that is not `http` or `https`.
    #[error("the base URL (OPENAI_BASE_URL) is not an http(s) URL (scheme {0:?})")]
    NotHttp(String),
    /// The innermost cause the HTTP client gave.
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
}

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
    /// [`OpenAiSetupError`] when the base URL is not an http(s) URL or the
    /// HTTP client cannot be built.
    pub fn new(settings: OpenAiSettings) -> Result<Self, OpenAiSetupError> {
        let mut endpoint = reqwest::Url::parse(settings.base_url.trim())
            .map_err(|e| OpenAiSetupError::NotAUrl(e.to_string()))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(OpenAiSetupError::NotHttp(endpoint.scheme().to_owned()));
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
            .map_err(|e| OpenAiSetupError::HttpClient(root_cause(&e)))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::agent::tests::Recorder;

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
        let Err(message) = bad.map_err(|e| e.to_string()) else {
            panic!("ftp is refused")
        };
        assert!(!message.contains("hunter2"), "{message}");
    }
}

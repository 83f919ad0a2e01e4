//! The HTTP side of the `openai` runtime: the request body, sending it, and
//! describing a failed request or an error status in one line a client may
//! see (never quoting the base URL, which may hold secrets).

use std::pin::pin;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use super::OpenAiRuntime;
use super::messages::openai_messages;
use crate::domain::agent::ToolSpec;
use crate::ports::TurnInput;

/// How much of an error body is read, and how much of it is quoted.
const ERROR_BODY_LIMIT: usize = 8 * 1024;
const ERROR_SNIPPET_CHARS: usize = 200;

impl OpenAiRuntime {
    pub(super) fn request_body(&self, input: &TurnInput) -> Value {
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
    pub(super) async fn send(&self, body: &Value) -> Result<reqwest::Response, String> {
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
    pub(super) async fn status_error(&self, response: reqwest::Response) -> String {
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
}

/// One offered tool, as the `tools` array wants it.
pub(super) fn tool_json(tool: &ToolSpec) -> Value {
    json!({
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        }
    })
}

/// What an error body says, in one short line: the provider's `error.message`
/// (or `error` string, as Ollama sends) when it is JSON, else its start.
pub(super) fn error_snippet(body: &str) -> String {
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

pub(super) fn error_message(error: &Value) -> String {
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
pub(super) fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

pub(super) fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::agent::openai::OpenAiSettings;

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

//! The `echo` runtime: offline and deterministic, so `serve` works on a fresh
//! machine and every path of the server can be shown without a model.
//!
//! - any prompt: streams the prompt back word by word and answers with it;
//! - `/think TEXT`: streams TEXT as thinking first, then answers with it;
//! - `/tool NAME {json}`: asks for that tool call (the arguments default to
//!   `{}`), which the server's policy defers to a human.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::domain::agent::{AgentError, AgentEvent, AgentReply, ToolSpec};
use crate::domain::message::ResponsePart;
use crate::ports::{AgentRuntime, EventSink, TurnInput};

/// The model name echo replies carry.
pub const MODEL_NAME: &str = "echo";

/// Tokens streamed between two yields to the scheduler. Without a pause an
/// answer never gives its worker thread back: a huge prompt would stall the
/// other tasks there, and a cancel or the turn timeout (which act when the
/// turn's future is next polled) would wait for its end.
const TOKENS_PER_YIELD: usize = 64;

/// Why the options after `echo:` in a model string are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EchoOptionError {
    /// `delay_ms=` followed by something that is not a whole number.
    #[error("echo option delay_ms={0:?} is not a number of milliseconds")]
    BadDelay(String),
    /// Anything but `delay_ms=N`.
    #[error("unknown echo option {0:?} (expected delay_ms=N)")]
    Unknown(String),
}

pub struct EchoRuntime {
    /// Pause between tokens, so streaming, ordering and cancellation can be
    /// watched (and tested) offline.
    token_delay: Duration,
    /// The tools this agent may ask for.
    tools: Vec<ToolSpec>,
}

impl EchoRuntime {
    #[must_use]
    pub fn new(token_delay: Duration, tools: Vec<ToolSpec>) -> Self {
        Self { token_delay, tools }
    }

    /// Reads the options after `echo:` in a model string: empty, or
    /// `delay_ms=N`.
    ///
    /// # Errors
    /// [`EchoOptionError`] naming the option that is not understood.
    pub fn from_options(options: &str, tools: Vec<ToolSpec>) -> Result<Self, EchoOptionError> {
        let delay = match options.split_once('=') {
            None if options.is_empty() => 0,
            Some(("delay_ms", ms)) => ms
                .parse()
                .map_err(|_| EchoOptionError::BadDelay(ms.to_owned()))?,
            _ => return Err(EchoOptionError::Unknown(options.to_owned())),
        };
        Ok(Self::new(Duration::from_millis(delay), tools))
    }

    async fn stream(&self, text: &str, sink: &dyn EventSink, as_event: fn(String) -> AgentEvent) {
        for (i, token) in text.split_inclusive(' ').enumerate() {
            if i > 0 && !self.token_delay.is_zero() {
                tokio::time::sleep(self.token_delay).await;
            } else if i > 0 && i % TOKENS_PER_YIELD == 0 {
                tokio::task::yield_now().await;
            }
            sink.emit(as_event(token.to_owned()));
        }
    }

    fn tool_call(&self, command: &str, sink: &dyn EventSink) -> Result<AgentReply, AgentError> {
        let (name, args) = command.split_once(' ').unwrap_or((command, ""));
        if !self.tools.iter().any(|t| t.name == name) {
            let offered: Vec<_> = self.tools.iter().map(|t| t.name.as_str()).collect();
            return Err(AgentError::InvalidRequest(format!(
                "tool {name:?} is not offered to this agent (offered: {})",
                if offered.is_empty() {
                    "none".to_owned()
                } else {
                    offered.join(", ")
                }
            )));
        }
        let args: Value = if args.trim().is_empty() {
            Value::Object(serde_json::Map::new())
        } else {
            serde_json::from_str(args).map_err(|e| {
                AgentError::InvalidRequest(format!("tool arguments are not JSON: {e}"))
            })?
        };
        let tool_call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
        sink.emit(AgentEvent::ToolCall {
            tool_call_id: tool_call_id.clone(),
            name: name.to_owned(),
            args: args.clone(),
        });
        Ok(reply(vec![ResponsePart::ToolCall {
            tool_name: name.to_owned(),
            args,
            tool_call_id,
        }]))
    }
}

fn reply(parts: Vec<ResponsePart>) -> AgentReply {
    AgentReply {
        model_name: MODEL_NAME.to_owned(),
        parts,
    }
}

#[async_trait]
impl AgentRuntime for EchoRuntime {
    async fn run_turn(
        &self,
        input: TurnInput,
        sink: Arc<dyn EventSink>,
    ) -> Result<AgentReply, AgentError> {
        let sink = sink.as_ref();
        let prompt = input.prompt.trim();
        if let Some(command) = prompt.strip_prefix("/tool ") {
            return self.tool_call(command.trim(), sink);
        }
        let mut parts = Vec::new();
        let text = match prompt.strip_prefix("/think ") {
            Some(thought) => {
                sink.emit(AgentEvent::ThinkingStart);
                self.stream(thought, sink, AgentEvent::Thinking).await;
                sink.emit(AgentEvent::ThinkingDone);
                parts.push(ResponsePart::Thinking {
                    content: thought.to_owned(),
                });
                thought
            }
            None => input.prompt.as_str(),
        };
        self.stream(text, sink, AgentEvent::Token).await;
        parts.push(ResponsePart::Text {
            content: text.to_owned(),
        });
        Ok(reply(parts))
    }

    fn model_name(&self) -> String {
        MODEL_NAME.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::adapters::agent::tests::Recorder;
    use crate::domain::agent::AgentConfig;

    fn recorder() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    fn input(prompt: &str) -> TurnInput {
        TurnInput {
            prompt: prompt.into(),
            history: vec![].into(),
        }
    }

    fn echo() -> EchoRuntime {
        EchoRuntime::new(Duration::ZERO, AgentConfig::builtin().tools)
    }

    #[tokio::test]
    async fn echo_streams_the_prompt_word_by_word_and_answers_with_it() {
        let sink = recorder();
        let reply = echo()
            .run_turn(input("hello big world"), sink.clone())
            .await
            .unwrap();
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![
                AgentEvent::Token("hello ".into()),
                AgentEvent::Token("big ".into()),
                AgentEvent::Token("world".into()),
            ]
        );
        assert_eq!(
            reply.parts,
            vec![ResponsePart::Text {
                content: "hello big world".into()
            }]
        );
    }

    #[tokio::test]
    async fn echo_tool_command_requests_that_tool_call() {
        let sink = recorder();
        let reply = echo()
            .run_turn(input(r#"/tool execute {"command":"ls"}"#), sink.clone())
            .await
            .unwrap();
        let [
            ResponsePart::ToolCall {
                tool_name, args, ..
            },
        ] = reply.parts.as_slice()
        else {
            panic!("expected one tool call, got {:?}", reply.parts);
        };
        assert_eq!(tool_name, "execute");
        assert_eq!(args, &json!({"command": "ls"}));
        assert!(matches!(
            sink.0.lock().unwrap()[0],
            AgentEvent::ToolCall { .. }
        ));
    }

    #[tokio::test]
    async fn echo_think_streams_thinking_before_the_answer() {
        let sink = recorder();
        echo()
            .run_turn(input("/think a b"), sink.clone())
            .await
            .unwrap();
        let events = sink.0.lock().unwrap();
        assert_eq!(events[0], AgentEvent::ThinkingStart);
        assert_eq!(events[3], AgentEvent::ThinkingDone);
        assert_eq!(events[4], AgentEvent::Token("a ".into()));
    }

    #[test]
    fn echo_yields_to_the_scheduler_while_streaming_a_long_prompt() {
        use futures::FutureExt;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let sink = recorder();
        let echo = echo();
        let prompt = "w ".repeat(10_000);
        let first_poll = echo.run_turn(input(&prompt), sink.clone()).now_or_never();
        assert!(
            first_poll.is_none(),
            "a 10,000-word answer must not be streamed in one poll"
        );
        assert!(sink.0.lock().unwrap().len() < 10_000);
    }

    #[tokio::test]
    async fn echo_tool_errors_are_invalid_requests_not_provider_failures() {
        for prompt in ["/tool format_disk {}", "/tool execute {oops"] {
            let result = echo().run_turn(input(prompt), recorder()).await;
            assert!(
                matches!(result, Err(AgentError::InvalidRequest(_))),
                "{prompt}: {result:?}"
            );
        }
    }

    #[test]
    fn echo_options_accept_a_delay_and_reject_anything_else() {
        assert!(EchoRuntime::from_options("delay_ms=5", vec![]).is_ok());
        assert!(EchoRuntime::from_options("delay_ms=x", vec![]).is_err());
        assert!(EchoRuntime::from_options("fast", vec![]).is_err());
    }
}

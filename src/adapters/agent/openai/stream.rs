//! Stream assembly: the SSE stream of a Chat Completions answer read to its
//! end, its deltas (text, reasoning, interleaved tool-call fragments) emitted
//! as [`AgentEvent`]s and assembled into one [`AgentReply`].

use std::collections::BTreeMap;
use std::pin::pin;

use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use serde_json::{Map, Value};

use super::OpenAiRuntime;
use super::client::{error_message, error_snippet, root_cause, seconds};
use crate::domain::agent::{AgentEvent, AgentReply};
use crate::domain::message::ResponsePart;
use crate::ports::EventSink;

impl OpenAiRuntime {
    /// Reads the SSE stream to its end, feeding each chunk to `assembly`.
    pub(super) async fn read_stream(
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
}

/// Why the byte stream under the SSE parser stopped.
#[derive(Debug)]
enum ReadError {
    Http(reqwest::Error),
    /// No bytes for the idle timeout.
    Idle,
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
pub(super) struct Assembly {
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
    pub(super) fn finish(mut self, fallback_model: &str, sink: &dyn EventSink) -> AgentReply {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::adapters::agent::tests::Recorder;

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
}

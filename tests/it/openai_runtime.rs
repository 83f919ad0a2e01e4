//! The `openai` runtime against the fake OpenAI-compatible server, over a
//! real socket: streaming, history, tool calls, thinking and every failure a
//! provider can produce.

use std::sync::Mutex;
use std::time::Duration;

use autopoiesis::adapters::agent::openai::{OpenAiRuntime, OpenAiSettings};
use autopoiesis::domain::agent::{AgentError, AgentEvent, AgentReply, tool_catalogue};
use autopoiesis::domain::message::{ModelMessage, ResponsePart};
use autopoiesis::ports::{AgentRuntime, EventSink, TurnInput};
use chrono::Utc;
use serde_json::json;

use crate::fake_openai::{FakeOpenAi, Reply, SERVED_MODEL, chunk, unreachable_base_url};

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

fn settings(base_url: &str) -> OpenAiSettings {
    OpenAiSettings {
        base_url: base_url.to_owned(),
        api_key: None,
        model: "gpt-test".into(),
        tools: vec![],
        idle_timeout: Duration::from_secs(5),
    }
}

fn runtime(settings: OpenAiSettings) -> OpenAiRuntime {
    OpenAiRuntime::new(settings).expect("valid settings")
}

fn prompt(text: &str) -> TurnInput {
    TurnInput {
        prompt: text.into(),
        history: vec![].into(),
    }
}

/// Runs one turn, failing the test instead of hanging it.
async fn turn(
    runtime: &OpenAiRuntime,
    input: TurnInput,
) -> (Result<AgentReply, AgentError>, Recorder) {
    let sink = std::sync::Arc::new(Recorder::default());
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        runtime.run_turn(input, sink.clone()),
    )
    .await
    .expect("the turn returns");
    let sink =
        std::sync::Arc::try_unwrap(sink).unwrap_or_else(|_| panic!("the runtime kept the sink"));
    (result, sink)
}

fn provider_error(result: Result<AgentReply, AgentError>) -> String {
    match result {
        Err(AgentError::Provider(message)) => message,
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[tokio::test]
async fn streamed_text_arrives_as_tokens_and_as_the_reply() {
    let fake = FakeOpenAi::start(vec![Reply::text(["Hel", "lo", " world"])]).await;
    let (result, sink) = turn(&runtime(settings(&fake.base_url)), prompt("hi")).await;

    let reply = result.unwrap();
    assert_eq!(
        sink.events(),
        vec![
            AgentEvent::Token("Hel".into()),
            AgentEvent::Token("lo".into()),
            AgentEvent::Token(" world".into()),
        ]
    );
    assert_eq!(
        reply.parts,
        vec![ResponsePart::Text {
            content: "Hello world".into()
        }]
    );
    assert_eq!(reply.model_name, SERVED_MODEL);
    let request = &fake.requests()[0];
    assert_eq!(request["model"], "gpt-test");
    assert_eq!(request["stream"], true);
    assert_eq!(
        request["messages"],
        json!([{"role": "user", "content": "hi"}])
    );
    assert!(request.get("tools").is_none());
}

#[tokio::test]
async fn the_second_turn_sends_the_first_turns_history() {
    let fake = FakeOpenAi::start(vec![Reply::text(["Hi ", "there"])]).await;
    fake.push(Reply::text(["Fine."]));
    let runtime = runtime(settings(&fake.base_url));

    let (first, _) = turn(&runtime, prompt("hello")).await;
    let first = first.unwrap();
    let history = vec![
        ModelMessage::user_prompt("hello", Utc::now()),
        ModelMessage::Response {
            parts: first.parts,
            model_name: Some(first.model_name),
            timestamp: Utc::now(),
        },
    ];
    let (second, _) = turn(
        &runtime,
        TurnInput {
            prompt: "how are you?".into(),
            history: history.into(),
        },
    )
    .await;

    assert_eq!(
        second.unwrap().parts,
        vec![ResponsePart::Text {
            content: "Fine.".into()
        }]
    );
    assert_eq!(
        fake.requests()[1]["messages"],
        json!([
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "how are you?"},
        ])
    );
}

#[tokio::test]
async fn a_tool_call_split_across_chunks_is_assembled_and_offered_tools_are_sent() {
    let fake = FakeOpenAi::start(vec![Reply::tool_call(
        "execute",
        r#"{"command": "ls -la /tmp"}"#,
    )])
    .await;
    let mut settings = settings(&fake.base_url);
    settings.tools = tool_catalogue();
    let (result, sink) = turn(&runtime(settings), prompt("list /tmp")).await;

    let expected_args = json!({"command": "ls -la /tmp"});
    assert_eq!(
        sink.events(),
        vec![AgentEvent::ToolCall {
            tool_call_id: "call_fake_0".into(),
            name: "execute".into(),
            args: expected_args.clone(),
        }]
    );
    assert_eq!(
        result.unwrap().parts,
        vec![ResponsePart::ToolCall {
            tool_name: "execute".into(),
            args: expected_args,
            tool_call_id: "call_fake_0".into(),
        }]
    );
    let tools = &fake.requests()[0]["tools"];
    assert_eq!(tools[0]["type"], "function");
    assert_eq!(tools[0]["function"]["name"], "execute");
}

#[tokio::test]
async fn thinking_deltas_give_thinking_events_before_the_tokens() {
    let fake = FakeOpenAi::start(vec![Reply::thinking(["Let me ", "think."], ["Yes."])]).await;
    let (result, sink) = turn(&runtime(settings(&fake.base_url)), prompt("well?")).await;

    assert_eq!(
        sink.events(),
        vec![
            AgentEvent::ThinkingStart,
            AgentEvent::Thinking("Let me ".into()),
            AgentEvent::Thinking("think.".into()),
            AgentEvent::ThinkingDone,
            AgentEvent::Token("Yes.".into()),
        ]
    );
    assert_eq!(
        result.unwrap().parts,
        vec![
            ResponsePart::Thinking {
                content: "Let me think.".into()
            },
            ResponsePart::Text {
                content: "Yes.".into()
            },
        ]
    );
}

#[tokio::test]
async fn an_error_status_is_a_provider_error_naming_the_status_and_the_providers_message() {
    let fake = FakeOpenAi::start(vec![Reply::status(
        500,
        r#"{"error": {"message": "the engine is on fire", "type": "server_error"}}"#,
    )])
    .await;
    let (result, _) = turn(&runtime(settings(&fake.base_url)), prompt("hi")).await;

    let message = provider_error(result);
    assert!(message.contains("500"), "{message}");
    assert!(message.contains("the engine is on fire"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test]
async fn an_unreachable_provider_is_a_provider_error_naming_its_origin_only() {
    let base_url = unreachable_base_url();
    let (result, _) = turn(&runtime(settings(&base_url)), prompt("hi")).await;

    let message = provider_error(result);
    // Named by scheme, host and port only: a base URL may hold secrets.
    assert!(
        message.contains(base_url.trim_end_matches("/v1")),
        "{message}"
    );
}

#[tokio::test]
async fn a_malformed_chunk_is_a_provider_error() {
    let fake = FakeOpenAi::start(vec![Reply::Malformed]).await;
    let (result, _) = turn(&runtime(settings(&fake.base_url)), prompt("hi")).await;

    let message = provider_error(result);
    assert!(message.contains("malformed"), "{message}");
}

#[tokio::test]
async fn a_provider_that_hangs_is_a_provider_error_once_the_idle_timeout_passes() {
    let fake = FakeOpenAi::start(vec![Reply::Hang]).await;
    let mut settings = settings(&fake.base_url);
    settings.idle_timeout = Duration::from_millis(300);
    let (result, _) = turn(&runtime(settings), prompt("hi")).await;

    let message = provider_error(result);
    assert!(message.contains("0.3 s"), "{message}");
}

#[tokio::test]
async fn a_slow_but_steady_stream_is_not_cut_by_the_idle_timeout() {
    let tokens = ["a", "b", "c", "d", "e", "f"];
    let fake =
        FakeOpenAi::start_with_token_delay(vec![Reply::text(tokens)], Duration::from_millis(100))
            .await;
    let mut settings = settings(&fake.base_url);
    settings.idle_timeout = Duration::from_millis(400);
    let (result, sink) = turn(&runtime(settings), prompt("hi")).await;

    assert_eq!(
        result.unwrap().parts,
        vec![ResponsePart::Text {
            content: "abcdef".into()
        }]
    );
    assert_eq!(sink.events().len(), tokens.len());
}

#[tokio::test]
async fn the_api_key_is_sent_as_a_bearer_token_and_never_appears_in_errors() {
    let key = "sk-test-0123456789";
    let fake = FakeOpenAi::start(vec![
        Reply::text(["ok"]),
        Reply::status(
            401,
            format!(r#"{{"error": {{"message": "Incorrect API key provided: {key}"}}}}"#),
        ),
    ])
    .await;
    let mut settings = settings(&fake.base_url);
    settings.api_key = Some(key.into());
    let runtime = runtime(settings);

    turn(&runtime, prompt("hi")).await.0.unwrap();
    let message = provider_error(turn(&runtime, prompt("again")).await.0);

    assert_eq!(
        fake.authorizations()[0].as_deref(),
        Some("Bearer sk-test-0123456789")
    );
    assert!(message.contains("401"), "{message}");
    assert!(!message.contains(key), "{message}");
}

#[tokio::test]
async fn no_authorization_header_is_sent_without_a_key() {
    let fake = FakeOpenAi::start(vec![Reply::text(["ok"])]).await;
    turn(&runtime(settings(&fake.base_url)), prompt("hi"))
        .await
        .0
        .unwrap();

    assert_eq!(fake.authorizations(), vec![None]);
}

#[tokio::test]
async fn a_stream_that_ends_with_a_finish_reason_but_no_done_is_accepted() {
    let fake = FakeOpenAi::start(vec![Reply::Chunks {
        chunks: vec![
            chunk(json!({"content": "done"}), None),
            chunk(json!({}), Some("stop")),
        ],
        done: false,
    }])
    .await;
    let (result, _) = turn(&runtime(settings(&fake.base_url)), prompt("hi")).await;

    assert_eq!(
        result.unwrap().parts,
        vec![ResponsePart::Text {
            content: "done".into()
        }]
    );
}

#[tokio::test]
async fn a_stream_cut_short_is_a_provider_error() {
    let fake = FakeOpenAi::start(vec![Reply::Chunks {
        chunks: vec![chunk(json!({"content": "half an ans"}), None)],
        done: false,
    }])
    .await;
    let (result, sink) = turn(&runtime(settings(&fake.base_url)), prompt("hi")).await;

    let message = provider_error(result);
    assert!(message.contains("ended"), "{message}");
    assert_eq!(sink.events(), vec![AgentEvent::Token("half an ans".into())]);
}

#[tokio::test]
async fn an_error_chunk_in_the_stream_is_a_provider_error_with_its_message() {
    let fake = FakeOpenAi::start(vec![Reply::Chunks {
        chunks: vec![
            chunk(json!({"content": "Hi"}), None),
            json!({"error": {"message": "upstream overloaded", "code": 502}}),
        ],
        done: true,
    }])
    .await;
    let (result, _) = turn(&runtime(settings(&fake.base_url)), prompt("hi")).await;

    let message = provider_error(result);
    assert!(message.contains("upstream overloaded"), "{message}");
}

#[tokio::test]
async fn a_base_url_with_a_trailing_slash_still_reaches_chat_completions() {
    let fake = FakeOpenAi::start(vec![Reply::text(["ok"])]).await;
    let (result, _) = turn(
        &runtime(settings(&format!("{}/", fake.base_url))),
        prompt("hi"),
    )
    .await;

    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_provider_that_never_answers_is_a_provider_error_once_the_idle_timeout_passes() {
    // The kernel completes the connection; nobody ever reads the request.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", silent.local_addr().unwrap());
    let mut settings = settings(&base_url);
    settings.idle_timeout = Duration::from_millis(300);
    let (result, _) = turn(&runtime(settings), prompt("hi")).await;

    let message = provider_error(result);
    // Named by scheme, host and port only: a base URL may hold secrets.
    assert!(
        message.contains(base_url.trim_end_matches("/v1")),
        "{message}"
    );
}

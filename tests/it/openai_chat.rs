//! The server driving the `openai` runtime against a fake OpenAI-compatible
//! provider on 127.0.0.1: what a user of `openai:MODEL` sees over REST.

use std::time::Duration;

use autopoiesis::adapters::agent::{ProviderEnv, build_runtime};
use autopoiesis::domain::agent::AgentConfig;
use autopoiesis::domain::chat::RuntimeSlot;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_openai::{FakeOpenAi, Reply, unreachable_base_url};
use crate::helpers::{Options, TestApp, spawn_with, until_terminal};

/// The built-in agent's tools with an `openai:` model, as an agents file
/// would configure it.
fn agent() -> AgentConfig {
    AgentConfig {
        model: "openai:gpt-test".into(),
        ..AgentConfig::builtin()
    }
}

async fn app_against(base_url: String) -> TestApp {
    let runtime = build_runtime(
        &agent(),
        &ProviderEnv {
            openai_base_url: Some(base_url),
            openai_api_key: Some("sk-test".into()),
            stream_idle_timeout: Duration::from_secs(5),
        },
    )
    .unwrap();
    spawn_with(Options {
        runtime: RuntimeSlot::Ready(runtime),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn a_streamed_answer_reaches_rest_and_websocket_clients() {
    let fake = FakeOpenAi::start(vec![Reply::text(["Hel", "lo", "!"])]).await;
    let app = app_against(fake.base_url.clone()).await;
    let mut ws = app.ws("o").await;
    app.wait_for_clients("o", 1).await;
    let res = app.chat(json!({"content": "hi", "session_id": "o"})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["content"], "Hello!");
    let frames = until_terminal(&mut ws).await;
    let tokens: Vec<&str> = frames
        .iter()
        .filter(|f| f["op"] == "token")
        .map(|f| f["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, ["Hel", "lo", "!"]);
    assert_eq!(fake.requests()[0]["model"], "gpt-test");
    assert_eq!(fake.authorizations()[0].as_deref(), Some("Bearer sk-test"));
}

#[tokio::test]
async fn the_second_turn_sends_the_first_turns_history() {
    let fake = FakeOpenAi::start(vec![
        Reply::text(["first answer"]),
        Reply::text(["second answer"]),
    ])
    .await;
    let app = app_against(fake.base_url.clone()).await;
    app.chat(json!({"content": "question one", "session_id": "h"}))
        .await;
    let res = app
        .chat(json!({"content": "question two", "session_id": "h"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let messages = fake.requests()[1]["messages"].clone();
    let roles: Vec<&str> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(messages[0]["content"], "question one");
    assert_eq!(messages[1]["content"], "first answer");
    assert_eq!(messages[2]["content"], "question two");
}

#[tokio::test]
async fn a_tool_call_to_an_approval_gated_tool_answers_409() {
    let fake = FakeOpenAi::start(vec![Reply::tool_call(
        "execute",
        r#"{"command":"rm -rf /tmp/x"}"#,
    )])
    .await;
    let app = app_against(fake.base_url.clone()).await;
    let res = app
        .chat(json!({"content": "clean up", "session_id": "t"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        res.json::<Value>().await.unwrap()["detail"]["code"],
        "approval_unsupported"
    );
    let offered = &fake.requests()[0]["tools"];
    assert_eq!(offered[0]["function"]["name"], "execute");
    let history: Value = app.get_json("/api/sessions/t/history").await;
    let call = &history["messages"][1]["parts"][0];
    assert_eq!(call["part_kind"], "tool-call");
    assert_eq!(call["args"], json!({"command": "rm -rf /tmp/x"}));
}

#[tokio::test]
async fn a_provider_500_gives_502_with_a_clear_detail_and_the_session_recovers() {
    let fake = FakeOpenAi::start(vec![
        Reply::status(500, r#"{"error":{"message":"overloaded"}}"#),
        Reply::text(["fine now"]),
    ])
    .await;
    let app = app_against(fake.base_url.clone()).await;
    let res = app.chat(json!({"content": "hi", "session_id": "e"})).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let detail = res.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("500") && detail.contains("overloaded"),
        "{detail}"
    );
    let res = app
        .chat(json!({"content": "again", "session_id": "e"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_unreachable_provider_gives_502_naming_it() {
    let base = unreachable_base_url();
    let app = app_against(base.clone()).await;
    let res = app.chat(json!({"content": "hi"})).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let detail = res.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    // Named by scheme, host and port only: a base URL may hold secrets.
    assert!(detail.contains(base.trim_end_matches("/v1")), "{detail}");
    assert!(!detail.contains("/v1"), "{detail}");
    assert!(
        !detail.contains("sk-test"),
        "the key never reaches a client"
    );
}

#[test]
fn an_openai_model_without_its_settings_is_a_clear_runtime_error() {
    let Err(why) = build_runtime(&agent(), &ProviderEnv::default()).map_err(|e| e.to_string())
    else {
        panic!("expected an error");
    };
    assert!(why.contains("OPENAI_API_KEY"), "{why}");
}

#[tokio::test]
async fn a_proxys_python_traceback_reaches_clients_as_one_line_without_paths() {
    // What a LiteLLM proxy answers when its upstream refuses.
    let traceback = "litellm.BadRequestError: OpenAIException - model `gpt-test` is not allowed\n\
Traceback (most recent call last):\n  File \"/usr/lib/python3.11/site-packages/litellm/main.py\", line 1012, in completion\n    response = client.completion(model)\nlitellm.llms.openai.OpenAIError: model `gpt-test` is not allowed";
    let fake = FakeOpenAi::start(vec![Reply::status(
        400,
        json!({"error": {"message": traceback}}).to_string(),
    )])
    .await;
    let app = app_against(fake.base_url.clone()).await;
    let mut ws = app.ws("tb").await;
    app.wait_for_clients("tb", 1).await;
    let res = app.chat(json!({"content": "hi", "session_id": "tb"})).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let detail = res.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    let frames = until_terminal(&mut ws).await;
    let streamed = frames.last().unwrap()["data"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    for message in [&detail, &streamed] {
        assert!(message.contains("is not allowed"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(
            !message.contains("Traceback") && !message.contains("site-packages"),
            "{message}"
        );
    }
}

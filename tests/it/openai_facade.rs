//! The OpenAI-compatible facade (SPEC B14) over real HTTP: what an OpenAI
//! client pointed at `/v1` sees. (The official Python SDK runs against it
//! in `.ci/openai-sdk.sh`.)

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, echo, spawn_with, until_terminal};

const KEY: &str = "facade-key";

async fn app() -> TestApp {
    spawn_with(Options {
        api_key: Some(KEY),
        runtime: autopoiesis::domain::chat::RuntimeSlot::Ready(echo(0)),
        ..Options::default()
    })
    .await
}

async fn complete(app: &TestApp, session: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body);
    if let Some(session) = session {
        request = request.header("X-Session-Id", session);
    }
    request.send().await.unwrap()
}

fn user(content: &str) -> Value {
    json!({"model": "default", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": content},
    ]})
}

/// The `data:` payloads of an SSE body.
fn data_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn models_lists_the_configured_agents_in_openais_shape() {
    let app = app().await;
    let models: Value = get_json(&app, "/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "default");
    assert_eq!(models["data"][0]["object"], "model");
    assert!(models["data"][0]["created"].as_u64().unwrap() > 1_700_000_000);
}

#[tokio::test]
async fn a_completion_continues_its_session_by_x_session_id_and_the_history_holds_both_turns() {
    let app = app().await;
    let first = complete(&app, Some("chat-1"), user("first words")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-session-id"], "chat-1");
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["object"], "chat.completion");
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    assert_eq!(first["choices"][0]["message"]["content"], "first words");
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    let usage = &first["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    let second: Value = complete(&app, Some("chat-1"), user("second words"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(second["choices"][0]["message"]["content"], "second words");
    let history: Value = get_json(&app, "/api/sessions/chat-1/history").await;
    let prompts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "request")
        .map(|m| m["parts"][0]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        prompts,
        ["first words", "second words"],
        "the system message is not a prompt"
    );

    // Without the header, each completion is a session of its own.
    let fresh = complete(&app, None, user("alone")).await;
    let named = fresh.headers()["x-session-id"].to_str().unwrap().to_owned();
    assert_ne!(named, "chat-1");
}

#[tokio::test]
async fn a_streamed_completion_is_the_turn_every_client_of_the_session_sees() {
    let app = app().await;
    let mut ws = app
        .ws_at(&format!("/api/ws/streamed?ticket={}", ticket(&app).await))
        .await;
    app.wait_for_clients("streamed", 1).await;
    let mut body = user("one two three");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let res = complete(&app, Some("streamed"), body).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let lines = data_lines(&res.text().await.unwrap());
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "one two three");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // The WebSocket client of the session saw the same tokens.
    let frames = until_terminal(&mut ws).await;
    let seen: String = frames
        .iter()
        .filter(|f| f["op"] == "token")
        .map(|f| f["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(seen, text);
    let turn = frames[0]["turn_id"].as_str().unwrap();
    assert_eq!(chunks[0]["id"], format!("chatcmpl-{turn}"));
}

async fn ticket(app: &TestApp) -> String {
    let res: Value = app
        .client
        .post(app.url("/api/auth/ticket"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    res["ticket"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_turn_that_needs_an_approval_is_a_409_in_openais_error_shape_streamed_or_not() {
    let app = app().await;
    let res = complete(&app, None, user(r#"/tool execute {"command":"ls"}"#)).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        res.headers()["x-should-retry"],
        "false",
        "the SDKs retry a 409 unless told not to"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "approval_unsupported");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().len() > 10);

    let mut streamed = user(r#"/tool execute {"command":"ls"}"#);
    streamed["stream"] = json!(true);
    let lines = data_lines(&complete(&app, None, streamed).await.text().await.unwrap());
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "approval_unsupported");
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_errors_with_their_status() {
    let app = app().await;
    for (body, status, code) in [
        (
            json!({"model": "default", "messages": []}),
            StatusCode::BAD_REQUEST,
            "no_user_message",
        ),
        (
            json!({"messages": "hi"}),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({"model": "gpt-nothing", "messages": [{"role": "user", "content": "x"}]}),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": "  "}]}),
            StatusCode::BAD_REQUEST,
            "empty_message",
        ),
    ] {
        let res = complete(&app, None, body.clone()).await;
        assert_eq!(res.status(), status, "{body}");
        let error: Value = res.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    // Content as parts, as newer clients send it.
    let parts = json!({"model": "default", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "in"}, {"type": "text", "text": "parts"}]}]});
    let reply: Value = complete(&app, None, parts).await.json().await.unwrap();
    assert_eq!(reply["choices"][0]["message"]["content"], "in\nparts");
    let bad_session = complete(&app, Some("no spaces allowed"), user("x")).await;
    assert_eq!(bad_session.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_a_401_that_openai_sdks_read_as_an_authentication_error() {
    let app = app().await;
    let wrong = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&user("x"))
        .send()
        .await
        .unwrap();
    let missing = app.client.get(app.url("/v1/models")).send().await.unwrap();
    for res in [wrong, missing] {
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let challenge = res.headers()["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"autopoiesis\"")
                && challenge.contains("X-API-Key"),
            "{challenge}"
        );
        assert_eq!(
            res.json::<Value>().await.unwrap(),
            json!({"error": {
                "message": "Invalid or missing API key",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }})
        );
    }
}

#[tokio::test]
async fn errors_outside_the_handlers_are_openai_shaped_under_v1_too() {
    let app = app().await;
    let unknown = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth(KEY)
        .json(&json!({"input": "x"}))
        .send()
        .await
        .unwrap();
    let wrong_method = app
        .client
        .get(app.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let too_large = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(vec![b' '; 3 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    let key_twice = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(r#"{"model":"default","model":"other","messages":[]}"#)
        .send()
        .await
        .unwrap();
    for (res, status, code) in [
        (unknown, StatusCode::NOT_FOUND, "not_found"),
        (
            wrong_method,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            too_large,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
        ),
        (key_twice, StatusCode::BAD_REQUEST, "invalid_request"),
    ] {
        assert_eq!(res.status(), status);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // Elsewhere the server's own shape stays.
    let elsewhere = app
        .client
        .get(app.url("/api/nowhere"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        elsewhere.json::<Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );
}

/// `GET path` with the key, as JSON.
async fn get_json(app: &TestApp, path: &str) -> Value {
    app.client
        .get(app.url(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

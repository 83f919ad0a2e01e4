//! The REST routes and every status code of SPEC A3.

use autopoiesis::adapters::http::HttpSettings;
use autopoiesis::domain::chat::RuntimeSlot;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Options, spawn_app, spawn_with};

#[tokio::test]
async fn health_answers_ok_with_the_crate_version() {
    let app = spawn_app().await;
    let res = app.get("/api/health").await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})
    );
}

#[tokio::test]
async fn created_sessions_have_32_hex_ids_and_are_listed() {
    let app = spawn_app().await;
    let res = app.post_empty("/api/sessions").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(created["message_count"], 0);
    chrono::DateTime::parse_from_rfc3339(created["created_at"].as_str().unwrap()).unwrap();

    let list: Value = app.get_json("/api/sessions").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id);
}

#[tokio::test]
async fn chat_with_echo_answers_and_keeps_history_in_pydantic_ai_shape() {
    let app = spawn_app().await;
    let res = app
        .chat(json!({"content": "hello there", "session_id": "s1"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"session_id": "s1", "content": "hello there"})
    );

    let history: Value = app.get_json("/api/sessions/s1/history").await;
    assert_eq!(history["session_id"], "s1");
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["kind"], "request");
    assert_eq!(messages[0]["parts"][0]["part_kind"], "user-prompt");
    assert_eq!(messages[0]["parts"][0]["content"], "hello there");
    assert_eq!(messages[1]["kind"], "response");
    assert_eq!(messages[1]["model_name"], "echo");
    assert_eq!(
        messages[1]["parts"][0],
        json!({"part_kind": "text", "content": "hello there"})
    );

    let list: Value = app.get_json("/api/sessions").await;
    assert_eq!(list[0]["message_count"], 2);
}

#[tokio::test]
async fn chat_without_session_id_creates_a_new_session() {
    let app = spawn_app().await;
    let body: Value = app
        .chat(json!({"content": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    let id = body["session_id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    let res = app.get(&format!("/api/sessions/{id}/history")).await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn chat_returns_409_when_the_turn_is_deferred_and_still_saves_history() {
    let app = spawn_app().await;
    let res = app
        .chat(json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": "d"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"detail": {"code": "approval_unsupported", "message": "Deferred approvals are not supported in server mode yet."}})
    );
    let history: Value = app.get_json("/api/sessions/d/history").await;
    let call = &history["messages"][1]["parts"][0];
    assert_eq!(call["part_kind"], "tool-call");
    assert_eq!(call["tool_name"], "execute");
    assert_eq!(call["args"], json!({"command": "ls"}));
}

#[tokio::test]
async fn chat_returns_503_with_the_reason_when_the_runtime_is_missing() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Unavailable("Agent runtime unavailable: no OPENAI_API_KEY".into()),
        ..Options::default()
    })
    .await;
    let res = app.chat(json!({"content": "hi", "session_id": "x"})).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.json::<Value>().await.unwrap()["detail"],
        "Agent runtime unavailable: no OPENAI_API_KEY"
    );
    // Refused before the turn: no session was made, and health stays 200.
    let res = app.get("/api/sessions/x/history").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = app.get("/api/health").await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn chat_returns_422_when_a_tool_command_is_invalid_and_the_session_stays_usable() {
    let app = spawn_app().await;
    for (prompt, named) in [
        ("/tool format_disk {}", "format_disk"),
        ("/tool execute {oops", "JSON"),
    ] {
        let res = app
            .chat(json!({"content": prompt, "session_id": "p"}))
            .await;
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY, "{prompt}");
        let detail = res.json::<Value>().await.unwrap()["detail"].clone();
        assert!(detail.as_str().unwrap().contains(named), "{detail}");
    }
    let res = app
        .chat(json!({"content": "still here", "session_id": "p"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn chat_409_names_the_recorded_approval_when_approvals_are_unlocked() {
    let app = spawn_with(Options {
        approval_key: true,
        ..Options::default()
    })
    .await;
    let res = app
        .chat(json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": "rec"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let detail = res.json::<Value>().await.unwrap()["detail"].clone();
    assert_eq!(detail["code"], "approval_unsupported");
    let id = detail["approval_id"].as_str().expect("an approval id");
    let message = detail["message"].as_str().unwrap();
    assert!(message.contains("recorded"), "{message}");
    let pending = app.get_json("/api/approvals").await.to_string();
    assert!(pending.contains(id), "{pending}");
}

#[tokio::test]
async fn malformed_chat_bodies_get_a_json_detail() {
    let app = spawn_app().await;
    let cases: [(&str, StatusCode); 8] = [
        ("{not json", StatusCode::BAD_REQUEST),
        ("[]", StatusCode::BAD_REQUEST),
        ("{}", StatusCode::BAD_REQUEST),
        (r#"{"content": 5}"#, StatusCode::BAD_REQUEST),
        (
            r#"{"content": "x", "session_id": 7}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"content": "x", "session_id": "has space"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (r#"{"content": ""}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (r#"{"content": "   "}"#, StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (body, status) in cases {
        let res = app
            .client
            .post(app.url("/api/chat"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{body}");
        let detail: Value = res.json().await.unwrap();
        assert!(detail["detail"].is_string(), "{body}: {detail}");
    }
    let list: Value = app.get_json("/api/sessions").await;
    assert_eq!(list, json!([]), "refused bodies created no session");
}

#[tokio::test]
async fn history_and_delete_answer_404_for_unknown_and_400_for_malformed_ids() {
    let app = spawn_app().await;
    let res = app.get("/api/sessions/nope/history").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"detail": "Session not found"})
    );
    let res = app.delete("/api/sessions/nope").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"detail": "Session not found"})
    );
    let long = "a".repeat(129);
    for bad in ["a%20b", "%C3%A9", long.as_str()] {
        let res = app.get(&format!("/api/sessions/{bad}/history")).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn every_session_route_refuses_a_malformed_id_with_the_same_detail() {
    let app = spawn_app().await;
    let detail = json!({
        "detail": "failed to parse parameter `id`: verification failed. pattern(\"^[A-Za-z0-9._:-]{1,128}$\")"
    });
    for res in [
        app.get("/api/sessions/a%20b/history").await,
        app.delete("/api/sessions/a%20b").await,
        app.post_empty("/api/sessions/a%20b/cancel").await,
        app.get("/api/sessions/a%20b/events").await,
    ] {
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{}", res.url());
        assert_eq!(res.json::<Value>().await.unwrap(), detail);
    }
}

#[tokio::test]
async fn deleting_a_session_removes_it() {
    let app = spawn_app().await;
    app.chat(json!({"content": "hi", "session_id": "gone"}))
        .await;
    let res = app.delete("/api/sessions/gone").await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = app.get("/api/sessions/gone/history").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_a_json_detail() {
    let app = spawn_app().await;
    let res = app.get("/api/nothing-here").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );
    let res = app.client.put(app.url("/api/health")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(res.json::<Value>().await.unwrap()["detail"].is_string());
}

#[tokio::test]
async fn oversized_bodies_get_413_with_a_json_detail() {
    let app = spawn_with(Options {
        http: HttpSettings {
            max_body_bytes: 1024,
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    let big = json!({"content": "x".repeat(4096)});
    let res = app.chat(big.clone()).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(res.json::<Value>().await.unwrap()["detail"].is_string());
    // Without Content-Length (chunked), the limit holds too.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.to_string())];
    let res = app
        .client
        .post(app.url("/api/chat"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn with_an_api_key_every_route_but_health_needs_it_and_refusals_have_no_effect() {
    let app = spawn_with(Options {
        api_key: Some("s3cret"),
        ..Options::default()
    })
    .await;
    let res = app.get("/api/health").await;
    assert_eq!(res.status(), StatusCode::OK);

    let res = app
        .chat(json!({"content": "hi", "session_id": "locked"}))
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"detail": "Invalid or missing API key"})
    );
    let res = app
        .client
        .get(app.url("/api/sessions"))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    let res = app
        .client
        .get(app.url("/api/sessions"))
        .header("x-api-key", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!([]),
        "the refused chat created nothing"
    );
    let res = app
        .client
        .get(app.url("/api/sessions"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_spec_and_docs_are_served() {
    let app = spawn_app().await;
    let spec: Value = app.get_json("/openapi.json").await;
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
    let res = app.get("/docs").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.text().await.unwrap().contains("swagger"));
}

#[tokio::test]
async fn checked_in_openapi_yaml_matches_the_served_spec() {
    let app = spawn_app().await;
    let served: Value = app.get_json("/openapi.json").await;
    let spec = autopoiesis::adapters::http::spec_service(&app.services);
    let generated = spec.spec_yaml();
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert!(
        checked_in == generated,
        "openapi.yaml is stale: run `cargo run -- openapi > openapi.yaml`"
    );
    assert_eq!(served, serde_json::from_str::<Value>(&spec.spec()).unwrap());
    for operation in served["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p.as_object().unwrap().values())
    {
        assert!(
            operation["operationId"].is_string(),
            "every operation has an operationId: {operation}"
        );
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_turns_by_outcome() {
    let app = spawn_with(Options {
        api_key: Some("k"),
        ..Options::default()
    })
    .await;
    let res = app.get("/metrics").await;
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "behind auth like every route"
    );
    let res = app
        .client
        .post(app.url("/api/chat"))
        .header("x-api-key", "k")
        .json(&json!({"content": "count me", "session_id": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = app
        .client
        .get(app.url("/metrics"))
        .header("x-api-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    for needle in [
        r#"autopoiesis_http_requests_total{method="POST",route="/api/chat",status="200"}"#,
        "autopoiesis_http_request_duration_seconds_bucket",
        r#"autopoiesis_turns_finished_total{outcome="done"}"#,
        "autopoiesis_turn_duration_seconds_bucket",
        "autopoiesis_turns_started_total",
        "autopoiesis_approvals_pending ",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id_kept_from_the_client_when_sane() {
    let app = spawn_app().await;
    let res = app.get("/api/health").await;
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    let res = app
        .client
        .get(app.url("/nope"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    let res = app
        .client
        .get(app.url("/api/health"))
        .header("x-request-id", "bad id\twith junk")
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "bad id\twith junk");
}

#[tokio::test]
async fn metrics_are_prefixed_and_count_live_sockets_by_transport() {
    let app = spawn_app().await;
    let _ws = app.ws("gauges").await;
    let sse = app.get("/api/sessions/gauges/events").await;
    assert_eq!(sse.status(), StatusCode::OK);
    app.wait_for_clients("gauges", 2).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for needle in [
        "autopoiesis_websocket_connections ",
        "autopoiesis_sse_connections ",
        "autopoiesis_http_connections ",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(!text.contains("\nstream_clients"), "{text}");
}

#[tokio::test]
async fn a_session_deleted_and_used_again_keeps_its_new_events_for_resuming_clients() {
    let app = spawn_app().await;
    let res = app
        .chat(json!({"content": "first life", "session_id": "again"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.delete("/api/sessions/again").await.status(), 204);
    // No client watches while the new turn runs.
    let res = app
        .chat(json!({"content": "second life", "session_id": "again"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut ws = app.ws_at("/api/ws/again?after_seq=0").await;
    let frames = crate::helpers::until_terminal(&mut ws).await;
    let done = frames.last().unwrap();
    assert_eq!(done["op"], "done");
    assert_eq!(done["data"]["content"], "second life");
    assert_eq!(frames[0]["seq"], 1, "the new stream starts from 1");
}

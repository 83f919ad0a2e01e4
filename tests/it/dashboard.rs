//! The dashboard API (SPEC A8) and the approval flow end to end: a deferred
//! turn recorded, listed, streamed, decided once.

use std::time::{Duration, Instant};

use autopoiesis::domain::chat::RuntimeSlot;
use futures::StreamExt;
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, spawn_with};

async fn unlocked() -> TestApp {
    spawn_with(Options {
        approval_key: true,
        ..Options::default()
    })
    .await
}

async fn get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let res = app.get(path).await;
    (res.status(), res.json().await.unwrap())
}

async fn post(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let res = app
        .client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    (res.status(), res.json().await.unwrap())
}

async fn defer_a_tool_call(app: &TestApp) {
    let res = app
        .chat(json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": "ops"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
}

/// Reads SSE events from `/api/stream` until `pred` holds for one.
async fn stream_until<B: AsRef<[u8]>>(
    body: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    buffer: &mut String,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let envelope: Value = serde_json::from_str(data).unwrap();
                if pred(&envelope) {
                    return envelope;
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.next())
            .await
            .expect("no such event within 10 s")
            .unwrap()
            .unwrap();
        buffer.push_str(std::str::from_utf8(chunk.as_ref()).unwrap());
    }
}

#[tokio::test]
async fn status_reports_the_agent_and_whether_approvals_are_unlocked() {
    let app = spawn_with(Options::default()).await;
    let (status, body) = get(&app, "/api/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["type"], "dashboard.status");
    assert_eq!(
        body["data"],
        json!({"initialized": true, "agent_name": "default", "shell_tier": "review", "approval_unlocked": false, "pending_approvals_count": 0})
    );
    assert_eq!(body["meta"]["tool"], "dashboard.status");
    chrono::DateTime::parse_from_rfc3339(body["meta"]["timestamp"].as_str().unwrap()).unwrap();
}

#[tokio::test]
async fn without_a_key_a_deferred_turn_records_nothing() {
    let app = spawn_with(Options::default()).await;
    defer_a_tool_call(&app).await;
    let (_, list) = get(&app, "/api/approvals").await;
    assert_eq!(
        list["data"],
        json!({"count": 0, "items": [], "next_cursor": null})
    );
}

#[tokio::test]
async fn a_deferred_turn_is_listed_streamed_and_decided_exactly_once() {
    let app = unlocked().await;
    let res = app.get("/api/stream").await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut stream = res.bytes_stream();
    let mut buffer = String::new();
    let connected = stream_until(&mut stream, &mut buffer, |_| true).await;
    assert_eq!(connected["type"], "stream.connected");
    let first = stream_until(&mut stream, &mut buffer, |e| e["type"] == "approval.list").await;
    assert_eq!(first["data"]["count"], 0);

    defer_a_tool_call(&app).await;

    // Pushed on creation, not on the 5 s timer.
    let pushed = stream_until(&mut stream, &mut buffer, |e| {
        e["type"] == "approval.list" && e["data"]["count"] == 1
    })
    .await;
    let item = &pushed["data"]["items"][0];
    assert_eq!(item["tool_count"], 1, "{pushed}");
    assert_eq!(item["requests"][0]["tool_name"], "execute");
    assert_eq!(item["requests"][0]["args"], json!({"command": "ls"}));
    assert_eq!(
        item["expires_at"].as_i64().unwrap() - item["issued_at"].as_i64().unwrap(),
        3600
    );
    let id = item["id"].as_str().unwrap().to_owned();

    let (_, status) = get(&app, "/api/status").await;
    assert_eq!(status["data"]["approval_unlocked"], true);
    assert_eq!(status["data"]["pending_approvals_count"], 1);
    let (_, list) = get(&app, "/api/approvals").await;
    assert_eq!(list["data"]["items"][0]["id"], id.as_str());

    let (code, decision) = post(
        &app,
        "/api/actions",
        json!({"action": "approve", "approval_id": id, "reason": "looks fine"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(decision["type"], "approval.decision");
    assert_eq!(decision["data"]["state"], "consumed");
    assert_eq!(decision["data"]["approved"], true);
    assert_eq!(
        decision["data"]["plan_hash_prefix"],
        item["plan_hash_prefix"]
    );
    let after = stream_until(&mut stream, &mut buffer, |e| {
        e["type"] == "approval.list" && e["data"]["count"] == 0
    })
    .await;
    assert_eq!(after["data"]["items"], json!([]));

    let (code, again) = post(
        &app,
        "/api/actions",
        json!({"action": "reject", "approval_id": id}),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(again["type"], "error.approval_not_found");
    assert_eq!(again["data"]["approval_id"], id.as_str());
}

#[tokio::test]
async fn rejecting_by_nonce_expires_the_envelope() {
    let app = unlocked().await;
    defer_a_tool_call(&app).await;
    let (_, list) = get(&app, "/api/approvals").await;
    let nonce = list["data"]["items"][0]["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, decision) = post(
        &app,
        "/api/actions",
        json!({"action": "reject", "approval_id": nonce}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(decision["data"]["state"], "expired");
    assert_eq!(decision["data"]["approved"], false);
}

#[tokio::test]
async fn actions_refuse_missing_ids_and_unknown_actions_and_send_messages() {
    let app = unlocked().await;
    let (code, body) = post(&app, "/api/actions", json!({"action": "approve"})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "error.missing_field");
    let (code, body) = post(&app, "/api/actions", json!({"action": "dance"})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "error.unknown_action");
    let (code, body) = post(
        &app,
        "/api/actions",
        json!({"action": "send_message", "payload": {"content": "hi", "session_id": "dash"}}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["type"], "action.send_message");
    assert_eq!(body["data"], json!({"session_id": "dash", "content": "hi"}));
    let (code, body) = post(
        &app,
        "/api/actions",
        json!({"action": "send_message", "payload": {"content": "/tool execute {}"}}),
    )
    .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(body["type"], "error.approval_unsupported");
    let (code, _) = post(&app, "/api/actions", json!({"action": 5})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn without_a_runtime_the_dashboard_answers_runtime_uninitialized() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Unavailable("Agent runtime unavailable: no provider".into()),
        ..Options::default()
    })
    .await;
    let (code, body) = get(&app, "/api/status").await;
    assert_eq!(code, StatusCode::OK, "an error envelope still answers 200");
    assert_eq!(body["type"], "error.runtime_uninitialized");
    assert_eq!(
        body["data"]["message"],
        "Agent runtime unavailable: no provider"
    );
    let (code, body) = post(
        &app,
        "/api/actions",
        json!({"action": "send_message", "payload": {"content": "hi"}}),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "error.runtime_uninitialized");
    for tool in ["system.info", "session.list"] {
        let (code, body) = post(&app, &format!("/api/tools/{tool}"), json!({})).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{tool}");
        assert_eq!(body["type"], "error.runtime_uninitialized", "{tool}");
    }
}

#[tokio::test]
async fn tools_are_listed_and_callable_with_their_own_envelopes() {
    let app = unlocked().await;
    let (code, body) = get(&app, "/api/tools").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["type"], "tools.list");
    let names: Vec<&str> = body["data"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "dashboard.status",
            "approval.list",
            "approval.decide",
            "system.info",
            "chat.send",
            "session.list"
        ]
    );
    assert_eq!(body["data"]["count"], 6);
    let decide = &body["data"]["tools"][2]["inputSchema"];
    assert!(
        decide["properties"]["approval_id"]["description"].is_string(),
        "{decide}"
    );

    let (code, info) = post(&app, "/api/tools/system.info", json!({})).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        info["type"], "system.info",
        "the tool's own envelope, not double-encoded"
    );
    assert_eq!(info["data"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["data"]["agent_configs"][0]["name"], "default");

    let (code, body) = post(
        &app,
        "/api/tools/approval.decide",
        json!({"approval_id": "nope", "approved": true}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["type"], "error.approval_not_found");
    let (code, body) = post(
        &app,
        "/api/tools/approval.decide",
        json!({"approved": "yes"}),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "error.invalid_arguments");
    let (code, body) = post(&app, "/api/tools/teleport", json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(body["type"], "error.unknown_tool");
}

#[tokio::test]
async fn a_locked_approval_database_answers_503_within_a_second_and_recovers() {
    let app = spawn_with(Options {
        approval_key: true,
        // The server's own default wait, which this measures.
        database_wait: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    defer_a_tool_call(&app).await;
    let (_, list) = get(&app, "/api/approvals").await;
    let id = list["data"]["items"][0]["id"].as_str().unwrap().to_owned();
    let url =
        autopoiesis::adapters::persistence::sqlite_url(&app.data_path().join("approvals.sqlite"));
    // Another process takes the write lock and holds it.
    let intruder = Database::connect(url.as_str()).await.unwrap();
    intruder
        .execute_unprepared("BEGIN EXCLUSIVE")
        .await
        .unwrap();
    intruder
        .execute_unprepared("UPDATE approval_envelopes SET key_id = key_id")
        .await
        .unwrap();

    let started = Instant::now();
    let (code, body) = post(
        &app,
        "/api/actions",
        json!({"action": "approve", "approval_id": id}),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["type"], "error.storage_unavailable");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    let res = app
        .chat(json!({"content": r#"/tool execute {"command":"pwd"}"#, "session_id": "ops"}))
        .await;
    // Sessions share the database: the turn is refused before it runs.
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no turn runs on a locked database"
    );
    assert!(
        res.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("storage")
    );

    intruder.execute_unprepared("ROLLBACK").await.unwrap();
    intruder.close().await.unwrap();
    let (code, body) = post(
        &app,
        "/api/actions",
        json!({"action": "approve", "approval_id": id}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "consumed");
}

#[tokio::test]
async fn a_pending_row_written_by_the_python_original_shows_in_approval_list() {
    let dir = tempfile::tempdir().unwrap();
    let url = autopoiesis::adapters::persistence::sqlite_url(&dir.path().join("approvals.sqlite"));
    let original = Database::connect(url.as_str()).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    original
        .execute_unprepared(&format!(
            "CREATE TABLE approval_envelopes (
                envelope_id TEXT PRIMARY KEY, nonce TEXT UNIQUE NOT NULL,
                scope_json TEXT NOT NULL, tool_calls_json TEXT NOT NULL,
                plan_hash TEXT NOT NULL, key_id TEXT NOT NULL,
                signed_object_json TEXT, signature_hex TEXT, state TEXT NOT NULL,
                issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, consumed_at INTEGER);
             INSERT INTO approval_envelopes VALUES ('py-envelope', 'py-nonce', '{{}}',
                '[{{\"tool_call_id\":\"c1\",\"tool_name\":\"execute\",\"args\":{{\"command\":\"uptime\"}}}}]',
                'abcdef0123456789', 'key', NULL, NULL, 'pending', {now}, {}, NULL);",
            now + 3600
        ))
        .await
        .unwrap();
    original.close().await.unwrap();

    let app = spawn_with(Options {
        database_url: Some(url),
        ..Options::default()
    })
    .await;
    let (code, list) = get(&app, "/api/approvals").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["data"]["count"], 1);
    let item = &list["data"]["items"][0];
    assert_eq!(item["id"], "py-envelope");
    assert_eq!(item["nonce"], "py-nonce");
    assert_eq!(item["plan_hash_prefix"], "abcdef01");
    assert_eq!(item["requests"][0]["args"], json!({"command": "uptime"}));
    let (code, decision) = post(
        &app,
        "/api/actions",
        json!({"action": "reject", "approval_id": "py-nonce"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(decision["data"]["id"], "py-envelope");
}

/// Defers `n` tool calls, on sessions of their own.
async fn defer_tool_calls(app: &TestApp, n: usize) {
    for i in 0..n {
        let res = app
            .chat(json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": format!("ops{i}")}))
            .await;
        assert_eq!(res.status(), StatusCode::CONFLICT);
    }
}

/// Opens `/api/stream` and reads it up to its first `approval.list`.
async fn open_stream(
    app: &TestApp,
) -> (
    impl futures::Stream<Item = reqwest::Result<hyper::body::Bytes>> + Unpin,
    String,
) {
    let res = app.get("/api/stream").await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut stream = res.bytes_stream();
    let mut buffer = String::new();
    stream_until(&mut stream, &mut buffer, |e| e["type"] == "approval.list").await;
    (stream, buffer)
}

#[tokio::test]
async fn status_and_metrics_count_pending_approvals_without_loading_them() {
    let app = unlocked().await;
    defer_tool_calls(&app, 3).await;
    let before = app.approval_reads.lists();
    let (code, status) = get(&app, "/api/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["data"]["pending_approvals_count"], 3);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "autopoiesis_approvals_pending 3"),
        "{metrics}"
    );
    assert_eq!(
        app.approval_reads.lists(),
        before,
        "no envelope was loaded to count them"
    );
}

#[tokio::test]
async fn approval_list_pages_oldest_first_with_an_opaque_cursor_and_the_total_count() {
    let app = unlocked().await;
    defer_tool_calls(&app, 5).await;
    let (_, all) = get(&app, "/api/approvals").await;
    assert_eq!(all["data"]["count"], 5);
    assert_eq!(all["data"]["next_cursor"], Value::Null);
    let everything: Vec<Value> = all["data"]["items"].as_array().unwrap().clone();
    assert_eq!(everything.len(), 5);

    let mut seen = Vec::new();
    let mut path = "/api/approvals?limit=2".to_owned();
    loop {
        let (code, page) = get(&app, &path).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        assert_eq!(page["type"], "approval.list");
        assert_eq!(page["data"]["count"], 5, "the total, not the page's size");
        let items = page["data"]["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().cloned());
        match page["data"]["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/approvals?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, everything, "pages cover the list once, in order");

    // The same arguments through the tool (as MCP sends them).
    let (code, page) = post(&app, "/api/tools/approval.list", json!({"limit": 4})).await;
    assert_eq!(code, StatusCode::OK, "{page}");
    assert_eq!(page["data"]["items"].as_array().unwrap().len(), 4);
    let cursor = page["data"]["next_cursor"].as_str().unwrap().to_owned();
    let (_, last) = post(
        &app,
        "/api/tools/approval.list",
        json!({"limit": 4, "cursor": cursor}),
    )
    .await;
    assert_eq!(last["data"]["items"][0], everything[4]);
    assert_eq!(last["data"]["next_cursor"], Value::Null);

    for bad in ["limit=0", "limit=501", "cursor=not-a-cursor"] {
        let (code, body) = get(&app, &format!("/api/approvals?{bad}")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["type"], "error.invalid_arguments", "{bad}");
    }
}

#[tokio::test]
async fn a_deferred_call_with_oversized_arguments_still_answers_409_and_records_nothing() {
    let app = unlocked().await;
    let command = "x".repeat(70 * 1024);
    let res = app
        .chat(json!({"content": format!(r#"/tool execute {{"command":"{command}"}}"#), "session_id": "big"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["detail"]["code"], "approval_unsupported");
    let (_, status) = get(&app, "/api/status").await;
    assert_eq!(status["data"]["pending_approvals_count"], 0);
}

#[tokio::test]
async fn beyond_1000_pending_approvals_a_deferred_turn_records_nothing() {
    let app = unlocked().await;
    let url =
        autopoiesis::adapters::persistence::sqlite_url(&app.data_path().join("approvals.sqlite"));
    let db = Database::connect(url.as_str()).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let rows: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "('e{i}', 'n{i}', '{{}}', '[]', 'abcdef0123456789', 'key', NULL, NULL, 'pending', {now}, {}, NULL)",
                now + 3600
            )
        })
        .collect();
    db.execute_unprepared(&format!(
        "INSERT INTO approval_envelopes VALUES {}",
        rows.join(",")
    ))
    .await
    .unwrap();
    db.close().await.unwrap();

    let res = app
        .chat(json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": "full"}))
        .await;
    assert_eq!(
        res.status(),
        StatusCode::CONFLICT,
        "the turn is still deferred"
    );
    let (_, status) = get(&app, "/api/status").await;
    assert_eq!(status["data"]["pending_approvals_count"], 1000);
}

#[tokio::test]
async fn dashboard_streams_share_one_store_read_per_change_and_decisions_keep_succeeding() {
    let app = spawn_with(Options {
        approval_key: true,
        http: autopoiesis::adapters::http::HttpSettings {
            // No timer ticks during the test: only changes refresh.
            dashboard_refresh: Duration::from_secs(600),
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(open_stream(&app).await);
    }
    let before = app.approval_reads.lists();
    defer_tool_calls(&app, 1).await;
    for (stream, buffer) in &mut streams {
        stream_until(stream, buffer, |e| {
            e["type"] == "approval.list" && e["data"]["count"] == 1
        })
        .await;
    }
    let reads = app.approval_reads.lists() - before;
    assert_eq!(reads, 1, "one listing for 20 streams, not one each");

    defer_tool_calls(&app, 10).await;
    let (_, list) = get(&app, "/api/approvals").await;
    for item in list["data"]["items"].as_array().unwrap() {
        let (code, body) = post(
            &app,
            "/api/actions",
            json!({"action": "approve", "approval_id": item["id"]}),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
}

#[tokio::test]
async fn dashboard_streams_beyond_max_clients_are_refused_with_429() {
    let app = spawn_with(Options {
        stream: autopoiesis::adapters::stream::StreamSettings {
            max_clients: 2,
            ..Default::default()
        },
        http: autopoiesis::adapters::http::HttpSettings {
            // A client that went away is noticed at the next write.
            dashboard_refresh: Duration::from_millis(100),
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let first = open_stream(&app).await;
    let _second = open_stream(&app).await;
    let res = app.get("/api/stream").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("too many"),
        "{body}"
    );
    let res = app.get("/api/sessions/s/events").await;
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "dashboard streams and session streams share the limit"
    );

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = app.get("/api/stream").await;
        if res.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deleting_the_sqlite_file_under_a_running_server_answers_503() {
    let app = unlocked().await;
    defer_a_tool_call(&app).await;
    let (_, list) = get(&app, "/api/approvals").await;
    let id = list["data"]["items"][0]["id"].as_str().unwrap().to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(app.data_path().join(format!("approvals.sqlite{suffix}")));
    }

    let (code, body) = get(&app, "/api/approvals").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["type"], "error.storage_unavailable");
    let (code, body) = post(
        &app,
        "/api/actions",
        json!({"action": "approve", "approval_id": id}),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let res = app
        .chat(json!({"content": r#"/tool execute {"command":"pwd"}"#, "session_id": "ops"}))
        .await;
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the approval would have vanished"
    );
}

#[tokio::test]
async fn approval_list_query_errors_are_envelopes_and_an_empty_cursor_is_the_first_page() {
    let app = spawn_with(Options::default()).await;
    let res = app.get("/api/approvals?limit=abc").await;
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["type"], "error.invalid_arguments", "{body}");
    let res = app.get("/api/approvals?cursor=").await;
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["type"], "approval.list", "{body}");
}

/// A body that gives one key twice is refused before any handler reads it,
/// and still in the shape these operations declare for a 400: their
/// `error.invalid_arguments` envelope.
#[tokio::test]
async fn a_key_given_twice_is_refused_with_the_operations_envelope() {
    let app = unlocked().await;
    for (path, body, tool) in [
        (
            "/api/actions",
            r#"{"action":"approve","action":"reject","approval_id":"a"}"#,
            "dashboard.action",
        ),
        (
            "/api/tools/approval.list",
            r#"{"limit":1,"limit":2}"#,
            "tools.call",
        ),
    ] {
        let res = app
            .client
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["type"], "error.invalid_arguments", "{path}: {body}");
        assert_eq!(body["meta"]["tool"], tool, "{path}: {body}");
        assert!(
            body["data"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("appears twice")),
            "{path}: {body}"
        );
    }
}

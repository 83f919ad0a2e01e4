//! Several instances on one PostgreSQL act as one server (SPEC B12): two
//! real server processes on the same database schema, spoken to directly
//! and through a round-robin proxy that sends every connection to the next
//! instance. Skipped without `AUTOPOIESIS_TEST_DATABASE_URL` (CI sets it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::durable::{Data, Server};
use crate::helpers::{Ws, message_frame, next, until_terminal};

/// One schema of CI's PostgreSQL for the test's instances, or `None` (the
/// test is skipped) without one.
async fn shared_data() -> Option<Data> {
    let Some(url) = crate::helpers::postgres_schema_url().await else {
        eprintln!("skipped: AUTOPOIESIS_TEST_DATABASE_URL is not set");
        return None;
    };
    Some(Data {
        name: "postgres",
        dir: tempfile::tempdir().unwrap(),
        database_url: Some(url),
    })
}

/// Two instances on `data`, started one after the other (the first
/// migrates the schema). Each has its own data dir for its agent config;
/// they share only the database.
fn two_instances(data: &Data, delay_ms: u64, extra: &[&str], env: &[(&str, &str)]) -> [Server; 2] {
    let a = Server::start_with_env(data, delay_ms, extra, env);
    let second = Data {
        name: data.name,
        dir: tempfile::tempdir().unwrap(),
        database_url: data.database_url.clone(),
    };
    let b = Server::start_with_env(&second, delay_ms, extra, env);
    // The second data dir only held the config file, read at start.
    drop(second);
    [a, b]
}

async fn ws(server: &Server, session: &str, after_seq: Option<u64>) -> Ws {
    let query = after_seq.map_or(String::new(), |n| format!("?after_seq={n}"));
    server.ws(&format!("/api/ws/{session}{query}")).await
}

/// The (seq, op, turn) of each frame.
fn shape(frames: &[Value]) -> Vec<(u64, String, String)> {
    frames
        .iter()
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["op"].as_str().unwrap().to_owned(),
                f["turn_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn assert_contiguous(frames: &[Value], from: u64) {
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (from..from + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "no gap, no repeat: {frames:?}");
}

async fn post(base: &str, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// `POST /api/chat` on `server` in a task of its own: its status.
fn spawn_chat(
    server: &Server,
    session: &str,
    content: String,
) -> tokio::task::JoinHandle<StatusCode> {
    let (base, session) = (server.base.clone(), session.to_owned());
    tokio::spawn(async move {
        post(
            &base,
            "/api/chat",
            json!({"content": content, "session_id": session}),
        )
        .await
        .status()
    })
}

/// Reads frames until a token arrives (and returns them).
async fn until_token(ws: &mut Ws) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = next(ws).await;
        let token = frame["op"] == "token";
        frames.push(frame);
        if token {
            return frames;
        }
    }
}

/// A TCP proxy on 127.0.0.1 that hands each new connection to the next
/// backend in turn (what a round-robin balancer without sticky sessions
/// does).
struct RoundRobin {
    address: String,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    async fn start(backends: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let i = next.fetch_add(1, Ordering::SeqCst) % backends.len();
                let backend = backends[i].clone();
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Self { address, task }
    }

    fn base(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that opens a new connection per request, so the proxy sends
/// consecutive requests to alternating instances.
fn unpooled() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

fn address_of(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn clients_on_both_instances_see_the_same_seqs_whichever_instance_runs_the_turn() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 2, &[], &[]);
    let mut on_a = ws(&a, "same", Some(0)).await;
    let mut on_b = ws(&b, "same", Some(0)).await;
    for (runs, content) in [
        (&a, "one two three four five six"),
        (&b, "seven eight nine"),
    ] {
        let res = post(
            &runs.base,
            "/api/chat",
            json!({"content": content, "session_id": "same"}),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK);
        let seen_a = until_terminal(&mut on_a).await;
        let seen_b = until_terminal(&mut on_b).await;
        assert_eq!(shape(&seen_a), shape(&seen_b), "the same stream on both");
        assert_eq!(seen_a, seen_b, "the same frames, byte for byte");
        assert_eq!(seen_a.last().unwrap()["op"], "done");
    }
    // Both turns, one stream: numbering went on across the instances.
    let all = crate::durable::frames_after(&b, "same", 0, Duration::from_millis(300)).await;
    assert_contiguous(&all, 1);
    let turns: std::collections::BTreeSet<&str> =
        all.iter().filter_map(|f| f["turn_id"].as_str()).collect();
    assert_eq!(turns.len(), 2, "{all:?}");
}

#[tokio::test]
async fn a_client_resumes_on_the_other_instance_and_gets_every_event_once() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 20, &[], &[]);
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let mut on_a = ws(&a, "resume", None).await;
    on_a.send(message_frame(&words.join(" "))).await.unwrap();
    let mut first = until_token(&mut on_a).await;
    first.push(next(&mut on_a).await);
    first.push(next(&mut on_a).await);
    drop(on_a);
    let last = first.last().unwrap()["seq"].as_u64().unwrap();

    let mut on_b = ws(&b, "resume", Some(last)).await;
    let rest = until_terminal(&mut on_b).await;
    assert_eq!(rest[0]["seq"].as_u64().unwrap(), last + 1, "{rest:?}");
    assert_contiguous(&rest, last + 1);
    assert_eq!(rest.last().unwrap()["op"], "done");
    let text: String = first
        .iter()
        .chain(&rest)
        .filter(|f| f["op"] == "token")
        .map(|f| f["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        text.split_whitespace().collect::<Vec<_>>(),
        words,
        "every token once"
    );
}

#[tokio::test]
async fn twelve_concurrent_chats_on_one_session_through_a_balancer_run_one_at_a_time() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 1, &["--max-queued-turns", "16"], &[]);
    let proxy = RoundRobin::start(vec![address_of(&a), address_of(&b)]).await;
    let client = unpooled();
    let chats = (0..12).map(|i| {
        let (client, base) = (client.clone(), proxy.base());
        async move {
            let res = client
                .post(format!("{base}/api/chat"))
                .json(&json!({"content": format!("prompt {i} of twelve"), "session_id": "busy"}))
                .send()
                .await
                .unwrap();
            (res.status(), res.json::<Value>().await.unwrap())
        }
    });
    for (status, body) in futures::future::join_all(chats).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let history: Value = client
        .get(format!("{}/api/sessions/busy/history", proxy.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 24, "{history}");
    let mut prompts = std::collections::BTreeSet::new();
    for pair in messages.chunks(2) {
        assert_eq!(pair[0]["kind"], "request", "{history}");
        assert_eq!(pair[1]["kind"], "response", "{history}");
        let prompt = pair[0]["parts"][0]["content"].as_str().unwrap();
        let answer = pair[1]["parts"][0]["content"].as_str().unwrap();
        assert_eq!(answer, prompt, "each answer right after its own prompt");
        assert!(prompts.insert(prompt.to_owned()), "{prompt} twice");
    }
    assert_eq!(prompts.len(), 12);
}

#[tokio::test]
async fn a_cancel_sent_to_one_instance_stops_the_turn_running_on_the_other() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 50, &[], &[]);
    let mut watch = ws(&b, "stop", Some(0)).await;
    let long: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
    let chat = spawn_chat(&a, "stop", long.join(" "));
    until_token(&mut watch).await;
    let res = post(&b.base, "/api/sessions/stop/cancel", json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED, "{:?}", res.text().await);
    let frames = until_terminal(&mut watch).await;
    assert_eq!(frames.last().unwrap()["op"], "cancelled", "{frames:?}");
    assert_ne!(
        chat.await.unwrap(),
        StatusCode::OK,
        "the chat on A was cut short"
    );
    // Nothing runs any more: a second cancel finds nothing on either.
    let again = post(&a.base, "/api/sessions/stop/cancel", json!({})).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_ticket_issued_by_one_instance_opens_a_stream_on_the_other_once() {
    let Some(data) = shared_data().await else {
        return;
    };
    let key = "cluster-test-key";
    let [a, b] = two_instances(&data, 0, &[], &[("AUTOPOIESIS_API_KEY", key)]);
    let ticket: Value = reqwest::Client::new()
        .post(format!("{}/api/auth/ticket", a.base))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = ticket["ticket"].as_str().unwrap();
    let url = format!("{}/api/ws/t?ticket={ticket}", b.ws_base);
    let (mut opened, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    opened.send(message_frame("hello")).await.unwrap();
    assert_eq!(
        until_terminal(&mut opened).await.last().unwrap()["op"],
        "done"
    );
    let again = tokio_tungstenite::connect_async(&url).await;
    assert!(again.is_err(), "a ticket opens one connection");
}

#[tokio::test]
async fn an_approval_made_on_one_instance_reaches_the_other_instances_dashboard_stream() {
    let Some(data) = shared_data().await else {
        return;
    };
    let key_file = data.dir.path().join("approval.key");
    autopoiesis::adapters::ed25519::Ed25519ApprovalKey::create_file(&key_file).unwrap();
    let key_file = key_file.to_str().unwrap().to_owned();
    let [a, b] = two_instances(&data, 0, &["--approval-key-file", &key_file], &[]);
    let res = reqwest::get(format!("{}/api/stream", b.base))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut stream = res.bytes_stream();
    let mut buffer = String::new();
    let mut until = async |wanted: &dyn Fn(&Value) -> bool| loop {
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
                && let Ok(value) = serde_json::from_str::<Value>(data)
                && wanted(&value)
            {
                return value;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("no dashboard event within 20 s")
            .unwrap()
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    };
    until(&|e| e["type"] == "approval.list" && e["data"]["count"] == 0).await;
    let res = post(
        &a.base,
        "/api/chat",
        json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": "ap"}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CONFLICT, "deferred for approval");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"]["approval_id"].is_string(),
        "recorded: {body}"
    );
    let listed = until(&|e| e["type"] == "approval.list" && e["data"]["count"] == 1).await;
    let id = listed["data"]["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Decided on A; B's stream hears that too.
    let res = post(
        &a.base,
        "/api/actions",
        json!({"action": "approve", "approval_id": id}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    until(&|e| e["type"] == "approval.list" && e["data"]["count"] == 0).await;
}

#[tokio::test]
async fn sigkill_of_the_instance_running_a_turn_ends_it_interrupted_on_the_other() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 100, &[], &[]);
    let mut watch = ws(&b, "crash", Some(0)).await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let _chat = spawn_chat(&a, "crash", words.join(" "));
    let before = until_token(&mut watch).await;
    a.kill();
    // The lease is 1 s; `next` allows 10 s per frame.
    let after = until_terminal(&mut watch).await;
    let ending = after.last().unwrap();
    assert_eq!(ending["op"], "error", "{ending}");
    assert_eq!(ending["data"]["code"], "turn_interrupted", "{ending}");
    assert_eq!(ending["turn_id"], before.last().unwrap()["turn_id"]);
    let (_, history) = b.get("/api/sessions/crash/history").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(
        messages[0]["parts"][0]["content"],
        words.join(" "),
        "the prompt is kept"
    );
    // The session takes new turns, on the survivor.
    let reply = b.chat("crash", "after").await;
    assert_eq!(reply["content"], "after");
}

#[tokio::test]
async fn the_listener_connection_killed_by_postgresql_comes_back_and_nothing_is_lost() {
    let Some(data) = shared_data().await else {
        return;
    };
    let url = data.database_url.clone().unwrap();
    let schema = url.rsplit("search_path%3D").next().unwrap().to_owned();
    let [a, b] = two_instances(&data, 20, &[], &[]);
    let mut watch = ws(&b, "listen", Some(0)).await;
    let mut on_a = ws(&a, "listen", None).await;
    let words: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
    on_a.send(message_frame(&words.join(" "))).await.unwrap();
    let mut seen = until_token(&mut watch).await;

    let admin = sea_orm::Database::connect(
        std::env::var("AUTOPOIESIS_TEST_DATABASE_URL")
            .unwrap()
            .as_str(),
    )
    .await
    .unwrap();
    let kill = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%' AND query LIKE '%{schema}%'"
    );
    let killed = sea_orm::ConnectionTrait::query_all_raw(
        &admin,
        sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, kill),
    )
    .await
    .unwrap();
    assert_eq!(killed.len(), 2, "one listener per instance");

    seen.extend(until_terminal(&mut watch).await);
    assert_contiguous(&seen, 1);
    assert_eq!(seen.last().unwrap()["op"], "done");
    let text: String = seen
        .iter()
        .filter(|f| f["op"] == "token")
        .map(|f| f["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text.split_whitespace().collect::<Vec<_>>(), words);
    // It listens again (and says so in its metrics).
    let mut reconnected = false;
    for _ in 0..100 {
        let metrics = reqwest::get(format!("{}/metrics", b.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("autopoiesis_cluster_listener_reconnects_total 1") {
            reconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reconnected, "the listener connected again");
    let reply = post(
        &a.base,
        "/api/chat",
        json!({"content": "later", "session_id": "listen"}),
    )
    .await;
    assert_eq!(reply.status(), StatusCode::OK);
    let later = until_terminal(&mut watch).await;
    assert_eq!(
        later[0]["seq"].as_u64().unwrap(),
        seen.last().unwrap()["seq"].as_u64().unwrap() + 1
    );
    assert_eq!(later.last().unwrap()["op"], "done");
    drop(admin);
}

#[tokio::test]
async fn mcp_through_a_balancer_works_in_both_eras_an_initialize_session_going_on_on_either_instance()
 {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 0, &[], &[]);
    let proxy = RoundRobin::start(vec![address_of(&a), address_of(&b)]).await;
    let client = unpooled();
    let rpc = |body: Value, session: Option<String>| {
        let (client, url) = (client.clone(), format!("{}/mcp", proxy.base()));
        async move {
            let mut request = client
                .post(url)
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2025-06-18")
                .json(&body);
            if let Some(session) = session {
                request = request.header("mcp-session-id", session);
            }
            request.send().await.unwrap()
        }
    };
    let init = rpc(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "balanced", "version": "0"}}}),
        None,
    )
    .await;
    assert_eq!(init.status(), StatusCode::OK);
    let session = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    drop(init);
    let initialized = rpc(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        Some(session.clone()),
    )
    .await;
    assert_eq!(initialized.status(), StatusCode::ACCEPTED);
    // Four more requests: two land on each instance.
    for id in 2..6 {
        let res = rpc(
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"}),
            Some(session.clone()),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK, "request {id}");
        let body = res.text().await.unwrap();
        assert!(body.contains("session.list"), "request {id}: {body}");
    }
    // The session-less 2026-07-28 era needs nothing shared: any instance.
    for id in 6..10 {
        let res = client
            .post(format!("{}/mcp", proxy.base()))
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/list")
            .json(
                &json!({"jsonrpc": "2.0", "id": id, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "balanced", "version": "0"}}}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {id}");
        let body = res.text().await.unwrap();
        assert!(body.contains("session.list"), "request {id}: {body}");
    }
}

#[tokio::test]
async fn sessions_and_history_are_the_same_on_both_instances() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 0, &[], &[]);
    a.chat("listed", "hello there").await;
    let (_, on_a) = a.get("/api/sessions").await;
    let (_, on_b) = b.get("/api/sessions").await;
    assert_eq!(on_a, on_b);
    assert_eq!(
        a.get("/api/sessions/listed/history").await,
        b.get("/api/sessions/listed/history").await
    );
    // Deleted on B: gone on A too, and its clients on A are closed.
    let mut on_a_ws = ws(&a, "listed", Some(0)).await;
    let res = reqwest::Client::new()
        .delete(format!("{}/api/sessions/listed", b.base))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    assert_eq!(
        a.get("/api/sessions/listed/history").await.0,
        StatusCode::NOT_FOUND
    );
    loop {
        match tokio::time::timeout(Duration::from_secs(10), on_a_ws.next()).await {
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => break,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the client on A was not closed"),
        }
    }
}

#[tokio::test]
async fn instances_started_together_on_a_new_schema_both_migrate_and_serve() {
    let Some(data) = shared_data().await else {
        return;
    };
    let second = Data {
        name: data.name,
        dir: tempfile::tempdir().unwrap(),
        database_url: data.database_url.clone(),
    };
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| Server::start(&data, 0, &[]));
        let b = scope.spawn(|| Server::start(&second, 0, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (server, session) in [(&a, "first"), (&b, "second")] {
        let reply = server.chat(session, "hello").await;
        assert_eq!(reply["content"], "hello");
    }
    let (_, listed) = a.get("/api/sessions").await;
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
}

#[tokio::test]
async fn a_client_asking_for_prompts_gets_them_from_turns_run_on_the_other_instance() {
    let Some(data) = shared_data().await else {
        return;
    };
    let [a, b] = two_instances(&data, 2, &[], &[]);
    let mut on_b = b.ws("/api/ws/prompted?after_seq=0&events=prompt").await;
    let res = post(
        &a.base,
        "/api/chat",
        json!({"content": "asked on A", "session_id": "prompted"}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let seen = until_terminal(&mut on_b).await;
    assert_eq!(seen[0]["op"], "prompt", "{seen:?}");
    assert_eq!(seen[0]["data"]["content"], "asked on A");
    assert!(seen[0].get("seq").is_none());
    assert_contiguous(&seen[1..], 1);
}

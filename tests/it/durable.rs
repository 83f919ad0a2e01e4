//! Durable sessions (SPEC B10, B11): real server processes stopped with
//! SIGTERM or killed with SIGKILL and started again on the same data, on
//! SQLite and (when `AUTOPOIESIS_TEST_DATABASE_URL` is set) PostgreSQL; and
//! delivery by cursor, resets, faults and stored rows gone bad, in process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Options, Ws, echo, message_frame, next, spawn_with, until_terminal};
use autopoiesis::domain::chat::RuntimeSlot;

/// Where a test's servers keep their data: a data dir, and a database URL
/// (`None`: the SQLite file in the data dir).
pub(crate) struct Data {
    pub(crate) name: &'static str,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) database_url: Option<String>,
}

/// SQLite, and PostgreSQL in a schema of the test's own when configured.
async fn data_stores() -> Vec<Data> {
    let mut stores = vec![Data {
        name: "sqlite",
        dir: tempfile::tempdir().unwrap(),
        database_url: None,
    }];
    if let Some(url) = crate::helpers::postgres_schema_url().await {
        stores.push(Data {
            name: "postgres",
            dir: tempfile::tempdir().unwrap(),
            database_url: Some(url),
        });
    }
    stores
}

/// A `serve` process on port 0 with the echo agent streaming a token every
/// `delay_ms`.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    pub(crate) ws_base: String,
}

impl Server {
    pub(crate) fn start(data: &Data, delay_ms: u64, extra: &[&str]) -> Self {
        Self::start_with_env(data, delay_ms, extra, &[])
    }

    /// [`Self::start`] with `env` set for the process.
    pub(crate) fn start_with_env(
        data: &Data,
        delay_ms: u64,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let config = data.dir.path().join("agents.toml");
        std::fs::write(
            &config,
            format!(
                "[agents.default]\nmodel = \"echo:delay_ms={delay_ms}\"\ntools = [\"execute\"]\n"
            ),
        )
        .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_autopoiesis"));
        for var in [
            "AUTOPOIESIS_API_KEY",
            "AUTOPOIESIS_PORT",
            "AUTOPOIESIS_AGENT",
        ] {
            command.env_remove(var);
        }
        command
            .args(["serve", "--port", "0", "--data-dir"])
            .arg(data.dir.path())
            .arg("--config")
            .arg(&config)
            .args(["--instance-lease", "1s"])
            .args(extra)
            .envs(env.iter().copied());
        if let Some(url) = &data.database_url {
            command.args(["--database-url", url]);
        }
        let (child, address) = crate::helpers::spawn_serve(command);
        Self {
            child,
            base: format!("http://{address}"),
            ws_base: format!("ws://{address}"),
        }
    }

    pub(crate) fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// SIGTERM, then waits for a clean exit.
    pub(crate) fn stop(mut self) {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit status {status}");
    }

    /// SIGKILL: no shutdown code runs.
    pub(crate) fn kill(mut self) {
        self.signal("-KILL");
        self.child.wait().unwrap();
    }

    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        let res = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn chat(&self, session: &str, content: &str) -> Value {
        let res = reqwest::Client::new()
            .post(format!("{}/api/chat", self.base))
            .json(&json!({"content": content, "session_id": session}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.unwrap()
    }

    pub(crate) async fn ws(&self, path: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{}{path}", self.ws_base))
            .await
            .unwrap();
        ws
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What clients can see of every session: id, created_at, message_count.
fn listing(list: &Value) -> Vec<(String, String, u64)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["created_at"].as_str().unwrap().to_owned(),
                s["message_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Every frame a client resuming after `after` gets until the socket has
/// been silent for `quiet`.
pub(crate) async fn frames_after(
    server: &Server,
    session: &str,
    after: u64,
    quiet: Duration,
) -> Vec<Value> {
    let mut ws = server
        .ws(&format!("/api/ws/{session}?after_seq={after}"))
        .await;
    let mut frames = Vec::new();
    while let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(quiet, ws.next()).await {
        frames.push(serde_json::from_str(&text).unwrap());
    }
    frames
}

fn seq(frame: &Value) -> u64 {
    frame["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn after_a_sigterm_restart_sessions_history_and_the_stream_are_the_same_and_seq_continues() {
    for data in data_stores().await {
        let server = Server::start(&data, 0, &[]);
        server.chat("a", "one two three").await;
        server.chat("a", "four five").await;
        server.chat("b", "six").await;
        let (_, before) = server.get("/api/sessions").await;
        let (_, history_a) = server.get("/api/sessions/a/history").await;
        let (_, history_b) = server.get("/api/sessions/b/history").await;
        let stream = frames_after(&server, "a", 0, Duration::from_millis(300)).await;
        let last = seq(stream.last().unwrap());
        assert_eq!(stream.last().unwrap()["op"], "done");
        let middle = last / 2;
        server.stop();

        let server = Server::start(&data, 0, &[]);
        let (status, after) = server.get("/api/sessions").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(listing(&after), listing(&before), "{}", data.name);
        assert_eq!(server.get("/api/sessions/a/history").await.1, history_a);
        assert_eq!(server.get("/api/sessions/b/history").await.1, history_b);
        // Exactly the missed events, the same frames as before the restart.
        let resumed = frames_after(&server, "a", middle, Duration::from_millis(300)).await;
        let expected: Vec<Value> = stream.iter().filter(|f| seq(f) > middle).cloned().collect();
        assert_eq!(resumed, expected, "{}", data.name);
        // The next turn's numbering continues right above it.
        let mut ws = server.ws(&format!("/api/ws/a?after_seq={last}")).await;
        futures::SinkExt::send(&mut ws, message_frame("seven"))
            .await
            .unwrap();
        let turn = until_terminal(&mut ws).await;
        assert_eq!(seq(&turn[0]), last + 1, "{}", data.name);
        assert_eq!(turn.last().unwrap()["op"], "done");
        server.stop();
    }
}

#[tokio::test]
async fn a_turn_cut_short_by_sigkill_ends_interrupted_at_the_next_start_and_no_seq_is_reused() {
    for data in data_stores().await {
        let server = Server::start(&data, 20, &[]);
        let mut ws = server.ws("/api/ws/k").await;
        let prompt = "word ".repeat(300);
        futures::SinkExt::send(&mut ws, message_frame(&prompt))
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 30 {
            seen.push(next(&mut ws).await);
        }
        let turn_id = seen[0]["turn_id"].as_str().unwrap().to_owned();
        let highest = seen.iter().map(seq).max().unwrap();
        // Let the group commit store some of what was sent.
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.kill();

        let server = Server::start(&data, 0, &[]);
        let mut frames = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !frames.iter().any(|f: &Value| f["op"] == "error") {
            assert!(Instant::now() < deadline, "no turn_interrupted: {frames:?}");
            frames.extend(frames_after(&server, "k", highest, Duration::from_millis(300)).await);
            if frames.iter().any(|f| f["op"] == "error") {
                break;
            }
            frames.clear();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ending = frames.iter().find(|f| f["op"] == "error").unwrap();
        assert_eq!(ending["data"]["code"], "turn_interrupted", "{}", data.name);
        assert_eq!(ending["turn_id"], turn_id.as_str());
        for frame in frames.iter().filter(|f| f["seq"].is_u64()) {
            assert!(
                seq(frame) > highest,
                "seq {} reused: {}",
                seq(frame),
                data.name
            );
        }
        let (_, history) = server.get("/api/sessions/k/history").await;
        let messages = history["messages"].as_array().unwrap();
        assert_eq!(messages[0]["parts"][0]["content"], prompt.as_str());
        if let Some(answer) = messages.get(1) {
            let text = answer["parts"][0]["content"].as_str().unwrap();
            assert!(prompt.starts_with(text), "stored text is what was streamed");
        }
        // The session takes new turns.
        let reply = server.chat("k", "again").await;
        assert_eq!(reply["content"], "again");
        server.stop();
    }
}

#[tokio::test]
async fn two_thousand_stored_sessions_are_listed_after_a_restart() {
    for data in data_stores().await {
        let server = Server::start(&data, 0, &[]);
        let client = reqwest::Client::new();
        for _ in 0..2000 {
            let res = client
                .post(format!("{}/api/sessions", server.base))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success());
        }
        let (_, before) = server.get("/api/sessions").await;
        server.stop();
        let server = Server::start(&data, 0, &[]);
        let (_, after) = server.get("/api/sessions").await;
        assert_eq!(after.as_array().unwrap().len(), 2000, "{}", data.name);
        assert_eq!(listing(&after), listing(&before), "{}", data.name);
        server.stop();
    }
}

#[tokio::test]
async fn a_burst_of_900_tokens_reaches_a_reader_that_sleeps_between_frames_whole() {
    let app = spawn_with(Options::default()).await;
    let mut ws = app.ws("burst").await;
    app.wait_for_clients("burst", 1).await;
    let res = app
        .chat(json!({"content": "t ".repeat(900), "session_id": "burst"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut frames = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let frame = next(&mut ws).await;
        let done = frame["op"] == "done";
        frames.push(frame);
        if done {
            break;
        }
    }
    assert_eq!(frames.len(), 901);
    let seqs: Vec<u64> = frames.iter().map(seq).collect();
    assert_eq!(seqs, (1..=901).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stale_cursor_after_delete_and_re_create_gets_a_reset_then_the_new_stream() {
    let app = spawn_with(Options::default()).await;
    app.chat(json!({"content": "a b c d e", "session_id": "re"}))
        .await;
    let res = app
        .client
        .delete(app.url("/api/sessions/re"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    app.chat(json!({"content": "x", "session_id": "re"})).await;
    let mut ws = app.ws_at("/api/ws/re?after_seq=6").await;
    let reset = next(&mut ws).await;
    assert_eq!(reset, json!({"op": "reset", "data": {"head_seq": 2}}));
    let stream = until_terminal(&mut ws).await;
    assert_eq!(stream.iter().map(seq).collect::<Vec<_>>(), [1, 2]);
    let list: Value = app.get_json("/api/sessions").await;
    assert_eq!(list[0]["last_seq"], 2);
}

#[tokio::test]
async fn a_database_that_fails_while_running_answers_503_within_a_second_and_runs_no_turn() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(0)),
        // The server's own default wait, which this measures.
        database_wait: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    app.chat(json!({"content": "before", "session_id": "f"}))
        .await;
    let url =
        autopoiesis::adapters::persistence::sqlite_url(&app.data_path().join("approvals.sqlite"));
    let intruder = Database::connect(url.as_str()).await.unwrap();
    intruder
        .execute_unprepared("BEGIN EXCLUSIVE")
        .await
        .unwrap();
    intruder
        .execute_unprepared("UPDATE sessions SET last_active = last_active")
        .await
        .unwrap();
    let started = Instant::now();
    let res = app
        .chat(json!({"content": "during", "session_id": "f"}))
        .await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    intruder.execute_unprepared("ROLLBACK").await.unwrap();
    let history: Value = app.get_json("/api/sessions/f/history").await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "nothing half written"
    );
    let res = app
        .chat(json!({"content": "after", "session_id": "f"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_malformed_stored_message_is_an_error_for_its_session_only_and_the_server_starts() {
    let data = data_stores().await.remove(0);
    let server = Server::start(&data, 0, &[]);
    server.chat("good", "fine").await;
    server.chat("bad", "soon broken").await;
    server.stop();
    let url =
        autopoiesis::adapters::persistence::sqlite_url(&data.dir.path().join("approvals.sqlite"));
    let db = Database::connect(url.as_str()).await.unwrap();
    db.execute_unprepared(
        "UPDATE session_messages SET message_json = '{\"kind\": 7' WHERE session_id = 'bad'",
    )
    .await
    .unwrap();
    db.close().await.unwrap();

    let server = Server::start(&data, 0, &[]);
    assert_eq!(
        server.get("/api/sessions/bad/history").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        server.get("/api/sessions/good/history").await.0,
        StatusCode::OK
    );
    let (status, list) = server.get("/api/sessions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2);
    server.stop();
}

/// A small tmpfs of the test's own (needs root, as CI has), unmounted when
/// dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self(dir))
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_loses_nothing_acknowledged() {
    let Some(disk) = Tmpfs::mount("4m") else {
        // Mounting needs root; CI runs as root, so there this always runs.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    };
    let app = spawn_with(Options {
        database_url: Some(autopoiesis::adapters::persistence::sqlite_url(
            &disk.path().join("approvals.sqlite"),
        )),
        http: autopoiesis::adapters::http::HttpSettings {
            max_body_bytes: 8 * 1024 * 1024,
            ..autopoiesis::adapters::http::HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    let history = || async {
        app.client
            .get(app.url("/api/sessions/kept/history"))
            .send()
            .await
            .unwrap()
    };
    for word in ["one", "two"] {
        let res = app
            .chat(json!({"content": word, "session_id": "kept"}))
            .await;
        assert_eq!(res.status(), StatusCode::OK);
    }

    // Full: a filler takes every free byte; a big turn cannot be stored.
    let filler = disk.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 8 * 1024 * 1024]);
    let big = "x".repeat(1024 * 1024);
    let res = app
        .chat(json!({"content": big, "session_id": "kept"}))
        .await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "disk full");
    std::fs::remove_file(&filler).unwrap();
    let res = app
        .chat(json!({"content": "three", "session_id": "kept"}))
        .await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "works again once there is room"
    );

    let body: Value = history().await.json().await.unwrap();
    let prompts: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "request")
        .map(|m| m["parts"][0]["content"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["one", "two", "three"]);
    drop(app);
}

/// Sets or clears the immutable attribute of the database's files: not
/// even root may write to them then, through descriptors already open too.
fn immutable(dir: &std::path::Path, on: bool) -> bool {
    ["approvals.sqlite", "approvals.sqlite-wal"]
        .iter()
        .all(|name| {
            Command::new("chattr")
                .arg(if on { "+i" } else { "-i" })
                .arg(dir.join(name))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

#[tokio::test]
async fn a_read_only_database_file_answers_503_and_loses_nothing_acknowledged() {
    let app = spawn_with(Options::default()).await;
    for word in ["one", "two"] {
        let res = app.chat(json!({"content": word, "session_id": "ro"})).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    if !immutable(app.data_path(), true) {
        immutable(app.data_path(), false);
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must be able to make a file immutable"
        );
        eprintln!("skipped: chattr +i is not available here");
        return;
    }
    let res = app
        .chat(json!({"content": "three", "session_id": "ro"}))
        .await;
    let status = res.status();
    let history = app
        .client
        .get(app.url("/api/sessions/ro/history"))
        .send()
        .await
        .unwrap();
    let history_status = history.status();
    let body: Value = history.json().await.unwrap_or(Value::Null);
    immutable(app.data_path(), false);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "read-only");
    assert_eq!(history_status, StatusCode::OK, "reads still work");
    assert_eq!(body["messages"].as_array().unwrap().len(), 4, "{body}");
    let res = app
        .chat(json!({"content": "four", "session_id": "ro"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK, "writable again");
}

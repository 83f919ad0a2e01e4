//! `spawn_app`: the real server on 127.0.0.1:0 with isolated state, built
//! by the same composition root as the binary (`app::build`); the knobs
//! tests need are its settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use autopoiesis::adapters::agent::echo::EchoRuntime;
use autopoiesis::adapters::ed25519::Ed25519ApprovalKey;
use autopoiesis::adapters::http::auth::ApiKey;
use autopoiesis::adapters::http::server::ServerSettings;
use autopoiesis::adapters::http::{HttpSettings, Services};
use autopoiesis::adapters::persistence::ConnectSettings;
use autopoiesis::adapters::stream::StreamSettings;
use autopoiesis::app::{self, SessionStoreKind, Settings, StoreLayer};
use autopoiesis::domain::agent::AgentConfig;
use autopoiesis::domain::approvals::{ApprovalCursor, ApprovalDecision, ApprovalEnvelope};
use autopoiesis::domain::chat::RuntimeSlot;
use autopoiesis::domain::session_service::SweepPolicy;
use autopoiesis::ports::{AgentRuntime, ApprovalStore, ApprovalStoreError};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub struct Options {
    pub runtime: RuntimeSlot,
    pub api_key: Option<&'static str>,
    pub stream: StreamSettings,
    pub sweep: Option<SweepPolicy>,
    pub turn_timeout: Option<Duration>,
    pub http: HttpSettings,
    pub server: ServerSettings,
    /// Sessions the store holds at most.
    pub max_sessions: usize,
    /// History bytes after which a session takes no new turn.
    pub max_history_bytes: usize,
    /// Load a fresh approval key (approvals unlocked).
    pub approval_key: bool,
    /// The approval database; `None`: a SQLite file in the app's temp dir.
    pub database_url: Option<String>,
    pub session_store: SessionStoreKind,
    /// How long an operation waits for the database before a 503
    /// ([`TEST_DATABASE_WAIT`] unless a test measures that answer).
    pub database_wait: Duration,
}

/// The database wait of the servers tests start: long, because two cores
/// running the whole suite (browsers included) can keep a pool busy past
/// the server's one-second default, and a 503 there says nothing about the
/// behaviour under test. Tests of the 503 itself set the default back.
pub const TEST_DATABASE_WAIT: Duration = Duration::from_secs(10);

impl Default for Options {
    fn default() -> Self {
        Self {
            runtime: RuntimeSlot::Ready(echo(0)),
            api_key: None,
            stream: StreamSettings::default(),
            sweep: None,
            turn_timeout: None,
            http: HttpSettings::default(),
            server: ServerSettings {
                grace: Duration::from_secs(1),
                ..ServerSettings::default()
            },
            max_sessions: usize::MAX,
            max_history_bytes: usize::MAX,
            approval_key: false,
            database_url: None,
            session_store: SessionStoreKind::Database,
            database_wait: TEST_DATABASE_WAIT,
        }
    }
}

/// The echo runtime of the built-in agent, its tokens `delay_ms` apart.
pub fn echo(delay_ms: u64) -> Arc<dyn AgentRuntime> {
    Arc::new(EchoRuntime::new(
        Duration::from_millis(delay_ms),
        AgentConfig::builtin().tools,
    ))
}

pub struct TestApp {
    pub address: std::net::SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub services: Services,
    /// Counts the approval store's reads of whole envelopes.
    pub approval_reads: Arc<StoreReads>,
    /// Holds the app's files (the approval database) until the app goes.
    _data: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Options::default()).await
}

pub async fn spawn_with(options: Options) -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let approval_key_file = options.approval_key.then(|| {
        let path = data.path().join("approval.key");
        Ed25519ApprovalKey::create_file(&path).unwrap();
        path
    });
    let approval_reads = Arc::new(StoreReads::default());
    let store_layer: StoreLayer = {
        let reads = approval_reads.clone();
        Arc::new(move |inner| {
            Arc::new(CountingStore {
                inner,
                reads: reads.clone(),
            })
        })
    };
    let app = app::build(Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: options.database_url,
        database: ConnectSettings::waiting(options.database_wait),
        approval_key_file,
        runtime: Some(options.runtime),
        store_layer: Some(store_layer),
        stream: options.stream,
        max_sessions: options.max_sessions,
        max_history_bytes: options.max_history_bytes,
        turn_timeout: options.turn_timeout,
        sweep: options.sweep,
        session_store: options.session_store,
        http: HttpSettings {
            api_key: options.api_key.map(|k| ApiKey::new(k).unwrap()),
            ..options.http
        },
        server: options.server,
        shutdown_grace: Duration::ZERO,
        ..Settings::new(data.path())
    })
    .await
    .unwrap();
    let address = app.address();
    let services = app.services.clone();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone().cancelled_owned()));
    TestApp {
        address,
        base: format!("http://{address}"),
        client: reqwest::Client::new(),
        services,
        approval_reads,
        _data: data,
        shutdown,
    }
}

/// How often the approval store was asked for envelopes (not counts).
#[derive(Debug, Default)]
pub struct StoreReads {
    lists: AtomicUsize,
}

impl StoreReads {
    /// Listings of pending envelopes so far.
    pub fn lists(&self) -> usize {
        self.lists.load(Ordering::SeqCst)
    }
}

/// The real store, counting how often pending envelopes are listed: the
/// tests that say "one read per change" or "counted, not loaded" read it.
struct CountingStore {
    inner: Arc<dyn ApprovalStore>,
    reads: Arc<StoreReads>,
}

#[async_trait::async_trait]
impl ApprovalStore for CountingStore {
    async fn insert(&self, envelope: &ApprovalEnvelope) -> Result<(), ApprovalStoreError> {
        self.inner.insert(envelope).await
    }

    async fn count_pending(&self, now: i64) -> Result<u64, ApprovalStoreError> {
        self.inner.count_pending(now).await
    }

    async fn list_pending(
        &self,
        now: i64,
        after: Option<ApprovalCursor>,
        limit: u64,
    ) -> Result<Vec<ApprovalEnvelope>, ApprovalStoreError> {
        self.reads.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list_pending(now, after, limit).await
    }

    async fn decide(
        &self,
        approval_id: &str,
        decision: &ApprovalDecision,
    ) -> Result<ApprovalEnvelope, ApprovalStoreError> {
        self.inner.decide(approval_id, decision).await
    }

    async fn prune_expired_before(&self, cutoff: i64) -> Result<u64, ApprovalStoreError> {
        self.inner.prune_expired_before(cutoff).await
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

impl TestApp {
    /// Where the app keeps its files (the approval database).
    pub fn data_path(&self) -> &std::path::Path {
        self._data.path()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.address)
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// `GET path`, its body as JSON (whatever the status).
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.unwrap()
    }

    /// `POST path` without a body.
    pub async fn post_empty(&self, path: &str) -> reqwest::Response {
        self.client.post(self.url(path)).send().await.unwrap()
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/api/chat"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn ws(&self, session: &str) -> Ws {
        self.ws_at(&format!("/api/ws/{session}")).await
    }

    pub async fn ws_at(&self, path: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url(path))
            .await
            .unwrap();
        ws
    }

    /// Waits until `n` clients are subscribed to `session`.
    pub async fn wait_for_clients(&self, session: &str, n: usize) {
        let id = autopoiesis::domain::session::SessionId::parse(session).unwrap();
        for _ in 0..500 {
            if self.services.hub.client_count(&id) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{session} never had {n} clients");
    }
}

/// A URL of a fresh PostgreSQL schema of the caller's own (tests run in
/// parallel: it is found first on its connections' search path), when
/// `AUTOPOIESIS_TEST_DATABASE_URL` names a database.
pub async fn postgres_schema_url() -> Option<String> {
    let url = std::env::var("AUTOPOIESIS_TEST_DATABASE_URL").ok()?;
    let schema = format!("it_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(url.as_str()).await.unwrap();
    sea_orm::ConnectionTrait::execute_unprepared(&admin, &format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    admin.close().await.unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}options=-csearch_path%3D{schema}"))
}

/// Starts `command` (a `serve --port 0`, its stderr piped) and reads the
/// bound address from its log; the rest of the log is drained in the
/// background.
pub fn spawn_serve(mut command: std::process::Command) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    if !command
        .get_envs()
        .any(|(name, _)| name == "AUTOPOIESIS_DATABASE_WAIT")
    {
        command.env(
            "AUTOPOIESIS_DATABASE_WAIT",
            format!("{}s", TEST_DATABASE_WAIT.as_secs()),
        );
    }
    let mut child = command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let address = loop {
        assert!(std::time::Instant::now() < deadline, "no listening line");
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, address)
}

/// The `message` frame that runs a turn with `content`.
pub fn message_frame(content: &str) -> Message {
    Message::Text(
        serde_json::json!({"op": "message", "data": {"content": content}})
            .to_string()
            .into(),
    )
}

/// Sends one JSON text frame.
pub async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON frame (pings skipped), failing after 10 s.
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("socket closed")
            .expect("socket error");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Frames up to and including the turn's terminal one (`done`, `error`,
/// `cancelled`).
pub async fn until_terminal(ws: &mut Ws) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = next(ws).await;
        let op = frame["op"].as_str().unwrap().to_owned();
        frames.push(frame);
        if matches!(op.as_str(), "done" | "error" | "cancelled") {
            return frames;
        }
    }
}

/// Asserts nothing arrives within `wait`.
pub async fn assert_silent(ws: &mut Ws, wait: Duration) {
    if let Ok(Some(Ok(message))) = tokio::time::timeout(wait, ws.next()).await {
        panic!("expected silence, got {message:?}");
    }
}

//! The composition root: [`build`] turns one [`Settings`] into a running
//! server's parts (every adapter, every domain service, the endpoint and
//! its listener), and [`App::run`] serves them until a shutdown signal,
//! then winds them down in order. `src/bin/autopoiesis.rs` and the
//! integration tests both start servers through here, so what is tested is
//! what ships; a test's knobs are settings, not a second wiring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::adapters::agent::{ProviderEnv, build_runtime, config::load_agents};
use crate::adapters::approval_broadcast::ApprovalBroadcast;
use crate::adapters::cluster::Cluster;
use crate::adapters::ed25519::Ed25519ApprovalKey;
use crate::adapters::http::server::ServerSettings;
use crate::adapters::http::{self, HttpSettings, Services};
use crate::adapters::memory::InMemorySessionStore;
use crate::adapters::persistence::{
    ConnectSettings, SeaOrmApprovalStore, SeaOrmEventStore, SeaOrmMcpSessions, SeaOrmSessionStore,
    SeaOrmTurnStore, connect, notify_control, sqlite_url,
};
use crate::adapters::stream::{SessionHub, Sharing, StreamSettings};
use crate::domain::agent::AgentConfig;
use crate::domain::approvals::{ApprovalPolicy, ApprovalService};
use crate::domain::chat::{
    ApprovalRecording, ChatService, DEFAULT_MAX_QUEUED_TURNS, RuntimeSlot, TurnRecords,
};
use crate::domain::control::ControlPlane;
use crate::domain::session_service::{SessionService, SweepPolicy};
use crate::ports::{ApprovalSigner, ApprovalStore, SessionStore};

/// Wraps the approval store before the domain gets it (instrumentation:
/// the tests count reads through it).
pub type StoreLayer = Arc<dyn Fn(Arc<dyn ApprovalStore>) -> Arc<dyn ApprovalStore> + Send + Sync>;

/// Where sessions, their history and their streams live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionStoreKind {
    /// The `--database-url` database (SQLite in the data dir by default):
    /// sessions survive restarts and crashes (SPEC B10).
    Database,
    /// The process's memory: gone when it ends.
    Memory,
}

/// Everything a server is built from.
#[derive(Clone)]
pub struct Settings {
    /// Where to listen; port 0 picks a free one ([`App::address`] says which).
    pub listen: SocketAddr,
    /// The server's files (the default SQLite database); created if missing.
    pub data_dir: PathBuf,
    /// `sqlite:PATH` or `postgres://...`; `None`: `approvals.sqlite` in the
    /// data dir.
    pub database_url: Option<String>,
    /// The database pool: its size and how long an operation waits for a
    /// connection (and SQLite for another writer's lock) before a 503.
    pub database: ConnectSettings,
    /// The Ed25519 approval key file; `None`: approvals locked.
    pub approval_key_file: Option<PathBuf>,
    /// The agents file; `None`: the built-in agent alone.
    pub agents_file: Option<PathBuf>,
    /// The agent that answers chats.
    pub agent: String,
    /// Where the `openai` runtime finds its provider.
    pub provider: ProviderEnv,
    /// A runtime to use instead of the one the agent's model names (tests
    /// drive fakes through it). The database rule still applies: see
    /// [`runtime_slot`].
    pub runtime: Option<RuntimeSlot>,
    pub approval_policy: ApprovalPolicy,
    pub store_layer: Option<StoreLayer>,
    pub stream: StreamSettings,
    /// Sessions the store holds at most.
    pub max_sessions: usize,
    /// History bytes after which a session takes no new turn.
    pub max_history_bytes: usize,
    /// Turns a session may have waiting behind its running one.
    pub max_queued_turns: usize,
    /// `None`: turns run as long as they take.
    pub turn_timeout: Option<Duration>,
    /// `None`: idle sessions are never swept.
    pub sweep: Option<SweepPolicy>,
    pub session_store: SessionStoreKind,
    /// How long a running turn's record stays claimed without renewal.
    pub instance_lease: Duration,
    pub http: HttpSettings,
    pub server: ServerSettings,
    /// At shutdown, how long running turns may finish before they are
    /// cancelled.
    pub shutdown_grace: Duration,
}

impl Settings {
    /// The defaults of `autopoiesis serve`, with files in `data_dir`.
    #[must_use]
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8420)),
            data_dir: data_dir.into(),
            database_url: None,
            database: ConnectSettings::default(),
            approval_key_file: None,
            agents_file: None,
            agent: "default".into(),
            provider: ProviderEnv {
                openai_base_url: None,
                openai_api_key: None,
                stream_idle_timeout: Duration::from_secs(120),
            },
            runtime: None,
            approval_policy: ApprovalPolicy::default(),
            store_layer: None,
            stream: StreamSettings::default(),
            max_sessions: 10_000,
            max_history_bytes: 8 * 1024 * 1024,
            max_queued_turns: DEFAULT_MAX_QUEUED_TURNS,
            turn_timeout: Some(Duration::from_secs(600)),
            sweep: Some(SweepPolicy::default()),
            session_store: SessionStoreKind::Database,
            instance_lease: Duration::from_secs(10),
            http: HttpSettings::default(),
            server: ServerSettings::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why no server was built: each message names the setting at fault, in
/// one line.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--data-dir {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("--config: {0}")]
    Agents(String),
    #[error("--agent: unknown agent {name:?} (configured: {configured})")]
    UnknownAgent { name: String, configured: String },
    #[error("AUTOPOIESIS_APPROVAL_KEY_FILE: {0}")]
    ApprovalKey(String),
    #[error("cannot bind {address}: {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
}

/// The rule for what answers chats: the runtime, unless the approval
/// database could not be opened (deferred turns could not be recorded, so
/// no turn runs). Either way the server still starts and says why (SPEC A2).
pub fn runtime_slot(
    approval_db: Result<(), &str>,
    runtime: impl FnOnce() -> RuntimeSlot,
) -> RuntimeSlot {
    match approval_db {
        Err(why) => RuntimeSlot::Unavailable(why.to_owned()),
        Ok(()) => runtime(),
    }
}

/// The runtime the agent's model names, or why it cannot be built.
fn configured_runtime(agent: &AgentConfig, provider: &ProviderEnv) -> RuntimeSlot {
    match build_runtime(agent, provider) {
        Ok(runtime) => RuntimeSlot::Ready(runtime),
        Err(why) => {
            tracing::warn!(reason = %why, "agent runtime unavailable; chat answers 503 until this is fixed");
            RuntimeSlot::Unavailable(format!("Agent runtime unavailable: {why}"))
        }
    }
}

fn select_agent(
    file: Option<&std::path::Path>,
    name: &str,
) -> Result<(AgentConfig, Vec<AgentConfig>), BuildError> {
    let agents = match file {
        Some(path) => load_agents(path).map_err(|e| BuildError::Agents(e.to_string()))?,
        None => vec![AgentConfig::builtin()],
    };
    let agent = agents
        .iter()
        .find(|a| a.name == name)
        .cloned()
        .ok_or_else(|| BuildError::UnknownAgent {
            name: name.to_owned(),
            configured: agents
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    Ok((agent, agents))
}

/// The session side of the server, as the settings and the database allow.
struct SessionStores {
    sessions: Arc<dyn SessionStore>,
    hub: Arc<SessionHub>,
    turns: Option<TurnRecords>,
    /// Only one server uses the database (SQLite: the file is this
    /// process's), so every turn record left by another owner is an
    /// earlier life's and ends at start, without waiting for its lease.
    one_server: bool,
    /// This instance's name when other instances may share the database
    /// (PostgreSQL, SPEC B12).
    shared_as: Option<String>,
}

/// How often a stream loaded here is checked for events other instances
/// stored, in case their notification was lost.
const SHARED_POLL: Duration = Duration::from_millis(500);

/// Stored sessions on the database, or in memory when asked (or when the
/// database could not be opened: the server then runs no turn anyway, see
/// [`runtime_slot`], and says so at startup).
fn session_stores(
    settings: &Settings,
    db: Option<&DatabaseConnection>,
    database_url: &str,
) -> SessionStores {
    match (settings.session_store, db) {
        (SessionStoreKind::Database, Some(db)) => {
            let owner = uuid::Uuid::new_v4().simple().to_string();
            // SQLite is one server's file; PostgreSQL may be shared by
            // several instances, and every one acts as if it were.
            let one_server = database_url.starts_with("sqlite:");
            let events = Arc::new(SeaOrmEventStore::new(db.clone(), database_url));
            let mut sessions =
                SeaOrmSessionStore::new(db.clone(), database_url, settings.max_sessions);
            let hub = if one_server {
                SessionHub::stored(settings.stream, events)
            } else {
                sessions = sessions.shared_as(owner.clone());
                SessionHub::shared(
                    settings.stream,
                    events,
                    Sharing {
                        owner: owner.clone(),
                        lease: settings.instance_lease,
                        poll: SHARED_POLL,
                    },
                )
            };
            SessionStores {
                sessions: Arc::new(sessions),
                hub,
                turns: Some(TurnRecords {
                    store: Arc::new(SeaOrmTurnStore::new(db.clone(), database_url)),
                    owner: owner.clone(),
                    lease: settings.instance_lease,
                    shared: !one_server,
                }),
                one_server,
                shared_as: (!one_server).then_some(owner),
            }
        }
        (kind, _) => {
            if kind == SessionStoreKind::Database {
                tracing::warn!(
                    "sessions are kept in memory until the database can be opened: they will not survive a restart"
                );
            }
            SessionStores {
                sessions: Arc::new(InMemorySessionStore::with_limit(settings.max_sessions)),
                hub: SessionHub::new(settings.stream),
                turns: None,
                one_server: false,
                shared_as: None,
            }
        }
    }
}

/// A built server, bound and ready to [`run`](Self::run).
pub struct App {
    /// The domain services, for tests that look behind the HTTP surface.
    pub services: Services,
    /// The agent that answers chats.
    pub agent: AgentConfig,
    /// The approval key's id, when approvals are unlocked.
    pub approval_key_id: Option<String>,
    /// Whether every route but health needs the API key.
    pub auth: bool,
    listener: TcpListener,
    address: SocketAddr,
    endpoint: poem::endpoint::BoxEndpoint<'static>,
    server: ServerSettings,
    sweep: Option<SweepPolicy>,
    shutdown_grace: Duration,
    approvals: Option<Arc<ApprovalService>>,
    /// Kept to be closed (and SQLite's WAL checkpointed) once the last turn
    /// has written its approval.
    approval_db: Option<DatabaseConnection>,
    /// Cancelled once running turns are done: MCP sessions and dashboard
    /// streams end then, so shutdown does not wait on idle clients.
    close_streams: CancellationToken,
    /// The listener for other instances on the database, when they may be.
    cluster: Option<Cluster>,
}

/// Builds every adapter and service from `settings` and binds the listener.
///
/// # Errors
/// [`BuildError`]: a setting that cannot work (the data dir, the agents
/// file, the agent's name, the approval key, the address). An approval
/// database that cannot be opened is not one: the server starts without a
/// runtime ([`runtime_slot`]).
pub async fn build(settings: Settings) -> Result<App, BuildError> {
    std::fs::create_dir_all(&settings.data_dir).map_err(|error| BuildError::DataDir {
        path: settings.data_dir.clone(),
        error,
    })?;
    let (agent, agents) = select_agent(settings.agents_file.as_deref(), &settings.agent)?;
    let approval_key = settings
        .approval_key_file
        .as_deref()
        .map(Ed25519ApprovalKey::load)
        .transpose()
        .map_err(|e| BuildError::ApprovalKey(e.to_string()))?;
    let database_url = settings
        .database_url
        .clone()
        .unwrap_or_else(|| sqlite_url(&settings.data_dir.join("approvals.sqlite")));
    let approval_db = connect(&database_url, &settings.database)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "approval database unavailable; chat and MCP answer 'runtime uninitialized' until this is fixed");
            format!("Approval database unavailable: {e}")
        });
    let runtime = runtime_slot(
        approval_db.as_ref().map(|_| ()).map_err(String::as_str),
        || {
            settings
                .runtime
                .clone()
                .unwrap_or_else(|| configured_runtime(&agent, &settings.provider))
        },
    );

    let stores = session_stores(&settings, approval_db.as_ref().ok(), &database_url);
    let (store, hub) = (stores.sessions, stores.hub);
    let approval_events = Arc::new(ApprovalBroadcast::new());
    if let (Some(owner), Ok(db)) = (&stores.shared_as, &approval_db) {
        let (owner, db) = (owner.clone(), db.clone());
        approval_events.set_peers(Box::new(move || {
            let (owner, db) = (owner.clone(), db.clone());
            tokio::spawn(async move {
                if let Err(error) = notify_control(&db, &format!("approvals {owner}")).await {
                    tracing::warn!(%error, "other instances not told of an approval change");
                }
            });
        }));
    }
    let approvals = approval_db.as_ref().ok().map(|db| {
        let mut store: Arc<dyn ApprovalStore> =
            Arc::new(SeaOrmApprovalStore::new(db.clone(), &database_url));
        if let Some(layer) = &settings.store_layer {
            store = layer(store);
        }
        let signer = approval_key.map(|key| Arc::new(key) as Arc<dyn ApprovalSigner>);
        Arc::new(ApprovalService::new(
            store,
            signer,
            settings.approval_policy,
            approval_events.clone(),
        ))
    });
    let mut chat = ChatService::new(runtime, store.clone(), hub.clone(), settings.turn_timeout)
        .with_history_limit(settings.max_history_bytes)
        .with_max_queued_turns(settings.max_queued_turns);
    if let Some(service) = &approvals {
        chat = chat.with_approvals(ApprovalRecording {
            service: service.clone(),
            agent: agent.name.clone(),
        });
    }
    let mcp_sessions = stores
        .shared_as
        .as_ref()
        .and(approval_db.as_ref().ok())
        .map(|db| SeaOrmMcpSessions::new(db.clone(), &database_url));
    if let Some(turns) = stores.turns {
        chat = chat.with_turn_records(turns);
    }
    let chat = Arc::new(chat);
    // Before the listener: turns an earlier life left running end before
    // any client can start a new one on their sessions.
    chat.recover(stores.one_server).await;
    let cluster = stores.shared_as.map(|owner| Cluster {
        url: database_url.clone(),
        owner,
        hub: hub.clone(),
        chat: chat.clone(),
        approvals: approval_events.clone(),
    });
    let sessions = Arc::new(SessionService::new(store, hub.clone(), chat.clone()));
    let control = Arc::new(ControlPlane::new(
        chat.clone(),
        sessions.clone(),
        approvals.clone(),
        agent.clone(),
        agents,
    ));
    let services = Services {
        mcp_sessions,
        chat,
        sessions,
        hub,
        control,
        approval_events,
    };
    let close_streams = CancellationToken::new();
    let http_settings = HttpSettings {
        close_streams: close_streams.clone(),
        ..settings.http
    };
    let endpoint = http::app(&services, &http_settings);
    let auth = http_settings.api_key.is_some();
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|error| BuildError::Bind {
            address: settings.listen,
            error,
        })?;
    let address = listener.local_addr().map_err(|error| BuildError::Bind {
        address: settings.listen,
        error,
    })?;
    Ok(App {
        cluster,
        approval_key_id: approvals.as_ref().and_then(|a| a.key_id()),
        auth,
        services,
        agent,
        listener,
        address,
        endpoint,
        server: settings.server,
        sweep: settings.sweep,
        shutdown_grace: settings.shutdown_grace,
        approvals,
        approval_db: approval_db.ok(),
        close_streams,
    })
}

impl App {
    /// The bound address (the port is the real one when 0 was asked for).
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `signal` resolves, then shuts down in order: stop
    /// accepting; let running turns finish for the grace period, then
    /// cancel them (their partial text is kept); end MCP sessions and
    /// dashboard streams; close the session sockets with 1001; let the
    /// responses still in flight finish (`server.grace`); close the
    /// approval database last, after the last turn wrote to it.
    ///
    /// # Errors
    /// The listener failed.
    pub async fn run(self, signal: impl Future<Output = ()>) -> std::io::Result<()> {
        let Self {
            services,
            listener,
            endpoint,
            server,
            sweep,
            shutdown_grace,
            approvals,
            approval_db,
            close_streams,
            cluster,
            ..
        } = self;
        let shutdown = CancellationToken::new();
        let listen = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                if let Some(cluster) = cluster {
                    cluster.run(shutdown).await;
                }
            }
        });
        let leases = tokio::spawn({
            let (chat, shutdown) = (services.chat.clone(), shutdown.clone());
            async move { chat.run_leases(shutdown).await }
        });
        let sweeper = tokio::spawn({
            let (sessions, shutdown) = (services.sessions.clone(), shutdown.clone());
            async move {
                if let Some(policy) = sweep {
                    sessions.run_sweeper(policy, shutdown).await;
                }
            }
        });
        let drain = tokio::spawn({
            let (chat, hub, shutdown) = (
                services.chat.clone(),
                services.hub.clone(),
                shutdown.clone(),
            );
            async move {
                shutdown.cancelled().await;
                chat.shutdown(shutdown_grace).await;
                close_streams.cancel();
                hub.close_all_and_wait(Duration::from_secs(5)).await;
            }
        });
        let pruner = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                if let Some(approvals) = approvals {
                    approvals.run_pruner(shutdown).await;
                }
            }
        });
        let signal = {
            let shutdown = shutdown.clone();
            async move {
                signal.await;
                shutdown.cancel();
            }
        };
        let served = http::serve(listener, endpoint, server, signal).await;
        shutdown.cancel();
        let _ = tokio::join!(leases, sweeper, drain, pruner, listen);
        if let Some(db) = approval_db
            && let Err(error) = db.close().await
        {
            tracing::warn!(%error, "approval database did not close cleanly");
        }
        served
    }
}

/// The REST API's spec (`openapi.yaml`), from services over in-memory
/// adapters: the spec depends on the code, not on any setting.
#[must_use]
pub fn spec_yaml() -> String {
    let hub = SessionHub::new(StreamSettings::default());
    let store = Arc::new(InMemorySessionStore::new());
    let chat = Arc::new(ChatService::new(
        RuntimeSlot::Unavailable("spec only".into()),
        store.clone(),
        hub.clone(),
        None,
    ));
    let sessions = Arc::new(SessionService::new(store, hub.clone(), chat.clone()));
    let approval_events = Arc::new(ApprovalBroadcast::new());
    let agent = AgentConfig::builtin();
    let control = Arc::new(ControlPlane::new(
        chat.clone(),
        sessions.clone(),
        None,
        agent.clone(),
        vec![agent],
    ));
    http::spec_service(&Services {
        mcp_sessions: None,
        chat,
        sessions,
        hub,
        control,
        approval_events,
    })
    .spec_yaml()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::agent_runtime::MockAgentRuntime;

    #[test]
    fn an_approval_database_that_cannot_be_opened_means_no_runtime() {
        let slot = runtime_slot(Err("Approval database unavailable: locked"), || {
            panic!("no runtime is built without the database")
        });
        assert!(
            matches!(&slot, RuntimeSlot::Unavailable(why) if why == "Approval database unavailable: locked")
        );
        let ready = || RuntimeSlot::Ready(Arc::new(MockAgentRuntime::new()));
        assert!(matches!(runtime_slot(Ok(()), ready), RuntimeSlot::Ready(_)));
    }

    #[test]
    fn a_runtime_that_cannot_be_built_says_why() {
        let agent = AgentConfig {
            model: "openai:gpt-4o-mini".into(),
            ..AgentConfig::builtin()
        };
        let provider = Settings::new("unused").provider;
        let slot = configured_runtime(&agent, &provider);
        assert!(
            matches!(&slot, RuntimeSlot::Unavailable(why) if why.starts_with("Agent runtime unavailable: ")),
        );
    }

    #[test]
    fn an_unknown_agent_names_the_configured_ones() {
        let error = select_agent(None, "nobody").unwrap_err();
        assert_eq!(
            error.to_string(),
            "--agent: unknown agent \"nobody\" (configured: default)"
        );
    }
}

//! The `autopoiesis` command: parses the command line into the composition
//! root's [`Settings`], builds the server with [`app::build`] and runs it
//! until SIGINT/SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use autopoiesis::adapters::agent::ProviderEnv;
use autopoiesis::adapters::ed25519::Ed25519ApprovalKey;
use autopoiesis::adapters::http::HttpSettings;
use autopoiesis::adapters::http::auth::{ApiKey, OriginPolicy};
use autopoiesis::adapters::http::server::ServerSettings;
use autopoiesis::adapters::persistence::ConnectSettings;
use autopoiesis::adapters::stream::StreamSettings;
use autopoiesis::adapters::ws::endpoint::WsSettings;
use autopoiesis::app::{self, SessionStoreKind, Settings};
use autopoiesis::domain::approvals::ApprovalPolicy;
use autopoiesis::domain::chat::DEFAULT_MAX_QUEUED_TURNS;
use autopoiesis::domain::session_service::SweepPolicy;
use clap::{Args, Parser, Subcommand};

/// An AI agent on the network: REST and WebSocket chat, streamed to every
/// device, with a deferred tool-approval policy.
#[derive(Debug, Parser)]
#[command(name = "autopoiesis", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Print the OpenAPI spec of the REST API as YAML (this is openapi.yaml).
    Openapi,
    /// Write a new Ed25519 approval key (mode 0600); load it at `serve` with
    /// AUTOPOIESIS_APPROVAL_KEY_FILE to unlock approvals.
    Keygen {
        /// Where to write the key (PKCS#8 PEM). An existing file is never
        /// overwritten.
        #[arg(long)]
        out: PathBuf,
    },
}

fn duration(raw: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(raw)
}

/// A duration that must not be zero (an interval or a timeout that would
/// fire at once).
fn positive_duration(raw: &str) -> Result<Duration, String> {
    match humantime::parse_duration(raw) {
        Ok(d) if d.is_zero() => Err("must be greater than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Settings of `serve`: a flag beats its environment variable, which beats
/// the default. The API key is read from AUTOPOIESIS_API_KEY only (a flag
/// would show in `ps`); when set, every route but GET /api/health needs it.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to bind.
    #[arg(long, env = "AUTOPOIESIS_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind; 0 picks a free one (the log says which).
    #[arg(long, env = "AUTOPOIESIS_PORT", default_value_t = 8420)]
    port: u16,
    /// Directory for the server's files; created if missing.
    #[arg(long, env = "AUTOPOIESIS_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Approval database: sqlite:PATH or postgres://... [default: SQLite
    /// file approvals.sqlite in the data dir]
    #[arg(long, env = "AUTOPOIESIS_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// How long a database operation waits for a connection from the pool
    /// (and, on SQLite, for another writer's lock) before the request gets
    /// 503 "storage unavailable". Short, so a database that is down is
    /// reported at once; raise it where the database is slow or shared.
    #[arg(long, env = "AUTOPOIESIS_DATABASE_WAIT", default_value = "1s", value_parser = positive_duration)]
    database_wait: Duration,
    /// Ed25519 approval key (from `autopoiesis keygen`). Loaded, it unlocks
    /// approvals: deferred turns are recorded for a human to decide.
    #[arg(long, env = "AUTOPOIESIS_APPROVAL_KEY_FILE")]
    approval_key_file: Option<PathBuf>,
    /// Agents file (TOML, one [agents.NAME] table each). Without it there is
    /// one built-in agent, `default`, with the offline `echo` model.
    #[arg(long, env = "AUTOPOIESIS_CONFIG")]
    config: Option<PathBuf>,
    /// Name of the agent that answers chats.
    #[arg(long, env = "AUTOPOIESIS_AGENT", default_value = "default")]
    agent: String,
    /// Sessions unused for this long, with no live client, leave memory
    /// (stored sessions load again on use; in-memory ones are removed).
    #[arg(long, env = "AUTOPOIESIS_SESSION_TTL", default_value = "30m", value_parser = duration)]
    session_ttl: Duration,
    /// Where sessions, their history and their event streams live:
    /// `database` (the --database-url database; they survive restarts) or
    /// `memory` (gone when the process ends; for throwaway servers).
    #[arg(long, env = "AUTOPOIESIS_SESSION_STORE", default_value = "database")]
    session_store: SessionStoreKind,
    /// Stored sessions unused for this long are deleted; 0 keeps them forever.
    #[arg(long, env = "AUTOPOIESIS_SESSION_RETENTION", default_value = "30d", value_parser = duration)]
    session_retention: Duration,
    /// How long a running turn's record stays claimed by this process
    /// without a renewal (renewed three times per lease). A turn whose
    /// server died ends as `turn_interrupted` once its lease runs out (at
    /// the next start with SQLite, where one server owns the file).
    #[arg(long, env = "AUTOPOIESIS_INSTANCE_LEASE", default_value = "10s", value_parser = positive_duration)]
    instance_lease: Duration,
    /// How often idle sessions are looked for.
    #[arg(long, env = "AUTOPOIESIS_SWEEP_INTERVAL", default_value = "5m", value_parser = positive_duration)]
    sweep_interval: Duration,
    /// A turn running longer than this ends with an error; 0 means no limit.
    #[arg(long, env = "AUTOPOIESIS_TURN_TIMEOUT", default_value = "10m", value_parser = duration)]
    turn_timeout: Duration,
    /// Longest silence allowed from the model provider inside one answer.
    #[arg(long, env = "AUTOPOIESIS_PROVIDER_TIMEOUT", default_value = "120s", value_parser = duration)]
    provider_timeout: Duration,
    /// Events retained per session (stored and cached in memory): what a
    /// client resuming with after_seq can get, and how far a slow reader
    /// may fall behind before it is closed (1013).
    #[arg(long, env = "AUTOPOIESIS_EVENT_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    event_buffer: u32,
    /// Bytes of events kept per session at most (the oldest go first).
    #[arg(long, env = "AUTOPOIESIS_EVENT_BUFFER_BYTES", default_value_t = 4 * 1024 * 1024)]
    event_buffer_bytes: usize,
    /// Sessions the server holds at most; creating one more answers 429.
    #[arg(long, env = "AUTOPOIESIS_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// A session whose history holds this many bytes of text takes no new
    /// turn (413: start a new session).
    #[arg(long, env = "AUTOPOIESIS_MAX_HISTORY_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_history_bytes: usize,
    /// Live WebSocket/SSE clients one session may have.
    #[arg(
        long,
        env = "AUTOPOIESIS_MAX_CLIENTS_PER_SESSION",
        default_value_t = 2048
    )]
    max_clients_per_session: usize,
    /// Live WebSocket/SSE clients the server may have.
    #[arg(long, env = "AUTOPOIESIS_MAX_CLIENTS", default_value_t = 20_000)]
    max_clients: usize,
    /// Browser origins, besides the server's own, allowed to open WebSockets
    /// and /mcp (comma-separated, e.g. https://app.example.com; * for any).
    #[arg(long, env = "AUTOPOIESIS_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Host names every route accepts in the Host header besides loopback
    /// names and IP literals (DNS-rebinding protection; comma-separated,
    /// `host` or `host:port`; * for any), e.g. the name a reverse proxy
    /// forwards.
    #[arg(
        long,
        alias = "mcp-allowed-hosts",
        env = "AUTOPOIESIS_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// Open TCP connections (WebSockets included) the server accepts at
    /// once; past it a new connection gets 503 and is closed.
    #[arg(long, env = "AUTOPOIESIS_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Time a client has to send a whole request head, from its first byte.
    #[arg(long, env = "AUTOPOIESIS_HEADER_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    header_timeout: Duration,
    /// Time a client has to send a whole request body, from its head.
    #[arg(long, env = "AUTOPOIESIS_BODY_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    body_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    #[arg(long, env = "AUTOPOIESIS_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    idle_timeout: Duration,
    /// A response write blocked this long (the client stopped reading)
    /// closes the connection.
    #[arg(long, env = "AUTOPOIESIS_WRITE_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    write_timeout: Duration,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "AUTOPOIESIS_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest accepted WebSocket message, in bytes.
    #[arg(long, env = "AUTOPOIESIS_MAX_WS_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    max_ws_message_bytes: usize,
    /// On SIGINT/SIGTERM, how long running turns may take to finish before
    /// they are cancelled (their partial text is kept).
    #[arg(long, env = "AUTOPOIESIS_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    shutdown_grace: Duration,
    /// Turns a session may have waiting behind its running one, from every
    /// transport together; more are refused (REST 429) until one finishes.
    #[arg(long, env = "AUTOPOIESIS_MAX_QUEUED_TURNS", default_value_t = DEFAULT_MAX_QUEUED_TURNS)]
    max_queued_turns: usize,
    /// Most approvals pending at once; beyond it a deferred turn records
    /// nothing (it still answers 409 approval_unsupported; the log says why).
    #[arg(
        long,
        env = "AUTOPOIESIS_MAX_PENDING_APPROVALS",
        default_value_t = 1000
    )]
    max_pending_approvals: u64,
    /// Largest tool-call arguments an approval records, in bytes of
    /// canonical JSON; a bigger deferred turn records nothing (still 409).
    #[arg(long, env = "AUTOPOIESIS_MAX_APPROVAL_ARGS_BYTES", default_value_t = 64 * 1024)]
    max_approval_args_bytes: usize,
    /// Most MCP sessions (initialize) at once; each also counts against
    /// --max-clients. Beyond it initialize answers 429.
    #[arg(long, env = "AUTOPOIESIS_MAX_MCP_SESSIONS", default_value_t = 1000)]
    max_mcp_sessions: usize,
    /// An MCP session without a request for this long ends (its client
    /// then gets 404 and initializes again).
    #[arg(long, env = "AUTOPOIESIS_MCP_SESSION_IDLE", default_value = "2m", value_parser = duration)]
    mcp_session_idle: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            print!("{}", app::spec_yaml());
            ExitCode::SUCCESS
        }
        Command::Keygen { out } => match Ed25519ApprovalKey::create_file(&out) {
            Ok(key) => {
                println!("wrote approval key {} to {}", key.id(), out.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("keygen: {e}")),
        },
        Command::Serve(args) => {
            init_tracing();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
            };
            match runtime.block_on(serve(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => fail(&message),
            }
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// `RUST_LOG` when set; otherwise `info`, with rmcp's per-session chatter
/// ("serve finished" for every MCP request) kept to warnings.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmcp=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them: not in files,
        // pipes or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The settings `serve` was given, as the composition root takes them.
fn settings(args: ServeArgs) -> Result<Settings, String> {
    let api_key = match std::env::var("AUTOPOIESIS_API_KEY") {
        Ok(key) => Some(ApiKey::new(&key).map_err(str::to_owned)?),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("AUTOPOIESIS_API_KEY is not valid UTF-8".into());
        }
    };
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    let defaults = HttpSettings::default();
    let mut allowed_hosts = defaults.allowed_hosts.clone();
    allowed_hosts.extend(args.allowed_hosts);
    Ok(Settings {
        listen: SocketAddr::new(args.host, args.port),
        database_url: args.database_url,
        approval_key_file: args.approval_key_file,
        agents_file: args.config,
        agent: args.agent,
        provider: ProviderEnv {
            openai_base_url: env("OPENAI_BASE_URL"),
            openai_api_key: env("OPENAI_API_KEY"),
            stream_idle_timeout: args.provider_timeout,
        },
        approval_policy: ApprovalPolicy {
            max_pending: args.max_pending_approvals,
            max_args_bytes: args.max_approval_args_bytes,
            ..ApprovalPolicy::default()
        },
        stream: StreamSettings {
            ring_capacity: args.event_buffer as usize,
            ring_bytes: args.event_buffer_bytes,
            max_clients_per_session: args.max_clients_per_session,
            max_clients: args.max_clients,
        },
        max_sessions: args.max_sessions,
        max_history_bytes: args.max_history_bytes,
        max_queued_turns: args.max_queued_turns,
        turn_timeout: (!args.turn_timeout.is_zero()).then_some(args.turn_timeout),
        sweep: Some(SweepPolicy {
            idle_ttl: args.session_ttl,
            interval: args.sweep_interval,
            retention: (!args.session_retention.is_zero()).then_some(args.session_retention),
        }),
        session_store: args.session_store,
        database: ConnectSettings::waiting(args.database_wait),
        instance_lease: args.instance_lease,
        http: HttpSettings {
            api_key,
            origins: OriginPolicy {
                allowed: args.allowed_origins,
            },
            max_body_bytes: args.max_body_bytes,
            body_timeout: args.body_timeout,
            ws: WsSettings {
                max_message_bytes: args.max_ws_message_bytes,
            },
            allowed_hosts,
            max_mcp_sessions: args.max_mcp_sessions,
            mcp_session_idle: args.mcp_session_idle,
            ..defaults
        },
        server: ServerSettings {
            max_connections: args.max_connections as usize,
            header_timeout: args.header_timeout,
            idle_timeout: args.idle_timeout,
            write_timeout: args.write_timeout,
            grace: args.shutdown_grace + Duration::from_secs(10),
        },
        shutdown_grace: args.shutdown_grace,
        ..Settings::new(args.data_dir)
    })
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let app = app::build(settings(args)?)
        .await
        .map_err(|e| e.to_string())?;
    let bound = app.address();
    tracing::info!(
        address = %bound,
        agent = %app.agent.name,
        model = %app.agent.model,
        auth = app.auth,
        approvals = %if app.approval_key_id.is_some() { "unlocked" } else { "locked" },
        approval.key_id = %app.approval_key_id.as_deref().unwrap_or("none"),
        "autopoiesis listening on http://{bound}"
    );
    let served = app
        .run(async {
            wait_for_signal().await;
            tracing::info!("shutting down: finishing running turns");
        })
        .await;
    tracing::info!("stopped");
    served.map_err(|e| format!("server failed: {e}"))
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }
}

//! `autopoiesis-bench`: measures the server as a user of this machine would
//! meet it, and prints (and writes to `BENCHMARKS.md`) one table.
//!
//! It starts the `autopoiesis` binary itself (a fresh process with its own
//! temporary data dir for each phase, so one phase's sessions and sockets do
//! not weigh on the next) and, beside it, a bare poem hello-world endpoint
//! (this same binary, hidden subcommand `ceiling`) as the ceiling of the
//! machine. Both are separate processes from the load generator and are
//! measured the same way, over real loopback sockets. Every loop is bounded
//! in count and time, every phase has a time budget, and only 127.0.0.1 is
//! ever contacted.
//!
//! The figures are printed, never asserted: CI runs `--quick` as a smoke test
//! that the tool still works, not as a judge of speed.

mod ceiling;
mod cluster;
mod fanout;
mod load;
mod mcp;
mod phases;
mod postgres;
mod report;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Benchmarks the autopoiesis server on this machine against a bare poem
/// endpoint and prints a table (also written to BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(
    name = "autopoiesis-bench",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Hidden>,
    #[command(flatten)]
    options: Options,
}

#[derive(Debug, Subcommand)]
enum Hidden {
    /// The bare poem hello-world endpoint the server is compared with.
    #[command(hide = true)]
    Ceiling {
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

fn duration(raw: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(raw)
}

/// Everything is optional so `--quick` can supply small defaults that an
/// explicit flag still beats.
#[derive(Debug, Args)]
struct Options {
    /// The server binary, used as it is. Default: `autopoiesis` next to this
    /// executable (same target dir and profile: `target/release/` or
    /// `target/debug/`); when run through `cargo run`, it is built first so
    /// a stale server is never measured, except under `--quick`, which
    /// builds it only when it is missing.
    #[arg(long, visible_alias = "server-bin", value_name = "PATH")]
    server: Option<PathBuf>,
    /// Measured time of each REST, chat and MCP run (per round).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
    /// Unmeasured warm-up before each run.
    #[arg(long, value_parser = duration)]
    warmup: Option<Duration>,
    /// Rounds of each REST/chat/MCP run; the median round is reported, and
    /// the bare endpoint is measured right before the server in each round
    /// so both see the same background load.
    #[arg(long)]
    rounds: Option<usize>,
    /// Concurrent keep-alive connections of the REST, chat and MCP runs.
    #[arg(long)]
    connections: Option<usize>,
    /// Worker threads of the load generator. Default: one per core, like
    /// the server; with fewer, the bench itself caps the bare endpoint and
    /// the fan-out readers, and the ratios flatter the server.
    #[arg(long)]
    client_threads: Option<usize>,
    /// Turns per chat session before a connection moves to a new session
    /// (a turn's cost grows with its session's history).
    #[arg(long, default_value_t = 100)]
    chat_turns_per_session: u64,
    /// WebSocket clients on the one session of the fan-out run.
    #[arg(long)]
    fanout_clients: Option<usize>,
    /// Words (so tokens) in the fan-out turn's prompt.
    #[arg(long)]
    fanout_words: Option<usize>,
    /// Turns streamed in the fan-out run.
    #[arg(long)]
    fanout_turns: Option<usize>,
    /// Pause between the echo agent's tokens in the fan-out run, in ms
    /// (10: 100 tokens/s, a fast model); 0 sends each turn in one burst.
    #[arg(long, default_value_t = 10)]
    fanout_token_ms: u64,
    /// Idle WebSocket clients held open for the memory figure.
    #[arg(long)]
    idle_clients: Option<usize>,
    /// Server starts timed for the startup figure (the median is reported),
    /// on an empty data dir and again on the stored sessions' data.
    #[arg(long)]
    startup_runs: Option<usize>,
    /// Sessions stored (chatted into, then the server stopped) for the
    /// startup and `GET /api/sessions` figures on stored data.
    #[arg(long)]
    stored_sessions: Option<usize>,
    /// Connections of the `GET /api/sessions` run on the stored sessions
    /// (each answer lists them all, so fewer than the other runs).
    #[arg(long)]
    stored_connections: Option<usize>,
    /// A PostgreSQL database for the chat figure on PostgreSQL (a fresh
    /// schema is created in it for the run and dropped after; needs
    /// `psql`). Without it that figure is not measured.
    #[arg(
        long,
        env = "AUTOPOIESIS_TEST_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    postgres_url: Option<String>,
    /// RUST_LOG of the server; `info` is what it ships with (one log line
    /// per request, written to a file as in production).
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Tiny counts for CI: a few hundred ms per run, 20 fan-out clients, 50
    /// idle clients, 200 stored sessions. Proves the tool works; the figures mean little.
    #[arg(long)]
    quick: bool,
    /// Where the markdown report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Print the table only; write no file.
    #[arg(long)]
    no_write: bool,
    /// A remark for the report, e.g. that other builds shared the machine
    /// (repeatable).
    #[arg(long)]
    note: Vec<String>,
    /// Phases to leave out (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    skip: Vec<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    Rest,
    Chat,
    Fanout,
    /// Two instances on one PostgreSQL (needs `--postgres-url`).
    Cluster,
    Memory,
    Mcp,
    Startup,
    /// Startup and `GET /api/sessions` on stored sessions.
    Stored,
}

/// The settled plan of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub server: PathBuf,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub connections: usize,
    pub client_threads: usize,
    pub chat_turns_per_session: u64,
    pub fanout_clients: usize,
    pub fanout_words: usize,
    pub fanout_turns: usize,
    pub fanout_token_ms: u64,
    pub idle_clients: usize,
    pub startup_runs: usize,
    pub stored_sessions: usize,
    pub stored_connections: usize,
    pub postgres_url: Option<String>,
    pub server_log: String,
    pub quick: bool,
    pub skip: Vec<Phase>,
}

impl Plan {
    fn new(options: &Options, server: PathBuf) -> Self {
        let quick = options.quick;
        let pick = |value: Option<usize>, quick_value, full_value| {
            value.unwrap_or(if quick { quick_value } else { full_value })
        };
        Self {
            server,
            duration: options.duration.unwrap_or(if quick {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(3)
            }),
            warmup: options.warmup.unwrap_or(if quick {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(500)
            }),
            rounds: pick(options.rounds, 1, 3).max(1),
            connections: pick(options.connections, 64, 64).max(1),
            client_threads: options
                .client_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from))
                .max(1),
            chat_turns_per_session: options.chat_turns_per_session.max(1),
            fanout_clients: pick(options.fanout_clients, 20, 1000).max(1),
            fanout_words: pick(options.fanout_words, 20, 200).max(1),
            fanout_turns: pick(options.fanout_turns, 1, 3).max(1),
            fanout_token_ms: options.fanout_token_ms,
            idle_clients: pick(options.idle_clients, 50, 5000).max(1),
            startup_runs: pick(options.startup_runs, 2, 5).max(1),
            stored_sessions: pick(options.stored_sessions, 200, 10_000).max(1),
            stored_connections: pick(options.stored_connections, 8, 8).max(1),
            postgres_url: options
                .postgres_url
                .clone()
                .filter(|url| !url.trim().is_empty()),
            server_log: options.server_log.clone(),
            quick,
            skip: options.skip.clone(),
        }
    }

    pub fn runs(&self, phase: Phase) -> bool {
        !self.skip.contains(&phase)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Hidden::Ceiling { port }) = cli.command {
        return match ceiling::serve(port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match bench(&cli.options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the phases and reports; `Ok(false)` when a phase failed (the table
/// is still printed, with the failure in its row, but not written).
fn bench(options: &Options) -> anyhow::Result<bool> {
    let server = server::locate(options.server.clone(), options.quick)?;
    let plan = Plan::new(options, server);
    server::raise_open_files_limit(&plan)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.client_threads)
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let machine = report::Machine::read();
    let outcome = runtime.block_on(async {
        // Ctrl-C drops the phases, whose guards kill the server processes.
        tokio::select! {
            outcome = phases::run_all(&plan) => Ok(outcome),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    })?;
    let machine = machine.finish();
    let markdown = report::markdown(&plan, &machine, &outcome, &options.note);
    println!("\n{}", report::table(&outcome.rows));
    for note in &outcome.notes {
        println!("- {note}");
    }
    println!("- machine: {}", machine.describe());
    let failed = outcome
        .rows
        .iter()
        .any(|row| row.met == report::Met::Failed);
    if failed {
        eprintln!("a phase failed: see its row; nothing written");
    } else if options.no_write {
        eprintln!("--no-write: {} left as it was", options.out.display());
    } else {
        std::fs::write(&options.out, markdown)
            .with_context(|| format!("cannot write {}", options.out.display()))?;
        eprintln!("wrote {}", options.out.display());
    }
    Ok(!failed)
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

//! The phases of a run, in order: REST (with the ceiling), chat (per
//! session store), fan-out, two instances, memory, MCP, startup, stored
//! sessions. Each
//! starts its own server processes and turns what it measured into rows of
//! the table; a phase that fails puts its error in its row and the run goes
//! on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Full;
use hyper::{Request, StatusCode};

use crate::load::{self, Measured, Window, Workload};
use crate::report::{Met, Outcome, Row, kib, millis, per_second};
use crate::server::{self, Process};
use crate::{Phase, Plan, fanout, mcp, postgres};

/// The targets of the issue, for this 2-core machine.
const HEALTH_RATIO_TARGET: f64 = 0.85;
const CHAT_TARGET: f64 = 5_000.0;
/// Chat turns/s on the SQLite store against the in-memory one (issue 11).
const SQLITE_CHAT_RATIO_TARGET: f64 = 0.5;
const FANOUT_P99_TARGET_MS: f64 = 50.0;
const IDLE_WS_TARGET_KIB: f64 = 16.0;
const MCP_TARGET: f64 = 5_000.0;
const STARTUP_TARGET_MS: f64 = 100.0;
/// Start to healthy on a data dir holding the stored sessions (issue 11).
const STORED_STARTUP_TARGET_MS: f64 = 200.0;
/// Turns chatted into each stored session (so 6 messages each): sessions
/// with a history, as users leave them, not empty shells.
pub const SEED_TURNS: u64 = 3;
/// Connections the stored sessions are chatted into over.
pub const SEED_CONNECTIONS: usize = 16;
/// Sessions present while `GET /api/sessions` is measured: its answer
/// lists them all, so the figure depends on the count.
const LISTED_SESSIONS: usize = 10;

pub async fn run_all(plan: &Plan) -> Outcome {
    let mut outcome = Outcome::default();
    let runs = plan.rounds as u32;
    let window = plan.warmup + plan.duration;
    let phases: [(Phase, &str, Duration); 8] = [
        (
            Phase::Rest,
            "REST",
            window * runs * 3 + Duration::from_secs(60),
        ),
        (
            Phase::Chat,
            "chat",
            window * runs * 3 + Duration::from_secs(90),
        ),
        (
            Phase::Fanout,
            "fan-out",
            Duration::from_millis(
                plan.fanout_token_ms * (plan.fanout_words * plan.fanout_turns) as u64 * 3,
            ) + Duration::from_secs(120),
        ),
        (
            Phase::Cluster,
            "two instances",
            window * runs * 3
                + Duration::from_millis(
                    plan.fanout_token_ms * (plan.fanout_words * plan.fanout_turns) as u64 * 6,
                )
                + Duration::from_secs(240),
        ),
        (Phase::Memory, "memory", Duration::from_secs(180)),
        (Phase::Mcp, "MCP", window * runs + Duration::from_secs(60)),
        (
            Phase::Startup,
            "startup",
            Duration::from_secs(25) * plan.startup_runs as u32,
        ),
        (
            Phase::Stored,
            "stored sessions",
            Duration::from_secs(30) * plan.startup_runs as u32
                + window * runs
                + Duration::from_secs(120)
                + Duration::from_millis(20) * plan.stored_sessions as u32,
        ),
    ];
    for (phase, name, budget) in phases {
        if !plan.runs(phase) {
            continue;
        }
        eprintln!("== {name}");
        let result = tokio::time::timeout(budget, async {
            match phase {
                Phase::Rest => rest(plan, &mut outcome).await,
                Phase::Chat => chat(plan, &mut outcome).await,
                Phase::Fanout => fan_out(plan, &mut outcome).await,
                Phase::Cluster => crate::cluster::cluster(plan, &mut outcome).await,
                Phase::Memory => memory(plan, &mut outcome).await,
                Phase::Mcp => mcp_calls(plan, &mut outcome).await,
                Phase::Startup => startup(plan, &mut outcome).await,
                Phase::Stored => stored(plan, &mut outcome).await,
            }
        })
        .await;
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("did not finish within its budget of {budget:?}"),
        };
        eprintln!("{name} failed: {error}");
        outcome.rows.push(Row::failed(name, &error));
    }
    outcome
}

fn window(plan: &Plan) -> Window {
    Window {
        connections: plan.connections,
        warmup: plan.warmup,
        duration: plan.duration,
    }
}

/// A load run with the CPU time the server and this process spent on it.
struct Tracked {
    measured: Measured,
    server_cores: f64,
    bench_cores: f64,
}

async fn tracked(
    process: &Process,
    workload: Arc<Workload>,
    window: Window,
) -> anyhow::Result<Tracked> {
    let (server_before, bench_before) = (process.cpu_seconds()?, own_cpu_seconds()?);
    let started = Instant::now();
    let measured = load::run(process.address, workload, window).await?;
    let wall = started.elapsed().as_secs_f64();
    Ok(Tracked {
        measured,
        server_cores: (process.cpu_seconds()? - server_before) / wall,
        bench_cores: (own_cpu_seconds()? - bench_before) / wall,
    })
}

fn own_cpu_seconds() -> anyhow::Result<f64> {
    server::cpu_seconds("/proc/self/stat")
}

/// The rounds of one figure: the median round's rate, every round's
/// latencies, and the failures of all.
struct Rounds {
    rate: f64,
    /// Every round's rate, in order, to show the run-to-run noise.
    rates: Vec<f64>,
    latency: Histogram<u64>,
    failed: u64,
    first_failure: Option<String>,
    server_cores: f64,
    bench_cores: f64,
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn combine(runs: &[Tracked]) -> anyhow::Result<Rounds> {
    let mut latency = load::histogram();
    for run in runs {
        latency.add(&run.measured.latency)?;
    }
    let rates: Vec<f64> = runs.iter().map(|r| r.measured.rate).collect();
    let mut server: Vec<f64> = runs.iter().map(|r| r.server_cores).collect();
    let mut bench: Vec<f64> = runs.iter().map(|r| r.bench_cores).collect();
    Ok(Rounds {
        rate: median(&mut rates.clone()),
        rates,
        latency,
        failed: runs.iter().map(|r| r.measured.failed).sum(),
        first_failure: runs.iter().find_map(|r| r.measured.first_failure.clone()),
        server_cores: median(&mut server),
        bench_cores: median(&mut bench),
    })
}

/// A throughput row; any failed request fails it, since a figure earned
/// with errors is no figure.
fn rate_row(figure: String, rounds: &Rounds, unit: &str, extra: &str, target: Target) -> Row {
    let met = if rounds.failed > 0 {
        Met::Failed
    } else {
        target.met
    };
    let mut value = format!("{} {unit}{extra}", per_second(rounds.rate));
    if rounds.failed > 0 {
        value.push_str(&format!(
            "; {} failed, first: {}",
            rounds.failed,
            rounds.first_failure.as_deref().unwrap_or("?")
        ));
    }
    Row {
        figure,
        value,
        p50: millis(rounds.latency.value_at_quantile(0.5)),
        p99: millis(rounds.latency.value_at_quantile(0.99)),
        target: target.text,
        met,
    }
}

struct Target {
    text: String,
    met: Met,
}

impl Target {
    fn none() -> Self {
        Self {
            text: "—".into(),
            met: Met::Info,
        }
    }

    fn at_least(text: String, ok: bool) -> Self {
        Self {
            text,
            met: if ok { Met::Yes } else { Met::No },
        }
    }
}

/// How the cores were split, and every round's rate.
fn cpu_note(what: &str, rounds: &Rounds) -> String {
    let rates: Vec<String> = rounds.rates.iter().map(|r| per_second(*r)).collect();
    format!(
        "{what}: the server used {:.2} cores and the load generator {:.2} (median round); \
         rounds: {}/s",
        rounds.server_cores,
        rounds.bench_cores,
        rates.join(", ")
    )
}

async fn rest(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let server = server::start_server(plan, &[], &[]).await?;
    let ceiling = server::start_ceiling().await?;
    seed_sessions(server.address, LISTED_SESSIONS).await?;

    let bare = Arc::new(Workload::get(ceiling.address, "/"));
    let health = Arc::new(Workload::get(server.address, "/api/health"));
    let sessions = Arc::new(Workload::get(server.address, "/api/sessions"));
    let (mut bare_runs, mut health_runs, mut sessions_runs) = (vec![], vec![], vec![]);
    let (mut health_ratios, mut sessions_ratios) = (vec![], vec![]);
    for round in 0..plan.rounds {
        // Back to back in each round, so the ratio compares runs that saw
        // the same background load; the median round is reported.
        let b = tracked(&ceiling, Arc::clone(&bare), window(plan)).await?;
        let h = tracked(&server, Arc::clone(&health), window(plan)).await?;
        let s = tracked(&server, Arc::clone(&sessions), window(plan)).await?;
        eprintln!(
            "round {}: bare {:.0}/s, health {:.0}/s, sessions {:.0}/s",
            round + 1,
            b.measured.rate,
            h.measured.rate,
            s.measured.rate
        );
        health_ratios.push(h.measured.rate / b.measured.rate.max(1.0));
        sessions_ratios.push(s.measured.rate / b.measured.rate.max(1.0));
        bare_runs.push(b);
        health_runs.push(h);
        sessions_runs.push(s);
    }
    let (bare, health, sessions) = (
        combine(&bare_runs)?,
        combine(&health_runs)?,
        combine(&sessions_runs)?,
    );
    let health_ratio = median(&mut health_ratios);
    let sessions_ratio = median(&mut sessions_ratios);
    let c = plan.connections;
    outcome.rows.push(rate_row(
        format!("bare poem hello-world `GET /` (the ceiling), {c} connections"),
        &bare,
        "req/s",
        "",
        Target::none(),
    ));
    outcome.rows.push(rate_row(
        format!("`GET /api/health`, {c} connections"),
        &health,
        "req/s",
        &format!(" = {health_ratio:.2} × bare"),
        Target::at_least(
            format!("≥ {HEALTH_RATIO_TARGET} × bare"),
            health_ratio >= HEALTH_RATIO_TARGET,
        ),
    ));
    outcome.rows.push(rate_row(
        format!("`GET /api/sessions` ({LISTED_SESSIONS} sessions), {c} connections"),
        &sessions,
        "req/s",
        &format!(" = {sessions_ratio:.2} × bare"),
        Target::none(),
    ));
    outcome.notes.push(cpu_note("bare endpoint", &bare));
    outcome.notes.push(cpu_note("`GET /api/health`", &health));
    outcome
        .notes
        .push(cpu_note("`GET /api/sessions`", &sessions));
    Ok(())
}

async fn seed_sessions(address: SocketAddr, count: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    for i in 0..count {
        let response = http
            .post(format!("http://{address}/api/chat"))
            .json(&serde_json::json!({"content": "hello world", "session_id": format!("bench-seed-{i}")}))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "seeding a session: POST /api/chat answered {}",
            response.status()
        );
    }
    Ok(())
}

/// `POST /api/chat` on connection `conn`'s own session: sessions run in
/// parallel, each one's turns in order, as with one user per connection.
/// After `turns_per_session` turns the connection moves to a new session:
/// a turn's cost grows with its session's history, so without a fixed
/// length the figure would depend on how long the run lasted.
pub fn chat_workload(address: SocketAddr, round: usize, turns_per_session: u64) -> Workload {
    Workload {
        build: Box::new(move |conn, i| {
            let session = i / turns_per_session.max(1);
            let body = format!(
                r#"{{"content":"hello world","session_id":"bench-chat-{round}-{conn}-{session}"}}"#
            );
            Request::post("/api/chat")
                .header(hyper::header::HOST, address.to_string())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("a POST with valid headers")
        }),
        check: |status, body| {
            status == StatusCode::OK && body.windows(11).any(|w| w == b"hello world")
        },
    }
}

/// The chat figure per session store, all in this one phase: the servers
/// run side by side and each round measures them back to back, so their
/// ratio compares runs under the same background load.
async fn chat(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let memory =
        server::start_server(plan, &["--session-store".into(), "memory".into()], &[]).await?;
    let sqlite = server::start_server(plan, &[], &[]).await?;
    // PostgreSQL only with a URL; a PostgreSQL that fails to set up fails
    // its own row, not the other two.
    let schema = plan.postgres_url.as_deref().map(postgres::Schema::create);
    let postgres = match &schema {
        Some(Ok(schema)) => Some(
            server::start_server(plan, &["--database-url".into(), schema.url.clone()], &[]).await,
        ),
        _ => None,
    };
    let pg_server = match &postgres {
        Some(Ok(server)) => Some(server),
        _ => None,
    };
    let (mut memory_runs, mut sqlite_runs, mut pg_runs) = (vec![], vec![], vec![]);
    let (mut sqlite_ratios, mut pg_ratios) = (vec![], vec![]);
    let turns = plan.chat_turns_per_session;
    for round in 0..plan.rounds {
        let m = tracked(
            &memory,
            Arc::new(chat_workload(memory.address, round, turns)),
            window(plan),
        )
        .await?;
        let s = tracked(
            &sqlite,
            Arc::new(chat_workload(sqlite.address, round, turns)),
            window(plan),
        )
        .await?;
        let mut line = format!(
            "round {}: memory {:.0} turns/s, SQLite {:.0} turns/s",
            round + 1,
            m.measured.rate,
            s.measured.rate
        );
        sqlite_ratios.push(s.measured.rate / m.measured.rate.max(1.0));
        if let Some(pg) = pg_server {
            let p = tracked(
                pg,
                Arc::new(chat_workload(pg.address, round, turns)),
                window(plan),
            )
            .await?;
            line.push_str(&format!(", PostgreSQL {:.0} turns/s", p.measured.rate));
            pg_ratios.push(p.measured.rate / m.measured.rate.max(1.0));
            pg_runs.push(p);
        }
        eprintln!("{line}");
        memory_runs.push(m);
        sqlite_runs.push(s);
    }
    let (memory_rounds, sqlite_rounds) = (combine(&memory_runs)?, combine(&sqlite_runs)?);
    let sqlite_ratio = median(&mut sqlite_ratios);
    let c = plan.connections;
    let figure = |store: &str| {
        format!(
            "`POST /api/chat` (echo agent), {store}, {c} sessions in parallel, {turns} turns each"
        )
    };
    outcome.rows.push(rate_row(
        figure("in-memory store (`--session-store memory`)"),
        &memory_rounds,
        "turns/s",
        "",
        Target::at_least(
            format!("≥ {} turns/s", per_second(CHAT_TARGET)),
            memory_rounds.rate >= CHAT_TARGET,
        ),
    ));
    outcome.rows.push(rate_row(
        figure("SQLite store (the default)"),
        &sqlite_rounds,
        "turns/s",
        &format!(" = {sqlite_ratio:.2} × memory"),
        Target::at_least(
            format!("≥ {SQLITE_CHAT_RATIO_TARGET} × memory"),
            sqlite_ratio >= SQLITE_CHAT_RATIO_TARGET,
        ),
    ));
    let pg_figure = figure("PostgreSQL store");
    match (&schema, &postgres) {
        (None, _) => outcome.rows.push(Row {
            figure: pg_figure,
            value: "not measured (no PostgreSQL URL)".into(),
            p50: "—".into(),
            p99: "—".into(),
            target: "—".into(),
            met: Met::NotAvailable,
        }),
        (Some(Err(e)), _) | (Some(Ok(_)), Some(Err(e))) => {
            outcome
                .rows
                .push(Row::failed(&pg_figure, &format!("{e:#}")));
        }
        (Some(Ok(_)), _) => {
            let pg_rounds = combine(&pg_runs)?;
            let pg_ratio = median(&mut pg_ratios);
            outcome.rows.push(rate_row(
                pg_figure,
                &pg_rounds,
                "turns/s",
                &format!(" = {pg_ratio:.2} × memory"),
                Target::none(),
            ));
            outcome.notes.push(cpu_note(
                "chat on PostgreSQL (the database server's own CPU not counted)",
                &pg_rounds,
            ));
        }
    }
    outcome
        .notes
        .push(cpu_note("chat in memory", &memory_rounds));
    outcome
        .notes
        .push(cpu_note("chat on SQLite", &sqlite_rounds));
    // The servers go before the schema they use.
    drop(postgres);
    drop((memory, sqlite));
    drop(schema);
    Ok(())
}

/// The flags and files of a fan-out server: the echo agent streaming a
/// token every `fanout_token_ms` (or in one burst at 0). Each turn's frames
/// must fit the session's retained window (a client further behind is
/// closed), even when the bench reads late, and the session must take all
/// the clients.
pub fn fanout_server(plan: &Plan) -> (Vec<String>, Vec<(&'static str, String)>) {
    let clients = plan.fanout_clients;
    let model = if plan.fanout_token_ms == 0 {
        "echo".to_owned()
    } else {
        format!("echo:delay_ms={}", plan.fanout_token_ms)
    };
    let window = (plan.fanout_words + 64).max(1024);
    let flags = vec![
        "--config".into(),
        "{dir}/agents.toml".into(),
        "--event-buffer".into(),
        window.to_string(),
        "--max-clients-per-session".into(),
        (clients + 16).max(2048).to_string(),
        "--max-clients".into(),
        (clients + 16).max(20_000).to_string(),
    ];
    let files = vec![(
        "agents.toml",
        format!("[agents.default]\nmodel = \"{model}\"\n"),
    )];
    (flags, files)
}

async fn fan_out(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let clients = plan.fanout_clients;
    let (flags, files) = fanout_server(plan);
    let server = server::start_server(plan, &flags, &files).await?;
    let session = "bench-fanout";
    let sockets = fanout::connect_many(server.address, clients, |_| session.to_owned()).await?;
    let prompt: Vec<String> = (0..plan.fanout_words).map(|i| format!("w{i}")).collect();
    let streaming = Duration::from_millis(plan.fanout_token_ms * plan.fanout_words as u64);
    let (server_before, bench_before) = (server.cpu_seconds()?, own_cpu_seconds()?);
    let started = Instant::now();
    let spread = fanout::measure(
        server.address,
        session,
        sockets,
        &prompt.join(" "),
        plan.fanout_turns,
        streaming * plan.fanout_turns as u32 * 2 + Duration::from_secs(60),
    )
    .await?;
    let wall = started.elapsed().as_secs_f64();
    outcome.notes.push(format!(
        "fan-out: the server used {:.2} cores and the bench's {clients} readers {:.2} while the turns streamed",
        (server.cpu_seconds()? - server_before) / wall,
        (own_cpu_seconds()? - bench_before) / wall,
    ));
    let p99 = spread.first_to_last.value_at_quantile(0.99);
    let pace = if plan.fanout_token_ms == 0 {
        "in one burst".to_owned()
    } else {
        format!("{} ms apart", plan.fanout_token_ms)
    };
    let mut value = format!(
        "{} tokens ({} words × {} turns, {pace}) to {clients} clients",
        spread.tokens, plan.fanout_words, plan.fanout_turns
    );
    let met = if spread.incomplete_clients > 0 {
        value.push_str(&format!(
            "; {} clients missed tokens",
            spread.incomplete_clients
        ));
        Met::No
    } else if p99 as f64 / 1000.0 <= FANOUT_P99_TARGET_MS {
        Met::Yes
    } else {
        Met::No
    };
    outcome.rows.push(Row {
        figure: format!(
            "fan-out: 1 session, {clients} WebSocket clients, token's first arrival → last client"
        ),
        value,
        p50: millis(spread.first_to_last.value_at_quantile(0.5)),
        p99: millis(p99),
        target: format!("p99 ≤ {FANOUT_P99_TARGET_MS} ms"),
        met,
    });
    Ok(())
}

async fn memory(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let clients = plan.idle_clients;
    // Sessions of up to 1,000 clients: within the default per-session limit,
    // and the per-session cost is spread thin, so the figure is the
    // connection's own.
    let per_session = 1000;
    let server = server::start_server(
        plan,
        &[
            "--max-clients".into(),
            (clients + 16).max(20_000).to_string(),
        ],
        &[],
    )
    .await?;
    // Touch the paths an idle client takes once, so lazy initialisation is
    // not charged to the clients.
    drop(fanout::connect_many(server.address, 1, |_| "bench-warm".to_owned()).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = server.rss_kib()?;
    let sockets = fanout::connect_many(server.address, clients, |i| {
        format!("bench-idle-{}", i / per_session)
    })
    .await?;
    // Let the server finish its side of the last upgrades.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected = server.rss_kib()?;
    anyhow::ensure!(sockets.len() == clients, "only {} connected", sockets.len());
    let per_client = connected.saturating_sub(idle) as f64 / clients as f64;
    outcome.rows.push(Row {
        figure: "server RSS, idle (after one WebSocket came and went)".into(),
        value: kib(idle as f64),
        p50: "—".into(),
        p99: "—".into(),
        target: "—".into(),
        met: Met::Info,
    });
    outcome.rows.push(Row {
        figure: format!("server RSS per idle WebSocket, {clients} connected"),
        value: format!(
            "{per_client:.1} KiB (RSS {} with them)",
            kib(connected as f64)
        ),
        p50: "—".into(),
        p99: "—".into(),
        target: format!("≤ {IDLE_WS_TARGET_KIB} KiB"),
        met: if per_client <= IDLE_WS_TARGET_KIB {
            Met::Yes
        } else {
            Met::No
        },
    });
    drop(sockets);
    Ok(())
}

async fn mcp_calls(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let server = server::start_server(plan, &[], &[]).await?;
    let figure = format!(
        "MCP `tools/call dashboard.status`, {} sessions",
        plan.connections
    );
    let Some(first) = mcp::open(server.address).await.context("MCP initialize")? else {
        outcome.rows.push(Row {
            figure,
            value: "n/a (server has no /mcp)".into(),
            p50: "—".into(),
            p99: "—".into(),
            target: format!("≥ {} calls/s", per_second(MCP_TARGET)),
            met: Met::NotAvailable,
        });
        return Ok(());
    };
    let mut sessions = vec![first];
    for _ in 1..plan.connections {
        sessions.push(
            mcp::open(server.address)
                .await?
                .context("/mcp vanished between two sessions")?,
        );
    }
    let workload = Arc::new(mcp::dashboard_status(server.address, sessions));
    let mut runs = vec![];
    for round in 0..plan.rounds {
        let run = tracked(&server, Arc::clone(&workload), window(plan)).await?;
        eprintln!("round {}: {:.0} calls/s", round + 1, run.measured.rate);
        runs.push(run);
    }
    let rounds = combine(&runs)?;
    outcome.rows.push(rate_row(
        figure,
        &rounds,
        "calls/s",
        "",
        Target::at_least(
            format!("≥ {} calls/s", per_second(MCP_TARGET)),
            rounds.rate >= MCP_TARGET,
        ),
    ));
    outcome.notes.push(cpu_note("MCP", &rounds));
    Ok(())
}

async fn startup(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let mut times = vec![];
    for _ in 0..plan.startup_runs {
        let server = server::start_server(plan, &[], &[]).await?;
        times.push((server.ready - server.spawned).as_secs_f64() * 1000.0);
        // Dropping the process kills it before the next start.
    }
    let (min, max) = (
        times.iter().copied().fold(f64::INFINITY, f64::min),
        times.iter().copied().fold(0.0, f64::max),
    );
    let median = median(&mut times);
    outcome.rows.push(Row {
        figure: format!(
            "startup: process start → `/api/health` 200 (median of {})",
            plan.startup_runs
        ),
        value: format!("{median:.1} ms (min {min:.1}, max {max:.1})"),
        p50: "—".into(),
        p99: "—".into(),
        target: format!("≤ {STARTUP_TARGET_MS} ms"),
        met: if median <= STARTUP_TARGET_MS {
            Met::Yes
        } else {
            Met::No
        },
    });
    Ok(())
}

/// Start to healthy, and `GET /api/sessions`, on a data dir holding
/// `plan.stored_sessions` sessions: chatted into by one server, which is
/// then stopped (SIGTERM), and read by the next ones, as after a restart.
async fn stored(plan: &Plan, outcome: &mut Outcome) -> anyhow::Result<()> {
    let n = plan.stored_sessions;
    let dir = tempfile::Builder::new()
        .prefix("autopoiesis-bench-stored-")
        .tempdir()
        .context("cannot create a temporary data dir")?;
    let data = dir.path().join("data");
    // The default cap is 10,000 sessions; the figure is about the stored
    // count, not the cap.
    let flags = [
        "--max-sessions".to_owned(),
        (n + 1000).max(10_000).to_string(),
    ];

    let seeding = server::start_server_on(plan, &data, &flags).await?;
    let started = Instant::now();
    seed_stored(seeding.address, n).await?;
    let seeded_in = started.elapsed();
    seeding
        .stop()
        .await
        .context("stopping the seeding server")?;

    let mut times = vec![];
    for _ in 0..plan.startup_runs {
        let server = server::start_server_on(plan, &data, &flags).await?;
        times.push((server.ready - server.spawned).as_secs_f64() * 1000.0);
        server.stop().await?;
    }
    let (min, max) = (
        times.iter().copied().fold(f64::INFINITY, f64::min),
        times.iter().copied().fold(0.0, f64::max),
    );
    let startup = median(&mut times);
    outcome.rows.push(Row {
        figure: format!(
            "startup with {} stored sessions: process start → `/api/health` 200 (median of {})",
            per_second(n as f64),
            plan.startup_runs
        ),
        value: format!("{startup:.1} ms (min {min:.1}, max {max:.1})"),
        p50: "—".into(),
        p99: "—".into(),
        target: format!("≤ {STORED_STARTUP_TARGET_MS} ms"),
        met: if startup <= STORED_STARTUP_TARGET_MS {
            Met::Yes
        } else {
            Met::No
        },
    });

    let server = server::start_server_on(plan, &data, &flags).await?;
    let answer = list_sessions(server.address).await?;
    anyhow::ensure!(
        answer.count == n,
        "after the restart GET /api/sessions listed {} sessions, not the {n} stored",
        answer.count
    );
    let list = Arc::new(Workload::get(server.address, "/api/sessions"));
    let window = Window {
        connections: plan.stored_connections,
        ..window(plan)
    };
    let mut runs = vec![];
    for round in 0..plan.rounds {
        let run = tracked(&server, Arc::clone(&list), window).await?;
        eprintln!("round {}: {:.0} lists/s", round + 1, run.measured.rate);
        runs.push(run);
    }
    let rounds = combine(&runs)?;
    outcome.rows.push(rate_row(
        format!(
            "`GET /api/sessions` ({} stored sessions, {} per answer), {} connections",
            per_second(n as f64),
            answer_size(answer.bytes),
            plan.stored_connections
        ),
        &rounds,
        "req/s",
        "",
        Target::none(),
    ));
    outcome.notes.push(format!(
        "stored sessions: {} sessions × {SEED_TURNS} turns chatted in over {SEED_CONNECTIONS} \
         connections in {:.1} s ({:.0} turns/s), then the server stopped with SIGTERM; every \
         start on that data is stopped the same way",
        per_second(n as f64),
        seeded_in.as_secs_f64(),
        (n as u64 * SEED_TURNS) as f64 / seeded_in.as_secs_f64().max(1e-9),
    ));
    outcome.notes.push(cpu_note(
        "`GET /api/sessions` on the stored sessions",
        &rounds,
    ));
    drop(server);
    Ok(())
}

/// Chats [`SEED_TURNS`] turns into each of `count` sessions
/// (`bench-stored-I`), over [`SEED_CONNECTIONS`] keep-alive connections.
async fn seed_stored(address: SocketAddr, count: usize) -> anyhow::Result<()> {
    let tasks: Vec<_> = (0..SEED_CONNECTIONS.min(count))
        .map(|conn| {
            tokio::spawn(async move {
                let mut send = load::connect(address).await?;
                for session in (conn..count).step_by(SEED_CONNECTIONS) {
                    for turn in 0..SEED_TURNS {
                        let body = format!(
                            r#"{{"content":"hello world {turn}","session_id":"bench-stored-{session}"}}"#
                        );
                        let request = Request::post("/api/chat")
                            .header(hyper::header::HOST, address.to_string())
                            .header(hyper::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body)))?;
                        let (status, answer) = tokio::time::timeout(
                            Duration::from_secs(30),
                            load::exchange(&mut send, request),
                        )
                        .await
                        .context("seeding: no answer within 30 s")??;
                        anyhow::ensure!(
                            status == StatusCode::OK,
                            "seeding session {session}: POST /api/chat answered {status}: {}",
                            String::from_utf8_lossy(&answer[..answer.len().min(200)])
                        );
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A size in bytes as KiB, or MiB from 1 MiB on.
fn answer_size(bytes: usize) -> String {
    let kib_count = bytes as f64 / 1024.0;
    if kib_count < 1024.0 {
        format!("{kib_count:.0} KiB")
    } else {
        kib(kib_count)
    }
}

/// One `GET /api/sessions`: how many it listed, and the answer's size.
struct Listed {
    count: usize,
    bytes: usize,
}

async fn list_sessions(address: SocketAddr) -> anyhow::Result<Listed> {
    let mut send = load::connect(address).await?;
    let request = Request::get("/api/sessions")
        .header(hyper::header::HOST, address.to_string())
        .body(Full::new(Bytes::new()))?;
    let (status, body) = load::exchange(&mut send, request).await?;
    anyhow::ensure!(
        status == StatusCode::OK,
        "GET /api/sessions answered {status}"
    );
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(&body).context("GET /api/sessions: not a JSON array")?;
    Ok(Listed {
        count: items.len(),
        bytes: body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn answer_sizes_in_kib_then_mib() {
        assert_eq!(super::answer_size(10 * 1024), "10 KiB");
        assert_eq!(super::answer_size(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}

//! The table, the machine it ran on, and `BENCHMARKS.md`.

use std::fmt::Write as _;

use crate::Plan;

/// Whether a figure met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    /// No target: context for the other figures.
    Info,
    /// Not measurable on this server (no `/mcp` yet).
    NotAvailable,
    /// The phase failed; the value says why.
    Failed,
}

impl Met {
    fn text(self) -> &'static str {
        match self {
            Self::Yes => "yes",
            Self::No => "**no**",
            Self::Info => "",
            Self::NotAvailable => "n/a",
            Self::Failed => "**FAILED**",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub value: String,
    pub p50: String,
    pub p99: String,
    pub target: String,
    pub met: Met,
}

impl Row {
    pub fn failed(phase: &str, error: &str) -> Self {
        Self {
            figure: phase.to_owned(),
            value: format!("failed: {}", error.replace('|', "/").replace('\n', " ")),
            p50: "—".into(),
            p99: "—".into(),
            target: "—".into(),
            met: Met::Failed,
        }
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// Context printed under the table (CPU shares).
    pub notes: Vec<String>,
}

/// A histogram value in µs as milliseconds.
pub fn millis(micros: u64) -> String {
    format!("{:.2} ms", micros as f64 / 1000.0)
}

/// A rate with thousands separators: 12,345.
pub fn per_second(rate: f64) -> String {
    let digits = format!("{:.0}", rate.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// KiB as MiB.
pub fn kib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

pub fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| figure | value | p50 | p99 | target | met? |\n|---|---|---|---|---|---|\n");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.figure,
            row.value,
            row.p50,
            row.p99,
            row.target,
            row.met.text()
        );
    }
    out
}

/// What the figures were measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    cores: usize,
    model: String,
    memory: String,
    kernel: String,
    date: String,
    load_before: String,
    load_after: String,
    cpu_before: Vec<u64>,
    /// Share of the machine's CPU time that was busy, and stolen by the
    /// host, during the run, in percent.
    busy_and_steal: Option<(f64, f64)>,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq
/// softirq steal ..., in ticks.
fn cpu_ticks() -> Vec<u64> {
    read("/proc/stat")
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
        let memory = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or_else(
                || "unknown".to_owned(),
                |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
            );
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            model,
            memory,
            kernel: format!("Linux {}", read("/proc/sys/kernel/osrelease").trim()),
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            load_before: load_average(),
            load_after: String::new(),
            cpu_before: cpu_ticks(),
            busy_and_steal: None,
        }
    }

    /// Records the load average at the end of the run.
    pub fn finish(mut self) -> Self {
        self.load_after = load_average();
        let after = cpu_ticks();
        if after.len() >= 8 && self.cpu_before.len() >= 8 {
            let delta: Vec<f64> = after
                .iter()
                .zip(&self.cpu_before)
                .take(8)
                .map(|(a, b)| a.saturating_sub(*b) as f64)
                .collect();
            let total: f64 = delta.iter().sum();
            if total > 0.0 {
                let idle = delta[3] + delta[4];
                let steal = delta[7];
                self.busy_and_steal = Some((
                    100.0 * (total - idle - steal) / total,
                    100.0 * steal / total,
                ));
            }
        }
        self
    }

    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} cores ({}), {} memory, {}; load average {} before the run, {} after",
            self.cores, self.model, self.memory, self.kernel, self.load_before, self.load_after
        );
        if let Some((busy, steal)) = self.busy_and_steal {
            let _ = write!(
                text,
                "; over the run the cores were {busy:.0}% busy and {steal:.1}% of their time \
                 was stolen by the host"
            );
        }
        text
    }
}

pub fn markdown(plan: &Plan, machine: &Machine, outcome: &Outcome, remarks: &[String]) -> String {
    // The command as run, less the remarks (they are printed below it).
    let mut args = Vec::new();
    let mut raw = std::env::args().skip(1);
    while let Some(arg) = raw.next() {
        if arg == "--note" {
            raw.next();
        } else if !arg.starts_with("--note=") {
            args.push(arg);
        }
    }
    let mut out = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Measured by `autopoiesis-bench` (the `bench/` crate) on {}, with \
         `cargo run{} -p autopoiesis-bench{}{}`{}.\n",
        machine.date,
        if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        },
        if args.is_empty() { "" } else { " -- " },
        args.join(" "),
        if plan.quick {
            " (quick mode: tiny counts, the figures mean little)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "**Machine:** {}.\n", machine.describe());
    for remark in remarks {
        let _ = writeln!(out, "**Note:** {remark}\n");
    }
    out.push_str(&table(&outcome.rows));
    out.push('\n');
    for note in &outcome.notes {
        let _ = writeln!(out, "- {note}");
    }
    let _ = write!(
        out,
        "
## Method

- **Processes.** The server (`autopoiesis serve` on a free port, echo agent,
  the default session store: sessions, history and event streams in the
  SQLite file `approvals.sqlite` of a fresh data dir on this machine's disk,
  `RUST_LOG={log}` with its log in a file, as in
  production) runs as a fresh process for each phase; the bare endpoint (poem 3.1, `GET /` answering
  `Hello, world!`, no middleware, no logs) is the bench's own hidden
  `ceiling` subcommand. Both are separate from the load generator and both
  use tokio's default multi-threaded runtime.
- **Load.** {conns} keep-alive HTTP/1.1 connections (hyper client, one task
  per socket, {threads} load-generator thread(s)), each sending its next
  request when the previous answer is read (closed loop). Each run warms up
  for {warmup:?}, then measures for {duration:?}; {rounds} round(s), the
  bare endpoint measured right before the server in each round, and the
  median round's rate reported (latencies merged over the rounds).
  Latency is request written to body read, in the load generator.
- **Chat.** `POST /api/chat` with `hello world`; connection *i* keeps to its
  own session (`bench-chat-ROUND-i-K`) for {per_session} turns, then moves
  to a new one, so sessions run in parallel, each one's turns in order,
  and the history a turn carries is bounded (a turn's cost grows with it).
  A turn counts when its answer is a 200 with the text. Measured per
  session store in the same phase: three servers side by side (in memory
  with `--session-store memory`; the default SQLite file; PostgreSQL when
  a URL is given, `--postgres-url` or `AUTOPOIESIS_TEST_DATABASE_URL`, on a
  schema `bench_<uuid>` created for the run with `psql` and dropped after,
  the server's URL carrying `options=-csearch_path=` that schema), and
  each round runs memory, SQLite, PostgreSQL back to back; the ratio to
  memory is the median of the rounds' ratios. PostgreSQL runs on the same
  2 cores; its own CPU is not in the server's share.
- **Fan-out.** One session, its clients connected first, then turns started
  over REST with a prompt of N words, which the echo agent streams back one
  token per word, paced like a model. A frame carries no server timestamp,
  so the server's send of each token is taken as its first arrival at any
  client (a frame is published once into the session's retained window,
  `--event-buffer` sized to hold a turn, and every client's cursor is woken
  to read it); the
  figure is, per token, last arrival minus first arrival. Arrivals are
  stamped in the bench, which reads every client on the same 2 cores, so
  the spread includes its own reading time: an upper bound on the server's.
- **Memory.** VmRSS of the server from `/proc/PID/status` once idle (after
  one WebSocket came and went), then with the idle WebSockets connected
  (sessions of 1,000 clients), one second after the last connected; the
  difference divided by the number of sockets.
- **MCP.** Streamable HTTP on `POST /mcp`: one `initialize` +
  `notifications/initialized` session per connection, then `tools/call
  dashboard.status` in a closed loop like the REST runs; SSE or JSON answers.
- **Startup.** From spawning the process to the first 200 of
  `GET /api/health`, polled every millisecond on the port the bench chose
  for it, median of the runs. Empty: a fresh data dir each time (the SQLite
  file is created and migrated).
- **Stored sessions.** One server chats {seed_turns} turns into each of
  {stored} sessions (`bench-stored-I`) over {seed_conns} connections and is
  stopped with SIGTERM. Then the startup runs above are repeated on that
  data dir (each stopped with SIGTERM, as a restart would), and a server
  started on it, after checking that `GET /api/sessions` lists all
  {stored}, serves that request (no `limit`: the whole list) in a closed
  loop like the REST runs, over {stored_conns} connections rather than
  {conns}: each answer is the whole list, and {conns} would only queue.

## Noise

Server and load generator share the same {cores} cores, so every throughput
figure is what the two together reach: the notes under the table say how
the cores were split, and give every round's rate, which shows how much
the figures move from one round to the next. The machine may also carry
other work (see the load averages and the busy share). The ratios compare
runs made back to back, under the same background load, but they move too:
read them to the first decimal. The bench prints and never judges: CI runs
`--quick` only to prove the tool works.
",
        log = plan.server_log,
        conns = plan.connections,
        threads = plan.client_threads,
        warmup = plan.warmup,
        duration = plan.duration,
        rounds = plan.rounds,
        cores = machine.cores,
        per_session = plan.chat_turns_per_session,
        seed_turns = crate::phases::SEED_TURNS,
        seed_conns = crate::phases::SEED_CONNECTIONS,
        stored = per_second(plan.stored_sessions as f64),
        stored_conns = plan.stored_connections,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_get_thousands_separators() {
        assert_eq!(per_second(0.4), "0");
        assert_eq!(per_second(999.0), "999");
        assert_eq!(per_second(1000.0), "1,000");
        assert_eq!(per_second(1_234_567.0), "1,234,567");
    }

    #[test]
    fn the_table_has_a_row_per_figure() {
        let rows = [Row::failed("chat", "boom | bang")];
        let table = table(&rows);
        assert_eq!(table.lines().count(), 3);
        assert!(table.contains("boom / bang"), "{table}");
    }
}

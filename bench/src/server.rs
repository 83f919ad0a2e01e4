//! The processes under test: finding and building the server binary,
//! starting it (or the ceiling) on a free port with its log in a file,
//! waiting until it answers, and reading memory and CPU figures from `/proc`.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Plan;

/// How long a process may take to answer before it counts as failed to
/// start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The server binary: `--server`, else `autopoiesis` beside this executable
/// (the workspace's `target/release/` or `target/debug/`, this executable's
/// profile). Under `cargo run` (which sets `CARGO`) it is built first, with
/// this executable's profile: `cargo run -p autopoiesis-bench` builds only
/// the bench, and a server binary left from an older build would be
/// measured without a word. A `--quick` run (figures nobody reads) takes a
/// server that is already there as it is, and builds only a missing one:
/// in CI `cargo test` has just built it from the same source, and a debug
/// `cargo build` of the server alone would rebuild what `cargo test`
/// compiled with its dev-dependencies' features (rmcp's client), so the smoke
/// run would take a minute instead of seconds.
pub fn locate(explicit: Option<PathBuf>, quick: bool) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        anyhow::ensure!(path.is_file(), "--server {}: no such file", path.display());
        return Ok(path);
    }
    let me = std::env::current_exe().context("cannot find this executable's path")?;
    let dir = me
        .parent()
        .context("this executable has no parent directory")?;
    let server = dir.join(format!("autopoiesis{}", std::env::consts::EXE_SUFFIX));
    if let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) && !(quick && server.is_file())
    {
        // This crate is `bench/` in the server's workspace.
        let workspace = Path::new(&manifest)
            .parent()
            .context("the bench's manifest dir has no parent")?
            .join("Cargo.toml");
        let mut build = build_command(&cargo, &workspace, !cfg!(debug_assertions));
        eprintln!("building the server: {build:?}");
        let status = build.status().context("cannot run cargo build")?;
        anyhow::ensure!(status.success(), "building the server failed ({status})");
    } else if server.is_file() {
        eprintln!("using the server at {}", server.display());
    }
    anyhow::ensure!(
        server.is_file(),
        "no server at {}: build it (cargo build --release -p autopoiesis) or pass --server",
        server.display()
    );
    Ok(server)
}

/// `cargo build` of the server alone, as a user would type it: without the
/// variables `cargo run` set for this process. Inherited, they reach the
/// nested build's compilers and build scripts, change their fingerprints
/// and make this build, then the next `cargo test`, recompile ring, rustls,
/// sqlx and sea-orm.
fn build_command(cargo: &OsStr, workspace_manifest: &Path, release: bool) -> Command {
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--locked",
            "-p",
            "autopoiesis",
            "--bin",
            "autopoiesis",
        ])
        .arg("--manifest-path")
        .arg(workspace_manifest);
    if release {
        build.arg("--release");
    }
    for (key, _) in std::env::vars_os() {
        if set_by_cargo_run(&key.to_string_lossy()) {
            build.env_remove(key);
        }
    }
    build
}

/// Whether `name` is one of the variables Cargo sets for a crate it
/// compiles or runs (its package, manifest, binaries and output dirs), as
/// opposed to the user's own settings (`CARGO_HOME`, `CARGO_TARGET_DIR`,
/// `CARGO_TERM_COLOR`, `CARGO_PROFILE_*`, `RUSTFLAGS`, ...), which the
/// nested build keeps.
fn set_by_cargo_run(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "CARGO",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    const PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"];
    NAMES.contains(&name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// Raises the soft open-files limit to the hard one: the idle-memory phase
/// holds thousands of sockets in this process and as many in the server,
/// which inherits the limit.
pub fn raise_open_files_limit(plan: &Plan) -> anyhow::Result<()> {
    let wanted = plan.idle_clients.max(plan.fanout_clients) as u64 + 1024;
    let (soft, hard) =
        rlimit::getrlimit(rlimit::Resource::NOFILE).context("cannot read the open-files limit")?;
    if soft < hard {
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard)
            .context("cannot raise the open-files limit")?;
    }
    if hard < wanted {
        bail!(
            "the open-files limit is {hard}; {wanted} are needed for {} clients \
             (raise it with ulimit -Hn, or pass fewer --idle-clients/--fanout-clients)",
            plan.idle_clients.max(plan.fanout_clients)
        );
    }
    Ok(())
}

/// A running child process, killed and reaped when dropped, whatever the
/// phase that owns it did (error, timeout, Ctrl-C).
pub struct Process {
    child: Child,
    pub address: SocketAddr,
    /// When the process was spawned.
    pub spawned: Instant,
    /// When it first answered 200 on its health (or ceiling) path.
    pub ready: Instant,
    // Holds the data dir and the log; removed after the process is gone.
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }

    /// CPU time the process has used (user + system), in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()))
    }

    /// A graceful stop, as an operator's restart would do: SIGTERM, then
    /// wait for the exit ([`STOP_TIMEOUT`] at most, then SIGKILL and an
    /// error). Used where the next server reads this one's data.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.pid());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "the server exited with {status} on SIGTERM"
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the server did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL: the server keeps nothing worth a graceful stop here (its
        // data dir is a temporary one), and a kill cannot hang.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `autopoiesis serve` on a free port with a fresh data dir and
/// `extra` flags, and waits until `GET /api/health` answers 200. `files`
/// are written into the data dir first; `{dir}` in a flag stands for it.
pub async fn start_server(
    plan: &Plan,
    extra: &[String],
    files: &[(&str, String)],
) -> anyhow::Result<Process> {
    let dir = tempfile::Builder::new()
        .prefix("autopoiesis-bench-")
        .tempdir()
        .context("cannot create a temporary data dir")?;
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content)
            .with_context(|| format!("cannot write {name}"))?;
    }
    let data = dir.path().join("data");
    serve(plan, &data, extra, dir).await
}

/// Starts `autopoiesis serve` on the data dir `data`, which outlives the
/// process (sessions stored by one server, read by the next), with its log
/// in a temporary dir of its own.
pub async fn start_server_on(
    plan: &Plan,
    data: &Path,
    extra: &[String],
) -> anyhow::Result<Process> {
    let dir = tempfile::Builder::new()
        .prefix("autopoiesis-bench-log-")
        .tempdir()
        .context("cannot create a temporary dir for the log")?;
    serve(plan, data, extra, dir).await
}

async fn serve(
    plan: &Plan,
    data: &Path,
    extra: &[String],
    dir: tempfile::TempDir,
) -> anyhow::Result<Process> {
    let dir_text = dir.path().display().to_string();
    let mut args: Vec<OsString> = vec!["serve".into(), "--data-dir".into()];
    args.push(data.into());
    args.extend(extra.iter().map(|a| a.replace("{dir}", &dir_text).into()));
    spawn(&plan.server, args, "/api/health", &plan.server_log, dir).await
}

/// Starts the bare poem endpoint (this executable's hidden `ceiling`) and
/// waits until its `GET /` answers 200.
pub async fn start_ceiling() -> anyhow::Result<Process> {
    let me = std::env::current_exe().context("cannot find this executable's path")?;
    let dir = tempfile::Builder::new()
        .prefix("autopoiesis-bench-ceiling-")
        .tempdir()
        .context("cannot create a temporary dir")?;
    spawn(&me, vec!["ceiling".into()], "/", "info", dir).await
}

/// A port free right now. The bench picks the port rather than reading it
/// from the log, so any `--server-log` level works; should another process
/// take it first, the server fails to bind and the start is retried.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

async fn spawn(
    program: &Path,
    args: Vec<OsString>,
    ready_path: &str,
    log_level: &str,
    dir: tempfile::TempDir,
) -> anyhow::Result<Process> {
    let log_path = dir.path().join("server.log");
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let log = std::fs::File::create(&log_path).context("cannot create the log file")?;
        let mut command = Command::new(program);
        command
            .args(&args)
            .args(["--port", &port.to_string()])
            .env("RUST_LOG", log_level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The server reads its settings from AUTOPOIESIS_* too; the
        // developer's own (an API key, a port) must not change what is
        // measured.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AUTOPOIESIS_") {
                command.env_remove(key);
            }
        }
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        match wait_ready(&mut child, address, spawned, ready_path).await {
            Ok(ready) => {
                return Ok(Process {
                    child,
                    address,
                    spawned,
                    ready,
                    _dir: dir,
                });
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                last_error = format!("{e:#}: {}", log_tail(&log_path));
            }
        }
    }
    bail!("{} did not start: {last_error}", program.display())
}

/// Polls `GET path` every millisecond until it answers 200, or the process
/// exits, or [`START_TIMEOUT`] passes. 1 ms polls, so the startup figure is
/// not rounded up by much.
async fn wait_ready(
    child: &mut Child,
    address: SocketAddr,
    spawned: Instant,
    path: &str,
) -> anyhow::Result<Instant> {
    let deadline = spawned + START_TIMEOUT;
    loop {
        if let Ok(Ok(200)) =
            tokio::time::timeout(Duration::from_millis(500), get_status(address, path)).await
        {
            return Ok(Instant::now());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited ({status}) before answering");
        }
        if Instant::now() >= deadline {
            bail!("GET {path} not 200 within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// User + system CPU time of the process whose `stat` file is `path`.
pub fn cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces; fields after its closing
    // parenthesis start at field 3 (state), so utime (14) is index 11.
    let after = stat.rsplit(')').next().context("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short stat")?.parse::<f64>()?)
    };
    // /proc reports in USER_HZ, 100 on every Linux configuration.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// One `GET path` on a fresh connection; the status code, or an error when
/// nothing answered. For start-up polling and probes, not for load.
pub async fn get_status(address: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    // "HTTP/1.1 200"
    let code = std::str::from_utf8(&head[9..12])?.parse()?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nested_build_drops_what_cargo_run_set_and_keeps_the_users_settings() {
        for name in [
            "CARGO",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_BIN_EXE_autopoiesis",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_run(name), "{name} should be dropped");
        }
        for name in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_TERM_COLOR",
            "CARGO_PROFILE_RELEASE_LTO",
            "CARGO_BUILD_JOBS",
            "RUSTFLAGS",
            "PATH",
        ] {
            assert!(!set_by_cargo_run(name), "{name} should be kept");
        }
    }

    #[test]
    fn the_nested_build_builds_the_server_package_alone() {
        let build = build_command(OsStr::new("cargo"), Path::new("/w/Cargo.toml"), true);
        let args: Vec<_> = build.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--locked",
                "-p",
                "autopoiesis",
                "--bin",
                "autopoiesis",
                "--manifest-path",
                "/w/Cargo.toml",
                "--release"
            ]
        );
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("stat");
        std::fs::write(
            &stat,
            "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3",
        )
        .unwrap();
        let seconds = cpu_seconds(stat.to_str().unwrap()).unwrap();
        assert!((seconds - 3.0).abs() < 1e-9, "{seconds}");
    }
}

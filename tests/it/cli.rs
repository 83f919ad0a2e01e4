//! The `autopoiesis` binary itself: settings, errors, the bound address.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn autopoiesis() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_autopoiesis"));
    for var in [
        "AUTOPOIESIS_API_KEY",
        "AUTOPOIESIS_PORT",
        "AUTOPOIESIS_CONFIG",
        "AUTOPOIESIS_AGENT",
    ] {
        command.env_remove(var);
    }
    command
}

/// Runs `serve` with `args`; it must fail. Returns its stderr.
fn serve_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let output = autopoiesis()
        .args(["serve", "--data-dir"])
        .arg(data.path())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} should fail");
    String::from_utf8(output.stderr).unwrap()
}

#[test]
fn a_bad_port_exits_non_zero_naming_the_setting() {
    let err = serve_fails(&["--port", "abc"], &[]);
    assert!(err.contains("--port"), "{err}");
    let err = serve_fails(&[], &[("AUTOPOIESIS_PORT", "99999")]);
    assert!(err.contains("--port"), "{err}");
}

#[test]
fn an_unknown_agent_or_unreadable_config_exits_with_one_clear_line() {
    let err = serve_fails(&["--agent", "nobody"], &[]);
    assert!(err.contains("--agent") && err.contains("nobody"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let err = serve_fails(&["--config", "/nonexistent/agents.toml"], &[]);
    assert!(err.contains("--config"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agents.toml");
    std::fs::write(
        &config,
        "[agents.default]\nmodel = \"echo\"\ntools = [\"teleport\"]\n",
    )
    .unwrap();
    let err = serve_fails(&["--config", config.to_str().unwrap()], &[]);
    assert!(err.contains("teleport"), "{err}");
}

#[test]
fn a_zero_sweep_interval_or_timeout_exits_with_one_line() {
    for flag in ["--sweep-interval", "--header-timeout", "--idle-timeout"] {
        let err = serve_fails(&[flag, "0s"], &[]);
        assert!(err.contains(flag), "{err}");
        assert!(err.contains("greater than 0"), "{err}");
    }
}

/// CPU time (user + system, in clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_the_server_backs_off_instead_of_spinning_and_recovers() {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new("sh");
    command
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_autopoiesis"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data.path())
        .env_remove("AUTOPOIESIS_API_KEY");
    let (mut child, address) = spawn_command(command);
    // More connections than the process has descriptors left.
    let held: Vec<_> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(&address).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(child.id()) - before;
    drop(held);
    // A spinning accept loop burns a whole core (about 200 ticks in 2 s);
    // even one retrying every millisecond takes about 30. Backing off to a
    // second, the server is idle.
    assert!(
        spent < 10,
        "{spent} ticks of CPU in 2 s while out of descriptors"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let answer = plain_http::get(&address, "/api/health");
        if answer.contains("\"status\":\"ok\"") || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(health.contains("\"status\":\"ok\""), "{health}");
}

#[test]
fn an_empty_api_key_is_a_startup_error_not_auth_off() {
    let err = serve_fails(&["--port", "0"], &[("AUTOPOIESIS_API_KEY", "")]);
    assert!(err.contains("AUTOPOIESIS_API_KEY"), "{err}");
}

/// Starts `autopoiesis serve --port 0 ARGS` and reads the bound address from
/// its log; the rest of the log is drained in the background.
fn spawn_server(args: &[&str], data: &std::path::Path) -> (std::process::Child, String) {
    let mut command = autopoiesis();
    command
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data)
        .args(args);
    spawn_command(command)
}

/// Starts `command` (a `serve` on port 0) and reads the bound address from
/// its log.
fn spawn_command(command: Command) -> (std::process::Child, String) {
    crate::helpers::spawn_serve(command)
}

#[test]
fn port_zero_binds_a_free_port_and_logs_it() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, address) = spawn_server(&[], data.path());
    let health = plain_http::get(&address, "/api/health");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(health.contains("\"status\":\"ok\""), "{health}");
}

#[tokio::test]
async fn sigterm_cancels_turns_past_the_grace_period_closes_sockets_1001_and_exits_0() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("agents.toml");
    std::fs::write(&config, "[agents.default]\nmodel = \"echo:delay_ms=50\"\n").unwrap();
    let (mut child, address) = spawn_server(
        &[
            "--config",
            config.to_str().unwrap(),
            "--shutdown-grace",
            "300ms",
        ],
        data.path(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{address}/api/ws/long"))
        .await
        .unwrap();
    let long = "word ".repeat(200);
    let frame = serde_json::json!({"op": "message", "data": {"content": long}});
    futures::SinkExt::send(&mut ws, Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let (mut rest_watch, _) =
        tokio_tungstenite::connect_async(format!("ws://{address}/api/ws/rest"))
            .await
            .unwrap();
    let rest_turn = tokio::spawn({
        let url = format!("http://{address}/api/chat");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&serde_json::json!({"content": "word ".repeat(200), "session_id": "rest"}))
                .send()
                .await
                .unwrap()
        }
    });
    for socket in [&mut ws, &mut rest_watch] {
        let first = socket.next().await.unwrap().unwrap();
        assert!(
            first.to_text().unwrap().contains("\"token\""),
            "both turns are running"
        );
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let mut last_op = String::new();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("socket stayed open")
        {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                last_op = frame["op"].as_str().unwrap().to_owned();
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(last_op, "cancelled", "the turn outlived the grace period");
    assert_eq!(close, Some(CloseCode::Away));
    let res = rest_turn.await.unwrap();
    assert_eq!(res.status(), 409);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["detail"]["code"], "turn_cancelled");

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

mod plain_http {
    /// A one-off GET over a plain socket (these tests are synchronous).
    pub fn get(address: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }
}

#[test]
fn keygen_writes_a_private_key_and_serve_refuses_one_others_can_read() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("approval.key");
    let output = autopoiesis()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = autopoiesis()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_fails(
        &["--port", "0"],
        &[("AUTOPOIESIS_APPROVAL_KEY_FILE", key.to_str().unwrap())],
    );
    assert!(
        err.contains("AUTOPOIESIS_APPROVAL_KEY_FILE") && err.contains("chmod"),
        "{err}"
    );
    std::fs::write(&key, "not a key").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = serve_fails(
        &["--port", "0"],
        &[("AUTOPOIESIS_APPROVAL_KEY_FILE", key.to_str().unwrap())],
    );
    assert!(err.contains("AUTOPOIESIS_APPROVAL_KEY_FILE"), "{err}");
}

#[test]
fn an_unopenable_approval_database_still_starts_and_reports_why() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, address) = spawn_server(&["--database-url", "mysql://nowhere/db"], data.path());
    let health = plain_http::get(&address, "/api/health");
    let status = plain_http::get(&address, "/api/status");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(
        status.contains("error.runtime_uninitialized")
            && status.contains("Approval database unavailable"),
        "{status}"
    );
}

#[test]
fn keygen_creates_the_folder_it_writes_into() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("data").join("approval.key");
    let output = autopoiesis()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(key.is_file());
}

/// The log lines of `serve --port 0 ARGS` up to its listening line, written
/// to a pipe (not a terminal) and with colours not switched off by NO_COLOR.
fn startup_log(args: &[&str], env: &[(&str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut child = autopoiesis()
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data.path())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening on") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

#[test]
fn the_log_has_no_colour_codes_when_stderr_is_not_a_terminal() {
    let log = startup_log(&[], &[]);
    assert!(log.contains("listening on"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}

#[test]
fn the_startup_line_says_whether_approvals_are_locked_and_names_the_key() {
    let log = startup_log(&[], &[]);
    let line = log.lines().find(|l| l.contains("listening on")).unwrap();
    assert!(line.contains("approvals=locked"), "{line}");

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("approval.key");
    let output = autopoiesis()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(output.status.success());
    // "wrote approval key ID to PATH"
    let stdout = String::from_utf8(output.stdout).unwrap();
    let key_id = stdout.split_whitespace().nth(3).unwrap().to_owned();
    let log = startup_log(
        &[],
        &[("AUTOPOIESIS_APPROVAL_KEY_FILE", key.to_str().unwrap())],
    );
    let line = log.lines().find(|l| l.contains("listening on")).unwrap();
    assert!(line.contains("approvals=unlocked"), "{line}");
    assert!(line.contains(&key_id), "{line} lacks {key_id}");
}

#[tokio::test]
async fn sigterm_with_an_open_dashboard_stream_exits_promptly() {
    use futures::StreamExt;

    let data = tempfile::tempdir().unwrap();
    let (mut child, address) = spawn_server(&[], data.path());
    let res = reqwest::get(format!("http://{address}/api/stream"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("stream.connected"));

    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The stream ends instead of holding the shutdown for its grace period.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the dashboard stream stayed open");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

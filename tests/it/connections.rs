//! The listener's hard edges (issue 9): nothing is read or held for a
//! client without the key, every phase of a connection has a clock, the
//! connection count has a cap, and cleartext HTTP/2 is refused. Spoken to
//! over raw TCP, since a well-behaved HTTP client cannot misbehave on cue.

use std::time::{Duration, Instant};

use autopoiesis::adapters::http::HttpSettings;
use autopoiesis::adapters::http::server::ServerSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{Options, TestApp, spawn_with};

fn short_clocks() -> ServerSettings {
    ServerSettings {
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(400),
        write_timeout: Duration::from_millis(300),
        grace: Duration::from_secs(1),
        ..ServerSettings::default()
    }
}

async fn spawn_short(api_key: Option<&'static str>) -> TestApp {
    spawn_with(Options {
        api_key,
        server: short_clocks(),
        http: HttpSettings {
            body_timeout: Duration::from_millis(300),
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.address).await.unwrap()
}

/// Everything the server sends until it closes the connection, or what
/// came within `limit` (then `closed` is false).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads until one whole response head has arrived (or 5 s passed).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&received).contains("\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn an_unfinished_chunked_body_with_a_wrong_key_is_refused_before_it_is_read() {
    let app = spawn_short(Some("right-key")).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(
            format!(
                "POST /api/chat HTTP/1.1\r\nhost: {}\r\nx-api-key: wrong\r\n\
                 content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
                 10\r\n{{\"content\":\"aaaa",
                app.address
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The body never ends, yet the answer comes at once.
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        app.get_json("/api/sessions").await.is_object(),
        "no side effect"
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408() {
    let app = spawn_short(None).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(
            format!(
                "POST /api/chat HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
                 content-length: 100\r\n\r\n{{\"content\":",
                app.address
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("took too long"), "{answer}");
    assert!(
        closed,
        "the connection is not kept for a body it cannot finish"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn unfinished_headers_are_cut_off_by_the_header_clock() {
    let app = spawn_short(None).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"GET /api/health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "still open after 5 s");
    assert!(answer.is_empty(), "{answer}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_by_the_idle_clock() {
    let app = spawn_short(None).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"GET /api/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed,
        "an idle keep-alive connection is still open after 5 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_connection_in_use_is_not_cut_by_the_idle_clock() {
    let app = spawn_short(None).await;
    let mut stream = connect(&app).await;
    // Requests 200 ms apart, for longer than the idle clock.
    for _ in 0..5 {
        stream
            .write_all(b"GET /api/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn cleartext_http2_is_refused() {
    let app = spawn_short(None).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the server neither answered nor closed");
    // An HTTP/2 server answers with a SETTINGS frame (type 4 at byte 3);
    // this one answers in HTTP/1.1 or closes.
    if let Ok(n) = read
        && n > 0
    {
        assert!(buf.starts_with(b"HTTP/1.1 "), "{:?}", &buf[..n]);
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_and_the_cap_frees_up() {
    let app = spawn_with(Options {
        server: ServerSettings {
            max_connections: 2,
            ..short_clocks()
        },
        ..Options::default()
    })
    .await;
    let held = [connect(&app).await, connect(&app).await];
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A real HTTP client reads the refusal as a whole response.
    let refused = reqwest::Client::new()
        .get(app.url("/api/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("too many open connections"),
        "{body}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = app.get("/api/health").await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_by_the_write_clock() {
    let app = spawn_short(None).await;
    // A history of about 6 MB of JSON to be read.
    let big = "word ".repeat(300_000);
    for _ in 0..2 {
        let res = app
            .chat(serde_json::json!({"content": big, "session_id": "big"}))
            .await;
        assert_eq!(res.status(), 200);
    }
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(app.address).await.unwrap();
    stream
        .write_all(b"GET /api/sessions/big/history HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    // Never read while the server writes; then see how much it sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert!(
        answer.len() < 5_000_000,
        "the whole body ({} bytes) was sent to a client that did not read",
        answer.len()
    );
}

//! The session stream over SSE (B2).

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::spawn_app;

/// Reads SSE events (`event`, `id`, `data`) until `n` have arrived.
async fn read_events(res: reqwest::Response, n: usize) -> Vec<(String, Option<String>, Value)> {
    let mut body = res.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("no event within 10 s")
            .expect("stream ended")
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::from("message"), None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            if let Some(data) = data {
                events.push((event, id, data));
            }
        }
    }
    events
}

#[tokio::test]
async fn sse_streams_the_session_log_and_resumes_from_last_event_id() {
    let app = spawn_app().await;
    let res = app
        .chat(json!({"content": "a b c", "session_id": "sse"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK); // seqs 1..=4

    let res = app
        .client
        .get(app.url("/api/sessions/sse/events"))
        .header("Last-Event-ID", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let live = app.chat(json!({"content": "d", "session_id": "sse"}));
    let (events, reply) = tokio::join!(read_events(res, 4), live);
    assert_eq!(reply.status(), StatusCode::OK);
    let summary: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|(e, id, _)| (e.as_str(), id.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("token", Some("3")),
            ("done", Some("4")),
            ("token", Some("5")),
            ("done", Some("6"))
        ]
    );
    assert_eq!(events[1].2["data"]["content"], "a b c");
    assert_eq!(events[1].2["seq"], 4);
}

#[tokio::test]
async fn sse_refuses_a_malformed_last_event_id() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/api/sessions/s/events"))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_kicked_sse_client_that_stopped_reading_is_disconnected_and_uncounted() {
    use autopoiesis::adapters::http::HttpSettings;
    use autopoiesis::adapters::http::server::ServerSettings;
    use autopoiesis::adapters::stream::StreamSettings;
    use autopoiesis::domain::chat::RuntimeSlot;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = crate::helpers::spawn_with(crate::helpers::Options {
        runtime: RuntimeSlot::Ready(crate::helpers::echo(1)),
        stream: StreamSettings {
            ring_capacity: 64,
            ..StreamSettings::default()
        },
        http: HttpSettings {
            max_body_bytes: 16 * 1024 * 1024,
            ..HttpSettings::default()
        },
        server: ServerSettings {
            write_timeout: Duration::from_millis(300),
            grace: Duration::from_secs(1),
            ..ServerSettings::default()
        },
        ..crate::helpers::Options::default()
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(app.address).await.unwrap();
    stalled
        .write_all(b"GET /api/sessions/stall/events HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    app.wait_for_clients("stall", 1).await;
    // Tokens of 1.5 KB, 1 ms apart: paced so the client is kicked for not
    // reading (its socket full), not for a burst; 6 MB in all, more than
    // the socket buffers hold.
    let word = format!("{} ", "w".repeat(1500));
    let res = app
        .chat(json!({"content": word.repeat(4000), "session_id": "stall"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    app.wait_for_clients("stall", 0).await;
    // Kicked as too slow, it must also let go of its connection: the
    // server closes it rather than wait for the client to read again.
    for _ in 0..300 {
        if app.services.hub.clients_total() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.services.hub.clients_total(), 0, "still counted");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), stalled.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the kicked client's connection is still open"
    );
}

#[tokio::test]
async fn sse_adds_each_turns_prompt_without_an_id_when_asked() {
    let app = spawn_app().await;
    let res = app
        .chat(json!({"content": "a b", "session_id": "sse-prompts"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK); // seqs 1..=3
    let res = app
        .get("/api/sessions/sse-prompts/events?after_seq=0&events=prompt")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let events = read_events(res, 4).await;
    assert_eq!(events[0].0, "prompt");
    assert_eq!(events[0].1, None, "a prompt moves no Last-Event-ID");
    assert_eq!(events[0].2["data"]["content"], "a b");
    let ids: Vec<_> = events[1..].iter().map(|e| e.1.clone()).collect();
    assert_eq!(ids, [Some("1".into()), Some("2".into()), Some("3".into())]);

    let refused = app
        .get("/api/sessions/sse-prompts/events?events=tokens")
        .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
}

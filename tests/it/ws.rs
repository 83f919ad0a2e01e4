//! The WebSocket protocol (SPEC A4) and the resumable stream (B1, B3, B4).

use std::time::Duration;

use autopoiesis::adapters::http::HttpSettings;
use autopoiesis::adapters::stream::StreamSettings;
use autopoiesis::adapters::ws::endpoint::WsSettings;
use autopoiesis::domain::chat::RuntimeSlot;
use autopoiesis::domain::session_service::SweepPolicy;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::{
    Options, Ws, assert_silent, echo, next, send, spawn_app, spawn_with, until_terminal,
};

fn ops(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["op"].as_str().unwrap()).collect()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}

async fn message(ws: &mut Ws, content: &str) {
    send(ws, json!({"op": "message", "data": {"content": content}})).await;
}

/// The close code a socket ends with, reading past any frames before it.
async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no close within 10 s")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn connecting_creates_the_session() {
    let app = spawn_app().await;
    let _ws = app.ws("fresh").await;
    let res = app.get("/api/sessions/fresh/history").await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_message_streams_tokens_then_done_with_gapless_seqs_to_every_client() {
    let app = spawn_app().await;
    let mut a = app.ws("s").await;
    let mut b = app.ws("s").await;
    app.wait_for_clients("s", 2).await;
    message(&mut a, "one two three").await;
    let from_a = until_terminal(&mut a).await;
    let from_b = until_terminal(&mut b).await;
    assert_eq!(from_a, from_b, "both devices see the same frames");
    assert_eq!(ops(&from_a), ["token", "token", "token", "done"]);
    assert_eq!(seqs(&from_a), [1, 2, 3, 4]);
    assert_eq!(from_a[0]["data"], json!({"content": "one "}));
    assert_eq!(from_a[3]["data"], json!({"content": "one two three"}));
    let turn = &from_a[0]["turn_id"];
    assert!(turn.is_string());
    assert!(from_a.iter().all(|f| &f["turn_id"] == turn));
}

#[tokio::test]
async fn thinking_is_streamed_before_the_answer() {
    let app = spawn_app().await;
    let mut ws = app.ws("think").await;
    message(&mut ws, "/think hmm ok").await;
    let frames = until_terminal(&mut ws).await;
    assert_eq!(
        ops(&frames),
        [
            "thinking_start",
            "thinking",
            "thinking",
            "thinking_done",
            "token",
            "token",
            "done"
        ]
    );
}

#[tokio::test]
async fn bad_frames_get_an_error_for_the_sender_only_and_the_socket_stays_usable() {
    let app = spawn_app().await;
    let mut sender = app.ws("bad").await;
    let mut other = app.ws("bad").await;
    app.wait_for_clients("bad", 2).await;
    let cases = [
        (Message::Text("not json".into()), "Invalid message format"),
        (
            Message::Text(r#"{"data":{}}"#.into()),
            "Invalid message format",
        ),
        (
            Message::Text(r#"{"op":"dance","data":{}}"#.into()),
            "Unknown op: dance",
        ),
        (
            Message::Text(r#"{"op":"message","data":{"content":""}}"#.into()),
            "Empty message",
        ),
        (
            Message::Text(r#"{"op":"message","data":{}}"#.into()),
            "Empty message",
        ),
        (
            Message::Text(r#"{"op":"message","data":{"content":42}}"#.into()),
            "Invalid message format: content must be a string",
        ),
        (
            Message::Binary(vec![1u8, 2, 3].into()),
            "Binary frames are not supported; send JSON text",
        ),
    ];
    for (frame, expected) in cases {
        sender.send(frame).await.unwrap();
        let reply = next(&mut sender).await;
        assert_eq!(reply, json!({"op": "error", "data": {"message": expected}}));
    }
    assert_silent(&mut other, Duration::from_millis(200)).await;
    message(&mut sender, "still works").await;
    assert_eq!(
        until_terminal(&mut sender).await.last().unwrap()["op"],
        "done"
    );
}

#[tokio::test]
async fn approve_is_broadcast_as_approval_unsupported() {
    let app = spawn_app().await;
    let mut a = app.ws("ap").await;
    let mut b = app.ws("ap").await;
    app.wait_for_clients("ap", 2).await;
    send(&mut a, json!({"op": "approve", "data": {"anything": true}})).await;
    for ws in [&mut a, &mut b] {
        let frame = next(ws).await;
        assert_eq!(frame["op"], "error");
        assert_eq!(
            frame["data"],
            json!({"code": "approval_unsupported", "message": "Deferred approvals are not supported in server mode yet."})
        );
        assert_eq!(frame["seq"], 1);
    }
}

#[tokio::test]
async fn a_deferred_tool_call_streams_the_call_then_approval_unsupported() {
    let app = spawn_app().await;
    let mut ws = app.ws("tool").await;
    message(&mut ws, r#"/tool execute {"command":"ls"}"#).await;
    let frames = until_terminal(&mut ws).await;
    assert_eq!(ops(&frames), ["tool_call", "tool_result", "error"]);
    assert_eq!(frames[0]["data"]["name"], "execute");
    assert_eq!(frames[0]["data"]["details"], json!({"command": "ls"}));
    assert_eq!(frames[1]["data"]["status"], "deferred");
    assert_eq!(
        frames[1]["data"]["tool_call_id"],
        frames[0]["data"]["tool_call_id"]
    );
    assert_eq!(frames[2]["data"]["code"], "approval_unsupported");
}

#[tokio::test]
async fn a_rest_chat_streams_to_the_sessions_websocket_clients() {
    let app = spawn_app().await;
    let mut ws = app.ws("rest").await;
    app.wait_for_clients("rest", 1).await;
    let res = app
        .chat(json!({"content": "over rest", "session_id": "rest"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let frames = until_terminal(&mut ws).await;
    assert_eq!(ops(&frames), ["token", "token", "done"]);
}

#[tokio::test]
async fn closing_the_socket_does_not_cancel_the_turn() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(20)),
        ..Options::default()
    })
    .await;
    let mut ws = app.ws("leave").await;
    message(&mut ws, "a b c d e").await;
    assert_eq!(next(&mut ws).await["op"], "token");
    ws.close(None).await.unwrap();
    drop(ws);
    for _ in 0..200 {
        let history: Value = app.get_json("/api/sessions/leave/history").await;
        if history["messages"].as_array().unwrap().len() == 2 {
            assert_eq!(history["messages"][1]["parts"][0]["content"], "a b c d e");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the turn did not finish after its client left");
}

#[tokio::test]
async fn resuming_mid_turn_yields_exactly_the_missing_events() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(10)),
        ..Options::default()
    })
    .await;
    let mut reference = app.ws("r").await;
    let mut phone = app.ws("r").await;
    app.wait_for_clients("r", 2).await;
    message(&mut reference, &"w ".repeat(60)).await;

    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(next(&mut phone).await);
    }
    let last = seen.last().unwrap()["seq"].as_u64().unwrap();
    drop(phone); // the network drops while the turn streams
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut phone = app.ws_at(&format!("/api/ws/r?after_seq={last}")).await;
    seen.extend(until_terminal(&mut phone).await);

    let all = until_terminal(&mut reference).await;
    assert_eq!(seen, all, "no gap and no duplicate across the reconnect");
}

#[tokio::test]
async fn resuming_from_before_the_ring_gets_a_gap_first() {
    let app = spawn_with(Options {
        stream: StreamSettings {
            ring_capacity: 4,
            ..StreamSettings::default()
        },
        ..Options::default()
    })
    .await;
    let res = app
        .chat(json!({"content": "a b c d e f g h i", "session_id": "g"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK); // seqs 1..=10
    let mut ws = app.ws_at("/api/ws/g?after_seq=2").await;
    let gap = next(&mut ws).await;
    assert_eq!(
        gap,
        json!({"op": "gap", "data": {"missed_from": 3, "missed_to": 6}})
    );
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(next(&mut ws).await);
    }
    assert_eq!(seqs(&replayed), [7, 8, 9, 10]);
    assert_eq!(replayed[3]["op"], "done");
}

#[tokio::test]
async fn cancel_from_another_device_stops_the_turn_for_everyone() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(30)),
        ..Options::default()
    })
    .await;
    let mut laptop = app.ws("x").await;
    let mut phone = app.ws("x").await;
    app.wait_for_clients("x", 2).await;
    message(&mut laptop, &"long ".repeat(100)).await;
    assert_eq!(next(&mut phone).await["op"], "token");
    send(&mut phone, json!({"op": "cancel", "data": {}})).await;
    for ws in [&mut laptop, &mut phone] {
        let frames = until_terminal(ws).await;
        let last = frames.last().unwrap();
        assert_eq!(last["op"], "cancelled");
        assert!(
            last["data"]["partial"]
                .as_str()
                .unwrap()
                .starts_with("long ")
        );
    }
    // Nothing runs any more: cancel now is refused to the sender only.
    send(&mut phone, json!({"op": "cancel"})).await;
    assert_eq!(
        next(&mut phone).await["data"]["message"],
        "No turn is running on this session"
    );
    message(&mut laptop, "next").await;
    assert_eq!(
        until_terminal(&mut laptop).await.last().unwrap()["op"],
        "done"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_while_a_reader_gets_every_event() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(1)),
        stream: StreamSettings {
            // The stalled client is closed once this many events pass it.
            ring_capacity: 256,
            ..StreamSettings::default()
        },
        http: HttpSettings {
            max_body_bytes: 64 * 1024 * 1024,
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    let mut stalled = app.ws("slow").await;
    let mut reader = app.ws("slow").await;
    app.wait_for_clients("slow", 2).await;
    // 2,000 tokens of 4 KiB: far more than socket buffers hold.
    let word = format!("{} ", "x".repeat(4095));
    let prompt = word.repeat(2000);
    let chat = app.chat(json!({"content": prompt, "session_id": "slow"}));
    let read_all = async {
        let frames = until_terminal(&mut reader).await;
        assert_eq!(seqs(&frames), (1..=2001).collect::<Vec<u64>>());
    };
    // Once the hub has dropped the stalled client, it drains its socket and
    // finds the close frame behind the frames it had not read.
    let stalled_closed = async {
        app.wait_for_clients("slow", 1).await;
        close_code(&mut stalled).await
    };
    let (res, (), code) = tokio::join!(chat, read_all, stalled_closed);
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(code, Some(CloseCode::Again));
}

#[tokio::test]
async fn a_hundred_clients_on_one_session_all_receive_every_event() {
    let app = spawn_app().await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(app.ws("crowd").await);
    }
    app.wait_for_clients("crowd", 100).await;
    let res = app
        .chat(json!({"content": "w ".repeat(50), "session_id": "crowd"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let received = futures::future::join_all(clients.iter_mut().map(until_terminal)).await;
    for frames in &received {
        assert_eq!(seqs(frames), (1..=51).collect::<Vec<u64>>());
    }
}

#[tokio::test]
async fn messages_over_the_size_limit_close_the_socket_with_1009() {
    let app = spawn_with(Options {
        http: HttpSettings {
            ws: WsSettings {
                max_message_bytes: 1024,
            },
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    let mut ws = app.ws("big").await;
    message(&mut ws, &"x".repeat(4096)).await;
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));
    let mut ws = app.ws("big").await;
    message(&mut ws, "small is fine").await;
    assert_eq!(until_terminal(&mut ws).await.last().unwrap()["op"], "done");
}

#[tokio::test]
async fn deleting_a_session_closes_its_sockets() {
    let app = spawn_app().await;
    let mut ws = app.ws("del").await;
    app.wait_for_clients("del", 1).await;
    let res = app.delete("/api/sessions/del").await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Normal));
}

#[tokio::test]
async fn malformed_session_ids_are_refused_before_the_upgrade() {
    let app = spawn_app().await;
    let err = tokio_tungstenite::connect_async(app.ws_url("/api/ws/bad%20id"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(res) => assert_eq!(res.status(), 400),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_sweeper_removes_idle_sessions_past_retention_and_spares_those_with_a_live_client() {
    let app = spawn_with(Options {
        sweep: Some(SweepPolicy {
            idle_ttl: Duration::from_millis(300),
            interval: Duration::from_millis(100),
            retention: Some(Duration::from_millis(300)),
        }),
        ..Options::default()
    })
    .await;
    app.chat(json!({"content": "hi", "session_id": "idle"}))
        .await;
    let _watched = app.ws("watched").await;
    app.wait_for_clients("watched", 1).await;
    let status = |id: &'static str| {
        let url = app.url(&format!("/api/sessions/{id}/history"));
        let client = app.client.clone();
        async move { client.get(url).send().await.unwrap().status() }
    };
    for _ in 0..100 {
        if status("idle").await == StatusCode::NOT_FOUND {
            assert_eq!(status("watched").await, StatusCode::OK);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the idle session was never swept");
}

#[tokio::test]
async fn the_sweeper_only_evicts_idle_stored_sessions_from_memory_before_their_retention() {
    let app = spawn_with(Options {
        sweep: Some(SweepPolicy {
            idle_ttl: Duration::from_millis(200),
            interval: Duration::from_millis(50),
            retention: Some(Duration::from_secs(3600)),
        }),
        ..Options::default()
    })
    .await;
    let res = app
        .chat(json!({"content": "keep me", "session_id": "kept"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let id = autopoiesis::domain::session::SessionId::parse("kept").unwrap();
    let events = app.services.hub.clone() as std::sync::Arc<dyn autopoiesis::ports::SessionEvents>;
    for _ in 0..100 {
        if events.last_seq(&id).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.last_seq(&id), None, "the stream was never evicted");
    let history: Value = app.get_json("/api/sessions/kept/history").await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 2);
    // Loaded again on use, its numbering goes on where it stopped.
    let mut ws = app.ws_at("/api/ws/kept?after_seq=0").await;
    let replayed = until_terminal(&mut ws).await;
    assert_eq!(replayed.last().unwrap()["op"], "done");
    message(&mut ws, "again").await;
    let next_turn = until_terminal(&mut ws).await;
    let last_before = replayed.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(next_turn[0]["seq"].as_u64().unwrap(), last_before + 1);
}

/// Opens a WebSocket over raw TCP, sends one raw (masked) frame and
/// returns the close code the server answers with, if any.
async fn close_code_after_raw_frame(app: &crate::helpers::TestApp, frame: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream
        .write_all(
            b"GET /api/ws/raw HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n\
              connection: Upgrade\r\nsec-websocket-version: 13\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        received.extend_from_slice(&buf[..n]);
    }
    assert!(received.starts_with(b"HTTP/1.1 101"));
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut frames = received.split_off(head_end);
    stream.write_all(frame).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Unmasked server frames: opcode 8 is close, its payload starts
        // with the code.
        if let Some(at) = frames.iter().position(|b| *b == 0x88)
            && frames.len() >= at + 4
        {
            return Some(u16::from_be_bytes([frames[at + 2], frames[at + 3]]));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => frames.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

#[tokio::test]
async fn protocol_errors_get_a_close_frame_with_their_code() {
    let app = spawn_app().await;
    // A text frame whose payload is not UTF-8: 1007.
    let not_utf8 = [0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe];
    assert_eq!(
        close_code_after_raw_frame(&app, &not_utf8).await,
        Some(1007)
    );
    // A reserved bit set with no extension agreed: 1002.
    let reserved_bit = [0xC1, 0x82, 0, 0, 0, 0, b'h', b'i'];
    assert_eq!(
        close_code_after_raw_frame(&app, &reserved_bit).await,
        Some(1002)
    );
}

#[tokio::test]
async fn without_a_runtime_every_client_of_the_session_sees_the_turns_error() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Unavailable("Agent runtime unavailable: no provider".into()),
        ..Options::default()
    })
    .await;
    let mut sender = app.ws("nort").await;
    let mut watcher = app.ws("nort").await;
    app.wait_for_clients("nort", 2).await;
    message(&mut sender, "hello").await;
    for ws in [&mut sender, &mut watcher] {
        let frame = next(ws).await;
        assert_eq!(frame["op"], "error", "{frame}");
        assert!(
            frame["data"]["message"]
                .as_str()
                .unwrap()
                .contains("no provider"),
            "{frame}"
        );
        assert!(frame["seq"].is_u64(), "a broadcast event: {frame}");
    }
    assert_silent(&mut sender, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_tool_command_naming_an_unknown_tool_is_the_users_error_for_every_client() {
    let app = spawn_app().await;
    let mut ws = app.ws("badtool").await;
    message(&mut ws, "/tool format_disk {}").await;
    let frames = until_terminal(&mut ws).await;
    let error = frames.last().unwrap();
    assert_eq!(error["op"], "error");
    assert_eq!(error["data"]["code"], "invalid_request", "{error}");
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap()
            .contains("format_disk"),
        "{error}"
    );
}

#[tokio::test]
async fn a_recorded_deferred_turn_names_its_approval_in_the_error_frame() {
    let app = spawn_with(Options {
        approval_key: true,
        ..Options::default()
    })
    .await;
    let mut ws = app.ws("recorded").await;
    message(&mut ws, r#"/tool execute {"command":"ls"}"#).await;
    let frames = until_terminal(&mut ws).await;
    let error = frames.last().unwrap();
    assert_eq!(error["data"]["code"], "approval_unsupported");
    let id = error["data"]["approval_id"]
        .as_str()
        .expect("an approval id");
    let pending = app.get_json("/api/approvals").await.to_string();
    assert!(pending.contains(id), "{pending}");
    assert_ne!(
        error["data"]["message"],
        "Deferred approvals are not supported in server mode yet."
    );
}

/// A log event's message, and the fields of the spans it happened in.
type LoggedEvent = (String, Vec<(String, String)>);

/// Log events as they were emitted.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<LoggedEvent>>>);

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl<S> tracing_subscriber::Layer<S> for Captured
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = fields
            .0
            .iter()
            .find(|(name, _)| name == "message")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        let in_spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .flat_map(|span| {
                        span.extensions()
                            .get::<Fields>()
                            .map(|f| f.0.clone())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.0.lock().unwrap().push((message, in_spans));
    }
}

#[tokio::test]
async fn every_log_line_of_a_connection_carries_its_session_id() {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    // This test's runtime runs on this thread alone, the server included.
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(captured.clone()));
    let app = spawn_app().await;
    let mut ws = app.ws("traced").await;
    app.wait_for_clients("traced", 1).await;
    ws.close(None).await.unwrap();
    let disconnected = async {
        loop {
            let found = captured
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|(message, _)| message == "client disconnected")
                .cloned();
            match found {
                Some(event) => return event,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    let (_, in_spans) = tokio::time::timeout(Duration::from_secs(10), disconnected)
        .await
        .expect("no 'client disconnected' within 10 s");
    assert!(
        in_spans.contains(&("session.id".to_owned(), "traced".to_owned())),
        "the line is outside the connection's span: {in_spans:?}"
    );
}

#[tokio::test]
async fn a_client_asking_for_prompts_sees_each_turns_prompt_first_and_others_see_exactly_a4() {
    let app = spawn_app().await;
    let mut asking = app.ws_at("/api/ws/prompts?events=prompt").await;
    let mut plain = app.ws("prompts").await;
    app.wait_for_clients("prompts", 2).await;
    // A turn from another device, over REST.
    let res = app
        .chat(json!({"content": "from the phone", "session_id": "prompts"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);

    let seen = until_terminal(&mut asking).await;
    assert_eq!(seen[0]["op"], "prompt");
    assert_eq!(seen[0]["data"], json!({"content": "from the phone"}));
    assert!(seen[0].get("seq").is_none(), "a prompt is not numbered");
    assert_eq!(seen[0]["turn_id"], seen[1]["turn_id"]);
    let plain_seen = until_terminal(&mut plain).await;
    assert!(!ops(&plain_seen).contains(&"prompt"));
    assert_eq!(seqs(&plain_seen), seqs(&seen[1..]), "the same gapless seqs");
    assert_eq!(seqs(&plain_seen), (1..=4).collect::<Vec<_>>());

    // A client resuming from before the turn gets its prompt again.
    let mut resumed = app.ws_at("/api/ws/prompts?after_seq=0&events=prompt").await;
    let replay = until_terminal(&mut resumed).await;
    assert_eq!(replay, seen);
}

#[tokio::test]
async fn an_unknown_kind_of_event_is_refused_before_the_upgrade() {
    let app = spawn_app().await;
    let err = tokio_tungstenite::connect_async(app.ws_url("/api/ws/s?events=prompt,everything"))
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(res) = err else {
        panic!("expected an HTTP refusal");
    };
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // tungstenite reads only what came with the head: the text, not JSON.
    let body = String::from_utf8(res.body().clone().unwrap_or_default()).unwrap();
    assert!(body.contains("'everything'"), "{body}");
}

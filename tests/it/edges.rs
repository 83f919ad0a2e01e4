//! Hostile input and limits (SPEC B6): random WebSocket frames, too many
//! clients.

use autopoiesis::adapters::stream::StreamSettings;
use futures::SinkExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Options, next, send, spawn_app, spawn_with, until_terminal};

/// A frame that is not a valid request to start a turn: garbage bytes,
/// broken or mistyped JSON, unknown ops, wrong shapes.
fn hostile_frame(rng: &mut StdRng) -> Message {
    let garbage = |rng: &mut StdRng, len: usize| -> String {
        (0..len)
            .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
            .collect()
    };
    match rng.random_range(0..8) {
        0 => Message::Binary(
            (0..rng.random_range(0..256))
                .map(|_| rng.random())
                .collect::<Vec<u8>>()
                .into(),
        ),
        1 => {
            let len = rng.random_range(0..200);
            Message::Text(garbage(rng, len).into())
        }
        2 => {
            let valid = json!({"op": "message", "data": {"content": "hello"}}).to_string();
            Message::Text(valid[..rng.random_range(0..valid.len())].to_owned().into())
        }
        3 => Message::Text(
            json!({"op": garbage(rng, 12), "data": {}})
                .to_string()
                .into(),
        ),
        4 => {
            let content = match rng.random_range(0..5) {
                0 => json!(rng.random::<i64>()),
                1 => json!(null),
                2 => json!([1, 2]),
                3 => json!({"nested": true}),
                _ => json!(""),
            };
            Message::Text(
                json!({"op": "message", "data": {"content": content}})
                    .to_string()
                    .into(),
            )
        }
        5 => Message::Text(
            json!({"op": rng.random::<u32>(), "data": []})
                .to_string()
                .into(),
        ),
        6 => Message::Text("[".repeat(rng.random_range(1..2000)).into()),
        _ => Message::Text(
            json!({"op": "message", "data": garbage(rng, 20)})
                .to_string()
                .into(),
        ),
    }
}

#[tokio::test]
async fn a_thousand_hostile_frames_are_each_answered_and_other_clients_are_served() {
    let app = spawn_app().await;
    let mut attacker = app.ws("fuzz").await;
    let mut bystander = app.ws("calm").await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for n in 0..1000 {
        let frame = hostile_frame(&mut rng);
        let shown = format!("{frame:?}");
        attacker.send(frame).await.unwrap();
        let reply = next(&mut attacker).await;
        assert_eq!(reply["op"], "error", "frame {n}: {shown}");
        assert!(reply["data"]["message"].is_string(), "frame {n}: {shown}");
    }
    send(
        &mut bystander,
        json!({"op": "message", "data": {"content": "still served"}}),
    )
    .await;
    assert_eq!(
        until_terminal(&mut bystander).await.last().unwrap()["op"],
        "done"
    );
    send(
        &mut attacker,
        json!({"op": "message", "data": {"content": "and you too"}}),
    )
    .await;
    assert_eq!(
        until_terminal(&mut attacker).await.last().unwrap()["op"],
        "done"
    );
}

#[tokio::test]
async fn clients_past_the_limits_get_a_clear_429() {
    let app = spawn_with(Options {
        stream: StreamSettings {
            max_clients_per_session: 2,
            max_clients: 3,
            ..StreamSettings::default()
        },
        ..Options::default()
    })
    .await;
    let _a = app.ws("full").await;
    let _b = app.ws("full").await;
    let err = tokio_tungstenite::connect_async(app.ws_url("/api/ws/full"))
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(res) = err else {
        panic!("expected a refusal")
    };
    assert_eq!(res.status(), 429);
    let body = String::from_utf8(res.body().clone().unwrap_or_default()).unwrap();
    assert!(body.contains("too many live connections"), "{body}");

    let _c = app.ws("other").await;
    let res = app.get("/api/sessions/third/events").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(_a);
    app.wait_for_clients("full", 1).await;
    let _again = app.ws("full").await;
}

#[tokio::test]
async fn sessions_past_the_cap_are_refused_with_429_on_every_door() {
    let app = spawn_with(Options {
        max_sessions: 2,
        ..Options::default()
    })
    .await;
    assert_eq!(app.post_empty("/api/sessions").await.status(), 201);
    let res = app
        .chat(json!({"content": "hi", "session_id": "second"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app.post_empty("/api/sessions").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let res = app
        .chat(json!({"content": "hi", "session_id": "third"}))
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("sessions"),
        "{body}"
    );
    assert_eq!(app.get("/api/sessions/third/events").await.status(), 429);
    let err = tokio_tungstenite::connect_async(app.ws_url("/api/ws/third"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, tokio_tungstenite::tungstenite::Error::Http(res) if res.status() == 429),
        "{err}"
    );
    // An existing session still takes turns; a deleted one frees a place.
    let res = app
        .chat(json!({"content": "again", "session_id": "second"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.delete("/api/sessions/second").await.status(), 204);
    let res = app
        .chat(json!({"content": "hi", "session_id": "third"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        app.get_json("/api/sessions")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn a_full_history_refuses_the_next_turn_with_413_and_keeps_what_it_has() {
    let app = spawn_with(Options {
        max_history_bytes: 10_000,
        ..Options::default()
    })
    .await;
    let big = "word ".repeat(1500);
    let res = app
        .chat(json!({"content": big, "session_id": "full"}))
        .await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the turn that crosses the cap is kept"
    );
    let res = app
        .chat(json!({"content": "one more", "session_id": "full"}))
        .await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("new session"),
        "{body}"
    );
    let history = app.get_json("/api/sessions/full/history").await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 2);
    let mut ws = app.ws("full").await;
    send(
        &mut ws,
        json!({"op": "message", "data": {"content": "over ws"}}),
    )
    .await;
    let frame = next(&mut ws).await;
    assert_eq!(frame["op"], "error");
    assert!(
        frame.get("seq").is_none(),
        "told to the sender only: {frame}"
    );
}

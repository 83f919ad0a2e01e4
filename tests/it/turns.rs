//! How turns run: in parallel across sessions, in arrival order within one,
//! and how they stop (cancel, timeout).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use autopoiesis::domain::agent::{AgentError, AgentEvent, AgentReply};
use autopoiesis::domain::chat::RuntimeSlot;
use autopoiesis::domain::message::ResponsePart;
use autopoiesis::ports::{AgentRuntime, EventSink, TurnInput};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::helpers::{Options, echo, next, spawn_with, until_terminal};

/// A runtime that records when turns start and end. A prompt `meet` waits
/// until two such turns run at once: it can only succeed if turns really
/// run in parallel. It fails after 30 s, which detects turns run one after
/// the other and measures nothing: a loaded machine may start one late.
struct Probe {
    log: Mutex<Vec<String>>,
    meeting: Barrier,
    turn_length: Duration,
}

impl Probe {
    fn new(turn_length: Duration) -> Arc<Self> {
        Arc::new(Self {
            log: Mutex::default(),
            meeting: Barrier::new(2),
            turn_length,
        })
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait]
impl AgentRuntime for Probe {
    async fn run_turn(
        &self,
        input: TurnInput,
        sink: Arc<dyn EventSink>,
    ) -> Result<AgentReply, AgentError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("start {}", input.prompt));
        if input.prompt == "meet" {
            tokio::time::timeout(Duration::from_secs(30), self.meeting.wait())
                .await
                .map_err(|_| AgentError::Provider("the other turn never ran alongside".into()))?;
        }
        tokio::time::sleep(self.turn_length).await;
        sink.emit(AgentEvent::Token(input.prompt.clone()));
        self.log
            .lock()
            .unwrap()
            .push(format!("end {}", input.prompt));
        Ok(AgentReply {
            model_name: "probe".into(),
            parts: vec![ResponsePart::Text {
                content: input.prompt,
            }],
        })
    }
    fn model_name(&self) -> String {
        "probe".into()
    }
}

#[tokio::test]
async fn turns_on_two_sessions_run_in_parallel() {
    let probe = Probe::new(Duration::ZERO);
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(probe.clone()),
        ..Options::default()
    })
    .await;
    let (a, b) = tokio::join!(
        app.chat(json!({"content": "meet", "session_id": "one"})),
        app.chat(json!({"content": "meet", "session_id": "two"})),
    );
    for res in [a, b] {
        let status = res.status();
        assert_eq!(status, StatusCode::OK, "{}", res.text().await.unwrap());
    }
}

#[tokio::test]
async fn turns_on_one_session_run_one_at_a_time_in_arrival_order() {
    let probe = Probe::new(Duration::from_millis(150));
    let app = Arc::new(
        spawn_with(Options {
            runtime: RuntimeSlot::Ready(probe.clone()),
            ..Options::default()
        })
        .await,
    );
    let mut requests = Vec::new();
    for prompt in ["first", "second", "third"] {
        let app = app.clone();
        requests.push(tokio::spawn(async move {
            app.chat(json!({"content": prompt, "session_id": "same"}))
                .await
                .status()
        }));
        // Fixes the arrival order; the turns themselves take far longer.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        probe.log(),
        [
            "start first",
            "end first",
            "start second",
            "end second",
            "start third",
            "end third"
        ]
    );
}

#[tokio::test]
async fn a_turn_cancelled_over_rest_stops_keeps_its_partial_text_and_the_next_turn_runs() {
    let app = Arc::new(
        spawn_with(Options {
            runtime: RuntimeSlot::Ready(echo(40)),
            ..Options::default()
        })
        .await,
    );
    let mut watcher = app.ws("c").await;
    let long = "word ".repeat(200);
    let chat = {
        let app = app.clone();
        tokio::spawn(async move { app.chat(json!({"content": long, "session_id": "c"})).await })
    };
    let first = next(&mut watcher).await;
    assert_eq!(first["op"], "token");
    let res = app.post_empty("/api/sessions/c/cancel").await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let turn_id = res.json::<Value>().await.unwrap()["turn_id"].clone();

    let frames = until_terminal(&mut watcher).await;
    let cancelled = frames.last().unwrap();
    assert_eq!(cancelled["op"], "cancelled");
    assert_eq!(cancelled["data"]["turn_id"], turn_id);
    let partial = cancelled["data"]["partial"].as_str().unwrap().to_owned();
    assert!(
        partial.starts_with("word ") && partial.len() < 1000,
        "{partial:?}"
    );

    let res = chat.await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        res.json::<Value>().await.unwrap()["detail"]["code"],
        "turn_cancelled"
    );
    let history: Value = app.get_json("/api/sessions/c/history").await;
    assert_eq!(
        history["messages"][1]["parts"][0]["content"],
        partial.as_str()
    );

    let res = app
        .chat(json!({"content": "again", "session_id": "c"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn cancel_answers_409_when_nothing_runs_and_404_for_unknown_sessions() {
    let app = spawn_with(Options::default()).await;
    app.chat(json!({"content": "hi", "session_id": "idle"}))
        .await;
    let res = app.post_empty("/api/sessions/idle/cancel").await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let res = app.post_empty("/api/sessions/ghost/cancel").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_turn_past_the_timeout_ends_with_an_error_and_the_session_stays_usable() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(50)),
        turn_timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let mut watcher = app.ws("t").await;
    let res = app
        .chat(json!({"content": "a b c d e f g h i j k l", "session_id": "t"}))
        .await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    let frames = until_terminal(&mut watcher).await;
    assert_eq!(frames.last().unwrap()["data"]["code"], "turn_timeout");
    let res = app
        .chat(json!({"content": "short", "session_id": "t"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// Session ids of `GET /api/sessions`.
async fn session_ids(app: &crate::helpers::TestApp) -> Vec<String> {
    app.get_json("/api/sessions")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_rest_turn_whose_client_hangs_up_still_ends_for_its_watchers_and_frees_the_session() {
    let app = Arc::new(
        spawn_with(Options {
            runtime: RuntimeSlot::Ready(echo(40)),
            ..Options::default()
        })
        .await,
    );
    let mut watcher = app.ws("hangup").await;
    // The same services behind poem's in-process client, whose request
    // future is the handler's: dropping it is what a reset HTTP/2 stream
    // (or a disconnect hyper notices) does to a handler.
    let direct = poem::test::TestClient::new(autopoiesis::adapters::http::app(
        &app.services,
        &autopoiesis::adapters::http::HttpSettings::default(),
    ));
    let request = direct
        .post("/api/chat")
        .body_json(&json!({"content": "one two three four five six", "session_id": "hangup"}))
        .send();
    let dropped = tokio::time::timeout(Duration::from_millis(60), request).await;
    assert!(dropped.is_err(), "the request is dropped mid-turn");
    let frames = until_terminal(&mut watcher).await;
    let done = frames.last().unwrap();
    assert_eq!(done["op"], "done", "{frames:?}");
    assert_eq!(done["data"]["content"], "one two three four five six");
    let history = app.get_json("/api/sessions/hangup/history").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "prompt and answer are kept: {history}");
    assert_eq!(messages[0]["kind"], "request");
    assert_eq!(messages[1]["kind"], "response");
    let next_turn = tokio::time::timeout(
        Duration::from_secs(5),
        app.chat(json!({"content": "again", "session_id": "hangup"})),
    )
    .await
    .expect("the session takes a new turn");
    assert_eq!(next_turn.status(), StatusCode::OK);
}

#[tokio::test]
async fn deleting_a_session_mid_turn_ends_the_turn_and_nothing_brings_the_session_back() {
    let app = Arc::new(
        spawn_with(Options {
            runtime: RuntimeSlot::Ready(echo(40)),
            ..Options::default()
        })
        .await,
    );
    let mut watcher = app.ws("doomed").await;
    let turn = {
        let app = app.clone();
        tokio::spawn(async move {
            app.chat(json!({"content": "word ".repeat(20), "session_id": "doomed"}))
                .await
        })
    };
    assert_eq!(next(&mut watcher).await["op"], "token");
    assert_eq!(
        app.delete("/api/sessions/doomed").await.status(),
        StatusCode::NO_CONTENT
    );
    let res = tokio::time::timeout(Duration::from_secs(5), turn)
        .await
        .expect("the turn ends with the delete")
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        res.json::<Value>().await.unwrap()["detail"]["code"],
        "session_deleted"
    );
    // Long enough for the 20 words to have streamed had the turn gone on.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!session_ids(&app).await.contains(&"doomed".to_owned()));
    assert_eq!(
        app.get("/api/sessions/doomed/history").await.status(),
        StatusCode::NOT_FOUND
    );
    // Connecting again makes a new, empty session: nothing of the deleted
    // conversation is replayed.
    let mut again = app.ws_at("/api/ws/doomed?after_seq=0").await;
    crate::helpers::assert_silent(&mut again, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn queued_websocket_turns_do_not_recreate_a_deleted_session() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Ready(echo(40)),
        ..Options::default()
    })
    .await;
    let mut ws = app.ws("queued").await;
    for n in 0..3 {
        crate::helpers::send(
            &mut ws,
            json!({"op": "message", "data": {"content": format!("turn {n} a b c d e")}}),
        )
        .await;
    }
    assert_eq!(next(&mut ws).await["op"], "token");
    assert_eq!(
        app.delete("/api/sessions/queued").await.status(),
        StatusCode::NO_CONTENT
    );
    drop(ws);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !session_ids(&app).await.contains(&"queued".to_owned()),
        "the queued turns were dropped with the session"
    );
    assert!(app.services.chat.busy_sessions().is_empty());
}

#[tokio::test]
async fn a_session_refuses_turns_beyond_its_queue_cap_with_429_and_takes_them_again_later() {
    let app = Arc::new(
        spawn_with(Options {
            runtime: RuntimeSlot::Ready(echo(40)),
            ..Options::default()
        })
        .await,
    );
    // The default cap: one running turn and eight queued ones.
    let mut admitted = Vec::new();
    for _ in 0..9 {
        let app = app.clone();
        admitted.push(tokio::spawn(async move {
            app.chat(json!({"content": "a b c d e f g h i j", "session_id": "capped"}))
                .await
                .status()
        }));
    }
    // All nine admitted (the first turn alone takes nine 40 ms pauses).
    let id = autopoiesis::domain::session::SessionId::parse("capped").unwrap();
    for _ in 0..400 {
        if app.services.chat.queued_turns(&id) == 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.services.chat.queued_turns(&id), 9);
    let res = tokio::time::timeout(
        Duration::from_secs(2),
        app.chat(json!({"content": "one too many", "session_id": "capped"})),
    )
    .await
    .expect("refused at once, not queued");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let detail = res.json::<Value>().await.unwrap()["detail"].clone();
    assert!(detail.as_str().unwrap().contains("queued"), "{detail}");

    let mut ws = app.ws("capped").await;
    crate::helpers::send(
        &mut ws,
        json!({"op": "message", "data": {"content": "ws too"}}),
    )
    .await;
    // The running turn's tokens stream to this client too; the refusal is
    // the frame for it alone (no seq).
    let error = loop {
        let frame = next(&mut ws).await;
        if frame.get("seq").is_none() {
            break frame;
        }
    };
    assert_eq!(error["op"], "error");
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap()
            .contains("queued"),
        "{error}"
    );

    let res = app
        .client
        .post(app.url("/api/actions"))
        .json(&json!({"action": "send_message", "payload": {"content": "mcp too", "session_id": "capped"}}))
        .send()
        .await
        .unwrap();
    let envelope: Value = res.json().await.unwrap();
    assert!(
        envelope["type"].as_str().unwrap().starts_with("error."),
        "{envelope}"
    );
    assert!(
        envelope["error"].to_string().contains("queued")
            || envelope["data"].to_string().contains("queued")
            || envelope.to_string().contains("queued"),
        "{envelope}"
    );

    for turn in admitted {
        assert_eq!(turn.await.unwrap(), StatusCode::OK);
    }
    let res = app
        .chat(json!({"content": "room again", "session_id": "capped"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_huge_echo_prompt_can_be_cancelled_and_ends_cancelled() {
    let app = Arc::new(spawn_with(Options::default()).await);
    let huge = "w ".repeat(400_000);
    let chat = {
        let app = app.clone();
        tokio::spawn(async move {
            app.chat(json!({"content": huge, "session_id": "huge"}))
                .await
        })
    };
    let mut cancelled = false;
    while !chat.is_finished() {
        if app.post_empty("/api/sessions/huge/cancel").await.status() == StatusCode::ACCEPTED {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let res = chat.await.unwrap();
    assert!(cancelled, "the turn never ran alongside a cancel request");
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        res.json::<Value>().await.unwrap()["detail"]["code"],
        "turn_cancelled"
    );
}

#[tokio::test]
async fn a_huge_echo_prompt_past_the_turn_timeout_times_out() {
    let app = spawn_with(Options {
        turn_timeout: Some(Duration::from_millis(50)),
        ..Options::default()
    })
    .await;
    let res = app
        .chat(json!({"content": "w ".repeat(400_000), "session_id": "slow"}))
        .await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn cancelled_and_timed_out_partial_answers_carry_the_agents_model_name() {
    let app = Arc::new(
        spawn_with(Options {
            runtime: RuntimeSlot::Ready(echo(40)),
            turn_timeout: Some(Duration::from_millis(300)),
            ..Options::default()
        })
        .await,
    );
    let mut watcher = app.ws("named").await;
    let chat = {
        let app = app.clone();
        tokio::spawn(async move {
            app.chat(json!({"content": "word ".repeat(50), "session_id": "named"}))
                .await
        })
    };
    assert_eq!(next(&mut watcher).await["op"], "token");
    assert_eq!(
        app.post_empty("/api/sessions/named/cancel").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(chat.await.unwrap().status(), StatusCode::CONFLICT);
    let res = app
        .chat(json!({"content": "word ".repeat(50), "session_id": "named"}))
        .await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    let history = app.get_json("/api/sessions/named/history").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{history}");
    for response in [&messages[1], &messages[3]] {
        assert_eq!(response["kind"], "response");
        assert_eq!(response["model_name"], "echo", "{response}");
    }
}

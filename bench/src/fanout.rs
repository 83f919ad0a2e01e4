//! WebSocket clients: many readers on one session for the fan-out figure,
//! and many idle sockets for the memory figure.
//!
//! Fan-out method. A frame carries no server timestamp, so the server's send
//! of token N is taken as the moment the FIRST client received it: a frame
//! is published once into the session's retained window and every client's
//! cursor is woken to read it, so the earliest arrival is at most one wake-up
//! and one loopback hop after the send. The figure is,
//! per token, last arrival minus first arrival: how long the slowest of K
//! clients waits behind the fastest. Arrivals are stamped by the bench as
//! each frame is read, so the spread also holds the bench's own time to read
//! K frames (it shares the 2 cores with the server): an upper bound on the
//! server's part.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::load::histogram;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Sockets opened at once: enough to connect thousands in a second or two,
/// well under the server's accept backlog.
const CONNECT_CONCURRENCY: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens `count` WebSockets; socket `i` joins session `session_of(i)`.
pub async fn connect_many(
    address: SocketAddr,
    count: usize,
    session_of: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<Socket>> {
    let urls: Vec<String> = (0..count)
        .map(|i| format!("ws://{address}/api/ws/{}", session_of(i)))
        .collect();
    let sockets: Vec<anyhow::Result<Socket>> = futures::stream::iter(urls)
        .map(|url| async move {
            // The bench's own read buffers stay small: it holds thousands of
            // sockets and reads small frames.
            let config = WebSocketConfig::default()
                .read_buffer_size(16 * 1024)
                .write_buffer_size(0);
            let (socket, _) = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
            )
            .await
            .with_context(|| format!("{url}: no upgrade within {CONNECT_TIMEOUT:?}"))?
            .with_context(|| format!("{url}: upgrade failed"))?;
            Ok(socket)
        })
        .buffered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    sockets.into_iter().collect()
}

#[derive(Deserialize)]
struct FrameHead<'a> {
    op: &'a str,
    seq: Option<u64>,
}

/// What one client saw: the arrival of each token by seq, and whether it
/// saw every turn end.
struct Arrivals {
    tokens: Vec<(u64, Instant)>,
    turns_ended: usize,
}

/// Reads frames until `turns` terminal events went by, or `deadline`.
async fn read_turns(mut socket: Socket, turns: usize, deadline: tokio::time::Instant) -> Arrivals {
    let mut seen = Arrivals {
        tokens: Vec::new(),
        turns_ended: 0,
    };
    // Bounded by the deadline; a frame-count bound besides it.
    for _ in 0..10_000_000u64 {
        if seen.turns_ended == turns {
            break;
        }
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await else {
            break;
        };
        let arrived = Instant::now();
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(head) = serde_json::from_str::<FrameHead>(text.as_str()) else {
            continue;
        };
        match (head.op, head.seq) {
            ("token", Some(seq)) => seen.tokens.push((seq, arrived)),
            ("done" | "error" | "cancelled", _) => seen.turns_ended += 1,
            _ => {}
        }
    }
    seen
}

/// What the fan-out run measured.
pub struct Spread {
    /// Per token: last arrival minus first arrival, in microseconds.
    pub first_to_last: Histogram<u64>,
    pub tokens: usize,
    /// Clients that missed a token or a turn's end (kicked as too slow, or
    /// disconnected).
    pub incomplete_clients: usize,
}

/// Streams `turns` turns of `prompt` on `session` while `sockets` read.
pub async fn measure(
    address: SocketAddr,
    session: &str,
    sockets: Vec<Socket>,
    prompt: &str,
    turns: usize,
    within: Duration,
) -> anyhow::Result<Spread> {
    let clients = sockets.len();
    let deadline = tokio::time::Instant::now() + within;
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(read_turns(socket, turns, deadline)))
        .collect();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(within)
        .build()?;
    for turn in 0..turns {
        let response = http
            .post(format!("http://{address}/api/chat"))
            .json(&serde_json::json!({"content": prompt, "session_id": session}))
            .send()
            .await
            .with_context(|| format!("turn {turn}: POST /api/chat"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "turn {turn}: POST /api/chat answered {}",
            response.status()
        );
    }
    // token seq -> (first arrival, last arrival)
    let mut by_token: HashMap<u64, (Instant, Instant)> = HashMap::new();
    // per client: (tokens seen, every turn's end seen)
    let mut per_client = Vec::with_capacity(clients);
    for reader in readers {
        let seen = reader.await?;
        per_client.push((seen.tokens.len(), seen.turns_ended == turns));
        for (seq, arrived) in seen.tokens {
            let entry = by_token.entry(seq).or_insert((arrived, arrived));
            entry.0 = entry.0.min(arrived);
            entry.1 = entry.1.max(arrived);
        }
    }
    let expected = by_token.len();
    let incomplete_clients = per_client
        .iter()
        .filter(|&&(tokens, ended)| tokens < expected || !ended)
        .count();
    let mut first_to_last = histogram();
    for (first, last) in by_token.values() {
        let micros = u64::try_from((*last - *first).as_micros()).unwrap_or(u64::MAX);
        first_to_last.saturating_record(micros.max(1));
    }
    Ok(Spread {
        first_to_last,
        tokens: expected,
        incomplete_clients,
    })
}

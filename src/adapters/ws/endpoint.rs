//! `GET /api/ws/{session_id}`: the session's stream over WebSocket, and chat
//! turns started from it. The protocol is documented in docs/websocket.md.
//!
//! Each connection has a reader (the client's ops) and a writer (the
//! session's frames plus replies meant for this client only). A `message`
//! is submitted to the session's turn queue, which runs turns in the order
//! they were sent; the turns are the session's, not the socket's: closing
//! the socket never cancels a turn, running or queued (stopping is
//! `cancel`; deleting the session drops its queued turns).

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use poem::http::StatusCode;
use poem::web::websocket::{CloseCode, Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::web::{Data, Json, Path, Query};
use poem::{IntoResponse, Response, handler};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::protocol::{Incoming, IncomingError, direct_error, parse_incoming};
use crate::adapters::metrics::LiveConnection;
use crate::adapters::stream::frames::asks_for_prompts;
use crate::adapters::stream::{CloseReason, SessionHub, SubscribeError, Subscription};
use crate::domain::chat::{CancelError, ChatError, ChatService};
use crate::domain::session::SessionId;
use crate::domain::session_service::SessionService;
use crate::ports::SessionStoreError;

/// Bytes read from a socket at a time.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// WebSocket limits. (Queued turns are capped per session, whatever the
/// transport, by the chat service.)
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Largest accepted message (and frame); bigger ones close with 1009.
    pub max_message_bytes: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
        }
    }
}

/// What the endpoint needs.
pub struct WsState {
    pub chat: Arc<ChatService>,
    pub sessions: Arc<SessionService>,
    pub hub: Arc<SessionHub>,
    pub settings: WsSettings,
}

#[derive(Deserialize)]
pub struct WsQuery {
    /// Resume: replay retained events after this sequence number.
    after_seq: Option<u64>,
    /// Extra kinds of event, comma-separated: `prompt` (SPEC B13).
    events: Option<String>,
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    Json(json!({ "detail": detail }))
        .with_status(status)
        .into_response()
}

/// Upgrades to a WebSocket on the session, creating it when missing.
#[handler]
pub async fn session_socket(
    Path(raw_id): Path<String>,
    Query(query): Query<WsQuery>,
    ws: WebSocket,
    state: Data<&Arc<WsState>>,
) -> Response {
    let session_id = match SessionId::parse(&raw_id) {
        Ok(id) => id,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let prompts = match asks_for_prompts(query.events.as_deref()) {
        Ok(prompts) => prompts,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, &message),
    };
    match state.sessions.open(&session_id).await {
        Ok(_) => {}
        Err(e @ SessionStoreError::TooManySessions(_)) => {
            return refuse(StatusCode::TOO_MANY_REQUESTS, &e.to_string());
        }
        Err(error) => {
            tracing::error!(%error, "session store failed on WebSocket connect");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "Session storage is unavailable",
            );
        }
    }
    // Subscribed before the upgrade so a refusal is a plain HTTP answer; a
    // failed upgrade drops the subscription with the closure.
    let subscription = match state.hub.subscribe(&session_id, query.after_seq).await {
        Ok(subscription) => subscription.with_prompts(prompts),
        Err(SubscribeError::Unavailable(error)) => {
            tracing::error!(%error, "session stream unavailable on WebSocket connect");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "Session storage is unavailable",
            );
        }
        Err(e) => return refuse(StatusCode::TOO_MANY_REQUESTS, &e.to_string()),
    };
    let state = Arc::clone(&state);
    let max = state.settings.max_message_bytes;
    ws.config(
        WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            // tungstenite reserves this much per connection up front (128 KiB
            // by default); chat frames are small and the buffer still grows
            // for a big one.
            .read_buffer_size(READ_BUFFER_BYTES),
    )
    .on_upgrade(move |socket| {
        // The span goes with the connection's future, so that every line it
        // logs, however many polls later, carries the session.
        let span = tracing::info_span!("ws", session.id = %session_id);
        async move {
            tracing::debug!("client connected");
            Connection { state, session_id }
                .run(socket, subscription)
                .await;
        }
        .instrument(span)
    })
    .into_response()
}

struct Connection {
    state: Arc<WsState>,
    session_id: SessionId,
}

/// How a connection ended, and so which close frame it gets.
enum Ending {
    ClientLeft,
    TooBig,
    /// The client broke the WebSocket protocol (1002).
    ProtocolError,
    /// A text frame that is not UTF-8 (1007).
    NotUtf8,
    Kicked(CloseReason),
}

impl Ending {
    /// poem hands read errors over as `io::Error`s holding tungstenite's
    /// message (its error type is not exposed), so the kind of failure is
    /// read from that message.
    fn of_read_error(error: &std::io::Error) -> Self {
        let message = error.to_string();
        if message.contains("too long") || message.contains("too big") {
            Self::TooBig
        } else if message.starts_with("UTF-8") {
            Self::NotUtf8
        } else if message.starts_with("WebSocket protocol error") {
            Self::ProtocolError
        } else {
            Self::ClientLeft
        }
    }
}

impl Connection {
    async fn run(self, socket: WebSocketStream, mut subscription: Subscription) {
        let _live = LiveConnection::count("autopoiesis_websocket_connections");
        let (mut sink, mut stream) = socket.split();
        let (direct_tx, mut direct_rx) = mpsc::channel::<String>(32);
        let kicked = subscription.kicked();

        let writer = async {
            loop {
                let text = tokio::select! {
                    frame = subscription.next() => match frame {
                        Some(frame) => frame.json.clone(),
                        None => return,
                    },
                    Some(text) = direct_rx.recv() => text,
                };
                tokio::select! {
                    sent = sink.send(Message::Text(text)) => if sent.is_err() { return },
                    () = kicked.cancelled() => return,
                }
            }
        };
        let reader = async {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(Message::Text(text)) => self.handle(&text, &direct_tx).await,
                    Ok(Message::Binary(_)) => {
                        let _ = direct_tx
                            .send(direct_error(
                                "Binary frames are not supported; send JSON text",
                            ))
                            .await;
                    }
                    Ok(Message::Close(_)) => return Ending::ClientLeft,
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    Err(error) => {
                        tracing::debug!(%error, "WebSocket read failed");
                        return Ending::of_read_error(&error);
                    }
                }
            }
            Ending::ClientLeft
        };
        let ending = tokio::select! {
            ending = reader => ending,
            () = writer => Ending::Kicked(subscription.reason().unwrap_or(CloseReason::Shutdown)),
        };
        let close = match ending {
            Ending::ClientLeft => None,
            Ending::TooBig => Some((CloseCode::Size, "message too big")),
            Ending::ProtocolError => Some((CloseCode::Protocol, "WebSocket protocol error")),
            Ending::NotUtf8 => Some((CloseCode::Invalid, "text frame is not UTF-8")),
            Ending::Kicked(CloseReason::Lagged) => Some((
                CloseCode::Again,
                "client too slow; reconnect with after_seq to resume",
            )),
            Ending::Kicked(CloseReason::SessionGone) => {
                Some((CloseCode::Normal, "session deleted"))
            }
            Ending::Kicked(CloseReason::Shutdown) => {
                Some((CloseCode::Away, "server shutting down"))
            }
        };
        if let Some((code, reason)) = close {
            // A client that stopped reading takes the close frame only if it
            // reads again soon; otherwise the connection is simply dropped.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                sink.send(Message::close_with(code, reason)),
            )
            .await;
        }
        tracing::debug!("client disconnected");
    }

    /// Submits a turn; how it ends reaches every client as the session's
    /// events. Errors raised before it starts (published to nobody) go to
    /// this client alone, even after the socket has closed (then to no one).
    fn submit(&self, content: String, direct: &mpsc::Sender<String>) -> Option<String> {
        match self.state.chat.submit(&self.session_id, content) {
            Ok(turn) => {
                let direct = direct.clone();
                tokio::spawn(async move {
                    match turn.outcome().await {
                        Err(e @ (ChatError::ShuttingDown | ChatError::HistoryFull { .. })) => {
                            let _ = direct.try_send(direct_error(&e.to_string()));
                        }
                        Err(ChatError::Storage(error)) => {
                            tracing::error!(%error, "session store failed during a WebSocket turn");
                            let _ = direct.try_send(direct_error("Session storage is unavailable"));
                        }
                        _ => {}
                    }
                });
                None
            }
            // Published to the session already: every client has it.
            Err(ChatError::RuntimeUnavailable(_)) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    async fn handle(&self, text: &str, direct: &mpsc::Sender<String>) {
        let reply = match parse_incoming(text) {
            Ok(Incoming::Message { content }) => self.submit(content, direct),
            Ok(Incoming::Approve) => {
                self.state.chat.approve_unsupported(&self.session_id);
                None
            }
            Ok(Incoming::Cancel) => match self.state.chat.cancel(&self.session_id).await {
                Ok(_) => None,
                Err(e @ (CancelError::NothingRunning | CancelError::SessionNotFound)) => {
                    Some(e.to_string())
                }
                Err(CancelError::Storage(error)) => {
                    tracing::error!(%error, "session store failed on a WebSocket cancel");
                    Some("Session storage is unavailable".to_owned())
                }
            },
            Ok(Incoming::Unknown(op)) => Some(format!("Unknown op: {op}")),
            Err(e @ (IncomingError::InvalidFormat | IncomingError::ContentNotString)) => {
                Some(e.to_string())
            }
        };
        if let Some(message) = reply {
            let _ = direct.send(direct_error(&message)).await;
        }
    }
}

//! `/api/sessions`: list, create, read, delete, cancel, and the session's
//! event stream over SSE.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use poem::web::sse::Event;
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;
use super::dto::{CancelBody, ErrorBody, HistoryBody, SerdeJson, SessionInfoBody};
use super::session_id;
use super::sse::{SseFrame, frames};
use crate::adapters::stream::frames::asks_for_prompts;
use crate::adapters::stream::{SessionHub, SubscribeError};
use crate::domain::chat::{CancelError, ChatService};
use crate::domain::session_service::SessionService;
use crate::ports::SessionStoreError;

pub struct SessionsApi {
    pub sessions: Arc<SessionService>,
    pub chat: Arc<ChatService>,
    pub hub: Arc<SessionHub>,
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
}

const NOT_FOUND: &str = "Session not found";

fn unavailable(error: &SessionStoreError) -> Json<ErrorBody> {
    tracing::error!(%error, "session store failed");
    Json(ErrorBody::new("Session storage is unavailable"))
}

#[derive(ApiResponse)]
enum ListReply {
    /// Every session, oldest first.
    #[oai(status = 200)]
    Ok(SerdeJson<Vec<SessionInfoBody>>),
    /// The session store is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
enum CreateReply {
    /// The new session.
    #[oai(status = 201)]
    Created(Json<SessionInfoBody>),
    /// The server holds as many sessions as it may.
    #[oai(status = 429)]
    TooMany(Json<ErrorBody>),
    /// The session store is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "HistoryReply::bad_request")]
enum HistoryReply {
    /// The session's messages, oldest first.
    #[oai(status = 200)]
    Ok(Json<HistoryBody>),
    /// The session id is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No such session.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The session store is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "DeleteReply::bad_request")]
enum DeleteReply {
    /// The session is gone and its clients were closed.
    #[oai(status = 204)]
    Deleted,
    /// The session id is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No such session.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The session store is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "CancelReply::bad_request")]
enum CancelReply {
    /// The running turn was told to stop; every client gets `cancelled`.
    #[oai(status = 202)]
    Accepted(Json<CancelBody>),
    /// The session id is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No such session.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The session exists but no turn is running on it.
    #[oai(status = 409)]
    NothingRunning(Json<ErrorBody>),
    /// Session storage is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "EventsReply::bad_request")]
enum EventsReply {
    /// The session's event stream: `event: <op>`, `data: <frame JSON>`,
    /// `id: <seq>`, with comment keep-alives.
    #[oai(status = 200)]
    Ok(EventStream<BoxStream<'static, SseFrame>>),
    /// The session id or `after_seq`/`Last-Event-ID` is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The session or the server has as many live clients as allowed, or
    /// (for a new session) the server as many sessions.
    #[oai(status = 429)]
    TooManyClients(Json<ErrorBody>),
    /// The session store is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// Each reply's `bad_request_handler`, which poem-openapi calls when a
/// parameter does not parse: the 400 for a malformed session id (or, on
/// `events`, a malformed `after_seq`), in the API's `detail` shape.
macro_rules! bad_request_from_parameter {
    ($($reply:ident),+) => {$(
        impl $reply {
            fn bad_request(error: poem::Error) -> Self {
                Self::BadRequest(Json(ErrorBody::new(error.to_string())))
            }
        }
    )+};
}

bad_request_from_parameter!(HistoryReply, DeleteReply, CancelReply, EventsReply);

#[OpenApi]
impl SessionsApi {
    /// List sessions
    #[oai(
        path = "/api/sessions",
        method = "get",
        operation_id = "list_sessions",
        tag = "ApiTags::Sessions"
    )]
    async fn list(&self) -> ListReply {
        match self.sessions.list().await {
            Ok(list) => ListReply::Ok(SerdeJson(list.into_iter().map(Into::into).collect())),
            Err(e) => ListReply::Unavailable(unavailable(&e)),
        }
    }

    /// Create a session
    #[oai(
        path = "/api/sessions",
        method = "post",
        operation_id = "create_session",
        tag = "ApiTags::Sessions"
    )]
    async fn create(&self) -> CreateReply {
        match self.sessions.create().await {
            Ok(info) => CreateReply::Created(Json(info.into())),
            Err(e @ SessionStoreError::TooManySessions(_)) => {
                CreateReply::TooMany(Json(ErrorBody::new(e.to_string())))
            }
            Err(e) => CreateReply::Unavailable(unavailable(&e)),
        }
    }

    /// Read a session's history
    #[oai(
        path = "/api/sessions/:id/history",
        method = "get",
        operation_id = "get_session_history",
        tag = "ApiTags::Sessions"
    )]
    async fn history(&self, session_id::Path(id): session_id::Path) -> HistoryReply {
        match self.sessions.history(&id).await {
            Ok(messages) => HistoryReply::Ok(Json(HistoryBody {
                session_id: id.to_string(),
                messages: messages.iter().map(Into::into).collect(),
            })),
            Err(SessionStoreError::NotFound) => {
                HistoryReply::NotFound(Json(ErrorBody::new(NOT_FOUND)))
            }
            Err(e) => HistoryReply::Unavailable(unavailable(&e)),
        }
    }

    /// Delete a session
    ///
    /// Its WebSocket and SSE clients are closed. A turn still running on it
    /// finishes, but its history is not kept.
    #[oai(
        path = "/api/sessions/:id",
        method = "delete",
        operation_id = "delete_session",
        tag = "ApiTags::Sessions"
    )]
    async fn delete(&self, session_id::Path(id): session_id::Path) -> DeleteReply {
        match self.sessions.delete(&id).await {
            Ok(()) => DeleteReply::Deleted,
            Err(SessionStoreError::NotFound) => {
                DeleteReply::NotFound(Json(ErrorBody::new(NOT_FOUND)))
            }
            Err(e) => DeleteReply::Unavailable(unavailable(&e)),
        }
    }

    /// Cancel the running turn
    ///
    /// Stopping is not disconnecting: closing a socket never cancels a turn,
    /// this does. Every client gets `cancelled {"turn_id","partial"}` and the
    /// partial text is kept in the history. Turns queued behind it still run.
    #[oai(
        path = "/api/sessions/:id/cancel",
        method = "post",
        operation_id = "cancel_turn",
        tag = "ApiTags::Sessions"
    )]
    async fn cancel(&self, session_id::Path(id): session_id::Path) -> CancelReply {
        match self.chat.cancel(&id).await {
            Ok(turn_id) => CancelReply::Accepted(Json(CancelBody {
                turn_id: turn_id.to_string(),
            })),
            Err(e @ CancelError::SessionNotFound) => {
                CancelReply::NotFound(Json(ErrorBody::new(e.to_string())))
            }
            Err(e @ CancelError::NothingRunning) => {
                CancelReply::NothingRunning(Json(ErrorBody::new(e.to_string())))
            }
            Err(CancelError::Storage(e)) => CancelReply::Unavailable(unavailable(&e)),
        }
    }

    /// Stream a session's events (SSE)
    ///
    /// The same sequenced log as the WebSocket, for `EventSource` clients.
    /// Resume with the `Last-Event-ID` header (browsers send it on their own)
    /// or `?after_seq=N`; a `gap` event says when events older than the
    /// retained window were missed. The session is created if missing.
    /// `?events=prompt` adds each turn's `prompt` event (no `id`: it is
    /// not numbered) right before the turn's first event.
    #[oai(
        path = "/api/sessions/:id/events",
        method = "get",
        operation_id = "stream_session_events",
        tag = "ApiTags::Sessions"
    )]
    async fn events(
        &self,
        session_id::Path(id): session_id::Path,
        /// Replay retained events after this sequence number.
        after_seq: Query<Option<u64>>,
        /// Extra kinds of event, comma-separated: `prompt` (each turn's
        /// prompt, first in the turn).
        events: Query<Option<String>>,
        /// Set by `EventSource` on reconnect: the last `id` it saw.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> EventsReply {
        let after = match (&last_event_id.0, after_seq.0) {
            (Some(raw), _) => match raw.trim().parse::<u64>() {
                Ok(seq) => Some(seq),
                Err(_) => {
                    return EventsReply::BadRequest(Json(ErrorBody::new(
                        "Last-Event-ID must be a sequence number",
                    )));
                }
            },
            (None, after) => after,
        };
        let prompts = match asks_for_prompts(events.0.as_deref()) {
            Ok(prompts) => prompts,
            Err(message) => return EventsReply::BadRequest(Json(ErrorBody::new(message))),
        };
        match self.sessions.open(&id).await {
            Ok(_) => {}
            Err(e @ SessionStoreError::TooManySessions(_)) => {
                return EventsReply::TooManyClients(Json(ErrorBody::new(e.to_string())));
            }
            Err(e) => return EventsReply::Unavailable(unavailable(&e)),
        }
        let subscription = match self.hub.subscribe(&id, after).await {
            Ok(subscription) => subscription.with_prompts(prompts),
            Err(SubscribeError::Unavailable(error)) => {
                return EventsReply::Unavailable(unavailable(&SessionStoreError::Unavailable(
                    error.to_string(),
                )));
            }
            Err(e) => return EventsReply::TooManyClients(Json(ErrorBody::new(e.to_string()))),
        };
        EventsReply::Ok(
            EventStream::new(frames(subscription))
                .keep_alive(self.keep_alive)
                .to_event(SseFrame::into_event),
        )
    }
}

impl SseFrame {
    fn into_event(self) -> Event {
        let event = Event::message(self.0.json.clone()).event_type(self.0.op);
        match self.0.seq {
            Some(seq) => event.id(seq.to_string()),
            None => event,
        }
    }
}

#[cfg(test)]
mod tests {
    use poem::http::StatusCode;
    use poem::test::TestClient;
    use poem_openapi::OpenApiService;
    use serde_json::json;

    use super::*;
    use crate::adapters::stream::StreamSettings;
    use crate::domain::chat::RuntimeSlot;
    use crate::ports::SessionStore;
    use crate::ports::session_store::MockSessionStore;

    #[tokio::test]
    async fn cancel_answers_503_not_404_when_the_session_store_is_down() {
        let mut store = MockSessionStore::new();
        store
            .expect_history()
            .returning(|_| Err(SessionStoreError::Unavailable("disk gone".into())));
        let store: Arc<dyn SessionStore> = Arc::new(store);
        let hub = SessionHub::new(StreamSettings::default());
        let chat = Arc::new(ChatService::new(
            RuntimeSlot::Unavailable("not needed".into()),
            store.clone(),
            hub.clone(),
            None,
        ));
        let sessions = Arc::new(SessionService::new(store, hub.clone(), chat.clone()));
        let api = SessionsApi {
            sessions,
            chat,
            hub,
            keep_alive: Duration::from_secs(15),
        };
        let client = TestClient::new(OpenApiService::new(api, "test", "0"));
        let res = client.post("/api/sessions/s1/cancel").send().await;
        res.assert_status(StatusCode::SERVICE_UNAVAILABLE);
        res.assert_json(json!({"detail": "Session storage is unavailable"}))
            .await;
    }
}

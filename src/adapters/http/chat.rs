//! `POST /api/chat`: one turn over REST. The turn also streams to the
//! session's WebSocket and SSE clients.

use std::sync::Arc;

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;
use super::dto::{ChatBody, ChatReplyBody, CodedErrorBody, ErrorBody};
use crate::domain::chat::{ChatError, ChatService};
use crate::domain::events::APPROVAL_UNSUPPORTED_CODE;
use crate::domain::session::SessionId;
use crate::ports::SessionStoreError;

pub struct ChatApi {
    pub chat: Arc<ChatService>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_chat_request")]
enum ChatReply {
    /// The turn finished; `content` is the agent's full answer.
    #[oai(status = 200)]
    Ok(Json<ChatReplyBody>),
    /// The body is not a JSON object with a string `content` (and an
    /// optional string `session_id`), or the session id is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `approval_unsupported`: the turn ended with tool calls that need a
    /// human's approval (history saved; with approvals unlocked, `detail`
    /// names the recorded approval in `approval_id`). `turn_cancelled`: the
    /// turn was cancelled (partial text saved). `session_deleted`: the
    /// session was deleted before or during the turn (nothing kept).
    #[oai(status = 409)]
    Conflict(Json<CodedErrorBody>),
    /// The session's history is full: start a new session. Or the request
    /// body is larger than `--max-body-bytes`.
    #[oai(status = 413)]
    HistoryFull(Json<ErrorBody>),
    /// `content` is empty, or asks for what the agent cannot do as written
    /// (an unknown tool, tool arguments that are not JSON).
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The session already has as many queued turns as it may
    /// (`--max-queued-turns`), or creating the session would pass the
    /// server's cap on sessions (`--max-sessions`).
    #[oai(status = 429)]
    TooMany(Json<ErrorBody>),
    /// The model provider failed; the session stays usable.
    #[oai(status = 502)]
    BadGateway(Json<ErrorBody>),
    /// The agent runtime is not available (the detail says why), session
    /// storage failed, or the server is shutting down.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
    /// The turn ran past the configured turn timeout (partial text saved).
    #[oai(status = 504)]
    TimedOut(Json<ErrorBody>),
}

fn bad_chat_request(error: poem::Error) -> ChatReply {
    ChatReply::BadRequest(Json(ErrorBody::new(error.to_string())))
}

impl From<ChatError> for ChatReply {
    fn from(error: ChatError) -> Self {
        let detail = || Json(ErrorBody::new(error.to_string()));
        match &error {
            ChatError::EmptyMessage | ChatError::InvalidRequest { .. } => {
                Self::Unprocessable(detail())
            }
            ChatError::TooManyQueued { .. } => Self::TooMany(detail()),
            ChatError::RuntimeUnavailable(_) => Self::Unavailable(detail()),
            ChatError::ApprovalUnsupported { approval_id, .. } => Self::Conflict(Json(
                CodedErrorBody::new(APPROVAL_UNSUPPORTED_CODE, error.to_string())
                    .with_approval_id(approval_id.clone()),
            )),
            ChatError::SessionDeleted { .. } => Self::Conflict(Json(CodedErrorBody::new(
                "session_deleted",
                error.to_string(),
            ))),
            ChatError::Cancelled { .. } => Self::Conflict(Json(CodedErrorBody::new(
                "turn_cancelled",
                "The turn was cancelled; its partial text was kept in the history.",
            ))),
            ChatError::Provider { .. } => Self::BadGateway(detail()),
            ChatError::TimedOut { .. } => Self::TimedOut(detail()),
            ChatError::ShuttingDown | ChatError::ApprovalStorage { .. } => {
                Self::Unavailable(detail())
            }
            ChatError::HistoryFull { .. } => Self::HistoryFull(detail()),
            ChatError::Storage(e @ SessionStoreError::TooManySessions(_)) => {
                Self::TooMany(Json(ErrorBody::new(e.to_string())))
            }
            ChatError::Storage(e) => {
                tracing::error!(error = %e, "session store failed during chat");
                Self::Unavailable(Json(ErrorBody::new("Session storage is unavailable")))
            }
        }
    }
}

#[OpenApi]
impl ChatApi {
    /// Send a message
    ///
    /// Runs one turn of the active agent and answers with its full reply.
    /// Turns on one session run one at a time in arrival order.
    #[oai(
        path = "/api/chat",
        method = "post",
        operation_id = "send_chat_message",
        tag = "ApiTags::Chat"
    )]
    async fn chat(&self, body: Json<ChatBody>) -> ChatReply {
        let ChatBody {
            content,
            session_id,
        } = body.0;
        let session_id = match session_id.map(|raw| SessionId::parse(&raw.0)).transpose() {
            Ok(id) => id,
            Err(e) => return ChatReply::BadRequest(Json(ErrorBody::new(e.to_string()))),
        };
        match self.chat.send(session_id, content.0).await {
            Ok(reply) => ChatReply::Ok(Json(ChatReplyBody {
                session_id: reply.session_id.to_string(),
                content: reply.content,
            })),
            Err(error) => error.into(),
        }
    }
}

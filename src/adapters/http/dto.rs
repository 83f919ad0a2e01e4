//! Request and response bodies of the REST API, and their mapping from the
//! domain. The JSON shapes are the contract of SPEC A3.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{Object, Union};
use serde_json::Value;

use crate::domain::message::{ModelMessage, RequestPart, ResponsePart};
use crate::domain::session::SessionInfo;

/// The items of poem-openapi's `Type` for a type that is its own raw value:
/// a required scalar-like value with no elements to iterate. The API's
/// hand-written `Type`s ([`StrictString`], the pre-encoded SSE frames and
/// envelopes) differ only in their name and schema; invoked inside their
/// `impl Type` blocks, this writes the rest once.
macro_rules! self_raw_value {
    () => {
        const IS_REQUIRED: bool = true;
        type RawValueType = Self;
        type RawElementValueType = Self;

        fn as_raw_value(&self) -> Option<&Self::RawValueType> {
            Some(self)
        }

        fn raw_element_iter<'a>(
            &'a self,
        ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
            Box::new(self.as_raw_value().into_iter())
        }
    };
}
pub(crate) use self_raw_value;

/// `GET /api/health`.
#[derive(Debug, Object)]
pub struct HealthResponse {
    /// Always `ok` when the server answers.
    pub status: String,
    /// The server's version.
    pub version: String,
}

// Also `Serialize`: the session list is written straight to JSON
// ([`SerdeJson`]), with the same values poem-openapi would write.
/// A session as listed.
#[derive(Debug, Object, serde::Serialize)]
#[oai(rename = "SessionInfo")]
pub struct SessionInfoBody {
    /// The session id.
    pub id: String,
    /// When the session was created (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Number of messages in the history.
    pub message_count: u64,
    /// The `seq` of the newest event of the session's stream (0: none yet):
    /// a client that has read up to it is up to date.
    pub last_seq: u64,
}

/// `DateTime<Utc>` as poem-openapi writes it (`+00:00`, not `Z`).
fn rfc3339<S: serde::Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&at.to_rfc3339())
}

/// A JSON response body written by serde in one pass, where poem-openapi's
/// `Json` first builds a `serde_json::Value` tree and then writes that: on
/// a list route, building and dropping the tree was a fifth of the
/// request's CPU. The spec is the same as `Json<T>`'s.
pub struct SerdeJson<T>(pub T);

impl<T: Type> poem_openapi::payload::Payload for SerdeJson<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        T::register(registry);
    }
}

impl<T: serde::Serialize + Send> poem::IntoResponse for SerdeJson<T> {
    fn into_response(self) -> poem::Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => poem::Response::builder()
                .content_type("application/json; charset=utf-8")
                .body(body),
            Err(error) => {
                tracing::error!(%error, "response not encoded");
                poem::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

impl From<SessionInfo> for SessionInfoBody {
    fn from(info: SessionInfo) -> Self {
        Self {
            id: info.id.to_string(),
            created_at: info.created_at,
            message_count: u64::try_from(info.message_count).unwrap_or(u64::MAX),
            last_seq: info.last_seq,
        }
    }
}

/// A session's history in pydantic-ai's `ModelMessage` JSON shape.
#[derive(Debug, Object)]
#[oai(rename = "SessionHistory")]
pub struct HistoryBody {
    pub session_id: String,
    /// The messages, oldest first.
    pub messages: Vec<MessageBody>,
}

// The history's DTOs mirror `domain::message` field for field: the domain
// types' serde shape is what is stored and what the MCP and WebSocket
// transports send, these add the schema. A test below checks that both
// write the same JSON.

/// One message of a history (pydantic-ai's `ModelMessage`), told apart by
/// `kind`.
#[derive(Debug, Union)]
#[oai(rename = "ModelMessage", discriminator_name = "kind", one_of)]
pub enum MessageBody {
    #[oai(mapping = "request")]
    Request(RequestBody),
    #[oai(mapping = "response")]
    Response(ResponseBody),
}

/// What was sent to the model: the user's prompt, tool returns.
#[derive(Debug, Object)]
#[oai(rename = "ModelRequest")]
pub struct RequestBody {
    pub parts: Vec<RequestPartBody>,
}

/// What the model answered.
#[derive(Debug, Object)]
#[oai(rename = "ModelResponse")]
pub struct ResponseBody {
    pub parts: Vec<ResponsePartBody>,
    /// The model that answered, when known.
    pub model_name: NullableString,
    /// When the answer was recorded.
    pub timestamp: HistoryTimestamp,
}

/// A part of a request message, told apart by `part_kind`.
#[derive(Debug, Union)]
#[oai(rename = "ModelRequestPart", discriminator_name = "part_kind", one_of)]
pub enum RequestPartBody {
    #[oai(mapping = "user-prompt")]
    UserPrompt(UserPromptPart),
    #[oai(mapping = "tool-return")]
    ToolReturn(ToolReturnPart),
}

/// The user's prompt.
#[derive(Debug, Object)]
pub struct UserPromptPart {
    pub content: String,
    pub timestamp: HistoryTimestamp,
}

/// A tool's result, sent back to the model.
#[derive(Debug, Object)]
pub struct ToolReturnPart {
    pub tool_name: String,
    /// What the tool returned (any JSON).
    pub content: Value,
    /// The `tool_call_id` of the call this answers.
    pub tool_call_id: String,
    pub timestamp: HistoryTimestamp,
}

/// A part of a response message, told apart by `part_kind`.
#[derive(Debug, Union)]
#[oai(rename = "ModelResponsePart", discriminator_name = "part_kind", one_of)]
pub enum ResponsePartBody {
    #[oai(mapping = "text")]
    Text(TextPart),
    #[oai(mapping = "thinking")]
    Thinking(ThinkingPart),
    #[oai(mapping = "tool-call")]
    ToolCall(ToolCallPart),
}

/// Answer text.
#[derive(Debug, Object)]
pub struct TextPart {
    pub content: String,
}

/// The model's reasoning.
#[derive(Debug, Object)]
pub struct ThinkingPart {
    pub content: String,
}

/// A tool call the model asked for.
#[derive(Debug, Object)]
pub struct ToolCallPart {
    pub tool_name: String,
    /// The call's arguments (a JSON object for the built-in tools).
    pub args: Value,
    pub tool_call_id: String,
}

impl From<&ModelMessage> for MessageBody {
    fn from(message: &ModelMessage) -> Self {
        match message {
            ModelMessage::Request { parts } => Self::Request(RequestBody {
                parts: parts.iter().map(Into::into).collect(),
            }),
            ModelMessage::Response {
                parts,
                model_name,
                timestamp,
            } => Self::Response(ResponseBody {
                parts: parts.iter().map(Into::into).collect(),
                model_name: NullableString(model_name.clone()),
                timestamp: HistoryTimestamp(*timestamp),
            }),
        }
    }
}

impl From<&RequestPart> for RequestPartBody {
    fn from(part: &RequestPart) -> Self {
        match part {
            RequestPart::UserPrompt { content, timestamp } => Self::UserPrompt(UserPromptPart {
                content: content.clone(),
                timestamp: HistoryTimestamp(*timestamp),
            }),
            RequestPart::ToolReturn {
                tool_name,
                content,
                tool_call_id,
                timestamp,
            } => Self::ToolReturn(ToolReturnPart {
                tool_name: tool_name.clone(),
                content: content.clone(),
                tool_call_id: tool_call_id.clone(),
                timestamp: HistoryTimestamp(*timestamp),
            }),
        }
    }
}

impl From<&ResponsePart> for ResponsePartBody {
    fn from(part: &ResponsePart) -> Self {
        match part {
            ResponsePart::Text { content } => Self::Text(TextPart {
                content: content.clone(),
            }),
            ResponsePart::Thinking { content } => Self::Thinking(ThinkingPart {
                content: content.clone(),
            }),
            ResponsePart::ToolCall {
                tool_name,
                args,
                tool_call_id,
            } => Self::ToolCall(ToolCallPart {
                tool_name: tool_name.clone(),
                args: args.clone(),
                tool_call_id: tool_call_id.clone(),
            }),
        }
    }
}

/// A history timestamp written as the stored history writes it (chrono's
/// serde: `Z`, fractions of a second only when there are any), which the
/// Python original's clients read; poem-openapi's `DateTime` would write
/// `+00:00`.
#[derive(Debug)]
pub struct HistoryTimestamp(pub DateTime<Utc>);

impl Type for HistoryTimestamp {
    self_raw_value!();

    fn name() -> Cow<'static, str> {
        "string_date-time".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "date-time")))
    }
}

impl ParseFromJSON for HistoryTimestamp {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        let value = value.unwrap_or_default();
        serde_json::from_value(value.clone())
            .map(Self)
            .map_err(|_| ParseError::expected_type(value))
    }
}

impl ToJSON for HistoryTimestamp {
    fn to_json(&self) -> Option<Value> {
        serde_json::to_value(self.0).ok()
    }
}

/// A string that is always sent and may be `null`: required and nullable in
/// the schema, where poem-openapi's `Option<String>` is optional and never
/// `null` there (yet writes `null`).
#[derive(Debug)]
pub struct NullableString(pub Option<String>);

impl Type for NullableString {
    self_raw_value!();

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        let mut schema = MetaSchema::new("string");
        schema.nullable = true;
        MetaSchemaRef::Inline(Box::new(schema))
    }
}

impl ParseFromJSON for NullableString {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Self(Some(s))),
            None | Some(Value::Null) => Ok(Self(None)),
            Some(other) => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for NullableString {
    fn to_json(&self) -> Option<Value> {
        Some(self.0.clone().map_or(Value::Null, Value::String))
    }
}

/// `POST /api/chat` body.
#[derive(Debug, Object)]
#[oai(rename = "ChatRequest")]
pub struct ChatBody {
    /// The user's message. Must not be empty.
    pub content: StrictString<NonBlank>,
    /// The session to continue (1-128 characters of `[A-Za-z0-9._:-]`); a
    /// new one is created when absent or unknown.
    pub session_id: Option<StrictString<SessionIdText>>,
}

/// A completed chat turn.
#[derive(Debug, Object)]
#[oai(rename = "ChatResponse")]
pub struct ChatReplyBody {
    pub session_id: String,
    /// The agent's full answer.
    pub content: String,
}

/// A cancel request that stopped a running turn.
#[derive(Debug, Object)]
#[oai(rename = "CancelAccepted")]
pub struct CancelBody {
    /// The turn that was stopped.
    pub turn_id: String,
}

/// An error, FastAPI style.
#[derive(Debug, Object)]
#[oai(rename = "Error")]
pub struct ErrorBody {
    /// What went wrong.
    pub detail: String,
}

impl ErrorBody {
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
        }
    }
}

/// An error a client is expected to handle by its code.
#[derive(Debug, Object)]
#[oai(rename = "CodedError")]
pub struct CodedErrorBody {
    pub detail: ErrorDetail,
}

/// The `detail` of a [`CodedErrorBody`].
#[derive(Debug, Object)]
pub struct ErrorDetail {
    /// Machine-readable kind, e.g. `approval_unsupported`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// `approval_unsupported` with approvals unlocked: the pending approval
    /// the turn's tool calls were recorded as (see `/api/approvals`).
    #[oai(skip_serializing_if_is_none)]
    pub approval_id: Option<String>,
}

impl CodedErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            detail: ErrorDetail {
                code: code.into(),
                message: message.into(),
                approval_id: None,
            },
        }
    }

    /// Names the pending approval the error is about.
    #[must_use]
    pub fn with_approval_id(mut self, approval_id: Option<String>) -> Self {
        self.detail.approval_id = approval_id;
        self
    }
}

/// What a [`StrictString`] must look like, as its schema tells clients.
pub trait TextRule: Send + Sync + 'static {
    /// ECMA regex of the schema's `pattern`.
    const PATTERN: &'static str;
    /// Whether `null` stands for "absent" (`str|null` fields).
    const NULLABLE: bool = false;
}

/// Any text with something other than white space in it. The domain, not
/// the parser, refuses blank prompts (422 `Empty message`, as on the
/// WebSocket); the pattern tells client generators and fuzzers what counts.
pub struct NonBlank;

impl TextRule for NonBlank {
    const PATTERN: &'static str = r"\S";
}

/// A session id (1 to 128 characters of `[A-Za-z0-9._:-]`), or `null`.
pub struct SessionIdText;

impl TextRule for SessionIdText {
    const PATTERN: &'static str = SESSION_ID_PATTERN;
    const NULLABLE: bool = true;
}

/// The session id rule as a schema pattern (validated again by the domain).
pub const SESSION_ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";

/// An inline `string` schema with a `pattern`.
pub(super) fn pattern_schema(pattern: &str, nullable: bool) -> MetaSchemaRef {
    let mut schema = MetaSchema::new("string");
    schema.pattern = Some(pattern.to_owned());
    schema.nullable = nullable;
    MetaSchemaRef::Inline(Box::new(schema))
}

/// A JSON string and nothing else.
///
/// poem-openapi's `String` also accepts numbers and booleans (`5` becomes
/// `"5"`); a chat body with `"content": 5` is a client bug that deserves a
/// clear 400, not a silent conversion. The rule `R` only describes the
/// expected text in the schema; the domain enforces it.
pub struct StrictString<R: TextRule>(pub String, PhantomData<R>);

impl<R: TextRule> fmt::Debug for StrictString<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<R: TextRule> Type for StrictString<R> {
    self_raw_value!();

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        pattern_schema(R::PATTERN, R::NULLABLE)
    }
}

impl<R: TextRule> ParseFromJSON for StrictString<R> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Self(s, PhantomData)),
            other => Err(ParseError::expected_type(other.unwrap_or_default())),
        }
    }
}

impl<R: TextRule> ToJSON for StrictString<R> {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    /// Every kind of message and part, with and without a model name, on a
    /// whole second and between two.
    fn every_kind_of_message() -> Vec<ModelMessage> {
        let whole = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let fraction = whole + chrono::Duration::microseconds(123_456);
        vec![
            ModelMessage::user_prompt("hi \u{e9}", whole),
            ModelMessage::Response {
                parts: vec![
                    ResponsePart::Thinking {
                        content: "hm".into(),
                    },
                    ResponsePart::Text {
                        content: "hello".into(),
                    },
                    ResponsePart::ToolCall {
                        tool_name: "execute".into(),
                        args: json!({"command": "ls", "z": [1, {"b": null, "a": 2.5}]}),
                        tool_call_id: "c1".into(),
                    },
                ],
                model_name: Some("echo".into()),
                timestamp: fraction,
            },
            ModelMessage::Request {
                parts: vec![RequestPart::ToolReturn {
                    tool_name: "execute".into(),
                    content: json!("file.txt"),
                    tool_call_id: "c1".into(),
                    timestamp: fraction,
                }],
            },
            ModelMessage::Response {
                parts: vec![],
                model_name: None,
                timestamp: whole,
            },
        ]
    }

    #[test]
    fn the_typed_history_writes_the_same_bytes_as_the_stored_history() {
        let messages = every_kind_of_message();
        let typed: Vec<Value> = messages
            .iter()
            .map(|m| MessageBody::from(m).to_json().unwrap())
            .collect();
        let stored: Vec<Value> = messages
            .iter()
            .map(|m| serde_json::to_value(m).unwrap())
            .collect();
        assert_eq!(
            serde_json::to_string(&typed).unwrap(),
            serde_json::to_string(&stored).unwrap()
        );
        assert_eq!(typed[1]["timestamp"], "2026-01-02T03:04:05.123456Z");
        assert_eq!(typed[3]["model_name"], Value::Null);
    }

    #[test]
    fn the_typed_history_reads_back_what_it_writes() {
        for message in &every_kind_of_message() {
            let json = MessageBody::from(message).to_json();
            let back = MessageBody::parse_from_json(json.clone()).unwrap();
            assert_eq!(back.to_json(), json);
        }
    }
}

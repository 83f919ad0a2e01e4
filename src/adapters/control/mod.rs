//! The control plane as a JSON tool protocol, shared by `/mcp` and the
//! dashboard REST routes (SPEC A5, A8, B7): the tool catalogue
//! ([`tools`]), the `{"type", "data", "meta"}` envelopes ([`envelope`]) and
//! the dispatch by tool name ([`ControlTools`]) over the domain's typed
//! [`ControlPlane`]. Each transport picks its status codes by matching
//! [`Failure`], never by reading an envelope.

pub mod envelope;
pub mod tools;

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use self::envelope::{Answer, Envelope, ErrorKind, Failed, Failure, envelope_of};
use self::tools::{ChatSendArgs, DecideArgs, ListArgs, NoArgs};
pub use self::tools::{ToolInfo, tools};
use crate::adapters::approval_broadcast::ApprovalBroadcast;
use crate::domain::chat::TurnHandle;
use crate::domain::control::{ControlError, ControlPlane};
use crate::domain::session::SessionId;

/// The tool that chats with the agent.
pub const CHAT_SEND: &str = "chat.send";

/// The tools over one control plane.
pub struct ControlTools {
    control: Arc<ControlPlane>,
    /// Says whether anyone (an MCP client, a dashboard stream) was there to
    /// hear of a decision: its `meta.notification_emitted`.
    audience: Arc<ApprovalBroadcast>,
}

impl ControlTools {
    #[must_use]
    pub fn new(control: Arc<ControlPlane>, audience: Arc<ApprovalBroadcast>) -> Self {
        Self { control, audience }
    }

    /// Calls the tool `name` with JSON `args` (`null` counts as `{}`).
    ///
    /// # Errors
    /// A [`Failed`] call, [`Failure::UnknownTool`] when no tool has that
    /// name.
    pub async fn call(&self, name: &str, args: Value) -> Answer {
        let args = if args.is_null() { json!({}) } else { args };
        match name {
            "dashboard.status" => {
                parse::<NoArgs>("dashboard.status", args)?;
                self.status().await
            }
            "system.info" => {
                const TOOL: &str = "system.info";
                parse::<NoArgs>(TOOL, args)?;
                let info = self.control.system_info().map_err(failed(TOOL))?;
                Ok(envelope::system_info(&info))
            }
            "session.list" => {
                const TOOL: &str = "session.list";
                parse::<NoArgs>(TOOL, args)?;
                let list = self.control.sessions().await.map_err(failed(TOOL))?;
                Ok(envelope::sessions(&list))
            }
            "approval.list" => {
                let a = parse::<ListArgs>("approval.list", args)?;
                self.approval_list(a.limit, a.cursor.as_deref()).await
            }
            "approval.decide" => {
                let a = parse::<DecideArgs>("approval.decide", args)?;
                self.decide(&a.approval_id, a.approved, a.reason).await
            }
            CHAT_SEND => {
                let a = parse::<ChatSendArgs>(CHAT_SEND, args)?;
                self.send_message(CHAT_SEND, "chat.reply", a.content, a.session_id.as_deref())
                    .await
            }
            other => Err(Failed::new(
                "tools.call",
                Failure::UnknownTool(other.to_owned()),
            )),
        }
    }

    /// `dashboard.status`.
    ///
    /// # Errors
    /// The control plane's failure.
    pub async fn status(&self) -> Answer {
        let status = self
            .control
            .status()
            .await
            .map_err(failed("dashboard.status"))?;
        Ok(envelope::status(&status))
    }

    /// `approval.list`: one page of `limit` after `cursor`.
    ///
    /// # Errors
    /// The control plane's failure.
    pub async fn approval_list(&self, limit: Option<u64>, cursor: Option<&str>) -> Answer {
        let page = self
            .control
            .pending_approvals(limit, cursor)
            .await
            .map_err(failed("approval.list"))?;
        Ok(envelope::approval_list(&page))
    }

    /// `dashboard.status` and the first page of `approval.list` from one
    /// read; a failure is the same `dashboard.status` error envelope twice
    /// (told once per view; the store is not asked again).
    pub async fn snapshot(&self) -> (Envelope, Envelope) {
        match self.control.snapshot().await {
            Ok((status, page)) => (envelope::status(&status), envelope::approval_list(&page)),
            Err(error) => {
                let envelope = Failed::new("dashboard.status", error).envelope();
                (envelope.clone(), envelope)
            }
        }
    }

    /// `approval.decide`.
    ///
    /// # Errors
    /// The control plane's failure.
    pub async fn decide(
        &self,
        approval_id: &str,
        approved: bool,
        reason: Option<String>,
    ) -> Answer {
        let decided = self
            .control
            .decide(approval_id, approved, reason)
            .await
            .map_err(failed("approval.decide"))?;
        Ok(envelope::decision(
            &decided,
            approved,
            self.audience.is_heard(),
        ))
    }

    /// A chat turn answered by `tool` as `kind`.
    async fn send_message(
        &self,
        tool: &'static str,
        kind: &str,
        content: String,
        session_id: Option<&str>,
    ) -> Answer {
        let reply = self
            .control
            .send_message(content, session_id)
            .await
            .map_err(failed(tool))?;
        Ok(envelope::reply(tool, kind, &reply))
    }

    /// `chat.send` in three steps, for a transport that streams the turn
    /// as it runs (MCP progress): first its arguments checked and its
    /// session opened, so the caller can subscribe to the session's stream
    /// before [`Self::chat_submit`].
    ///
    /// # Errors
    /// As `chat.send` before its turn starts.
    pub async fn chat_open(&self, args: Value) -> Result<(SessionId, String), Failed> {
        let args = parse::<ChatSendArgs>(CHAT_SEND, args)?;
        let session = self
            .control
            .open_chat(&args.content, args.session_id.as_deref())
            .await
            .map_err(failed(CHAT_SEND))?;
        Ok((session, args.content))
    }

    /// Queues the turn of [`Self::chat_open`].
    ///
    /// # Errors
    /// As `chat.send`.
    pub fn chat_submit(&self, session: &SessionId, content: String) -> Result<TurnHandle, Failed> {
        self.control
            .submit_message(session, content)
            .map_err(failed(CHAT_SEND))
    }

    /// The `chat.send` answer once the turn of [`Self::chat_submit`] ended.
    ///
    /// # Errors
    /// As `chat.send`.
    pub async fn chat_reply(&self, turn: TurnHandle) -> Answer {
        let reply = self.control.reply(turn).await.map_err(failed(CHAT_SEND))?;
        Ok(envelope::reply(CHAT_SEND, "chat.reply", &reply))
    }

    /// A dashboard action: `approve` / `reject` an approval, or
    /// `send_message` (`payload`: `{"content", "session_id"?}`).
    ///
    /// # Errors
    /// [`Failure::MissingField`], [`Failure::UnknownAction`], or the
    /// control plane's failure.
    pub async fn action(
        &self,
        action: &str,
        approval_id: Option<String>,
        reason: Option<String>,
        payload: &Value,
    ) -> Answer {
        const TOOL: &str = "dashboard.action";
        match action {
            "approve" | "reject" => match approval_id.filter(|id| !id.trim().is_empty()) {
                Some(id) => self.decide(&id, action == "approve", reason).await,
                None => Err(Failed::new(TOOL, Failure::MissingField("approval_id"))),
            },
            "send_message" => match payload.get("content").and_then(Value::as_str) {
                Some(content) => {
                    const KIND: &str = "action.send_message";
                    let session_id = payload.get("session_id").and_then(Value::as_str);
                    self.send_message(KIND, KIND, content.to_owned(), session_id)
                        .await
                }
                None => Err(Failed::new(TOOL, Failure::MissingField("payload.content"))),
            },
            other => Err(Failed::new(TOOL, Failure::UnknownAction(other.to_owned()))),
        }
    }
}

/// Tells a control-plane error as answered by `tool`.
fn failed(tool: &'static str) -> impl Fn(ControlError) -> Failed {
    move |error| Failed::new(tool, error)
}

fn parse<T: DeserializeOwned>(tool: &'static str, args: Value) -> Result<T, Failed> {
    serde_json::from_value(args).map_err(|e| {
        Failed::new(
            tool,
            ControlError::InvalidArguments(format!("invalid arguments: {e}")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::control::mocked::Ports;
    use crate::ports::SessionStoreError;

    fn tools_over(ports: Ports) -> ControlTools {
        ControlTools::new(
            Arc::new(ports.control()),
            Arc::new(ApprovalBroadcast::new()),
        )
    }

    #[tokio::test]
    async fn a_session_store_failure_is_not_reported_as_the_approval_store() {
        let mut ports = Ports::new();
        ports
            .sessions
            .expect_list()
            .returning(|| Err(SessionStoreError::Unavailable("disk gone".into())));
        let failed = tools_over(ports)
            .call("session.list", Value::Null)
            .await
            .unwrap_err();
        assert_eq!(failed.error.kind(), ErrorKind::StorageUnavailable);
        let envelope = failed.envelope();
        assert_eq!(envelope.kind, "error.storage_unavailable");
        assert_eq!(envelope.meta["tool"], "session.list");
        assert_eq!(
            envelope.data["message"],
            "The session store is unavailable; try again shortly"
        );
    }

    #[tokio::test]
    async fn an_unknown_tool_and_arguments_that_do_not_fit_are_told_apart() {
        let tools = tools_over(Ports::new());
        let unknown = tools.call("nope", json!({})).await.unwrap_err();
        assert_eq!(unknown.error, Failure::UnknownTool("nope".into()));
        let invalid = tools
            .call("system.info", json!({"extra": 1}))
            .await
            .unwrap_err();
        assert_eq!(invalid.error.kind(), ErrorKind::InvalidArguments);
        assert_eq!(invalid.envelope().meta["tool"], "system.info");
    }

    #[tokio::test]
    async fn an_action_without_its_field_is_missing_field_and_an_unknown_one_is_unknown_action() {
        let tools = tools_over(Ports::new());
        let missing = tools
            .action("approve", Some("  ".into()), None, &Value::Null)
            .await
            .unwrap_err();
        assert_eq!(missing.error, Failure::MissingField("approval_id"));
        assert_eq!(missing.envelope().data["field"], "approval_id");
        let unknown = tools
            .action("dance", None, None, &Value::Null)
            .await
            .unwrap_err();
        assert_eq!(unknown.error.kind(), ErrorKind::UnknownAction);
        assert_eq!(unknown.envelope().data["action"], "dance");
    }
}

//! MCP resources (SPEC B14): the session list, each session's history
//! through a URI template, and the pending approvals, read as JSON; and
//! `completion/complete` of the template's session ids.
//!
//! The JSON is what the rest of the server answers for the same thing: the
//! `data` of `session.list` and `approval.list`, and the body of
//! `GET /api/sessions/{id}/history`.

use std::sync::Arc;

use rmcp::ErrorData;
use rmcp::model::{
    CompleteRequestParams, CompleteResult, CompletionInfo, ReadResourceResult, Reference, Resource,
    ResourceContents, ResourceTemplate,
};
use serde_json::{Value, json};

use crate::adapters::control::{ControlTools, envelope};
use crate::domain::approvals::MAX_PAGE_SIZE;
use crate::domain::session::SessionId;
use crate::domain::session_service::SessionService;
use crate::ports::SessionStoreError;

/// The session list.
pub const SESSIONS_URI: &str = "autopoiesis://sessions";
/// The pending approvals.
pub const APPROVALS_URI: &str = "autopoiesis://approvals";
/// One session's history.
pub const HISTORY_TEMPLATE: &str = "autopoiesis://sessions/{id}/history";
/// The template's one argument.
const ID_ARGUMENT: &str = "id";
const JSON: &str = "application/json";
/// Session ids one completion answers at most (MCP's own cap).
pub const MAX_COMPLETIONS: usize = CompletionInfo::MAX_VALUES;

/// A resource this server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceUri {
    Sessions,
    Approvals,
    History(SessionId),
}

impl ResourceUri {
    /// The resource `uri` names, exactly as this server writes it; `None`
    /// for any other (a malformed session id included).
    #[must_use]
    pub fn parse(uri: &str) -> Option<Self> {
        match uri {
            SESSIONS_URI => Some(Self::Sessions),
            APPROVALS_URI => Some(Self::Approvals),
            _ => uri
                .strip_prefix("autopoiesis://sessions/")
                .and_then(|rest| rest.strip_suffix("/history"))
                .and_then(|id| SessionId::parse(id).ok())
                .map(Self::History),
        }
    }
}

/// The URI of `session`'s history.
#[must_use]
pub fn history_uri(session: &SessionId) -> String {
    format!("autopoiesis://sessions/{session}/history")
}

/// The answer to a URI that names no resource of this server.
#[must_use]
pub fn not_found(uri: &str) -> ErrorData {
    ErrorData::resource_not_found(
        format!("No such resource: {uri}"),
        Some(json!({ "uri": uri })),
    )
}

/// `resources/list`: the two fixed resources (histories come through the
/// template).
#[must_use]
pub fn list() -> Vec<Resource> {
    vec![
        Resource::new(SESSIONS_URI, "sessions")
            .with_title("Chat sessions")
            .with_description(
                "The chat sessions, oldest first: {count, items: [{id, created_at, message_count, last_seq}]}. \
                 Subscribe to hear when a turn starts or ends on any session, or one is deleted.",
            )
            .with_mime_type(JSON),
        Resource::new(APPROVALS_URI, "approvals")
            .with_title("Pending approvals")
            .with_description(
                "The pending approval envelopes, oldest first (the first 500; count is the total), \
                 as approval.list answers them. Subscribe to hear when one is created or decided.",
            )
            .with_mime_type(JSON),
    ]
}

/// `resources/templates/list`.
#[must_use]
pub fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new(HISTORY_TEMPLATE, "session-history")
            .with_title("A session's history")
            .with_description(
                "One session's messages, oldest first: {session_id, messages}, as \
                 GET /api/sessions/{id}/history answers. Ids complete through completion/complete. \
                 Subscribe to hear when a turn on it ends.",
            )
            .with_mime_type(JSON),
    ]
}

/// Reads resources and completes their ids.
pub struct Resources {
    control: Arc<ControlTools>,
    sessions: Arc<SessionService>,
}

impl Resources {
    #[must_use]
    pub fn new(control: Arc<ControlTools>, sessions: Arc<SessionService>) -> Self {
        Self { control, sessions }
    }

    /// `resources/read` of `uri`: one JSON text content.
    ///
    /// # Errors
    /// Resource not found for a URI this server does not serve or a
    /// session it does not know; an internal error when a store fails.
    pub async fn read(&self, uri: &str) -> Result<ReadResourceResult, ErrorData> {
        let data = match ResourceUri::parse(uri).ok_or_else(|| not_found(uri))? {
            ResourceUri::Sessions => {
                let list = self.sessions.list().await.map_err(unavailable)?;
                envelope::sessions(&list).data
            }
            ResourceUri::Approvals => {
                match self.control.approval_list(Some(MAX_PAGE_SIZE), None).await {
                    Ok(page) => page.data,
                    Err(failed) => {
                        let envelope = failed.envelope();
                        return Err(ErrorData::internal_error(
                            failed.error.to_string(),
                            Some(envelope.to_json()),
                        ));
                    }
                }
            }
            ResourceUri::History(id) => match self.sessions.history(&id).await {
                Ok(messages) => json!({
                    "session_id": id.as_str(),
                    "messages": messages
                        .iter()
                        .map(|m| serde_json::to_value(m).unwrap_or_default())
                        .collect::<Vec<Value>>(),
                }),
                Err(SessionStoreError::NotFound) => {
                    return Err(ErrorData::resource_not_found(
                        format!("No session {id}"),
                        Some(json!({ "uri": uri, "session_id": id.as_str() })),
                    ));
                }
                Err(error) => return Err(unavailable(error)),
            },
        };
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(data.to_string(), uri).with_mime_type(JSON),
        ]))
    }

    /// `completion/complete`: session ids starting with the typed prefix,
    /// newest first, for the history template's `id`.
    ///
    /// # Errors
    /// Invalid params for a prompt (there are none), another template or
    /// argument; an internal error when the session store fails.
    pub async fn complete(
        &self,
        request: &CompleteRequestParams,
    ) -> Result<CompleteResult, ErrorData> {
        match &request.r#ref {
            Reference::Resource(template) if template.uri == HISTORY_TEMPLATE => {}
            Reference::Resource(template) => {
                return Err(ErrorData::invalid_params(
                    format!("No resource template {}", template.uri),
                    None,
                ));
            }
            Reference::Prompt(prompt) => {
                return Err(ErrorData::invalid_params(
                    format!("No prompt {}: this server offers none", prompt.name),
                    None,
                ));
            }
            _ => {
                return Err(ErrorData::invalid_params(
                    "Only the resource template autopoiesis://sessions/{id}/history completes",
                    None,
                ));
            }
        }
        if request.argument.name != ID_ARGUMENT {
            return Err(ErrorData::invalid_params(
                format!(
                    "{HISTORY_TEMPLATE} has no argument {}; it has {ID_ARGUMENT}",
                    request.argument.name
                ),
                None,
            ));
        }
        let prefix = request.argument.value.as_str();
        let list = self.sessions.list().await.map_err(unavailable)?;
        let matching: Vec<String> = list
            .iter()
            .rev()
            .map(|session| session.id.as_str())
            .filter(|id| id.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        let total = matching.len();
        let values: Vec<String> = matching.into_iter().take(MAX_COMPLETIONS).collect();
        let completion = CompletionInfo::with_pagination(
            values,
            Some(u32::try_from(total).unwrap_or(u32::MAX)),
            total > MAX_COMPLETIONS,
        )
        .map_err(|e| ErrorData::internal_error(e, None))?;
        Ok(CompleteResult::new(completion))
    }
}

/// A session store failure: logged here, told as a generic message.
fn unavailable(error: SessionStoreError) -> ErrorData {
    tracing::error!(%error, "MCP resource read failed on the session store");
    ErrorData::internal_error("The session store is unavailable; try again shortly", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_uris_this_server_writes_name_resources() {
        assert_eq!(
            ResourceUri::parse(SESSIONS_URI),
            Some(ResourceUri::Sessions)
        );
        assert_eq!(
            ResourceUri::parse(APPROVALS_URI),
            Some(ResourceUri::Approvals)
        );
        let id = SessionId::parse("a.b:c-1").unwrap();
        assert_eq!(
            ResourceUri::parse(&history_uri(&id)),
            Some(ResourceUri::History(id))
        );
        for other in [
            "autopoiesis://sessions/",
            "autopoiesis://sessions//history",
            "autopoiesis://sessions/a b/history",
            "autopoiesis://sessions/a/history/more",
            "autopoiesis://sessions/a/b/history",
            "test://watched-resource",
            "autopoiesis://approvals/",
        ] {
            assert_eq!(ResourceUri::parse(other), None, "{other}");
        }
    }
}

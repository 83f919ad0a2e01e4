//! Session activity as MCP notifications: one task per endpoint reads the
//! hub's [activities](crate::adapters::stream::SessionHub::activities) and
//! tells subscribed clients that the session list or a history changed
//! (`notifications/resources/updated`), and clients that set a log level
//! what happened (`notifications/message`).
//!
//! Log messages say what happened to which session and turn, and for a
//! failed turn its code and one trimmed line of its message (what the
//! session's stream clients were told): never a prompt, a reply or a key.

#![allow(deprecated)] // MCP logging is deprecated by SEP-2577 yet still served to the 2025 eras.

use std::sync::Weak;

use rmcp::model::LoggingLevel;
use serde_json::{Value, json};
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::clients::McpClients;
use super::resources::{SESSIONS_URI, history_uri};
use crate::adapters::stream::{Activity, ActivityKind, Ending};
use crate::domain::events::APPROVAL_UNSUPPORTED_CODE;

/// Spawns the task; it ends with the endpoint (`clients` dropped), the hub
/// (the channel closed) or `stop`. Outside a runtime it does nothing.
pub fn spawn(
    clients: Weak<McpClients>,
    mut activities: Receiver<Activity>,
    stop: CancellationToken,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime: MCP clients will not hear of session activity");
        return;
    };
    runtime.spawn(async move {
        loop {
            let activity = tokio::select! {
                () = stop.cancelled() => return,
                received = activities.recv() => match received {
                    Ok(activity) => activity,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "MCP notifier fell behind session activity");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            let Some(clients) = clients.upgrade() else {
                return;
            };
            tell(&clients, &activity).await;
        }
    });
}

/// Tells the clients of one activity.
async fn tell(clients: &McpClients, activity: &Activity) {
    let (uris, level, data) = notifications(activity);
    futures::join!(
        clients.notify_resources_updated(&uris),
        clients.log(level, data)
    );
}

/// The resources that changed, and the log message, for `activity`.
fn notifications(activity: &Activity) -> (Vec<String>, LoggingLevel, Value) {
    let session = activity.session.as_str();
    let turn = activity.turn.as_ref().map(|t| t.as_str());
    let history = history_uri(&activity.session);
    match &activity.kind {
        // A new session may have appeared in the list; no history is
        // stored before the turn ends.
        ActivityKind::TurnStarted => (
            vec![SESSIONS_URI.to_owned()],
            LoggingLevel::Debug,
            json!({"event": "turn.started", "session_id": session, "turn_id": turn,
                   "message": format!("A turn started on session {session}")}),
        ),
        ActivityKind::TurnEnded(ending) => {
            let uris = vec![history, SESSIONS_URI.to_owned()];
            let (level, data) = match ending {
                Ending::Done => (
                    LoggingLevel::Info,
                    json!({"event": "turn.done", "message": format!("A turn finished on session {session}")}),
                ),
                Ending::Cancelled => (
                    LoggingLevel::Notice,
                    json!({"event": "turn.cancelled", "message": format!("A turn was cancelled on session {session}")}),
                ),
                Ending::Failed { code, message } => (
                    if code.as_deref() == Some(APPROVAL_UNSUPPORTED_CODE) {
                        LoggingLevel::Notice
                    } else {
                        LoggingLevel::Error
                    },
                    json!({"event": "turn.failed", "code": code,
                           "message": format!("A turn failed on session {session}: {message}")}),
                ),
            };
            let mut data = data;
            data["session_id"] = json!(session);
            data["turn_id"] = json!(turn);
            (uris, level, data)
        }
        ActivityKind::Deleted => (
            vec![history, SESSIONS_URI.to_owned()],
            LoggingLevel::Notice,
            json!({"event": "session.deleted", "session_id": session,
                   "message": format!("Session {session} was deleted")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::session::{SessionId, TurnId};

    fn activity(kind: ActivityKind) -> Activity {
        Activity {
            session: SessionId::parse("s1").unwrap(),
            turn: Some(TurnId::from("t1")),
            kind,
        }
    }

    #[test]
    fn a_turn_that_ends_changes_its_history_and_the_list_and_a_failure_is_an_error() {
        let (uris, level, data) =
            notifications(&activity(ActivityKind::TurnEnded(Ending::Failed {
                code: None,
                message: "provider down".into(),
            })));
        assert_eq!(
            uris,
            [
                "autopoiesis://sessions/s1/history",
                "autopoiesis://sessions"
            ]
        );
        assert_eq!(level, LoggingLevel::Error);
        assert_eq!(data["event"], "turn.failed");
        assert_eq!(data["session_id"], "s1");
        assert_eq!(data["turn_id"], "t1");
        assert_eq!(
            data["message"],
            "A turn failed on session s1: provider down"
        );
    }

    #[test]
    fn a_deferred_turn_is_a_notice_and_a_started_one_changes_only_the_list() {
        let (_, level, _) = notifications(&activity(ActivityKind::TurnEnded(Ending::Failed {
            code: Some(APPROVAL_UNSUPPORTED_CODE.into()),
            message: "needs approval".into(),
        })));
        assert_eq!(level, LoggingLevel::Notice);
        let (uris, level, _) = notifications(&activity(ActivityKind::TurnStarted));
        assert_eq!(uris, ["autopoiesis://sessions"]);
        assert_eq!(level, LoggingLevel::Debug);
    }
}

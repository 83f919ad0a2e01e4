//! What happens on sessions, told to observers of every session at once
//! (the MCP adapter's resource subscriptions and log notifications): a
//! turn began, a turn's ending became visible (its history is stored by
//! then), a session was deleted. The hub tells it as it numbers, stores
//! or forgets a stream; nobody polls.
//!
//! A tokio broadcast channel: publishing never blocks a turn, and an
//! observer that falls more than [`CAPACITY`] behind misses the oldest
//! (its receiver says how many) rather than holding anything up.

use serde_json::Value;
use tokio::sync::broadcast;

use crate::domain::events::SessionEvent;
use crate::domain::session::{SessionId, TurnId};

/// Activities an observer may fall behind by before it misses some.
pub const CAPACITY: usize = 1024;

/// Longest error message an activity carries (longer ones are cut).
const MAX_MESSAGE_CHARS: usize = 300;

/// One thing that happened on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub session: SessionId,
    /// The turn it belongs to; `None` for a deletion.
    pub turn: Option<TurnId>,
    pub kind: ActivityKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivityKind {
    /// A turn started (its prompt is on the stream).
    TurnStarted,
    /// A turn's terminal event is visible to clients, so its history is
    /// stored: the session's messages changed.
    TurnEnded(Ending),
    /// The session was deleted.
    Deleted,
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Done,
    Cancelled,
    /// An `error` event: its code (`approval_unsupported`, `turn_interrupted`,
    /// `storage_unavailable`...) and its message, on one line and cut to a
    /// few hundred characters: what every stream client of the session was
    /// told anyway, never more.
    Failed {
        code: Option<String>,
        message: String,
    },
}

impl Ending {
    /// The ending a terminal event tells; `None` for any other event.
    #[must_use]
    pub fn of_event(event: &SessionEvent) -> Option<Self> {
        match event {
            SessionEvent::Done { .. } => Some(Self::Done),
            SessionEvent::Cancelled { .. } => Some(Self::Cancelled),
            SessionEvent::Error { code, message } => Some(Self::Failed {
                code: code.map(str::to_owned),
                message: one_line(message),
            }),
            SessionEvent::ApprovalRecorded { .. } => {
                let (_, data) = super::frames::encode_event(event, None);
                Some(Self::failed_from(&data))
            }
            _ => None,
        }
    }

    /// The ending a stored frame (`{"op", "data", ...}` as JSON text) of
    /// kind `op` tells; `None` unless it is a terminal one.
    #[must_use]
    pub fn of_frame(op: &str, json: &str) -> Option<Self> {
        match op {
            "done" => Some(Self::Done),
            "cancelled" => Some(Self::Cancelled),
            "error" => {
                let frame: Value = serde_json::from_str(json).unwrap_or_default();
                Some(Self::failed_from(&frame["data"]))
            }
            _ => None,
        }
    }

    fn failed_from(data: &Value) -> Self {
        Self::Failed {
            code: data["code"].as_str().map(str::to_owned),
            message: one_line(data["message"].as_str().unwrap_or_default()),
        }
    }
}

/// The first line of `text`, cut to [`MAX_MESSAGE_CHARS`].
fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    match line.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

/// The sending side, held by the hub.
pub struct Activities(broadcast::Sender<Activity>);

impl Default for Activities {
    fn default() -> Self {
        Self(broadcast::Sender::new(CAPACITY))
    }
}

impl Activities {
    /// A receiver of every activity from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Activity> {
        self.0.subscribe()
    }

    /// Tells every observer; nobody listening is fine.
    pub fn tell(&self, session: &SessionId, turn: Option<&TurnId>, kind: ActivityKind) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let _ = self.0.send(Activity {
            session: session.clone(),
            turn: turn.cloned(),
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_ending_carries_its_code_and_the_first_line_of_its_message_cut_short() {
        let long = format!("{}\n  File \"/srv/app.py\", line 3", "x".repeat(400));
        let ending = Ending::of_event(&SessionEvent::Error {
            code: Some("provider_error"),
            message: long,
        });
        let Some(Ending::Failed { code, message }) = ending else {
            panic!("{ending:?}");
        };
        assert_eq!(code.as_deref(), Some("provider_error"));
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(!message.contains("app.py"), "{message}");
    }

    #[test]
    fn only_terminal_events_and_frames_are_endings() {
        let token = SessionEvent::Token {
            content: "hi".into(),
        };
        assert_eq!(Ending::of_event(&token), None);
        assert_eq!(
            Ending::of_event(&SessionEvent::Done {
                content: "hi".into()
            }),
            Some(Ending::Done)
        );
        assert_eq!(
            Ending::of_event(&SessionEvent::ApprovalRecorded {
                approval_id: "a".into()
            }),
            Some(Ending::Failed {
                code: Some("approval_unsupported".into()),
                message: crate::domain::events::APPROVAL_RECORDED_MESSAGE.into(),
            })
        );
        assert_eq!(Ending::of_frame("token", "{}"), None);
        assert_eq!(
            Ending::of_frame(
                "error",
                r#"{"op":"error","data":{"code":"turn_interrupted","message":"cut"}}"#
            ),
            Some(Ending::Failed {
                code: Some("turn_interrupted".into()),
                message: "cut".into()
            })
        );
    }
}

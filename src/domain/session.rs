//! Session identity and metadata.

use std::fmt;

use chrono::{DateTime, Utc};

/// A validated session id: 1 to 128 characters of `[A-Za-z0-9._:-]`.
///
/// Ids are chosen by clients (WebSocket URLs, `session_id` in a chat body) so
/// they are validated once, here, and every layer after this one can put them
/// in a log line, a URL or a map key without further checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

/// Why a string is not a [`SessionId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session id: must be 1-128 characters of A-Z a-z 0-9 . _ : -")]
pub struct InvalidSessionId;

impl SessionId {
    /// The longest accepted id.
    pub const MAX_LEN: usize = 128;

    /// Parses a client-supplied id.
    ///
    /// # Errors
    /// [`InvalidSessionId`] when the id is empty, longer than 128 characters
    /// or contains a character outside `[A-Za-z0-9._:-]`.
    pub fn parse(raw: &str) -> Result<Self, InvalidSessionId> {
        let valid = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidSessionId)
        }
    }

    /// A fresh server-chosen id: 32 lowercase hex characters.
    #[must_use]
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies one chat turn in the session's event stream, so a client can
/// tell which events belong together and which turn to cancel. Every event
/// of a turn carries it, so cloning it is a reference-count increment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TurnId(std::sync::Arc<str>);

impl TurnId {
    #[must_use]
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string().into())
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A turn id as stored or sent before (a turn record, an event's
/// `turn_id`): ids are opaque, so any text the server wrote is one.
impl From<&str> for TurnId {
    fn from(id: &str) -> Self {
        Self(id.into())
    }
}

impl fmt::Display for TurnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a client sees of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    pub created_at: DateTime<Utc>,
    /// Number of messages in the history (requests plus responses).
    pub message_count: usize,
    /// Size of the history's text ([`crate::domain::message::ModelMessage::size`]),
    /// checked against the history cap before a turn starts.
    pub history_bytes: usize,
    /// The seq of the newest event of the session's stream (0: none yet).
    /// Stores report what they keep; the session service overlays the live
    /// figure of a stream open in this process.
    pub last_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_accepts_the_documented_alphabet() {
        assert!(SessionId::parse("abc-DEF_0.9:x").is_ok());
        assert!(SessionId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn session_id_rejects_empty_long_and_foreign_characters() {
        for bad in ["", "a b", "a/b", "é", "a\nb", &"a".repeat(129)] {
            assert_eq!(SessionId::parse(bad), Err(InvalidSessionId), "{bad:?}");
        }
    }

    #[test]
    fn generated_session_ids_are_32_lowercase_hex_characters() {
        let id = SessionId::generate();
        assert_eq!(id.as_str().len(), 32);
        assert!(
            id.as_str()
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }
}

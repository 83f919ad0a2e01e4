//! What one MCP session of the `initialize` era asked for: the resources
//! it subscribed to (`resources/subscribe`) and the level of log
//! notifications it wants (`logging/setLevel`). Held by the session's
//! handler and by the client registry, which drops it once the session's
//! transport is closed: subscriptions end with their session.
//!
//! No log notification is sent to a session until it sets a level: a
//! client that never asked is not flooded, and one that asks gets every
//! message at or above its level from then on.

#![allow(deprecated)] // MCP logging is deprecated by SEP-2577 yet still served to the 2025 eras.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rmcp::model::LoggingLevel;

/// Resources one session may subscribe to at once.
pub const MAX_SUBSCRIPTIONS: usize = 256;

/// One session's subscriptions and log level.
#[derive(Debug, Default)]
pub struct SessionState {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    subscriptions: HashSet<String>,
    /// `None` until the client sets one: no log notifications.
    level: Option<LoggingLevel>,
}

/// A subscription past [`MAX_SUBSCRIPTIONS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "This MCP session already has {0} resource subscriptions, the most it may have; unsubscribe from one first"
)]
pub struct TooManySubscriptions(pub usize);

impl SessionState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to `uri` (again is fine).
    ///
    /// # Errors
    /// [`TooManySubscriptions`] for a new one past the cap.
    pub fn subscribe(&self, uri: &str) -> Result<(), TooManySubscriptions> {
        let mut inner = self.lock();
        if !inner.subscriptions.contains(uri) && inner.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(TooManySubscriptions(MAX_SUBSCRIPTIONS));
        }
        inner.subscriptions.insert(uri.to_owned());
        Ok(())
    }

    /// Ends the subscription to `uri`, if there was one.
    pub fn unsubscribe(&self, uri: &str) {
        self.lock().subscriptions.remove(uri);
    }

    #[must_use]
    pub fn is_subscribed(&self, uri: &str) -> bool {
        self.lock().subscriptions.contains(uri)
    }

    pub fn set_level(&self, level: LoggingLevel) {
        self.lock().level = Some(level);
    }

    /// Whether a log message at `level` goes to this session.
    #[must_use]
    pub fn hears(&self, level: LoggingLevel) -> bool {
        self.lock()
            .level
            .is_some_and(|wanted| severity(level) >= severity(wanted))
    }
}

/// Syslog's order, as MCP defines it: debug is the least severe.
fn severity(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_log_message_is_heard_until_a_level_is_set_then_those_at_or_above_it() {
        let state = SessionState::default();
        assert!(!state.hears(LoggingLevel::Emergency));
        state.set_level(LoggingLevel::Warning);
        assert!(!state.hears(LoggingLevel::Debug));
        assert!(!state.hears(LoggingLevel::Notice));
        assert!(state.hears(LoggingLevel::Warning));
        assert!(state.hears(LoggingLevel::Error));
        state.set_level(LoggingLevel::Debug);
        assert!(state.hears(LoggingLevel::Debug));
    }

    #[test]
    fn subscriptions_are_capped_and_an_unsubscribe_makes_room() {
        let state = SessionState::default();
        for n in 0..MAX_SUBSCRIPTIONS {
            state
                .subscribe(&format!("autopoiesis://sessions/s{n}/history"))
                .unwrap();
        }
        assert_eq!(
            state.subscribe("autopoiesis://sessions"),
            Err(TooManySubscriptions(MAX_SUBSCRIPTIONS))
        );
        // One already held is no new subscription.
        state
            .subscribe("autopoiesis://sessions/s0/history")
            .unwrap();
        state.unsubscribe("autopoiesis://sessions/s0/history");
        assert!(!state.is_subscribed("autopoiesis://sessions/s0/history"));
        state.subscribe("autopoiesis://sessions").unwrap();
        assert!(state.is_subscribed("autopoiesis://sessions"));
    }
}

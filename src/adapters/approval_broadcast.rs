//! [`ApprovalEvents`] for this process: a version counter that dashboard
//! streams wait on, plus the MCP server's push to its connected clients.

use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use crate::ports::ApprovalEvents;

/// Something told of every approval change; returns whether it reached at
/// least one client.
pub type Listener = Box<dyn Fn() -> bool + Send + Sync>;

pub struct ApprovalBroadcast {
    /// Bumped on every change; receivers see the latest value.
    version: watch::Sender<u64>,
    listeners: Mutex<Vec<Listener>>,
}

impl Default for ApprovalBroadcast {
    fn default() -> Self {
        Self {
            version: watch::Sender::new(0),
            listeners: Mutex::default(),
        }
    }
}

impl ApprovalBroadcast {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver that wakes on each change (changes in a burst coalesce).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Adds a listener, e.g. the MCP server's notifier.
    pub fn add_listener(&self, listener: Listener) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }
}

impl ApprovalEvents for ApprovalBroadcast {
    fn approvals_changed(&self) -> bool {
        self.version.send_modify(|v| *v += 1);
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Every listener is told, even after one has reached a client.
        let mut told = false;
        for listener in listeners.iter() {
            told |= listener();
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_wakes_subscribers_and_reports_whether_a_listener_told_anyone() {
        let broadcast = ApprovalBroadcast::new();
        let mut rx = broadcast.subscribe();
        assert!(!broadcast.approvals_changed(), "nobody to tell yet");
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        broadcast.add_listener(Box::new(|| false));
        broadcast.add_listener(Box::new(|| true));
        assert!(broadcast.approvals_changed());
        assert!(rx.has_changed().unwrap());
    }
}

//! [`ApprovalEvents`] for this process: a version counter that dashboard
//! streams wait on, plus the listeners (the MCP server's push to its
//! connected clients, the dashboard streams) that can say whether anyone
//! is there to hear of a change.

use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use crate::ports::ApprovalEvents;

/// Something told of every approval change.
pub trait ApprovalListener: Send + Sync {
    /// Approvals changed: tell your clients. Must not block.
    fn approvals_changed(&self);

    /// Whether one of your clients hears of a change made now.
    fn is_listening(&self) -> bool;
}

pub struct ApprovalBroadcast {
    /// Bumped on every change; receivers see the latest value.
    version: watch::Sender<u64>,
    listeners: Mutex<Vec<Box<dyn ApprovalListener>>>,
    /// Tells other instances on the database of a change made here.
    peers: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Default for ApprovalBroadcast {
    fn default() -> Self {
        Self {
            version: watch::Sender::new(0),
            listeners: Mutex::default(),
            peers: std::sync::OnceLock::new(),
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
    pub fn add_listener(&self, listener: Box<dyn ApprovalListener>) {
        self.lock().push(listener);
    }

    /// Whether any listener has a client that hears of a change made now
    /// (a decision's `meta.notification_emitted`).
    #[must_use]
    pub fn is_heard(&self) -> bool {
        self.lock().iter().any(|listener| listener.is_listening())
    }

    /// Sets how other instances hear of changes made here (once; later
    /// calls are ignored).
    pub fn set_peers(&self, tell: Box<dyn Fn() + Send + Sync>) {
        let _ = self.peers.set(tell);
    }

    /// Approvals changed on another instance: tell this one's listeners
    /// (and not the peers again).
    pub fn changed_elsewhere(&self) {
        self.tell_listeners();
    }

    fn tell_listeners(&self) {
        self.version.send_modify(|v| *v += 1);
        for listener in self.lock().iter() {
            listener.approvals_changed();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn ApprovalListener>>> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl ApprovalEvents for ApprovalBroadcast {
    fn approvals_changed(&self) {
        self.tell_listeners();
        if let Some(tell) = self.peers.get() {
            tell();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    struct Probe {
        told: Arc<AtomicUsize>,
        listening: Arc<AtomicBool>,
    }

    impl ApprovalListener for Probe {
        fn approvals_changed(&self) {
            self.told.fetch_add(1, Ordering::SeqCst);
        }

        fn is_listening(&self) -> bool {
            self.listening.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_change_wakes_subscribers_and_tells_every_listener() {
        let broadcast = ApprovalBroadcast::new();
        let mut rx = broadcast.subscribe();
        broadcast.approvals_changed();
        assert!(!broadcast.is_heard(), "nobody to tell yet");
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();

        let told = Arc::new(AtomicUsize::new(0));
        let (deaf, listening) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        for flag in [&deaf, &listening] {
            broadcast.add_listener(Box::new(Probe {
                told: Arc::clone(&told),
                listening: Arc::clone(flag),
            }));
        }
        broadcast.approvals_changed();
        assert_eq!(told.load(Ordering::SeqCst), 2, "every listener is told");
        assert!(rx.has_changed().unwrap());
        assert!(!broadcast.is_heard(), "listeners without clients");
        listening.store(true, Ordering::SeqCst);
        assert!(broadcast.is_heard(), "one listener with a client is enough");
    }
}

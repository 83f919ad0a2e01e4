//! The MCP clients a change can be pushed to right now: sessions of the
//! `initialize` era and open `subscriptions/listen` streams of the
//! 2026-07-28 era. The approval listener tells them all, and says whether
//! there was anyone to tell.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rmcp::service::{Peer, RoleServer, SubscriptionSink};

use crate::adapters::approval_broadcast::ApprovalListener;

/// Every client that asked to hear about tool-list changes.
#[derive(Default)]
pub struct McpClients {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Initialised sessions. A `Peer` only sends into its session's worker:
    /// holding one does not keep the session alive, and once the session
    /// ends (DELETE, idle timeout, shutdown) its transport reports closed
    /// and it is dropped at the next change.
    sessions: Vec<Peer<RoleServer>>,
    /// Open listen streams, by a local id; each leaves when its stream ends.
    subscriptions: HashMap<u64, SubscriptionSink>,
    next_subscription: u64,
}

/// Keeps a listen stream registered; dropping it (the stream ended)
/// unregisters it.
pub struct Subscribed {
    clients: Weak<McpClients>,
    id: u64,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        if let Some(clients) = self.clients.upgrade() {
            clients.lock().subscriptions.remove(&self.id);
        }
    }
}

impl McpClients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a session that completed the `initialize` handshake.
    pub fn add_session(&self, peer: Peer<RoleServer>) {
        let mut registry = self.lock();
        registry.sessions.retain(|p| !p.is_transport_closed());
        registry.sessions.push(peer);
    }

    /// Adds a listen stream for as long as the returned guard lives.
    pub fn add_subscription(self: &Arc<Self>, sink: SubscriptionSink) -> Subscribed {
        let mut registry = self.lock();
        let id = registry.next_subscription;
        registry.next_subscription += 1;
        registry.subscriptions.insert(id, sink);
        Subscribed {
            clients: Arc::downgrade(self),
            id,
        }
    }

    /// Whether a live client would be told of a change now.
    pub fn has_clients(&self) -> bool {
        let mut registry = self.lock();
        registry.sessions.retain(|p| !p.is_transport_closed());
        !(registry.sessions.is_empty() && registry.subscriptions.is_empty())
    }

    /// Sends `notifications/tools/list_changed` to every live client, in a
    /// spawned task: the caller is deciding an approval and must not wait on
    /// a slow client.
    pub fn notify_tool_list_changed(&self) {
        let (sessions, subscriptions) = {
            let mut registry = self.lock();
            registry.sessions.retain(|p| !p.is_transport_closed());
            (
                registry.sessions.clone(),
                registry.subscriptions.values().cloned().collect::<Vec<_>>(),
            )
        };
        if sessions.is_empty() && subscriptions.is_empty() {
            return;
        }
        // Approvals change inside request handlers, so a runtime is there.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no async runtime to notify MCP clients from");
            return;
        };
        runtime.spawn(async move {
            let to_sessions = sessions.iter().map(|peer| async move {
                if let Err(e) = peer.notify_tool_list_changed().await {
                    tracing::debug!(error = %e, "an MCP session went away before it was notified");
                }
            });
            let to_subscriptions = subscriptions.iter().map(|sink| async move {
                if let Err(e) = sink.notify_tool_list_changed().await {
                    tracing::debug!(error = %e, "an MCP subscription ended before it was notified");
                }
            });
            futures::join!(
                futures::future::join_all(to_sessions),
                futures::future::join_all(to_subscriptions)
            );
        });
    }
}

/// The MCP clients as an approval listener. Weak: the broadcast outlives an
/// app built and dropped (tests build many); a dropped endpoint has nobody
/// to tell.
pub struct Listener(pub Weak<McpClients>);

impl ApprovalListener for Listener {
    fn approvals_changed(&self) {
        if let Some(clients) = self.0.upgrade() {
            clients.notify_tool_list_changed();
        }
    }

    fn is_listening(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|clients| clients.has_clients())
    }
}

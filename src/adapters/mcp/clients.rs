//! The MCP clients a change can be pushed to right now: sessions of the
//! `initialize` era (with what each subscribed to and its log level) and
//! open `subscriptions/listen` streams of the 2026-07-28 era. The approval
//! listener and the session notifier ([`super::notifier`]) tell them; a
//! decision says whether there was anyone to tell of a tool-list change.

#![allow(deprecated)] // MCP logging is deprecated by SEP-2577 yet still served to the 2025 eras.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rmcp::model::{
    LoggingLevel, LoggingMessageNotificationParam, ResourceUpdatedNotificationParam,
};
use rmcp::service::{Peer, RoleServer, SubscriptionSink};
use serde_json::Value;

use super::resources::APPROVALS_URI;
use super::state::SessionState;
use crate::adapters::approval_broadcast::ApprovalListener;

/// The logger log notifications name.
const LOGGER: &str = "autopoiesis";

/// Every client that may hear of a change.
#[derive(Default)]
pub struct McpClients {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Initialised sessions. A `Peer` only sends into its session's worker:
    /// holding one does not keep the session alive, and once the session
    /// ends (DELETE, idle timeout, shutdown) its transport reports closed
    /// and it is dropped (with its subscriptions) at the next change.
    sessions: Vec<Session>,
    /// Open listen streams, by a local id; each leaves when its stream ends.
    subscriptions: HashMap<u64, SubscriptionSink>,
    next_subscription: u64,
}

#[derive(Clone)]
struct Session {
    peer: Peer<RoleServer>,
    state: Arc<SessionState>,
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

fn hears_tools(sink: &SubscriptionSink) -> bool {
    sink.accepted().tools_list_changed == Some(true)
}

fn watches(sink: &SubscriptionSink, uri: &str) -> bool {
    sink.accepted()
        .resource_subscriptions
        .as_ref()
        .is_some_and(|uris| uris.iter().any(|u| u == uri))
}

impl McpClients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live sessions and the listen streams, as they are now.
    fn targets(&self) -> (Vec<Session>, Vec<SubscriptionSink>) {
        let mut registry = self.lock();
        registry.sessions.retain(|s| !s.peer.is_transport_closed());
        (
            registry.sessions.clone(),
            registry.subscriptions.values().cloned().collect(),
        )
    }

    /// Adds a session that completed the `initialize` handshake, with its
    /// subscriptions and log level.
    pub fn add_session(&self, peer: Peer<RoleServer>, state: Arc<SessionState>) {
        let mut registry = self.lock();
        registry.sessions.retain(|s| !s.peer.is_transport_closed());
        registry.sessions.push(Session { peer, state });
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

    /// Whether a live client would be told of a tool-list change now.
    pub fn has_clients(&self) -> bool {
        let (sessions, subscriptions) = self.targets();
        !sessions.is_empty() || subscriptions.iter().any(hears_tools)
    }

    /// Sends `notifications/tools/list_changed` to every live client.
    pub async fn notify_tool_list_changed(&self) {
        let (sessions, subscriptions) = self.targets();
        let to_sessions = sessions.iter().map(|session| async move {
            if let Err(e) = session.peer.notify_tool_list_changed().await {
                tracing::debug!(error = %e, "an MCP session went away before it was notified");
            }
        });
        let to_subscriptions = subscriptions.iter().filter(|sink| hears_tools(sink)).map(
            |sink| async move {
                if let Err(e) = sink.notify_tool_list_changed().await {
                    tracing::debug!(error = %e, "an MCP subscription ended before it was notified");
                }
            },
        );
        futures::join!(
            futures::future::join_all(to_sessions),
            futures::future::join_all(to_subscriptions)
        );
    }

    /// Sends `notifications/resources/updated` for each of `uris` to the
    /// clients subscribed to it.
    pub async fn notify_resources_updated(&self, uris: &[String]) {
        let (sessions, subscriptions) = self.targets();
        let mut sends = Vec::new();
        for uri in uris {
            for session in sessions.iter().filter(|s| s.state.is_subscribed(uri)) {
                sends.push(futures::future::Either::Left(async move {
                    let update = ResourceUpdatedNotificationParam::new(uri.clone());
                    if let Err(e) = session.peer.notify_resource_updated(update).await {
                        tracing::debug!(error = %e, "an MCP session went away before it was notified");
                    }
                }));
            }
            for sink in subscriptions.iter().filter(|sink| watches(sink, uri)) {
                sends.push(futures::future::Either::Right(async move {
                    if let Err(e) = sink.notify_resource_updated(uri.clone()).await {
                        tracing::debug!(error = %e, "an MCP subscription ended before it was notified");
                    }
                }));
            }
        }
        futures::future::join_all(sends).await;
    }

    /// Sends `notifications/message` at `level` to the sessions that set a
    /// level at or below it.
    pub async fn log(&self, level: LoggingLevel, data: Value) {
        let (sessions, _) = self.targets();
        let sends = sessions
            .iter()
            .filter(|s| s.state.hears(level))
            .map(|session| {
                let message =
                    LoggingMessageNotificationParam::new(level, data.clone()).with_logger(LOGGER);
                async move {
                    if let Err(e) = session.peer.notify_logging_message(message).await {
                        tracing::debug!(error = %e, "an MCP session went away before it was notified");
                    }
                }
            });
        futures::future::join_all(sends).await;
    }

    /// Approvals changed: the tool list (approval.list answers differently),
    /// the approvals resource and a log message, in a spawned task: the
    /// caller is deciding an approval and must not wait on a slow client.
    fn approvals_changed(self: Arc<Self>) {
        let (sessions, subscriptions) = self.targets();
        if sessions.is_empty() && subscriptions.is_empty() {
            return;
        }
        // Approvals change inside request handlers, so a runtime is there.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no async runtime to notify MCP clients from");
            return;
        };
        runtime.spawn(async move {
            let approvals = [APPROVALS_URI.to_owned()];
            futures::join!(
                self.notify_tool_list_changed(),
                self.notify_resources_updated(&approvals),
                self.log(
                    LoggingLevel::Info,
                    serde_json::json!({
                        "event": "approvals.changed",
                        "message": "Pending approvals changed (one was created or decided): read autopoiesis://approvals or call approval.list",
                    }),
                ),
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
            clients.approvals_changed();
        }
    }

    fn is_listening(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|clients| clients.has_clients())
    }
}

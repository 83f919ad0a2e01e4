//! The MCP adapter (SPEC A5, B7, B14): the control plane's tools, the
//! sessions, histories and approvals as resources, completion, resource
//! subscriptions, log notifications and `chat.send` progress, served over
//! rmcp's Streamable HTTP transport, which the HTTP adapter mounts at
//! `/mcp`; and the push of notifications to connected clients whenever
//! approvals or sessions change. rmcp types stop here.

mod clients;
mod handler;
mod notifier;
mod progress;
mod resources;
mod sessions;
mod state;

use std::sync::Arc;
use std::time::Duration;

use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

pub use self::clients::McpClients;
pub use self::handler::McpHandler;
pub use self::sessions::CountedSessions;
use crate::adapters::approval_broadcast::ApprovalBroadcast;
use crate::adapters::control::ControlTools;
use crate::adapters::persistence::SeaOrmMcpSessions;
use crate::adapters::stream::SessionHub;
use crate::domain::session_service::SessionService;
use rmcp::transport::streamable_http_server::session::store::{
    SessionState, SessionStore, SessionStoreError,
};

/// The MCP endpoint as a tower service.
pub type McpService = StreamableHttpService<McpHandler, CountedSessions>;

/// How the endpoint is served.
#[derive(Clone)]
pub struct McpSettings {
    /// `Host` header values accepted (DNS-rebinding protection), each a host
    /// (any port) or `host:port`; `*` accepts any host.
    pub allowed_hosts: Vec<String>,
    /// Interval of keep-alive pings on SSE streams.
    pub sse_keep_alive: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Cancelled at shutdown: sessions and their streams end, so the server
    /// does not wait on idle clients.
    pub close_streams: CancellationToken,
    /// Most `initialize` sessions at once (each also counts as a live
    /// client of the server).
    pub max_sessions: usize,
    /// A session without traffic for this long ends.
    pub session_idle: Duration,
    /// Where sessions are kept so that any instance on the database can
    /// restore one (rmcp's session store); `None`: this instance's memory.
    pub stored: Option<SeaOrmMcpSessions>,
}

/// The endpoint over `control` and `sessions`, and its MCP sessions (to
/// refuse a new one before rmcp does); `events` gets a listener that tells
/// every connected client when approvals change (and says whether there is
/// one), and `hub` counts the MCP sessions as clients, tells them of
/// session activity and streams `chat.send` progress.
///
/// Spawns the task that turns session activity into notifications: call
/// from within a tokio runtime.
#[must_use]
pub fn service(
    control: Arc<ControlTools>,
    sessions: Arc<SessionService>,
    events: &ApprovalBroadcast,
    hub: Arc<SessionHub>,
    settings: &McpSettings,
) -> (McpService, Arc<CountedSessions>) {
    let clients = Arc::new(McpClients::default());
    // Weak: the broadcast outlives an app built and dropped (tests build
    // many); a dropped endpoint has nobody to tell.
    events.add_listener(Box::new(clients::Listener(Arc::downgrade(&clients))));
    notifier::spawn(
        Arc::downgrade(&clients),
        hub.activities(),
        settings.close_streams.clone(),
    );
    let resources = Arc::new(resources::Resources::new(Arc::clone(&control), sessions));
    let handler = McpHandler::new(control, resources, Arc::clone(&hub), clients);
    let config = StreamableHttpServerConfig::default()
        // Both protocol eras: `initialize` sessions (with a GET stream for
        // notifications and DELETE to end them), and the session-less
        // 2026-07-28 requests, which rmcp serves whatever this says.
        .with_legacy_session_mode(true)
        .with_sse_keep_alive(Some(settings.sse_keep_alive))
        .with_max_request_body_bytes(settings.max_body_bytes)
        .with_cancellation_token(settings.close_streams.child_token());
    // Origin is checked by the HTTP guard for every route that needs it,
    // against the same allow-list as WebSockets; rmcp's own check stays off.
    let mut config = if settings.allowed_hosts.iter().any(|h| h == "*") {
        config.disable_allowed_hosts()
    } else {
        config.with_allowed_hosts(settings.allowed_hosts.iter().cloned())
    };
    // Behind a balancer a session's next request may reach another
    // instance: it restores the session from the database (replaying the
    // client's `initialize`), so no sticky sessions are needed. A GET
    // notification stream stays with the instance that serves it.
    config.session_store = settings
        .stored
        .clone()
        .map(|stored| Arc::new(StoredSessions(stored)) as Arc<dyn SessionStore>);
    let sessions = Arc::new(CountedSessions::new(
        hub,
        settings.max_sessions,
        settings.session_idle,
    ));
    let service = StreamableHttpService::new(
        move || Ok(handler.for_session()),
        Arc::clone(&sessions),
        config,
    );
    (service, sessions)
}

/// rmcp's session store over the database.
struct StoredSessions(SeaOrmMcpSessions);

#[async_trait::async_trait]
impl SessionStore for StoredSessions {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        match self.0.load(session_id).await? {
            Some(json) => Ok(Some(serde_json::from_str(&json)?)),
            None => Ok(None),
        }
    }

    async fn store(&self, session_id: &str, state: &SessionState) -> Result<(), SessionStoreError> {
        let json = serde_json::to_string(state)?;
        Ok(self.0.store(session_id, &json).await?)
    }

    async fn delete(&self, session_id: &str) -> Result<(), SessionStoreError> {
        Ok(self.0.delete(session_id).await?)
    }
}

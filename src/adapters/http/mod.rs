//! The HTTP adapter: the REST API (poem-openapi), the WebSocket endpoint, the
//! MCP endpoint, the served spec and docs, and the middleware every route
//! shares.

pub mod allow;
pub mod auth;
pub mod chat;
mod console;
pub mod dashboard;
pub mod dto;
pub mod health;
pub mod limits;
pub mod mcp_gate;
pub mod metrics;
pub mod openai_facade;
pub mod request_log;
pub mod server;
pub mod session_id;
pub mod sessions;
pub mod spec;
pub mod sse;
pub mod tickets;

use std::sync::Arc;
use std::time::Duration;

use poem::endpoint::{BoxEndpoint, TowerCompatExt};
use poem::http::StatusCode;
use poem::web::Json;
use poem::{Endpoint, EndpointExt, IntoResponse, Response, Route, get, post};
use poem_openapi::{LicenseObject, OpenApiService, ServerObject, Tags};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::allow::AllowHeader;
use self::auth::{ApiKey, Guard, HostPolicy, OriginPolicy, TicketBook};
use self::chat::ChatApi;
use self::dashboard::{DashboardApi, DashboardFeed};
use self::health::HealthApi;
use self::limits::BodyLimit;
use self::mcp_gate::McpSessionGate;
use self::metrics::MetricsApi;
use self::request_log::RequestLog;
use self::sessions::SessionsApi;
use self::spec::Guarded;
use self::tickets::TicketApi;
use crate::adapters::approval_broadcast::ApprovalBroadcast;
use crate::adapters::control::ControlTools;
use crate::adapters::mcp::{self, McpSettings};
use crate::adapters::persistence::SeaOrmMcpSessions;
use crate::adapters::stream::SessionHub;
use crate::adapters::ws::endpoint::{WsSettings, WsState, session_socket};
use crate::domain::chat::ChatService;
use crate::domain::control::ControlPlane;
use crate::domain::session_service::SessionService;

#[derive(Tags)]
enum ApiTags {
    /// Process health.
    System,
    /// Sessions, their history and their event streams.
    Sessions,
    /// Chat turns.
    Chat,
    /// The control plane for web front ends: the same envelopes as `/mcp`.
    Dashboard,
}

/// The domain services the HTTP adapter exposes.
#[derive(Clone)]
pub struct Services {
    pub chat: Arc<ChatService>,
    pub sessions: Arc<SessionService>,
    pub hub: Arc<SessionHub>,
    /// The control plane behind `/api/*` dashboard routes and `/mcp`.
    pub control: Arc<ControlPlane>,
    /// Wakes dashboard streams (and MCP clients) when approvals change.
    pub approval_events: Arc<ApprovalBroadcast>,
    /// Where `initialize`-era MCP sessions are kept for any instance to
    /// restore (several instances on one database); `None`: in memory.
    pub mcp_sessions: Option<SeaOrmMcpSessions>,
}

/// Limits and switches of the HTTP surface.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// When set, every route but `GET /api/health` (and the docs) needs it.
    pub api_key: Option<ApiKey>,
    /// Foreign origins allowed to open WebSockets and `/mcp`.
    pub origins: OriginPolicy,
    /// How long a connection ticket stays valid.
    pub ticket_ttl: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// A request body must arrive whole within this time of its head.
    pub body_timeout: Duration,
    /// Interval of SSE keep-alive comments.
    pub sse_keep_alive: Duration,
    /// `/api/stream` sends a fresh snapshot at least this often.
    pub dashboard_refresh: Duration,
    pub ws: WsSettings,
    /// `Host` values every route accepts (DNS-rebinding protection): names
    /// (any port) or `name:port`; `*` accepts any; IP literals always pass.
    pub allowed_hosts: Vec<String>,
    /// Most MCP `initialize` sessions at once; each also counts against
    /// the server's client limit. Beyond it `initialize` answers 429.
    pub max_mcp_sessions: usize,
    /// An MCP session without traffic for this long ends.
    pub mcp_session_idle: Duration,
    /// Cancelled at shutdown once running turns are done: MCP sessions,
    /// dashboard streams and their streams end then, so graceful shutdown
    /// does not wait on idle clients.
    pub close_streams: CancellationToken,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            origins: OriginPolicy::default(),
            ticket_ttl: Duration::from_secs(30),
            max_body_bytes: 2 * 1024 * 1024,
            body_timeout: Duration::from_secs(30),
            sse_keep_alive: Duration::from_secs(15),
            dashboard_refresh: Duration::from_secs(5),
            ws: WsSettings::default(),
            allowed_hosts: ["localhost", "127.0.0.1", "::1"]
                .map(str::to_owned)
                .to_vec(),
            max_mcp_sessions: 1000,
            mcp_session_idle: Duration::from_secs(120),
            close_streams: CancellationToken::new(),
        }
    }
}

/// The WebSocket route.
pub const WEBSOCKET_PATH: &str = "/api/ws/:session_id";

/// The MCP endpoint (Streamable HTTP): POST for messages, GET for the
/// session's notification stream, DELETE to end a session.
pub const MCP_PATH: &str = "/mcp";

/// Routes served outside the OpenAPI service, as (method, path). Every route
/// mounted in [`app`] is either in the spec or here: the auth test walks
/// both, so a route added without auth fails it.
pub const PLAIN_ROUTES: &[(&str, &str)] = &[
    ("GET", WEBSOCKET_PATH),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", MCP_PATH),
    ("GET", MCP_PATH),
    ("DELETE", MCP_PATH),
];

/// The operations, with what the middleware answers before them.
type Apis = Guarded<(
    HealthApi,
    MetricsApi,
    TicketApi,
    SessionsApi,
    ChatApi,
    DashboardApi,
)>;

/// The typed REST API; its spec is `openapi.yaml`.
#[must_use]
pub fn api_service(
    services: &Services,
    settings: &HttpSettings,
    tickets: &Arc<TicketBook>,
) -> OpenApiService<Apis, ()> {
    let tools = control_tools(services);
    OpenApiService::new(
        Guarded((
            HealthApi,
            MetricsApi {
                handle: crate::adapters::metrics::prometheus(),
                control: Arc::clone(&services.control),
            },
            TicketApi {
                tickets: Arc::clone(tickets),
            },
            SessionsApi {
                sessions: Arc::clone(&services.sessions),
                chat: Arc::clone(&services.chat),
                hub: Arc::clone(&services.hub),
                keep_alive: settings.sse_keep_alive,
            },
            ChatApi {
                chat: Arc::clone(&services.chat),
            },
            DashboardApi {
                control: Arc::clone(&tools),
                feed: Arc::new(DashboardFeed::new(
                    tools,
                    &services.approval_events,
                    settings.dashboard_refresh,
                )),
                hub: Arc::clone(&services.hub),
                close_streams: settings.close_streams.clone(),
            },
        )),
        "autopoiesis",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "An AI agent on the network: sessions, chat turns streamed to every client of a \
         session, and a deferred tool-approval policy. The WebSocket protocol \
         (`GET /api/ws/{session_id}`) is described in docs/websocket.md.",
    )
    .license(LicenseObject::new("MIT").url("https://opensource.org/licenses/MIT"))
    // Relative: the server that serves this spec, wherever it runs.
    .server(ServerObject::new("/").description("The server this spec was fetched from"))
}

/// The control plane's tools, as `/mcp` and the dashboard routes serve them.
fn control_tools(services: &Services) -> Arc<ControlTools> {
    Arc::new(ControlTools::new(
        Arc::clone(&services.control),
        Arc::clone(&services.approval_events),
    ))
}

/// What tickets are signed with: derived from the API key, so every
/// instance with the key takes every instance's tickets (without a key,
/// tickets open nothing that is not open anyway).
fn ticket_secret(settings: &HttpSettings) -> [u8; 32] {
    settings
        .api_key
        .as_ref()
        .map_or([0; 32], auth::ApiKey::ticket_secret)
}

/// The whole route tree with its middleware.
#[must_use]
pub fn app(services: &Services, settings: &HttpSettings) -> BoxEndpoint<'static> {
    let tickets = TicketBook::new(settings.ticket_ttl, ticket_secret(settings));
    let api = api_service(services, settings, &tickets);
    let spec: serde_json::Value = serde_json::from_str(&api.spec()).unwrap_or_default();
    let ws_state = Arc::new(WsState {
        chat: Arc::clone(&services.chat),
        sessions: Arc::clone(&services.sessions),
        hub: Arc::clone(&services.hub),
        settings: settings.ws.clone(),
    });
    let (mcp, mcp_sessions) = mcp::service(
        control_tools(services),
        Arc::clone(&services.sessions),
        &services.approval_events,
        Arc::clone(&services.hub),
        &McpSettings {
            // The guard checks `Host` on every route before rmcp sees one.
            allowed_hosts: vec!["*".to_owned()],
            sse_keep_alive: settings.sse_keep_alive,
            max_body_bytes: settings.max_body_bytes,
            close_streams: settings.close_streams.clone(),
            max_sessions: settings.max_mcp_sessions,
            session_idle: settings.mcp_session_idle,
            stored: services.mcp_sessions.clone(),
        },
    );
    let facade = Arc::new(openai_facade::Facade {
        chat: Arc::clone(&services.chat),
        sessions: Arc::clone(&services.sessions),
        hub: Arc::clone(&services.hub),
        control: Arc::clone(&services.control),
    });
    Route::new()
        .at("/console/:file", get(console::asset).head(console::asset))
        .at(
            "/v1/models",
            get(openai_facade::models).data(Arc::clone(&facade)),
        )
        .at(
            "/v1/chat/completions",
            post(openai_facade::completions).data(facade),
        )
        .at("/openapi.json", api.spec_endpoint())
        .nest("/docs", api.swagger_ui())
        .at("/api/health", get(health::fast_health))
        .at(WEBSOCKET_PATH, get(session_socket).data(ws_state))
        .at(
            MCP_PATH,
            post(mcp.clone().compat().with(McpSessionGate {
                sessions: mcp_sessions,
            }))
            .get(mcp.clone().compat())
            .delete(mcp.compat()),
        )
        // The API's paths are absolute, so it is nested at the root; the
        // console's page takes the root itself.
        .nest(
            "/",
            console::Root::new(
                poem::IntoEndpoint::into_endpoint(api),
                settings.api_key.is_some(),
            ),
        )
        // The body is read only once the request passed the guard: a client
        // without the key makes the server hold nothing.
        .with(BodyLimit::new(
            settings.max_body_bytes,
            settings.body_timeout,
        ))
        .with(Guard {
            key: settings.api_key.clone(),
            tickets,
            origins: settings.origins.clone(),
            hosts: HostPolicy {
                allowed: settings.allowed_hosts.clone(),
            },
        })
        .around(|endpoint, req| async move {
            let path = req.uri().path().to_owned();
            Ok(match endpoint.call(req).await {
                Ok(response) => response.into_response(),
                Err(error) => error_response(&error, &path),
            })
        })
        .with(AllowHeader::new(&spec, PLAIN_ROUTES))
        .with(RequestLog)
        .boxed()
}

/// Errors raised outside an operation (unknown route, wrong method, body
/// too large, too slow or naming a key twice) get the same JSON `detail`
/// body as the API's own, under `/v1` OpenAI's error object, which OpenAI
/// clients parse, and on the dashboard's tool routes their 400 envelope.
fn error_response(error: &poem::Error, path: &str) -> Response {
    let status = error.status();
    if error.is::<limits::KeyGivenTwice>()
        && let Some(response) = dashboard::refused_body(path, error)
    {
        return response;
    }
    let detail = match status {
        StatusCode::NOT_FOUND => "Not Found".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "Method Not Allowed".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => "Request body is too large".to_owned(),
        StatusCode::REQUEST_TIMEOUT => "Request body took too long to arrive".to_owned(),
        _ => error.to_string(),
    };
    if openai_facade::serves(path) {
        return openai_facade::route_error(status, &detail);
    }
    Json(json!({ "detail": detail }))
        .with_status(status)
        .into_response()
}

/// The REST API as described by `openapi.yaml` (and served at
/// `/openapi.json`), for printing its spec.
#[must_use]
pub fn spec_service(services: &Services) -> OpenApiService<Apis, ()> {
    let settings = HttpSettings::default();
    api_service(
        services,
        &settings,
        &TicketBook::new(settings.ticket_ttl, ticket_secret(&settings)),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests
/// in flight finish for up to `settings.grace` (see [`server`]).
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: BoxEndpoint<'static>,
    settings: server::ServerSettings,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    server::serve(listener, app, settings, shutdown).await
}

//! MCP at `/mcp` (SPEC A5, B5, B7, B14) spoken to by a real rmcp client over
//! Streamable HTTP: the six tools and their envelopes (`isError` on
//! failures), approvals decided end to end with
//! `notifications/tools/list_changed` reaching other clients, resources,
//! completion, subscriptions, log levels and progress, both protocol eras,
//! and the auth, Origin and Host checks.

// rmcp deprecates logging and resources/subscribe for the 2026-07-28 era;
// the 2025 eras, which clients speak today, have them.
#![allow(deprecated)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use autopoiesis::adapters::http::HttpSettings;
use autopoiesis::domain::chat::RuntimeSlot;
use reqwest::StatusCode;
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::model::{
    ArgumentInfo, CallToolRequestParams, CallToolResult, CompleteRequestParams, ErrorCode,
    LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken,
    ProtocolVersion, ReadResourceRequestParams, Reference, RequestMetaObject,
    ResourceUpdatedNotificationParam, ServerNotification, SetLevelRequestParams,
    SubscribeRequestParams, SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{
    ClientInitializeError, NotificationContext, RoleClient, RunningService, ServiceError,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ClientLifecycleMode, ClientServiceExt, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::helpers::{Options, TestApp, spawn_with};

const KEY: &str = "correct-horse";
const TOOL_PROMPT: &str = r#"/tool execute {"command":"ls"}"#;

/// A client that counts `notifications/tools/list_changed` and keeps the
/// resource updates, log messages and progress it is sent.
#[derive(Clone, Default)]
struct Recorder {
    tools_changed: Arc<watch::Sender<usize>>,
    /// The `uri` of each `notifications/resources/updated`.
    updated: Arc<watch::Sender<Vec<String>>>,
    /// Each `notifications/message`: its `data` with its `level` added.
    logs: Arc<watch::Sender<Vec<Value>>>,
    /// Each `notifications/progress`: progress and message.
    progress: Arc<watch::Sender<Vec<Progress>>>,
}

/// A `notifications/progress`: its progress and message.
type Progress = (f64, Option<String>);

impl ClientHandler for Recorder {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_changed.send_modify(|n| *n += 1);
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.updated.send_modify(|uris| uris.push(params.uri));
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let mut data = params.data;
        data["level"] = serde_json::to_value(params.level).unwrap();
        self.logs.send_modify(|logs| logs.push(data));
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress
            .send_modify(|p| p.push((params.progress, params.message)));
    }
}

/// Waits up to 5 s until `seen` holds what `done` looks for.
async fn until<T>(seen: &watch::Sender<T>, done: impl Fn(&T) -> bool) -> bool {
    let mut rx = seen.subscribe();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| done(v)))
        .await
        .is_ok_and(|seen| seen.is_ok())
}

impl Recorder {
    /// Waits up to 5 s until `n` notifications in all have arrived.
    async fn heard_tools_changed(&self, n: usize) -> bool {
        let mut count = self.tools_changed.subscribe();
        tokio::time::timeout(Duration::from_secs(5), count.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }
}

type Client = RunningService<RoleClient, Recorder>;

fn transport(
    app: &TestApp,
    headers: &[(&str, &str)],
) -> StreamableHttpClientTransport<reqwest::Client> {
    let headers: HashMap<HeaderName, HeaderValue> = headers
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            )
        })
        .collect();
    StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(app.url("/mcp")).custom_headers(headers),
    )
}

/// An MCP client of the `initialize` era, sending `headers` on every request.
async fn try_connect(
    app: &TestApp,
    headers: &[(&str, &str)],
) -> Result<Client, ClientInitializeError> {
    Recorder::default().serve(transport(app, headers)).await
}

async fn connect(app: &TestApp) -> Client {
    try_connect(app, &[]).await.unwrap()
}

/// An MCP client of the session-less 2026-07-28 era.
async fn connect_2026(app: &TestApp) -> Client {
    Recorder::default()
        .serve_with_lifecycle(
            transport(app, &[]),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .unwrap()
}

/// Calls `name` and returns the envelope of its one text content, checking
/// that the result is flagged `isError` exactly when the envelope is an
/// `error.*` one.
async fn call(client: &Client, name: &str, args: Value) -> Value {
    let mut params = CallToolRequestParams::new(name.to_owned());
    if let Value::Object(args) = args {
        params = params.with_arguments(args);
    }
    let result = client.call_tool(params).await.unwrap();
    envelope_of(name, &result)
}

/// The envelope of a tool's result, checked as [`call`] says.
fn envelope_of(name: &str, result: &CallToolResult) -> Value {
    assert_eq!(result.content.len(), 1, "{name}: {result:?}");
    let text = &result.content[0].as_text().expect("a text content").text;
    let envelope: Value = serde_json::from_str(text).unwrap();
    assert_eq!(envelope["meta"]["tool"], name, "{envelope}");
    chrono::DateTime::parse_from_rfc3339(envelope["meta"]["timestamp"].as_str().unwrap()).unwrap();
    let failed = envelope["type"]
        .as_str()
        .is_some_and(|kind| kind.starts_with("error."));
    assert_eq!(
        result.is_error,
        Some(failed),
        "{name}: isError must say whether the envelope is an error: {envelope}"
    );
    envelope
}

/// Decides the approval `id` (its id or nonce), without a reason.
async fn decide(client: &Client, id: &Value, approved: bool) -> Value {
    call(
        client,
        "approval.decide",
        json!({"approval_id": id, "approved": approved}),
    )
    .await
}

async fn unlocked_app() -> TestApp {
    spawn_with(Options {
        approval_key: true,
        ..Options::default()
    })
    .await
}

/// Asks the echo agent for a tool call: one pending approval.
async fn request_tool_call(client: &Client) -> Value {
    let reply = call(client, "chat.send", json!({"content": TOOL_PROMPT})).await;
    assert_eq!(reply["type"], "error.approval_unsupported", "{reply}");
    let list = call(client, "approval.list", json!({})).await;
    list["data"]["items"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn tools_list_has_the_six_tools_with_descriptions_and_schemas() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let info = client.peer_info().unwrap();
    assert_eq!(info.server_info.as_ref().unwrap().name, "autopoiesis");
    let tools_caps = info.capabilities.tools.as_ref().unwrap();
    assert_eq!(tools_caps.list_changed, Some(true));

    let tools = client.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "dashboard.status",
            "approval.list",
            "approval.decide",
            "system.info",
            "chat.send",
            "session.list"
        ]
    );
    for tool in &tools {
        assert!(
            tool.description.as_deref().is_some_and(|d| !d.is_empty()),
            "{}",
            tool.name
        );
        assert_eq!(tool.input_schema["type"], "object", "{}", tool.name);
    }
    let decide = tools.iter().find(|t| t.name == "approval.decide").unwrap();
    let properties = decide.input_schema["properties"].as_object().unwrap();
    for field in ["approval_id", "approved", "reason"] {
        assert!(
            properties[field]["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "approval.decide's {field} has no description: {properties:?}"
        );
    }
    let required: Vec<&str> = decide.input_schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["approval_id", "approved"]);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn every_tool_answers_an_envelope_in_one_text_content() {
    let app = unlocked_app().await;
    let client = connect(&app).await;

    let status = call(&client, "dashboard.status", json!({})).await;
    assert_eq!(status["type"], "dashboard.status");
    assert_eq!(
        status["data"],
        json!({"initialized": true, "agent_name": "default", "shell_tier": "review",
               "approval_unlocked": true, "pending_approvals_count": 0})
    );

    let list = call(&client, "approval.list", json!({})).await;
    assert_eq!(list["type"], "approval.list");
    assert_eq!(
        list["data"],
        json!({"count": 0, "items": [], "next_cursor": null})
    );

    let health: Value = app.get_json("/api/health").await;
    let info = call(&client, "system.info", json!({})).await;
    assert_eq!(info["type"], "system.info");
    assert_eq!(info["data"]["version"], health["version"]);
    assert_eq!(info["data"]["agent_name"], "default");
    assert!(info["data"]["uptime_seconds"].is_u64());
    assert_eq!(
        info["data"]["agent_configs"],
        json!([{"name": "default", "model": "echo", "shell_tier": "review", "tools": ["execute"]}])
    );

    let reply = call(
        &client,
        "chat.send",
        json!({"content": "hello over mcp", "session_id": "m"}),
    )
    .await;
    assert_eq!(reply["type"], "chat.reply");
    assert_eq!(
        reply["data"],
        json!({"session_id": "m", "content": "hello over mcp"})
    );

    let sessions = call(&client, "session.list", json!({})).await;
    assert_eq!(sessions["type"], "session.list");
    assert_eq!(sessions["data"]["count"], 1);
    assert_eq!(sessions["data"]["items"][0]["id"], "m");
    assert_eq!(sessions["data"]["items"][0]["message_count"], 2);

    let deferred = call(
        &client,
        "chat.send",
        json!({"content": TOOL_PROMPT, "session_id": "m"}),
    )
    .await;
    assert_eq!(deferred["type"], "error.approval_unsupported");
    assert_eq!(deferred["data"]["code"], "approval_unsupported");
    // Approvals are unlocked here: the calls were recorded, and the
    // envelope says so and names the approval.
    assert_eq!(
        deferred["data"]["message"],
        autopoiesis::domain::events::APPROVAL_RECORDED_MESSAGE
    );
    let approval_id = deferred["data"]["approval_id"].as_str().unwrap();

    let status = call(&client, "dashboard.status", json!({})).await;
    assert_eq!(status["data"]["pending_approvals_count"], 1);
    let list = call(&client, "approval.list", json!({})).await;
    assert_eq!(list["data"]["items"][0]["id"], approval_id, "{list}");

    let invalid = call(&client, "approval.decide", json!({"approved": true})).await;
    assert_eq!(invalid["type"], "error.invalid_arguments", "{invalid}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn an_unknown_tool_is_a_protocol_error() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let error = client
        .call_tool(CallToolRequestParams::new("format.disk"))
        .await
        .unwrap_err();
    let ServiceError::McpError(error) = error else {
        panic!("expected a JSON-RPC error, got {error:?}");
    };
    assert_eq!(error.code, ErrorCode::INVALID_PARAMS);
    assert!(error.message.contains("format.disk"), "{error:?}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_failed_tool_answers_is_error_true_with_its_error_envelope_as_the_content() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let result = client
        .call_tool(
            CallToolRequestParams::new("approval.decide").with_arguments(
                json!({"approval_id": "no-such-approval", "approved": true})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(true), "{result:?}");
    assert_eq!(result.content.len(), 1, "{result:?}");
    let envelope: Value = serde_json::from_str(&result.content[0].as_text().unwrap().text).unwrap();
    assert_eq!(envelope["type"], "error.approval_not_found");
    assert_eq!(envelope["data"]["approval_id"], "no-such-approval");
    assert_eq!(envelope["meta"]["tool"], "approval.decide");

    let fine = call(&client, "dashboard.status", json!({})).await;
    assert_eq!(fine["type"], "dashboard.status");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn an_approval_decided_over_mcp_is_consumed_once_and_other_clients_hear_of_it() {
    let app = unlocked_app().await;
    let decider = connect(&app).await;
    let watcher = connect(&app).await;
    // A round trip, so the watcher's session is surely registered.
    watcher.list_all_tools().await.unwrap();

    let res = app
        .chat(json!({"content": TOOL_PROMPT, "session_id": "e2e"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert!(
        watcher.service().heard_tools_changed(1).await,
        "a new approval is a change too"
    );

    let list = call(&decider, "approval.list", json!({})).await;
    assert_eq!(list["data"]["count"], 1, "{list}");
    let item = &list["data"]["items"][0];
    assert_eq!(item["tool_count"], 1);
    assert_eq!(item["requests"][0]["tool_name"], "execute");
    assert_eq!(item["requests"][0]["args"], json!({"command": "ls"}));
    assert!(item["issued_at"].is_i64() && item["expires_at"].is_i64());
    let id = item["id"].as_str().unwrap();

    let decision = call(
        &decider,
        "approval.decide",
        json!({"approval_id": id, "approved": true, "reason": "looks safe"}),
    )
    .await;
    assert_eq!(decision["type"], "approval.decision", "{decision}");
    assert_eq!(decision["data"]["id"], id);
    assert_eq!(decision["data"]["nonce"], item["nonce"]);
    assert_eq!(decision["data"]["state"], "consumed");
    assert_eq!(decision["data"]["approved"], true);
    assert_eq!(
        decision["data"]["plan_hash_prefix"],
        item["plan_hash_prefix"]
    );
    assert_eq!(decision["meta"]["notification_emitted"], true);
    assert!(
        watcher.service().heard_tools_changed(2).await,
        "the second client was not told"
    );

    let again = call(
        &decider,
        "approval.decide",
        json!({"approval_id": id, "approved": true}),
    )
    .await;
    assert_eq!(again["type"], "error.approval_not_found");
    assert_eq!(again["data"]["approval_id"], id);

    let list = call(&decider, "approval.list", json!({})).await;
    assert_eq!(list["data"]["count"], 0);
    decider.cancel().await.unwrap();
    watcher.cancel().await.unwrap();
}

#[tokio::test]
async fn rejecting_by_nonce_expires_the_approval() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let item = request_tool_call(&client).await;
    let decision = call(
        &client,
        "approval.decide",
        json!({"approval_id": item["nonce"], "approved": false, "reason": "no"}),
    )
    .await;
    assert_eq!(decision["type"], "approval.decision", "{decision}");
    assert_eq!(decision["data"]["id"], item["id"]);
    assert_eq!(decision["data"]["state"], "expired");
    assert_eq!(decision["data"]["approved"], false);
    let status = call(&client, "dashboard.status", json!({})).await;
    assert_eq!(status["data"]["pending_approvals_count"], 0);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn without_a_runtime_every_tool_answers_runtime_uninitialized_not_a_protocol_error() {
    let app = spawn_with(Options {
        runtime: RuntimeSlot::Unavailable("no provider configured".into()),
        approval_key: true,
        ..Options::default()
    })
    .await;
    let client = connect(&app).await;
    for tool in [
        "dashboard.status",
        "approval.list",
        "system.info",
        "session.list",
    ] {
        let envelope = call(&client, tool, json!({})).await;
        assert_eq!(
            envelope["type"], "error.runtime_uninitialized",
            "{envelope}"
        );
        assert_eq!(envelope["data"]["message"], "no provider configured");
    }
    let reply = call(&client, "chat.send", json!({"content": "hi"})).await;
    assert_eq!(reply["type"], "error.runtime_uninitialized");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_2026_era_client_calls_tools_without_a_session_and_hears_changes_on_its_listen_stream() {
    let app = unlocked_app().await;
    let client = connect_2026(&app).await;
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 6);

    // Nobody listens yet: the decision says nobody was told.
    let item = request_tool_call(&client).await;
    let decision = decide(&client, &item["id"], true).await;
    assert_eq!(decision["data"]["state"], "consumed");
    assert_eq!(decision["meta"]["notification_emitted"], false);

    let mut subscription = client
        .listen(SubscriptionFilter::builder().tools_list_changed().build())
        .await
        .unwrap();
    assert_eq!(subscription.acknowledged().tools_list_changed, Some(true));
    let item = request_tool_call(&client).await;
    let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("no notification within 5 s")
        .unwrap();
    assert!(
        matches!(
            next,
            Some(ServerNotification::ToolListChangedNotification(_))
        ),
        "{next:?}"
    );
    let decision = decide(&client, &item["id"], false).await;
    assert_eq!(decision["meta"]["notification_emitted"], true);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_decision_heard_only_by_a_dashboard_stream_says_a_notification_went_out() {
    let app = unlocked_app().await;
    // Session-less and not listening: no MCP client hears of changes.
    let client = connect_2026(&app).await;
    let item = request_tool_call(&client).await;
    let dashboard = app.get("/api/stream").await;
    assert_eq!(dashboard.status(), StatusCode::OK);
    let decision = decide(&client, &item["id"], true).await;
    assert_eq!(decision["data"]["state"], "consumed");
    assert_eq!(decision["meta"]["notification_emitted"], true);
    drop(dashboard);
    client.cancel().await.unwrap();
}

/// A raw `initialize` POST, for the status codes of refusals.
async fn raw_initialize(app: &TestApp, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "0"}}
        }));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn mcp_needs_the_key_and_takes_it_as_x_api_key_or_bearer() {
    let app = spawn_with(Options {
        api_key: Some(KEY),
        ..Options::default()
    })
    .await;
    let res = raw_initialize(&app, &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, json!({"detail": "Invalid or missing API key"}));
    let refused = try_connect(&app, &[("x-api-key", "nope")]).await;
    assert!(refused.is_err(), "a wrong key connected");

    let client = try_connect(&app, &[("x-api-key", KEY)]).await.unwrap();
    let status = call(&client, "dashboard.status", json!({})).await;
    assert_eq!(status["type"], "dashboard.status");
    client.cancel().await.unwrap();

    let bearer = Recorder::default()
        .serve(StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(app.url("/mcp")).auth_header(KEY),
        ))
        .await
        .unwrap();
    let info = call(&bearer, "system.info", json!({})).await;
    assert_eq!(info["type"], "system.info");
    bearer.cancel().await.unwrap();
}

#[tokio::test]
async fn mcp_refuses_a_foreign_origin_and_admits_its_own() {
    let app = unlocked_app().await;
    let res = raw_initialize(&app, &[("origin", "https://evil.example")]).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(
        try_connect(&app, &[("origin", "https://evil.example")])
            .await
            .is_err()
    );
    let own = format!("http://{}", app.address);
    let client = try_connect(&app, &[("origin", &own)]).await.unwrap();
    call(&client, "session.list", json!({})).await;
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn mcp_refuses_hosts_it_was_not_told_of() {
    let app = spawn_with(Options {
        http: HttpSettings {
            allowed_hosts: ["127.0.0.1", "::1", "mcp.example"]
                .map(str::to_owned)
                .to_vec(),
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    let port = app.address.port();
    for host in ["evil.example", &format!("localhost:{port}")] {
        let res = raw_initialize(&app, &[("host", host)]).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "Host {host}");
    }
    assert!(
        try_connect(&app, &[("host", "evil.example")])
            .await
            .is_err()
    );
    for host in [
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "mcp.example".to_owned(),
    ] {
        let res = raw_initialize(&app, &[("host", &host)]).await;
        assert_eq!(res.status(), StatusCode::OK, "Host {host}");
    }
    let client = try_connect(&app, &[("host", "mcp.example")]).await.unwrap();
    call(&client, "session.list", json!({})).await;
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn other_methods_on_mcp_are_405_with_allow() {
    let app = unlocked_app().await;
    let res = app.client.put(app.url("/mcp")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "POST, GET, DELETE");
}

/// The session id an `initialize` answer gave.
fn session_of(res: &reqwest::Response) -> String {
    res.headers()["mcp-session-id"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn mcp_sessions_count_as_live_clients_and_initialize_beyond_the_limit_is_429() {
    let app = spawn_with(Options {
        stream: autopoiesis::adapters::stream::StreamSettings {
            max_clients: 2,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let first = raw_initialize(&app, &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first = session_of(&first);
    let second = raw_initialize(&app, &[]).await;
    assert_eq!(second.status(), StatusCode::OK);

    let refused = raw_initialize(&app, &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("too many"),
        "{body}"
    );
    let res = app.get("/api/sessions/s/events").await;
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "one limit for all"
    );

    // Ending a session frees its place.
    let res = app
        .client
        .delete(app.url("/mcp"))
        .header("mcp-session-id", &first)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while raw_initialize(&app, &[]).await.status() != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
#[tokio::test]
async fn initialize_beyond_max_mcp_sessions_is_429_and_other_requests_still_pass() {
    let app = spawn_with(Options {
        http: HttpSettings {
            max_mcp_sessions: 1,
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    let client = connect(&app).await;
    let refused = raw_initialize(&app, &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("MCP sessions"),
        "{body}"
    );
    // The session in place keeps working, and so do session-less requests.
    call(&client, "session.list", json!({})).await;
    let newer = connect_2026(&app).await;
    call(&newer, "system.info", json!({})).await;
    newer.cancel().await.unwrap();
    client.cancel().await.unwrap();
}

/// The one content of a `resources/read` of `uri`, as JSON (`uri`,
/// `mimeType`, `text`).
async fn read(client: &Client, uri: &str) -> Result<Value, ServiceError> {
    let result = client
        .read_resource(ReadResourceRequestParams::new(uri))
        .await?;
    let result = serde_json::to_value(result).unwrap();
    let contents = result["contents"].as_array().unwrap();
    assert_eq!(contents.len(), 1, "{result}");
    Ok(contents[0].clone())
}

/// The JSON a resource's text content holds.
async fn read_json(client: &Client, uri: &str) -> Value {
    let content = read(client, uri).await.unwrap();
    assert_eq!(content["uri"], uri);
    assert_eq!(content["mimeType"], "application/json");
    serde_json::from_str(content["text"].as_str().unwrap()).unwrap()
}

async fn subscribe(client: &Client, uri: &str) -> Result<(), ServiceError> {
    client.subscribe(SubscribeRequestParams::new(uri)).await
}

async fn set_level(client: &Client, level: LoggingLevel) {
    client
        .set_level(SetLevelRequestParams::new(level))
        .await
        .unwrap();
}

fn mcp_error(error: ServiceError) -> rmcp::ErrorData {
    match error {
        ServiceError::McpError(error) => error,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

#[tokio::test]
async fn resources_list_the_sessions_and_the_approvals_and_a_template_for_histories() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let caps = &client.peer_info().unwrap().capabilities;
    assert_eq!(caps.resources.as_ref().unwrap().subscribe, Some(true));
    assert!(caps.completions.is_some());
    assert!(caps.logging.is_some(), "logging is advertised");

    let resources = client.list_all_resources().await.unwrap();
    let listed: Vec<(&str, Option<&str>)> = resources
        .iter()
        .map(|r| (r.uri.as_str(), r.mime_type.as_deref()))
        .collect();
    assert_eq!(
        listed,
        [
            ("autopoiesis://sessions", Some("application/json")),
            ("autopoiesis://approvals", Some("application/json")),
        ]
    );
    assert!(resources.iter().all(|r| r.description.is_some()));
    let templates = client.list_all_resource_templates().await.unwrap();
    assert_eq!(templates.len(), 1);
    assert_eq!(
        templates[0].uri_template,
        "autopoiesis://sessions/{id}/history"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn reading_the_resources_gives_the_sessions_a_history_and_the_pending_approvals_as_json() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    call(
        &client,
        "chat.send",
        json!({"content": "read me back", "session_id": "res-1"}),
    )
    .await;
    let sessions = read_json(&client, "autopoiesis://sessions").await;
    assert_eq!(sessions["count"], 1, "{sessions}");
    assert_eq!(sessions["items"][0]["id"], "res-1");
    assert_eq!(sessions["items"][0]["message_count"], 2);

    let history = read_json(&client, "autopoiesis://sessions/res-1/history").await;
    assert_eq!(history["session_id"], "res-1");
    let rest: Value = app.get_json("/api/sessions/res-1/history").await;
    assert_eq!(history, rest, "the same history as REST");
    assert_eq!(history["messages"].as_array().unwrap().len(), 2);

    let none = read_json(&client, "autopoiesis://approvals").await;
    assert_eq!(none["count"], 0);
    let item = request_tool_call(&client).await;
    let approvals = read_json(&client, "autopoiesis://approvals").await;
    assert_eq!(approvals["count"], 1);
    assert_eq!(approvals["items"][0]["id"], item["id"]);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn reading_an_unknown_session_or_uri_is_resource_not_found() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    for uri in [
        "autopoiesis://sessions/nobody/history",
        "autopoiesis://sessions/not%20an%20id/history",
        "test://static-text",
    ] {
        let error = mcp_error(read(&client, uri).await.unwrap_err());
        assert_eq!(
            error.code,
            ErrorCode::RESOURCE_NOT_FOUND,
            "{uri}: {error:?}"
        );
    }
    let error = mcp_error(
        read(&client, "autopoiesis://sessions/nobody/history")
            .await
            .unwrap_err(),
    );
    assert_eq!(error.message, "No session nobody");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn completion_offers_the_session_ids_that_start_with_the_typed_prefix_newest_first() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    for id in ["alpha-1", "beta", "alpha-2"] {
        call(
            &client,
            "chat.send",
            json!({"content": "hi", "session_id": id}),
        )
        .await;
    }
    let complete = |value: &str| {
        client.complete(CompleteRequestParams::new(
            Reference::for_resource("autopoiesis://sessions/{id}/history"),
            ArgumentInfo::new("id", value),
        ))
    };
    let alpha = complete("alp").await.unwrap().completion;
    assert_eq!(alpha.values, ["alpha-2", "alpha-1"]);
    assert_eq!(alpha.total, Some(2));
    assert_eq!(alpha.has_more, Some(false));
    let all = complete("").await.unwrap().completion;
    assert_eq!(all.values.len(), 3);
    assert!(complete("zzz").await.unwrap().completion.values.is_empty());

    let prompt = client
        .complete(CompleteRequestParams::new(
            Reference::for_prompt("test_prompt_with_arguments"),
            ArgumentInfo::new("arg1", "x"),
        ))
        .await
        .unwrap_err();
    assert_eq!(mcp_error(prompt).code, ErrorCode::INVALID_PARAMS);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_subscribed_history_is_updated_when_a_turn_on_it_ends_and_no_more_after_unsubscribe() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let history = "autopoiesis://sessions/watched/history";
    subscribe(&client, history).await.unwrap();
    // A turn on another session changes nothing this client watches.
    let res = app
        .chat(json!({"content": "elsewhere", "session_id": "other"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app
        .chat(json!({"content": "hello", "session_id": "watched"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let updated = &client.service().updated;
    assert!(
        until(updated, |uris| uris.iter().any(|u| u == history)).await,
        "no update for {history}: {:?}",
        updated.borrow()
    );
    assert!(
        updated.borrow().iter().all(|u| u == history),
        "only what was subscribed to: {:?}",
        updated.borrow()
    );
    // Read after the update, the history holds the turn.
    let read = read_json(&client, history).await;
    assert_eq!(read["messages"].as_array().unwrap().len(), 2);

    client
        .unsubscribe(UnsubscribeRequestParams::new(history))
        .await
        .unwrap();
    let before = updated.borrow().len();
    let res = app
        .chat(json!({"content": "again", "session_id": "watched"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(updated.borrow().len(), before, "{:?}", updated.borrow());
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn subscribers_to_the_session_list_hear_of_a_deletion() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    call(
        &client,
        "chat.send",
        json!({"content": "hi", "session_id": "doomed"}),
    )
    .await;
    subscribe(&client, "autopoiesis://sessions").await.unwrap();
    let res = app.delete("/api/sessions/doomed").await;
    assert!(res.status().is_success(), "{}", res.status());
    let updated = &client.service().updated;
    assert!(
        until(updated, |uris| uris
            .iter()
            .any(|u| u == "autopoiesis://sessions"))
        .await,
        "{:?}",
        updated.borrow()
    );
    let sessions = read_json(&client, "autopoiesis://sessions").await;
    assert_eq!(sessions["count"], 0, "{sessions}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn subscribers_to_the_approvals_hear_when_one_is_created_and_when_it_is_decided() {
    let app = unlocked_app().await;
    let watcher = connect(&app).await;
    let decider = connect(&app).await;
    subscribe(&watcher, "autopoiesis://approvals")
        .await
        .unwrap();
    let approvals = |n: usize| {
        let updated = &watcher.service().updated;
        until(updated, move |uris| {
            uris.iter()
                .filter(|u| *u == "autopoiesis://approvals")
                .count()
                >= n
        })
    };
    let item = request_tool_call(&decider).await;
    assert!(approvals(1).await, "a new approval is a change");
    decide(&decider, &item["id"], true).await;
    assert!(approvals(2).await, "a decision is a change");
    assert!(
        decider.service().updated.borrow().is_empty(),
        "the decider did not subscribe"
    );
    watcher.cancel().await.unwrap();
    decider.cancel().await.unwrap();
}

#[tokio::test]
async fn subscribing_to_an_unknown_uri_or_past_the_cap_is_refused_clearly() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let unknown = mcp_error(
        subscribe(&client, "test://watched-resource")
            .await
            .unwrap_err(),
    );
    assert_eq!(unknown.code, ErrorCode::RESOURCE_NOT_FOUND);
    for n in 0..256 {
        subscribe(&client, &format!("autopoiesis://sessions/s{n}/history"))
            .await
            .unwrap();
    }
    let refused = mcp_error(
        subscribe(&client, "autopoiesis://sessions")
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code, ErrorCode::INVALID_REQUEST);
    assert!(refused.message.contains("256"), "{refused:?}");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn log_notifications_start_with_set_level_and_only_at_or_above_it() {
    let app = unlocked_app().await;
    let listener = connect(&app).await;
    let silent = connect(&app).await;
    set_level(&listener, LoggingLevel::Notice).await;
    // A turn that starts (debug) and finishes (info): below notice.
    let res = app
        .chat(json!({"content": "quiet", "session_id": "logs"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    // A deferred turn (notice), and its approval recorded (info).
    let res = app
        .chat(json!({"content": TOOL_PROMPT, "session_id": "logs"}))
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let logs = &listener.service().logs;
    assert!(
        until(logs, |logs| !logs.is_empty()).await,
        "nothing logged at notice"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let heard = logs.borrow().clone();
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0]["level"], "notice");
    assert_eq!(heard[0]["event"], "turn.failed");
    assert_eq!(heard[0]["code"], "approval_unsupported");
    assert_eq!(heard[0]["session_id"], "logs");
    assert!(
        silent.service().logs.borrow().is_empty(),
        "a client that set no level hears nothing"
    );

    set_level(&listener, LoggingLevel::Debug).await;
    let res = app
        .chat(json!({"content": "loud", "session_id": "logs"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        until(logs, |logs| logs.iter().any(|l| l["event"] == "turn.done")).await,
        "{:?}",
        logs.borrow()
    );
    let events: Vec<Value> = logs.borrow().iter().map(|l| l["event"].clone()).collect();
    assert!(events.contains(&json!("turn.started")), "{events:?}");
    listener.cancel().await.unwrap();
    silent.cancel().await.unwrap();
}

#[tokio::test]
async fn chat_send_with_a_progress_token_reports_each_token_as_progress() {
    let app = unlocked_app().await;
    let client = connect(&app).await;
    let mut params = CallToolRequestParams::new("chat.send").with_arguments(
        json!({"content": "one two three", "session_id": "p"})
            .as_object()
            .unwrap()
            .clone(),
    );
    let mut meta = RequestMetaObject::default();
    meta.set_progress_token(ProgressToken(rmcp::model::NumberOrString::String(
        "mine".into(),
    )));
    params.meta = Some(meta);
    let result = client.call_tool(params).await.unwrap();
    let reply = envelope_of("chat.send", &result);
    assert_eq!(reply["data"]["content"], "one two three");
    let progress = &client.service().progress;
    assert!(
        until(progress, |p| p.len() >= 3).await,
        "{:?}",
        progress.borrow()
    );
    assert_eq!(
        *progress.borrow(),
        vec![
            (1.0, Some("one ".to_owned())),
            (2.0, Some("two ".to_owned())),
            (3.0, Some("three".to_owned())),
        ]
    );
    client.cancel().await.unwrap();
}

/// A raw `initialize`-era session: its id, after `notifications/initialized`.
async fn raw_session(app: &TestApp) -> String {
    let res = raw_initialize(app, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    let session = session_of(&res);
    let res = raw_post(
        app,
        &session,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert!(res.status().is_success(), "{}", res.status());
    session
}

async fn raw_post(app: &TestApp, session: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-06-18")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The JSON-RPC messages of an SSE answer, in the order they came.
async fn sse_messages(res: reqwest::Response) -> Vec<Value> {
    let text = res.text().await.unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str(data.trim()).ok())
        .collect()
}

#[tokio::test]
async fn chat_send_streams_progress_before_its_result_only_when_the_request_has_a_token() {
    let app = unlocked_app().await;
    let session = raw_session(&app).await;
    let call = |id: u64, meta: Value| {
        let session = session.clone();
        let app = &app;
        async move {
            let mut params = json!({
                "name": "chat.send",
                "arguments": {"content": "alpha beta", "session_id": "raw"},
            });
            if !meta.is_null() {
                params["_meta"] = meta;
            }
            let body =
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
            sse_messages(raw_post(app, &session, body).await).await
        }
    };
    let messages = call(7, json!({"progressToken": "tok-7"})).await;
    let methods: Vec<&str> = messages
        .iter()
        .map(|m| {
            m["method"]
                .as_str()
                .unwrap_or(if m.get("result").is_some() {
                    "result"
                } else {
                    "?"
                })
        })
        .collect();
    assert_eq!(
        methods,
        ["notifications/progress", "notifications/progress", "result"],
        "{messages:?}"
    );
    assert_eq!(messages[0]["params"]["progressToken"], "tok-7");
    assert_eq!(messages[0]["params"]["progress"], 1.0);
    assert_eq!(messages[1]["params"]["progress"], 2.0);
    assert_eq!(messages[1]["params"]["message"], "beta");
    assert_eq!(messages[2]["id"], 7);
    assert_eq!(messages[2]["result"]["isError"], false);

    let plain = call(8, Value::Null).await;
    assert_eq!(plain.len(), 1, "no progress without a token: {plain:?}");
    assert_eq!(plain[0]["id"], 8);
    let text = plain[0]["result"]["content"][0]["text"].as_str().unwrap();
    let envelope: Value = serde_json::from_str(text).unwrap();
    assert_eq!(envelope["data"]["content"], "alpha beta");
}

#[tokio::test]
async fn a_2026_era_listen_stream_hears_updates_of_the_resources_it_asked_for() {
    let app = unlocked_app().await;
    let client = connect_2026(&app).await;
    let mut subscription = client
        .listen(
            SubscriptionFilter::builder()
                .resource_subscription("autopoiesis://sessions/later/history")
                .resource_subscription("test://not-ours")
                .build(),
        )
        .await
        .unwrap();
    assert_eq!(
        subscription.acknowledged().resource_subscriptions,
        Some(vec!["autopoiesis://sessions/later/history".to_owned()])
    );
    let res = app
        .chat(json!({"content": "hi", "session_id": "later"}))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("no notification within 5 s")
        .unwrap();
    let Some(ServerNotification::ResourceUpdatedNotification(update)) = next else {
        panic!("{next:?}");
    };
    assert_eq!(update.params.uri, "autopoiesis://sessions/later/history");
    client.cancel().await.unwrap();
}

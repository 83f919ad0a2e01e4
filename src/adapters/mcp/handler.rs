//! The rmcp `ServerHandler`: MCP's tools, resources, completion, resource
//! subscriptions and log level over the control plane and the session
//! service, and the client registrations that let changes reach connected
//! clients. No rule lives here: every tool is [`ControlTools::call`], every
//! resource [`Resources::read`].

#![allow(deprecated)] // resources/subscribe and logging are deprecated by rmcp for the 2026-07-28 era yet still served to the 2025 eras.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult,
    ContentBlock, Implementation, JsonObject, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse,
    ServerCapabilities, ServerConfig, SetLevelRequestParams, SubscribeRequestParams,
    SubscriptionFilter, Tool, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, RequestContext, RoleServer, SubscriptionContext};
use rmcp::{ErrorData, ServerHandler};
use serde_json::Value;

use super::clients::McpClients;
use super::progress;
use super::resources::{self, ResourceUri, Resources};
use super::state::{MAX_SUBSCRIPTIONS, SessionState};
use crate::adapters::control::{
    self, CHAT_SEND, ControlTools, Envelope, Failed, Failure, ToolInfo,
};
use crate::adapters::stream::SessionHub;

const INSTRUCTIONS: &str = "The autopoiesis control plane: runtime status, pending tool approvals \
(list, approve, reject), system info, chat with the agent and its sessions. Every tool answers \
one text content holding a JSON envelope {\"type\", \"data\", \"meta\"}; a type starting with \
\"error.\" reports a failure, and the result is then flagged isError. \
notifications/tools/list_changed is sent whenever an approval is created or decided: call \
approval.list again. Resources (JSON): autopoiesis://sessions, autopoiesis://approvals and \
autopoiesis://sessions/{id}/history (ids complete through completion/complete); subscribe to \
one to hear when it changes. logging/setLevel turns on log notifications of turns, approvals \
and deletions (none are sent before it). chat.send with a progressToken streams its tokens as \
notifications/progress.";

/// One per MCP session (rmcp builds one per `initialize`, and one per
/// request of the session-less 2026-07-28 era); all share the control
/// plane, the resources and the client registry, each has its own
/// subscriptions and log level.
#[derive(Clone)]
pub struct McpHandler {
    control: Arc<ControlTools>,
    /// The control plane's tools in MCP's shape, built once.
    tools: Arc<[Tool]>,
    resources: Arc<Resources>,
    /// Where `chat.send` with a progress token reads its turn's tokens.
    hub: Arc<SessionHub>,
    clients: Arc<McpClients>,
    /// This session's subscriptions and log level.
    state: Arc<SessionState>,
}

impl McpHandler {
    #[must_use]
    pub fn new(
        control: Arc<ControlTools>,
        resources: Arc<Resources>,
        hub: Arc<SessionHub>,
        clients: Arc<McpClients>,
    ) -> Self {
        Self {
            control,
            tools: control::tools().into_iter().map(mcp_tool).collect(),
            resources,
            hub,
            clients,
            state: Arc::default(),
        }
    }

    /// A handler for a new session: the shared parts, and a state of its
    /// own.
    #[must_use]
    pub fn for_session(&self) -> Self {
        Self {
            state: Arc::default(),
            ..self.clone()
        }
    }
}

/// An envelope as a tool's one text content.
fn content(envelope: &Envelope) -> ContentBlock {
    ContentBlock::text(envelope.to_json().to_string())
}

fn mcp_tool(info: ToolInfo) -> Tool {
    let schema = match info.input_schema {
        Value::Object(schema) => schema,
        // schemars always gives an object; an empty schema still lets the
        // tool be listed and called.
        _ => JsonObject::new(),
    };
    Tool::new(info.name, info.description, Arc::new(schema))
}

/// The subscriptions a listen stream may hold: resources this server
/// serves, at most as many as a session's.
fn acceptable(uris: &[String]) -> Vec<String> {
    uris.iter()
        .filter(|uri| ResourceUri::parse(uri).is_some())
        .take(MAX_SUBSCRIPTIONS)
        .cloned()
        .collect()
}

impl ServerHandler for McpHandler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_logging()
                .enable_completions()
                .enable_resources()
                .enable_resources_subscribe()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "autopoiesis",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools.iter().find(|tool| tool.name == name).cloned()
    }

    /// An error envelope is still a result the caller reads, flagged
    /// `isError` so that clients (and the models they serve) see the tool
    /// failed; only an unknown tool is a protocol error (`invalid_params`,
    /// as rmcp's own tool router answers).
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.map_or(Value::Null, Value::Object);
        let answer = match context.meta.get_progress_token() {
            Some(token) if request.name == CHAT_SEND => {
                progress::chat_send(&self.control, &self.hub, args, &context.peer, token).await
            }
            _ => self.control.call(&request.name, args).await,
        };
        let result = match answer {
            Ok(envelope) => CallToolResult::success(vec![content(&envelope)]),
            Err(Failed {
                error: Failure::UnknownTool(name),
                ..
            }) => {
                return Err(ErrorData::invalid_params(
                    format!("unknown tool: {name}"),
                    None,
                ));
            }
            Err(failed) => CallToolResult::error(vec![content(&failed.envelope())]),
        };
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(resources::list()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.resources.read(&request.uri).await.map(Into::into)
    }

    /// Session ids for the history template, newest first, at most
    /// [`resources::MAX_COMPLETIONS`].
    async fn complete(
        &self,
        request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        self.resources.complete(&request).await
    }

    /// Any resource this server serves; a session's history may be watched
    /// before the session exists (`chat.send` creates it).
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if ResourceUri::parse(&request.uri).is_none() {
            return Err(resources::not_found(&request.uri));
        }
        self.state
            .subscribe(&request.uri)
            .map_err(|e| ErrorData::invalid_request(e.to_string(), None))
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.state.unsubscribe(&request.uri);
        Ok(())
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.state.set_level(request.level);
        Ok(())
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        tracing::debug!("MCP session initialised");
        self.clients
            .add_session(context.peer, Arc::clone(&self.state));
    }

    /// Tool-list changes, and updates of resources this server serves.
    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut accepted = requested.supported_by(&self.get_info().capabilities);
        accepted.resource_subscriptions = accepted
            .resource_subscriptions
            .as_deref()
            .map(acceptable)
            .filter(|uris| !uris.is_empty());
        Some(accepted)
    }

    /// A 2026-07-28 client's listen stream: registered while it is open,
    /// if it asked for anything this server sends.
    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let accepted = context.accepted();
        let wanted =
            accepted.tools_list_changed == Some(true) || accepted.resource_subscriptions.is_some();
        let _registered = wanted.then(|| self.clients.add_subscription(context.sink().clone()));
        context.cancelled().await;
        Ok(())
    }
}

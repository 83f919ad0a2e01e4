//! The rmcp `ServerHandler`: MCP's tools/list and tools/call over the
//! control plane, and the client registrations that let approval changes
//! reach connected clients. No rule lives here: every tool is
//! [`ControlTools::call`].

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
    SubscriptionFilter, Tool,
};
use rmcp::service::{NotificationContext, RequestContext, RoleServer, SubscriptionContext};
use rmcp::{ErrorData, ServerHandler};
use serde_json::Value;

use super::clients::McpClients;
use crate::adapters::control::{self, ControlTools, Envelope, Failed, Failure, ToolInfo};

const INSTRUCTIONS: &str = "The autopoiesis control plane: runtime status, pending tool approvals \
(list, approve, reject), system info, chat with the agent and its sessions. Every tool answers \
one text content holding a JSON envelope {\"type\", \"data\", \"meta\"}; a type starting with \
\"error.\" reports a failure (and the result is flagged isError). notifications/tools/list_changed is sent whenever an approval is \
created or decided: call approval.list again.";

/// One per MCP session (rmcp builds one per `initialize`, and one per
/// request of the session-less 2026-07-28 era); all share the control
/// plane and the client registry.
#[derive(Clone)]
pub struct McpHandler {
    control: Arc<ControlTools>,
    /// The control plane's tools in MCP's shape, built once.
    tools: Arc<[Tool]>,
    clients: Arc<McpClients>,
}

impl McpHandler {
    #[must_use]
    pub fn new(control: Arc<ControlTools>, clients: Arc<McpClients>) -> Self {
        Self {
            control,
            tools: control::tools().into_iter().map(mcp_tool).collect(),
            clients,
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

impl ServerHandler for McpHandler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
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
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.map_or(Value::Null, Value::Object);
        let result = match self.control.call(&request.name, args).await {
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

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        tracing::debug!("MCP session initialised");
        self.clients.add_session(context.peer);
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.supported_by(&self.get_info().capabilities))
    }

    /// A 2026-07-28 client's listen stream: registered while it is open,
    /// if it asked for tool-list changes (the only ones this server sends).
    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let _registered = (context.accepted().tools_list_changed == Some(true))
            .then(|| self.clients.add_subscription(context.sink().clone()));
        context.cancelled().await;
        Ok(())
    }
}

//! OpenAI-compatible Chat Completions runtime (being written).

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::agent::{AgentError, AgentReply, ToolSpec};
use crate::ports::{AgentRuntime, EventSink, TurnInput};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub tools: Vec<ToolSpec>,
    pub idle_timeout: Duration,
}

pub struct OpenAiRuntime;

impl OpenAiRuntime {
    pub fn new(_settings: OpenAiSettings) -> Result<Self, String> {
        Err("the openai adapter is not built yet".into())
    }
}

#[async_trait]
impl AgentRuntime for OpenAiRuntime {
    async fn run_turn(
        &self,
        _input: TurnInput,
        _sink: std::sync::Arc<dyn EventSink>,
    ) -> Result<AgentReply, AgentError> {
        Err(AgentError::Provider(
            "the openai adapter is not built yet".into(),
        ))
    }
}

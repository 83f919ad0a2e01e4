//! Agent runtime adapters and the agents file that configures them.

pub mod config;
pub mod echo;
pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use crate::domain::agent::AgentConfig;
use crate::ports::AgentRuntime;

/// Provider settings that come from the environment rather than the agents
/// file (they hold secrets, so no `Debug`: it could reach a log).
#[derive(Clone, Default)]
pub struct ProviderEnv {
    /// `OPENAI_BASE_URL`: any OpenAI-compatible endpoint.
    pub openai_base_url: Option<String>,
    /// `OPENAI_API_KEY`.
    pub openai_api_key: Option<String>,
    /// Longest silence allowed inside a streamed answer.
    pub stream_idle_timeout: Duration,
}

/// Builds the runtime an agent's model string names: `echo`,
/// `echo:delay_ms=N` (tokens paced N ms apart), or `openai:MODEL`.
///
/// # Errors
/// A message saying why the runtime cannot run: an unknown adapter, a bad
/// `echo` option, or an `openai` model without `OPENAI_API_KEY` or
/// `OPENAI_BASE_URL` (a local server such as Ollama needs no key, but then
/// the base URL must say where it is).
pub fn build_runtime(
    agent: &AgentConfig,
    env: &ProviderEnv,
) -> Result<Arc<dyn AgentRuntime>, String> {
    let (adapter, rest) = agent
        .model
        .split_once(':')
        .unwrap_or((agent.model.as_str(), ""));
    match adapter {
        "echo" => Ok(Arc::new(echo::EchoRuntime::from_options(
            rest,
            agent.tools.clone(),
        )?)),
        "openai" => {
            if rest.is_empty() {
                return Err(format!(
                    "agent {:?}: model {:?} names no model (write openai:MODEL)",
                    agent.name, agent.model
                ));
            }
            if env.openai_api_key.is_none() && env.openai_base_url.is_none() {
                return Err(format!(
                    "agent {:?} uses model {:?} but neither OPENAI_API_KEY nor OPENAI_BASE_URL is set",
                    agent.name, agent.model
                ));
            }
            let runtime = openai::OpenAiRuntime::new(openai::OpenAiSettings {
                base_url: env
                    .openai_base_url
                    .clone()
                    .unwrap_or_else(|| openai::DEFAULT_BASE_URL.to_owned()),
                api_key: env.openai_api_key.clone(),
                model: rest.to_owned(),
                tools: agent.tools.clone(),
                idle_timeout: env.stream_idle_timeout,
            })
            .map_err(|e| format!("agent {:?}: {e}", agent.name))?;
            Ok(Arc::new(runtime))
        }
        other => Err(format!(
            "agent {:?}: unknown model adapter {other:?} in {:?} (expected echo or openai:MODEL)",
            agent.name, agent.model
        )),
    }
}

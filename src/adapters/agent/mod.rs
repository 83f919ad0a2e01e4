//! Agent runtime adapters and the agents file that configures them.

pub mod config;
pub mod echo;
pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use crate::domain::agent::AgentConfig;
use crate::ports::AgentRuntime;

use self::echo::EchoOptionError;
use self::openai::OpenAiSetupError;

/// Why an agent's runtime cannot be built; the message says so in one line
/// (it becomes the runtime's "unavailable" reason, which clients see).
#[derive(Debug, thiserror::Error)]
pub enum BuildRuntimeError {
    #[error(transparent)]
    Echo(#[from] EchoOptionError),
    #[error("agent {agent:?}: model {model:?} names no model (write openai:MODEL)")]
    NoModel { agent: String, model: String },
    #[error(
        "agent {agent:?} uses model {model:?} but neither OPENAI_API_KEY nor OPENAI_BASE_URL is set"
    )]
    NoProvider { agent: String, model: String },
    #[error("agent {agent:?}: {source}")]
    OpenAi {
        agent: String,
        source: OpenAiSetupError,
    },
    #[error(
        "agent {agent:?}: unknown model adapter {adapter:?} in {model:?} (expected echo or openai:MODEL)"
    )]
    UnknownAdapter {
        agent: String,
        adapter: String,
        model: String,
    },
}

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
/// [`BuildRuntimeError`] saying why the runtime cannot run: an unknown adapter, a bad
/// `echo` option, or an `openai` model without `OPENAI_API_KEY` or
/// `OPENAI_BASE_URL` (a local server such as Ollama needs no key, but then
/// the base URL must say where it is).
pub fn build_runtime(
    agent: &AgentConfig,
    env: &ProviderEnv,
) -> Result<Arc<dyn AgentRuntime>, BuildRuntimeError> {
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
                return Err(BuildRuntimeError::NoModel {
                    agent: agent.name.clone(),
                    model: agent.model.clone(),
                });
            }
            if env.openai_api_key.is_none() && env.openai_base_url.is_none() {
                return Err(BuildRuntimeError::NoProvider {
                    agent: agent.name.clone(),
                    model: agent.model.clone(),
                });
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
            .map_err(|source| BuildRuntimeError::OpenAi {
                agent: agent.name.clone(),
                source,
            })?;
            Ok(Arc::new(runtime))
        }
        other => Err(BuildRuntimeError::UnknownAdapter {
            agent: agent.name.clone(),
            adapter: other.to_owned(),
            model: agent.model.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::domain::agent::AgentEvent;
    use crate::ports::EventSink;

    /// Records what a runtime emits; shared by the adapters' tests.
    #[derive(Default)]
    pub(super) struct Recorder(pub(super) Mutex<Vec<AgentEvent>>);

    impl EventSink for Recorder {
        fn emit(&self, event: AgentEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    impl Recorder {
        pub(super) fn events(&self) -> Vec<AgentEvent> {
            self.0.lock().unwrap().clone()
        }
    }

    fn refusal(model: &str) -> String {
        let agent = AgentConfig {
            model: model.into(),
            ..AgentConfig::builtin()
        };
        match build_runtime(&agent, &ProviderEnv::default()) {
            Ok(_) => panic!("{model} should be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn refused_model_strings_say_why_in_one_line() {
        assert_eq!(
            refusal("claude"),
            r#"agent "default": unknown model adapter "claude" in "claude" (expected echo or openai:MODEL)"#
        );
        assert_eq!(
            refusal("openai:"),
            r#"agent "default": model "openai:" names no model (write openai:MODEL)"#
        );
        assert_eq!(
            refusal("echo:fast"),
            r#"unknown echo option "fast" (expected delay_ms=N)"#
        );
        let no_url = build_runtime(
            &AgentConfig {
                model: "openai:m".into(),
                ..AgentConfig::builtin()
            },
            &ProviderEnv {
                openai_base_url: Some("ftp://example.com".into()),
                ..ProviderEnv::default()
            },
        );
        assert_eq!(
            no_url.err().map(|e| e.to_string()).as_deref(),
            Some(
                r#"agent "default": the base URL (OPENAI_BASE_URL) is not an http(s) URL (scheme "ftp")"#
            )
        );
    }
}

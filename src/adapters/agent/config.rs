//! The agents file (`--config`): TOML with one `[agents.NAME]` table each.
//!
//! ```toml
//! [agents.default]
//! model = "openai:gpt-4o-mini"
//! shell_tier = "review"
//! tools = ["execute"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::agent::{AgentConfig, ShellTier, UnknownShellTier, tool_catalogue};

/// Why an agents file cannot be loaded; each says so in one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadAgentsError {
    #[error("cannot read agents config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agents config {}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: ParseAgentsError,
    },
}

/// Why agents TOML text is refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseAgentsError {
    /// Not TOML, or not of this shape (unknown keys included).
    #[error("{}", .0.message())]
    Toml(toml::de::Error),
    #[error("no [agents.NAME] table")]
    NoAgents,
    #[error("agent {agent:?}: {source}")]
    ShellTier {
        agent: String,
        source: UnknownShellTier,
    },
    #[error("agent {agent:?}: unknown tool {tool:?} (known: {known})")]
    UnknownTool {
        agent: String,
        tool: String,
        /// The catalogue's tool names, comma-separated.
        known: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsFile {
    agents: BTreeMap<String, AgentTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentTable {
    model: String,
    #[serde(default = "default_tier")]
    shell_tier: String,
    #[serde(default)]
    tools: Vec<String>,
}

fn default_tier() -> String {
    ShellTier::Review.as_str().to_owned()
}

/// Reads and validates an agents file.
///
/// # Errors
/// [`LoadAgentsError`], one line saying what is wrong: the file cannot be
/// read, is not valid TOML of this shape, holds no agent, or names an
/// unknown shell tier or tool.
pub fn load_agents(path: &Path) -> Result<Vec<AgentConfig>, LoadAgentsError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadAgentsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_agents(&text).map_err(|source| LoadAgentsError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Parses agents TOML text; see [`load_agents`].
///
/// # Errors
/// [`ParseAgentsError`]: as [`load_agents`], without the file name.
pub fn parse_agents(text: &str) -> Result<Vec<AgentConfig>, ParseAgentsError> {
    let file: AgentsFile = toml::from_str(text).map_err(ParseAgentsError::Toml)?;
    if file.agents.is_empty() {
        return Err(ParseAgentsError::NoAgents);
    }
    let catalogue = tool_catalogue();
    file.agents
        .into_iter()
        .map(|(name, table)| {
            let shell_tier =
                table
                    .shell_tier
                    .parse()
                    .map_err(|source| ParseAgentsError::ShellTier {
                        agent: name.clone(),
                        source,
                    })?;
            let tools = table
                .tools
                .iter()
                .map(|tool| {
                    catalogue
                        .iter()
                        .find(|t| &t.name == tool)
                        .cloned()
                        .ok_or_else(|| ParseAgentsError::UnknownTool {
                            agent: name.clone(),
                            tool: tool.clone(),
                            known: catalogue
                                .iter()
                                .map(|t| t.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        })
                })
                .collect::<Result<_, _>>()?;
            Ok(AgentConfig {
                name,
                model: table.model,
                shell_tier,
                tools,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_file_yields_one_agent_per_table() {
        let agents = parse_agents(
            r#"
            [agents.default]
            model = "openai:gpt-4o-mini"
            shell_tier = "approve"
            tools = ["execute", "read_file"]

            [agents.offline]
            model = "echo"
            "#,
        )
        .unwrap();
        assert_eq!(agents.len(), 2);
        assert_eq!(agents[0].name, "default");
        assert_eq!(agents[0].shell_tier, ShellTier::Approve);
        assert_eq!(agents[0].tools.len(), 2);
        assert_eq!(agents[1].shell_tier, ShellTier::Review);
        assert!(agents[1].tools.is_empty());
    }

    #[test]
    fn unknown_tool_is_an_error_naming_the_tool() {
        let err = parse_agents("[agents.a]\nmodel = \"echo\"\ntools = [\"rm_rf\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"rm_rf\""), "{err}");
    }

    #[test]
    fn bad_shell_tier_and_empty_files_are_errors() {
        assert!(parse_agents("[agents.a]\nmodel = \"echo\"\nshell_tier = \"yolo\"").is_err());
        assert!(parse_agents("").is_err());
        assert!(parse_agents("[agents.a]\nmodel = \"echo\"\nextra = 1").is_err());
    }
}

//! The agents file (`--config`): TOML with one `[agents.NAME]` table each.
//!
//! ```toml
//! [agents.default]
//! model = "openai:gpt-4o-mini"
//! shell_tier = "review"
//! tools = ["execute"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::domain::agent::{AgentConfig, ShellTier, tool_catalogue};

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
/// One line saying what is wrong: the file cannot be read, is not valid TOML
/// of this shape, holds no agent, or names an unknown shell tier or tool.
pub fn load_agents(path: &Path) -> Result<Vec<AgentConfig>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read agents config {}: {e}", path.display()))?;
    parse_agents(&text).map_err(|e| format!("agents config {}: {e}", path.display()))
}

/// Parses agents TOML text; see [`load_agents`].
///
/// # Errors
/// As [`load_agents`], without the file name.
pub fn parse_agents(text: &str) -> Result<Vec<AgentConfig>, String> {
    let file: AgentsFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    if file.agents.is_empty() {
        return Err("no [agents.NAME] table".into());
    }
    let catalogue = tool_catalogue();
    file.agents
        .into_iter()
        .map(|(name, table)| {
            let shell_tier = table
                .shell_tier
                .parse()
                .map_err(|e| format!("agent {name:?}: {e}"))?;
            let tools = table
                .tools
                .iter()
                .map(|tool| {
                    catalogue
                        .iter()
                        .find(|t| &t.name == tool)
                        .cloned()
                        .ok_or_else(|| {
                            format!(
                                "agent {name:?}: unknown tool {tool:?} (known: {})",
                                catalogue
                                    .iter()
                                    .map(|t| t.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
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
        let err = parse_agents("[agents.a]\nmodel = \"echo\"\ntools = [\"rm_rf\"]").unwrap_err();
        assert!(err.contains("\"rm_rf\""), "{err}");
    }

    #[test]
    fn bad_shell_tier_and_empty_files_are_errors() {
        assert!(parse_agents("[agents.a]\nmodel = \"echo\"\nshell_tier = \"yolo\"").is_err());
        assert!(parse_agents("").is_err());
        assert!(parse_agents("[agents.a]\nmodel = \"echo\"\nextra = 1").is_err());
    }
}

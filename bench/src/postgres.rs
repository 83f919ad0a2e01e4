//! A throwaway PostgreSQL schema for one run: the server under test gets a
//! URL whose connections see only that schema (its tables, its migrations),
//! so a run never meets the rows of an earlier one and leaves nothing behind.
//!
//! The schema is made and dropped with `psql`, which comes with every
//! PostgreSQL install: the bench needs no database driver of its own, and
//! the server's own driver reads the schema from the URL (`options=-c
//! search_path=...`, which libpq and sqlx both understand).

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// A schema created for this run, dropped (with everything in it) when
/// this is dropped.
pub struct Schema {
    admin_url: String,
    name: String,
    /// The URL to give the server: the admin URL with the schema as its
    /// search path.
    pub url: String,
}

impl Schema {
    /// Creates `bench_<uuid>` on the database of `url`.
    pub fn create(url: &str) -> anyhow::Result<Self> {
        let name = schema_name(uuid::Uuid::new_v4());
        psql(url, &format!("CREATE SCHEMA {name}"))
            .context("cannot create the bench's PostgreSQL schema")?;
        Ok(Self {
            admin_url: url.to_owned(),
            url: with_search_path(url, &name),
            name,
        })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // The servers using it are gone by now (phases drop their processes
        // first); a schema that cannot be dropped is reported, not fatal.
        if let Err(e) = psql(
            &self.admin_url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        ) {
            eprintln!(
                "warning: PostgreSQL schema {} left behind: {e:#}",
                self.name
            );
        }
    }
}

/// `bench_` and the uuid's 32 hex digits: a lower-case identifier that
/// needs no quoting.
fn schema_name(id: uuid::Uuid) -> String {
    format!("bench_{}", id.simple())
}

/// `url` with `options=-csearch_path=SCHEMA` (percent-encoded) added to
/// its query, after `&` when it already has one.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') {
        if url.ends_with('?') || url.ends_with('&') {
            ""
        } else {
            "&"
        }
    } else {
        "?"
    };
    format!("{url}{separator}options=-csearch_path%3D{schema}")
}

/// Runs one statement with `psql`, never prompting for a password.
fn psql(url: &str, statement: &str) -> anyhow::Result<()> {
    let output = Command::new("psql")
        .args(["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-c", statement])
        .arg(url)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .context("cannot run psql (install the PostgreSQL client, or pass no --postgres-url)")?;
    if !output.status.success() {
        bail!(
            "psql {statement:?}: {} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_path_goes_after_a_question_mark_or_an_ampersand() {
        assert_eq!(
            with_search_path("postgres://u:p@127.0.0.1:5432/db", "bench_x"),
            "postgres://u:p@127.0.0.1:5432/db?options=-csearch_path%3Dbench_x"
        );
        assert_eq!(
            with_search_path("postgres://u@127.0.0.1/db?sslmode=disable", "bench_x"),
            "postgres://u@127.0.0.1/db?sslmode=disable&options=-csearch_path%3Dbench_x"
        );
        assert_eq!(
            with_search_path("postgres://u@127.0.0.1/db?", "bench_x"),
            "postgres://u@127.0.0.1/db?options=-csearch_path%3Dbench_x"
        );
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        let name = schema_name(uuid::Uuid::new_v4());
        assert!(name.starts_with("bench_"), "{name}");
        assert_eq!(name.len(), "bench_".len() + 32, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
    }
}

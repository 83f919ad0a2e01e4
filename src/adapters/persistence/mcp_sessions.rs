//! The `initialize`-era MCP sessions as stored for any instance to restore
//! (SPEC B12): table `mcp_sessions`, one row per live session holding the
//! client's `initialize` parameters as JSON text (what they say is the MCP
//! adapter's business).

use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

use super::file::{self, DatabaseFile};
use super::schema::{McpSessions, to_micros};

/// A row not written for this long belongs to a session nobody closed (its
/// instance died): it is deleted with the next store.
const STALE_AFTER: chrono::Duration = chrono::Duration::days(1);

/// MCP session states in a SQLite or PostgreSQL database.
#[derive(Clone)]
pub struct SeaOrmMcpSessions {
    db: DatabaseConnection,
    file: Option<DatabaseFile>,
}

impl SeaOrmMcpSessions {
    /// Sessions over an open, migrated connection to `url`.
    #[must_use]
    pub fn new(db: DatabaseConnection, url: &str) -> Self {
        Self {
            db,
            file: DatabaseFile::of(url),
        }
    }

    fn check_file(&self) -> Result<(), String> {
        file::check(self.file.as_ref())
    }

    /// The stored state of session `id`.
    ///
    /// # Errors
    /// The database's, as text for logs.
    pub async fn load(&self, id: &str) -> Result<Option<String>, String> {
        self.check_file()?;
        let select = Query::select()
            .column(McpSessions::StateJson)
            .from(McpSessions::Table)
            .and_where(Expr::col(McpSessions::Id).eq(id))
            .to_owned();
        let row = self.db.query_one(&select).await.map_err(text)?;
        row.map(|row| row.try_get_by_index::<String>(0).map_err(text))
            .transpose()
    }

    /// Stores (or replaces) session `id`'s state, and drops stale rows.
    ///
    /// # Errors
    /// The database's, as text for logs.
    pub async fn store(&self, id: &str, state: &str) -> Result<(), String> {
        self.check_file()?;
        let now = Utc::now();
        let upsert = Query::insert()
            .into_table(McpSessions::Table)
            .columns([
                McpSessions::Id,
                McpSessions::StateJson,
                McpSessions::UpdatedAt,
            ])
            .values_panic([Expr::val(id), Expr::val(state), Expr::val(to_micros(now))])
            .on_conflict(
                OnConflict::column(McpSessions::Id)
                    .update_columns([McpSessions::StateJson, McpSessions::UpdatedAt])
                    .to_owned(),
            )
            .to_owned();
        let stale = Query::delete()
            .from_table(McpSessions::Table)
            .and_where(Expr::col(McpSessions::UpdatedAt).lt(to_micros(now - STALE_AFTER)))
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        self.db.execute(&upsert).await.map_err(text)?;
        self.db.execute(&stale).await.map_err(text)?;
        Ok(())
    }

    /// Deletes session `id`'s state.
    ///
    /// # Errors
    /// The database's, as text for logs.
    pub async fn delete(&self, id: &str) -> Result<(), String> {
        self.check_file()?;
        let delete = Query::delete()
            .from_table(McpSessions::Table)
            .and_where(Expr::col(McpSessions::Id).eq(id))
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        self.db.execute(&delete).await.map_err(text)?;
        Ok(())
    }
}

fn text(error: DbErr) -> String {
    error.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::persistence::test_support::backends;

    #[tokio::test]
    async fn a_stored_state_loads_until_it_is_deleted() {
        for backend in backends().await {
            let sessions = SeaOrmMcpSessions::new(backend.connect().await, &backend.url);
            assert_eq!(sessions.load("m1").await.unwrap(), None);
            sessions.store("m1", "{\"a\":1}").await.unwrap();
            sessions.store("m1", "{\"a\":2}").await.unwrap();
            assert_eq!(
                sessions.load("m1").await.unwrap().as_deref(),
                Some("{\"a\":2}")
            );
            sessions.delete("m1").await.unwrap();
            assert_eq!(sessions.load("m1").await.unwrap(), None);
        }
    }
}

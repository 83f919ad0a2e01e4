//! Persistence adapter: sea-orm over SQLite (the default, a file in the data
//! dir) or PostgreSQL (a `postgres://` URL), one code path for both.
//! Implements the [`crate::ports::ApprovalStore`] port.

mod approval_store;
mod entity;
mod file;
pub mod migrations;

use std::path::Path;
use std::time::Duration;

use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;

pub use approval_store::SeaOrmApprovalStore;

/// How connections to the approval database are made and pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectSettings {
    /// Pool size. Approvals are a trickle of small writes; a few connections
    /// keep a slow reader from blocking a decision.
    pub max_connections: u32,
    /// How long an operation waits for a connection, including making a new
    /// one. Short, so that a database that is down answers an error quickly
    /// instead of hanging the request.
    pub acquire_timeout: Duration,
    /// SQLite only: how long a statement waits for another connection's (or
    /// process's) lock before failing. Approval writes are single short
    /// statements, so a lock held longer than this means trouble, and the
    /// client is better served by a quick 503 than by a hanging request.
    pub busy_timeout: Duration,
}

impl Default for ConnectSettings {
    fn default() -> Self {
        Self {
            max_connections: 5,
            acquire_timeout: Duration::from_secs(1),
            busy_timeout: Duration::from_millis(750),
        }
    }
}

/// Why the approval database could not be opened. Messages never contain
/// the URL: it may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("unsupported database URL: expected sqlite:PATH or postgres://...")]
    UnsupportedUrl,
    #[error("cannot open the approval database: {0}")]
    Open(String),
    #[error("cannot migrate the approval database: {0}")]
    Migrate(String),
}

/// The `sqlite:` URL of a database file, created if missing. Characters that
/// the URL form would read as syntax (`%`, `?`, `#`) are escaped.
#[must_use]
pub fn sqlite_url(path: &Path) -> String {
    let path = path.to_string_lossy();
    let mut url = String::from("sqlite://");
    for c in path.chars() {
        match c {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    url.push_str("?mode=rwc");
    url
}

/// Opens the database at `url` and brings its schema up to date.
///
/// SQLite files are created if missing and put in WAL mode, so readers never
/// block the writer; `sqlite::memory:` gives a private in-memory database.
/// PostgreSQL URLs are libpq-style (`postgres://user:pass@host/db?...`).
///
/// # Errors
/// [`ConnectError::UnsupportedUrl`] for another scheme,
/// [`ConnectError::Open`] when the database cannot be reached or opened
/// (within about `settings.acquire_timeout`), [`ConnectError::Migrate`] when
/// its schema cannot be brought up to date.
pub async fn connect(
    url: &str,
    settings: &ConnectSettings,
) -> Result<DatabaseConnection, ConnectError> {
    let sqlite = url.starts_with("sqlite:");
    if !sqlite && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(ConnectError::UnsupportedUrl);
    }
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // Statements would be logged at info level, bodies included.
        .sqlx_logging(false);
    if sqlite {
        let busy_timeout = settings.busy_timeout;
        options.map_sqlx_sqlite_opts(move |sqlite| {
            sqlite
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(busy_timeout)
        });
        if url.contains(":memory:") || url.contains("mode=memory") {
            // An in-memory database lives as long as one connection to it:
            // keep one open for good.
            options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
    }
    let db = Database::connect(options)
        .await
        .map_err(|e| ConnectError::Open(e.to_string()))?;
    migrations::Migrator::up(&db, None)
        .await
        .map_err(|e| ConnectError::Migrate(e.to_string()))?;
    Ok(db)
}

//! Persistence adapter: sea-orm over SQLite (the default, a file in the data
//! dir) or PostgreSQL (a `postgres://` URL), one code path for both.
//! Implements the [`crate::ports::ApprovalStore`], [`crate::ports::SessionStore`],
//! [`crate::ports::EventStore`] and [`crate::ports::TurnStore`] ports, all
//! over one database and one pool.

mod approval_store;
mod entity;
mod event_store;
mod file;
mod history_cache;
mod mcp_sessions;
pub mod migrations;
mod schema;
mod session_store;
#[cfg(test)]
mod test_support;
mod turn_store;

use std::path::Path;
use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;

pub use approval_store::SeaOrmApprovalStore;
pub use event_store::{EVENTS_CHANNEL, SeaOrmEventStore};
pub use mcp_sessions::SeaOrmMcpSessions;
pub use session_store::SeaOrmSessionStore;
pub use turn_store::{CONTROL_CHANNEL, SeaOrmTurnStore, notify_control};

/// The SQL of a notification channel's name: `prefix` (a bound parameter)
/// followed by the schema the connection works in, so that instances
/// sharing a database but not a schema do not hear each other. Names stay
/// under PostgreSQL's 63 bytes.
fn channel_sql(prefix: &str) -> String {
    format!("{prefix} || left(current_schema(), 40)")
}

/// `NOTIFY` on the channel named by `$1` (a prefix, see [`channel_sql`])
/// with the payload `$2`.
fn notify_sql() -> String {
    format!("SELECT pg_notify({}, $2)", channel_sql("$1"))
}

/// The schema-specific name of a notification channel, as
/// [`channel_sql`] builds it, for `LISTEN`.
#[must_use]
pub fn channel_name(prefix: &str, schema: &str) -> String {
    format!("{prefix}{}", schema.chars().take(40).collect::<String>())
}

/// How connections to the database are made and pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectSettings {
    /// Pool size. Approvals are a trickle of small writes, but sessions,
    /// the event log's group commit and the turn lease renewal share the
    /// pool: 8 lets the event writer, a lease renewal and a few requests
    /// each hold one at once without waiting. More buys nothing on SQLite
    /// (one writer at a time; WAL readers need no more), and on PostgreSQL
    /// 8 per instance leaves its default 100 connections for a dozen
    /// instances.
    pub max_connections: u32,
    /// How long an operation waits for a connection, including making a new
    /// one. Short, so that a database that is down answers an error quickly
    /// instead of hanging the request.
    pub acquire_timeout: Duration,
    /// SQLite only: how long a statement waits for another connection's (or
    /// process's) lock before failing. Writes are single short statements
    /// or short transactions (an event batch, a history append: a few
    /// milliseconds), so a lock held longer than this means trouble, and the
    /// client is better served by a quick 503 than by a hanging request.
    pub busy_timeout: Duration,
}

impl ConnectSettings {
    /// The default pool, where an operation waits up to `wait` for a
    /// connection and, on SQLite, three quarters of it for a lock (so the
    /// lock's error, which names the cause, comes first).
    #[must_use]
    pub fn waiting(wait: Duration) -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: wait,
            busy_timeout: wait * 3 / 4,
        }
    }
}

impl Default for ConnectSettings {
    /// A one-second wait: a database that is down answers 503 quickly.
    fn default() -> Self {
        Self::waiting(Duration::from_secs(1))
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
/// block the writer, with `synchronous = NORMAL`: a commit is in the WAL
/// (the operating system's page cache) when it returns, and is synced to
/// disk at checkpoints. That survives a crash of the process, SIGKILL
/// included, which is what SPEC B10 asks; a power cut or kernel crash may
/// lose the last commits (never corrupt the file). `FULL` would sync the
/// WAL at every commit, a disk flush per streamed-token batch.
/// `sqlite::memory:` gives a private in-memory database.
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
        // sqlx pings a connection on every checkout by default: one more
        // round trip per statement (to SQLite's worker thread, or over the
        // network). Only a connection idle long enough for a server, proxy
        // or firewall to have dropped it is pinged.
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        // Statements would be logged at info level, bodies included.
        .sqlx_logging(false);
    if sqlite {
        let busy_timeout = settings.busy_timeout;
        options.map_sqlx_sqlite_opts(move |sqlite| {
            sqlite
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
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
    if sqlite {
        migrations::Migrator::up(&db, None)
            .await
            .map_err(|e| ConnectError::Migrate(e.to_string()))?;
    } else {
        migrate_alone(&db).await?;
    }
    Ok(db)
}

/// Migrates a PostgreSQL schema while holding a session lock on it, so
/// that instances started together migrate one after the other (the later
/// ones then find nothing to do) instead of racing on the same tables.
async fn migrate_alone(db: &DatabaseConnection) -> Result<(), ConnectError> {
    use sea_orm::sqlx;
    const LOCK: &str = "hashtextextended('autopoiesis migrations ' || current_schema(), 0)";
    let migrate = |e: sqlx::Error| ConnectError::Migrate(e.to_string());
    let mut holder = db
        .get_postgres_connection_pool()
        .acquire()
        .await
        .map_err(migrate)?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_lock({LOCK})"
    )))
    .execute(&mut *holder)
    .await
    .map_err(migrate)?;
    let migrated = migrations::Migrator::up(db, None)
        .await
        .map_err(|e| ConnectError::Migrate(e.to_string()));
    let unlocked = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_unlock({LOCK})"
    )))
    .execute(&mut *holder)
    .await;
    if unlocked.is_err() {
        // A connection still holding the lock must not go back to the pool.
        holder.close_on_drop();
    }
    migrated
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Statement};

    use super::*;

    #[tokio::test]
    async fn sqlite_files_open_in_wal_mode_with_normal_synchronous() {
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir.path().join("autopoiesis.sqlite"));
        let db = connect(&url, &ConnectSettings::default()).await.unwrap();
        let pragma = |name: &str| {
            Statement::from_string(db.get_database_backend(), format!("PRAGMA {name}"))
        };
        let journal = db.query_one_raw(pragma("journal_mode")).await.unwrap();
        let journal: String = journal.unwrap().try_get_by_index(0).unwrap();
        assert_eq!(journal, "wal");
        // Every connection of the pool, not only the first: hold several.
        let mut held = Vec::new();
        for _ in 0..3 {
            let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
            let row = txn.query_one_raw(pragma("synchronous")).await.unwrap();
            // 1 is NORMAL (0 OFF, 2 FULL, 3 EXTRA).
            assert_eq!(row.unwrap().try_get_by_index::<i64>(0).unwrap(), 1);
            held.push(txn);
        }
    }
}

//! Databases for the stores' tests: a fresh SQLite file always, and a fresh
//! PostgreSQL schema when `AUTOPOIESIS_TEST_DATABASE_URL` names a database,
//! so every test body runs once per backend.

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use super::{ConnectSettings, connect, sqlite_url};

/// A database to run a test against, isolated from every other test.
pub(super) struct Backend {
    pub name: &'static str,
    pub url: String,
    /// Keeps the SQLite file's directory alive for the test.
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A migrated connection to it.
    pub async fn connect(&self) -> DatabaseConnection {
        eprintln!("backend: {}", self.name);
        connect(&self.url, &ConnectSettings::default())
            .await
            .unwrap()
    }
}

/// A fresh SQLite file, and a fresh PostgreSQL schema when
/// `AUTOPOIESIS_TEST_DATABASE_URL` is set.
pub(super) async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = vec![Backend {
        name: "sqlite",
        url: sqlite_url(&dir.path().join("autopoiesis.sqlite")),
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("AUTOPOIESIS_TEST_DATABASE_URL") {
        // Tests run in parallel: each gets its own schema, found first on
        // its connections' search path.
        let schema = format!("unit_{}", uuid::Uuid::new_v4().simple());
        let admin = sea_orm::Database::connect(url.as_str()).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let separator = if url.contains('?') { '&' } else { '?' };
        backends.push(Backend {
            name: "postgres",
            url: format!("{url}{separator}options=-csearch_path%3D{schema}"),
            _dir: None,
        });
    }
    backends
}

/// Runs `sql` (test text, no parameters) on `db`.
pub(super) async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql).await.unwrap();
}

/// The single value `sql` selects, as column `column`.
async fn scalar<T: sea_orm::TryGetable>(db: &DatabaseConnection, sql: &str, column: &str) -> T {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<T>("", column).unwrap()
}

/// The single integer `sql` selects, as column `n`.
pub(super) async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    scalar(db, sql, "n").await
}

/// The single text `sql` selects, as column `t`.
pub(super) async fn text(db: &DatabaseConnection, sql: &str) -> String {
    scalar(db, sql, "t").await
}

/// An instant with nanoseconds, which storage truncates to microseconds.
pub(super) fn t0() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
        .unwrap()
        .with_timezone(&chrono::Utc)
}

/// `t0()` plus `seconds`.
pub(super) fn at(seconds: i64) -> chrono::DateTime<chrono::Utc> {
    t0() + chrono::Duration::seconds(seconds)
}

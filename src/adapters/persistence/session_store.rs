//! [`SessionStore`] over sea-orm: tables `sessions` (metadata) and
//! `session_messages` (history); deleting a session also clears what the
//! event and turn stores keep for it.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{
    Alias, Asterisk, CaseStatement, Expr, ExprTrait, Func, IntoIden, OnConflict, Order, Query,
    SelectStatement,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult, TransactionTrait};

use super::file::{self, DatabaseFile};
use super::history_cache::HistoryCache;
use super::schema::{
    MAX_BIND_PARAMETERS, SessionEvents, SessionMessages, SessionStreams, Sessions, Turns,
    from_micros, to_micros,
};
use crate::domain::message::{History, ModelMessage};
use crate::domain::session::{SessionId, SessionInfo};
use crate::ports::{SessionStore, SessionStoreError};

/// Sessions in a SQLite or PostgreSQL database.
#[derive(Clone)]
pub struct SeaOrmSessionStore {
    db: DatabaseConnection,
    /// The SQLite file, as it was when the store opened: each operation
    /// first checks that it is still there (see [`super::file`]).
    file: Option<DatabaseFile>,
    /// Sessions it holds at most: creating one more is refused.
    max_sessions: usize,
    /// Histories read lately (shared by the clones of the store).
    cache: std::sync::Arc<HistoryCache>,
    /// When this process last wrote each session's `last_active` (µs):
    /// within [`TOUCH_EVERY`] of that, a use does not write it again.
    touched: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<SessionId, i64>>>,
    /// This instance's name, when others share the database: a delete
    /// tells them (`deleted OWNER SESSION`), so they stop the session's
    /// turn and close its clients.
    instance: Option<String>,
}

/// How stale `last_active` may be, in µs. It only decides when an idle
/// session leaves memory (minutes) and when it is deleted (days), and every
/// appended turn writes it anyway, so a use within a second of the last
/// write costs no write (the write gate is what every turn waits on).
const TOUCH_EVERY: i64 = 1_000_000;
/// Sessions remembered as touched before the old entries are dropped.
const TOUCHED_KEPT: usize = 4096;

impl SeaOrmSessionStore {
    /// A store over an open, migrated connection to `url` (see
    /// [`super::connect`]) that holds at most `max_sessions` sessions.
    #[must_use]
    pub fn new(db: DatabaseConnection, url: &str, max_sessions: usize) -> Self {
        Self {
            db,
            file: DatabaseFile::of(url),
            max_sessions,
            cache: std::sync::Arc::default(),
            touched: std::sync::Arc::default(),
            instance: None,
        }
    }

    /// Tells the other instances on the database of every delete, as
    /// `instance`.
    #[must_use]
    pub fn shared_as(mut self, instance: String) -> Self {
        self.instance = Some(instance);
        self
    }

    fn check_file(&self) -> Result<(), SessionStoreError> {
        file::check(self.file.as_ref()).map_err(SessionStoreError::Unavailable)
    }

    fn touched_lately(&self, id: &SessionId, now: i64) -> bool {
        let touched = self
            .touched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        touched.get(id).is_some_and(|at| now - at < TOUCH_EVERY)
    }

    fn remember_touch(&self, id: &SessionId, now: i64) {
        let mut touched = self
            .touched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if touched.len() >= TOUCHED_KEPT {
            touched.retain(|_, at| now - *at < TOUCH_EVERY);
        }
        touched.insert(id.clone(), now);
    }

    /// Marks the session active at `now` (never earlier than it was); false
    /// when there is no such session.
    async fn touch(&self, id: &SessionId, now: i64) -> Result<bool, SessionStoreError> {
        let update = Query::update()
            .table(Sessions::Table)
            .value(Sessions::LastActive, later(now))
            .and_where(Expr::col(Sessions::Id).eq(id.as_str()))
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        let result = self.db.execute(&update).await.map_err(unavailable)?;
        Ok(result.rows_affected() > 0)
    }

    /// The session's info, `None` when there is no such session.
    async fn info(&self, id: &SessionId) -> Result<Option<SessionInfo>, SessionStoreError> {
        let select = info_query()
            .and_where(Expr::col((Sessions::Table, Sessions::Id)).eq(id.as_str()))
            .to_owned();
        let Some(row) = self.db.query_one(&select).await.map_err(unavailable)? else {
            return Ok(None);
        };
        to_info(&row).map(Some).map_err(|why| {
            tracing::error!(session.id = %id, error = %why, "stored session unreadable");
            SessionStoreError::Unavailable(format!("session {id}: {why}"))
        })
    }

    /// Creates the session at `now` unless the table already holds
    /// `max_sessions`. One statement, `INSERT ... SELECT ... WHERE (SELECT
    /// COUNT(*) ...) < max ON CONFLICT DO NOTHING`, so that racing creates
    /// of one id both succeed and no read of the count goes stale before
    /// the insert on SQLite (one writer at a time). On PostgreSQL racing
    /// creates of different ids may each see room for one more and pass
    /// the cap by a few: a cap against runaway clients, not an exact quota.
    async fn create(&self, id: &SessionId, now: i64) -> Result<(), SessionStoreError> {
        let max = i64::try_from(self.max_sessions).unwrap_or(i64::MAX);
        let count = Query::select()
            .expr(Func::count(Expr::col(Asterisk)))
            .from(Sessions::Table)
            .to_owned();
        let values = Query::select()
            .exprs([
                Expr::val(id.as_str()),
                Expr::val(now),
                Expr::val(now),
                Expr::val(0_i64),
                Expr::val(0_i64),
            ])
            .and_where(Expr::from(count).lt(max))
            .to_owned();
        let insert = Query::insert()
            .into_table(Sessions::Table)
            .columns([
                Sessions::Id,
                Sessions::CreatedAt,
                Sessions::LastActive,
                Sessions::MessageCount,
                Sessions::HistoryBytes,
            ])
            .select_from(values)
            .map_err(|e| SessionStoreError::Unavailable(e.to_string()))?
            .on_conflict(OnConflict::column(Sessions::Id).do_nothing().to_owned())
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        self.db.execute(&insert).await.map_err(unavailable)?;
        Ok(())
    }
}

fn unavailable(error: DbErr) -> SessionStoreError {
    SessionStoreError::Unavailable(error.to_string())
}

/// `last_active` moved to `now`, or kept when it is later already (a
/// slower request must not move it back).
fn later(now: i64) -> CaseStatement {
    Expr::case(Expr::col(Sessions::LastActive).lt(now), Expr::val(now))
        .finally(Expr::col(Sessions::LastActive))
}

/// Sessions with their stream's `last_seq` (0 without a stream): one LEFT
/// JOIN, so listing ten thousand sessions is one query.
fn info_query() -> SelectStatement {
    Query::select()
        .column((Sessions::Table, Sessions::Id))
        .column((Sessions::Table, Sessions::CreatedAt))
        .column((Sessions::Table, Sessions::MessageCount))
        .column((Sessions::Table, Sessions::HistoryBytes))
        .expr_as(
            Func::coalesce([
                Expr::col((SessionStreams::Table, SessionStreams::LastSeq)),
                Expr::val(0_i64),
            ]),
            Alias::new("last_seq"),
        )
        .from(Sessions::Table)
        .left_join(
            SessionStreams::Table,
            Expr::col((SessionStreams::Table, SessionStreams::SessionId))
                .equals((Sessions::Table, Sessions::Id)),
        )
        .to_owned()
}

/// A row of [`info_query`].
fn to_info(row: &QueryResult) -> Result<SessionInfo, String> {
    let get = |index: usize| {
        row.try_get_by_index::<i64>(index)
            .map_err(|e| e.to_string())
    };
    let id: String = row.try_get_by_index(0).map_err(|e| e.to_string())?;
    let id = SessionId::parse(&id).map_err(|e| e.to_string())?;
    let created_at = get(1)?;
    Ok(SessionInfo {
        created_at: from_micros(created_at)
            .ok_or_else(|| format!("created_at {created_at} out of range"))?,
        message_count: usize::try_from(get(2)?).map_err(|e| e.to_string())?,
        history_bytes: usize::try_from(get(3)?).map_err(|e| e.to_string())?,
        last_seq: u64::try_from(get(4)?).map_err(|e| e.to_string())?,
        id,
    })
}

/// A statement deleting the rows of `table` whose `column` is `id`.
fn delete_rows(
    table: impl IntoIden,
    column: impl IntoIden,
    id: &SessionId,
) -> sea_orm::sea_query::DeleteStatement {
    Query::delete()
        .from_table(table)
        .and_where(Expr::col(column).eq(id.as_str()))
        .to_owned()
}

#[async_trait]
impl SessionStore for SeaOrmSessionStore {
    async fn get_or_create(
        &self,
        id: &SessionId,
        now: DateTime<Utc>,
    ) -> Result<SessionInfo, SessionStoreError> {
        self.check_file()?;
        // Truncated here, so the created_at returned is the one stored.
        let now = to_micros(now);
        // Used within the second by this process: only read it.
        if self.touched_lately(id, now)
            && let Some(info) = self.info(id).await?
        {
            return Ok(info);
        }
        // Most calls find the session: touch it first, create only on a miss.
        if self.touch(id, now).await?
            && let Some(info) = self.info(id).await?
        {
            self.remember_touch(id, now);
            return Ok(info);
        }
        self.create(id, now).await?;
        // When a racing create won, this one still marks it active.
        self.touch(id, now).await?;
        // Still missing: the create found the table full.
        self.info(id)
            .await?
            .ok_or(SessionStoreError::TooManySessions(self.max_sessions))
    }

    async fn list(&self) -> Result<Vec<SessionInfo>, SessionStoreError> {
        self.check_file()?;
        let select = info_query()
            .order_by((Sessions::Table, Sessions::CreatedAt), Order::Asc)
            .order_by((Sessions::Table, Sessions::Id), Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&select).await.map_err(unavailable)?;
        // A row that cannot be read hides that session, not the list.
        Ok(rows
            .iter()
            .filter_map(|row| {
                to_info(row)
                    .inspect_err(|why| {
                        tracing::error!(error = %why, "stored session unreadable; not listed");
                    })
                    .ok()
            })
            .collect())
    }

    async fn history(&self, id: &SessionId) -> Result<History, SessionStoreError> {
        self.check_file()?;
        let exists = Query::select()
            .columns([Sessions::CreatedAt, Sessions::MessageCount])
            .from(Sessions::Table)
            .and_where(Expr::col(Sessions::Id).eq(id.as_str()))
            .to_owned();
        let Some(row) = self.db.query_one(&exists).await.map_err(unavailable)? else {
            return Err(SessionStoreError::NotFound);
        };
        let created_at = row.try_get_by_index::<i64>(0).map_err(unavailable)?;
        let count = row.try_get_by_index::<i64>(1).map_err(unavailable)?;
        if let Some(history) = self.cache.get(id, created_at, count) {
            return Ok(history);
        }
        let select = Query::select()
            .columns([SessionMessages::Idx, SessionMessages::MessageJson])
            .from(SessionMessages::Table)
            .and_where(Expr::col(SessionMessages::SessionId).eq(id.as_str()))
            .order_by(SessionMessages::Idx, Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&select).await.map_err(unavailable)?;
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows {
            let idx = row.try_get_by_index::<i64>(0).unwrap_or(-1);
            let message = row
                .try_get_by_index::<String>(1)
                .map_err(|e| e.to_string())
                .and_then(|json| {
                    serde_json::from_str::<ModelMessage>(&json).map_err(|e| e.to_string())
                });
            match message {
                Ok(message) => messages.push(message),
                // Leaving the message out would show the client (and the
                // model) a history that never happened: the session is
                // unreadable until the row is repaired; others still read.
                Err(why) => {
                    tracing::error!(
                        session.id = %id,
                        message.idx = idx,
                        error = %why,
                        "stored message unreadable"
                    );
                    return Err(SessionStoreError::Unavailable(format!(
                        "message {idx} of session {id} is unreadable: {why}"
                    )));
                }
            }
        }
        let history = History::new(messages);
        // Kept only when what was read is what the count said: a racing
        // append between the two queries is read again next time.
        if i64::try_from(history.len()).ok() == Some(count) {
            self.cache.put(id, created_at, history.clone());
        }
        Ok(history)
    }

    async fn append(
        &self,
        id: &SessionId,
        messages: Vec<ModelMessage>,
        now: DateTime<Utc>,
    ) -> Result<(), SessionStoreError> {
        self.check_file()?;
        let count = i64::try_from(messages.len()).map_err(|e| unavailable_text(&e))?;
        let bytes = i64::try_from(messages.iter().map(ModelMessage::size).sum::<usize>())
            .map_err(|e| unavailable_text(&e))?;
        let texts = messages
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unavailable_text(&e))?;
        let now = to_micros(now);
        let _gate = file::write_gate(self.file.as_ref()).await;
        let txn = self.db.begin().await.map_err(unavailable)?;
        // The update comes first: it takes the write lock (SQLite) or the
        // row lock (PostgreSQL) at once, so racing appends queue here
        // instead of numbering their rows from the same count, and it
        // answers the new count, from which this append's rows are numbered.
        let update = Query::update()
            .table(Sessions::Table)
            .value(
                Sessions::MessageCount,
                Expr::col(Sessions::MessageCount).add(count),
            )
            .value(
                Sessions::HistoryBytes,
                Expr::col(Sessions::HistoryBytes).add(bytes),
            )
            .value(Sessions::LastActive, later(now))
            .and_where(Expr::col(Sessions::Id).eq(id.as_str()))
            .returning_col(Sessions::MessageCount)
            .to_owned();
        let Some(row) = txn.query_one(&update).await.map_err(unavailable)? else {
            txn.rollback().await.map_err(unavailable)?;
            return Err(SessionStoreError::NotFound);
        };
        let first = row.try_get_by_index::<i64>(0).map_err(unavailable)? - count;
        let rows_per_insert = MAX_BIND_PARAMETERS / 3;
        for (chunk_index, chunk) in texts.chunks(rows_per_insert).enumerate() {
            let mut insert = Query::insert()
                .into_table(SessionMessages::Table)
                .columns([
                    SessionMessages::SessionId,
                    SessionMessages::Idx,
                    SessionMessages::MessageJson,
                ])
                .to_owned();
            for (offset, text) in chunk.iter().enumerate() {
                let idx = first
                    + i64::try_from(chunk_index * rows_per_insert + offset)
                        .map_err(|e| unavailable_text(&e))?;
                insert.values_panic([
                    Expr::val(id.as_str()),
                    Expr::val(idx),
                    Expr::val(text.as_str()),
                ]);
            }
            txn.execute(&insert).await.map_err(unavailable)?;
        }
        txn.commit().await.map_err(unavailable)?;
        self.cache.appended(id, first, &messages);
        Ok(())
    }

    async fn delete(&self, id: &SessionId) -> Result<(), SessionStoreError> {
        self.check_file()?;
        let _gate = file::write_gate(self.file.as_ref()).await;
        let txn = self.db.begin().await.map_err(unavailable)?;
        let deleted = txn
            .execute(&delete_rows(Sessions::Table, Sessions::Id, id))
            .await
            .map_err(unavailable)?;
        if deleted.rows_affected() == 0 {
            txn.rollback().await.map_err(unavailable)?;
            return Err(SessionStoreError::NotFound);
        }
        self.cache.forget(id);
        self.touched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        for statement in [
            delete_rows(SessionMessages::Table, SessionMessages::SessionId, id),
            delete_rows(SessionEvents::Table, SessionEvents::SessionId, id),
            delete_rows(SessionStreams::Table, SessionStreams::SessionId, id),
            delete_rows(Turns::Table, Turns::SessionId, id),
        ] {
            txn.execute(&statement).await.map_err(unavailable)?;
        }
        if let Some(instance) = &self.instance {
            // Heard when the delete commits.
            super::notify_control(&txn, &format!("deleted {instance} {id}"))
                .await
                .map_err(unavailable)?;
        }
        txn.commit().await.map_err(unavailable)
    }

    async fn idle_since(
        &self,
        idle_since: DateTime<Utc>,
    ) -> Result<Vec<SessionId>, SessionStoreError> {
        self.check_file()?;
        let select = Query::select()
            .column(Sessions::Id)
            .from(Sessions::Table)
            .and_where(Expr::col(Sessions::LastActive).lt(to_micros(idle_since)))
            .order_by(Sessions::LastActive, Order::Asc)
            .order_by(Sessions::Id, Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&select).await.map_err(unavailable)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let id = row.try_get_by_index::<String>(0).ok()?;
                SessionId::parse(&id)
                    .inspect_err(|_| {
                        tracing::error!(session.id = %id, "stored session id invalid; skipped");
                    })
                    .ok()
            })
            .collect())
    }

    fn is_durable(&self) -> bool {
        true
    }
}

fn unavailable_text(error: &dyn std::fmt::Display) -> SessionStoreError {
    SessionStoreError::Unavailable(error.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::adapters::persistence::schema::stored;
    use crate::adapters::persistence::test_support::{at, backends, count, exec, t0, text};
    use crate::adapters::persistence::{SeaOrmEventStore, SeaOrmTurnStore};
    use crate::domain::message::{RequestPart, ResponsePart};
    use crate::domain::session::TurnId;
    use crate::ports::{EventBatch, EventStore, StoredEvent, TurnRecord, TurnStore};

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    /// One message of every kind and part the A3 shape has.
    fn conversation() -> Vec<ModelMessage> {
        vec![
            ModelMessage::user_prompt("list the files, ö", t0()),
            ModelMessage::Response {
                parts: vec![
                    ResponsePart::Thinking {
                        content: "hm".into(),
                    },
                    ResponsePart::ToolCall {
                        tool_name: "execute".into(),
                        args: json!({"command": "ls"}),
                        tool_call_id: "c1".into(),
                    },
                ],
                model_name: Some("echo".into()),
                timestamp: at(1),
            },
            ModelMessage::Request {
                parts: vec![RequestPart::ToolReturn {
                    tool_name: "execute".into(),
                    content: json!({"stdout": "a\nb"}),
                    tool_call_id: "c1".into(),
                    timestamp: at(2),
                }],
            },
            ModelMessage::Response {
                parts: vec![ResponsePart::Text {
                    content: "a and b".into(),
                }],
                model_name: None,
                timestamp: at(3),
            },
        ]
    }

    fn event(seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            turn_id: Some("t1".into()),
            op: "token".into(),
            frame: format!(r#"{{"op":"token","data":{{"content":"{seq}"}},"seq":{seq}}}"#),
            prelude: None,
        }
    }

    #[tokio::test]
    async fn sessions_and_history_read_back_exactly_after_a_reopen() {
        for backend in backends().await {
            let store = SeaOrmSessionStore::new(backend.connect().await, &backend.url, 100);
            let created = store.get_or_create(&id("a"), t0()).await.unwrap();
            assert_eq!(created.created_at, stored(t0()));
            assert_ne!(created.created_at, t0(), "t0 has nanoseconds");
            assert_eq!((created.message_count, created.last_seq), (0, 0));

            let history = conversation();
            store
                .append(&id("a"), history[..1].to_vec(), at(1))
                .await
                .unwrap();
            store
                .append(&id("a"), history[1..].to_vec(), at(4))
                .await
                .unwrap();

            // A new connection, as after a restart.
            let db = backend.connect().await;
            let reopened = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            assert_eq!(*reopened.history(&id("a")).await.unwrap(), history);
            let expected = SessionInfo {
                id: id("a"),
                created_at: created.created_at,
                message_count: 4,
                history_bytes: history.iter().map(ModelMessage::size).sum(),
                last_seq: 0,
            };
            assert_eq!(reopened.list().await.unwrap(), vec![expected.clone()]);
            assert_eq!(
                reopened.get_or_create(&id("a"), at(9)).await.unwrap(),
                expected
            );
            // Stored as the A3 JSON, one row per message, numbered from 0.
            for (idx, message) in history.iter().enumerate() {
                let stored = text(
                    &db,
                    &format!(
                        "SELECT message_json AS t FROM session_messages \
                         WHERE session_id = 'a' AND idx = {idx}"
                    ),
                )
                .await;
                assert_eq!(
                    serde_json::from_str::<serde_json::Value>(&stored).unwrap(),
                    serde_json::to_value(message).unwrap()
                );
            }
        }
    }

    #[tokio::test]
    async fn a_cached_history_follows_appends_from_another_store_and_re_creation() {
        for backend in backends().await {
            let db = backend.connect().await;
            // Two servers on one database, each with its own cache.
            let one = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            let two = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            let history = conversation();
            one.get_or_create(&id("a"), t0()).await.unwrap();
            one.append(&id("a"), history[..2].to_vec(), at(1))
                .await
                .unwrap();
            assert_eq!(*one.history(&id("a")).await.unwrap(), history[..2]);
            two.append(&id("a"), history[2..].to_vec(), at(2))
                .await
                .unwrap();
            assert_eq!(*one.history(&id("a")).await.unwrap(), history, "read again");
            one.append(&id("a"), history[..1].to_vec(), at(3))
                .await
                .unwrap();
            assert_eq!(
                one.history(&id("a")).await.unwrap().len(),
                5,
                "grown in place"
            );
            // Deleted by the other and created again: a new, empty history.
            two.delete(&id("a")).await.unwrap();
            two.get_or_create(&id("a"), at(5)).await.unwrap();
            assert!(one.history(&id("a")).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn appending_to_a_deleted_session_is_not_found_and_creates_nothing() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            store.get_or_create(&id("a"), t0()).await.unwrap();
            store.delete(&id("a")).await.unwrap();
            assert_eq!(
                store.append(&id("a"), conversation(), at(1)).await,
                Err(SessionStoreError::NotFound)
            );
            assert_eq!(
                store.history(&id("a")).await,
                Err(SessionStoreError::NotFound)
            );
            assert_eq!(
                store.delete(&id("a")).await,
                Err(SessionStoreError::NotFound)
            );
            assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM sessions").await, 0);
            assert_eq!(
                count(&db, "SELECT COUNT(*) AS n FROM session_messages").await,
                0
            );
            assert!(store.list().await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn deleting_a_session_removes_its_events_stream_and_turns_and_nothing_else() {
        for backend in backends().await {
            let db = backend.connect().await;
            let sessions = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            let events = SeaOrmEventStore::new(db.clone(), &backend.url);
            let turns = SeaOrmTurnStore::new(db.clone(), &backend.url);
            for name in ["a", "b"] {
                sessions.get_or_create(&id(name), t0()).await.unwrap();
                sessions
                    .append(&id(name), conversation(), at(1))
                    .await
                    .unwrap();
                events
                    .write(EventBatch {
                        events: vec![(id(name), event(1)), (id(name), event(2))],
                        reserve: vec![(id(name), 8)],
                        trim: vec![],
                        ..EventBatch::default()
                    })
                    .await
                    .unwrap();
                turns
                    .begin(&TurnRecord {
                        running: true,
                        turn_id: TurnId::generate(),
                        session_id: id(name),
                        owner: "me".into(),
                        prompt: "hi".into(),
                        started_at: t0(),
                        lease_until: at(10),
                    })
                    .await
                    .unwrap();
            }
            sessions.delete(&id("a")).await.unwrap();

            for (table, column) in [
                ("sessions", "id"),
                ("session_messages", "session_id"),
                ("session_events", "session_id"),
                ("session_streams", "session_id"),
                ("turns", "session_id"),
            ] {
                let of = |name: &str| {
                    format!("SELECT COUNT(*) AS n FROM {table} WHERE {column} = '{name}'")
                };
                assert_eq!(count(&db, &of("a")).await, 0, "{table}");
                assert!(count(&db, &of("b")).await > 0, "{table}");
            }
            assert_eq!(events.load(&id("a"), 10).await.unwrap(), Default::default());
            // Created again, it is a new session with a new stream.
            let again = sessions.get_or_create(&id("a"), at(20)).await.unwrap();
            assert_eq!(
                (again.created_at, again.message_count, again.last_seq),
                (stored(at(20)), 0, 0)
            );
        }
    }

    #[tokio::test]
    async fn sessions_list_oldest_first_then_by_id_with_their_last_seq() {
        for backend in backends().await {
            let db = backend.connect().await;
            let sessions = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            let events = SeaOrmEventStore::new(db, &backend.url);
            sessions.get_or_create(&id("b"), at(1)).await.unwrap();
            sessions.get_or_create(&id("a"), at(1)).await.unwrap();
            sessions.get_or_create(&id("c"), t0()).await.unwrap();
            events
                .write(EventBatch {
                    events: (1..=3).map(|seq| (id("a"), event(seq))).collect(),
                    // A reservation is no event: b's last_seq stays 0.
                    reserve: vec![(id("b"), 40)],
                    trim: vec![],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            let listed: Vec<_> = sessions
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|info| (info.id.to_string(), info.created_at, info.last_seq))
                .collect();
            assert_eq!(
                listed,
                vec![
                    ("c".to_owned(), stored(t0()), 0),
                    ("a".to_owned(), stored(at(1)), 3),
                    ("b".to_owned(), stored(at(1)), 0),
                ]
            );
            assert_eq!(
                sessions
                    .get_or_create(&id("a"), at(2))
                    .await
                    .unwrap()
                    .last_seq,
                3
            );
        }
    }

    #[tokio::test]
    async fn sessions_past_the_cap_are_refused_but_existing_ones_still_open() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmSessionStore::new(db.clone(), &backend.url, 2);
            store.get_or_create(&id("a"), t0()).await.unwrap();
            store.get_or_create(&id("b"), t0()).await.unwrap();
            assert_eq!(
                store.get_or_create(&id("c"), t0()).await,
                Err(SessionStoreError::TooManySessions(2))
            );
            assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM sessions").await, 2);
            assert!(store.get_or_create(&id("a"), at(1)).await.is_ok());
            store.delete(&id("b")).await.unwrap();
            assert!(store.get_or_create(&id("c"), at(2)).await.is_ok());
        }
    }

    #[tokio::test]
    async fn racing_creates_of_one_id_all_succeed_with_one_created_at() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = Arc::new(SeaOrmSessionStore::new(db.clone(), &backend.url, 100));
            let racers: Vec<_> = (0..8)
                .map(|i| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move { store.get_or_create(&id("a"), at(i)).await })
                })
                .collect();
            let mut created = Vec::new();
            for racer in racers {
                created.push(racer.await.unwrap().unwrap().created_at);
            }
            created.dedup();
            assert_eq!(created.len(), 1, "{}: {created:?}", backend.name);
            assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM sessions").await, 1);
        }
    }

    #[tokio::test]
    async fn concurrent_appends_number_every_message_once() {
        for backend in backends().await {
            let store = Arc::new(SeaOrmSessionStore::new(
                backend.connect().await,
                &backend.url,
                100,
            ));
            store.get_or_create(&id("a"), t0()).await.unwrap();
            let appends: Vec<_> = (0..10)
                .map(|i| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        let message = ModelMessage::user_prompt(format!("m{i}"), t0());
                        store.append(&id("a"), vec![message], at(i)).await
                    })
                })
                .collect();
            for append in appends {
                append.await.unwrap().unwrap();
            }
            let history = store.history(&id("a")).await.unwrap();
            let mut prompts: Vec<_> = history
                .iter()
                .map(|m| match m {
                    ModelMessage::Request { parts } => match &parts[0] {
                        RequestPart::UserPrompt { content, .. } => content.clone(),
                        RequestPart::ToolReturn { .. } => unreachable!(),
                    },
                    ModelMessage::Response { .. } => unreachable!(),
                })
                .collect();
            prompts.sort();
            let mut expected: Vec<_> = (0..10).map(|i| format!("m{i}")).collect();
            expected.sort();
            assert_eq!(prompts, expected);
            let info = store.get_or_create(&id("a"), at(20)).await.unwrap();
            assert_eq!(info.message_count, 10);
            assert_eq!(info.history_bytes, 20);
        }
    }

    #[tokio::test]
    async fn a_malformed_message_makes_only_its_session_unavailable() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            for name in ["a", "b"] {
                store.get_or_create(&id(name), t0()).await.unwrap();
                store
                    .append(&id(name), conversation(), at(1))
                    .await
                    .unwrap();
            }
            exec(
                &db,
                r#"UPDATE session_messages SET message_json = '{"kind":"nope"'
                   WHERE session_id = 'a' AND idx = 2"#,
            )
            .await;
            match store.history(&id("a")).await {
                Err(SessionStoreError::Unavailable(why)) => {
                    assert!(why.contains("message 2 of session a"), "{why}");
                }
                other => panic!("{}: {other:?}", backend.name),
            }
            assert_eq!(*store.history(&id("b")).await.unwrap(), conversation());
            assert_eq!(store.list().await.unwrap().len(), 2);
        }
    }

    #[tokio::test]
    async fn migrations_adopt_a_database_holding_only_the_originals_approval_table() {
        for backend in backends().await {
            // The original's table and a row, with no migration bookkeeping.
            let original = sea_orm::Database::connect(backend.url.as_str())
                .await
                .unwrap();
            exec(
                &original,
                "CREATE TABLE approval_envelopes (
                    envelope_id TEXT PRIMARY KEY,
                    nonce TEXT UNIQUE NOT NULL,
                    scope_json TEXT NOT NULL,
                    tool_calls_json TEXT NOT NULL,
                    plan_hash TEXT NOT NULL,
                    key_id TEXT NOT NULL,
                    signed_object_json TEXT,
                    signature_hex TEXT,
                    state TEXT NOT NULL,
                    issued_at INTEGER NOT NULL,
                    expires_at INTEGER NOT NULL,
                    consumed_at INTEGER
                );
                INSERT INTO approval_envelopes VALUES (
                    'e1', 'n1', '{}', '[]', 'h', 'k', NULL, NULL, 'pending',
                    1700000000, 1700003600, NULL
                );",
            )
            .await;
            original.close().await.unwrap();

            let db = backend.connect().await;
            assert_eq!(
                count(&db, "SELECT COUNT(*) AS n FROM approval_envelopes").await,
                1
            );
            assert_eq!(
                count(&db, "SELECT COUNT(*) AS n FROM seaql_migrations").await,
                5
            );
            let store = SeaOrmSessionStore::new(db.clone(), &backend.url, 100);
            store.get_or_create(&id("a"), t0()).await.unwrap();
            store.append(&id("a"), conversation(), at(1)).await.unwrap();
            assert_eq!(*store.history(&id("a")).await.unwrap(), conversation());
            // Running them again (the next start) changes nothing.
            drop(backend.connect().await);
            assert_eq!(store.list().await.unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn ten_thousand_sessions_list_in_one_quick_query() {
        for backend in backends().await {
            let db = backend.connect().await;
            // Written directly: ten thousand creates would test the creates.
            let micros = to_micros(t0());
            for chunk in (0..10_000).collect::<Vec<i64>>().chunks(500) {
                let sessions: Vec<_> = chunk
                    .iter()
                    .map(|i| format!("('s{i:05}', {}, {}, 0, 0)", micros + i, micros + i))
                    .collect();
                exec(
                    &db,
                    &format!(
                        "INSERT INTO sessions (id, created_at, last_active, message_count, \
                         history_bytes) VALUES {}",
                        sessions.join(",")
                    ),
                )
                .await;
                let streams: Vec<_> = chunk
                    .iter()
                    .filter(|i| *i % 2 == 0)
                    .map(|i| format!("('s{i:05}', {i}, {i})"))
                    .collect();
                exec(
                    &db,
                    &format!(
                        "INSERT INTO session_streams (session_id, last_seq, reserved_seq) \
                         VALUES {}",
                        streams.join(",")
                    ),
                )
                .await;
            }
            let store = SeaOrmSessionStore::new(db, &backend.url, 20_000);
            // How fast it is, is the benchmark's to say (no timing here).
            let listed = store.list().await.unwrap();
            assert_eq!(listed.len(), 10_000);
            for (i, info) in (0_u64..).zip(&listed) {
                assert_eq!(info.id.as_str(), format!("s{i:05}"));
                assert_eq!(info.last_seq, if i % 2 == 0 { i } else { 0 });
            }
        }
    }

    #[tokio::test]
    async fn idle_sessions_are_answered_oldest_first_and_use_never_moves_back() {
        for backend in backends().await {
            let store = SeaOrmSessionStore::new(backend.connect().await, &backend.url, 100);
            store.get_or_create(&id("a"), t0()).await.unwrap();
            store.get_or_create(&id("b"), at(10)).await.unwrap();
            store.get_or_create(&id("c"), at(20)).await.unwrap();
            store.get_or_create(&id("a"), at(30)).await.unwrap();
            // A slow request with an older clock reading.
            store.get_or_create(&id("c"), t0()).await.unwrap();
            store.append(&id("b"), conversation(), at(5)).await.unwrap();
            assert_eq!(
                store.idle_since(at(25)).await.unwrap(),
                vec![id("b"), id("c")]
            );
            assert_eq!(store.idle_since(at(15)).await.unwrap(), vec![id("b")]);
            assert_eq!(
                store.idle_since(at(10)).await.unwrap(),
                Vec::<SessionId>::new()
            );
            assert!(store.is_durable());
        }
    }

    #[tokio::test]
    async fn a_deleted_sqlite_file_makes_the_store_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("autopoiesis.sqlite");
        let url = crate::adapters::persistence::sqlite_url(&path);
        let db = crate::adapters::persistence::connect(&url, &Default::default())
            .await
            .unwrap();
        let store = SeaOrmSessionStore::new(db, &url, 100);
        store.get_or_create(&id("a"), t0()).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            store.get_or_create(&id("a"), at(1)).await,
            Err(SessionStoreError::Unavailable(why)) if why.contains("deleted or replaced")
        ));
    }
}

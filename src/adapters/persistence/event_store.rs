//! [`EventStore`] over sea-orm: tables `session_events` (the retained
//! window of each stream) and `session_streams` (its high-water marks).

use std::collections::BTreeMap;

use async_trait::async_trait;
use sea_orm::sea_query::{
    Alias, CaseStatement, Condition, Expr, ExprTrait, Func, OnConflict, Order, Query,
    SelectStatement,
};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement, TransactionTrait,
};

use super::file::{self, DatabaseFile};
use super::schema::{MAX_BIND_PARAMETERS, SessionEvents, SessionStreams, Turns, to_micros};
use crate::domain::session::SessionId;
use crate::ports::{EventBatch, EventStore, EventStoreError, StoredEvent, StreamState};

/// Session streams in a SQLite or PostgreSQL database.
#[derive(Clone)]
pub struct SeaOrmEventStore {
    db: DatabaseConnection,
    /// The SQLite file, as it was when the store opened: each operation
    /// first checks that it is still there (see [`super::file`]).
    file: Option<DatabaseFile>,
}

impl SeaOrmEventStore {
    /// A store over an open, migrated connection to `url` (see
    /// [`super::connect`]).
    #[must_use]
    pub fn new(db: DatabaseConnection, url: &str) -> Self {
        Self {
            db,
            file: DatabaseFile::of(url),
        }
    }

    fn check_file(&self) -> Result<(), EventStoreError> {
        file::check(self.file.as_ref()).map_err(EventStoreError)
    }

    /// The events `select` ([`events_of`]) finds, in its order; a row that
    /// cannot be read is left out and logged.
    async fn read_events(
        &self,
        session: &SessionId,
        select: &SelectStatement,
    ) -> Result<Vec<StoredEvent>, EventStoreError> {
        let rows = self.db.query_all(select).await.map_err(unavailable)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                to_event(row)
                    .inspect_err(|why| {
                        tracing::error!(session.id = %session, error = %why, "stored event unreadable; left out");
                    })
                    .ok()
            })
            .collect())
    }
}

/// At most `limit` of the session's events, as rows of `seq, turn_id, op,
/// frame, prelude` ([`to_event`]); the caller orders and narrows it.
fn events_of(session: &SessionId, limit: usize) -> SelectStatement {
    Query::select()
        .columns([
            SessionEvents::Seq,
            SessionEvents::TurnId,
            SessionEvents::Op,
            SessionEvents::Frame,
            SessionEvents::Prelude,
        ])
        .from(SessionEvents::Table)
        .and_where(Expr::col(SessionEvents::SessionId).eq(session.as_str()))
        .limit(u64::try_from(limit).unwrap_or(u64::MAX))
        .to_owned()
}

fn unavailable(error: DbErr) -> EventStoreError {
    EventStoreError(error.to_string())
}

/// A seq as stored: `bigint` holds every seq a stream reaches in practice;
/// one past `i64::MAX` is refused rather than wrapped.
fn stored_seq(seq: u64) -> Result<i64, EventStoreError> {
    i64::try_from(seq).map_err(|_| EventStoreError(format!("seq {seq} is out of range")))
}

/// A row of `seq, turn_id, op, frame, prelude`.
fn to_event(row: &QueryResult) -> Result<StoredEvent, String> {
    let seq: i64 = row.try_get_by_index(0).map_err(|e| e.to_string())?;
    Ok(StoredEvent {
        seq: u64::try_from(seq).map_err(|_| format!("seq {seq} is negative"))?,
        turn_id: row.try_get_by_index(1).map_err(|e| e.to_string())?,
        op: row.try_get_by_index(2).map_err(|e| e.to_string())?,
        frame: row.try_get_by_index(3).map_err(|e| e.to_string())?,
        prelude: row.try_get_by_index(4).map_err(|e| e.to_string())?,
    })
}

/// `session_streams.column` raised to the value the upsert offers, never
/// lowered: `CASE WHEN old < excluded THEN excluded ELSE old END`, which
/// both backends run (SQLite spells `GREATEST` as a two-argument `MAX`).
/// The reserved mark a batch sets: the offered value where the batch
/// reserves (`-1` offered: it does not, the old mark stays). Set, not
/// raised: a stream that stops gracefully gives back the unused part of its
/// block, so the next life numbers right above what was handed out.
fn reserved_set() -> CaseStatement {
    let old = Expr::col((SessionStreams::Table, SessionStreams::ReservedSeq));
    let offered = Expr::col((Alias::new("excluded"), SessionStreams::ReservedSeq));
    Expr::case(offered.clone().gte(0), offered).finally(old)
}

fn raised(column: SessionStreams) -> CaseStatement {
    let old = Expr::col((SessionStreams::Table, column));
    let offered = Expr::col((Alias::new("excluded"), column));
    Expr::case(old.clone().lt(offered.clone()), offered).finally(old)
}

/// The PostgreSQL channel that carries pointers to new events: lines of
/// `session seq`, coalesced per group commit (SPEC B12). The channel's name
/// is this followed by the schema (see [`super::channel_sql`]).
pub const EVENTS_CHANNEL: &str = "autopoiesis_events:";

/// NOTIFY payloads must stay under 8000 bytes.
const PAYLOAD_BYTES: usize = 7900;

/// The pointers of a batch's marks, cut into payloads.
fn pointer_payloads(marks: &BTreeMap<&str, (i64, i64)>) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::new();
    for (session, (last, _)) in marks {
        let line = format!("{session} {last}");
        if !payload.is_empty() && payload.len() + line.len() + 1 > PAYLOAD_BYTES {
            payloads.push(std::mem::take(&mut payload));
        }
        if !payload.is_empty() {
            payload.push('\n');
        }
        payload.push_str(&line);
    }
    if !payload.is_empty() {
        payloads.push(payload);
    }
    payloads
}

/// The text of a stored `token` frame: its `data.content`.
fn token_text(frame: &str) -> Option<String> {
    let frame: serde_json::Value = serde_json::from_str(frame).ok()?;
    Some(frame.get("data")?.get("content")?.as_str()?.to_owned())
}

#[async_trait]
impl EventStore for SeaOrmEventStore {
    async fn load(
        &self,
        session: &SessionId,
        limit: usize,
    ) -> Result<StreamState, EventStoreError> {
        self.check_file()?;
        let newest = events_of(session, limit)
            .order_by(SessionEvents::Seq, Order::Desc)
            .to_owned();
        let mut events = self.read_events(session, &newest).await?;
        events.reverse();

        // Every mark the stream has, in one row that exists even for a
        // stream never written: its own two and the newest stored event's
        // seq (written with them, but counted in case a row outlived them).
        let mark = |column| {
            Expr::from(
                Query::select()
                    .column(column)
                    .from(SessionStreams::Table)
                    .and_where(Expr::col(SessionStreams::SessionId).eq(session.as_str()))
                    .to_owned(),
            )
        };
        let marks = Query::select()
            .expr(Expr::from(
                Query::select()
                    .expr(Func::max(Expr::col(SessionEvents::Seq)))
                    .from(SessionEvents::Table)
                    .and_where(Expr::col(SessionEvents::SessionId).eq(session.as_str()))
                    .to_owned(),
            ))
            .expr(mark(SessionStreams::LastSeq))
            .expr(mark(SessionStreams::ReservedSeq))
            .to_owned();
        let reserved = match self.db.query_one(&marks).await.map_err(unavailable)? {
            Some(row) => (0..3)
                .filter_map(|index| row.try_get_by_index::<Option<i64>>(index).ok().flatten())
                .max()
                .unwrap_or(0),
            None => 0,
        };
        Ok(StreamState {
            events,
            reserved: u64::try_from(reserved).unwrap_or(0),
        })
    }

    async fn write(&self, batch: EventBatch) -> Result<(), EventStoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.check_file()?;
        // Each session's new marks: (last_seq, reserved_seq); last_seq 0 and
        // reserved_seq -1 mean "no change" (last_seq only rises; the
        // reservation is set by the batch's last one). One row per session,
        // as PostgreSQL refuses an upsert that touches a row twice.
        let mut marks: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        let mut rows = Vec::with_capacity(batch.events.len());
        for (session, event) in &batch.events {
            let seq = stored_seq(event.seq)?;
            let mark = marks.entry(session.as_str()).or_insert((0, -1));
            mark.0 = Ord::max(mark.0, seq);
            rows.push([
                Expr::val(session.as_str()),
                Expr::val(seq),
                Expr::val(event.turn_id.as_deref()),
                Expr::val(event.op.as_str()),
                Expr::val(event.frame.as_str()),
                Expr::val(event.prelude.as_deref()),
            ]);
        }
        // A turn's ending stored is its record gone, in one transaction:
        // neither a crash nor a failed delete can leave a finished turn to
        // be ended again as interrupted.
        let ended: Vec<&str> = batch
            .events
            .iter()
            .filter(|(_, event)| matches!(event.op.as_str(), "done" | "error" | "cancelled"))
            .filter_map(|(_, event)| event.turn_id.as_deref())
            .collect();
        for (session, reserve) in batch.reserve.iter().chain(&batch.release) {
            let reserve = stored_seq(*reserve)?;
            let mark = marks.entry(session.as_str()).or_insert((0, -1));
            mark.1 = reserve;
        }
        // Other instances hear which streams moved (a pointer each: the
        // session and its newest seq), once per batch: the group commit is
        // the coalescing. PostgreSQL sends them when the batch commits.
        let pointers = (self.db.get_database_backend() == DbBackend::Postgres)
            .then(|| pointer_payloads(&marks));

        let _gate = file::write_gate(self.file.as_ref()).await;
        let txn = self.db.begin().await.map_err(unavailable)?;
        // Multi-row inserts: a batch of a hundred tokens is one statement.
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut insert = Query::insert()
                .into_table(SessionEvents::Table)
                .columns([
                    SessionEvents::SessionId,
                    SessionEvents::Seq,
                    SessionEvents::TurnId,
                    SessionEvents::Op,
                    SessionEvents::Frame,
                    SessionEvents::Prelude,
                ])
                .to_owned();
            for row in rows.by_ref().take(MAX_BIND_PARAMETERS / 5) {
                insert.values_panic(row);
            }
            txn.execute(&insert).await.map_err(unavailable)?;
        }
        let released: Vec<&str> = batch.release.iter().map(|(s, _)| s.as_str()).collect();
        let marks: Vec<_> = marks.into_iter().collect();
        for chunk in marks.chunks(MAX_BIND_PARAMETERS / 3) {
            let mut upsert = Query::insert()
                .into_table(SessionStreams::Table)
                .columns([
                    SessionStreams::SessionId,
                    SessionStreams::LastSeq,
                    SessionStreams::ReservedSeq,
                ])
                .on_conflict(
                    OnConflict::column(SessionStreams::SessionId)
                        .value(SessionStreams::LastSeq, raised(SessionStreams::LastSeq))
                        .value(SessionStreams::ReservedSeq, reserved_set())
                        .to_owned(),
                )
                .to_owned();
            for (session, (last, reserved)) in chunk {
                upsert.values_panic([Expr::val(*session), Expr::val(*last), Expr::val(*reserved)]);
            }
            txn.execute(&upsert).await.map_err(unavailable)?;
        }
        for chunk in ended.chunks(MAX_BIND_PARAMETERS) {
            let delete = Query::delete()
                .from_table(Turns::Table)
                .and_where(Expr::col(Turns::TurnId).is_in(chunk.iter().copied()))
                .to_owned();
            txn.execute(&delete).await.map_err(unavailable)?;
        }
        if let Some(owner) = &batch.owner {
            for chunk in released.chunks(MAX_BIND_PARAMETERS - 1) {
                let update = Query::update()
                    .table(SessionStreams::Table)
                    .value(SessionStreams::Writer, Option::<String>::None)
                    .value(SessionStreams::WriterUntil, Option::<i64>::None)
                    .and_where(Expr::col(SessionStreams::SessionId).is_in(chunk.iter().copied()))
                    .and_where(Expr::col(SessionStreams::Writer).eq(owner.as_str()))
                    .to_owned();
                txn.execute(&update).await.map_err(unavailable)?;
            }
        }
        for payload in pointers.into_iter().flatten() {
            let notify = Statement::from_sql_and_values(
                DbBackend::Postgres,
                super::notify_sql(),
                [EVENTS_CHANNEL.into(), payload.into()],
            );
            txn.execute_raw(notify).await.map_err(unavailable)?;
            metrics::counter!("autopoiesis_cluster_notifications_sent_total", "channel" => "events")
                .increment(1);
        }
        // Trims after the inserts: a batch may add events and already push
        // some of them out of the window.
        for chunk in batch.trim.chunks(MAX_BIND_PARAMETERS / 2) {
            let mut which = Condition::any();
            for (session, up_to) in chunk {
                which = which.add(
                    Expr::col(SessionEvents::SessionId)
                        .eq(session.as_str())
                        .and(Expr::col(SessionEvents::Seq).lte(stored_seq(*up_to)?)),
                );
            }
            let delete = Query::delete()
                .from_table(SessionEvents::Table)
                .cond_where(which)
                .to_owned();
            txn.execute(&delete).await.map_err(unavailable)?;
        }
        txn.commit().await.map_err(unavailable)
    }

    async fn turn_text(
        &self,
        session: &SessionId,
        turn_id: &str,
    ) -> Result<String, EventStoreError> {
        self.check_file()?;
        let select = Query::select()
            .column(SessionEvents::Frame)
            .from(SessionEvents::Table)
            .and_where(Expr::col(SessionEvents::SessionId).eq(session.as_str()))
            .and_where(Expr::col(SessionEvents::TurnId).eq(turn_id))
            .and_where(Expr::col(SessionEvents::Op).eq("token"))
            .order_by(SessionEvents::Seq, Order::Asc)
            .to_owned();
        let rows = self.db.query_all(&select).await.map_err(unavailable)?;
        let mut text = String::new();
        for row in rows {
            match row
                .try_get_by_index::<String>(0)
                .ok()
                .as_deref()
                .and_then(token_text)
            {
                Some(token) => text.push_str(&token),
                None => tracing::error!(
                    session.id = %session,
                    turn.id = %turn_id,
                    "stored token frame unreadable; its text is left out"
                ),
            }
        }
        Ok(text)
    }

    async fn acquire(
        &self,
        session: &SessionId,
        owner: &str,
        lease_until: chrono::DateTime<chrono::Utc>,
        block: u64,
    ) -> Result<Option<u64>, EventStoreError> {
        self.check_file()?;
        let block = stored_seq(block)?;
        let now = to_micros(chrono::Utc::now());
        let table = |column| Expr::col((SessionStreams::Table, column));
        // Taken only from nobody, from itself, or from a holder whose lease
        // ran out; the reservation rises above every seq handed out or
        // stored, in the same statement, so two instances never number
        // alike.
        let takeover = Condition::any()
            .add(table(SessionStreams::Writer).is_null())
            .add(table(SessionStreams::Writer).eq(owner))
            .add(table(SessionStreams::WriterUntil).lt(now));
        let above = Expr::case(
            table(SessionStreams::ReservedSeq).lt(table(SessionStreams::LastSeq)),
            table(SessionStreams::LastSeq),
        )
        .finally(table(SessionStreams::ReservedSeq));
        let upsert = Query::insert()
            .into_table(SessionStreams::Table)
            .columns([
                SessionStreams::SessionId,
                SessionStreams::LastSeq,
                SessionStreams::ReservedSeq,
                SessionStreams::Writer,
                SessionStreams::WriterUntil,
            ])
            .values_panic([
                Expr::val(session.as_str()),
                Expr::val(0_i64),
                Expr::val(block),
                Expr::val(owner),
                Expr::val(to_micros(lease_until)),
            ])
            .on_conflict(
                OnConflict::column(SessionStreams::SessionId)
                    .value(SessionStreams::ReservedSeq, above.add(block))
                    .value(SessionStreams::Writer, owner)
                    .value(SessionStreams::WriterUntil, to_micros(lease_until))
                    .action_cond_where(takeover)
                    .to_owned(),
            )
            .returning_col(SessionStreams::ReservedSeq)
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        let row = self.db.query_one(&upsert).await.map_err(unavailable)?;
        match row {
            Some(row) => {
                let mark: i64 = row.try_get_by_index(0).map_err(unavailable)?;
                Ok(Some(u64::try_from(mark).unwrap_or(0)))
            }
            None => Ok(None),
        }
    }

    async fn renew(
        &self,
        owner: &str,
        sessions: &[SessionId],
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), EventStoreError> {
        self.check_file()?;
        for chunk in sessions.chunks(MAX_BIND_PARAMETERS - 2) {
            let update = Query::update()
                .table(SessionStreams::Table)
                .value(SessionStreams::WriterUntil, to_micros(lease_until))
                .and_where(Expr::col(SessionStreams::Writer).eq(owner))
                .and_where(
                    Expr::col(SessionStreams::SessionId).is_in(chunk.iter().map(SessionId::as_str)),
                )
                .to_owned();
            let _gate = file::write_gate(self.file.as_ref()).await;
            self.db.execute(&update).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn events_after(
        &self,
        session: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, EventStoreError> {
        self.check_file()?;
        let after = events_of(session, limit)
            .and_where(Expr::col(SessionEvents::Seq).gt(stored_seq(after)?))
            .order_by(SessionEvents::Seq, Order::Asc)
            .to_owned();
        self.read_events(session, &after).await
    }

    async fn heads(
        &self,
        sessions: &[SessionId],
    ) -> Result<Vec<(SessionId, u64)>, EventStoreError> {
        self.check_file()?;
        let mut heads = Vec::new();
        for chunk in sessions.chunks(MAX_BIND_PARAMETERS) {
            let select = Query::select()
                .columns([SessionStreams::SessionId, SessionStreams::LastSeq])
                .from(SessionStreams::Table)
                .and_where(
                    Expr::col(SessionStreams::SessionId).is_in(chunk.iter().map(SessionId::as_str)),
                )
                .to_owned();
            for row in self.db.query_all(&select).await.map_err(unavailable)? {
                let (Ok(id), Ok(last)) = (
                    row.try_get_by_index::<String>(0),
                    row.try_get_by_index::<i64>(1),
                ) else {
                    continue;
                };
                if let (Ok(id), Ok(last)) = (SessionId::parse(&id), u64::try_from(last)) {
                    heads.push((id, last));
                }
            }
        }
        Ok(heads)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::adapters::persistence::test_support::{backends, count, exec};

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    fn token(seq: u64, turn: &str, content: &str) -> StoredEvent {
        let frame = serde_json::json!({
            "op": "token", "data": {"content": content}, "seq": seq, "turn_id": turn,
        });
        StoredEvent {
            seq,
            turn_id: Some(turn.into()),
            op: "token".into(),
            frame: frame.to_string(),
            prelude: None,
        }
    }

    fn events(session: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<(SessionId, StoredEvent)> {
        seqs.into_iter()
            .map(|seq| (id(session), token(seq, "t1", &seq.to_string())))
            .collect()
    }

    fn seqs(state: &StreamState) -> Vec<u64> {
        state.events.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn load_answers_the_newest_events_oldest_first_and_the_reserved_mark() {
        for backend in backends().await {
            let store = SeaOrmEventStore::new(backend.connect().await, &backend.url);
            store
                .write(EventBatch {
                    events: [events("a", 1..=10), events("b", 1..=3)].concat(),
                    reserve: vec![(id("a"), 15)],
                    trim: vec![],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            let a = store.load(&id("a"), 4).await.unwrap();
            assert_eq!(seqs(&a), vec![7, 8, 9, 10]);
            assert_eq!(a.events[0], token(7, "t1", "7"));
            assert_eq!(a.reserved, 15);
            assert_eq!(
                seqs(&store.load(&id("a"), 100).await.unwrap()),
                (1..=10).collect::<Vec<_>>()
            );
            // Nothing reserved for b: its newest event is the mark.
            assert_eq!(
                store.load(&id("b"), 0).await.unwrap(),
                StreamState {
                    events: vec![],
                    reserved: 3
                }
            );
            assert_eq!(
                store.load(&id("c"), 10).await.unwrap(),
                StreamState::default()
            );

            // A reservation is set (a graceful stop gives back what it did
            // not use), never below what was stored; events above it count.
            store
                .write(EventBatch {
                    reserve: vec![(id("a"), 12)],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(store.load(&id("a"), 1).await.unwrap().reserved, 12);
            store
                .write(EventBatch {
                    reserve: vec![(id("a"), 3)],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(store.load(&id("a"), 1).await.unwrap().reserved, 10);
            store
                .write(EventBatch {
                    reserve: vec![(id("a"), 15)],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(store.load(&id("a"), 1).await.unwrap().reserved, 15);
            store
                .write(EventBatch {
                    events: events("a", [20]),
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(store.load(&id("a"), 1).await.unwrap().reserved, 20);
        }
    }

    #[tokio::test]
    async fn a_batch_that_fails_keeps_nothing_of_itself() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmEventStore::new(db.clone(), &backend.url);
            store
                .write(EventBatch {
                    events: events("a", [1]),
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            // Seq 1 of a is stored already: the batch fails at its last event.
            let failed = store
                .write(EventBatch {
                    events: [events("b", [1]), events("a", [2, 3]), events("a", [1])].concat(),
                    reserve: vec![(id("a"), 50), (id("c"), 9)],
                    trim: vec![(id("a"), 1)],
                    ..EventBatch::default()
                })
                .await;
            assert!(failed.is_err(), "{}: {failed:?}", backend.name);
            assert_eq!(
                store.load(&id("a"), 10).await.unwrap(),
                StreamState {
                    events: vec![token(1, "t1", "1")],
                    reserved: 1
                }
            );
            assert_eq!(
                store.load(&id("b"), 10).await.unwrap(),
                StreamState::default()
            );
            assert_eq!(
                count(&db, "SELECT COUNT(*) AS n FROM session_streams").await,
                1
            );
        }
    }

    #[tokio::test]
    async fn trims_drop_the_events_at_or_below_the_mark_of_their_session_only() {
        for backend in backends().await {
            let store = SeaOrmEventStore::new(backend.connect().await, &backend.url);
            store
                .write(EventBatch {
                    events: [events("a", 1..=10), events("b", 1..=10)].concat(),
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            // New events and the trim they cause, in one batch.
            store
                .write(EventBatch {
                    events: events("a", [11, 12]),
                    reserve: vec![],
                    trim: vec![(id("a"), 6)],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            let a = store.load(&id("a"), 100).await.unwrap();
            assert_eq!(seqs(&a), (7..=12).collect::<Vec<_>>());
            assert_eq!(a.reserved, 12);
            assert_eq!(
                seqs(&store.load(&id("b"), 100).await.unwrap()),
                (1..=10).collect::<Vec<_>>()
            );
            // Trimming everything keeps the mark: seqs are never reused.
            store
                .write(EventBatch {
                    trim: vec![(id("a"), 12), (id("b"), 3)],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(
                store.load(&id("a"), 100).await.unwrap(),
                StreamState {
                    events: vec![],
                    reserved: 12
                }
            );
            assert_eq!(
                seqs(&store.load(&id("b"), 100).await.unwrap()),
                (4..=10).collect::<Vec<_>>()
            );
        }
    }

    #[tokio::test]
    async fn a_batch_larger_than_one_statement_is_stored_whole() {
        for backend in backends().await {
            let store = SeaOrmEventStore::new(backend.connect().await, &backend.url);
            // Past the rows one insert holds, and past the sessions one
            // upsert holds.
            let many_sessions: Vec<_> = (0..400)
                .map(|i| (id(&format!("s{i}")), token(1, "t1", "x")))
                .collect();
            store
                .write(EventBatch {
                    events: [events("a", 1..=1000), many_sessions].concat(),
                    reserve: (0..400).map(|i| (id(&format!("s{i}")), 5)).collect(),
                    trim: (0..400).map(|i| (id(&format!("s{i}")), 0)).collect(),
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            let a = store.load(&id("a"), 2000).await.unwrap();
            assert_eq!(seqs(&a), (1..=1000).collect::<Vec<_>>());
            let s399 = store.load(&id("s399"), 10).await.unwrap();
            assert_eq!((seqs(&s399), s399.reserved), (vec![1], 5));
        }
    }

    #[tokio::test]
    async fn turn_text_joins_the_tokens_of_one_turn_in_seq_order() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmEventStore::new(db.clone(), &backend.url);
            let tool = StoredEvent {
                seq: 3,
                turn_id: Some("t1".into()),
                op: "tool_call".into(),
                frame: r#"{"op":"tool_call","data":{"content":"not a token"},"seq":3}"#.into(),
                prelude: None,
            };
            let unreadable = StoredEvent {
                seq: 5,
                turn_id: Some("t1".into()),
                op: "token".into(),
                frame: "{".into(),
                prelude: None,
            };
            store
                .write(EventBatch {
                    events: vec![
                        (id("a"), token(1, "t1", "Hel")),
                        (id("a"), token(2, "t2", "other turn")),
                        (id("a"), tool),
                        (id("a"), token(4, "t1", "lo")),
                        (id("a"), unreadable),
                        (id("a"), token(6, "t1", " wörld")),
                        (id("b"), token(7, "t1", "other session")),
                    ],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            // Stored out of order, read in seq order.
            exec(
                &db,
                "UPDATE session_events SET seq = 10 WHERE session_id = 'a' AND seq = 1",
            )
            .await;
            assert_eq!(
                store.turn_text(&id("a"), "t1").await.unwrap(),
                "lo wörldHel"
            );
            assert_eq!(store.turn_text(&id("a"), "t2").await.unwrap(), "other turn");
            assert_eq!(store.turn_text(&id("a"), "t3").await.unwrap(), "");
        }
    }

    #[tokio::test]
    async fn an_unreadable_event_row_is_left_out_of_the_load() {
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmEventStore::new(db.clone(), &backend.url);
            store
                .write(EventBatch {
                    events: events("a", 1..=3),
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            exec(
                &db,
                "UPDATE session_events SET seq = -2 WHERE session_id = 'a' AND seq = 2",
            )
            .await;
            let a = store.load(&id("a"), 10).await.unwrap();
            assert_eq!((seqs(&a), a.reserved), (vec![1, 3], 3));
        }
    }

    /// Group commit writes a batch per flush of streamed tokens: batches of
    /// a hundred, each reserving ahead and trimming the window, keep exactly
    /// the window (their cost is the benchmark's to measure).
    #[tokio::test]
    async fn batches_of_a_hundred_tokens_keep_the_window_trimmed() {
        for backend in backends().await {
            let store = SeaOrmEventStore::new(backend.connect().await, &backend.url);
            let rounds = 50_u64;
            for round in 0..rounds {
                let first = round * 100 + 1;
                store
                    .write(EventBatch {
                        events: events("a", first..first + 100),
                        reserve: vec![(id("a"), first + 199)],
                        trim: vec![(id("a"), (first + 99).saturating_sub(1024))],
                        ..EventBatch::default()
                    })
                    .await
                    .unwrap();
            }
            assert_eq!(store.load(&id("a"), 2000).await.unwrap().events.len(), 1024);
        }
    }

    #[tokio::test]
    async fn a_stored_ending_removes_its_turns_record_in_the_same_transaction() {
        use crate::adapters::persistence::SeaOrmTurnStore;
        use crate::domain::session::TurnId;
        use crate::ports::{TurnRecord, TurnStore};
        for backend in backends().await {
            let db = backend.connect().await;
            let store = SeaOrmEventStore::new(db.clone(), &backend.url);
            let turns = SeaOrmTurnStore::new(db.clone(), &backend.url);
            for turn in ["t1", "t2"] {
                turns
                    .begin(&TurnRecord {
                        running: true,
                        turn_id: TurnId::from(turn),
                        session_id: id("a"),
                        owner: "me".into(),
                        prompt: "p".into(),
                        started_at: chrono::Utc::now(),
                        lease_until: chrono::Utc::now(),
                    })
                    .await
                    .unwrap();
            }
            let records = || count(&db, "SELECT COUNT(*) AS n FROM turns");
            // Tokens end nothing.
            store
                .write(EventBatch {
                    events: events("a", 1..=3),
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(records().await, 2);
            let done = StoredEvent {
                op: "done".into(),
                ..token(4, "t1", "whole")
            };
            store
                .write(EventBatch {
                    events: vec![(id("a"), done)],
                    ..EventBatch::default()
                })
                .await
                .unwrap();
            assert_eq!(records().await, 1);
            // A batch that fails keeps the record: nothing of it is stored.
            let clash = StoredEvent {
                op: "cancelled".into(),
                ..token(4, "t2", "")
            };
            assert!(
                store
                    .write(EventBatch {
                        events: vec![(id("a"), clash)],
                        ..EventBatch::default()
                    })
                    .await
                    .is_err()
            );
            assert_eq!(records().await, 1);
        }
    }
}

//! [`TurnStore`] over sea-orm: table `turns`, one row per running turn.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Func;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement, TransactionTrait,
};

use super::file::{self, DatabaseFile};
use super::schema::{Turns, from_micros, stored, to_micros};
use crate::domain::session::{SessionId, TurnId};
use crate::ports::{Claim, Enqueued, TurnRecord, TurnStore, TurnStoreError};

/// Turn records in a SQLite or PostgreSQL database.
#[derive(Clone)]
pub struct SeaOrmTurnStore {
    db: DatabaseConnection,
    /// The SQLite file, as it was when the store opened: each operation
    /// first checks that it is still there (see [`super::file`]).
    file: Option<DatabaseFile>,
}

impl SeaOrmTurnStore {
    /// A store over an open, migrated connection to `url` (see
    /// [`super::connect`]).
    #[must_use]
    pub fn new(db: DatabaseConnection, url: &str) -> Self {
        Self {
            db,
            file: DatabaseFile::of(url),
        }
    }

    fn check_file(&self) -> Result<(), TurnStoreError> {
        file::check(self.file.as_ref()).map_err(TurnStoreError)
    }
}

fn unavailable(error: DbErr) -> TurnStoreError {
    TurnStoreError(error.to_string())
}

/// A row of `turn_id, session_id, owner, prompt, started_at, lease_until`,
/// with the lease as stored (to claim it only if it is still that).
fn to_record(row: &QueryResult) -> Result<(TurnRecord, i64), String> {
    let text = |index| {
        row.try_get_by_index::<String>(index)
            .map_err(|e| e.to_string())
    };
    let instant = |index| {
        let micros = row
            .try_get_by_index::<i64>(index)
            .map_err(|e| e.to_string())?;
        from_micros(micros)
            .map(|at| (at, micros))
            .ok_or_else(|| format!("instant {micros} out of range"))
    };
    let turn_id = text(0)?;
    let session_id = text(1)?;
    let (started_at, _) = instant(4)?;
    let (lease_until, lease) = instant(5)?;
    let running = row.try_get_by_index::<i16>(6).map_err(|e| e.to_string())?;
    Ok((
        TurnRecord {
            turn_id: TurnId::from(turn_id.as_str()),
            session_id: SessionId::parse(&session_id)
                .map_err(|e| format!("turn {turn_id}: {e}"))?,
            owner: text(2)?,
            prompt: text(3)?,
            started_at,
            lease_until,
            running: running != 0,
        },
        lease,
    ))
}

/// A record's columns, in the order rows are written and read.
const COLUMNS: [Turns; 7] = [
    Turns::TurnId,
    Turns::SessionId,
    Turns::Owner,
    Turns::Prompt,
    Turns::StartedAt,
    Turns::LeaseUntil,
    Turns::Running,
];

/// The columns a new record writes: the read ones, its place, its flag.
const INSERT_COLUMNS: [Turns; 9] = [
    Turns::TurnId,
    Turns::SessionId,
    Turns::Owner,
    Turns::Prompt,
    Turns::StartedAt,
    Turns::LeaseUntil,
    Turns::Running,
    Turns::Position,
    Turns::CancelRequested,
];

/// The PostgreSQL channel of messages between instances (SPEC B12):
/// `cancel TURN`, `deleted OWNER SESSION`, `approvals OWNER`. The channel's
/// name is this followed by the schema (see [`super::channel_sql`]).
pub const CONTROL_CHANNEL: &str = "autopoiesis_control:";

/// Tells every instance listening on PostgreSQL `message`; nothing on
/// SQLite, which one server uses alone.
///
/// # Errors
/// The database's, when the notice cannot be sent.
pub async fn notify_control(db: &impl ConnectionTrait, message: &str) -> Result<(), DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        super::notify_sql(),
        [CONTROL_CHANNEL.into(), message.into()],
    ))
    .await?;
    metrics::counter!("autopoiesis_cluster_notifications_sent_total", "channel" => "control")
        .increment(1);
    Ok(())
}

fn values(record: &TurnRecord, position: i64) -> [Expr; 9] {
    [
        Expr::val(record.turn_id.as_str()),
        Expr::val(record.session_id.as_str()),
        Expr::val(record.owner.as_str()),
        Expr::val(record.prompt.as_str()),
        Expr::val(to_micros(record.started_at)),
        Expr::val(to_micros(record.lease_until)),
        Expr::val(i16::from(record.running)),
        Expr::val(position),
        Expr::val(0_i16),
    ]
}

#[async_trait]
impl TurnStore for SeaOrmTurnStore {
    async fn begin(&self, record: &TurnRecord) -> Result<(), TurnStoreError> {
        self.check_file()?;
        let insert = Query::insert()
            .into_table(Turns::Table)
            .columns(INSERT_COLUMNS)
            .values_panic(values(record, 0))
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        self.db.execute(&insert).await.map_err(unavailable)?;
        Ok(())
    }

    async fn end(&self, turn_id: &TurnId) -> Result<(), TurnStoreError> {
        self.check_file()?;
        let delete = Query::delete()
            .from_table(Turns::Table)
            .and_where(Expr::col(Turns::TurnId).eq(turn_id.as_str()))
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        self.db.execute(&delete).await.map_err(unavailable)?;
        Ok(())
    }

    async fn renew(&self, owner: &str, until: DateTime<Utc>) -> Result<(), TurnStoreError> {
        self.check_file()?;
        let update = Query::update()
            .table(Turns::Table)
            .value(Turns::LeaseUntil, to_micros(until))
            .and_where(Expr::col(Turns::Owner).eq(owner))
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        self.db.execute(&update).await.map_err(unavailable)?;
        Ok(())
    }

    async fn claim_orphans(
        &self,
        owner: &str,
        now: Option<DateTime<Utc>>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<TurnRecord>, TurnStoreError> {
        self.check_file()?;
        let mut orphans = Query::select()
            .columns(COLUMNS)
            .from(Turns::Table)
            .and_where(Expr::col(Turns::Owner).ne(owner))
            .order_by(Turns::StartedAt, Order::Asc)
            .order_by(Turns::TurnId, Order::Asc)
            .to_owned();
        if let Some(now) = now {
            orphans.and_where(Expr::col(Turns::LeaseUntil).lt(to_micros(now)));
        }
        let rows = self.db.query_all(&orphans).await.map_err(unavailable)?;
        let mut claimed = Vec::new();
        for row in &rows {
            let (mut record, lease) = match to_record(row) {
                Ok(read) => read,
                Err(why) => {
                    // Left where it is: no instance can end a turn it
                    // cannot read, and the row stays for someone to repair.
                    tracing::error!(error = %why, "stored turn record unreadable; not claimed");
                    continue;
                }
            };
            // Claimed only if the record is still as read: a racing
            // claimer (or the owner renewing after all) changed owner or
            // lease, and this update then matches nothing. Each turn goes
            // to exactly one claimer, without a transaction or row lock.
            let update = Query::update()
                .table(Turns::Table)
                .value(Turns::Owner, owner)
                .value(Turns::LeaseUntil, to_micros(lease_until))
                .and_where(Expr::col(Turns::TurnId).eq(record.turn_id.as_str()))
                .and_where(Expr::col(Turns::Owner).eq(record.owner.as_str()))
                .and_where(Expr::col(Turns::LeaseUntil).eq(lease))
                .to_owned();
            let _gate = file::write_gate(self.file.as_ref()).await;
            let result = self.db.execute(&update).await.map_err(unavailable)?;
            if result.rows_affected() == 1 {
                owner.clone_into(&mut record.owner);
                record.lease_until = stored(lease_until);
                claimed.push(record);
            }
        }
        Ok(claimed)
    }

    async fn enqueue(
        &self,
        record: &TurnRecord,
        max_waiting: usize,
    ) -> Result<Enqueued, TurnStoreError> {
        self.check_file()?;
        let session = record.session_id.as_str();
        let _gate = file::write_gate(self.file.as_ref()).await;
        let txn = self.db.begin().await.map_err(unavailable)?;
        // One session's arrivals take their places one at a time, whichever
        // instance they reach: a place counted and taken under the lock is
        // never taken twice, and every place before it is committed. Other
        // sessions do not wait (the lock is per session, and a transaction
        // lock goes with the commit). SQLite needs no lock: one server
        // writes it, one write at a time.
        if txn.get_database_backend() == DbBackend::Postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                [session.into()],
            ))
            .await
            .map_err(unavailable)?;
        }
        let queue = Query::select()
            .expr(Func::count(Expr::col(Turns::TurnId)))
            .expr(Func::coalesce([
                Func::max(Expr::col(Turns::Position)).into(),
                Expr::val(0_i64),
            ]))
            .from(Turns::Table)
            .and_where(Expr::col(Turns::SessionId).eq(session))
            .to_owned();
        let row = txn.query_one(&queue).await.map_err(unavailable)?;
        let (count, last) = row.map_or((0, 0), |row| {
            (
                row.try_get_by_index::<i64>(0).unwrap_or(0),
                row.try_get_by_index::<i64>(1).unwrap_or(0),
            )
        });
        if usize::try_from(count).unwrap_or(usize::MAX) > max_waiting {
            txn.rollback().await.map_err(unavailable)?;
            return Ok(Enqueued::Full);
        }
        let first = count == 0;
        let record = TurnRecord {
            running: first,
            ..record.clone()
        };
        let insert = Query::insert()
            .into_table(Turns::Table)
            .columns(INSERT_COLUMNS)
            .values_panic(values(&record, last + 1))
            .to_owned();
        txn.execute(&insert).await.map_err(unavailable)?;
        txn.commit().await.map_err(unavailable)?;
        Ok(if first {
            Enqueued::First
        } else {
            Enqueued::Waiting
        })
    }

    async fn claim(&self, turn_id: &TurnId) -> Result<Claim, TurnStoreError> {
        self.check_file()?;
        // Any turn of the same session with an earlier place.
        let other = Alias::new("other");
        let before = Query::select()
            .expr(Expr::val(1))
            .from_as(Turns::Table, other.clone())
            .and_where(
                Expr::col((other.clone(), Turns::SessionId))
                    .equals((Turns::Table, Turns::SessionId)),
            )
            .and_where(
                Expr::col((other, Turns::Position)).lt(Expr::col((Turns::Table, Turns::Position))),
            )
            .to_owned();
        let update = Query::update()
            .table(Turns::Table)
            .value(Turns::Running, 1_i16)
            .and_where(Expr::col((Turns::Table, Turns::TurnId)).eq(turn_id.as_str()))
            .and_where(Expr::exists(before).not())
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        if self
            .db
            .execute(&update)
            .await
            .map_err(unavailable)?
            .rows_affected()
            == 1
        {
            return Ok(Claim::Running);
        }
        let exists = Query::select()
            .expr(Expr::val(1))
            .from(Turns::Table)
            .and_where(Expr::col(Turns::TurnId).eq(turn_id.as_str()))
            .to_owned();
        Ok(
            match self.db.query_one(&exists).await.map_err(unavailable)? {
                Some(_) => Claim::Waiting,
                None => Claim::Gone,
            },
        )
    }

    async fn request_cancel(&self, session: &SessionId) -> Result<Option<TurnId>, TurnStoreError> {
        self.check_file()?;
        let update = Query::update()
            .table(Turns::Table)
            .value(Turns::CancelRequested, 1_i16)
            .and_where(Expr::col(Turns::SessionId).eq(session.as_str()))
            .and_where(Expr::col(Turns::Running).eq(1_i16))
            .returning_col(Turns::TurnId)
            .to_owned();
        let _gate = file::write_gate(self.file.as_ref()).await;
        let Some(row) = self.db.query_one(&update).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let turn: String = row.try_get_by_index(0).map_err(unavailable)?;
        // The owner hears at once; if the notice is lost, its lease loop
        // finds the flag ([`TurnStore::cancel_requests`]).
        if let Err(error) = notify_control(&self.db, &format!("cancel {turn}")).await {
            tracing::warn!(%error, "cancel notice not sent; the owner finds it on its next lease renewal");
        }
        Ok(Some(TurnId::from(turn.as_str())))
    }

    async fn cancel_requests(&self, owner: &str) -> Result<Vec<TurnId>, TurnStoreError> {
        self.check_file()?;
        let select = Query::select()
            .column(Turns::TurnId)
            .from(Turns::Table)
            .and_where(Expr::col(Turns::Owner).eq(owner))
            .and_where(Expr::col(Turns::CancelRequested).eq(1_i16))
            .to_owned();
        let rows = self.db.query_all(&select).await.map_err(unavailable)?;
        Ok(rows
            .iter()
            .filter_map(|row| row.try_get_by_index::<String>(0).ok())
            .map(|turn| TurnId::from(turn.as_str()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::adapters::persistence::test_support::{at, backends, t0};

    fn record(owner: &str, lease_until: DateTime<Utc>) -> TurnRecord {
        TurnRecord {
            running: true,
            turn_id: TurnId::generate(),
            session_id: SessionId::parse("s1").unwrap(),
            owner: owner.into(),
            prompt: "what is ö?".into(),
            started_at: t0(),
            lease_until,
        }
    }

    #[tokio::test]
    async fn only_turns_whose_lease_ran_out_are_claimed_and_renewing_keeps_them() {
        for backend in backends().await {
            let store = SeaOrmTurnStore::new(backend.connect().await, &backend.url);
            let mine = record("alive", at(10));
            let theirs = record("dead", at(10));
            store.begin(&mine).await.unwrap();
            store.begin(&theirs).await.unwrap();

            // Leases still running: nothing to claim.
            assert_eq!(
                store
                    .claim_orphans("me", Some(at(5)), at(30))
                    .await
                    .unwrap(),
                vec![]
            );
            store.renew("alive", at(100)).await.unwrap();
            let claimed = store
                .claim_orphans("me", Some(at(20)), at(30))
                .await
                .unwrap();
            assert_eq!(
                claimed,
                vec![TurnRecord {
                    owner: "me".into(),
                    started_at: stored(t0()),
                    lease_until: stored(at(30)),
                    ..theirs.clone()
                }]
            );
            // Claimed, it is the claimer's: not claimed again by it, and
            // another instance waits for the new lease to run out.
            assert_eq!(
                store
                    .claim_orphans("me", Some(at(35)), at(40))
                    .await
                    .unwrap(),
                vec![]
            );
            assert_eq!(
                store
                    .claim_orphans("other", Some(at(25)), at(40))
                    .await
                    .unwrap(),
                vec![]
            );

            store.end(&theirs.turn_id).await.unwrap();
            // Without `now`, every turn of another owner, lease or not.
            let all = store
                .claim_orphans("restarted", None, at(50))
                .await
                .unwrap();
            assert_eq!(all.len(), 1);
            assert_eq!(all[0].turn_id, mine.turn_id);
            assert_eq!(all[0].prompt, mine.prompt);
            assert_eq!(all[0].owner, "restarted");
        }
    }

    #[tokio::test]
    async fn two_racing_claimers_get_each_orphan_exactly_once() {
        for backend in backends().await {
            let first = SeaOrmTurnStore::new(backend.connect().await, &backend.url);
            let second = SeaOrmTurnStore::new(backend.connect().await, &backend.url);
            let orphans: Vec<_> = (0..200).map(|_| record("dead", at(1))).collect();
            for orphan in &orphans {
                first.begin(orphan).await.unwrap();
            }
            let (a, b) = tokio::join!(
                tokio::spawn(async move { first.claim_orphans("a", Some(at(5)), at(60)).await }),
                tokio::spawn(async move { second.claim_orphans("b", Some(at(5)), at(60)).await }),
            );
            let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
            eprintln!("{}: claimed {} and {}", backend.name, a.len(), b.len());
            let a: HashSet<_> = a.iter().map(|r| r.turn_id.to_string()).collect();
            let b: HashSet<_> = b.iter().map(|r| r.turn_id.to_string()).collect();
            assert!(
                a.is_disjoint(&b),
                "{}: {:?}",
                backend.name,
                a.intersection(&b)
            );
            let all: HashSet<_> = orphans.iter().map(|r| r.turn_id.to_string()).collect();
            assert_eq!(&a | &b, all);

            // What is stored agrees with who was told it won.
            let check = SeaOrmTurnStore::new(backend.connect().await, &backend.url);
            let owners: Vec<_> = check
                .claim_orphans("auditor", None, at(70))
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.turn_id.to_string())
                .collect();
            assert_eq!(owners.len(), 200);
        }
    }
}

//! [`TurnStore`] over sea-orm: table `turns`, one row per running turn.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Order, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult};

use super::file::{self, DatabaseFile};
use super::schema::{Turns, from_micros, stored, to_micros};
use crate::domain::session::{SessionId, TurnId};
use crate::ports::{TurnRecord, TurnStore, TurnStoreError};

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
    Ok((
        TurnRecord {
            turn_id: TurnId::from(turn_id.as_str()),
            session_id: SessionId::parse(&session_id)
                .map_err(|e| format!("turn {turn_id}: {e}"))?,
            owner: text(2)?,
            prompt: text(3)?,
            started_at,
            lease_until,
        },
        lease,
    ))
}

/// A record's columns, in the order rows are written and read.
const COLUMNS: [Turns; 6] = [
    Turns::TurnId,
    Turns::SessionId,
    Turns::Owner,
    Turns::Prompt,
    Turns::StartedAt,
    Turns::LeaseUntil,
];

#[async_trait]
impl TurnStore for SeaOrmTurnStore {
    async fn begin(&self, record: &TurnRecord) -> Result<(), TurnStoreError> {
        self.check_file()?;
        let insert = Query::insert()
            .into_table(Turns::Table)
            .columns(COLUMNS)
            .values_panic([
                Expr::val(record.turn_id.as_str()),
                Expr::val(record.session_id.as_str()),
                Expr::val(record.owner.as_str()),
                Expr::val(record.prompt.as_str()),
                Expr::val(to_micros(record.started_at)),
                Expr::val(to_micros(record.lease_until)),
            ])
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
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::adapters::persistence::test_support::{at, backends, t0};

    fn record(owner: &str, lease_until: DateTime<Utc>) -> TurnRecord {
        TurnRecord {
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

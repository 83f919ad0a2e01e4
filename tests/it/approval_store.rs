//! The sea-orm approval store with the approval domain on top, against a
//! SQLite file and, when `AUTOPOIESIS_TEST_DATABASE_URL` names one, a
//! PostgreSQL database: every test runs once per backend.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autopoiesis::adapters::approval_broadcast::ApprovalBroadcast;
use autopoiesis::adapters::ed25519::Ed25519ApprovalKey;
use autopoiesis::adapters::persistence::{
    ConnectError, ConnectSettings, SeaOrmApprovalStore, connect, sqlite_url,
};
use autopoiesis::domain::approvals::{
    ApprovalEnvelope, ApprovalPolicy, ApprovalScope, ApprovalService, ApprovalState, DecideError,
    PageRequest, RecordError, ToolCallRequest, canonical_json,
};
use autopoiesis::domain::session::{SessionId, TurnId};
use autopoiesis::ports::ApprovalSigner;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Verifier};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::json;

/// Listeners for the approval changes of a test that hears none.
fn unheard() -> Arc<ApprovalBroadcast> {
    Arc::new(ApprovalBroadcast::new())
}

const T0: i64 = 1_700_000_000;
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

fn at(epoch: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(epoch, 0).unwrap()
}

/// A database to run a test against, isolated from every other test.
struct Backend {
    name: &'static str,
    url: String,
    /// Keeps the SQLite file's directory alive for the test.
    _dir: Option<tempfile::TempDir>,
}

/// A fresh SQLite file, and a fresh PostgreSQL schema when
/// `AUTOPOIESIS_TEST_DATABASE_URL` is set.
async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = vec![Backend {
        name: "sqlite",
        url: sqlite_url(&dir.path().join("approvals.sqlite")),
        _dir: Some(dir),
    }];
    if let Some(url) = crate::helpers::postgres_schema_url().await {
        backends.push(Backend {
            name: "postgres",
            url,
            _dir: None,
        });
    }
    backends
}

struct Harness {
    service: Arc<ApprovalService>,
    key: Arc<Ed25519ApprovalKey>,
    db: DatabaseConnection,
}

async fn harness(backend: &Backend) -> Harness {
    eprintln!("backend: {}", backend.name);
    let settings = ConnectSettings::default();
    let store = SeaOrmApprovalStore::open(&backend.url, &settings)
        .await
        .unwrap();
    let key = Arc::new(Ed25519ApprovalKey::generate().unwrap());
    Harness {
        service: Arc::new(ApprovalService::new(
            Arc::new(store),
            Some(key.clone()),
            ApprovalPolicy::default(),
            unheard(),
        )),
        key,
        db: connect(&backend.url, &settings).await.unwrap(),
    }
}

fn scope() -> ApprovalScope {
    ApprovalScope {
        session_id: SessionId::parse("session-1").unwrap(),
        agent: "default".into(),
        turn_id: TurnId::generate(),
    }
}

fn calls(command: &str) -> Vec<ToolCallRequest> {
    vec![
        ToolCallRequest {
            tool_call_id: "call_1".into(),
            tool_name: "execute".into(),
            args: json!({"command": command}),
        },
        ToolCallRequest {
            tool_call_id: "call_2".into(),
            tool_name: "write_file".into(),
            args: json!({"path": "/tmp/ö.txt", "content": "hi"}),
        },
    ]
}

async fn record(harness: &Harness, command: &str, now: i64) -> ApprovalEnvelope {
    harness
        .service
        .record_deferred(&scope(), calls(command), at(now))
        .await
        .unwrap()
}

/// One column of one row, as text, straight from the table.
async fn column(db: &DatabaseConnection, envelope_id: &str, name: &str) -> Option<String> {
    // Test ids are uuids, safe to inline; casting makes both backends
    // return text for integer columns too.
    let sql = format!(
        "SELECT CAST({name} AS TEXT) AS v FROM approval_envelopes WHERE envelope_id = '{envelope_id}'"
    );
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .expect("row exists");
    row.try_get::<Option<String>>("", "v").unwrap()
}

async fn row_count(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM approval_envelopes".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

#[tokio::test]
async fn recorded_envelopes_are_stored_signed_and_listed_oldest_first() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let second = record(&h, "make", T0 + 5).await;
        let first = record(&h, "ls", T0).await;
        let third = record(&h, "rm -rf build", T0 + 9).await;

        let listed = h
            .service
            .list_pending(at(T0 + 10), &PageRequest::default())
            .await
            .unwrap()
            .items;
        assert_eq!(listed, vec![first.clone(), second, third]);

        let envelope = &listed[0];
        assert_eq!(envelope.state, ApprovalState::Pending);
        assert_eq!(envelope.key_id, h.key.key_id());
        assert_eq!(envelope.expires_at, T0 + HOUR);

        // What is stored is exactly the canonical text the hash covers,
        // and the signature verifies with the approval key.
        let scope_json = column(&h.db, &first.envelope_id, "scope_json").await;
        let tool_calls_json = column(&h.db, &first.envelope_id, "tool_calls_json").await;
        assert_eq!(scope_json.as_deref(), Some(first.scope_json().as_str()));
        assert_eq!(
            tool_calls_json.as_deref(),
            Some(
                r#"[{"args":{"command":"ls"},"tool_call_id":"call_1","tool_name":"execute"},{"args":{"content":"hi","path":"/tmp/ö.txt"},"tool_call_id":"call_2","tool_name":"write_file"}]"#
            )
        );
        let plan = format!(
            r#"{{"scope":{},"tool_calls":{}}}"#,
            scope_json.unwrap(),
            tool_calls_json.unwrap()
        );
        assert_eq!(plan, canonical_json(&serde_json::from_str(&plan).unwrap()));
        assert_eq!(
            first.plan_hash,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(plan.as_bytes()))
        );
        let signature = hex::decode(first.signature_hex.as_deref().unwrap()).unwrap();
        let signature = Signature::from_slice(&signature).unwrap();
        assert!(
            h.key
                .verifying_key()
                .verify(plan.as_bytes(), &signature)
                .is_ok()
        );

        assert_eq!(
            column(&h.db, &first.envelope_id, "state").await.as_deref(),
            Some("pending")
        );
        assert_eq!(
            column(&h.db, &first.envelope_id, "signed_object_json").await,
            None
        );
        assert_eq!(column(&h.db, &first.envelope_id, "consumed_at").await, None);
    }
}

#[tokio::test]
async fn approving_by_id_consumes_the_envelope_and_keeps_the_decision() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let envelope = record(&h, "ls", T0).await;
        let other = record(&h, "pwd", T0 + 1).await;

        let decided = h
            .service
            .decide(
                &envelope.envelope_id,
                true,
                Some("fine".into()),
                at(T0 + 60),
            )
            .await
            .unwrap();
        assert_eq!(decided.envelope_id, envelope.envelope_id);
        assert_eq!(decided.nonce, envelope.nonce);
        assert_eq!(decided.plan_hash, envelope.plan_hash);
        assert_eq!(decided.state, ApprovalState::Consumed);
        assert_eq!(decided.consumed_at, Some(T0 + 60));
        let decision = decided.decision.unwrap();
        assert!(decision.approved);
        assert_eq!(decision.source, "mcp");

        assert_eq!(
            column(&h.db, &envelope.envelope_id, "signed_object_json")
                .await
                .as_deref(),
            Some(
                format!(
                    r#"{{"approved":true,"decided_at":{},"reason":"fine","source":"mcp"}}"#,
                    T0 + 60
                )
                .as_str()
            )
        );
        assert_eq!(
            column(&h.db, &envelope.envelope_id, "state")
                .await
                .as_deref(),
            Some("consumed")
        );
        let listed = h
            .service
            .list_pending(at(T0 + 61), &PageRequest::default())
            .await
            .unwrap()
            .items;
        assert_eq!(listed, vec![other]);

        let again = h
            .service
            .decide(&envelope.envelope_id, false, None, at(T0 + 62))
            .await;
        assert!(
            matches!(again, Err(DecideError::NotFound { .. })),
            "{again:?}"
        );
        assert_eq!(
            column(&h.db, &envelope.envelope_id, "state")
                .await
                .as_deref(),
            Some("consumed")
        );
    }
}

#[tokio::test]
async fn rejecting_by_nonce_expires_the_envelope() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let envelope = record(&h, "ls", T0).await;
        let decided = h
            .service
            .decide(&envelope.nonce, false, None, at(T0 + 1))
            .await
            .unwrap();
        assert_eq!(decided.envelope_id, envelope.envelope_id);
        assert_eq!(decided.state, ApprovalState::Expired);
        assert_eq!(decided.consumed_at, Some(T0 + 1));
        assert_eq!(
            column(&h.db, &envelope.envelope_id, "signed_object_json")
                .await
                .as_deref(),
            Some(
                format!(
                    r#"{{"approved":false,"decided_at":{},"reason":null,"source":"mcp"}}"#,
                    T0 + 1
                )
                .as_str()
            )
        );
        assert!(
            h.service
                .list_pending(at(T0 + 2), &PageRequest::default())
                .await
                .unwrap()
                .items
                .is_empty()
        );
    }
}

#[tokio::test]
async fn deciding_an_unknown_id_is_not_found() {
    for backend in backends().await {
        let h = harness(&backend).await;
        record(&h, "ls", T0).await;
        for id in ["", "nope", "' OR 1=1 --"] {
            let result = h.service.decide(id, true, None, at(T0 + 1)).await;
            assert_eq!(
                result,
                Err(DecideError::NotFound {
                    approval_id: id.into()
                })
            );
        }
        assert_eq!(
            h.service
                .list_pending(at(T0 + 1), &PageRequest::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
    }
}

#[tokio::test]
async fn twenty_concurrent_decisions_on_one_envelope_have_exactly_one_winner() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let now = Utc::now();
        let envelope = h
            .service
            .record_deferred(&scope(), calls("ls"), now)
            .await
            .unwrap();
        let racers: Vec<_> = (0..20)
            .map(|i| {
                let service = h.service.clone();
                // Half by id, half by nonce; approvals and rejections mixed.
                let id = if i % 2 == 0 {
                    envelope.envelope_id.clone()
                } else {
                    envelope.nonce.clone()
                };
                tokio::spawn(async move {
                    service
                        .decide(&id, i % 3 != 0, Some(format!("racer {i}")), Utc::now())
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            match racer.await.unwrap() {
                Ok(decided) => winners.push(decided),
                Err(DecideError::NotFound { .. }) => {}
                Err(other) => panic!("{}: unexpected {other:?}", backend.name),
            }
        }
        assert_eq!(winners.len(), 1, "{}: {winners:?}", backend.name);
        let winner = &winners[0];
        let stored_state = column(&h.db, &envelope.envelope_id, "state").await;
        assert_eq!(stored_state.as_deref(), Some(winner.state.as_str()));
        let stored_decision = column(&h.db, &envelope.envelope_id, "signed_object_json").await;
        assert_eq!(
            stored_decision,
            winner.decision.as_ref().map(|d| d.to_canonical_json())
        );
    }
}

#[tokio::test]
async fn expired_envelopes_are_neither_listed_nor_decidable() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let envelope = record(&h, "ls", T0).await;
        assert_eq!(
            h.service
                .list_pending(at(T0 + HOUR - 1), &PageRequest::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        assert!(
            h.service
                .list_pending(at(T0 + HOUR), &PageRequest::default())
                .await
                .unwrap()
                .items
                .is_empty()
        );
        for id in [&envelope.envelope_id, &envelope.nonce] {
            let late = h.service.decide(id, true, None, at(T0 + HOUR)).await;
            assert!(
                matches!(late, Err(DecideError::NotFound { .. })),
                "{late:?}"
            );
        }
        assert_eq!(
            column(&h.db, &envelope.envelope_id, "state")
                .await
                .as_deref(),
            Some("pending")
        );
    }
}

#[tokio::test]
async fn pruning_removes_only_envelopes_expired_beyond_the_retention_window() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let now = T0 + 30 * DAY;
        // Expired (never decided) 8 days ago, decided 9 days ago, rejected
        // 6 days ago, and one still pending.
        let stale_pending = record(&h, "a", now - 8 * DAY - HOUR).await;
        let old_decided = record(&h, "b", now - 9 * DAY - HOUR).await;
        h.service
            .decide(
                &old_decided.envelope_id,
                true,
                None,
                at(now - 9 * DAY - HOUR + 5),
            )
            .await
            .unwrap();
        let recent_rejected = record(&h, "c", now - 6 * DAY - HOUR).await;
        h.service
            .decide(
                &recent_rejected.nonce,
                false,
                None,
                at(now - 6 * DAY - HOUR + 5),
            )
            .await
            .unwrap();
        let live = record(&h, "d", now - 60).await;
        assert_eq!(row_count(&h.db).await, 4);

        assert_eq!(h.service.prune(at(now)).await.unwrap(), 2);
        assert_eq!(row_count(&h.db).await, 2);
        let remaining = h
            .service
            .list_pending(at(now), &PageRequest::default())
            .await
            .unwrap()
            .items;
        assert_eq!(remaining, vec![live.clone()]);
        assert_eq!(
            column(&h.db, &recent_rejected.envelope_id, "state")
                .await
                .as_deref(),
            Some("expired")
        );
        let _ = stale_pending;

        assert_eq!(h.service.prune(at(now)).await.unwrap(), 0);
    }
}

#[tokio::test]
async fn connecting_twice_to_one_database_migrates_once() {
    for backend in backends().await {
        let h = harness(&backend).await;
        let envelope = record(&h, "ls", T0).await;
        let store = SeaOrmApprovalStore::open(&backend.url, &ConnectSettings::default())
            .await
            .unwrap();
        let again =
            ApprovalService::new(Arc::new(store), None, ApprovalPolicy::default(), unheard());
        assert_eq!(
            again
                .list_pending(at(T0), &PageRequest::default())
                .await
                .unwrap()
                .items,
            vec![envelope]
        );
    }
}

#[tokio::test]
async fn a_database_made_by_the_python_original_opens_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("approvals.sqlite");
    let original =
        sea_orm::Database::connect(format!("sqlite://{}?mode=rwc", path.display()).as_str())
            .await
            .unwrap();
    // The original's schema and rows, as its sqlite3 code wrote them.
    original
        .execute_unprepared(
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
                '0b9f1a9e-7f7e-4a55-9f0e-2d7b4f1c9a11', '5f2c0e7d8a7b4c3e9d1f0a2b3c4d5e6f',
                '{\"tool_call_ids\":[\"call_py\"],\"work_item_id\":\"w1\"}',
                '[{\"args\":{\"command\":\"uptime\"},\"tool_call_id\":\"call_py\",\"tool_name\":\"execute\"}]',
                'a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90',
                'f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed',
                NULL, NULL, 'pending', 1700000000, 1700003600, NULL
            );",
        )
        .await
        .unwrap();
    let schema_before = table_info(&original).await;
    original.close().await.unwrap();

    let url = sqlite_url(&path);
    let store = SeaOrmApprovalStore::open(&url, &ConnectSettings::default())
        .await
        .unwrap();
    let service = ApprovalService::new(Arc::new(store), None, ApprovalPolicy::default(), unheard());
    let listed = service
        .list_pending(at(T0 + 10), &PageRequest::default())
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 1);
    let envelope = &listed[0];
    assert_eq!(envelope.envelope_id, "0b9f1a9e-7f7e-4a55-9f0e-2d7b4f1c9a11");
    assert_eq!(envelope.plan_hash_prefix(), "a1b2c3d4");
    assert_eq!(envelope.issued_at, T0);
    assert_eq!(
        envelope.scope,
        json!({"tool_call_ids": ["call_py"], "work_item_id": "w1"})
    );
    assert_eq!(
        envelope.tool_calls,
        vec![ToolCallRequest {
            tool_call_id: "call_py".into(),
            tool_name: "execute".into(),
            args: json!({"command": "uptime"}),
        }]
    );
    assert_eq!(envelope.signature_hex, None);

    let decided = service
        .decide("5f2c0e7d8a7b4c3e9d1f0a2b3c4d5e6f", true, None, at(T0 + 20))
        .await
        .unwrap();
    assert_eq!(decided.state, ApprovalState::Consumed);

    let db = connect(&url, &ConnectSettings::default()).await.unwrap();
    assert_eq!(table_info(&db).await, schema_before);
}

/// `(name, type, notnull, pk)` of every column, in order.
async fn table_info(db: &DatabaseConnection) -> Vec<(String, String, i64, i64)> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "PRAGMA table_info(approval_envelopes)".to_owned(),
    ))
    .await
    .unwrap()
    .into_iter()
    .map(|row| {
        (
            row.try_get("", "name").unwrap(),
            row.try_get("", "type").unwrap(),
            row.try_get("", "notnull").unwrap(),
            row.try_get("", "pk").unwrap(),
        )
    })
    .collect()
}

#[tokio::test]
async fn a_new_sqlite_database_is_created_in_wal_mode_with_the_originals_columns() {
    let dir = tempfile::tempdir().unwrap();
    // Characters a URL would read as syntax must still name the file.
    let path = dir.path().join("odd #1?50% dir").join("approvals.sqlite");
    std::fs::create_dir(path.parent().unwrap()).unwrap();
    let db = connect(&sqlite_url(&path), &ConnectSettings::default())
        .await
        .unwrap();
    assert!(path.is_file(), "{}", path.display());
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "PRAGMA journal_mode".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<String>("", "journal_mode").unwrap(), "wal");
    let columns: Vec<_> = table_info(&db)
        .await
        .into_iter()
        .map(|(name, kind, ..)| format!("{name} {}", kind.to_lowercase()))
        .collect();
    assert_eq!(
        columns,
        [
            "envelope_id text",
            "nonce text",
            "scope_json text",
            "tool_calls_json text",
            "plan_hash text",
            "key_id text",
            "signed_object_json text",
            "signature_hex text",
            "state text",
            "issued_at integer",
            "expires_at integer",
            "consumed_at integer",
        ]
    );
}

#[tokio::test]
async fn an_in_memory_sqlite_database_works() {
    let store = SeaOrmApprovalStore::open("sqlite::memory:", &ConnectSettings::default())
        .await
        .unwrap();
    let key = Arc::new(Ed25519ApprovalKey::generate().unwrap());
    let service = ApprovalService::new(
        Arc::new(store),
        Some(key),
        ApprovalPolicy::default(),
        unheard(),
    );
    let envelope = service
        .record_deferred(&scope(), calls("ls"), at(T0))
        .await
        .unwrap();
    assert_eq!(
        service
            .list_pending(at(T0), &PageRequest::default())
            .await
            .unwrap()
            .items,
        vec![envelope]
    );
}

#[tokio::test]
async fn a_database_that_is_down_answers_an_error_quickly() {
    // Nothing listens on port 1; the password must not leak into the error.
    let started = Instant::now();
    let result = connect(
        "postgres://autopoiesis:hunter2-secret@127.0.0.1:1/approvals",
        &ConnectSettings::default(),
    )
    .await;
    let error = result.err().unwrap();
    assert!(matches!(error, ConnectError::Open(_)), "{error}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn other_database_urls_are_refused() {
    for url in ["mysql://localhost/db", "approvals.sqlite", ""] {
        let result = connect(url, &ConnectSettings::default()).await;
        assert_eq!(result.err(), Some(ConnectError::UnsupportedUrl), "{url}");
    }
}

#[test]
fn sqlite_urls_escape_url_syntax_in_paths() {
    assert_eq!(
        sqlite_url(Path::new("/data/a b#1?%.sqlite")),
        "sqlite:///data/a b%231%3F%25.sqlite?mode=rwc"
    );
}

#[tokio::test]
async fn pending_envelopes_are_counted_and_paged_by_issued_at_then_id_on_every_backend() {
    for backend in backends().await {
        let h = harness(&backend).await;
        // Three in one second (ordered by id there), one later, one decided,
        // one expired: four pending at T0 + 100.
        let mut same_second = vec![
            record(&h, "a", T0).await,
            record(&h, "b", T0).await,
            record(&h, "c", T0).await,
        ];
        same_second.sort_by(|x, y| x.envelope_id.cmp(&y.envelope_id));
        let later = record(&h, "d", T0 + 50).await;
        let decided = record(&h, "e", T0 + 60).await;
        h.service
            .decide(&decided.envelope_id, true, None, at(T0 + 61))
            .await
            .unwrap();
        record(&h, "old", T0 - HOUR + 10).await;
        let now = at(T0 + 100);
        assert_eq!(h.service.count_pending(now).await.unwrap(), 4);

        let mut listed = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = h
                .service
                .list_pending(now, &PageRequest::new(Some(3), cursor.as_deref()).unwrap())
                .await
                .unwrap();
            pages += 1;
            assert_eq!(page.count, 4);
            listed.extend(page.items);
            match page.next {
                Some(next) => cursor = Some(next.encode()),
                None => break,
            }
        }
        assert_eq!(pages, 2);
        let mut expected = same_second;
        expected.push(later);
        assert_eq!(listed, expected);
    }
}

#[tokio::test]
async fn deleting_the_sqlite_file_makes_the_store_unavailable_instead_of_losing_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("approvals.sqlite");
    let url = sqlite_url(&path);
    let store = SeaOrmApprovalStore::open(&url, &ConnectSettings::default())
        .await
        .unwrap();
    let key = Arc::new(Ed25519ApprovalKey::generate().unwrap());
    let service = ApprovalService::new(
        Arc::new(store),
        Some(key),
        ApprovalPolicy::default(),
        unheard(),
    );
    service
        .record_deferred(&scope(), calls("ls"), at(T0))
        .await
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let written = service.record_deferred(&scope(), calls("ls"), at(T0)).await;
    assert!(
        matches!(&written, Err(RecordError::Unavailable(why)) if why.contains("deleted")),
        "{written:?}"
    );
    assert!(service.count_pending(at(T0)).await.is_err());
    // A new file in its place is not the database either.
    std::fs::write(&path, b"").unwrap();
    assert!(service.count_pending(at(T0)).await.is_err());
}

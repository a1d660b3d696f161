//! Unit tests of the SQLite store's internals: query plans, the schema migration, group
//! commit and its failure handling, readiness. The behaviour shared with every backend is
//! tested in `tests/store_suite.rs`.

use std::collections::HashMap;

use bytes::Bytes;

use super::connect::apply_plan_stability;
use super::reads::{decode_cursor, encode_cursor};
use super::sql::{
    CLAIM_PICK, COUNT_DEAD, COUNT_DELAYED, COUNT_HELD, COUNT_IN_FLIGHT, COUNT_READY, DLQ_PAGE,
    NEXT_HELD,
};
use super::writer::run_batch;
use super::*;
use crate::queue::{Event, SignatureScheme};

/// Claiming, the next due time and the queue gauges must stay index searches as the
/// backlog and the history grow.
#[test]
fn claim_next_due_and_counts_use_an_index() {
    let conn = Connection::open_in_memory().unwrap();
    // Plans as the store's connections make them.
    apply_plan_stability(&conn).unwrap();
    conn.execute_batch(schema::SCHEMA).unwrap();
    for (sql, index) in [
        (CLAIM_PICK, "events_claim"),
        (NEXT_DUE, "events_claim"),
        (COUNT_READY, "events_claim"),
        (COUNT_DELAYED, "events_claim"),
        (COUNT_IN_FLIGHT, "events_claim"),
        (COUNT_DEAD, "events_dead_queue"),
        (COUNT_HELD, "events_held"),
        (NEXT_HELD, "events_held"),
    ] {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let args: Vec<Box<dyn rusqlite::ToSql>> =
            vec![Box::new("q"), Box::new(0i64), Box::new(10i64)];
        let n = stmt.parameter_count();
        let plan: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(args.iter().take(n)), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains(index), "{sql}\n{plan}");
        assert!(!plan.contains("SCAN events"), "{sql}\n{plan}");
    }
}

/// A schema 3 file (full claim index, no per-queue dead-letter index, no `deferred_by`,
/// no ordering keys) is brought to the current version.
#[test]
fn schema_3_gets_the_partial_claim_index() {
    let mut conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(schema::SCHEMA).unwrap();
    conn.execute_batch(
        "DROP INDEX events_claim;
         DROP INDEX events_dead_queue;
         DROP INDEX events_deferred;
         ALTER TABLE events DROP COLUMN deferred_by;
         DROP INDEX events_held;
         ALTER TABLE events DROP COLUMN ordering_key;
         ALTER TABLE events DROP COLUMN sequence;
         DROP TABLE ordering_keys;
         CREATE INDEX events_claim ON events(queue, state, due_at);
         PRAGMA user_version = 3;",
    )
    .unwrap();
    schema::ensure(&mut conn).unwrap();
    let index_sql = |name: &str| -> Option<String> {
        conn.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
        .unwrap()
    };
    assert!(index_sql("events_claim")
        .unwrap()
        .ends_with("WHERE state < 2"));
    assert!(index_sql("events_dead_queue").is_some());
    assert!(index_sql("events_deferred").is_some());
    assert!(index_sql("events_held")
        .unwrap()
        .ends_with("WHERE state = 4"));
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

/// Every DLQ page, however deep, is a range search of the partial index, not a scan.
#[test]
fn dead_letter_pages_search_the_index() {
    let conn = Connection::open_in_memory().unwrap();
    // Plans as the store's connections make them.
    apply_plan_stability(&conn).unwrap();
    conn.execute_batch(schema::SCHEMA).unwrap();
    let mut stmt = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {DLQ_PAGE}"))
        .unwrap();
    let plan: Vec<String> = stmt
        .query_map(
            params![
                None::<String>,
                None::<String>,
                0i64,
                10i64,
                5i64,
                "evt_x",
                10i64
            ],
            |r| r.get::<_, String>(3),
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("SEARCH e USING INDEX events_dlq"), "{plan}");
}

fn test_event(n: u32) -> NewEvent {
    NewEvent {
        event: Event {
            id: format!("evt_{n:04}"),
            event_type: "order.created".into(),
            body: Bytes::from_static(b"{}"),
            content_type: Some("application/json".into()),
            trace_id: format!("trace-{n}"),
            idempotency_key: None,
        },
        queue: "default".into(),
        target: "http://127.0.0.1:9/hook".into(),
        signature: SignatureScheme::StandardWebhooks,
        timeout_ms: 1000,
        retry_delays_ms: vec![100],
        jitter: 0.0,
        received_at_ms: 1000,
        due_at_ms: 1000,
        fallback: None,
        ordering_key: None,
    }
}

/// A claim binds a different limit almost every time; that must not make SQLite re-parse
/// and re-plan the claim statement (it did, on every call, before QPSG was turned on).
#[test]
fn claims_with_changing_limits_reuse_the_prepared_plan() {
    let dir = tempfile::tempdir().unwrap();
    let conn = writer_for_test(dir.path());
    let mut ws = WriterState::new(HashMap::new(), None);
    for n in 0..20 {
        tx_enqueue(&conn, &mut ws, &test_event(n), None, 100).unwrap();
    }
    let mut claimed = 0;
    for limit in [1, 2, 3, 5, 4] {
        claimed += tx_claim(&conn, &mut ws, "default", 2000, limit, 30_000)
            .unwrap()
            .len();
    }
    assert_eq!(claimed, 15);
    let reprepared = conn
        .prepare_cached(CLAIM_PICK)
        .unwrap()
        .get_status(rusqlite::StatementStatus::RePrepare);
    assert_eq!(reprepared, 0);
}

type Reply<T> = oneshot::Receiver<Result<T, StoreError>>;

fn job<T, F>(kind: JobKind, f: F) -> (Box<dyn Job>, Reply<T>)
where
    T: Send + 'static,
    F: FnOnce(&Connection, &mut WriterState) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    (Box::new(WriteJob { f, reply, kind }), rx)
}

fn enqueue_job(ev: NewEvent) -> (Box<dyn Job>, Reply<EnqueueOutcome>) {
    job(JobKind::Enqueue, move |conn, ws| {
        tx_enqueue(conn, ws, &ev, None, 100)
    })
}

fn event_rows(conn: &Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM event_payloads)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

fn writer_for_test(dir: &Path) -> Connection {
    let (mut conn, _) = open_writer(&dir.join("q.db"), &SqliteOptions::default()).unwrap();
    schema::ensure(&mut conn).unwrap();
    conn
}

/// Enqueues run without a savepoint. One that fails after writing part of its event (here
/// a trigger refuses its payload row, after its state row went in) cannot be undone alone:
/// its whole batch must be rolled back and answered, and the jobs after it retried.
#[test]
fn an_enqueue_failing_part_way_aborts_its_batch_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = writer_for_test(dir.path());
    conn.execute_batch(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON event_payloads
         WHEN NEW.trace_id = 'trace-2' BEGIN SELECT RAISE(ABORT, 'boom'); END;",
    )
    .unwrap();
    let mut ws = WriterState::new(HashMap::new(), None);
    let commits = AtomicU64::new(0);
    let (j1, mut r1) = enqueue_job(test_event(1));
    let (j2, mut r2) = enqueue_job(test_event(2));
    let (j3, mut r3) = enqueue_job(test_event(3));

    let rest = run_batch(&mut conn, vec![j1, j2, j3], &mut ws, &commits);

    assert!(matches!(r1.try_recv(), Ok(Err(StoreError::Unavailable(_)))));
    assert!(matches!(r2.try_recv(), Ok(Err(StoreError::Unavailable(m))) if m.contains("boom")));
    assert!(r3.try_recv().is_err(), "not run yet, so not answered");
    assert_eq!(rest.len(), 1);
    assert_eq!(event_rows(&conn), (0, 0));
    assert_eq!(ws.current("default"), 0);
    assert_eq!(commits.load(Ordering::Relaxed), 0);

    let rest = run_batch(&mut conn, rest, &mut ws, &commits);
    assert!(rest.is_empty());
    assert_eq!(r3.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
    assert_eq!(event_rows(&conn), (1, 1));
    assert_eq!(ws.current("default"), 1);
}

/// A job refused before it writes anything fails alone, savepoint or not.
#[test]
fn a_job_refused_before_writing_does_not_fail_its_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = writer_for_test(dir.path());
    let mut ws = WriterState::new(HashMap::new(), None);
    let commits = AtomicU64::new(0);
    for (n, kind) in [JobKind::Enqueue, JobKind::Delivery, JobKind::Other]
        .into_iter()
        .enumerate()
    {
        let n = 10 * n as u32;
        let (j1, mut r1) = enqueue_job(test_event(n + 1));
        let (j2, mut r2) = job::<(), _>(kind, |_, ws| {
            ws.adjust("default", 1);
            Err(StoreError::InvalidInput("refused".into()))
        });
        let (j3, mut r3) = enqueue_job(test_event(n + 3));

        let rest = run_batch(&mut conn, vec![j1, j2, j3], &mut ws, &commits);

        assert!(rest.is_empty());
        assert_eq!(r1.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
        assert!(matches!(
            r2.try_recv(),
            Ok(Err(StoreError::InvalidInput(_)))
        ));
        assert_eq!(r3.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
    }
    assert_eq!(event_rows(&conn), (6, 6));
    assert_eq!(ws.current("default"), 6);
}

/// A claim that meets a row it cannot decode fails before it has leased anything, so it
/// fails alone (claims run without a savepoint), and no event is left in flight.
#[test]
fn a_claim_meeting_a_corrupt_row_fails_alone_and_leases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = writer_for_test(dir.path());
    let mut ws = WriterState::new(HashMap::new(), None);
    let commits = AtomicU64::new(0);
    for n in 0..3 {
        tx_enqueue(&conn, &mut ws, &test_event(n), None, 100).unwrap();
    }
    // The second event to be picked no longer decodes.
    conn.execute(
        "UPDATE event_payloads SET signature = 'rot13' WHERE rid =
             (SELECT rid FROM events WHERE id = 'evt_0001')",
        [],
    )
    .unwrap();
    let (j1, mut r1) = enqueue_job(test_event(10));
    let (j2, mut r2) = job(JobKind::Delivery, |conn, ws| {
        tx_claim(conn, ws, "default", 2000, 10, 30_000)
    });
    let (j3, mut r3) = enqueue_job(test_event(11));

    let rest = run_batch(&mut conn, vec![j1, j2, j3], &mut ws, &commits);

    assert!(rest.is_empty());
    assert!(matches!(r2.try_recv(), Ok(Err(StoreError::Corrupt(_)))));
    assert_eq!(r1.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
    assert_eq!(r3.try_recv().unwrap().unwrap(), EnqueueOutcome::Accepted);
    let in_flight: i64 = conn
        .query_row("SELECT COUNT(*) FROM events WHERE state <> 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(in_flight, 0);
    assert_eq!(event_rows(&conn), (5, 5));
}

/// The file deleted while a batch runs: the batch commits (to the deleted file, where the
/// process still delivers from), but its enqueues cannot be promised durable, so they are
/// answered "outcome unknown"; the other jobs of the batch stand.
#[test]
fn an_enqueue_whose_file_vanishes_during_its_batch_has_an_unknown_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = writer_for_test(dir.path());
    let path = dir.path().join("q.db");
    let mut ws = WriterState::new(HashMap::new(), None);
    ws.identity = Some(health::IdentityWatch::new(Arc::new(
        health::FileIdentity::capture(&path).unwrap(),
    )));
    let commits = AtomicU64::new(0);
    let (j1, r1) = enqueue_job(test_event(1));
    let gone = path.clone();
    let (j2, r2) = job(JobKind::Other, move |_, _| {
        std::fs::remove_file(&gone).map_err(|e| StoreError::Unavailable(e.to_string()))
    });
    let rest = run_batch(&mut conn, vec![j1, j2], &mut ws, &commits);
    assert!(rest.is_empty());
    let first = r1.blocking_recv().unwrap();
    assert!(
        matches!(&first, Err(StoreError::OutcomeUnknown(m)) if m.contains("deleted")),
        "{first:?}"
    );
    r2.blocking_recv().unwrap().unwrap();
    assert_eq!(
        event_rows(&conn),
        (1, 1),
        "the event is in the deleted file"
    );
    // (Later batches refuse enqueues before they run: `writer_loop`, covered by the
    // integration tests in `tests/it/store_faults.rs`.)
}

#[tokio::test]
async fn a_store_that_cannot_write_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("q.db"), SqliteOptions::default()).unwrap();
    store.ping().await.unwrap();

    // The write connection refuses writes from now on, as on a file system remounted
    // read-only (the tests run as root, which file modes do not stop). It cannot be turned
    // back: every later batch fails at `BEGIN IMMEDIATE`. Recovery is covered by the size
    // cap test below and the full-disk test of the integration suite.
    store
        .write(JobKind::Other, |conn, _| {
            conn.pragma_update(None, "query_only", true)?;
            Ok(())
        })
        .await
        .unwrap();
    let refused = store.enqueue(test_event(1), None, 100).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    let not_ready = store.ping().await;
    assert!(
        matches!(&not_ready, Err(StoreError::Unavailable(m)) if m.contains("readonly")),
        "{not_ready:?}"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_store_at_its_size_cap_is_not_ready_until_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        max_size_bytes: Some(1 << 20),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("q.db"), options).unwrap();
    let mut n = 0;
    loop {
        let mut ev = test_event(n);
        ev.event.body = Bytes::from(vec![b'x'; 64 * 1024]);
        match store.enqueue(ev, None, 1000).await {
            Ok(EnqueueOutcome::Accepted) => n += 1,
            Err(StoreError::Unavailable(_)) => break,
            other => panic!("{other:?}"),
        }
        assert!(n < 100, "the cap never refused");
    }
    assert!(store.ping().await.is_err(), "full is not ready");
    // Deliver and purge everything: room again.
    let claimed = store
        .claim_due("default", 1000, 1000, 60_000)
        .await
        .unwrap();
    for ev in claimed {
        store
            .complete(
                &ev.event.id,
                &ev.lease_token,
                None,
                Disposition::Delivered,
                1000,
            )
            .await
            .unwrap();
    }
    store.purge(2000, 2000).await.unwrap();
    store.ping().await.unwrap();
    store.close().await.unwrap();
}

#[test]
fn cursor_round_trips() {
    let c = encode_cursor(1234, "evt_a:b");
    assert_eq!(decode_cursor(&c).unwrap(), (1234, "evt_a:b".to_owned()));
    assert!(decode_cursor("nonsense").is_err());
}

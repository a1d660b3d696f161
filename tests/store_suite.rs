//! The behavioural suite for [`Store`] backends.
//!
//! `cases` holds backend-agnostic cases; each backend gets a module here that opens a fresh
//! store per case and runs every case against it, plus tests of its own specifics. A new
//! backend adds a module that runs `with_cases!` (see `redis` below).

#[path = "store_suite/cases.rs"]
mod cases;
#[path = "store_suite/redis_keys.rs"]
mod redis_keys;
#[path = "common/redis_server.rs"]
mod redis_server;
#[path = "common/sqlite_v1.rs"]
mod sqlite_v1;

use std::path::Path;
use std::sync::Arc;

use hookyard::queue::sqlite::{SqliteOptions, SqliteStore};
use hookyard::queue::{EnqueueOutcome, Ledger, Queue, Store, StoreError};
use tempfile::TempDir;

/// Calls `$callback!($($args)* <every backend-agnostic case>)`: the one list of cases that
/// every backend runs, so a case added here runs against SQLite and Redis alike.
macro_rules! with_cases {
    ($callback:ident ! ($($args:tt)*)) => {
        $callback!($($args)*
        enqueue_claim_complete_delivered,
        due_time_is_exact_to_the_millisecond,
        lease_expiry_reclaims_and_ignores_stale_token,
        a_lease_token_completes_only_its_own_event,
        leases_that_keep_running_out_dead_letter_the_event,
        retry_reschedules_and_counts_attempts,
        defer_does_not_count_an_attempt,
        breaker_deferrals_are_due_at_once_when_that_breaker_closes,
        undefer_all_makes_every_breaker_deferral_due,
        dead_letter_listing_filters_and_paging,
        replay_starts_fresh_round_with_same_id,
        replay_matching_replays_filtered_set,
        idempotency_duplicate_expiry_and_scope,
        queue_full_at_max_depth_stores_nothing,
        fallback_recorded_and_reconciled,
        event_history_lists_attempts,
        purge_removes_finished_and_expired,
        stats_gauges,
        release_returns_leases,
        next_due_at_tracks_earliest,
        queues_are_isolated,
        close_then_calls_fail_closed,
        ordering_keys_hand_out_one_event_per_key_in_sequence,
        ordering_key_head_dead_lettered_by_expiry_releases_the_next,
        finishing_a_keys_event_hands_the_next_one_to_the_same_worker,
        );
    };
}

/// One `#[tokio::test]` per case, each on a fresh store from `$open` (which returns the store
/// and a guard that must outlive it).
macro_rules! store_cases {
    ($open:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_guard, store) = $open();
                cases::$case(&store).await;
                // Every case must leave the store closable (close waits for the writer).
                let _ = store.close().await;
            }
        )*
    };
}

mod sqlite {
    use super::*;

    /// The schema version a file declares (`PRAGMA user_version`).
    fn schema_version(conn: &rusqlite::Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    fn open_at(path: &Path, options: SqliteOptions) -> SqliteStore {
        SqliteStore::open(path, options).expect("open sqlite store")
    }

    /// A fresh store on a real file (WAL and fsync behave as in production).
    pub fn fresh() -> (TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(
            &dir.path().join("data/hookyard.db"),
            SqliteOptions::default(),
        );
        (dir, store)
    }

    with_cases!(store_cases!(fresh;));

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_enqueues_all_durable() {
        let (_dir, store) = fresh();
        let store = Arc::new(store);
        cases::concurrent_enqueues_all_durable(store.clone(), 200).await;
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_replay_and_purge() {
        // More than one maintenance chunk (1000), so the chunked loops are exercised. fsync
        // off only to keep the test quick; durability is covered elsewhere.
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(
            &dir.path().join("bulk.db"),
            SqliteOptions::default().without_fsync(),
        );
        let store = Arc::new(store);
        cases::bulk_replay_and_purge(store.clone(), 2100).await;
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn durable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("durable.db");
        cases::durable_across_reopen(|| {
            let path = path.clone();
            async move { Arc::new(open_at(&path, SqliteOptions::default())) as Arc<dyn Store> }
        })
        .await;
    }

    /// Group commit: 200 concurrent enqueues share far fewer than 200 transactions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_batches_concurrent_enqueues() {
        let (_dir, store) = fresh();
        let store = Arc::new(store);
        let before = store.commits();
        cases::concurrent_enqueues_all_durable(store.clone() as Arc<dyn Store>, 200).await;
        // The case itself does one more write (the final claim).
        let commits = store.commits() - before;
        eprintln!("200 concurrent enqueues + 1 claim: {commits} commits");
        assert!(commits >= 1);
        assert!(
            commits < 100,
            "200 concurrent enqueues took {commits} commits: no batching"
        );
        store.close().await.unwrap();
    }

    /// The depth counter is rebuilt from the file at open.
    #[tokio::test]
    async fn depth_limit_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("depth.db");
        let store = open_at(&path, SqliteOptions::default());
        for id in ["evt_1", "evt_2"] {
            let ev = cases::event(id, "t", "q", cases::T0);
            assert_eq!(
                store.enqueue(ev, None, 2).await.unwrap(),
                EnqueueOutcome::Accepted
            );
        }
        store.close().await.unwrap();
        let store = open_at(&path, SqliteOptions::default());
        let ev = cases::event("evt_3", "t", "q", cases::T0);
        assert_eq!(
            store.enqueue(ev, None, 2).await.unwrap(),
            EnqueueOutcome::QueueFull
        );
        store.close().await.unwrap();
    }

    /// fsync off is for benchmarks; data written through a clean close is still there.
    #[tokio::test]
    async fn without_fsync_still_persists_on_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nofsync.db");
        let store = open_at(&path, SqliteOptions::default().without_fsync());
        assert!(!store.options().fsync);
        let ev = cases::event("evt_1", "t", "q", cases::T0);
        store.enqueue(ev, None, u64::MAX).await.unwrap();
        store.close().await.unwrap();
        let store = open_at(&path, SqliteOptions::default());
        assert!(store.event("evt_1").await.unwrap().is_some());
        store.close().await.unwrap();
    }

    /// A path that cannot be created is reported as `Unavailable`, not a panic. (A read-only
    /// directory would not do: tests may run as root, which ignores permissions.)
    #[tokio::test]
    async fn unwritable_path_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        for path in [file.join("hookyard.db"), file.join("sub/hookyard.db")] {
            match SqliteStore::open(&path, SqliteOptions::default()) {
                Err(StoreError::Unavailable(msg)) => assert!(!msg.is_empty()),
                other => panic!("expected Unavailable for {}, got {other:?}", path.display()),
            }
        }
        // A directory where the database file should be.
        match SqliteStore::open(dir.path(), SqliteOptions::default()) {
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("expected Unavailable for a directory, got {other:?}"),
        }
    }

    /// The file is WAL, versioned, and a newer schema version is refused rather than misread.
    #[tokio::test]
    async fn schema_is_versioned_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema.db");
        let store = open_at(&path, SqliteOptions::default());
        store.close().await.unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version = schema_version(&conn);
        assert_eq!(version, hookyard::queue::sqlite::SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        match SqliteStore::open(&path, SqliteOptions::default()) {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("99"), "{msg}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// A schema-1 file with queued, leased, delivered and dead-lettered events is migrated at
    /// open without losing any of them: queued events are claimed with their bodies, an expired
    /// v1 lease comes back with its attempt count, a live v1 lease is still honoured, and the
    /// history of finished events stays readable.
    #[tokio::test]
    async fn schema_1_file_is_migrated_with_its_queue() {
        use super::sqlite_v1::{create, insert, insert_attempt, V1Event};
        use cases::T0;
        use hookyard::queue::{Disposition, EventState};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let conn = create(&path);
        let base = V1Event {
            id: "",
            event_type: "user.updated",
            queue: "q",
            target: "http://127.0.0.1:9/u",
            body: b"\x00\xffbody",
            state: 0,
            due_at: Some(T0),
            lease_token: None,
            attempts_made: 0,
            received_at: T0,
            delivered_at: None,
            dead_lettered_at: None,
            dead_letter_reason: None,
        };
        insert(
            &conn,
            &V1Event {
                id: "evt_pending",
                ..base
            },
        );
        // Retried once already, due again at T0 + 5.
        insert(
            &conn,
            &V1Event {
                id: "evt_retry",
                due_at: Some(T0 + 5),
                attempts_made: 1,
                ..base
            },
        );
        insert_attempt(&conn, "evt_retry", 1, T0, None);
        // Leased by a v1 worker that crashed: lease expired at T0 + 10.
        insert(
            &conn,
            &V1Event {
                id: "evt_expired",
                state: 1,
                due_at: Some(T0 + 10),
                lease_token: Some("old"),
                ..base
            },
        );
        // Leased by a v1 worker whose lease is still running at the first claim below.
        insert(
            &conn,
            &V1Event {
                id: "evt_leased",
                state: 1,
                due_at: Some(T0 + 60_000),
                lease_token: Some("live"),
                ..base
            },
        );
        insert(
            &conn,
            &V1Event {
                id: "evt_done",
                state: 2,
                due_at: None,
                attempts_made: 1,
                delivered_at: Some(T0 + 1),
                ..base
            },
        );
        insert_attempt(&conn, "evt_done", 1, T0, Some(200));
        insert(
            &conn,
            &V1Event {
                id: "evt_dead",
                state: 3,
                due_at: None,
                attempts_made: 1,
                dead_lettered_at: Some(T0 + 2),
                dead_letter_reason: Some("permanent_4xx"),
                ..base
            },
        );
        insert_attempt(&conn, "evt_dead", 1, T0, Some(404));
        drop(conn);

        let store = open_at(&path, SqliteOptions::default());
        let stats = store.stats("q", T0 + 100).await.unwrap();
        assert_eq!(
            (stats.ready, stats.in_flight, stats.dead_lettered),
            (2, 2, 1)
        );

        let mut got = store
            .claim_due("q", T0 + 100, 10, cases::LEASE)
            .await
            .unwrap();
        got.sort_by(|a, b| a.event.id.cmp(&b.event.id));
        let ids: Vec<&str> = got.iter().map(|c| c.event.id.as_str()).collect();
        assert_eq!(ids, ["evt_expired", "evt_pending", "evt_retry"]);
        for c in &got {
            assert_eq!(&c.event.body[..], b"\x00\xffbody");
            assert_eq!(c.event.event_type, "user.updated");
            assert_eq!(c.retry_delays_ms, [20, 40]);
            assert_eq!(c.event.content_type.as_deref(), Some("application/json"));
            assert_eq!(c.event.trace_id, format!("trace-{}", c.event.id));
        }
        assert_eq!(
            got.iter()
                .find(|c| c.event.id == "evt_retry")
                .unwrap()
                .attempt,
            2
        );
        // The v1 lease still holds: its token completes it, and nobody else could claim it.
        let done = store
            .complete(
                "evt_leased",
                "live",
                Some(cases::attempt(1, T0 + 100, Some(200), None)),
                Disposition::Delivered,
                T0 + 101,
            )
            .await
            .unwrap();
        assert!(
            done,
            "a lease taken before the upgrade is honoured after it"
        );
        for c in &got {
            let a = cases::attempt(c.attempt, T0 + 100, Some(200), None);
            assert!(store
                .complete(
                    &c.event.id,
                    &c.lease_token,
                    Some(a),
                    Disposition::Delivered,
                    T0 + 101
                )
                .await
                .unwrap());
        }
        let retry = store.event("evt_retry").await.unwrap().unwrap();
        assert_eq!(retry.state, EventState::Delivered);
        let statuses: Vec<_> = retry
            .attempts
            .iter()
            .map(|a| (a.attempt, a.status))
            .collect();
        assert_eq!(
            statuses,
            [(1, None), (2, Some(200))],
            "pre-upgrade attempts are kept"
        );
        let done = store.event("evt_done").await.unwrap().unwrap();
        assert_eq!(done.state, EventState::Delivered);
        assert_eq!(done.received_at_ms, T0);
        assert_eq!(done.attempts.len(), 1);
        let dlq = store
            .list_dead_letters(Default::default(), None, 10)
            .await
            .unwrap();
        assert_eq!(dlq.items.len(), 1);
        assert_eq!(dlq.items[0].id, "evt_dead");
        assert_eq!(dlq.items[0].last_status, Some(404));
        assert_eq!(store.stats("q", T0 + 200).await.unwrap().ready, 0);
        store.close().await.unwrap();

        let conn = rusqlite::Connection::open(&path).unwrap();
        let version = schema_version(&conn);
        assert_eq!(version, hookyard::queue::sqlite::SCHEMA_VERSION);
    }

    /// A migration that cannot finish leaves the schema-1 file as it was: it runs in one
    /// transaction, so a failure part-way cannot strand events between two layouts.
    #[tokio::test]
    async fn failed_migration_leaves_the_v1_file_untouched() {
        use super::sqlite_v1::{create, insert, V1Event};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let conn = create(&path);
        insert(
            &conn,
            &V1Event {
                id: "evt_q",
                event_type: "t",
                queue: "q",
                target: "http://127.0.0.1:9/u",
                body: b"b",
                state: 0,
                due_at: Some(1),
                lease_token: None,
                attempts_made: 0,
                received_at: 1,
                delivered_at: None,
                dead_lettered_at: None,
                dead_letter_reason: None,
            },
        );
        // A table in the way of the migration's first step makes it fail.
        conn.execute_batch("CREATE TABLE event_payloads (x INTEGER)")
            .unwrap();
        drop(conn);
        assert!(SqliteStore::open(&path, SqliteOptions::default()).is_err());
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version = schema_version(&conn);
        assert_eq!(version, 1);
        let (n, body): (i64, Vec<u8>) = conn
            .query_row(
                "SELECT COUNT(*), MAX(body) FROM events WHERE state = 0",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((n, body), (1, b"b".to_vec()));
    }

    /// Purge also deletes expired idempotency keys (not observable through the trait, since an
    /// expired key already reads as absent).
    #[tokio::test]
    async fn purge_deletes_expired_idempotency_rows() {
        let (dir, store) = fresh();
        for (id, key, expires) in [("evt_1", "old", 100), ("evt_2", "new", 10_000)] {
            let ev = cases::event(id, "t", "q", cases::T0);
            let claim = hookyard::queue::IdempotencyClaim {
                event_type: "t".into(),
                key: key.into(),
                expires_at_ms: cases::T0 + expires,
            };
            store.enqueue(ev, Some(claim), u64::MAX).await.unwrap();
        }
        store.purge(0, cases::T0 + 1000).await.unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("data/hookyard.db")).unwrap();
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM idempotency")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys, ["new"]);
        store.close().await.unwrap();
    }

    /// A job that fails inside a batch fails alone: its neighbours still commit, and the depth
    /// counter does not count the failed one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_job_does_not_sink_its_batch() {
        let (_dir, store) = fresh();
        let store = Arc::new(store);
        let mut handles = Vec::new();
        for i in 0..100 {
            let store = Arc::clone(&store);
            // Every id is used twice: one of each pair violates the unique id.
            let ev = cases::event(&format!("evt_{}", i / 2), "t", "q", cases::T0);
            handles.push(tokio::spawn(
                async move { store.enqueue(ev, None, 1000).await },
            ));
        }
        let (mut ok, mut failed) = (0, 0);
        for h in handles {
            match h.await.unwrap() {
                Ok(EnqueueOutcome::Accepted) => ok += 1,
                Err(StoreError::Unavailable(_)) => failed += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((ok, failed), (50, 50));
        assert_eq!(store.stats("q", cases::T0).await.unwrap().ready, 50);
        // 50 stored; the depth limit must see exactly 50, not 100.
        for i in 0..50 {
            let ev = cases::event(&format!("evt_more_{i}"), "t", "q", cases::T0);
            assert_eq!(
                store.enqueue(ev, None, 100).await.unwrap(),
                EnqueueOutcome::Accepted
            );
        }
        let ev = cases::event("evt_over", "t", "q", cases::T0);
        assert_eq!(
            store.enqueue(ev, None, 100).await.unwrap(),
            EnqueueOutcome::QueueFull
        );
        store.close().await.unwrap();
    }

    /// Enqueues `n` events with 1 KiB bodies, one at a time (so one batch and one commit
    /// each, which rewrites the same few pages into the WAL every time).
    async fn enqueue_kib_events(store: &SqliteStore, prefix: &str, n: usize) {
        for i in 0..n {
            let mut ev = cases::event(&format!("evt_{prefix}_{i}"), "t", "q", cases::T0);
            ev.event.body = bytes::Bytes::from(vec![b'x'; 1024]);
            assert_eq!(
                store.enqueue(ev, None, u64::MAX).await.unwrap(),
                EnqueueOutcome::Accepted
            );
        }
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    /// With no checkpoint running elsewhere, the writer itself keeps the WAL bounded: it
    /// checkpoints once the WAL holds 4 x `checkpoint_frames` frames, and the next commit
    /// starts the WAL over. (The WAL file never shrinks below its high-water mark until the
    /// size limit truncates it, so its length shows the most frames it ever held.)
    #[tokio::test]
    async fn writer_bounds_the_wal_when_no_background_checkpoint_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let options = SqliteOptions {
            fsync: false,
            checkpoint_frames: 64,
            background_checkpoints: false,
            ..SqliteOptions::default()
        };
        let store = open_at(&path, options);
        // Several thousand frames: unbounded, the WAL would reach well over 10 MiB.
        enqueue_kib_events(&store, "a", 2000).await;
        let frame = 4096 + 24;
        let bound = 32 + (4 * 64 + 16) * frame;
        let wal = file_len(&dir.path().join("wal.db-wal"));
        assert!(wal > 0 && wal <= bound, "WAL is {wal} bytes, bound {bound}");
        assert_eq!(store.stats("q", cases::T0).await.unwrap().ready, 2000);
        store.close().await.unwrap();
    }

    /// With background checkpoints on, the checkpointer copies the WAL into the database file
    /// long before the writer's own bound (4 x `checkpoint_frames`) is reached.
    #[tokio::test]
    async fn the_wal_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bg.db");
        let options = SqliteOptions {
            fsync: false,
            checkpoint_frames: 1000,
            ..SqliteOptions::default()
        };
        let store = open_at(&path, options);
        let empty = file_len(&path);
        // Past 1000 frames, far below the writer's 4000, and about 150 KiB of bodies alone.
        enqueue_kib_events(&store, "b", 400).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while file_len(&path) < empty + 128 * 1024 {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing checkpointed: database file {} bytes, WAL {} bytes",
                file_len(&path),
                file_len(&dir.path().join("bg.db-wal"))
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        store.close().await.unwrap();
    }

    /// A full database (here: the configured size cap) is `Unavailable`, never a panic; what
    /// was accepted before stays, and the store keeps working for reads and for purging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_database_is_unavailable_and_recoverable() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            max_size_bytes: Some(512 * 1024),
            ..SqliteOptions::default()
        };
        let store = Arc::new(open_at(&dir.path().join("full.db"), options));
        let mut accepted = Vec::new();
        let mut unavailable = 0;
        for round in 0..8 {
            let mut handles = Vec::new();
            for i in 0..16 {
                let store = Arc::clone(&store);
                let id = format!("evt_{round:02}_{i:02}");
                let mut ev = cases::event(&id, "t", "q", cases::T0);
                ev.event.body = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
                handles.push(tokio::spawn(async move {
                    (id, store.enqueue(ev, None, u64::MAX).await)
                }));
            }
            for h in handles {
                match h.await.unwrap() {
                    (id, Ok(EnqueueOutcome::Accepted)) => accepted.push(id),
                    (_, Err(StoreError::Unavailable(_))) => unavailable += 1,
                    (_, other) => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(unavailable > 0, "the size cap never bit");
        assert!(!accepted.is_empty());
        for id in &accepted {
            assert!(store.event(id).await.unwrap().is_some(), "{id} lost");
        }
        let stats = store.stats("q", cases::T0).await.unwrap();
        assert_eq!(stats.ready, accepted.len() as u64);
        // Draining frees space: deliver everything, purge, and enqueue again.
        let claimed = store.claim_due("q", cases::T0, 1000, 60_000).await.unwrap();
        assert_eq!(claimed.len(), accepted.len());
        for c in claimed {
            let d = hookyard::queue::Disposition::Delivered;
            assert!(store
                .complete(&c.event.id, &c.lease_token, None, d, cases::T0)
                .await
                .unwrap());
        }
        assert_eq!(
            store.purge(cases::T0 + 1, cases::T0 + 1).await.unwrap(),
            accepted.len() as u64
        );
        let ev = cases::event("evt_after", "t", "q", cases::T0);
        assert_eq!(
            store.enqueue(ev, None, 1).await.unwrap(),
            EnqueueOutcome::Accepted
        );
        store.close().await.unwrap();
    }

    /// A write that overflows the hard size cap mid-batch (SQLite may then roll back the whole
    /// transaction) fails every job it takes down with `Unavailable`, keeps the depth counter
    /// in step with what was really stored, and leaves the store usable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hard_full_error_mid_batch_rolls_back_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            max_size_bytes: Some(256 * 1024),
            ..SqliteOptions::default()
        };
        let store = Arc::new(open_at(&dir.path().join("full.db"), options));
        for round in 0..5 {
            let mut handles = Vec::new();
            for i in 0..20 {
                let store = Arc::clone(&store);
                let id = format!("evt_{round}_{i:02}");
                let mut ev = cases::event(&id, "t", "q", cases::T0);
                if i == 10 {
                    // Passes the soft check, cannot fit under the hard cap.
                    ev.event.body = bytes::Bytes::from(vec![b'x'; 300 * 1024]);
                }
                handles.push(tokio::spawn(async move {
                    (id, store.enqueue(ev, None, 1_000).await)
                }));
            }
            let mut accepted = 0u64;
            for h in handles {
                match h.await.unwrap() {
                    (id, Ok(EnqueueOutcome::Accepted)) => {
                        assert!(!id.ends_with("_10"));
                        accepted += 1;
                    }
                    (id, Err(StoreError::Unavailable(_))) => {
                        assert!(
                            store.event(&id).await.unwrap().is_none(),
                            "{id} half-stored"
                        )
                    }
                    (_, other) => panic!("unexpected {other:?}"),
                }
            }
            let stats = store.stats("q", cases::T0).await.unwrap();
            // Delivering what was accepted keeps the file small for the next round.
            let claimed = store.claim_due("q", cases::T0, 100, 60_000).await.unwrap();
            assert_eq!(claimed.len() as u64, stats.ready);
            assert!(stats.ready >= accepted);
            for c in claimed {
                let d = hookyard::queue::Disposition::Delivered;
                assert!(store
                    .complete(&c.event.id, &c.lease_token, None, d, cases::T0)
                    .await
                    .unwrap());
            }
        }
        // All delivered: the depth counter must be back at zero, so max_depth 1 admits one.
        let ev = cases::event("evt_last", "t", "q", cases::T0);
        assert_eq!(
            store.enqueue(ev, None, 1).await.unwrap(),
            EnqueueOutcome::Accepted
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn ping_reports_ready_until_closed() {
        let (_dir, store) = fresh();
        store.ping().await.unwrap();
        store.close().await.unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Closed)));
    }
}

/// The same cases against Redis: each test starts its own `redis-server` (AOF on) in a temp
/// dir, or is skipped with a message when none is installed (see `common/redis_server.rs`).
mod redis {
    use std::time::{Duration, Instant};

    use super::redis_server::RedisServer;
    use super::*;
    use hookyard::queue::redis::{RedisOptions, RedisStore};
    use hookyard::queue::{Disposition, DlqFilter, FallbackReason, SignatureScheme};

    /// Options for a store whose keys live under a prefix of its own.
    fn options(prefix: &str) -> RedisOptions {
        RedisOptions {
            key_prefix: prefix.to_owned(),
            ..RedisOptions::default()
        }
    }

    async fn open(server: &RedisServer, options: RedisOptions) -> RedisStore {
        RedisStore::open(&server.url(), options)
            .await
            .expect("open redis store")
    }

    /// A fresh server and a store on it, or `None` when the test is skipped.
    async fn fresh(test: &str) -> Option<(RedisServer, RedisStore)> {
        let server = RedisServer::start(test)?;
        let store = open(&server, options("hy-test")).await;
        Some((server, store))
    }

    /// A raw connection for poking at the server behind the store's back.
    async fn raw(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    macro_rules! redis_cases {
        ($($case:ident),* $(,)?) => {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some((_server, store)) = fresh(concat!("redis::", stringify!($case))).await
                    else {
                        return;
                    };
                    cases::$case(&store).await;
                    let _ = store.close().await;
                }
            )*
        };
    }

    with_cases!(redis_cases!());

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_enqueues_all_durable() {
        let Some((_server, store)) = fresh("redis::concurrent_enqueues_all_durable").await else {
            return;
        };
        cases::concurrent_enqueues_all_durable(Arc::new(store), 200).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_replay_and_purge() {
        let Some((_server, store)) = fresh("redis::bulk_replay_and_purge").await else {
            return;
        };
        cases::bulk_replay_and_purge(Arc::new(store), 2100).await;
    }

    /// An acknowledged enqueue survives hookyard's store being dropped *and* redis-server
    /// being SIGKILLed and restarted (AOF with appendfsync always).
    #[tokio::test]
    async fn durable_across_reopen_and_redis_crash() {
        let Some(server) = RedisServer::start("redis::durable_across_reopen_and_redis_crash")
        else {
            return;
        };
        let server = std::sync::Mutex::new(server);
        let opened = std::sync::atomic::AtomicUsize::new(0);
        cases::durable_across_reopen(|| {
            // The second open follows a crash of Redis itself.
            if opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                server.lock().unwrap().restart();
            }
            let url = server.lock().unwrap().url();
            async move {
                Arc::new(RedisStore::open(&url, options("durable")).await.unwrap())
                    as Arc<dyn Store>
            }
        })
        .await;
    }

    /// Two instances share one queue and one depth limit; each gets its own consumer name.
    #[tokio::test]
    async fn two_instances_share_queue_and_depth() {
        let Some(server) = RedisServer::start("redis::two_instances_share_queue_and_depth") else {
            return;
        };
        let a = open(&server, options("shared")).await;
        let b = open(&server, options("shared")).await;
        assert_ne!(a.consumer(), b.consumer());
        for (store, id) in [(&a, "evt_1"), (&b, "evt_2")] {
            let ev = cases::event(id, "t", "q", cases::T0);
            assert_eq!(
                store.enqueue(ev, None, 2).await.unwrap(),
                EnqueueOutcome::Accepted
            );
        }
        let ev = cases::event("evt_3", "t", "q", cases::T0);
        assert_eq!(
            a.enqueue(ev, None, 2).await.unwrap(),
            EnqueueOutcome::QueueFull
        );
        let got_a = a.claim_due("q", cases::T0, 1, cases::LEASE).await.unwrap();
        let got_b = b.claim_due("q", cases::T0, 10, cases::LEASE).await.unwrap();
        assert_eq!((got_a.len(), got_b.len()), (1, 1));
        assert_ne!(got_a[0].event.id, got_b[0].event.id);
        // Completing through the other instance works: the lease is the token, not the
        // connection.
        assert!(b
            .complete(
                &got_a[0].event.id,
                &got_a[0].lease_token,
                None,
                Disposition::Delivered,
                cases::T0
            )
            .await
            .unwrap());
        // Another store on a different prefix sees nothing.
        let other = open(&server, options("elsewhere")).await;
        assert!(other
            .claim_due("q", cases::T0 + 10 * cases::LEASE as i64, 10, 1)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            other.stats("q", cases::T0).await.unwrap(),
            Default::default()
        );
    }

    /// Events written by an earlier version, whose metadata sat in one hash field each rather
    /// than packed in `m`, are still read, delivered, listed and replayed after an upgrade:
    /// one is ready in the stream (a sync fallback with a content type and a caller key), one
    /// is a dead letter.
    #[tokio::test]
    async fn events_in_the_per_field_layout_are_read_after_an_upgrade() {
        let Some(server) =
            RedisServer::start("redis::events_in_the_per_field_layout_are_read_after_an_upgrade")
        else {
            return;
        };
        let mut conn = raw(&server).await;
        let t0 = cases::T0;
        let ev = |id: &str| format!("{{old}}:ev:{id}");
        let q = |suffix: &str| format!("{{old}}:q:default:{suffix}");
        let legacy = |id: &str, event_type: &str| {
            vec![
                ("type", event_type.to_owned()),
                ("queue", "default".to_owned()),
                ("target", format!("http://127.0.0.1:9000/{event_type}")),
                ("trace", format!("trace-{id}")),
                ("sig", "legacy_hmac_sha256".to_owned()),
                ("timeout", "1500".to_owned()),
                ("delays", "[500,1000]".to_owned()),
                ("jitter", "0.2".to_owned()),
                ("recv", t0.to_string()),
                ("due", t0.to_string()),
            ]
        };
        let sid: String = ::redis::cmd("XADD")
            .arg(q("ready"))
            .arg("*")
            .arg("id")
            .arg("evt_ready")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut ready = legacy("evt_ready", "user.updated");
        ready.extend([
            ("made", "0".to_owned()),
            ("ct", "application/json".to_owned()),
            ("ikey", "caller-key".to_owned()),
            ("fb", "timeout".to_owned()),
            ("state", "r".to_owned()),
            ("sid", sid),
        ]);
        let member = format!("{:020}:evt_dead", t0 + 5);
        let mut dead = legacy("evt_dead", "user.deleted");
        dead.extend([
            ("made", "1".to_owned()),
            (
                "last",
                r#"{"started_at_ms":1700000000001,"latency_ms":3,"status":400}"#.to_owned(),
            ),
            ("state", "x".to_owned()),
            ("dla", (t0 + 5).to_string()),
            ("dlr", "non_retryable_status".to_owned()),
            ("dlm", member.clone()),
        ]);
        let mut pipe = ::redis::pipe();
        for (id, fields, body) in [
            ("evt_ready", &ready, &[0u8, 0xff, 1][..]),
            ("evt_dead", &dead, &b"gone"[..]),
        ] {
            pipe.cmd("HSET")
                .arg(ev(id))
                .arg(fields)
                .arg("body")
                .arg(body)
                .ignore();
        }
        let _: () = pipe
            .cmd("ZADD")
            .arg("{old}:fallbacks")
            .arg(t0)
            .arg("evt_ready")
            .ignore()
            .cmd("ZADD")
            .arg("{old}:dlq")
            .arg(0)
            .arg(&member)
            .ignore()
            .cmd("SET")
            .arg(q("depth"))
            .arg(1)
            .ignore()
            .cmd("SET")
            .arg(q("dead"))
            .arg(1)
            .ignore()
            // Attempts were a list of their own then.
            .cmd("RPUSH")
            .arg("{old}:att:evt_dead")
            .arg(r#"1|{"started_at_ms":1700000000001,"latency_ms":3,"status":400}"#)
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();

        let store = open(&server, options("old")).await;
        let rec = store.event("evt_ready").await.unwrap().unwrap();
        assert_eq!(rec.event_type, "user.updated");
        assert_eq!(rec.target, "http://127.0.0.1:9000/user.updated");
        assert_eq!(rec.trace_id, "trace-evt_ready");
        assert_eq!(rec.received_at_ms, t0);
        assert_eq!(rec.fallback, Some(FallbackReason::Timeout));
        let fallbacks = store.fallbacks(0, 10).await.unwrap();
        assert_eq!(fallbacks.len(), 1);
        assert_eq!(fallbacks[0].event_type, "user.updated");
        assert_eq!(fallbacks[0].trace_id, "trace-evt_ready");

        let got = store
            .claim_due("default", t0 + 1, 10, cases::LEASE)
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        let c = &got[0];
        assert_eq!(c.event.id, "evt_ready");
        assert_eq!(c.event.event_type, "user.updated");
        assert_eq!(&c.event.body[..], &[0u8, 0xff, 1][..]);
        assert_eq!(c.event.content_type.as_deref(), Some("application/json"));
        assert_eq!(c.event.trace_id, "trace-evt_ready");
        assert_eq!(c.event.idempotency_key.as_deref(), Some("caller-key"));
        assert_eq!(c.target, "http://127.0.0.1:9000/user.updated");
        assert_eq!(c.signature, SignatureScheme::LegacyHmacSha256);
        assert_eq!((c.timeout_ms, c.attempt), (1500, 1));
        assert_eq!(c.retry_delays_ms, vec![500, 1000]);
        assert!((c.jitter - 0.2).abs() < 1e-9);
        assert!(store
            .complete(
                &c.event.id,
                &c.lease_token,
                None,
                Disposition::Delivered,
                t0 + 2
            )
            .await
            .unwrap());

        let page = store
            .list_dead_letters(DlqFilter::default(), None, 10)
            .await
            .unwrap();
        assert_eq!(page.items.len(), 1);
        let d = &page.items[0];
        assert_eq!(
            (d.id.as_str(), d.event_type.as_str()),
            ("evt_dead", "user.deleted")
        );
        assert_eq!((d.attempts, d.last_status), (1, Some(400)));
        assert_eq!((d.received_at_ms, d.dead_lettered_at_ms), (t0, t0 + 5));
        assert_eq!(
            store
                .replay(vec!["evt_dead".into()], t0 + 10)
                .await
                .unwrap(),
            vec!["evt_dead".to_owned()]
        );
        let again = store
            .claim_due("default", t0 + 10, 10, cases::LEASE)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].event.event_type, "user.deleted");
        assert_eq!(&again[0].event.body[..], b"gone");
        assert_eq!(again[0].attempt, 1);
        assert!(store
            .complete(
                "evt_dead",
                &again[0].lease_token,
                Some(cases::attempt(1, t0 + 11, Some(204), None)),
                Disposition::Delivered,
                t0 + 11
            )
            .await
            .unwrap());
        // The history keeps the attempt from the old list, then the new one.
        let rec = store.event("evt_dead").await.unwrap().unwrap();
        let history: Vec<_> = rec
            .attempts
            .iter()
            .map(|a| (a.attempt, a.started_at_ms, a.status))
            .collect();
        assert_eq!(
            history,
            [(1, 1_700_000_000_001, Some(400)), (1, t0 + 11, Some(204))]
        );
        let _ = store.close().await;
    }

    /// A crashed instance's lease is taken over after `claim_idle_ms` of idleness on Redis's
    /// clock (XAUTOCLAIM), long before its own (caller-clock) lease would run out; the crashed
    /// instance's late completion is then ignored.
    #[tokio::test]
    async fn idle_lease_of_crashed_instance_is_reclaimed() {
        let Some(server) = RedisServer::start("redis::idle_lease_of_crashed_instance_is_reclaimed")
        else {
            return;
        };
        let idle = RedisOptions {
            claim_idle_ms: 300,
            ..options("idle")
        };
        let crashed = open(&server, idle.clone()).await;
        let survivor = open(&server, idle).await;
        let ev = cases::event("evt_1", "t", "q", cases::T0);
        crashed.enqueue(ev, None, u64::MAX).await.unwrap();
        let lost = crashed
            .claim_due("q", cases::T0, 10, 3_600_000)
            .await
            .unwrap();
        assert_eq!(lost.len(), 1);
        // Not idle long enough yet.
        assert!(survivor
            .claim_due("q", cases::T0 + 1, 10, 60_000)
            .await
            .unwrap()
            .is_empty());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let taken = survivor
            .claim_due("q", cases::T0 + 2, 10, 60_000)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].event.id, "evt_1");
        assert_eq!(taken[0].attempt, 1);
        assert!(!crashed
            .complete(
                "evt_1",
                &lost[0].lease_token,
                None,
                Disposition::Delivered,
                cases::T0 + 3
            )
            .await
            .unwrap());
        assert!(survivor
            .complete(
                "evt_1",
                &taken[0].lease_token,
                None,
                Disposition::Delivered,
                cases::T0 + 3
            )
            .await
            .unwrap());
    }

    /// The scan for idle entries walks every entry in flight, so an instance runs it once per
    /// quarter of `claim_idle_ms`, not on every claim; a survivor that claims all the time
    /// still takes over, and a scan cut short by the claim's limit carries on at the next
    /// claim instead of waiting out the interval.
    #[tokio::test]
    async fn idle_scan_is_throttled_but_takeover_still_comes() {
        let Some(server) =
            RedisServer::start("redis::idle_scan_is_throttled_but_takeover_still_comes")
        else {
            return;
        };
        let conn = raw(&server).await;
        let scans = |mut conn: ::redis::aio::MultiplexedConnection| async move {
            let info: String = ::redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_xautoclaim:calls="))
                .map_or(0, |rest| {
                    rest.split(',').next().unwrap().parse::<u64>().unwrap()
                })
        };

        // Default claim_idle_ms (30 s): five claims in a row scan once.
        let busy = open(&server, options("busy")).await;
        busy.enqueue(cases::event("evt_b", "t", "q", cases::T0), None, u64::MAX)
            .await
            .unwrap();
        for i in 0..5 {
            busy.claim_due("q", cases::T0 + i, 10, 60_000)
                .await
                .unwrap();
        }
        assert_eq!(scans(conn.clone()).await, 1);

        let idle = RedisOptions {
            claim_idle_ms: 300,
            ..options("idle")
        };
        let crashed = open(&server, idle.clone()).await;
        let survivor = open(&server, idle).await;
        for id in ["evt_1", "evt_2", "evt_3"] {
            crashed
                .enqueue(cases::event(id, "t", "q", cases::T0), None, u64::MAX)
                .await
                .unwrap();
        }
        // Taken before the lease, so the takeover's time since `start` is at least the
        // idleness Redis measured since the lease.
        let start = std::time::Instant::now();
        let lost = crashed
            .claim_due("q", cases::T0, 10, 3_600_000)
            .await
            .unwrap();
        assert_eq!(lost.len(), 3);
        // The survivor claims one at a time, every 10 ms, until the first is taken over.
        let mut taken = Vec::new();
        while taken.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "no takeover while claiming continuously"
            );
            taken = survivor
                .claim_due("q", cases::T0 + 1, 1, 60_000)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(300));
        // That scan stopped at the limit: the next claims carry on at once.
        for _ in 0..2 {
            let more = survivor
                .claim_due("q", cases::T0 + 2, 1, 60_000)
                .await
                .unwrap();
            assert_eq!(more.len(), 1);
            taken.extend(more);
        }
        let mut ids: Vec<&str> = taken.iter().map(|c| c.event.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["evt_1", "evt_2", "evt_3"]);
    }

    /// A Redis that lost the consumer groups (NOGROUP) is repaired on the next claim, without
    /// handing out an event that is still leased and without losing a ready one.
    #[tokio::test]
    async fn lost_consumer_group_is_recreated() {
        let Some((server, store)) = fresh("redis::lost_consumer_group_is_recreated").await else {
            return;
        };
        for id in ["evt_1", "evt_2"] {
            store
                .enqueue(cases::event(id, "t", "q", cases::T0), None, u64::MAX)
                .await
                .unwrap();
        }
        let leased = store
            .claim_due("q", cases::T0, 1, cases::LEASE)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        let mut conn = raw(&server).await;
        let stream = format!("{}:q:q:ready", store.prefix());
        let destroyed: i64 = ::redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&stream)
            .arg("hookyard")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(destroyed, 1);
        let next = store
            .claim_due("q", cases::T0, 10, cases::LEASE)
            .await
            .unwrap();
        let ids: Vec<&str> = next.iter().map(|c| c.event.id.as_str()).collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_ne!(
            ids[0], leased[0].event.id,
            "a leased event was handed out again"
        );
        for c in leased.iter().chain(&next) {
            assert!(store
                .complete(
                    &c.event.id,
                    &c.lease_token,
                    None,
                    Disposition::Delivered,
                    cases::T0 + 1
                )
                .await
                .unwrap());
        }
        let stats = store.stats("q", cases::T0 + 1).await.unwrap();
        assert_eq!((stats.ready, stats.in_flight), (0, 0));
    }

    /// Nothing listens: every call fails `Unavailable` quickly (no hang), `ping` included.
    #[tokio::test]
    async fn unreachable_redis_is_unavailable_quickly() {
        let Some(server) = RedisServer::start("redis::unreachable_redis_is_unavailable_quickly")
        else {
            return;
        };
        let mut server = server;
        let store = open(&server, options("down")).await;
        store.ping().await.unwrap();
        server.kill();
        let started = Instant::now();
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        let ev = cases::event("evt_1", "t", "q", cases::T0);
        assert!(matches!(
            store.enqueue(ev, None, u64::MAX).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.claim_due("q", cases::T0, 10, 1000).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        // And it comes back by itself once Redis does.
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.ping().await.is_err() {
            assert!(Instant::now() < deadline, "store did not reconnect");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ev = cases::event("evt_2", "t", "q", cases::T0);
        assert_eq!(
            store.enqueue(ev, None, u64::MAX).await.unwrap(),
            EnqueueOutcome::Accepted
        );
    }

    /// `wait_replicas` with no replica attached: the event is not acknowledged as durable, but
    /// the primary holds it (and will deliver it), so its outcome is unknown, not "not stored".
    #[tokio::test]
    async fn wait_replicas_without_replicas_is_an_unknown_outcome() {
        let Some(server) =
            RedisServer::start("redis::wait_replicas_without_replicas_is_an_unknown_outcome")
        else {
            return;
        };
        let store = open(
            &server,
            RedisOptions {
                wait_replicas: 1,
                wait_timeout_ms: 100,
                ..options("wait")
            },
        )
        .await;
        let ev = cases::event("evt_1", "t", "q", cases::T0);
        match store.enqueue(ev, None, u64::MAX).await {
            Err(StoreError::OutcomeUnknown(msg)) => assert!(msg.contains("replicas"), "{msg}"),
            other => panic!("expected OutcomeUnknown, got {other:?}"),
        }
        assert!(store.event("evt_1").await.unwrap().is_some());
    }

    /// Every key the store writes carries the prefix as a hash tag (one cluster slot).
    #[tokio::test]
    async fn every_key_is_prefixed() {
        let Some((server, store)) = fresh("redis::every_key_is_prefixed").await else {
            return;
        };
        cases::fallback_recorded_and_reconciled(&store).await;
        let mut conn = raw(&server).await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        for k in keys {
            assert!(k.starts_with("{hy-test}:"), "{k}");
        }
    }

    #[tokio::test]
    async fn ping_reports_ready_until_closed() {
        let Some((_server, store)) = fresh("redis::ping_reports_ready_until_closed").await else {
            return;
        };
        store.ping().await.unwrap();
        store.close().await.unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Closed)));
    }
}

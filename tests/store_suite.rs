//! The behavioural suite for [`Store`] backends.
//!
//! `cases` holds backend-agnostic cases; each backend gets a module here that opens a fresh
//! store per case and runs every case against it, plus tests of its own specifics. A new
//! backend (Redis) adds a module with the same `store_cases!` list.

#[path = "store_suite/cases.rs"]
mod cases;

use std::path::Path;
use std::sync::Arc;

use hookyard::queue::sqlite::{SqliteOptions, SqliteStore};
use hookyard::queue::{EnqueueOutcome, Store, StoreError};
use tempfile::TempDir;

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

    store_cases!(fresh;
        enqueue_claim_complete_delivered,
        due_time_is_exact_to_the_millisecond,
        lease_expiry_reclaims_and_ignores_stale_token,
        retry_reschedules_and_counts_attempts,
        defer_does_not_count_an_attempt,
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
    );

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
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1);
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
                ev.body = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
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
                .complete(&c.id, &c.lease_token, None, d, cases::T0)
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
                    ev.body = bytes::Bytes::from(vec![b'x'; 300 * 1024]);
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
                    .complete(&c.id, &c.lease_token, None, d, cases::T0)
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

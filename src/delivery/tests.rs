//! The delivery loop against a real SQLite store and a real receiver.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::context::Context;
use crate::dispatcher::{Dispatcher, Outcome};
use crate::event::Event;
use crate::queue::*;
use crate::receive::{Receiver, ReceiverConfig};

/// A real store whose `next_due_at`, once armed, pauses after reading its answer until the
/// test releases it: the window between a worker's look at the queue and its wait, held open.
struct PausedAfterNextDue {
    inner: Arc<dyn Store>,
    armed: AtomicBool,
    reached: Notify,
    release: Notify,
}

impl Queue for PausedAfterNextDue {
    fn enqueue(
        &self,
        event: NewEvent,
        idempotency: Option<IdempotencyClaim>,
        max_depth: u64,
    ) -> StoreFuture<'_, EnqueueOutcome> {
        self.inner.enqueue(event, idempotency, max_depth)
    }
    fn find_idempotent(
        &self,
        event_type: &str,
        key: &str,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, Option<String>> {
        self.inner.find_idempotent(event_type, key, now_ms)
    }
    fn claim_due(
        &self,
        queue: &str,
        now_ms: UnixMillis,
        limit: usize,
        lease_ms: u64,
    ) -> StoreFuture<'_, Vec<ClaimedEvent>> {
        self.inner.claim_due(queue, now_ms, limit, lease_ms)
    }
    fn next_due_at(&self, queue: &str) -> StoreFuture<'_, Option<UnixMillis>> {
        let queue = queue.to_string();
        Box::pin(async move {
            let answer = self.inner.next_due_at(&queue).await;
            if self.armed.swap(false, Ordering::SeqCst) {
                self.reached.notify_one();
                self.release.notified().await;
            }
            answer
        })
    }
    fn complete(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, bool> {
        self.inner
            .complete(event_id, lease_token, attempt, disposition, now_ms)
    }
    fn undefer(&self, host: &str, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        self.inner.undefer(host, now_ms)
    }
    fn undefer_all(&self, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        self.inner.undefer_all(now_ms)
    }
    fn release(&self, leases: Vec<(String, String)>, now_ms: UnixMillis) -> StoreFuture<'_, ()> {
        self.inner.release(leases, now_ms)
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        self.inner.ping()
    }
    fn close(&self) -> StoreFuture<'_, ()> {
        self.inner.close()
    }
}

impl Ledger for PausedAfterNextDue {
    fn event(&self, event_id: &str) -> StoreFuture<'_, Option<EventRecord>> {
        self.inner.event(event_id)
    }
    fn list_dead_letters(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<DeadLetter>> {
        self.inner.list_dead_letters(filter, cursor, limit)
    }
    fn dead_letter_ids(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<String>> {
        self.inner.dead_letter_ids(filter, cursor, limit)
    }
    fn replay(&self, event_ids: Vec<String>, now_ms: UnixMillis) -> StoreFuture<'_, Vec<String>> {
        self.inner.replay(event_ids, now_ms)
    }
    fn replay_matching(&self, filter: DlqFilter, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        self.inner.replay_matching(filter, now_ms)
    }
    fn fallbacks(
        &self,
        since_ms: UnixMillis,
        limit: usize,
    ) -> StoreFuture<'_, Vec<FallbackRecord>> {
        self.inner.fallbacks(since_ms, limit)
    }
    fn purge(&self, before_ms: UnixMillis, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        self.inner.purge(before_ms, now_ms)
    }
    fn stats(&self, queue: &str, now_ms: UnixMillis) -> StoreFuture<'_, QueueStats> {
        self.inner.stats(queue, now_ms)
    }
}

#[tokio::test]
async fn an_event_enqueued_while_an_idle_worker_decides_to_wait_wakes_it() {
    let receiver = Receiver::bind("127.0.0.1:0".parse().unwrap(), ReceiverConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore: {{ kind: sqlite, path: {} }}\nsigning:\n  secrets: [\"{}\"]\nqueues:\n  default: {{ concurrency: 1 }}\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://{}/a\n",
        dir.path().join("hookyard.db").display(),
        crate::config::DEVELOPMENT_SECRET,
        receiver.local_addr()
    );
    let path = dir.path().join("config.yaml");
    let settings = crate::config::load_from_bytes(&path, yaml.as_bytes()).unwrap();
    let inner = crate::queue::open(&settings.store).await.unwrap();
    let store = Arc::new(PausedAfterNextDue {
        inner,
        armed: AtomicBool::new(true),
        reached: Notify::new(),
        release: Notify::new(),
    });
    let ctx = Context::new(settings, store.clone());
    let dispatcher = Dispatcher::new(ctx.clone());
    let (stop, stopped) = watch::channel(false);
    let workers = tokio::spawn(super::run(ctx, stopped));

    // The worker found nothing to claim, read "nothing due", and is about to wait.
    store.reached.notified().await;
    let event = Event::new(
        "a".into(),
        Bytes::from_static(b"{}"),
        None,
        "t".into(),
        None,
    );
    assert!(matches!(
        dispatcher.dispatch(event).await,
        Outcome::Accepted { .. }
    ));
    let enqueued_at = Instant::now();
    store.release.notify_one();
    while receiver.stats().delivered_ok == 0 {
        assert!(
            enqueued_at.elapsed() < Duration::from_secs(5),
            "never delivered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waited = enqueued_at.elapsed();
    assert!(
        waited < super::MAX_IDLE / 2,
        "delivered after {waited:?}: the enqueue's wake-up was lost and the worker slept"
    );
    let _ = stop.send(true);
    let _ = workers.await;
}

#[test]
fn workers_grow_at_once_and_shrink_as_deliveries_in_flight_give_back_their_slots() {
    let mut workers = super::Workers::new(2);
    let held: Vec<_> = (0..2)
        .map(|_| workers.slots.clone().try_acquire_owned().unwrap())
        .collect();
    assert_eq!(workers.free(), 0);

    assert!(workers.resize(5));
    assert_eq!(workers.free(), 3, "three more at once");

    assert!(workers.resize(1));
    assert_eq!(workers.free(), 0, "the three free slots are retired");
    drop(held);
    assert_eq!(
        workers.free(),
        1,
        "of the two given back, one is retired and one stays"
    );

    // Growing again while slots are still owed cancels what is owed first.
    let held = workers.slots.clone().try_acquire_owned().unwrap();
    assert!(workers.resize(0));
    assert!(workers.resize(3));
    assert_eq!(workers.free(), 2);
    drop(held);
    assert_eq!(workers.free(), 3);
}

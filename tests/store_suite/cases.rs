//! Backend-agnostic behavioural cases for [`Store`].
//!
//! Every case takes a freshly opened, empty store and drives the clock itself through the
//! `now_ms` arguments, so it runs unchanged against SQLite, Redis or anything else that
//! implements the trait. Nothing here may depend on one backend's internals: a backend's own
//! tests (batching, file layout) live next to its runner in `store_suite.rs`.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use hookyard::queue::{
    AttemptRecord, ClaimedEvent, Disposition, DlqFilter, EnqueueOutcome, Event, EventState,
    FallbackReason, IdempotencyClaim, KeySequence, NewEvent, QueueStats, Reconciliation,
    SignatureScheme, Store, StoreError, UnixMillis, LEASE_EXPIRED_REASON, MAX_LEASE_EXPIRIES,
};

/// An arbitrary fixed epoch for the test clock.
pub const T0: UnixMillis = 1_700_000_000_000;
/// Lease length used by the cases.
pub const LEASE: u64 = 30_000;
/// A depth limit that never binds.
pub const NO_LIMIT: u64 = u64::MAX;

/// A body that is not UTF-8, so a backend that mangles bytes is caught.
pub fn body_of(id: &str) -> Bytes {
    let mut b = vec![0u8, 0xff, 0xfe];
    b.extend_from_slice(id.as_bytes());
    Bytes::from(b)
}

/// An event received at `at` and due at once.
pub fn event(id: &str, event_type: &str, queue: &str, at: UnixMillis) -> NewEvent {
    NewEvent {
        event: Event {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            body: body_of(id),
            content_type: Some("application/json".to_owned()),
            trace_id: format!("trace-{id}"),
            idempotency_key: None,
        },
        queue: queue.to_owned(),
        target: format!("http://127.0.0.1:9000/hooks/{event_type}"),
        signature: SignatureScheme::StandardWebhooks,
        timeout_ms: 1500,
        retry_delays_ms: vec![500, 1000, 2000],
        jitter: 0.2,
        received_at_ms: at,
        due_at_ms: at,
        fallback: None,
        ordering_key: None,
    }
}

/// An attempt record as a worker would report it.
pub fn attempt(n: u32, at: UnixMillis, status: Option<u16>, error: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        attempt: n,
        started_at_ms: at,
        latency_ms: 12,
        status,
        error: error.map(str::to_owned),
    }
}

async fn enqueue_ok(store: &dyn Store, ev: NewEvent) {
    let id = ev.event.id.clone();
    let outcome = store.enqueue(ev, None, NO_LIMIT).await.unwrap();
    assert_eq!(outcome, EnqueueOutcome::Accepted, "enqueue {id}");
}

async fn claim(store: &dyn Store, queue: &str, now: UnixMillis) -> Vec<ClaimedEvent> {
    store.claim_due(queue, now, 100, LEASE).await.unwrap()
}

async fn claim_one(store: &dyn Store, queue: &str, now: UnixMillis) -> ClaimedEvent {
    let mut got = claim(store, queue, now).await;
    assert_eq!(
        got.len(),
        1,
        "expected exactly one due event at {now}: {got:?}"
    );
    got.remove(0)
}

fn ids(events: &[ClaimedEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.id.as_str()).collect()
}

/// Enqueues `ev`, claims it at `at` and dead-letters it at `at` after one failed attempt.
async fn dead_letter(store: &dyn Store, ev: NewEvent, at: UnixMillis) {
    let queue = ev.queue.clone();
    let id = ev.event.id.clone();
    enqueue_ok(store, ev).await;
    let c = claim_one(store, &queue, at).await;
    assert_eq!(c.event.id, id);
    let done = store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(c.attempt, at, Some(400), None)),
            Disposition::DeadLetter {
                reason: "permanent_4xx".into(),
            },
            at,
        )
        .await
        .unwrap();
    assert!(done);
}

fn dlq_ids(page: &hookyard::queue::Page<hookyard::queue::DeadLetter>) -> Vec<&str> {
    page.items.iter().map(|d| d.id.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------

/// The happy path: everything the worker needs comes back intact, and delivery is final.
pub async fn enqueue_claim_complete_delivered(store: &dyn Store) {
    let mut ev = event("evt_1", "user.created", "default", T0);
    ev.event.idempotency_key = Some("caller-key".into());
    ev.signature = SignatureScheme::LegacyHmacSha256;
    enqueue_ok(store, ev.clone()).await;

    let c = claim_one(store, "default", T0).await;
    assert_eq!(c.event.id, "evt_1");
    assert_eq!(c.event.event_type, "user.created");
    assert_eq!(c.queue, "default");
    assert_eq!(c.target, ev.target);
    assert_eq!(c.event.body, ev.event.body);
    assert_eq!(c.event.content_type.as_deref(), Some("application/json"));
    assert_eq!(c.event.trace_id, "trace-evt_1");
    assert_eq!(c.event.idempotency_key.as_deref(), Some("caller-key"));
    assert_eq!(c.signature, SignatureScheme::LegacyHmacSha256);
    assert_eq!(c.timeout_ms, 1500);
    assert_eq!(c.retry_delays_ms, vec![500, 1000, 2000]);
    assert!((c.jitter - 0.2).abs() < 1e-9);
    assert_eq!(c.attempt, 1);
    assert_eq!(c.lease_until_ms, T0 + LEASE as i64);
    assert!(!c.lease_token.is_empty());

    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::InFlight);

    let done = store
        .complete(
            "evt_1",
            &c.lease_token,
            Some(attempt(1, T0, Some(200), None)),
            Disposition::Delivered,
            T0 + 20,
        )
        .await
        .unwrap();
    assert!(done);

    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Delivered);
    assert_eq!(rec.delivered_at_ms, Some(T0 + 20));
    assert_eq!(rec.due_at_ms, None);
    assert_eq!(rec.attempts.len(), 1);
    // Delivered is final: never handed out again, and a second completion is refused.
    assert!(claim(store, "default", T0 + 10 * LEASE as i64)
        .await
        .is_empty());
    let again = store
        .complete(
            "evt_1",
            &c.lease_token,
            None,
            Disposition::Delivered,
            T0 + 30,
        )
        .await
        .unwrap();
    assert!(!again);
    assert!(store.event("evt_unknown").await.unwrap().is_none());
}

/// Due times are exact to the millisecond, and claims come oldest-due first.
pub async fn due_time_is_exact_to_the_millisecond(store: &dyn Store) {
    let mut late = event("evt_late", "t", "default", T0);
    late.due_at_ms = T0 + 250;
    let mut early = event("evt_early", "t", "default", T0);
    early.due_at_ms = T0 + 100;
    enqueue_ok(store, late).await;
    enqueue_ok(store, early).await;

    assert!(claim(store, "default", T0 + 99).await.is_empty());
    assert_eq!(store.next_due_at("default").await.unwrap(), Some(T0 + 100));
    let c = claim_one(store, "default", T0 + 100).await;
    assert_eq!(c.event.id, "evt_early");
    assert!(claim(store, "default", T0 + 249).await.is_empty());
    assert_eq!(ids(&claim(store, "default", T0 + 250).await), ["evt_late"]);

    // Order across several due events, and the limit.
    for (id, due) in [("evt_c", 30), ("evt_a", 10), ("evt_b", 20)] {
        let mut ev = event(id, "t", "ordered", T0);
        ev.due_at_ms = T0 + due;
        enqueue_ok(store, ev).await;
    }
    let first = store
        .claim_due("ordered", T0 + 100, 2, LEASE)
        .await
        .unwrap();
    assert_eq!(ids(&first), ["evt_a", "evt_b"]);
    assert_eq!(ids(&claim(store, "ordered", T0 + 100).await), ["evt_c"]);
    assert!(store
        .claim_due("ordered", T0 + 100, 0, LEASE)
        .await
        .unwrap()
        .is_empty());
}

/// A lease token is bound to the one event it was issued for: another event's token, or a
/// token with its random part changed, completes nothing.
pub async fn a_lease_token_completes_only_its_own_event(store: &dyn Store) {
    enqueue_ok(store, event("evt_a", "t", "default", T0)).await;
    enqueue_ok(store, event("evt_b", "t", "default", T0)).await;
    let claimed = claim(store, "default", T0).await;
    assert_eq!(ids(&claimed), ["evt_a", "evt_b"]);
    let (a, b) = (&claimed[0], &claimed[1]);
    let complete = |id: &'static str, token: String| async move {
        store
            .complete(
                id,
                &token,
                Some(attempt(1, T0, Some(200), None)),
                Disposition::Delivered,
                T0 + 1,
            )
            .await
            .unwrap()
    };
    assert!(
        !complete("evt_a", b.lease_token.clone()).await,
        "b's token on a"
    );
    assert!(
        !complete("evt_b", a.lease_token.clone()).await,
        "a's token on b"
    );
    let mut forged = a.lease_token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    assert!(
        !complete("evt_a", forged).await,
        "a's token with one digit changed"
    );
    assert_eq!(
        store.event("evt_a").await.unwrap().unwrap().state,
        EventState::InFlight
    );
    assert!(complete("evt_a", a.lease_token.clone()).await);
    assert!(complete("evt_b", b.lease_token.clone()).await);
    assert_eq!(
        store.event("evt_b").await.unwrap().unwrap().state,
        EventState::Delivered
    );
}

/// A delivery that kills its worker every time never reports a result, so its retry matrix
/// never runs out. After `MAX_LEASE_EXPIRIES` leases in a row ran out, the claim that finds the
/// last one dead-letters the event instead; any result in between starts the count again.
pub async fn leases_that_keep_running_out_dead_letter_the_event(store: &dyn Store) {
    const LEASE_MS: u64 = 1000;
    let max = i64::from(MAX_LEASE_EXPIRIES);
    enqueue_ok(store, event("evt_poison", "t", "default", T0)).await;
    enqueue_ok(store, event("evt_flaky", "t", "default", T0)).await;
    let claim_at =
        |at: UnixMillis| async move { store.claim_due("default", at, 10, LEASE_MS).await.unwrap() };
    // The first claim, then MAX - 1 reclaims of expired leases: still handed out.
    let mut flaky_token = String::new();
    for i in 0..max {
        let got = claim_at(T0 + i * LEASE_MS as i64).await;
        let mut got_ids = ids(&got);
        got_ids.sort();
        assert_eq!(got_ids, ["evt_flaky", "evt_poison"], "claim {i}");
        let flaky = got.iter().find(|c| c.event.id == "evt_flaky").unwrap();
        flaky_token = flaky.lease_token.clone();
    }
    // evt_flaky reports a result (a retry due at once): its count starts again.
    let at = T0 + (max - 1) * LEASE_MS as i64 + 1;
    assert!(store
        .complete(
            "evt_flaky",
            &flaky_token,
            Some(attempt(1, at, Some(503), None)),
            Disposition::Retry { due_at_ms: at },
            at,
        )
        .await
        .unwrap());

    // The MAX-th expiry of evt_poison's lease: dead-lettered, not handed out again.
    let at = T0 + max * LEASE_MS as i64;
    let got = claim_at(at).await;
    assert_eq!(ids(&got), ["evt_flaky"]);
    let poison = store.event("evt_poison").await.unwrap().unwrap();
    assert_eq!(poison.state, EventState::DeadLettered);
    let last = poison
        .attempts
        .last()
        .expect("the expiry is recorded as an attempt");
    assert_eq!(last.error.as_deref(), Some(LEASE_EXPIRED_REASON));
    let dlq = store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dlq_ids(&dlq), ["evt_poison"]);
    assert_eq!(dlq.items[0].reason, LEASE_EXPIRED_REASON);
    assert_eq!(dlq.items[0].dead_lettered_at_ms, at);
    let stats = store.stats("default", at).await.unwrap();
    assert_eq!((stats.dead_lettered, stats.in_flight), (1, 1));

    // evt_flaky's leases run out MAX - 1 more times: still below the limit.
    for i in 1..max {
        let got = claim_at(at + i * LEASE_MS as i64).await;
        assert_eq!(ids(&got), ["evt_flaky"], "reclaim {i} after the result");
    }

    // A replay starts the count again too.
    assert_eq!(
        store
            .replay(vec!["evt_poison".to_owned()], at)
            .await
            .unwrap(),
        ["evt_poison"]
    );
    let got = claim_at(at + max * LEASE_MS as i64).await;
    assert!(ids(&got).contains(&"evt_poison"), "{:?}", ids(&got));
}

/// A lease that runs out makes the event claimable again (at exactly the expiry), and the
/// first worker's late completion is ignored.
pub async fn lease_expiry_reclaims_and_ignores_stale_token(store: &dyn Store) {
    enqueue_ok(store, event("evt_1", "t", "default", T0)).await;
    let first = store.claim_due("default", T0, 10, 1000).await.unwrap();
    assert_eq!(ids(&first), ["evt_1"]);
    let first = &first[0];

    assert!(store
        .claim_due("default", T0 + 999, 10, 1000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.next_due_at("default").await.unwrap(), Some(T0 + 1000));
    let second = store
        .claim_due("default", T0 + 1000, 10, 1000)
        .await
        .unwrap();
    assert_eq!(ids(&second), ["evt_1"]);
    let second = &second[0];
    assert_ne!(first.lease_token, second.lease_token);
    // The crashed worker's attempt was never reported, so it is not counted.
    assert_eq!(second.attempt, 1);

    let stale = store
        .complete(
            "evt_1",
            &first.lease_token,
            Some(attempt(1, T0, Some(200), None)),
            Disposition::Delivered,
            T0 + 1001,
        )
        .await
        .unwrap();
    assert!(!stale, "a stale lease token must not complete the event");
    assert_eq!(
        store.event("evt_1").await.unwrap().unwrap().state,
        EventState::InFlight
    );
    let fresh = store
        .complete(
            "evt_1",
            &second.lease_token,
            Some(attempt(1, T0 + 1000, Some(200), None)),
            Disposition::Delivered,
            T0 + 1002,
        )
        .await
        .unwrap();
    assert!(fresh);
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Delivered);
    assert_eq!(rec.attempts.len(), 1);
}

/// `Retry` puts the event back at the given time and counts the attempt.
pub async fn retry_reschedules_and_counts_attempts(store: &dyn Store) {
    enqueue_ok(store, event("evt_1", "t", "default", T0)).await;
    let mut now = T0;
    for (n, delay) in [(1u32, 500i64), (2, 1000)] {
        let c = claim_one(store, "default", now).await;
        assert_eq!(c.attempt, n);
        let due = now + delay;
        assert!(store
            .complete(
                &c.event.id,
                &c.lease_token,
                Some(attempt(n, now, Some(503), None)),
                Disposition::Retry { due_at_ms: due },
                now + 5,
            )
            .await
            .unwrap());
        let rec = store.event("evt_1").await.unwrap().unwrap();
        assert_eq!(rec.state, EventState::Pending);
        assert_eq!(rec.due_at_ms, Some(due));
        assert!(claim(store, "default", due - 1).await.is_empty());
        // The old token is dead once the event is back in the queue.
        assert!(!store
            .complete(
                &c.event.id,
                &c.lease_token,
                None,
                Disposition::Delivered,
                due
            )
            .await
            .unwrap());
        now = due;
    }
    let c = claim_one(store, "default", now).await;
    assert_eq!(c.attempt, 3);
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(3, now, None, Some("timeout"))),
            Disposition::Delivered,
            now + 1,
        )
        .await
        .unwrap());
    let rec = store.event("evt_1").await.unwrap().unwrap();
    let numbers: Vec<u32> = rec.attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, [1, 2, 3]);
}

/// `Defer` (breaker open, shed) reschedules without spending an attempt or recording one.
pub async fn defer_does_not_count_an_attempt(store: &dyn Store) {
    enqueue_ok(store, event("evt_1", "t", "default", T0)).await;
    let c = claim_one(store, "default", T0).await;
    assert_eq!(c.attempt, 1);
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            // Even if a worker passes a record, a deferral is not an attempt.
            Some(attempt(1, T0, None, Some("circuit_open"))),
            Disposition::Defer {
                due_at_ms: T0 + 100,
                breaker: None,
            },
            T0,
        )
        .await
        .unwrap());
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Pending);
    assert_eq!(rec.due_at_ms, Some(T0 + 100));
    assert!(rec.attempts.is_empty());
    assert!(claim(store, "default", T0 + 99).await.is_empty());
    let c = claim_one(store, "default", T0 + 100).await;
    assert_eq!(c.attempt, 1);
}

/// Claims every due event of `queue` at `now` and defers each, as an open breaker of `host`
/// would (or a full gate, for `None`), until `until`.
async fn defer_all(store: &dyn Store, now: UnixMillis, until: UnixMillis, host: Option<&str>) {
    for c in claim(store, "default", now).await {
        assert!(store
            .complete(
                &c.event.id,
                &c.lease_token,
                None,
                Disposition::Defer {
                    due_at_ms: until,
                    breaker: host.map(str::to_owned),
                },
                now,
            )
            .await
            .unwrap());
    }
}

fn sorted_ids(claimed: &[ClaimedEvent]) -> Vec<&str> {
    let mut ids: Vec<&str> = claimed.iter().map(|c| c.event.id.as_str()).collect();
    ids.sort_unstable();
    ids
}

/// When a host's breaker closes, the events its open period deferred are due at once, not at
/// their deferred time; events deferred by another host, by a full gate, or leased right now
/// are left alone, and an event already due sooner keeps its time.
pub async fn breaker_deferrals_are_due_at_once_when_that_breaker_closes(store: &dyn Store) {
    enqueue_ok(store, event("evt_a1", "t", "default", T0)).await;
    enqueue_ok(store, event("evt_a2", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 10_000, Some("a:80")).await;
    enqueue_ok(store, event("evt_b", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 10_000, Some("b:80")).await;
    enqueue_ok(store, event("evt_gate", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 10_000, None).await;
    enqueue_ok(store, event("evt_soon", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 20, Some("a:80")).await;

    assert_eq!(store.undefer("a:80", T0 + 50).await.unwrap(), 3);
    assert_eq!(
        store.next_due_at("default").await.unwrap(),
        Some(T0 + 20),
        "an event due sooner keeps its time"
    );
    let due = claim(store, "default", T0 + 50).await;
    assert_eq!(sorted_ids(&due), ["evt_a1", "evt_a2", "evt_soon"]);
    let rec = store.event("evt_b").await.unwrap().unwrap();
    assert_eq!(
        rec.due_at_ms,
        Some(T0 + 10_000),
        "another host's deferral stands"
    );
    let rec = store.event("evt_gate").await.unwrap().unwrap();
    assert_eq!(rec.due_at_ms, Some(T0 + 10_000), "a gate deferral stands");

    // Once made due, the deferral is forgotten: a later close does not move them again, and
    // leased events are never touched.
    assert_eq!(store.undefer("a:80", T0 + 60).await.unwrap(), 0);
    // Deferred again by the next open period: the next close frees them again.
    for c in due {
        store
            .complete(
                &c.event.id,
                &c.lease_token,
                None,
                Disposition::Defer {
                    due_at_ms: T0 + 30_000,
                    breaker: Some("a:80".to_owned()),
                },
                T0 + 70,
            )
            .await
            .unwrap();
    }
    assert!(claim(store, "default", T0 + 100).await.is_empty());
    assert_eq!(store.undefer("a:80", T0 + 100).await.unwrap(), 3);
    assert_eq!(claim(store, "default", T0 + 100).await.len(), 3);
    // An event that was deferred by a breaker and then retried normally is no longer its.
    enqueue_ok(store, event("evt_retry", "t", "default", T0 + 200)).await;
    defer_all(store, T0 + 200, T0 + 300, Some("a:80")).await;
    let c = claim_one(store, "default", T0 + 300).await;
    store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(1, T0 + 300, Some(503), None)),
            Disposition::Retry {
                due_at_ms: T0 + 5_000,
            },
            T0 + 300,
        )
        .await
        .unwrap();
    assert_eq!(store.undefer("a:80", T0 + 400).await.unwrap(), 0);
    let rec = store.event("evt_retry").await.unwrap().unwrap();
    assert_eq!(rec.due_at_ms, Some(T0 + 5_000));
}

/// At startup no breaker that deferred an event is alive: `undefer_all` makes every breaker
/// deferral due at once, whatever the host, and leaves other deferrals alone.
pub async fn undefer_all_makes_every_breaker_deferral_due(store: &dyn Store) {
    enqueue_ok(store, event("evt_a", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 10_000, Some("a:80")).await;
    enqueue_ok(store, event("evt_b", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 10_000, Some("b:443")).await;
    enqueue_ok(store, event("evt_gate", "t", "default", T0)).await;
    defer_all(store, T0, T0 + 10_000, None).await;
    enqueue_ok(store, event("evt_q", "t", "q2", T0)).await;
    for c in claim(store, "q2", T0).await {
        store
            .complete(
                &c.event.id,
                &c.lease_token,
                None,
                Disposition::Defer {
                    due_at_ms: T0 + 10_000,
                    breaker: Some("a:80".to_owned()),
                },
                T0,
            )
            .await
            .unwrap();
    }
    assert_eq!(store.undefer_all(T0 + 5).await.unwrap(), 3);
    assert_eq!(
        sorted_ids(&claim(store, "default", T0 + 5).await),
        ["evt_a", "evt_b"]
    );
    assert_eq!(sorted_ids(&claim(store, "q2", T0 + 5).await), ["evt_q"]);
    assert_eq!(store.undefer_all(T0 + 6).await.unwrap(), 0);
}

/// Dead letters: every filter, newest-first order, cursor paging (including ties on time).
pub async fn dead_letter_listing_filters_and_paging(store: &dyn Store) {
    dead_letter(store, event("evt_d1", "a.x", "q1", T0), T0 + 100).await;
    dead_letter(store, event("evt_d2", "a.y", "q1", T0), T0 + 200).await;
    dead_letter(store, event("evt_d3", "a.x", "q2", T0), T0 + 300).await;
    dead_letter(store, event("evt_d4", "a.x", "q1", T0), T0 + 300).await;
    dead_letter(store, event("evt_d5", "a.x", "q1", T0), T0 + 400).await;
    // Not dead letters: must never be listed.
    enqueue_ok(store, event("evt_pending", "a.x", "q1", T0 + 10_000)).await;

    let all = store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(
        dlq_ids(&all),
        ["evt_d5", "evt_d4", "evt_d3", "evt_d2", "evt_d1"]
    );
    assert!(all.next_cursor.is_none());
    let d5 = &all.items[0];
    assert_eq!(d5.event_type, "a.x");
    assert_eq!(d5.queue, "q1");
    assert_eq!(d5.reason, "permanent_4xx");
    assert_eq!(d5.attempts, 1);
    assert_eq!(d5.last_status, Some(400));
    assert_eq!(d5.last_error, None);
    assert_eq!(d5.received_at_ms, T0);
    assert_eq!(d5.dead_lettered_at_ms, T0 + 400);
    assert_eq!(d5.trace_id, "trace-evt_d5");

    // Paging, two at a time, across the tie at T0 + 300.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_dead_letters(DlqFilter::default(), cursor, 2)
            .await
            .unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|d| d.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "paging does not terminate");
    }
    assert_eq!(seen, ["evt_d5", "evt_d4", "evt_d3", "evt_d2", "evt_d1"]);
    assert_eq!(pages, 3);

    let list = |filter: DlqFilter| async move {
        let page = store.list_dead_letters(filter, None, 10).await.unwrap();
        page.items.into_iter().map(|d| d.id).collect::<Vec<_>>()
    };
    assert_eq!(
        list(DlqFilter {
            event_type: Some("a.y".into()),
            ..Default::default()
        })
        .await,
        ["evt_d2"]
    );
    assert_eq!(
        list(DlqFilter {
            queue: Some("q2".into()),
            ..Default::default()
        })
        .await,
        ["evt_d3"]
    );
    // since is inclusive, until exclusive.
    assert_eq!(
        list(DlqFilter {
            since_ms: Some(T0 + 300),
            ..Default::default()
        })
        .await,
        ["evt_d5", "evt_d4", "evt_d3"]
    );
    assert_eq!(
        list(DlqFilter {
            until_ms: Some(T0 + 300),
            ..Default::default()
        })
        .await,
        ["evt_d2", "evt_d1"]
    );
    let combined = DlqFilter {
        event_type: Some("a.x".into()),
        queue: Some("q1".into()),
        since_ms: Some(T0 + 200),
        until_ms: Some(T0 + 401),
    };
    assert_eq!(list(combined.clone()).await, ["evt_d5", "evt_d4"]);

    // The id pages a bulk replay walks are the listing's pages: same ids, same cursors (a
    // cursor from one continues the other), unfiltered and filtered.
    let filters = [
        DlqFilter::default(),
        DlqFilter {
            since_ms: Some(T0 + 200),
            until_ms: Some(T0 + 400),
            ..Default::default()
        },
        combined.clone(),
        DlqFilter {
            event_type: Some("a.x".into()),
            ..Default::default()
        },
    ];
    for filter in filters {
        let mut cursor = None;
        let mut from_ids = Vec::new();
        for page_no in 0.. {
            assert!(page_no < 10, "id paging does not terminate");
            let ids = store
                .dead_letter_ids(filter.clone(), cursor.clone(), 2)
                .await
                .unwrap();
            let listed = store
                .list_dead_letters(filter.clone(), cursor, 2)
                .await
                .unwrap();
            assert_eq!(ids.items, dlq_ids(&listed), "{filter:?}");
            assert_eq!(ids.next_cursor, listed.next_cursor, "{filter:?}");
            from_ids.extend(ids.items);
            match ids.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(from_ids, list(filter.clone()).await, "{filter:?}");
    }

    let page = store.list_dead_letters(combined, None, 1).await.unwrap();
    assert_eq!(dlq_ids(&page), ["evt_d5"]);
    assert!(page.next_cursor.is_some());
    assert!(list(DlqFilter {
        event_type: Some("nope".into()),
        ..Default::default()
    })
    .await
    .is_empty());
}

/// Replay keeps the event id, starts a fresh attempt count and keeps the old history.
pub async fn replay_starts_fresh_round_with_same_id(store: &dyn Store) {
    enqueue_ok(store, event("evt_1", "t", "default", T0)).await;
    let c = claim_one(store, "default", T0).await;
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(1, T0, Some(500), None)),
            Disposition::Retry { due_at_ms: T0 + 10 },
            T0,
        )
        .await
        .unwrap());
    let c = claim_one(store, "default", T0 + 10).await;
    assert_eq!(c.attempt, 2);
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(2, T0 + 10, Some(500), None)),
            Disposition::DeadLetter {
                reason: "exhausted".into()
            },
            T0 + 20,
        )
        .await
        .unwrap());
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::DeadLettered);
    assert_eq!(rec.dead_lettered_at_ms, Some(T0 + 20));
    assert_eq!(rec.dead_letter_reason.as_deref(), Some("exhausted"));
    let dl = store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dl.items[0].attempts, 2);
    assert_eq!(dl.items[0].last_status, Some(500));
    // A dead letter is never claimed.
    assert!(claim(store, "default", T0 + 1_000_000).await.is_empty());

    enqueue_ok(store, event("evt_pending", "t", "other", T0 + 1_000_000)).await;
    let replayed = store
        .replay(
            vec!["evt_1".into(), "evt_unknown".into(), "evt_pending".into()],
            T0 + 100,
        )
        .await
        .unwrap();
    assert_eq!(replayed, ["evt_1"]);
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Pending);
    assert_eq!(rec.due_at_ms, Some(T0 + 100));
    assert_eq!(rec.dead_lettered_at_ms, None);
    assert!(store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    // Replaying what is no longer dead-lettered does nothing.
    assert!(store
        .replay(vec!["evt_1".into()], T0 + 100)
        .await
        .unwrap()
        .is_empty());

    assert!(claim(store, "default", T0 + 99).await.is_empty());
    let c = claim_one(store, "default", T0 + 100).await;
    assert_eq!(c.event.id, "evt_1");
    assert_eq!(c.attempt, 1, "a replay starts a fresh attempt count");
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(1, T0 + 100, Some(200), None)),
            Disposition::Delivered,
            T0 + 110,
        )
        .await
        .unwrap());
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Delivered);
    let history: Vec<(u32, Option<u16>)> =
        rec.attempts.iter().map(|a| (a.attempt, a.status)).collect();
    assert_eq!(history, [(1, Some(500)), (2, Some(500)), (1, Some(200))]);
}

/// Bulk replay by filter.
pub async fn replay_matching_replays_filtered_set(store: &dyn Store) {
    dead_letter(store, event("evt_x1", "a.x", "q", T0), T0 + 1).await;
    dead_letter(store, event("evt_x2", "a.x", "q", T0), T0 + 2).await;
    dead_letter(store, event("evt_y1", "a.y", "q", T0), T0 + 3).await;
    let n = store
        .replay_matching(
            DlqFilter {
                event_type: Some("a.x".into()),
                ..Default::default()
            },
            T0 + 10,
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left = store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dlq_ids(&left), ["evt_y1"]);
    let mut claimed = ids(&claim(store, "q", T0 + 10).await)
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    claimed.sort();
    assert_eq!(claimed, ["evt_x1", "evt_x2"]);
    // Nothing matches any more.
    let n = store
        .replay_matching(
            DlqFilter {
                event_type: Some("a.x".into()),
                ..Default::default()
            },
            T0 + 20,
        )
        .await
        .unwrap();
    assert_eq!(n, 0);
    let n = store
        .replay_matching(DlqFilter::default(), T0 + 20)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// Idempotency keys: duplicates inside the window store nothing, expiry frees the key, and
/// the key is scoped by event type.
pub async fn idempotency_duplicate_expiry_and_scope(store: &dyn Store) {
    let claim_for = |event_type: &str, expires: UnixMillis| IdempotencyClaim {
        event_type: event_type.to_owned(),
        key: "k-1".to_owned(),
        expires_at_ms: expires,
    };
    let first = event("evt_1", "order.paid", "default", T0);
    assert_eq!(
        store
            .enqueue(first, Some(claim_for("order.paid", T0 + 1000)), NO_LIMIT)
            .await
            .unwrap(),
        EnqueueOutcome::Accepted
    );
    let dup = event("evt_2", "order.paid", "default", T0 + 500);
    assert_eq!(
        store
            .enqueue(dup, Some(claim_for("order.paid", T0 + 1500)), NO_LIMIT)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate {
            event_id: "evt_1".into()
        }
    );
    assert!(store.event("evt_2").await.unwrap().is_none());
    assert_eq!(claim(store, "default", T0 + 500).await.len(), 1);
    assert_eq!(
        store
            .find_idempotent("order.paid", "k-1", T0 + 999)
            .await
            .unwrap()
            .as_deref(),
        Some("evt_1")
    );
    assert_eq!(
        store
            .find_idempotent("order.paid", "k-1", T0 + 1000)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .find_idempotent("order.refunded", "k-1", T0)
            .await
            .unwrap(),
        None
    );

    // Same key under another event type is a different event.
    let other = event("evt_3", "order.refunded", "default", T0 + 600);
    assert_eq!(
        store
            .enqueue(
                other,
                Some(claim_for("order.refunded", T0 + 1600)),
                NO_LIMIT
            )
            .await
            .unwrap(),
        EnqueueOutcome::Accepted
    );

    // Once expired, the key is taken over by the next event.
    let later = event("evt_4", "order.paid", "default", T0 + 1000);
    assert_eq!(
        store
            .enqueue(later, Some(claim_for("order.paid", T0 + 2000)), NO_LIMIT)
            .await
            .unwrap(),
        EnqueueOutcome::Accepted
    );
    assert_eq!(
        store
            .find_idempotent("order.paid", "k-1", T0 + 1500)
            .await
            .unwrap()
            .as_deref(),
        Some("evt_4")
    );
    let dup = event("evt_5", "order.paid", "default", T0 + 1999);
    assert_eq!(
        store
            .enqueue(dup, Some(claim_for("order.paid", T0 + 3000)), NO_LIMIT)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate {
            event_id: "evt_4".into()
        }
    );
}

/// `max_depth` counts pending and in-flight events; a full queue stores nothing at all.
pub async fn queue_full_at_max_depth_stores_nothing(store: &dyn Store) {
    let enq = |ev: NewEvent, idem: Option<IdempotencyClaim>| store.enqueue(ev, idem, 2);
    assert_eq!(
        enq(event("evt_1", "t", "small", T0), None).await.unwrap(),
        EnqueueOutcome::Accepted
    );
    let mut delayed = event("evt_2", "t", "small", T0);
    delayed.due_at_ms = T0 + 60_000;
    assert_eq!(enq(delayed, None).await.unwrap(), EnqueueOutcome::Accepted);

    let mut full = event("evt_3", "t", "small", T0);
    full.fallback = Some(FallbackReason::Timeout);
    let key = IdempotencyClaim {
        event_type: "t".into(),
        key: "k".into(),
        expires_at_ms: T0 + 10_000,
    };
    assert_eq!(
        enq(full.clone(), Some(key.clone())).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
    assert!(store.event("evt_3").await.unwrap().is_none());
    assert_eq!(store.find_idempotent("t", "k", T0).await.unwrap(), None);
    assert!(store.fallbacks(0, 10).await.unwrap().is_empty());
    // The limit is per queue.
    assert_eq!(
        enq(event("evt_other", "t", "big", T0), None).await.unwrap(),
        EnqueueOutcome::Accepted
    );

    // In flight still counts against the depth...
    let c = claim_one(store, "small", T0).await;
    assert_eq!(
        enq(full.clone(), Some(key.clone())).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
    // ...a retry keeps it in the queue...
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(1, T0, Some(503), None)),
            Disposition::Retry { due_at_ms: T0 + 1 },
            T0,
        )
        .await
        .unwrap());
    assert_eq!(
        enq(full.clone(), Some(key.clone())).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
    // ...and delivery frees the slot.
    let c = claim_one(store, "small", T0 + 1).await;
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            None,
            Disposition::Delivered,
            T0 + 2
        )
        .await
        .unwrap());
    assert_eq!(
        enq(full, Some(key)).await.unwrap(),
        EnqueueOutcome::Accepted
    );
    assert!(store.event("evt_3").await.unwrap().is_some());
    assert_eq!(
        store
            .find_idempotent("t", "k", T0)
            .await
            .unwrap()
            .as_deref(),
        Some("evt_3")
    );
    assert_eq!(
        enq(event("evt_4", "t", "small", T0), None).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
}

/// A sync_to_async fallback is recorded with the event, and its reconciliation state follows
/// what became of the event.
pub async fn fallback_recorded_and_reconciled(store: &dyn Store) {
    for (id, at, reason) in [
        ("evt_f1", T0 + 1, FallbackReason::Timeout),
        ("evt_f2", T0 + 2, FallbackReason::CircuitOpen),
        ("evt_f3", T0 + 3, FallbackReason::Shed),
    ] {
        let mut ev = event(id, "payment.authorize", "default", at);
        ev.fallback = Some(reason);
        enqueue_ok(store, ev).await;
    }
    enqueue_ok(
        store,
        event("evt_plain", "payment.authorize", "default", T0 + 4),
    )
    .await;

    let all = store.fallbacks(0, 10).await.unwrap();
    let got: Vec<(&str, FallbackReason, Reconciliation)> = all
        .iter()
        .map(|f| (f.event_id.as_str(), f.reason, f.state))
        .collect();
    assert_eq!(
        got,
        [
            ("evt_f1", FallbackReason::Timeout, Reconciliation::Pending),
            (
                "evt_f2",
                FallbackReason::CircuitOpen,
                Reconciliation::Pending
            ),
            ("evt_f3", FallbackReason::Shed, Reconciliation::Pending),
        ]
    );
    let f1 = &all[0];
    assert_eq!(f1.trace_id, "trace-evt_f1");
    assert_eq!(f1.event_type, "payment.authorize");
    assert_eq!(f1.target, "http://127.0.0.1:9000/hooks/payment.authorize");
    assert_eq!(f1.at_ms, T0 + 1);
    assert_eq!(f1.delivered_at_ms, None);
    assert_eq!(
        store.event("evt_f1").await.unwrap().unwrap().fallback,
        Some(FallbackReason::Timeout)
    );
    assert_eq!(
        store.event("evt_plain").await.unwrap().unwrap().fallback,
        None
    );

    let claimed = claim(store, "default", T0 + 10).await;
    for c in &claimed {
        let disposition = match c.event.id.as_str() {
            "evt_f1" => Disposition::Delivered,
            "evt_f2" => Disposition::DeadLetter {
                reason: "permanent_4xx".into(),
            },
            _ => Disposition::Retry {
                due_at_ms: T0 + 1000,
            },
        };
        assert!(store
            .complete(&c.event.id, &c.lease_token, None, disposition, T0 + 50)
            .await
            .unwrap());
    }
    let all = store.fallbacks(0, 10).await.unwrap();
    let got: Vec<(&str, Reconciliation, Option<UnixMillis>)> = all
        .iter()
        .map(|f| (f.event_id.as_str(), f.state, f.delivered_at_ms))
        .collect();
    assert_eq!(
        got,
        [
            ("evt_f1", Reconciliation::Delivered, Some(T0 + 50)),
            ("evt_f2", Reconciliation::DeadLettered, None),
            ("evt_f3", Reconciliation::Pending, None),
        ]
    );
    // since is inclusive; limit applies oldest first.
    let since: Vec<String> = store
        .fallbacks(T0 + 2, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.event_id)
        .collect();
    assert_eq!(since, ["evt_f2", "evt_f3"]);
    let first: Vec<String> = store
        .fallbacks(0, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.event_id)
        .collect();
    assert_eq!(first, ["evt_f1"]);
}

/// `event` returns the full history of attempts with their outcome details.
pub async fn event_history_lists_attempts(store: &dyn Store) {
    let mut ev = event("evt_1", "t", "default", T0);
    ev.fallback = Some(FallbackReason::Upstream5xx);
    enqueue_ok(store, ev).await;
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.id, "evt_1");
    assert_eq!(rec.event_type, "t");
    assert_eq!(rec.queue, "default");
    assert_eq!(rec.trace_id, "trace-evt_1");
    assert_eq!(rec.state, EventState::Pending);
    assert_eq!(rec.received_at_ms, T0);
    assert_eq!(rec.due_at_ms, Some(T0));
    assert!(rec.attempts.is_empty());

    let c = claim_one(store, "default", T0).await;
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(AttemptRecord {
                attempt: 1,
                started_at_ms: T0,
                latency_ms: 1500,
                status: None,
                error: Some("timeout".into()),
            }),
            Disposition::Retry {
                due_at_ms: T0 + 500
            },
            T0 + 1500,
        )
        .await
        .unwrap());
    let c = claim_one(store, "default", T0 + 2000).await;
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(AttemptRecord {
                attempt: 2,
                started_at_ms: T0 + 2000,
                latency_ms: 35,
                status: Some(410),
                error: None,
            }),
            Disposition::DeadLetter {
                reason: "gone".into()
            },
            T0 + 2035,
        )
        .await
        .unwrap());
    let rec = store.event("evt_1").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::DeadLettered);
    assert_eq!(rec.dead_letter_reason.as_deref(), Some("gone"));
    assert_eq!(rec.dead_lettered_at_ms, Some(T0 + 2035));
    assert_eq!(rec.fallback, Some(FallbackReason::Upstream5xx));
    assert_eq!(
        rec.attempts,
        [
            AttemptRecord {
                attempt: 1,
                started_at_ms: T0,
                latency_ms: 1500,
                status: None,
                error: Some("timeout".into()),
            },
            AttemptRecord {
                attempt: 2,
                started_at_ms: T0 + 2000,
                latency_ms: 35,
                status: Some(410),
                error: None,
            },
        ]
    );
}

/// Purge removes old finished events with their history, keeps everything live or recent.
pub async fn purge_removes_finished_and_expired(store: &dyn Store) {
    // Delivered at T0 + 10 (old), dead-lettered at T0 + 20 (old, and a fallback),
    // dead-lettered at T0 + 2000 (recent), and one still pending (never purged).
    enqueue_ok(store, event("evt_delivered", "t", "q", T0)).await;
    let c = claim_one(store, "q", T0).await;
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(1, T0, Some(200), None)),
            Disposition::Delivered,
            T0 + 10,
        )
        .await
        .unwrap());
    let mut fb = event("evt_dead_old", "t", "q", T0);
    fb.fallback = Some(FallbackReason::Connect);
    dead_letter(store, fb, T0 + 20).await;
    dead_letter(store, event("evt_dead_new", "t", "q", T0), T0 + 2000).await;
    let mut pending = event("evt_pending", "t", "q", T0);
    pending.due_at_ms = T0 + 1_000_000;
    let key = IdempotencyClaim {
        event_type: "t".into(),
        key: "live".into(),
        expires_at_ms: T0 + 100_000,
    };
    assert_eq!(
        store.enqueue(pending, Some(key), NO_LIMIT).await.unwrap(),
        EnqueueOutcome::Accepted
    );

    let removed = store.purge(T0 + 1000, T0 + 5000).await.unwrap();
    assert_eq!(removed, 2);
    assert!(store.event("evt_delivered").await.unwrap().is_none());
    assert!(store.event("evt_dead_old").await.unwrap().is_none());
    assert!(store.event("evt_dead_new").await.unwrap().is_some());
    assert!(store.event("evt_pending").await.unwrap().is_some());
    assert!(store.fallbacks(0, 10).await.unwrap().is_empty());
    let dl = store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dlq_ids(&dl), ["evt_dead_new"]);
    assert_eq!(
        store
            .find_idempotent("t", "live", T0 + 5000)
            .await
            .unwrap()
            .as_deref(),
        Some("evt_pending")
    );
    // Nothing left to purge is not an error.
    assert_eq!(store.purge(T0 + 1000, T0 + 5000).await.unwrap(), 0);
    let stats = store.stats("q", T0 + 5000).await.unwrap();
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.delayed, 1);
}

/// Queue gauges.
pub async fn stats_gauges(store: &dyn Store) {
    assert_eq!(
        store.stats("q", T0).await.unwrap(),
        QueueStats::default(),
        "an unknown queue has all-zero stats"
    );
    enqueue_ok(store, event("evt_1", "t", "q", T0)).await;
    enqueue_ok(store, event("evt_4", "t", "q", T0)).await;
    let mut e2 = event("evt_2", "t", "q", T0);
    e2.due_at_ms = T0 + 100;
    enqueue_ok(store, e2).await;
    let mut e3 = event("evt_3", "t", "q", T0);
    e3.due_at_ms = T0 + 5000;
    enqueue_ok(store, e3).await;
    enqueue_ok(store, event("evt_other", "t", "other", T0)).await;

    let stats = store.stats("q", T0 + 50).await.unwrap();
    assert_eq!(
        stats,
        QueueStats {
            ready: 2,
            delayed: 2,
            held: 0,
            in_flight: 0,
            dead_lettered: 0,
            oldest_ready_age_ms: 50,
        }
    );

    let claimed = store.claim_due("q", T0, 2, LEASE).await.unwrap();
    assert_eq!(ids(&claimed), ["evt_1", "evt_4"]);
    let dead = &claimed[1];
    assert!(store
        .complete(
            &dead.event.id,
            &dead.lease_token,
            None,
            Disposition::DeadLetter {
                reason: "permanent_4xx".into()
            },
            T0
        )
        .await
        .unwrap());
    let stats = store.stats("q", T0 + 200).await.unwrap();
    assert_eq!(
        stats,
        QueueStats {
            ready: 1,
            delayed: 1,
            held: 0,
            in_flight: 1,
            dead_lettered: 1,
            oldest_ready_age_ms: 100,
        }
    );
    let stats = store.stats("other", T0 + 200).await.unwrap();
    assert_eq!(stats.ready, 1);
    assert_eq!(stats.oldest_ready_age_ms, 200);
}

/// Graceful shutdown hands leases back, due at once; a wrong token releases nothing.
pub async fn release_returns_leases(store: &dyn Store) {
    enqueue_ok(store, event("evt_1", "t", "q", T0)).await;
    enqueue_ok(store, event("evt_2", "t", "q", T0)).await;
    let claimed = claim(store, "q", T0).await;
    assert_eq!(claimed.len(), 2);
    store
        .release(
            vec![
                (claimed[0].event.id.clone(), claimed[0].lease_token.clone()),
                (claimed[1].event.id.clone(), "not-the-token".into()),
                ("evt_unknown".into(), "x".into()),
            ],
            T0 + 5,
        )
        .await
        .unwrap();
    let rec = store.event(&claimed[0].event.id).await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Pending);
    assert_eq!(rec.due_at_ms, Some(T0 + 5));
    assert_eq!(
        store
            .event(&claimed[1].event.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        EventState::InFlight
    );
    let again = claim_one(store, "q", T0 + 5).await;
    assert_eq!(again.event.id, claimed[0].event.id);
    assert_eq!(again.attempt, 1);
    // The released lease's token is void.
    assert!(!store
        .complete(
            &claimed[0].event.id,
            &claimed[0].lease_token,
            None,
            Disposition::Delivered,
            T0 + 6
        )
        .await
        .unwrap());
}

/// `next_due_at` follows the earliest pending due time or lease expiry of one queue.
pub async fn next_due_at_tracks_earliest(store: &dyn Store) {
    assert_eq!(store.next_due_at("q").await.unwrap(), None);
    let mut a = event("evt_a", "t", "q", T0);
    a.due_at_ms = T0 + 300;
    enqueue_ok(store, a).await;
    let mut b = event("evt_b", "t", "q", T0);
    b.due_at_ms = T0 + 100;
    enqueue_ok(store, b).await;
    let mut other = event("evt_o", "t", "other", T0);
    other.due_at_ms = T0 + 1;
    enqueue_ok(store, other).await;
    assert_eq!(store.next_due_at("q").await.unwrap(), Some(T0 + 100));
    let c = store.claim_due("q", T0 + 100, 1, 50).await.unwrap();
    assert_eq!(ids(&c), ["evt_b"]);
    // evt_b's lease expires at T0 + 150, before evt_a is due.
    assert_eq!(store.next_due_at("q").await.unwrap(), Some(T0 + 150));
    assert!(store
        .complete(
            &c[0].event.id,
            &c[0].lease_token,
            None,
            Disposition::Delivered,
            T0 + 120
        )
        .await
        .unwrap());
    assert_eq!(store.next_due_at("q").await.unwrap(), Some(T0 + 300));
}

/// Claims never cross queues.
pub async fn queues_are_isolated(store: &dyn Store) {
    enqueue_ok(store, event("evt_a", "t", "qa", T0)).await;
    enqueue_ok(store, event("evt_b", "t", "qb", T0)).await;
    assert_eq!(ids(&claim(store, "qa", T0).await), ["evt_a"]);
    assert_eq!(ids(&claim(store, "qb", T0).await), ["evt_b"]);
    assert!(claim(store, "qc", T0).await.is_empty());
}

/// Many concurrent enqueues are all accepted, all stored, and all claimable exactly once.
pub async fn concurrent_enqueues_all_durable(store: Arc<dyn Store>, tasks: usize) {
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            let ev = event(&format!("evt_{i:04}"), "t", "busy", T0 + i as i64);
            store.enqueue(ev, None, NO_LIMIT).await
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap(), EnqueueOutcome::Accepted);
    }
    for i in 0..tasks {
        let id = format!("evt_{i:04}");
        let rec = store.event(&id).await.unwrap();
        assert!(rec.is_some(), "{id} lost");
    }
    let stats = store.stats("busy", T0 + tasks as i64).await.unwrap();
    assert_eq!(stats.ready, tasks as u64);
    let claimed = store
        .claim_due("busy", T0 + tasks as i64, tasks * 2, LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), tasks);
    let mut unique: Vec<&str> = ids(&claimed);
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), tasks);
    // Oldest due first.
    assert!(claimed.windows(2).all(|w| w[0].event.id < w[1].event.id));
}

/// A large dead-letter queue is replayed and purged completely (backends may work in chunks).
pub async fn bulk_replay_and_purge(store: Arc<dyn Store>, n: usize) {
    let mut handles = Vec::new();
    for i in 0..n {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            let ev = event(&format!("evt_{i:05}"), "bulk", "bulk", T0);
            store.enqueue(ev, None, NO_LIMIT).await
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap(), EnqueueOutcome::Accepted);
    }
    let dead_letter_all = |at: UnixMillis| {
        let store = Arc::clone(&store);
        async move {
            let claimed = store.claim_due("bulk", at, n + 1, LEASE).await.unwrap();
            assert_eq!(claimed.len(), n);
            for c in claimed {
                let d = Disposition::DeadLetter {
                    reason: "exhausted".into(),
                };
                assert!(store
                    .complete(&c.event.id, &c.lease_token, None, d, at)
                    .await
                    .unwrap());
            }
        }
    };
    dead_letter_all(T0 + 1).await;
    let replayed = store
        .replay_matching(DlqFilter::default(), T0 + 2)
        .await
        .unwrap();
    assert_eq!(replayed, n as u64);
    assert_eq!(store.stats("bulk", T0 + 2).await.unwrap().ready, n as u64);
    dead_letter_all(T0 + 3).await;
    assert_eq!(store.purge(T0 + 4, T0 + 4).await.unwrap(), n as u64);
    assert_eq!(
        store.stats("bulk", T0 + 4).await.unwrap(),
        QueueStats::default()
    );
}

/// After `close`, every call answers `Closed`; closing twice is harmless.
pub async fn close_then_calls_fail_closed(store: &dyn Store) {
    enqueue_ok(store, event("evt_1", "t", "q", T0)).await;
    store.close().await.unwrap();
    let closed = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Closed));
    assert!(closed(
        store
            .enqueue(event("evt_2", "t", "q", T0), None, NO_LIMIT)
            .await
            .map(drop)
    ));
    assert!(closed(store.claim_due("q", T0, 10, LEASE).await.map(drop)));
    assert!(closed(store.event("evt_1").await.map(drop)));
    assert!(closed(store.stats("q", T0).await.map(drop)));
    assert!(closed(
        store
            .list_dead_letters(DlqFilter::default(), None, 10)
            .await
            .map(drop)
    ));
    assert!(closed(store.ping().await));
    store.close().await.unwrap();
}

/// An acknowledged enqueue survives the store being dropped without `close` (a crash, as far
/// as the caller can tell) and reopened.
pub async fn durable_across_reopen<F, Fut>(mut open: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open().await;
    store.ping().await.unwrap();
    let mut ev = event("evt_durable", "t", "q", T0);
    ev.fallback = Some(FallbackReason::Shed);
    let key = IdempotencyClaim {
        event_type: "t".into(),
        key: "k".into(),
        expires_at_ms: T0 + 60_000,
    };
    assert_eq!(
        store.enqueue(ev, Some(key), NO_LIMIT).await.unwrap(),
        EnqueueOutcome::Accepted
    );
    drop(store);

    let store = open().await;
    let rec = store.event("evt_durable").await.unwrap().unwrap();
    assert_eq!(rec.state, EventState::Pending);
    assert_eq!(
        store
            .find_idempotent("t", "k", T0)
            .await
            .unwrap()
            .as_deref(),
        Some("evt_durable")
    );
    assert_eq!(store.fallbacks(0, 10).await.unwrap().len(), 1);
    let c = claim_one(&*store, "q", T0).await;
    assert_eq!(c.event.body, body_of("evt_durable"));
    store.close().await.unwrap();
}

/// An event of ordering key `key`.
fn keyed(id: &str, key: &str, queue: &str, at: UnixMillis) -> NewEvent {
    let mut ev = event(id, "t", queue, at);
    ev.ordering_key = Some(key.to_owned());
    ev
}

fn seq(key: &str, sequence: u64) -> Option<KeySequence> {
    Some(KeySequence {
        key: key.to_owned(),
        sequence,
    })
}

async fn finish(store: &dyn Store, c: &ClaimedEvent, disposition: Disposition, at: UnixMillis) {
    assert!(store
        .complete(
            &c.event.id,
            &c.lease_token,
            Some(attempt(c.attempt, at, Some(200), None)),
            disposition,
            at
        )
        .await
        .unwrap());
}

/// Events of one key go one at a time in sequence; a retrying head holds back its key only;
/// delivering or dead-lettering it releases the next; a replayed dead letter keeps its
/// sequence and waits its turn ahead of later events; keys are scoped per queue.
pub async fn ordering_keys_hand_out_one_event_per_key_in_sequence(store: &dyn Store) {
    enqueue_ok(store, keyed("a1", "A", "q", T0)).await;
    enqueue_ok(store, keyed("a2", "A", "q", T0 + 1)).await;
    enqueue_ok(store, keyed("b1", "B", "q", T0 + 2)).await;
    enqueue_ok(store, event("u1", "t", "q", T0 + 3)).await;
    enqueue_ok(store, keyed("a3", "A", "q", T0 + 4)).await;
    // The same key in another queue is another key.
    enqueue_ok(store, keyed("x1", "A", "other", T0)).await;

    let stats = store.stats("q", T0 + 10).await.unwrap();
    assert_eq!((stats.ready, stats.held), (3, 2), "{stats:?}");
    assert_eq!(
        store.event("a2").await.unwrap().unwrap().state,
        EventState::Held
    );
    let first = store.claim_due("q", T0 + 10, 10, LEASE).await.unwrap();
    assert_eq!(ids(&first), ["a1", "b1", "u1"]);
    assert_eq!(first[0].ordering, seq("A", 1));
    assert_eq!(first[1].ordering, seq("B", 1));
    assert_eq!(first[2].ordering, None);
    let x1 = claim_one(store, "other", T0).await;
    assert_eq!(x1.ordering, seq("A", 1));

    // a1 fails and retries later: A waits, B and unkeyed events go on.
    let a1 = &first[0];
    finish(
        store,
        a1,
        Disposition::Retry {
            due_at_ms: T0 + 100,
        },
        T0 + 20,
    )
    .await;
    finish(store, &first[1], Disposition::Delivered, T0 + 20).await;
    enqueue_ok(store, keyed("b2", "B", "q", T0 + 30)).await;
    assert_eq!(ids(&claim(store, "q", T0 + 50).await), ["b2"]);
    let a1 = claim_one(store, "q", T0 + 100).await;
    assert_eq!(
        (a1.event.id.as_str(), a1.attempt, a1.ordering.clone()),
        ("a1", 2, seq("A", 1))
    );
    assert!(
        claim(store, "q", T0 + 100).await.is_empty(),
        "a2 waits while a1 is leased"
    );

    // Delivered: a2 is next, due at once.
    finish(store, &a1, Disposition::Delivered, T0 + 110).await;
    let a2 = claim_one(store, "q", T0 + 110).await;
    assert_eq!(
        (a2.event.id.as_str(), a2.ordering.clone()),
        ("a2", seq("A", 2))
    );
    // Dead-lettered: a3 goes on without it, and the DLQ says what a2 held.
    finish(
        store,
        &a2,
        Disposition::DeadLetter {
            reason: "exhausted".into(),
        },
        T0 + 120,
    )
    .await;
    let dlq = store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dlq_ids(&dlq), ["a2"]);
    assert_eq!(dlq.items[0].ordering, seq("A", 2));
    let a3 = claim_one(store, "q", T0 + 120).await;
    assert_eq!(
        (a3.event.id.as_str(), a3.ordering.clone()),
        ("a3", seq("A", 3))
    );
    enqueue_ok(store, keyed("a4", "A", "q", T0 + 130)).await;
    assert_eq!(
        store.event("a4").await.unwrap().unwrap().ordering,
        seq("A", 4)
    );

    // Replayed while a3 is leased: a2 keeps sequence 2 and waits, ahead of a4.
    assert_eq!(
        store.replay(vec!["a2".into()], T0 + 140).await.unwrap(),
        ["a2"]
    );
    assert_eq!(
        store.event("a2").await.unwrap().unwrap().state,
        EventState::Held
    );
    assert!(claim(store, "q", T0 + 140).await.is_empty());
    finish(store, &a3, Disposition::Delivered, T0 + 150).await;
    let again = claim_one(store, "q", T0 + 150).await;
    assert_eq!(
        (
            again.event.id.as_str(),
            again.attempt,
            again.ordering.clone()
        ),
        ("a2", 1, seq("A", 2))
    );
    finish(store, &again, Disposition::Delivered, T0 + 160).await;
    let a4 = claim_one(store, "q", T0 + 160).await;
    assert_eq!(a4.event.id, "a4");
    finish(store, &a4, Disposition::Delivered, T0 + 170).await;

    // The key is free again: its next event is pending at once, and the sequence goes on.
    enqueue_ok(store, keyed("a5", "A", "q", T0 + 180)).await;
    let a5 = claim_one(store, "q", T0 + 180).await;
    assert_eq!(a5.ordering, seq("A", 5));
    // u1, b2 (never completed here) and a5 are leased; nothing waits.
    let stats = store.stats("q", T0 + 180).await.unwrap();
    assert_eq!(
        (stats.held, stats.in_flight, stats.ready),
        (0, 3, 0),
        "{stats:?}"
    );
    let record = store.event("a5").await.unwrap().unwrap();
    assert_eq!(record.ordering, seq("A", 5));
}

/// A key's head whose leases keep running out is dead-lettered by the claim that finds the
/// last expiry; that releases the key's next event, and a graceful release keeps the head.
pub async fn ordering_key_head_dead_lettered_by_expiry_releases_the_next(store: &dyn Store) {
    const LEASE_MS: u64 = 1000;
    let max = i64::from(MAX_LEASE_EXPIRIES);
    enqueue_ok(store, keyed("k1", "K", "q", T0)).await;
    enqueue_ok(store, keyed("k2", "K", "q", T0)).await;
    // Handed back at shutdown: still the key's head, k2 still waits.
    let c = claim_one(store, "q", T0).await;
    store
        .release(vec![(c.event.id.clone(), c.lease_token.clone())], T0)
        .await
        .unwrap();
    for i in 0..max {
        let got = store
            .claim_due("q", T0 + i * LEASE_MS as i64, 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(ids(&got), ["k1"], "claim {i}");
    }
    let at = T0 + max * LEASE_MS as i64;
    let got = store.claim_due("q", at, 10, LEASE_MS).await.unwrap();
    assert_eq!(
        store.event("k1").await.unwrap().unwrap().state,
        EventState::DeadLettered
    );
    // Released by that same claim, k2 is due at once: this claim or the next hands it out.
    let k2 = match got.first() {
        Some(c) => c.clone(),
        None => claim_one(store, "q", at).await,
    };
    assert_eq!(
        (k2.event.id.as_str(), k2.ordering.clone()),
        ("k2", seq("K", 2))
    );
}

/// The worker that finishes a key's event gets the key's next one with the result, leased,
/// without a claim; a retry or an unkeyed event hands nothing over; a handed-over lease that
/// runs out is claimable again like any other.
pub async fn finishing_a_keys_event_hands_the_next_one_to_the_same_worker(store: &dyn Store) {
    enqueue_ok(store, keyed("k1", "K", "q", T0)).await;
    enqueue_ok(store, keyed("k2", "K", "q", T0)).await;
    enqueue_ok(store, keyed("k3", "K", "q", T0)).await;
    enqueue_ok(store, event("u1", "t", "q", T0)).await;
    let first = claim(store, "q", T0).await;
    assert_eq!(ids(&first), ["k1", "u1"]);

    let take = |c: &ClaimedEvent, disposition: Disposition, at: UnixMillis| {
        let (id, token) = (c.event.id.clone(), c.lease_token.clone());
        async move {
            store
                .complete_and_take_next(&id, &token, None, disposition, at, LEASE)
                .await
                .unwrap()
        }
    };
    let done = take(&first[0], Disposition::Delivered, T0 + 10).await;
    assert!(done.recorded);
    let k2 = done.next.expect("k2 handed over");
    assert_eq!(
        (k2.event.id.as_str(), k2.attempt, k2.ordering.clone()),
        ("k2", 1, seq("K", 2))
    );
    assert_eq!(
        store.event("k2").await.unwrap().unwrap().state,
        EventState::InFlight
    );
    assert!(
        claim(store, "q", T0 + 10).await.is_empty(),
        "k2 is leased, k3 held"
    );

    // A retry keeps the key: nothing is handed over, k2 comes back by claim.
    let retried = take(
        &k2,
        Disposition::Retry {
            due_at_ms: T0 + 100,
        },
        T0 + 20,
    )
    .await;
    assert!(retried.recorded && retried.next.is_none());
    let k2 = claim_one(store, "q", T0 + 100).await;
    assert_eq!((k2.event.id.as_str(), k2.attempt), ("k2", 2));
    // A stale token records nothing and takes nothing.
    let stale = take(&first[0], Disposition::Delivered, T0 + 100).await;
    assert!(!stale.recorded && stale.next.is_none());
    let dead = take(
        &k2,
        Disposition::DeadLetter {
            reason: "exhausted".into(),
        },
        T0 + 110,
    )
    .await;
    let k3 = dead.next.expect("k3 handed over after a dead letter");
    assert_eq!(k3.ordering, seq("K", 3));
    // An unkeyed event has nothing to hand over.
    let unkeyed = take(&first[1], Disposition::Delivered, T0 + 120).await;
    assert!(unkeyed.recorded && unkeyed.next.is_none());

    // k3's worker dies: its lease runs out and a claim hands it out again.
    let lease_end = T0 + 110 + LEASE as i64;
    assert!(claim(store, "q", lease_end - 1).await.is_empty());
    let again = claim_one(store, "q", lease_end).await;
    assert_eq!(
        (again.event.id.as_str(), again.ordering.clone()),
        ("k3", seq("K", 3))
    );
    let last = take(&again, Disposition::Delivered, lease_end + 1).await;
    assert!(last.recorded && last.next.is_none());
    let stats = store.stats("q", lease_end + 1).await.unwrap();
    assert_eq!(
        (stats.ready, stats.held, stats.in_flight),
        (0, 0, 0),
        "{stats:?}"
    );
}

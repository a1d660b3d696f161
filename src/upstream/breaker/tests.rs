//! The breaker's unit tests: window, policies and probes on an injected clock.

use super::*;
use crate::clock::ManualClock;

fn rate(failure_rate: f64, window_ms: u64, min_calls: u32, probes: u32) -> BreakerSettings {
    BreakerSettings {
        policy: BreakerPolicy::FailureRate {
            failure_rate,
            window_ms,
            min_calls,
        },
        recovery_ms: 1_000,
        half_open_probes: probes,
    }
}

fn consecutive(n: u32) -> BreakerSettings {
    BreakerSettings {
        policy: BreakerPolicy::Consecutive {
            consecutive_failures: n,
        },
        recovery_ms: 1_000,
        half_open_probes: 1,
    }
}

fn breaker(settings: BreakerSettings) -> (Breaker, ManualClock) {
    let clock = ManualClock::new(1_000_000);
    (
        Breaker::with_clock("h:1".into(), settings, clock.clock(), None),
        clock,
    )
}

fn calls(b: &Breaker, n: usize, failed: bool) {
    for _ in 0..n {
        let t = b.admit().expect("admitted");
        if failed {
            t.failure()
        } else {
            t.success()
        }
    }
}

#[test]
fn window_buckets_roll_over_and_old_buckets_expire() {
    let (b, clock) = breaker(rate(0.5, 1_000, 1_000, 1));
    calls(&b, 3, true);
    calls(&b, 2, false);
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (5, 3));
    clock.advance(500); // five buckets on: still inside the window
    calls(&b, 1, false);
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (6, 3));
    clock.advance(500); // the first bucket's slot has left the window
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (1, 0));
    clock.advance(1_000); // and so has everything else
    assert_eq!(b.snapshot().calls, 0);
    // A bucket reused a whole window later starts from zero, not from its old counts.
    calls(&b, 1, true);
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (1, 1));
}

#[test]
fn a_minority_of_failures_never_opens_the_failure_rate_breaker() {
    let (b, clock) = breaker(rate(0.5, 10_000, 20, 1));
    // Ten failures in a row, then successes: 10 of 50 is 20%.
    calls(&b, 10, true);
    calls(&b, 40, false);
    for _ in 0..100 {
        calls(&b, 1, true);
        calls(&b, 4, false);
        clock.advance(100);
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn failures_at_the_rate_open_it_once_min_calls_have_finished() {
    let (b, _clock) = breaker(rate(0.5, 10_000, 20, 1));
    calls(&b, 19, true);
    assert_eq!(b.state(), BreakerState::Closed, "19 calls: below min_calls");
    calls(&b, 1, true);
    assert_eq!(b.state(), BreakerState::Open);
    let open = b.admit().expect_err("open refuses");
    assert_eq!(open.retry_after, Duration::from_millis(1_000));
    assert!(!open.probing);
    assert!(b.snapshot().next_probe_at_ms.is_some());
}

#[test]
fn min_calls_holds_it_closed_below_the_volume_until_old_calls_expire() {
    let (b, clock) = breaker(rate(0.5, 1_000, 5, 1));
    calls(&b, 4, true);
    clock.advance(1_000);
    calls(&b, 4, true);
    assert_eq!(
        b.state(),
        BreakerState::Closed,
        "never 5 calls inside one window"
    );
    calls(&b, 1, true);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn half_open_admits_exactly_the_configured_probes_and_all_must_succeed() {
    let (b, clock) = breaker(rate(0.5, 10_000, 2, 3));
    calls(&b, 2, true);
    assert_eq!(b.state(), BreakerState::Open);
    clock.advance(1_000);
    let p1 = b.admit().expect("probe 1");
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let p2 = b.admit().expect("probe 2");
    let p3 = b.admit().expect("probe 3");
    let refused = b.admit().expect_err("a fourth call waits for the verdict");
    assert!(refused.probing);
    p1.success();
    p2.success();
    assert_eq!(
        b.state(),
        BreakerState::HalfOpen,
        "two of three is not enough"
    );
    p3.success();
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.closes(), 1);
    assert_eq!(b.snapshot().calls, 0, "closing starts a fresh window");
    calls(&b, 1, true);
    assert_eq!(
        b.state(),
        BreakerState::Closed,
        "old failures do not re-open it"
    );
}

#[test]
fn a_failed_probe_reopens_for_another_recovery_period() {
    let (b, clock) = breaker(rate(0.5, 10_000, 1, 2));
    calls(&b, 1, true);
    clock.advance(1_000);
    let p1 = b.admit().expect("probe");
    let p2 = b.admit().expect("probe");
    p1.success();
    p2.failure();
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        b.admit().expect_err("open").retry_after,
        Duration::from_millis(1_000)
    );
    clock.advance(999);
    assert!(b.admit().is_err());
    clock.advance(1);
    b.admit().expect("next probe").success();
    assert_eq!(b.state(), BreakerState::HalfOpen, "needs both probes again");
}

#[test]
fn a_dropped_ticket_is_a_failure_and_a_forgone_one_returns_its_probe() {
    let (b, clock) = breaker(consecutive(2));
    drop(b.admit().expect("admitted"));
    drop(b.admit().expect("admitted"));
    assert_eq!(
        b.state(),
        BreakerState::Open,
        "two cancelled calls are two failures"
    );
    clock.advance(1_000);
    b.admit().expect("probe").forgo();
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let probe = b.admit().expect("the forgone probe's place is free again");
    drop(probe);
    assert_eq!(
        b.state(),
        BreakerState::Open,
        "a cancelled probe re-opens it"
    );
}

/// The outer deadline cancels the future that holds the ticket: the outcome is not lost.
#[tokio::test]
async fn a_call_cancelled_by_an_outer_deadline_records_a_failure() {
    let (b, _clock) = breaker(consecutive(1));
    let call = async {
        let _ticket = b.admit().expect("admitted");
        std::future::pending::<()>().await;
    };
    assert!(tokio::time::timeout(Duration::from_millis(5), call)
        .await
        .is_err());
    assert_eq!(b.snapshot().failures, 1);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn a_ticket_dropped_before_its_deadline_records_nothing_and_after_it_a_failure() {
    let (b, clock) = breaker(consecutive(1));
    drop(
        b.admit()
            .expect("admitted")
            .until(Duration::from_millis(100)),
    );
    let shown = b.snapshot();
    assert_eq!((shown.calls, shown.failures), (0, 0), "the caller hung up");
    assert_eq!(b.state(), BreakerState::Closed);

    let late = b
        .admit()
        .expect("admitted")
        .until(Duration::from_millis(100));
    clock.advance(100);
    drop(late);
    assert_eq!(b.snapshot().failures, 1, "the host never answered in time");
    assert_eq!(b.state(), BreakerState::Open);

    // A probe abandoned early gives its place back to the half-open period.
    clock.advance(1_000);
    drop(b.admit().expect("probe").until(Duration::from_millis(100)));
    b.admit().expect("the same probe again").success();
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn consecutive_policy_opens_after_n_in_a_row_and_successes_reset_it() {
    let (b, clock) = breaker(consecutive(3));
    calls(&b, 2, true);
    calls(&b, 1, false);
    calls(&b, 2, true);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.snapshot().consecutive_failures, 2);
    calls(&b, 1, true);
    assert_eq!(b.state(), BreakerState::Open);
    clock.advance(1_000);
    let probe = b.admit().expect("probe");
    assert!(b.admit().is_err(), "one probe by default");
    probe.success();
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn a_call_admitted_while_closed_does_not_decide_the_half_open_period() {
    let (b, clock) = breaker(consecutive(1));
    let slow = b.admit().expect("admitted while closed");
    calls(&b, 1, true);
    clock.advance(1_000);
    let probe = b.admit().expect("probe");
    slow.failure();
    assert_eq!(b.state(), BreakerState::HalfOpen);
    probe.success();
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn the_close_hook_runs_once_per_close() {
    let clock = ManualClock::new(0);
    let seen = Arc::new(AtomicU32::new(0));
    let hook_seen = seen.clone();
    let hook: CloseHook = Arc::new(move |_host: &Arc<str>| {
        hook_seen.fetch_add(1, Ordering::SeqCst);
    });
    let b = Breaker::with_clock("h:9".into(), consecutive(1), clock.clock(), Some(hook));
    calls(&b, 1, true);
    clock.advance(1_000);
    b.admit().expect("probe").success();
    calls(&b, 1, false);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[test]
fn concurrent_calls_count_exactly() {
    let (b, _clock) = breaker(rate(0.99, 10_000, u32::MAX, 1));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..1_000 {
                    let t = b.admit().expect("closed");
                    if i % 5 == 0 {
                        t.failure()
                    } else {
                        t.success()
                    }
                }
            });
        }
    });
    let snap = b.snapshot();
    assert_eq!((snap.calls, snap.failures), (4_000, 800));
    assert!((snap.rate - 0.2).abs() < 1e-9);
}

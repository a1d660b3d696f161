//! Per-host circuit breaker: failsafe's state machine plus a single half-open probe.
//!
//! failsafe decides when to open (N consecutive failures) and when the open period is over.
//! Two things are added here. First, failsafe lets *every* call through once half-open; a host
//! that just came back should see one probe, not the whole backlog, so a probe flag admits
//! exactly one call while half-open. Second, the state, failure count and next probe time are
//! mirrored in atomics so `/v1/circuits` and the metrics read them without taking failsafe's lock.
//!
//! Only failures that say the host is unwell count: 5xx, timeouts, connection errors. A 4xx is
//! the caller's problem and counts as a success for the host.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{consecutive_failures, ConsecutiveFailures};
use failsafe::{Config, Instrument, StateMachine};
use serde::Serialize;

use crate::clock::now_ms;

/// Breaker state as reported by the admin API and the `hookyard_circuit_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct Mirror {
    host: Arc<str>,
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// When the open period ends (unix ms), 0 when not open.
    next_probe_at_ms: AtomicI64,
    recovery_ms: u64,
    probe_in_flight: AtomicBool,
}

/// failsafe calls these on every transition.
#[derive(Debug, Clone)]
struct Observer(Arc<Mirror>);

impl Observer {
    fn set(&self, state: BreakerState) {
        let old = BreakerState::from_u8(self.0.state.swap(state as u8, Ordering::AcqRel));
        if old != state {
            crate::metrics::circuit_transition(&self.0.host, state);
            tracing::info!(host = %self.0.host, from = old.as_str(), to = state.as_str(), "circuit breaker transition");
        }
    }
}

impl Instrument for Observer {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.0
            .next_probe_at_ms
            .store(now_ms() + self.0.recovery_ms as i64, Ordering::Release);
        self.set(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.set(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.0.next_probe_at_ms.store(0, Ordering::Release);
        self.set(BreakerState::Closed);
    }
}

type Machine = StateMachine<ConsecutiveFailures<Constant>, Observer>;

/// The circuit breaker of one host.
#[derive(Debug, Clone)]
pub struct Breaker {
    machine: Machine,
    mirror: Arc<Mirror>,
    failure_threshold: u32,
}

/// The breaker refused the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    /// When the next probe may go through.
    pub retry_after: Duration,
}

/// Permission to make one call; report its result with `success` or `failure`.
/// Dropped without a report (the caller gave up), it records nothing and frees the probe.
#[derive(Debug)]
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Ticket<'_> {
    /// The host answered in a way that shows it is healthy (2xx-4xx).
    pub fn success(mut self) {
        self.reported = true;
        let failures_before = self
            .breaker
            .mirror
            .consecutive_failures
            .swap(0, Ordering::AcqRel);
        // A success on a closed breaker with no failures counted changes nothing in failsafe;
        // skipping it keeps failsafe's lock (shared by every event loop) off the hot path.
        if failures_before > 0 || self.probe || self.breaker.state() != BreakerState::Closed {
            self.breaker.machine.on_success();
        }
        self.release_probe();
    }

    /// 5xx, timeout, or connection error.
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker
            .mirror
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel);
        self.breaker.machine.on_error();
        self.release_probe();
    }

    fn release_probe(&self) {
        if self.probe {
            self.breaker
                .mirror
                .probe_in_flight
                .store(false, Ordering::Release);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.release_probe();
        }
    }
}

/// What `/v1/circuits` shows for one host.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub failure_threshold: u32,
    pub recovery_ms: u64,
    /// Unix ms when an open breaker lets its probe through.
    pub next_probe_at_ms: Option<i64>,
}

impl Breaker {
    /// A closed breaker that opens after `failures` consecutive failures for `recovery`.
    pub fn new(host: Arc<str>, failures: u32, recovery: Duration) -> Self {
        let mirror = Arc::new(Mirror {
            host,
            state: AtomicU8::new(BreakerState::Closed as u8),
            consecutive_failures: AtomicU32::new(0),
            next_probe_at_ms: AtomicI64::new(0),
            recovery_ms: recovery.as_millis() as u64,
            probe_in_flight: AtomicBool::new(false),
        });
        let machine = Config::new()
            .failure_policy(consecutive_failures(failures, backoff::constant(recovery)))
            .instrument(Observer(mirror.clone()))
            .build();
        Self {
            machine,
            mirror,
            failure_threshold: failures,
        }
    }

    /// Asks to make a call.
    pub fn admit(&self) -> Result<Ticket<'_>, CircuitOpen> {
        // Closed admits every call; failsafe's lock is needed only to decide when an open
        // breaker turns half-open. The mirror is updated inside failsafe's transitions, so a
        // call racing a transition to open is at most one more call to a failing host.
        let closed = self.state() == BreakerState::Closed;
        if !closed && !self.machine.is_call_permitted() {
            return Err(self.open_error());
        }
        let probe = self.state() == BreakerState::HalfOpen;
        if probe
            && self
                .mirror
                .probe_in_flight
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            // Another call is already probing; wait for its verdict.
            return Err(CircuitOpen {
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(Ticket {
            breaker: self,
            probe,
            reported: false,
        })
    }

    fn open_error(&self) -> CircuitOpen {
        let at = self.mirror.next_probe_at_ms.load(Ordering::Acquire);
        let wait = (at - now_ms()).max(0) as u64;
        CircuitOpen {
            retry_after: Duration::from_millis(wait),
        }
    }

    /// The state right now.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.mirror.state.load(Ordering::Acquire))
    }

    /// True when the breaker was built with these thresholds (a reload keeps it then).
    pub fn has_policy(&self, failures: u32, recovery: Duration) -> bool {
        self.failure_threshold == failures && self.mirror.recovery_ms == recovery.as_millis() as u64
    }

    /// State, counts and next probe time.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let next = self.mirror.next_probe_at_ms.load(Ordering::Acquire);
        BreakerSnapshot {
            state: self.state(),
            consecutive_failures: self.mirror.consecutive_failures.load(Ordering::Acquire),
            failure_threshold: self.failure_threshold,
            recovery_ms: self.mirror.recovery_ms,
            next_probe_at_ms: (next > 0).then_some(next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_admits_one_probe() {
        let b = Breaker::new("h:1".into(), 3, Duration::from_millis(30));
        for _ in 0..3 {
            b.admit().unwrap().failure();
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().expect("probe after recovery");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit().is_err(), "only one probe while half-open");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_failed_probe_reopens_and_an_abandoned_probe_frees_the_slot() {
        let b = Breaker::new("h:2".into(), 1, Duration::from_millis(20));
        b.admit().unwrap().failure();
        std::thread::sleep(Duration::from_millis(30));
        drop(b.admit().expect("probe"));
        let probe = b.admit().expect("abandoned probe frees the slot");
        probe.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_err());
    }

    #[test]
    fn successes_reset_the_consecutive_count() {
        let b = Breaker::new("h:3".into(), 2, Duration::from_secs(60));
        b.admit().unwrap().failure();
        b.admit().unwrap().success();
        b.admit().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 1);
    }
}

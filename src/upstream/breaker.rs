//! Per-host circuit breaker: a failure-rate or consecutive-failures policy, a bounded number of
//! half-open probes, and no lock or allocation on the path of a call.
//!
//! # Why its own state machine
//!
//! hookyard used `failsafe` before; it has no failure-rate policy, lets *every* call through
//! once half-open, and its backoff panics below one second. `tower-resilience-circuitbreaker`
//! has a failure rate and a probe limit, but takes a `tokio::sync::Mutex` around every recorded
//! outcome, keeps its time-based window as a `VecDeque` with one record pushed per call, reads
//! `Instant::now()` itself (no clock to inject in tests), records nothing for a call whose
//! future is cancelled, and is shaped as a tower `Service` where hookyard needs an admit/report
//! ticket that both the sync relay and the async workers (which *defer* rather than fail) use.
//! The state machine below is small enough to own.
//!
//! # The invariants
//!
//! - The state, the half-open probe allowance, the probe successes so far and a generation are
//!   one `AtomicU64`, changed only by compare-and-swap: a transition is decided by exactly one
//!   caller, which alone reports it (log, metric, close signal).
//! - The rolling window is [`BUCKETS`] buckets, each one `AtomicU64` holding its time slot and
//!   its call and failure counts. Recording a call is one compare-and-swap on the current
//!   bucket; buckets older than the window are ignored when summed and reused when their slot
//!   comes round again. Both policies keep the window (it is what `/v1/circuits` shows).
//! - A [`Ticket`] that is dropped without a verdict (its future was cancelled by an outer
//!   deadline) records a failure: a host slower than the caller's patience is not healthy. A
//!   ticket whose call was never made (the gate was full) is given back with
//!   [`Ticket::forgo`].
//! - A probe's verdict counts only in the half-open period that issued it (the generation
//!   check); a call admitted while closed that ends during half-open only feeds the window.
//!
//! Only failures that say the host is unwell count: 5xx, timeouts, connection errors. A 4xx is
//! the caller's problem and counts as a success for the host.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::circuit::BreakerState;
use crate::clock::Clock;
use crate::config::{BreakerPolicy, BreakerSettings};

/// Buckets per rolling window. Ten keeps the window's edge within a tenth of `window_ms` while
/// summing it stays ten loads.
pub const BUCKETS: usize = 10;

/// The state packed in the low two bits of the core word.
fn state_from_bits(v: u64) -> BreakerState {
    match v & 0b11 {
        1 => BreakerState::Open,
        2 => BreakerState::HalfOpen,
        _ => BreakerState::Closed,
    }
}

/// The packed core: bits 0-1 state, 2-17 probes still to admit, 18-33 probe successes,
/// 34-63 generation (bumped on every entry to half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Core {
    state: BreakerState,
    probes_left: u16,
    successes: u16,
    generation: u32,
}

impl Core {
    const GEN_MASK: u32 = (1 << 30) - 1;

    fn unpack(v: u64) -> Self {
        Self {
            state: state_from_bits(v),
            probes_left: ((v >> 2) & 0xffff) as u16,
            successes: ((v >> 18) & 0xffff) as u16,
            generation: (v >> 34) as u32 & Self::GEN_MASK,
        }
    }

    fn pack(self) -> u64 {
        self.state as u64
            | u64::from(self.probes_left) << 2
            | u64::from(self.successes) << 18
            | u64::from(self.generation & Self::GEN_MASK) << 34
    }
}

/// One bucket of the window packed in a `u64`: bits 32-63 the bucket's slot number
/// (`now / bucket_ms`, truncated), 16-31 calls, 0-15 failures. A bucket that reaches 65535
/// calls stops counting: the rest of its slot is judged by that sample, which keeps the ratio
/// right (both counts stop together) at any traffic.
#[derive(Debug, Default)]
struct Bucket(AtomicU64);

const COUNT_MAX: u64 = 0xffff;

impl Bucket {
    fn decode(v: u64) -> (u32, u64, u64) {
        ((v >> 32) as u32, (v >> 16) & COUNT_MAX, v & COUNT_MAX)
    }

    fn record(&self, slot: u32, failed: bool) {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (s, calls, failures) = Self::decode(cur);
            let (calls, failures) = if s == slot { (calls, failures) } else { (0, 0) };
            if calls == COUNT_MAX {
                return;
            }
            let next = u64::from(slot) << 32 | (calls + 1) << 16 | (failures + u64::from(failed));
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// The rolling window: calls and failures over the last `window_ms`.
#[derive(Debug)]
struct Window {
    buckets: [Bucket; BUCKETS],
    /// Buckets in use (fewer than [`BUCKETS`] only for a window under 10 ms).
    used: u32,
    bucket_ms: i64,
}

impl Window {
    fn new(window_ms: u64) -> Self {
        let used = (window_ms.clamp(1, BUCKETS as u64)) as u32;
        Self {
            buckets: Default::default(),
            used,
            bucket_ms: (window_ms / u64::from(used)).max(1) as i64,
        }
    }

    fn slot(&self, now_ms: i64) -> u32 {
        (now_ms.max(0) / self.bucket_ms) as u32
    }

    fn record(&self, now_ms: i64, failed: bool) {
        let slot = self.slot(now_ms);
        self.buckets[(slot % self.used) as usize].record(slot, failed);
    }

    /// (calls, failures) in the buckets of the last `used` slots, the current one included.
    fn totals(&self, now_ms: i64) -> (u64, u64) {
        let current = self.slot(now_ms);
        let mut calls = 0;
        let mut failures = 0;
        for b in &self.buckets[..self.used as usize] {
            let (slot, c, f) = Bucket::decode(b.0.load(Ordering::Acquire));
            if current.wrapping_sub(slot) < self.used {
                calls += c;
                failures += f;
            }
        }
        (calls, failures)
    }

    fn clear(&self) {
        for b in &self.buckets {
            b.0.store(0, Ordering::Release);
        }
    }
}

/// Called with the host's key each time its breaker closes after a successful probe, so the
/// queue can make the events it deferred due at once.
pub type CloseHook = Arc<dyn Fn(&Arc<str>) + Send + Sync>;

struct Inner {
    host: Arc<str>,
    settings: BreakerSettings,
    clock: Clock,
    core: AtomicU64,
    window: Window,
    consecutive: AtomicU32,
    /// When the open period ends (unix ms); meaningful only while open.
    open_until_ms: AtomicI64,
    /// Times the breaker closed after probing; lets a deferral notice it raced a close.
    closes: AtomicU64,
    on_close: Option<CloseHook>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("host", &self.host)
            .field("settings", &self.settings)
            .field("core", &Core::unpack(self.core.load(Ordering::Relaxed)))
            .finish_non_exhaustive()
    }
}

/// The circuit breaker of one host. Clones share one state.
#[derive(Debug, Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

/// The breaker refused the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    /// How long until a call may be admitted again: the rest of the open period, or (while
    /// half-open probes decide) the open period a failed probe would start.
    pub retry_after: Duration,
    /// True when the breaker is half-open and its probes are out; their verdict, not a time,
    /// ends the wait.
    pub probing: bool,
}

/// Permission to make one call. Report its outcome with [`Ticket::success`] or
/// [`Ticket::failure`]; dropped without either (the caller's future was cancelled), it records
/// a failure. A call that was not made after all is given back with [`Ticket::forgo`].
#[derive(Debug)]
#[must_use = "report the call's outcome, or forgo the ticket"]
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    /// The half-open generation this probe belongs to, for probes.
    probe: Option<u32>,
    done: bool,
    /// Unix ms by which the call owed the host an answer, when the caller said so.
    deadline_ms: Option<i64>,
}

impl Ticket<'_> {
    /// The call's own deadline: a ticket dropped before it (the caller hung up, the future was
    /// cancelled for a reason of the caller's) learned nothing about the host and records
    /// nothing; dropped at or after it, the host did not answer in time, which is a failure.
    pub fn until(mut self, deadline: std::time::Duration) -> Self {
        let ms = i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX);
        self.deadline_ms = Some(self.breaker.inner.clock.now_ms().saturating_add(ms));
        self
    }

    /// The host answered in a way that shows it is healthy (2xx-4xx).
    pub fn success(mut self) {
        self.done = true;
        self.breaker.record(self.probe, false);
    }

    /// 5xx, timeout, or connection error.
    pub fn failure(mut self) {
        self.done = true;
        self.breaker.record(self.probe, true);
    }

    /// The call was not made (the host's gate was full): nothing is recorded, and a probe's
    /// place is given back to the half-open period that issued it.
    pub fn forgo(mut self) {
        self.done = true;
        if let Some(generation) = self.probe {
            self.breaker.return_probe(generation);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let abandoned_early = self
            .deadline_ms
            .is_some_and(|deadline| self.breaker.inner.clock.now_ms() < deadline);
        if abandoned_early {
            if let Some(generation) = self.probe {
                self.breaker.return_probe(generation);
            }
        } else {
            self.breaker.record(self.probe, true);
        }
    }
}

/// What `/v1/circuits` shows for one host.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    /// `failure_rate` or `consecutive`, with that policy's thresholds.
    #[serde(flatten)]
    pub policy: BreakerPolicy,
    pub recovery_ms: u64,
    pub half_open_probes: u32,
    /// Calls finished in the current rolling window, and how many of them failed.
    pub calls: u64,
    pub failures: u64,
    /// `failures / calls` in the window (0 with no calls).
    pub rate: f64,
    /// Length of the window those counts cover (for the consecutive policy, which has no
    /// window of its own, 10 s).
    pub counts_window_ms: u64,
    /// Failures in a row right now.
    pub consecutive_failures: u32,
    /// Unix ms when an open breaker lets its probes through.
    pub next_probe_at_ms: Option<i64>,
}

impl Breaker {
    /// A closed breaker with `settings`, on the system clock.
    pub fn new(host: Arc<str>, settings: BreakerSettings) -> Self {
        Self::with_clock(host, settings, Clock::System, None)
    }

    /// A closed breaker reading time from `clock`, calling `on_close` when a probe closes it.
    pub fn with_clock(
        host: Arc<str>,
        settings: BreakerSettings,
        clock: Clock,
        on_close: Option<CloseHook>,
    ) -> Self {
        // The consecutive policy has no window of its own; its window only feeds the admin
        // view, over the failure-rate policy's default length.
        let window_ms = match settings.policy {
            BreakerPolicy::FailureRate { window_ms, .. } => window_ms,
            BreakerPolicy::Consecutive { .. } => 10_000,
        };
        Self {
            inner: Arc::new(Inner {
                host,
                settings,
                clock,
                core: AtomicU64::new(
                    Core {
                        state: BreakerState::Closed,
                        probes_left: 0,
                        successes: 0,
                        generation: 0,
                    }
                    .pack(),
                ),
                window: Window::new(window_ms),
                consecutive: AtomicU32::new(0),
                open_until_ms: AtomicI64::new(0),
                closes: AtomicU64::new(0),
                on_close,
            }),
        }
    }

    /// Asks to make a call.
    pub fn admit(&self) -> Result<Ticket<'_>, CircuitOpen> {
        let inner = &*self.inner;
        let mut raw = inner.core.load(Ordering::Acquire);
        loop {
            let core = Core::unpack(raw);
            let next = match core.state {
                // The common case: one load, no write.
                BreakerState::Closed => {
                    return Ok(Ticket {
                        breaker: self,
                        probe: None,
                        done: false,
                        deadline_ms: None,
                    })
                }
                BreakerState::Open => {
                    let now = inner.clock.now_ms();
                    let until = inner.open_until_ms.load(Ordering::Acquire);
                    if now < until {
                        return Err(CircuitOpen {
                            retry_after: Duration::from_millis((until - now) as u64),
                            probing: false,
                        });
                    }
                    Core {
                        state: BreakerState::HalfOpen,
                        probes_left: self.probes().saturating_sub(1),
                        successes: 0,
                        generation: core.generation.wrapping_add(1) & Core::GEN_MASK,
                    }
                }
                BreakerState::HalfOpen if core.probes_left == 0 => {
                    return Err(CircuitOpen {
                        retry_after: Duration::from_millis(inner.settings.recovery_ms),
                        probing: true,
                    })
                }
                BreakerState::HalfOpen => Core {
                    probes_left: core.probes_left - 1,
                    ..core
                },
            };
            match inner.core.compare_exchange_weak(
                raw,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if core.state == BreakerState::Open {
                        self.announce(BreakerState::Open, BreakerState::HalfOpen);
                    }
                    return Ok(Ticket {
                        breaker: self,
                        probe: Some(next.generation),
                        done: false,
                        deadline_ms: None,
                    });
                }
                Err(actual) => raw = actual,
            }
        }
    }

    fn probes(&self) -> u16 {
        self.inner
            .settings
            .half_open_probes
            .clamp(1, u32::from(u16::MAX)) as u16
    }

    fn record(&self, probe: Option<u32>, failed: bool) {
        let inner = &*self.inner;
        let now = inner.clock.now_ms();
        inner.window.record(now, failed);
        if let Some(generation) = probe {
            return self.probe_verdict(generation, failed, now);
        }
        let tripped = if failed {
            match inner.settings.policy {
                BreakerPolicy::Consecutive {
                    consecutive_failures,
                } => inner.consecutive.fetch_add(1, Ordering::AcqRel) + 1 >= consecutive_failures,
                BreakerPolicy::FailureRate {
                    failure_rate,
                    min_calls,
                    ..
                } => {
                    inner.consecutive.fetch_add(1, Ordering::AcqRel);
                    let (calls, failures) = inner.window.totals(now);
                    calls >= u64::from(min_calls) && failures as f64 >= failure_rate * calls as f64
                }
            }
        } else {
            // Read before writing: a healthy host's successes leave the line unmodified.
            if inner.consecutive.load(Ordering::Relaxed) != 0 {
                inner.consecutive.store(0, Ordering::Release);
            }
            false
        };
        if tripped {
            self.open_from(BreakerState::Closed, None, now);
        }
    }

    fn probe_verdict(&self, generation: u32, failed: bool, now: i64) {
        let inner = &*self.inner;
        let mut raw = inner.core.load(Ordering::Acquire);
        loop {
            let core = Core::unpack(raw);
            if core.state != BreakerState::HalfOpen || core.generation != generation {
                return; // a verdict on a half-open period that is over
            }
            if failed {
                return self.open_from(BreakerState::HalfOpen, Some(generation), now);
            }
            let successes = core.successes.saturating_add(1);
            let closing = successes >= self.probes();
            let next = if closing {
                Core {
                    state: BreakerState::Closed,
                    probes_left: 0,
                    successes: 0,
                    generation,
                }
            } else {
                Core { successes, ..core }
            };
            match inner.core.compare_exchange_weak(
                raw,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if closing {
                        // A fresh start: the failures that opened it must not re-open it.
                        inner.window.clear();
                        inner.consecutive.store(0, Ordering::Release);
                        inner.closes.fetch_add(1, Ordering::AcqRel);
                        self.announce(BreakerState::HalfOpen, BreakerState::Closed);
                        if let Some(hook) = &inner.on_close {
                            hook(&inner.host);
                        }
                    }
                    return;
                }
                Err(actual) => raw = actual,
            }
        }
    }

    /// Opens the breaker if it is still `from` (and, from half-open, still in `generation`).
    fn open_from(&self, from: BreakerState, generation: Option<u32>, now: i64) {
        let inner = &*self.inner;
        let mut raw = inner.core.load(Ordering::Acquire);
        loop {
            let core = Core::unpack(raw);
            if core.state != from || generation.is_some_and(|g| g != core.generation) {
                return;
            }
            // Written before the state flips, so whoever sees `Open` sees its end. Callers
            // racing to open write nearly the same instant.
            inner
                .open_until_ms
                .store(now + inner.settings.recovery_ms as i64, Ordering::Release);
            let next = Core {
                state: BreakerState::Open,
                probes_left: 0,
                successes: 0,
                generation: core.generation,
            };
            match inner.core.compare_exchange_weak(
                raw,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return self.announce(from, BreakerState::Open),
                Err(actual) => raw = actual,
            }
        }
    }

    fn return_probe(&self, generation: u32) {
        let inner = &*self.inner;
        let mut raw = inner.core.load(Ordering::Acquire);
        loop {
            let core = Core::unpack(raw);
            if core.state != BreakerState::HalfOpen || core.generation != generation {
                return;
            }
            let next = Core {
                probes_left: core.probes_left.saturating_add(1),
                ..core
            };
            match inner.core.compare_exchange_weak(
                raw,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => raw = actual,
            }
        }
    }

    fn announce(&self, from: BreakerState, to: BreakerState) {
        let inner = &*self.inner;
        crate::metrics::circuit_transition(&inner.host, to);
        let (calls, failures) = inner.window.totals(inner.clock.now_ms());
        tracing::info!(
            host = %inner.host,
            policy = inner.settings.policy.name(),
            from = from.as_str(),
            to = to.as_str(),
            calls,
            failures,
            "circuit breaker transition"
        );
    }

    /// The state right now.
    pub fn state(&self) -> BreakerState {
        Core::unpack(self.inner.core.load(Ordering::Acquire)).state
    }

    /// How many times a probe has closed this breaker; a deferral that saw the count change
    /// while it was being written knows it raced a close.
    pub fn closes(&self) -> u64 {
        self.inner.closes.load(Ordering::Acquire)
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &BreakerSettings {
        &self.inner.settings
    }

    /// State, window counts and next probe time.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let inner = &*self.inner;
        let state = self.state();
        let (calls, failures) = inner.window.totals(inner.clock.now_ms());
        BreakerSnapshot {
            state,
            policy: inner.settings.policy,
            recovery_ms: inner.settings.recovery_ms,
            half_open_probes: inner.settings.half_open_probes,
            calls,
            failures,
            rate: if calls == 0 {
                0.0
            } else {
                failures as f64 / calls as f64
            },
            counts_window_ms: inner.window.bucket_ms as u64 * u64::from(inner.window.used),
            consecutive_failures: inner.consecutive.load(Ordering::Acquire),
            next_probe_at_ms: (state == BreakerState::Open)
                .then(|| inner.open_until_ms.load(Ordering::Acquire)),
        }
    }
}

#[cfg(test)]
mod tests;

//! Async delivery workers: claim due events, send them signed, classify, reschedule.
//!
//! One claimer per queue leases up to `concurrency` events at a time and runs each delivery as
//! its own task. It sleeps exactly until the next due time (or until an enqueue wakes it), so
//! retry delays are honoured to the millisecond without a polling loop. Async deliveries pass
//! through the same per-host gate and breaker as sync calls: an open breaker or a full gate
//! *defers* the event (no attempt is counted); it never drops it. A breaker deferral is recorded
//! with the host, until the next probe time; when a probe closes that breaker,
//! [`undefer_on_close`] makes those events due at once, and at startup it makes every breaker
//! deferral due (the breakers that made them died with the previous process).

mod classify;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

pub use classify::{classify, retry_delay, Verdict};

use crate::clock::now_ms;
use crate::context::Context;
use crate::queue::{AttemptRecord, ClaimedEvent, Completion, Disposition};
use crate::routing::{DeliveryMode, Target};
use crate::secret::Redacted;
use crate::upstream::{request, Attempted, Envelope, Refusal, ResponseBody};

/// Longest a worker sleeps without looking at the store, so events enqueued by another
/// instance sharing the store (or leases expiring) are noticed.
const MAX_IDLE: Duration = Duration::from_millis(500);
/// How long an event waits before retrying when its host's gate is full.
const GATE_FULL_DEFER: Duration = Duration::from_millis(25);
/// Backoff after a store error, so a broken disk or lost Redis is not hammered.
const STORE_ERROR_BACKOFF: Duration = Duration::from_millis(250);

/// Runs the workers of every queue until `shutdown` turns true; then lets deliveries in flight
/// finish (they are bounded by their own deadline) and returns.
pub async fn run(ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let mut queues: HashSet<Arc<str>> = HashSet::new();
    let mut set = JoinSet::new();
    if let Some(closes) = ctx.take_breaker_closes() {
        set.spawn(undefer_on_close(ctx.clone(), closes, shutdown.clone()));
    }
    let mut shutdown_rx = shutdown.clone();
    loop {
        // Queues can appear with a reload: start a claimer for each new one.
        let settings = ctx.snapshot().settings.clone();
        let wanted = settings
            .rules
            .rules()
            .iter()
            .filter(|r| r.mode == DeliveryMode::Async || r.fallback_to_async)
            .map(|r| r.queue.clone())
            .chain(std::iter::once(Arc::<str>::from("default")));
        for queue in wanted {
            if queues.insert(queue.clone()) {
                set.spawn(run_queue(ctx.clone(), queue, shutdown.clone()));
            }
        }
        tokio::select! {
            _ = shutdown_rx.changed() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    while set.join_next().await.is_some() {}
}

async fn run_queue(ctx: Arc<Context>, queue: Arc<str>, mut shutdown: watch::Receiver<bool>) {
    let concurrency = |d: &Context| d.snapshot().settings.queues.for_queue(&queue).concurrency;
    let mut workers = Workers::new(concurrency(&ctx) as usize);
    let slots = workers.slots.clone();
    let mut deliveries: JoinSet<Option<i64>> = JoinSet::new();
    let mut streak = DeferralStreak::new(workers.capacity);
    tracing::debug!(%queue, concurrency = workers.capacity, "delivery workers started");
    while !*shutdown.borrow() {
        while let Some(result) = deliveries.try_join_next() {
            streak.record(result);
        }
        // A reload may have changed the queue's concurrency: workers are added or retired here.
        if workers.resize(concurrency(&ctx) as usize) {
            streak = DeferralStreak::new(workers.capacity);
        }
        if streak.saturated() {
            // Claim nothing more: let the deferrals in flight land, then pause.
            if let Some(result) = deliveries.join_next().await {
                streak.record(result);
                continue;
            }
            if let Some(pause) = streak.take_pause() {
                // A breaker that closes makes its deferred events due now and wakes us.
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.wakeup().notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        }
        let free = workers.free();
        if free == 0 {
            tokio::select! {
                Some(result) = deliveries.join_next() => streak.record(result),
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let settings = ctx.snapshot().settings.clone();
        let lease = lease_for(max_timeout(&settings));
        // Taken before looking at the store: an enqueue's wake-up between the claim below and
        // the wait that follows it is kept instead of lost (a `Notified` receives every
        // `notify_waiters` from its creation on), so the event does not wait for `MAX_IDLE`.
        let enqueued = ctx.wakeup().notified();
        tokio::pin!(enqueued);
        let now = now_ms();
        let claimed = match ctx
            .store()
            .claim_due(&queue, now, free, lease.as_millis() as u64)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%queue, error = %e, "claiming events failed; backing off");
                tokio::time::sleep(STORE_ERROR_BACKOFF).await;
                continue;
            }
        };
        // Fewer than asked: nothing else is due now. Claiming again at once would only find
        // nothing (a write job on the store's single writer each time, which with ordering keys
        // came after nearly every delivery); wait for what can make more due instead.
        let drained = claimed.len() < free;
        let spawned = !claimed.is_empty();
        for event in claimed {
            // The semaphore is never closed, so acquire cannot fail.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (ctx, queue) = (ctx.clone(), queue.clone());
            let (slots, shutdown) = (slots.clone(), shutdown.clone());
            deliveries.spawn(async move {
                let mut next = Some((event, permit));
                let mut deferred_until = None;
                // The worker that finishes an ordering key's event carries on with the key's
                // next one, handed over by the store with the result (no claim in between),
                // until the key has none waiting or shutdown begins.
                while let Some((event, permit)) = next.take() {
                    let take_next = (!*shutdown.borrow()).then_some(lease);
                    let (until, following) = deliver(&ctx, &queue, event, permit, take_next).await;
                    deferred_until = until;
                    if let Some(following) = following {
                        // The semaphore is never closed, so acquire cannot fail.
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            break;
                        };
                        next = Some((following, permit));
                    }
                }
                deferred_until
            });
        }
        if !drained {
            continue;
        }
        let wait = match ctx.store().next_due_at(&queue).await {
            Ok(Some(due)) => Duration::from_millis((due - now_ms()).max(0) as u64).min(MAX_IDLE),
            Ok(None) => MAX_IDLE,
            Err(_) => STORE_ERROR_BACKOFF,
        };
        if wait.is_zero() {
            // Due now but not claimed: leased events whose lease ran out, or ones claimed by
            // another instance a moment ago. Look again, after letting others run.
            if !spawned {
                tokio::task::yield_now().await;
            }
            continue;
        }
        // An enqueue, or a finished delivery (a retry sooner than `wait`, or the next event of
        // its ordering key released), re-plans.
        tokio::select! {
            _ = &mut enqueued => {}
            _ = tokio::time::sleep(wait) => {}
            Some(result) = deliveries.join_next(), if !deliveries.is_empty() => streak.record(result),
            _ = shutdown.changed() => {}
        }
    }
    // Deliveries in flight finish under their own deadline; their results are recorded.
    while deliveries.join_next().await.is_some() {}
    tracing::debug!(%queue, "delivery workers stopped");
}

/// The delivery slots of one queue: a semaphore whose size follows the queue's `concurrency`
/// across reloads. Growing adds permits at once; shrinking forgets free permits and, for those
/// held by deliveries in flight, takes them as they come back, so a delivery is never cut off
/// and the number in flight settles at the new size.
struct Workers {
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Permits still to retire once deliveries in flight give them back.
    owed: usize,
}

impl Workers {
    fn new(capacity: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            owed: 0,
        }
    }

    /// Moves toward `wanted` slots; true when the size changed.
    fn resize(&mut self, wanted: usize) -> bool {
        let changed = wanted != self.capacity;
        if wanted > self.capacity {
            let mut add = wanted - self.capacity;
            let cancelled = add.min(self.owed);
            self.owed -= cancelled;
            add -= cancelled;
            self.slots.add_permits(add);
        } else if wanted < self.capacity {
            let retire = self.capacity - wanted;
            self.owed += retire - self.slots.forget_permits(retire);
        }
        self.capacity = wanted;
        while self.owed > 0 {
            match self.slots.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    self.owed -= 1;
                }
                Err(_) => break,
            }
        }
        changed
    }

    /// Slots free right now, after retiring what is owed.
    fn free(&mut self) -> usize {
        self.resize(self.capacity);
        self.slots.available_permits()
    }
}

/// Counts consecutive deliveries that were deferred without an attempt (open breaker, full
/// gate). While every recent delivery was deferred, claiming more would only churn the store:
/// each claim-and-defer is a write competing with ingress for the writer. After a run as long
/// as the worker pool, the claimer pauses until the earliest deferral ends (at most 1 s, so
/// other hosts sharing the queue wait little).
struct DeferralStreak {
    threshold: usize,
    count: usize,
    earliest_due_ms: i64,
}

impl DeferralStreak {
    fn new(concurrency: usize) -> Self {
        Self {
            threshold: concurrency.clamp(1, 16),
            count: 0,
            earliest_due_ms: i64::MAX,
        }
    }

    fn record(&mut self, result: Result<Option<i64>, tokio::task::JoinError>) {
        match result {
            Ok(Some(due)) => {
                self.count += 1;
                self.earliest_due_ms = self.earliest_due_ms.min(due);
            }
            _ => *self = Self::new(self.threshold),
        }
    }

    fn saturated(&self) -> bool {
        self.count >= self.threshold
    }

    fn take_pause(&mut self) -> Option<Duration> {
        if !self.saturated() {
            return None;
        }
        let pause = (self.earliest_due_ms - now_ms()).clamp(0, 1000) as u64;
        *self = Self::new(self.threshold);
        Some(Duration::from_millis(pause))
    }
}

/// How long a worker may hold an event before another may take it: the attempt's deadline
/// plus a margin for signing and bookkeeping.
pub fn lease_for(timeout: Duration) -> Duration {
    timeout + Duration::from_secs(5)
}

fn max_timeout(settings: &crate::config::Settings) -> Duration {
    settings
        .rules
        .rules()
        .iter()
        .map(|r| r.timeout)
        .max()
        .unwrap_or(Duration::from_secs(10))
}

/// Makes one attempt at `event` and records what happened. Returns the new due time when the
/// attempt was deferred without being made (open breaker, full gate), and, when `take_next`
/// (a lease length) is given and this finished its ordering key's event, the key's next event,
/// leased to this worker.
///
/// `slot` (a place in the queue's worker pool) is given back once the attempt is made, before
/// its result is written: the event stays leased until that write lands, so it cannot be
/// claimed twice, and the next claim no longer waits behind this write in the store.
pub async fn deliver(
    ctx: &Context,
    queue: &Arc<str>,
    claimed: ClaimedEvent,
    slot: OwnedSemaphorePermit,
    take_next: Option<Duration>,
) -> (Option<i64>, Option<ClaimedEvent>) {
    let (attempt, disposition, deferral) = attempt(ctx, &claimed).await;
    drop(slot);
    let deferred_until = match disposition {
        Disposition::Defer { due_at_ms, .. } => Some(due_at_ms),
        _ => None,
    };
    match &disposition {
        Disposition::Delivered => crate::metrics::delivery_final(queue, "delivered"),
        Disposition::DeadLetter { .. } => crate::metrics::delivery_final(queue, "dead_lettered"),
        _ => {}
    }
    let store = ctx.store();
    let now = now_ms();
    let done = match take_next {
        // Only an ordered event can have a next one to hand over.
        Some(lease) if claimed.ordering.is_some() => {
            store
                .complete_and_take_next(
                    &claimed.event.id,
                    &claimed.lease_token,
                    attempt,
                    disposition,
                    now,
                    lease.as_millis() as u64,
                )
                .await
        }
        _ => store
            .complete(
                &claimed.event.id,
                &claimed.lease_token,
                attempt,
                disposition,
                now,
            )
            .await
            .map(|recorded| Completion {
                recorded,
                next: None,
            }),
    };
    // A failed write here is not a lost event: the lease expires and the event is claimed again.
    let next = match done {
        Ok(c) => c.next,
        Err(e) => {
            tracing::error!(event_id = %claimed.event.id, error = %e, "could not record delivery result; the lease will expire and the event will be retried");
            None
        }
    };
    if let Some(d) = deferral {
        // The breaker closed while this deferral was being written: the close's undefer may
        // have run before the write landed and missed this claimed. Make it due now.
        if d.host.breaker.closes() != d.closes_seen {
            undefer(ctx, &d.host.key).await;
        }
    }
    (deferred_until, next)
}

/// An event deferred by an open breaker: which host, and how many times that breaker had
/// closed when it refused the claimed.
struct BreakerDeferral {
    host: Arc<crate::upstream::Host>,
    closes_seen: u64,
}

/// Makes the events `host`'s breaker deferred due now and wakes the claimers.
pub async fn undefer(ctx: &Context, host: &str) {
    match ctx.store().undefer(host, now_ms()).await {
        Ok(n) => {
            if n > 0 {
                tracing::info!(
                    host,
                    events = n,
                    "circuit closed: deferred events are due now"
                );
            }
            ctx.wakeup().notify();
        }
        // They stay due at the next probe time they were given; nothing is lost.
        Err(e) => tracing::warn!(host, error = %e, "could not make breaker-deferred events due"),
    }
}

/// Makes every breaker-deferred event due (at startup, when no breaker that deferred one is
/// alive), then makes the events of each breaker that closes due as it closes, until shutdown.
pub async fn undefer_on_close(
    ctx: Arc<Context>,
    mut closes: tokio::sync::mpsc::UnboundedReceiver<Arc<str>>,
    mut shutdown: watch::Receiver<bool>,
) {
    match ctx.store().undefer_all(now_ms()).await {
        Ok(n) if n > 0 => {
            tracing::info!(
                events = n,
                "events deferred by breakers of a previous run are due now"
            );
            ctx.wakeup().notify();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not make breaker-deferred events due"),
    }
    loop {
        tokio::select! {
            host = closes.recv() => match host {
                Some(host) => undefer(&ctx, &host).await,
                None => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn attempt(
    ctx: &Context,
    claimed: &ClaimedEvent,
) -> (Option<AttemptRecord>, Disposition, Option<BreakerDeferral>) {
    if ctx.disabled().contains(&claimed.target) {
        return (
            None,
            Disposition::DeadLetter {
                reason: "target_disabled".into(),
            },
            None,
        );
    }
    // The stored URL is the one the rule had when the event was accepted, credentials
    // included; `Target::parse` splits them off into the Authorization header again.
    let target = match Target::parse(Redacted::url(claimed.target.as_str())) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(event_id = %claimed.event.id, error = %e, "stored target is not a usable URL");
            return (
                None,
                Disposition::DeadLetter {
                    reason: "invalid_target".into(),
                },
                None,
            );
        }
    };
    let host = ctx.host(&target.host);
    let closes_seen = host.breaker.closes();
    let settings = ctx.snapshot().settings.clone();
    let started_at_ms = now_ms();
    // Only the status decides an async attempt: the body is discarded, so a 2xx with a body
    // past the response cap is a delivery, not a failure to retry.
    let attempted = host
        .attempt(
            DeliveryMode::Async,
            Duration::from_millis(claimed.timeout_ms),
            ResponseBody::Discard,
            || {
                let envelope = Envelope {
                    event: &claimed.event,
                    signature: claimed.signature,
                    ordering: claimed.ordering.as_ref(),
                };
                request::build(
                    &target,
                    &envelope,
                    DeliveryMode::Async,
                    claimed.attempt,
                    &settings.signer,
                    started_at_ms / 1000,
                )
            },
        )
        .await;
    let Attempted { result, latency } = match attempted {
        Ok(attempted) => attempted,
        Err(Refusal::CircuitOpen { retry_after }) => {
            // Until the next probe time (or, while probes are out, the open period a failed
            // probe would start); a probe that closes the breaker makes it due sooner.
            let due_at_ms =
                now_ms() + retry_after.max(Duration::from_millis(10)).as_millis() as i64;
            return (
                None,
                Disposition::Defer {
                    due_at_ms,
                    breaker: Some(host.key.to_string()),
                },
                Some(BreakerDeferral {
                    host: host.clone(),
                    closes_seen,
                }),
            );
        }
        Err(Refusal::GateFull | Refusal::Shed) => {
            return (
                None,
                Disposition::Defer {
                    due_at_ms: now_ms() + GATE_FULL_DEFER.as_millis() as i64,
                    breaker: None,
                },
                None,
            );
        }
    };
    let (status, error) = match &result {
        Ok(r) => (Some(r.status.as_u16()), None),
        Err(e) => (None, Some(e.class().to_string())),
    };
    let verdict = classify(&result);
    tracing::info!(
        event_id = %claimed.event.id,
        trace_id = %claimed.event.trace_id,
        attempt = claimed.attempt,
        host = %host.key,
        // Absent fields are left out of the line rather than shown as -1 or "".
        status = status.map(i64::from),
        error = error.as_deref(),
        latency_ms = latency.as_millis() as u64,
        "delivery attempt"
    );
    let record = AttemptRecord {
        attempt: claimed.attempt,
        started_at_ms,
        latency_ms: latency.as_millis() as u64,
        status,
        error,
    };
    let disposition = match verdict {
        Verdict::Delivered => Disposition::Delivered,
        Verdict::Permanent => Disposition::DeadLetter {
            reason: "permanent_4xx".into(),
        },
        Verdict::Redirect => Disposition::DeadLetter {
            reason: "redirect".into(),
        },
        Verdict::Gone => {
            ctx.disabled().disable(&claimed.target);
            Disposition::DeadLetter {
                reason: "gone".into(),
            }
        }
        Verdict::Retryable { retry_after } => {
            let index = claimed.attempt as usize - 1;
            match claimed.retry_delays_ms.get(index) {
                Some(&base) => {
                    let delay =
                        retry_delay(base, claimed.jitter, retry_after, rand::random::<f64>());
                    Disposition::Retry {
                        due_at_ms: now_ms() + delay.as_millis() as i64,
                    }
                }
                None => Disposition::DeadLetter {
                    reason: "exhausted".into(),
                },
            }
        }
    };
    (Some(record), disposition, None)
}

#[cfg(test)]
mod tests;

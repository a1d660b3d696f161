//! Durable event storage behind two traits: [`Queue`], the hot path every accepted event and
//! every delivery goes through (enqueue, idempotency lookup, claim, next due time, delivery
//! result, undefer, release, readiness, close), and [`Ledger`], history and operator queries
//! (an event and its attempts, dead letters and their replay, fallback records, purge,
//! gauges). [`Store`] is both, and is what the rest of hookyard holds (`Arc<dyn Store>`):
//! [`open`] makes the one [`StoreSettings`] names, and [`Wakeup`] tells idle delivery workers
//! that an event became due. An event travels as the one [`Event`] type: [`NewEvent`] is it
//! with its delivery plan, [`ClaimedEvent`] with its lease.
//!
//! The async half of hookyard never keeps its backlog in memory: an event lives in the store
//! from the moment it is accepted until it is delivered or dead-lettered. Every backend
//! (`sqlite/`, the embedded default; `redis/`, for several instances) keeps the same
//! promises, checked by one behavioural suite (`tests/store_suite.rs`):
//!
//! - `enqueue` returns only after the event (and its idempotency key and fallback record, in the
//!   same transaction) is durable;
//! - a claimed event is leased; a lease that is not completed before it expires makes the event
//!   claimable again, so a crashed worker loses nothing; an event whose leases run out
//!   [`MAX_LEASE_EXPIRIES`] times in a row without any result (its delivery crashes or panics
//!   the worker every time) is dead-lettered with reason [`LEASE_EXPIRED_REASON`] instead of
//!   being handed out forever;
//! - an event is never claimable before its `due_at_ms`, and becomes claimable at it, to the
//!   millisecond;
//! - an event deferred by an open breaker (`Disposition::Defer` with `breaker`) remembers the
//!   host; `undefer(host)` makes those events due at once when the breaker closes, and
//!   `undefer_all` does so for every host at startup (the breaker that deferred them is gone);
//! - an event with an ordering key gets the key's next sequence number (1, 2, 3… per queue
//!   and key) and is handed out only while no earlier event of its key is pending or leased:
//!   the others wait [`EventState::Held`] and the next in sequence is released, due at once,
//!   when the key's current event is delivered or dead-lettered (a replayed dead letter keeps
//!   its sequence and waits its turn the same way). Other keys and unkeyed events never wait
//!   for it;
//! - times are passed in by the caller (`now_ms`), so tests drive the clock.

mod open;
pub mod redis;
pub mod sqlite;
mod wakeup;

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

pub use crate::event::{Event, FallbackReason, KeySequence};
pub use crate::signing::SignatureScheme;
pub use open::{open, StoreSettings};
pub use wakeup::Wakeup;

/// Leases of one event that may run out in a row, with no result reported in between, before
/// the claim that finds the last one expired dead-letters the event. A crashed instance or a
/// killed worker costs an event one expiry; only a delivery that never completes reaches this.
pub const MAX_LEASE_EXPIRIES: u32 = 5;

/// Dead-letter reason, and error class of the attempt recorded, for an event dead-lettered
/// after [`MAX_LEASE_EXPIRIES`].
pub const LEASE_EXPIRED_REASON: &str = "lease_expired";

/// A boxed future, so that `Store` can be used as `Arc<dyn Store>`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Milliseconds since the Unix epoch: the one time unit the store speaks.
pub type UnixMillis = i64;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk full, I/O error, connection lost, the SQLite file deleted)
    /// and nothing was stored. Ingress answers 503; a retry cannot duplicate anything.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The write was sent but its result never came back (Redis did not answer in time, or
    /// the SQLite file vanished while the commit ran): it may or may not have been stored.
    /// Ingress answers 503 with `"outcome":"unknown"` and the event id; a retry with the same
    /// `Idempotency-Key` is deduplicated against it if it was.
    #[error("store outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// Stored data could not be decoded; indicates corruption or a version mismatch.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The caller passed something malformed (a bad page cursor). The admin API answers 400.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The store has been closed by shutdown.
    #[error("store is closed")]
    Closed,
}

/// Everything needed to deliver an event later, captured when it is accepted.
///
/// The target, signing scheme and retry schedule are stored with the event rather than looked
/// up at delivery time, so a queued event keeps the contract it was accepted under even if the
/// rules are reloaded meanwhile.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: Event,
    pub queue: String,
    /// Absolute http(s) URL.
    pub target: String,
    pub signature: SignatureScheme,
    /// Per-attempt deadline.
    pub timeout_ms: u64,
    /// Delays before each retry; attempts = 1 + len.
    pub retry_delays_ms: Vec<u64>,
    /// Jitter fraction applied to each retry delay (0.2 = +/-20%).
    pub jitter: f64,
    pub received_at_ms: UnixMillis,
    /// When the first attempt is due (normally `received_at_ms`).
    pub due_at_ms: UnixMillis,
    /// Set when this event is a sync_to_async fallback: recorded in the same transaction.
    pub fallback: Option<FallbackReason>,
    /// The rule's ordering key for this event: events of one key (within the queue) are
    /// delivered one at a time in accept order. The store assigns its sequence number.
    pub ordering_key: Option<String>,
}

/// An idempotency claim stored atomically with the event.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// Scope: the same key under another event type is a different event.
    pub event_type: String,
    pub key: String,
    /// The claim expires at this time (received + dedup window).
    pub expires_at_ms: UnixMillis,
}

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Durable; the 202 may go out.
    Accepted,
    /// The idempotency key was already claimed by this event id; nothing was stored.
    Duplicate { event_id: String },
    /// The queue is at `max_depth` (ready + delayed + leased); nothing was stored.
    QueueFull,
}

/// An event handed to a worker under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub event: Event,
    pub queue: String,
    pub target: String,
    pub signature: SignatureScheme,
    pub timeout_ms: u64,
    pub retry_delays_ms: Vec<u64>,
    pub jitter: f64,
    /// 1-based number of the attempt about to be made (counts from 1 again after a replay).
    pub attempt: u32,
    /// Opaque token that proves this worker still holds the lease.
    pub lease_token: String,
    pub lease_until_ms: UnixMillis,
    /// Its key and sequence when the rule orders events (`X-Ordering-Key`, `X-Sequence`).
    pub ordering: Option<KeySequence>,
}

/// What [`Queue::complete_and_take_next`] did.
#[derive(Debug)]
pub struct Completion {
    /// False when the lease was no longer held: the result was ignored.
    pub recorded: bool,
    /// The next event of the finished event's ordering key, leased to the caller.
    pub next: Option<ClaimedEvent>,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub started_at_ms: UnixMillis,
    pub latency_ms: u64,
    /// HTTP status when the target answered.
    pub status: Option<u16>,
    /// Error class when it did not (`timeout`, `connect`, `reset`, `circuit_open`, ...).
    pub error: Option<String>,
}

/// What happens to an event after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Delivered,
    /// Try again at this time.
    Retry {
        due_at_ms: UnixMillis,
    },
    /// Give up: move to the dead-letter queue with this reason (`exhausted`, `permanent_4xx`, `gone`).
    DeadLetter {
        reason: String,
    },
    /// Not attempted (breaker open, host shed): back to the queue at this time, attempt count
    /// unchanged, nothing recorded as an attempt.
    Defer {
        due_at_ms: UnixMillis,
        /// The host (`host:port`) whose open breaker deferred it, if that was the reason.
        /// [`Queue::undefer`] makes such events due at once when that breaker closes.
        breaker: Option<String>,
    },
}

/// Lifecycle state of a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    /// Waiting for its due time or a worker.
    Pending,
    /// Waiting for an earlier event of its ordering key to be delivered or dead-lettered.
    Held,
    /// Leased by a worker right now.
    InFlight,
    Delivered,
    DeadLettered,
}

/// One event and its history, for `GET /v1/events/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub id: String,
    pub event_type: String,
    pub queue: String,
    /// Shown redacted: a target URL may carry a password or a token.
    #[serde(serialize_with = "crate::secret::serialize_url")]
    pub target: String,
    pub trace_id: String,
    pub state: EventState,
    pub received_at_ms: UnixMillis,
    /// Next attempt time while pending.
    pub due_at_ms: Option<UnixMillis>,
    pub delivered_at_ms: Option<UnixMillis>,
    pub dead_lettered_at_ms: Option<UnixMillis>,
    pub dead_letter_reason: Option<String>,
    pub fallback: Option<FallbackReason>,
    /// Its ordering key and sequence, when its rule orders events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering: Option<KeySequence>,
    pub attempts: Vec<AttemptRecord>,
}

/// Which dead letters to list or replay.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub event_type: Option<String>,
    pub queue: Option<String>,
    /// Dead-lettered at or after.
    pub since_ms: Option<UnixMillis>,
    /// Dead-lettered before.
    pub until_ms: Option<UnixMillis>,
}

/// A page of results: items plus the cursor for the next page, if any.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl Page<DeadLetter> {
    /// The same page as ids only (what [`Ledger::dead_letter_ids`] answers).
    pub fn into_ids(self) -> Page<String> {
        Page {
            items: self.items.into_iter().map(|d| d.id).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

/// One dead-lettered event (without its body).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub event_type: String,
    pub queue: String,
    /// Shown redacted: a target URL may carry a password or a token.
    #[serde(serialize_with = "crate::secret::serialize_url")]
    pub target: String,
    pub trace_id: String,
    pub reason: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub received_at_ms: UnixMillis,
    pub dead_lettered_at_ms: UnixMillis,
    /// The ordering key and sequence it held: later events of that key went on without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering: Option<KeySequence>,
}

/// Reconciliation state of a sync_to_async fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reconciliation {
    Pending,
    Delivered,
    DeadLettered,
}

/// One recorded sync_to_async transition, joined with what became of the event.
#[derive(Debug, Clone, Serialize)]
pub struct FallbackRecord {
    pub event_id: String,
    pub trace_id: String,
    pub event_type: String,
    pub reason: FallbackReason,
    /// Shown redacted: a target URL may carry a password or a token.
    #[serde(serialize_with = "crate::secret::serialize_url")]
    pub target: String,
    pub at_ms: UnixMillis,
    pub state: Reconciliation,
    pub delivered_at_ms: Option<UnixMillis>,
}

/// Queue gauges for metrics and readiness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Due now and not leased.
    pub ready: u64,
    /// Waiting for a future due time.
    pub delayed: u64,
    /// Waiting behind an earlier event of their ordering key.
    pub held: u64,
    /// Leased by a worker.
    pub in_flight: u64,
    pub dead_lettered: u64,
    /// Age of the oldest ready event (consumer lag), 0 when none is ready.
    pub oldest_ready_age_ms: u64,
}

/// The hot path of durable storage for the async path: what ingress and the delivery workers
/// call for every event. See the module docs for the promises.
pub trait Queue: Send + Sync + 'static {
    /// Stores the event durably (and its idempotency claim, if any, in the same transaction).
    /// `max_depth` bounds the queue: a full queue yields `QueueFull` and stores nothing.
    fn enqueue(
        &self,
        event: NewEvent,
        idempotency: Option<IdempotencyClaim>,
        max_depth: u64,
    ) -> StoreFuture<'_, EnqueueOutcome>;

    /// The event id that holds an unexpired idempotency key, if any.
    fn find_idempotent(
        &self,
        event_type: &str,
        key: &str,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, Option<String>>;

    /// Leases up to `limit` events of `queue` due at or before `now_ms`, oldest due first.
    fn claim_due(
        &self,
        queue: &str,
        now_ms: UnixMillis,
        limit: usize,
        lease_ms: u64,
    ) -> StoreFuture<'_, Vec<ClaimedEvent>>;

    /// The earliest due time in `queue` (including expired leases), so a worker can sleep
    /// exactly until then.
    fn next_due_at(&self, queue: &str) -> StoreFuture<'_, Option<UnixMillis>>;

    /// Records an attempt (unless the disposition is `Defer`) and moves the event on. Ignored
    /// (returns false) when `lease_token` no longer holds the lease.
    fn complete(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, bool>;

    /// [`Queue::complete`], and when that finished (delivered or dead-lettered) the current
    /// event of an ordering key whose next event waits, leases that next event to the caller
    /// for `lease_ms` and returns it. The worker that finished a key carries on with it: one
    /// store round trip per keyed event instead of a completion and then a claim. A store
    /// without it returns no next event, which a claim then hands out as usual.
    fn complete_and_take_next(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
        _lease_ms: u64,
    ) -> StoreFuture<'_, Completion> {
        let done = self.complete(event_id, lease_token, attempt, disposition, now_ms);
        Box::pin(async move {
            Ok(Completion {
                recorded: done.await?,
                next: None,
            })
        })
    }

    /// Makes every pending event that `host`'s breaker deferred due at `now_ms` (unless it is
    /// due sooner) and forgets who deferred it; returns how many. Called when that breaker
    /// closes after a successful probe, so a recovered host gets its backlog at once rather
    /// than at each event's deferred time.
    fn undefer(&self, host: &str, now_ms: UnixMillis) -> StoreFuture<'_, u64>;

    /// [`Queue::undefer`] for every host. Called at startup: the breakers that deferred those
    /// events died with the previous process, so nothing is holding them back any more.
    fn undefer_all(&self, now_ms: UnixMillis) -> StoreFuture<'_, u64>;

    /// Returns leased events to the queue, due at `now_ms` (graceful shutdown).
    fn release(&self, leases: Vec<(String, String)>, now_ms: UnixMillis) -> StoreFuture<'_, ()>;

    /// Cheap liveness probe of the backend for `/readyz`.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Flushes and closes; later calls fail with `StoreError::Closed`.
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// History and operator queries of durable storage: events and their attempts, dead letters
/// and their replay, fallback records, retention purge and queue gauges. Off the hot path.
pub trait Ledger: Send + Sync + 'static {
    /// One event and every attempt made.
    fn event(&self, event_id: &str) -> StoreFuture<'_, Option<EventRecord>>;

    /// Dead letters matching `filter`, newest first, `limit` per page.
    fn list_dead_letters(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<DeadLetter>>;

    /// The ids of the dead letters [`list_dead_letters`](Self::list_dead_letters) would page,
    /// with the same cursors: what a bulk replay walks. The default lists whole dead letters;
    /// a store that can page the ids alone overrides it.
    fn dead_letter_ids(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<String>> {
        Box::pin(async move {
            Ok(self
                .list_dead_letters(filter, cursor, limit)
                .await?
                .into_ids())
        })
    }

    /// Moves the named dead letters back to their queue, due now, with a fresh attempt count.
    /// Returns the ids actually replayed (unknown or not-dead-lettered ids are skipped).
    fn replay(&self, event_ids: Vec<String>, now_ms: UnixMillis) -> StoreFuture<'_, Vec<String>>;

    /// Replays every dead letter matching `filter`; returns how many.
    fn replay_matching(&self, filter: DlqFilter, now_ms: UnixMillis) -> StoreFuture<'_, u64>;

    /// Recorded sync_to_async transitions at or after `since_ms`, oldest first.
    fn fallbacks(&self, since_ms: UnixMillis, limit: usize)
        -> StoreFuture<'_, Vec<FallbackRecord>>;

    /// Deletes dead letters older than `before_ms`, expired idempotency keys, and delivered
    /// events older than `before_ms`; returns how many events were removed.
    fn purge(&self, before_ms: UnixMillis, now_ms: UnixMillis) -> StoreFuture<'_, u64>;

    /// Gauges for one queue.
    fn stats(&self, queue: &str, now_ms: UnixMillis) -> StoreFuture<'_, QueueStats>;
}

/// Durable storage for the async path: the hot path and the history together, the type the
/// rest of hookyard holds (`Arc<dyn Store>`). Implemented for everything that implements both
/// [`Queue`] and [`Ledger`]; backends implement those two.
pub trait Store: Queue + Ledger {}

impl<T: Queue + Ledger + ?Sized> Store for T {}

/// Replays every dead letter matching `filter` by walking the DLQ newest first in pages of
/// `chunk` and replaying each page: the shared body of [`Ledger::replay_matching`].
///
/// The keyset cursor only moves towards older entries, so an event that is replayed, fails
/// again and is re-dead-lettered meanwhile (newer) is not taken twice, and no single write
/// holds up ingress for the whole DLQ.
pub async fn replay_in_pages<S: Store + ?Sized>(
    store: &S,
    filter: DlqFilter,
    now_ms: UnixMillis,
    chunk: usize,
) -> Result<u64, StoreError> {
    let mut cursor = None;
    let mut total = 0u64;
    loop {
        let page = store.dead_letter_ids(filter.clone(), cursor, chunk).await?;
        let ids = page.items;
        if !ids.is_empty() {
            total += store.replay(ids, now_ms).await?.len() as u64;
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(total),
        }
    }
}

//! The batched writes of the Redis store: enqueues and delivery results. Each call builds its
//! own arguments and hands them to a [`Batcher`]; the batch goes to Redis as one call of the
//! batch script (`ENQUEUE` or `COMPLETE` in `lua.rs`), so Redis runs it as one command and,
//! with `appendfsync always`, one fsync covers the whole batch. Each caller still gets its own
//! outcome, and an enqueue is answered only after the reply that holds its event.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{ToRedisArgs, Value};

use super::batch::Batcher;
use super::decode::{
    array, claimed_from, corrupt, dlq_member, opt_string, string, StoredAttempt, StoredMeta,
};
use super::{no_answer_in, unavailable, write_failed, RedisStore, IDEMPOTENCY_TTL_SLACK_MS};
use crate::queue::{
    AttemptRecord, Completion, Disposition, EnqueueOutcome, IdempotencyClaim, NewEvent, StoreError,
    UnixMillis,
};

/// Most enqueues per batch: about 1.3 KiB each with 1 KiB bodies, so a batch stays a few
/// hundred KiB and a few milliseconds of Redis time, short enough not to stall other clients.
const ENQUEUE_BATCH: usize = 128;
/// Most completions per batch (small arguments; bounded by the workers anyway).
const COMPLETE_BATCH: usize = 256;

/// One enqueue's arguments to the batch script: `args` (all but the last of its
/// [`ENQUEUE_ARGS`]), then the body.
pub(super) struct EnqueueItem {
    id: String,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    /// Sent last, straight from the event's buffer: copying it into `args` first would copy
    /// every body twice.
    body: Bytes,
}

/// Arguments per enqueue in the batch script's `ARGV` (`ENQUEUE` in `lua.rs`).
const ENQUEUE_ARGS: usize = 12;

/// One completion's arguments to the batch script (always 11).
pub(super) struct CompleteItem {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

/// The two batching tasks of one store.
pub(super) struct Batchers {
    enqueue: Batcher<EnqueueItem, EnqueueOutcome>,
    complete: Batcher<CompleteItem, Value>,
}

/// What the batching tasks need of the store: they hold no reference to the store itself, so
/// dropping the last handle ends them.
pub(super) struct BatchContext {
    pub(super) conn: ConnectionManager,
    pub(super) prefix: String,
    pub(super) enqueue: redis::Script,
    pub(super) complete: redis::Script,
    pub(super) op_timeout: Duration,
    pub(super) wait_replicas: u32,
    pub(super) wait_timeout_ms: u64,
}

impl Batchers {
    /// Spawns both tasks (needs a Tokio runtime).
    pub(super) fn spawn(ctx: BatchContext) -> Self {
        let (conn, prefix, script) = (ctx.conn.clone(), ctx.prefix.clone(), ctx.enqueue);
        let (op_timeout, wait, wait_timeout) =
            (ctx.op_timeout, ctx.wait_replicas, ctx.wait_timeout_ms);
        let enqueue = Batcher::spawn(ENQUEUE_BATCH, move |items: Vec<EnqueueItem>| {
            let (mut conn, prefix, script) = (conn.clone(), prefix.clone(), script.clone());
            async move {
                let mut inv = script.prepare_invoke();
                declare(&mut inv, items.iter().map(|i| &i.keys));
                inv.arg(&prefix);
                for item in &items {
                    debug_assert_eq!(item.args.len() + 1, ENQUEUE_ARGS);
                    for a in &item.args {
                        inv.arg(&a[..]);
                    }
                    inv.arg(&item.body[..]);
                }
                let call = BatchCall {
                    members: items.len(),
                    what: "enqueues",
                    op_timeout,
                    // The script may still run: an enqueue's outcome is unknown, not refused.
                    timed_out: no_answer(op_timeout),
                    failed: write_failed,
                };
                let replies = match call.run(inv, &mut conn).await {
                    Ok(r) => r,
                    Err(e) => return all(items.len(), &e),
                };
                let mut out: Vec<Result<EnqueueOutcome, StoreError>> = items
                    .iter()
                    .zip(replies)
                    .map(|(item, r)| enqueue_outcome(r, &item.id))
                    .collect();
                let accepted = |r: &Result<EnqueueOutcome, StoreError>| {
                    matches!(r, Ok(EnqueueOutcome::Accepted))
                };
                if wait > 0 && out.iter().any(accepted) {
                    // WAIT covers every earlier write of this connection: one replication round
                    // trip for the whole batch. The primary holds the events (and delivers
                    // them) whatever the replicas did; only their survival of a failover is in
                    // doubt.
                    let acked: Result<i64, StoreError> = tokio::time::timeout(
                        op_timeout,
                        redis::cmd("WAIT")
                            .arg(wait)
                            .arg(wait_timeout)
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(|_| no_answer(op_timeout))
                    .and_then(|r| r.map_err(write_failed));
                    let failure = match acked {
                        Ok(n) if n >= i64::from(wait) => None,
                        Ok(n) => Some(StoreError::OutcomeUnknown(format!(
                            "only {n} of {wait} redis replicas acknowledged the event in {wait_timeout} ms"
                        ))),
                        Err(e) => Some(e),
                    };
                    if let Some(e) = failure {
                        for r in out.iter_mut().filter(|r| accepted(r)) {
                            *r = Err(copy(&e));
                        }
                    }
                }
                out
            }
        });
        let (conn, prefix, script) = (ctx.conn, ctx.prefix, ctx.complete);
        let complete = Batcher::spawn(COMPLETE_BATCH, move |items: Vec<CompleteItem>| {
            let (mut conn, prefix, script) = (conn.clone(), prefix.clone(), script.clone());
            async move {
                let mut inv = script.prepare_invoke();
                declare(&mut inv, items.iter().map(|i| &i.keys));
                inv.arg(&prefix);
                for item in &items {
                    for a in &item.args {
                        inv.arg(&a[..]);
                    }
                }
                let call = BatchCall {
                    members: items.len(),
                    what: "completions",
                    op_timeout,
                    // A result not recorded leaves the event leased: it is delivered again.
                    timed_out: StoreError::Unavailable(no_answer_in(op_timeout)),
                    failed: unavailable,
                };
                match call.run(inv, &mut conn).await {
                    Ok(replies) => replies.into_iter().map(member_error).collect(),
                    Err(e) => all(items.len(), &e),
                }
            }
        });
        Batchers { enqueue, complete }
    }
}

/// One call of a batch script, and the errors it gives every member when it fails as a whole.
struct BatchCall {
    members: usize,
    /// What the members are, for the error when the reply count is wrong.
    what: &'static str,
    op_timeout: Duration,
    timed_out: StoreError,
    failed: fn(redis::RedisError) -> StoreError,
}

impl BatchCall {
    /// Runs `inv` and returns one reply per member, in order.
    async fn run(
        self,
        inv: redis::ScriptInvocation<'_>,
        conn: &mut ConnectionManager,
    ) -> Result<Vec<Value>, StoreError> {
        let replies = match tokio::time::timeout(self.op_timeout, inv.invoke_async(conn)).await {
            Err(_) => return Err(self.timed_out),
            Ok(reply) => array(reply.map_err(self.failed)?)?,
        };
        if replies.len() != self.members {
            return Err(corrupt(format!(
                "{} replies to {} {}",
                replies.len(),
                self.members,
                self.what
            )));
        }
        Ok(replies)
    }
}

/// Declares the union of the members' keys, each once.
fn declare<'a>(inv: &mut redis::ScriptInvocation<'_>, keys: impl Iterator<Item = &'a Vec<String>>) {
    let mut seen = HashSet::new();
    for k in keys.flatten() {
        if seen.insert(k.as_str()) {
            inv.key(k);
        }
    }
}

fn no_answer(op_timeout: Duration) -> StoreError {
    StoreError::OutcomeUnknown(no_answer_in(op_timeout))
}

/// The same error again, for each member of a batch that failed as a whole.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::OutcomeUnknown(m) => StoreError::OutcomeUnknown(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::InvalidInput(m) => StoreError::InvalidInput(m.clone()),
        StoreError::Closed => StoreError::Closed,
    }
}

fn all<T>(n: usize, e: &StoreError) -> Vec<Result<T, StoreError>> {
    (0..n).map(|_| Err(copy(e))).collect()
}

/// A member's `{'err', message}` reply (a Redis command inside the script failed for it
/// alone) as the error its own call would have had: the server refused, nothing unknown.
fn member_error(v: Value) -> Result<Value, StoreError> {
    if let Value::Array(parts) = &v {
        if parts.len() == 2 && opt_string(&parts[0]).ok().flatten().as_deref() == Some("err") {
            let msg = opt_string(&parts[1]).ok().flatten().unwrap_or_default();
            return Err(StoreError::Unavailable(format!("redis: {msg}")));
        }
    }
    Ok(v)
}

fn enqueue_outcome(reply: Value, id: &str) -> Result<EnqueueOutcome, StoreError> {
    let reply = array(member_error(reply)?)?;
    let tag = reply
        .first()
        .map(opt_string)
        .transpose()?
        .flatten()
        .unwrap_or_default();
    match tag.as_str() {
        "ok" => Ok(EnqueueOutcome::Accepted),
        "dup" => Ok(EnqueueOutcome::Duplicate {
            event_id: string(reply.get(1).unwrap_or(&Value::Nil), "duplicate's id")?,
        }),
        "full" => Ok(EnqueueOutcome::QueueFull),
        "exists" => Err(StoreError::Unavailable(format!(
            "event id {id} is already stored"
        ))),
        other => Err(corrupt(format!("enqueue answered {other:?}"))),
    }
}

/// Arguments as Redis will receive them.
#[derive(Default)]
struct Args(Vec<Vec<u8>>);

impl Args {
    fn push(&mut self, v: impl ToRedisArgs) -> &mut Self {
        v.write_redis_args(&mut self.0);
        self
    }
}

impl RedisStore {
    pub(super) async fn do_enqueue(
        &self,
        ev: NewEvent,
        idem: Option<IdempotencyClaim>,
        max_depth: u64,
    ) -> Result<EnqueueOutcome, StoreError> {
        self.check_open()?;
        let meta = serde_json::to_vec(&StoredMeta {
            event_type: Cow::Borrowed(&ev.event.event_type),
            target: Cow::Borrowed(&ev.target),
            ct: ev.event.content_type.as_deref().map(Cow::Borrowed),
            trace: Cow::Borrowed(&ev.event.trace_id),
            ikey: ev.event.idempotency_key.as_deref().map(Cow::Borrowed),
            sig: Cow::Borrowed(ev.signature.as_str()),
            timeout: ev.timeout_ms,
            delays: Cow::Borrowed(&ev.retry_delays_ms),
            jitter: ev.jitter,
            recv: ev.received_at_ms,
            fb: ev.fallback.map(|f| Cow::Borrowed(f.as_str())),
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot encode the event's metadata: {e}")))?;
        let mut a = Args::default();
        a.push(&ev.event.id)
            .push(&ev.queue)
            .push(max_depth.to_string());
        a.push(ev.received_at_ms).push(ev.due_at_ms);
        match &idem {
            Some(c) => {
                let ttl = (c.expires_at_ms - ev.received_at_ms).max(1) + IDEMPOTENCY_TTL_SLACK_MS;
                a.push(self.idem_key(&c.event_type, &c.key))
                    .push(c.expires_at_ms)
                    .push(ttl);
            }
            None => {
                a.push("").push(0).push(0);
            }
        }
        a.push(if ev.fallback.is_some() { "1" } else { "" });
        a.push(ev.ordering_key.as_deref().unwrap_or(""));
        a.0.push(meta);
        let mut keys = self.queue_keys(
            &ev.queue,
            &["depth", "ready", "delayed", "okseq", "okact", "held"],
        );
        keys.push(self.ev_key(&ev.event.id));
        if let Some(key) = &ev.ordering_key {
            keys.push(self.held_key(&ev.queue, key));
        }
        if let Some(c) = &idem {
            keys.push(self.idem_key(&c.event_type, &c.key));
        }
        if ev.fallback.is_some() {
            keys.push(self.key("fallbacks"));
        }
        let item = EnqueueItem {
            id: ev.event.id,
            keys,
            args: a.0,
            body: ev.event.body,
        };
        // The idempotency claim is written by the same script as the event, so when this
        // answers "outcome unknown", a retry with the same key finds the event if it was
        // stored and is answered as its duplicate, and is stored normally if it was not.
        // Waiting is bounded here too: a batch queued behind a stalled one may still run.
        let op_timeout = self.inner.options.op_timeout;
        match tokio::time::timeout(
            op_timeout,
            self.inner
                .batchers
                .enqueue
                .submit(item, StoreError::OutcomeUnknown),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(no_answer(op_timeout)),
        }
    }

    pub(super) async fn do_complete(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
        take_next_lease_ms: Option<u64>,
    ) -> Result<Completion, StoreError> {
        self.check_open()?;
        let attempt_json = match &attempt {
            Some(a) if !matches!(disposition, Disposition::Defer { .. }) => {
                serde_json::to_string(&StoredAttempt {
                    started_at_ms: a.started_at_ms,
                    latency_ms: a.latency_ms,
                    status: a.status,
                    error: a.error.clone(),
                })
                .map_err(|e| StoreError::Corrupt(format!("cannot encode attempt: {e}")))?
            }
            _ => String::new(),
        };
        let mut keys = vec![
            self.ev_key(event_id),
            self.key("delivered"),
            self.key("dlq"),
        ];
        let mut deferred_by = String::new();
        let (kind, due, reason) = match disposition {
            Disposition::Delivered => ("delivered", now_ms, String::new()),
            Disposition::Retry { due_at_ms } => ("retry", due_at_ms, String::new()),
            Disposition::Defer { due_at_ms, breaker } => {
                deferred_by = breaker.unwrap_or_default();
                ("defer", due_at_ms, String::new())
            }
            Disposition::DeadLetter { reason } => ("dead", now_ms, reason),
        };
        let mut a = Args::default();
        a.push(event_id)
            .push(lease_token)
            .push(kind)
            .push(due)
            .push(now_ms)
            .push(reason)
            .push(dlq_member(now_ms, event_id))
            .push(attempt_json)
            .push(&deferred_by);
        let lease_until = take_next_lease_ms
            .map(|ms| now_ms.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)));
        match lease_until {
            Some(until) => a
                .push(format!("{:032x}:k", rand::random::<u128>()))
                .push(until),
            None => a.push("").push(0),
        };
        if !deferred_by.is_empty() {
            keys.push(self.deferral_key(&deferred_by));
            keys.push(self.key("bdhosts"));
        }
        let op_timeout = self.inner.options.op_timeout;
        let reply = match tokio::time::timeout(
            op_timeout,
            self.inner
                .batchers
                .complete
                .submit(CompleteItem { keys, args: a.0 }, StoreError::Unavailable),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::Unavailable(no_answer_in(op_timeout))),
        };
        match reply {
            Value::Int(done) => Ok(Completion {
                recorded: done == 1,
                next: None,
            }),
            other => {
                // The script ran: the result is recorded whatever follows. A handed-over event
                // that does not decode is left to its lease, which a claim picks up and reports.
                let next = array(other)
                    .and_then(|parts| {
                        let entry = parts
                            .into_iter()
                            .nth(1)
                            .ok_or_else(|| corrupt("completion reply without the next event"))?;
                        claimed_from(entry, lease_until.unwrap_or(now_ms))
                    })
                    .map_err(|e| {
                        tracing::warn!(
                            event_id,
                            error = %e,
                            "the next event of an ordering key could not be read; its lease will expire and a claim will hand it out"
                        )
                    })
                    .ok()
                    .map(|(_, next)| next);
                Ok(Completion {
                    recorded: true,
                    next,
                })
            }
        }
    }
}

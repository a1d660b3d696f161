//! The distributed [`Store`]: several hookyard instances share one Redis.
//!
//! # Shape
//!
//! Every key starts with `{prefix}:` (the configured `key_prefix` as a hash tag, so on a
//! cluster all of a deployment's keys share one slot and every script stays single-slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `ev:<id>` | hash | the event: body, routing, state, lease token, attempt count |
//! | `att:<id>` | list | one entry per attempt (`n|json`), across replay rounds |
//! | `q:<queue>:ready` | stream + group `hookyard` | events due now; the group's pending list holds the leased ones |
//! | `q:<queue>:delayed` | sorted set (unix ms) | events waiting for a future due time (first attempt or retry) |
//! | `q:<queue>:leased` | sorted set (unix ms) | leased events by lease expiry |
//! | `q:<queue>:depth`, `q:<queue>:dead` | counters | pending + in flight (for `max_depth`); dead letters |
//! | `dlq` | sorted set (lex `<ms, 20 digits>:<id>`) | dead letters by time: keyset paging is a lex range |
//! | `delivered`, `fallbacks` | sorted sets (unix ms) | purge index; sync_to_async records |
//! | `idem:<len>:<type>:<key>` | string `expiry|event_id`, with a TTL | idempotency claims |
//!
//! Each state change is one Lua script (`redis_lua.rs`), so it is atomic: an enqueue stores the
//! event, its idempotency claim, its fallback record and the depth counter in one step; a claim
//! moves due events from the delayed set into the stream and leases them in one step.
//!
//! # Invariants
//!
//! - `enqueue` answers `Accepted` only after Redis acknowledged the script (and, with
//!   `wait_replicas: N`, after `WAIT` saw N replicas take it). How durable that is depends on
//!   the server's persistence settings: `appendonly yes` + `appendfsync always` survives a
//!   power loss; `everysec` may lose the last second. This store cannot fsync for Redis.
//! - An event's state (`p` delayed, `r` in the stream unread, `f` leased, `d` delivered,
//!   `x` dead-lettered) decides what it is; stream entries and set members that disagree with
//!   it are stale and dropped when met. So a lost or recreated consumer group, or an entry
//!   read twice, can never hand out an event that is not ready.
//! - A lease is the token in the event's hash. `complete` and `release` check it inside their
//!   script, so a worker whose lease was taken over cannot change the event.
//! - A lease ends at whichever comes first: the caller's `lease_ms` on the caller's clock (as
//!   the trait promises, and what the shared test suite drives), or `claim_idle_ms` of idleness
//!   in the consumer group's pending list on Redis's clock (`XAUTOCLAIM`), which frees the
//!   events of a crashed instance however wrong its clock was. `claim_idle_ms` must exceed the
//!   longest delivery timeout, or a slow but live delivery is handed out twice (the config
//!   validation enforces this).
//! - Every call is bounded by [`RedisOptions::op_timeout`]; an unreachable Redis yields
//!   [`StoreError::Unavailable`] quickly and the connection manager reconnects in the
//!   background, so hookyard recovers without a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use serde::{Deserialize, Serialize};

use super::redis_lua::Scripts;
use super::{
    AttemptRecord, ClaimedEvent, DeadLetter, Disposition, DlqFilter, EnqueueOutcome, EventRecord,
    EventState, FallbackReason, FallbackRecord, IdempotencyClaim, KeySequence, NewEvent, Page,
    QueueStats, Reconciliation, SignatureScheme, Store, StoreError, StoreFuture, UnixMillis,
};

/// Dead letters / events handled per maintenance step (replay, purge), so one huge operation
/// is many short scripts that enqueues interleave with instead of one that blocks Redis.
const MAINTENANCE_CHUNK: usize = 1000;

/// Extra life given to an idempotency key's TTL beyond its logical expiry: the expiry stored
/// in the value decides, and the slack keeps the key from vanishing early when an instance's
/// clock runs behind Redis's.
const IDEMPOTENCY_TTL_SLACK_MS: i64 = 1000;

/// Tuning for [`RedisStore::open`].
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// Prefix of every key (wrapped in `{}` as a cluster hash tag).
    pub key_prefix: String,
    /// A leased event idle this long in the consumer group (on Redis's clock) is reclaimed by
    /// another instance. Must exceed the longest delivery timeout.
    pub claim_idle_ms: u64,
    /// Replicas that must acknowledge an enqueue (`WAIT`) before it is accepted; 0 = none.
    pub wait_replicas: u32,
    /// How long `WAIT` may take before the enqueue fails as unavailable.
    pub wait_timeout_ms: u64,
    /// Upper bound on any one store call, connecting included.
    pub op_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            key_prefix: "hookyard".into(),
            claim_idle_ms: 30_000,
            wait_replicas: 0,
            wait_timeout_ms: 1000,
            op_timeout: Duration::from_secs(3),
        }
    }
}

/// The Redis-backed [`Store`]. Cheap to clone: clones share one connection manager.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    /// `{key_prefix}`, the hash-tagged prefix.
    prefix: String,
    /// This instance's consumer name in every queue's group.
    consumer: String,
    options: RedisOptions,
    scripts: Scripts,
    closed: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("consumer", &self.inner.consumer)
            .field("options", &self.inner.options)
            .finish()
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// The error of a write whose command may have reached Redis: a timeout, or a connection that
/// broke after the command was handed to it, leaves the outcome unknown (Redis may run it when
/// it wakes up, as after a stall); a refused connection or an error reply means it did not run.
fn write_failed(e: RedisError) -> StoreError {
    if e.is_timeout() || (e.is_io_error() && !e.is_connection_refusal()) {
        StoreError::OutcomeUnknown(format!("redis: {e}"))
    } else {
        unavailable(e)
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis: {what}"))
}

/// This instance's consumer name: host, pid and a random part, so two processes on one host
/// (or a restarted one reusing a pid) never share pending entries.
fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Member of the `dlq` set: the time zero-padded so lexical order is time order, then the id.
fn dlq_member(at_ms: UnixMillis, id: &str) -> String {
    format!("{:020}:{id}", at_ms.max(0))
}

fn encode_cursor(at_ms: UnixMillis, id: &str) -> String {
    format!("{at_ms}:{id}")
}

fn decode_cursor(cursor: &str) -> Result<(UnixMillis, String), StoreError> {
    cursor
        .split_once(':')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.to_owned())))
        .filter(|(at, id): &(i64, String)| *at >= 0 && !id.is_empty())
        .ok_or_else(|| StoreError::InvalidInput(format!("invalid dead-letter cursor {cursor:?}")))
}

/// An attempt as stored in `att:<id>` (the attempt number is kept outside, set by the script).
#[derive(Serialize, Deserialize)]
struct StoredAttempt {
    started_at_ms: UnixMillis,
    latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Fields the claim script returns after id, token and due time, in this order.
pub(super) const CLAIM_FIELDS: [&str; 14] = [
    "type", "queue", "target", "ct", "trace", "ikey", "sig", "timeout", "delays", "jitter", "made",
    "body", "okey", "oseq",
];

// ---------------------------------------------------------------------------------------------
// Decoding replies

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn opt_string(v: &Value) -> Result<Option<String>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(i) => Ok(Some(i.to_string())),
        other => bytes_of(other)
            .map(|b| {
                String::from_utf8(b.to_vec()).map_err(|_| corrupt("a text field is not UTF-8"))
            })
            .transpose()?
            .map(Some)
            .ok_or_else(|| corrupt(format!("unexpected reply {other:?}"))),
    }
}

fn string(v: &Value, what: &str) -> Result<String, StoreError> {
    opt_string(v)?.ok_or_else(|| corrupt(format!("missing {what}")))
}

fn opt_i64(v: &Value, what: &str) -> Result<Option<i64>, StoreError> {
    match v {
        Value::Int(i) => Ok(Some(*i)),
        other => opt_string(other)?
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| corrupt(format!("{what} is not an integer: {s:?}")))
            })
            .transpose(),
    }
}

fn int(v: &Value, what: &str) -> Result<i64, StoreError> {
    opt_i64(v, what)?.ok_or_else(|| corrupt(format!("missing {what}")))
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("expected an array, got {other:?}"))),
    }
}

fn fallback_of(v: &Value) -> Result<Option<FallbackReason>, StoreError> {
    opt_string(v)?
        .map(|s| {
            FallbackReason::parse(&s).ok_or_else(|| corrupt(format!("unknown fallback {s:?}")))
        })
        .transpose()
}

fn last_attempt(v: &Value) -> Result<(Option<u16>, Option<String>), StoreError> {
    match opt_string(v)? {
        None => Ok((None, None)),
        Some(json) => {
            let a: StoredAttempt =
                serde_json::from_str(&json).map_err(|e| corrupt(format!("attempt {e}")))?;
            Ok((a.status, a.error))
        }
    }
}

/// An event's ordering key and sequence from its `okey` and `oseq` fields.
fn ordering_of(key: &Value, sequence: &Value) -> Result<Option<KeySequence>, StoreError> {
    let Some(key) = opt_string(key)? else {
        return Ok(None);
    };
    let sequence =
        u64::try_from(int(sequence, "sequence")?).map_err(|_| corrupt("negative sequence"))?;
    Ok(Some(KeySequence { key, sequence }))
}

fn claimed_from(
    entry: Value,
    lease_until_ms: UnixMillis,
) -> Result<(i64, ClaimedEvent), StoreError> {
    let f = array(entry)?;
    if f.len() != 3 + CLAIM_FIELDS.len() {
        return Err(corrupt(format!("claim reply has {} fields", f.len())));
    }
    let id = string(&f[0], "id")?;
    let sig = string(&f[9], "signature")?;
    let delays = string(&f[11], "retry delays")?;
    let jitter = string(&f[12], "jitter")?;
    let made = opt_i64(&f[13], "attempts")?.unwrap_or(0);
    let body = match &f[14] {
        Value::Nil => return Err(corrupt(format!("event {id} has no body"))),
        v => Bytes::from(bytes_of(v).unwrap_or_default().to_vec()),
    };
    let due = int(&f[2], "due time")?;
    let event = ClaimedEvent {
        event_type: string(&f[3], "event type")?,
        queue: string(&f[4], "queue")?,
        target: string(&f[5], "target")?,
        body,
        content_type: opt_string(&f[6])?,
        trace_id: string(&f[7], "trace id")?,
        idempotency_key: opt_string(&f[8])?,
        signature: SignatureScheme::parse(&sig)
            .ok_or_else(|| corrupt(format!("unknown signature scheme {sig:?}")))?,
        timeout_ms: u64::try_from(int(&f[10], "timeout")?)
            .map_err(|_| corrupt("negative timeout"))?,
        retry_delays_ms: serde_json::from_str(&delays)
            .map_err(|e| corrupt(format!("bad retry delays {delays:?}: {e}")))?,
        jitter: jitter
            .parse()
            .map_err(|_| corrupt(format!("bad jitter {jitter:?}")))?,
        attempt: u32::try_from(made.saturating_add(1)).unwrap_or(u32::MAX),
        lease_token: string(&f[1], "lease token")?,
        lease_until_ms,
        ordering: ordering_of(&f[15], &f[16])?,
        id,
    };
    Ok((due, event))
}

// ---------------------------------------------------------------------------------------------

impl RedisStore {
    /// Connects to `url` (lazily: a Redis that is down at start makes hookyard unready, not
    /// dead; it connects once Redis answers).
    ///
    /// Fails with [`StoreError::InvalidInput`] when the URL is malformed.
    pub async fn open(url: &str, options: RedisOptions) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::InvalidInput(format!("redis url: {e}")))?;
        let half = options.op_timeout / 2;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(half))
            .set_response_timeout(Some(options.op_timeout))
            // One quick retry per reconnect: callers get `Unavailable` within op_timeout and
            // retry on their own schedule (ingress answers 503, workers back off).
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: format!("{{{}}}", options.key_prefix),
                consumer: consumer_name(),
                options,
                scripts: Scripts::new(),
                closed: AtomicBool::new(false),
            }),
        };
        if let Err(e) = store.ping().await {
            tracing::error!(error = %e, "redis is not reachable yet; hookyard stays unready until it is");
        }
        Ok(store)
    }

    /// The options this store was opened with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// This instance's consumer name in the queues' consumer groups.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// The hash-tagged key prefix (`{key_prefix}`) every key of this store starts with.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs `f` on a clone of the connection, bounded by `op_timeout`.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.bounded(f, StoreError::Unavailable).await
    }

    /// Like [`RedisStore::run`] for a write whose result a caller was promised: giving up
    /// waiting is an unknown outcome, not a failure, since Redis may still run the command.
    async fn run_write<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.bounded(f, StoreError::OutcomeUnknown).await
    }

    /// `f` within `op_timeout`; past it, `timed_out` says what not knowing the answer means.
    async fn bounded<T, F, Fut>(
        &self,
        f: F,
        timed_out: fn(String) -> StoreError,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.check_open()?;
        let conn = self.inner.conn.clone();
        match tokio::time::timeout(self.inner.options.op_timeout, f(conn)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(self.no_answer())),
        }
    }

    fn no_answer(&self) -> String {
        format!(
            "redis did not answer within {} ms",
            self.inner.options.op_timeout.as_millis()
        )
    }

    fn script<'a>(&'a self, script: &'a redis::Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        // One declared key carrying the hash tag, so a cluster routes the script to the slot
        // that owns every key it touches.
        inv.key(format!("{}:route", self.inner.prefix))
            .arg(&self.inner.prefix);
        inv
    }

    fn idem_key(&self, event_type: &str, key: &str) -> String {
        // Length-prefixed so that no (type, key) pair can collide with another.
        format!(
            "{}:idem:{}:{event_type}:{key}",
            self.inner.prefix,
            event_type.len()
        )
    }

    async fn do_enqueue(
        &self,
        ev: NewEvent,
        idem: Option<IdempotencyClaim>,
        max_depth: u64,
    ) -> Result<EnqueueOutcome, StoreError> {
        let delays = serde_json::to_string(&ev.retry_delays_ms)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode retry delays: {e}")))?;
        let mut inv = self.script(&self.inner.scripts.enqueue);
        inv.arg(&ev.id).arg(&ev.queue).arg(max_depth.to_string());
        inv.arg(ev.received_at_ms).arg(ev.due_at_ms);
        match &idem {
            Some(c) => {
                let ttl = (c.expires_at_ms - ev.received_at_ms).max(1) + IDEMPOTENCY_TTL_SLACK_MS;
                inv.arg(self.idem_key(&c.event_type, &c.key))
                    .arg(c.expires_at_ms)
                    .arg(ttl);
            }
            None => {
                inv.arg("").arg(0).arg(0);
            }
        }
        inv.arg(if ev.fallback.is_some() { "1" } else { "" });
        inv.arg("type").arg(&ev.event_type);
        inv.arg("queue").arg(&ev.queue);
        inv.arg("target").arg(&ev.target);
        inv.arg("trace").arg(&ev.trace_id);
        inv.arg("sig").arg(ev.signature.as_str());
        inv.arg("timeout").arg(ev.timeout_ms);
        inv.arg("delays").arg(delays);
        inv.arg("jitter").arg(ev.jitter.to_string());
        inv.arg("recv").arg(ev.received_at_ms);
        inv.arg("due").arg(ev.due_at_ms);
        inv.arg("made").arg(0);
        inv.arg("body").arg(&ev.body[..]);
        if let Some(ct) = &ev.content_type {
            inv.arg("ct").arg(ct);
        }
        if let Some(k) = &ev.idempotency_key {
            inv.arg("ikey").arg(k);
        }
        if let Some(fb) = ev.fallback {
            inv.arg("fb").arg(fb.as_str());
        }
        if let Some(key) = &ev.ordering_key {
            inv.arg("okey").arg(key);
        }
        let wait = self.inner.options.wait_replicas;
        let wait_timeout = self.inner.options.wait_timeout_ms;
        // The idempotency claim is written by the same script as the event, so when this
        // answers "outcome unknown", a retry with the same key finds the event if it was
        // stored and is answered as its duplicate, and is stored normally if it was not.
        self.run_write(|mut conn| async move {
            let reply: Value = inv.invoke_async(&mut conn).await.map_err(write_failed)?;
            let reply = array(reply)?;
            let tag = reply.first().map(opt_string).transpose()?.flatten().unwrap_or_default();
            let outcome = match tag.as_str() {
                "ok" => EnqueueOutcome::Accepted,
                "dup" => EnqueueOutcome::Duplicate {
                    event_id: string(reply.get(1).unwrap_or(&Value::Nil), "duplicate's id")?,
                },
                "full" => return Ok(EnqueueOutcome::QueueFull),
                "exists" => {
                    return Err(StoreError::Unavailable(format!(
                        "event id {} is already stored",
                        ev.id
                    )))
                }
                other => return Err(corrupt(format!("enqueue answered {other:?}"))),
            };
            if wait > 0 && outcome == EnqueueOutcome::Accepted {
                // WAIT covers every earlier write of this connection, so concurrent enqueues
                // share one replication round trip.
                let acked: i64 = redis::cmd("WAIT")
                    .arg(wait)
                    .arg(wait_timeout)
                    .query_async(&mut conn)
                    .await
                    .map_err(write_failed)?;
                // The primary holds the event (and delivers it) whatever the replicas did; only
                // its survival of a failover is in doubt.
                if acked < i64::from(wait) {
                    return Err(StoreError::OutcomeUnknown(format!(
                        "only {acked} of {wait} redis replicas acknowledged the event in {wait_timeout} ms"
                    )));
                }
            }
            Ok(outcome)
        })
        .await
    }

    async fn do_claim(
        &self,
        queue: &str,
        now_ms: UnixMillis,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        self.check_open()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lease_until = now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        // 128 random bits per claim call; the script appends a counter per event. Unguessable,
        // so a worker cannot complete a lease it was not given.
        let base = format!("{:032x}", rand::random::<u128>());
        let mut inv = self.script(&self.inner.scripts.claim);
        inv.arg(queue)
            .arg(now_ms)
            .arg(limit)
            .arg(lease_until)
            .arg(&self.inner.consumer)
            .arg(self.inner.options.claim_idle_ms)
            .arg(base)
            .arg(super::MAX_LEASE_EXPIRIES)
            .arg(super::LEASE_EXPIRED_REASON)
            .arg(dlq_member(now_ms, ""));
        let reply: Value = self
            .run(|mut conn| async move { inv.invoke_async(&mut conn).await.map_err(unavailable) })
            .await?;
        let mut claimed = array(reply)?
            .into_iter()
            .map(|e| claimed_from(e, lease_until))
            .collect::<Result<Vec<_>, _>>()?;
        // Oldest due first across the three sources (expired leases, idle entries, the stream).
        claimed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(claimed.into_iter().map(|(_, e)| e).collect())
    }

    async fn do_complete(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError> {
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
        let mut inv = self.script(&self.inner.scripts.complete);
        inv.arg(event_id)
            .arg(lease_token)
            .arg(kind)
            .arg(due)
            .arg(now_ms)
            .arg(reason)
            .arg(dlq_member(now_ms, event_id))
            .arg(attempt_json)
            .arg(deferred_by);
        let done: i64 = self
            .run(|mut conn| async move { inv.invoke_async(&mut conn).await.map_err(unavailable) })
            .await?;
        Ok(done == 1)
    }

    /// Runs [`UNDEFER`](super::redis_lua) in chunks, so one host's long backlog never holds
    /// Redis for long.
    async fn do_undefer(&self, host: &str, now_ms: UnixMillis) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let mut inv = self.script(&self.inner.scripts.undefer);
            inv.arg(host).arg(now_ms).arg(MAINTENANCE_CHUNK);
            let (made_due, taken): (u64, usize) =
                self.run(|mut conn| async move {
                    inv.invoke_async(&mut conn).await.map_err(unavailable)
                })
                .await?;
            total += made_due;
            if taken < MAINTENANCE_CHUNK {
                return Ok(total);
            }
        }
    }

    async fn do_event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        let key = format!("{}:ev:{event_id}", self.inner.prefix);
        let att = format!("{}:att:{event_id}", self.inner.prefix);
        let (fields, attempts): (Vec<Value>, Vec<Value>) = self
            .run(|mut conn| async move {
                redis::pipe()
                    .atomic()
                    .cmd("HMGET")
                    .arg(&key)
                    .arg(&[
                        "type", "queue", "target", "trace", "state", "recv", "due", "dlv", "dla",
                        "dlr", "fb", "okey", "oseq",
                    ])
                    .cmd("LRANGE")
                    .arg(&att)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        if fields.len() != 13 || fields[4] == Value::Nil {
            return Ok(None);
        }
        let state = match string(&fields[4], "state")?.as_str() {
            "p" | "r" => EventState::Pending,
            "f" => EventState::InFlight,
            "h" => EventState::Held,
            "d" => EventState::Delivered,
            "x" => EventState::DeadLettered,
            other => return Err(corrupt(format!("unknown event state {other:?}"))),
        };
        let attempts = attempts
            .iter()
            .map(|v| {
                let s = string(v, "attempt")?;
                let (n, json) = s
                    .split_once('|')
                    .ok_or_else(|| corrupt(format!("bad attempt {s:?}")))?;
                let a: StoredAttempt =
                    serde_json::from_str(json).map_err(|e| corrupt(format!("attempt {e}")))?;
                Ok(AttemptRecord {
                    attempt: n
                        .parse()
                        .map_err(|_| corrupt(format!("bad attempt {s:?}")))?,
                    started_at_ms: a.started_at_ms,
                    latency_ms: a.latency_ms,
                    status: a.status,
                    error: a.error,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(EventRecord {
            id: event_id.to_owned(),
            event_type: string(&fields[0], "event type")?,
            queue: string(&fields[1], "queue")?,
            target: string(&fields[2], "target")?,
            trace_id: string(&fields[3], "trace id")?,
            state,
            received_at_ms: int(&fields[5], "received time")?,
            due_at_ms: if state == EventState::Pending {
                opt_i64(&fields[6], "due time")?
            } else {
                None
            },
            delivered_at_ms: opt_i64(&fields[7], "delivered time")?,
            dead_lettered_at_ms: opt_i64(&fields[8], "dead-lettered time")?,
            dead_letter_reason: opt_string(&fields[9])?,
            fallback: fallback_of(&fields[10])?,
            ordering: ordering_of(&fields[11], &fields[12])?,
            attempts,
        }))
    }

    async fn do_list_dead_letters(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<Page<DeadLetter>, StoreError> {
        self.check_open()?;
        if limit == 0 {
            return Ok(Page {
                items: Vec::new(),
                next_cursor: None,
            });
        }
        // Newest first: a reverse lex range of `dlq`, whose members sort by (time, id). The
        // cursor and `until` are exclusive upper bounds, `since` an inclusive lower one.
        let mut max = "+".to_owned();
        let mut tighten = |bound: String| {
            if max == "+" || bound < max {
                max = bound;
            }
        };
        if let Some(c) = &cursor {
            let (at, id) = decode_cursor(c)?;
            tighten(format!("({}", dlq_member(at, &id)));
        }
        if let Some(until) = filter.until_ms {
            tighten(format!("({:020}:", until.max(0)));
        }
        let min = match filter.since_ms {
            Some(since) => format!("[{:020}:", since.max(0)),
            None => "-".to_owned(),
        };
        let filtered = filter.event_type.is_some() || filter.queue.is_some();
        let batch = if filtered { 256 } else { limit + 1 };
        let dlq = format!("{}:dlq", self.inner.prefix);
        let mut items = Vec::new();
        loop {
            let (dlq, max_b, min_b) = (dlq.clone(), max.clone(), min.clone());
            let members: Vec<String> = self
                .run(|mut conn| async move {
                    redis::cmd("ZREVRANGEBYLEX")
                        .arg(&dlq)
                        .arg(&max_b)
                        .arg(&min_b)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            let Some(last) = members.last() else { break };
            max = format!("({last}");
            let full = members.len() == batch;
            let ids: Vec<String> = members
                .iter()
                .map(|m| m.split_once(':').map(|(_, id)| id.to_owned()))
                .collect::<Option<_>>()
                .ok_or_else(|| corrupt("bad dead-letter index entry"))?;
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(format!("{}:ev:{id}", self.inner.prefix))
                    .arg(&[
                        "type", "queue", "target", "trace", "dlr", "made", "last", "recv", "dla",
                        "okey", "oseq",
                    ]);
            }
            let rows: Vec<Vec<Value>> =
                self.run(|mut conn| async move {
                    pipe.query_async(&mut conn).await.map_err(unavailable)
                })
                .await?;
            for (id, f) in ids.into_iter().zip(rows) {
                if f.len() != 11 || f[0] == Value::Nil {
                    // Purged between the two reads.
                    continue;
                }
                let event_type = string(&f[0], "event type")?;
                let queue = string(&f[1], "queue")?;
                if filter.event_type.as_ref().is_some_and(|t| *t != event_type)
                    || filter.queue.as_ref().is_some_and(|q| *q != queue)
                {
                    continue;
                }
                let (last_status, last_error) = last_attempt(&f[6])?;
                items.push(DeadLetter {
                    id,
                    event_type,
                    queue,
                    target: string(&f[2], "target")?,
                    trace_id: string(&f[3], "trace id")?,
                    reason: opt_string(&f[4])?.unwrap_or_default(),
                    attempts: u32::try_from(opt_i64(&f[5], "attempts")?.unwrap_or(0)).unwrap_or(0),
                    last_status,
                    last_error,
                    received_at_ms: int(&f[7], "received time")?,
                    dead_lettered_at_ms: int(&f[8], "dead-lettered time")?,
                    ordering: ordering_of(&f[9], &f[10])?,
                });
                if items.len() > limit {
                    break;
                }
            }
            if items.len() > limit || !full {
                break;
            }
        }
        // One extra item was fetched only to learn whether another page exists.
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items
                .last()
                .map(|d| encode_cursor(d.dead_lettered_at_ms, &d.id))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn do_fallbacks(
        &self,
        since_ms: UnixMillis,
        limit: usize,
    ) -> Result<Vec<FallbackRecord>, StoreError> {
        let key = format!("{}:fallbacks", self.inner.prefix);
        let rows: Vec<(String, i64)> = self
            .run(|mut conn| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(since_ms)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &rows {
            pipe.cmd("HMGET")
                .arg(format!("{}:ev:{id}", self.inner.prefix))
                .arg(&["trace", "type", "fb", "target", "state", "dlv"]);
        }
        let fields: Vec<Vec<Value>> = self
            .run(|mut conn| async move { pipe.query_async(&mut conn).await.map_err(unavailable) })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for ((event_id, at_ms), f) in rows.into_iter().zip(fields) {
            if f.len() != 6 || f[0] == Value::Nil {
                continue;
            }
            let state = match opt_string(&f[4])?.as_deref() {
                Some("d") => Reconciliation::Delivered,
                Some("x") => Reconciliation::DeadLettered,
                _ => Reconciliation::Pending,
            };
            out.push(FallbackRecord {
                event_id,
                trace_id: string(&f[0], "trace id")?,
                event_type: string(&f[1], "event type")?,
                reason: fallback_of(&f[2])?.ok_or_else(|| corrupt("fallback without reason"))?,
                target: string(&f[3], "target")?,
                at_ms,
                state,
                delivered_at_ms: if state == Reconciliation::Delivered {
                    opt_i64(&f[5], "delivered time")?
                } else {
                    None
                },
            });
        }
        Ok(out)
    }

    async fn do_purge(&self, before_ms: UnixMillis) -> Result<u64, StoreError> {
        // Chunked: many short scripts rather than one that blocks Redis for every client.
        // Idempotency keys need no sweep: their TTL removes them.
        let mut total = 0u64;
        loop {
            let mut inv = self.script(&self.inner.scripts.purge);
            inv.arg(before_ms)
                .arg(MAINTENANCE_CHUNK)
                .arg(format!("({:020}:", before_ms.max(0)));
            let (dead, delivered): (u64, u64) =
                self.run(|mut conn| async move {
                    inv.invoke_async(&mut conn).await.map_err(unavailable)
                })
                .await?;
            total += dead + delivered;
            if dead < MAINTENANCE_CHUNK as u64 && delivered < MAINTENANCE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}

impl Store for RedisStore {
    fn enqueue(
        &self,
        event: NewEvent,
        idempotency: Option<IdempotencyClaim>,
        max_depth: u64,
    ) -> StoreFuture<'_, EnqueueOutcome> {
        Box::pin(self.do_enqueue(event, idempotency, max_depth))
    }

    fn find_idempotent(
        &self,
        event_type: &str,
        key: &str,
        now_ms: UnixMillis,
    ) -> StoreFuture<'_, Option<String>> {
        let k = self.idem_key(event_type, key);
        Box::pin(async move {
            let value: Option<String> = self
                .run(|mut conn| async move {
                    redis::cmd("GET")
                        .arg(&k)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            let Some(value) = value else { return Ok(None) };
            let (expires, id) = value
                .split_once('|')
                .ok_or_else(|| corrupt(format!("bad idempotency value {value:?}")))?;
            let expires: i64 = expires
                .parse()
                .map_err(|_| corrupt(format!("bad idempotency value {value:?}")))?;
            Ok((expires > now_ms).then(|| id.to_owned()))
        })
    }

    fn claim_due(
        &self,
        queue: &str,
        now_ms: UnixMillis,
        limit: usize,
        lease_ms: u64,
    ) -> StoreFuture<'_, Vec<ClaimedEvent>> {
        let queue = queue.to_owned();
        Box::pin(async move { self.do_claim(&queue, now_ms, limit, lease_ms).await })
    }

    fn next_due_at(&self, queue: &str) -> StoreFuture<'_, Option<UnixMillis>> {
        let mut inv = self.script(&self.inner.scripts.next_due);
        inv.arg(queue);
        Box::pin(async move {
            let v: Value =
                self.run(|mut conn| async move {
                    inv.invoke_async(&mut conn).await.map_err(unavailable)
                })
                .await?;
            opt_i64(&v, "next due time")
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
        let (event_id, lease_token) = (event_id.to_owned(), lease_token.to_owned());
        Box::pin(async move {
            self.do_complete(&event_id, &lease_token, attempt, disposition, now_ms)
                .await
        })
    }

    fn undefer(&self, host: &str, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        let host = host.to_owned();
        Box::pin(async move { self.do_undefer(&host, now_ms).await })
    }

    fn undefer_all(&self, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let hosts_key = format!("{}:bdhosts", self.inner.prefix);
            let hosts: Vec<String> = self
                .run(|mut conn| async move {
                    redis::cmd("SMEMBERS")
                        .arg(&hosts_key)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            let mut total = 0;
            for host in hosts {
                total += self.do_undefer(&host, now_ms).await?;
            }
            Ok(total)
        })
    }

    fn release(&self, leases: Vec<(String, String)>, now_ms: UnixMillis) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            for chunk in leases.chunks(MAINTENANCE_CHUNK) {
                let mut inv = self.script(&self.inner.scripts.release);
                inv.arg(now_ms);
                for (id, token) in chunk {
                    inv.arg(id).arg(token);
                }
                let _: i64 = self
                    .run(|mut conn| async move {
                        inv.invoke_async(&mut conn).await.map_err(unavailable)
                    })
                    .await?;
            }
            Ok(())
        })
    }

    fn event(&self, event_id: &str) -> StoreFuture<'_, Option<EventRecord>> {
        let event_id = event_id.to_owned();
        Box::pin(async move { self.do_event(&event_id).await })
    }

    fn list_dead_letters(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<DeadLetter>> {
        Box::pin(self.do_list_dead_letters(filter, cursor, limit))
    }

    fn replay(&self, event_ids: Vec<String>, now_ms: UnixMillis) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut replayed = Vec::new();
            for chunk in event_ids.chunks(MAINTENANCE_CHUNK) {
                let mut inv = self.script(&self.inner.scripts.replay);
                inv.arg(now_ms);
                for id in chunk {
                    inv.arg(id);
                }
                let ids: Vec<String> = self
                    .run(|mut conn| async move {
                        inv.invoke_async(&mut conn).await.map_err(unavailable)
                    })
                    .await?;
                replayed.extend(ids);
            }
            Ok(replayed)
        })
    }

    fn replay_matching(&self, filter: DlqFilter, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(super::replay_in_pages(
            self,
            filter,
            now_ms,
            MAINTENANCE_CHUNK,
        ))
    }

    fn fallbacks(
        &self,
        since_ms: UnixMillis,
        limit: usize,
    ) -> StoreFuture<'_, Vec<FallbackRecord>> {
        Box::pin(self.do_fallbacks(since_ms, limit))
    }

    fn purge(&self, before_ms: UnixMillis, _now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(self.do_purge(before_ms))
    }

    fn stats(&self, queue: &str, now_ms: UnixMillis) -> StoreFuture<'_, QueueStats> {
        let mut inv = self.script(&self.inner.scripts.stats);
        inv.arg(queue).arg(now_ms);
        Box::pin(async move {
            let v: Vec<i64> =
                self.run(|mut conn| async move {
                    inv.invoke_async(&mut conn).await.map_err(unavailable)
                })
                .await?;
            let [ready, delayed, in_flight, dead, oldest, held] = v[..] else {
                return Err(corrupt(format!("stats answered {v:?}")));
            };
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(QueueStats {
                ready: count(ready),
                delayed: count(delayed),
                held: count(held),
                in_flight: count(in_flight),
                dead_lettered: count(dead),
                oldest_ready_age_ms: if oldest < 0 {
                    0
                } else {
                    count(now_ms.saturating_sub(oldest))
                },
            })
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let pong: String = self
                .run(|mut conn| async move {
                    redis::cmd("PING")
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)
                })
                .await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(StoreError::Unavailable(format!(
                    "redis answered {pong:?} to PING"
                )))
            }
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            // Every write is acknowledged before its call returns, so there is nothing to
            // flush: closing only refuses further calls. The connection closes on drop.
            self.inner.closed.store(true, Ordering::Release);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = encode_cursor(1234, "evt_a:b");
        assert_eq!(decode_cursor(&c).unwrap(), (1234, "evt_a:b".to_owned()));
        for bad in ["nonsense", "12:", "-5:evt", "x:evt"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dlq_members_sort_by_time_then_id() {
        let mut m = [
            dlq_member(1000, "evt_b"),
            dlq_member(999, "evt_z"),
            dlq_member(1000, "evt_a"),
            dlq_member(10_000, "evt_a"),
        ];
        m.sort();
        assert_eq!(
            m,
            [
                dlq_member(999, "evt_z"),
                dlq_member(1000, "evt_a"),
                dlq_member(1000, "evt_b"),
                dlq_member(10_000, "evt_a"),
            ]
        );
    }
}

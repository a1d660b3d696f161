//! The distributed [`Store`](super::Store): several hookyard instances share one Redis.
//!
//! # Shape
//!
//! Every key starts with `{prefix}:` (the configured `key_prefix` as a hash tag, so on a
//! cluster all of a deployment's keys share one slot and every script stays single-slot; why
//! not one tag per queue: `keys.rs`):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `ev:<id>` | hash | the event: `m` (its fixed metadata as JSON: type, target, trace, signature scheme, timeout, retry delays, jitter, content type, idempotency key, fallback, receive time), `body`, `queue`, ordering key and sequence, state, due time, lease token, attempt count, and the attempt history: `a1` … `a<an>` (`n|json`), across replay rounds. Events stored before `m` existed keep the metadata in one field each; readers accept both (`decode::meta_of`) |
//! | `att:<id>` | list | the attempt history (`n|json`) of versions before it moved into the event hash; still read, and removed with the event |
//! | `q:<queue>:ready` | stream + group `hookyard` | events due now; the group's pending list holds the leased ones |
//! | `q:<queue>:delayed` | sorted set (unix ms) | events waiting for a future due time (first attempt or retry) |
//! | `q:<queue>:leased` | sorted set (unix ms) | leased events by lease expiry |
//! | `q:<queue>:depth`, `q:<queue>:dead` | counters | pending + in flight (for `max_depth`); dead letters |
//! | `dlq` | sorted set (lex `<ms, 20 digits>:<id>`) | dead letters by time: keyset paging is a lex range |
//! | `delivered`, `fallbacks` | sorted sets (unix ms) | purge index; sync_to_async records |
//! | `idem:<len>:<type>:<key>` | string `expiry|event_id`, with a TTL | idempotency claims |
//!
//! Each state change is one Lua script (`lua.rs`), so it is atomic: an enqueue stores the
//! event, its idempotency claim, its fallback record and the depth counter in one step; a claim
//! moves due events from the delayed set into the stream and leases them in one step. Each
//! script declares in `KEYS` the keys it can name up front; the ones it finds at run time
//! (events a claim finds, the queue of a completed event) are listed in its doc comment, and
//! all carry the tag. The store suite's `redis_keys` test checks this against a real server.
//!
//! # Group commit
//!
//! Enqueues and completions are batched (`batch.rs`, `commit.rs`), the way the SQLite writer
//! batches transactions: a task per kind takes whatever calls queued while its previous batch
//! was in flight (up to 128 enqueues or 256 completions) and sends them as one call of the
//! batch script, which handles each member in order under `pcall` and answers one reply per
//! member. Redis runs the batch as one command, so with `appendfsync always` one fsync covers
//! it, and writes many members share (depth counters, stream acks, the delivered index) are
//! made once per batch. Each caller still gets its own outcome (Accepted / Duplicate /
//! QueueFull / its own error); a batch that fails as a whole (connection refused, an error
//! reply) fails each member as its own call would have, and a batch whose reply does not come
//! back within `op_timeout` is an unknown outcome for each enqueue in it. A claim is one
//! script call leasing up to `limit` events (one `XREADGROUP COUNT n`) for many workers.
//!
//! # Invariants
//!
//! - `enqueue` answers `Accepted` only after Redis acknowledged the batch script holding the
//!   event (and, with
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
//!   events of a crashed instance however wrong its clock was. Each instance scans for idle
//!   entries once per quarter of `claim_idle_ms` (the scan walks every entry in flight), so
//!   takeover comes within 1.25 × `claim_idle_ms`. `claim_idle_ms` must exceed the
//!   longest delivery timeout, or a slow but live delivery is handed out twice (the config
//!   validation enforces this).
//! - Every call is bounded by [`RedisOptions::op_timeout`]; an unreachable Redis yields
//!   [`StoreError::Unavailable`] quickly and the connection manager reconnects in the
//!   background, so hookyard recovers without a restart.
//!
//! # Files
//!
//! This file holds the handle ([`RedisStore`], [`RedisOptions`]), connecting, and the
//! [`Queue`] and [`Ledger`] impls; `ops` builds the script invocations and pipelines of the larger
//! operations, `commit` the batched enqueues and completions (on the generic task of `batch`),
//! `keys` the key names scripts declare, `decode` reads Redis's replies, and `lua` holds the
//! scripts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};

mod batch;
mod commit;
mod decode;
mod keys;
mod lua;
mod ops;
#[cfg(test)]
mod tests;

use super::{
    AttemptRecord, ClaimedEvent, Completion, DeadLetter, Disposition, DlqFilter, EnqueueOutcome,
    EventRecord, FallbackRecord, IdempotencyClaim, Ledger, NewEvent, Page, Queue, QueueStats,
    StoreError, StoreFuture, UnixMillis,
};
use decode::{corrupt, opt_i64};
use lua::Scripts;

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

/// The Redis-backed [`Store`](super::Store). Cheap to clone: clones share one connection manager.
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
    /// The group-commit tasks of enqueues and completions.
    batchers: commit::Batchers,
    /// When this instance last scanned each queue's pending list for idle entries
    /// (`XAUTOCLAIM`, in the claim script), on the monotonic clock (`ops::idle_scan_due`).
    idle_scans: Mutex<HashMap<String, Instant>>,
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

/// The message for a call Redis did not answer within `op_timeout`.
pub(super) fn no_answer_in(op_timeout: Duration) -> String {
    format!("redis did not answer within {} ms", op_timeout.as_millis())
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
        let prefix = format!("{{{}}}", options.key_prefix);
        let scripts = Scripts::new();
        let batchers = commit::Batchers::spawn(commit::BatchContext {
            conn: conn.clone(),
            prefix: prefix.clone(),
            enqueue: scripts.enqueue.clone(),
            complete: scripts.complete.clone(),
            op_timeout: options.op_timeout,
            wait_replicas: options.wait_replicas,
            wait_timeout_ms: options.wait_timeout_ms,
        });
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix,
                consumer: consumer_name(),
                options,
                scripts,
                batchers,
                idle_scans: Mutex::new(HashMap::new()),
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
            Err(_) => Err(timed_out(no_answer_in(self.inner.options.op_timeout))),
        }
    }

    /// An invocation of `script` declaring `keys` (the keys it can name before it runs; see
    /// `keys.rs`), with the prefix as `ARGV[1]`.
    fn script<'a>(
        &'a self,
        script: &'a redis::Script,
        keys: Vec<String>,
    ) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        inv.arg(&self.inner.prefix);
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
}

impl Queue for RedisStore {
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
        let keys = self.queue_keys(queue, &["ready", "delayed", "leased"]);
        let mut inv = self.script(&self.inner.scripts.next_due, keys);
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
            self.do_complete(&event_id, &lease_token, attempt, disposition, now_ms, None)
                .await
                .map(|c| c.recorded)
        })
    }

    fn complete_and_take_next(
        &self,
        event_id: &str,
        lease_token: &str,
        attempt: Option<AttemptRecord>,
        disposition: Disposition,
        now_ms: UnixMillis,
        lease_ms: u64,
    ) -> StoreFuture<'_, Completion> {
        let (event_id, lease_token) = (event_id.to_owned(), lease_token.to_owned());
        Box::pin(async move {
            self.do_complete(
                &event_id,
                &lease_token,
                attempt,
                disposition,
                now_ms,
                Some(lease_ms),
            )
            .await
        })
    }

    fn undefer(&self, host: &str, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        let host = host.to_owned();
        Box::pin(async move { self.do_undefer(&host, now_ms).await })
    }

    fn undefer_all(&self, now_ms: UnixMillis) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let hosts_key = self.key("bdhosts");
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
                let keys = chunk.iter().map(|(id, _)| self.ev_key(id)).collect();
                let mut inv = self.script(&self.inner.scripts.release, keys);
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

impl Ledger for RedisStore {
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

    fn dead_letter_ids(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> StoreFuture<'_, Page<String>> {
        Box::pin(self.do_dead_letter_ids(filter, cursor, limit))
    }

    fn replay(&self, event_ids: Vec<String>, now_ms: UnixMillis) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut replayed = Vec::new();
            for chunk in event_ids.chunks(MAINTENANCE_CHUNK) {
                let mut keys: Vec<String> = chunk.iter().map(|id| self.ev_key(id)).collect();
                keys.push(self.key("dlq"));
                let mut inv = self.script(&self.inner.scripts.replay, keys);
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
        let keys = self.queue_keys(queue, &["ready", "delayed", "leased", "dead", "held"]);
        let mut inv = self.script(&self.inner.scripts.stats, keys);
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
}

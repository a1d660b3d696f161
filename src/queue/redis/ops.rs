//! The per-operation work of the Redis store: each builds the script invocation or pipeline
//! for one call (claim, undefer, an event, dead-letter pages, fallbacks, purge) and decodes
//! its answer (enqueue and complete are batched: `commit.rs`). The [`Queue`](crate::queue::Queue) and
//! [`Ledger`](crate::queue::Ledger) impls in `mod.rs` call these.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Value;

use super::decode::{
    array, claimed_from, corrupt, decode_cursor, dlq_member, encode_cursor, fallback_of, int,
    last_attempt, opt_i64, opt_string, ordering_of, split_meta, string, with_meta, StoredAttempt,
};
use super::{unavailable, RedisStore, MAINTENANCE_CHUNK};
use crate::queue::{
    AttemptRecord, ClaimedEvent, DeadLetter, DlqFilter, EventRecord, EventState, FallbackRecord,
    Page, Reconciliation, StoreError, UnixMillis,
};

impl RedisStore {
    pub(super) async fn do_claim(
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
        let mut keys = self.queue_keys(
            queue,
            &[
                "ready", "delayed", "leased", "depth", "dead", "okact", "held",
            ],
        );
        keys.push(self.key("dlq"));
        let scan_idle = self.idle_scan_due(queue);
        let mut inv = self.script(&self.inner.scripts.claim, keys);
        inv.arg(queue)
            .arg(now_ms)
            .arg(limit)
            .arg(lease_until)
            .arg(&self.inner.consumer)
            .arg(if scan_idle {
                self.inner.options.claim_idle_ms.to_string()
            } else {
                String::new()
            })
            .arg(base)
            .arg(crate::queue::MAX_LEASE_EXPIRIES)
            .arg(crate::queue::LEASE_EXPIRED_REASON)
            .arg(dlq_member(now_ms, ""));
        let reply: Value = self
            .run(|mut conn| async move { inv.invoke_async(&mut conn).await.map_err(unavailable) })
            .await?;
        let mut claimed = array(reply)?
            .into_iter()
            .map(|e| claimed_from(e, lease_until))
            .collect::<Result<Vec<_>, _>>()?;
        // A scan cut short by `limit` may have left idle entries behind: the next claim scans
        // again instead of waiting for the interval.
        if scan_idle && claimed.len() < limit {
            self.idle_scans().insert(queue.to_owned(), Instant::now());
        }
        // Oldest due first across the three sources (expired leases, idle entries, the stream).
        claimed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.event.id.cmp(&b.1.event.id)));
        Ok(claimed.into_iter().map(|(_, e)| e).collect())
    }

    /// Whether this claim should scan the queue's pending list for entries idle longer than
    /// `claim_idle_ms` (another instance crashed holding them). The scan walks every entry in
    /// flight, so running it on each claim cost about as much as the stream read itself at
    /// 64 deliveries in flight; once per quarter of `claim_idle_ms` keeps takeover within
    /// 1.25 × `claim_idle_ms`. Measured on the monotonic clock, as Redis measures idleness.
    fn idle_scan_due(&self, queue: &str) -> bool {
        let interval = Duration::from_millis(self.inner.options.claim_idle_ms / 4);
        self.idle_scans()
            .get(queue)
            .is_none_or(|last| last.elapsed() >= interval)
    }

    fn idle_scans(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // A panic while holding this lock left at worst a stale time: scanning stays correct.
        self.inner
            .idle_scans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs [`UNDEFER`](super::lua) in chunks, so one host's long backlog never holds
    /// Redis for long.
    pub(super) async fn do_undefer(
        &self,
        host: &str,
        now_ms: UnixMillis,
    ) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let keys = vec![self.deferral_key(host), self.key("bdhosts")];
            let mut inv = self.script(&self.inner.scripts.undefer, keys);
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

    pub(super) async fn do_event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        let key = self.ev_key(event_id);
        let att = self.att_key(event_id);
        let mut read = redis::pipe();
        read.atomic()
            .cmd("HMGET")
            .arg(&key)
            .arg(with_meta(&[
                "queue", "state", "due", "dlv", "dla", "dlr", "okey", "oseq", "an",
            ]))
            .cmd("LRANGE")
            .arg(&att)
            .arg(0)
            .arg(-1);
        let (fields, legacy_attempts): (Vec<Value>, Vec<Value>) = self
            .run(|mut conn| async move { read.query_async(&mut conn).await.map_err(unavailable) })
            .await?;
        let Some((meta, fields)) = split_meta(&fields, 9)?.filter(|(_, f)| f[1] != Value::Nil)
        else {
            return Ok(None);
        };
        let state = match string(&fields[1], "state")?.as_str() {
            "p" | "r" => EventState::Pending,
            "f" => EventState::InFlight,
            "h" => EventState::Held,
            "d" => EventState::Delivered,
            "x" => EventState::DeadLettered,
            other => return Err(corrupt(format!("unknown event state {other:?}"))),
        };
        // History entries `a1` … `a<an>` in the event's hash, after any kept in the `att:` list
        // by a version from before they moved there. Read after the fields: an attempt recorded
        // meanwhile only adds entries past `an`, and a purge meanwhile leaves nils, skipped.
        let recorded = opt_i64(&fields[8], "attempt entries")?.unwrap_or(0);
        let entries: Vec<Value> = if recorded > 0 {
            let names: Vec<String> = (1..=recorded).map(|k| format!("a{k}")).collect();
            self.run(|mut conn| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&names)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)
            })
            .await?
        } else {
            Vec::new()
        };
        let attempts = legacy_attempts
            .iter()
            .chain(entries.iter().filter(|v| **v != Value::Nil))
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
            event_type: meta.event_type.into_owned(),
            queue: string(&fields[0], "queue")?,
            target: meta.target.into_owned(),
            trace_id: meta.trace.into_owned(),
            state,
            received_at_ms: meta.recv,
            due_at_ms: if state == EventState::Pending {
                opt_i64(&fields[2], "due time")?
            } else {
                None
            },
            delivered_at_ms: opt_i64(&fields[3], "delivered time")?,
            dead_lettered_at_ms: opt_i64(&fields[4], "dead-lettered time")?,
            dead_letter_reason: opt_string(&fields[5])?,
            fallback: fallback_of(meta.fb)?,
            ordering: ordering_of(&fields[6], &fields[7])?,
            attempts,
        }))
    }

    pub(super) async fn do_list_dead_letters(
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
        let (mut max, min) = dlq_bounds(&filter, cursor.as_deref())?;
        let filtered = filter.event_type.is_some() || filter.queue.is_some();
        let batch = if filtered { 256 } else { limit + 1 };
        let dlq = self.key("dlq");
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
                pipe.cmd("HMGET").arg(self.ev_key(id)).arg(with_meta(&[
                    "queue", "dlr", "made", "last", "dla", "okey", "oseq",
                ]));
            }
            let rows: Vec<Vec<Value>> =
                self.run(|mut conn| async move {
                    pipe.query_async(&mut conn).await.map_err(unavailable)
                })
                .await?;
            for (id, row) in ids.into_iter().zip(rows) {
                let Some((meta, f)) = split_meta(&row, 7)? else {
                    // Purged between the two reads.
                    continue;
                };
                let event_type = meta.event_type.into_owned();
                let queue = string(&f[0], "queue")?;
                if filter.event_type.as_ref().is_some_and(|t| *t != event_type)
                    || filter.queue.as_ref().is_some_and(|q| *q != queue)
                {
                    continue;
                }
                let (last_status, last_error) = last_attempt(&f[3])?;
                items.push(DeadLetter {
                    id,
                    event_type,
                    queue,
                    target: meta.target.into_owned(),
                    trace_id: meta.trace.into_owned(),
                    reason: opt_string(&f[1])?.unwrap_or_default(),
                    attempts: u32::try_from(opt_i64(&f[2], "attempts")?.unwrap_or(0)).unwrap_or(0),
                    last_status,
                    last_error,
                    received_at_ms: meta.recv,
                    dead_lettered_at_ms: int(&f[4], "dead-lettered time")?,
                    ordering: ordering_of(&f[5], &f[6])?,
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

    /// The ids of a dead-letter page. Unfiltered, they come from the DLQ index alone, with no
    /// read of the events: a bulk replay of a large DLQ walks it twice (a count, then the
    /// replay), and reading every event's metadata on both walks cost more than the replay.
    pub(super) async fn do_dead_letter_ids(
        &self,
        filter: DlqFilter,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<Page<String>, StoreError> {
        if filter.event_type.is_some() || filter.queue.is_some() || limit == 0 {
            return Ok(self
                .do_list_dead_letters(filter, cursor, limit)
                .await?
                .into_ids());
        }
        self.check_open()?;
        let (max, min) = dlq_bounds(&filter, cursor.as_deref())?;
        let dlq = self.key("dlq");
        let mut members: Vec<String> = self
            .run(|mut conn| async move {
                redis::cmd("ZREVRANGEBYLEX")
                    .arg(&dlq)
                    .arg(&max)
                    .arg(&min)
                    .arg("LIMIT")
                    .arg(0)
                    // One extra, only to learn whether another page exists.
                    .arg(limit + 1)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let more = members.len() > limit;
        members.truncate(limit);
        let split = |m: &String| {
            m.split_once(':')
                .and_then(|(at, id)| Some((at.parse::<UnixMillis>().ok()?, id.to_owned())))
                .ok_or_else(|| corrupt("bad dead-letter index entry"))
        };
        let entries = members.iter().map(split).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = more
            .then(|| entries.last().map(|(at, id)| encode_cursor(*at, id)))
            .flatten();
        Ok(Page {
            items: entries.into_iter().map(|(_, id)| id).collect(),
            next_cursor,
        })
    }

    pub(super) async fn do_fallbacks(
        &self,
        since_ms: UnixMillis,
        limit: usize,
    ) -> Result<Vec<FallbackRecord>, StoreError> {
        let key = self.key("fallbacks");
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
                .arg(self.ev_key(id))
                .arg(with_meta(&["state", "dlv"]));
        }
        let fields: Vec<Vec<Value>> = self
            .run(|mut conn| async move { pipe.query_async(&mut conn).await.map_err(unavailable) })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for ((event_id, at_ms), row) in rows.into_iter().zip(fields) {
            let Some((meta, f)) = split_meta(&row, 2)? else {
                continue;
            };
            let state = match opt_string(&f[0])?.as_deref() {
                Some("d") => Reconciliation::Delivered,
                Some("x") => Reconciliation::DeadLettered,
                _ => Reconciliation::Pending,
            };
            out.push(FallbackRecord {
                event_id,
                trace_id: meta.trace.into_owned(),
                event_type: meta.event_type.into_owned(),
                reason: fallback_of(meta.fb)?.ok_or_else(|| corrupt("fallback without reason"))?,
                target: meta.target.into_owned(),
                at_ms,
                state,
                delivered_at_ms: if state == Reconciliation::Delivered {
                    opt_i64(&f[1], "delivered time")?
                } else {
                    None
                },
            });
        }
        Ok(out)
    }

    pub(super) async fn do_purge(&self, before_ms: UnixMillis) -> Result<u64, StoreError> {
        // Chunked: many short scripts rather than one that blocks Redis for every client.
        // Idempotency keys need no sweep: their TTL removes them.
        let mut total = 0u64;
        loop {
            let keys = ["dlq", "delivered", "fallbacks"]
                .map(|k| self.key(k))
                .to_vec();
            let mut inv = self.script(&self.inner.scripts.purge, keys);
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

/// The reverse lex range of `dlq` (members sort by (time, id)) that a dead-letter page walks,
/// newest first, as `(max, min)`: the cursor and `until` are exclusive upper bounds, `since`
/// an inclusive lower one.
fn dlq_bounds(filter: &DlqFilter, cursor: Option<&str>) -> Result<(String, String), StoreError> {
    let mut max = "+".to_owned();
    let mut tighten = |bound: String| {
        if max == "+" || bound < max {
            max = bound;
        }
    };
    if let Some(c) = cursor {
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
    Ok((max, min))
}

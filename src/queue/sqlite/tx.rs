//! The write transactions: each runs on the writer thread, inside the batch transaction, as
//! one job (enqueue, claim, delivery result, undefer, release, replay, a purge chunk), plus
//! the lease tokens a claim issues and the hand-over of an ordering key to its next event.

use rusqlite::{params, Connection, OptionalExtension};

use super::rows::{claimed_from_row, get_ordering, get_u32, limit_i64, to_i64, ClaimedState};
use super::sql::{
    CLAIM_PICK, DEAD_LETTERED, DELIVERED, HELD, IN_FLIGHT, NEXT_HELD, PAYLOAD_COLUMNS, PENDING,
};
use super::writer::WriterState;
use crate::queue::{
    AttemptRecord, ClaimedEvent, Completion, Disposition, EnqueueOutcome, FallbackReason,
    IdempotencyClaim, NewEvent, StoreError, UnixMillis, LEASE_EXPIRED_REASON, MAX_LEASE_EXPIRIES,
};

/// `<rid>.<128 random bits in hex>`. The random part makes it unique for all practical
/// purposes and unguessable, so a worker cannot complete a lease it was not given; the row id
/// lets the result find its row by integer primary key instead of searching the text index on
/// event ids (one of the writer's costs per delivery).
pub(super) fn new_lease_token(rid: i64) -> String {
    format!("{rid}.{:032x}", rand::random::<u128>())
}

/// The row id a lease token was issued for; `None` for tokens issued before tokens carried it.
pub(super) fn lease_rid(token: &str) -> Option<i64> {
    token.split_once('.')?.0.parse().ok()
}

pub(super) fn tx_enqueue(
    conn: &Connection,
    ws: &mut WriterState,
    ev: &NewEvent,
    idem: Option<&IdempotencyClaim>,
    max_depth: u64,
) -> Result<EnqueueOutcome, StoreError> {
    // Every refusal below comes before the first write: enqueues run without a savepoint
    // (see `JobKind::needs_savepoint`).
    // Dedupe before the depth check: a retried request whose first copy was accepted should
    // learn its event id, not be told to back off.
    if let Some(claim) = idem {
        let existing: Option<(String, i64)> = conn
            .prepare_cached(
                "SELECT event_id, expires_at FROM idempotency WHERE event_type = ?1 AND key = ?2",
            )?
            .query_row(params![claim.event_type, claim.key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((event_id, expires_at)) = existing {
            if expires_at > ev.received_at_ms {
                return Ok(EnqueueOutcome::Duplicate { event_id });
            }
        }
    }
    if ws.current(&ev.queue) >= max_depth {
        return Ok(EnqueueOutcome::QueueFull);
    }
    ws.check_room(conn)?;
    let delays = serde_json::to_string(&ev.retry_delays_ms)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode retry delays: {e}")))?;
    // The key's place is read before the first write; a key with an event pending or leased
    // holds this one back.
    let ordering = match &ev.ordering_key {
        None => None,
        Some(key) => {
            let row: Option<(i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT last_seq, active_rid FROM ordering_keys WHERE queue = ?1 AND key = ?2",
                )?
                .query_row(params![ev.queue, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let (last_seq, busy) =
                row.map_or((0, false), |(last, active)| (last, active.is_some()));
            Some((key, last_seq + 1, busy))
        }
    };
    let state = match ordering {
        Some((_, _, true)) => HELD,
        _ => PENDING,
    };
    conn.prepare_cached(
        "INSERT INTO events (id, queue, state, due_at, ordering_key, sequence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        ev.event.id,
        ev.queue,
        state,
        ev.due_at_ms,
        ordering.map(|(key, _, _)| key),
        ordering.map(|(_, seq, _)| seq)
    ])?;
    let rid = conn.last_insert_rowid();
    if let Some((key, seq, _)) = ordering {
        conn.prepare_cached(
            "INSERT INTO ordering_keys (queue, key, last_seq, active_rid) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (queue, key)
             DO UPDATE SET last_seq = excluded.last_seq,
                           active_rid = COALESCE(active_rid, excluded.active_rid)",
        )?
        .execute(params![ev.queue, key, seq, rid])?;
    }
    conn.prepare_cached(
        "INSERT INTO event_payloads (rid, event_type, target, content_type, trace_id,
             idempotency_key, signature, timeout_ms, retry_delays_ms, jitter, received_at,
             fallback, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        rid,
        ev.event.event_type,
        ev.target,
        ev.event.content_type,
        ev.event.trace_id,
        ev.event.idempotency_key,
        ev.signature.as_str(),
        to_i64(ev.timeout_ms),
        delays,
        ev.jitter,
        ev.received_at_ms,
        ev.fallback.map(FallbackReason::as_str),
        &ev.event.body[..],
    ])?;
    if let Some(claim) = idem {
        // An expired claim for the same key is replaced in place.
        conn.prepare_cached(
            "INSERT INTO idempotency (event_type, key, event_id, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (event_type, key)
             DO UPDATE SET event_id = excluded.event_id, expires_at = excluded.expires_at",
        )?
        .execute(params![claim.event_type, claim.key, ev.event.id, claim.expires_at_ms])?;
    }
    if let Some(reason) = ev.fallback {
        conn.prepare_cached(
            "INSERT INTO fallbacks (at_ms, event_id, trace_id, event_type, reason, target)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            ev.received_at_ms,
            ev.event.id,
            ev.event.trace_id,
            ev.event.event_type,
            reason.as_str(),
            ev.target
        ])?;
    }
    ws.adjust(&ev.queue, 1);
    Ok(EnqueueOutcome::Accepted)
}

pub(super) fn tx_claim(
    conn: &Connection,
    ws: &mut WriterState,
    queue: &str,
    now_ms: UnixMillis,
    limit: usize,
    lease_ms: u64,
) -> Result<Vec<ClaimedEvent>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let picked = conn
        .prepare_cached(CLAIM_PICK)?
        .query_map(params![queue, now_ms, limit_i64(limit)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let lease_until = now_ms.saturating_add(to_i64(lease_ms));

    // Every picked event is read and decoded before any is written: a row that does not
    // decode fails the claim while it has changed nothing, which is what lets claims run
    // without a savepoint (see `JobKind::needs_savepoint`).
    let mut state_row = conn.prepare_cached(
        "SELECT id, queue, attempts_made, lease_expiries, round, ordering_key, sequence
         FROM events WHERE rid = ?1",
    )?;
    let mut payload = conn.prepare_cached(&format!(
        "SELECT {PAYLOAD_COLUMNS} FROM event_payloads WHERE rid = ?1"
    ))?;
    let mut leases = Vec::with_capacity(picked.len());
    for (rid, picked_state) in picked {
        let (state, lease_expiries, round) = state_row.query_row(params![rid], |row| {
            Ok((
                ClaimedState {
                    id: row.get(0)?,
                    queue: row.get(1)?,
                    attempts_made: get_u32(row, 2)?,
                    ordering: get_ordering(row, 5, 6)?,
                },
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        let token = new_lease_token(rid);
        // A pick in flight is a lease that ran out without a result.
        let expired = i64::from(picked_state == IN_FLIGHT);
        let lease = if lease_expiries + expired >= i64::from(MAX_LEASE_EXPIRIES) {
            Lease::DeadLetter { state, round }
        } else {
            let ev = payload
                .query_row(params![rid], |row| {
                    claimed_from_row(state, row, token.clone(), lease_until)
                })
                .optional()?
                .ok_or_else(|| StoreError::Corrupt(format!("event row {rid} has no payload")))?;
            Lease::Deliver(ev)
        };
        leases.push((rid, token, expired, lease));
    }

    // While in flight, due_at holds the lease expiry: that is when the event is due again.
    // Only the small state row is written; the payload is read, never rewritten.
    let mut update = conn.prepare_cached(
        "UPDATE events SET state = 1, lease_token = ?1, due_at = ?2,
             lease_expiries = lease_expiries + ?4
         WHERE rid = ?3",
    )?;
    let mut claimed = Vec::with_capacity(leases.len());
    for (rid, token, expired, lease) in leases {
        update.execute(params![token, lease_until, rid, expired])?;
        match lease {
            Lease::Deliver(ev) => claimed.push(ev),
            Lease::DeadLetter { state, round } => {
                dead_letter_expired(conn, ws, rid, &state, round, now_ms)?
            }
        }
    }
    Ok(claimed)
}

/// What a claim does with one picked event.
// Lives only between a claim's reads and its writes, and nearly every one is a `Deliver`:
// boxing that variant would cost an allocation per claimed event for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Lease {
    Deliver(ClaimedEvent),
    /// Its leases kept running out without a result.
    DeadLetter {
        state: ClaimedState,
        round: i64,
    },
}

/// Dead-letters an event whose leases kept running out, recording why as its last attempt.
pub(super) fn dead_letter_expired(
    conn: &Connection,
    ws: &mut WriterState,
    rid: i64,
    state: &ClaimedState,
    round: i64,
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    tracing::error!(
        event_id = %state.id,
        queue = %state.queue,
        lease_expiries = MAX_LEASE_EXPIRIES,
        "every recent delivery of this event ended without a result (a crash or panic in \
         the worker?); moving it to the dead-letter queue"
    );
    conn.prepare_cached(
        "UPDATE events SET state = 3, due_at = NULL, lease_token = NULL,
             dead_lettered_at = ?1, dead_letter_reason = ?2
         WHERE rid = ?3",
    )?
    .execute(params![now_ms, LEASE_EXPIRED_REASON, rid])?;
    conn.prepare_cached(
        "INSERT INTO attempts (event_id, round, attempt, started_at, latency_ms, status, error)
         VALUES (?1, ?2, ?3, ?4, 0, NULL, ?5)",
    )?
    .execute(params![
        state.id,
        round,
        i64::from(state.attempts_made) + 1,
        now_ms,
        LEASE_EXPIRED_REASON
    ])?;
    if let Some(ordering) = &state.ordering {
        release_next_of_key(conn, &state.queue, &ordering.key, now_ms, None)?;
    }
    ws.adjust(&state.queue, -1);
    Ok(())
}

/// The key's current event is delivered or dead-lettered: its next held event (lowest
/// sequence) becomes the key's current event; a key with none held is free, so its next
/// enqueue is pending at once. With `lease_until` the next event is leased until then and
/// returned, for the worker that finished the key to deliver it without a claim; otherwise
/// (or if it does not decode: a claim then reports it) it is pending, due at once.
pub(super) fn release_next_of_key(
    conn: &Connection,
    queue: &str,
    key: &str,
    now_ms: UnixMillis,
    lease_until: Option<UnixMillis>,
) -> Result<Option<ClaimedEvent>, StoreError> {
    let next: Option<i64> = conn
        .prepare_cached(NEXT_HELD)?
        .query_row(params![queue, key], |r| r.get(0))
        .optional()?;
    let mut taken = None;
    if let Some(rid) = next {
        if let Some(until) = lease_until {
            let token = new_lease_token(rid);
            // Decoded before it is leased, and a failure only leaves it to a claim: this runs
            // after the completion's own writes, which only a SQLite error may fail.
            match read_leased(conn, rid, token.clone(), until) {
                Ok(event) => {
                    conn.prepare_cached(
                        "UPDATE events SET state = 1, lease_token = ?1, due_at = ?2 WHERE rid = ?3",
                    )?
                    .execute(params![token, until, rid])?;
                    taken = Some(event);
                }
                Err(e) => tracing::warn!(
                    row = rid,
                    error = %e,
                    "the next event of an ordering key could not be read; leaving it to a claim"
                ),
            }
        }
        if taken.is_none() {
            // Its own due time if already past (it has waited that long: claims go oldest due
            // first), else now.
            conn.prepare_cached(
                "UPDATE events SET state = 0, due_at = MIN(COALESCE(due_at, ?1), ?1) WHERE rid = ?2",
            )?
            .execute(params![now_ms, rid])?;
        }
    }
    conn.prepare_cached("UPDATE ordering_keys SET active_rid = ?3 WHERE queue = ?1 AND key = ?2")?
        .execute(params![queue, key, next])?;
    Ok(taken)
}

/// One event row and its payload, as a claim hands it out under `lease_token`.
fn read_leased(
    conn: &Connection,
    rid: i64,
    lease_token: String,
    lease_until_ms: UnixMillis,
) -> Result<ClaimedEvent, StoreError> {
    let state = conn
        .prepare_cached(
            "SELECT id, queue, attempts_made, ordering_key, sequence FROM events WHERE rid = ?1",
        )?
        .query_row(params![rid], |row| {
            Ok(ClaimedState {
                id: row.get(0)?,
                queue: row.get(1)?,
                attempts_made: get_u32(row, 2)?,
                ordering: get_ordering(row, 3, 4)?,
            })
        })?;
    conn.prepare_cached(&format!(
        "SELECT {PAYLOAD_COLUMNS} FROM event_payloads WHERE rid = ?1"
    ))?
    .query_row(params![rid], |row| {
        claimed_from_row(state, row, lease_token, lease_until_ms)
    })
    .optional()?
    .ok_or_else(|| StoreError::Corrupt(format!("event row {rid} has no payload")))
}

// One argument per part of the delivery result the trait method receives; a struct made only
// to carry them here would be unpacked again on the next line.
#[allow(clippy::too_many_arguments)]
pub(super) fn tx_complete(
    conn: &Connection,
    ws: &mut WriterState,
    event_id: &str,
    lease_token: &str,
    attempt: Option<AttemptRecord>,
    disposition: Disposition,
    now_ms: UnixMillis,
    take_next_until: Option<UnixMillis>,
) -> Result<Completion, StoreError> {
    let counts = !matches!(disposition, Disposition::Defer { .. });
    let mut deferred_by = None;
    let (state, due_at, delivered_at, dead_at, reason) = match disposition {
        Disposition::Delivered => (DELIVERED, None, Some(now_ms), None, None),
        Disposition::Retry { due_at_ms } => (PENDING, Some(due_at_ms), None, None, None),
        Disposition::Defer { due_at_ms, breaker } => {
            deferred_by = breaker;
            (PENDING, Some(due_at_ms), None, None, None)
        }
        Disposition::DeadLetter { reason } => {
            (DEAD_LETTERED, None, None, Some(now_ms), Some(reason))
        }
    };
    // The lease check and the state change are one statement: a lease that expired and was
    // claimed by another worker has a new token, so the stale worker's result matches no row
    // and is ignored. An expired lease nobody re-claimed still counts.
    // No savepoint (see `JobKind::needs_savepoint`): what RETURNING decodes, the claim that
    // issued this lease decoded already, so after this write only a SQLite error can fail.
    let by_rid = lease_rid(lease_token);
    let updated: Option<(String, i64, i64, Option<String>)> = conn
        .prepare_cached(if by_rid.is_some() {
            "UPDATE events SET state = ?1, due_at = ?2, lease_token = NULL, lease_expiries = 0,
                 attempts_made = attempts_made + ?3, delivered_at = ?4, dead_lettered_at = ?5,
                 dead_letter_reason = ?6, deferred_by = ?10
             WHERE rid = ?9 AND id = ?7 AND state = 1 AND lease_token = ?8
             RETURNING queue, attempts_made, round, ordering_key"
        } else {
            "UPDATE events SET state = ?1, due_at = ?2, lease_token = NULL, lease_expiries = 0,
                 attempts_made = attempts_made + ?3, delivered_at = ?4, dead_lettered_at = ?5,
                 dead_letter_reason = ?6, deferred_by = ?10
             WHERE id = ?7 AND state = 1 AND lease_token = ?8 AND ?9 IS NULL
             RETURNING queue, attempts_made, round, ordering_key"
        })?
        .query_row(
            params![
                state,
                due_at,
                i64::from(counts),
                delivered_at,
                dead_at,
                reason,
                event_id,
                lease_token,
                by_rid,
                deferred_by
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((queue, attempts_made, round, ordering_key)) = updated else {
        return Ok(Completion {
            recorded: false,
            next: None,
        });
    };
    if counts {
        if let Some(a) = attempt {
            conn.prepare_cached(
                "INSERT INTO attempts (event_id, round, attempt, started_at, latency_ms, status, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                event_id,
                round,
                // The store's count is authoritative: the lease check proved this is the
                // attempt it handed out.
                attempts_made,
                a.started_at_ms,
                to_i64(a.latency_ms),
                a.status,
                a.error
            ])?;
        }
    }
    let mut next = None;
    if state == DELIVERED || state == DEAD_LETTERED {
        if let Some(key) = ordering_key {
            next = release_next_of_key(conn, &queue, &key, now_ms, take_next_until)?;
        }
        ws.adjust(&queue, -1);
    }
    Ok(Completion {
        recorded: true,
        next,
    })
}

/// Makes the pending events deferred by `host`'s breaker (every breaker, for `None`) due at
/// `now_ms`, or sooner if they already were. Uses the partial `events_deferred` index.
pub(super) fn tx_undefer(
    conn: &Connection,
    host: Option<&str>,
    now_ms: UnixMillis,
) -> Result<u64, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE events SET due_at = MIN(due_at, ?1), deferred_by = NULL
             WHERE deferred_by IS NOT NULL AND (?2 IS NULL OR deferred_by = ?2) AND state = 0",
        )?
        .execute(params![now_ms, host])?;
    Ok(changed as u64)
}

pub(super) fn tx_release(
    conn: &Connection,
    leases: &[(String, String)],
    now_ms: UnixMillis,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE events SET state = 0, due_at = ?1, lease_token = NULL
         WHERE id = ?2 AND state = 1 AND lease_token = ?3",
    )?;
    for (id, token) in leases {
        stmt.execute(params![now_ms, id, token])?;
    }
    Ok(())
}

pub(super) fn tx_replay(
    conn: &Connection,
    ws: &mut WriterState,
    ids: &[String],
    now_ms: UnixMillis,
) -> Result<Vec<String>, StoreError> {
    // A new round: attempts_made restarts so the retry schedule and X-Delivery-Attempt count
    // from 1 again; the old round's attempt rows stay as history.
    let mut stmt = conn.prepare_cached(
        "UPDATE events SET state = 0, due_at = ?1, lease_token = NULL, attempts_made = 0,
             lease_expiries = 0, round = round + 1, dead_lettered_at = NULL,
             dead_letter_reason = NULL
         WHERE id = ?2 AND state = 3
         RETURNING queue, rid, ordering_key, sequence",
    )?;
    // A keyed dead letter keeps its sequence: it goes first if its key is free, else waits
    // (held) until the key's current event is done, before the key's later held events.
    let mut take_key = conn.prepare_cached(
        "INSERT INTO ordering_keys (queue, key, last_seq, active_rid) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (queue, key) DO UPDATE SET active_rid = COALESCE(active_rid, excluded.active_rid)
         RETURNING active_rid",
    )?;
    let mut hold = conn.prepare_cached("UPDATE events SET state = 4 WHERE rid = ?1")?;
    let mut replayed = Vec::new();
    for id in ids {
        let row: Option<(String, i64, Option<String>, Option<i64>)> = stmt
            .query_row(params![now_ms, id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        if let Some((queue, rid, key, sequence)) = row {
            if let Some(key) = key {
                let active: i64 = take_key
                    .query_row(params![queue, key, sequence.unwrap_or(0), rid], |r| {
                        r.get(0)
                    })?;
                if active != rid {
                    hold.execute(params![rid])?;
                }
            }
            // Replay is an operator's decision and is not refused at max_depth.
            ws.adjust(&queue, 1);
            replayed.push(id.clone());
        }
    }
    Ok(replayed)
}

/// Deletes up to `chunk` finished events (with their attempts and fallback records) and up to
/// `chunk` expired idempotency keys. Returns (events, keys) removed.
pub(super) fn tx_purge_chunk(
    conn: &Connection,
    before_ms: UnixMillis,
    now_ms: UnixMillis,
    chunk: usize,
) -> Result<(u64, u64), StoreError> {
    let victims = conn
        .prepare_cached(
            "SELECT rid, id FROM (SELECT rid, id FROM events
                                  WHERE state = 3 AND dead_lettered_at < ?1 LIMIT ?2)
             UNION ALL
             SELECT rid, id FROM (SELECT rid, id FROM events
                                  WHERE state = 2 AND delivered_at < ?1 LIMIT ?2)",
        )?
        .query_map(params![before_ms, limit_i64(chunk)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut del_attempts = conn.prepare_cached("DELETE FROM attempts WHERE event_id = ?1")?;
    let mut del_fallbacks = conn.prepare_cached("DELETE FROM fallbacks WHERE event_id = ?1")?;
    let mut del_payload = conn.prepare_cached("DELETE FROM event_payloads WHERE rid = ?1")?;
    let mut del_event = conn.prepare_cached("DELETE FROM events WHERE rid = ?1")?;
    for (rid, id) in &victims {
        del_attempts.execute(params![id])?;
        del_fallbacks.execute(params![id])?;
        del_payload.execute(params![rid])?;
        del_event.execute(params![rid])?;
    }
    let keys = conn
        .prepare_cached(
            "DELETE FROM idempotency WHERE (event_type, key) IN
                 (SELECT event_type, key FROM idempotency WHERE expires_at <= ?1 LIMIT ?2)",
        )?
        .execute(params![now_ms, limit_i64(chunk)])?;
    Ok((victims.len() as u64, keys as u64))
}

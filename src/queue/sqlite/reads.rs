//! The reads behind the operator queries (an event with its attempts, dead-letter pages and
//! their cursors, fallback records, queue stats); each runs on a pooled read connection.

use rusqlite::{params, Connection, OptionalExtension};

use super::rows::{
    corrupt_col, get_fallback, get_ordering, get_state, get_status, get_u32, get_u64, limit_i64,
};
use super::sql::{
    COUNT_DEAD, COUNT_DELAYED, COUNT_HELD, COUNT_IN_FLIGHT, COUNT_READY, DEAD_LETTERED, DELIVERED,
    DLQ_PAGE,
};
use crate::queue::{
    AttemptRecord, DeadLetter, DlqFilter, EventRecord, EventState, FallbackReason, FallbackRecord,
    Page, QueueStats, Reconciliation, StoreError, UnixMillis,
};

pub(super) fn read_event(
    conn: &mut Connection,
    id: &str,
) -> Result<Option<EventRecord>, StoreError> {
    // One read transaction, so the event and its attempts come from the same snapshot.
    let tx = conn.transaction()?;
    let record = tx
        .prepare_cached(
            "SELECT e.id, p.event_type, e.queue, p.target, p.trace_id, e.state, p.received_at,
                    e.due_at, e.delivered_at, e.dead_lettered_at, e.dead_letter_reason, p.fallback,
                    e.ordering_key, e.sequence
             FROM events e JOIN event_payloads p ON p.rid = e.rid WHERE e.id = ?1",
        )?
        .query_row(params![id], |r| {
            let state = get_state(r, 5)?;
            Ok(EventRecord {
                id: r.get(0)?,
                event_type: r.get(1)?,
                queue: r.get(2)?,
                target: r.get(3)?,
                trace_id: r.get(4)?,
                state,
                received_at_ms: r.get(6)?,
                // While in flight due_at is the lease expiry, not a due time: not reported.
                due_at_ms: if state == EventState::Pending {
                    r.get(7)?
                } else {
                    None
                },
                delivered_at_ms: r.get(8)?,
                dead_lettered_at_ms: r.get(9)?,
                dead_letter_reason: r.get(10)?,
                fallback: get_fallback(r, 11)?,
                ordering: get_ordering(r, 12, 13)?,
                attempts: Vec::new(),
            })
        })
        .optional()?;
    let Some(mut record) = record else {
        return Ok(None);
    };
    record.attempts = tx
        .prepare_cached(
            "SELECT attempt, started_at, latency_ms, status, error
             FROM attempts WHERE event_id = ?1 ORDER BY seq",
        )?
        .query_map(params![id], |r| {
            Ok(AttemptRecord {
                attempt: get_u32(r, 0)?,
                started_at_ms: r.get(1)?,
                latency_ms: get_u64(r, 2)?,
                status: get_status(r, 3)?,
                error: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(record))
}

pub(super) fn encode_cursor(at_ms: UnixMillis, id: &str) -> String {
    format!("{at_ms}:{id}")
}

pub(super) fn decode_cursor(cursor: &str) -> Result<(UnixMillis, String), StoreError> {
    cursor
        .split_once(':')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.to_owned())))
        .ok_or_else(|| StoreError::InvalidInput(format!("invalid dead-letter cursor {cursor:?}")))
}

pub(super) fn read_dead_letters(
    conn: &mut Connection,
    filter: &DlqFilter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<Page<DeadLetter>, StoreError> {
    if limit == 0 {
        return Ok(Page {
            items: Vec::new(),
            next_cursor: None,
        });
    }
    // Absent bounds become sentinels rather than `?n IS NULL OR ...`, so every bound stays a
    // range condition on `events_dlq` and a deep page starts where the last one stopped
    // instead of re-reading every earlier row.
    let (after_at, after_id) = match cursor {
        Some(c) => decode_cursor(c)?,
        None => (UnixMillis::MAX, String::new()),
    };
    let since = filter.since_ms.unwrap_or(UnixMillis::MIN);
    let until = filter.until_ms.unwrap_or(UnixMillis::MAX);
    // Newest first, keyset-paged on (dead_lettered_at, id): stable while dead letters come and
    // go, and each page is an index range scan however deep the page.
    let mut items = conn
        .prepare_cached(DLQ_PAGE)?
        .query_map(
            params![
                filter.event_type,
                filter.queue,
                since,
                until,
                after_at,
                after_id,
                limit_i64(limit.saturating_add(1)),
            ],
            |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    event_type: r.get(1)?,
                    queue: r.get(2)?,
                    target: r.get(3)?,
                    trace_id: r.get(4)?,
                    reason: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                    attempts: get_u32(r, 6)?,
                    last_status: get_status(r, 7)?,
                    last_error: r.get(8)?,
                    received_at_ms: r.get(9)?,
                    dead_lettered_at_ms: r.get(10)?,
                    ordering: get_ordering(r, 11, 12)?,
                })
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    // One extra row was fetched only to learn whether another page exists.
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

pub(super) fn read_fallbacks(
    conn: &mut Connection,
    since_ms: UnixMillis,
    limit: usize,
) -> Result<Vec<FallbackRecord>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT f.event_id, f.trace_id, f.event_type, f.reason, f.target, f.at_ms,
                    e.state, e.delivered_at
             FROM fallbacks f LEFT JOIN events e ON e.id = f.event_id
             WHERE f.at_ms >= ?1
             ORDER BY f.at_ms, f.seq
             LIMIT ?2",
        )?
        .query_map(params![since_ms, limit_i64(limit)], |r| {
            let reason: String = r.get(3)?;
            let state = match r.get::<_, Option<i64>>(6)? {
                Some(DELIVERED) => Reconciliation::Delivered,
                Some(DEAD_LETTERED) => Reconciliation::DeadLettered,
                _ => Reconciliation::Pending,
            };
            Ok(FallbackRecord {
                event_id: r.get(0)?,
                trace_id: r.get(1)?,
                event_type: r.get(2)?,
                reason: FallbackReason::parse(&reason)
                    .ok_or_else(|| corrupt_col(3, format!("unknown fallback reason {reason:?}")))?,
                target: r.get(4)?,
                at_ms: r.get(5)?,
                state,
                delivered_at_ms: if state == Reconciliation::Delivered {
                    r.get(7)?
                } else {
                    None
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub(super) fn read_stats(
    conn: &mut Connection,
    queue: &str,
    now_ms: UnixMillis,
) -> Result<QueueStats, StoreError> {
    let tx = conn.transaction()?;
    // All four are counts over ranges of the (queue, state, due_at) index.
    let (ready, oldest): (u64, Option<i64>) = tx
        .prepare_cached(COUNT_READY)?
        .query_row(params![queue, now_ms], |r| Ok((get_u64(r, 0)?, r.get(1)?)))?;
    let delayed = tx
        .prepare_cached(COUNT_DELAYED)?
        .query_row(params![queue, now_ms], |r| get_u64(r, 0))?;
    let in_flight = tx
        .prepare_cached(COUNT_IN_FLIGHT)?
        .query_row(params![queue], |r| get_u64(r, 0))?;
    let held = tx
        .prepare_cached(COUNT_HELD)?
        .query_row(params![queue], |r| get_u64(r, 0))?;
    let dead_lettered = tx
        .prepare_cached(COUNT_DEAD)?
        .query_row(params![queue], |r| get_u64(r, 0))?;
    let oldest_ready_age_ms = oldest
        .map(|due| u64::try_from(now_ms.saturating_sub(due)).unwrap_or(0))
        .unwrap_or(0);
    Ok(QueueStats {
        ready,
        delayed,
        held,
        in_flight,
        dead_lettered,
        oldest_ready_age_ms,
    })
}

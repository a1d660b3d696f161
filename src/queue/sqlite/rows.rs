//! Conversions between SQLite values and the store's types: integers in and out of range,
//! and the decoding of columns and rows (state, ordering, fallback reason, a claimed event).
//! A value that does not decode is reported as corruption, never a panic.

use bytes::Bytes;
use rusqlite::types::Type;
use rusqlite::Row;

use super::sql::{DEAD_LETTERED, DELIVERED, HELD, IN_FLIGHT, PENDING};
use crate::queue::{
    ClaimedEvent, Event, EventState, FallbackReason, KeySequence, SignatureScheme, UnixMillis,
};

pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn limit_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn corrupt_col(idx: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, msg.into())
}

pub(super) fn get_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub(super) fn get_u32(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(idx)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub(super) fn get_status(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u16>> {
    let v: Option<i64> = row.get(idx)?;
    v.map(|v| u16::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

pub(super) fn get_fallback(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<FallbackReason>> {
    let v: Option<String> = row.get(idx)?;
    v.map(|s| {
        FallbackReason::parse(&s)
            .ok_or_else(|| corrupt_col(idx, format!("unknown fallback reason {s:?}")))
    })
    .transpose()
}

/// An event's key and sequence from two columns (both NULL for an unkeyed event).
pub(super) fn get_ordering(
    row: &Row<'_>,
    key: usize,
    sequence: usize,
) -> rusqlite::Result<Option<KeySequence>> {
    match row.get::<_, Option<String>>(key)? {
        None => Ok(None),
        Some(key_value) => Ok(Some(KeySequence {
            key: key_value,
            sequence: get_u64(row, sequence)?,
        })),
    }
}

pub(super) fn get_state(row: &Row<'_>, idx: usize) -> rusqlite::Result<EventState> {
    match row.get::<_, i64>(idx)? {
        PENDING => Ok(EventState::Pending),
        IN_FLIGHT => Ok(EventState::InFlight),
        DELIVERED => Ok(EventState::Delivered),
        DEAD_LETTERED => Ok(EventState::DeadLettered),
        HELD => Ok(EventState::Held),
        other => Err(corrupt_col(idx, format!("unknown event state {other}"))),
    }
}

/// The state columns of a just-claimed `events` row.
pub(super) struct ClaimedState {
    pub(super) id: String,
    pub(super) queue: String,
    pub(super) attempts_made: u32,
    pub(super) ordering: Option<KeySequence>,
}

pub(super) fn claimed_from_row(
    state: ClaimedState,
    row: &Row<'_>,
    lease_token: String,
    lease_until_ms: UnixMillis,
) -> rusqlite::Result<ClaimedEvent> {
    let signature: String = row.get(6)?;
    let delays: String = row.get(8)?;
    let body: Vec<u8> = row.get(2)?;
    Ok(ClaimedEvent {
        event: Event {
            id: state.id,
            event_type: row.get(0)?,
            body: Bytes::from(body),
            content_type: row.get(3)?,
            trace_id: row.get(4)?,
            idempotency_key: row.get(5)?,
        },
        queue: state.queue,
        target: row.get(1)?,
        signature: SignatureScheme::parse(&signature)
            .ok_or_else(|| corrupt_col(6, format!("unknown signature scheme {signature:?}")))?,
        timeout_ms: get_u64(row, 7)?,
        retry_delays_ms: serde_json::from_str(&delays)
            .map_err(|e| corrupt_col(8, format!("bad retry delays {delays:?}: {e}")))?,
        jitter: row.get(9)?,
        attempt: state.attempts_made.saturating_add(1),
        lease_token,
        lease_until_ms,
        ordering: state.ordering,
    })
}

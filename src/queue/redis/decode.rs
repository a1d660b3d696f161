//! How the Redis store encodes what it keeps and decodes what Redis answers: dead-letter
//! index members and page cursors, stored attempts, and reply values (strings, integers,
//! arrays, a claimed event, an event's ordering). A reply that does not decode is reported as
//! corruption, never a panic.

use bytes::Bytes;
use redis::Value;
use serde::{Deserialize, Serialize};

use crate::queue::{
    ClaimedEvent, Event, FallbackReason, KeySequence, SignatureScheme, StoreError, UnixMillis,
};

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis: {what}"))
}

/// Member of the `dlq` set: the time zero-padded so lexical order is time order, then the id.
pub(super) fn dlq_member(at_ms: UnixMillis, id: &str) -> String {
    format!("{:020}:{id}", at_ms.max(0))
}

pub(super) fn encode_cursor(at_ms: UnixMillis, id: &str) -> String {
    format!("{at_ms}:{id}")
}

pub(super) fn decode_cursor(cursor: &str) -> Result<(UnixMillis, String), StoreError> {
    cursor
        .split_once(':')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.to_owned())))
        .filter(|(at, id): &(i64, String)| *at >= 0 && !id.is_empty())
        .ok_or_else(|| StoreError::InvalidInput(format!("invalid dead-letter cursor {cursor:?}")))
}

/// An attempt as stored in `att:<id>` (the attempt number is kept outside, set by the script).
#[derive(Serialize, Deserialize)]
pub(super) struct StoredAttempt {
    pub(super) started_at_ms: UnixMillis,
    pub(super) latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

/// Fields the claim script returns after id, token and due time, in this order.
pub(super) const CLAIM_FIELDS: [&str; 14] = [
    "type", "queue", "target", "ct", "trace", "ikey", "sig", "timeout", "delays", "jitter", "made",
    "body", "okey", "oseq",
];

// ---------------------------------------------------------------------------------------------
// Decoding replies

pub(super) fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn opt_string(v: &Value) -> Result<Option<String>, StoreError> {
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

pub(super) fn string(v: &Value, what: &str) -> Result<String, StoreError> {
    opt_string(v)?.ok_or_else(|| corrupt(format!("missing {what}")))
}

pub(super) fn opt_i64(v: &Value, what: &str) -> Result<Option<i64>, StoreError> {
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

pub(super) fn int(v: &Value, what: &str) -> Result<i64, StoreError> {
    opt_i64(v, what)?.ok_or_else(|| corrupt(format!("missing {what}")))
}

pub(super) fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("expected an array, got {other:?}"))),
    }
}

pub(super) fn fallback_of(v: &Value) -> Result<Option<FallbackReason>, StoreError> {
    opt_string(v)?
        .map(|s| {
            FallbackReason::parse(&s).ok_or_else(|| corrupt(format!("unknown fallback {s:?}")))
        })
        .transpose()
}

pub(super) fn last_attempt(v: &Value) -> Result<(Option<u16>, Option<String>), StoreError> {
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
pub(super) fn ordering_of(
    key: &Value,
    sequence: &Value,
) -> Result<Option<KeySequence>, StoreError> {
    let Some(key) = opt_string(key)? else {
        return Ok(None);
    };
    let sequence =
        u64::try_from(int(sequence, "sequence")?).map_err(|_| corrupt("negative sequence"))?;
    Ok(Some(KeySequence { key, sequence }))
}

pub(super) fn claimed_from(
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
        event: Event {
            id,
            event_type: string(&f[3], "event type")?,
            body,
            content_type: opt_string(&f[6])?,
            trace_id: string(&f[7], "trace id")?,
            idempotency_key: opt_string(&f[8])?,
        },
        queue: string(&f[4], "queue")?,
        target: string(&f[5], "target")?,
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
    };
    Ok((due, event))
}

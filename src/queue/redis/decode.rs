//! How the Redis store encodes what it keeps and decodes what Redis answers: dead-letter
//! index members and page cursors, stored attempts, and reply values (strings, integers,
//! arrays, a claimed event, an event's ordering). A reply that does not decode is reported as
//! corruption, never a panic.

use std::borrow::Cow;

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

/// The fields of an event that never change once it is accepted, kept in its hash as the one
/// JSON field `m`. Redis pays per field and per argument (an object to create, a hash entry to
/// look up, a line of the append-only file), so the enqueue writes this and the claim reads it
/// as one field where they used to handle eleven. Scripts never read it: what they need
/// (`queue`, `okey`, `due`, the state) stays in fields of their own.
///
/// Borrowed when written (the enqueue serializes the event's own fields without copying them),
/// owned when read.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredMeta<'a> {
    #[serde(rename = "type")]
    pub(super) event_type: Cow<'a, str>,
    pub(super) target: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) ct: Option<Cow<'a, str>>,
    pub(super) trace: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) ikey: Option<Cow<'a, str>>,
    pub(super) sig: Cow<'a, str>,
    pub(super) timeout: u64,
    pub(super) delays: Cow<'a, [u64]>,
    pub(super) jitter: f64,
    pub(super) recv: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fb: Option<Cow<'a, str>>,
}

/// The fields events stored before `m` existed hold their metadata in, in the order
/// [`meta_of`] reads them. Readers ask for them after `m`, so events accepted by an earlier
/// version are still delivered and listed after an upgrade.
pub(super) const LEGACY_META_FIELDS: [&str; 11] = [
    "type", "target", "ct", "trace", "ikey", "sig", "timeout", "delays", "jitter", "recv", "fb",
];

/// The fields to ask `HMGET` for to read `own` and the event's metadata: `m`, `own`, then
/// [`LEGACY_META_FIELDS`]; [`split_meta`] takes the reply apart.
pub(super) fn with_meta(own: &[&'static str]) -> Vec<&'static str> {
    let mut all = vec!["m"];
    all.extend_from_slice(own);
    all.extend_from_slice(&LEGACY_META_FIELDS);
    all
}

/// A [`with_meta`] reply as the event's metadata and the values of its own fields; `None` when
/// the event is gone (no field at all: purged, or never stored).
pub(super) fn split_meta(
    row: &[Value],
    own: usize,
) -> Result<Option<(StoredMeta<'static>, &[Value])>, StoreError> {
    if row.len() != 1 + own + LEGACY_META_FIELDS.len() {
        return Err(corrupt(format!("HMGET answered {} fields", row.len())));
    }
    if row.iter().all(|v| *v == Value::Nil) {
        return Ok(None);
    }
    let fields = &row[1..=own];
    Ok(Some((meta_of(&row[0], &row[1 + own..])?, fields)))
}

/// An event's metadata: its `m` field, or when it has none (stored by an earlier version) the
/// values of [`LEGACY_META_FIELDS`] in `legacy`.
pub(super) fn meta_of(m: &Value, legacy: &[Value]) -> Result<StoredMeta<'static>, StoreError> {
    if let Some(json) = bytes_of(m) {
        return serde_json::from_slice(json).map_err(|e| corrupt(format!("event metadata: {e}")));
    }
    let [event_type, target, ct, trace, ikey, sig, timeout, delays, jitter, recv, fb] = legacy
    else {
        return Err(corrupt(format!(
            "an event without metadata ({} legacy fields)",
            legacy.len()
        )));
    };
    let delays = string(delays, "retry delays")?;
    let jitter = string(jitter, "jitter")?;
    let delays: Vec<u64> = serde_json::from_str(&delays)
        .map_err(|e| corrupt(format!("bad retry delays {delays:?}: {e}")))?;
    Ok(StoredMeta {
        event_type: string(event_type, "event type")?.into(),
        target: string(target, "target")?.into(),
        ct: opt_string(ct)?.map(Cow::Owned),
        trace: string(trace, "trace id")?.into(),
        ikey: opt_string(ikey)?.map(Cow::Owned),
        sig: string(sig, "signature")?.into(),
        timeout: u64::try_from(int(timeout, "timeout")?)
            .map_err(|_| corrupt("negative timeout"))?,
        delays: delays.into(),
        jitter: jitter
            .parse()
            .map_err(|_| corrupt(format!("bad jitter {jitter:?}")))?,
        recv: int(recv, "received time")?,
        fb: opt_string(fb)?.map(Cow::Owned),
    })
}

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

pub(super) fn fallback_of(
    stored: Option<Cow<'_, str>>,
) -> Result<Option<FallbackReason>, StoreError> {
    stored
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

/// A claim entry (`claim_entry` in `lua.rs`): id, token, due time, `m`, queue, attempts made,
/// body, ordering key and sequence, then for an event without `m` its legacy fields.
pub(super) fn claimed_from(
    entry: Value,
    lease_until_ms: UnixMillis,
) -> Result<(i64, ClaimedEvent), StoreError> {
    let mut f = array(entry)?;
    if f.len() != 9 && f.len() != 9 + LEGACY_META_FIELDS.len() {
        return Err(corrupt(format!("claim reply has {} fields", f.len())));
    }
    let id = string(&f[0], "id")?;
    let meta = meta_of(&f[3], &f[9..])?;
    let made = opt_i64(&f[5], "attempts")?.unwrap_or(0);
    // Moved out of the reply, not copied: the body is the largest thing a claim returns.
    let body = match std::mem::replace(&mut f[6], Value::Nil) {
        Value::BulkString(b) => Bytes::from(b),
        Value::Nil => return Err(corrupt(format!("event {id} has no body"))),
        v => Bytes::from(bytes_of(&v).unwrap_or_default().to_vec()),
    };
    let due = int(&f[2], "due time")?;
    let event = ClaimedEvent {
        event: Event {
            id,
            event_type: meta.event_type.into_owned(),
            body,
            content_type: meta.ct.map(Cow::into_owned),
            trace_id: meta.trace.into_owned(),
            idempotency_key: meta.ikey.map(Cow::into_owned),
        },
        queue: string(&f[4], "queue")?,
        target: meta.target.into_owned(),
        signature: SignatureScheme::parse(&meta.sig)
            .ok_or_else(|| corrupt(format!("unknown signature scheme {:?}", meta.sig)))?,
        timeout_ms: meta.timeout,
        retry_delays_ms: meta.delays.into_owned(),
        jitter: meta.jitter,
        attempt: u32::try_from(made.saturating_add(1)).unwrap_or(u32::MAX),
        lease_token: string(&f[1], "lease token")?,
        lease_until_ms,
        ordering: ordering_of(&f[7], &f[8])?,
    };
    Ok((due, event))
}

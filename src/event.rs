//! The event, and what every layer says about one: how it is delivered, why a sync delivery
//! fell back, its place in an ordering key.
//!
//! A leaf module: ingress makes an [`Event`], the dispatcher hands it to the sync relay or the
//! queue, the queue stores it and hands it back to delivery, all as this one type; routing,
//! metrics, sync and the queue share the small enums here without importing one another.

use bytes::Bytes;
use serde::Serialize;

/// One event, as a service handed it to hookyard: what every delivery of it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `evt_<ulid>` (`webhook-id`): stable across retries, fallback and replay, so receivers
    /// can deduplicate on it.
    pub id: String,
    pub event_type: String,
    /// Delivered unchanged and signed as received.
    pub body: Bytes,
    pub content_type: Option<String>,
    pub trace_id: String,
    /// The caller's `Idempotency-Key`, if it sent one; deliveries send the event id otherwise.
    pub idempotency_key: Option<String>,
}

impl Event {
    /// A newly received event, given a fresh id.
    pub fn new(
        event_type: String,
        body: Bytes,
        content_type: Option<String>,
        trace_id: String,
        idempotency_key: Option<String>,
    ) -> Self {
        Self {
            id: new_event_id(),
            event_type,
            body,
            content_type,
            trace_id,
            idempotency_key,
        }
    }
}

/// A new event id: `evt_` + a ULID (time-ordered, so ids sort by arrival).
pub fn new_event_id() -> String {
    const PREFIX: &str = "evt_";
    let mut ulid = [0u8; ulid::ULID_LEN];
    let mut id = String::with_capacity(PREFIX.len() + ulid::ULID_LEN);
    id.push_str(PREFIX);
    id.push_str(ulid::Ulid::new().array_to_str(&mut ulid));
    id
}

/// How a rule delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// The caller waits for the target's answer.
    Sync,
    /// Durably queued; the caller gets 202 at once.
    Async,
}

impl DeliveryMode {
    /// `"sync"` or `"async"`, as in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
        }
    }
}

/// Why a sync delivery fell back to the async path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    Timeout,
    #[serde(rename = "upstream_5xx")]
    Upstream5xx,
    CircuitOpen,
    Shed,
    Connect,
}

impl FallbackReason {
    /// All reasons, for metrics pre-registration and parsing.
    pub const ALL: [FallbackReason; 5] = [
        Self::Timeout,
        Self::Upstream5xx,
        Self::CircuitOpen,
        Self::Shed,
        Self::Connect,
    ];

    /// The wire name (`"timeout"`, `"upstream_5xx"`, ...), as in the 202 body and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Upstream5xx => "upstream_5xx",
            Self::CircuitOpen => "circuit_open",
            Self::Shed => "shed",
            Self::Connect => "connect",
        }
    }

    /// Inverse of [`FallbackReason::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// An event's place in its ordering key: the key, and its 1-based sequence within it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySequence {
    pub key: String,
    /// 1, 2, 3… in accept order per queue and key; stable across retries and replay.
    pub sequence: u64,
}

//! The HTTP header names hookyard reads and writes, parsed once.
//!
//! A `&'static str` name is parsed and validated on every insert or lookup; these constants
//! skip that on the per-request path.

use http::HeaderName;

/// Caller's or generated trace id, echoed to the caller and forwarded to the target.
pub const X_TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");
/// W3C trace context: read at ingress, and a child span per attempt sent to the target.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The caller's deduplication key; the event id is sent when the caller gave none.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The event type, sent to the target.
pub const X_EVENT_TYPE: HeaderName = HeaderName::from_static("x-event-type");
/// `sync` or `async`, sent to the target.
pub const X_CALLBACK_MODE: HeaderName = HeaderName::from_static("x-callback-mode");
/// 1 for the first attempt, sent to the target.
pub const X_DELIVERY_ATTEMPT: HeaderName = HeaderName::from_static("x-delivery-attempt");
/// The event's ordering key, on deliveries of a rule with `ordering_key`.
pub const X_ORDERING_KEY: HeaderName = HeaderName::from_static("x-ordering-key");
/// The event's place in its ordering key (1, 2, 3…), so a receiver can check the order.
pub const X_SEQUENCE: HeaderName = HeaderName::from_static("x-sequence");
/// How the caller's event was handled (`sync` on a relayed answer).
pub const X_DISPATCH_MODE: HeaderName = HeaderName::from_static("x-dispatch-mode");
/// The event id on a relayed answer.
pub const X_EVENT_ID: HeaderName = HeaderName::from_static("x-event-id");

/// On sync answers: the target's time in whole milliseconds, so a caller can tell its own
/// proxy's timeout from the target's slowness.
pub const X_DOWNSTREAM_LATENCY: HeaderName = HeaderName::from_static("x-downstream-latency");

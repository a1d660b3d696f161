//! The OpenAPI description of the ingress route (collected by `crate::admin::openapi`).
//!
//! The answers are built in `super::respond` and `super::Ingress::answer`; these types spell
//! out their JSON shapes, and the ingress tests check those fields.

use serde::Serialize;

/// `202`: stored durably (async rule), queued after a sync failure (`sync_to_async`), or a
/// duplicate of an event accepted earlier with the same `Idempotency-Key`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// `accepted` or `queued` (a sync delivery that fell back to the queue).
    pub status: String,
    /// `evt_…`: the `webhook-id` deliveries carry.
    pub event_id: String,
    pub trace_id: String,
    /// `sync_to_async` when queued.
    pub fallback: Option<String>,
    /// Why a sync delivery fell back: `timeout`, `upstream_5xx`, `connect`, `circuit_open`, `shed`.
    pub reason: Option<String>,
    /// True when this answers a repeated `Idempotency-Key`: nothing new was stored.
    pub duplicate: Option<bool>,
}

/// Every ingress error (4xx, 5xx) that is not the target's own answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct IngressError {
    /// `not_found`, `method_not_allowed`, `invalid_event_type`, `invalid_idempotency_key`,
    /// `invalid_content_type`, `invalid_ordering_key`, `payload_too_large`, `request_timeout`,
    /// `bad_body`, `no_route`,
    /// `queue_full`, `overloaded`, `store_unavailable`, or (502/503/504 of a sync rule) the
    /// failure as text.
    pub error: String,
    /// For people; for a sync failure: `timeout`, `upstream_5xx`, `connect`, `circuit_open`, `shed`.
    pub reason: Option<String>,
    pub trace_id: String,
    /// Set once the event has an id (sync failures, store failures).
    pub event_id: Option<String>,
    /// `no_route` only: the event type no rule matched.
    pub event_type: Option<String>,
    /// `store_unavailable` only: `not_stored` (a retry is safe) or `unknown` (retry with the
    /// same `Idempotency-Key`).
    pub outcome: Option<String>,
}

// `{event}`: the admin API's `GET /v1/events/{event}` is the same path to OpenAPI.
#[utoipa::path(post, path = "/v1/events/{event}", tag = "ingress",
    description = "Sends one event. A sync rule relays it and answers with the target's status, body and content type (`x-dispatch-mode: sync`, `x-event-id`); an async rule stores it and answers 202. Every answer carries `x-trace-id`.",
    params(
        ("event" = String, Path, description = "The event type, e.g. `user.created`"),
        ("Idempotency-Key" = Option<String>, Header, description = "1-255 visible ASCII characters; a repeat within the dedup window answers the first event"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; its trace id becomes the event's"),
        ("X-Trace-Id" = Option<String>, Header, description = "The caller's trace id (wins over traceparent); echoed on every answer"),
    ),
    request_body(content = String, content_type = "*/*", description = "Any body up to `max_body_bytes`; delivered and signed byte for byte"),
    responses(
        (status = 202, description = "Stored (async), queued after a sync failure, or a duplicate", body = Accepted,
            headers(("x-trace-id" = String))),
        (status = "default", description = "Sync rule: the target's own answer, relayed",
            headers(("x-dispatch-mode" = String, description = "`sync`"), ("x-event-id" = String), ("x-trace-id" = String),
                ("x-downstream-latency" = u64, description = "The target's time in ms"))),
        (status = 400, description = "Invalid event type, Idempotency-Key, Content-Type, ordering key or body", body = IngressError),
        (status = 404, description = "No rule matches the event type (`no_route`); any other path is `not_found`", body = IngressError),
        (status = 405, description = "Not POST", body = IngressError, headers(("allow" = String))),
        (status = 408, description = "The body did not arrive within ingress.request_timeout_ms", body = IngressError),
        (status = 413, description = "Body over max_body_bytes", body = IngressError),
        (status = 429, description = "The queue is at max_depth", body = IngressError,
            headers(("retry-after" = u32))),
        (status = 502, description = "Sync: the target failed (5xx, connect error)", body = IngressError,
            headers(("x-downstream-latency" = u64, description = "The target's time in ms, after a 5xx"))),
        (status = 503, description = "Sync: circuit open or host shed; or the store is unavailable; or too many bodies in flight", body = IngressError,
            headers(("retry-after" = u32))),
        (status = 504, description = "Sync: the target did not answer in time", body = IngressError,
            headers(("x-downstream-latency" = u64, description = "The rule's deadline in ms"))),
    ),
    security(()),
)]
#[allow(dead_code)]
pub fn post_event() {}

//! The HTTP data plane: `POST /v1/events/{event_type}` -> [`Event`] -> [`Outcome`] -> response.
//!
//! Everything about HTTP lives here (status codes, headers, JSON reasons, body limits);
//! routing and delivery live behind [`Dispatcher::dispatch`].

pub mod openapi;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

use crate::dispatcher::{Dispatcher, Outcome};
use crate::event::Event;
use crate::headers::{
    IDEMPOTENCY_KEY, X_DISPATCH_MODE, X_DOWNSTREAM_LATENCY, X_EVENT_ID, X_TRACE_ID,
};
use crate::httpserver::{
    json, read_body, BodyBudget, BodyError, BodyLimits, BudgetCharge, Handler,
};
use crate::metrics::EdgeRefusal;
use crate::relay::SyncFailure;
use crate::routing::validate_event_type;

pub use trace::{new_trace_id, trace_id_from_headers};

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The ingress request handler.
#[derive(Debug)]
pub struct Ingress {
    dispatcher: Arc<Dispatcher>,
    /// Shared by every ingress event loop: the bound is on the process's memory.
    budget: Arc<BodyBudget>,
}

impl Ingress {
    /// An ingress over `dispatcher` whose bodies are held against `budget`.
    pub fn new(dispatcher: Arc<Dispatcher>, budget: Arc<BodyBudget>) -> Arc<Self> {
        Arc::new(Self { dispatcher, budget })
    }
}

impl Handler for Ingress {
    fn request_timeout(&self) -> Duration {
        self.dispatcher
            .context()
            .snapshot()
            .settings
            .edge
            .request_timeout
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> Response<Full<Bytes>> {
        let trace_id = trace_id_from_headers(request.headers()).unwrap_or_else(new_trace_id);
        let mut response = self.answer(request, &trace_id, deadline).await;
        if let Ok(v) = HeaderValue::from_str(&trace_id) {
            response.headers_mut().insert(X_TRACE_ID, v);
        }
        response
    }
}

fn error(status: StatusCode, error: &str, reason: &str, trace_id: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &json!({"error": error, "reason": reason, "trace_id": trace_id}),
    )
}

impl Ingress {
    async fn answer(
        &self,
        request: Request<Incoming>,
        trace_id: &str,
        deadline: Instant,
    ) -> Response<Full<Bytes>> {
        let Some(event_type) = request.uri().path().strip_prefix("/v1/events/") else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "use POST /v1/events/{event_type}",
                trace_id,
            );
        };
        if request.method() != Method::POST {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "events are sent with POST",
                trace_id,
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        if let Err(e) = validate_event_type(event_type) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_event_type",
                &e.to_string(),
                trace_id,
            );
        }
        let event_type = event_type.to_string();
        let idempotency_key = match request.headers().get(IDEMPOTENCY_KEY) {
            None => None,
            Some(v) => match idempotency_key(v) {
                Some(k) => Some(k.to_string()),
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_idempotency_key",
                        "Idempotency-Key must be 1-255 visible ASCII characters",
                        trace_id,
                    )
                }
            },
        };
        let content_type = match request.headers().get(CONTENT_TYPE).map(HeaderValue::to_str) {
            None => None,
            Some(Ok(ct)) => Some(ct.to_string()),
            // Delivered as is, it could not be signed and relayed faithfully; dropping it
            // would change how the target reads the body.
            Some(Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_content_type",
                    "Content-Type must be visible ASCII",
                    trace_id,
                )
            }
        };
        // One snapshot per request: the body limit and the route come from the same rules.
        let snapshot = self.dispatcher.context().snapshot();
        let limit = snapshot.settings.max_body_bytes;
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("body exceeds max_body_bytes ({limit})"),
                trace_id,
            )
        };
        // Refuse early on a declared length, and cap the stream anyway (chunked bodies, liars):
        // the body is never buffered past the limit.
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // The headers stay for dispatch: a rule may take its ordering key from one.
        let (parts, mut body) = request.into_parts();
        if declared.is_some_and(|n| n > limit as u64) {
            linger(body);
            return too_large();
        }
        let limits = BodyLimits {
            max_bytes: limit,
            deadline,
            budget_bytes: snapshot.settings.edge.max_buffered_body_bytes,
        };
        // Held until the answer is built: the body stays in memory while it is dispatched.
        let mut charge = BudgetCharge::new(&self.budget);
        let body = match read_body(&mut body, limits, &mut charge).await {
            Ok(bytes) => bytes,
            Err(BodyError::TooLarge(_)) => {
                linger(body);
                return too_large();
            }
            Err(BodyError::TimedOut) => {
                crate::metrics::edge_refusal(EdgeRefusal::RequestTimeout);
                let mut r = error(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the body did not arrive within ingress.request_timeout_ms",
                    trace_id,
                );
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            Err(BodyError::OverBudget) => {
                crate::metrics::edge_refusal(EdgeRefusal::BodyBudget);
                linger(body);
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many event bodies in flight (ingress.max_buffered_body_bytes)",
                    trace_id,
                );
                r.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
            Err(e @ BodyError::Read(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    &e.to_string(),
                    trace_id,
                )
            }
        };
        let event = Event::new(
            event_type,
            body,
            content_type,
            trace_id.to_string(),
            idempotency_key,
        );
        let response = respond(
            self.dispatcher
                .dispatch_under(&snapshot, event, &parts.headers)
                .await,
            trace_id,
        );
        drop(charge);
        response
    }
}

/// `X-Downstream-Latency`: whole milliseconds.
fn latency_ms(latency: Duration) -> HeaderValue {
    HeaderValue::from(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX))
}

/// The `Idempotency-Key` if it is 1-255 visible ASCII characters (no spaces or tabs, which
/// `HeaderValue::to_str` lets through).
fn idempotency_key(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let visible = bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    (visible && !bytes.is_empty() && bytes.len() <= MAX_IDEMPOTENCY_KEY_LEN)
        .then(|| value.to_str().ok())
        .flatten()
}

/// Most of a refused body read and thrown away after a 413, and for how long.
const LINGER_BYTES: usize = 8 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Reads and discards what is left of a refused body (up to [`LINGER_BYTES`] for up to
/// [`LINGER_TIME`]) while the 413 goes out. Closing a connection whose client is still sending
/// makes the kernel answer with a reset, which can destroy the 413 before the client reads it;
/// this is the lingering close web servers do for the same reason.
fn linger(mut body: Incoming) {
    if http_body::Body::is_end_stream(&body) {
        return;
    }
    tokio::spawn(async move {
        let drain = async {
            let mut discarded = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                discarded += frame.data_ref().map_or(0, Bytes::len);
                if discarded > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

fn respond(outcome: Outcome, trace_id: &str) -> Response<Full<Bytes>> {
    match outcome {
        Outcome::Relayed { event_id, response } => {
            let mut r = Response::new(Full::new(response.body));
            *r.status_mut() = response.status;
            let h = r.headers_mut();
            if let Some(ct) = response.headers.get(CONTENT_TYPE) {
                h.insert(CONTENT_TYPE, ct.clone());
            }
            h.insert(X_DISPATCH_MODE, HeaderValue::from_static("sync"));
            if let Ok(v) = HeaderValue::from_str(&event_id) {
                h.insert(X_EVENT_ID, v);
            }
            h.insert(X_DOWNSTREAM_LATENCY, latency_ms(response.latency));
            r
        }
        Outcome::Accepted { event_id } => json(
            StatusCode::ACCEPTED,
            &json!({"status": "accepted", "event_id": event_id, "trace_id": trace_id}),
        ),
        Outcome::Queued { event_id, reason } => json(
            StatusCode::ACCEPTED,
            &json!({
                "status": "queued",
                "fallback": "sync_to_async",
                "reason": reason.as_str(),
                "event_id": event_id,
                "trace_id": trace_id,
            }),
        ),
        Outcome::Duplicate { event_id } => json(
            StatusCode::ACCEPTED,
            &json!({"status": "accepted", "event_id": event_id, "trace_id": trace_id, "duplicate": true}),
        ),
        Outcome::Failed { event_id, failure } => {
            let reason = failure.reason_str();
            let (status, retry_after) = match &failure {
                SyncFailure::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
                SyncFailure::Upstream5xx(_)
                | SyncFailure::Connect(_)
                | SyncFailure::NotRelayable(_) => (StatusCode::BAD_GATEWAY, None),
                SyncFailure::Shed => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
                SyncFailure::CircuitOpen { retry_after } => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
                ),
            };
            let mut r = json(
                status,
                &json!({
                    "error": failure.to_string(),
                    "reason": reason,
                    "event_id": event_id,
                    "trace_id": trace_id,
                }),
            );
            if let Some(secs) = retry_after {
                r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            // Time spent on the target, where a call was made (not when shed or refused by an
            // open breaker, nor when no connection could be made).
            let downstream = match &failure {
                SyncFailure::Upstream5xx(response) | SyncFailure::NotRelayable(response) => {
                    Some(response.latency)
                }
                SyncFailure::Timeout(deadline) => Some(*deadline),
                _ => None,
            };
            if let Some(latency) = downstream {
                r.headers_mut()
                    .insert(X_DOWNSTREAM_LATENCY, latency_ms(latency));
            }
            r
        }
        Outcome::NoRoute { event_type } => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "no_route", "event_type": event_type, "trace_id": trace_id}),
        ),
        Outcome::InvalidOrderingKey(e) => error(
            StatusCode::BAD_REQUEST,
            "invalid_ordering_key",
            &e.to_string(),
            trace_id,
        ),
        Outcome::QueueFull { queue } => {
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"error": "queue_full", "reason": format!("queue {queue} is at max_depth"), "trace_id": trace_id}),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Outcome::StoreUnavailable {
            event_id,
            reason,
            outcome_unknown,
        } => {
            // "unknown": the write may have happened; retry with the same Idempotency-Key (or
            // look the event id up) rather than blindly. "not_stored": a retry is safe.
            let outcome = if outcome_unknown {
                "unknown"
            } else {
                "not_stored"
            };
            let mut r = json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "error": "store_unavailable",
                    "reason": reason,
                    "outcome": outcome,
                    "event_id": event_id,
                    "trace_id": trace_id,
                }),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

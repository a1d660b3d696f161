//! The HTTP data plane: `POST /v1/events/{event_type}` -> [`Event`] -> [`Outcome`] -> response.
//!
//! Everything about HTTP lives here (status codes, headers, JSON reasons, body limits);
//! routing and delivery live behind [`Dispatcher::dispatch`].

mod trace;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;

use crate::dispatcher::{Dispatcher, Event, Outcome};
use crate::headers::{IDEMPOTENCY_KEY, X_DISPATCH_MODE, X_EVENT_ID, X_TRACE_ID};
use crate::httpserver::{json, Handler};
use crate::routing::validate_event_type;
use crate::sync::SyncFailure;

pub use trace::{new_trace_id, trace_id_from_headers};

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The ingress request handler.
#[derive(Debug)]
pub struct Ingress {
    dispatcher: Arc<Dispatcher>,
}

impl Ingress {
    /// An ingress over `dispatcher`.
    pub fn new(dispatcher: Arc<Dispatcher>) -> Arc<Self> {
        Arc::new(Self { dispatcher })
    }
}

impl Handler for Ingress {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let trace_id = trace_id_from_headers(request.headers()).unwrap_or_else(new_trace_id);
        let mut response = self.answer(request, &trace_id).await;
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
    async fn answer(&self, request: Request<Incoming>, trace_id: &str) -> Response<Full<Bytes>> {
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
            Some(v) => match v.to_str() {
                Ok(k) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_LEN => Some(k.to_string()),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_idempotency_key",
                        "Idempotency-Key must be 1-255 visible ASCII characters",
                        trace_id,
                    )
                }
            },
        };
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // One snapshot per request: the body limit and the route come from the same rules.
        let snapshot = self.dispatcher.snapshot();
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
        let mut body = request.into_body();
        if declared.is_some_and(|n| n > limit as u64) {
            linger(body);
            return too_large();
        }
        let body = match read_body(&mut body, limit).await {
            Ok(bytes) => bytes,
            Err(BodyError::TooLarge) => {
                linger(body);
                return too_large();
            }
            Err(BodyError::Read(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    &format!("reading body: {e}"),
                    trace_id,
                )
            }
        };
        let event = Event {
            event_type,
            body,
            content_type,
            trace_id: trace_id.to_string(),
            idempotency_key,
        };
        respond(
            self.dispatcher.dispatch_under(&snapshot, event).await,
            trace_id,
        )
    }
}

/// Most of a refused body read and thrown away after a 413, and for how long.
const LINGER_BYTES: usize = 8 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// The whole body, or `TooLarge` as soon as it passes `limit` (with the rest left unread).
async fn read_body(body: &mut Incoming, limit: usize) -> Result<Bytes, BodyError> {
    // The common case is a body that arrives in one piece: it is passed on as is, without a
    // copy or an allocation; only a body in several pieces is joined into a new buffer.
    let mut first: Option<Bytes> = None;
    let mut joined = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers carry nothing hookyard forwards
        };
        total += data.len();
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    joined.extend_from_slice(&earlier);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

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
            let reason = failure.reason().as_str();
            let (status, retry_after) = match &failure {
                SyncFailure::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
                SyncFailure::Upstream5xx(_) | SyncFailure::Connect(_) => {
                    (StatusCode::BAD_GATEWAY, None)
                }
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
            r
        }
        Outcome::NoRoute { event_type } => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "no_route", "event_type": event_type, "trace_id": trace_id}),
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

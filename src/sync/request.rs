//! The outbound request: original body, signature and the delivery headers of DESIGN.md.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Uri};
use http_body_util::Full;

use crate::routing::DeliveryMode;
use crate::signing::{SignatureScheme, Signer};

/// What is delivered, independent of how (sync or async) and which attempt.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `webhook-id`: stable across retries, fallback and replay.
    pub event_id: String,
    pub event_type: String,
    pub body: Bytes,
    pub content_type: Option<String>,
    pub trace_id: String,
    /// The caller's key, else the event id is sent.
    pub idempotency_key: Option<String>,
    pub signature: SignatureScheme,
}

/// Builds the signed request for one attempt. `timestamp_secs` is the attempt's time.
pub fn build(
    target: &Uri,
    envelope: &Envelope,
    mode: DeliveryMode,
    attempt: u32,
    signer: &Signer,
    timestamp_secs: i64,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(envelope.body.clone()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = target.clone();
    let headers = request.headers_mut();
    for (name, value) in signer.headers(
        envelope.signature,
        &envelope.event_id,
        timestamp_secs,
        &envelope.body,
    ) {
        headers.insert(name, value);
    }
    if let Some(ct) = envelope
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        headers.insert(CONTENT_TYPE, ct);
    }
    // Values below were validated at ingress (or generated), so conversion cannot fail; a
    // value that somehow does is left out rather than failing the delivery.
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    put("x-trace-id", &envelope.trace_id);
    put(
        "idempotency-key",
        envelope
            .idempotency_key
            .as_deref()
            .unwrap_or(&envelope.event_id),
    );
    put("x-event-type", &envelope.event_type);
    put("x-callback-mode", mode.as_str());
    put("x-delivery-attempt", itoa(attempt).as_str());
    request
}

fn itoa(n: u32) -> String {
    n.to_string()
}

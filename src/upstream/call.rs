//! One outbound HTTP call under a deadline that covers connect, send and the whole response body.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;

use super::host::Host;

/// Largest response body kept from a target, so a misbehaving target cannot make hookyard
/// buffer without bound. A sync relay must hand the body to its caller, so a bigger one is an
/// error there; async delivery needs only the status and discards the body (see
/// [`ResponseBody`]).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// What a call does with the target's response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// Keep it for relaying to the caller (sync): a body over [`MAX_RESPONSE_BYTES`] is a
    /// [`CallError::TooLarge`], one cut short a [`CallError::Broken`].
    Relay,
    /// Read and drop it (async delivery: the status decides). Up to [`MAX_RESPONSE_BYTES`] is
    /// read so the connection can be reused; past that, or if it breaks, the connection is
    /// closed and the answer still counts.
    Discard,
}

/// A target's complete answer.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// How long the target took: from handing the request to the pool (connecting first, when
    /// no connection was idle) to the end of the answer's body. Sync answers show it to the
    /// caller as `X-Downstream-Latency`.
    pub latency: Duration,
}

/// Why a call produced no complete answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The deadline passed before the whole response arrived.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// No connection: refused, unreachable, or connect timeout.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection broke after it was made (reset, closed mid-response, bad HTTP).
    #[error("connection failed: {0}")]
    Broken(String),
    /// The target answered with this status, but with a body over [`MAX_RESPONSE_BYTES`],
    /// which a sync relay cannot hand on.
    #[error("target answered {0} with a body over {MAX_RESPONSE_BYTES} bytes, too large to relay")]
    TooLarge(StatusCode),
}

impl CallError {
    /// Short class name for attempt records and logs.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect(_) => "connect",
            Self::Broken(_) => "reset",
            Self::TooLarge(status) => crate::metrics::status_class(status.as_u16()),
        }
    }
}

/// Sends `request` through the host's pool and reads the answer within `deadline`, doing
/// `body` with the response body. The caller ([`Host::attempt`]) holds the host's gate permit
/// and breaker ticket.
pub async fn call_with(
    host: &Host,
    request: Request<Full<Bytes>>,
    deadline: Duration,
    body: ResponseBody,
) -> Result<UpstreamResponse, CallError> {
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(deadline, host.pool().send_with(request, body)).await {
        Ok(Ok(mut response)) => {
            response.latency = started.elapsed();
            Ok(response)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CallError::Timeout(deadline)),
    }
}

/// An error and all its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

//! One outbound HTTP call under a deadline that covers connect, send and the whole response body.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;

use super::host::Host;

/// Largest response body read from a target; a bigger one is cut off as an error, so a
/// misbehaving target cannot make hookyard buffer without bound.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// A target's complete answer.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
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
}

impl CallError {
    /// Short class name for attempt records and logs.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect(_) => "connect",
            Self::Broken(_) => "reset",
        }
    }
}

/// Sends `request` through the host's pool and reads the full answer within `deadline`.
/// The caller holds the host's gate permit and breaker ticket.
pub async fn call(
    host: &Host,
    request: Request<Full<Bytes>>,
    deadline: Duration,
) -> Result<UpstreamResponse, CallError> {
    match tokio::time::timeout(deadline, host.pool().send(request)).await {
        Ok(result) => result,
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

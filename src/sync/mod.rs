//! The sync path as a visible pipeline: breaker -> shed gate -> deadline call -> classify.
//!
//! Each step is its own type ([`breaker::Breaker`], [`gate::Gate`], [`call::call`]), testable
//! alone; this module only stacks them and turns their verdicts into one [`SyncFailure`].

pub mod breaker;
pub mod call;
pub mod gate;
pub mod host;
pub mod pool;
pub mod request;

use std::time::{Duration, Instant};

pub use call::{CallError, ResponseBody, UpstreamResponse};
pub use host::{Host, HostMap};
pub use request::Envelope;

use crate::clock::now_ms;
use crate::queue::FallbackReason;
use crate::routing::{DeliveryMode, Rule};
use crate::signing::Signer;

/// Why a sync delivery did not produce a relayable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncFailure {
    #[error("host is at its shed threshold")]
    Shed,
    #[error("circuit breaker is open")]
    CircuitOpen { retry_after: Duration },
    #[error("target did not answer within {0:?}")]
    Timeout(Duration),
    #[error("could not connect to target: {0}")]
    Connect(String),
    #[error("target answered {}", .0.status)]
    Upstream5xx(UpstreamResponse),
    /// The target took the event (a 2xx-4xx answer) but its body is too large to relay. Not
    /// a fallback case: queueing the event would deliver it twice.
    #[error("target answered {} with a body too large to relay", .0.status)]
    NotRelayable(UpstreamResponse),
}

impl SyncFailure {
    /// The fallback reason of this failure; `None` when the target has the event already and
    /// a fallback would deliver it again.
    pub fn fallback_reason(&self) -> Option<FallbackReason> {
        match self {
            Self::Shed => Some(FallbackReason::Shed),
            Self::CircuitOpen { .. } => Some(FallbackReason::CircuitOpen),
            Self::Timeout(_) => Some(FallbackReason::Timeout),
            Self::Connect(_) => Some(FallbackReason::Connect),
            Self::Upstream5xx(_) => Some(FallbackReason::Upstream5xx),
            Self::NotRelayable(_) => None,
        }
    }

    /// The `reason` of the JSON answer.
    pub fn reason_str(&self) -> &'static str {
        self.fallback_reason()
            .map_or("response_too_large", FallbackReason::as_str)
    }
}

/// Delivers `envelope` to `rule`'s target while the caller waits.
///
/// 2xx, 3xx and 4xx answers are returned for relaying (a 4xx is the caller's error and is
/// never retried); everything else is a [`SyncFailure`].
pub async fn deliver(
    host: &Host,
    rule: &Rule,
    envelope: &Envelope,
    signer: &Signer,
) -> Result<UpstreamResponse, SyncFailure> {
    // A caller that hangs up before the rule's deadline tells nothing about the host.
    let ticket = host
        .breaker
        .admit()
        .map_err(|open| SyncFailure::CircuitOpen {
            retry_after: open.retry_after,
        })?
        .until(rule.timeout);
    let Some(_permit) = host.gate.try_enter_sync() else {
        // Shed before any call was made: nothing about the host's health was learned.
        ticket.forgo();
        host.metrics.shed();
        return Err(SyncFailure::Shed);
    };
    let request = request::build(
        &rule.target,
        envelope,
        DeliveryMode::Sync,
        1,
        signer,
        now_ms() / 1000,
    );
    let started = Instant::now();
    let result = call::call(host, request, rule.timeout).await;
    let class = match &result {
        Ok(r) => crate::metrics::status_class(r.status.as_u16()),
        Err(e) => e.class(),
    };
    let latency = started.elapsed();
    host.metrics.attempt(DeliveryMode::Sync, class, latency);
    tracing::debug!(
        event_id = %envelope.event_id,
        trace_id = %envelope.trace_id,
        attempt = 1,
        host = %host.key,
        outcome = class,
        latency_ms = latency.as_millis() as u64,
        "sync delivery attempt"
    );
    match result {
        Ok(response) if response.status.is_server_error() => {
            ticket.failure();
            Err(SyncFailure::Upstream5xx(response))
        }
        Ok(response) => {
            ticket.success();
            Ok(response)
        }
        Err(CallError::Timeout(d)) => {
            ticket.failure();
            Err(SyncFailure::Timeout(d))
        }
        Err(CallError::Connect(e)) | Err(CallError::Broken(e)) => {
            ticket.failure();
            Err(SyncFailure::Connect(e))
        }
        Err(CallError::TooLarge(status)) => {
            let answer = UpstreamResponse {
                status,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::new(),
                latency,
            };
            if status.is_server_error() {
                ticket.failure();
                Err(SyncFailure::Upstream5xx(answer))
            } else {
                // The host answered and is healthy; only the relay cannot carry the body.
                ticket.success();
                Err(SyncFailure::NotRelayable(answer))
            }
        }
    }
}

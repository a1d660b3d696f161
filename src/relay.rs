//! The sync relay's policy: one [`Host::attempt`] under the rule's deadline while the caller
//! waits, and what its result means for the caller (relay the answer, or a [`SyncFailure`]
//! that may fall back to the queue).

use std::time::Duration;

use crate::clock::now_ms;
use crate::event::FallbackReason;
use crate::routing::{DeliveryMode, Rule};
use crate::signing::Signer;
use crate::upstream::{
    request, Attempted, CallError, Envelope, Host, Refusal, ResponseBody, UpstreamResponse,
};

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

/// Delivers `envelope` to `rule`'s target while the caller waits: one [`Host::attempt`] in
/// sync mode under the rule's deadline.
///
/// 2xx, 3xx and 4xx answers are returned for relaying (a 4xx is the caller's error and is
/// never retried); everything else is a [`SyncFailure`].
pub async fn deliver(
    host: &Host,
    rule: &Rule,
    envelope: &Envelope<'_>,
    signer: &Signer,
) -> Result<UpstreamResponse, SyncFailure> {
    let attempted = host
        .attempt(
            DeliveryMode::Sync,
            rule.timeout,
            ResponseBody::Relay,
            || {
                request::build(
                    &rule.target,
                    envelope,
                    DeliveryMode::Sync,
                    1,
                    signer,
                    now_ms() / 1000,
                )
            },
        )
        .await
        .map_err(|refused| match refused {
            Refusal::CircuitOpen { retry_after } => SyncFailure::CircuitOpen { retry_after },
            Refusal::Shed | Refusal::GateFull => SyncFailure::Shed,
        })?;
    let Attempted { result, latency } = attempted;
    tracing::debug!(
        event_id = %envelope.event.id,
        trace_id = %envelope.event.trace_id,
        attempt = 1,
        host = %host.key,
        outcome = match &result {
            Ok(r) => crate::metrics::status_class(r.status.as_u16()),
            Err(e) => e.class(),
        },
        latency_ms = latency.as_millis() as u64,
        "sync delivery attempt"
    );
    match result {
        Ok(response) if response.status.is_server_error() => {
            Err(SyncFailure::Upstream5xx(response))
        }
        Ok(response) => Ok(response),
        Err(CallError::Timeout(d)) => Err(SyncFailure::Timeout(d)),
        Err(CallError::Connect(e)) | Err(CallError::Broken(e)) => Err(SyncFailure::Connect(e)),
        Err(CallError::TooLarge(status)) => {
            let answer = UpstreamResponse {
                status,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::new(),
                latency,
            };
            if status.is_server_error() {
                Err(SyncFailure::Upstream5xx(answer))
            } else {
                Err(SyncFailure::NotRelayable(answer))
            }
        }
    }
}

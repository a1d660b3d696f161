//! The circuit breaker's states: the vocabulary the breaker (`upstream::breaker`), its metrics and
//! the admin API share. A leaf, so `metrics` can name a state without depending on `upstream`.

use serde::Serialize;

/// Breaker state as reported by the admin API and the `hookyard_circuit_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

//! What every layer says about an event: how it is delivered.
//!
//! A leaf module: routing decides the mode, and metrics, sync and delivery label by it, without
//! any of them importing another for it.

use serde::Serialize;

/// How a rule delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// The caller waits for the target's answer.
    Sync,
    /// Durably queued; the caller gets 202 at once.
    Async,
}

impl DeliveryMode {
    /// `"sync"` or `"async"`, as in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
        }
    }
}

//! Reading a request body under three limits: its size, its deadline, and a budget of body
//! bytes shared by every request in flight.
//!
//! The size limit stops one huge body; the deadline stops one slow body from holding its
//! connection forever; the budget stops many bodies that are each within both (200 clients
//! trickling 2 MiB each) from adding up to more memory than the sidecar may use. Bytes are
//! charged to the budget as they arrive, so it measures what is really held, and given back
//! when the request's [`BudgetCharge`] is dropped, after its answer is built.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

/// Body bytes held in memory by the requests in flight, across all event loops.
#[derive(Debug, Default)]
pub struct BodyBudget {
    held: AtomicUsize,
}

impl BodyBudget {
    /// An empty budget, shared by the listeners that read bodies.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Body bytes held right now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The bytes one request holds against the [`BodyBudget`]; given back on drop. It borrows
/// the budget: the request path touches only the shared byte counter, not a reference count.
#[derive(Debug)]
pub struct BudgetCharge<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl<'a> BudgetCharge<'a> {
    /// A charge of nothing yet against `budget`.
    pub fn new(budget: &'a BodyBudget) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Takes `bytes` more from the budget if that keeps its total within `limit`.
    fn take(&mut self, bytes: usize, limit: usize) -> bool {
        let before = self.budget.held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > limit {
            self.budget.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        self.bytes += bytes;
        true
    }
}

impl Drop for BudgetCharge<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// The limits one body is read under.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// When the whole body must be in.
    pub deadline: Instant,
    /// Total body bytes all requests may hold.
    pub budget_bytes: usize,
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("body not received within the request timeout")]
    TimedOut,
    #[error("too many body bytes in flight")]
    OverBudget,
    #[error("reading body: {0}")]
    Read(#[from] hyper::Error),
}

/// The whole body, read within `limits` and charged to `charge`. On an error the rest of the
/// body is left unread.
pub async fn read_body(
    body: &mut Incoming,
    limits: BodyLimits,
    charge: &mut BudgetCharge<'_>,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout_at(limits.deadline, read_all(body, limits, charge)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(BodyError::TimedOut),
    }
}

async fn read_all(
    body: &mut Incoming,
    limits: BodyLimits,
    charge: &mut BudgetCharge<'_>,
) -> Result<Bytes, BodyError> {
    // A declared length is charged in full before a byte is read: the body will be held
    // whole, and a refusal now costs the client nothing yet. Without one (chunked), each
    // piece is charged as it comes.
    let declared = http_body::Body::size_hint(body).exact();
    if let Some(length) = declared {
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length > limits.max_bytes {
            return Err(BodyError::TooLarge(limits.max_bytes));
        }
        if !charge.take(length, limits.budget_bytes) {
            return Err(BodyError::OverBudget);
        }
    }
    // The common case is a body that arrives in one piece: it is passed on as is, without a
    // copy or an allocation; only a body in several pieces is joined into a new buffer, sized
    // once from the declared length.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers carry nothing hookyard forwards
        };
        total += data.len();
        if total > limits.max_bytes {
            return Err(BodyError::TooLarge(limits.max_bytes));
        }
        if declared.is_none() && !charge.take(data.len(), limits.budget_bytes) {
            return Err(BodyError::OverBudget);
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    joined.reserve(declared.map_or(0, |n| n as usize).max(total));
                    joined.extend_from_slice(&earlier);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_past_the_limit_is_refused_and_every_charge_is_given_back_on_drop() {
        let budget = BodyBudget::new();
        let mut a = BudgetCharge::new(&budget);
        let mut b = BudgetCharge::new(&budget);
        assert!(a.take(60, 100));
        assert!(!b.take(41, 100), "60 + 41 is past the limit");
        assert!(b.take(40, 100));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}

//! The per-host in-flight gate: a counter, not a lock.
//!
//! hyper-util's pool has no per-host cap on concurrent requests, so every request to a host
//! passes this gate first. Sync requests are shed once in-flight reaches the shed threshold
//! (`ceil(shed_at * max_connections)`), which keeps headroom for async deliveries and answers the
//! caller at once instead of queueing it behind a saturated host. Async deliveries may use the
//! gate up to `max_connections`. Either way the count never exceeds `max_connections`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Counts requests in flight to one host.
#[derive(Debug)]
pub struct Gate {
    in_flight: AtomicU32,
    max_connections: AtomicU32,
    shed_threshold: AtomicU32,
}

/// Proof of a place in the gate; the place is given back on drop.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// A gate with the given cap and shed threshold.
    pub fn new(max_connections: u32, shed_threshold: u32) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicU32::new(0),
            max_connections: AtomicU32::new(max_connections),
            shed_threshold: AtomicU32::new(shed_threshold.min(max_connections)),
        })
    }

    /// Applies new limits to requests that enter from now on; requests in flight keep their place.
    pub fn set_limits(&self, max_connections: u32, shed_threshold: u32) {
        self.max_connections
            .store(max_connections, Ordering::Release);
        self.shed_threshold
            .store(shed_threshold.min(max_connections), Ordering::Release);
    }

    /// A place for a sync request, or `None` when the host is at its shed threshold.
    pub fn try_enter_sync(self: &Arc<Self>) -> Option<Permit> {
        self.try_enter_below(self.shed_threshold.load(Ordering::Acquire))
    }

    /// A place for an async delivery, or `None` when the host is at `max_connections`.
    pub fn try_enter(self: &Arc<Self>) -> Option<Permit> {
        self.try_enter_below(self.max_connections.load(Ordering::Acquire))
    }

    fn try_enter_below(self: &Arc<Self>, limit: u32) -> Option<Permit> {
        // Increment only if below the limit, so the count never overshoots even for an instant
        // (a fetch_add-then-undo would let a racing reader see limit + 1).
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Permit { gate: self.clone() }),
                Err(actual) => current = actual,
            }
        }
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The cap in force.
    pub fn max_connections(&self) -> u32 {
        self.max_connections.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_is_shed_at_threshold_async_may_fill_to_max() {
        let gate = Gate::new(4, 3);
        let a: Vec<_> = (0..3).map(|_| gate.try_enter_sync().unwrap()).collect();
        assert!(
            gate.try_enter_sync().is_none(),
            "fourth sync request is shed"
        );
        let b = gate.try_enter().expect("async may take the last place");
        assert!(gate.try_enter().is_none(), "never above max_connections");
        assert_eq!(gate.in_flight(), 4);
        drop(a);
        drop(b);
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn concurrent_entries_never_exceed_the_cap() {
        let gate = Gate::new(8, 8);
        let peak = Arc::new(AtomicU32::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (gate, peak) = (gate.clone(), peak.clone());
                s.spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(p) = gate.try_enter() {
                            peak.fetch_max(gate.in_flight(), Ordering::AcqRel);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Acquire) <= 8);
        assert_eq!(gate.in_flight(), 0);
    }
}

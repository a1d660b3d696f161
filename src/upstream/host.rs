//! One upstream host: its connection pool, in-flight gate and circuit breaker.
//!
//! Sync and async deliveries to the same `host:port` share one `Host`, so the cap and the
//! breaker see all the traffic the host receives from this instance.

use std::collections::HashMap;
use std::sync::Arc;

use super::breaker::{Breaker, CloseHook};
use super::gate::Gate;
use super::pool::{connector, ConnPool, Connector};
use crate::config::{HostPolicy, TlsTrust, MAX_LANES};

thread_local! {
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Binds the calling thread to pool lane `lane` (its runtime's own connections).
///
/// A pooled connection is driven by a task on the runtime that opened it. When every ingress
/// runtime (one per core) has its own lane, a sync request is received, forwarded and answered
/// on one thread, with no cross-thread wakeup; lane 0 serves the main runtime (async workers).
pub fn set_lane(lane: usize) {
    LANE.with(|l| l.set(lane.min(MAX_LANES - 1)));
}

/// One pool per lane, created on first use from that lane.
struct Lanes {
    pools: Box<[std::sync::OnceLock<ConnPool>]>,
    connector: Connector,
    max_connections: u32,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").finish_non_exhaustive()
    }
}

impl Lanes {
    fn new(policy: &HostPolicy, tls: &TlsTrust) -> Arc<Self> {
        Arc::new(Self {
            pools: (0..MAX_LANES).map(|_| std::sync::OnceLock::new()).collect(),
            connector: connector(policy.connect_timeout, &tls.client_config),
            max_connections: policy.max_connections,
        })
    }

    /// (open, idle) connections over every lane.
    fn connections(&self) -> (usize, usize) {
        self.pools
            .iter()
            .filter_map(|p| p.get())
            .fold((0, 0), |(open, idle), pool| {
                (open + pool.open_count(), idle + pool.idle_count())
            })
    }

    fn current(&self) -> &ConnPool {
        let lane = LANE.with(|l| l.get());
        self.pools[lane]
            .get_or_init(|| ConnPool::new(self.connector.clone(), self.max_connections as usize))
    }
}

/// An upstream host and the machinery guarding it.
pub struct Host {
    pub key: Arc<str>,
    pub policy: HostPolicy,
    pub gate: Arc<Gate>,
    pub breaker: Breaker,
    lanes: Arc<Lanes>,
    /// Attempt, latency and shed series of this host.
    pub metrics: Arc<crate::metrics::HostMetrics>,
    /// Which trust roots the pool was built with.
    tls_fingerprint: String,
    /// Handed to every breaker this host builds (the queue's "make deferred events due").
    on_close: Option<CloseHook>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("key", &self.key)
            .field("policy", &self.policy)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// The connection pool of the calling thread's runtime.
    pub fn pool(&self) -> &ConnPool {
        self.lanes.current()
    }

    /// Connections to this host open right now over all event loops, and how many of them
    /// are idle: with `gate.in_flight()`, the pool's saturation as seed 001 asks to watch it.
    pub fn connections(&self) -> (usize, usize) {
        self.lanes.connections()
    }

    /// A host with a fresh pool, gate and breaker; `on_close` runs when its breaker closes
    /// after a successful probe.
    pub fn new(
        key: Arc<str>,
        policy: &HostPolicy,
        tls: &TlsTrust,
        on_close: Option<CloseHook>,
    ) -> Arc<Self> {
        Arc::new(Self {
            gate: Gate::new(policy.max_connections, policy.shed_threshold()),
            metrics: Arc::new(crate::metrics::HostMetrics::new(&key)),
            breaker: Breaker::with_clock(
                key.clone(),
                policy.circuit_breaker,
                crate::clock::Clock::System,
                on_close.clone(),
            ),
            lanes: Lanes::new(policy, tls),
            tls_fingerprint: tls.fingerprint.clone(),
            policy: policy.clone(),
            key,
            on_close,
        })
    }

    /// This host under a new policy, keeping whatever can be kept: the gate (its in-flight
    /// count) always; the pool and its open connections unless the connect timeout changed;
    /// the breaker and its state unless its thresholds changed.
    pub fn with_policy(self: &Arc<Self>, policy: &HostPolicy, tls: &TlsTrust) -> Arc<Self> {
        if &self.policy == policy && self.tls_fingerprint == tls.fingerprint {
            return self.clone();
        }
        self.gate
            .set_limits(policy.max_connections, policy.shed_threshold());
        // Same policy, same thresholds: the breaker (open or not, its window) carries over.
        let breaker = if *self.breaker.settings() == policy.circuit_breaker {
            self.breaker.clone()
        } else {
            // The old breaker is gone with whatever it held back: a fresh breaker is closed,
            // so the events the old one deferred are due now, as after a close.
            if self.breaker.state() != crate::circuit::BreakerState::Closed {
                if let Some(hook) = &self.on_close {
                    hook(&self.key);
                }
            }
            Breaker::with_clock(
                self.key.clone(),
                policy.circuit_breaker,
                crate::clock::Clock::System,
                self.on_close.clone(),
            )
        };
        let lanes = if self.policy.connect_timeout == policy.connect_timeout
            && self.policy.max_connections == policy.max_connections
            && self.tls_fingerprint == tls.fingerprint
        {
            self.lanes.clone()
        } else {
            Lanes::new(policy, tls)
        };
        Arc::new(Self {
            key: self.key.clone(),
            policy: policy.clone(),
            gate: self.gate.clone(),
            breaker,
            lanes,
            metrics: self.metrics.clone(),
            tls_fingerprint: tls.fingerprint.clone(),
            on_close: self.on_close.clone(),
        })
    }
}

/// Every host the rules deliver to, keyed `host:port`.
pub type HostMap = HashMap<Arc<str>, Arc<Host>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit::BreakerState;
    use crate::config::{BreakerPolicy, BreakerSettings};

    fn consecutive(n: u32) -> BreakerSettings {
        BreakerSettings {
            policy: BreakerPolicy::Consecutive {
                consecutive_failures: n,
            },
            ..BreakerSettings::default()
        }
    }

    #[tokio::test]
    async fn a_new_policy_keeps_the_gate_count_and_a_breaker_whose_thresholds_did_not_change() {
        let policy = HostPolicy {
            circuit_breaker: consecutive(1),
            ..HostPolicy::default()
        };
        let tls = TlsTrust::new(Vec::new()).unwrap();
        let host = Host::new("h:1".into(), &policy, &tls, None);
        host.breaker.admit().unwrap().failure();
        assert_eq!(host.breaker.state(), BreakerState::Open);
        let held = host.gate.try_enter().unwrap();

        let wider = HostPolicy {
            max_connections: 4,
            shed_at: 0.5,
            ..policy.clone()
        };
        let reloaded = host.with_policy(&wider, &tls);
        assert_eq!(
            reloaded.breaker.state(),
            BreakerState::Open,
            "breaker state survives"
        );
        assert_eq!(
            reloaded.gate.in_flight(),
            1,
            "requests in flight keep their place"
        );
        assert_eq!(reloaded.gate.max_connections(), 4);
        let _second = reloaded.gate.try_enter_sync().unwrap();
        assert!(
            reloaded.gate.try_enter_sync().is_none(),
            "new shed threshold of 2 applies"
        );
        drop(held);

        let stricter = HostPolicy {
            circuit_breaker: consecutive(3),
            ..wider
        };
        let rebuilt = reloaded.with_policy(&stricter, &tls);
        assert_eq!(
            rebuilt.breaker.state(),
            BreakerState::Closed,
            "new thresholds, new breaker"
        );
    }

    #[tokio::test]
    async fn a_failure_rate_breaker_survives_a_reload_that_keeps_its_thresholds() {
        let settings = BreakerSettings {
            policy: BreakerPolicy::FailureRate {
                failure_rate: 0.5,
                window_ms: 10_000,
                min_calls: 2,
            },
            ..BreakerSettings::default()
        };
        let policy = HostPolicy {
            circuit_breaker: settings,
            ..HostPolicy::default()
        };
        let tls = TlsTrust::new(Vec::new()).unwrap();
        let host = Host::new("h:2".into(), &policy, &tls, None);
        host.breaker.admit().unwrap().failure();
        host.breaker.admit().unwrap().failure();
        assert_eq!(host.breaker.state(), BreakerState::Open);

        let other_pool = HostPolicy {
            connect_timeout: std::time::Duration::from_millis(900),
            ..policy.clone()
        };
        let reloaded = host.with_policy(&other_pool, &tls);
        assert_eq!(reloaded.breaker.state(), BreakerState::Open);
        assert_eq!(reloaded.breaker.snapshot().failures, 2, "its window too");

        let switched = HostPolicy {
            circuit_breaker: consecutive(2),
            ..other_pool
        };
        let rebuilt = reloaded.with_policy(&switched, &tls);
        assert_eq!(rebuilt.breaker.state(), BreakerState::Closed);
        assert_eq!(rebuilt.breaker.settings().policy.name(), "consecutive");
    }

    #[tokio::test]
    async fn replacing_an_open_breaker_frees_the_events_it_deferred() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let freed = Arc::new(AtomicUsize::new(0));
        let seen = freed.clone();
        let hook: CloseHook = Arc::new(move |_host: &Arc<str>| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let policy = HostPolicy {
            circuit_breaker: consecutive(1),
            ..HostPolicy::default()
        };
        let tls = TlsTrust::new(Vec::new()).unwrap();
        let host = Host::new("h:3".into(), &policy, &tls, Some(hook));
        let closed_swap = host.with_policy(
            &HostPolicy {
                circuit_breaker: consecutive(2),
                ..policy.clone()
            },
            &tls,
        );
        assert_eq!(
            freed.load(Ordering::SeqCst),
            0,
            "a closed breaker held nothing"
        );
        closed_swap.breaker.admit().unwrap().failure();
        closed_swap.breaker.admit().unwrap().failure();
        assert_eq!(closed_swap.breaker.state(), BreakerState::Open);
        let _replaced = closed_swap.with_policy(&policy, &tls);
        assert_eq!(freed.load(Ordering::SeqCst), 1);
    }
}

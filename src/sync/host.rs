//! One upstream host: its connection pool, in-flight gate and circuit breaker.
//!
//! Sync and async deliveries to the same `host:port` share one `Host`, so the cap and the
//! breaker see all the traffic the host receives from this instance.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::breaker::Breaker;
use super::gate::Gate;
use crate::config::HostPolicy;

/// The pooled HTTP/1.1 client of one host.
pub type PooledClient = Client<HttpConnector, Full<Bytes>>;

/// An upstream host and the machinery guarding it.
#[derive(Debug)]
pub struct Host {
    pub key: Arc<str>,
    pub policy: HostPolicy,
    pub gate: Arc<Gate>,
    pub breaker: Breaker,
    pub client: PooledClient,
}

impl Host {
    /// A host with a fresh pool, gate and breaker.
    pub fn new(key: Arc<str>, policy: &HostPolicy) -> Arc<Self> {
        Arc::new(Self {
            gate: Gate::new(key.clone(), policy.max_connections, policy.shed_threshold()),
            breaker: Breaker::new(
                key.clone(),
                policy.breaker_failures,
                policy.breaker_recovery,
            ),
            client: pooled_client(policy),
            policy: policy.clone(),
            key,
        })
    }

    /// This host under a new policy, keeping whatever can be kept: the gate (its in-flight
    /// count) always; the pool and its open connections unless the connect timeout changed;
    /// the breaker and its state unless its thresholds changed.
    pub fn with_policy(self: &Arc<Self>, policy: &HostPolicy) -> Arc<Self> {
        if &self.policy == policy {
            return self.clone();
        }
        self.gate
            .set_limits(policy.max_connections, policy.shed_threshold());
        let breaker = if self
            .breaker
            .has_policy(policy.breaker_failures, policy.breaker_recovery)
        {
            self.breaker.clone()
        } else {
            Breaker::new(
                self.key.clone(),
                policy.breaker_failures,
                policy.breaker_recovery,
            )
        };
        let client = if self.policy.connect_timeout == policy.connect_timeout
            && self.policy.max_connections == policy.max_connections
        {
            self.client.clone()
        } else {
            pooled_client(policy)
        };
        Arc::new(Self {
            key: self.key.clone(),
            policy: policy.clone(),
            gate: self.gate.clone(),
            breaker,
            client,
        })
    }
}

fn pooled_client(policy: &HostPolicy) -> PooledClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(policy.connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(policy.max_connections as usize)
        .build(connector)
}

/// Every host the rules deliver to, keyed `host:port`.
pub type HostMap = HashMap<Arc<str>, Arc<Host>>;

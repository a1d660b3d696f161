//! Every metric name in one place, and the only code that records them.
//!
//! Label values are bounded by construction: `host` comes from configured targets,
//! `event_type` from rule patterns (an unrouted type is counted as `_unrouted`), `queue` from
//! config, and the rest from fixed enums. Never an event id or a trace id.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::routing::DeliveryMode;
use crate::sync::breaker::BreakerState;

pub const EVENTS_RECEIVED: &str = "hookyard_events_received_total";
pub const DELIVERY_ATTEMPTS: &str = "hookyard_delivery_attempts_total";
pub const DELIVERY_LATENCY: &str = "hookyard_delivery_latency_seconds";
pub const HOST_IN_FLIGHT: &str = "hookyard_host_in_flight";
pub const HOST_MAX_CONNECTIONS: &str = "hookyard_host_max_connections";
pub const SHED: &str = "hookyard_shed_total";
pub const CIRCUIT_STATE: &str = "hookyard_circuit_state";
pub const CIRCUIT_TRANSITIONS: &str = "hookyard_circuit_transitions_total";
pub const FALLBACKS: &str = "hookyard_fallback_total";
pub const QUEUE_DEPTH: &str = "hookyard_queue_depth";
pub const DLQ_DEPTH: &str = "hookyard_dlq_depth";
pub const OLDEST_READY_AGE: &str = "hookyard_queue_oldest_ready_age_seconds";
pub const DELIVERIES: &str = "hookyard_deliveries_total";
pub const ENQUEUE_BATCH_SIZE: &str = "hookyard_enqueue_batch_size";
pub const CONFIG_RELOADS: &str = "hookyard_config_reload_total";

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Label used for event types that matched no rule.
pub const UNROUTED: &str = "_unrouted";

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(DELIVERY_LATENCY.into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(ENQUEUE_BATCH_SIZE.into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                // Only fails on an empty bucket list, which the literals above are not.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Histograms keep raw samples until upkeep folds them in; without it memory grows
            // with every request whenever nobody scrapes /metrics.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("hookyard-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            // Another recorder may already be installed (an embedding program's own): then
            // hookyard's metrics go to it, and this handle renders only what it saw.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// An event type that matched no rule.
pub fn event_unrouted() {
    counter!(EVENTS_RECEIVED, "event_type" => UNROUTED, "mode" => "none", "outcome" => "no_route")
        .increment(1);
}

/// Every attempt class a delivery can end in, in `HostMetrics` order.
const ATTEMPT_CLASSES: [&str; 7] = [
    "2xx", "redirect", "4xx", "5xx", "timeout", "connect", "reset",
];

/// The per-request metric handles of one host, looked up once instead of per request (a
/// registry lookup hashes the whole label set and allocates).
#[derive(Debug)]
pub struct HostMetrics {
    /// `[mode][class]`, mode 0 = sync, 1 = async.
    attempts: [[Counter; ATTEMPT_CLASSES.len()]; 2],
    latency: [Histogram; 2],
    shed: Counter,
}

impl HostMetrics {
    /// Registers the series of `host`.
    pub fn new(host: &Arc<str>) -> Self {
        let per_mode = |mode: DeliveryMode| {
            ATTEMPT_CLASSES.map(|class| {
                counter!(DELIVERY_ATTEMPTS, "host" => host.clone(), "mode" => mode.as_str(), "class" => class)
            })
        };
        let latency = |mode: DeliveryMode| histogram!(DELIVERY_LATENCY, "host" => host.clone(), "mode" => mode.as_str());
        let metrics = Self {
            attempts: [per_mode(DeliveryMode::Sync), per_mode(DeliveryMode::Async)],
            latency: [latency(DeliveryMode::Sync), latency(DeliveryMode::Async)],
            shed: counter!(SHED, "host" => host.clone()),
        };
        // Every host's breaker series exist from the first scrape, at zero (closed, no
        // transitions), so an alert on them never waits for the first trip.
        gauge!(CIRCUIT_STATE, "host" => host.clone()).set(0.0);
        for to in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            counter!(CIRCUIT_TRANSITIONS, "host" => host.clone(), "to" => to.as_str()).increment(0);
        }
        metrics
    }

    /// One delivery attempt finished with `class` after `latency`.
    pub fn attempt(&self, mode: DeliveryMode, class: &str, latency: Duration) {
        let m = usize::from(mode == DeliveryMode::Async);
        if let Some(i) = ATTEMPT_CLASSES.iter().position(|c| *c == class) {
            self.attempts[m][i].increment(1);
        }
        self.latency[m].record(latency.as_secs_f64());
    }

    /// A sync request was shed.
    pub fn shed(&self) {
        self.shed.increment(1);
    }
}

/// The `events_received` counters of one rule, one per outcome, registered on first use (rules
/// are compiled before the recorder is installed, and handles taken then would be no-ops).
#[derive(Debug, Default)]
pub struct RuleMetrics {
    counters: OnceLock<[Counter; OUTCOMES.len()]>,
}

/// Every ingress outcome label, in `RuleMetrics` order.
pub const OUTCOMES: [&str; 9] = [
    "delivered",
    "relayed_error",
    "accepted",
    "fallback",
    "duplicate",
    "failed",
    "no_route",
    "queue_full",
    "store_unavailable",
];

impl RuleMetrics {
    /// Counts one event of the rule `pattern` (mode `mode`) that ended in `outcome`.
    pub fn received(&self, pattern: &Arc<str>, mode: &'static str, outcome: &'static str) {
        let counters = self.counters.get_or_init(|| {
            OUTCOMES.map(|o| {
                counter!(EVENTS_RECEIVED, "event_type" => pattern.clone(), "mode" => mode, "outcome" => o)
            })
        });
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            counters[i].increment(1);
        }
    }
}

/// `2xx`, `redirect` (3xx), `4xx` or `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        // Named for what it means to a webhook: redirects are never followed.
        300..=399 => "redirect",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Pool gauges of one host, refreshed at scrape time from the gate's counters (so the request
/// path never touches them).
pub fn host_gauges(host: &Arc<str>, in_flight: u32, max_connections: u32) {
    gauge!(HOST_IN_FLIGHT, "host" => host.clone()).set(f64::from(in_flight));
    gauge!(HOST_MAX_CONNECTIONS, "host" => host.clone()).set(f64::from(max_connections));
}

/// The state of `host`'s breaker, set at scrape time.
pub fn circuit_state(host: &Arc<str>, state: BreakerState) {
    gauge!(CIRCUIT_STATE, "host" => host.clone()).set(state as u8 as f64);
}

/// The breaker of `host` moved to `state`.
pub fn circuit_transition(host: &Arc<str>, state: BreakerState) {
    gauge!(CIRCUIT_STATE, "host" => host.clone()).set(state as u8 as f64);
    counter!(CIRCUIT_TRANSITIONS, "host" => host.clone(), "to" => state.as_str()).increment(1);
}

/// A sync delivery fell back to async for `reason`.
pub fn fallback(reason: &'static str) {
    counter!(FALLBACKS, "reason" => reason).increment(1);
}

/// An async event reached a final state (`delivered` or `dead_lettered`).
pub fn delivery_final(queue: &Arc<str>, result: &'static str) {
    counter!(DELIVERIES, "queue" => queue.clone(), "result" => result).increment(1);
}

/// Queue gauges.
pub fn queue_stats(queue: &Arc<str>, stats: &crate::queue::QueueStats) {
    gauge!(QUEUE_DEPTH, "queue" => queue.clone(), "state" => "ready").set(stats.ready as f64);
    gauge!(QUEUE_DEPTH, "queue" => queue.clone(), "state" => "delayed").set(stats.delayed as f64);
    gauge!(QUEUE_DEPTH, "queue" => queue.clone(), "state" => "in_flight")
        .set(stats.in_flight as f64);
    gauge!(DLQ_DEPTH, "queue" => queue.clone()).set(stats.dead_lettered as f64);
    gauge!(OLDEST_READY_AGE, "queue" => queue.clone())
        .set(stats.oldest_ready_age_ms as f64 / 1000.0);
}

/// A config reload finished with `result` (`ok` or `error`).
pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// Requests and connections refused at the edge, by `reason`.
pub const EDGE_REFUSALS: &str = "hookyard_edge_refusals_total";

/// Why the edge refused a client: each a bounded label value of [`EDGE_REFUSALS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeRefusal {
    /// A new ingress connection past `ingress.max_connections`.
    MaxConnections,
    /// A new admin connection past the admin listener's cap.
    AdminMaxConnections,
    /// Headers or body not in within `ingress.request_timeout_ms`.
    RequestTimeout,
    /// A body that would pass `ingress.max_buffered_body_bytes`.
    BodyBudget,
}

impl EdgeRefusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::AdminMaxConnections => "admin_max_connections",
            Self::RequestTimeout => "request_timeout",
            Self::BodyBudget => "body_budget",
        }
    }
}

/// Ingress body bytes held in memory right now.
pub const BODY_BYTES_BUFFERED: &str = "hookyard_ingress_body_bytes_buffered";

/// Sets the ingress body bytes held in memory (at scrape time).
pub fn body_bytes_buffered(bytes: usize) {
    gauge!(BODY_BYTES_BUFFERED).set(bytes as f64);
}

/// The edge refused a client for `reason`.
pub fn edge_refusal(reason: EdgeRefusal) {
    counter!(EDGE_REFUSALS, "reason" => reason.as_str()).increment(1);
}

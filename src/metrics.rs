//! Every metric name in one place, and the code that records them. Registering a config's
//! series at zero, which needs the whole config, is `metric_series`, so this module stays below
//! `config` and `upstream`.
//!
//! Label values are bounded by construction: `host` comes from configured targets,
//! `event_type` from rule patterns (an unrouted type is counted as `_unrouted`), `queue` from
//! config, and the rest from fixed enums. Never an event id or a trace id.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::circuit::BreakerState;
use crate::event::DeliveryMode;

pub const EVENTS_RECEIVED: &str = "hookyard_events_received_total";
pub const DELIVERY_ATTEMPTS: &str = "hookyard_delivery_attempts_total";
pub const DELIVERY_LATENCY: &str = "hookyard_delivery_latency_seconds";
pub const HOST_IN_FLIGHT: &str = "hookyard_host_in_flight";
pub const HOST_MAX_CONNECTIONS: &str = "hookyard_host_max_connections";
pub const SHED: &str = "hookyard_shed_total";
pub const HOST_CONNECTIONS: &str = "hookyard_host_connections";
pub const HOST_SLOT_WAITS: &str = "hookyard_host_slot_waits_total";
pub const CIRCUIT_STATE: &str = "hookyard_circuit_state";
pub const CIRCUIT_TRANSITIONS: &str = "hookyard_circuit_transitions_total";
pub const FALLBACKS: &str = "hookyard_fallback_total";
pub const QUEUE_DEPTH: &str = "hookyard_queue_depth";
pub const DLQ_DEPTH: &str = "hookyard_dlq_depth";
pub const OLDEST_READY_AGE: &str = "hookyard_queue_oldest_ready_age_seconds";
pub const DELIVERIES: &str = "hookyard_deliveries_total";
pub const ENQUEUE_BATCH_SIZE: &str = "hookyard_enqueue_batch_size";
pub const CONFIG_RELOADS: &str = "hookyard_config_reload_total";
pub const BUILD_INFO: &str = "hookyard_build_info";

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
            describe_all();
            process_collector().describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => env!("HOOKYARD_BUILD_COMMIT"))
                .set(1.0);
            handle
        })
        .clone()
}

/// The `process_*` collector (CPU seconds, resident memory, open fds, start time...), read at
/// scrape time.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Refreshes the `process_*` gauges (called by the admin API just before it renders a scrape).
pub fn collect_process() {
    process_collector().collect();
}

/// HELP text (and unit) of every family.
fn describe_all() {
    describe_counter!(
        EVENTS_RECEIVED,
        Unit::Count,
        "Events received at ingress, by matched rule pattern (event_type; _unrouted when no rule matched), mode and outcome."
    );
    describe_counter!(
        DELIVERY_ATTEMPTS,
        Unit::Count,
        "HTTP delivery attempts to a target host, by mode and result class (2xx, redirect, 4xx, 5xx, timeout, connect, reset)."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Duration of one delivery attempt in seconds, by host and mode."
    );
    describe_gauge!(
        HOST_IN_FLIGHT,
        Unit::Count,
        "Requests in flight to a host right now (read at scrape time)."
    );
    describe_gauge!(
        HOST_MAX_CONNECTIONS,
        Unit::Count,
        "Configured connection cap of a host."
    );
    describe_counter!(
        SHED,
        Unit::Count,
        "Sync requests shed because the host had no free connection slot."
    );
    describe_gauge!(
        HOST_CONNECTIONS,
        Unit::Count,
        "Connections to a host by state: open (idle or busy) and idle (read at scrape time)."
    );
    describe_counter!(
        HOST_SLOT_WAITS,
        Unit::Count,
        "Async deliveries put back for a moment because the host had no free connection slot."
    );
    describe_gauge!(
        CIRCUIT_STATE,
        Unit::Count,
        "Circuit breaker state of a host: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        CIRCUIT_TRANSITIONS,
        Unit::Count,
        "Circuit breaker transitions of a host, by the state entered (to)."
    );
    describe_counter!(
        FALLBACKS,
        Unit::Count,
        "Sync deliveries that failed and were queued for async delivery instead, by reason."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Events in a queue, by state (ready, delayed, in_flight, held behind an earlier event of their ordering key), read from the store at scrape time."
    );
    describe_gauge!(
        DLQ_DEPTH,
        Unit::Count,
        "Dead-lettered events kept for a queue, read from the store at scrape time."
    );
    describe_gauge!(
        OLDEST_READY_AGE,
        Unit::Seconds,
        "Age in seconds of the oldest event of a queue that is due and not yet taken (0 when none)."
    );
    describe_counter!(
        DELIVERIES,
        Unit::Count,
        "Async events that reached a final state, by queue and result (delivered, dead_lettered)."
    );
    describe_histogram!(
        ENQUEUE_BATCH_SIZE,
        Unit::Count,
        "Enqueues committed together in one SQLite transaction (one fsync)."
    );
    describe_counter!(
        CONFIG_RELOADS,
        Unit::Count,
        "Config reloads, by result (ok: the new rules are in force; error: rejected, the old ones stay)."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; the version and commit hookyard was built from, as labels."
    );
    describe_counter!(
        EDGE_REFUSALS,
        Unit::Count,
        "Requests and connections refused at the edge, by reason."
    );
    describe_gauge!(
        BODY_BYTES_BUFFERED,
        Unit::Bytes,
        "Ingress request body bytes held in memory right now."
    );
}

/// Every fallback reason label ([`crate::queue::FallbackReason`]).
pub const FALLBACK_REASONS: [&str; 5] =
    ["timeout", "upstream_5xx", "circuit_open", "shed", "connect"];

/// Every final result of an async event.
pub const DELIVERY_RESULTS: [&str; 2] = ["delivered", "dead_lettered"];

/// Every config reload result.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// Every edge refusal reason.
pub const EDGE_REFUSAL_REASONS: [EdgeRefusal; 4] = [
    EdgeRefusal::MaxConnections,
    EdgeRefusal::AdminMaxConnections,
    EdgeRefusal::RequestTimeout,
    EdgeRefusal::BodyBudget,
];

/// An event type that matched no rule.
pub fn event_unrouted() {
    counter!(EVENTS_RECEIVED, "event_type" => UNROUTED, "mode" => "none", "outcome" => "no_route")
        .increment(1);
}

/// Every attempt class a delivery can end in, in `HostMetrics` order.
pub const ATTEMPT_CLASSES: [&str; 7] = [
    "2xx", "redirect", "4xx", "5xx", "timeout", "connect", "reset",
];

/// The per-request metric handles of one host, looked up once instead of per request (a
/// registry lookup hashes the whole label set and allocates). Each mode's handles are taken on
/// its first attempt, not when the host is built: so a host only ever called in sync mode never
/// shows async series, and handles are never taken before the recorder is installed (they
/// would be no-ops for good). `metric_series::register_all` creates the possible series up
/// front, at zero.
#[derive(Debug)]
pub struct HostMetrics {
    host: Arc<str>,
    /// Index 0 = sync, 1 = async.
    modes: [OnceLock<ModeMetrics>; 2],
    shed: OnceLock<Counter>,
    slot_waits: OnceLock<Counter>,
}

#[derive(Debug)]
struct ModeMetrics {
    /// In `ATTEMPT_CLASSES` order.
    attempts: [Counter; ATTEMPT_CLASSES.len()],
    latency: Histogram,
}

impl HostMetrics {
    /// The (not yet registered) series of `host`.
    pub fn new(host: &Arc<str>) -> Self {
        Self {
            host: host.clone(),
            modes: [OnceLock::new(), OnceLock::new()],
            shed: OnceLock::new(),
            slot_waits: OnceLock::new(),
        }
    }

    /// One delivery attempt finished with `class` after `latency`.
    pub fn attempt(&self, mode: DeliveryMode, class: &str, latency: Duration) {
        let m = self.modes[usize::from(mode == DeliveryMode::Async)].get_or_init(|| ModeMetrics {
            attempts: ATTEMPT_CLASSES.map(|class| {
                counter!(DELIVERY_ATTEMPTS, "host" => self.host.clone(), "mode" => mode.as_str(), "class" => class)
            }),
            latency: histogram!(DELIVERY_LATENCY, "host" => self.host.clone(), "mode" => mode.as_str()),
        });
        if let Some(i) = ATTEMPT_CLASSES.iter().position(|c| *c == class) {
            m.attempts[i].increment(1);
        }
        m.latency.record(latency.as_secs_f64());
    }

    /// A sync request was shed.
    pub fn shed(&self) {
        self.shed
            .get_or_init(|| counter!(SHED, "host" => self.host.clone()))
            .increment(1);
    }

    /// An async delivery found no free slot and was put back for a moment.
    pub fn slot_wait(&self) {
        self.slot_waits
            .get_or_init(|| counter!(HOST_SLOT_WAITS, "host" => self.host.clone()))
            .increment(1);
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
pub fn host_gauges(
    key: &Arc<str>,
    in_flight: u32,
    max_connections: u32,
    (open, idle): (usize, usize),
) {
    gauge!(HOST_IN_FLIGHT, "host" => key.clone()).set(f64::from(in_flight));
    gauge!(HOST_MAX_CONNECTIONS, "host" => key.clone()).set(f64::from(max_connections));
    gauge!(HOST_CONNECTIONS, "host" => key.clone(), "state" => "open").set(open as f64);
    gauge!(HOST_CONNECTIONS, "host" => key.clone(), "state" => "idle").set(idle as f64);
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
    gauge!(QUEUE_DEPTH, "queue" => queue.clone(), "state" => "held").set(stats.held as f64);
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

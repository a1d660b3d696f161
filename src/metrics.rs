//! Every metric name in one place, and the only code that records them.
//!
//! Label values are bounded by construction: `host` comes from configured targets,
//! `event_type` from rule patterns (an unrouted type is counted as `_unrouted`), `queue` from
//! config, and the rest from fixed enums. Never an event id or a trace id.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
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
            // Another recorder may already be installed (an embedding program's own): then
            // hookyard's metrics go to it, and this handle renders only what it saw.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// An event arrived at ingress and got `outcome`.
pub fn event_received(event_type: &Arc<str>, mode: &'static str, outcome: &'static str) {
    counter!(EVENTS_RECEIVED, "event_type" => event_type.clone(), "mode" => mode, "outcome" => outcome)
        .increment(1);
}

/// An event type that matched no rule.
pub fn event_unrouted() {
    counter!(EVENTS_RECEIVED, "event_type" => UNROUTED, "mode" => "none", "outcome" => "no_route")
        .increment(1);
}

/// One delivery attempt to `host` finished with `class` after `latency`.
pub fn attempt(host: &Arc<str>, mode: DeliveryMode, class: &'static str, latency: Duration) {
    counter!(DELIVERY_ATTEMPTS, "host" => host.clone(), "mode" => mode.as_str(), "class" => class)
        .increment(1);
    histogram!(DELIVERY_LATENCY, "host" => host.clone(), "mode" => mode.as_str())
        .record(latency.as_secs_f64());
}

/// `2xx`, `3xx`, `4xx` or `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Requests in flight to `host`.
pub fn host_in_flight(host: &Arc<str>, n: u32) {
    gauge!(HOST_IN_FLIGHT, "host" => host.clone()).set(f64::from(n));
}

/// The cap of `host`.
pub fn host_max(host: &Arc<str>, n: u32) {
    gauge!(HOST_MAX_CONNECTIONS, "host" => host.clone()).set(f64::from(n));
}

/// A sync request to `host` was shed.
pub fn shed(host: &Arc<str>) {
    counter!(SHED, "host" => host.clone()).increment(1);
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

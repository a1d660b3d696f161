//! Registers, at zero, every metric series a config can produce, so `/metrics` shows each family
//! from the first scrape. It walks the whole config (rules, hosts, queues), which is why it is
//! apart from `metrics`: that module is the recorder every layer calls, this one sits above the
//! config.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use metrics::{counter, gauge, histogram};

use crate::circuit::BreakerState;
use crate::config::Settings;
use crate::metrics::{
    ATTEMPT_CLASSES, BODY_BYTES_BUFFERED, CIRCUIT_STATE, CIRCUIT_TRANSITIONS, CONFIG_RELOADS,
    DELIVERIES, DELIVERY_ATTEMPTS, DELIVERY_LATENCY, DELIVERY_RESULTS, DLQ_DEPTH, EDGE_REFUSALS,
    EDGE_REFUSAL_REASONS, ENQUEUE_BATCH_SIZE, EVENTS_RECEIVED, FALLBACKS, FALLBACK_REASONS,
    HOST_CONNECTIONS, HOST_IN_FLIGHT, HOST_MAX_CONNECTIONS, HOST_SLOT_WAITS, OLDEST_READY_AGE,
    QUEUE_DEPTH, RELOAD_RESULTS, SHED, UNROUTED,
};
use crate::routing::{possible_outcomes, DeliveryMode, Rule};

/// The modes in which `rule` makes attempts to its host: sync rules call it, and with fallback
/// the queued copy is then delivered to it in async mode.
fn attempt_modes(rule: &Rule) -> &'static [DeliveryMode] {
    match (rule.mode, rule.fallback_to_async) {
        (DeliveryMode::Async, _) => &[DeliveryMode::Async],
        (DeliveryMode::Sync, false) => &[DeliveryMode::Sync],
        (DeliveryMode::Sync, true) => &[DeliveryMode::Sync, DeliveryMode::Async],
    }
}

/// The queues `settings` can store events in: every rule's queue (async rules, and sync rules
/// with fallback), every configured queue section, and `default`.
pub fn configured_queues(settings: &Settings) -> Vec<Arc<str>> {
    let mut queues: Vec<Arc<str>> = settings
        .rules
        .rules()
        .iter()
        .map(|r| r.queue.clone())
        .chain(settings.queues.named.keys().map(|q| Arc::from(q.as_str())))
        .chain(std::iter::once(Arc::from("default")))
        .collect();
    queues.sort();
    queues.dedup();
    queues
}

/// Registers, at zero, every series `settings` can ever produce, so each family exists from the
/// first scrape and `rate()` and alerts work before the first event. Called once the recorder
/// is installed: at server start and after every successful reload. Only possible label sets
/// are registered (a sync rule never gets `outcome="accepted"`). Series of hosts, rules or
/// queues a reload removed are kept (Prometheus convention: a counter does not vanish while
/// the process lives); they simply stop moving. The two gauges of a removed host that no scrape
/// refreshes any more are zeroed: its breaker went with it (an event still queued for it gets a
/// fresh, closed one, which the scrape then reports), so a circuit left open at the reload does
/// not alert forever. Nothing here runs per request.
pub fn register_all(settings: &Settings) {
    let rules = settings.rules.rules();
    for rule in rules {
        for outcome in possible_outcomes(rule) {
            counter!(EVENTS_RECEIVED, "event_type" => rule.pattern.clone(), "mode" => rule.mode.as_str(), "outcome" => *outcome)
                .increment(0);
        }
    }
    // With a `*` rule every event type routes somewhere.
    if !rules.iter().any(|r| &*r.pattern == "*") {
        counter!(EVENTS_RECEIVED, "event_type" => UNROUTED, "mode" => "none", "outcome" => "no_route")
            .increment(0);
    }
    let mut host_modes: BTreeMap<Arc<str>, [bool; 2]> = BTreeMap::new();
    for rule in rules {
        let modes = host_modes.entry(rule.target.host.clone()).or_default();
        for mode in attempt_modes(rule) {
            modes[usize::from(*mode == DeliveryMode::Async)] = true;
        }
    }
    {
        static REGISTERED_HOSTS: Mutex<BTreeSet<Arc<str>>> = Mutex::new(BTreeSet::new());
        let mut registered = REGISTERED_HOSTS.lock().unwrap_or_else(|p| p.into_inner());
        for gone in registered.iter().filter(|h| !host_modes.contains_key(*h)) {
            gauge!(CIRCUIT_STATE, "host" => gone.clone()).set(0.0);
            gauge!(HOST_IN_FLIGHT, "host" => gone.clone()).set(0.0);
            for state in ["open", "idle"] {
                gauge!(HOST_CONNECTIONS, "host" => gone.clone(), "state" => state).set(0.0);
            }
        }
        *registered = host_modes.keys().cloned().collect();
    }
    for (host, modes) in &host_modes {
        for (m, mode) in [DeliveryMode::Sync, DeliveryMode::Async]
            .into_iter()
            .enumerate()
        {
            if !modes[m] {
                continue;
            }
            for class in ATTEMPT_CLASSES {
                counter!(DELIVERY_ATTEMPTS, "host" => host.clone(), "mode" => mode.as_str(), "class" => class)
                    .increment(0);
            }
            // A histogram handle is enough: it renders with empty buckets.
            let _ = histogram!(DELIVERY_LATENCY, "host" => host.clone(), "mode" => mode.as_str());
        }
        if modes[0] {
            counter!(SHED, "host" => host.clone()).increment(0);
        }
        // `increment(0.0)`: creates the series at 0 (closed) but never resets a breaker a
        // reload kept open.
        gauge!(CIRCUIT_STATE, "host" => host.clone()).increment(0.0);
        gauge!(HOST_IN_FLIGHT, "host" => host.clone()).increment(0.0);
        gauge!(HOST_MAX_CONNECTIONS, "host" => host.clone()).increment(0.0);
        for state in ["open", "idle"] {
            gauge!(HOST_CONNECTIONS, "host" => host.clone(), "state" => state).increment(0.0);
        }
        if modes[1] {
            counter!(HOST_SLOT_WAITS, "host" => host.clone()).increment(0);
        }
        for to in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            counter!(CIRCUIT_TRANSITIONS, "host" => host.clone(), "to" => to.as_str()).increment(0);
        }
    }
    if rules
        .iter()
        .any(|r| r.mode == DeliveryMode::Sync && r.fallback_to_async)
    {
        for reason in FALLBACK_REASONS {
            counter!(FALLBACKS, "reason" => reason).increment(0);
        }
    }
    for queue in configured_queues(settings) {
        for result in DELIVERY_RESULTS {
            counter!(DELIVERIES, "queue" => queue.clone(), "result" => result).increment(0);
        }
        for state in ["ready", "delayed", "in_flight", "held"] {
            gauge!(QUEUE_DEPTH, "queue" => queue.clone(), "state" => state).increment(0.0);
        }
        gauge!(DLQ_DEPTH, "queue" => queue.clone()).increment(0.0);
        gauge!(OLDEST_READY_AGE, "queue" => queue.clone()).increment(0.0);
    }
    for result in RELOAD_RESULTS {
        counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    // Recorded only by the SQLite store, but registered either way so a dashboard's query for it
    // is never empty.
    let _ = histogram!(ENQUEUE_BATCH_SIZE);
    for reason in EDGE_REFUSAL_REASONS {
        counter!(EDGE_REFUSALS, "reason" => reason.as_str()).increment(0);
    }
    gauge!(BODY_BYTES_BUFFERED).increment(0.0);
}

//! A rule's own `events_received` counters: which outcomes it can produce, and their handles
//! resolved once per rule instead of by label lookup on every event.

use std::sync::OnceLock;

use metrics::{counter, Counter};

use super::Rule;
use crate::event::DeliveryMode;
use crate::metrics::EVENTS_RECEIVED;

/// Every `events_received` outcome a rule can produce: sync relays, and only with fallback
/// stores (then it can also be deduplicated, find the queue full or the store down); async
/// only stores, and refuses an event whose ordering key it cannot read when it has one.
pub fn possible_outcomes(rule: &Rule) -> &'static [&'static str] {
    match (rule.mode, rule.fallback_to_async) {
        (DeliveryMode::Async, _) if rule.ordering_key.is_some() => &[
            "accepted",
            "duplicate",
            "queue_full",
            "store_unavailable",
            "rejected",
        ],
        (DeliveryMode::Async, _) => &["accepted", "duplicate", "queue_full", "store_unavailable"],
        (DeliveryMode::Sync, false) => &["delivered", "relayed_error", "failed"],
        // `failed` stays possible: an answer too large to relay is not a fallback case.
        (DeliveryMode::Sync, true) => &[
            "delivered",
            "relayed_error",
            "failed",
            "fallback",
            "duplicate",
            "queue_full",
            "store_unavailable",
        ],
    }
}

/// The `events_received` counters of one rule, registered on first use (rules are compiled
/// before the recorder is installed, and handles taken then would be no-ops). Only the
/// outcomes the rule's mode can produce get a counter; `metric_series::register_all` creates
/// the same series at zero once the recorder is installed.
#[derive(Debug, Default)]
pub struct RuleMetrics {
    counters: OnceLock<[Option<Counter>; OUTCOMES.len()]>,
}

/// Every ingress outcome label, in `RuleMetrics` order.
pub const OUTCOMES: [&str; 10] = [
    "delivered",
    "relayed_error",
    "accepted",
    "fallback",
    "duplicate",
    "failed",
    "no_route",
    "queue_full",
    "store_unavailable",
    "rejected",
];

impl RuleMetrics {
    /// Counts one event of `rule` that ended in `outcome`.
    pub fn received(&self, rule: &Rule, outcome: &'static str) {
        let counters = self.counters.get_or_init(|| {
            let possible = possible_outcomes(rule);
            OUTCOMES.map(|o| {
                possible.contains(&o).then(|| {
                    counter!(EVENTS_RECEIVED, "event_type" => rule.pattern.clone(), "mode" => rule.mode.as_str(), "outcome" => o)
                })
            })
        });
        if let Some(Some(c)) = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map(|i| &counters[i])
        {
            c.increment(1);
        } else {
            debug_assert!(
                false,
                "outcome {outcome} is not possible for rule {}",
                rule.pattern
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn rule(mode: DeliveryMode, fallback_to_async: bool, ordered: bool) -> Rule {
        Rule {
            pattern: "t".into(),
            mode,
            target: crate::routing::Target::parse(crate::secret::Redacted::url(
                "http://127.0.0.1:1/",
            ))
            .unwrap(),
            timeout: Duration::from_millis(100),
            fallback_to_async,
            queue: "default".into(),
            retry_delays_ms: Arc::from(vec![10u64]),
            jitter: 0.0,
            signature: crate::signing::SignatureScheme::StandardWebhooks,
            ordering_key: ordered
                .then(|| crate::routing::OrderingKeySource::parse("header:X-Key").unwrap()),
            metrics: Default::default(),
        }
    }

    #[test]
    fn every_outcome_but_no_route_is_possible_for_some_rule_and_none_twice() {
        let mut seen = BTreeSet::new();
        for (mode, fallback, ordered) in [
            (DeliveryMode::Sync, false, false),
            (DeliveryMode::Sync, true, false),
            (DeliveryMode::Async, false, false),
            (DeliveryMode::Async, false, true),
        ] {
            let possible = possible_outcomes(&rule(mode, fallback, ordered));
            assert!(possible.iter().all(|o| OUTCOMES.contains(o)));
            assert_eq!(
                possible.iter().collect::<BTreeSet<_>>().len(),
                possible.len()
            );
            seen.extend(possible.iter().copied());
        }
        let expected: BTreeSet<_> = OUTCOMES.into_iter().filter(|o| *o != "no_route").collect();
        assert_eq!(seen, expected);
        // A sync rule with a fallback still fails when the answer is too large to relay.
        assert!(possible_outcomes(&rule(DeliveryMode::Sync, true, false)).contains(&"failed"));
        assert!(!possible_outcomes(&rule(DeliveryMode::Sync, false, false)).contains(&"accepted"));
        // Only a rule with an ordering key refuses events for it.
        assert!(!possible_outcomes(&rule(DeliveryMode::Async, false, false)).contains(&"rejected"));
    }
}

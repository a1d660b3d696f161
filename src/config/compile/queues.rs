//! `queues:`: the `default` queue's policy over the built-in one, and each named queue's over
//! `default` (concurrency, depth, dead-letter retention and retry schedule).

use std::collections::HashMap;
use std::time::Duration;

use super::Compiler;
use crate::config::schema::QueueSection;
use crate::config::{QueuePolicies, QueuePolicy};

impl Compiler<'_> {
    fn queue_policy(&mut self, s: &QueueSection, base: &QueuePolicy) -> QueuePolicy {
        let jitter = self.jitter(&s.jitter, base.jitter);
        let (retry_delays_ms, jitter) = self
            .retry_schedule(&s.retry_matrix, &s.retry_policy, jitter)
            .flatten()
            .unwrap_or_else(|| (base.retry_delays_ms.clone(), jitter));
        QueuePolicy {
            concurrency: self.positive(
                &s.concurrency,
                base.concurrency.into(),
                "concurrency",
                10_000,
            ) as u32,
            max_depth: self.positive(&s.max_depth, base.max_depth, "max_depth", i64::MAX),
            dlq_retention: Duration::from_secs(
                3600 * self.positive(
                    &s.dlq_retention_hours,
                    base.dlq_retention.as_secs() / 3600,
                    "dlq_retention_hours",
                    24 * 365 * 10,
                ),
            ),
            retry_delays_ms,
            jitter,
        }
    }

    pub(super) fn queues(
        &mut self,
        queues: &std::collections::BTreeMap<String, QueueSection>,
    ) -> QueuePolicies {
        let default = queues
            .get("default")
            .map(|d| self.queue_policy(d, &QueuePolicy::default()))
            .unwrap_or_default();
        let mut named = HashMap::new();
        for (name, section) in queues.iter().filter(|(n, _)| n.as_str() != "default") {
            let policy = self.queue_policy(section, &default);
            named.insert(name.clone(), policy);
        }
        QueuePolicies { default, named }
    }
}

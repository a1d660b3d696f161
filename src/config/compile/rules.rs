//! `routing_rules:`: each rule's pattern, target, mode, timeout, fallback, queue, retry
//! schedule, signature and ordering key, and the table they form (duplicates and overlaps).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Compiler, MAX_TIMEOUT_MS};
use crate::config::schema::{Fallback, Mode, Pos, RuleSection, SignatureChoice};
use crate::config::tree::SecretKind;
use crate::config::{Problem, QueuePolicies};
use crate::routing::{parse_pattern, DeliveryMode, OrderingKeySource, Rule, RuleTable, Target};
use crate::signing::SignatureScheme;

/// Default deadline of an async attempt when the rule sets none.
pub(super) const DEFAULT_ASYNC_TIMEOUT_MS: u64 = 10_000;

impl Compiler<'_> {
    pub(super) fn rules(
        &mut self,
        rules: &Pos<Vec<RuleSection>>,
        queues: &QueuePolicies,
    ) -> RuleTable {
        if rules.value.is_empty() {
            self.problem(Problem::spanned(
                rules,
                "routing_rules is empty: no event could be delivered",
            ));
        }
        let mut table = RuleTable::default();
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for (index, r) in rules.value.iter().enumerate() {
            let pattern = r.event_type.value.as_str();
            // A duplicate is still compiled so that its other mistakes are reported too.
            let rule = self.rule(index, r, queues);
            if let Some(first_line) = seen.insert(pattern, r.event_type.referenced.line()) {
                self.problem(Problem::spanned(
                    &r.event_type,
                    format!(
                        "duplicate event_type {pattern:?} (first defined on line {first_line})"
                    ),
                ));
                continue;
            }
            if let Some(rule) = rule {
                if let Err(e) = table.insert(rule) {
                    self.problem(Problem::spanned(&r.event_type, e.to_string()));
                }
            }
        }
        table
    }

    fn rule(&mut self, index: usize, r: &RuleSection, queues: &QueuePolicies) -> Option<Rule> {
        let pattern_ok = match parse_pattern(&r.event_type.value) {
            Ok(_) => true,
            Err(e) => {
                self.problem(Problem::spanned(
                    &r.event_type,
                    format!("invalid event_type {:?}: {e}", r.event_type.value),
                ));
                false
            }
        };
        let target = self.target(index, &r.target);
        let mode = match r.mode.value {
            Mode::Sync => DeliveryMode::Sync,
            Mode::Async => DeliveryMode::Async,
        };
        let timeout_ms = match (&r.timeout_ms, mode) {
            (None, DeliveryMode::Sync) => {
                self.problem(Problem::spanned(
                    &r.mode,
                    "a sync rule needs timeout_ms: the caller waits, so the wait must be bounded",
                ));
                None
            }
            (None, DeliveryMode::Async) => Some(DEFAULT_ASYNC_TIMEOUT_MS),
            (Some(_), _) => {
                let before = self.problems.len();
                let v = self.positive(&r.timeout_ms, 0, "timeout_ms", MAX_TIMEOUT_MS);
                (self.problems.len() == before).then_some(v)
            }
        };
        let fallback_to_async = match (&r.fallback, mode) {
            (Some(f), DeliveryMode::Async) if f.value == Fallback::AsyncDlq => {
                self.problem(Problem::spanned(
                    f,
                    "fallback applies to sync rules only; an async rule is already queued",
                ));
                false
            }
            (Some(f), _) => f.value == Fallback::AsyncDlq,
            (None, _) => false,
        };
        let queue: Arc<str> = match &r.queue {
            Some(q) if q.value.trim().is_empty() => {
                self.problem(Problem::spanned(q, "queue name must not be empty"));
                "default".into()
            }
            Some(q) => q.value.as_str().into(),
            None => "default".into(),
        };
        let policy = queues.for_queue(&queue);
        let (retry_delays_ms, jitter) = self
            .retry_schedule(&r.retry_matrix, &r.retry_policy, policy.jitter)?
            .unwrap_or_else(|| (policy.retry_delays_ms.clone(), policy.jitter));
        let signature = match r.signature {
            Some(SignatureChoice::LegacyHmacSha256) => SignatureScheme::LegacyHmacSha256,
            _ => SignatureScheme::StandardWebhooks,
        };
        let ordering_key = match (&r.ordering_key, mode) {
            (None, _) => None,
            (Some(k), DeliveryMode::Sync) => {
                self.problem(Problem::spanned(
                    k,
                    "ordering_key applies to async rules only: a sync caller already waits for \
                     each event in turn",
                ));
                None
            }
            (Some(k), DeliveryMode::Async) => match OrderingKeySource::parse(&k.value) {
                Ok(source) => Some(source),
                Err(e) => {
                    self.problem(Problem::spanned(k, format!("invalid ordering_key: {e}")));
                    None
                }
            },
        };
        if !pattern_ok {
            return None;
        }
        Some(Rule {
            pattern: r.event_type.value.as_str().into(),
            mode,
            target: target?,
            timeout: Duration::from_millis(timeout_ms?),
            fallback_to_async,
            queue,
            retry_delays_ms,
            jitter,
            signature,
            ordering_key,
            metrics: Default::default(),
        })
    }

    fn target(&mut self, index: usize, v: &Pos<String>) -> Option<Target> {
        let url = self.expand_secret(v, SecretKind::Url)?;
        match Target::parse(url) {
            Ok(t) => Some(t),
            Err(e) => {
                // The key and the reason; never the URL, which may hold a password once
                // expanded (the snippet shows the file's text, with its `${VAR}`).
                let p = self.secret_problem(
                    v,
                    SecretKind::Url,
                    format!(
                        "routing_rules[{index}].target must be an absolute http:// or https:// URL: {e}"
                    ),
                );
                self.problem(p);
                None
            }
        }
    }
}

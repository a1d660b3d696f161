//! Retry schedules: a `retry_matrix` of explicit delays or a `retry_policy` (fixed or
//! exponential backoff up to a cap), one or the other, and the jitter applied to them. Shared
//! by queues and rules.

use std::sync::Arc;

use super::Compiler;
use crate::config::schema::{Backoff, DurationValue, Pos, RetryPolicySection};
use crate::config::Problem;

impl Compiler<'_> {
    fn retry_matrix(&mut self, v: &Pos<Vec<Pos<DurationValue>>>) -> Option<Arc<[u64]>> {
        if v.value.is_empty() {
            self.problem(Problem::spanned(
                v,
                "retry_matrix must list at least one delay (attempts = 1 + its length); omit it to use the queue's schedule",
            ));
            return None;
        }
        let delays: Vec<u64> = v
            .value
            .iter()
            .filter_map(|d| self.duration_ms(d, "a retry delay"))
            .collect();
        (delays.len() == v.value.len()).then(|| Arc::from(delays))
    }

    /// A retry schedule from `retry_matrix` or `retry_policy` (giving both is an error), as
    /// the delays before each retry and the jitter fraction; `None` when neither is given.
    pub(super) fn retry_schedule(
        &mut self,
        matrix: &Option<Pos<Vec<Pos<DurationValue>>>>,
        policy: &Option<Pos<RetryPolicySection>>,
        jitter: f64,
    ) -> Option<Option<(Arc<[u64]>, f64)>> {
        match (matrix, policy) {
            (Some(_), Some(p)) => {
                self.problem(Problem::spanned(
                    p,
                    "give retry_matrix or retry_policy, not both",
                ));
                None
            }
            (Some(m), None) => Some(Some((self.retry_matrix(m)?, jitter))),
            (None, Some(p)) => Some(Some(self.retry_policy(p, jitter)?)),
            (None, None) => Some(None),
        }
    }

    /// The delays of a `retry_policy`: attempts = `max_attempts`; retry n waits
    /// `base × 2^(n-1)` (exponential) or `base` (fixed), never more than `max_delay_ms`.
    fn retry_policy(
        &mut self,
        p: &Pos<RetryPolicySection>,
        jitter: f64,
    ) -> Option<(Arc<[u64]>, f64)> {
        let before = self.problems.len();
        let policy = &p.value;
        let attempts = self.positive(
            &Some(policy.max_attempts.clone()),
            1,
            "retry_policy.max_attempts",
            100,
        );
        let base = match &policy.base_delay_ms {
            Some(d) => self.duration_ms(d, "retry_policy.base_delay_ms"),
            None => Some(1_000),
        };
        let max = match &policy.max_delay_ms {
            Some(d) => self.duration_ms(d, "retry_policy.max_delay_ms"),
            None => Some(3_600_000),
        };
        let (base, max) = (base?, max?);
        if base == 0 {
            self.problem(Problem::spanned(
                p,
                "retry_policy.base_delay_ms must be greater than 0",
            ));
        }
        if max < base {
            self.problem(Problem::spanned(
                p,
                format!(
                    "retry_policy.max_delay_ms ({max}) must be at least base_delay_ms ({base})"
                ),
            ));
        }
        if self.problems.len() != before {
            return None;
        }
        let backoff = policy
            .backoff
            .as_ref()
            .map_or(Backoff::Exponential, |b| b.value);
        let delays: Vec<u64> = (1..attempts)
            .map(|retry| match backoff {
                Backoff::Fixed => base,
                // 2^(n-1) saturates long before 100 attempts; the cap applies either way.
                Backoff::Exponential => 1u64
                    .checked_shl(u32::try_from(retry - 1).unwrap_or(u32::MAX))
                    .map_or(u64::MAX, |factor| base.saturating_mul(factor))
                    .min(max),
            })
            .collect();
        let jitter = match &policy.jitter {
            Some(j) if !j.value => 0.0,
            _ => jitter,
        };
        Some((Arc::from(delays), jitter))
    }

    pub(super) fn jitter(&mut self, v: &Option<Pos<f64>>, default: f64) -> f64 {
        match v {
            None => default,
            Some(p) if !(0.0..1.0).contains(&p.value) => {
                self.problem(Problem::spanned(
                    p,
                    format!("jitter must be in [0, 1), got {}", p.value),
                ));
                default
            }
            Some(p) => p.value,
        }
    }
}

//! A host's `circuit_breaker:`: which policy (failure rate or consecutive failures) its keys
//! select, keys that belong to the other policy, and each threshold's range.

use super::{pos_of, Compiler};
use crate::config::schema::{BreakerPolicyChoice, BreakerSection};
use crate::config::{BreakerPolicy, BreakerSettings, Problem};

/// Longest rolling window of a failure-rate breaker (one day): the window's buckets count
/// slots of a tenth of it, and a longer window is a typo, not a policy.
const MAX_WINDOW_MS: i64 = 86_400_000;

/// Most half-open probes (the breaker counts them in 16 bits).
const MAX_HALF_OPEN_PROBES: i64 = 10_000;

impl Compiler<'_> {
    /// A host's breaker: the policy is the explicit `policy`, else the one whose keys are
    /// written, else `base`'s. Thresholds not written come from `base` when it has the same
    /// policy, else from that policy's defaults. A key of the other policy is an error, so a
    /// file never says something the breaker ignores.
    pub(super) fn breaker(
        &mut self,
        b: &BreakerSection,
        base: &BreakerSettings,
    ) -> BreakerSettings {
        let rate_keys: [(&str, Option<(u64, u64)>); 3] = [
            ("failure_rate", b.failure_rate.as_ref().map(pos_of)),
            ("window_ms", b.window_ms.as_ref().map(pos_of)),
            ("min_calls", b.min_calls.as_ref().map(pos_of)),
        ];
        let consecutive_key = b.consecutive_failures.as_ref().map(pos_of);
        let first_rate_key = rate_keys
            .iter()
            .find_map(|(name, at)| at.map(|at| (*name, at)));
        let kind = match &b.policy {
            Some(p) => p.value,
            None => match (first_rate_key, consecutive_key) {
                (Some((name, (line, column))), Some(_)) => {
                    self.problem(Problem::at(
                        line,
                        column,
                        format!(
                            "{name} belongs to policy failure_rate, but consecutive_failures \
                             (policy consecutive) is also set; keep the keys of one policy"
                        ),
                    ));
                    BreakerPolicyChoice::FailureRate
                }
                (Some(_), None) => BreakerPolicyChoice::FailureRate,
                (None, Some(_)) => BreakerPolicyChoice::Consecutive,
                (None, None) => match base.policy {
                    BreakerPolicy::FailureRate { .. } => BreakerPolicyChoice::FailureRate,
                    BreakerPolicy::Consecutive { .. } => BreakerPolicyChoice::Consecutive,
                },
            },
        };
        if b.policy.is_some() {
            let stray: Vec<(&str, (u64, u64))> = match kind {
                BreakerPolicyChoice::FailureRate => consecutive_key
                    .map(|at| ("consecutive_failures", at))
                    .into_iter()
                    .collect(),
                BreakerPolicyChoice::Consecutive => rate_keys
                    .iter()
                    .filter_map(|(name, at)| at.map(|at| (*name, at)))
                    .collect(),
            };
            let policy_name = match kind {
                BreakerPolicyChoice::FailureRate => "failure_rate",
                BreakerPolicyChoice::Consecutive => "consecutive",
            };
            for (name, (line, column)) in stray {
                self.problem(Problem::at(
                    line,
                    column,
                    format!("{name} is not a setting of policy {policy_name}"),
                ));
            }
        }
        let policy = match kind {
            BreakerPolicyChoice::FailureRate => {
                let (rate, window, min) = base.policy.failure_rate_or_default();
                let failure_rate = match &b.failure_rate {
                    None => rate,
                    Some(p) if !(p.value > 0.0 && p.value <= 1.0) => {
                        self.problem(Problem::spanned(
                            p,
                            format!("failure_rate must be in (0, 1], got {}", p.value),
                        ));
                        rate
                    }
                    Some(p) => p.value,
                };
                BreakerPolicy::FailureRate {
                    failure_rate,
                    window_ms: self.positive(&b.window_ms, window, "window_ms", MAX_WINDOW_MS),
                    min_calls: self.positive(&b.min_calls, min.into(), "min_calls", 1_000_000)
                        as u32,
                }
            }
            BreakerPolicyChoice::Consecutive => {
                let n = match base.policy {
                    BreakerPolicy::Consecutive {
                        consecutive_failures,
                    } => consecutive_failures,
                    BreakerPolicy::FailureRate { .. } => {
                        crate::config::DEFAULT_CONSECUTIVE_FAILURES
                    }
                };
                BreakerPolicy::Consecutive {
                    consecutive_failures: self.positive(
                        &b.consecutive_failures,
                        n.into(),
                        "consecutive_failures",
                        1_000_000,
                    ) as u32,
                }
            }
        };
        BreakerSettings {
            policy,
            recovery_ms: self.positive(&b.recovery_ms, base.recovery_ms, "recovery_ms", i64::MAX),
            half_open_probes: self.positive(
                &b.half_open_probes,
                base.half_open_probes.into(),
                "half_open_probes",
                MAX_HALF_OPEN_PROBES,
            ) as u32,
        }
    }
}

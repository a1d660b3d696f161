//! `hosts:`: the `default` host's policy over the built-in one, each named host's over
//! `default` (connections, shedding, connect timeout, breaker), keyed by `host:port`.

use std::collections::HashMap;
use std::time::Duration;

use super::{Compiler, MAX_TIMEOUT_MS};
use crate::config::schema::HostSection;
use crate::config::{HostPolicies, HostPolicy, Problem};

impl Compiler<'_> {
    fn host_policy(&mut self, s: &HostSection, base: &HostPolicy) -> HostPolicy {
        let max_connections = self.positive(
            &s.max_connections,
            base.max_connections.into(),
            "max_connections",
            1_000_000,
        ) as u32;
        let shed_at = match &s.shed_at {
            None => base.shed_at,
            Some(p) if !(p.value > 0.0 && p.value <= 1.0) => {
                self.problem(Problem::spanned(
                    p,
                    format!("shed_at must be in (0, 1], got {}", p.value),
                ));
                base.shed_at
            }
            Some(p) => p.value,
        };
        let connect_timeout = Duration::from_millis(self.positive(
            &s.connect_timeout_ms,
            base.connect_timeout.as_millis() as u64,
            "connect_timeout_ms",
            MAX_TIMEOUT_MS,
        ));
        let circuit_breaker = match &s.circuit_breaker {
            Some(b) => self.breaker(b, &base.circuit_breaker),
            None => base.circuit_breaker,
        };
        HostPolicy {
            max_connections,
            shed_at,
            connect_timeout,
            circuit_breaker,
        }
    }

    pub(super) fn hosts(
        &mut self,
        hosts: &std::collections::BTreeMap<String, HostSection>,
    ) -> HostPolicies {
        let default = hosts
            .get("default")
            .map(|d| self.host_policy(d, &HostPolicy::default()))
            .unwrap_or_default();
        let mut overrides = HashMap::new();
        for (name, section) in hosts.iter().filter(|(n, _)| n.as_str() != "default") {
            let policy = self.host_policy(section, &default);
            overrides.insert(normalize_host_key(name), policy);
        }
        HostPolicies { default, overrides }
    }
}

/// `host` or `host:port` as written under `hosts:` -> the `host:port` key targets use.
fn normalize_host_key(name: &str) -> String {
    if name
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        name.to_string()
    } else {
        format!("{name}:80")
    }
}

//! The process's file-descriptor limit, and how many ingress connections fit under it.
//!
//! Every connection is a descriptor. If ingress may accept until the process runs out, a flood
//! of idle clients leaves none for what the sidecar itself needs (upstream connections, the
//! store's files, the admin port) and `accept` fails in a loop with `EMFILE`. So serve raises
//! its soft limit as far as the hard limit allows, sets aside descriptors for its own needs,
//! and caps ingress connections below the rest.

use std::collections::HashSet;

use crate::config::Settings;

/// Descriptors for the process itself: stdio, listeners, epoll and event fds, one per thread
/// (timers, wakers), the config watch, log output.
const PROCESS_RESERVE: u64 = 64;

/// Descriptors for the store: SQLite's database, WAL and shared-memory files for the writer
/// and each reader, or a few Redis connections.
const STORE_RESERVE: u64 = 32;

/// Open connections the admin listener accepts at most: probes, scrapes and the CLI need few,
/// and a cap of their own means an ingress flood can never lock operators out.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// What serve chose at start, for the log and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorPlan {
    /// The soft limit the process started with.
    pub soft_before: u64,
    /// The soft limit now (raised to the hard limit where allowed).
    pub soft: u64,
    /// Descriptors set aside for upstream connections, the store, the admin port and the
    /// process itself.
    pub reserved: u64,
    /// The most ingress connections that fit under `soft` after `reserved`.
    pub ingress_cap: usize,
}

/// Raises the soft descriptor limit to the hard limit (where the platform allows) and plans
/// the ingress connection cap for `settings`.
pub fn plan(settings: &Settings) -> DescriptorPlan {
    let soft_before = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _hard)| soft)
        .unwrap_or(1024);
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the file-descriptor limit; keeping {soft_before}");
            soft_before
        }
    };
    DescriptorPlan::for_limit(soft_before, soft, upstream_reserve(settings))
}

impl DescriptorPlan {
    /// The plan for a soft limit of `soft` with `upstream` descriptors for upstream
    /// connections. Whatever the reserve, ingress keeps at least half the descriptors: a
    /// config with many large host pools must not leave it none.
    pub fn for_limit(soft_before: u64, soft: u64, upstream: u64) -> Self {
        let wanted = PROCESS_RESERVE + STORE_RESERVE + ADMIN_MAX_CONNECTIONS as u64 + upstream;
        let reserved = wanted.min(soft / 2);
        Self {
            soft_before,
            soft,
            reserved,
            ingress_cap: usize::try_from(soft - reserved).unwrap_or(usize::MAX),
        }
    }
}

/// Upstream connections the rules can open at once: each target host's `max_connections`.
fn upstream_reserve(settings: &Settings) -> u64 {
    let hosts: HashSet<&str> = settings
        .rules
        .rules()
        .iter()
        .map(|rule| &*rule.target.host)
        .collect();
    hosts
        .into_iter()
        .map(|host| u64::from(settings.hosts.for_host(host).max_connections))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_gets_what_is_left_after_the_reserve_but_never_less_than_half() {
        let roomy = DescriptorPlan::for_limit(1024, 65_536, 256);
        assert_eq!(roomy.reserved, 64 + 32 + 64 + 256);
        assert_eq!(roomy.ingress_cap, 65_536 - 416);

        let tight = DescriptorPlan::for_limit(256, 256, 128);
        assert_eq!(tight.reserved, 128, "half of 256");
        assert_eq!(tight.ingress_cap, 128);
    }
}

//! What a reload changes, described as data before anything is applied.
//!
//! Most settings apply live: rules, host policies, queue concurrency and retry schedules, edge
//! limits, the admin token. A few are fixed when the process starts (the addresses it listens
//! on, the store it opened, its ingress event loops). A reload that changes one of those keeps
//! running on the value it started with and reports the key as needing a restart; the report
//! compares with the values the process *runs with*, not with the previous file, so reverting
//! the change clears it.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{Settings, StoreSettings};

/// The settings that only a restart applies, as the process started with them.
#[derive(Debug, Clone, PartialEq)]
pub struct StartupSettings {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    store: StoreSettings,
    ingress_threads: usize,
}

impl StartupSettings {
    /// What `settings` fixes at start.
    pub fn of(settings: &Settings) -> Self {
        Self {
            listen: settings.listen,
            admin_listen: settings.admin_listen,
            store: settings.store.clone(),
            ingress_threads: settings.ingress_threads,
        }
    }
}

/// What replacing the running settings with new ones changes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SettingsDiff {
    /// Keys whose new value differs from the one the process runs with; they apply on restart.
    pub needs_restart: Vec<&'static str>,
    /// Queues whose worker count changes live: (queue, from, to).
    pub concurrency: Vec<(Arc<str>, u32, u32)>,
}

/// The diff from `running` (started as `startup`) to `new`.
pub fn diff(startup: &StartupSettings, running: &Settings, new: &Settings) -> SettingsDiff {
    let mut needs_restart = Vec::new();
    let fixed = StartupSettings::of(new);
    if fixed.listen != startup.listen {
        needs_restart.push("listen");
    }
    if fixed.admin_listen != startup.admin_listen {
        needs_restart.push("admin_listen");
    }
    if fixed.store != startup.store {
        needs_restart.push("store");
    }
    if fixed.ingress_threads != startup.ingress_threads {
        needs_restart.push("ingress.threads");
    }
    let mut queues: Vec<Arc<str>> = new
        .rules
        .rules()
        .iter()
        .map(|r| r.queue.clone())
        .chain(std::iter::once(Arc::<str>::from("default")))
        .collect();
    queues.sort();
    queues.dedup();
    let concurrency = queues
        .into_iter()
        .filter_map(|q| {
            let from = running.queues.for_queue(&q).concurrency;
            let to = new.queues.for_queue(&q).concurrency;
            (from != to).then_some((q, from, to))
        })
        .collect();
    SettingsDiff {
        needs_restart,
        concurrency,
    }
}

//! What every long-running task is handed: the settings and hosts in force, the store and its
//! wake-up, and the targets a `410 Gone` turned off.
//!
//! The server builds one [`Context`] at start and gives an `Arc` of it to the dispatcher, the
//! delivery workers and the admin API; none of them reaches into another for shared state.
//! Reload replaces the snapshot here ([`Context::reload`]), so all of them see a new rule
//! table, and the hosts built for it, in the same atomic step.
//!
//! The snapshot is an `ArcSwap` rather than a `watch` channel: a dispatch reads it once per
//! request on the hot path, and `ArcSwap::load` is a lock-free pointer read where
//! `watch::Receiver::borrow` takes a read lock. Nobody waits for a change, which is what a
//! channel would add.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::clock::now_ms;
use crate::config::diff::StartupSettings;
use crate::config::Settings;
use crate::queue::{Store, Wakeup};
use crate::upstream::breaker::CloseHook;
use crate::upstream::{Host, HostMap};

/// The rules, settings and hosts in force, swapped as one: a dispatch that loaded it finds
/// every host its rules name, built with the same settings, however many reloads happen
/// meanwhile.
#[derive(Debug)]
pub struct Snapshot {
    pub settings: Arc<Settings>,
    /// One host per rule target, with the policy of `settings`.
    pub hosts: Arc<HostMap>,
    pub loaded_at_ms: i64,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub content_hash: String,
    pub rules: usize,
    /// Settings that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The state shared by dispatch, delivery and the admin API.
pub struct Context {
    snapshot: ArcSwap<Snapshot>,
    /// Hosts no rule names any more, made on demand for events queued before a reload changed
    /// their rule's target ([`Context::host`]); rebuilt with the new policy at each reload.
    orphan_hosts: ArcSwap<HostMap>,
    store: Arc<dyn Store>,
    wakeup: Wakeup,
    disabled: DisabledTargets,
    /// Given to every host's breaker: sends the host's key when a probe closes it.
    on_close: CloseHook,
    /// The other end, taken once by the delivery workers (they make the deferred events due).
    closes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Arc<str>>>>,
    /// What only a restart changes, as this process started; reloads are compared with it.
    startup: StartupSettings,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// The context of a process running `settings` on `store`.
    pub fn new(settings: Settings, store: Arc<dyn Store>) -> Arc<Self> {
        let (close_tx, close_rx) = tokio::sync::mpsc::unbounded_channel();
        // Unbounded, but it carries one host key per breaker close: transitions, not calls.
        let on_close: CloseHook = Arc::new(move |host: &Arc<str>| {
            let _ = close_tx.send(host.clone());
        });
        let hosts = build_hosts(&settings, &HostMap::new(), &on_close);
        let startup = StartupSettings::of(&settings);
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                settings: Arc::new(settings),
                hosts: Arc::new(hosts),
                loaded_at_ms: now_ms(),
            }),
            orphan_hosts: ArcSwap::from_pointee(HostMap::new()),
            store,
            wakeup: Wakeup::default(),
            disabled: DisabledTargets::default(),
            on_close,
            closes: Mutex::new(Some(close_rx)),
            startup,
        })
    }

    /// The rules, settings and hosts in force (one atomic load).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Wakes idle delivery workers when something made an event due.
    pub fn wakeup(&self) -> &Wakeup {
        &self.wakeup
    }

    /// The targets that answered 410 Gone.
    pub fn disabled(&self) -> &DisabledTargets {
        &self.disabled
    }

    /// The stream of breaker closes (host keys), for the one task that acts on them; `None`
    /// once taken.
    pub fn take_breaker_closes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Arc<str>>> {
        self.closes.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Every host, with its gate and breaker: those the rules name and those made for events
    /// queued before a reload changed their target.
    pub fn hosts(&self) -> Arc<HostMap> {
        let snapshot = self.snapshot.load();
        let orphans = self.orphan_hosts.load();
        if orphans.is_empty() {
            return snapshot.hosts.clone();
        }
        let mut all = HostMap::clone(&snapshot.hosts);
        for (key, host) in orphans.iter() {
            all.entry(key.clone()).or_insert_with(|| host.clone());
        }
        Arc::new(all)
    }

    /// The host for `key`, created with the current policy if no rule names it any more
    /// (an event queued before a reload changed its rule's target).
    pub fn host(&self, key: &str) -> Arc<Host> {
        let snapshot = self.snapshot.load();
        if let Some(h) = snapshot.hosts.get(key) {
            return h.clone();
        }
        if let Some(h) = self.orphan_hosts.load().get(key) {
            return h.clone();
        }
        let policy = snapshot.settings.hosts.for_host(key).clone();
        let tls = &snapshot.settings.tls;
        let key: Arc<str> = key.into();
        let mut created = None;
        self.orphan_hosts.rcu(|map| {
            let mut map = HostMap::clone(map);
            let host = map
                .entry(key.clone())
                .or_insert_with(|| {
                    Host::new(key.clone(), &policy, tls, Some(self.on_close.clone()))
                })
                .clone();
            created = Some(host);
            map
        });
        // rcu ran the closure at least once, so `created` is set.
        created.unwrap_or_else(|| Host::new(key, &policy, tls, Some(self.on_close.clone())))
    }

    /// Replaces the running settings with `new` (already validated and compiled): what
    /// [`crate::config::diff`] finds live-changeable is applied by publishing one new snapshot
    /// (queue concurrency included: the delivery loops read it each round); the rest is
    /// reported as needing a restart. Re-enables every target a 410 turned off.
    pub fn reload(&self, new: Settings) -> ReloadReport {
        let old = self.snapshot.load_full();
        let diff = crate::config::diff::diff(&self.startup, &old.settings, &new);
        for (queue, from, to) in &diff.concurrency {
            tracing::info!(%queue, from, to, "queue concurrency changes live");
        }
        // Existing hosts keep their pools, breakers and counters under the new policy.
        let hosts = build_hosts(&new, &self.hosts(), &self.on_close);
        // Orphans a rule names again moved into `hosts`; the rest take the new policy too.
        let orphans: HostMap = self
            .orphan_hosts
            .load()
            .iter()
            .filter(|(key, _)| !hosts.contains_key(*key))
            .map(|(key, host)| {
                let policy = new.hosts.for_host(key);
                (key.clone(), host.with_policy(policy, &new.tls))
            })
            .collect();
        let report = ReloadReport {
            content_hash: new.content_hash.clone(),
            rules: new.rules.len(),
            needs_restart: diff.needs_restart,
        };
        self.orphan_hosts.store(Arc::new(orphans));
        self.snapshot.store(Arc::new(Snapshot {
            settings: Arc::new(new),
            hosts: Arc::new(hosts),
            loaded_at_ms: now_ms(),
        }));
        self.disabled.enable_all();
        report
    }
}

/// Targets that answered `410 Gone`: not delivered to until a reload or an admin action.
#[derive(Debug, Default)]
pub struct DisabledTargets(Mutex<HashSet<String>>);

impl DisabledTargets {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a 410 disabled `target`.
    pub fn contains(&self, target: &str) -> bool {
        self.set().contains(target)
    }

    /// Marks `target` disabled (it answered 410 Gone).
    pub fn disable(&self, target: &str) {
        tracing::warn!(
            target_url = %crate::secret::redact_url(target),
            "target answered 410 Gone; disabled until reload or admin re-enable"
        );
        self.set().insert(target.to_string());
    }

    /// Re-enables every disabled target; returns them, redacted for showing.
    pub fn enable_all(&self) -> Vec<String> {
        self.set()
            .drain()
            .map(|t| crate::secret::redact_url(&t))
            .collect()
    }

    /// Targets currently disabled, redacted for showing (the set keeps the stored URLs).
    pub fn list(&self) -> Vec<String> {
        self.set()
            .iter()
            .map(|t| crate::secret::redact_url(t))
            .collect()
    }
}

/// Hosts for every rule target under the new settings, reusing what `old` already has.
fn build_hosts(settings: &Settings, old: &HostMap, on_close: &CloseHook) -> HostMap {
    let mut hosts = HostMap::new();
    for rule in settings.rules.rules() {
        let key = &rule.target.host;
        let policy = settings.hosts.for_host(key);
        let host = match old.get(key) {
            Some(existing) => existing.with_policy(policy, &settings.tls),
            None => Host::new(key.clone(), policy, &settings.tls, Some(on_close.clone())),
        };
        hosts.insert(key.clone(), host);
    }
    hosts
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::queue::sqlite::{SqliteOptions, SqliteStore};

    fn settings(max_connections: u32, targets: &[&str]) -> Settings {
        let rules: String = targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("  - event_type: e{i}\n    mode: async\n    target: {t}\n"))
            .collect();
        let yaml = format!(
            "signing:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nhosts:\n  default:\n    max_connections: {max_connections}\nrouting_rules:\n{rules}"
        );
        crate::config::load_from_bytes(Path::new("t.yaml"), yaml.as_bytes()).unwrap()
    }

    /// Rules and hosts are one snapshot: a reload that adds a target publishes its host with
    /// it, a snapshot taken before keeps its own hosts, and a host no rule names any more
    /// (kept for queued events) takes the new policy.
    #[test]
    fn a_reload_swaps_rules_and_hosts_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), SqliteOptions::default()).unwrap();
        let ctx = Context::new(settings(8, &["http://a.test:1/"]), Arc::new(store));
        let before = ctx.snapshot();
        let orphan = ctx.host("gone.test:1");
        assert_eq!(orphan.gate.max_connections(), 8);

        ctx.reload(settings(16, &["http://a.test:1/", "http://b.test:2/"]));
        let after = ctx.snapshot();
        assert!(
            after.hosts.contains_key("b.test:2"),
            "the new target's host"
        );
        assert!(
            !before.hosts.contains_key("b.test:2"),
            "the old snapshot is unchanged"
        );
        assert_eq!(after.hosts["a.test:1"].gate.max_connections(), 16);
        assert_eq!(ctx.host("gone.test:1").gate.max_connections(), 16);
        let all = ctx.hosts();
        assert!(["a.test:1", "b.test:2", "gone.test:1"]
            .iter()
            .all(|k| all.contains_key(*k)));
    }

    #[test]
    fn a_reload_re_enables_the_targets_a_410_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("q.db"), SqliteOptions::default()).unwrap();
        let ctx = Context::new(settings(8, &["http://a.test:1/"]), Arc::new(store));
        ctx.disabled().disable("http://u:pw@a.test:1/");
        assert!(ctx.disabled().contains("http://u:pw@a.test:1/"));
        assert_eq!(ctx.disabled().list(), vec!["http://***@a.test:1/"]);
        ctx.reload(settings(8, &["http://a.test:1/"]));
        assert!(!ctx.disabled().contains("http://u:pw@a.test:1/"));
    }
}

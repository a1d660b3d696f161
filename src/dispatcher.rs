//! The dispatcher: routes an [`Event`] to the sync pipeline or the durable queue.
//!
//! This is the library's front door; the HTTP ingress is a thin adapter over
//! [`Dispatcher::dispatch`]. The rules are held in one `ArcSwap` snapshot: each dispatch takes
//! one atomic load and finishes under the rules it started with, however many reloads happen
//! meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderMap;
use serde::Serialize;

use crate::clock::now_ms;
use crate::config::{Settings, StoreSettings};
use crate::queue::{EnqueueOutcome, FallbackReason, IdempotencyClaim, NewEvent, Store, StoreError};
use crate::routing::{DeliveryMode, OrderingKeyError, Rule};
use crate::sync::breaker::CloseHook;
use crate::sync::{self, Envelope, Host, HostMap, SyncFailure, UpstreamResponse};

/// An event handed to hookyard by a service.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_type: String,
    /// Delivered unchanged and signed as received.
    pub body: Bytes,
    pub content_type: Option<String>,
    pub trace_id: String,
    pub idempotency_key: Option<String>,
}

/// What became of a dispatched event.
#[derive(Debug)]
pub enum Outcome {
    /// Sync: the target answered 2xx-4xx; relay it.
    Relayed {
        event_id: String,
        response: UpstreamResponse,
    },
    /// Async: durable, will be delivered.
    Accepted { event_id: String },
    /// Sync failed and fell back to async: durable, will be delivered.
    Queued {
        event_id: String,
        reason: FallbackReason,
    },
    /// The idempotency key was seen inside the window; nothing new was stored.
    Duplicate { event_id: String },
    /// Sync failed and the rule has no fallback.
    Failed {
        event_id: String,
        failure: SyncFailure,
    },
    /// No rule matches and there is no `*` rule.
    NoRoute { event_type: String },
    /// The queue is at `max_depth`.
    QueueFull { queue: Arc<str> },
    /// The rule orders events by a key this event does not carry (or carries malformed);
    /// nothing was stored.
    InvalidOrderingKey(OrderingKeyError),
    /// The store could not confirm the event durable; nothing was promised.
    StoreUnavailable {
        /// The id the event was given (and, when the outcome is unknown, may be stored under).
        event_id: String,
        reason: String,
        /// The write was sent but its result never came back: the event may be stored, and is
        /// then delivered. A retry with the same `Idempotency-Key` is deduplicated against it.
        /// `false`: nothing was stored, a retry is safe.
        outcome_unknown: bool,
    },
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub content_hash: String,
    pub rules: usize,
    /// Settings that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

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

/// Routes events and owns the per-host machinery and the store.
pub struct Dispatcher {
    snapshot: ArcSwap<Snapshot>,
    /// Hosts no rule names any more, made on demand for events queued before a reload changed
    /// their rule's target (`Dispatcher::host`); rebuilt with the new policy at each reload.
    orphan_hosts: ArcSwap<HostMap>,
    store: Arc<dyn Store>,
    /// Targets that answered 410 Gone: not delivered to until a reload or an admin action.
    disabled_targets: Mutex<HashSet<String>>,
    /// Wakes the delivery workers when an event is enqueued.
    pub(crate) enqueued: tokio::sync::Notify,
    /// Given to every host's breaker: sends the host's key when a probe closes it.
    on_close: CloseHook,
    /// The other end, taken once by the delivery workers (they make the deferred events due).
    closes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Arc<str>>>>,
    /// What only a restart changes, as this process started; reloads are compared with it.
    startup: crate::config::diff::StartupSettings,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// Opening the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open store: {0}")]
    Store(#[from] StoreError),
    #[error("store kind {0} is not available in this build")]
    Unsupported(&'static str),
}

/// Opens the store the settings name.
pub async fn open_store(settings: &StoreSettings) -> Result<Arc<dyn Store>, StartError> {
    match settings {
        StoreSettings::Sqlite {
            path,
            fsync,
            max_size_bytes,
        } => {
            let options = crate::queue::sqlite::SqliteOptions {
                fsync: *fsync,
                max_size_bytes: *max_size_bytes,
                ..Default::default()
            };
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || {
                crate::queue::sqlite::SqliteStore::open(&path, options)
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            Ok(Arc::new(store))
        }
        StoreSettings::Redis {
            url,
            key_prefix,
            claim_idle_ms,
            wait_replicas,
            wait_timeout_ms,
        } => {
            let options = crate::queue::redis::RedisOptions {
                key_prefix: key_prefix.clone(),
                claim_idle_ms: *claim_idle_ms,
                wait_replicas: *wait_replicas,
                wait_timeout_ms: *wait_timeout_ms,
                ..Default::default()
            };
            let store = crate::queue::redis::RedisStore::open(url.expose(), options).await?;
            Ok(Arc::new(store))
        }
    }
}

/// A new event id: `evt_` + a ULID (time-ordered, so ids sort by arrival).
pub fn new_event_id() -> String {
    const PREFIX: &str = "evt_";
    let mut ulid = [0u8; ulid::ULID_LEN];
    let mut id = String::with_capacity(PREFIX.len() + ulid::ULID_LEN);
    id.push_str(PREFIX);
    id.push_str(ulid::Ulid::new().array_to_str(&mut ulid));
    id
}

impl Dispatcher {
    /// A dispatcher running `settings` on `store`.
    pub fn new(settings: Settings, store: Arc<dyn Store>) -> Arc<Self> {
        let (close_tx, close_rx) = tokio::sync::mpsc::unbounded_channel();
        // Unbounded, but it carries one host key per breaker close: transitions, not calls.
        let on_close: CloseHook = Arc::new(move |host: &Arc<str>| {
            let _ = close_tx.send(host.clone());
        });
        let hosts = build_hosts(&settings, &HostMap::new(), &on_close);
        let startup = crate::config::diff::StartupSettings::of(&settings);
        Arc::new(Self {
            on_close,
            closes: Mutex::new(Some(close_rx)),
            snapshot: ArcSwap::from_pointee(Snapshot {
                settings: Arc::new(settings),
                hosts: Arc::new(hosts),
                loaded_at_ms: now_ms(),
            }),
            orphan_hosts: ArcSwap::from_pointee(HostMap::new()),
            startup,
            store,
            disabled_targets: Mutex::new(HashSet::new()),
            enqueued: tokio::sync::Notify::new(),
        })
    }

    /// Opens the store named in `settings` and builds a dispatcher on it.
    pub async fn from_config(settings: Settings) -> Result<Arc<Self>, StartError> {
        let store = open_store(&settings.store).await?;
        Ok(Self::new(settings, store))
    }

    /// The rules and settings in force (one atomic load).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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

    /// Replaces the running settings with `new` (already validated and compiled).
    /// Settings that cannot change live are kept and reported.
    pub fn reload(&self, new: Settings) -> ReloadReport {
        let old = self.snapshot.load_full();
        let diff = crate::config::diff::diff(&self.startup, &old.settings, &new);
        for (queue, from, to) in &diff.concurrency {
            tracing::info!(%queue, from, to, "queue concurrency changes live");
        }
        let needs_restart = diff.needs_restart;
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
            needs_restart,
        };
        self.orphan_hosts.store(Arc::new(orphans));
        self.snapshot.store(Arc::new(Snapshot {
            settings: Arc::new(new),
            hosts: Arc::new(hosts),
            loaded_at_ms: now_ms(),
        }));
        self.disabled_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        report
    }

    /// True when a 410 disabled `target`.
    pub fn is_disabled(&self, target: &str) -> bool {
        self.disabled_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(target)
    }

    /// Marks `target` disabled (it answered 410 Gone).
    pub fn disable(&self, target: &str) {
        tracing::warn!(
            target_url = %crate::secret::redact_url(target),
            "target answered 410 Gone; disabled until reload or admin re-enable"
        );
        self.disabled_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.to_string());
    }

    /// Re-enables every disabled target; returns them, redacted for showing.
    pub fn enable_all(&self) -> Vec<String> {
        self.disabled_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|t| crate::secret::redact_url(&t))
            .collect()
    }

    /// Targets currently disabled, redacted for showing (the set keeps the stored URLs).
    pub fn disabled(&self) -> Vec<String> {
        self.disabled_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| crate::secret::redact_url(t))
            .collect()
    }

    /// Routes and delivers (sync) or enqueues (async) one event under the rules in force.
    pub async fn dispatch(&self, event: Event) -> Outcome {
        self.dispatch_under(&self.snapshot(), event, &HeaderMap::new())
            .await
    }

    /// Like [`Dispatcher::dispatch`], under a snapshot the caller already holds (ingress takes
    /// one per request, so body limit and routing come from the same rules). `headers` are the
    /// caller's request headers, read only for a rule's `ordering_key: header:<Name>`.
    pub async fn dispatch_under(
        &self,
        snapshot: &Snapshot,
        event: Event,
        headers: &HeaderMap,
    ) -> Outcome {
        let settings = &snapshot.settings;
        let Some(rule) = settings.rules.route(&event.event_type).cloned() else {
            crate::metrics::event_unrouted();
            return Outcome::NoRoute {
                event_type: event.event_type,
            };
        };
        let outcome = match rule.mode {
            DeliveryMode::Async => {
                let ordering_key = match &rule.ordering_key {
                    None => Ok(None),
                    Some(source) => source.extract(headers, &event.body).map(Some),
                };
                match ordering_key {
                    Ok(key) => {
                        self.enqueue(&rule, settings, event, new_event_id(), None, key)
                            .await
                    }
                    Err(e) => Outcome::InvalidOrderingKey(e),
                }
            }
            // Boxed: the sync call's state is over 2 KiB, and every future that awaits it
            // inline (up to hyper's per-request service future) would grow and be copied by
            // that much on each request; one allocation is cheaper.
            DeliveryMode::Sync => Box::pin(self.dispatch_sync(&rule, snapshot, event)).await,
        };
        rule.metrics.received(&rule, outcome_label(&outcome));
        outcome
    }

    async fn dispatch_sync(&self, rule: &Arc<Rule>, snapshot: &Snapshot, event: Event) -> Outcome {
        let settings = &snapshot.settings;
        let event_id = new_event_id();
        let envelope = Envelope {
            event_id,
            event_type: event.event_type,
            body: event.body,
            content_type: event.content_type,
            trace_id: event.trace_id,
            idempotency_key: event.idempotency_key,
            signature: rule.signature,
            ordering: None,
        };
        // Every rule's target has its host in the same snapshot as the rule.
        let host = match snapshot.hosts.get(&rule.target.host) {
            Some(host) => host.clone(),
            None => self.host(&rule.target.host),
        };
        let result = sync::deliver(&host, rule, &envelope, &settings.signer).await;
        // The reason a failure may fall back for; `None` also when the target has the event.
        let fallback = match &result {
            Err(failure) if rule.fallback_to_async => failure.fallback_reason(),
            _ => None,
        };
        match (result, fallback) {
            (Ok(response), _) => Outcome::Relayed {
                event_id: envelope.event_id,
                response,
            },
            (Err(failure), Some(reason)) => {
                tracing::warn!(
                    event_id = %envelope.event_id,
                    trace_id = %envelope.trace_id,
                    event_type = %envelope.event_type,
                    host = %rule.target.host,
                    reason = reason.as_str(),
                    error = %failure,
                    "sync delivery failed; falling back to async"
                );
                let Envelope {
                    event_id,
                    event_type,
                    body,
                    content_type,
                    trace_id,
                    idempotency_key,
                    ..
                } = envelope;
                let event = Event {
                    event_type,
                    body,
                    content_type,
                    trace_id,
                    idempotency_key,
                };
                // A sync rule has no ordering key: a fallback is delivered unordered.
                let outcome = self
                    .enqueue(rule, settings, event, event_id, Some(reason), None)
                    .await;
                if matches!(outcome, Outcome::Queued { .. }) {
                    crate::metrics::fallback(reason.as_str());
                }
                outcome
            }
            (Err(failure), None) => Outcome::Failed {
                event_id: envelope.event_id,
                failure,
            },
        }
    }

    async fn enqueue(
        &self,
        rule: &Rule,
        settings: &Settings,
        event: Event,
        event_id: String,
        fallback: Option<FallbackReason>,
        ordering_key: Option<String>,
    ) -> Outcome {
        let now = now_ms();
        let claim = event.idempotency_key.as_ref().map(|key| IdempotencyClaim {
            event_type: event.event_type.clone(),
            key: key.clone(),
            expires_at_ms: now + settings.idempotency_window.as_millis() as i64,
        });
        let queue_policy = settings.queues.for_queue(&rule.queue);
        let new = NewEvent {
            id: event_id.clone(),
            event_type: event.event_type,
            queue: rule.queue.to_string(),
            // Stored whole (credentials too): a retry hours later must still authenticate.
            target: rule.target.url.expose().to_string(),
            body: event.body,
            content_type: event.content_type,
            trace_id: event.trace_id,
            idempotency_key: event.idempotency_key,
            signature: rule.signature,
            timeout_ms: rule.timeout.as_millis() as u64,
            retry_delays_ms: rule.retry_delays_ms.to_vec(),
            jitter: rule.jitter,
            received_at_ms: now,
            due_at_ms: now,
            fallback,
            ordering_key,
        };
        match self.store.enqueue(new, claim, queue_policy.max_depth).await {
            Ok(EnqueueOutcome::Accepted) => {
                self.enqueued.notify_waiters();
                match fallback {
                    Some(reason) => Outcome::Queued { event_id, reason },
                    None => Outcome::Accepted { event_id },
                }
            }
            Ok(EnqueueOutcome::Duplicate { event_id }) => Outcome::Duplicate { event_id },
            Ok(EnqueueOutcome::QueueFull) => Outcome::QueueFull {
                queue: rule.queue.clone(),
            },
            Err(e) => {
                let outcome_unknown = matches!(e, StoreError::OutcomeUnknown(_));
                tracing::error!(event_id = %event_id, error = %e, outcome_unknown, "could not store event; answering 503");
                Outcome::StoreUnavailable {
                    event_id,
                    reason: e.to_string(),
                    outcome_unknown,
                }
            }
        }
    }
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Relayed { response, .. } if response.status.is_success() => "delivered",
        Outcome::Relayed { .. } => "relayed_error",
        Outcome::Accepted { .. } => "accepted",
        Outcome::Queued { .. } => "fallback",
        Outcome::Duplicate { .. } => "duplicate",
        Outcome::Failed { .. } => "failed",
        Outcome::NoRoute { .. } => "no_route",
        Outcome::QueueFull { .. } => "queue_full",
        Outcome::StoreUnavailable { .. } => "store_unavailable",
        Outcome::InvalidOrderingKey(_) => "rejected",
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

/// How long a worker may hold an event before another may take it: the attempt's deadline
/// plus a margin for signing and bookkeeping.
pub fn lease_for(timeout: Duration) -> Duration {
    timeout + Duration::from_secs(5)
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
        let d = Dispatcher::new(settings(8, &["http://a.test:1/"]), Arc::new(store));
        let before = d.snapshot();
        let orphan = d.host("gone.test:1");
        assert_eq!(orphan.gate.max_connections(), 8);

        d.reload(settings(16, &["http://a.test:1/", "http://b.test:2/"]));
        let after = d.snapshot();
        assert!(
            after.hosts.contains_key("b.test:2"),
            "the new target's host"
        );
        assert!(
            !before.hosts.contains_key("b.test:2"),
            "the old snapshot is unchanged"
        );
        assert_eq!(after.hosts["a.test:1"].gate.max_connections(), 16);
        assert_eq!(d.host("gone.test:1").gate.max_connections(), 16);
        let all = d.hosts();
        assert!(["a.test:1", "b.test:2", "gone.test:1"]
            .iter()
            .all(|k| all.contains_key(*k)));
    }
}

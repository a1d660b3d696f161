//! Dispatch: route an [`Event`] to the sync relay or the durable queue, and say what became of
//! it ([`Outcome`]). Nothing else: the shared state it reads (rules, hosts, store) is the
//! [`Context`], and what happens after an enqueue is the delivery workers' business.
//!
//! This is the library's front door; the HTTP ingress is a thin adapter over
//! [`Dispatcher::dispatch_under`]. A dispatch finishes under the snapshot it started with,
//! however many reloads happen meanwhile.

use std::sync::Arc;

use http::HeaderMap;

use crate::clock::now_ms;
use crate::config::Settings;
use crate::context::{Context, Snapshot};
use crate::event::{DeliveryMode, Event, FallbackReason};
use crate::queue::{EnqueueOutcome, IdempotencyClaim, NewEvent, StoreError};
use crate::relay::{self, SyncFailure};
use crate::routing::{OrderingKeyError, Rule};
use crate::upstream::{Envelope, UpstreamResponse};

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

/// Routes events under the rules in force.
#[derive(Debug)]
pub struct Dispatcher {
    ctx: Arc<Context>,
}

impl Dispatcher {
    /// A dispatcher over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Self { ctx })
    }

    /// Opens the store named in `settings` and builds a dispatcher (and its context) on it.
    pub async fn from_config(settings: Settings) -> Result<Arc<Self>, StoreError> {
        let store = crate::queue::open(&settings.store).await?;
        Ok(Self::new(Context::new(settings, store)))
    }

    /// The state this dispatcher routes with, to hand to the workers and the admin API.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Routes and delivers (sync) or enqueues (async) one event under the rules in force.
    pub async fn dispatch(&self, event: Event) -> Outcome {
        self.dispatch_under(&self.ctx.snapshot(), event, &HeaderMap::new())
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
                    Ok(key) => self.enqueue(&rule, settings, event, None, key).await,
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
        let envelope = Envelope {
            event: &event,
            signature: rule.signature,
            ordering: None,
        };
        // Every rule's target has its host in the same snapshot as the rule.
        let host = match snapshot.hosts.get(&rule.target.host) {
            Some(host) => host.clone(),
            None => self.ctx.host(&rule.target.host),
        };
        let result = relay::deliver(&host, rule, &envelope, &settings.signer).await;
        // The reason a failure may fall back for; `None` also when the target has the event.
        let fallback = match &result {
            Err(failure) if rule.fallback_to_async => failure.fallback_reason(),
            _ => None,
        };
        match (result, fallback) {
            (Ok(response), _) => Outcome::Relayed {
                event_id: event.id,
                response,
            },
            (Err(failure), Some(reason)) => {
                tracing::warn!(
                    event_id = %event.id,
                    trace_id = %event.trace_id,
                    event_type = %event.event_type,
                    host = %rule.target.host,
                    reason = reason.as_str(),
                    error = %failure,
                    "sync delivery failed; falling back to async"
                );
                // The same event, id included: the receiver deduplicates a late sync
                // delivery against the queued one.
                // A sync rule has no ordering key: a fallback is delivered unordered.
                let outcome = self
                    .enqueue(rule, settings, event, Some(reason), None)
                    .await;
                if matches!(outcome, Outcome::Queued { .. }) {
                    crate::metrics::fallback(reason.as_str());
                }
                outcome
            }
            (Err(failure), None) => Outcome::Failed {
                event_id: event.id,
                failure,
            },
        }
    }

    async fn enqueue(
        &self,
        rule: &Rule,
        settings: &Settings,
        event: Event,
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
        let event_id = event.id.clone();
        let new = NewEvent {
            event,
            queue: rule.queue.to_string(),
            // Stored whole (credentials too): a retry hours later must still authenticate.
            target: rule.target.url.expose().to_string(),
            signature: rule.signature,
            timeout_ms: rule.timeout.as_millis() as u64,
            retry_delays_ms: rule.retry_delays_ms.to_vec(),
            jitter: rule.jitter,
            received_at_ms: now,
            due_at_ms: now,
            fallback,
            ordering_key,
        };
        let stored = self
            .ctx
            .store()
            .enqueue(new, claim, queue_policy.max_depth)
            .await;
        match stored {
            Ok(EnqueueOutcome::Accepted) => {
                self.ctx.wakeup().notify();
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

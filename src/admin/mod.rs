//! The admin HTTP API: metrics, health, config and reload, event history, DLQ, fallbacks,
//! circuits.
//!
//! It binds to loopback by default; with `admin.token` set, every request must carry
//! `Authorization: Bearer <token>` (compared in constant time) or gets 401 and changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::clock::{now_ms, parse_rfc3339};
use crate::context::Context;
use crate::httpserver::{json, BodyBudget, Handler};
use crate::queue::DlqFilter;
use crate::reload::Reloader;

pub mod jobs;
pub mod openapi;

use jobs::{Jobs, Selection};

/// Largest admin request body (bulk replay filters and id lists).
const MAX_ADMIN_BODY: usize = 1024 * 1024;
/// Default and largest page size of list endpoints.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The admin request handler.
pub struct Admin {
    ctx: Arc<Context>,
    reloader: Arc<Reloader>,
    metrics: PrometheusHandle,
    /// The ingress body budget, read at scrape time.
    body_budget: Arc<BodyBudget>,
    /// Bulk replays running in the background, and recently finished ones.
    jobs: Arc<Jobs>,
}

impl Admin {
    /// An admin API over the running `ctx`.
    pub fn new(
        ctx: Arc<Context>,
        reloader: Arc<Reloader>,
        metrics: PrometheusHandle,
        body_budget: Arc<BodyBudget>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            reloader,
            metrics,
            body_budget,
            jobs: Arc::default(),
        })
    }
}

fn bad_request(reason: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        &json!({"error": "bad_request", "reason": reason.into()}),
    )
}

fn not_found(reason: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        &json!({"error": "not_found", "reason": reason.into()}),
    )
}

fn store_error(e: crate::queue::StoreError) -> Response<Full<Bytes>> {
    if let crate::queue::StoreError::InvalidInput(reason) = e {
        return bad_request(reason);
    }
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "store_unavailable", "reason": e.to_string()}),
    )
}

fn ok(value: Value) -> Response<Full<Bytes>> {
    json(StatusCode::OK, &value)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use hmac::Mac;
    // Comparing MACs of both values under a per-process key hides even the length.
    let key: [u8; 32] = rand::random();
    let mac = |v: &[u8]| {
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
            .expect("HMAC accepts keys of any length");
        m.update(v);
        m
    };
    let expected_tag = mac(expected).finalize().into_bytes();
    mac(given).verify_slice(&expected_tag).is_ok()
}

/// The query string's pairs, decoded as a form (`+` is a space, `%XX` a byte); for a key
/// given twice the last wins.
fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// A time in a query: RFC 3339 or unix milliseconds.
fn parse_time(v: &str) -> Result<i64, String> {
    v.parse::<i64>()
        .or_else(|_| parse_rfc3339(v))
        .map_err(|_| format!("{v:?} is not an RFC 3339 time or unix milliseconds"))
}

fn dlq_filter(q: &HashMap<String, String>) -> Result<DlqFilter, String> {
    Ok(DlqFilter {
        event_type: q.get("event_type").cloned(),
        queue: q.get("queue").cloned(),
        since_ms: q.get("since").map(|v| parse_time(v)).transpose()?,
        until_ms: q.get("until").map(|v| parse_time(v)).transpose()?,
    })
}

fn page_limit(q: &HashMap<String, String>) -> Result<usize, String> {
    match q.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| format!("limit must be 1..={MAX_PAGE}")),
    }
}

/// Body of `POST /v1/dlq/replay`: explicit ids, or a filter.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BulkReplay {
    /// Replay these event ids (not with a filter).
    ids: Option<Vec<String>>,
    event_type: Option<String>,
    queue: Option<String>,
    /// Dead-lettered at or after (RFC 3339 or unix ms).
    since: Option<String>,
    /// Dead-lettered before (RFC 3339 or unix ms).
    until: Option<String>,
    /// Must be true to replay every dead letter with no filter at all.
    all: Option<bool>,
}

impl Handler for Admin {
    fn request_timeout(&self) -> Duration {
        self.ctx.snapshot().settings.edge.request_timeout
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> Response<Full<Bytes>> {
        let settings = self.ctx.snapshot().settings.clone();
        let open = match request.uri().path() {
            // A kubelet's probes cannot send a token; they say nothing a caller could abuse.
            "/healthz" | "/readyz" => true,
            "/metrics" => !settings.token_protects_metrics,
            _ => false,
        };
        if let Some(token) = settings.admin_token.as_ref().filter(|_| !open) {
            let given = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !token_matches(given.as_bytes(), token.expose().as_bytes()) {
                let mut r = json(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "unauthorized", "reason": "missing or wrong bearer token"}),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        self.route(request, deadline).await
    }
}

/// Every admin endpoint. [`Endpoint::of`] is the route table; `openapi.rs` documents each
/// variant (an exhaustive match there), so a route cannot be served without being documented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Metrics,
    Healthz,
    Readyz,
    Config,
    Reload,
    Event,
    ListDlq,
    BulkReplay,
    ReplayOne,
    Job,
    Fallbacks,
    Circuits,
    EnableTargets,
}

impl Endpoint {
    /// Every endpoint (a test checks none is missing).
    pub const ALL: [Endpoint; 13] = [
        Endpoint::Metrics,
        Endpoint::Healthz,
        Endpoint::Readyz,
        Endpoint::Config,
        Endpoint::Reload,
        Endpoint::Event,
        Endpoint::ListDlq,
        Endpoint::BulkReplay,
        Endpoint::ReplayOne,
        Endpoint::Job,
        Endpoint::Fallbacks,
        Endpoint::Circuits,
        Endpoint::EnableTargets,
    ];

    /// The endpoint served at a path (split on `/`), and its one path parameter if it has one.
    /// Each path is served by one method; others get 405.
    pub fn of<'a>(segments: &[&'a str]) -> Option<(Endpoint, Option<&'a str>)> {
        Some(match segments {
            ["metrics"] => (Endpoint::Metrics, None),
            ["healthz"] => (Endpoint::Healthz, None),
            ["readyz"] => (Endpoint::Readyz, None),
            ["v1", "config"] => (Endpoint::Config, None),
            ["v1", "config", "reload"] => (Endpoint::Reload, None),
            ["v1", "events", id] => (Endpoint::Event, Some(*id)),
            ["v1", "dlq"] => (Endpoint::ListDlq, None),
            ["v1", "dlq", "replay"] => (Endpoint::BulkReplay, None),
            ["v1", "dlq", id, "replay"] => (Endpoint::ReplayOne, Some(*id)),
            ["v1", "jobs", id] => (Endpoint::Job, Some(*id)),
            ["v1", "fallbacks"] => (Endpoint::Fallbacks, None),
            ["v1", "circuits"] => (Endpoint::Circuits, None),
            ["v1", "targets", "enable"] => (Endpoint::EnableTargets, None),
            _ => return None,
        })
    }

    /// The method that serves it.
    pub fn method(self) -> Method {
        match self {
            Endpoint::Reload
            | Endpoint::BulkReplay
            | Endpoint::ReplayOne
            | Endpoint::EnableTargets => Method::POST,
            Endpoint::Metrics
            | Endpoint::Healthz
            | Endpoint::Readyz
            | Endpoint::Config
            | Endpoint::Event
            | Endpoint::ListDlq
            | Endpoint::Job
            | Endpoint::Fallbacks
            | Endpoint::Circuits => Method::GET,
        }
    }
}

impl Admin {
    async fn route(&self, request: Request<Incoming>, deadline: Instant) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = request.method().clone();
        let Some((endpoint, param)) = Endpoint::of(&segments) else {
            return not_found(format!("no admin endpoint {method} {path}"));
        };
        if method != endpoint.method() {
            return method_not_allowed(if endpoint.method() == Method::POST {
                "POST"
            } else {
                "GET"
            });
        }
        let id = param.unwrap_or_default();
        match endpoint {
            Endpoint::Metrics => self.metrics().await,
            Endpoint::Healthz => ok(json!({"status": "ok"})),
            Endpoint::Readyz => match self.ctx.store().ping().await {
                Ok(()) => ok(json!({"status": "ready"})),
                Err(e) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not_ready", "reason": e.to_string()}),
                ),
            },
            Endpoint::Config => self.config(),
            Endpoint::Reload => match self.reloader.reload("api").await {
                Ok(report) => ok(json!({"result": "ok", "report": report})),
                Err(e) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"result": "error", "error": e.summary(), "problems": e.problems}),
                ),
            },
            Endpoint::Event => match self.ctx.store().event(id).await {
                Ok(Some(record)) => ok(json!(record)),
                Ok(None) => not_found(format!("no event {id}")),
                Err(e) => store_error(e),
            },
            Endpoint::ListDlq => self.list_dlq(&request).await,
            Endpoint::BulkReplay => self.bulk_replay(request, deadline).await,
            Endpoint::ReplayOne => {
                let id = id.to_string();
                match self.ctx.store().replay(vec![id.clone()], now_ms()).await {
                    Ok(ids) if ids.is_empty() => {
                        not_found(format!("{id} is not in the dead-letter queue"))
                    }
                    Ok(ids) => {
                        self.ctx.wakeup().notify();
                        ok(json!({"replayed": ids}))
                    }
                    Err(e) => store_error(e),
                }
            }
            Endpoint::Job => match self.jobs.get(id) {
                Some(job) => ok(json!(job)),
                None => not_found(format!(
                    "no job {id} (finished jobs are kept for {} at most)",
                    humantime::format_duration(jobs::KEEP_FINISHED_FOR)
                )),
            },
            Endpoint::Fallbacks => self.fallbacks(&request).await,
            Endpoint::Circuits => self.circuits(),
            Endpoint::EnableTargets => ok(json!({"enabled": self.ctx.disabled().enable_all()})),
        }
    }

    async fn metrics(&self) -> Response<Full<Bytes>> {
        // Queue gauges are read from the store at scrape time, not polled in the background.
        let settings = self.ctx.snapshot().settings.clone();
        let queues = crate::metric_series::configured_queues(&settings);
        crate::metrics::collect_process();
        crate::metrics::body_bytes_buffered(self.body_budget.held());
        let now = now_ms();
        for q in &queues {
            if let Ok(stats) = self.ctx.store().stats(q, now).await {
                crate::metrics::queue_stats(q, &stats);
            }
        }
        for host in self.ctx.hosts().values() {
            crate::metrics::host_gauges(
                &host.key,
                host.gate.in_flight(),
                host.gate.max_connections(),
                host.connections(),
            );
            // Read at scrape time, so a breaker rebuilt by a reload (new thresholds) shows its
            // own state rather than the last transition of the one it replaced.
            crate::metrics::circuit_state(&host.key, host.breaker.state());
        }
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }

    fn config(&self) -> Response<Full<Bytes>> {
        let snapshot = self.ctx.snapshot();
        let s = &snapshot.settings;
        ok(json!({
            "path": s.path,
            "content_hash": s.content_hash,
            "loaded_at_ms": snapshot.loaded_at_ms,
            "loaded_at": crate::clock::rfc3339(snapshot.loaded_at_ms),
            "last_reload": self.reloader.last(),
            "listen": s.listen.to_string(),
            "admin_listen": s.admin_listen.to_string(),
            // The token shows as "***" or null: whether one is set, never what it is.
            "admin": {
                "token": s.admin_token,
                "allow_unauthenticated_remote": s.allow_unauthenticated_remote_admin,
            },
            "store": s.store,
            "hosts": s.hosts,
            "queues": s.queues,
            "rules": s.rules.rules(),
        }))
    }

    async fn list_dlq(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let q = query(request);
        let (filter, limit) = match (dlq_filter(&q), page_limit(&q)) {
            (Ok(f), Ok(l)) => (f, l),
            (Err(e), _) | (_, Err(e)) => return bad_request(e),
        };
        match self
            .ctx
            .store()
            .list_dead_letters(filter, q.get("cursor").cloned(), limit)
            .await
        {
            Ok(page) => ok(json!(page)),
            Err(e) => store_error(e),
        }
    }

    async fn bulk_replay(
        &self,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> Response<Full<Bytes>> {
        let dry_run = match query(&request).get("dry_run").map(String::as_str) {
            None | Some("false") => false,
            Some("true" | "") => true,
            Some(other) => {
                return bad_request(format!("dry_run must be true or false, not {other:?}"))
            }
        };
        let body = Limited::new(request.into_body(), MAX_ADMIN_BODY).collect();
        let body = match tokio::time::timeout_at(deadline, body).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return bad_request(format!("reading body: {e}")),
            Err(_elapsed) => {
                let mut r = json(
                    StatusCode::REQUEST_TIMEOUT,
                    &json!({"error": "request_timeout", "reason": "the body did not arrive within ingress.request_timeout_ms"}),
                );
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return r;
            }
        };
        let req: BulkReplay = if body.is_empty() {
            BulkReplay::default()
        } else {
            match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad_request(format!("invalid JSON: {e}")),
            }
        };
        let selection = if let Some(ids) = req.ids {
            let filtered = req.event_type.is_some()
                || req.queue.is_some()
                || req.since.is_some()
                || req.until.is_some()
                || req.all.is_some();
            if filtered {
                return bad_request("give ids or a filter (or \"all\": true), not both");
            }
            Selection::Ids(ids)
        } else {
            let parse = |v: &Option<String>| v.as_deref().map(parse_time).transpose();
            let filter = match (parse(&req.since), parse(&req.until)) {
                (Ok(since_ms), Ok(until_ms)) => DlqFilter {
                    event_type: req.event_type,
                    queue: req.queue,
                    since_ms,
                    until_ms,
                },
                (Err(e), _) | (_, Err(e)) => return bad_request(e),
            };
            let unfiltered = filter.event_type.is_none()
                && filter.queue.is_none()
                && filter.since_ms.is_none()
                && filter.until_ms.is_none();
            if unfiltered && req.all != Some(true) {
                return bad_request(
                    "give ids, a filter (event_type, queue, since, until), or \"all\": true",
                );
            }
            Selection::Filter(filter)
        };
        match self.jobs.start_replay(self.ctx.clone(), selection, dry_run) {
            Ok(id) => {
                let location = format!("/v1/jobs/{id}");
                let mut r = json(
                    StatusCode::ACCEPTED,
                    &json!({"job_id": id, "state": "running", "dry_run": dry_run, "location": location}),
                );
                if let Ok(v) = http::HeaderValue::from_str(&location) {
                    r.headers_mut().insert(http::header::LOCATION, v);
                }
                r
            }
            Err(jobs::TooManyJobs) => {
                let mut r = json(
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({"error": "too_many_jobs", "reason": format!("{} replay jobs are running already; wait for one to finish", jobs::MAX_RUNNING)}),
                );
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("5"),
                );
                r
            }
        }
    }

    async fn fallbacks(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let q = query(request);
        let since = match q.get("since").map(|v| parse_time(v)).transpose() {
            Ok(s) => s.unwrap_or(0),
            Err(e) => return bad_request(e),
        };
        let limit = match page_limit(&q) {
            Ok(l) => l,
            Err(e) => return bad_request(e),
        };
        match self.ctx.store().fallbacks(since, limit).await {
            Ok(items) => ok(json!({"items": items})),
            Err(e) => store_error(e),
        }
    }

    fn circuits(&self) -> Response<Full<Bytes>> {
        let hosts = self.ctx.hosts();
        let mut out: Vec<Value> = hosts
            .values()
            .map(|h| {
                let (open, idle) = h.connections();
                json!({
                    "host": h.key,
                    "breaker": h.breaker.snapshot(),
                    "in_flight": h.gate.in_flight(),
                    "max_connections": h.gate.max_connections(),
                    "shed_threshold": h.policy.shed_threshold(),
                    "connections": {"open": open, "idle": idle},
                })
            })
            .collect();
        out.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
        ok(json!({"hosts": out, "disabled_targets": self.ctx.disabled().list()}))
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "method_not_allowed", "reason": format!("use {allow}")}),
    );
    r.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    r
}

//! The verifying test receiver behind `hookyard receive`.
//!
//! It stands in for a webhook consumer in manual runs, integration tests and benchmarks:
//! it checks signatures and timestamps, counts deliveries and duplicates by `webhook-id`,
//! tracks concurrency (to prove per-host caps), and injects failures and latency on demand.
//! Tests start it in-process with [`Receiver::bind`] on `127.0.0.1:0` and read
//! [`Receiver::stats`] / [`Receiver::requests`] directly; `GET /stats` exposes the same counts
//! over HTTP for everyone else.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, ALLOW, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::headers as hdr;
use crate::signing::{
    Secret, Verifier, VerifyError, HEADER_LEGACY_SIGNATURE, HEADER_WEBHOOK_ID,
    HEADER_WEBHOOK_SIGNATURE, HEADER_WEBHOOK_TIMESTAMP,
};

/// Bodies above this are answered 413 unread: a test receiver must not be the thing that runs
/// out of memory when a test goes wrong. Far above the dispatcher's 2 MiB default.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How [`Receiver`] checks and answers requests.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Secrets that may have signed a request; any of them is accepted. Empty: don't verify.
    pub secrets: Vec<Secret>,
    /// How far `webhook-timestamp` may be from now, either way. Default 5 minutes.
    pub tolerance: Duration,
    /// Fraction (0..=1) of verified requests answered with `fail_status`. Default 0.
    pub fail_rate: f64,
    /// Status of a randomly injected failure. Default 500.
    pub fail_status: u16,
    /// When set, every verified request is answered with this status (the `--status` flag);
    /// it takes precedence over `fail_rate`. Default none.
    pub force_status: Option<u16>,
    /// Wait applied before answering every verified request. Default zero.
    pub delay: Duration,
    /// How many of the latest requests [`Receiver::requests`] keeps. Default 10 000.
    pub max_recorded: usize,
    /// How many `webhook-id`s answered 2xx are remembered for duplicate counting (at least
    /// the latest half of this many are). Bounds the receiver's memory in long load tests; a
    /// redelivery of an id forgotten since is not counted as a duplicate. Default 1 000 000.
    pub remember_ids: usize,
    /// Seed of the generator that picks which requests fail at `fail_rate`. With a seed the
    /// n-th request to arrive gets the same verdict on every run (a reproducible load test or
    /// CI run); without one the generator is seeded by the OS. Default none.
    pub seed: Option<u64>,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            secrets: Vec::new(),
            tolerance: Duration::from_secs(5 * 60),
            fail_rate: 0.0,
            fail_status: 500,
            force_status: None,
            delay: Duration::ZERO,
            max_recorded: 10_000,
            remember_ids: 1_000_000,
            seed: None,
        }
    }
}

/// A snapshot of the receiver's counters (also the JSON of `GET /stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverStats {
    /// POSTs that passed signature checks (or all POSTs when not verifying).
    pub received: u64,
    /// Requests answered 2xx.
    pub delivered_ok: u64,
    /// Requests answered with an injected (random or forced) non-2xx status.
    pub failed_injected: u64,
    /// Requests rejected with 401 for a missing or wrong signature or timestamp.
    pub invalid_signature: u64,
    /// Distinct `webhook-id`s answered 2xx (an id delivered again after the receiver forgot
    /// it, past `remember_ids`, counts again).
    pub unique_ids: u64,
    /// Requests whose `webhook-id` had already been answered 2xx (or was answered 2xx twice
    /// concurrently): deliveries the sender should not have made.
    pub duplicates_after_success: u64,
    /// The most requests ever in flight at once.
    pub max_concurrent: u64,
    /// Requests in flight now.
    pub in_flight: u64,
}

/// One request as the receiver saw it, for tests to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRequest {
    /// Request path.
    pub path: String,
    /// `webhook-id` header.
    pub webhook_id: Option<String>,
    /// `webhook-timestamp` header, as sent.
    pub webhook_timestamp: Option<String>,
    /// `X-Callback-Mode` header (`sync` or `async`).
    pub callback_mode: Option<String>,
    /// `X-Delivery-Attempt` header, as sent.
    pub delivery_attempt: Option<String>,
    /// `X-Trace-Id` header.
    pub trace_id: Option<String>,
    /// `traceparent`, when the sender propagated a W3C trace context.
    pub traceparent: Option<String>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// `X-Event-Type` header.
    pub event_type: Option<String>,
    /// `X-Ordering-Key` header, on deliveries of a rule with an ordering key.
    pub ordering_key: Option<String>,
    /// `X-Sequence` header, as sent.
    pub sequence: Option<String>,
    /// The body, unchanged.
    pub body: Bytes,
    /// The status the receiver answered (401 for a bad signature).
    pub status: u16,
    /// Whether this request counted in `duplicates_after_success`.
    pub duplicate: bool,
}

/// The `webhook-id`s answered 2xx lately, in two generations: when the newer one is full it
/// becomes the older one and the previous older one is dropped. Memory stays under `capacity`
/// ids and every one of the latest `capacity / 2` is remembered, at one hash probe or two per
/// lookup and without storing each id twice (as an insertion-ordered queue beside a set
/// would).
#[derive(Debug)]
struct RecentIds {
    newer: HashSet<String>,
    older: HashSet<String>,
    generation: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        RecentIds {
            newer: HashSet::new(),
            older: HashSet::new(),
            generation: (capacity / 2).max(1),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.newer.contains(id) || self.older.contains(id)
    }

    /// Remembers `id`; `false` if it was already remembered.
    fn insert(&mut self, id: &str) -> bool {
        if self.contains(id) {
            return false;
        }
        if self.newer.len() >= self.generation {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(id.to_string());
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }
}

/// A running receiver. Dropping it aborts the server; [`Receiver::shutdown`] also waits for it.
#[derive(Debug)]
pub struct Receiver {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Binds `addr` (port 0 picks a free port) and starts serving in the background.
    ///
    /// Fails with `InvalidInput` when `fail_rate` is not within 0..=1 or a status is not a
    /// valid HTTP status code, and with the bind error when the address is unusable.
    pub async fn bind(addr: SocketAddr, config: ReceiverConfig) -> std::io::Result<Receiver> {
        let shared = Arc::new(Shared::new(config)?);
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        tracing::info!(
            %local_addr,
            verifying = shared.verifier.is_some(),
            "hookyard receiver listening"
        );
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop_rx));
        Ok(Receiver {
            local_addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReceiverStats {
        self.shared.stats()
    }

    /// The latest requests (up to `max_recorded`), oldest first.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        lock(&self.shared.recorded).iter().cloned().collect()
    }

    /// Changes the fraction of requests answered with the failure status. Clamped to 0..=1;
    /// NaN means 0.
    pub fn set_fail_rate(&self, rate: f64) {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self.shared
            .fail_rate_bits
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Changes the status of randomly injected failures.
    pub fn set_fail_status(&self, status: StatusCode) {
        self.shared
            .fail_status
            .store(status.as_u16(), Ordering::Relaxed);
    }

    /// Forces every verified request to be answered with `status` (`None` goes back to normal
    /// answers and random failures).
    pub fn set_status(&self, status: Option<StatusCode>) {
        self.shared
            .force_status
            .store(status.map_or(NO_STATUS, |s| s.as_u16()), Ordering::Relaxed);
    }

    /// Changes the wait applied before answering every verified request.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_nanos
            .store(duration_nanos(delay), Ordering::Relaxed);
    }

    /// Stops accepting, closes every connection and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            // The task may already be gone; then there is nothing to stop.
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                tracing::warn!(%err, "receiver task ended abnormally");
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task, so a
        // test that forgets `shutdown` still leaves nothing running.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Sentinel for "no forced status": 0 is never a valid status code.
const NO_STATUS: u16 = 0;

#[derive(Debug)]
struct Shared {
    verifier: Option<Verifier>,
    // Fault settings are atomics so tests can change them while requests are in flight.
    fail_rate_bits: AtomicU64,
    fail_status: AtomicU16,
    force_status: AtomicU16,
    delay_nanos: AtomicU64,
    /// Decides injected failures; one lock per request is nothing next to a test's HTTP work.
    failure_dice: Mutex<StdRng>,

    received: AtomicU64,
    delivered_ok: AtomicU64,
    failed_injected: AtomicU64,
    invalid_signature: AtomicU64,
    duplicates_after_success: AtomicU64,
    max_concurrent: AtomicU64,
    in_flight: AtomicU64,
    unique_ids: AtomicU64,
    /// Ids answered 2xx, the latest ones only.
    succeeded_ids: Mutex<RecentIds>,
    recorded: Mutex<VecDeque<ReceivedRequest>>,
    max_recorded: usize,
}

impl Shared {
    fn new(config: ReceiverConfig) -> std::io::Result<Shared> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        if !(0.0..=1.0).contains(&config.fail_rate) {
            return Err(invalid(format!(
                "fail rate must be between 0 and 1, got {}",
                config.fail_rate
            )));
        }
        for status in std::iter::once(config.fail_status).chain(config.force_status) {
            StatusCode::from_u16(status)
                .map_err(|_| invalid(format!("invalid HTTP status code {status}")))?;
        }
        let verifier = if config.secrets.is_empty() {
            None
        } else {
            // Cannot fail: the list is non-empty, which is all `Verifier::new` checks.
            Some(
                Verifier::new(config.secrets, config.tolerance)
                    .map_err(|e| invalid(e.to_string()))?,
            )
        };
        Ok(Shared {
            verifier,
            fail_rate_bits: AtomicU64::new(config.fail_rate.to_bits()),
            fail_status: AtomicU16::new(config.fail_status),
            force_status: AtomicU16::new(config.force_status.unwrap_or(NO_STATUS)),
            delay_nanos: AtomicU64::new(duration_nanos(config.delay)),
            failure_dice: Mutex::new(match config.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            }),
            received: AtomicU64::new(0),
            delivered_ok: AtomicU64::new(0),
            failed_injected: AtomicU64::new(0),
            invalid_signature: AtomicU64::new(0),
            duplicates_after_success: AtomicU64::new(0),
            max_concurrent: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            unique_ids: AtomicU64::new(0),
            succeeded_ids: Mutex::new(RecentIds::new(config.remember_ids)),
            recorded: Mutex::new(VecDeque::new()),
            max_recorded: config.max_recorded,
        })
    }

    fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            received: self.received.load(Ordering::Relaxed),
            delivered_ok: self.delivered_ok.load(Ordering::Relaxed),
            failed_injected: self.failed_injected.load(Ordering::Relaxed),
            invalid_signature: self.invalid_signature.load(Ordering::Relaxed),
            unique_ids: self.unique_ids.load(Ordering::Relaxed),
            duplicates_after_success: self.duplicates_after_success.load(Ordering::Relaxed),
            max_concurrent: self.max_concurrent.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// The status to answer a verified request with: forced, randomly failed, or 200.
    fn pick_status(&self) -> StatusCode {
        // Both atomics only ever hold values validated in `new` or typed `StatusCode`s, so the
        // fallbacks are unreachable; they keep the path panic-free.
        let forced = self.force_status.load(Ordering::Relaxed);
        if forced != NO_STATUS {
            return StatusCode::from_u16(forced).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let rate = f64::from_bits(self.fail_rate_bits.load(Ordering::Relaxed));
        // `random::<f64>()` is in [0, 1), so a rate of 0 never fails and 1 always does.
        if rate > 0.0 && lock(&self.failure_dice).random::<f64>() < rate {
            let status = self.fail_status.load(Ordering::Relaxed);
            return StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        }
        StatusCode::OK
    }

    fn record(&self, request: ReceivedRequest) {
        if self.max_recorded == 0 {
            return;
        }
        let mut recorded = lock(&self.recorded);
        while recorded.len() >= self.max_recorded {
            recorded.pop_front();
        }
        recorded.push_back(request);
    }
}

/// Locks a mutex, ignoring poisoning: the guarded data are counters and logs that stay usable
/// even if a panic interrupted an update, and the receiver must keep answering.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Counts a request in flight for as long as it lives, so every exit path decrements.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_concurrent.fetch_max(now, Ordering::Relaxed);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                        if let Err(err) = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%peer, %err, "receiver connection ended with error");
                        }
                    });
                }
                Err(err) => {
                    // Usually fd exhaustion; back off briefly instead of spinning.
                    tracing::warn!(%err, "receiver accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    connections.shutdown().await;
    tracing::info!("hookyard receiver stopped");
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::GET && req.uri().path() == "/stats" {
        return Ok(match serde_json::to_vec(&shared.stats()) {
            Ok(body) => json(StatusCode::OK, Bytes::from(body)),
            Err(_) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(b"{\"error\":\"stats\"}"),
            ),
        });
    }
    if req.method() != Method::POST {
        let mut resp = json(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"{\"error\":\"method_not_allowed\"}"),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return Ok(resp);
    }
    Ok(handle_post(&shared, req).await)
}

async fn handle_post(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let _in_flight = InFlight::enter(shared);
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            let too_large = err.is::<http_body_util::LengthLimitError>();
            tracing::debug!(%err, "receiver could not read body");
            return if too_large {
                json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Bytes::from_static(b"{\"error\":\"body_too_large\"}"),
                )
            } else {
                json(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"{\"error\":\"body_read\"}"),
                )
            };
        }
    };
    let headers = &parts.headers;
    let mut seen = ReceivedRequest {
        path: parts.uri.path().to_owned(),
        webhook_id: header_string(headers, &HEADER_WEBHOOK_ID),
        webhook_timestamp: header_string(headers, &HEADER_WEBHOOK_TIMESTAMP),
        callback_mode: header_string(headers, &hdr::X_CALLBACK_MODE),
        delivery_attempt: header_string(headers, &hdr::X_DELIVERY_ATTEMPT),
        trace_id: header_string(headers, &hdr::X_TRACE_ID),
        traceparent: header_string(headers, &hdr::TRACEPARENT),
        idempotency_key: header_string(headers, &hdr::IDEMPOTENCY_KEY),
        event_type: header_string(headers, &hdr::X_EVENT_TYPE),
        ordering_key: header_string(headers, &hdr::X_ORDERING_KEY),
        sequence: header_string(headers, &hdr::X_SEQUENCE),
        body,
        status: 0,
        duplicate: false,
    };

    if let Some(verifier) = &shared.verifier {
        if let Err(err) = check_signature(verifier, headers, &seen.body, unix_now()) {
            shared.invalid_signature.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                webhook_id = seen.webhook_id.as_deref().unwrap_or("-"),
                path = %seen.path,
                reason = %err,
                "rejected request with invalid signature"
            );
            let body = serde_json::json!({
                "ok": false,
                "error": "invalid_signature",
                "reason": err.to_string(),
            });
            seen.status = StatusCode::UNAUTHORIZED.as_u16();
            shared.record(seen);
            return json(StatusCode::UNAUTHORIZED, Bytes::from(body.to_string()));
        }
    }
    shared.received.fetch_add(1, Ordering::Relaxed);

    // Checked on arrival, before the delay: a redelivery of an id that already succeeded is a
    // duplicate whatever this attempt is answered.
    let already_succeeded = seen
        .webhook_id
        .as_ref()
        .is_some_and(|id| lock(&shared.succeeded_ids).contains(id));

    let delay = Duration::from_nanos(shared.delay_nanos.load(Ordering::Relaxed));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let status = shared.pick_status();
    let mut duplicate = already_succeeded;
    let body = if status.is_success() {
        shared.delivered_ok.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = &seen.webhook_id {
            // Not new although it was not there on arrival: two deliveries of the same id
            // overlapped and both succeeded, which is a duplicate as well.
            let newly_succeeded = lock(&shared.succeeded_ids).insert(id);
            duplicate |= !newly_succeeded;
            if newly_succeeded {
                shared.unique_ids.fetch_add(1, Ordering::Relaxed);
            }
        }
        Bytes::from_static(b"{\"ok\":true}")
    } else {
        shared.failed_injected.fetch_add(1, Ordering::Relaxed);
        Bytes::from(format!(
            "{{\"ok\":false,\"injected\":true,\"status\":{}}}",
            status.as_u16()
        ))
    };
    if duplicate {
        shared
            .duplicates_after_success
            .fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(
        webhook_id = seen.webhook_id.as_deref().unwrap_or("-"),
        attempt = seen.delivery_attempt.as_deref().unwrap_or("-"),
        status = status.as_u16(),
        duplicate,
        "received webhook"
    );
    seen.status = status.as_u16();
    seen.duplicate = duplicate;
    shared.record(seen);
    json(status, body)
}

/// Checks every signature scheme the request carries; at least one must be present.
fn check_signature(
    verifier: &Verifier,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let standard = headers.contains_key(&HEADER_WEBHOOK_SIGNATURE);
    let legacy = headers.contains_key(&HEADER_LEGACY_SIGNATURE);
    if !standard && !legacy {
        return Err(VerifyError::MissingHeader("webhook-signature"));
    }
    if standard {
        verifier.verify(headers, body, now_secs)?;
    }
    if legacy {
        verifier.verify_legacy(headers, body)?;
    }
    Ok(())
}

fn header_string(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests;

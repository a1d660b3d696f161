//! The file format of `dispatcher-config.yaml`, as serde types.
//!
//! These types mirror the YAML one to one and reject unknown keys. They carry source
//! positions (`Spanned`) on every value that validation may complain about, so an error can
//! name the line and column. Nothing here is used at request time: `compile/` turns a
//! `ConfigFile` into the typed, checked `Settings` the sidecar runs on.
//!
//! The JSON Schema shipped as `dispatcher-config.schema.json` is generated from these types
//! (`hookyard schema`), so editors complete and check the file.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A value with its position in the file.
pub type Pos<T> = Spanned<T>;

/// The whole configuration file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Data plane address (ingress API). Default `127.0.0.1:8080`.
    #[schemars(with = "Option<String>")]
    pub listen: Option<Pos<String>>,
    /// Admin API address (metrics, health, config, DLQ). Default `127.0.0.1:9090`.
    #[schemars(with = "Option<String>")]
    pub admin_listen: Option<Pos<String>>,
    /// Admin API options.
    #[serde(default)]
    pub admin: AdminSection,
    /// Ingress limits.
    #[serde(default)]
    pub ingress: IngressSection,
    /// Where the async queue lives.
    #[serde(default)]
    pub store: StoreSection,
    /// Secrets used to sign every delivery.
    pub signing: SigningSection,
    /// Trust for `https://` targets.
    #[serde(default)]
    pub tls: TlsSection,
    /// Per-host connection and breaker policy: `default`, then overrides keyed `host:port`.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostSection>,
    /// Async queues: `default`, then named queues. A rule's queue that is not listed here
    /// inherits `default`'s settings.
    #[serde(default)]
    pub queues: BTreeMap<String, QueueSection>,
    /// Event type -> delivery rules. The most specific match wins.
    #[schemars(with = "Vec<RuleSection>")]
    pub routing_rules: Pos<Vec<RuleSection>>,
}

/// `admin:` section.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token required on every admin request when set. `${VAR}` is expanded.
    #[schemars(with = "Option<String>")]
    pub token: Option<Pos<String>>,
    /// When true, `GET /metrics` needs the token too. Default false: scrapers seldom carry one.
    /// `/healthz` and `/readyz` never need it (a kubelet's probes cannot send one).
    #[serde(default)]
    pub token_protects_metrics: bool,
    /// Serve an admin API without `token` on a non-loopback `admin_listen`. Off by default:
    /// such a config is refused, because anyone who reaches the port could reload the config
    /// and replay dead letters. Default false.
    #[schemars(with = "Option<bool>")]
    pub allow_unauthenticated_remote: Option<Pos<bool>>,
}

/// `ingress:` section.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressSection {
    /// Largest accepted event body in bytes. Default 2097152 (2 MiB).
    #[schemars(with = "Option<u64>")]
    pub max_body_bytes: Option<Pos<u64>>,
    /// How long an `Idempotency-Key` is remembered. Milliseconds or a duration ("24h"). Default 24h.
    #[schemars(with = "Option<DurationValue>")]
    pub idempotency_window: Option<Pos<DurationValue>>,
    /// Ingress event loops, each on its own thread with its own upstream connections; each
    /// accepted connection goes to the loop with the fewest open. Default: one per CPU core.
    #[schemars(with = "Option<u32>")]
    pub threads: Option<Pos<i64>>,
    /// How long a request's headers and whole body may take to arrive, from its first byte, in
    /// ms. Past it the client gets `408` and the connection is closed. Default 10000.
    #[schemars(with = "Option<u32>")]
    pub request_timeout_ms: Option<Pos<i64>>,
    /// Open ingress connections at most; past it a new connection is closed at once. Kept below
    /// the process's file-descriptor limit. Default 10000.
    #[schemars(with = "Option<u32>")]
    pub max_connections: Option<Pos<i64>>,
    /// Event bodies held in memory at once, in bytes, across all requests being read or
    /// dispatched. Past it a new body gets `503` with `Retry-After`. Default 67108864 (64 MiB).
    #[schemars(with = "Option<u64>")]
    pub max_buffered_body_bytes: Option<Pos<i64>>,
}

/// `tls:` section.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM files of extra CA certificates trusted for `https://` targets (a private CA), on top
    /// of the bundled Mozilla roots. Relative paths are relative to the config file.
    #[schemars(with = "Vec<String>")]
    #[serde(default)]
    pub ca_files: Vec<Pos<String>>,
}

/// `store:` section.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite` (embedded default) or `redis`.
    #[schemars(with = "Option<StoreKind>")]
    pub kind: Option<Pos<StoreKind>>,
    /// SQLite file. Default `./data/hookyard.db`.
    #[schemars(with = "Option<String>")]
    pub path: Option<Pos<String>>,
    /// Redis URL (`redis://host:port`), for `kind: redis`.
    #[schemars(with = "Option<String>")]
    pub url: Option<Pos<String>>,
    /// Prefix of every Redis key, so several deployments can share one server.
    pub key_prefix: Option<String>,
    /// Redis only: an event leased by an instance and idle this long (ms) in the queue's
    /// consumer group is taken over by another instance (a crashed instance's deliveries).
    /// Must exceed the longest rule `timeout_ms` by at least 1000. Default: the larger of
    /// 30000 and the longest timeout + 5000.
    #[schemars(with = "Option<u64>")]
    pub claim_idle_ms: Option<Pos<i64>>,
    /// Redis only: replicas that must acknowledge an accepted event (`WAIT`) before the 202.
    /// Default 0 (the primary's acknowledgement is enough).
    #[schemars(with = "Option<u32>")]
    pub wait_replicas: Option<Pos<i64>>,
    /// Redis only: how long to wait for `wait_replicas` before answering 503. Default 1000.
    #[schemars(with = "Option<u64>")]
    pub wait_timeout_ms: Option<Pos<i64>>,
    /// SQLite only: fsync each group commit (default true). Turning it off is for benchmarks.
    pub fsync: Option<bool>,
    /// SQLite only: cap on the database file in MiB. When reached, ingress answers 503 instead
    /// of filling the disk the service beside the sidecar also needs. Default: no cap.
    #[schemars(with = "Option<u64>")]
    pub max_size_mb: Option<Pos<i64>>,
}

/// Which store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Redis,
}

/// `signing:` section.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SigningSection {
    /// `whsec_<base64>` secrets; list several while rotating. `${VAR}` and `${VAR:-default}` expand.
    #[schemars(with = "Vec<String>")]
    pub secrets: Pos<Vec<Pos<String>>>,
}

/// Per-host policy. Every field is optional in an override and falls back to `default`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// Cap on concurrent requests to this host (sync and async together). Default 128.
    #[schemars(with = "Option<u32>")]
    pub max_connections: Option<Pos<i64>>,
    /// Shed sync requests once in-flight reaches `shed_at * max_connections`. In (0, 1]. Default 0.8.
    #[schemars(with = "Option<f64>")]
    pub shed_at: Option<Pos<f64>>,
    /// TCP connect timeout in milliseconds. Default 500.
    #[schemars(with = "Option<u64>")]
    pub connect_timeout_ms: Option<Pos<i64>>,
    /// Circuit breaker settings.
    pub circuit_breaker: Option<BreakerSection>,
}

/// `circuit_breaker:` of a host. Failures are 5xx answers, timeouts and connection errors;
/// a 4xx never counts against the host.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerSection {
    /// What opens the breaker. Default `failure_rate`; writing `consecutive_failures` without
    /// `policy` selects `consecutive`. Keys of the other policy are an error.
    #[schemars(with = "Option<BreakerPolicyChoice>")]
    pub policy: Option<Pos<BreakerPolicyChoice>>,
    /// `failure_rate` policy: open when this share of the calls in the window failed. In (0, 1].
    /// Default 0.5.
    #[schemars(with = "Option<f64>")]
    pub failure_rate: Option<Pos<f64>>,
    /// `failure_rate` policy: length of the rolling window, in ms. Default 10000.
    #[schemars(with = "Option<u64>")]
    pub window_ms: Option<Pos<i64>>,
    /// `failure_rate` policy: no verdict on fewer finished calls than this in the window.
    /// At least 1. Default 20.
    #[schemars(with = "Option<u32>")]
    pub min_calls: Option<Pos<i64>>,
    /// `consecutive` policy: failures in a row that open the breaker. Default 5.
    #[schemars(with = "Option<u32>")]
    pub consecutive_failures: Option<Pos<i64>>,
    /// How long the breaker stays open before half-open probes go through, in ms. Default 10000.
    #[schemars(with = "Option<u64>")]
    pub recovery_ms: Option<Pos<i64>>,
    /// Calls let through once half-open; all must succeed to close the breaker, and one
    /// failure re-opens it. At least 1. Default 1.
    #[schemars(with = "Option<u32>")]
    pub half_open_probes: Option<Pos<i64>>,
}

/// The breaker policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerPolicyChoice {
    /// Open at a failed share of the calls over a rolling window (`failure_rate`,
    /// `window_ms`, `min_calls`).
    FailureRate,
    /// Open after `consecutive_failures` failures in a row.
    Consecutive,
}

/// One async queue's settings.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Delivery workers for this queue. Default 64.
    #[schemars(with = "Option<u32>")]
    pub concurrency: Option<Pos<i64>>,
    /// Events held (pending + in flight) before ingress answers 429. Default 1000000.
    #[schemars(with = "Option<u64>")]
    pub max_depth: Option<Pos<i64>>,
    /// Dead letters are purged after this many hours. Default 720.
    #[schemars(with = "Option<u64>")]
    pub dlq_retention_hours: Option<Pos<i64>>,
    /// Default retry delays for rules on this queue.
    #[schemars(with = "Option<Vec<DurationValue>>")]
    pub retry_matrix: Option<Pos<Vec<Pos<DurationValue>>>>,
    /// Jitter applied to each retry delay, as a fraction (0.2 = +/-20%). Default 0.2.
    #[schemars(with = "Option<f64>")]
    pub jitter: Option<Pos<f64>>,
    /// Default retry schedule as a policy instead of a list (not both).
    #[schemars(with = "Option<RetryPolicySection>")]
    pub retry_policy: Option<Pos<RetryPolicySection>>,
}

/// `retry_policy:` the schedule as a rule instead of a list; the alternative to `retry_matrix`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicySection {
    /// Attempts in all, the first one included (1 = no retry). At most 100.
    #[schemars(with = "u32")]
    pub max_attempts: Pos<i64>,
    /// `exponential` (default): retry n waits `base_delay_ms × 2^(n-1)`; `fixed`: each retry
    /// waits `base_delay_ms`.
    #[schemars(with = "Option<Backoff>")]
    pub backoff: Option<Pos<Backoff>>,
    /// Delay before the first retry: ms or a duration. Default 1000.
    #[schemars(with = "Option<DurationValue>")]
    pub base_delay_ms: Option<Pos<DurationValue>>,
    /// Longest delay between two attempts: ms or a duration. Default 3600000 (1 h).
    #[schemars(with = "Option<DurationValue>")]
    pub max_delay_ms: Option<Pos<DurationValue>>,
    /// `true` (default): the queue's ± jitter applies to each delay; `false`: none.
    #[schemars(with = "Option<bool>")]
    pub jitter: Option<Pos<bool>>,
}

/// How retry delays grow under a `retry_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    Exponential,
    Fixed,
}

/// One routing rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Exact type (`payment.authorize`), prefix wildcard (`user.*`) or catch-all (`*`).
    #[schemars(with = "String")]
    pub event_type: Pos<String>,
    /// `sync` (caller waits) or `async` (durable, 202 at once).
    #[schemars(with = "Mode")]
    pub mode: Pos<Mode>,
    /// Absolute http:// or https:// URL. `${VAR}` expands.
    #[schemars(with = "String")]
    pub target: Pos<String>,
    /// Deadline per attempt in ms. Required for sync rules; async default 10000.
    #[schemars(with = "Option<u64>")]
    pub timeout_ms: Option<Pos<i64>>,
    /// What to do when a sync delivery fails: `async_dlq` queues it for async delivery.
    #[schemars(with = "Option<Fallback>")]
    pub fallback: Option<Pos<Fallback>>,
    /// Queue for async delivery (and for sync fallback). Default `default`.
    #[schemars(with = "Option<String>")]
    pub queue: Option<Pos<String>>,
    /// Delays before each retry: ms (`500`) or durations (`"5s"`, `"30m"`). Attempts = 1 + length.
    #[schemars(with = "Option<Vec<DurationValue>>")]
    pub retry_matrix: Option<Pos<Vec<Pos<DurationValue>>>>,
    /// The retry schedule as a policy instead of a list (not both).
    #[schemars(with = "Option<RetryPolicySection>")]
    pub retry_policy: Option<Pos<RetryPolicySection>>,
    /// `standard_webhooks` (default) or `legacy_hmac_sha256` (`X-Webhook-Signature: sha256=<hex>`).
    pub signature: Option<SignatureChoice>,
    /// Async only: `header:<Name>` or `json:<pointer>`. Events with the same key are delivered
    /// one at a time in accept order, each with `X-Ordering-Key` and `X-Sequence`.
    #[schemars(with = "Option<String>")]
    pub ordering_key: Option<Pos<String>>,
}

/// Delivery mode of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sync,
    Async,
}

/// Fallback policy of a sync rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Queue the event on the async path (retries, then DLQ).
    AsyncDlq,
    /// No fallback: answer 502/503/504.
    None,
}

/// Signature scheme of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignatureChoice {
    StandardWebhooks,
    LegacyHmacSha256,
}

/// A duration written as milliseconds (`500`) or with a unit (`"5s"`, `"30m"`, `"2h"`, `"1d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[schemars(untagged)]
pub enum DurationValue {
    /// Milliseconds; negative values are rejected by validation.
    Millis(i64),
    /// Parsed from a string with a unit.
    #[schemars(with = "String")]
    Text(std::time::Duration),
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "milliseconds as an integer, or a duration such as \"5s\", \"30m\", \"2h\"",
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(DurationValue::Millis(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(DurationValue::Millis)
                    .map_err(|_| E::custom("duration is too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                humantime::parse_duration(v.trim())
                    .map(DurationValue::Text)
                    .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

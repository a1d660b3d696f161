//! Configuration: load -> expand `${VAR}` -> parse -> validate -> compile.
//!
//! One code path, [`load`], serves `hookyard check`, `serve` and every hot reload, so what
//! `check` accepts is exactly what the sidecar runs. Its result, [`Settings`], is immutable and
//! typed; nothing re-reads YAML on the request path.

mod compile;
pub mod diff;
mod env;
mod error;
pub mod schema;
mod shape;
mod tree;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::routing::RuleTable;
use crate::secret::Redacted;
use crate::signing::Signer;

pub use crate::queue::StoreSettings;
pub use error::{ConfigError, Problem};

/// The Standard Webhooks example schedule: retries after 5s, 5m, 30m, 2h, 5h, 10h, 14h, 20h
/// and 24h (ten attempts over about three days). Used when neither rule nor queue sets one.
pub const STANDARD_RETRY_SCHEDULE_MS: [u64; 9] = [
    5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 50_400_000, 72_000_000,
    86_400_000,
];

/// Most pool lanes a host keeps: one per ingress event loop plus the main runtime. Defined here,
/// below `upstream`, because it also caps `ingress.threads`.
pub const MAX_LANES: usize = 64;

/// The development secret shipped in the default config; `serve` warns while it is in use.
pub const DEVELOPMENT_SECRET: &str = "whsec_ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQ=";

/// Everything the sidecar runs on, compiled from one file.
#[derive(Debug)]
pub struct Settings {
    /// The file this came from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex; shown on `GET /v1/config`.
    pub content_hash: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API; `None` means open, which is allowed on loopback only
    /// unless `admin.allow_unauthenticated_remote` says otherwise.
    pub admin_token: Option<Redacted>,
    /// `admin.allow_unauthenticated_remote`: the operator accepted an open admin API on a
    /// non-loopback address.
    pub allow_unauthenticated_remote_admin: bool,
    /// Whether `/metrics` needs the admin token too (`admin.token_protects_metrics`).
    pub token_protects_metrics: bool,
    pub max_body_bytes: usize,
    pub idempotency_window: Duration,
    /// Ingress event loops (threads); see `ingress.threads`.
    pub ingress_threads: usize,
    /// Limits every ingress connection and request meets; see `ingress:`.
    pub edge: EdgeLimits,
    pub store: StoreSettings,
    pub signer: Arc<Signer>,
    /// Trust roots for `https://` targets.
    pub tls: TlsTrust,
    /// True while the shipped development secret is among the signing secrets.
    pub uses_development_secret: bool,
    pub hosts: HostPolicies,
    pub queues: QueuePolicies,
    pub rules: RuleTable,
}

/// What a client of the ingress API may hold: time, connections and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Headers and the whole body must arrive within this, from the request's first byte.
    pub request_timeout: Duration,
    /// Open ingress connections at most (further capped by the file-descriptor limit).
    pub max_connections: usize,
    /// Body bytes held in memory at once across all ingress requests.
    pub max_buffered_body_bytes: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_buffered_body_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The TLS client configuration every host's pool uses for `https://` targets.
#[derive(Debug, Clone)]
pub struct TlsTrust {
    pub client_config: Arc<rustls::ClientConfig>,
    /// SHA-256 over the extra CA files: a reload rebuilds pools only when it changes.
    pub fingerprint: String,
}

impl TlsTrust {
    /// The bundled Mozilla roots plus `extra` certificates.
    pub fn new(extra: Vec<rustls::pki_types::CertificateDer<'static>>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        for cert in extra {
            sha2::Digest::update(&mut hasher, cert.as_ref());
            roots
                .add(cert)
                .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            client_config: Arc::new(client_config),
            fingerprint: hex::encode(sha2::Digest::finalize(hasher)),
        })
    }
}

/// Connection and breaker policy of one host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostPolicy {
    pub max_connections: u32,
    pub shed_at: f64,
    #[serde(serialize_with = "as_ms")]
    pub connect_timeout: Duration,
    /// When the host's circuit breaker opens and how it recovers.
    pub circuit_breaker: BreakerSettings,
}

/// What opens a host's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum BreakerPolicy {
    /// Open when, over the rolling `window_ms`, at least `min_calls` calls finished and the
    /// failed share of them reached `failure_rate`. A host failing a steady minority of calls
    /// at random is never cut off; one failing most calls is cut off within one window.
    FailureRate {
        failure_rate: f64,
        window_ms: u64,
        min_calls: u32,
    },
    /// Open after `consecutive_failures` failures in a row (in completion order).
    Consecutive { consecutive_failures: u32 },
}

impl BreakerPolicy {
    /// `failure_rate` or `consecutive`, as in the file and on `/v1/circuits`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FailureRate { .. } => "failure_rate",
            Self::Consecutive { .. } => "consecutive",
        }
    }

    /// `(failure_rate, window_ms, min_calls)` of this policy, or the failure-rate defaults when
    /// it is the consecutive one: the base a section switching policies starts from.
    pub fn failure_rate_or_default(&self) -> (f64, u64, u32) {
        match *self {
            Self::FailureRate {
                failure_rate,
                window_ms,
                min_calls,
            } => (failure_rate, window_ms, min_calls),
            Self::Consecutive { .. } => DEFAULT_FAILURE_RATE.failure_rate_or_default(),
        }
    }
}

/// Defaults of the failure-rate policy (seed 000): 50% over 10 s, with no verdict on fewer
/// than 20 calls.
pub const DEFAULT_FAILURE_RATE: BreakerPolicy = BreakerPolicy::FailureRate {
    failure_rate: 0.5,
    window_ms: 10_000,
    min_calls: 20,
};

/// Default of the consecutive policy when it is chosen without a threshold.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;

/// A host's circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakerSettings {
    /// What opens it.
    #[serde(flatten)]
    pub policy: BreakerPolicy,
    /// How long it stays open before half-open probes go through.
    pub recovery_ms: u64,
    /// Calls let through once half-open; all must succeed to close it, one failure re-opens it.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            policy: DEFAULT_FAILURE_RATE,
            recovery_ms: 10_000,
            half_open_probes: 1,
        }
    }
}

impl HostPolicy {
    /// In-flight count at which sync requests are shed: `ceil(shed_at * max_connections)`,
    /// at least 1 so that a host always takes some traffic.
    pub fn shed_threshold(&self) -> u32 {
        ((self.shed_at * f64::from(self.max_connections)).ceil() as u32).max(1)
    }
}

impl Default for HostPolicy {
    fn default() -> Self {
        Self {
            max_connections: 128,
            shed_at: 0.8,
            connect_timeout: Duration::from_millis(500),
            circuit_breaker: BreakerSettings::default(),
        }
    }
}

impl Settings {
    /// True when the admin API listens beyond loopback without a token, which compilation
    /// allows only with `admin.allow_unauthenticated_remote: true`; serve and every reload
    /// warn while it holds.
    pub fn admin_is_open_remotely(&self) -> bool {
        self.admin_token.is_none() && !self.admin_listen.ip().is_loopback()
    }
}

/// The default host policy plus per-host overrides keyed `host:port`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostPolicies {
    pub default: HostPolicy,
    pub overrides: HashMap<String, HostPolicy>,
}

impl HostPolicies {
    /// The policy for `host` (`host:port`).
    pub fn for_host(&self, host: &str) -> &HostPolicy {
        self.overrides.get(host).unwrap_or(&self.default)
    }
}

/// Settings of one async queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueuePolicy {
    pub concurrency: u32,
    pub max_depth: u64,
    #[serde(serialize_with = "as_ms")]
    pub dlq_retention: Duration,
    pub retry_delays_ms: Arc<[u64]>,
    pub jitter: f64,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_depth: 1_000_000,
            dlq_retention: Duration::from_secs(720 * 3600),
            retry_delays_ms: Arc::from(STANDARD_RETRY_SCHEDULE_MS.as_slice()),
            jitter: 0.2,
        }
    }
}

/// The default queue policy plus named queues.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueuePolicies {
    pub default: QueuePolicy,
    pub named: HashMap<String, QueuePolicy>,
}

impl QueuePolicies {
    /// The policy of `queue` (a name no rule section defines inherits `default`).
    pub fn for_queue(&self, queue: &str) -> &QueuePolicy {
        self.named.get(queue).unwrap_or(&self.default)
    }
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Reads, expands, parses, validates and compiles the config file at `path`.
///
/// Every problem found is reported, each with its line, column and a snippet; a file that
/// does not parse at all reports the first syntax error.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::io(path, e))?;
    load_from_bytes(path, &bytes)
}

/// Like [`load`], for a file already read (used by tests and reload).
pub fn load_from_bytes(path: &Path, bytes: &[u8]) -> Result<Settings, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::not_utf8(path, e))?;
    let lookup = |name: &str| std::env::var(name).ok();
    let (file, expansion) = parse(path, text, &lookup)?;
    compile::compile(path, bytes, file, &expansion)
        .map_err(|problems| finish(path, text, &expansion, problems, Vec::new()))
}

/// Reads the file as YAML, expands `${VAR}` in every scalar value, checks every key and type
/// against the schema, then deserializes the expanded text.
fn parse(
    path: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(schema::ConfigFile, tree::Expansion), ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::single(
            path,
            text,
            Problem::at(
                1,
                1,
                "the file is empty; a config needs at least signing and routing_rules",
            ),
        ));
    }
    // A syntax error stops here: past it, nothing in the file can be located reliably.
    let root = tree::parse(text)
        .map_err(|p| ConfigError::new(path, text, vec![syntax_problem(text, p)]))?;
    let (expansion, unexpanded) = tree::expand(text, root.as_ref(), lookup);
    let expanded_root;
    let checked = if expansion.at.is_empty() {
        root.as_ref()
    } else {
        expanded_root = tree::parse(&expansion.text)
            .map_err(|p| finish(path, text, &expansion, vec![p], unexpanded.clone()))?;
        expanded_root.as_ref()
    };
    let mut problems = Vec::new();
    if let Some(root) = checked {
        let schema = json_schema();
        let mut checker = shape::Checker::new(&schema, &expansion);
        checker.check(root, &schema, &mut String::new());
        problems = checker.problems;
    }
    if !problems.is_empty() || !unexpanded.is_empty() {
        return Err(finish(path, text, &expansion, problems, unexpanded));
    }
    let options = serde_saphyr::options! { with_snippet: false };
    match serde_saphyr::from_str_with_options(&expansion.text, options) {
        Ok(file) => Ok((file, expansion)),
        Err(e) => Err(finish(
            path,
            text,
            &expansion,
            vec![error::problem_from_yaml(&e)],
            Vec::new(),
        )),
    }
}

/// Problems found on the expanded text, made ready to show against the file: positions mapped
/// back, expanded values taken out of messages, keys named, in file order. `in_file` are
/// problems already positioned in the file (variables that could not be expanded); another
/// problem at the same place (the type of `${UNSET}`) would only repeat them.
fn finish(
    path: &Path,
    text: &str,
    expansion: &tree::Expansion,
    problems: Vec<Problem>,
    in_file: Vec<Problem>,
) -> ConfigError {
    let taken: Vec<(u64, u64)> = in_file.iter().map(|p| (p.line, p.column)).collect();
    let mut problems: Vec<Problem> = problems
        .into_iter()
        .map(|mut p| {
            p.message = expansion.scrub(p.line, p.column, &p.message);
            if p.line > 0 {
                (p.line, p.column) = expansion.original(p.line, p.column);
            }
            if p.key.is_none() {
                p.key = expansion
                    .paths
                    .get(&(p.line, p.column))
                    .filter(|k| !k.is_empty())
                    .cloned();
            }
            p
        })
        .filter(|p| !taken.contains(&(p.line, p.column)))
        .chain(in_file)
        .collect();
    problems.sort_by_key(|p| (p.line, p.column));
    ConfigError::new(path, text, problems)
}

/// A YAML syntax error, pointed where the user has to look.
fn syntax_problem(text: &str, mut p: Problem) -> Problem {
    // A tab used for indentation: point at the tab itself. The parser may notice it only at
    // the end of the line before ("while scanning a plain scalar, found a tab" at the end of
    // line N-1 for a tab that starts line N).
    if p.message.contains("tab") {
        for line in [p.line, p.line + 1, p.line.saturating_sub(1)] {
            if line == 0 {
                continue;
            }
            let Some(line_text) = text.lines().nth(line as usize - 1) else {
                continue;
            };
            let indent: String = line_text
                .chars()
                .take_while(|c| *c == ' ' || *c == '\t')
                .collect();
            if let Some(i) = indent.find('\t') {
                p.line = line;
                p.column = i as u64 + 1;
                p.message = "tabs are not allowed in YAML indentation; indent with spaces".into();
                break;
            }
        }
    }
    p
}

/// The JSON Schema of the config file, for editors.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(schema::ConfigFile);
    serde_json::to_value(schema).unwrap_or(serde_json::Value::Null)
}

//! Validation and compilation of a parsed file into [`Settings`].
//!
//! Validation collects every problem rather than stopping at the first, so one `check` run
//! shows the user everything to fix.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::schema::IngressSection;
use super::schema::{ConfigFile, Pos, StoreKind};
use super::tree::{Expansion, SecretKind};
use super::EdgeLimits;
use super::{Problem, Settings, StoreSettings, TlsTrust, DEVELOPMENT_SECRET};
use crate::routing::RuleTable;
use crate::signing::{Secret, Signer};

mod breaker;
mod hosts;
mod queues;
mod retry;
mod rules;
mod scalar;

use rules::DEFAULT_ASYNC_TIMEOUT_MS;

/// Default Redis `claim_idle_ms` when the longest rule timeout allows it.
const DEFAULT_CLAIM_IDLE_MS: u64 = 30_000;
/// Least headroom `claim_idle_ms` must leave above the longest rule timeout.
pub const CLAIM_IDLE_MARGIN_MS: u64 = 1_000;

/// Where a value sits in the file, for problems about a key rather than its value.
fn pos_of<T>(p: &Pos<T>) -> (u64, u64) {
    (p.referenced.line(), p.referenced.column())
}

/// Longest accepted per-attempt timeout: a deadline beyond this is a typo, not a policy.
const MAX_TIMEOUT_MS: i64 = 300_000;

struct Compiler<'a> {
    problems: Vec<Problem>,
    /// What `${VAR}` expansion rewrote, to quote the file's text instead of a value.
    expansion: &'a Expansion,
}

/// Compiles a file whose `${VAR}` references `parse` has already expanded. Problems carry
/// positions in the expanded text; `finish` maps them back to the file.
pub(super) fn compile(
    path: &Path,
    bytes: &[u8],
    file: ConfigFile,
    expansion: &Expansion,
) -> Result<Settings, Vec<Problem>> {
    let mut c = Compiler {
        problems: Vec::new(),
        expansion,
    };
    let settings = c.settings(path, bytes, file);
    if c.problems.is_empty() {
        if let Some(settings) = settings {
            return Ok(settings);
        }
    }
    Err(c.problems)
}

impl Compiler<'_> {
    fn problem(&mut self, p: Problem) {
        self.problems.push(p);
    }

    fn edge(&mut self, ingress: &IngressSection) -> EdgeLimits {
        let default = EdgeLimits::default();
        EdgeLimits {
            request_timeout: Duration::from_millis(self.positive(
                &ingress.request_timeout_ms,
                default.request_timeout.as_millis() as u64,
                "ingress.request_timeout_ms",
                // An hour: past that it is no longer a defence against slow clients.
                3_600_000,
            )),
            max_connections: self.positive(
                &ingress.max_connections,
                default.max_connections as u64,
                "ingress.max_connections",
                10_000_000,
            ) as usize,
            max_buffered_body_bytes: self.positive(
                &ingress.max_buffered_body_bytes,
                default.max_buffered_body_bytes as u64,
                "ingress.max_buffered_body_bytes",
                i64::MAX,
            ) as usize,
        }
    }

    fn settings(&mut self, path: &Path, bytes: &[u8], file: ConfigFile) -> Option<Settings> {
        let listen = self.addr(&file.listen, "127.0.0.1:8080", "listen");
        let admin_listen = self.addr(&file.admin_listen, "127.0.0.1:9090", "admin_listen");
        let admin_token = file
            .admin
            .token
            .as_ref()
            .and_then(|t| self.expand_secret(t, SecretKind::Opaque))
            .filter(|t| !t.is_empty());
        let allow_unauthenticated_remote_admin = file
            .admin
            .allow_unauthenticated_remote
            .as_ref()
            .is_some_and(|a| a.value);
        if admin_token.is_none()
            && !admin_listen.ip().is_loopback()
            && !allow_unauthenticated_remote_admin
        {
            let message = format!(
                "admin_listen {admin_listen} is not a loopback address and admin.token is not set: \
                 anyone who reaches it could read the config, reload it and replay dead letters. \
                 Set admin.token (e.g. \"${{HOOKYARD_ADMIN_TOKEN}}\"), listen on 127.0.0.1, or \
                 accept the risk with admin.allow_unauthenticated_remote: true"
            );
            // Without `admin_listen` in the file the address is loopback, so this is reached
            // only with a position to point at; the fallback keeps the function total.
            self.problem(match &file.admin_listen {
                Some(at) => Problem::spanned(at, message),
                None => Problem::at(0, 0, message),
            });
        }
        let max_body_bytes = match &file.ingress.max_body_bytes {
            Some(p) if p.value == 0 => {
                self.problem(Problem::spanned(p, "max_body_bytes must be greater than 0"));
                0
            }
            Some(p) => p.value as usize,
            None => 2 * 1024 * 1024,
        };
        let idempotency_window = file
            .ingress
            .idempotency_window
            .as_ref()
            .and_then(|w| self.duration_ms(w, "idempotency_window"))
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(24 * 3600));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ingress_threads = self.positive(
            &file.ingress.threads,
            cores as u64,
            "ingress.threads",
            (super::MAX_LANES - 1) as i64,
        ) as usize;
        let edge = self.edge(&file.ingress);
        let store = self.store(path, &file.store);
        let (signer, uses_development_secret) = self.signing(&file.signing.secrets);
        let tls = self.tls(path, &file.tls);
        let hosts = self.hosts(&file.hosts);
        let queues = self.queues(&file.queues);
        let rules = self.rules(&file.routing_rules, &queues);
        let store = store.map(|st| self.check_claim_idle(st, &file.store, &rules));
        let content_hash = hex::encode(Sha256::digest(bytes));
        Some(Settings {
            path: path.to_path_buf(),
            content_hash,
            listen,
            admin_listen,
            admin_token,
            token_protects_metrics: file.admin.token_protects_metrics,
            allow_unauthenticated_remote_admin,
            max_body_bytes,
            idempotency_window,
            ingress_threads,
            edge,
            store: store?,
            signer: Arc::new(signer?),
            tls: tls?,
            uses_development_secret,
            hosts,
            queues,
            rules,
        })
    }

    fn store(
        &mut self,
        config_path: &Path,
        s: &super::schema::StoreSection,
    ) -> Option<StoreSettings> {
        let kind = s
            .kind
            .as_ref()
            .map(|k| k.value)
            .unwrap_or(StoreKind::Sqlite);
        match kind {
            StoreKind::Sqlite => {
                if let Some(url) = &s.url {
                    self.problem(Problem::spanned(
                        url,
                        "url is for kind: redis; SQLite takes path",
                    ));
                }
                for key in [&s.claim_idle_ms, &s.wait_replicas, &s.wait_timeout_ms]
                    .into_iter()
                    .flatten()
                {
                    self.problem(Problem::spanned(
                        key,
                        "claim_idle_ms, wait_replicas and wait_timeout_ms are for kind: redis",
                    ));
                }
                let raw = match &s.path {
                    Some(p) => self.expand(p)?,
                    None => "./data/hookyard.db".to_string(),
                };
                let mut path = PathBuf::from(raw);
                // A relative path is relative to the config file, so `serve --config x/y.yaml`
                // from any directory opens the same database.
                if path.is_relative() {
                    if let Some(dir) = config_path.parent() {
                        path = dir.join(path);
                    }
                }
                let max_size_bytes = s
                    .max_size_mb
                    .as_ref()
                    .map(|_| self.positive(&s.max_size_mb, 0, "max_size_mb", 1 << 30) << 20);
                Some(StoreSettings::Sqlite {
                    path,
                    fsync: s.fsync.unwrap_or(true),
                    max_size_bytes,
                })
            }
            StoreKind::Redis => {
                let Some(url) = &s.url else {
                    let at = s.kind.as_ref()?;
                    self.problem(Problem::spanned(
                        at,
                        "kind: redis needs url: redis://host:port",
                    ));
                    return None;
                };
                let text = self.expand_secret(url, SecretKind::Url)?;
                let raw = text.expose();
                if !(raw.starts_with("redis://")
                    || raw.starts_with("rediss://")
                    || raw.starts_with("redis+unix://"))
                {
                    let p = self.secret_problem(
                        url,
                        SecretKind::Url,
                        "store.url must start with redis://, rediss:// or redis+unix://",
                    );
                    self.problem(p);
                    return None;
                }
                if let Some(prefix) = s.key_prefix.as_deref() {
                    // The prefix becomes a cluster hash tag `{prefix}`: braces would break it.
                    if prefix.is_empty() || prefix.contains(['{', '}']) {
                        let at = s.kind.as_ref()?;
                        self.problem(Problem::spanned(
                            at,
                            "store.key_prefix must be non-empty and free of braces",
                        ));
                    }
                }
                // 0 stands for "not set": `check_claim_idle` fills in the default once the
                // rules (and so the longest timeout) are known.
                let claim_idle_ms = s
                    .claim_idle_ms
                    .as_ref()
                    .map(|_| self.positive(&s.claim_idle_ms, 0, "claim_idle_ms", 86_400_000))
                    .unwrap_or(0);
                let wait_replicas = match &s.wait_replicas {
                    Some(p) if !(0..=100).contains(&p.value) => {
                        self.problem(Problem::spanned(
                            p,
                            format!("wait_replicas must be between 0 and 100, got {}", p.value),
                        ));
                        0
                    }
                    Some(p) => p.value as u32,
                    None => 0,
                };
                let wait_timeout_ms =
                    self.positive(&s.wait_timeout_ms, 1000, "wait_timeout_ms", MAX_TIMEOUT_MS);
                Some(StoreSettings::Redis {
                    url: text,
                    key_prefix: s.key_prefix.clone().unwrap_or_else(|| "hookyard".into()),
                    claim_idle_ms,
                    wait_replicas,
                    wait_timeout_ms,
                })
            }
        }
    }

    fn tls(&mut self, config_path: &Path, s: &super::schema::TlsSection) -> Option<TlsTrust> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut extra = Vec::new();
        for file in &s.ca_files {
            let raw = self.expand(file)?;
            let mut path = PathBuf::from(raw);
            if path.is_relative() {
                if let Some(dir) = config_path.parent() {
                    path = dir.join(path);
                }
            }
            let certs: Result<Vec<_>, _> = match CertificateDer::pem_file_iter(&path) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    self.problem(Problem::spanned(
                        file,
                        format!("cannot read CA file {}: {e}", path.display()),
                    ));
                    continue;
                }
            };
            match certs {
                Ok(c) if !c.is_empty() => extra.extend(c),
                Ok(_) => self.problem(Problem::spanned(
                    file,
                    format!("{} holds no PEM certificate", path.display()),
                )),
                Err(e) => self.problem(Problem::spanned(file, format!("{}: {e}", path.display()))),
            }
        }
        match TlsTrust::new(extra) {
            Ok(t) => Some(t),
            Err(e) => {
                let at = s.ca_files.first()?;
                self.problem(Problem::spanned(at, e));
                None
            }
        }
    }

    /// Redis: a leased event idle for `claim_idle_ms` is handed to another instance. If that
    /// can happen while its first delivery is still inside its deadline, the event is delivered
    /// twice, so the idle time must exceed the longest rule timeout by a margin (signing, the
    /// tail of the HTTP exchange, recording the result). Unset, it defaults to whichever is
    /// larger of 30 s and that timeout + 5 s.
    fn check_claim_idle(
        &mut self,
        store: StoreSettings,
        s: &super::schema::StoreSection,
        rules: &RuleTable,
    ) -> StoreSettings {
        let StoreSettings::Redis {
            url,
            key_prefix,
            claim_idle_ms,
            wait_replicas,
            wait_timeout_ms,
        } = store
        else {
            return store;
        };
        let longest = rules
            .rules()
            .iter()
            .map(|r| r.timeout.as_millis() as u64)
            .max()
            .unwrap_or(DEFAULT_ASYNC_TIMEOUT_MS);
        let claim_idle_ms = match (&s.claim_idle_ms, claim_idle_ms) {
            (Some(p), set) if set > 0 && set < longest + CLAIM_IDLE_MARGIN_MS => {
                self.problem(Problem::spanned(
                    p,
                    format!(
                        "claim_idle_ms ({set}) must be at least the longest rule timeout_ms ({longest}) + {CLAIM_IDLE_MARGIN_MS}: \
                         a shorter idle time hands a delivery still in flight to another instance, which delivers it twice"
                    ),
                ));
                set
            }
            (_, 0) => DEFAULT_CLAIM_IDLE_MS.max(longest + 5_000),
            (_, set) => set,
        };
        StoreSettings::Redis {
            url,
            key_prefix,
            claim_idle_ms,
            wait_replicas,
            wait_timeout_ms,
        }
    }

    fn signing(&mut self, secrets: &Pos<Vec<Pos<String>>>) -> (Option<Signer>, bool) {
        if secrets.value.is_empty() {
            self.problem(Problem::spanned(
                secrets,
                "signing.secrets must list at least one whsec_ secret",
            ));
            return (None, false);
        }
        let mut parsed = Vec::new();
        let mut dev = false;
        for (i, s) in secrets.value.iter().enumerate() {
            let Some(text) = self.expand_secret(s, SecretKind::Opaque) else {
                continue;
            };
            dev |= text.expose() == DEVELOPMENT_SECRET;
            match Secret::parse(text.expose()) {
                Ok(secret) => parsed.push(secret),
                // The error names the format, never the secret's value.
                Err(e) => self.problem(Problem::secret(
                    s,
                    format!("signing.secrets[{i}]: invalid signing secret: {e}"),
                )),
            }
        }
        if parsed.len() != secrets.value.len() {
            return (None, dev);
        }
        // `parsed` is non-empty here (checked above), the only way `Signer::new` fails.
        (Signer::new(parsed).ok(), dev)
    }
}

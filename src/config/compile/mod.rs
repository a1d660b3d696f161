//! Validation and compilation of a parsed file into [`Settings`].
//!
//! Validation collects every problem rather than stopping at the first, so one `check` run
//! shows the user everything to fix.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::schema::IngressSection;
use super::schema::{ConfigFile, Pos};
use super::tree::{Expansion, SecretKind};
use super::EdgeLimits;
use super::{Problem, Settings, TlsTrust, DEVELOPMENT_SECRET};
use crate::signing::{Secret, Signer};

mod breaker;
mod hosts;
mod queues;
mod retry;
mod rules;
mod scalar;
mod store;

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

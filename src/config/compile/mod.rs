//! Validation and compilation of a parsed file into [`Settings`].
//!
//! Validation collects every problem rather than stopping at the first, so one `check` run
//! shows the user everything to fix.
//!
//! This file owns the compiler context (the problems collected so far and the `${VAR}`
//! expansion map), the top-level keys (`listen`, `admin`, `ingress` bodies and threads) and
//! `Compiler::settings`, whose order of calls is the order problems are reported in. Each
//! section has its own file: `scalar` (values every section uses), `ingress`, `store`,
//! `signing`, `tls`, `hosts` and `breaker`, `queues`, `retry` (schedules queues and rules
//! share) and `rules`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::schema::{ConfigFile, Pos};
use super::tree::{Expansion, SecretKind};
use super::{Problem, Settings};

mod breaker;
mod hosts;
mod ingress;
mod queues;
mod retry;
mod rules;
mod scalar;
mod signing;
mod store;
mod tls;

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
}

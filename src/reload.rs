//! Hot reload: one entry point for every trigger (file change, SIGHUP, admin API).
//!
//! A reload runs the same load -> validate -> compile path as `hookyard check`; only a valid
//! result replaces the running rules. A failure leaves them running, is logged with its line
//! and column, counted, and kept for `GET /v1/config`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::clock::now_ms;
use crate::config::{self, ConfigError};
use crate::context::{Context, ReloadReport};

/// The outcome of the most recent reload, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// `ok` or `error`.
    pub result: &'static str,
    pub at_ms: i64,
    /// What triggered it: `startup`, `file`, `sighup`, `api`.
    pub trigger: &'static str,
    /// The first problem, `file:line:column: message`, when it failed.
    pub error: Option<String>,
    /// Every problem, when it failed.
    pub problems: Vec<config::Problem>,
    /// Settings changed in the file that need a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Reloads the config file into the running [`Context`].
#[derive(Debug)]
pub struct Reloader {
    ctx: Arc<Context>,
    path: PathBuf,
    last: Mutex<ReloadStatus>,
    /// Serializes reloads so two triggers at once cannot interleave load and swap.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for `ctx`, reading `path`.
    pub fn new(ctx: Arc<Context>, path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            path,
            last: Mutex::new(ReloadStatus {
                result: "ok",
                at_ms: now_ms(),
                trigger: "startup",
                error: None,
                problems: Vec::new(),
                needs_restart: Vec::new(),
            }),
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// The config file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The last reload's outcome.
    pub fn last(&self) -> ReloadStatus {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the file and swaps the rules if it is valid.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, ConfigError> {
        let _one_at_a_time = self.running.lock().await;
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError::internal(
                    &self.path,
                    format!("reload task failed: {e}"),
                ))
            });
        let mut status = ReloadStatus {
            result: "ok",
            at_ms: now_ms(),
            trigger,
            error: None,
            problems: Vec::new(),
            needs_restart: Vec::new(),
        };
        let result = match loaded {
            Ok(settings) => {
                if settings.admin_is_open_remotely() {
                    warn_open_admin(&settings);
                }
                let report = self.ctx.reload(settings);
                // New rules, hosts and queues get their series at zero now, not at first use.
                crate::metric_series::register_all(&self.ctx.snapshot().settings);
                status.needs_restart = report.needs_restart.clone();
                if report.needs_restart.is_empty() {
                    tracing::info!(trigger, rules = report.rules, hash = %report.content_hash, "config reloaded");
                } else {
                    tracing::warn!(trigger, rules = report.rules, needs_restart = ?report.needs_restart, "config reloaded; some changed settings need a restart to take effect");
                }
                crate::metrics::config_reload("ok");
                Ok(report)
            }
            Err(e) => {
                tracing::error!(trigger, error = %e.summary(), "config reload rejected; the previous rules stay in force");
                crate::metrics::config_reload("error");
                status.result = "error";
                status.error = Some(e.summary());
                status.problems = e.problems.clone();
                Err(e)
            }
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = status;
        result
    }
}

/// The warning logged at start and on every reload while the admin API is open beyond
/// loopback (allowed only by `admin.allow_unauthenticated_remote: true`): it should be seen
/// every time, not once in a log long rotated away.
pub fn warn_open_admin(settings: &config::Settings) {
    tracing::warn!(
        admin_listen = %settings.admin_listen,
        "THE ADMIN API IS OPEN TO THE NETWORK WITHOUT A TOKEN (admin.allow_unauthenticated_remote: true): \
         anyone who reaches it can read the config, reload it and replay dead letters. Set admin.token."
    );
}

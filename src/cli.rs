//! What each subcommand does; `main.rs` only parses arguments and calls these.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::clock::rfc3339;
use crate::config::{self, Settings};
use crate::routing::DeliveryMode;
use crate::secret::{redact_url, Redacted};

/// A CLI failure, printed to stderr with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Serve(#[from] crate::server::ServeError),
    #[error("{0}")]
    Admin(String),
    /// An argument that cannot be used (the message never quotes a secret argument).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `hookyard check`: the compiled rule table.
pub fn check(path: &Path) -> Result<String, CliError> {
    let settings = config::load(path)?;
    Ok(rule_table(&settings))
}

/// Renders the compiled rules as a table.
pub fn rule_table(settings: &Settings) -> String {
    let rows: Vec<[String; 7]> = settings
        .rules
        .rules()
        .iter()
        .map(|r| {
            [
                r.pattern.to_string(),
                r.mode.as_str().to_string(),
                r.target.host.to_string(),
                format!("{}ms", r.timeout.as_millis()),
                match (r.mode, r.fallback_to_async) {
                    (DeliveryMode::Sync, true) => "async_dlq".into(),
                    (DeliveryMode::Sync, false) => "none".into(),
                    (DeliveryMode::Async, _) => "-".into(),
                },
                r.queue.to_string(),
                format!("{}", r.retry_delays_ms.len() + 1),
            ]
        })
        .collect();
    let header = [
        "EVENT TYPE",
        "MODE",
        "TARGET HOST",
        "TIMEOUT",
        "FALLBACK",
        "QUEUE",
        "ATTEMPTS",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            let sep = if i + 1 == cells.len() { "\n" } else { "  " };
            let _ = write!(out, "{cell:<w$}{sep}");
        }
    };
    line(&mut out, &header);
    for row in &rows {
        line(&mut out, &row.each_ref().map(String::as_str));
    }
    let _ = writeln!(
        out,
        "\n{} rule(s) OK; {} signing secret(s); store: {}",
        rows.len(),
        settings.signer.secret_count(),
        match &settings.store {
            config::StoreSettings::Sqlite { path, .. } => format!("sqlite {}", path.display()),
            config::StoreSettings::Redis { url, .. } => format!("redis {url}"),
        }
    );
    out
}

/// `hookyard serve`: runs until SIGTERM or SIGINT; SIGHUP reloads the rules.
pub async fn serve(path: &Path) -> Result<(), CliError> {
    let settings = config::load(path)?;
    if settings.uses_development_secret {
        tracing::warn!("SIGNING WITH THE SHIPPED DEVELOPMENT SECRET: receivers cannot trust these signatures. Set HOOKYARD_SECRET=whsec_... (or edit signing.secrets) before production use.");
    }
    if settings.admin_is_open_remotely() {
        crate::reload::warn_open_admin(&settings);
    }
    let server = crate::server::start(path.to_path_buf(), settings).await?;
    wait_for_signals(&server).await?;
    tracing::info!("shutting down: draining in-flight requests and deliveries");
    server.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signals(server: &crate::server::RunningServer) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                // The outcome is logged, counted and shown on /v1/config by the reloader.
                let _ = server.reloader.reload("sighup").await;
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_server: &crate::server::RunningServer) -> Result<(), CliError> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// `hookyard receive`: a verifying receiver until Ctrl-C.
pub async fn receive(
    addr: SocketAddr,
    config: crate::receive::ReceiverConfig,
) -> Result<(), CliError> {
    let receiver = crate::receive::Receiver::bind(addr, config).await?;
    println!(
        "receiving on http://{} (GET /stats for counts); Ctrl-C to stop",
        receiver.local_addr()
    );
    tokio::signal::ctrl_c().await?;
    let stats = receiver.stats();
    receiver.shutdown().await;
    println!(
        "{}",
        serde_json::to_string_pretty(&stats).unwrap_or_default()
    );
    Ok(())
}

/// A small client of the admin API for the `dlq` and `fallbacks` subcommands.
pub struct AdminClient {
    /// May carry userinfo; errors show it redacted.
    base: String,
    token: Option<Redacted>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client for the admin API at `base` (`http://127.0.0.1:9090`).
    pub fn new(base: &str, token: Option<Redacted>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request and returns the JSON answer, or the API's error reason.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let raw_url = format!("{}{}", self.base, path);
        // Messages show the base redacted (it may carry userinfo); the path is our own.
        let url = format!("{}{path}", redact_url(&self.base).trim_end_matches('/'));
        let mut builder = http::Request::builder().method(method).uri(&raw_url);
        if let Some(t) = &self.token {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {}", t.expose()))
                .map_err(|_| {
                    CliError::Admin("the admin token is not a valid header value".into())
                })?;
            value.set_sensitive(true);
            builder = builder.header(http::header::AUTHORIZATION, value);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = builder
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| CliError::Admin(format!("bad admin URL {url}: {e}")))?;
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .map_err(|_| CliError::Admin(format!("{url}: no answer within 30s")))?
            .map_err(|e| CliError::Admin(format!("cannot reach the admin API at {url}: {e} (is `hookyard serve` running? see --admin-url)")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::Admin(format!("{url}: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let reason = value
                .get("reason")
                .or_else(|| value.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CliError::Admin(format!("{status}: {reason}")));
        }
        Ok(value)
    }
}

/// Formats `GET /v1/dlq` output as a table.
pub fn dlq_table(page: &Value) -> String {
    let mut out = String::new();
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "{:<32}  {:<24}  {:<14}  {:>8}  {:<10}  DEAD-LETTERED AT",
        "EVENT ID", "EVENT TYPE", "REASON", "ATTEMPTS", "LAST"
    );
    for d in &items {
        let last = d["last_status"]
            .as_u64()
            .map(|s| s.to_string())
            .or_else(|| d["last_error"].as_str().map(str::to_string))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<32}  {:<24}  {:<14}  {:>8}  {:<10}  {}",
            d["id"].as_str().unwrap_or(""),
            d["event_type"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or(""),
            d["attempts"].as_u64().unwrap_or(0),
            last,
            rfc3339(d["dead_lettered_at_ms"].as_i64().unwrap_or(0)),
        );
    }
    let _ = writeln!(out, "{} dead letter(s)", items.len());
    if let Some(c) = page["next_cursor"].as_str() {
        let _ = writeln!(out, "more: --cursor {c}");
    }
    out
}

/// Formats `GET /v1/fallbacks` output as a table.
pub fn fallbacks_table(v: &Value) -> String {
    let mut out = String::new();
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "{:<26}  {:<32}  {:<34}  {:<22}  {:<13}  {:<14}  DELIVERED AT",
        "AT", "EVENT ID", "TRACE ID", "EVENT TYPE", "REASON", "STATE"
    );
    for f in &items {
        let _ = writeln!(
            out,
            "{:<26}  {:<32}  {:<34}  {:<22}  {:<13}  {:<14}  {}",
            rfc3339(f["at_ms"].as_i64().unwrap_or(0)),
            f["event_id"].as_str().unwrap_or(""),
            f["trace_id"].as_str().unwrap_or(""),
            f["event_type"].as_str().unwrap_or(""),
            f["reason"].as_str().unwrap_or(""),
            f["state"].as_str().unwrap_or(""),
            f["delivered_at_ms"]
                .as_i64()
                .map(rfc3339)
                .unwrap_or_else(|| "-".into()),
        );
    }
    let _ = writeln!(out, "{} fallback(s)", items.len());
    out
}

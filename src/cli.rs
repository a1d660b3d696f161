//! What each subcommand does; `main.rs` only parses arguments and calls these.

use std::fmt::Write as _;
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

/// Writes command output to stdout. A reader that went away (`hookyard schema | head -1`) ends
/// the output quietly, as Unix tools do, instead of a panic on the broken pipe.
pub fn print(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `hookyard check`: the compiled rule table.
pub fn check(path: &Path) -> Result<String, CliError> {
    let settings = config::load(path)?;
    Ok(rule_table(&settings))
}

/// `hookyard check --format json`, for editors and CI: `{"ok", "errors", "rules"}`, and
/// whether the config is valid. Each error has `file`, `line`, `column` (null when unknown),
/// `key` (the path of the key, null when none), `message` and `snippet` (the file's line, null
/// when it may hold a secret).
pub fn check_json(path: &Path) -> (String, bool) {
    let (ok, errors, rules) = match config::load(path) {
        Ok(settings) => (true, Vec::new(), rules_json(&settings)),
        Err(e) => {
            let errors = e
                .problems
                .iter()
                .map(|p| {
                    let known = |n: u64| (n > 0).then_some(n);
                    serde_json::json!({
                        "file": e.path.display().to_string(),
                        "line": known(p.line),
                        "column": known(p.column),
                        "key": p.key,
                        "message": p.message,
                        "snippet": e.snippet(p),
                    })
                })
                .collect();
            (false, errors, Vec::new())
        }
    };
    let out = serde_json::json!({ "ok": ok, "errors": errors, "rules": rules });
    (format!("{out:#}\n"), ok)
}

/// The compiled rules as JSON objects, the columns of [`rule_table`].
fn rules_json(settings: &Settings) -> Vec<Value> {
    settings
        .rules
        .rules()
        .iter()
        .map(|r| {
            serde_json::json!({
                "event_type": &*r.pattern,
                "mode": r.mode.as_str(),
                "target_host": r.target.host.to_string(),
                "timeout_ms": r.timeout.as_millis() as u64,
                "fallback": match (r.mode, r.fallback_to_async) {
                    (DeliveryMode::Sync, true) => Some("async_dlq"),
                    (DeliveryMode::Sync, false) => Some("none"),
                    (DeliveryMode::Async, _) => None,
                },
                "queue": &*r.queue,
                "attempts": r.retry_delays_ms.len() + 1,
            })
        })
        .collect()
}

/// Renders the compiled rules as a table.
pub fn rule_table(settings: &Settings) -> String {
    let rows: Vec<[String; 8]> = settings
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
                r.ordering_key
                    .as_ref()
                    .map_or_else(|| "-".into(), ToString::to_string),
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
        "ORDERING KEY",
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
#[cfg(feature = "receiver")]
pub async fn receive(
    addr: std::net::SocketAddr,
    config: crate::receive::ReceiverConfig,
) -> Result<(), CliError> {
    let receiver = crate::receive::Receiver::bind(addr, config).await?;
    print(&format!(
        "receiving on http://{} (GET /stats for counts); Ctrl-C to stop\n",
        receiver.local_addr()
    ))?;
    tokio::signal::ctrl_c().await?;
    let stats = receiver.stats();
    receiver.shutdown().await;
    print(&format!(
        "{}\n",
        serde_json::to_string_pretty(&stats).unwrap_or_default()
    ))
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

/// The dead letters a `dlq` command works on; every field narrows the selection.
#[derive(Debug, Clone, Default)]
pub struct DlqSelection {
    pub event_type: Option<String>,
    pub queue: Option<String>,
    /// RFC 3339, inclusive.
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    pub until: Option<String>,
}

impl DlqSelection {
    fn pairs(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("event_type", self.event_type.as_deref()),
            ("queue", self.queue.as_deref()),
            ("since", self.since.as_deref()),
            ("until", self.until.as_deref()),
        ]
    }

    fn is_empty(&self) -> bool {
        self.pairs().iter().all(|(_, v)| v.is_none())
    }
}

/// `?k=v&…` of the pairs that are set, percent-encoded; empty when none is.
fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (key, value) in pairs {
        if let Some(value) = value {
            query.append_pair(key, value);
            any = true;
        }
    }
    if any {
        format!("?{}", query.finish())
    } else {
        String::new()
    }
}

/// `hookyard dlq list`.
pub async fn dlq_list(
    client: &AdminClient,
    selection: &DlqSelection,
    limit: usize,
    cursor: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let limit = limit.to_string();
    let path = format!(
        "/v1/dlq{}",
        query(selection.pairs().into_iter().chain([
            ("limit", Some(limit.as_str())),
            ("cursor", cursor.as_deref())
        ]))
    );
    let page = client.call(http::Method::GET, &path, None).await?;
    if json {
        print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&page).unwrap_or_default()
        ))
    } else {
        print(&dlq_table(&page))
    }
}

/// How often `hookyard dlq replay` asks how its job is doing.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Failed polls in a row before `hookyard dlq replay` gives up watching (the job goes on).
const POLL_FAILURES: u32 = 5;

/// `hookyard dlq replay`: the given ids, or with `all` every dead letter the selection matches.
///
/// The sidecar replays in a background job; this starts it and polls `GET /v1/jobs/{id}`
/// until it ends, so a replay of any size finishes without a request timing out. Progress goes
/// to stderr: a bar on a terminal, otherwise a line now and then.
pub async fn dlq_replay(
    client: &AdminClient,
    ids: Vec<String>,
    all: bool,
    selection: &DlqSelection,
    dry_run: bool,
) -> Result<(), CliError> {
    let body = match (all, selection.is_empty()) {
        (true, true) => serde_json::json!({"all": true}),
        (true, false) => {
            let mut filter = serde_json::Map::new();
            for (key, value) in selection.pairs() {
                if let Some(value) = value {
                    filter.insert(key.into(), value.into());
                }
            }
            Value::Object(filter)
        }
        (false, true) => serde_json::json!({"ids": ids}),
        (false, false) => {
            return Err(CliError::Usage(
                "--event-type, --queue, --since and --until select with --all, not with ids".into(),
            ))
        }
    };
    let path = if dry_run {
        "/v1/dlq/replay?dry_run=true"
    } else {
        "/v1/dlq/replay"
    };
    let started = client.call(http::Method::POST, path, Some(body)).await?;
    let job_id = started["job_id"]
        .as_str()
        .ok_or_else(|| CliError::Admin(format!("the sidecar started no job: {started}")))?
        .to_string();
    let job = watch_job(client, &job_id).await?;
    let progress = &job["progress"];
    if job["state"] != "done" {
        let errors: Vec<&str> = job["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        return Err(CliError::Admin(format!(
            "replay job {job_id} failed after replaying {} of {}: {}",
            progress["replayed"],
            progress["matched"],
            errors.last().copied().unwrap_or("no reason given")
        )));
    }
    if dry_run {
        print(&format!(
            "would replay {}\n",
            job["counts"]["would_replay"].as_u64().unwrap_or(0)
        ))?;
    } else {
        print(&format!("replayed {}\n", progress["replayed"]))?;
    }
    let missing: Vec<&str> = job["missing_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CliError::Admin(format!(
            "not in the dead-letter queue: {}",
            missing.join(", ")
        )))
    }
}

/// Polls a job until it is no longer running, showing its progress on stderr; returns its
/// last state.
async fn watch_job(client: &AdminClient, job_id: &str) -> Result<Value, CliError> {
    use std::io::IsTerminal;
    let path = format!("/v1/jobs/{job_id}");
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let mut failures = 0;
    let mut last_line = (tokio::time::Instant::now(), None::<(u64, u64)>);
    loop {
        let job = match client.call(http::Method::GET, &path, None).await {
            Ok(job) => {
                failures = 0;
                job
            }
            Err(e) => {
                failures += 1;
                if failures >= POLL_FAILURES {
                    if let Some(bar) = &bar {
                        bar.abandon();
                    }
                    return Err(CliError::Admin(format!(
                        "lost track of replay job {job_id} (it goes on in the sidecar; GET {path}): {e}"
                    )));
                }
                tokio::time::sleep(POLL_EVERY * 4).await;
                continue;
            }
        };
        let p = &job["progress"];
        let matched = p["matched"].as_u64().unwrap_or(0);
        let done = matched.saturating_sub(p["remaining"].as_u64().unwrap_or(0));
        let running = job["state"] == "running";
        match &bar {
            Some(bar) => {
                bar.set_message(if job["dry_run"] == true {
                    "counting"
                } else {
                    "replaying"
                });
                bar.set_length(matched);
                bar.set_position(done);
                if !running {
                    bar.finish_and_clear();
                }
            }
            None => {
                // Plain lines for logs and pipes: when something moved, at most every 2 s.
                let now = tokio::time::Instant::now();
                let due = now.duration_since(last_line.0) >= Duration::from_secs(2);
                if (due || !running) && last_line.1 != Some((done, matched)) {
                    eprintln!(
                        "replay job {job_id}: {done}/{matched} done ({} replayed, {} skipped)",
                        p["replayed"], p["skipped"]
                    );
                    last_line = (now, Some((done, matched)));
                }
            }
        }
        if !running {
            return Ok(job);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `hookyard fallbacks`.
pub async fn fallbacks(
    client: &AdminClient,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> Result<(), CliError> {
    let limit = limit.to_string();
    let path = format!(
        "/v1/fallbacks{}",
        query([("since", since.as_deref()), ("limit", Some(limit.as_str()))])
    );
    let v = client.call(http::Method::GET, &path, None).await?;
    if json {
        print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        ))
    } else {
        print(&fallbacks_table(&v))
    }
}

/// `hookyard reload`: what the reload changed, or why the file was refused.
pub async fn reload(client: &AdminClient) -> Result<(), CliError> {
    let v = client
        .call(http::Method::POST, "/v1/config/reload", None)
        .await?;
    let report = &v["report"];
    let mut out = format!(
        "reloaded: {} rule(s), content hash {}\n",
        report["rules"],
        report["content_hash"].as_str().unwrap_or("?")
    );
    if let Some(restart) = report["needs_restart"].as_array().filter(|a| !a.is_empty()) {
        let names: Vec<&str> = restart.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(
            out,
            "changed but not applied until a restart: {}",
            names.join(", ")
        );
    }
    print(&out)
}

/// `hookyard circuits`.
pub async fn circuits(client: &AdminClient, json: bool) -> Result<(), CliError> {
    let v = client.call(http::Method::GET, "/v1/circuits", None).await?;
    if json {
        return print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        ));
    }
    print(&circuits_table(&v))
}

/// Formats `GET /v1/circuits` output as a table.
pub fn circuits_table(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28}  {:<9}  {:>7}  {:>8}  {:>6}  {:>9}  NEXT PROBE",
        "HOST", "STATE", "CALLS", "FAILURES", "RATE", "IN FLIGHT"
    );
    let hosts = v["hosts"].as_array().cloned().unwrap_or_default();
    for h in &hosts {
        let b = &h["breaker"];
        let number = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<28}  {:<9}  {:>7}  {:>8}  {:>6}  {:>9}  {}",
            h["host"].as_str().unwrap_or(""),
            b["state"].as_str().unwrap_or(""),
            number(&b["calls"]),
            number(&b["failures"]),
            b["rate"]
                .as_f64()
                .map_or_else(|| "-".into(), |r| format!("{:.0}%", r * 100.0)),
            format!(
                "{}/{}",
                number(&h["in_flight"]),
                number(&h["max_connections"])
            ),
            b["next_probe_at_ms"]
                .as_i64()
                .map_or_else(|| "-".into(), rfc3339),
        );
    }
    if let Some(disabled) = v["disabled_targets"].as_array().filter(|d| !d.is_empty()) {
        let names: Vec<&str> = disabled.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(
            out,
            "disabled by 410 Gone (POST /v1/targets/enable): {}",
            names.join(", ")
        );
    }
    out
}

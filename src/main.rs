//! The `hookyard` command line: parses arguments and calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hookyard::cli::{self, AdminClient, CliError};
use hookyard::receive::ReceiverConfig;
use hookyard::secret::Redacted;
use hookyard::signing::Secret;
use serde_json::json;

/// `print!` for command output: a reader that went away (`hookyard schema | head -1`) ends the
/// command quietly, as Unix tools do, instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// `println!` for command output; see [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

// glibc malloc showed up at about 7% of the sync hop's CPU (many small, short-lived
// allocations across threads); mimalloc's per-thread free lists serve that pattern better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A hybrid sync/async webhook dispatcher sidecar.
#[derive(Parser)]
#[command(name = "hookyard", version, about, long_about = None)]
struct Args {
    /// Log format on stderr: `human` (alias `text`) or `json`.
    #[arg(long, value_enum, env = "HOOKYARD_LOG_FORMAT", default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    #[value(alias = "text")]
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (ingress, admin API, delivery workers).
    Serve {
        /// Config file.
        #[arg(
            long,
            short,
            env = "HOOKYARD_CONFIG",
            default_value = "dispatcher-config.yaml"
        )]
        config: PathBuf,
    },
    /// Validate a config; print the compiled rules, or every error with file, line and column.
    Check {
        /// Config file.
        #[arg(
            long,
            short,
            env = "HOOKYARD_CONFIG",
            default_value = "dispatcher-config.yaml"
        )]
        config: PathBuf,
    },
    /// Print the JSON Schema of the config file (for editors).
    Schema,
    /// A verifying test receiver: checks signatures, counts duplicates, injects failures.
    Receive {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// whsec_ secret to verify with (repeat while rotating). Without it nothing is verified.
        // Taken as `Redacted`, not parsed by clap: clap quotes a rejected value in its error,
        // and `hide_env_values` keeps `--help` from printing the environment's value.
        #[arg(long, env = "HOOKYARD_SECRET", hide_env_values = true)]
        secret: Vec<Redacted>,
        /// Fraction of requests answered with --fail-status (0..=1).
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Status used for injected failures.
        #[arg(long, default_value_t = 500)]
        fail_status: u16,
        /// Delay before answering each request, in ms.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Answer every request with this status.
        #[arg(long)]
        status: Option<u16>,
        /// Accepted clock skew of webhook-timestamp, in seconds.
        #[arg(long, default_value_t = 300)]
        tolerance_secs: u64,
        /// How many webhook-ids answered 2xx to remember for duplicate counting (bounds memory).
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(2..))]
        remember_ids: u64,
    },
    /// Inspect and re-drive the dead-letter queue of a running sidecar.
    Dlq {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// List recorded sync_to_async fallbacks and whether each was delivered later.
    Fallbacks {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only transitions at or after this time (RFC 3339, e.g. 2026-11-23T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Most rows to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API of the running sidecar.
    // The URL may carry userinfo, so `--help` does not print the environment's value.
    #[arg(
        long,
        env = "HOOKYARD_ADMIN_URL",
        default_value = "http://127.0.0.1:9090",
        global = true,
        hide_env_values = true
    )]
    admin_url: String,
    /// Bearer token, when the sidecar sets admin.token.
    #[arg(
        long,
        env = "HOOKYARD_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<Redacted>,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters, newest first.
    List {
        #[arg(long)]
        event_type: Option<String>,
        #[arg(long)]
        queue: Option<String>,
        /// Dead-lettered at or after (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue from a previous page.
        #[arg(long)]
        cursor: Option<String>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replay dead letters by id, or all of them (optionally of one event type).
    Replay {
        /// Event ids to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Replay every dead letter (narrow with --event-type).
        #[arg(long)]
        all: bool,
        #[arg(long, requires = "all")]
        event_type: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

fn render_error(e: &CliError) -> String {
    match e {
        // Already formatted as "error: file:line:col: ..." with snippets.
        CliError::Config(c) => c.to_string().trim_end().to_string(),
        other => format!("error: {other}"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve { config } => cli::serve(&config).await,
        Command::Check { config } => {
            out!("{}", cli::check(&config)?);
            Ok(())
        }
        Command::Schema => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&hookyard::config::json_schema()).unwrap_or_default()
            );
            Ok(())
        }
        Command::Receive {
            listen,
            secret,
            fail_rate,
            fail_status,
            delay_ms,
            status,
            tolerance_secs,
            remember_ids,
        } => {
            let secrets = secret
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    // The error names which secret and why, never its value.
                    Secret::parse(s.expose()).map_err(|e| {
                        CliError::Usage(format!("--secret #{} (or HOOKYARD_SECRET): {e}", i + 1))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let config = ReceiverConfig {
                secrets,
                tolerance: Duration::from_secs(tolerance_secs),
                fail_rate,
                fail_status,
                force_status: status,
                delay: Duration::from_millis(delay_ms),
                remember_ids: usize::try_from(remember_ids).unwrap_or(usize::MAX),
                ..ReceiverConfig::default()
            };
            cli::receive(listen, config).await
        }
        Command::Dlq { admin, action } => {
            let client = AdminClient::new(&admin.admin_url, admin.token);
            match action {
                DlqAction::List {
                    event_type,
                    queue,
                    since,
                    limit,
                    cursor,
                    json,
                } => {
                    let path = format!(
                        "/v1/dlq{}",
                        query(&[
                            ("event_type", event_type),
                            ("queue", queue),
                            ("since", since),
                            ("limit", Some(limit.to_string())),
                            ("cursor", cursor),
                        ])
                    );
                    let page = client.call(http::Method::GET, &path, None).await?;
                    if json {
                        outln!(
                            "{}",
                            serde_json::to_string_pretty(&page).unwrap_or_default()
                        );
                    } else {
                        out!("{}", cli::dlq_table(&page));
                    }
                    Ok(())
                }
                DlqAction::Replay {
                    ids,
                    all,
                    event_type,
                } => {
                    let body = if all {
                        match event_type {
                            Some(t) => json!({"event_type": t}),
                            None => json!({"all": true}),
                        }
                    } else {
                        json!({"ids": ids})
                    };
                    let result = client
                        .call(http::Method::POST, "/v1/dlq/replay", Some(body))
                        .await?;
                    outln!("replayed {}", result["replayed"]);
                    let replayed: Vec<&str> = result["ids"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                        .unwrap_or_default();
                    let missing: Vec<&String> = ids
                        .iter()
                        .filter(|id| !replayed.contains(&id.as_str()))
                        .collect();
                    if missing.is_empty() {
                        Ok(())
                    } else {
                        Err(CliError::Admin(format!(
                            "not in the dead-letter queue: {}",
                            missing
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                    }
                }
            }
        }
        Command::Fallbacks {
            admin,
            since,
            limit,
            json,
        } => {
            let client = AdminClient::new(&admin.admin_url, admin.token);
            let path = format!(
                "/v1/fallbacks{}",
                query(&[("since", since), ("limit", Some(limit.to_string()))])
            );
            let v = client.call(http::Method::GET, &path, None).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                out!("{}", cli::fallbacks_table(&v));
            }
            Ok(())
        }
    }
}

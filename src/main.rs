//! The `hookyard` command line: parses arguments and calls into the library (`hookyard::cli`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "receiver")]
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hookyard::cli::{self, AdminClient, CliError, DlqSelection};
#[cfg(feature = "receiver")]
use hookyard::receive::ReceiverConfig;
use hookyard::secret::Redacted;
#[cfg(feature = "receiver")]
use hookyard::signing::Secret;

// glibc malloc showed up at about 7% of the sync hop's CPU (many small, short-lived
// allocations across threads); mimalloc's per-thread free lists serve that pattern better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `hookyard --version`: the crate version, the commit and the build date (see `build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("HOOKYARD_BUILD_COMMIT"),
    " ",
    env!("HOOKYARD_BUILD_DATE"),
    ")"
);

/// A hybrid sync/async webhook dispatcher sidecar.
#[derive(Parser)]
#[command(name = "hookyard", version = VERSION, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// How the commands that log (`serve`, `receive`) write their log lines to stderr.
#[derive(clap::Args)]
struct LogArgs {
    /// Log format: `human` (alias `text`; coloured only on a terminal, never with NO_COLOR)
    /// or `json` (one object per line). Verbosity: RUST_LOG (default `info`).
    #[arg(long, value_enum, env = "HOOKYARD_LOG_FORMAT", default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    #[value(alias = "text")]
    Human,
    Json,
}

/// What `hookyard check` prints.
#[derive(Clone, Copy, ValueEnum)]
enum CheckFormat {
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
        #[command(flatten)]
        log: LogArgs,
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
        /// Output: `human` (the rule table, or errors with snippets on stderr) or `json`
        /// (`{"ok", "errors", "rules"}` on stdout, for editors and CI). Exit code 1 on errors.
        #[arg(long, value_enum, default_value_t = CheckFormat::Human)]
        format: CheckFormat,
    },
    /// Print the JSON Schema of the config file (for editors).
    Schema,
    /// Print the OpenAPI 3.1 document of the ingress and admin APIs (as shipped in openapi.json).
    Openapi,
    /// Print a shell completion script, e.g. `hookyard completions bash > /etc/bash_completion.d/hookyard`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// A verifying test receiver: checks signatures, counts duplicates, injects failures.
    #[cfg(feature = "receiver")]
    Receive {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
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
        /// Seed for picking which requests fail at --fail-rate, so a run can be repeated.
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        log: LogArgs,
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
    /// Ask a running sidecar to reload its config file now (as SIGHUP does).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show each upstream host's circuit breaker, in-flight requests and connection cap.
    Circuits {
        #[command(flatten)]
        admin: AdminArgs,
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

impl AdminArgs {
    fn client(self) -> AdminClient {
        AdminClient::new(&self.admin_url, self.token)
    }
}

/// Which dead letters a `dlq` command works on.
#[derive(clap::Args)]
struct DlqFilterArgs {
    /// Only dead letters of this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Only dead letters of this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only dead letters dead-lettered at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Only dead letters dead-lettered before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
}

impl From<DlqFilterArgs> for DlqSelection {
    fn from(f: DlqFilterArgs) -> Self {
        DlqSelection {
            event_type: f.event_type,
            queue: f.queue,
            since: f.since,
            until: f.until,
        }
    }
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Most rows to show on this page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue from a previous page (the cursor it printed).
        #[arg(long)]
        cursor: Option<String>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replay dead letters by id, or every one that matches the filters given with --all.
    Replay {
        /// Event ids to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Replay every dead letter that matches the filters (all of them without one).
        #[arg(long)]
        all: bool,
        /// Count what would be replayed; replay nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        filter: DlqFilterArgs,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match &args.command {
        Command::Serve { log, .. } => init_logging(log.log_format),
        #[cfg(feature = "receiver")]
        Command::Receive { log, .. } => init_logging(log.log_format),
        _ => {}
    }
    if let Command::Check {
        config,
        format: CheckFormat::Json,
    } = &args.command
    {
        // Errors are part of the JSON on stdout, not lines on stderr.
        let (json, ok) = cli::check_json(config);
        return match (cli::print(&json), ok) {
            (Ok(()), true) => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        };
    }
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
    // Colour codes are for people at a terminal; in a file or a log pipeline they are noise.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve { config, .. } => cli::serve(&config).await,
        Command::Check { config, .. } => cli::print(&cli::check(&config)?),
        Command::Schema => cli::print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&hookyard::config::json_schema()).unwrap_or_default()
        )),
        Command::Openapi => cli::print(&hookyard::admin::openapi::document_json()),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "hookyard", &mut script);
            cli::print(&String::from_utf8_lossy(&script))
        }
        #[cfg(feature = "receiver")]
        Command::Receive {
            listen,
            secret,
            fail_rate,
            fail_status,
            delay_ms,
            status,
            tolerance_secs,
            remember_ids,
            seed,
            log: _,
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
                seed,
                ..ReceiverConfig::default()
            };
            cli::receive(listen, config).await
        }
        Command::Dlq { admin, action } => match action {
            DlqAction::List {
                filter,
                limit,
                cursor,
                json,
            } => cli::dlq_list(&admin.client(), &filter.into(), limit, cursor, json).await,
            DlqAction::Replay {
                ids,
                all,
                dry_run,
                filter,
            } => cli::dlq_replay(&admin.client(), ids, all, &filter.into(), dry_run).await,
        },
        Command::Fallbacks {
            admin,
            since,
            limit,
            json,
        } => cli::fallbacks(&admin.client(), since, limit, json).await,
        Command::Reload { admin } => cli::reload(&admin.client()).await,
        Command::Circuits { admin, json } => cli::circuits(&admin.client(), json).await,
    }
}

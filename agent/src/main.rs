//! `agent`: the sre-lab node agent.
//!
//! Exit codes: 0 clean shutdown / config ok, 1 runtime or config error, 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// `--features system-alloc` keeps the C library's malloc, for heap profilers (heaptrack)
// that hook malloc.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Scrapes Prometheus targets on this node and ships the samples to remote_write receivers.
#[derive(Parser, Debug)]
#[command(name = "agent", version, about, arg_required_else_help = true)]
struct Cli {
    /// The configuration file (Prometheus-compatible YAML).
    #[arg(long, short = 'c', env = "AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the agent's HTTP server (overrides `server.listen_address`).
    #[arg(long, env = "AGENT_LISTEN_ADDRESS")]
    listen_address: Option<String>,
    /// State directory (overrides `storage.path`).
    #[arg(long, env = "AGENT_STORAGE_PATH")]
    storage_path: Option<PathBuf>,
    /// Log filter, e.g. `info` or `agent=debug`.
    #[arg(long, env = "AGENT_LOG", default_value = "info")]
    log_level: String,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file: prints every error as FILE:LINE:COL: message (exit 1), or "ok".
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (include/mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Return freed memory to the OS at once rather than after 10 ms: scrape-sized buffers are
    // freed every scrape, and the delay kept ~25 MiB more resident at 100k series for no
    // measurable CPU gain (BENCHMARKS.md). MIMALLOC_PURGE_DELAY still overrides.
    if cfg!(not(feature = "system-alloc")) && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match agent::app::load(file).and_then(|(cfg, warnings)| {
            // Also what only shows when starting: TLS and credential files, rules, the sink.
            agent::app::preflight(&cfg, file).map_err(|e| format!("{}: {e:#}", file.display()))?;
            Ok((cfg, warnings))
        }) {
            Ok((_, warnings)) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let Some(config) = cli.config.clone() else {
        eprintln!("error: --config FILE is required\n\nUsage: agent --config FILE [--listen-address ADDR] [--storage-path DIR]\n       agent check-config FILE\n       agent --version");
        return ExitCode::from(2);
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let ov = agent::app::Overrides {
        listen_address: cli.listen_address,
        storage_path: cli.storage_path,
    };
    match rt.block_on(agent::app::run(config, ov)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

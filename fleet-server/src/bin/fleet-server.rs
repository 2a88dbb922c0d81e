//! `fleet-server --config fleet-server.toml`: parse, log, run, exit code.

use std::path::PathBuf;

use clap::Parser;
use fleet_server::config::ServerConfig;
use tokio_util::sync::CancellationToken;

const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EDGEFLEET_GIT_COMMIT"),
    ", target ",
    env!("EDGEFLEET_TARGET"),
    ")"
);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines; colour only on a terminal (never under
    /// journald or with NO_COLOR).
    Text,
    /// One JSON object per event (log shippers).
    Json,
}

#[derive(Parser)]
#[command(
    name = "fleet-server",
    version,
    long_version = LONG_VERSION,
    about = "edgefleet fleet server: bundle registry, devices, rollouts"
)]
struct Args {
    /// TOML configuration (see docs/fleet-server.md). Without it, defaults
    /// plus environment overrides apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration (keys, tokens, TLS files, data_dir) and exit:
    /// 0 if good, 2 with the file and key at fault.
    #[arg(long)]
    check_config: bool,
    /// Log format on stderr (env FLEET_SERVER_LOG_FORMAT); the level is
    /// FLEET_SERVER_LOG (e.g. `info`, `fleet_server=debug`).
    #[arg(
        long,
        env = "FLEET_SERVER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// Colour only for a person at a terminal: not into files or pipes, not
/// under journald (JOURNAL_STREAM), not with NO_COLOR.
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
        && std::env::var_os("JOURNAL_STREAM").is_none()
        && std::env::var_os("NO_COLOR").is_none()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_SERVER_LOG")
        .unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(colour()).init(),
    }
    let config = match args.config {
        Some(p) => ServerConfig::load(&p),
        None => {
            let mut c = ServerConfig::default();
            c.apply_env().map(|()| c)
        }
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if args.check_config {
        match fleet_server::server::check(&config) {
            Ok(lines) => {
                for l in lines {
                    println!("ok: {l}");
                }
                println!("config is good");
                return;
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            on_signal.cancel();
        }
    });
    if let Err(e) = fleet_server::server::run(config, shutdown).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

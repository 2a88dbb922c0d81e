//! `fleet-server --config fleet-server.toml`: parse, log, run, exit code.

use std::path::PathBuf;

use clap::Parser;
use fleet_server::config::ServerConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fleet-server",
    version,
    about = "edgefleet fleet server: bundle registry, devices, rollouts"
)]
struct Args {
    /// TOML configuration (see docs/fleet-server.md). Without it, defaults
    /// plus environment overrides apply.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_SERVER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
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

//! `edge-agent`: parse arguments, set up logging, run, map errors to exit codes.

use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

fn main() {
    #[allow(unsafe_code)]
    // SAFETY: first thing in `main`: the async runtime below starts the
    // process's other threads.
    unsafe {
        edgefleet_runtime::quiet_error_backtraces();
    }
    edgefleet_runtime::keep_kernels_in_bounds();
    edge_agent::mem::keep_large_blocks_for_reuse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(agent_main());
}

async fn agent_main() {
    let cli = edge_agent::cli::Cli::parse();
    // EDGE_AGENT_LOG: `info`, `edge_agent=debug,warn`, ... (target=level
    // lists; no span or field filters, which would need a regex engine).
    let filter = match std::env::var("EDGE_AGENT_LOG") {
        Ok(v) => v.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("EDGE_AGENT_LOG={v:?}: {e}; logging warnings and errors only");
            Targets::new().with_default(LevelFilter::WARN)
        }),
        Err(_) => Targets::new().with_default(LevelFilter::WARN),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        edge_agent::cli::LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json())
            .with(filter)
            .init(),
        edge_agent::cli::LogFormat::Text => tracing_subscriber::registry()
            .with(fmt.with_ansi(colour()))
            .with(filter)
            .init(),
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    if let Err(e) = edge_agent::cli::run(cli, shutdown).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Colour only for a person at a terminal: not into files or pipes, not
/// under journald (JOURNAL_STREAM), not with NO_COLOR.
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
        && std::env::var_os("JOURNAL_STREAM").is_none()
        && std::env::var_os("NO_COLOR").is_none()
}

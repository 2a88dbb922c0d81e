//! `fleet-server --config fleet-server.toml`: parse, log, run, exit code.
//! Subcommands act on the configured store and exit: `migrate`, `export`,
//! `import`.

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
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
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

#[derive(clap::Subcommand)]
enum Command {
    /// Create or upgrade the store's schema and exit (PostgreSQL: applies
    /// the migrations this binary carries; sled: upgrades its layout).
    /// Starting the server does the same; this runs it ahead of a rollout
    /// of new replicas.
    Migrate,
    /// Write the whole store (devices with their credential hashes,
    /// bundles, rollouts, tokens, trust chain, windows, audit log) as one
    /// JSON document. With the server stopped.
    Export {
        /// Where to write; `-` for stdout.
        #[arg(long, default_value = "-")]
        out: PathBuf,
    },
    /// Load an `export` document into the configured store, which must be
    /// empty: the way from sled to PostgreSQL without re-enrolling devices.
    Import {
        /// The document `export` wrote; `-` for stdin.
        #[arg(long = "in", default_value = "-")]
        input: PathBuf,
    },
}

/// Runs a store subcommand; what it prints goes to stdout, the document
/// of `export` to `out`.
fn store_command(config: &ServerConfig, command: Command) -> Result<(), String> {
    use fleet_server::store::export;
    let store = fleet_server::store::open(config).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match command {
        Command::Migrate => {
            println!("the {} store is at the current schema", store.backend());
        }
        Command::Export { out } => {
            let doc = export::export(store.as_ref(), now).map_err(|e| e.to_string())?;
            let counts = doc.counts();
            let write = |w: &mut dyn std::io::Write| {
                serde_json::to_writer(&mut *w, &doc).map_err(std::io::Error::other)?;
                w.flush()
            };
            if out.as_os_str() == "-" {
                write(&mut std::io::stdout().lock())
            } else {
                // Written beside the target, then renamed: never half a file.
                let tmp = out.with_extension("partial");
                std::fs::File::create(&tmp)
                    .map(std::io::BufWriter::new)
                    .and_then(|mut f| write(&mut f))
                    .and_then(|()| std::fs::rename(&tmp, &out))
            }
            .map_err(|e| format!("{}: {e}", out.display()))?;
            eprintln!("exported {counts} from the {} store", store.backend());
        }
        Command::Import { input } => {
            // Writing under a running server would leave its memory stale.
            let active = store
                .acquire_active(
                    &fleet_server::store::LeaseHolder {
                        name: "fleet-server import".into(),
                        ..Default::default()
                    },
                    &|_| false,
                )
                .map_err(|e| e.to_string())?;
            if active.is_none() {
                return Err(
                    "a fleet-server is active on this database: stop it before importing".into(),
                );
            }
            let text = if input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&input)
            }
            .map_err(|e| format!("{}: {e}", input.display()))?;
            let doc: export::Export = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a store export: {e}", input.display()))?;
            let counts = export::import(store.as_ref(), doc).map_err(|e| e.to_string())?;
            println!("imported {counts} into the {} store", store.backend());
        }
    }
    Ok(())
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
        // It may connect to the store, whose client blocks.
        let c = config.clone();
        let checked = tokio::task::spawn_blocking(move || fleet_server::server::check(&c))
            .await
            .unwrap_or_else(|e| Err(fleet_server::error::Error::Store(e.to_string())));
        match checked {
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
    if let Some(command) = args.command {
        // The store clients block: keep them off the async runtime.
        let done = tokio::task::spawn_blocking(move || store_command(&config, command)).await;
        match done {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
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

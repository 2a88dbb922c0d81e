//! `edge-agent` subcommands. Shapes are a public interface: extend, never rename.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use edgefleet_runtime::tract_nnef::prelude::*;
use edgefleet_wire::bundle::Limits;
use edgefleet_wire::npz::{NpzLimits, read_npz, to_npz_bytes};
use edgefleet_wire::tensor::NamedTensor;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig};
use crate::bundle::{TrustedBundle, open_file, trust_root_from_files};
use crate::engine::{Engine, EngineConfig, prepare, prepare_with};
use crate::error::AgentError;
use crate::metrics::Metrics;
use crate::procstat;
use edgefleet_runtime::to_tract;

#[cfg(feature = "onnx")]
macro_rules! model_formats {
    () => {
        "onnx, nnef"
    };
}
#[cfg(not(feature = "onnx"))]
macro_rules! model_formats {
    () => {
        "nnef (an NNEF-only build)"
    };
}

/// `--version`: the version, commit, target, tract and the model formats
/// this build loads.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EDGEFLEET_GIT_COMMIT"),
    ", target ",
    env!("EDGEFLEET_TARGET"),
    ", tract 0.23.9, model formats: ",
    model_formats!(),
    ")"
);

/// How the daemons write their logs to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; colour only on a terminal (never under
    /// journald or with NO_COLOR).
    #[default]
    Text,
    /// One JSON object per event (log shippers).
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "edge-agent",
    version,
    long_version = LONG_VERSION,
    about = "edgefleet device agent: serve verified ONNX model bundles with tract"
)]
pub struct Cli {
    /// Log format on stderr (env EDGE_AGENT_LOG_FORMAT); the level is
    /// EDGE_AGENT_LOG (e.g. `info`, `edge_agent=debug,warn`).
    #[arg(
        long,
        global = true,
        env = "EDGE_AGENT_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct BundleArgs {
    /// A signed model bundle.
    #[arg(long, value_name = "FILE")]
    pub bundle: PathBuf,
    /// Trusted public key (repeatable).
    #[arg(long = "trust", value_name = "KEY.pub", required = true)]
    pub trust: Vec<PathBuf>,
    /// Distinct trusted signatures required.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    Check {
        #[arg(long, value_name = "agent.toml", env = "EDGE_AGENT_CONFIG")]
        config: PathBuf,
        /// Also reach the fleet server (`/healthz`) and the MQTT broker.
        #[arg(long)]
        reach: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The device daemon: enroll, poll the desired state, install, watch,
    /// roll back, report; serves the local inference API throughout.
    Run {
        #[arg(long, value_name = "agent.toml", env = "EDGE_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Check a config without running: parse it, load the trust keys and
    /// chain, the TLS files and the credential; with --reach, also contact
    /// the fleet server and the broker. Exit 1 with the file and the key
    /// at fault.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Sideload a bundle into the running agent (no server needed): the
    /// same verify, self-test, swap and watch path as a server update.
    Install {
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// The agent's config (for its API address and token).
        #[arg(long, value_name = "agent.toml", env = "EDGE_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// The agent's local API, if not taken from --config.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        agent: String,
        #[arg(long, env = "EDGE_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Seconds to wait for the install to finish (0: don't wait).
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Serve a verified bundle on the local HTTP API.
    Serve {
        #[command(flatten)]
        bundle: BundleArgs,
        /// Listen address; non-loopback addresses require --token.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Inference worker threads (one tract state each).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Requests that may wait for a worker before 503.
        #[arg(long, default_value_t = 16)]
        queue: usize,
        /// Compute threads one inference may use (a pool per worker).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = 64 * 1024 * 1024)]
        max_body_bytes: usize,
        /// Bearer token for /v1/* and /metrics.
        #[arg(long, env = "EDGE_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Send inference requests to an agent at a steady rate (demos, soak
    /// tests) until interrupted; prints the counts at the end.
    Load {
        /// The agent's local API.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Request body (.npz keyed by input name).
        #[arg(long, value_name = "IN.npz")]
        input: PathBuf,
        /// Requests per second.
        #[arg(long, default_value_t = 10.0)]
        rps: f64,
        /// Stop after this many seconds (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        #[arg(long, env = "EDGE_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Save the last successful response body here.
        #[arg(long, value_name = "OUT.npz")]
        output: Option<PathBuf>,
    },
    /// Compare two .npz files tensor by tensor (e.g. ARM vs x86 outputs, or
    /// outputs vs. reference). Exit 1 if any element differs by more than
    /// the tolerance.
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
    },
    /// Offline inference on .npz files (no server).
    Infer {
        #[command(flatten)]
        bundle: BundleArgs,
        #[arg(
            long,
            value_name = "IN.npz",
            requires = "outputs",
            conflicts_with = "input_dir"
        )]
        inputs: Option<PathBuf>,
        #[arg(long, value_name = "OUT.npz")]
        outputs: Option<PathBuf>,
        /// Run every .npz file in this folder.
        #[arg(long, value_name = "DIR", requires = "output_dir")]
        input_dir: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
    },
    /// Measure load time and inference latency of a bundle.
    Bench {
        #[command(flatten)]
        bundle: BundleArgs,
        #[arg(long, default_value_t = 100)]
        iterations: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Which path to time.
        #[arg(long, value_enum, default_value_t = BenchMode::InProcess)]
        mode: BenchMode,
        /// Compute threads per inference (`[engine] threads`).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Also time every node of the plan and print the N most expensive
        /// op kinds (per inference, over the timed iterations).
        #[arg(long, value_name = "N")]
        profile: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Keep and load the model compiled in this directory, as the
        /// daemon does next to its bundles (`[engine] keep_compiled`): the
        /// first run writes it, later runs time a restart's load.
        #[arg(long, value_name = "DIR")]
        compiled: Option<PathBuf>,
    },
}

/// What `bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// The agent's engine: validation, queue, worker thread, conversion.
    InProcess,
    /// Local HTTP API with JSON bodies (client in the same process).
    HttpJson,
    /// Local HTTP API with .npz bodies.
    HttpNpz,
    /// tract alone: a plan run on pre-built input values, nothing else.
    Bare,
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<(), AgentError> {
    match cli.command {
        Command::Run { config } => {
            let cfg = crate::config::AgentConfig::load(&config)?;
            crate::daemon::run(cfg, shutdown).await
        }
        Command::Config(ConfigCommand::Check { config, reach }) => {
            for line in crate::check::check(&config, reach).await? {
                println!("ok: {line}");
            }
            println!("config {} is good", config.display());
            Ok(())
        }
        Command::Compare { a, b, tolerance } => compare(&a, &b, tolerance),
        Command::Load {
            url,
            input,
            rps,
            seconds,
            token,
            output,
        } => {
            load(
                &url,
                &input,
                rps,
                seconds,
                token.as_deref(),
                output.as_deref(),
                shutdown,
            )
            .await
        }
        Command::Install {
            bundle,
            config,
            agent,
            token,
            wait,
        } => {
            let (agent, token) = match config {
                Some(p) => {
                    let cfg = crate::config::AgentConfig::load(&p)?;
                    (
                        format!("http://{}", cfg.http.listen),
                        token.or(cfg.http.token),
                    )
                }
                None => (agent, token),
            };
            install(&bundle, &agent, token.as_deref(), wait).await
        }
        Command::Serve {
            bundle,
            listen,
            workers,
            queue,
            threads,
            max_body_bytes,
            token,
        } => {
            let api = ApiConfig {
                listen,
                max_body_bytes,
                token,
            };
            serve(
                &bundle,
                EngineConfig {
                    workers,
                    queue,
                    threads,
                },
                api,
                shutdown,
            )
            .await
        }
        Command::Infer {
            bundle,
            inputs,
            outputs,
            input_dir,
            output_dir,
        } => tokio::task::spawn_blocking(move || {
            infer_files(&bundle, inputs, outputs, input_dir, output_dir)
        })
        .await
        .map_err(|e| AgentError::Invariant(e.to_string()))?,
        Command::Bench {
            bundle,
            iterations,
            warmup,
            mode,
            threads,
            profile,
            json,
            compiled,
        } => {
            let opts = BenchOptions {
                iterations: iterations.max(1),
                warmup,
                mode,
                threads,
                profile,
                json,
            };
            bench(&bundle, &opts, compiled).await
        }
    }
}

fn open(args: &BundleArgs) -> Result<TrustedBundle, AgentError> {
    let root = trust_root_from_files(&args.trust, args.threshold)?;
    open_file(&args.bundle, &root, &Limits::default())
}

async fn serve(
    args: &BundleArgs,
    engine_cfg: EngineConfig,
    api_cfg: ApiConfig,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    api_cfg.validate()?;
    let bundle = open(args)?;
    let (active, _) = tokio::task::spawn_blocking(move || prepare(bundle))
        .await
        .map_err(|e| AgentError::Invariant(e.to_string()))??;
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(engine_cfg, metrics.clone())?;
    let info = engine.activate(active).info.clone();
    let listener = tokio::net::TcpListener::bind(api_cfg.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: api_cfg.listen.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::Invariant(e.to_string()))?;
    // Tests and scripts read this line to find an ephemeral port.
    println!(
        "listening on http://{addr} serving {} {}",
        info.name, info.version
    );
    tracing::info!(%addr, model = %info.name, version = %info.version, "serving");
    api::serve(listener, api::router(engine, metrics, &api_cfg), shutdown)
        .await
        .map_err(|source| AgentError::Listen {
            addr: addr.to_string(),
            source,
        })
}

fn read_npz_file(path: &Path) -> Result<Vec<NamedTensor>, AgentError> {
    let f = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    read_npz(std::io::BufReader::new(f), NpzLimits::default()).map_err(|source| {
        AgentError::Bundle {
            path: path.display().to_string(),
            source,
        }
    })
}

fn infer_files(
    args: &BundleArgs,
    inputs: Option<PathBuf>,
    outputs: Option<PathBuf>,
    input_dir: Option<PathBuf>,
    output_dir: Option<PathBuf>,
) -> Result<(), AgentError> {
    let bundle = open(args)?;
    let (active, _) = prepare(bundle)?;
    let mut session = active.model.session()?;
    let mut run_one = |src: &Path, dst: &Path| -> Result<(), AgentError> {
        let outs = session.run(&read_npz_file(src)?)?;
        let bytes = to_npz_bytes(&outs).map_err(|source| AgentError::Bundle {
            path: dst.display().to_string(),
            source,
        })?;
        std::fs::write(dst, bytes).map_err(|e| AgentError::io(dst, e))
    };
    match (inputs, outputs, input_dir, output_dir) {
        (Some(i), Some(o), None, None) => run_one(&i, &o),
        (None, None, Some(idir), Some(odir)) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&idir)
                .map_err(|e| AgentError::io(&idir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "npz"))
                .collect();
            files.sort();
            std::fs::create_dir_all(&odir).map_err(|e| AgentError::io(&odir, e))?;
            let bar = indicatif::ProgressBar::new(files.len() as u64);
            for f in &files {
                let name = f.file_name().unwrap_or_default();
                run_one(f, &odir.join(name))?;
                bar.inc(1);
            }
            bar.finish();
            eprintln!("{} file(s) -> {}", files.len(), odir.display());
            Ok(())
        }
        _ => Err(AgentError::Config(
            "give --inputs with --outputs, or --input-dir with --output-dir".into(),
        )),
    }
}

/// Nearest rank, as in telemetry and the watch window (0 for no samples).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    edgefleet_wire::stats::nearest_rank(sorted, p).unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What `edge-agent bench` runs.
#[derive(Clone, Copy, Debug)]
struct BenchOptions {
    iterations: usize,
    warmup: usize,
    mode: BenchMode,
    threads: usize,
    profile: Option<usize>,
    json: bool,
}

/// What one `bench` run measured.
struct Measured {
    /// The agent's one-time warm-up at start (front ends), not part of any
    /// model's cold start.
    warm_up: Duration,
    verify: Duration,
    timings: crate::engine::PrepareTimings,
    first: Duration,
    samples: Vec<f64>,
    profile: Vec<edgefleet_runtime::OpProfile>,
}

async fn bench(
    args: &BundleArgs,
    opts: &BenchOptions,
    compiled: Option<PathBuf>,
) -> Result<(), AgentError> {
    let (iterations, warmup, mode) = (opts.iterations, opts.warmup, opts.mode);
    // As the daemon does at start, before any bundle arrives.
    let warm_up = tokio::task::spawn_blocking(edgefleet_runtime::warm_up)
        .await
        .map_err(|e| AgentError::Invariant(e.to_string()))?;
    let t0 = Instant::now();
    let bundle = open(args)?;
    let verify = t0.elapsed();
    let inputs = bundle.manifest.golden.cases[0].inputs.clone();
    let name = format!("{} {}", bundle.manifest.name, bundle.manifest.version);
    let format = bundle.manifest.payload.format;
    let threads = edgefleet_runtime::Threads::new(opts.threads, "tract")?;

    if mode == BenchMode::Bare || opts.profile.is_some() {
        // tract alone: no engine, no self-test, nothing else resident.
        let profile = opts.profile.map(|_| iterations);
        let (load, first, samples, ops) = tokio::task::spawn_blocking(move || {
            threads.run(|| bare_tract(&bundle, &inputs, warmup, iterations, profile))
        })
        .await
        .map_err(|e| AgentError::Invariant(e.to_string()))??;
        let timings = crate::engine::PrepareTimings {
            load: load.parse,
            optimize: load.optimize,
            self_test: Duration::ZERO,
            graph_preparsed: load.graph_preparsed,
            compiled: false,
        };
        let m = Measured {
            warm_up,
            verify,
            timings,
            first,
            samples,
            profile: ops,
        };
        return report(&name, format, BenchMode::Bare, opts, m);
    }
    // The bundle moves in and is dropped there, as in the daemon: the
    // resident set at the end is what a device keeps.
    // The daemon names a compiled model after its bundle's content address,
    // which it already has; a bench names it by the manifest's digest,
    // outside the timed phases.
    let compiled = match compiled {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
            Some(crate::engine::Compiled {
                models: crate::compiled::CompiledModels::new(dir),
                key: hex::encode(bundle.manifest.digest()),
            })
        }
        None => None,
    };
    let prepared = tokio::task::spawn_blocking(move || prepare_with(bundle, compiled))
        .await
        .map_err(|e| AgentError::Invariant(e.to_string()))??;
    let (active, timings, compiling) = (prepared.model, prepared.timings, prepared.compiling);
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(
        EngineConfig {
            threads: opts.threads,
            ..EngineConfig::default()
        },
        metrics.clone(),
    )?;
    engine.activate(active);

    let mut samples = Vec::with_capacity(iterations);
    let first;
    if mode == BenchMode::InProcess {
        let t = Instant::now();
        engine.infer(inputs.clone()).await.map_err(infer_err)?;
        first = t.elapsed();
        for i in 0..warmup + iterations {
            let t = Instant::now();
            engine.infer(inputs.clone()).await.map_err(infer_err)?;
            if i >= warmup {
                samples.push(ms(t.elapsed()));
            }
        }
    } else {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| AgentError::Listen {
                addr: "127.0.0.1:0".into(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| AgentError::Invariant(e.to_string()))?;
        let stop = CancellationToken::new();
        let app = api::router(engine.clone(), metrics.clone(), &ApiConfig::default());
        let server = tokio::spawn(api::serve(listener, app, stop.clone()));
        let client = crate::tls::default_client();
        let url = format!("http://{addr}/v1/infer");
        let (ct, body) = if mode == BenchMode::HttpNpz {
            let b = to_npz_bytes(&inputs).map_err(|e| AgentError::Invariant(e.to_string()))?;
            (api::NPZ_CONTENT_TYPE, b)
        } else {
            let b = crate::codec::encode_request(&inputs)
                .map_err(|e| AgentError::Invariant(e.to_string()))?;
            ("application/json", b)
        };
        let post = || async {
            let r = client
                .post(&url)
                .header("content-type", ct)
                .body(body.clone())
                .send()
                .await
                .map_err(|e| AgentError::Invariant(format!("bench request: {e}")))?;
            if !r.status().is_success() {
                return Err(AgentError::Invariant(format!(
                    "bench request: HTTP {}",
                    r.status()
                )));
            }
            r.bytes()
                .await
                .map_err(|e| AgentError::Invariant(format!("bench response: {e}")))
        };
        let t = Instant::now();
        post().await?;
        first = t.elapsed();
        for i in 0..warmup + iterations {
            let t = Instant::now();
            post().await?;
            if i >= warmup {
                samples.push(ms(t.elapsed()));
            }
        }
        stop.cancel();
        let _ = server.await;
    }
    if let Some(writing) = compiling
        && writing.join().is_err()
    {
        return Err(AgentError::Invariant(
            "keeping the model compiled panicked".into(),
        ));
    }
    let m = Measured {
        warm_up,
        verify,
        timings,
        first,
        samples,
        profile: Vec::new(),
    };
    report(&name, format, mode, opts, m)
}

fn report(
    name: &str,
    format: edgefleet_wire::manifest::ModelFormat,
    mode: BenchMode,
    opts: &BenchOptions,
    m: Measured,
) -> Result<(), AgentError> {
    let Measured {
        warm_up,
        verify,
        timings,
        first,
        mut samples,
        profile,
    } = m;
    let as_json = opts.json;
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let top = opts.profile.unwrap_or(0);
    let ops: Vec<_> = profile
        .iter()
        .take(top)
        .map(|p| json!({"op": p.op, "nodes": p.nodes.len(), "ms": ms(p.total)}))
        .collect();
    let report = json!({
        "model": name,
        "format": format,
        "mode": mode.to_possible_value().map(|v| v.get_name().to_string()),
        "threads": opts.threads,
        "iterations": samples.len(),
        "warm_up_ms": ms(warm_up),
        "verify_ms": ms(verify),
        "load_ms": ms(timings.load),
        "optimize_ms": ms(timings.optimize),
        "self_test_ms": ms(timings.self_test),
        "graph_preparsed": timings.graph_preparsed,
        "compiled": timings.compiled,
        "first_inference_ms": ms(first),
        "min_ms": samples[0],
        "median_ms": percentile(&samples, 0.5),
        "p90_ms": percentile(&samples, 0.9),
        "p99_ms": percentile(&samples, 0.99),
        "mean_ms": mean,
        "rss_bytes": procstat::rss_bytes(),
        "profile": ops,
    });
    if as_json {
        println!("{report}");
    } else {
        println!(
            "{name} ({format}), mode {mode:?}, {} iterations",
            samples.len()
        );
        println!(
            "  load: verify {:.1} ms, load {:.1} ms, optimize {:.1} ms, self-test {:.1} ms, first inference {:.2} ms",
            ms(verify),
            ms(timings.load),
            ms(timings.optimize),
            ms(timings.self_test),
            ms(first)
        );
        println!(
            "  latency ms: min {:.3}  median {:.3}  p90 {:.3}  p99 {:.3}",
            samples[0],
            percentile(&samples, 0.5),
            percentile(&samples, 0.9),
            percentile(&samples, 0.99)
        );
        println!("  rss: {:.1} MiB", procstat::rss_bytes() as f64 / 1048576.0);
        if !profile.is_empty() {
            let all: f64 = profile.iter().map(|p| ms(p.total)).sum();
            println!("  top ops (ms per inference, {:.3} ms in all ops):", all);
            for p in profile.iter().take(top) {
                println!(
                    "    {:>8.3}  {:>5.1}%  {:>3} nodes  {}",
                    ms(p.total),
                    100.0 * ms(p.total) / all.max(f64::MIN_POSITIVE),
                    p.nodes.len(),
                    p.op
                );
            }
        }
    }
    Ok(())
}

fn infer_err(e: crate::engine::InferError) -> AgentError {
    match e {
        crate::engine::InferError::Runtime(r) => AgentError::Runtime(r),
        crate::engine::InferError::Submit(s) => AgentError::Invariant(format!("{s:?}")),
    }
}

/// tract with nothing around it: its own plan, inputs converted once.
type BareRun = (
    edgefleet_runtime::LoadTimings,
    Duration,
    Vec<f64>,
    Vec<edgefleet_runtime::OpProfile>,
);

fn bare_tract(
    bundle: &TrustedBundle,
    inputs: &[NamedTensor],
    warmup: usize,
    iterations: usize,
    profile: Option<usize>,
) -> Result<BareRun, AgentError> {
    let t0 = Instant::now();
    let model = bundle.use_model(|bytes| {
        edgefleet_runtime::Model::load(
            bundle.model.format(),
            bytes,
            &bundle.manifest.inputs,
            Some(&bundle.manifest.outputs),
        )
    })??;
    let mut load = model.load_timings();
    // Any wait for the model's digest after the load counts as loading.
    load.parse = t0.elapsed().saturating_sub(load.optimize);
    let mut session = model.session()?;
    let values: TVec<TValue> = inputs
        .iter()
        .map(|t| to_tract(&t.tensor).map(IntoTValue::into_tvalue))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    session.run_values(values.clone())?;
    let first = t.elapsed();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let t = Instant::now();
        session.run_values(values.clone())?;
        if i >= warmup {
            samples.push(ms(t.elapsed()));
        }
    }
    let ops = match profile {
        Some(n) => session.profile(values, n)?,
        None => Vec::new(),
    };
    Ok((load, first, samples, ops))
}

/// `edge-agent install`: hand the bundle to the running agent, then follow
/// its update state until the bundle is active, failed or rolled back.
async fn install(
    bundle: &Path,
    agent: &str,
    token: Option<&str>,
    wait: u64,
) -> Result<(), AgentError> {
    let bytes = std::fs::read(bundle).map_err(|e| AgentError::io(bundle, e))?;
    let http = crate::tls::default_client();
    let base = agent.trim_end_matches('/');
    let url = format!("{base}/v1/install");
    let authed = |rb: reqwest::RequestBuilder| match token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let resp = authed(http.post(&url).body(bytes))
        .send()
        .await
        .map_err(|e| AgentError::Http {
            url: url.clone(),
            detail: format!("{e} (is `edge-agent run` running?)"),
        })?;
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    if !status.is_success() {
        let err = serde_json::from_slice::<edgefleet_wire::api::v1::ErrorBody>(&body).ok();
        return Err(AgentError::Server {
            url,
            status: status.as_u16(),
            code: err
                .as_ref()
                .map_or_else(|| "unknown".into(), |e| e.error.code.clone()),
            message: err.map(|e| e.error.message).unwrap_or_default(),
        });
    }
    let accepted: edgefleet_wire::device::BundleRef =
        serde_json::from_slice(&body).map_err(|e| AgentError::Http {
            url: url.clone(),
            detail: format!("unexpected answer: {e}"),
        })?;
    let id = accepted.id.clone();
    println!("accepted {} {} ({id})", accepted.name, accepted.version);
    if wait == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(wait);
    let status_url = format!("{base}/v1/status");
    let mut last = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(r) = authed(http.get(&status_url)).send().await else {
            continue;
        };
        let Ok(s) =
            serde_json::from_slice::<crate::api::StatusView>(&r.bytes().await.unwrap_or_default())
        else {
            continue;
        };
        if last != Some(s.state) {
            println!("state {}", s.state.as_str());
            last = Some(s.state);
        }
        let rec = &s.record;
        let active = rec.active.as_ref().is_some_and(|a| a.id == id);
        let failed = rec.last_failed.as_ref().is_some_and(|f| f.id == id);
        use edgefleet_wire::device::UpdateState as S;
        match s.state {
            S::Committed | S::Idle if active => {
                println!("installed and committed");
                return Ok(());
            }
            S::Failed | S::RolledBack if failed => {
                return Err(AgentError::Refused(format!(
                    "install failed: {}",
                    rec.reason.as_deref().unwrap_or("unknown reason")
                )));
            }
            _ => {}
        }
    }
    let last = last.map_or("none", |s| s.as_str());
    Err(AgentError::Refused(format!(
        "install not finished after {wait} s (last state {last})"
    )))
}

/// `edge-agent load`: steady request rate; counts answers by status.
async fn load(
    url: &str,
    input: &Path,
    rps: f64,
    seconds: u64,
    token: Option<&str>,
    output: Option<&Path>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    if !(rps > 0.0 && rps.is_finite()) {
        return Err(AgentError::Config("--rps must be positive".into()));
    }
    let body = std::fs::read(input).map_err(|e| AgentError::io(input, e))?;
    let http = crate::tls::default_client();
    let target = format!("{}/v1/infer", url.trim_end_matches('/'));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = (seconds > 0).then(|| Instant::now() + Duration::from_secs(seconds));
    let mut by_status: std::collections::BTreeMap<u16, u64> = Default::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => break,
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        let mut rb = http
            .post(&target)
            .header("content-type", crate::api::NPZ_CONTENT_TYPE)
            .body(body.clone());
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let status = match rb.send().await {
            Ok(r) => {
                let st = r.status().as_u16();
                if st == 200
                    && let Some(out) = output
                    && let Ok(body) = r.bytes().await
                {
                    std::fs::write(out, &body).map_err(|e| AgentError::io(out, e))?;
                }
                st
            }
            Err(_) => 0,
        };
        *by_status.entry(status).or_default() += 1;
    }
    let summary: Vec<String> = by_status
        .iter()
        .map(|(s, n)| {
            if *s == 0 {
                format!("unreachable: {n}")
            } else {
                format!("{s}: {n}")
            }
        })
        .collect();
    println!("requests by status: {}", summary.join(", "));
    Ok(())
}

/// `edge-agent compare`: max abs difference per tensor.
fn compare(a: &Path, b: &Path, tolerance: f64) -> Result<(), AgentError> {
    let (ta, tb) = (read_npz_file(a)?, read_npz_file(b)?);
    let mut worst = 0.0f64;
    for x in &ta {
        let Some(y) = tb.iter().find(|y| y.name == x.name) else {
            return Err(AgentError::Refused(format!(
                "{} has no tensor {:?}",
                b.display(),
                x.name
            )));
        };
        let d = edgefleet_wire::tensor::max_abs_diff(&x.tensor, &y.tensor).map_err(|source| {
            AgentError::Bundle {
                path: x.name.clone(),
                source,
            }
        })?;
        println!("{}: max abs diff {:e} at {}", x.name, d.max_abs, d.at);
        worst = worst.max(d.max_abs);
    }
    if ta.len() != tb.len() {
        return Err(AgentError::Refused(format!(
            "{} has {} tensors, {} has {}",
            a.display(),
            ta.len(),
            b.display(),
            tb.len()
        )));
    }
    if worst > tolerance {
        return Err(AgentError::Refused(format!(
            "max abs diff {worst:e} exceeds the tolerance {tolerance:e}"
        )));
    }
    println!("match within {tolerance:e}");
    Ok(())
}

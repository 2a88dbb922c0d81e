//! `fleetctl`, the operator CLI. Command shapes here are a public interface
//! (scripts and CI pipelines call them); extend, never rename.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use edgefleet_wire::bundle::{Limits, read_signed};
use edgefleet_wire::keys::{
    KeyId, decode_public_key, decode_secret_key, encode_public_key, encode_secret_key,
    signing_key_from_seed,
};
use edgefleet_wire::manifest::{Manifest, NonFiniteInputs, TargetArch};
use edgefleet_wire::names::ModelName;
use edgefleet_wire::verify::{Expiry, TrustRoot, open_bundle};
use serde_json::json;

use ed25519_dalek::SigningKey;
use edgefleet_wire::api::v1::{
    BundleView, CreateEnrollmentToken, CreateRollout, DeviceView, EnrollmentTokenView, Gates,
    Phase, RolloutAction, RolloutView, Stage, TrustView,
};
use edgefleet_wire::device::ShadowRequest;
use edgefleet_wire::time::unix_now as now_unix;
use edgefleet_wire::trust::{SignedTrust, TrustDoc};

use crate::client::{Client, DeviceFilter};
use crate::duration::{parse_duration, rfc3339};
use crate::error::{Error, Result};
use crate::pack::{PackRequest, PayloadCompression, pack};

#[derive(Debug, Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate an edgefleet fleet: keys, model bundles, rollouts"
)]
pub struct Cli {
    /// Fleet server URL, e.g. http://127.0.0.1:7070.
    #[arg(long, env = "FLEETCTL_SERVER", global = true)]
    pub server: Option<String>,
    /// Operator bearer token.
    #[arg(long, env = "FLEETCTL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust for an https:// server instead of
    /// the system's roots (your fleet CA).
    #[arg(long, env = "FLEETCTL_CA_FILE", global = true, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Print the result as JSON on stdout (every command).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an ed25519 signing key pair: PREFIX.key (0600) and PREFIX.pub.
    Keygen {
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// Overwrite existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Pack, verify, inspect, push and list signed model bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// The device inventory.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Staged rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// A/B experiments and bandits between two bundles, with a verdict.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Maintenance windows on devices and tags: when devices may activate
    /// a new model (they download and self-test at any time).
    #[command(subcommand)]
    Window(WindowCommand),
    /// Per-batch enrollment tokens (admin): expiry, use count, fixed tags.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The fleet's trust root: show it, rotate signing keys (admin).
    #[command(subcommand)]
    Trust(TrustCommand),
    /// The audit log: privileged actions, who did them, when.
    Audit {
        /// The most recent this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Shell completions on stdout (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Man pages for fleetctl and every subcommand.
    Man {
        #[arg(long, value_name = "DIR", default_value = "man")]
        out: PathBuf,
    },
}

/// A device or a tag.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct WindowScope {
    /// The device's own windows.
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// Windows of every device carrying this tag.
    #[arg(long, value_name = "K=V")]
    tag: Option<String>,
}

impl WindowScope {
    fn scope(&self) -> Result<String> {
        match (&self.device, &self.tag) {
            (Some(d), _) => Ok(format!("device:{d}")),
            (None, Some(kv)) => {
                let (k, v) = parse_kv(kv)?;
                Ok(format!("tag:{k}={v}"))
            }
            (None, None) => Err(Error::Usage("give --device or --tag".into())),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WindowCommand {
    /// Set the windows of a device or a tag, replacing what it had:
    /// `Mon-Fri 02:00-04:00`, `daily 22:00-05:00`, `cron 0 2 * * 1-5 for 2h`.
    Set {
        #[command(flatten)]
        scope: WindowScope,
        /// IANA time zone (e.g. Europe/Berlin). Default: each device's own.
        #[arg(long = "tz", value_name = "ZONE")]
        time_zone: Option<String>,
        /// One or more windows.
        #[arg(required = true, value_name = "WINDOW")]
        windows: Vec<String>,
    },
    /// Every device and tag window.
    List,
    /// Remove the windows of a device or a tag.
    Clear {
        #[command(flatten)]
        scope: WindowScope,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// The trust version now, its keys and threshold.
    Show {
        /// Also write the newest signed trust document here (provisioning
        /// new boards: `[trust] document` in their agent.toml).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Publish the next trust version: OLD's key out, NEW's key in, signed
    /// by both (plus --sign-key holders when the threshold needs more).
    Rotate {
        /// Secret key being rotated out (it signs the hand-over).
        #[arg(long, value_name = "OLD.key")]
        old_key: PathBuf,
        /// Secret key rotated in (it signs too: proof the new holder has it).
        #[arg(long, value_name = "NEW.key")]
        new_key: PathBuf,
        /// More signing keys, old or new (repeatable).
        #[arg(long = "sign-key", value_name = "KEY.key")]
        sign_keys: Vec<PathBuf>,
        /// Threshold of the new version. Default: the current one, at most
        /// the number of keys.
        #[arg(long)]
        threshold: Option<u32>,
        /// Validity of the new version, e.g. 365d.
        #[arg(long, default_value = "365d")]
        expires_in: String,
        /// Write the signed document here for more signatures (`trust sign`)
        /// instead of publishing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Add a signature to a trust document written by `rotate --out`.
    Sign {
        file: PathBuf,
        #[arg(long = "key", value_name = "KEY.key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Publish a signed trust document.
    Push { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an enrollment token on the server; the secret is printed
    /// once, on stdout. With --role: an operator API token instead, made
    /// here, printed once with the `[[auth.tokens]]` lines (its sha256) for
    /// fleet-server.toml.
    Create {
        /// 1-64 of [A-Za-z0-9._-].
        name: String,
        /// admin, operator or viewer: an API token for the server's config.
        #[arg(long)]
        role: Option<String>,
        /// How long it is valid, e.g. 7d, 12h, 30m.
        #[arg(long, default_value = "7d")]
        expires_in: String,
        /// Devices that may enroll with it.
        #[arg(long, default_value_t = 1)]
        max_uses: u64,
        /// Tag every device enrolled with it gets (k=v, repeatable).
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        /// Tag keys devices may set themselves (repeatable). Default: board.
        #[arg(long = "allow-tag", value_name = "KEY")]
        allowed_tags: Vec<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token: no device enrolls with it any more.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices, optionally filtered by tags (k=v, repeatable).
    List {
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<String>,
        /// Only devices reporting this update state (e.g. committed, rolled_back).
        #[arg(long)]
        state: Option<String>,
        /// Only devices reporting this active model version.
        #[arg(long)]
        version: Option<String>,
    },
    /// One device: tags, what it runs, update state and reason, health,
    /// telemetry, events.
    Show { id: String },
    /// Set (k=v) or remove (--remove k) tags of a device.
    Tag {
        id: String,
        #[arg(value_name = "K=V")]
        tags: Vec<String>,
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of a pushed bundle.
    Create(Box<RolloutArgs>),
    /// Every rollout, newest last.
    List,
    /// Progress per stage and the reasons of automatic decisions.
    Status {
        id: String,
        /// Refresh every 2 s until the rollout completes (exit 0), pauses
        /// (exit 3) or is aborted (exit 4).
        #[arg(long)]
        watch: bool,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop and send the devices back to what they ran before.
    Abort {
        id: String,
    },
    /// Skip the rest of the current stage's bake time.
    Promote {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Split a cohort between bundle A (the control) and B.
    Create(Box<ExperimentArgs>),
    /// Every experiment.
    List,
    /// Per-arm metrics and the verdict, in words and numbers.
    Status {
        /// Id, unique prefix, or name.
        id: String,
    },
    /// Send every device back to A; the experiment ends.
    Stop { id: String },
    /// End with a winner: B becomes a normal rollout to the cohort; A is
    /// kept (B's devices return to it).
    Conclude {
        id: String,
        /// a or b; default: the arm significantly better on the primary metric.
        #[arg(long)]
        winner: Option<String>,
        /// The winner's rollout stages, PERCENT:BAKE,... (default 100:0).
        #[arg(long)]
        stages: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// 1-64 of [A-Za-z0-9._-].
    #[arg(long)]
    name: String,
    /// Arm A, the control: id, unique prefix, or NAME@VERSION.
    #[arg(long)]
    a: String,
    /// Arm B, the candidate.
    #[arg(long)]
    b: String,
    /// Tag the devices must carry (k=v, repeatable).
    #[arg(long = "selector", value_name = "K=V")]
    selector: Vec<String>,
    /// Percent of each board's devices on B (default 50).
    #[arg(long)]
    split_pct: Option<f64>,
    /// fixed, or thompson (a bandit on the primary metric).
    #[arg(long, default_value = "fixed")]
    allocation: String,
    /// latency_p50_ms, latency_p95_ms (default), error_rate, drift_psi, reward.
    #[arg(long)]
    primary: Option<String>,
    /// Stop when B is worse on METRIC by more than PCT % of A: METRIC:PCT.
    #[arg(long, value_name = "METRIC:PCT")]
    guardrail: Option<String>,
    /// Of the always-valid intervals (default 0.95).
    #[arg(long)]
    confidence: Option<f64>,
    /// Bandit: the least share of devices each arm keeps (default 0.1).
    #[arg(long)]
    min_share: Option<f64>,
    /// Bandit: arm changes per device per hour at most (default 1).
    #[arg(long)]
    max_switches_per_hour: Option<u32>,
}

fn parse_metric(v: &str) -> Result<edgefleet_wire::api::v1::Metric> {
    edgefleet_wire::api::v1::Metric::ALL
        .into_iter()
        .find(|m| m.as_str() == v)
        .ok_or_else(|| {
            Error::Usage(format!(
                "metric {v:?}: one of latency_p50_ms, latency_p95_ms, error_rate, drift_psi, reward"
            ))
        })
}

fn print_experiment(e: &edgefleet_wire::api::v1::ExperimentView) {
    use edgefleet_wire::api::v1::ExperimentPhase;
    let phase = match &e.phase {
        ExperimentPhase::Running => "RUNNING".to_string(),
        ExperimentPhase::Stopped { reason, .. } => format!("STOPPED ({})", clean(reason)),
        ExperimentPhase::Concluded { winner, .. } => {
            format!("CONCLUDED ({} won)", winner.to_uppercase())
        }
    };
    println!("experiment {} {}  {}", clean(&e.id), clean(&e.name), phase);
    println!(
        "  A {} {} ({} devices)   B {} {} ({} devices)   {:?} allocation, primary {}",
        clean(&e.a.name),
        clean(&e.a.version),
        e.devices_a,
        clean(&e.b.name),
        clean(&e.b.version),
        e.devices_b,
        e.allocation,
        e.primary.as_str()
    );
    if !e.verdicts.is_empty() {
        let f = |v: Option<f64>| v.map_or_else(|| "-".into(), |x| format!("{x:.4}"));
        table(
            &[
                "METRIC", "A MEAN", "A N", "B MEAN", "B N", "B - A", "INTERVAL", "VERDICT",
            ],
            e.verdicts.iter().map(|v| {
                vec![
                    v.metric.as_str().to_string(),
                    f(v.a.mean),
                    v.a.n.to_string(),
                    f(v.b.mean),
                    v.b.n.to_string(),
                    f(v.effect),
                    format!("[{}, {}]", f(v.effect_low), f(v.effect_high)),
                    match v.better.as_deref() {
                        Some(w) => format!("{} better", w.to_uppercase()),
                        None => "not significant".into(),
                    },
                ]
            }),
        );
    }
    for line in e.summary.lines() {
        println!("{}", clean(line));
    }
}

fn window_cmd(c: &Client, cmd: WindowCommand, json: bool) -> Result<()> {
    let row = |w: &edgefleet_wire::api::v1::WindowEntry| {
        vec![
            clean(&w.scope),
            clean(&w.schedule.windows.join("; ")),
            clean(w.schedule.time_zone.as_deref().unwrap_or("device")),
        ]
    };
    let list = match cmd {
        WindowCommand::Set {
            scope,
            time_zone,
            windows,
        } => {
            let schedule = edgefleet_wire::window::Schedule { windows, time_zone };
            // Caught here with the parser's words; the server checks again.
            schedule
                .compile()
                .map_err(|e| Error::Usage(e.to_string()))?;
            vec![c.set_window(&scope.scope()?, &schedule)?]
        }
        WindowCommand::List => c.list_windows()?,
        WindowCommand::Clear { scope } => vec![c.clear_window(&scope.scope()?)?],
    };
    print_or(json, &list, || {
        table(&["SCOPE", "WINDOWS", "ZONE"], list.iter().map(row));
    });
    Ok(())
}

fn experiment_cmd(c: &Client, cmd: ExperimentCommand, json: bool) -> Result<()> {
    use edgefleet_wire::api::v1::{Allocation, ConcludeExperiment, CreateExperiment, Guardrail};
    let e = match cmd {
        ExperimentCommand::Create(a) => {
            let selector = a
                .selector
                .iter()
                .map(|kv| parse_kv(kv))
                .collect::<Result<_>>()?;
            let allocation = match a.allocation.as_str() {
                "fixed" => Allocation::Fixed,
                "thompson" => Allocation::Thompson,
                other => {
                    return Err(Error::Usage(format!(
                        "--allocation {other:?}: fixed or thompson"
                    )));
                }
            };
            let primary = a.primary.as_deref().map(parse_metric).transpose()?;
            let guardrail = match a.guardrail.as_deref() {
                None => None,
                Some(g) => {
                    let (m, pct) = g.rsplit_once(':').ok_or_else(|| {
                        Error::Usage(format!("--guardrail {g:?}: use METRIC:PCT"))
                    })?;
                    Some(Guardrail {
                        metric: parse_metric(m)?,
                        max_worse_pct: pct.parse().map_err(|_| {
                            Error::Usage(format!("--guardrail {g:?}: PCT is a number"))
                        })?,
                    })
                }
            };
            let req = CreateExperiment {
                name: a.name,
                a: resolve_bundle(c, &a.a)?,
                b: resolve_bundle(c, &a.b)?,
                selector,
                split_pct: a.split_pct,
                allocation,
                primary,
                guardrail,
                confidence: a.confidence,
                min_share: a.min_share,
                max_switches_per_hour: a.max_switches_per_hour,
            };
            c.create_experiment(&req)?
        }
        ExperimentCommand::List => {
            let list = c.list_experiments()?;
            print_or(json, &list, || {
                table(
                    &[
                        "ID",
                        "NAME",
                        "A",
                        "B",
                        "PHASE",
                        "DEVICES A/B",
                        "PRIMARY VERDICT",
                    ],
                    list.iter().map(|e| {
                        let v = e.verdicts.iter().find(|v| v.metric == e.primary);
                        vec![
                            e.id.clone(),
                            clean(&e.name),
                            format!("{} {}", clean(&e.a.name), clean(&e.a.version)),
                            format!("{} {}", clean(&e.b.name), clean(&e.b.version)),
                            match &e.phase {
                                edgefleet_wire::api::v1::ExperimentPhase::Running => {
                                    "running".into()
                                }
                                edgefleet_wire::api::v1::ExperimentPhase::Stopped { .. } => {
                                    "stopped".into()
                                }
                                edgefleet_wire::api::v1::ExperimentPhase::Concluded {
                                    winner,
                                    ..
                                } => {
                                    format!("concluded ({winner})")
                                }
                            },
                            format!("{}/{}", e.devices_a, e.devices_b),
                            v.and_then(|v| v.better.clone()).map_or_else(
                                || "-".into(),
                                |w| format!("{} better", w.to_uppercase()),
                            ),
                        ]
                    }),
                )
            });
            return Ok(());
        }
        ExperimentCommand::Status { id } => c.get_experiment(&id)?,
        ExperimentCommand::Stop { id } => c.stop_experiment(&id)?,
        ExperimentCommand::Conclude { id, winner, stages } => {
            let stages = stages.as_deref().map(parse_stages).transpose()?;
            if let Some(w) = &winner
                && !matches!(w.as_str(), "a" | "b" | "A" | "B")
            {
                return Err(Error::Usage(format!("--winner {w:?}: a or b")));
            }
            c.conclude_experiment(
                &id,
                &ConcludeExperiment {
                    winner,
                    stages,
                    gates: None,
                },
            )?
        }
    };
    print_or(json, &e, || print_experiment(&e));
    Ok(())
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// Bundle: its id, a unique id prefix, or NAME@VERSION.
    #[arg(long)]
    bundle: String,
    /// Tag the devices must carry (k=v, repeatable).
    #[arg(long = "selector", value_name = "K=V")]
    selector: Vec<String>,
    /// Stages as PERCENT:BAKE, e.g. 10:5m,50:10m,100:0.
    #[arg(long)]
    stages: String,
    #[arg(long)]
    max_failed_devices_pct: Option<f64>,
    #[arg(long)]
    max_rollback_pct: Option<f64>,
    #[arg(long)]
    max_p95_latency_ms: Option<f64>,
    #[arg(long)]
    max_error_rate: Option<f64>,
    #[arg(long)]
    min_reporting_devices: Option<u32>,
    /// Shadow mode: mirror this fraction of live requests, in (0, 1], to
    /// the candidate before activating it (with --shadow-samples).
    #[arg(long)]
    shadow_sample_rate: Option<f64>,
    /// Mirrored requests compared before deciding.
    #[arg(long)]
    shadow_samples: Option<u32>,
    /// Minimum top-1 agreement with the active model (classifiers).
    #[arg(long)]
    shadow_min_top1_agreement: Option<f64>,
    /// Largest allowed max-abs difference over all outputs.
    #[arg(long)]
    shadow_max_abs_diff: Option<f64>,
    /// Devices activate only inside this maintenance window (repeatable):
    /// `Mon-Fri 02:00-04:00`, `cron 0 2 * * * for 2h`. Device and tag
    /// windows (`fleetctl window set`) take precedence.
    #[arg(long = "window", value_name = "WINDOW")]
    window: Vec<String>,
    /// IANA time zone of --window. Default: each device's own.
    #[arg(long = "window-tz", value_name = "ZONE", requires = "window")]
    window_tz: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Check a model against golden vectors and write a signed bundle.
    Pack(Box<PackArgs>),
    /// Verify signatures, expiry and payload digests. Exit 0 if valid.
    Verify {
        file: PathBuf,
        /// Trusted public key file (repeatable).
        #[arg(long = "trust", value_name = "KEY.pub", required = true)]
        trust: Vec<PathBuf>,
        /// Distinct trusted signatures required (default 1).
        #[arg(long, default_value_t = 1)]
        threshold: usize,
    },
    /// Show a bundle's manifest (signatures are listed, not verified).
    Inspect { file: PathBuf },
    /// Upload a bundle to the fleet server (it verifies it too).
    Push { file: PathBuf },
    /// Bundles in the server's registry.
    List,
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// The ONNX model file.
    #[arg(long, value_name = "M.onnx")]
    model: PathBuf,
    #[arg(long)]
    name: String,
    /// Semantic version, e.g. 1.2.0.
    #[arg(long)]
    version: String,
    /// Anti-rollback counter: must increase with every release of NAME.
    #[arg(long)]
    sequence: u64,
    /// Golden inputs (.npz keyed by input name). Repeat for more cases; the
    /// first file's shapes become the model's pinned input shapes.
    #[arg(long = "golden-inputs", value_name = "IN.npz", required = true)]
    golden_inputs: Vec<PathBuf>,
    /// Reference outputs from ONNX Runtime or the training framework, one per
    /// --golden-inputs, in the same order.
    #[arg(long = "golden-outputs", value_name = "OUT.npz")]
    golden_outputs: Vec<PathBuf>,
    /// Largest accepted absolute difference per output element.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// Signing key (repeatable, one signature each).
    #[arg(long = "key", value_name = "PREFIX.key", required = true)]
    keys: Vec<PathBuf>,
    /// Validity period: 30s, 10m, 12h, 90d.
    #[arg(long = "expires-in", default_value = "90d")]
    expires_in: String,
    /// Store the decluttered tract NNEF form (faster device start).
    #[arg(long)]
    nnef: bool,
    /// Target architecture (repeatable; default: x86_64, aarch64, armv7).
    #[arg(long = "target", value_name = "ARCH")]
    targets: Vec<String>,
    /// Oldest agent version that may install this bundle.
    #[arg(long = "min-agent-version", default_value = env!("CARGO_PKG_VERSION"))]
    min_agent_version: String,
    /// Let the serving API accept NaN/inf inputs (rejected by default).
    #[arg(long)]
    allow_non_finite: bool,
    /// Calibration inputs (.npz, one array per model input with a leading
    /// sample axis): the drift baseline devices compare live traffic with.
    #[arg(long, value_name = "CALIB.npz")]
    baseline: Option<PathBuf>,
    /// Refuse the model if its median latency on this machine (one thread,
    /// the first golden case) is above this. The measurement is always
    /// printed and recorded in the manifest.
    #[arg(long, value_name = "MS")]
    max_latency_ms: Option<f64>,
    /// How the model is stored: `auto` compresses with zstd only when that
    /// saves at least 10 % (float weights rarely do, and a device would
    /// decompress at every load); `zstd` always (bundle format 1, read by
    /// every agent version); `none` never (bundle format 2: agents built
    /// before it refuse such a bundle as `bad version`).
    #[arg(long, value_enum, default_value_t = PayloadCompression::Auto)]
    compression: PayloadCompression,
    #[arg(long, value_name = "FILE.bundle")]
    out: PathBuf,
}

/// Exit status of a rollout that paused (a gate breached, or an operator).
pub const EXIT_PAUSED: i32 = 3;
/// Exit status of an aborted rollout.
pub const EXIT_ABORTED: i32 = 4;
/// Exit status when what was named does not exist.
pub const EXIT_NOT_FOUND: i32 = 5;

/// Exit status a command failure maps to: 1 error, 2 usage, 3 a rollout
/// paused, 4 aborted, 5 not found (0 is success).
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Usage(_) => 2,
        Error::Outcome { code, .. } => *code,
        Error::NotFound(_) | Error::Api { status: 404, .. } => EXIT_NOT_FOUND,
        _ => 1,
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let client = || {
        Client::with_ca(
            cli.server.clone(),
            cli.token.clone(),
            cli.ca_file.as_deref(),
        )
    };
    let json = cli.json;
    match cli.command {
        Command::Bundle(BundleCommand::Push { file }) => {
            let rec = client()?.push_bundle(&file)?;
            print_or(json, &rec, || {
                println!(
                    "pushed {} {} as {}",
                    clean(&rec.name),
                    clean(&rec.version),
                    clean(&rec.id)
                );
            });
            Ok(())
        }
        Command::Bundle(BundleCommand::List) => {
            let list = client()?.list_bundles()?;
            print_or(json, &list, || {
                table(
                    &["ID", "NAME", "VERSION", "SEQ", "FORMAT", "SIZE"],
                    list.iter().map(|b| {
                        vec![
                            b.id.chars().take(12).collect(),
                            b.name.clone(),
                            b.version.clone(),
                            b.sequence.to_string(),
                            b.format.clone(),
                            b.size.to_string(),
                        ]
                    }),
                )
            });
            Ok(())
        }
        Command::Devices(DevicesCommand::List {
            tags,
            state,
            version,
        }) => {
            let list = client()?.list_devices(&DeviceFilter {
                tags,
                state,
                version,
            })?;
            print_or(json, &list, || {
                table(
                    &[
                        "DEVICE",
                        "TAGS",
                        "ACTIVE",
                        "STATE",
                        "P95 MS",
                        "ONLINE",
                        "LAST SEEN",
                    ],
                    list.iter().map(device_row),
                )
            });
            Ok(())
        }
        Command::Devices(DevicesCommand::Show { id }) => {
            let d = client()?.get_device(&id)?;
            print_or(json, &d, || print_device(&d));
            Ok(())
        }
        Command::Devices(DevicesCommand::Tag { id, tags, remove }) => {
            let c = client()?;
            let mut now = c.get_device(&id)?.tags;
            for k in &remove {
                now.remove(k);
            }
            for kv in &tags {
                let (k, v) = parse_kv(kv)?;
                now.insert(k, v);
            }
            let d = c.patch_device(&id, now)?;
            print_or(json, &d, || {
                println!(
                    "{} tags: {}",
                    clean(&d.id),
                    clean(
                        &d.tags
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                );
            });
            Ok(())
        }
        Command::Audit { limit } => {
            let mut list = client()?.audit()?;
            if list.len() > limit {
                list.drain(..list.len() - limit);
            }
            print_or(json, &list, || {
                table(
                    &["WHEN", "WHO", "ACTION", "TARGET"],
                    list.iter().map(|e| {
                        vec![
                            rfc3339(e.at),
                            e.who.clone(),
                            e.action.clone(),
                            e.target.clone(),
                        ]
                    }),
                )
            });
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "fleetctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => man_pages(&out, json),
        Command::Rollout(cmd) => rollout_cmd(&client()?, cmd, json),
        Command::Experiment(cmd) => experiment_cmd(&client()?, cmd, json),
        Command::Window(cmd) => window_cmd(&client()?, cmd, json),
        Command::Token(TokenCommand::Create {
            name,
            role: Some(role),
            ..
        }) => api_token(&name, &role, json),
        Command::Token(cmd) => token_cmd(&client()?, cmd, json),
        Command::Trust(TrustCommand::Sign { file, keys }) => trust_sign(&file, &keys, json),
        Command::Trust(cmd) => trust_cmd(&client()?, cmd, json),
        Command::Keygen { out, force } => keygen(&out, force, json),
        Command::Bundle(BundleCommand::Pack(args)) => pack_cmd(*args, json),
        Command::Bundle(BundleCommand::Verify {
            file,
            trust,
            threshold,
        }) => verify_cmd(&file, &trust, threshold, json),
        Command::Bundle(BundleCommand::Inspect { file }) => inspect_cmd(&file, json),
    }
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Usage(format!(
                "{} exists; pass --force to overwrite",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn keygen(prefix: &Path, force: bool, json: bool) -> Result<()> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| Error::io(prefix, std::io::Error::other(e.to_string())))?;
    let sk = signing_key_from_seed(seed);
    let key_path = with_ext(prefix, "key");
    let pub_path = with_ext(prefix, "pub");
    write_file(&key_path, encode_secret_key(&sk).as_bytes(), 0o600, force)?;
    write_file(
        &pub_path,
        encode_public_key(&sk.verifying_key()).as_bytes(),
        0o644,
        force,
    )?;
    let id = KeyId::of(&sk.verifying_key());
    let v = json!({"secret_key": key_path, "public_key": pub_path, "key_id": hex::encode(id.0)});
    print_or(json, &v, || {
        println!(
            "wrote {} and {} (key id {id})",
            key_path.display(),
            pub_path.display(),
        );
    });
    Ok(())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn pack_cmd(a: PackArgs, json: bool) -> Result<()> {
    let usage = |e: edgefleet_wire::Error| Error::Usage(e.to_string());
    let keys = a
        .keys
        .iter()
        .map(|p| {
            decode_secret_key(&read_text(p)?).map_err(|source| Error::File {
                path: p.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let targets = if a.targets.is_empty() {
        TargetArch::ALL.to_vec()
    } else {
        a.targets
            .iter()
            .map(|t| t.parse().map_err(usage))
            .collect::<Result<Vec<_>>>()?
    };
    let req = PackRequest {
        model: a.model,
        name: ModelName::new(a.name).map_err(usage)?,
        version: semver::Version::parse(&a.version)
            .map_err(|e| Error::Usage(format!("--version {:?}: {e}", a.version)))?,
        sequence: a.sequence,
        golden_inputs: a.golden_inputs,
        golden_outputs: a.golden_outputs,
        tolerance: a.tolerance,
        keys,
        now: now_unix(),
        expires_in: parse_duration(&a.expires_in)?,
        nnef: a.nnef,
        targets,
        min_agent_version: semver::Version::parse(&a.min_agent_version).map_err(|e| {
            Error::Usage(format!(
                "--min-agent-version {:?}: {e}",
                a.min_agent_version
            ))
        })?,
        non_finite_inputs: if a.allow_non_finite {
            NonFiniteInputs::Allow
        } else {
            NonFiniteInputs::Reject
        },
        baseline: a.baseline,
        max_latency_ms: match a.max_latency_ms {
            Some(ms) if !(ms.is_finite() && ms > 0.0) => {
                return Err(Error::Usage(format!(
                    "--max-latency-ms {ms}: give a positive number of milliseconds"
                )));
            }
            other => other,
        },
        compression: a.compression,
    };
    let packed = pack(&req)?;
    for w in &packed.warnings {
        eprintln!("warning: {w}");
    }
    write_file(&a.out, &packed.bundle, 0o644, true)?;
    let m = &packed.manifest;
    if json {
        let v = json!({
            "file": a.out,
            "id": edgefleet_wire::bundle::content_address(&packed.bundle),
            "size": packed.bundle.len(),
            "max_abs_diff": packed.max_abs_diff,
            "warnings": packed.warnings,
            "manifest": manifest_json(m, &[]),
            "signatures": req.keys.len(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "packed {} {} (sequence {}, {}) -> {}: {} bytes, {} golden case(s) pass, max abs diff {:e} (tolerance {:e}), {} signature(s)",
        m.name,
        m.version,
        m.sequence,
        m.payload.format,
        a.out.display(),
        packed.bundle.len(),
        m.golden.cases.len(),
        packed.max_abs_diff,
        m.golden.tolerance,
        req.keys.len()
    );
    if let Some(l) = &m.pack_latency {
        println!("{}", latency_line(l));
    }
    Ok(())
}

/// The packer's measurement in words.
fn latency_line(l: &edgefleet_wire::manifest::PackLatency) -> String {
    format!(
        "latency     median {:.3} ms, p90 {:.3} ms over {} runs, 1 thread, on the packing machine ({})",
        l.median_us as f64 / 1e3,
        l.p90_us as f64 / 1e3,
        l.iterations,
        l.machine
    )
}

fn verify_cmd(file: &Path, trust: &[PathBuf], threshold: usize, json: bool) -> Result<()> {
    let keys = trust
        .iter()
        .map(|p| {
            decode_public_key(&read_text(p)?).map_err(|source| Error::File {
                path: p.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let root = TrustRoot::new(keys, threshold).map_err(|e| Error::Usage(e.to_string()))?;
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let (manifest, _model) = open_bundle(
        std::io::BufReader::new(f),
        &root,
        Expiry::Enforce { now: now_unix() },
        &Limits::default(),
    )
    .map_err(|source| Error::File {
        path: file.to_path_buf(),
        source,
    })?;
    if json {
        let v = json!({
            "ok": true,
            "name": manifest.name,
            "version": manifest.version.to_string(),
            "sequence": manifest.sequence,
            "signers": manifest.signers().iter().map(|k| hex::encode(k.0)).collect::<Vec<_>>(),
            "threshold": root.threshold(),
            "expires_at": manifest.expires_at,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "ok: {} {} (sequence {}) signed by {} of {} required trusted key(s), expires {}",
        manifest.name,
        manifest.version,
        manifest.sequence,
        manifest.signers().len(),
        root.threshold(),
        rfc3339(manifest.expires_at)
    );
    Ok(())
}

fn inspect_cmd(file: &Path, as_json: bool) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let file_err = |source| Error::File {
        path: file.to_path_buf(),
        source,
    };
    let signed =
        read_signed(&mut std::io::BufReader::new(f), &Limits::default()).map_err(file_err)?;
    let m = signed.peek_unverified().map_err(file_err)?;
    let key_ids: Vec<String> = signed
        .signatures()
        .iter()
        .map(|s| s.key_id.short())
        .collect();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&manifest_json(&m, &key_ids)).unwrap_or_default()
        );
        return Ok(());
    }
    let spec_line = |s: &edgefleet_wire::tensor::TensorSpec| {
        format!("    {:<24} {:<5} {}", s.name, s.dtype, s.shape_text())
    };
    println!("bundle      {}", file.display());
    println!(
        "model       {} {} (sequence {})",
        m.name, m.version, m.sequence
    );
    println!("created     {}", rfc3339(m.created_at));
    println!("expires     {}", rfc3339(m.expires_at));
    println!(
        "payload     {} {}, {} bytes ({} stored), sha256 {}",
        m.payload.format,
        m.payload.compression,
        m.payload.len,
        m.payload.compressed_len,
        hex::encode(m.payload.sha256)
    );
    println!("tract       {}", m.tract_version);
    println!(
        "targets     {}",
        m.targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("min agent   {}", m.min_agent_version);
    println!("inputs");
    m.inputs.iter().for_each(|s| println!("{}", spec_line(s)));
    println!("outputs");
    m.outputs.iter().for_each(|s| println!("{}", spec_line(s)));
    println!(
        "golden      {} case(s), tolerance {:e}, reference {:?}",
        m.golden.cases.len(),
        m.golden.tolerance,
        m.golden.reference
    );
    println!("non-finite  {:?}", m.non_finite_inputs);
    match &m.pack_latency {
        Some(l) => println!("{}", latency_line(l)),
        None => println!("latency     not measured (packed before fleetctl recorded it)"),
    }
    match &m.drift_baseline {
        Some(b) => println!(
            "drift       baseline of {} samples: {} input features + {}, {} bins",
            b.samples,
            b.inputs.len(),
            if b.output.is_some() {
                "output score"
            } else {
                "no output score"
            },
            edgefleet_wire::drift::BINS
        ),
        None => println!("drift       no baseline"),
    }
    println!(
        "signatures  {} (NOT verified here; use `fleetctl bundle verify`)",
        key_ids.join(", ")
    );
    Ok(())
}

fn manifest_json(m: &Manifest, key_ids: &[String]) -> serde_json::Value {
    let specs = |v: &[edgefleet_wire::tensor::TensorSpec]| {
        edgefleet_wire::tensor::serialize_specs_json(v, serde_json::value::Serializer)
            .unwrap_or_default()
    };
    json!({
        "name": m.name,
        "version": m.version.to_string(),
        "sequence": m.sequence,
        "created_at": m.created_at,
        "expires_at": m.expires_at,
        "payload": {
            "format": m.payload.format,
            "compression": m.payload.compression,
            "len": m.payload.len,
            "sha256": hex::encode(m.payload.sha256),
            "compressed_len": m.payload.compressed_len,
            "compressed_sha256": hex::encode(m.payload.compressed_sha256),
        },
        "tract_version": m.tract_version,
        "inputs": specs(&m.inputs),
        "outputs": specs(&m.outputs),
        "targets": m.targets,
        "min_agent_version": m.min_agent_version.to_string(),
        "non_finite_inputs": m.non_finite_inputs,
        "golden": {"cases": m.golden.cases.len(), "tolerance": m.golden.tolerance, "reference": m.golden.reference},
        "drift_baseline": m.drift_baseline.as_ref().map(|b| json!({
            "samples": b.samples,
            "features": b.inputs.iter().chain(b.output.iter()).map(|h| h.feature.clone()).collect::<Vec<_>>(),
            "bins": edgefleet_wire::drift::BINS,
        })),
        "pack_latency": m.pack_latency.as_ref().map(|l| json!({
            "median_ms": l.median_us as f64 / 1e3,
            "p90_ms": l.p90_us as f64 / 1e3,
            "iterations": l.iterations,
            "threads": 1,
            "machine": l.machine,
        })),
        "signatures": key_ids,
        "signatures_verified": false,
    })
}

/// `devices show`: one device, every field the server has.
fn print_device(d: &DeviceView) {
    let bundle = |b: &Option<edgefleet_wire::device::BundleRef>| {
        b.as_ref().map_or_else(
            || "-".to_string(),
            |b| {
                format!(
                    "{} {} (sequence {}, {})",
                    b.name, b.version, b.sequence, b.id
                )
            },
        )
    };
    let row = device_row(d);
    let lines = [
        ("device", d.id.clone()),
        ("tags", row[1].clone()),
        ("arch", d.arch.clone()),
        ("agent", d.agent_version.clone()),
        ("enrolled", rfc3339(d.enrolled_at)),
        ("last seen", row[6].clone()),
        ("online", row[5].clone()),
        ("active", bundle(&d.active)),
        ("desired", bundle(&d.desired)),
        ("rollout", d.rollout.clone().unwrap_or_else(|| "-".into())),
        ("state", row[3].clone()),
        ("reason", d.reason.clone().unwrap_or_else(|| "-".into())),
        ("last failed", bundle(&d.last_failed)),
        ("known good", bundle(&d.last_known_good)),
        ("degraded", d.degraded.clone().unwrap_or_else(|| "-".into())),
        (
            "trust",
            d.trust_version
                .map_or_else(|| "-".into(), |v| format!("version {v}")),
        ),
        ("p95 ms", row[4].clone()),
    ];
    for (k, v) in lines {
        println!("{k:<12}{}", clean(&v));
    }
    if let Some(h) = &d.health {
        println!(
            "{:<12}{} inferences, {} errors in the last window",
            "health", h.inferences, h.errors
        );
    }
    if !d.events.is_empty() {
        println!("events");
        for e in &d.events {
            println!("  {}", clean(&serde_json::to_string(e).unwrap_or_default()));
        }
    }
}

/// One row of `devices list`.
fn device_row(d: &DeviceView) -> Vec<String> {
    let tags = d
        .tags
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let active = d
        .active
        .as_ref()
        .map_or_else(|| "-".into(), |a| format!("{} {}", a.name, a.version));
    let seen = d.last_seen.map_or_else(|| "-".into(), rfc3339);
    // The last telemetry interval when there is one (fresher than the
    // report's window).
    let p95 = d
        .telemetry
        .as_ref()
        .and_then(|t| t.latency_ms.as_ref())
        .map(|l| l.p95)
        .or_else(|| d.health.as_ref().and_then(|h| h.p95_latency_ms))
        .map_or_else(|| "-".into(), |v| format!("{v:.1}"));
    let online = match d.online {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    let mut state = d.state.map_or("-", |s| s.as_str()).to_string();
    if d.retries > 0 {
        state.push_str(&format!(" (retry {})", d.retries));
    }
    if d.degraded.is_some() {
        state.push_str(" [degraded]");
    }
    vec![d.id.clone(), tags, active, state, p95, online.into(), seen]
}

/// A number as the tables print it: whole numbers bare, others to 0.1.
fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => format!("{f:.1}"),
    }
}

fn print_or<T: serde::Serialize>(as_json: bool, v: &T, human: impl FnOnce()) {
    if as_json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human();
    }
}

/// Prints rows as aligned columns.
/// `s` with control characters (C0, DEL, C1: terminal escape sequences
/// among them) shown as `\u{1b}` escapes: what devices and servers send
/// never reaches the operator's terminal raw.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.map(|r| r.iter().map(|c| clean(c)).collect()).collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn parse_kv(v: &str) -> Result<(String, String)> {
    v.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| Error::Usage(format!("{v:?}: use key=value")))
}

/// `10:5m,50:10m,100:0` → stages (bake times in whole minutes, rounded
/// up, and in seconds when they are not whole minutes).
pub fn parse_stages(spec: &str) -> Result<Vec<Stage>> {
    spec.split(',')
        .map(|st| {
            let (pct, bake) = st.split_once(':').ok_or_else(|| {
                Error::Usage(format!("stage {st:?}: use PERCENT:BAKE, e.g. 10:5m"))
            })?;
            let percent: u8 = pct
                .trim()
                .parse()
                .map_err(|_| Error::Usage(format!("stage {st:?}: {pct:?} is not a percent")))?;
            let secs = if bake.trim() == "0" {
                0
            } else {
                parse_duration(bake.trim())?
            };
            let too_long = || Error::Usage(format!("stage {st:?}: the bake time is too long"));
            Ok(Stage {
                percent,
                bake_minutes: u32::try_from(secs.div_ceil(60)).map_err(|_| too_long())?,
                bake_seconds: if secs % 60 == 0 {
                    None
                } else {
                    Some(u32::try_from(secs).map_err(|_| too_long())?)
                },
            })
        })
        .collect()
}

fn print_rollout(r: &RolloutView) {
    println!(
        "rollout {}  bundle {} {}  {}",
        clean(&r.id),
        clean(&r.bundle.name),
        clean(&r.bundle.version),
        r.phase.name().to_uppercase()
    );
    let current = r.phase.stage();
    table(
        &[
            "",
            "STAGE",
            "BAKE",
            "DEVICES",
            "RUNNING",
            "PENDING",
            "FAILED",
            "ROLLED BACK",
            "WAITING",
        ],
        r.stages.iter().enumerate().map(|(i, st)| {
            vec![
                if current == Some(i) {
                    "▶".into()
                } else {
                    String::new()
                },
                format!("{}%", st.percent),
                if st.bake_seconds % 60 != 0 {
                    format!("{}s", st.bake_seconds)
                } else {
                    format!("{}m", st.bake_minutes)
                },
                st.devices.to_string(),
                st.running.to_string(),
                st.pending.to_string(),
                st.failed.to_string(),
                st.rolled_back.to_string(),
                st.waiting.to_string(),
            ]
        }),
    );
    if let Some(w) = &r.window {
        println!("  window: {}", clean(&w.describe()));
    }
    if let Some(st) = current.and_then(|i| r.stages.get(i))
        && st.waiting > 0
    {
        println!(
            "  {} device(s) waiting for window (next: {})",
            st.waiting,
            st.next_window.map_or_else(|| "unknown".into(), rfc3339)
        );
    }
    for d in &r.decisions {
        println!(
            "  {} {}: {} (gate {}, threshold {}, observed {}{})",
            rfc3339(d.at),
            clean(&d.action.to_string()),
            clean(&d.message),
            clean(&d.gate.to_string()),
            num(d.threshold),
            num(d.observed),
            if d.devices.is_empty() {
                String::new()
            } else {
                format!(", devices {}", clean(&d.devices.join(" ")))
            }
        );
    }
}

fn token_row(t: &EnrollmentTokenView) -> Vec<String> {
    let tags = t
        .tags
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        t.name.clone(),
        format!("{}/{}", t.uses, t.max_uses),
        rfc3339(t.expires_at),
        if tags.is_empty() { "-".into() } else { tags },
        t.allowed_tags.join(","),
        t.revoked_at.map_or_else(|| "-".into(), rfc3339),
        t.created_by.clone(),
    ]
}

const TOKEN_HEADERS: [&str; 7] = [
    "NAME",
    "USES",
    "EXPIRES",
    "TAGS",
    "DEVICE TAGS",
    "REVOKED",
    "CREATED BY",
];

fn token_cmd(c: &Client, cmd: TokenCommand, json: bool) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            name,
            expires_in,
            max_uses,
            tags,
            allowed_tags,
            role: _,
        } => {
            let expires_in_secs = crate::duration::parse_duration(&expires_in)?;
            let req = CreateEnrollmentToken {
                name,
                expires_in_secs,
                max_uses,
                tags: tags.iter().map(|kv| parse_kv(kv)).collect::<Result<_>>()?,
                allowed_tags: if allowed_tags.is_empty() {
                    vec!["board".into()]
                } else {
                    allowed_tags
                },
            };
            let t = c.create_enrollment_token(&req)?;
            print_or(json, &t, || {
                println!("{}", t.token);
                eprintln!(
                    "token {} for {} device(s), valid until {}; shown only now",
                    clean(&t.view.name),
                    t.view.max_uses,
                    rfc3339(t.view.expires_at)
                );
            });
        }
        TokenCommand::List => {
            let list = c.list_enrollment_tokens()?;
            print_or(json, &list, || {
                table(&TOKEN_HEADERS, list.iter().map(token_row))
            });
        }
        TokenCommand::Revoke { name } => {
            let t = c.revoke_enrollment_token(&name)?;
            print_or(json, &t, || println!("revoked {}", clean(&t.name)));
        }
    }
    Ok(())
}

fn read_secret(p: &Path) -> Result<SigningKey> {
    decode_secret_key(&read_text(p)?).map_err(|source| Error::File {
        path: p.to_path_buf(),
        source,
    })
}

fn read_trust(p: &Path) -> Result<SignedTrust> {
    serde_json::from_str(&read_text(p)?).map_err(|e| Error::Usage(format!("{}: {e}", p.display())))
}

fn write_trust(p: &Path, doc: &SignedTrust) -> Result<()> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| Error::Usage(e.to_string()))?;
    std::fs::write(p, text + "\n").map_err(|e| Error::io(p, e))
}

fn print_trust(v: &TrustView) {
    println!(
        "trust version {}: threshold {} of {} key(s), {}",
        v.version,
        v.threshold,
        v.keys.len(),
        v.expires_at.map_or_else(
            || "the configured keys (no expiry)".to_string(),
            |t| format!("expires {}", rfc3339(t))
        )
    );
    for k in &v.keys {
        let id = hex::decode(k)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
            .map_or_else(|| "?".to_string(), |pk| KeyId::of(&pk).short());
        println!("  key {id}  {}", clean(k));
    }
}

fn trust_sign(file: &Path, keys: &[PathBuf], json: bool) -> Result<()> {
    let mut doc = read_trust(file)?;
    let version = doc.peek_unverified()?.version;
    for k in keys {
        doc.add_signature(&read_secret(k)?);
    }
    write_trust(file, &doc)?;
    let v = json!({"file": file, "version": version, "signatures": doc.signatures.len()});
    print_or(json, &v, || {
        eprintln!(
            "trust version {version}: {} signature(s) in {}",
            doc.signatures.len(),
            file.display()
        );
    });
    Ok(())
}

fn trust_cmd(c: &Client, cmd: TrustCommand, json: bool) -> Result<()> {
    let view = match cmd {
        TrustCommand::Show { out } => {
            let v = c.get_trust()?;
            if let Some(out) = out {
                let doc = v.chain.last().ok_or_else(|| {
                    Error::Usage(
                        "the fleet is at trust version 1 (its configured keys): there is no \
                         signed document yet; provision boards with [trust] keys"
                            .into(),
                    )
                })?;
                write_trust(&out, doc)?;
                eprintln!("wrote trust version {} to {}", v.version, out.display());
            }
            v
        }
        TrustCommand::Rotate {
            old_key,
            new_key,
            sign_keys,
            threshold,
            expires_in,
            out,
        } => {
            let old = read_secret(&old_key)?;
            let new = read_secret(&new_key)?;
            let current = c.get_trust()?;
            let old_hex = hex::encode(old.verifying_key().as_bytes());
            let new_hex = hex::encode(new.verifying_key().as_bytes());
            if !current.keys.contains(&old_hex) {
                return Err(Error::Usage(format!(
                    "{}: not a key of trust version {} (nothing to rotate out)",
                    old_key.display(),
                    current.version
                )));
            }
            let mut keys: Vec<ed25519_dalek::VerifyingKey> = Vec::new();
            for k in current
                .keys
                .iter()
                .filter(|k| **k != old_hex && **k != new_hex)
            {
                keys.push(decode_public_key(&format!("edgefleet-ed25519-public {k}"))?);
            }
            keys.push(new.verifying_key());
            let threshold = threshold
                .unwrap_or(current.threshold)
                .min(keys.len() as u32);
            let expires_at = edgefleet_wire::time::unix_now() + parse_duration(&expires_in)?;
            let next = TrustDoc::new(current.version + 1, &keys, threshold, expires_at)?;
            let mut signers = vec![old, new];
            for k in &sign_keys {
                signers.push(read_secret(k)?);
            }
            let doc = SignedTrust::sign(&next, &signers.iter().collect::<Vec<_>>())?;
            if let Some(out) = out {
                write_trust(&out, &doc)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                }
                eprintln!(
                    "wrote trust version {} with {} signature(s) to {}; add more with \
                     `fleetctl trust sign`, publish with `fleetctl trust push`",
                    next.version,
                    doc.signatures.len(),
                    out.display()
                );
                return Ok(());
            }
            c.push_trust(&doc)?
        }
        TrustCommand::Push { file } => c.push_trust(&read_trust(&file)?)?,
        TrustCommand::Sign { .. } => unreachable!("handled without a server"),
    };
    print_or(json, &view, || print_trust(&view));
    Ok(())
}

/// The full id of a bundle named by a unique id prefix or `name@version`.
fn resolve_bundle(c: &Client, given: &str) -> Result<String> {
    if edgefleet_wire::bundle::is_content_address(given) {
        return Ok(given.to_string());
    }
    let list = c.list_bundles()?;
    let hits: Vec<&BundleView> = match given.split_once('@') {
        Some((name, version)) => list
            .iter()
            .filter(|b| b.name == name && b.version == version)
            .collect(),
        None => list.iter().filter(|b| b.id.starts_with(given)).collect(),
    };
    unique("bundle", given, hits.iter().map(|b| b.id.as_str()))
}

/// The full id of a rollout named by a unique id prefix.
fn resolve_rollout(c: &Client, given: &str) -> Result<String> {
    let list = c.list_rollouts()?;
    if list.iter().any(|r| r.id == given) {
        return Ok(given.to_string());
    }
    unique(
        "rollout",
        given,
        list.iter()
            .map(|r| r.id.as_str())
            .filter(|id| id.starts_with(given)),
    )
}

fn unique<'a>(what: &str, given: &str, hits: impl Iterator<Item = &'a str>) -> Result<String> {
    let hits: Vec<&str> = hits.collect();
    match hits.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => Err(Error::NotFound(format!(
            "no {what} matches {:?}",
            clean(given)
        ))),
        many => Err(Error::Usage(format!(
            "{:?} matches {} {what}s ({}…): give more of the id",
            clean(given),
            many.len(),
            many.iter()
                .take(3)
                .map(|id| id.chars().take(16).collect::<String>())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What a rollout's phase means for `rollout status --watch`.
fn outcome(r: &RolloutView) -> Result<()> {
    let last = r
        .decisions
        .last()
        .map(|d| format!(": {}", clean(&d.message)))
        .unwrap_or_default();
    match r.phase {
        Phase::Paused { .. } => Err(Error::Outcome {
            code: EXIT_PAUSED,
            message: format!("rollout {} paused{last}", clean(&r.id)),
        }),
        Phase::Aborted { .. } => Err(Error::Outcome {
            code: EXIT_ABORTED,
            message: format!("rollout {} aborted{last}", clean(&r.id)),
        }),
        _ => Ok(()),
    }
}

fn rollout_cmd(c: &Client, cmd: RolloutCommand, json: bool) -> Result<()> {
    let r = match cmd {
        RolloutCommand::Create(a) => {
            let selector = a
                .selector
                .iter()
                .map(|kv| parse_kv(kv))
                .collect::<Result<_>>()?;
            let shadow = match (a.shadow_sample_rate, a.shadow_samples) {
                (None, None) => None,
                (Some(sample_rate), Some(samples)) => Some(ShadowRequest {
                    sample_rate,
                    samples,
                    min_top1_agreement: a.shadow_min_top1_agreement,
                    max_abs_diff: a.shadow_max_abs_diff,
                }),
                _ => {
                    return Err(Error::Usage(
                        "shadow mode needs both --shadow-sample-rate and --shadow-samples".into(),
                    ));
                }
            };
            // Local checks first: a usage error needs no server.
            let stages = parse_stages(&a.stages)?;
            let req = CreateRollout {
                bundle: resolve_bundle(c, &a.bundle)?,
                selector,
                stages,
                gates: Gates {
                    max_failed_devices_pct: a.max_failed_devices_pct,
                    max_rollback_pct: a.max_rollback_pct,
                    max_p95_latency_ms: a.max_p95_latency_ms,
                    max_error_rate: a.max_error_rate,
                    min_reporting_devices: a.min_reporting_devices,
                },
                shadow,
                window: (!a.window.is_empty()).then(|| edgefleet_wire::window::Schedule {
                    windows: a.window.clone(),
                    time_zone: a.window_tz.clone(),
                }),
            };
            c.create_rollout(&req)?
        }
        RolloutCommand::List => {
            let list = c.list_rollouts()?;
            print_or(json, &list, || {
                table(
                    &["ID", "BUNDLE", "PHASE", "STAGE", "DEVICES", "DECISIONS"],
                    list.iter().map(|r| {
                        vec![
                            r.id.clone(),
                            format!("{} {}", r.bundle.name, r.bundle.version),
                            r.phase.name().to_string(),
                            r.phase.stage().map_or_else(
                                || "-".into(),
                                |i| format!("{}/{}", i + 1, r.stages.len()),
                            ),
                            r.stages.last().map_or(0, |s| s.devices).to_string(),
                            r.decisions.len().to_string(),
                        ]
                    }),
                )
            });
            return Ok(());
        }
        RolloutCommand::Status { id, watch } => {
            let id = resolve_rollout(c, &id)?;
            loop {
                let r = c.get_rollout(&id)?;
                print_or(json, &r, || print_rollout(&r));
                if !watch {
                    return Ok(());
                }
                // Paused needs an operator; completed and aborted are final.
                if r.phase.is_final() || matches!(r.phase, Phase::Paused { .. }) {
                    return outcome(&r);
                }
                std::thread::sleep(std::time::Duration::from_secs(2));
                if !json {
                    println!();
                }
            }
        }
        RolloutCommand::Pause { id } => {
            c.rollout_action(&resolve_rollout(c, &id)?, RolloutAction::Pause)?
        }
        RolloutCommand::Resume { id } => {
            c.rollout_action(&resolve_rollout(c, &id)?, RolloutAction::Resume)?
        }
        RolloutCommand::Abort { id } => {
            c.rollout_action(&resolve_rollout(c, &id)?, RolloutAction::Abort)?
        }
        RolloutCommand::Promote { id } => {
            c.rollout_action(&resolve_rollout(c, &id)?, RolloutAction::Promote)?
        }
    };
    print_or(json, &r, || print_rollout(&r));
    Ok(())
}

/// An operator API token for `[[auth.tokens]]`, made here: the token is
/// printed once (stdout), the config lines carry only its sha256.
fn api_token(name: &str, role: &str, json: bool) -> Result<()> {
    if !matches!(role, "admin" | "operator" | "viewer") {
        return Err(Error::Usage(format!(
            "--role {role:?}: one of admin, operator, viewer"
        )));
    }
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).map_err(|e| Error::Usage(format!("no random source: {e}")))?;
    let token = format!("eft_{}", hex::encode(secret));
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let config =
        format!("[[auth.tokens]]\nname = {name:?}\nrole = {role:?}\ntoken_sha256 = \"{sha}\"\n");
    if json {
        let v = json!({"name": name, "role": role, "token": token, "token_sha256": sha, "config": config});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("{token}");
        eprintln!("add to fleet-server.toml (the token is shown only now):\n\n{config}");
    }
    Ok(())
}

/// Man pages of fleetctl and every subcommand, into `out`.
fn man_pages(out: &Path, json: bool) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::new();
    fn walk(
        cmd: clap::Command,
        prefix: &str,
        out: &Path,
        written: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let name = if prefix.is_empty() {
            cmd.get_name().to_string()
        } else {
            format!("{prefix}-{}", cmd.get_name())
        };
        let path = out.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.clone()))
            .render(&mut buf)
            .map_err(|e| Error::io(&path, e))?;
        std::fs::write(&path, buf).map_err(|e| Error::io(&path, e))?;
        written.push(path);
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub.clone(), &name, out, written)?;
        }
        Ok(())
    }
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    walk(cmd, "", out, &mut written)?;
    print_or(json, &written, || {
        println!("wrote {} man pages to {}", written.len(), out.display());
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn control_characters_are_escaped_and_text_kept() {
        assert_eq!(clean("rpi4 ✓"), "rpi4 ✓");
        assert_eq!(clean("\u{1b}[2Jx"), "\\u{1b}[2Jx");
        assert_eq!(clean("a\u{7}b\u{9b}c\u{7f}"), "a\\u{7}b\\u{9b}c\\u{7f}");
    }
}

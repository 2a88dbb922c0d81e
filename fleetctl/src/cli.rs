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
    CreateEnrollmentToken, CreateRollout, DeviceView, EnrollmentTokenView, Gates, RolloutAction,
    RolloutView, Stage, TrustView,
};
use edgefleet_wire::time::unix_now as now_unix;
use edgefleet_wire::trust::{SignedTrust, TrustDoc};

use crate::client::{Client, DeviceFilter};
use crate::duration::{parse_duration, rfc3339};
use crate::error::{Error, Result};
use crate::pack::{PackRequest, pack};

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
    /// Per-batch enrollment tokens (admin): expiry, use count, fixed tags.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The fleet's trust root: show it, rotate signing keys (admin).
    #[command(subcommand)]
    Trust(TrustCommand),
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// The trust version now, its keys and threshold.
    Show {
        /// Also write the newest signed trust document here (provisioning
        /// new boards: `[trust] document` in their agent.toml).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
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
        #[arg(long)]
        json: bool,
    },
    /// Add a signature to a trust document written by `rotate --out`.
    Sign {
        file: PathBuf,
        #[arg(long = "key", value_name = "KEY.key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Publish a signed trust document.
    Push {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; the secret is printed once, on stdout.
    Create {
        /// 1-64 of [A-Za-z0-9._-].
        name: String,
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
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
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
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of a pushed bundle.
    Create(Box<RolloutArgs>),
    /// Progress per stage and the reasons of automatic decisions.
    Status {
        id: String,
        /// Refresh every 2 s until the rollout completes or is aborted.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
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

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// Bundle id (from `bundle push` / `bundle list`).
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
    #[arg(long)]
    json: bool,
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
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Upload a bundle to the fleet server (it verifies it too).
    Push {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Bundles in the server's registry.
    List {
        #[arg(long)]
        json: bool,
    },
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
    #[arg(long, value_name = "FILE.bundle")]
    out: PathBuf,
}

/// Exit status a command failure maps to.
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Usage(_) => 2,
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
    match cli.command {
        Command::Bundle(BundleCommand::Push { file, json }) => {
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
        Command::Bundle(BundleCommand::List { json }) => {
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
            json,
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
        Command::Rollout(cmd) => rollout_cmd(&client()?, cmd),
        Command::Token(cmd) => token_cmd(&client()?, cmd),
        Command::Trust(TrustCommand::Sign { file, keys }) => trust_sign(&file, &keys),
        Command::Trust(cmd) => trust_cmd(&client()?, cmd),
        Command::Keygen { out, force } => keygen(&out, force),
        Command::Bundle(BundleCommand::Pack(args)) => pack_cmd(*args),
        Command::Bundle(BundleCommand::Verify {
            file,
            trust,
            threshold,
        }) => verify_cmd(&file, &trust, threshold),
        Command::Bundle(BundleCommand::Inspect { file, json }) => inspect_cmd(&file, json),
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

fn keygen(prefix: &Path, force: bool) -> Result<()> {
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
    println!(
        "wrote {} and {} (key id {})",
        key_path.display(),
        pub_path.display(),
        KeyId::of(&sk.verifying_key())
    );
    Ok(())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn pack_cmd(a: PackArgs) -> Result<()> {
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
    };
    let packed = pack(&req)?;
    for w in &packed.warnings {
        eprintln!("warning: {w}");
    }
    write_file(&a.out, &packed.bundle, 0o644, true)?;
    let m = &packed.manifest;
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
    Ok(())
}

fn verify_cmd(file: &Path, trust: &[PathBuf], threshold: usize) -> Result<()> {
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
        format!("    {:<24} {:<5} {:?}", s.name, s.dtype, s.shape)
    };
    println!("bundle      {}", file.display());
    println!(
        "model       {} {} (sequence {})",
        m.name, m.version, m.sequence
    );
    println!("created     {}", rfc3339(m.created_at));
    println!("expires     {}", rfc3339(m.expires_at));
    println!(
        "payload     {} zstd, {} bytes ({} compressed), sha256 {}",
        m.payload.format,
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
        v.iter()
            .map(|s| json!({"name": s.name, "dtype": s.dtype, "shape": s.shape}))
            .collect::<Vec<_>>()
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
        "signatures": key_ids,
        "signatures_verified": false,
    })
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
            ]
        }),
    );
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

fn token_cmd(c: &Client, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            name,
            expires_in,
            max_uses,
            tags,
            allowed_tags,
            json,
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
        TokenCommand::List { json } => {
            let list = c.list_enrollment_tokens()?;
            print_or(json, &list, || {
                table(&TOKEN_HEADERS, list.iter().map(token_row))
            });
        }
        TokenCommand::Revoke { name } => {
            let t = c.revoke_enrollment_token(&name)?;
            println!("revoked {}", clean(&t.name));
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

fn trust_sign(file: &Path, keys: &[PathBuf]) -> Result<()> {
    let mut doc = read_trust(file)?;
    let version = doc.peek_unverified()?.version;
    for k in keys {
        doc.add_signature(&read_secret(k)?);
    }
    write_trust(file, &doc)?;
    eprintln!(
        "trust version {version}: {} signature(s) in {}",
        doc.signatures.len(),
        file.display()
    );
    Ok(())
}

fn trust_cmd(c: &Client, cmd: TrustCommand) -> Result<()> {
    let (view, json) = match cmd {
        TrustCommand::Show { out, json } => {
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
            (v, json)
        }
        TrustCommand::Rotate {
            old_key,
            new_key,
            sign_keys,
            threshold,
            expires_in,
            out,
            json,
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
                eprintln!(
                    "wrote trust version {} with {} signature(s) to {}; add more with \
                     `fleetctl trust sign`, publish with `fleetctl trust push`",
                    next.version,
                    doc.signatures.len(),
                    out.display()
                );
                return Ok(());
            }
            (c.push_trust(&doc)?, json)
        }
        TrustCommand::Push { file, json } => (c.push_trust(&read_trust(&file)?)?, json),
        TrustCommand::Sign { .. } => unreachable!("handled without a server"),
    };
    print_or(json, &view, || print_trust(&view));
    Ok(())
}

fn rollout_cmd(c: &Client, cmd: RolloutCommand) -> Result<()> {
    let (r, as_json) = match cmd {
        RolloutCommand::Create(a) => {
            let selector = a
                .selector
                .iter()
                .map(|kv| parse_kv(kv))
                .collect::<Result<_>>()?;
            let req = CreateRollout {
                bundle: a.bundle,
                selector,
                stages: parse_stages(&a.stages)?,
                gates: Gates {
                    max_failed_devices_pct: a.max_failed_devices_pct,
                    max_rollback_pct: a.max_rollback_pct,
                    max_p95_latency_ms: a.max_p95_latency_ms,
                    max_error_rate: a.max_error_rate,
                    min_reporting_devices: a.min_reporting_devices,
                },
                shadow: None,
            };
            (c.create_rollout(&req)?, a.json)
        }
        RolloutCommand::Status { id, watch, json } => loop {
            let r = c.get_rollout(&id)?;
            print_or(json, &r, || print_rollout(&r));
            if !watch || r.phase.is_final() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
            println!();
        },
        RolloutCommand::Pause { id } => (c.rollout_action(&id, RolloutAction::Pause)?, false),
        RolloutCommand::Resume { id } => (c.rollout_action(&id, RolloutAction::Resume)?, false),
        RolloutCommand::Abort { id } => (c.rollout_action(&id, RolloutAction::Abort)?, false),
        RolloutCommand::Promote { id } => (c.rollout_action(&id, RolloutAction::Promote)?, false),
    };
    print_or(as_json, &r, || print_rollout(&r));
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

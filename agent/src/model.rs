//! A loaded model and what the agent knows about it: [`ActiveModel`] (the
//! tract plan, its verified manifest, self-test report, live statistics
//! and drift monitor) and [`prepare`], the only way to make one: load,
//! optimize and pass the golden self-test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgefleet_runtime::{Model, SelfTestReport, self_test};
use edgefleet_wire::manifest::{Manifest, ModelFormat};
use edgefleet_wire::tensor::TensorSpec;
use edgefleet_wire::time::unix_now as now_unix;
use edgefleet_wire::verify::Verified;
use serde::Serialize;

use crate::bundle::TrustedBundle;
use crate::compiled::{COUNTS, CompiledModels, Found, Rejection};
use crate::error::AgentError;
use sha2::{Digest, Sha256};

/// What clients and reports see about a model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub sequence: u64,
    #[serde(serialize_with = "edgefleet_wire::tensor::serialize_specs_json")]
    pub inputs: Vec<TensorSpec>,
    /// A dimension the model computes from its input values is `null`.
    #[serde(serialize_with = "edgefleet_wire::tensor::serialize_specs_json")]
    pub outputs: Vec<TensorSpec>,
    /// Unix seconds.
    pub loaded_at: u64,
    /// sha256 of the signed manifest, hex.
    pub manifest_digest: String,
}

/// A loaded, self-tested model ready to serve.
#[derive(Debug)]
pub struct ActiveModel {
    pub info: ModelInfo,
    pub model: Model,
    pub manifest: Verified<Manifest>,
    pub self_test: SelfTestReport,
    /// What this model did since it was loaded (health watch, reports).
    pub stats: ModelStats,
    /// Injected faults (tests and the demo only; see `[testing]`).
    pub faults: Faults,
    /// sha256 of the bundle file, when known (the agent's slots).
    pub bundle_id: String,
    /// Rolling drift histograms, when the manifest carries a baseline.
    pub drift: Option<std::sync::Mutex<crate::drift::DriftMonitor>>,
    /// Drift alerts not yet published (telemetry drains them).
    pub drift_alerts: std::sync::Mutex<Vec<crate::drift::DriftAlert>>,
    generation: u64,
}

impl ActiveModel {
    /// Changes whenever a different model (or a reload) becomes active.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Test-only faults applied to live inferences of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub extra_latency: Duration,
    pub fail: bool,
}

/// Latencies kept for percentiles.
const LATENCY_RING: usize = 2048;

/// Per-model counters, updated by the workers.
#[derive(Debug, Default)]
pub struct ModelStats {
    pub inferences: AtomicU64,
    pub errors: AtomicU64,
    pub non_finite: AtomicU64,
    pub panics: AtomicU64,
    /// Most recent compute latencies in ms.
    latencies: std::sync::Mutex<std::collections::VecDeque<f32>>,
    /// Latencies since the last telemetry record (capped).
    interval: std::sync::Mutex<Vec<f32>>,
    /// Application feedback (`POST /v1/feedback`) since the last record.
    reward: std::sync::Mutex<edgefleet_wire::telemetry::Reward>,
}

/// Latencies kept per telemetry interval; beyond it, every other sample.
const INTERVAL_CAP: usize = 16 * 1024;

impl ModelStats {
    pub(crate) fn record(&self, ms: f32) {
        if let Ok(mut l) = self.latencies.lock() {
            if l.len() == LATENCY_RING {
                l.pop_front();
            }
            l.push_back(ms);
        }
        if let Ok(mut v) = self.interval.lock() {
            if v.len() >= INTERVAL_CAP {
                // Thin out evenly rather than stop recording.
                let kept: Vec<f32> = v.iter().step_by(2).copied().collect();
                *v = kept;
            }
            v.push(ms);
        }
    }

    /// Counts one application outcome for this model.
    pub fn feedback(&self, value: f64) {
        if let Ok(mut r) = self.reward.lock() {
            r.count += 1;
            r.sum += value;
            r.sum_sq += value * value;
        }
    }

    /// Takes the feedback since the last call (`None` without any).
    pub fn take_reward(&self) -> Option<edgefleet_wire::telemetry::Reward> {
        let r = self
            .reward
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .ok()?;
        (r.count > 0).then_some(r)
    }

    /// Takes the latencies recorded since the last call.
    pub fn take_interval(&self) -> Vec<f32> {
        self.interval
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The p95 of the most recent latencies, in ms.
    pub fn p95_ms(&self) -> Option<f64> {
        let v: Vec<f32> = self
            .latencies
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default();
        edgefleet_wire::stats::p95(&v)
    }

    /// p50, p95, p99 of the most recent latencies, in ms.
    pub fn percentiles(&self) -> Option<(f64, f64, f64)> {
        let v: Vec<f32> = self
            .latencies
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default();
        edgefleet_wire::stats::latency_summary(v).map(|l| (l.p50, l.p95, l.p99))
    }
}

/// Timings of [`prepare`], for `bench` and reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrepareTimings {
    /// Parse, pin and type the graph.
    pub load: Duration,
    /// tract's optimization pass.
    pub optimize: Duration,
    /// The golden self-test, and giving back what the load freed.
    pub self_test: Duration,
    /// The NNEF graph came pre-parsed from the bundle
    /// (`edgefleet_runtime::graph_ast`) rather than from its text.
    pub graph_preparsed: bool,
    /// The model came from its compiled file ([`crate::compiled`]), not
    /// from the bundle's ONNX.
    pub compiled: bool,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Where [`prepare_with`] looks for, and keeps, a bundle's compiled model.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub models: CompiledModels,
    /// The bundle's name there (the slots' content address).
    pub key: String,
}

/// What [`prepare_with`] made.
#[derive(Debug)]
pub struct Prepared {
    pub model: ActiveModel,
    pub timings: PrepareTimings,
    /// The compiled model being written for the next load, when this one
    /// came from the bundle's ONNX.
    pub compiling: Option<std::thread::JoinHandle<()>>,
}

/// Loads and optimizes a trusted bundle's model and runs its golden
/// self-test. A model that fails is never returned, so it is never served.
/// The model bytes are dropped once tract has parsed them, and what the load
/// freed is given back to the system ([`crate::mem::release_freed`]).
pub fn prepare(bundle: TrustedBundle) -> Result<(ActiveModel, PrepareTimings), AgentError> {
    prepare_with(bundle, None).map(|p| (p.model, p.timings))
}

/// [`prepare`], with an ONNX bundle's compiled model ([`crate::compiled`]):
/// loaded from its file when there is one that passes (a file that does not
/// is deleted, and the bundle loads as without one), and otherwise written
/// on a thread of its own once the model passed its self-test.
pub fn prepare_with(
    bundle: TrustedBundle,
    compiled: Option<Compiled>,
) -> Result<Prepared, AgentError> {
    let compiled = compiled.filter(|_| bundle.manifest.payload.format == ModelFormat::Onnx);
    if let Some(c) = &compiled
        && let Some(found) = c.models.lookup(&c.key)
    {
        match from_compiled(&bundle.manifest, &found) {
            Ok((model, loading, report, tested_in)) => {
                // Only now is the bundle's model not needed as a fallback.
                drop(bundle.model);
                let t = Instant::now();
                crate::mem::release_freed();
                COUNTS.used.fetch_add(1, Ordering::Relaxed);
                let (model, timings) = activate(
                    bundle.manifest,
                    model,
                    report,
                    loading,
                    tested_in + t.elapsed(),
                    true,
                );
                return Ok(Prepared {
                    model,
                    timings,
                    compiling: None,
                });
            }
            Err(e) => c.models.reject(&c.key, &found, &e),
        }
    }
    // The model's digest is compared on a second core while tract parses
    // the bytes; a mismatch fails the load as opening the bundle would have.
    let t0 = Instant::now();
    let loaded = bundle
        .use_model(|bytes| {
            let m = &bundle.manifest;
            Model::from_bundle_keeping(
                m.payload.format,
                bytes,
                &m.inputs,
                &m.outputs,
                m.non_finite_inputs,
                compiled.is_some(),
            )
            .map_err(AgentError::from)
        })
        .and_then(|loaded| loaded);
    let loading = t0.elapsed();
    let TrustedBundle {
        manifest: m,
        model: bytes,
        ..
    } = bundle;
    drop(bytes);
    let (model, decluttered) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            crate::mem::release_freed();
            return Err(e);
        }
    };
    let t1 = Instant::now();
    let tested = model
        .session()
        .and_then(|mut s| self_test(&mut s, &m.golden));
    // The trim frees the self-test's state too, so it counts as part of the
    // self-test's time.
    crate::mem::release_freed();
    let report = tested?;
    let self_tested = t1.elapsed();
    let compiling = match (compiled, decluttered) {
        (Some(c), Some(d)) => match c.models.keep_in_background(c.key, d) {
            Ok(handle) => Some(handle),
            Err(e) => {
                COUNTS.not_stored.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot start keeping the model compiled");
                None
            }
        },
        _ => None,
    };
    let (model, timings) = activate(m, model, report, loading, self_tested, false);
    Ok(Prepared {
        model,
        timings,
        compiling,
    })
}

/// Loads a compiled model, comparing its file's digest on a second core
/// while tract parses it, and runs the bundle's self-test on it: the model,
/// the load's time, the report and the self-test's time.
fn from_compiled(
    m: &Manifest,
    found: &Found,
) -> Result<(Model, Duration, SelfTestReport, Duration), Rejection> {
    let t0 = Instant::now();
    let bytes = std::fs::read(&found.path).map_err(|e| Rejection::Damaged(e.to_string()))?;
    let (digest, model) = std::thread::scope(|s| {
        let digest = s.spawn(|| <[u8; 32]>::from(Sha256::digest(&bytes)));
        let model = Model::from_bundle(
            ModelFormat::Nnef,
            &bytes,
            &m.inputs,
            &m.outputs,
            m.non_finite_inputs,
        );
        (digest.join(), model)
    });
    drop(bytes);
    if digest.ok() != Some(found.sha256) {
        return Err(Rejection::Damaged(
            "the compiled model's content does not match its digest".into(),
        ));
    }
    let failed = |e| Rejection::Failed(AgentError::from(e));
    let model = model.map_err(failed)?;
    let loading = t0.elapsed();
    let t1 = Instant::now();
    let report = model
        .session()
        .and_then(|mut s| self_test(&mut s, &m.golden))
        .map_err(failed)?;
    Ok((model, loading, report, t1.elapsed()))
}

/// Makes the served model of a loaded, self-tested one.
fn activate(
    m: Verified<Manifest>,
    model: Model,
    report: SelfTestReport,
    loading: Duration,
    self_tested: Duration,
    compiled: bool,
) -> (ActiveModel, PrepareTimings) {
    let load = model.load_timings();
    let timings = PrepareTimings {
        // parsing, and any wait for the model's digest after it
        load: loading.saturating_sub(load.optimize),
        optimize: load.optimize,
        self_test: self_tested,
        graph_preparsed: load.graph_preparsed,
        compiled,
    };
    tracing::info!(
        model = %m.name,
        version = %m.version,
        format = %m.payload.format,
        load_ms = timings.load.as_secs_f64() * 1e3,
        optimize_ms = timings.optimize.as_secs_f64() * 1e3,
        self_test_ms = timings.self_test.as_secs_f64() * 1e3,
        graph_preparsed = timings.graph_preparsed,
        compiled,
        "model loaded and self-tested"
    );
    let info = ModelInfo {
        name: m.name.to_string(),
        version: m.version.to_string(),
        sequence: m.sequence,
        inputs: m.inputs.clone(),
        outputs: m.outputs.clone(),
        loaded_at: now_unix(),
        manifest_digest: hex::encode(m.digest()),
    };
    let drift = m.drift_baseline.as_ref().map(|b| {
        std::sync::Mutex::new(crate::drift::DriftMonitor::new(
            b,
            crate::drift::DriftConfig::default(),
        ))
    });
    (
        ActiveModel {
            info,
            model,
            manifest: m,
            self_test: report,
            stats: ModelStats::default(),
            faults: Faults::default(),
            bundle_id: String::new(),
            drift,
            drift_alerts: std::sync::Mutex::new(Vec::new()),
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        },
        timings,
    )
}

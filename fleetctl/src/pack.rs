//! `fleetctl bundle pack`: turn an operator's model file and golden vectors
//! into a signed bundle, refusing anything that would fail on a device.
//!
//! The packer loads the model with the device runtime, pins the inputs to the
//! golden shapes, and runs every golden case. With an independent reference
//! (ONNX Runtime, the training framework) a disagreement beyond the tolerance
//! is fatal: FACTS.md documents real tract bugs on quantized graphs that this
//! catches. With `--nnef`, the converted model is loaded back and checked
//! against the same references, so the stored form is the tested form.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use edgefleet_runtime::{
    Model, TRACT_VERSION, declared_inputs, inline_external_data, onnx_to_nnef, self_test,
};
use edgefleet_wire::bundle::{Signed, compress_model, stored_model, write_bundle};
use edgefleet_wire::manifest::{
    GoldenCase, GoldenSet, MAX_MACHINE_LEN, Manifest, ModelFormat, NonFiniteInputs, PackLatency,
    ReferenceSource, TargetArch,
};
use edgefleet_wire::names::ModelName;
use edgefleet_wire::npz::{NpzLimits, read_npz};
use edgefleet_wire::tensor::{NamedTensor, TensorSpec};

use crate::error::{Error, Result};

/// zstd level for payloads: float weights compress poorly, higher levels buy
/// little and cost seconds per pack; decompression speed barely depends on it.
const ZSTD_LEVEL: i32 = 9;

/// With `--compression auto`, zstd must save at least this share of the
/// model's bytes to be kept: a device decompresses the payload on every
/// load (each new bundle, each agent start), and downloads it once. A
/// stored payload also skips the second SHA-256 pass, and its piece
/// digest is hashed on every core (docs/bundle-format.md). rec: zstd saves
/// 7.9 % and costs 10–14 ms of every cold start on the benchmark machine
/// (docs/decisions.md).
pub const AUTO_MIN_SAVING: f64 = 0.10;

/// How the packer stores the model (`--compression`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadCompression {
    /// zstd when it saves at least [`AUTO_MIN_SAVING`] of the bytes,
    /// otherwise the model as is.
    #[default]
    Auto,
    /// Always zstd (bundle format 1: every agent version reads it).
    Zstd,
    /// Never compressed (bundle format 2).
    None,
}

/// Everything `bundle pack` needs.
#[derive(Debug)]
pub struct PackRequest {
    pub model: PathBuf,
    pub name: ModelName,
    pub version: semver::Version,
    pub sequence: u64,
    /// One golden case per entry: inputs, and optionally reference outputs.
    pub golden_inputs: Vec<PathBuf>,
    pub golden_outputs: Vec<PathBuf>,
    pub tolerance: f32,
    pub keys: Vec<SigningKey>,
    pub now: u64,
    pub expires_in: u64,
    pub nnef: bool,
    pub targets: Vec<TargetArch>,
    pub min_agent_version: semver::Version,
    pub non_finite_inputs: NonFiniteInputs,
    /// Calibration inputs (`.npz`, one array per model input with a leading
    /// sample axis) for the drift baseline.
    pub baseline: Option<PathBuf>,
    /// Refuse a model whose measured median latency on this machine is
    /// above this many milliseconds.
    pub max_latency_ms: Option<f64>,
    /// How the model is stored in the payload.
    pub compression: PayloadCompression,
}

/// Roughly how long the packer spends timing a model.
const LATENCY_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

/// Times the stored model form on this machine: one compute thread, the
/// first golden case through the same checks a device request passes,
/// after three untimed runs; 5 to 100 timed runs within about a second.
fn measure_latency(model: &Model, inputs: &[NamedTensor]) -> Result<PackLatency> {
    let mut session = model.session()?;
    let mut once = || -> Result<std::time::Duration> {
        let t = std::time::Instant::now();
        session.run(inputs)?;
        Ok(t.elapsed())
    };
    let mut probe = std::time::Duration::ZERO;
    for _ in 0..3 {
        probe = once()?;
    }
    let fit = LATENCY_BUDGET.as_nanos() / probe.as_nanos().max(1);
    let iterations = usize::try_from(fit).unwrap_or(usize::MAX).clamp(5, 100);
    let mut samples = (0..iterations)
        .map(|_| once().map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)))
        .collect::<Result<Vec<u64>>>()?;
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(PackLatency {
        median_us: at(0.5),
        p90_us: at(0.9),
        iterations: iterations as u32,
        machine: machine(),
    })
}

/// This machine in a few words: architecture and CPU model.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| matches!(k.trim(), "model name" | "Hardware" | "Model"))
        .map(|(_, v)| v.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut m = match model {
        Some(name) => format!("{}, {name}, {cores} cores", std::env::consts::ARCH),
        None => format!("{}, {cores} cores", std::env::consts::ARCH),
    };
    m.retain(|c| !c.is_control());
    m.truncate(MAX_MACHINE_LEN);
    while !m.is_char_boundary(m.len()) {
        m.pop();
    }
    m
}

/// Most calibration samples read for a drift baseline.
pub const MAX_BASELINE_SAMPLES: usize = 10_000;

/// Splits calibration arrays into per-sample inputs shaped like `specs`
/// (leading sample axis of each array; f16/f64 widened or narrowed to the
/// model's dtype), then computes features and runs the model for scores.
fn drift_baseline(
    path: &Path,
    specs: &[TensorSpec],
    session: &mut edgefleet_runtime::Session,
) -> Result<edgefleet_wire::manifest::DriftBaseline> {
    use edgefleet_wire::tensor::{DType, Tensor};
    let bad = |m: String| Error::Usage(format!("--baseline {}: {m}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let arrays = read_npz(
        std::io::BufReader::new(f),
        NpzLimits {
            max_entries: 256,
            max_total_bytes: 4 * 1024 * 1024 * 1024,
        },
    )
    .map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    let mut per_input = Vec::new();
    let mut n_samples = None;
    for spec in specs {
        let a = arrays.iter().find(|a| a.name == spec.name).ok_or_else(|| {
            bad(format!(
                "no array named {:?} (the model's input)",
                spec.name
            ))
        })?;
        let shape = a.tensor.shape();
        let spec_shape = spec.shape.as_slice();
        let per: u64 = spec_shape.iter().product();
        // [N, ...the input's shape]: N whole inputs; or [rows, ...the
        // input's shape after its batch axis]: rows stacked on the batch
        // axis, each model run taking as many as the input's batch.
        let batch = spec_shape.first().copied().unwrap_or(1);
        let n = if shape.len() == spec_shape.len() + 1 && &shape[1..] == spec_shape {
            shape[0]
        } else if !spec_shape.is_empty()
            && shape.len() == spec_shape.len()
            && shape[1..] == spec_shape[1..]
            && batch > 0
            && shape[0] % batch == 0
        {
            shape[0] / batch
        } else {
            let dims = |d: &[u64]| d.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            let mut expected = format!("[N, {}]", dims(spec_shape));
            if let Some((_, rest)) = spec_shape.split_first() {
                expected = format!(
                    "{expected} or [rows, {}] with rows a multiple of {batch}",
                    dims(rest)
                );
            }
            return Err(bad(format!(
                "{:?} has shape {shape:?}; expected {expected}",
                spec.name
            )));
        };
        if n.checked_mul(per) != Some(a.tensor.element_count() as u64) {
            return Err(bad(format!(
                "{:?} has {} elements, not {n} inputs of {per}",
                spec.name,
                a.tensor.element_count()
            )));
        }
        if n_samples.is_some_and(|m| m != n) {
            return Err(bad("arrays have different sample counts".into()));
        }
        n_samples = Some(n);
        per_input.push((spec, a, per));
    }
    let n = usize::try_from(n_samples.unwrap_or(0)).unwrap_or(usize::MAX);
    if n == 0 || n > MAX_BASELINE_SAMPLES {
        return Err(bad(format!(
            "{n} samples; give 1 to {MAX_BASELINE_SAMPLES}"
        )));
    }
    let mut samples = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    for i in 0..n {
        let mut inputs = Vec::new();
        for (spec, a, per) in &per_input {
            let start = i * *per as usize;
            if a.tensor.dtype() == spec.dtype {
                // Any dtype (u8 camera frames, bool masks): the sample's bytes.
                let size = spec.dtype.size();
                let bytes = a.tensor.data()[start * size..(start + *per as usize) * size].to_vec();
                inputs.push(NamedTensor {
                    name: spec.name.clone(),
                    tensor: Tensor::from_bytes(spec.dtype, spec.shape.clone(), bytes)?,
                });
                continue;
            }
            let values: Vec<f64> = (start..start + *per as usize)
                .map(|k| a.tensor.get_f64(k))
                .collect();
            let tensor = match spec.dtype {
                DType::F32 => Tensor::from_f32(
                    spec.shape.clone(),
                    &values.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                ),
                DType::F64 => Tensor::from_f64(spec.shape.clone(), &values),
                DType::I64 => Tensor::from_i64(
                    spec.shape.clone(),
                    &values.iter().map(|v| *v as i64).collect::<Vec<_>>(),
                ),
                other => {
                    return Err(bad(format!(
                        "{:?} has dtype {}, the model's input {other}; give it as {other}",
                        spec.name,
                        a.tensor.dtype()
                    )));
                }
            }?;
            inputs.push(NamedTensor {
                name: spec.name.clone(),
                tensor,
            });
        }
        let outputs = session.run(&inputs)?;
        samples.push(edgefleet_wire::drift::input_features(&inputs));
        if let Some(s) = edgefleet_wire::drift::output_score(&outputs) {
            scores.push(s);
        }
    }
    Ok(edgefleet_wire::drift::baseline(&samples, &scores))
}

/// What a successful pack produced.
#[derive(Debug)]
pub struct Packed {
    pub bundle: Vec<u8>,
    pub manifest: Manifest,
    pub max_abs_diff: f64,
    pub warnings: Vec<String>,
}

fn read_npz_file(path: &Path) -> Result<Vec<NamedTensor>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_npz(std::io::BufReader::new(f), NpzLimits::default()).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Orders `tensors` like `names`, refusing missing or extra entries.
fn match_names(
    what: &str,
    path: &Path,
    mut tensors: Vec<NamedTensor>,
    names: &[String],
) -> Result<Vec<NamedTensor>> {
    if let Some(extra) = tensors.iter().find(|t| !names.contains(&t.name)) {
        return Err(Error::Golden(format!(
            "{}: {:?} is not a model {what} (the model's {what}s are: {})",
            path.display(),
            extra.name,
            names.join(", ")
        )));
    }
    names
        .iter()
        .map(|n| {
            let i = tensors.iter().position(|t| &t.name == n).ok_or_else(|| {
                Error::Golden(format!("{}: lacks model {what} {n:?}", path.display()))
            })?;
            Ok(tensors.swap_remove(i))
        })
        .collect()
}

/// Packs and signs a bundle; see the module docs for the checks.
pub fn pack(req: &PackRequest) -> Result<Packed> {
    if req.keys.is_empty() {
        return Err(Error::Usage("at least one --key is required".into()));
    }
    if req.golden_inputs.is_empty() {
        return Err(Error::Usage(
            "at least one --golden-inputs file is required".into(),
        ));
    }
    if !req.golden_outputs.is_empty() && req.golden_outputs.len() != req.golden_inputs.len() {
        return Err(Error::Usage(format!(
            "{} --golden-inputs but {} --golden-outputs: give one reference per input file, or none",
            req.golden_inputs.len(),
            req.golden_outputs.len()
        )));
    }
    if !req.tolerance.is_finite() || req.tolerance < 0.0 {
        return Err(Error::Usage(format!(
            "--tolerance {} must be a non-negative number",
            req.tolerance
        )));
    }
    let onnx = std::fs::read(&req.model).map_err(|e| Error::io(&req.model, e))?;
    let load_err = |source| Error::Load {
        path: req.model.clone(),
        source,
    };
    // Weights in external files (`model.onnx.data`) go into the one model
    // file the bundle carries.
    let folder = req.model.parent().unwrap_or(Path::new("."));
    let onnx = inline_external_data(onnx, folder).map_err(load_err)?;
    let input_names = declared_inputs(ModelFormat::Onnx, &onnx).map_err(load_err)?;

    // Golden inputs fix the input specs (case 0) and must agree across cases.
    let mut cases_in = Vec::new();
    for path in &req.golden_inputs {
        cases_in.push(match_names(
            "input",
            path,
            read_npz_file(path)?,
            &input_names,
        )?);
    }
    let specs: Vec<TensorSpec> = cases_in[0].iter().map(NamedTensor::spec).collect();
    for (path, case) in req.golden_inputs.iter().zip(&cases_in) {
        for (t, spec) in case.iter().zip(&specs) {
            if t.spec() != *spec {
                return Err(Error::Golden(format!(
                    "{}: input {} does not match {} from the first golden file",
                    path.display(),
                    t.spec(),
                    spec
                )));
            }
        }
    }

    let model = Model::load(ModelFormat::Onnx, &onnx, &specs, None).map_err(load_err)?;
    let output_names: Vec<String> = model.outputs().iter().map(|s| s.name.clone()).collect();
    let mut session = model.session()?;
    let mut warnings = Vec::new();
    let (reference, cases) = if req.golden_outputs.is_empty() {
        warnings.push(
            "no --golden-outputs: recording tract's own outputs as the reference; they are not an independent check of tract itself"
                .to_string(),
        );
        let mut cases = Vec::new();
        for inputs in cases_in {
            let outputs = session.run(&inputs)?;
            cases.push(GoldenCase { inputs, outputs });
        }
        (ReferenceSource::TractSelf, cases)
    } else {
        let mut cases = Vec::new();
        for (inputs, path) in cases_in.into_iter().zip(&req.golden_outputs) {
            let outputs = match_names("output", path, read_npz_file(path)?, &output_names)?;
            for (t, spec) in outputs.iter().zip(model.outputs()) {
                if t.tensor.dtype() != spec.dtype || !spec.admits(t.tensor.shape()) {
                    return Err(Error::Golden(format!(
                        "{}: reference output {} does not match the model's output {}",
                        path.display(),
                        t.spec(),
                        spec
                    )));
                }
            }
            cases.push(GoldenCase { inputs, outputs });
        }
        (ReferenceSource::External, cases)
    };
    let golden = GoldenSet {
        tolerance: req.tolerance,
        reference,
        cases,
    };
    let mut report =
        self_test(&mut session, &golden).map_err(|source| Error::ReferenceMismatch {
            form: "onnx",
            source,
        })?;

    let (format, payload, stored) = if req.nnef {
        let nnef = onnx_to_nnef(&onnx, &specs).map_err(load_err)?;
        // The stored form is the tested form: reload the NNEF and re-check.
        let reloaded = Model::load(ModelFormat::Nnef, &nnef, &specs, Some(model.outputs()))
            .map_err(load_err)?;
        report = self_test(&mut reloaded.session()?, &golden).map_err(|source| {
            Error::ReferenceMismatch {
                form: "nnef",
                source,
            }
        })?;
        (ModelFormat::Nnef, nnef, reloaded)
    } else {
        (ModelFormat::Onnx, onnx, model.clone())
    };
    let latency = measure_latency(&stored, &golden.cases[0].inputs)?;
    let median_ms = latency.median_us as f64 / 1e3;
    if let Some(limit_ms) = req.max_latency_ms
        && median_ms > limit_ms
    {
        return Err(Error::TooSlow {
            median_ms,
            limit_ms,
            machine: latency.machine,
        });
    }

    let drift_baseline = match &req.baseline {
        Some(path) => Some(drift_baseline(path, &specs, &mut model.session()?)?),
        None => None,
    };
    let (payload_info, compressed) = match req.compression {
        PayloadCompression::None => (stored_model(&payload, format), payload),
        choice => {
            let (info, compressed) = compress_model(&payload, format, ZSTD_LEVEL)?;
            let saved = 1.0 - compressed.len() as f64 / payload.len().max(1) as f64;
            if choice == PayloadCompression::Auto && saved < AUTO_MIN_SAVING {
                (stored_model(&payload, format), payload)
            } else {
                (info, compressed)
            }
        }
    };
    let expires_at = req
        .now
        .checked_add(req.expires_in)
        .ok_or_else(|| Error::Usage("--expires-in overflows".into()))?;
    let manifest = Manifest {
        name: req.name.clone(),
        version: req.version.clone(),
        sequence: req.sequence,
        created_at: req.now,
        expires_at,
        payload: payload_info,
        tract_version: TRACT_VERSION.to_string(),
        inputs: specs,
        outputs: model.outputs().to_vec(),
        targets: req.targets.clone(),
        min_agent_version: req.min_agent_version.clone(),
        non_finite_inputs: req.non_finite_inputs,
        golden,
        drift_baseline,
        pack_latency: Some(latency),
    };
    let keys: Vec<&SigningKey> = req.keys.iter().collect();
    let signed = Signed::sign(&manifest, &keys)?;
    let mut bundle = Vec::new();
    write_bundle(&mut bundle, &signed, &compressed)?;
    Ok(Packed {
        bundle,
        manifest,
        max_abs_diff: report.max_abs_diff,
        warnings,
    })
}

//! The v1 bundle manifest: everything a device must know about a model before
//! it trusts, loads and serves it. It is postcard-encoded and the encoded
//! bytes are what gets signed (see [`crate::bundle`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::ModelName;
use crate::tensor::{NamedTensor, TensorSpec, check_tensor_name};

/// How the payload's model bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX protobuf, as exported by the training framework.
    Onnx,
    /// A tract NNEF tar of the decluttered model: faster to load on device.
    Nnef,
}

impl std::fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef",
        })
    }
}

/// How the model is stored in the bundle's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd; the stored bytes' digest is their SHA-256 (format version 1).
    Zstd,
    /// The model as is, for models zstd barely shrinks (float weights):
    /// nothing to decompress on every load. The stored bytes' digest is
    /// a piece list ([`crate::bundle::PieceDigest`]), which a device
    /// computes on all its cores (format version 2). Added after the
    /// first bundles were signed: older agents refuse such a bundle as
    /// `bad version`, before its manifest is read.
    None,
}

impl Compression {
    /// The bundle format version whose header goes with this compression:
    /// it tells a reader which digest to compute while the payload streams
    /// in, before the manifest that names the compression is trusted.
    pub fn format_version(self) -> u16 {
        match self {
            Compression::Zstd => crate::bundle::FORMAT_VERSION,
            Compression::None => crate::bundle::FORMAT_VERSION_PIECES,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        })
    }
}

/// Sizes and digests of the payload, compressed (as stored in the bundle and
/// downloaded) and uncompressed (the model file itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadInfo {
    pub compression: Compression,
    pub format: ModelFormat,
    pub len: u64,
    pub sha256: [u8; 32],
    pub compressed_len: u64,
    pub compressed_sha256: [u8; 32],
}

/// CPU architectures a bundle may target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetArch {
    X86_64,
    Aarch64,
    Armv7,
}

impl TargetArch {
    pub const ALL: [TargetArch; 3] = [TargetArch::X86_64, TargetArch::Aarch64, TargetArch::Armv7];

    pub fn name(self) -> &'static str {
        match self {
            TargetArch::X86_64 => "x86_64",
            TargetArch::Aarch64 => "aarch64",
            TargetArch::Armv7 => "armv7",
        }
    }

    /// The architecture this binary was compiled for, if it is one we ship.
    pub fn current() -> Option<TargetArch> {
        if cfg!(target_arch = "x86_64") {
            Some(TargetArch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(TargetArch::Aarch64)
        } else if cfg!(target_arch = "arm") {
            Some(TargetArch::Armv7)
        } else {
            None
        }
    }
}

impl std::fmt::Display for TargetArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TargetArch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "x86_64" | "amd64" => Ok(TargetArch::X86_64),
            "aarch64" | "arm64" => Ok(TargetArch::Aarch64),
            "armv7" | "armhf" | "arm" => Ok(TargetArch::Armv7),
            _ => Err(Error::invalid(
                "target arch",
                format!("{s:?}: expected x86_64, aarch64 or armv7"),
            )),
        }
    }
}

/// Where the golden reference outputs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceSource {
    /// An independent runtime (the training framework or ONNX Runtime).
    External,
    /// tract's own outputs at pack time: catches device regressions only,
    /// not tract bugs.
    TractSelf,
}

/// One golden case: inputs and the reference outputs for them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldenCase {
    pub inputs: Vec<NamedTensor>,
    pub outputs: Vec<NamedTensor>,
}

/// Golden vectors the packer and every device check the model against.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoldenSet {
    /// Largest accepted absolute difference per element.
    pub tolerance: f32,
    pub reference: ReferenceSource,
    pub cases: Vec<GoldenCase>,
}

/// Whether NaN/inf inputs are accepted by the serving API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFiniteInputs {
    Reject,
    Allow,
}

/// A binned distribution of one feature (an input channel or the top score).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// What is binned, e.g. `x[c=0]` or `top_score`.
    pub feature: String,
    /// `bins + 1` ascending edges.
    pub edges: Vec<f32>,
    /// Fraction of calibration samples per bin; sums to 1.
    pub fractions: Vec<f32>,
}

/// Reference distributions for on-device drift detection (PSI).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftBaseline {
    pub inputs: Vec<Histogram>,
    pub output: Option<Histogram>,
    pub samples: u64,
}

/// The signed description of a model bundle (format version 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: ModelName,
    pub version: semver::Version,
    /// Monotonically increasing per model name; devices refuse to go below
    /// the highest they committed (anti-rollback).
    pub sequence: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; devices refuse the bundle after this instant.
    pub expires_at: u64,
    pub payload: PayloadInfo,
    /// The tract version the packer checked the model with.
    pub tract_version: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub targets: Vec<TargetArch>,
    pub min_agent_version: semver::Version,
    pub non_finite_inputs: NonFiniteInputs,
    pub golden: GoldenSet,
    pub drift_baseline: Option<DriftBaseline>,
    /// The packer's latency measurement. Added after the first bundles
    /// were signed: it is the last field, and a manifest that ends before
    /// it decodes as `None` (see `bundle::decode_manifest`).
    pub pack_latency: Option<PackLatency>,
}

/// What `fleetctl bundle pack` measured on the packing machine: the stored
/// model form, one compute thread, the first golden case. Informational:
/// devices never act on it, and a board is usually slower than the machine
/// that packed for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackLatency {
    /// Median over `iterations` timed runs, in microseconds.
    pub median_us: u64,
    /// 90th percentile, in microseconds.
    pub p90_us: u64,
    pub iterations: u32,
    /// The packing machine: architecture and CPU model.
    pub machine: String,
}

/// Longest [`PackLatency::machine`] a manifest may carry.
pub const MAX_MACHINE_LEN: usize = 256;

impl Manifest {
    /// Internal consistency: unique tensor names, golden cases that match the
    /// declared specs, a sane tolerance and validity window.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(Error::invalid("manifest", d));
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return bad("a model needs at least one input and one output".into());
        }
        for (kind, specs) in [("input", &self.inputs), ("output", &self.outputs)] {
            for (i, s) in specs.iter().enumerate() {
                check_tensor_name(&s.name)?;
                if kind == "input" && s.has_dynamic_dims() {
                    return bad(format!("input {:?} has a dynamic dimension", s.name));
                }
                s.fixed_element_count()?;
                if specs[..i].iter().any(|o| o.name == s.name) {
                    return bad(format!("tensor name {:?} appears twice", s.name));
                }
            }
        }
        if self.payload.compression == Compression::None
            && self.payload.compressed_len != self.payload.len
        {
            return bad(format!(
                "an uncompressed payload of {} bytes holds a model of {} bytes",
                self.payload.compressed_len, self.payload.len
            ));
        }
        if self.targets.is_empty() {
            return bad("no target architectures".into());
        }
        if self.expires_at <= self.created_at {
            return bad("expires_at is not after created_at".into());
        }
        if !self.golden.tolerance.is_finite() || self.golden.tolerance < 0.0 {
            return bad(format!(
                "tolerance {} is not a finite non-negative number",
                self.golden.tolerance
            ));
        }
        if self.golden.cases.is_empty() {
            return bad("no golden cases".into());
        }
        for (i, case) in self.golden.cases.iter().enumerate() {
            check_case_tensors(i, "input", &case.inputs, &self.inputs)?;
            check_case_tensors(i, "output", &case.outputs, &self.outputs)?;
        }
        if let Some(l) = &self.pack_latency
            && (l.machine.len() > MAX_MACHINE_LEN || l.machine.chars().any(char::is_control))
        {
            return bad(format!(
                "pack_latency.machine is longer than {MAX_MACHINE_LEN} bytes or has control characters"
            ));
        }
        Ok(())
    }

    /// Spec of the input with this name.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }
}

/// Golden tensors must be exactly the declared ones, in any order.
fn check_case_tensors(
    case: usize,
    kind: &str,
    got: &[NamedTensor],
    specs: &[TensorSpec],
) -> Result<()> {
    if got.len() != specs.len() {
        return Err(Error::invalid(
            "manifest",
            format!(
                "golden case {case} has {} {kind}s, the model declares {}",
                got.len(),
                specs.len()
            ),
        ));
    }
    for spec in specs {
        let t = got.iter().find(|t| t.name == spec.name).ok_or_else(|| {
            Error::invalid(
                "manifest",
                format!("golden case {case} lacks {kind} {:?}", spec.name),
            )
        })?;
        if t.tensor.dtype() != spec.dtype || !spec.admits(t.tensor.shape()) {
            return Err(Error::invalid(
                "manifest",
                format!(
                    "golden case {case} {kind} {:?} is {}{:?}, the model declares {}{}",
                    spec.name,
                    t.tensor.dtype(),
                    t.tensor.shape(),
                    spec.dtype,
                    spec.shape_text()
                ),
            ));
        }
    }
    Ok(())
}

//! Errors of the model runtime.

use edgefleet_wire::tensor::DType;

/// Errors from loading, checking and running models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// tract could not parse, type or optimize the model. `detail` is one
    /// line naming the failing node and op where tract reports them.
    #[error("cannot load model: {detail}")]
    Load { detail: String },
    #[error("unknown input {name:?} (the model's inputs are: {expected})")]
    UnknownInput { name: String, expected: String },
    #[error("missing input {name:?}")]
    MissingInput { name: String },
    #[error("input {name:?} has dtype {got}, the model expects {expected}")]
    WrongDtype {
        name: String,
        got: DType,
        expected: DType,
    },
    #[error("input {name:?} has shape {got:?}, the model expects {expected:?}")]
    WrongShape {
        name: String,
        got: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("input {name:?} contains NaN or infinite values, which this model's manifest forbids")]
    NonFinite { name: String },
    #[error("unsupported dtype {dtype} for {what}")]
    UnsupportedDtype { what: String, dtype: String },
    #[error("inference failed: {detail}")]
    Inference { detail: String },
    /// The bundle's model format is not compiled into this agent (an
    /// NNEF-only build, without the `onnx` feature, given an ONNX model).
    #[error(
        "this agent was built without {format} support (an NNEF-only build); pack the bundle with `fleetctl bundle pack --nnef`"
    )]
    UnsupportedFormat { format: &'static str },
    #[error(
        "self-test failed: golden case {case}, output {output:?} differs from the reference by max abs {max_abs:e} at index {at} (tolerance {tolerance:e})"
    )]
    SelfTest {
        case: usize,
        output: String,
        max_abs: f64,
        at: usize,
        tolerance: f32,
    },
    #[error("self-test failed: golden case {case}: {detail}")]
    SelfTestShape { case: usize, detail: String },
    /// The model runs, but tract cannot write it as NNEF (an op without an
    /// NNEF serializer in tract 0.23.9, e.g. the quantized ops). The ONNX
    /// form still packs.
    #[error("cannot store the model as NNEF: {detail}; pack it without --nnef (the ONNX form)")]
    NnefExport { detail: String },
    /// A runtime setting out of range (e.g. compute threads).
    #[error("runtime setting: {detail}")]
    Config { detail: String },
}

impl RuntimeError {
    /// Stable machine-readable code (used by the HTTP API and reports).
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Load { .. } => "model_load_failed",
            RuntimeError::UnknownInput { .. } => "unknown_input",
            RuntimeError::MissingInput { .. } => "missing_input",
            RuntimeError::WrongDtype { .. } => "wrong_dtype",
            RuntimeError::WrongShape { .. } => "wrong_shape",
            RuntimeError::NonFinite { .. } => "non_finite_input",
            RuntimeError::UnsupportedDtype { .. } => "unsupported_dtype",
            RuntimeError::Inference { .. } => "inference_failed",
            RuntimeError::UnsupportedFormat { .. } => "unsupported_model_format",
            RuntimeError::SelfTest { .. } | RuntimeError::SelfTestShape { .. } => {
                "self_test_failed"
            }
            RuntimeError::NnefExport { .. } => "nnef_export_failed",
            RuntimeError::Config { .. } => "runtime_config",
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

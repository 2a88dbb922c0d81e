//! Model loading and execution with tract.
//!
//! A [`Model`] is an optimized tract plan with its input facts pinned to the
//! manifest's shapes; a [`Session`] holds one tract state and is owned by one
//! worker thread. The same code backs the device and `fleetctl bundle pack`,
//! so a bundle that packs is a bundle that loads.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use edgefleet_wire::manifest::{GoldenSet, ModelFormat, NonFiniteInputs};
use edgefleet_wire::tensor::{
    DType, DYNAMIC_DIM, NamedTensor, Tensor as WireTensor, TensorSpec, max_abs_diff,
};
use tract_nnef::prelude::*;
#[cfg(feature = "onnx")]
use tract_onnx::prelude::{InferenceFact, InferenceModelExt};
use tract_onnx_opl::WithOnnx;

use crate::conv1x1;
use crate::depthwise;
use crate::direct_conv;
use crate::direct_deconv;
use crate::error::{Result, RuntimeError};
use crate::graph_ast;
use crate::maxpool;
use crate::optimizer;
use crate::pointwise;
use crate::resize;
use crate::tract_fixes;

#[cfg(target_endian = "big")]
compile_error!("edgefleet's tensor encoding assumes a little-endian target");

/// The tract version this build runs (recorded in manifests at pack time).
pub const TRACT_VERSION: &str = "0.23.9";

/// Collapses a tract error chain into one line ("node #12 \"If_0\" If: ...").
fn one_line(e: &TractError) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn load_err(e: TractError) -> RuntimeError {
    RuntimeError::Load {
        detail: one_line(&e),
    }
}

fn to_datum(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::F16 => DatumType::F16,
        DType::I8 => DatumType::I8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::U8 => DatumType::U8,
        DType::U16 => DatumType::U16,
        DType::U32 => DatumType::U32,
        DType::U64 => DatumType::U64,
        DType::Bool => DatumType::Bool,
    }
}

fn from_datum(dt: DatumType) -> Option<DType> {
    Some(match dt.unquantized() {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::F16 => DType::F16,
        DatumType::I8 => DType::I8,
        DatumType::I16 => DType::I16,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::U8 => DType::U8,
        DatumType::U16 => DType::U16,
        DatumType::U32 => DType::U32,
        DatumType::U64 => DType::U64,
        DatumType::Bool => DType::Bool,
        _ => return None,
    })
}

fn usize_shape(shape: &[u64]) -> Result<Vec<usize>> {
    shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| RuntimeError::Inference {
                detail: format!("dimension {d} does not fit this platform"),
            })
        })
        .collect()
}

/// Copies a wire tensor into a tract tensor (one memcpy).
pub fn to_tract(t: &WireTensor) -> Result<Tensor> {
    let shape = usize_shape(t.shape())?;
    let mut out =
        Tensor::zero_dt(to_datum(t.dtype()), &shape).map_err(|e| RuntimeError::Inference {
            detail: one_line(&e),
        })?;
    // Both sides are dense, row-major and little-endian.
    out.as_bytes_mut().copy_from_slice(t.data());
    Ok(out)
}

/// Copies a tract tensor out into a wire tensor.
pub fn from_tract(t: &Tensor) -> Result<WireTensor> {
    let dtype = from_datum(t.datum_type()).ok_or_else(|| RuntimeError::UnsupportedDtype {
        what: "model output".into(),
        dtype: format!("{:?}", t.datum_type()),
    })?;
    let shape = t.shape().iter().map(|&d| d as u64).collect();
    WireTensor::from_bytes(dtype, shape, t.as_bytes().to_vec()).map_err(|e| {
        RuntimeError::Inference {
            detail: e.to_string(),
        }
    })
}

/// Whether this build can load `format`: NNEF always, ONNX with the `onnx`
/// feature (the default; NNEF-only builds leave the ONNX front end out).
pub fn check_format(format: ModelFormat) -> Result<()> {
    match format {
        ModelFormat::Nnef => Ok(()),
        ModelFormat::Onnx if cfg!(feature = "onnx") => Ok(()),
        ModelFormat::Onnx => Err(RuntimeError::UnsupportedFormat { format: "ONNX" }),
    }
}

/// Names of a model's inputs, in order, without pinning or optimizing it.
/// Used by the packer to match golden files against the model.
pub fn declared_inputs(format: ModelFormat, bytes: &[u8]) -> Result<Vec<String>> {
    match format {
        #[cfg(feature = "onnx")]
        ModelFormat::Onnx => {
            let model = onnx().model_for_read(&mut &bytes[..]).map_err(load_err)?;
            outlet_names(&model, model.input_outlets().map_err(load_err)?)
        }
        #[cfg(not(feature = "onnx"))]
        ModelFormat::Onnx => Err(RuntimeError::UnsupportedFormat { format: "ONNX" }),
        ModelFormat::Nnef => {
            let model = nnef().model_for_read(&mut &bytes[..]).map_err(load_err)?;
            outlet_names(&model, model.input_outlets().map_err(load_err)?)
        }
    }
}

fn outlet_names<F, O>(model: &Graph<F, O>, outlets: &[OutletId]) -> Result<Vec<String>>
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    Ok(outlets
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect())
}

/// The NNEF front end, built once per process: `tract_nnef::nnef()` parses
/// the NNEF stdlib and fills its op registries on every call, which cost
/// more than parsing a small model's tar.
fn nnef() -> &'static tract_nnef::framework::Nnef {
    static NNEF: OnceLock<tract_nnef::framework::Nnef> = OnceLock::new();
    NNEF.get_or_init(|| {
        let mut nnef = tract_nnef::nnef().with_onnx();
        // Ours before tract-onnx's: the first registry with a serializer
        // for an op writes it, and ours replaces one of its (`nnef_ops`).
        let at = nnef
            .registries
            .iter()
            .position(|r| r.id.0 == "tract_onnx")
            .unwrap_or(nnef.registries.len());
        nnef.registries.insert(at, crate::nnef_ops::registry());
        nnef
    })
}

/// The ONNX front end, built once per process like [`nnef`].
///
/// It ignores the graph's `value_info`: every input is pinned to the
/// manifest's shapes, from which tract infers every other shape, while
/// the `value_info` that exporters and `onnx.shape_inference` write names
/// the dynamic axes (`batch`, `seq`), and tract cannot unify a symbol with
/// the pinned size ("Impossible to unify Sym(batch) with Val(2)"): such a
/// model would not load at all.
#[cfg(feature = "onnx")]
fn onnx() -> &'static tract_onnx::model::Onnx {
    static ONNX: OnceLock<tract_onnx::model::Onnx> = OnceLock::new();
    ONNX.get_or_init(|| tract_onnx::onnx().with_ignore_value_info(true))
}

/// Builds the front ends now rather than on the first model load (the
/// agent calls this at start, so an update's cold start does not pay for
/// it). Returns how long it took; later calls return at once.
pub fn warm_up() -> std::time::Duration {
    let t = std::time::Instant::now();
    keep_kernels_in_bounds();
    let _ = nnef();
    #[cfg(feature = "onnx")]
    let _ = onnx();
    t.elapsed()
}

/// `RUST_BACKTRACE=1` (often set in a unit file to get panic backtraces)
/// also makes every `anyhow` error capture a backtrace, and tract's graph
/// passes create and drop such errors as control flow while a model loads
/// (a failed `close_enough` when declutter looks for neutral constants,
/// for one): 11% of cls's and 19% of rec's load + optimize on this machine
/// (scripts/bench_notes.md). Unless the operator chose
/// `RUST_LIB_BACKTRACE` themselves, this turns error backtraces off;
/// panics keep theirs (`RUST_BACKTRACE`).
///
/// # Safety
///
/// It writes the process environment: call it first thing in `main`,
/// before anything has started a thread.
#[allow(unsafe_code)]
pub unsafe fn quiet_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet, so
        // nothing reads the environment concurrently.
        unsafe {
            std::env::set_var("RUST_LIB_BACKTRACE", "0");
        }
    }
}

/// Keeps tract off its x86-64 AMX int8 matmul kernel, whose loads can run
/// past the memory they were given. Call it before the first model loads
/// (the agent and the packer do, first thing in `main`; [`warm_up`] does
/// too); later calls change nothing.
///
/// tract-linalg 0.23.9's `avx512amx_mmm_i32_16x16` loads each B tile as 16
/// rows of 64 bytes from the packed panel. On this repository's machine
/// (Sapphire Rapids, which has `amx_int8`) a cls-int8-pw load crashed in
/// that load in about one fresh process in two with glibc's heap serving
/// the panel: the core dump shows the tile starting 464 bytes before the
/// end of the heap's last mapped page, so it read 560 bytes past it. With
/// the kernel left out the same runs never crashed, and the model ran
/// faster (8.0 ms against 8.5–9.7 ms per inference: scripts/bench_notes.md).
/// Boards (ARM) never had the kernel; an x86 gateway with AMX did.
///
/// This is tract's `TRACT_CPU_ISA` knob at its lowest priority: an
/// operator's own `TRACT_CPU_ISA` in the environment replaces it entirely
/// (and so may bring the kernel back).
pub fn keep_kernels_in_bounds() {
    #[cfg(target_arch = "x86_64")]
    {
        use tract_nnef::tract_core::knobs;
        // Only fails for a different value already set, which nothing in
        // this process does.
        let _ = knobs::set_config_global(AMX_KNOB.0, AMX_KNOB.1);
    }
}

/// The knob and value [`keep_kernels_in_bounds`] sets.
#[cfg(target_arch = "x86_64")]
const AMX_KNOB: (&str, &str) = ("TRACT_CPU_ISA", "-amx-int8");

/// How long the phases of [`Model::load`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadTimings {
    /// Parsing, pinning input facts and typing the graph.
    pub parse: std::time::Duration,
    /// tract's optimization pass and plan construction.
    pub optimize: std::time::Duration,
    /// An NNEF graph came from the packer's stored parse
    /// ([`crate::graph_ast`]) rather than from parsing `graph.nnef`.
    pub graph_preparsed: bool,
}

/// An optimized, runnable model with pinned input shapes.
#[derive(Clone)]
pub struct Model {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    non_finite: NonFiniteInputs,
    timings: LoadTimings,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl Model {
    /// Loads a model from a bundle's bytes, with the manifest's inputs,
    /// outputs and non-finite input policy (the agent, on bytes it is
    /// verifying as they load).
    pub fn from_bundle(
        format: ModelFormat,
        bytes: &[u8],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        non_finite: NonFiniteInputs,
    ) -> Result<Model> {
        Ok(Model::from_bundle_keeping(format, bytes, inputs, outputs, non_finite, false)?.0)
    }

    /// [`Model::from_bundle`], also handing back the decluttered graph of
    /// an ONNX model when `keep` is set (a device keeps it compiled, so
    /// that its next load skips the ONNX front end and decluttering).
    pub fn from_bundle_keeping(
        format: ModelFormat,
        bytes: &[u8],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        non_finite: NonFiniteInputs,
        keep: bool,
    ) -> Result<(Model, Option<Decluttered>)> {
        let (mut m, kept) = Model::load_keeping(format, bytes, inputs, Some(outputs), keep)?;
        m.non_finite = non_finite;
        Ok((m, kept))
    }

    /// Parses, pins and optimizes model bytes. Devices call this through
    /// [`Model::from_bundle`]; the packer calls it on the operator's file.
    ///
    /// ONNX inputs are matched by name. NNEF sanitizes identifiers (`a/b`
    /// becomes `a_b`), so NNEF inputs and outputs are matched by position
    /// and take their names from the specs, which the packer recorded from
    /// the original ONNX model in the same order.
    pub fn load(
        format: ModelFormat,
        bytes: &[u8],
        inputs: &[TensorSpec],
        outputs: Option<&[TensorSpec]>,
    ) -> Result<Model> {
        Ok(Model::load_keeping(format, bytes, inputs, outputs, false)?.0)
    }

    fn load_keeping(
        format: ModelFormat,
        bytes: &[u8],
        inputs: &[TensorSpec],
        outputs: Option<&[TensorSpec]>,
        keep: bool,
    ) -> Result<(Model, Option<Decluttered>)> {
        let t0 = std::time::Instant::now();
        let (typed, graph_preparsed) = pinned_typed(format, bytes, inputs)?;
        let parse = t0.elapsed();
        let t1 = std::time::Instant::now();
        let mut optimized = typed;
        // The packer wrote an NNEF graph decluttered (`onnx_to_nnef`) with
        // these same input shapes: decluttering it again finds nothing.
        let mut kept = None;
        if format == ModelFormat::Onnx {
            optimizer::declutter(&mut optimized).map_err(load_err)?;
            // The weights are shared, not copied.
            kept = keep.then(|| Decluttered(optimized.clone()));
        } else {
            optimizer::drop_identity_casts(&mut optimized).map_err(load_err)?;
        }
        resize::lower(&mut optimized).map_err(load_err)?;
        maxpool::lower(&mut optimized).map_err(load_err)?;
        depthwise::lower(&mut optimized).map_err(load_err)?;
        conv1x1::lower(&mut optimized).map_err(load_err)?;
        direct_conv::lower(&mut optimized).map_err(load_err)?;
        direct_deconv::lower(&mut optimized).map_err(load_err)?;
        pointwise::lower(&mut optimized).map_err(load_err)?;
        optimizer::optimize(&mut optimized).map_err(load_err)?;
        let mut model = Model::from_optimized(optimized, inputs)?;
        model.timings = LoadTimings {
            parse,
            optimize: t1.elapsed(),
            graph_preparsed,
        };
        if let Some(expected) = outputs {
            model.adopt_output_names(expected)?;
        }
        Ok((model, kept))
    }

    /// Phase timings of the load that built this model.
    pub fn load_timings(&self) -> LoadTimings {
        self.timings
    }

    /// Checks the model's outputs against `expected` by position and takes
    /// their names.
    fn adopt_output_names(&mut self, expected: &[TensorSpec]) -> Result<()> {
        let same = self.outputs.len() == expected.len()
            && self
                .outputs
                .iter()
                .zip(expected)
                .all(|(a, b)| a.dtype == b.dtype && a.shape == b.shape);
        if !same {
            return Err(RuntimeError::Load {
                detail: format!(
                    "the model's outputs [{}] differ from the declared [{}]",
                    self.outputs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    expected
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        self.outputs = expected.to_vec();
        Ok(())
    }

    fn from_optimized(model: TypedModel, inputs: &[TensorSpec]) -> Result<Model> {
        let names = outlet_names(&model, model.output_outlets().map_err(load_err)?)?;
        let mut outputs = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let fact = model.output_fact(i).map_err(load_err)?;
            let dtype =
                from_datum(fact.datum_type).ok_or_else(|| RuntimeError::UnsupportedDtype {
                    what: format!("output {name:?}"),
                    dtype: format!("{:?}", fact.datum_type),
                })?;
            // With every input pinned, a dimension still symbolic is one
            // the model computes from the input values (NonZero, NMS).
            let shape = fact
                .shape
                .iter()
                .map(|d| {
                    d.to_i64()
                        .ok()
                        .and_then(|d| u64::try_from(d).ok())
                        .unwrap_or(DYNAMIC_DIM)
                })
                .collect();
            outputs.push(TensorSpec { name, dtype, shape });
        }
        let plan = model.into_runnable().map_err(load_err)?;
        Ok(Model {
            plan,
            inputs: inputs.to_vec(),
            outputs,
            non_finite: NonFiniteInputs::Allow,
            timings: LoadTimings::default(),
        })
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// A fresh tract state: one per worker thread.
    pub fn session(&self) -> Result<Session> {
        let state = self.plan.spawn().map_err(|e| RuntimeError::Inference {
            detail: one_line(&e),
        })?;
        Ok(Session {
            state,
            model: self.clone(),
        })
    }

    /// Checks named inputs against the pinned specs and orders them.
    pub fn check_inputs<'a>(&self, given: &'a [NamedTensor]) -> Result<Vec<&'a WireTensor>> {
        let expected = || {
            self.inputs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(extra) = given
            .iter()
            .find(|t| self.inputs.iter().all(|s| s.name != t.name))
        {
            return Err(RuntimeError::UnknownInput {
                name: extra.name.clone(),
                expected: expected(),
            });
        }
        self.inputs
            .iter()
            .map(|spec| {
                let t = given.iter().find(|t| t.name == spec.name).ok_or_else(|| {
                    RuntimeError::MissingInput {
                        name: spec.name.clone(),
                    }
                })?;
                if t.tensor.dtype() != spec.dtype {
                    return Err(RuntimeError::WrongDtype {
                        name: spec.name.clone(),
                        got: t.tensor.dtype(),
                        expected: spec.dtype,
                    });
                }
                if t.tensor.shape() != spec.shape.as_slice() {
                    return Err(RuntimeError::WrongShape {
                        name: spec.name.clone(),
                        got: t.tensor.shape().to_vec(),
                        expected: spec.shape.clone(),
                    });
                }
                if self.non_finite == NonFiniteInputs::Reject && t.tensor.has_non_finite() {
                    return Err(RuntimeError::NonFinite {
                        name: spec.name.clone(),
                    });
                }
                Ok(&t.tensor)
            })
            .collect()
    }
}

/// Applies the manifest's input shapes and types the model, without
/// optimizing (NNEF export needs the decluttered, not the optimized, form).
/// The flag says whether an NNEF graph came pre-parsed ([`read_nnef`]).
pub(crate) fn pinned_typed(
    format: ModelFormat,
    bytes: &[u8],
    inputs: &[TensorSpec],
) -> Result<(TypedModel, bool)> {
    match format {
        #[cfg(not(feature = "onnx"))]
        ModelFormat::Onnx => Err(RuntimeError::UnsupportedFormat { format: "ONNX" }),
        #[cfg(feature = "onnx")]
        ModelFormat::Onnx => {
            let mut typed = into_typed(pinned_inference(bytes, inputs)?).map_err(load_err)?;
            tract_fixes::explicit_same_padding(&mut typed).map_err(load_err)?;
            tract_fixes::shield_quantized_softmax(&mut typed).map_err(load_err)?;
            Ok((typed, false))
        }
        ModelFormat::Nnef => {
            let (mut model, preparsed) = read_nnef(bytes).map_err(load_err)?;
            let declared = model.input_outlets().map_err(load_err)?.len();
            if declared != inputs.len() {
                return Err(RuntimeError::Load {
                    detail: format!(
                        "the NNEF model has {declared} inputs, the specs declare {}",
                        inputs.len()
                    ),
                });
            }
            for (i, spec) in inputs.iter().enumerate() {
                let fact =
                    TypedFact::dt_shape(to_datum(spec.dtype), usize_shape(&spec.shape)?.as_slice());
                model = model.with_input_fact(i, fact).map_err(load_err)?;
            }
            tract_fixes::explicit_same_padding(&mut model).map_err(load_err)?;
            Ok((model, preparsed))
        }
    }
}

/// The ONNX model with the manifest's input facts, before typing.
#[cfg(feature = "onnx")]
fn pinned_inference(
    bytes: &[u8],
    inputs: &[TensorSpec],
) -> Result<tract_onnx::tract_hir::infer::InferenceModel> {
    use prost::Message;
    use tract_onnx::tract_hir::internal::TractErrorContext;
    // tract's `model_for_read` first copies the bytes it is given into a
    // buffer of its own (a 10 MB copy for rec); the protobuf decoder reads
    // them where they are.
    let proto = tract_onnx::pb::ModelProto::decode(bytes)
        .map_err(|e| load_err(TractError::from(e).context("Reading proto model")))?;
    let mut model = onnx()
        .model_for_proto_model(&proto)
        .context("Translating proto model to model")
        .map_err(load_err)?;
    drop(proto);
    let declared = outlet_names(&model, model.input_outlets().map_err(load_err)?)?;
    check_declared(&declared, inputs)?;
    for (i, name) in declared.iter().enumerate() {
        let spec = inputs
            .iter()
            .find(|s| &s.name == name)
            .ok_or_else(|| RuntimeError::MissingInput { name: name.clone() })?;
        let fact = InferenceFact::dt_shape(to_datum(spec.dtype), usize_shape(&spec.shape)?);
        model = model.with_input_fact(i, fact).map_err(load_err)?;
    }
    Ok(model)
}

/// `InferenceModelExt::into_typed`, without its second analysis when it
/// is known to find nothing.
///
/// tract analyses the graph (solves every node's inference rules to a fixed
/// point), lets each op rewrite itself (`incorporate`), compacts, analyses
/// the whole graph again and translates it node by node. No op of tract
/// 0.23.9 rewrites itself there, so that second analysis re-derives facts
/// that are already at their fixed point: about a third of the typing of an
/// ONNX model (2.7 of 8 ms for cls; scripts/bench_notes.md). It runs here
/// only when a rewrite happened. The translation is tract's: a node whose
/// outputs analysis found constant (and that keeps no state) becomes
/// constants, every other node its op's `to_typed`, and each fact it wires
/// must be consistent.
#[cfg(feature = "onnx")]
fn into_typed(mut model: tract_onnx::tract_hir::infer::InferenceModel) -> TractResult<TypedModel> {
    use tract_nnef::tract_core::model::translator::Translate;
    use tract_onnx::tract_hir::infer::{InferenceModel, InferenceNode};
    use tract_onnx::tract_hir::internal::{EvalContext, Factoid, InferenceOp, TractErrorContext};

    #[derive(Debug)]
    struct ToTyped;
    impl Translate<InferenceFact, Box<dyn InferenceOp>, TypedFact, Box<dyn TypedOp>> for ToTyped {
        fn translate_node(
            &self,
            source: &InferenceModel,
            node: &InferenceNode,
            target: &mut TypedModel,
            mapping: &HashMap<OutletId, OutletId>,
        ) -> TractResult<TVec<OutletId>> {
            let folds = !InferenceModel::is_source(&node.op)
                && node.op.state(&EvalContext::out_of_plan())?.is_none()
                && source
                    .node_output_facts(node.id)?
                    .iter()
                    .all(|f| f.value.is_concrete());
            if folds {
                return node
                    .outputs
                    .iter()
                    .enumerate()
                    .map(|(ix, output)| {
                        let value = output.fact.value.concretize().context("a concrete value")?;
                        target.add_const(format!("{}.{ix}", node.name), value)
                    })
                    .collect();
            }
            let outputs = node.op.to_typed(source, node, target, mapping)?;
            for output in &outputs {
                let fact = target.outlet_fact(*output)?;
                fact.consistent().with_context(|| {
                    format!(
                        "inconsistent fact {fact:?} of {output:?} after translating {:?}",
                        node.op
                    )
                })?;
            }
            Ok(outputs)
        }

        /// tract's `translate_model_with_mappings` (tract-core 0.23.9,
        /// model/translator.rs), with room made for the typed graph's
        /// nodes at once: a node is about 1.5 KB, and growing the vector
        /// one doubling at a time copied each into memory touched for the
        /// first time.
        fn translate_model_with_mappings(
            &self,
            source: &InferenceModel,
        ) -> TractResult<(TypedModel, HashMap<OutletId, OutletId>)> {
            let _proof_session = source.symbols.proof_cache_session();
            let mut target = TypedModel {
                symbols: source.symbols.clone(),
                ..TypedModel::default()
            };
            // expansions make two or three typed nodes of an ONNX node
            target.nodes.reserve(3 * source.nodes.len());
            let mut mapping = HashMap::new();
            for old_id in source.eval_order()? {
                let node = source.node(old_id);
                let outlets = self
                    .translate_node(source, node, &mut target, &mapping)
                    .with_context(|| format!("Translating node {node} {self:?}"))?;
                for (ix, outlet) in outlets.into_iter().enumerate() {
                    mapping.insert(OutletId::new(node.id, ix), outlet);
                    if let Some(label) = source.outlet_label(OutletId::new(node.id, ix)) {
                        target.set_outlet_label(outlet, label.to_string())?;
                    }
                }
            }
            // inputs nothing reads are kept: they are the interface
            for i in source.input_outlets()? {
                if !mapping.contains_key(i) {
                    let node = source.node(i.node);
                    let outlets = self
                        .translate_node(source, node, &mut target, &mapping)
                        .with_context(|| format!("Translating input {node} {self:?}"))?;
                    mapping.insert(*i, outlets[0]);
                }
            }
            target.inputs = source.input_outlets()?.iter().map(|i| mapping[i]).collect();
            target.outputs = source
                .output_outlets()?
                .iter()
                .map(|o| mapping[o])
                .collect();
            target.properties.clone_from(&source.properties);
            Ok((target, mapping))
        }
    }

    model.analyse(false)?;
    // tract's one incorporate pass: each op, in evaluation order, may
    // replace itself; again until none does.
    let mut rewritten = false;
    loop {
        let mut this_time = false;
        for id in model.eval_order()? {
            let node = &model.nodes[id];
            let patch = node
                .op
                .incorporate(&model, node)
                .with_context(|| format!("incorporating node {node}"))?;
            if let Some(patch) = patch {
                patch.apply(&mut model)?;
                this_time = true;
            }
        }
        if !this_time {
            break;
        }
        rewritten = true;
    }
    model.compact()?;
    if rewritten {
        model.analyse(false)?;
    }
    ToTyped.translate_model(&model)
}

#[cfg(feature = "onnx")]
fn check_declared(declared: &[String], inputs: &[TensorSpec]) -> Result<()> {
    if let Some(extra) = inputs.iter().find(|s| !declared.contains(&s.name)) {
        return Err(RuntimeError::UnknownInput {
            name: extra.name.clone(),
            expected: declared.join(", "),
        });
    }
    Ok(())
}

/// Converts an ONNX model to a decluttered tract NNEF tar (FACTS.md: the
/// optimized form has no serializer; devices optimize after loading).
pub fn onnx_to_nnef(bytes: &[u8], inputs: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut model = pinned_typed(ModelFormat::Onnx, bytes, inputs)?.0;
    optimizer::declutter(&mut model).map_err(load_err)?;
    Decluttered(model).into_nnef()
}

/// An ONNX model's graph after the manifest's input shapes were pinned and
/// tract decluttered it: what [`onnx_to_nnef`] writes, kept by
/// [`Model::from_bundle_keeping`] from a load that computed it anyway.
/// Loaded back as NNEF ([`ModelFormat::Nnef`], inputs and outputs by
/// position), it skips the ONNX front end and decluttering.
pub struct Decluttered(TypedModel);

impl std::fmt::Debug for Decluttered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decluttered")
            .field("nodes", &self.0.nodes.len())
            .finish()
    }
}

/// Identifies what [`Decluttered::into_nnef`] writes: a device's kept form
/// of a model is valid only for the same tract and runtime, since both
/// decide the decluttered graph and how it is read back.
pub fn decluttered_epoch() -> String {
    format!(
        "tract-{TRACT_VERSION}-runtime-{}",
        env!("CARGO_PKG_VERSION")
    )
}

impl Decluttered {
    /// Writes the graph as an NNEF tar with tract's own parse of its text
    /// ([`graph_ast`]), as the packer writes an NNEF bundle.
    pub fn into_nnef(self) -> Result<Vec<u8>> {
        let mut model = self.0;
        // tract 0.23.9 writes string properties with Rust's `{:?}` escaping,
        // which its own NNEF parser cannot read back (PP-OCRv4 rec keeps its
        // 6625-character dictionary in ONNX metadata). Such properties are not
        // needed to run the model: drop them rather than produce an unloadable tar.
        model.properties.retain(|_, v| {
            v.to_plain_array_view::<String>()
                .map(|strings| {
                    strings
                        .iter()
                        .all(|s| format!("{s:?}").len() == s.len() + 2)
                })
                .unwrap_or(true)
        });
        let export_err = |e: TractError| {
            // "No serializer found for node #3 "dq" DequantizeLinearF32" says
            // it all; the chain above it only repeats the node.
            let root = e.root_cause().to_string();
            RuntimeError::NnefExport {
                detail: if root.starts_with("No serializer found") {
                    root
                } else {
                    one_line(&e)
                },
            }
        };
        let tar = nnef()
            .write_to_tar(&model, Vec::new())
            .map_err(export_err)?;
        with_parsed_graph(&tar).map_err(export_err)
    }
}

/// Copies an NNEF tar, adding [`graph_ast::MEMBER`] after `graph.nnef`:
/// tract's own parse of the text, so devices need not parse it again.
/// Every other member is copied unchanged. When the parse does not survive
/// the round trip, the tar goes out as tract wrote it.
fn with_parsed_graph(tar: &[u8]) -> TractResult<Vec<u8>> {
    copy_tar(tar, |path, data| {
        if path != Path::new(GRAPH_NNEF) {
            return Ok(vec![(path.to_owned(), data)]);
        }
        let text = std::str::from_utf8(&data)?;
        let doc = tract_nnef::ast::parse::parse_document(text)?;
        let member = graph_ast::encode(text, &doc);
        let mut out = vec![(path.to_owned(), data)];
        out.extend(member.map(|m| (PathBuf::from(graph_ast::MEMBER), m)));
        Ok(out)
    })
}

/// Copies a tar member by member: `edit` gets each member's path and data
/// and returns the members to write in its place (none drops it). Each
/// keeps its original header's type, mode and times. Paths of any length
/// survive: tract names a weight's member after its tensor, and a path
/// longer than a header's 100 bytes travels in a GNU long-name entry that
/// a plain copy of the header would lose.
fn copy_tar(
    tar: &[u8],
    mut edit: impl FnMut(&Path, Vec<u8>) -> TractResult<Vec<(PathBuf, Vec<u8>)>>,
) -> TractResult<Vec<u8>> {
    let mut out = tar::Builder::new(Vec::with_capacity(tar.len() + tar.len() / 8));
    for entry in tar::Archive::new(tar).entries()? {
        let mut entry = entry?;
        let header = entry.header().clone();
        let path = entry.path()?.into_owned();
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data)?;
        for (path, data) in edit(&path, data)? {
            let mut header = header.clone();
            header.set_size(data.len() as u64);
            out.append_data(&mut header, &path, &data[..])?;
        }
    }
    Ok(out.into_inner()?)
}

const GRAPH_NNEF: &str = tract_nnef::resource::GRAPH_NNEF_FILENAME;

/// Reads an NNEF tar as tract's `model_for_read` does, except that the
/// graph comes from [`graph_ast::MEMBER`] when the packer stored it for
/// exactly this `graph.nnef` (about 20 ms less per load on this machine;
/// see [`graph_ast`]). Tars this reader does not cover (gzipped, or with
/// sub-models in directories) go to tract's reader whole. The flag says
/// whether the stored graph was used.
fn read_nnef(bytes: &[u8]) -> TractResult<(TypedModel, bool)> {
    use tract_nnef::internal::{TractErrorContext, anyhow, ensure};
    let nnef = nnef();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok((nnef.model_for_read(&mut &bytes[..])?, false));
    }
    let mut resources: HashMap<String, Arc<dyn tract_nnef::resource::Resource>> = HashMap::new();
    let mut text = None;
    let mut stored = None;
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let path = path.strip_prefix("./").unwrap_or(&path).to_path_buf();
        // tract skips any path with a component starting with a dot.
        if path
            .components()
            .any(|c| c.as_os_str().as_encoded_bytes().first() == Some(&b'.'))
        {
            continue;
        }
        if path.components().count() != 1 {
            return Ok((nnef.model_for_read(&mut &bytes[..])?, false));
        }
        if path == Path::new(GRAPH_NNEF) {
            let mut s = String::new();
            entry.read_to_string(&mut s)?;
            text = Some(s);
            continue;
        }
        if path == Path::new(graph_ast::MEMBER) {
            let mut b = Vec::new();
            entry.read_to_end(&mut b)?;
            stored = Some(b);
            continue;
        }
        for loader in &nnef.resource_loaders {
            if let Some((id, resource)) = loader.try_load(&path, &mut entry, nnef)? {
                ensure!(
                    !resources.contains_key(&id),
                    "{id:?} was loaded twice (by {:?})",
                    loader.name()
                );
                resources.insert(id, resource);
                break;
            }
        }
    }
    let text = text.with_context(|| format!("the tar has no {GRAPH_NNEF}"))?;
    let stored = stored.and_then(|member| graph_ast::decode(&member, &text));
    let preparsed = stored.is_some();
    let doc = match stored {
        Some(doc) => doc,
        None => tract_nnef::ast::parse::parse_document(&text)?,
    };
    let mut tensors = HashMap::new();
    let mut quantization = None;
    let mut rest = HashMap::new();
    for (id, resource) in resources {
        if id == tract_nnef::resource::GRAPH_QUANT_FILENAME {
            let q = resource
                .downcast_arc::<HashMap<String, tract_nnef::ast::QuantFormat>>()
                .map_err(|_| anyhow!("graph.quant did not load as quantization formats"))?;
            let q = Arc::try_unwrap(q).map_err(|_| anyhow!("graph.quant is shared"))?;
            quantization = Some(
                q.into_iter()
                    .map(|(k, v)| (tract_nnef::ast::Identifier(k), v))
                    .collect(),
            );
            continue;
        }
        match resource.downcast_arc::<Tensor>() {
            Ok(t) => {
                tensors.insert(tract_nnef::ast::Identifier(id), t);
            }
            Err(other) => {
                rest.insert(id, other);
            }
        }
    }
    let proto = tract_nnef::ast::ProtoModel {
        doc,
        tensors,
        quantization,
        resources: rest,
    };
    proto.validate()?;
    Ok((nnef.model_for_proto_model(&proto)?, preparsed))
}

/// One worker's inference state.
pub struct Session {
    state: TypedSimpleState,
    model: Model,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model)
            .finish()
    }
}

impl Session {
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Validates inputs and runs one inference.
    pub fn run(&mut self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
        let ordered = self.model.check_inputs(inputs)?;
        self.run_ordered(ordered)
    }

    /// Runs inputs that [`Model::check_inputs`] already accepted for this
    /// same model (the engine validates before queueing): only orders them.
    pub fn run_prevalidated(&mut self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
        let ordered = self
            .model
            .inputs
            .iter()
            .map(|spec| {
                inputs
                    .iter()
                    .find(|t| t.name == spec.name)
                    .map(|t| &t.tensor)
                    .ok_or_else(|| RuntimeError::MissingInput {
                        name: spec.name.clone(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        self.run_ordered(ordered)
    }

    fn run_ordered(&mut self, ordered: Vec<&WireTensor>) -> Result<Vec<NamedTensor>> {
        let values = ordered
            .into_iter()
            .map(|t| to_tract(t).map(IntoTValue::into_tvalue))
            .collect::<Result<TVec<TValue>>>()?;
        let outs = self
            .state
            .run(values)
            .map_err(|e| RuntimeError::Inference {
                detail: one_line(&e),
            })?;
        outs.iter()
            .zip(&self.model.outputs)
            .map(|(v, spec)| Ok(NamedTensor::new(spec.name.clone(), from_tract(v)?)))
            .collect()
    }
}

impl Session {
    /// Runs pre-built tract values with no validation (benchmarks only).
    pub fn run_values(&mut self, values: TVec<TValue>) -> Result<TVec<TValue>> {
        self.state.run(values).map_err(|e| RuntimeError::Inference {
            detail: one_line(&e),
        })
    }

    /// Runs `values` `iterations` times, timing every node of the plan,
    /// and sums the time per op kind, most expensive first
    /// (`edge-agent bench --profile`). The timer around each node adds a
    /// little to the total, not to any one op.
    pub fn profile(&mut self, values: TVec<TValue>, iterations: usize) -> Result<Vec<OpProfile>> {
        let mut by_op: std::collections::HashMap<String, OpProfile> =
            std::collections::HashMap::new();
        for _ in 0..iterations {
            self.state
                .run_plan_with_eval(values.clone(), |ctx, state, node, inputs| {
                    let t = std::time::Instant::now();
                    let out = tract_nnef::tract_core::plan::eval(ctx, state, node, inputs);
                    let spent = t.elapsed();
                    let name = node.op().name();
                    let entry = by_op.entry(name.to_string()).or_insert_with(|| OpProfile {
                        op: name.to_string(),
                        nodes: Vec::new(),
                        total: std::time::Duration::ZERO,
                    });
                    if !entry.nodes.contains(&node.id) {
                        entry.nodes.push(node.id);
                    }
                    entry.total += spent;
                    out
                })
                .map_err(|e| RuntimeError::Inference {
                    detail: one_line(&e),
                })?;
        }
        let mut ops: Vec<OpProfile> = by_op.into_values().collect();
        let n = iterations.max(1) as u32;
        for op in &mut ops {
            op.total /= n;
        }
        ops.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.op.cmp(&b.op)));
        Ok(ops)
    }
}

/// Time one op kind took per inference ([`Session::profile`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OpProfile {
    /// tract's op name after optimization (e.g. `OptMatMul`, `DepthWise`).
    pub op: String,
    /// The plan's nodes of this kind.
    pub nodes: Vec<usize>,
    /// Mean time per inference, summed over those nodes.
    pub total: std::time::Duration,
}

/// Result of a passing self-test.
#[derive(Clone, Debug, PartialEq)]
pub struct SelfTestReport {
    pub cases: usize,
    /// Largest difference seen over all cases and outputs.
    pub max_abs_diff: f64,
}

/// Runs every golden case and compares each output with the reference.
/// The first output outside the tolerance fails the test, naming it.
pub fn self_test(session: &mut Session, golden: &GoldenSet) -> Result<SelfTestReport> {
    let mut worst = 0.0f64;
    for (case, gc) in golden.cases.iter().enumerate() {
        let outs = session.run(&gc.inputs)?;
        for expected in &gc.outputs {
            let actual = outs
                .iter()
                .find(|o| o.name == expected.name)
                .ok_or_else(|| RuntimeError::SelfTestShape {
                    case,
                    detail: format!("the model produced no output {:?}", expected.name),
                })?;
            let diff = max_abs_diff(&actual.tensor, &expected.tensor).map_err(|e| {
                RuntimeError::SelfTestShape {
                    case,
                    detail: format!("output {:?}: {e}", expected.name),
                }
            })?;
            if diff.max_abs.is_nan() || diff.max_abs > f64::from(golden.tolerance) {
                return Err(RuntimeError::SelfTest {
                    case,
                    output: expected.name.clone(),
                    max_abs: diff.max_abs,
                    at: diff.at,
                    tolerance: golden.tolerance,
                });
            }
            worst = worst.max(diff.max_abs);
        }
    }
    Ok(SelfTestReport {
        cases: golden.cases.len(),
        max_abs_diff: worst,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_onnx_feature_decides_whether_onnx_bundles_load() {
        assert!(check_format(ModelFormat::Nnef).is_ok());
        let onnx = check_format(ModelFormat::Onnx);
        assert_eq!(onnx.is_ok(), cfg!(feature = "onnx"));
        if let Err(e) = onnx {
            assert_eq!(e.code(), "unsupported_model_format");
            assert!(e.to_string().contains("fleetctl bundle pack --nnef"), "{e}");
        }
    }

    #[test]
    fn an_nnef_only_build_refuses_onnx_bytes_with_the_format_error() {
        let bytes = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        )
        .unwrap();
        let names = declared_inputs(ModelFormat::Onnx, &bytes);
        if cfg!(feature = "onnx") {
            assert_eq!(names.unwrap(), ["x"]);
        } else {
            assert_eq!(names.unwrap_err().code(), "unsupported_model_format");
        }
    }

    pub(crate) fn repo(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    }

    /// tests/data/zoo (scripts/make_model_zoo.py): the smallest graphs
    /// tract 0.23.9 computed wrongly or refused (tract_fixes,
    /// nnef_ops' Resize, optimizer::change_axes) and randomly drawn ones,
    /// each with ONNX Runtime's output for its input. Every one loads from
    /// its ONNX and from the NNEF form the packer writes (and a device keeps
    /// compiled), and both answer within 1e-4 of ONNX Runtime.
    #[cfg(feature = "onnx")]
    #[test]
    fn every_zoo_model_answers_as_onnx_runtime_does_from_onnx_and_from_nnef() {
        for dir in zoo_dirs() {
            let what = dir.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
            let inputs = npz(&dir.join("in.npz"));
            let expected = npz(&dir.join("out.npz"));
            let specs: Vec<TensorSpec> = inputs.iter().map(NamedTensor::spec).collect();
            let outputs: Vec<TensorSpec> = expected.iter().map(NamedTensor::spec).collect();
            let nnef =
                onnx_to_nnef(&bytes, &specs).unwrap_or_else(|e| panic!("{what}: NNEF export: {e}"));
            for (format, bytes) in [(ModelFormat::Onnx, &bytes), (ModelFormat::Nnef, &nnef)] {
                let model = Model::load(format, bytes, &specs, Some(&outputs))
                    .unwrap_or_else(|e| panic!("{what} ({format:?}): {e}"));
                let got = model.session().unwrap().run(&inputs).unwrap();
                let diff = max_abs_diff(&got[0].tensor, &expected[0].tensor)
                    .unwrap_or_else(|e| panic!("{what} ({format:?}): {e}"));
                assert!(
                    diff.max_abs <= 1e-4,
                    "{what} ({format:?}): max abs {} at {}",
                    diff.max_abs,
                    diff.at
                );
            }
        }
    }

    /// tests/data/cls_qdq_softmax.onnx: the classifier quantized on every
    /// op, Softmax included, whose output is quantized to steps of 1/255.
    /// tract alone answered [1.0, 1.0] (it folded the softmax into an
    /// element-wise table: tract_fixes::shield_quantized_softmax); the
    /// runtime answers ONNX Runtime's [254/255, 0] within one step.
    #[cfg(feature = "onnx")]
    #[test]
    fn a_quantized_softmax_answers_as_onnx_runtime_does_within_one_output_step() {
        let bytes = std::fs::read(repo("tests/data/cls_qdq_softmax.onnx")).unwrap();
        let inputs = npz(&repo("tests/data/cls_qdq_softmax_golden/in_0.npz"));
        let expected = npz(&repo("tests/data/cls_qdq_softmax_golden/out_0.npz"));
        let specs: Vec<TensorSpec> = inputs.iter().map(NamedTensor::spec).collect();
        let model = Model::load(ModelFormat::Onnx, &bytes, &specs, None).unwrap();
        let got = model.session().unwrap().run(&inputs).unwrap();
        let diff = max_abs_diff(&got[0].tensor, &expected[0].tensor).unwrap();
        let step = 1.0 / 255.0;
        assert!(
            diff.max_abs <= step + 1e-6,
            "got {:?}, ONNX Runtime {:?}",
            got[0].tensor.iter_f64().collect::<Vec<_>>(),
            expected[0].tensor.iter_f64().collect::<Vec<_>>()
        );
    }

    /// [`into_typed`] skips tract's second analysis; the typed graph is
    /// still tract's `into_typed()`'s, node for node (ops, names, wiring,
    /// facts, labels), on every ONNX model in models/, the quantized
    /// classifier and every zoo graph (convolutions, resizes, attention,
    /// a GRU).
    #[cfg(feature = "onnx")]
    #[test]
    fn typing_an_onnx_model_builds_the_graph_tracts_into_typed_builds() {
        let mut cases: Vec<(PathBuf, PathBuf)> = crate::optimizer::tests::MODELS
            .iter()
            .map(|(dir, file)| {
                let golden = repo(&format!("models/{dir}/golden/in_0.npz"));
                (repo(&format!("models/{dir}/{file}")), golden)
            })
            .collect();
        cases.push((
            repo("tests/data/cls_qdq_softmax.onnx"),
            repo("tests/data/cls_qdq_softmax_golden/in_0.npz"),
        ));
        cases.extend(
            zoo_dirs()
                .into_iter()
                .map(|dir| (dir.join("model.onnx"), dir.join("in.npz"))),
        );
        for (model, input) in cases {
            let bytes = std::fs::read(&model).unwrap();
            let specs: Vec<TensorSpec> = npz(&input).iter().map(NamedTensor::spec).collect();
            let pinned = pinned_inference(&bytes, &specs).unwrap();
            let ours = into_typed(pinned.clone()).unwrap();
            let tracts = pinned.into_typed().unwrap();
            let dump = |m: &TypedModel| {
                let mut labels: Vec<_> = m.outlet_labels.iter().collect();
                labels.sort();
                format!("{} {labels:?}", node_dump(m))
            };
            assert_eq!(dump(&ours), dump(&tracts), "{}", model.display());
        }
    }

    /// The graphs of tests/data/zoo, in name order (20 or more).
    pub(crate) fn zoo_dirs() -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo("tests/data/zoo"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        assert!(dirs.len() >= 20, "{dirs:?}");
        dirs
    }

    fn golden(dir: &str, which: &str) -> Vec<NamedTensor> {
        npz(&repo(&format!("models/{dir}/golden/{which}.npz")))
    }

    /// The tensors of an `.npz` file.
    pub(crate) fn npz(path: &Path) -> Vec<NamedTensor> {
        let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        edgefleet_wire::npz::read_npz(f, edgefleet_wire::npz::NpzLimits::default()).unwrap()
    }

    /// `models/{dir}/{file}`, its first golden inputs and their specs.
    pub(crate) fn model_and_inputs(
        dir: &str,
        file: &str,
    ) -> (Vec<u8>, Vec<NamedTensor>, Vec<TensorSpec>) {
        let bytes = std::fs::read(repo(&format!("models/{dir}/{file}"))).unwrap();
        let inputs = golden(dir, "in_0");
        let specs = inputs.iter().map(NamedTensor::spec).collect();
        (bytes, inputs, specs)
    }

    /// The tar's members, with `edit` applied to each (name, data);
    /// returning `None` drops the member.
    fn rewrite_tar(tar: &[u8], edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
        copy_tar(tar, |path, data| {
            let kept = edit(&path.to_string_lossy(), data);
            Ok(kept.map(|d| (path.to_owned(), d)).into_iter().collect())
        })
        .unwrap()
    }

    /// The paths of a tar's members, in order.
    fn member_names(tar: &[u8]) -> Vec<String> {
        tar::Archive::new(tar)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// tract names a weight's tar member after its tensor; real models
    /// have tensor names longer than a tar header's 100 bytes. The packer's
    /// copy keeps those members (a copy of the bare header would cut the
    /// name, and the device would not find the weights).
    #[test]
    fn weights_with_long_names_survive_the_packers_copy() {
        use tract_nnef::tract_core::ops::math::add;
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 64])).unwrap();
        let name = format!("encoder_layer_{}_weight", "w".repeat(120));
        let weights: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let w = m
            .add_const(
                &name,
                tract_ndarray::Array2::from_shape_vec((1, 64), weights).unwrap(),
            )
            .unwrap();
        let y = m.wire_node("y", add(), &[x, w]).unwrap();
        m.select_output_outlets(&y).unwrap();
        let tar = nnef().write_to_tar(&m, Vec::new()).unwrap();

        let packed = with_parsed_graph(&tar).unwrap();
        let members = member_names(&packed);
        assert!(
            members.iter().any(|p| p.len() > 100 && p.ends_with(".dat")),
            "{members:?}"
        );
        let (loaded, preparsed) = read_nnef(&packed).unwrap();
        assert!(preparsed);
        let out = loaded
            .into_runnable()
            .unwrap()
            .run(tvec!(
                Tensor::from(tract_ndarray::Array2::<f32>::ones((1, 64))).into()
            ))
            .unwrap();
        let got: Vec<f32> = out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let want: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        assert_eq!(got, want);
    }

    /// tract's declutter fuses the erf GELU of transformer models
    /// (`0.5 * x * (1 + erf(x / sqrt 2))`) into one op that tract-nnef
    /// 0.23.9 cannot write. The packer writes it through `nnef_ops`, and
    /// the device reads it back, from the stored graph, to the same op.
    #[test]
    fn exact_gelu_survives_the_nnef_round_trip() {
        use tract_nnef::tract_core::ops::element_wise::ElementWiseOp;
        use tract_nnef::tract_core::ops::nn::GeluExact;
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 9])).unwrap();
        let y = m
            .wire_node("gelu", ElementWiseOp(Box::new(GeluExact {}), None), &[x])
            .unwrap();
        m.select_output_outlets(&y).unwrap();
        let tar = nnef().write_to_tar(&m, Vec::new()).unwrap();
        let packed = with_parsed_graph(&tar).unwrap();

        let (loaded, preparsed) = read_nnef(&packed).unwrap();
        assert!(preparsed);
        assert!(
            loaded.nodes().iter().any(|n| n
                .op_as::<ElementWiseOp>()
                .is_some_and(|op| op.0.is::<GeluExact>())),
            "{}",
            node_dump(&loaded)
        );
        let xs: Vec<f32> = (-4..=4).map(|i| i as f32).collect();
        let out = loaded
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec!(
                Tensor::from(tract_ndarray::Array2::from_shape_vec((1, 9), xs.clone()).unwrap())
                    .into()
            ))
            .unwrap();
        let got = out[0].to_plain_array_view::<f32>().unwrap();
        // GELU(x) = x * Phi(x); reference values of Phi, the standard normal CDF.
        let phi: [f32; 9] = [
            3.167_124e-5,
            1.349_898e-3,
            2.275_013e-2,
            0.158_655_25,
            0.5,
            0.841_344_8,
            0.977_249_9,
            0.998_650_1,
            0.999_968_3,
        ];
        for ((x, p), g) in xs.iter().zip(phi).zip(got.iter()) {
            assert!((x * p - g).abs() < 1e-5, "gelu({x}) = {g}, want {}", x * p);
        }
    }

    /// Exporters and `onnx.shape_inference` record intermediate shapes in
    /// `value_info` with the dynamic axes as symbols. With the inputs
    /// pinned, tract would refuse to unify `batch` with 1 and the model
    /// would not load; the loader ignores `value_info` and infers every
    /// shape from the pinned inputs.
    #[cfg(feature = "onnx")]
    #[test]
    fn symbolic_value_info_does_not_stop_a_pinned_load() {
        use prost::Message;
        use tract_onnx::pb;
        let bytes = std::fs::read(repo("models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx")).unwrap();
        let mut proto = pb::ModelProto::decode(&bytes[..]).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let dim = |name: &str| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(
                name.into(),
            )),
            ..Default::default()
        };
        let conv_outputs: Vec<String> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Conv")
            .flat_map(|n| n.output.clone())
            .collect();
        assert!(conv_outputs.len() > 10, "{conv_outputs:?}");
        for name in conv_outputs {
            let tensor = pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![dim("batch"), dim("c"), dim("h"), dim("w")],
                }),
            };
            graph.value_info.push(pb::ValueInfoProto {
                name,
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(tensor)),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let edited = proto.encode_to_vec();

        let inputs = golden("cls", "in_0");
        let specs: Vec<_> = inputs.iter().map(NamedTensor::spec).collect();
        let model = Model::load(ModelFormat::Onnx, &edited, &specs, None).unwrap();
        let outputs = model.session().unwrap().run(&inputs).unwrap();
        let expected = golden("cls", "out_0");
        assert_eq!(outputs.len(), expected.len());
        for (got, want) in outputs.iter().zip(&expected) {
            let diff = max_abs_diff(&got.tensor, &want.tensor).unwrap();
            assert!(diff.max_abs < 1e-4, "{}: {diff:?}", want.name);
        }
    }

    /// A model tract runs but cannot write as NNEF (the quantized ops
    /// have no NNEF serializer in tract 0.23.9) gets its own error, which
    /// names the op and says the ONNX form still packs.
    #[cfg(feature = "onnx")]
    #[test]
    fn a_model_tract_cannot_write_as_nnef_gets_the_export_error() {
        let (onnx, _, specs) = model_and_inputs("cls-int8", "cls_int8.onnx");
        let e = onnx_to_nnef(&onnx, &specs).unwrap_err();
        assert_eq!(e.code(), "nnef_export_failed");
        let msg = e.to_string();
        assert!(msg.contains("No serializer found for node"), "{msg}");
        assert!(msg.contains("without --nnef"), "{msg}");
    }

    /// Detection models end in `NonZero` or `NonMaxSuppression`: how many
    /// rows come out depends on the input values. Such an output's spec
    /// has a dynamic dimension, and each run answers with its own count,
    /// from the ONNX and from the NNEF form.
    #[cfg(feature = "onnx")]
    #[test]
    fn outputs_sized_by_the_input_values_have_a_dynamic_dimension() {
        use prost::Message;
        use tract_onnx::pb;
        let value_info = |name: &str, elem_type: pb::tensor_proto::DataType, dims: &[i64]| {
            let dim = |d: &i64| pb::tensor_shape_proto::Dimension {
                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*d)),
                ..Default::default()
            };
            pb::ValueInfoProto {
                name: name.into(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: elem_type as i32,
                        shape: Some(pb::TensorShapeProto {
                            dim: dims.iter().map(dim).collect(),
                        }),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        };
        let threshold = pb::TensorProto {
            name: "threshold".into(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: vec![0.5],
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                node: vec![
                    node("Greater", &["scores", "threshold"], "mask"),
                    node("NonZero", &["mask"], "hits"),
                ],
                initializer: vec![threshold],
                input: vec![value_info(
                    "scores",
                    pb::tensor_proto::DataType::Float,
                    &[6],
                )],
                output: vec![value_info(
                    "hits",
                    pb::tensor_proto::DataType::Int64,
                    &[1, -1],
                )],
                ..Default::default()
            }),
            ..Default::default()
        };
        let onnx = proto.encode_to_vec();
        let spec = TensorSpec {
            name: "scores".into(),
            dtype: DType::F32,
            shape: vec![6],
        };
        let run = |model: &Model, scores: &[f32]| {
            let input = NamedTensor::new("scores", WireTensor::from_f32(vec![6], scores).unwrap());
            let out = model.session().unwrap().run(&[input]).unwrap();
            (
                out[0].tensor.shape().to_vec(),
                out[0].tensor.as_i64().unwrap(),
            )
        };
        let model =
            Model::load(ModelFormat::Onnx, &onnx, std::slice::from_ref(&spec), None).unwrap();
        assert_eq!(model.outputs()[0].shape, [1, DYNAMIC_DIM]);
        assert_eq!(model.outputs()[0].to_string(), "hits i64[1, ?]");
        let nnef = onnx_to_nnef(&onnx, std::slice::from_ref(&spec)).unwrap();
        let from_nnef = Model::load(
            ModelFormat::Nnef,
            &nnef,
            std::slice::from_ref(&spec),
            Some(model.outputs()),
        )
        .unwrap();
        for m in [&model, &from_nnef] {
            assert_eq!(
                run(m, &[0.9, 0.1, 0.7, 0.2, 0.3, 0.8]),
                (vec![1, 3], vec![0, 2, 5])
            );
            assert_eq!(run(m, &[0.0; 6]), (vec![1, 0], vec![]));
        }
    }

    fn node_dump(m: &TypedModel) -> String {
        format!(
            "{:?} {:?} {:?}",
            m.nodes,
            m.input_outlets().unwrap(),
            m.output_outlets().unwrap()
        )
    }

    /// What the packer writes for each fp32 model in models/ (two conv
    /// nets, a multi-input one; tract 0.23.9 cannot export the quantized
    /// ones to NNEF) loads, from the stored graph, into exactly the graph
    /// tract's own reader builds from the same tar, and computes the same
    /// outputs, bit for bit, as the model parsed from the text. Without the
    /// stored graph, or with one that no longer matches the text, the text
    /// is parsed, to the same graph.
    #[test]
    fn the_stored_graph_builds_what_tract_builds_from_the_text() {
        for (dir, file) in [
            ("cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            ("rec", "ch_PP-OCRv4_rec_infer.onnx"),
            ("multi", "multi_io.onnx"),
        ] {
            let (onnx, inputs, specs) = model_and_inputs(dir, file);
            let tar = onnx_to_nnef(&onnx, &specs).unwrap();

            let names = member_names(&tar);
            assert!(
                names.iter().any(|n| n == graph_ast::MEMBER),
                "{dir}: {names:?}"
            );

            let reference = nnef().model_for_read(&mut &tar[..]).unwrap();
            let (stored, preparsed) = read_nnef(&tar).unwrap();
            assert!(preparsed, "{dir}");
            assert_eq!(node_dump(&stored), node_dump(&reference), "{dir}");

            let without = rewrite_tar(&tar, |n, d| (n != graph_ast::MEMBER).then_some(d));
            let (parsed, preparsed) = read_nnef(&without).unwrap();
            assert!(!preparsed, "{dir}: no member");
            assert_eq!(node_dump(&parsed), node_dump(&reference), "{dir}");

            // An edit the grammar ignores (a comment) still makes the
            // stored parse stale.
            let edited = rewrite_tar(&tar, |n, mut d| {
                if n == GRAPH_NNEF {
                    d.extend_from_slice(b"\n# edited after packing\n");
                }
                Some(d)
            });
            let (parsed, preparsed) = read_nnef(&edited).unwrap();
            assert!(!preparsed, "{dir}: stale member");
            assert_eq!(node_dump(&parsed), node_dump(&reference), "{dir}");

            // And the plans compute the same, bit for bit.
            let model = Model::load(ModelFormat::Nnef, &tar, &specs, None).unwrap();
            assert!(model.load_timings().graph_preparsed, "{dir}");
            let from_text = Model::load(ModelFormat::Nnef, &without, &specs, None).unwrap();
            assert!(!from_text.load_timings().graph_preparsed, "{dir}");
            let outputs = model.session().unwrap().run(&inputs).unwrap();
            assert_eq!(outputs.len(), golden(dir, "out_0").len(), "{dir}");
            assert_eq!(
                outputs,
                from_text.session().unwrap().run(&inputs).unwrap(),
                "{dir}"
            );
        }
    }

    /// A tar whose stored graph is damaged loads from the text; one with
    /// no graph.nnef at all is refused with a load error, as before.
    #[test]
    fn a_damaged_stored_graph_falls_back_and_a_missing_graph_is_refused() {
        let (onnx, inputs, specs) = model_and_inputs("multi", "multi_io.onnx");
        let tar = onnx_to_nnef(&onnx, &specs).unwrap();
        let damaged = rewrite_tar(&tar, |n, mut d| {
            if n == graph_ast::MEMBER {
                let last = d.len() - 1;
                d[last] ^= 0xff;
                d.truncate(last - 3);
            }
            Some(d)
        });
        let model = Model::load(ModelFormat::Nnef, &damaged, &specs, None).unwrap();
        assert!(!model.load_timings().graph_preparsed);
        assert_eq!(
            model.session().unwrap().run(&inputs).unwrap().len(),
            golden("multi", "out_0").len()
        );

        let headless = rewrite_tar(&tar, |n, d| (n != GRAPH_NNEF).then_some(d));
        let e = Model::load(ModelFormat::Nnef, &headless, &specs, None).unwrap_err();
        assert!(e.to_string().contains("graph.nnef"), "{e}");
    }
}

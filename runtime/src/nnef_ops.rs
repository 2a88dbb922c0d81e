//! NNEF serializers for ops tract's declutter produces but tract-nnef
//! 0.23.9 cannot write, so that `fleetctl bundle pack --nnef` takes the
//! models that use them.
//!
//! - `GeluExact`: declutter fuses the erf form of GELU,
//!   `0.5 * x * (1 + erf(x / sqrt 2))` (ONNX `Gelu`, and what PyTorch
//!   exports for `nn.GELU()` in every transformer), into one op that has no
//!   NNEF dumper in tract 0.23.9 ("No serializer found for node …
//!   GeluExact").
//!
//! - ONNX `Resize` by `sizes` (and by `scales` of some axes only), for the
//!   modes tract keeps as its ONNX op (nearest `round_prefer_floor` or
//!   `ceil`, antialiasing, an aspect-ratio policy, ...): tract-onnx-opl
//!   0.23.9 writes it as `tract_onnx_resize` with per-axis scales of
//!   output over input length, and reading that back computes each output
//!   length as `(input · scale) as usize`, which rounds 27 · (29 / 27) down
//!   to 28. The NNEF form of such a model then had other output shapes, or
//!   (further down the graph) other values, than its ONNX form. Ours keeps
//!   the op's own `sizes` or `scales` and `axes` ([`ONNX_RESIZE`]); the
//!   cases tract writes exactly (scales for every axis) are still written
//!   by tract.
//!
//! The ops live in their own registry, `edgefleet`: tract writes
//! `extension tract_registry edgefleet;` into a graph that uses one, and
//! only such a graph needs an agent that knows it. An older agent refuses
//! it at load (tract: "Registry not found"), in its self-test, before
//! anything is swapped.

use tract_nnef::internal::*;
use tract_nnef::ser::{ints, invocation, logical, numeric, string};
use tract_nnef::tract_core::ops::nn::GeluExact;
use tract_onnx_opl::resize::{AspectRatio, CoordTransform, Nearest, Resize};

/// The registry's id, as tract writes it in `extension tract_registry`.
pub(crate) const REGISTRY: &str = "edgefleet";

/// The fragment name of the exact (erf) GELU.
const GELU_EXACT: &str = "edgefleet_gelu_exact";

pub(crate) fn registry() -> Registry {
    let mut registry = Registry::new(REGISTRY)
        .with_doc("edgefleet: tract ops that tract-nnef 0.23.9 has no serializer for");
    // A unit op (no parameters): tract writes and reads it as
    // `edgefleet_gelu_exact(x)`.
    registry.register_unit_element_wise(GELU_EXACT, &GeluExact {});
    registry.register_primitive(
        ONNX_RESIZE,
        &onnx_resize_parameters(),
        &[("output", TypeName::Scalar.tensor())],
        load_onnx_resize,
    );
    registry.register_dumper(dump_onnx_resize);
    registry
}

/// ONNX `Resize` with its `sizes` or per-axis `scales` as they are.
const ONNX_RESIZE: &str = "edgefleet_onnx_resize";

fn onnx_resize_parameters() -> Vec<Parameter> {
    vec![
        TypeName::Scalar.tensor().named("input"),
        // `sizes` (integers) when `by_sizes`, else `scales`; one per axis
        // of `axes`.
        TypeName::Scalar.tensor().named("aux"),
        TypeName::Logical.named("by_sizes"),
        TypeName::Integer.array().named("axes"),
        TypeName::Scalar.tensor().named("roi").default(false),
        TypeName::String.named("coord_transformer"),
        TypeName::String.named("interpolator"),
        TypeName::String.named("nearest_mode"),
        TypeName::Scalar.named("cubic_coeff_a"),
        TypeName::Logical.named("exclude_outside"),
        TypeName::Logical.named("antialias"),
        TypeName::Scalar.named("extrapolation_value"),
        TypeName::String.named("keep_aspect_ratio_policy"),
    ]
}

/// Writes the Resize ops tract would write inexactly; `None` leaves the
/// others (scales for every axis, or an input that is not a constant) to
/// tract-onnx-opl's own serializer.
fn dump_onnx_resize(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &Resize,
) -> TractResult<Option<Arc<RValue>>> {
    let rank = ast.model.outlet_fact(node.inputs[0])?.rank();
    let axes = op.resized_axes(rank)?;
    let konst = |ix: usize| {
        ast.model
            .outlet_fact(node.inputs[ix])
            .map(|f| f.konst.clone())
    };
    let (aux, by_sizes) = match (op.optional_scales_input, op.optional_sizes_input) {
        (Some(ix), _) if node.inputs.len() > ix => {
            let Some(scales) = konst(ix)? else {
                return Ok(None);
            };
            if axes.len() == rank && scales.len() == rank {
                // tract passes these through unchanged.
                return Ok(None);
            }
            (
                scales.cast_to::<f32>()?.into_owned().into_arc_tensor(),
                false,
            )
        }
        (_, Some(ix)) if node.inputs.len() > ix => {
            let Some(sizes) = konst(ix)? else {
                return Ok(None);
            };
            (sizes.cast_to::<i64>()?.into_owned().into_arc_tensor(), true)
        }
        _ => return Ok(None),
    };
    if aux.len() != axes.len() {
        return Ok(None);
    }
    let roi = match op.optional_roi_input.filter(|&ix| node.inputs.len() > ix) {
        Some(ix) => match konst(ix)? {
            Some(roi) => Some(roi.cast_to::<f32>()?.into_owned().into_arc_tensor()),
            None => return Ok(None),
        },
        None => None,
    };
    let input = ast.mapping[&node.inputs[0]].clone();
    let aux = ast.konst_variable(format!("{}.aux", node.name), &aux)?;
    let mut args = vec![
        ("by_sizes", logical(by_sizes)),
        ("axes", ints(&axes)),
        ("coord_transformer", string(op.coord_transformer.as_str())),
        ("interpolator", string(op.interpolator.as_str())),
        ("nearest_mode", string(op.nearest.as_str())),
        ("cubic_coeff_a", numeric(op.cubic_coeff_a())),
        ("exclude_outside", logical(op.exclude_outside)),
        ("antialias", logical(op.antialias)),
        ("extrapolation_value", numeric(op.extrapolation_value())),
        (
            "keep_aspect_ratio_policy",
            string(op.keep_aspect_ratio_policy.as_str()),
        ),
    ];
    if let Some(roi) = roi {
        let roi = ast.konst_variable(format!("{}.roi", node.name), &roi)?;
        args.push(("roi", (*roi).clone()));
    }
    Ok(Some(invocation(ONNX_RESIZE, &[input, aux], &args)))
}

fn load_onnx_resize(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = inv.named_arg_as(builder, "input")?;
    let aux: OutletId = inv.named_arg_as(builder, "aux")?;
    let by_sizes: bool = inv.named_arg_as(builder, "by_sizes")?;
    let axes: TVec<i64> = inv.named_arg_as(builder, "axes")?;
    let roi = inv.optional_named_arg_as::<OutletId>(builder, "roi")?;
    let coord_transformer: String = inv.named_arg_as(builder, "coord_transformer")?;
    let interpolator: String = inv.named_arg_as(builder, "interpolator")?;
    let nearest_mode: String = inv.named_arg_as(builder, "nearest_mode")?;
    let cubic_coeff_a: f32 = inv.named_arg_as(builder, "cubic_coeff_a")?;
    let exclude_outside: bool = inv.named_arg_as(builder, "exclude_outside")?;
    let antialias: bool = inv.named_arg_as(builder, "antialias")?;
    let extrapolation_value: f32 = inv.named_arg_as(builder, "extrapolation_value")?;
    let policy: String = inv.named_arg_as(builder, "keep_aspect_ratio_policy")?;
    let op = Resize {
        axes: Some(axes.to_vec()),
        coord_transformer: CoordTransform::parse(&coord_transformer)?,
        interpolator: tract_nnef::tract_core::ops::nn::resize::Interpolator::parse(&interpolator)?,
        nearest: Nearest::parse(&nearest_mode)?,
        antialias,
        cubic_coeff_a_bits: cubic_coeff_a.to_bits(),
        exclude_outside,
        extrapolation_value_bits: extrapolation_value.to_bits(),
        keep_aspect_ratio_policy: AspectRatio::parse(&policy)?,
        optional_roi_input: roi.map(|_| 2),
        optional_scales_input: (!by_sizes).then_some(1),
        optional_sizes_input: by_sizes.then_some(1),
    };
    let mut wires = tvec!(input, aux);
    wires.extend(roi);
    builder.wire(op, &wires)
}

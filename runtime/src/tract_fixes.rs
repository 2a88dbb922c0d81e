//! Rewrites that keep tract 0.23.9 from computing a wrong answer, applied
//! to every typed graph before tract's passes see it. Each one states the
//! tract code it works around and changes nothing a graph computes.
//!
//! Found by packing randomly built models against ONNX Runtime's outputs
//! (`scripts/make_model_zoo.py`; the models that showed each bug are in
//! `tests/data/zoo/`, checked by `model::tests`).

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::cnn::{Conv, PaddingSpec};

/// Writes the padding of every `SAME_UPPER`/`SAME_LOWER` convolution as the
/// explicit pads it means for the graph's (pinned) input shape.
///
/// tract's declutter turns a strided 1×1 convolution into a `Downsample`
/// and a stride-1 convolution (`Conv::declutter_stride_slice_to_downsample`),
/// pulls the `Downsample` up through element-wise ops, and folds it into
/// the convolution it meets by multiplying that one's stride
/// (`ops/downsample/conv.rs`, `fuse_downsample_into_conv`). It keeps that
/// convolution's padding spec as it is. `SAME_UPPER` pads according to the
/// stride, so at stride 2 it pads an even-sized input differently than at
/// stride 1 (for a 3×3 kernel on 48 rows: 0 and 1 instead of 1 and 1), and
/// every output of the pair is taken from the wrong window. A 3×3
/// `SAME_UPPER` convolution followed by a stride-2 1×1 one, as in
/// MobileNet-style exports, gave errors of the order of the values
/// themselves. Explicit pads are what `SAME_*` meant at stride 1, and stay
/// right at any stride.
///
/// Convolutions whose input size is not known (a symbolic axis) are left
/// as they are.
pub(crate) fn explicit_same_padding(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes.len() {
        let Some(conv) = model.nodes[id].op_as::<Conv>() else {
            continue;
        };
        let spec = &conv.pool_spec;
        if !matches!(
            spec.padding,
            PaddingSpec::SameUpper | PaddingSpec::SameLower
        ) {
            continue;
        }
        let input = model.outlet_fact(model.nodes[id].inputs[0])?;
        let shape = spec.data_format.shape(input.shape.to_tvec())?;
        let Some(spatial) = shape
            .hw_dims()
            .iter()
            .map(|d| d.to_usize().ok())
            .collect::<Option<TVec<usize>>>()
        else {
            continue;
        };
        let computed = spec.padding.compute(
            &spatial,
            &spec.kernel_shape,
            &spec.dilations(),
            &spec.strides(),
        );
        let mut explicit = conv.clone();
        explicit.pool_spec.padding = PaddingSpec::Explicit(
            computed.iter().map(|c| c.pad_before).collect(),
            computed.iter().map(|c| c.pad_after).collect(),
        );
        model.nodes[id].op = Box::new(explicit);
    }
    Ok(())
}

/// Wraps every `Softmax` (and `LogSoftmax`) that reads a dequantized value
/// (ONNX models: NNEF has no quantize ops tract can write)
/// in [`ShieldedSoftmax`], so that tract computes it as a softmax.
///
/// tract's declutter of `DequantizeLinear` (tract-core `ops/quant.rs`)
/// walks from it through single-successor ops whose axes mapping looks
/// element-wise to the next `QuantizeLinear`, and replaces the whole chain
/// by a 256-entry lookup table applied to each element on its own.
/// `Softmax`'s axes mapping is the natural one (every axis in, every axis
/// out), although each output depends on its whole row: the table then
/// holds the softmax of a single element, 1.0, and a quantized classifier
/// (`onnxruntime.quantization` quantizes `Softmax` by default) answered
/// [1.0, 1.0] where ONNX Runtime gives [0.45, 0.55]. The wrapper's axes
/// mapping links no input axis to an output axis, which ends that walk;
/// it computes with tract's own `Softmax`.
#[cfg(feature = "onnx")]
pub(crate) fn shield_quantized_softmax(model: &mut TypedModel) -> TractResult<()> {
    use tract_nnef::tract_core::ops::nn::Softmax;
    for id in 0..model.nodes.len() {
        let Some(softmax) = model.nodes[id].op_as::<Softmax>() else {
            continue;
        };
        let softmax = softmax.clone();
        if reads_dequantized(model, model.nodes[id].inputs[0]) {
            model.nodes[id].op = Box::new(ShieldedSoftmax(softmax));
        }
    }
    Ok(())
}

/// Whether `outlet` is a `DequantizeLinear`'s output, or reached from one
/// through single-input ops that map their axes element-wise (the chain
/// tract's walk from the `DequantizeLinear` would follow).
#[cfg(feature = "onnx")]
fn reads_dequantized(model: &TypedModel, mut outlet: OutletId) -> bool {
    use tract_nnef::tract_core::ops::quant::DequantizeLinearF32;
    loop {
        let node = model.node(outlet.node);
        if node.op_is::<DequantizeLinearF32>() {
            return true;
        }
        if node.inputs.len() != 1 || node.outputs.len() != 1 {
            return false;
        }
        // An op whose mapping cannot be had is not element-wise, here: a
        // float model's load must not fail for a question only QDQ graphs ask.
        let element_wise = model
            .node_facts(node.id)
            .and_then(|(inputs, outputs)| node.op.axes_mapping(&inputs, &outputs))
            .is_ok_and(|mapping| mapping.is_element_wise_unary());
        if !element_wise {
            return false;
        }
        outlet = node.inputs[0];
    }
}

/// tract's `Softmax`, computed by it, with an axes mapping that does not
/// claim to be element-wise ([`shield_quantized_softmax`]). It takes no
/// axis change either: the axes it reduces over stay where they are.
#[cfg(feature = "onnx")]
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ShieldedSoftmax(pub tract_nnef::tract_core::ops::nn::Softmax);

#[cfg(feature = "onnx")]
impl Op for ShieldedSoftmax {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        self.0.info()
    }

    op_as_typed_op!();
}

#[cfg(feature = "onnx")]
impl EvalOp for ShieldedSoftmax {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        EvalOp::eval(&self.0, ctx, inputs)
    }
}

#[cfg(feature = "onnx")]
impl TypedOp for ShieldedSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::disconnected(inputs, outputs)
    }

    as_op!();
}

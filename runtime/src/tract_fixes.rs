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

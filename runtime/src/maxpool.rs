//! 2-D `MaxPool` of images with channels first, computed as row maxima.
//!
//! tract 0.23.9's `OptMaxPool` folds each kernel tap into an output row
//! over the span of columns where it lands in bounds. At a width stride of
//! 1 that is a contiguous fold, but at stride 2 (the 3 × 3, stride 2 pool
//! after a network's stem, as in ResNet, SqueezeNet and ShuffleNet) each
//! of the nine taps walks its input row with `step_by(2)` through a
//! generic comparison, one value at a time. It was 1.4-2.0 ms there
//! against ONNX Runtime's 0.14-0.19 ms (docs/architectures.md).
//!
//! [`lower`] replaces such a pool, before codegen, with [`MaxPoolRows`]:
//! for each output row it takes the maximum of the window's input rows
//! into a row buffer, in one pass per row over contiguous slices (which
//! the compiler vectorizes), the padding columns left at tract's starting
//! value; then each output's maximum over its window's columns of that
//! buffer, with the window's width and stride as constants for the common
//! pools (2, 3 or 5 wide, stride 1 or 2, no dilation), by contiguous folds
//! for other windows at stride 1. On ResNet-18's stem pool (64 × 112 × 112,
//! 3 × 3 at stride 2) a standalone copy of these loops took 0.24 ms here
//! with the constants against 0.51 ms with the same loop reading them at
//! run time (each output a chain of dependent scalar maxima); at stride 1,
//! 0.42 ms against 1.44 (the contiguous folds 0.51).
//!
//! The values are tract's: the same starting value (`f32::MIN`, which a
//! window of padding alone yields), the same comparison (`o < v`, so a NaN
//! never wins), only the taps inside the image. The one difference is the
//! order of the taps, rows first here: of a `-0.0` and a `0.0` in one
//! window, tract keeps the first in its row-major order, this op the first
//! in column-major order. The tests compare every value with `==`.
//!
//! Only f32 pools over the last two axes of NCHW or CHW tensors (ONNX's
//! layout) without the index output, of a shape known at load; only in
//! builds without debug assertions (see `crate::lowering::enabled`), and
//! not with `EDGEFLEET_MAXPOOL=tract`, which the benchmark's lever table
//! uses to compare the two. Plain Rust: ARM boards take it too.

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::cnn::MaxPool;
use tract_nnef::tract_core::ops::nn::DataFormat;

use crate::threads::par_output;

/// `MaxPool` of an f32 tensor `[N, C, H, W]` or `[C, H, W]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MaxPoolRows {
    /// Images (batch times channels).
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// Kernel, strides, dilations, padding before (top, left): tract's
    /// geometry for this input shape.
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    pt: usize,
    pl: usize,
    output_shape: TVec<usize>,
}

impl Op for MaxPoolRows {
    fn name(&self) -> StaticName {
        "MaxPoolRows".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} images of {}x{} to {}x{}, kernel {}x{}, strides {}x{}, dilations {}x{}, padding {}x{} before",
            self.planes,
            self.h,
            self.w,
            self.oh,
            self.ow,
            self.kh,
            self.kw,
            self.sh,
            self.sw,
            self.dh,
            self.dw,
            self.pt,
            self.pl
        )])
    }

    op_as_typed_op!();
}

/// `acc[i] = max(acc[i], taps[i])` with tract's comparison: a NaN tap
/// never replaces a value. The select compiles to `maxps` on x86-64.
fn fold_max(acc: &mut [f32], taps: &[f32]) {
    for (o, &v) in acc.iter_mut().zip(taps) {
        *o = if *o < v { v } else { *o };
    }
}

impl MaxPoolRows {
    /// Columns of the padded row buffer that some output's window reads.
    fn span(&self) -> usize {
        (self.ow - 1) * self.sw + (self.kw - 1) * self.dw + 1
    }

    /// One image: `src` is `[H, W]`, `out` is `[OH, OW]`. `row` holds
    /// [`Self::span`] values, `f32::MIN` outside the image's columns.
    fn image(&self, src: &[f32], row: &mut [f32], out: &mut [f32]) {
        // The image's columns in the buffer: from `pl`, as many as a
        // window reaches.
        let lo = self.pl.min(row.len());
        let cols = self.w.min(row.len() - lo);
        for (oy, out_row) in out.chunks_exact_mut(self.ow).enumerate() {
            let line = &mut row[lo..lo + cols];
            let mut rows = (0..self.kh)
                .map(|ky| (oy * self.sh + ky * self.dh).wrapping_sub(self.pt))
                .filter(|&iy| iy < self.h)
                .map(|iy| &src[iy * self.w..][..cols]);
            match rows.next() {
                // The first row folded onto `f32::MIN` as it is written.
                Some(first) => {
                    for (o, &v) in line.iter_mut().zip(first) {
                        *o = if f32::MIN < v { v } else { f32::MIN };
                    }
                    rows.for_each(|r| fold_max(line, r));
                }
                None => line.fill(f32::MIN),
            }
            self.across(row, out_row);
        }
    }

    /// Each output's maximum over its window's columns of `row`, taps in
    /// order from the first.
    fn across(&self, row: &[f32], out: &mut [f32]) {
        match (self.kw, self.sw, self.dw) {
            (2, 1, 1) => across_fixed::<2, 1>(row, out),
            (3, 1, 1) => across_fixed::<3, 1>(row, out),
            (5, 1, 1) => across_fixed::<5, 1>(row, out),
            (2, 2, 1) => across_fixed::<2, 2>(row, out),
            (3, 2, 1) => across_fixed::<3, 2>(row, out),
            (5, 2, 1) => across_fixed::<5, 2>(row, out),
            (_, 1, _) => {
                out.copy_from_slice(&row[..self.ow]);
                for kx in 1..self.kw {
                    fold_max(out, &row[kx * self.dw..][..self.ow]);
                }
            }
            _ => {
                for (x, o) in out.iter_mut().enumerate() {
                    let taps = &row[x * self.sw..];
                    let mut m = taps[0];
                    for kx in 1..self.kw {
                        let v = taps[kx * self.dw];
                        m = if m < v { v } else { m };
                    }
                    *o = m;
                }
            }
        }
    }
}

/// [`MaxPoolRows::across`] for a window `KW` wide at stride `SW`, without
/// dilation: the compiler unrolls each output's taps.
fn across_fixed<const KW: usize, const SW: usize>(row: &[f32], out: &mut [f32]) {
    for (x, o) in out.iter_mut().enumerate() {
        let taps = &row[x * SW..][..KW];
        let mut m = taps[0];
        for &v in &taps[1..] {
            m = if m < v { v } else { m };
        }
        *o = m;
    }
}

impl EvalOp for MaxPoolRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("MaxPoolRows takes the image")?;
        let src = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let image_in = self.h * self.w;
        let image_out = self.oh * self.ow;
        ensure!(
            src.len() == self.planes * image_in,
            "MaxPoolRows input size"
        );
        ensure!(
            self.output_shape.iter().product::<usize>() == self.planes * image_out,
            "MaxPoolRows output size"
        );
        let work = self.planes * image_out * (self.kh + self.kw);
        let out = par_output(&self.output_shape, image_out, work, |first, chunk| {
            let mut row = vec![f32::MIN; self.span()];
            for (i, out) in chunk.chunks_exact_mut(image_out).enumerate() {
                let at = (first + i) * image_in;
                self.image(&src[at..at + image_in], &mut row, out);
            }
            Ok(())
        })?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for MaxPoolRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        crate::lowering::f32_output(inputs, &self.output_shape, "MaxPoolRows")
    }

    as_op!();
}

/// Replaces every `MaxPool` that [`MaxPoolRows`] computes; returns how
/// many.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    if !enabled() {
        return Ok(0);
    }
    crate::lowering::replace_ops(model, rows_op)
}

/// Unless `EDGEFLEET_MAXPOOL=tract`; not in builds with debug assertions
/// ([`crate::lowering::enabled`] says why). The unit tests call the op
/// directly.
fn enabled() -> bool {
    crate::lowering::enabled("EDGEFLEET_MAXPOOL")
}

/// The op for node `id`'s `MaxPool`, with tract's geometry for its input
/// shape, when [`MaxPoolRows`] computes it.
fn rows_op(model: &TypedModel, id: usize, pool: &MaxPool) -> TractResult<Option<MaxPoolRows>> {
    let spec = &pool.pool_spec;
    if pool.with_index_outputs.is_some()
        || !matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
        || spec.kernel_shape.len() != 2
        || spec.input_channels != spec.output_channels
    {
        return Ok(None);
    }
    let input = model.outlet_fact(model.nodes[id].inputs[0])?;
    let Some(shape) = input.shape.as_concrete().map(TVec::<usize>::from) else {
        return Ok(None);
    };
    let rank = if spec.data_format == DataFormat::NCHW {
        4
    } else {
        3
    };
    if input.datum_type != f32::datum_type() || shape.len() != rank {
        return Ok(None);
    }
    let dims: TVec<TDim> = shape.iter().map(|d| d.to_dim()).collect();
    let geometry = spec.compute_geo(&dims)?;
    let geo = geometry.to_concrete(&shape)?;
    let patch = &geo.patch;
    let output_shape: TVec<usize> = geo.output_shape.shape.clone();
    let output = model.outlet_fact(OutletId::new(id, 0))?;
    if output.datum_type != f32::datum_type() || output.shape.as_concrete() != Some(&*output_shape)
    {
        return Ok(None);
    }
    let (h, w) = (geo.input_shape.hw_dims()[0], geo.input_shape.hw_dims()[1]);
    let (oh, ow) = (patch.output_shape[0], patch.output_shape[1]);
    let ps = &patch.spec;
    // A contiguous image per plane, and something to pool.
    let contiguous = *geo.input_shape.w_stride() == 1
        && *geo.input_shape.h_stride() == w
        && *geo.input_shape.c_stride() == h * w;
    if !contiguous
        || oh == 0
        || ow == 0
        || ps.kernel_shape.contains(&0)
        || ps.strides.iter().chain(&ps.dilations).any(|&s| s == 0)
    {
        return Ok(None);
    }
    Ok(Some(MaxPoolRows {
        planes: shape[..shape.len() - 2].iter().product(),
        h,
        w,
        oh,
        ow,
        kh: ps.kernel_shape[0],
        kw: ps.kernel_shape[1],
        sh: ps.strides[0],
        sw: ps.strides[1],
        dh: ps.dilations[0],
        dw: ps.dilations[1],
        pt: patch.pad_before[0],
        pl: patch.pad_before[1],
        output_shape,
    }))
}

#[cfg(test)]
mod tests {
    use tract_nnef::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    use super::*;
    use crate::test_rng::Lcg;

    #[derive(Clone, Debug)]
    struct Case {
        shape: TVec<usize>,
        format: DataFormat,
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        padding: PaddingSpec,
    }

    fn pool_model(case: &Case, index: Option<DatumType>) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(&case.shape))?;
        let channels = *case.format.shape(&case.shape)?.c();
        let op = MaxPool {
            pool_spec: PoolSpec {
                data_format: case.format,
                kernel_shape: case.kernel[..].into(),
                padding: case.padding.clone(),
                dilations: Some(case.dilations[..].into()),
                strides: Some(case.strides[..].into()),
                input_channels: channels,
                output_channels: channels,
            },
            with_index_outputs: index,
        };
        let y = model.wire_node("pool", op, &[x])?;
        model.select_output_outlets(&y[..1])?;
        Ok(model)
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_runnable()?;
        let out = plan.run(tvec!(input.clone().into_tvalue()))?;
        Ok(out[0].clone().into_tensor())
    }

    fn lowered(model: &TypedModel) -> TractResult<Option<MaxPoolRows>> {
        let node = model.node_id_by_name("pool")?;
        rows_op(model, node, model.nodes[node].op_as::<MaxPool>().unwrap())
    }

    /// tract's pool and ours on the same input (ties and zeros among its
    /// values): equal values, the same shape.
    fn compare(case: &Case, rng: &mut Lcg) -> TractResult<()> {
        let model = pool_model(case, None)?;
        let len = case.shape.iter().product();
        let input = tensor1(&rng.values(len, 40.0)).into_shape(&case.shape)?;
        let tracts = run(model.clone(), &input)?;
        let op = lowered(&model)?.with_context(|| format!("not lowered: {case:?}"))?;
        let mut ours = model;
        let node = ours.node_id_by_name("pool")?;
        ours.nodes[node].op = Box::new(op);
        // Two compute threads split the images between them: the same.
        let split =
            crate::threads::Threads::new(2, "maxpool-test")?.run(|| run(ours.clone(), &input))?;
        let ours = run(ours, &input)?;
        assert_eq!(ours, split, "{case:?} on two threads");
        assert_eq!(ours.shape(), tracts.shape(), "{case:?}");
        let (a, b) = (
            ours.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
            tracts.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        );
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(a == b, "{case:?}: element {i} is {a}, tract's {b}");
        }
        Ok(())
    }

    #[test]
    fn every_geometry_computes_tracts_values() -> TractResult<()> {
        let mut rng = Lcg(5);
        let paddings = [
            PaddingSpec::Valid,
            PaddingSpec::SameUpper,
            PaddingSpec::SameLower,
            PaddingSpec::Explicit(tvec!(1, 0), tvec!(0, 2)),
            // ONNX's ceil_mode: the last window may hang past the image.
            PaddingSpec::ExplicitOnnxPool(tvec!(0, 1), tvec!(1, 0), true),
            PaddingSpec::ExplicitOnnxPool(tvec!(0, 0), tvec!(0, 0), true),
        ];
        // The stem pool of ResNet (3x3 s2), SqueezeNet's, 2x2 s2, a
        // stride of 1, 3 and mixed, dilation, a kernel wider than tall,
        // a single row, a window larger than the image; every window with
        // constants of its own (`across_fixed`), and the two loops for
        // the others (stride 1, any other).
        let geometries: Vec<([usize; 2], [usize; 2], [usize; 2])> = vec![
            ([3, 3], [2, 2], [1, 1]),
            ([2, 2], [2, 2], [1, 1]),
            ([3, 3], [1, 1], [1, 1]),
            ([2, 2], [1, 1], [1, 1]),
            ([5, 5], [1, 1], [1, 1]),
            ([5, 5], [2, 2], [1, 1]),
            ([2, 3], [3, 1], [1, 1]),
            ([3, 2], [1, 2], [2, 2]),
            ([1, 4], [2, 3], [1, 1]),
            ([5, 5], [1, 1], [1, 2]),
        ];
        let shapes: Vec<(TVec<usize>, DataFormat)> = vec![
            (tvec!(1, 3, 11, 13), DataFormat::NCHW),
            (tvec!(2, 2, 8, 8), DataFormat::NCHW),
            (tvec!(3, 1, 9), DataFormat::CHW),
            (tvec!(1, 2, 4, 5), DataFormat::NCHW),
        ];
        let mut cases = 0;
        for (shape, format) in &shapes {
            for (kernel, strides, dilations) in &geometries {
                for padding in &paddings {
                    let case = Case {
                        shape: shape.clone(),
                        format: *format,
                        kernel: *kernel,
                        strides: *strides,
                        dilations: *dilations,
                        padding: padding.clone(),
                    };
                    // Geometries tract itself refuses, or pools to
                    // nothing, are not cases.
                    // (tract's eval panics on an empty output).
                    let volume = pool_model(&case, None).and_then(|m| {
                        let fact = m.outlet_fact(m.output_outlets()?[0])?;
                        Ok(fact
                            .shape
                            .as_concrete()
                            .map(|s| s.iter().product::<usize>()))
                    });
                    if !matches!(volume, Ok(Some(v)) if v > 0) {
                        continue;
                    }
                    compare(&case, &mut rng)?;
                    cases += 1;
                }
            }
        }
        assert!(cases >= 190, "only {cases} cases ran");
        Ok(())
    }

    #[test]
    fn only_f32_channels_first_pools_without_indices_are_lowered() -> TractResult<()> {
        let case = |shape: TVec<usize>, format| Case {
            shape,
            format,
            kernel: [3, 3],
            strides: [2, 2],
            dilations: [1, 1],
            padding: PaddingSpec::SameUpper,
        };
        let nchw = case(tvec!(1, 4, 10, 10), DataFormat::NCHW);
        assert!(lowered(&pool_model(&nchw, None)?)?.is_some());
        // With the index output: tract's.
        assert!(lowered(&pool_model(&nchw, Some(i64::datum_type()))?)?.is_none());
        // Channels last: tract's.
        let nhwc = case(tvec!(1, 10, 10, 4), DataFormat::NHWC);
        assert!(lowered(&pool_model(&nhwc, None)?)?.is_none());
        // Not f32: tract's.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f16::fact([1, 4, 10, 10]))?;
        let op = pool_model(&nchw, None)?
            .node_by_name("pool")?
            .op_as::<MaxPool>()
            .unwrap()
            .clone();
        let y = model.wire_node("pool", op, &[x])?;
        model.select_output_outlets(&y)?;
        assert!(lowered(&model)?.is_none());
        // A 1-D pool: tract's.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 10]))?;
        let op = MaxPool {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec!(3),
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: None,
                input_channels: 4,
                output_channels: 4,
            },
            with_index_outputs: None,
        };
        let y = model.wire_node("pool", op, &[x])?;
        model.select_output_outlets(&y)?;
        assert!(lowered(&model)?.is_none());
        Ok(())
    }
}

//! `Resize` of an image's last two axes (linear, cubic, or nearest at a
//! ratio tract does not replicate pixels for), computed row by row.
//!
//! tract 0.23.9 evaluates its `Resize` one axis at a time over the whole
//! tensor: it copies the input into a `Vec`, and for each resized axis
//! allocates the next tensor, zeroes it, and adds each tap's weighted row
//! into it. Along the last axis a "row" is one element, so the whole
//! width pass runs element by element through slices of one, with a
//! `fill` per output value. A bilinear 2× upsampling of 16 × 128 × 128
//! took 11.1 ms there against ONNX Runtime's 1.7 ms (a U-Net-like decoder,
//! one thread; scripts/bench_notes.md).
//!
//! [`lower`] replaces such a `Resize`, before codegen, with [`ResizeRows`]:
//! the same plans (tract's `Resize::plan_axis`: the taps and weights of
//! each output row and column, computed once at load instead of at every
//! inference), applied one output row at a time. Each output row takes the
//! weighted sum of its input rows into one row buffer, then each output
//! value the weighted sum of its columns of that buffer, written into the
//! output in place. Every value is computed with the same operations in
//! the same order as tract's (the sum starts at zero, taps in order, a
//! zero weight skipped), so the outputs are tract's to the bit; the tests
//! compare them bit for bit.
//!
//! Only f32, only when the scales or sizes are constants and no axis but
//! the last two is resized, only in builds without debug assertions (see
//! `depthwise::enabled`), and not with `EDGEFLEET_RESIZE=tract`, which the
//! benchmark's lever table uses to compare the two. Plain Rust: ARM boards
//! take it too.

use std::hash::{Hash, Hasher};

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::nn::Resize;
use tract_nnef::tract_core::ops::nn::resize::AxisPlan;

use crate::threads::par_output;

/// The taps of each output index along one axis: `window` input indices
/// and their weights per output index, as tract's plan has them.
#[derive(Clone, Debug, PartialEq)]
struct Taps {
    window: usize,
    indices: Vec<usize>,
    weights: Vec<f32>,
}

impl Eq for Taps {}

impl Hash for Taps {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.window.hash(state);
        self.indices.hash(state);
        for w in &self.weights {
            w.to_bits().hash(state);
        }
    }
}

impl Taps {
    /// tract's plan, unless it fills some output with a constant instead
    /// (never for this op's transforms: then the op is left to tract).
    fn of(plan: AxisPlan) -> Option<Taps> {
        (!plan.extrapolated.contains(&true)).then_some(Taps {
            window: plan.window,
            indices: plan.indices,
            weights: plan.weights,
        })
    }

    /// Output index `x`'s taps, zero weights left out, in tract's order.
    fn of_index(&self, x: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let at = x * self.window;
        self.indices[at..at + self.window]
            .iter()
            .copied()
            .zip(self.weights[at..at + self.window].iter().copied())
            .filter(|&(_, w)| w != 0.0)
    }
}

/// `Resize` of an f32 tensor `[…, H, W]` into `[…, H', W']`. The other
/// inputs of tract's op (scales, sizes) stay wired and are not read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResizeRows {
    /// Images (the product of the leading axes).
    planes: usize,
    h_in: usize,
    w_in: usize,
    h_out: usize,
    w_out: usize,
    /// `None` when tract leaves that axis as it is.
    rows: Option<Taps>,
    cols: Option<Taps>,
    output_shape: TVec<usize>,
}

impl Op for ResizeRows {
    fn name(&self) -> StaticName {
        "ResizeRows".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let window = |t: &Option<Taps>| t.as_ref().map_or(0, |t| t.window);
        Ok(vec![format!(
            "{} images of {}x{} to {}x{}, {} taps per row, {} per column",
            self.planes,
            self.h_in,
            self.w_in,
            self.h_out,
            self.w_out,
            window(&self.rows),
            window(&self.cols)
        )])
    }

    op_as_typed_op!();
}

impl ResizeRows {
    /// One image: `src` is `[H, W]`, `out` is `[H', W']`, `row` holds `W`.
    fn image(&self, src: &[f32], row: &mut [f32], out: &mut [f32]) {
        for (y, out_row) in out.chunks_exact_mut(self.w_out).enumerate() {
            let line: &[f32] = match &self.rows {
                None => &src[y * self.w_in..][..self.w_in],
                Some(rows) => {
                    row.fill(0.0);
                    for (i, w) in rows.of_index(y) {
                        let from = &src[i * self.w_in..][..self.w_in];
                        for (d, s) in row.iter_mut().zip(from) {
                            *d += w * s;
                        }
                    }
                    row
                }
            };
            match &self.cols {
                None => out_row.copy_from_slice(line),
                // Linear and nearest: two taps, unrolled (the same sums).
                Some(cols) if cols.window == 2 => {
                    let taps = cols
                        .indices
                        .chunks_exact(2)
                        .zip(cols.weights.chunks_exact(2));
                    for (d, (i, w)) in out_row.iter_mut().zip(taps) {
                        let mut sum = 0f32;
                        if w[0] != 0.0 {
                            sum += w[0] * line[i[0]];
                        }
                        if w[1] != 0.0 {
                            sum += w[1] * line[i[1]];
                        }
                        *d = sum;
                    }
                }
                Some(cols) => {
                    for (x, d) in out_row.iter_mut().enumerate() {
                        let mut sum = 0f32;
                        for (i, w) in cols.of_index(x) {
                            sum += w * line[i];
                        }
                        *d = sum;
                    }
                }
            }
        }
    }
}

impl EvalOp for ResizeRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("ResizeRows takes the image first")?;
        let src = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let image_in = self.h_in * self.w_in;
        let image_out = self.h_out * self.w_out;
        ensure!(src.len() == self.planes * image_in, "ResizeRows input size");
        ensure!(
            self.output_shape.iter().product::<usize>() == self.planes * image_out,
            "ResizeRows output size"
        );
        let taps = |t: &Option<Taps>| t.as_ref().map_or(1, |t| t.window);
        let work = self.planes * image_out * (taps(&self.rows) + taps(&self.cols));
        let out = par_output(&self.output_shape, image_out, work, |first, chunk| {
            let mut row = vec![0f32; self.w_in];
            for (i, out) in chunk.chunks_exact_mut(image_out).enumerate() {
                let at = (first + i) * image_in;
                self.image(&src[at..at + image_in], &mut row, out);
            }
            Ok(())
        })?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ResizeRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        crate::lowering::f32_output(inputs, &self.output_shape, "ResizeRows")
    }

    as_op!();
}

/// Replaces every `Resize` that [`ResizeRows`] computes; returns how many.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    if !enabled() {
        return Ok(0);
    }
    crate::lowering::replace_ops(model, rows_op)
}

/// Unless `EDGEFLEET_RESIZE=tract`; not in builds with debug assertions
/// ([`crate::lowering::enabled`] says why). The unit tests call the op
/// directly.
fn enabled() -> bool {
    crate::lowering::enabled("EDGEFLEET_RESIZE")
}

/// The op for node `id`'s `Resize`, when [`ResizeRows`] computes what
/// tract's `eval` would: the same output shape, scales and plans.
fn rows_op(model: &TypedModel, id: usize, resize: &Resize) -> TractResult<Option<ResizeRows>> {
    let facts = model.node_input_facts(id)?;
    let Some(input) = facts.first() else {
        return Ok(None);
    };
    let Some(shape) = input.shape.as_concrete().map(TVec::<usize>::from) else {
        return Ok(None);
    };
    let rank = shape.len();
    if input.datum_type != f32::datum_type() || rank < 2 {
        return Ok(None);
    }
    // The scales and sizes tract's eval would read, known now.
    let konst = |ix: Option<usize>| match ix {
        None => Ok(None),
        Some(ix) => match facts.get(ix).and_then(|f| f.konst.clone()) {
            Some(k) => Ok(Some(k)),
            None => Err(()),
        },
    };
    let (Ok(scales), Ok(sizes)) = (
        konst(resize.optional_scales_input),
        konst(resize.optional_sizes_input),
    ) else {
        return Ok(None);
    };
    let Ok(output_shape) = resize.compute_output_shape(&shape, scales.as_deref(), sizes.as_deref())
    else {
        return Ok(None);
    };
    let output = model.outlet_fact(OutletId::new(id, 0))?;
    if output.datum_type != f32::datum_type() || output.shape.as_concrete() != Some(&*output_shape)
    {
        return Ok(None);
    }
    let scales: TVec<f32> = match scales.filter(|s| s.len() == rank) {
        Some(s) => match s.try_as_plain_ram().and_then(|s| s.as_slice::<f32>()) {
            Ok(s) => s.into(),
            Err(_) => return Ok(None),
        },
        None => output_shape
            .iter()
            .zip(&shape)
            .map(|(o, i)| *o as f32 / *i as f32)
            .collect(),
    };
    let mut plans: [Option<Taps>; 2] = [None, None];
    for axis in 0..rank {
        let (len_in, len_out, scale) = (shape[axis], output_shape[axis], scales[axis]);
        if len_in == len_out && scale == 1.0 {
            continue;
        }
        // tract's plan of an empty input axis panics (a clamp to an empty
        // range): not at load, then; such a model stays tract's.
        if axis + 2 < rank || len_in == 0 {
            return Ok(None);
        }
        let Some(taps) = Taps::of(resize.plan_axis(scale, len_in, len_out)) else {
            return Ok(None);
        };
        plans[axis + 2 - rank] = Some(taps);
    }
    let [rows, cols] = plans;
    Ok(Some(ResizeRows {
        planes: shape[..rank - 2].iter().product(),
        h_in: shape[rank - 2],
        w_in: shape[rank - 1],
        h_out: output_shape[rank - 2],
        w_out: output_shape[rank - 1],
        rows,
        cols,
        output_shape,
    }))
}

#[cfg(test)]
mod tests {
    use tract_nnef::tract_core::ops::nn::{CoordTransformer, Interpolator, Nearest};

    use super::*;
    use crate::test_rng::Lcg;

    #[derive(Clone, Debug)]
    struct Case {
        shape: TVec<usize>,
        /// Output size of the last two axes.
        hw: [usize; 2],
        /// Given as scales (rounded output sizes) instead of sizes.
        by_scales: bool,
        interpolator: Interpolator,
        nearest: Nearest,
        transform: CoordTransformer,
    }

    /// One `Resize` over a source, its scales or sizes a constant.
    fn resize_model(case: &Case) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(&case.shape))?;
        let rank = case.shape.len();
        let mut out: Vec<usize> = case.shape.to_vec();
        out[rank - 2..].copy_from_slice(&case.hw);
        let (scales, sizes, input) = if case.by_scales {
            let scales: Vec<f32> = out
                .iter()
                .zip(&case.shape)
                .map(|(o, i)| *o as f32 / *i as f32)
                .collect();
            (Some(1), None, tensor1(&scales))
        } else {
            let sizes: Vec<i64> = out.iter().map(|&o| o as i64).collect();
            (None, Some(1), tensor1(&sizes))
        };
        let konst = model.add_const("scales_or_sizes", input)?;
        let op = Resize {
            coord_transformer: case.transform.clone(),
            interpolator: case.interpolator.clone(),
            nearest: case.nearest,
            optional_scales_input: scales,
            optional_sizes_input: sizes,
        };
        let y = model.wire_node("resize", op, &[x, konst])?;
        model.select_output_outlets(&y)?;
        Ok(model)
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_runnable()?;
        let out = plan.run(tvec!(input.clone().into_tvalue()))?;
        Ok(out[0].clone().into_tensor())
    }

    /// tract's `Resize` and ours on the same input: the same bits.
    fn compare(case: &Case, rng: &mut Lcg) -> TractResult<()> {
        let model = resize_model(case)?;
        let input =
            tensor1(&rng.values(case.shape.iter().product(), 300.0)).into_shape(&case.shape)?;
        let tracts = run(model.clone(), &input)?;
        let mut ours = model;
        let node = ours.node_id_by_name("resize")?;
        let resize = ours.nodes[node].op_as::<Resize>().unwrap().clone();
        let op =
            rows_op(&ours, node, &resize)?.with_context(|| format!("not lowered: {case:?}"))?;
        ours.nodes[node].op = Box::new(op);
        let ours = run(ours, &input)?;
        assert_eq!(ours.shape(), tracts.shape(), "{case:?}");
        let (a, b) = (
            ours.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
            tracts.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        );
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{case:?}: element {i} is {a}, tract's {b}"
            );
        }
        Ok(())
    }

    fn transforms() -> Vec<CoordTransformer> {
        vec![
            CoordTransformer::HalfPixel,
            CoordTransformer::AlignCorners,
            CoordTransformer::Asymmetric,
            CoordTransformer::PytorchHalfPixel,
            CoordTransformer::HalfPixelSymmetric,
            CoordTransformer::TfHalfPixelForNn,
        ]
    }

    #[test]
    fn every_mode_and_size_computes_tracts_bits() -> TractResult<()> {
        let mut rng = Lcg(11);
        let interpolators = [
            (Interpolator::Linear, Nearest::Floor),
            (Interpolator::Cubic, Nearest::Floor),
            (Interpolator::Nearest, Nearest::Floor),
            (Interpolator::Nearest, Nearest::RoundPreferCeil),
        ];
        // Up 2x, non-integer up (24 -> 28, the ONNX Runtime tie), down,
        // one axis alone, a single row and column, rank 3 and 5.
        let geometries: Vec<(TVec<usize>, [usize; 2])> = vec![
            (tvec!(1, 3, 5, 7), [10, 14]),
            (tvec!(1, 2, 24, 24), [28, 20]),
            (tvec!(2, 3, 16, 16), [7, 9]),
            (tvec!(1, 4, 1, 8), [3, 8]),
            (tvec!(1, 4, 6, 6), [6, 11]),
            (tvec!(1, 1, 1, 1), [4, 3]),
            (tvec!(3, 9, 4), [5, 13]),
            (tvec!(1, 2, 2, 5, 6), [10, 12]),
        ];
        let mut cases = 0;
        for (shape, hw) in &geometries {
            for (interpolator, nearest) in &interpolators {
                for transform in transforms() {
                    for by_scales in [false, true] {
                        let case = Case {
                            shape: shape.clone(),
                            hw: *hw,
                            by_scales,
                            interpolator: interpolator.clone(),
                            nearest: *nearest,
                            transform: transform.clone(),
                        };
                        compare(&case, &mut rng)?;
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 8 * 4 * 6 * 2);
        Ok(())
    }

    #[test]
    fn only_the_last_two_axes_of_f32_with_known_sizes_are_lowered() -> TractResult<()> {
        let case = |shape: TVec<usize>, hw: [usize; 2]| Case {
            shape,
            hw,
            by_scales: false,
            interpolator: Interpolator::Linear,
            nearest: Nearest::Floor,
            transform: CoordTransformer::HalfPixel,
        };
        let lowered = |model: &TypedModel| -> TractResult<bool> {
            let node = model.node_id_by_name("resize")?;
            let resize = model.nodes[node].op_as::<Resize>().unwrap();
            Ok(rows_op(model, node, resize)?.is_some())
        };
        assert!(lowered(&resize_model(&case(tvec!(1, 2, 4, 4), [8, 8]))?)?);
        // An empty axis resized: tract's (its plan would panic at load).
        assert!(!lowered(&resize_model(&case(tvec!(1, 2, 0, 4), [3, 8]))?)?);
        // A channel axis resized too: tract's.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 2, 4, 4]))?;
        let sizes = model.add_const("sizes", tensor1(&[1i64, 3, 8, 8]))?;
        let op = Resize {
            coord_transformer: CoordTransformer::HalfPixel,
            interpolator: Interpolator::Linear,
            nearest: Nearest::Floor,
            optional_scales_input: None,
            optional_sizes_input: Some(1),
        };
        let y = model.wire_node("resize", op.clone(), &[x, sizes])?;
        model.select_output_outlets(&y)?;
        assert!(!lowered(&model)?);
        // Sizes only known when it runs: tract's.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 2, 4, 4]))?;
        let sizes = model.add_source("sizes", i64::fact([4]))?;
        let y = model.wire_node("resize", op.clone(), &[x, sizes]);
        if let Ok(y) = y {
            model.select_output_outlets(&y)?;
            assert!(!lowered(&model)?);
        }
        // Not f32: tract's.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f16::fact([1, 2, 4, 4]))?;
        let sizes = model.add_const("sizes", tensor1(&[1i64, 2, 8, 8]))?;
        let y = model.wire_node("resize", op, &[x, sizes])?;
        model.select_output_outlets(&y)?;
        assert!(!lowered(&model)?);
        Ok(())
    }
}

//! Transposed convolutions (ONNX `ConvTranspose`) on x86-64: one direct
//! convolution per phase of the strides.
//!
//! tract 0.23.9 runs a transposed convolution as a matrix product of the
//! kernel with the whole image (`OptMatMul`, every tap of every input
//! position: `[O · KH · KW, H · W]`) and a `DeconvSum` that adds each of
//! those products into its output position. On the ConvTranspose
//! decoder (scripts/make_decoder_models.py) the two took 1.8 ms where
//! ONNX Runtime's two ConvTranspose took 1.1.
//!
//! Without dilation, output row `oy` with `oy + pad = Y · s + a` (`a <
//! s`, the row's phase) receives the taps `ky = a + s · m` from input rows
//! `Y - m` only, and likewise along the width. So the outputs of one
//! phase `(a, b)` are a convolution at stride 1 of the image with that
//! phase's taps, reversed. [`lower`] replaces such a `Deconv` with
//! [`DirectDeconv`], which computes each phase with
//! [`crate::direct_conv`]'s register blocks over one zero-padded copy of
//! the image (padded by the most taps of a phase, less one, on every
//! side) into a buffer, then writes each value to its output position,
//! every `s`-th one. Outputs that no tap reaches (an adjustment past the
//! last input, a phase past the kernel) hold the bias, through the chain.
//! Results differ from tract's in the last bits (another summation order,
//! fused multiply-adds); the tests compare the two on many geometries.
//!
//! The same conditions as [`crate::direct_conv`]: f32, 2-D, channels
//! before the spatial axes, a constant kernel and bias, group 1; and no
//! dilation. `EDGEFLEET_DECONV=tract` keeps tract's.

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::cnn::{Deconv, KernelFormat};

use crate::conv1x1::{self, Isa, Post};
use crate::direct_conv::{Geometry, Layout, PACK, Problem, channels};
use crate::lowering::{self, Replacement};
use crate::threads::par_output;

/// One phase of the strides: its offsets, its taps in the base layout,
/// and its weights packed as [`crate::direct_conv::DirectConv`]'s.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Phase {
    a: usize,
    b: usize,
    layout: Layout,
    weights_p: Arc<Tensor>,
}

/// `out[o, oy, ox] = post(bias[o] + Σ x[i, y, x] · k[o, i, ky, kx])` over
/// the taps with `oy = y · sh + ky - pt` and `ox = x · sw + kx - pl`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DirectDeconv {
    /// The stride-1 convolution whose taps every phase's are a subset of:
    /// its output grid is the phases' outputs before they are spread.
    base: Geometry,
    layout: Layout,
    /// The phases that have taps.
    phases: Vec<Phase>,
    bias: Arc<Tensor>,
    post: Vec<Post>,
    isa: Isa,
    /// Output height and width, strides, padding before (top, left).
    out_h: usize,
    out_w: usize,
    sh: usize,
    sw: usize,
    pt: usize,
    pl: usize,
    output_shape: TVec<usize>,
    /// Per output channel, what an output that no phase reaches holds
    /// (the bias through the chain); `None` when every output is
    /// reached. Fixed at load.
    unreached: Option<Arc<Tensor>>,
}

impl Op for DirectDeconv {
    fn name(&self) -> StaticName {
        "DirectDeconv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}→{} channels, strides {}x{}, {} phases with taps, then [{}], {:?}",
            self.base.ci,
            self.base.co,
            self.sh,
            self.sw,
            self.phases.len(),
            Post::names(&self.post),
            self.isa
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

thread_local! {
    /// A phase's values before they are spread (see `direct_conv::PLANES`).
    static PHASE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl EvalOp for DirectDeconv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (g, l) = (&self.base, &self.layout);
        let x = args_1!(inputs);
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let out_plane = self.out_h * self.out_w;
        ensure!(x.len() == g.n * g.ci * g.h * g.w, "DirectDeconv image size");
        ensure!(
            self.output_shape.iter().product::<usize>() == g.n * g.co * out_plane,
            "DirectDeconv output size"
        );
        let bias = self.bias.try_as_plain_ram()?.as_slice::<f32>()?;
        let post = Post::slices(&self.post)?;
        let weights: Vec<&[f32]> = self
            .phases
            .iter()
            .map(|p| p.weights_p.try_as_plain_ram()?.as_slice::<f32>())
            .collect::<TractResult<_>>()?;
        let unreached = match &self.unreached {
            Some(t) => Some(t.try_as_plain_ram()?.as_slice::<f32>()?),
            None => None,
        };
        crate::direct_conv::with_planes(g, l, x, |planes| {
            let grid = g.oh * g.ow;
            let taps: usize = self.phases.iter().map(|p| p.layout.taps.len()).sum();
            let work = g.n * g.co * grid * g.ci * taps;
            par_output(&self.output_shape, out_plane, work, |first, chunk| {
                let mut values = PHASE.take();
                let (mut row, mut rest) = (first, chunk);
                while !rest.is_empty() {
                    // The channels of one image.
                    let (ni, o) = (row / g.co, row % g.co);
                    let count = (g.co - o).min(rest.len() / out_plane);
                    let (these, next) = rest.split_at_mut(count * out_plane);
                    if let Some(unreached) = unreached {
                        for (r, out) in these.chunks_mut(out_plane).enumerate() {
                            out.fill(unreached[o + r]);
                        }
                    }
                    // Every value `spread` reads, `channels` writes first.
                    if values.len() < count * grid {
                        values.resize(count * grid, 0.0);
                    }
                    let values = &mut values[..count * grid];
                    for (phase, w) in self.phases.iter().zip(&weights) {
                        let problem = Problem {
                            g,
                            l: &phase.layout,
                            planes: &planes[ni * g.ci * l.channel..],
                            w,
                            bias,
                            post: &post,
                        };
                        channels(self.isa, &problem, o, values);
                        self.spread(phase, values, these);
                    }
                    (row, rest) = (row + count, next);
                }
                PHASE.set(values);
                Ok(())
            })
        })
        .map(|out| tvec!(out.into_tvalue()))
    }
}

impl DirectDeconv {
    /// Sets `unreached` unless every output is reached: each output is
    /// in one phase, so that is when the phases' extents add up to the
    /// whole output.
    fn with_unreached(mut self) -> TractResult<DirectDeconv> {
        let reached: usize = self
            .phases
            .iter()
            .map(|p| {
                let ((u0, u1), (v0, v1)) = self.extent(p);
                (u1 - u0) * (v1 - v0)
            })
            .sum();
        if reached < self.out_h * self.out_w {
            let bias = self.bias.try_as_plain_ram()?.as_slice::<f32>()?;
            let post = Post::slices(&self.post)?;
            let values: Vec<f32> = (0..self.base.co)
                .map(|o| post.iter().fold(bias[o], |v, &(fun, c)| fun.apply(v, c[o])))
                .collect();
            self.unreached = Some(Arc::new(tensor1(&values)));
        }
        Ok(self)
    }

    /// Writes a phase's values (`[channels, oh, ow]` of the base grid) to
    /// their output positions (`out`: the same channels, `[out_h,
    /// out_w]` each).
    fn spread(&self, phase: &Phase, values: &[f32], out: &mut [f32]) {
        let g = &self.base;
        let ((u0, u1), (v0, v1)) = self.extent(phase);
        if v0 >= v1 {
            return;
        }
        let out_plane = self.out_h * self.out_w;
        for (values, out) in values
            .chunks_exact(g.oh * g.ow)
            .zip(out.chunks_exact_mut(out_plane))
        {
            for u in u0..u1 {
                let oy = u * self.sh + phase.a - self.pt;
                let from = &values[u * g.ow + v0..u * g.ow + v1];
                let to = &mut out[oy * self.out_w..(oy + 1) * self.out_w];
                let ox0 = v0 * self.sw + phase.b - self.pl;
                // The first of every `sw` outputs (`step_by` measured slower).
                for (d, &v) in to[ox0..].chunks_mut(self.sw).zip(from) {
                    d[0] = v;
                }
            }
        }
    }

    /// The grid rows `u0..u1` and columns `v0..v1` of `phase` whose
    /// output, `(u · sh + a - pt, v · sw + b - pl)`, is inside the output.
    fn extent(&self, phase: &Phase) -> ((usize, usize), (usize, usize)) {
        let inside = |a: usize, s: usize, pad: usize, grid: usize, len: usize| {
            let first = pad.saturating_sub(a).div_ceil(s);
            let end = (len + pad).saturating_sub(a).div_ceil(s).min(grid);
            (first, end.max(first))
        };
        (
            inside(phase.a, self.sh, self.pt, self.base.oh, self.out_h),
            inside(phase.b, self.sw, self.pl, self.base.ow, self.out_w),
        )
    }
}

impl TypedOp for DirectDeconv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "DirectDeconv takes the image alone");
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.base;
        let taps: usize = self.phases.iter().map(|p| p.layout.taps.len()).sum();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (g.n * g.co * g.h * g.w * g.ci * taps).to_dim()
        )))
    }

    as_op!();
}

/// Replaces every transposed convolution [`DirectDeconv`] can run, with
/// the chain after it. Returns how many it replaced.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    // On x86-64 only (`Isa::detect`), unless this build has debug
    // assertions or `EDGEFLEET_DECONV=tract` (`lowering::enabled`).
    let Some(isa) = Isa::detect().filter(|_| lowering::enabled("EDGEFLEET_DECONV")) else {
        return Ok(0);
    };
    lower_with(model, isa, false)
}

/// With `every`, also the ones whose phases' blocks would be mostly
/// unused (`Layout::fills_blocks`): the tests compare those too.
fn lower_with(model: &mut TypedModel, isa: Isa, every: bool) -> TractResult<usize> {
    let mut found = Vec::new();
    for id in model.eval_order()? {
        if let Some((last, op)) =
            matched(model, id, isa)?.filter(|(_, op)| every || op.layout.fills_blocks(&op.base))
        {
            found.push(Replacement {
                first: id,
                input: 0,
                last,
                op,
            });
        }
    }
    lowering::replace(model, &found, "direct")
}

/// Node `id` as a [`DirectDeconv`]: the last node of the chain it takes
/// in, and the op.
fn matched(model: &TypedModel, id: usize, isa: Isa) -> TractResult<Option<(usize, DirectDeconv)>> {
    let node = &model.nodes[id];
    let Some(deconv) = node.op_as::<Deconv>() else {
        return Ok(None);
    };
    let spec = &deconv.pool_spec;
    let (ci, co) = (spec.input_channels, spec.output_channels);
    if deconv.kernel_format != KernelFormat::OIHW
        || spec.data_format.c_is_last()
        || spec.rank() != 2
        || deconv.group != 1
        || node.inputs.len() != 3
        || ci == 0
        || co == 0
        || spec.dilations().iter().any(|&d| d != 1)
        || !matches!(
            spec.padding,
            tract_nnef::tract_core::ops::cnn::PaddingSpec::Explicit(..)
                | tract_nnef::tract_core::ops::cnn::PaddingSpec::Valid
        )
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let output = model.outlet_fact(OutletId::new(id, 0))?;
    if facts
        .iter()
        .chain([&output])
        .any(|f| f.datum_type != f32::datum_type())
    {
        return Ok(None);
    }
    let (Some(shape), Some(kernel), Some(bias), Some(out_shape)) = (
        facts[0].shape.as_concrete(),
        facts[1].konst.as_ref(),
        facts[2].konst.as_ref(),
        output.shape.as_concrete(),
    ) else {
        return Ok(None);
    };
    let data = spec.data_format.shape(shape.to_vec())?;
    let hw = data.hw_dims();
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let (sh, sw) = (spec.stride(0), spec.stride(1));
    if *data.c() != ci
        || kernel.shape() != [co, ci, kh, kw]
        || !(bias.len() == 1 || bias.len() == co)
        || [hw[0], hw[1], kh, kw, sh, sw].contains(&0)
    {
        return Ok(None);
    }
    let padding = spec.padding.compute_for_deconv(
        hw,
        &spec.kernel_shape,
        &spec.dilations(),
        &spec.strides(),
        &deconv.adjustments,
    )?;
    let (out_h, out_w) = (padding[0].deconvoluted, padding[1].deconvoluted);
    let n = data.n().copied().unwrap_or(1);
    let (expected, channel_axis): (TVec<usize>, usize) = if spec.data_format.has_n() {
        (tvec!(n, co, out_h, out_w), 1)
    } else {
        (tvec!(co, out_h, out_w), 0)
    };
    if expected.as_slice() != out_shape || out_h == 0 || out_w == 0 {
        return Ok(None);
    }
    // The most taps of a phase along each axis: phase 0's.
    let (mh, mw) = (kh.div_ceil(sh), kw.div_ceil(sw));
    let base = Geometry {
        n,
        ci,
        co,
        h: hw[0],
        w: hw[1],
        oh: hw[0] + mh - 1,
        ow: hw[1] + mw - 1,
        kh: mh,
        kw: mw,
        sh: 1,
        sw: 1,
        dh: 1,
        dw: 1,
        ph: mh - 1,
        pw: mw - 1,
    };
    let layout = Layout::of(&base);
    let k = kernel.try_as_plain_ram()?.as_slice::<f32>()?;
    let mut phases = Vec::new();
    for a in 0..sh.min(kh) {
        for b in 0..sw.min(kw) {
            // Tap (m, n) of the phase is kernel (a + sh·m, b + sw·n), read
            // m rows and n columns before the output's grid position: base
            // tap (mh - 1 - m, mw - 1 - n).
            let taps: Vec<(usize, usize)> = (0..(kh - a).div_ceil(sh))
                .flat_map(|m| (0..(kw - b).div_ceil(sw)).map(move |n| (m, n)))
                .collect();
            let mut phase_layout = layout.clone();
            phase_layout.taps = taps
                .iter()
                .map(|&(m, n)| layout.taps[(mh - 1 - m) * mw + (mw - 1 - n)])
                .collect();
            let steps = ci * taps.len();
            let mut weights_p = vec![0f32; co.div_ceil(PACK) * steps * PACK];
            for o in 0..co {
                for i in 0..ci {
                    for (t, &(m, n)) in taps.iter().enumerate() {
                        let (ky, kx) = (a + sh * m, b + sw * n);
                        let step = i * taps.len() + t;
                        weights_p[(o / PACK * steps + step) * PACK + o % PACK] =
                            k[((o * ci + i) * kh + ky) * kw + kx];
                    }
                }
            }
            phases.push(Phase {
                a,
                b,
                layout: phase_layout,
                weights_p: Arc::new(Tensor::from_shape(
                    &[co.div_ceil(PACK), steps, PACK],
                    &weights_p,
                )?),
            });
        }
    }
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?;
    let bias = if bias.len() == 1 {
        vec![bias[0]; co]
    } else {
        bias.to_vec()
    };
    let (last, post, output_shape) = conv1x1::chain(model, id, out_shape, channel_axis, co)?;
    Ok(Some((
        last,
        DirectDeconv {
            base,
            layout,
            phases,
            bias: Arc::new(tensor1(&bias)),
            post,
            isa,
            out_h,
            out_w,
            sh,
            sw,
            pt: padding[0].pad_before,
            pl: padding[1].pad_before,
            output_shape,
            unreached: None,
        }
        .with_unreached()?,
    )))
}

#[cfg(test)]
mod tests {
    use tract_nnef::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_nnef::tract_core::ops::math;
    use tract_nnef::tract_core::ops::nn::DataFormat;

    use super::*;
    use crate::lowering::testing::compare_with_tract;
    use crate::test_rng::Lcg;

    #[derive(Clone, Debug)]
    struct Case {
        format: DataFormat,
        n: usize,
        ci: usize,
        co: usize,
        hw: [usize; 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        /// Before (top, left), after (bottom, right).
        padding: [usize; 4],
        adjustments: [usize; 2],
        bias_per_channel: bool,
        /// A ReLU after the transposed convolution.
        chain: bool,
    }

    fn deconv_model(case: &Case, rng: &mut Lcg) -> TractResult<(TypedModel, Tensor)> {
        let Case {
            n,
            ci,
            co,
            hw,
            kernel: k,
            padding: p,
            ..
        } = *case;
        let mut model = TypedModel::default();
        let shape: TVec<usize> = if case.format.has_n() {
            tvec!(n, ci, hw[0], hw[1])
        } else {
            tvec!(ci, hw[0], hw[1])
        };
        let x = model.add_source("x", f32::fact(&shape))?;
        let kernel = Tensor::from_shape(
            &[co, ci, k[0], k[1]],
            &rng.values(co * ci * k[0] * k[1], 4000.0),
        )?;
        let kernel = model.add_const("kernel", kernel)?;
        let bias = if case.bias_per_channel {
            tensor1(&rng.values(co, 1000.0))
        } else {
            tensor0(rng.values(1, 1000.0)[0])
        };
        let bias = model.add_const("bias", bias)?;
        let deconv = Deconv {
            pool_spec: PoolSpec {
                data_format: case.format,
                kernel_shape: tvec!(k[0], k[1]),
                padding: PaddingSpec::Explicit(tvec!(p[0], p[1]), tvec!(p[2], p[3])),
                dilations: None,
                strides: Some(tvec!(case.strides[0], case.strides[1])),
                input_channels: ci,
                output_channels: co,
            },
            kernel_format: KernelFormat::OIHW,
            adjustments: tvec!(case.adjustments[0], case.adjustments[1]),
            group: 1,
        };
        let mut y = model.wire_node("deconv", deconv, &[x, kernel, bias])?[0];
        if case.chain {
            let rank = shape.len();
            let zero = model.add_const("zero", tensor0(0f32).broadcast_into_rank(rank)?)?;
            y = model.wire_node("relu", math::max(), &[y, zero])?[0];
        }
        model.select_output_outlets(&[y])?;
        let input = Tensor::from_shape(&shape, &rng.values(shape.iter().product(), 1000.0))?;
        Ok((model, input))
    }

    /// tract's own optimized op and ours, on the same input.
    fn compare(case: &Case, rng: &mut Lcg) -> TractResult<()> {
        let (model, input) = deconv_model(case, rng)?;
        let lower = |m: &mut TypedModel, isa| lower_with(m, isa, true);
        let model = model.into_decluttered()?;
        compare_with_tract(case, &model, &input, lower, "DirectDeconv", &["Max"])
    }

    #[test]
    fn every_geometry_computes_what_tracts_deconvolution_computes() -> TractResult<()> {
        let mut rng = Lcg(9);
        let base = Case {
            format: DataFormat::NCHW,
            n: 1,
            ci: 16,
            co: 12,
            hw: [9, 21],
            kernel: [4, 4],
            strides: [2, 2],
            padding: [1, 1, 1, 1],
            adjustments: [0, 0],
            bias_per_channel: true,
            chain: true,
        };
        let mut cases = vec![
            base.clone(),
            // A decoder's 2x2 at stride 2: every output one tap.
            Case {
                kernel: [2, 2],
                padding: [0; 4],
                ..base.clone()
            },
            // A kernel smaller than the stride: phases without taps hold
            // the bias; an adjustment past the last input.
            Case {
                kernel: [1, 2],
                strides: [3, 3],
                padding: [0; 4],
                adjustments: [2, 1],
                ..base.clone()
            },
            // Stride 1, channels only, a batch of two, no chain.
            Case {
                kernel: [3, 3],
                strides: [1, 1],
                format: DataFormat::CHW,
                chain: false,
                bias_per_channel: false,
                ..base.clone()
            },
            Case {
                n: 2,
                co: 19,
                ..base.clone()
            },
        ];
        for _ in 0..50 {
            let kernel = [1 + rng.below(5), 1 + rng.below(5)];
            let strides = [1 + rng.below(3), 1 + rng.below(3)];
            let pad = |a: usize, rng: &mut Lcg| rng.below(kernel[a]);
            let padding = [
                pad(0, &mut rng),
                pad(1, &mut rng),
                pad(0, &mut rng),
                pad(1, &mut rng),
            ];
            cases.push(Case {
                format: if rng.below(4) == 0 {
                    DataFormat::CHW
                } else {
                    DataFormat::NCHW
                },
                n: 1 + rng.below(2),
                ci: 1 + rng.below(20),
                co: 1 + rng.below(20),
                hw: [1 + rng.below(10), 1 + rng.below(30)],
                kernel,
                strides,
                padding,
                adjustments: [rng.below(strides[0]), rng.below(strides[1])],
                bias_per_channel: rng.below(3) != 0,
                chain: rng.below(2) == 0,
            });
        }
        let mut compared = 0;
        for case in &cases {
            // The output must have a position at all.
            let out = |a: usize| {
                ((case.hw[a] - 1) * case.strides[a] + case.kernel[a] + case.adjustments[a])
                    .checked_sub(case.padding[a] + case.padding[a + 2])
            };
            if out(0).is_some_and(|v| v > 0) && out(1).is_some_and(|v| v > 0) {
                compare(case, &mut rng)?;
                compared += 1;
            }
        }
        assert!(compared >= 40, "{compared} cases had an output");
        Ok(())
    }

    #[test]
    fn only_undilated_ungrouped_f32_deconvolutions_are_lowered() -> TractResult<()> {
        let mut rng = Lcg(2);
        let base = Case {
            format: DataFormat::NCHW,
            n: 1,
            ci: 4,
            co: 6,
            hw: [5, 5],
            kernel: [3, 3],
            strides: [2, 2],
            padding: [0; 4],
            adjustments: [0, 0],
            bias_per_channel: true,
            chain: false,
        };
        let (model, _) = deconv_model(&base, &mut rng)?;
        assert_eq!(lower_with(&mut model.clone(), Isa::Baseline, false)?, 1);
        let node = model.node_id_by_name("deconv")?;
        let deconv = model.nodes[node].op_as::<Deconv>().unwrap().clone();
        for other in [
            Deconv {
                pool_spec: PoolSpec {
                    dilations: Some(tvec!(2, 1)),
                    ..deconv.pool_spec.clone()
                },
                ..deconv.clone()
            },
            Deconv {
                pool_spec: PoolSpec {
                    data_format: DataFormat::NHWC,
                    ..deconv.pool_spec.clone()
                },
                ..deconv.clone()
            },
            Deconv {
                group: 2,
                ..deconv.clone()
            },
        ] {
            let mut changed = model.clone();
            changed.nodes[node].op = Box::new(other.clone());
            assert!(
                matched(&changed, node, Isa::Baseline)?.is_none(),
                "{other:?}"
            );
        }
        let mut changed = model.clone();
        let w = changed.add_source("w", f32::fact([6, 4, 3, 3]))?;
        changed.nodes[node].inputs[1] = w;
        assert!(matched(&changed, node, Isa::Baseline)?.is_none());
        Ok(())
    }
}

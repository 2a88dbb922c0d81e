//! Depthwise convolutions on x86-64, in register blocks over a padded copy.
//!
//! tract 0.23.9 runs a depthwise convolution (`group` = input channels =
//! output channels) with its `DepthWise` op, which walks the kernel's zones
//! (`Patch`). On x86-64 the inner zone at width stride 1 goes to an AVX
//! kernel (eight lanes, a multiply then an add, no FMA: bit-identical to
//! its scalar loop by design); the border zones and any width stride of 2
//! or more run scalar loops. It was the second op of the per-op profiles
//! in docs/benchmarks.md (cls 0.41 of 1.9 ms, rec 4.6 of 25 ms).
//!
//! [`lower`] replaces such a convolution, before tract's codegen sees it,
//! with [`DepthwiseRows`]. Each channel's image is first copied into a
//! buffer zero-padded far enough for every tap of every output block and
//! split by the width stride (`Layout`), so that every tap of every
//! output reads a contiguous run, in bounds, with no edge cases. The output
//! is then computed in blocks of 16 columns by up to 8 rows, each block's
//! sums held in registers across all taps: AVX-512 (one register per row)
//! or AVX2 with FMA (two), chosen once at load from what the processor has,
//! with a portable loop for the rest. Results differ from tract's in the
//! last bits (fused multiply-adds); the tests compare the two on 122
//! geometries, and every model's golden self-test runs through it.
//!
//! The chain of per-channel or scalar `Mul`, `Add`, `Max` and `Min` by
//! constants after the convolution (`conv1x1::chain`: the `Clip(0, 6)` of
//! MobileNetV2, which declutter leaves as a `Max` and a `Min`) is taken in
//! when nothing else reads it, and applied to each block's sums in their
//! registers before the one store: tract ran it as its own pass over the
//! tensor (0.7 ms of MobileNetV2's 15, docs/architectures.md).
//!
//! Only f32 2-D convolutions with channels before the spatial axes (NCHW or
//! CHW, ONNX's layout) and an OIHW kernel are replaced; everything else
//! stays tract's. Other architectures keep tract's op, which has NEON
//! kernels on aarch64 (this one is not measured there).
//! Builds with debug assertions keep tract's op too (see `enabled`).
//! `EDGEFLEET_DEPTHWISE=tract` keeps tract's op on x86-64 too: the
//! benchmark's lever table compares the two.

use tract_nnef::internal::*;

use crate::conv1x1::{self, Post, PostFun};
use crate::threads::par_output;
use tract_nnef::tract_core::ops::cnn::{Conv, KernelFormat};

/// Where an output row's taps read, fixed at load: the model's shapes are.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    /// Batch (1 without an N axis), channels, input height and width.
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    /// Output height and width.
    oh: usize,
    ow: usize,
    /// Kernel, strides, dilations, padding before (top, left).
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    ph: usize,
    pw: usize,
}

/// Which compilation of the loops this processor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Isa {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest this processor has.
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2Fma;
            }
        }
        Isa::Baseline
    }
}

/// A depthwise f32 convolution (NCHW or CHW, OIHW kernel) in register
/// blocks. Inputs: the image, the kernel `[C, 1, KH, KW]` and the bias
/// (one value, or one per channel), as tract's `Conv` has them. Only
/// [`lower`] makes one: `isa` must be one this processor has.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DepthwiseRows {
    geometry: Geometry,
    /// Fixed by the geometry: built once, at load.
    layout: Layout,
    isa: Isa,
    /// The chain taken in after the convolution, in order.
    post: Vec<Post>,
    /// The output shape: the convolution's, or the chain's last node's
    /// (unit axes removed or added).
    output_shape: TVec<usize>,
}

impl Op for DepthwiseRows {
    fn name(&self) -> StaticName {
        "DepthwiseRows".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}x{} kernel, stride {}x{}, dilation {}x{}, pad {}x{}, {:?}, then [{}]",
            g.kh,
            g.kw,
            g.sh,
            g.sw,
            g.dh,
            g.dw,
            g.ph,
            g.pw,
            self.isa,
            Post::names(&self.post)
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        let (image, kernel, bias) = args_3!(inputs);
        let image = image.try_as_plain_ram()?.as_slice::<f32>()?;
        let kernel = kernel.try_as_plain_ram()?.as_slice::<f32>()?;
        let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(image.len() == g.n * g.c * g.h * g.w, "depthwise image size");
        ensure!(kernel.len() == g.c * g.kh * g.kw, "depthwise kernel size");
        ensure!(bias.len() == 1 || bias.len() == g.c, "depthwise bias size");
        let plane = g.oh * g.ow;
        ensure!(
            self.output_shape.iter().product::<usize>() == g.n * g.c * plane,
            "depthwise output size"
        );
        let layout = &self.layout;
        let post = Post::slices(&self.post)?;
        let taps = g.kh * g.kw;
        let work = g.n * g.c * plane * taps;
        let out = par_output(&self.output_shape, plane, work, |first, chunk| {
            // Zeroed once: `fill` writes the same positions for every
            // channel, so the padding stays zero.
            let mut padded = vec![0f32; layout.len];
            for (i, out) in chunk.chunks_mut(plane).enumerate() {
                let (ni, ci) = ((first + i) / g.c, (first + i) % g.c);
                let at = (ni * g.c + ci) * g.h * g.w;
                layout.fill(g, &image[at..at + g.h * g.w], &mut padded);
                let b = if bias.len() == 1 { bias[0] } else { bias[ci] };
                let kernel = &kernel[ci * taps..(ci + 1) * taps];
                let chain: TVec<(PostFun, f32)> = post
                    .iter()
                    .map(|&(fun, values)| (fun, values[ci]))
                    .collect();
                channel(self.isa, g, layout, &padded, kernel, b, &chain, out);
            }
            Ok(())
        })?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DepthwiseRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 3,
            "DepthwiseRows takes image, kernel and bias"
        );
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (g.n * g.c * g.oh * g.ow * g.kh * g.kw).to_dim()
        )))
    }

    as_op!();
}

/// Output values one block spans along the width. A block of several
/// output rows keeps its sums in registers over all the taps: enough
/// independent sums to hide the latency of a fused multiply-add.
const LANES: usize = 16;

/// A channel's image, zero-padded on every side far enough for every tap of
/// every output block and split by the width stride: phase `p` row `r`
/// holds padded row `r` at columns `j * sw + p`. A tap at width offset `t`
/// of output column `x` then reads phase `t % sw` at `x + t / sw`: a
/// contiguous run at any stride, always in bounds, so the block loops have
/// no edge cases.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Layout {
    phase_w: usize,
    phase_size: usize,
    padded_rows: usize,
    /// Values in all phases.
    len: usize,
    /// Offset of the next output row's inputs: `sh` padded rows.
    row_step: usize,
    /// Per tap, where output (0, 0) reads it.
    taps: Vec<usize>,
}

impl Layout {
    fn of(g: &Geometry) -> Layout {
        let blocks = g.ow.div_ceil(LANES);
        let padded_rows = (g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1;
        let phase_w = blocks * LANES + (g.kw - 1) * g.dw / g.sw;
        let phase_size = padded_rows * phase_w;
        let len = g.sw * phase_size;
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let t = kx * g.dw;
                taps.push((t % g.sw) * phase_size + ky * g.dh * phase_w + t / g.sw);
            }
        }
        // What the unchecked loads rely on: the last value of the last
        // block of the last row of every tap is inside the buffer.
        let last = (g.oh - 1) * g.sh * phase_w + (blocks - 1) * LANES + LANES - 1;
        assert!(taps.iter().all(|&at| at + last < len));
        Layout {
            phase_w,
            phase_size,
            padded_rows,
            len,
            row_step: g.sh * phase_w,
            taps,
        }
    }

    /// Copies one channel's image `[H, W]` into `padded` (`len` values).
    /// Writes the same positions for every channel: the rest stays as it
    /// was, zero.
    fn fill(&self, g: &Geometry, image: &[f32], padded: &mut [f32]) {
        for r in 0..self.padded_rows {
            let Some(y) = r.checked_sub(g.ph).filter(|&y| y < g.h) else {
                continue;
            };
            let row = &image[y * g.w..(y + 1) * g.w];
            for p in 0..g.sw {
                // Phase p's column j is image column j * sw + p - pw: the j
                // from `first` up to `end` are inside the image.
                let first = g.pw.saturating_sub(p).div_ceil(g.sw);
                let end = (g.w + g.pw)
                    .saturating_sub(p)
                    .div_ceil(g.sw)
                    .min(self.phase_w);
                if first >= end {
                    continue;
                }
                let dst = &mut padded[p * self.phase_size + r * self.phase_w..][first..end];
                let from = first * g.sw + p - g.pw;
                if g.sw == 1 {
                    dst.copy_from_slice(&row[from..from + dst.len()]);
                } else {
                    for (d, &v) in dst.iter_mut().zip(row[from..].iter().step_by(g.sw)) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// One channel's output `[OH, OW]` from its padded image, then `post`
/// (each step's function and this channel's constant), with the loops
/// compiled for `isa`.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn channel(
    isa: Isa,
    g: &Geometry,
    layout: &Layout,
    padded: &[f32],
    kernel: &[f32],
    bias: f32,
    post: &[(PostFun, f32)],
    out: &mut [f32],
) {
    assert!(out.len() == g.oh * g.ow && padded.len() == layout.len);
    assert_eq!(kernel.len(), layout.taps.len());
    match isa {
        Isa::Baseline => blocks(g, layout, padded, kernel, bias, post, out),
        // SAFETY: `Isa::detect` chose these only on a processor that has
        // the features they are compiled for; `Layout::of` checked every
        // read is inside a buffer of `len`, and `out` is `[OH, OW]`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::blocks_avx2(g, layout, padded, kernel, bias, post, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::blocks_avx512(g, layout, padded, kernel, bias, post, out) },
    }
}

/// The portable loops: the same blocks, in plain Rust.
fn blocks(
    g: &Geometry,
    l: &Layout,
    padded: &[f32],
    kernel: &[f32],
    bias: f32,
    post: &[(PostFun, f32)],
    out: &mut [f32],
) {
    for oy in 0..g.oh {
        for x0 in (0..g.ow).step_by(LANES) {
            let mut acc = [bias; LANES];
            for (&at, &k) in l.taps.iter().zip(kernel) {
                let at = at + oy * l.row_step + x0;
                for (a, &x) in acc.iter_mut().zip(&padded[at..at + LANES]) {
                    *a += k * x;
                }
            }
            for a in acc.iter_mut() {
                *a = post.iter().fold(*a, |v, &(fun, c)| fun.apply(v, c));
            }
            let width = LANES.min(g.ow - x0);
            out[oy * g.ow + x0..][..width].copy_from_slice(&acc[..width]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Geometry, LANES, Layout, PostFun};
    use crate::row_blocks::row_blocks;

    /// AVX-512: one register per output row of a block, blocks of eight
    /// rows (then four, two, one for the last rows).
    ///
    /// # Safety
    /// The processor has AVX-512F; every tap read of every block is inside
    /// a buffer of `l.len` (checked by `Layout::of`); `out` is `[OH, OW]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn blocks_avx512(
        g: &Geometry,
        l: &Layout,
        padded: &[f32],
        kernel: &[f32],
        bias: f32,
        post: &[(PostFun, f32)],
        out: &mut [f32],
    ) {
        for (oy, rows) in row_blocks(g.oh, 8) {
            for x0 in (0..g.ow).step_by(LANES) {
                // SAFETY: the function's contract.
                unsafe {
                    match rows {
                        8 => block512::<8>(g, l, padded, kernel, bias, post, oy, x0, out),
                        4 => block512::<4>(g, l, padded, kernel, bias, post, oy, x0, out),
                        2 => block512::<2>(g, l, padded, kernel, bias, post, oy, x0, out),
                        _ => block512::<1>(g, l, padded, kernel, bias, post, oy, x0, out),
                    }
                }
            }
        }
    }

    /// Output rows `oy..oy + R`, columns `x0..x0 + 16` (as far as the row
    /// goes), summed in registers over every tap.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block512<const R: usize>(
        g: &Geometry,
        l: &Layout,
        padded: &[f32],
        kernel: &[f32],
        bias: f32,
        post: &[(PostFun, f32)],
        oy: usize,
        x0: usize,
        out: &mut [f32],
    ) {
        let rs = l.row_step;
        let src = padded.as_ptr().wrapping_add(oy * rs + x0);
        let mut acc = [_mm512_set1_ps(bias); R];
        for (&at, &k) in l.taps.iter().zip(kernel) {
            let k = _mm512_set1_ps(k);
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's contract: in bounds.
                let x = unsafe { _mm512_loadu_ps(src.add(at + i * rs)) };
                *a = _mm512_fmadd_ps(x, k, *a);
            }
        }
        for &(fun, c) in post {
            let c = _mm512_set1_ps(c);
            for a in acc.iter_mut() {
                *a = match fun {
                    PostFun::Mul => _mm512_mul_ps(*a, c),
                    PostFun::Add => _mm512_add_ps(*a, c),
                    PostFun::Max => _mm512_max_ps(*a, c),
                    PostFun::Min => _mm512_min_ps(*a, c),
                };
            }
        }
        let width = LANES.min(g.ow - x0);
        let mask: __mmask16 = if width == LANES { !0 } else { (1 << width) - 1 };
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: the caller's contract: row oy + i < OH, x0 + width <= OW.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add((oy + i) * g.ow + x0), mask, *a) };
        }
    }

    /// AVX2 with FMA: two registers per output row of a block, blocks of
    /// four rows (then two, one).
    ///
    /// # Safety
    /// The processor has AVX2 and FMA; as [`blocks_avx512`] otherwise.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn blocks_avx2(
        g: &Geometry,
        l: &Layout,
        padded: &[f32],
        kernel: &[f32],
        bias: f32,
        post: &[(PostFun, f32)],
        out: &mut [f32],
    ) {
        for (oy, rows) in row_blocks(g.oh, 4) {
            for x0 in (0..g.ow).step_by(LANES) {
                // SAFETY: the function's contract.
                unsafe {
                    match rows {
                        4 => block256::<4>(g, l, padded, kernel, bias, post, oy, x0, out),
                        2 => block256::<2>(g, l, padded, kernel, bias, post, oy, x0, out),
                        _ => block256::<1>(g, l, padded, kernel, bias, post, oy, x0, out),
                    }
                }
            }
        }
    }

    /// [`block512`] with two 8-lane registers per row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block256<const R: usize>(
        g: &Geometry,
        l: &Layout,
        padded: &[f32],
        kernel: &[f32],
        bias: f32,
        post: &[(PostFun, f32)],
        oy: usize,
        x0: usize,
        out: &mut [f32],
    ) {
        let rs = l.row_step;
        let src = padded.as_ptr().wrapping_add(oy * rs + x0);
        let mut acc = [[_mm256_set1_ps(bias); 2]; R];
        for (&at, &k) in l.taps.iter().zip(kernel) {
            let k = _mm256_set1_ps(k);
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's contract: in bounds.
                let (x0, x1) = unsafe {
                    let s = src.add(at + i * rs);
                    (_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8)))
                };
                a[0] = _mm256_fmadd_ps(x0, k, a[0]);
                a[1] = _mm256_fmadd_ps(x1, k, a[1]);
            }
        }
        for &(fun, c) in post {
            let c = _mm256_set1_ps(c);
            for v in acc.iter_mut().flatten() {
                *v = match fun {
                    PostFun::Mul => _mm256_mul_ps(*v, c),
                    PostFun::Add => _mm256_add_ps(*v, c),
                    PostFun::Max => _mm256_max_ps(*v, c),
                    PostFun::Min => _mm256_min_ps(*v, c),
                };
            }
        }
        let width = LANES.min(g.ow - x0);
        let mut tmp = [0f32; LANES];
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: `tmp` holds 16; the caller's contract for `out`.
            unsafe {
                _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
            }
            out[(oy + i) * g.ow + x0..][..width].copy_from_slice(&tmp[..width]);
        }
    }
}

/// Replaces every depthwise convolution [`DepthwiseRows`] can run with it,
/// together with the chain after it (same inputs; its output replaces the
/// chain's). Returns how many it replaced.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    if !enabled() {
        return Ok(0);
    }
    lower_with(model, Isa::detect())
}

fn lower_with(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let mut found = Vec::new();
    for id in 0..model.nodes.len() {
        let Some(conv) = model.nodes[id].op_as::<Conv>() else {
            continue;
        };
        let Some(mut op) = rows_op(model, id, conv, isa)? else {
            continue;
        };
        let channel_axis = usize::from(conv.pool_spec.data_format.has_n());
        let (last, post, end_shape) =
            conv1x1::chain(model, id, &op.output_shape, channel_axis, op.geometry.c)?;
        (op.post, op.output_shape) = (post, end_shape);
        found.push((id, last, op));
    }
    for (id, last, op) in &found {
        if id == last {
            model.nodes[*id].op = Box::new(op.clone());
            continue;
        }
        // The chain's nodes become unreachable; codegen compacts them away.
        let mut patch = TypedModelPatch::default();
        let inputs = model.nodes[*id]
            .inputs
            .iter()
            .map(|&i| patch.tap_model(model, i))
            .collect::<TractResult<TVec<_>>>()?;
        let name = format!("{}.depthwise", model.nodes[*id].name);
        let y = patch.wire_node(name, op.clone(), &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(*last, 0), y)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// On x86-64, unless `EDGEFLEET_DEPTHWISE=tract`; not in builds with
/// debug assertions ([`crate::lowering::enabled`] says why).
fn enabled() -> bool {
    cfg!(target_arch = "x86_64") && crate::lowering::enabled("EDGEFLEET_DEPTHWISE")
}

/// The op for node `id`'s convolution, when it is one [`DepthwiseRows`]
/// runs.
fn rows_op(
    model: &TypedModel,
    id: usize,
    conv: &Conv,
    isa: Isa,
) -> TractResult<Option<DepthwiseRows>> {
    let node = &model.nodes[id];
    let spec = &conv.pool_spec;
    let c = spec.input_channels;
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format.c_is_last()
        || spec.rank() != 2
        || c < 2
        || conv.group != c
        || spec.output_channels != c
        || node.inputs.len() != 3
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
    let (Some(shape), Some(kernel), Some(out_shape)) = (
        facts[0].shape.as_concrete(),
        facts[1].shape.as_concrete(),
        output.shape.as_concrete(),
    ) else {
        return Ok(None);
    };
    let data = spec.data_format.shape(shape.to_vec())?;
    let hw = data.hw_dims();
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    if *data.c() != c
        || kernel != [c, 1, kh, kw]
        || !matches!(facts[2].shape.volume().to_usize(), Ok(v) if v == 1 || v == c)
    {
        return Ok(None);
    }
    let padding = spec.computed_padding(hw);
    let geometry = Geometry {
        n: data.n().copied().unwrap_or(1),
        c,
        h: hw[0],
        w: hw[1],
        oh: padding[0].convoluted,
        ow: padding[1].convoluted,
        kh,
        kw,
        sh: spec.stride(0),
        sw: spec.stride(1),
        dh: spec.dilation(0),
        dw: spec.dilation(1),
        ph: padding[0].pad_before,
        pw: padding[1].pad_before,
    };
    let expected: TVec<usize> = if spec.data_format.has_n() {
        tvec!(geometry.n, c, geometry.oh, geometry.ow)
    } else {
        tvec!(c, geometry.oh, geometry.ow)
    };
    if expected.as_slice() != out_shape || geometry.sh == 0 || geometry.sw == 0 {
        return Ok(None);
    }
    Ok(Some(DepthwiseRows {
        layout: Layout::of(&geometry),
        geometry,
        isa,
        post: Vec::new(),
        output_shape: expected,
    }))
}

#[cfg(test)]
mod tests {
    use tract_nnef::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_nnef::tract_core::ops::nn::DataFormat;

    use super::*;
    use crate::test_rng::Lcg;

    #[derive(Clone, Debug)]
    struct Case {
        format: DataFormat,
        n: usize,
        c: usize,
        hw: [usize; 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        padding: PaddingSpec,
        bias_per_channel: bool,
    }

    /// One `Conv` node over a source, with the kernel and bias as consts,
    /// decluttered as a load leaves it.
    fn conv_model(case: &Case, rng: &mut Lcg) -> TractResult<(TypedModel, Tensor)> {
        let Case {
            n,
            c,
            hw,
            kernel: k,
            ..
        } = *case;
        let mut model = TypedModel::default();
        let shape: TVec<usize> = if case.format.has_n() {
            tvec!(n, c, hw[0], hw[1])
        } else {
            tvec!(c, hw[0], hw[1])
        };
        let x = model.add_source("x", f32::fact(&shape))?;
        let kernel =
            tensor1(&rng.values(c * k[0] * k[1], 500.0)).into_shape(&[c, 1, k[0], k[1]])?;
        let kernel = model.add_const("kernel", kernel)?;
        let bias = if case.bias_per_channel {
            tensor1(&rng.values(c, 500.0))
        } else {
            tensor0(rng.values(1, 500.0)[0])
        };
        let bias = model.add_const("bias", bias)?;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: case.format,
                kernel_shape: tvec!(k[0], k[1]),
                padding: case.padding.clone(),
                dilations: Some(tvec!(case.dilations[0], case.dilations[1])),
                strides: Some(tvec!(case.strides[0], case.strides[1])),
                input_channels: c,
                output_channels: c,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: c,
            q_params: None,
        };
        let y = model.wire_node("conv", conv, &[x, kernel, bias])?;
        model.select_output_outlets(&y)?;
        let input = tensor1(&rng.values(shape.iter().product(), 500.0)).into_shape(&shape)?;
        Ok((model, input))
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_runnable()?;
        let out = plan.run(tvec!(input.clone().into_tvalue()))?;
        Ok(out[0].clone().into_tensor())
    }

    /// tract's own optimized convolution and ours, on the same input.
    fn compare(case: &Case, isa: Isa, rng: &mut Lcg) -> TractResult<()> {
        let (model, input) = conv_model(case, rng)?;
        let tracts = run(model.clone().into_optimized()?, &input)?;
        let mut ours = model;
        let node = ours.node_id_by_name("conv")?;
        let conv = ours.nodes[node].op_as::<Conv>().unwrap().clone();
        let mut op =
            rows_op(&ours, node, &conv, isa)?.with_context(|| format!("not lowered: {case:?}"))?;
        op.isa = isa;
        ours.nodes[node].op = Box::new(op);
        crate::optimizer::optimize(&mut ours)?;
        assert!(
            ours.nodes.iter().any(|n| n.op_is::<DepthwiseRows>()),
            "tract's codegen kept the op"
        );
        let ours = run(ours, &input)?;
        assert_eq!(ours.shape(), tracts.shape(), "{case:?}");
        let (a, b) = (
            ours.to_plain_array_view::<f32>()?,
            tracts.to_plain_array_view::<f32>()?,
        );
        for (i, (a, b)) in a.iter().zip(b.iter()).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{case:?} {isa:?}: element {i} is {a}, tract's {b}"
            );
        }
        Ok(())
    }

    fn isas() -> Vec<Isa> {
        // pushed to on x86 only
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut isas = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx2Fma);
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    #[test]
    fn every_geometry_computes_what_tracts_depthwise_computes() -> TractResult<()> {
        let mut rng = Lcg(7);
        let mut cases = vec![
            // MobileNet's: 3x3, stride 1 and 2, pad 1; 5x5 pad 2.
            Case {
                format: DataFormat::NCHW,
                n: 1,
                c: 8,
                hw: [16, 16],
                kernel: [3, 3],
                strides: [1, 1],
                dilations: [1, 1],
                padding: PaddingSpec::Explicit(tvec!(1, 1), tvec!(1, 1)),
                bias_per_channel: true,
            },
            // Wider than the image and a kernel taller than it.
            Case {
                format: DataFormat::CHW,
                n: 1,
                c: 3,
                hw: [2, 3],
                kernel: [5, 7],
                strides: [1, 2],
                dilations: [1, 1],
                padding: PaddingSpec::Explicit(tvec!(3, 4), tvec!(2, 5)),
                bias_per_channel: false,
            },
        ];
        let paddings = |rng: &mut Lcg| match rng.below(4) {
            0 => PaddingSpec::Valid,
            1 => PaddingSpec::SameUpper,
            2 => PaddingSpec::SameLower,
            _ => PaddingSpec::Explicit(
                tvec!(rng.below(4), rng.below(4)),
                tvec!(rng.below(4), rng.below(4)),
            ),
        };
        for _ in 0..120 {
            let kernel = [1 + rng.below(5), 1 + rng.below(5)];
            let dilations = [1 + rng.below(2), 1 + rng.below(3)];
            let reach = |a: usize| (kernel[a] - 1) * dilations[a] + 1;
            let hw = [reach(0) + rng.below(20), reach(1) + rng.below(40)];
            cases.push(Case {
                format: if rng.below(4) == 0 {
                    DataFormat::CHW
                } else {
                    DataFormat::NCHW
                },
                n: 1 + rng.below(2),
                c: 2 + rng.below(7),
                hw,
                kernel,
                strides: [1 + rng.below(3), 1 + rng.below(3)],
                dilations,
                padding: paddings(&mut rng),
                bias_per_channel: rng.below(3) != 0,
            });
        }
        for case in &cases {
            for &isa in &isas() {
                compare(case, isa, &mut rng)?;
            }
        }
        Ok(())
    }

    #[test]
    fn the_scale_and_clamp_after_it_run_in_the_same_op() -> TractResult<()> {
        use tract_nnef::tract_core::ops::math;

        use crate::conv1x1::Isa as Compiled;
        use crate::lowering::testing::compare_with_tract;

        let mut rng = Lcg(3);
        for (format, strides) in [(DataFormat::NCHW, [1, 1]), (DataFormat::CHW, [2, 2])] {
            let case = Case {
                format,
                n: 1,
                c: 6,
                hw: [9, 21],
                kernel: [3, 3],
                strides,
                dilations: [1, 1],
                padding: PaddingSpec::Explicit(tvec!(1, 1), tvec!(1, 1)),
                bias_per_channel: true,
            };
            let (mut model, input) = conv_model(&case, &mut rng)?;
            let conv = model.output_outlets()?[0];
            // A scale per channel, then ReLU6 as declutter leaves it: a
            // `Max` and a `Min` by scalars (the cap inside the values'
            // range, so that both ends clamp).
            let channel_shape: TVec<usize> = if format.has_n() {
                tvec!(1, case.c, 1, 1)
            } else {
                tvec!(case.c, 1, 1)
            };
            let rank = channel_shape.len();
            let scale = model.add_const(
                "scale",
                Tensor::from_shape(&channel_shape, &rng.values(case.c, 100.0))?,
            )?;
            let zero = model.add_const("zero", tensor0(0f32).broadcast_into_rank(rank)?)?;
            let cap = model.add_const("cap", tensor0(1f32).broadcast_into_rank(rank)?)?;
            let v = model.wire_node("scaled", math::mul(), &[conv, scale])?[0];
            let v = model.wire_node("relu", math::max(), &[v, zero])?[0];
            let v = model.wire_node("relu6", math::min(), &[v, cap])?[0];
            model.select_output_outlets(&[v])?;
            let lower = |model: &mut TypedModel, isa: Compiled| {
                let isa = match isa {
                    Compiled::Baseline => Isa::Baseline,
                    #[cfg(target_arch = "x86_64")]
                    Compiled::Avx2Fma => Isa::Avx2Fma,
                    #[cfg(target_arch = "x86_64")]
                    Compiled::Avx512 => Isa::Avx512,
                };
                lower_with(model, isa)
            };
            compare_with_tract(
                &case,
                &model,
                &input,
                lower,
                "DepthwiseRows",
                &["Mul", "Max", "Min"],
            )?;
        }
        Ok(())
    }

    #[test]
    fn only_depthwise_f32_convolutions_are_lowered() -> TractResult<()> {
        let mut rng = Lcg(1);
        let base = Case {
            format: DataFormat::NCHW,
            n: 1,
            c: 4,
            hw: [8, 8],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            padding: PaddingSpec::Valid,
            bias_per_channel: true,
        };
        let (mut model, _) = conv_model(&base, &mut rng)?;
        let node = model.node_id_by_name("conv")?;
        let conv = model.nodes[node].op_as::<Conv>().unwrap().clone();
        assert!(rows_op(&model, node, &conv, Isa::Baseline)?.is_some());
        // Channel-last, grouped but not depthwise, or another kernel layout:
        // tract's.
        for other in [
            Conv {
                pool_spec: PoolSpec {
                    data_format: DataFormat::NHWC,
                    ..conv.pool_spec.clone()
                },
                ..conv.clone()
            },
            Conv {
                group: 2,
                ..conv.clone()
            },
            Conv {
                kernel_fmt: KernelFormat::HWIO,
                ..conv.clone()
            },
        ] {
            model.nodes[node].op = Box::new(other.clone());
            assert!(
                rows_op(&model, node, &other, Isa::Baseline)?.is_none(),
                "{other:?}"
            );
        }
        Ok(())
    }
}

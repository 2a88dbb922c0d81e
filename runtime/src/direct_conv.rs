//! Dense convolutions with a kernel wider than one value, or a stride, on
//! x86-64: computed directly in register blocks, with the bias and the
//! per-channel chain after them, in one pass.
//!
//! tract 0.23.9 runs such a convolution (`group` 1: every output channel
//! reads every input channel) as a matrix product over an im2col view of
//! the image (`LazyIm2col` feeding `OptMatMul`, or an `Im2Col` copy), or,
//! for a few input channels, as `DirectSpatialConv`. Measured per op on a
//! decoder of four 3×3 convolutions and two transposed ones (2026-12-07,
//! this machine, one thread): its products ran at about 40 G
//! multiply-adds a second where ONNX Runtime's convolutions ran at 80,
//! and `DirectSpatialConv` (three input channels) at 15.
//!
//! [`lower`] replaces such a `Conv`, before codegen, with [`DirectConv`].
//! Each input channel is copied once per inference into zero-padded
//! planes split by the strides (`Layout`): a tap then reads a contiguous
//! run of one plane for a run of outputs, across output rows too, since
//! the output is computed on the planes' width (the last columns of each
//! row are discarded). A block of output channels by 32 positions
//! (AVX-512: eight channels, two registers; AVX2 with FMA: four channels
//! by 24) keeps its sums in registers over every input channel and tap,
//! the weights stored at load so that the channels a block needs are
//! adjacent; the bias starts the sums and the chain runs on the registers
//! before the store. Results differ from tract's in the last bits
//! (another summation order, fused multiply-adds); the tests compare the
//! two on many geometries, and every model's golden self-test runs
//! through it.
//!
//! Only f32 2-D convolutions with channels before the spatial axes (NCHW
//! or CHW) and a constant OIHW kernel and bias; only on processors with
//! AVX2 and FMA or AVX-512; only in builds without debug assertions (see
//! `depthwise::enabled`); not with `EDGEFLEET_CONV=tract`, which the
//! benchmark's lever table uses to compare the two. Grouped convolutions
//! stay tract's (depthwise ones are [`crate::depthwise`]'s), and ARM keeps
//! tract's NEON products.

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::cnn::{Conv, KernelFormat};

use crate::conv1x1::{self, Isa, Post, PostFun};
use crate::lowering::{self, Replacement};
use crate::row_blocks::row_blocks;
use crate::threads::par_output;

/// Positions one vector block spans at most: the planes carry this many
/// values past their end so that a block's loads, whose last lanes may be
/// discarded, stay inside the buffer.
const SLACK: usize = 32;

/// Output channels whose weights are stored together: the widest block.
pub(crate) const PACK: usize = 8;

/// The convolution's shapes, fixed at load.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Geometry {
    /// Batch (1 without an N axis), input and output channels, input
    /// height and width.
    pub(crate) n: usize,
    pub(crate) ci: usize,
    pub(crate) co: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// Output height and width.
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// Kernel, strides, dilations, padding before (top, left).
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) sh: usize,
    pub(crate) sw: usize,
    pub(crate) dh: usize,
    pub(crate) dw: usize,
    pub(crate) ph: usize,
    pub(crate) pw: usize,
}

/// How an input channel is laid out for the taps. The zero-padded image
/// is split into `sh · sw` planes by the strides: plane `(py, px)` row `r`
/// column `c` holds padded row `r · sh + py`, column `c · sw + px`. Output
/// `(y, x)` reads tap `(ky, kx)` (at padded `(y · sh + ky · dh, x · sw +
/// kx · dw)`) in one plane at `(y + ky · dh / sh, x + kx · dw / sw)`: for
/// every output the same offset from `y · plane_w + x`. So the output is
/// computed at the `oh · plane_w` positions `y · plane_w + x`, in runs
/// that cross rows, and the `plane_w - ow` positions past each row's end
/// are discarded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Layout {
    pub(crate) plane_w: usize,
    /// Rows of every plane: the ones the taps read, and one more for the
    /// discarded positions of the last row.
    pub(crate) plane_h: usize,
    pub(crate) plane_size: usize,
    /// Values of one input channel's planes.
    pub(crate) channel: usize,
    /// Positions computed per output channel: `oh · plane_w`.
    pub(crate) flat: usize,
    /// Per tap, in the kernel's order, where position 0 reads it.
    pub(crate) taps: Vec<usize>,
    /// Whether the vector loops walk each output row in blocks (the last
    /// one partly used) rather than runs of positions across rows (whose
    /// discarded positions are computed too): whichever computes fewer
    /// positions for 32-position blocks; rows on a tie, as their blocks
    /// are stored directly.
    pub(crate) by_rows: bool,
}

impl Layout {
    pub(crate) fn of(g: &Geometry) -> Layout {
        let plane_w = g.ow + (g.kw - 1) * g.dw / g.sw;
        let plane_h = g.oh + (g.kh - 1) * g.dh / g.sh + 1;
        let plane_size = plane_w * plane_h;
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let (ty, tx) = (ky * g.dh, kx * g.dw);
                let phase = (ty % g.sh) * g.sw + tx % g.sw;
                taps.push(phase * plane_size + ty / g.sh * plane_w + tx / g.sw);
            }
        }
        let flat = g.oh * plane_w;
        let layout = Layout {
            plane_w,
            plane_h,
            plane_size,
            channel: g.sh * g.sw * plane_size,
            flat,
            taps,
            by_rows: g.oh * g.ow.div_ceil(SLACK) <= flat.div_ceil(SLACK),
        };
        // What the unchecked loads rely on: every position of every tap is
        // inside the channel's planes, so a block that runs up to SLACK
        // positions past `flat` stays inside the buffer (`len`).
        assert!(
            layout
                .taps
                .iter()
                .all(|&at| at + layout.flat <= layout.channel)
        );
        layout
    }

    /// Whether at least 40 % of the positions the blocks compute are
    /// outputs. Below that, on outputs of a few positions with many
    /// channels, tract's products are faster (hand-timed, 512 → 512
    /// channels, 3×3: a 1 × 1 output 0.93 against 0.40 ms; 256 channels at
    /// 5 × 5, 25 of 64, 0.46 against 0.38; at 7 × 7, 49 of 64, 1.64 against
    /// 3.85).
    pub(crate) fn fills_blocks(&self, g: &Geometry) -> bool {
        let computed = if self.by_rows {
            g.oh * g.ow.div_ceil(SLACK) * SLACK
        } else {
            self.flat.div_ceil(SLACK) * SLACK
        };
        5 * g.oh * g.ow >= 2 * computed
    }

    /// Values of the buffer for `images` channels.
    fn len(&self, images: usize) -> usize {
        images * self.channel + SLACK
    }

    /// Copies one channel's image `[H, W]` into its planes (`channel`
    /// values, zero where the padding is).
    fn fill(&self, g: &Geometry, image: &[f32], planes: &mut [f32]) {
        for py in 0..g.sh {
            for r in 0..self.plane_h {
                let Some(y) = (r * g.sh + py).checked_sub(g.ph).filter(|&y| y < g.h) else {
                    continue;
                };
                let row = &image[y * g.w..(y + 1) * g.w];
                for px in 0..g.sw {
                    // Plane column c is image column c * sw + px - pw: the c
                    // from `first` up to `end` are inside the image.
                    let first = g.pw.saturating_sub(px).div_ceil(g.sw);
                    let end = (g.w + g.pw)
                        .saturating_sub(px)
                        .div_ceil(g.sw)
                        .min(self.plane_w);
                    if first >= end {
                        continue;
                    }
                    let at = (py * g.sw + px) * self.plane_size + r * self.plane_w;
                    let dst = &mut planes[at..][first..end];
                    let from = first * g.sw + px - g.pw;
                    let src = &row[from..];
                    if g.sw == 1 {
                        dst.copy_from_slice(&src[..dst.len()]);
                    } else {
                        // Whole strides, then at most the row's last value
                        // (`step_by` measured several times slower).
                        let strides = src.chunks_exact(g.sw);
                        let whole = strides.len().min(dst.len());
                        for (d, s) in dst[..whole].iter_mut().zip(strides) {
                            *d = s[0];
                        }
                        if let Some(d) = dst.get_mut(whole) {
                            *d = src[whole * g.sw];
                        }
                    }
                }
            }
        }
    }
}

/// `out[o] = post(bias[o] + Σ_i,ky,kx w[o, i, ky, kx] · x[i] at the tap)`
/// over an f32 image `[N, I, H, W]` or `[I, H, W]`. The weights, the bias
/// and the chain's constants are part of the op. Only [`lower`] makes
/// one with a vector `isa`, and only on a processor that has it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DirectConv {
    geometry: Geometry,
    layout: Layout,
    /// The weights by runs of [`PACK`] output channels (the last run
    /// padded with zeros): `[⌈O / PACK⌉, I · KH · KW, PACK]`, so that a
    /// block's weights for one tap are adjacent, and its taps in order.
    weights_p: Arc<Tensor>,
    bias: Arc<Tensor>,
    post: Vec<Post>,
    isa: Isa,
    output_shape: TVec<usize>,
}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "DirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}→{} channels, {}x{} kernel, strides {}x{}, dilations {}x{}, then [{}], {:?}",
            g.ci,
            g.co,
            g.kh,
            g.kw,
            g.sh,
            g.sw,
            g.dh,
            g.dw,
            Post::names(&self.post),
            self.isa
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (g, l) = (&self.geometry, &self.layout);
        let x = args_1!(inputs);
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let image = g.h * g.w;
        ensure!(x.len() == g.n * g.ci * image, "DirectConv image size");
        let plane = g.oh * g.ow;
        ensure!(
            self.output_shape.iter().product::<usize>() == g.n * g.co * plane,
            "DirectConv output size"
        );
        with_planes(g, l, x, |planes| self.eval_with(planes)).map(|out| tvec!(out.into_tvalue()))
    }
}

impl DirectConv {
    /// The output, from the images' planes.
    fn eval_with(&self, planes: &[f32]) -> TractResult<Tensor> {
        let (g, l) = (&self.geometry, &self.layout);
        let plane = g.oh * g.ow;
        let w = self.weights_p.try_as_plain_ram()?.as_slice::<f32>()?;
        let bias = self.bias.try_as_plain_ram()?.as_slice::<f32>()?;
        let post = Post::slices(&self.post)?;
        let work = g.n * g.co * l.flat * g.ci * l.taps.len();
        par_output(&self.output_shape, plane, work, |first, chunk| {
            let (mut row, mut rest) = (first, chunk);
            while !rest.is_empty() {
                // The rows of one image.
                let (ni, o) = (row / g.co, row % g.co);
                let count = (g.co - o).min(rest.len() / plane);
                let (these, next) = rest.split_at_mut(count * plane);
                let problem = Problem {
                    g,
                    l,
                    planes: &planes[ni * g.ci * l.channel..],
                    w,
                    bias,
                    post: &post,
                };
                channels(self.isa, &problem, o, these);
                (row, rest) = (row + count, next);
            }
            Ok(())
        })
    }
}

thread_local! {
    static PLANES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on the planes of every channel of the images `x` (`len(n ·
/// ci)` values). The buffer is the one the last convolution on this
/// thread used: a new one of a megabyte or more each time comes from
/// `mmap` and faults in every page (a quarter of the op's time, measured
/// with `perf`). Taken, not borrowed: a nested eval on this thread (the
/// compute pool's work stealing) finds it empty and allocates.
pub(crate) fn with_planes<R>(
    g: &Geometry,
    l: &Layout,
    x: &[f32],
    f: impl FnOnce(&[f32]) -> TractResult<R>,
) -> TractResult<R> {
    let mut planes = PLANES.take();
    planes.clear();
    planes.resize(l.len(g.n * g.ci), 0.0);
    for (image, planes) in x
        .chunks_exact(g.h * g.w)
        .zip(planes.chunks_exact_mut(l.channel))
    {
        l.fill(g, image, planes);
    }
    let result = f(&planes);
    PLANES.set(planes);
    result
}

impl TypedOp for DirectConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "DirectConv takes the image alone");
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (g.n * g.co * g.oh * g.ow * g.ci * g.kh * g.kw).to_dim()
        )))
    }

    as_op!();
}

/// One image's convolution: `planes` from the image's first channel (and
/// at least `len(ci)` values on), `w` is packed as `weights_p`, `bias`
/// and every `post` slice have `co` values.
pub(crate) struct Problem<'a> {
    pub(crate) g: &'a Geometry,
    pub(crate) l: &'a Layout,
    pub(crate) planes: &'a [f32],
    pub(crate) w: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) post: &'a [(PostFun, &'a [f32])],
}

impl Problem<'_> {
    /// Output channel `o` at position `j` (`y · plane_w + x`), one
    /// multiply-add at a time in the vector loops' order: the portable
    /// loops.
    fn value(&self, o: usize, j: usize) -> f32 {
        let taps = &self.l.taps;
        let w = self.weights(o);
        let mut acc = self.bias[o];
        for i in 0..self.g.ci {
            let x = &self.planes[i * self.l.channel + j..];
            for (t, &at) in taps.iter().enumerate() {
                acc = x[at].mul_add(w[(i * taps.len() + t) * PACK], acc);
            }
        }
        for &(fun, values) in self.post {
            acc = fun.apply(acc, values[o]);
        }
        acc
    }

    /// Output channel `o`'s weights: tap `(i, t)` at `(i · taps + t) ·
    /// PACK`, the next channels of its run right after it.
    fn weights(&self, o: usize) -> &[f32] {
        let steps = self.g.ci * self.l.taps.len();
        &self.w[(o / PACK * steps) * PACK + o % PACK..]
    }

    /// Writes the values of positions `j..j + values.len()` of one output
    /// channel `[OH, OW]`, skipping the discarded ones.
    fn store(&self, j: usize, values: &[f32], out: &mut [f32]) {
        let (pw, ow) = (self.l.plane_w, self.g.ow);
        let end = (j + values.len()).min(self.l.flat);
        let mut at = j;
        while at < end {
            let (y, x) = (at / pw, at % pw);
            let row_end = ((y + 1) * pw).min(end);
            if x < ow {
                let n = (ow - x).min(row_end - at);
                out[y * ow + x..][..n].copy_from_slice(&values[at - j..][..n]);
            }
            at = row_end;
        }
    }
}

/// Output channels `o..` of one image into `out` (whole channels), with
/// the loops compiled for `isa`.
#[allow(unsafe_code)]
pub(crate) fn channels(isa: Isa, p: &Problem, o: usize, out: &mut [f32]) {
    let (g, l) = (p.g, p.l);
    let plane = g.oh * g.ow;
    let count = out.len() / plane;
    assert!(o + count <= g.co && out.len() == count * plane);
    assert!(p.w.len() == g.co.div_ceil(PACK) * g.ci * l.taps.len() * PACK);
    assert!(p.bias.len() == g.co);
    assert!(p.planes.len() >= l.len(g.ci));
    assert!(p.post.iter().all(|(_, v)| v.len() == g.co));
    match isa {
        Isa::Baseline => {
            let mut values = [0f32; SLACK];
            for (r, out) in out.chunks_mut(plane).enumerate() {
                for j in (0..l.flat).step_by(SLACK) {
                    for (lane, v) in values.iter_mut().enumerate() {
                        *v = p.value(o + r, j + lane);
                    }
                    p.store(j, &values, out);
                }
            }
        }
        // SAFETY: `Isa::detect` chose it only on a processor with AVX2 and
        // FMA (the tests only where `is_x86_feature_detected!` says so);
        // the sizes were checked above, and `Layout::of` that every load
        // of a block is inside `len`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::channels_avx2(p, o, out) },
        // SAFETY: as above, with AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::channels_avx512(p, o, out) },
    }
}

/// Blocks of at most `widest` (a power of two, at most [`PACK`]) of
/// `count` output channels from channel `o`, none across a run of
/// [`PACK`]: `(first, channels)` relative to `o`, in order.
// Only the x86-64 kernels have register blocks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn runs(o: usize, count: usize, widest: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut first = 0;
    std::iter::from_fn(move || {
        (first < count).then(|| {
            let run = (PACK - (o + first) % PACK).min(count - first);
            let at = first;
            first += run;
            row_blocks(run, widest).map(move |(r, rows)| (at + r, rows))
        })
    })
    .flatten()
}

/// A block of output positions: `width` from position `j`; `to`, where
/// they go in an output channel when they are all in one row.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Block {
    j: usize,
    width: usize,
    to: Option<usize>,
}

/// Calls `each(block, first, channels)` for every block of `wide`
/// positions and every block of at most `widest` of the `count` output
/// channels from `o` ([`runs`]; `first` relative to `o`): positions along
/// each output row or across rows, as the layout says; the positions in
/// the outer loop when the weights of all `count` channels stay in the
/// first-level cache, else the channels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn walk(
    p: &Problem,
    o: usize,
    count: usize,
    wide: usize,
    widest: usize,
    mut each: impl FnMut(Block, usize, usize),
) {
    let (g, l) = (p.g, p.l);
    let positions = || -> Box<dyn Iterator<Item = Block>> {
        if l.by_rows {
            Box::new((0..g.oh).flat_map(move |y| {
                (0..g.ow).step_by(wide).map(move |x| Block {
                    j: y * l.plane_w + x,
                    width: wide.min(g.ow - x),
                    to: Some(y * g.ow + x),
                })
            }))
        } else {
            Box::new((0..l.flat).step_by(wide).map(move |j| Block {
                j,
                width: wide.min(l.flat - j),
                to: None,
            }))
        }
    };
    let weights = count * g.ci * l.taps.len() * std::mem::size_of::<f32>();
    if weights <= 32 << 10 {
        for at in positions() {
            for (r, rows) in runs(o, count, widest) {
                each(at, r, rows);
            }
        }
    } else {
        for (r, rows) in runs(o, count, widest) {
            for at in positions() {
                each(at, r, rows);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, PACK, PostFun, Problem, SLACK};

    /// # Safety
    /// The processor has AVX2 and FMA; [`super::channels`]' checks hold.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn channels_avx2(p: &Problem, o: usize, out: &mut [f32]) {
        let plane = p.g.oh * p.g.ow;
        let count = out.len() / plane;
        super::walk(p, o, count, WIDE, 4, |at, r, rows| {
            let out = &mut out[r * plane..(r + rows) * plane];
            // SAFETY: the function's contract, for channels o + r.. + rows;
            // `walk` gives blocks whose loads end by flat + SLACK.
            unsafe {
                match rows {
                    4 => at256::<4>(p, o + r, at, out),
                    2 => at256::<2>(p, o + r, at, out),
                    _ => at256::<1>(p, o + r, at, out),
                }
            }
        });
    }

    /// Positions an AVX2 block spans: three registers of eight.
    const WIDE: usize = 24;

    /// Output channels `o..o + R` (`out`: `R` channels) at the block `at`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn at256<const R: usize>(p: &Problem, o: usize, at: Block, out: &mut [f32]) {
        let plane = p.g.oh * p.g.ow;
        // SAFETY: the caller's contract.
        let acc = unsafe { sums256::<R>(p, o, at.j) };
        match at.to {
            Some(to) if at.width == WIDE => {
                for (r, a) in acc.iter().enumerate() {
                    for (c, &v) in a.iter().enumerate() {
                        // SAFETY: 8 values inside one output row.
                        unsafe {
                            _mm256_storeu_ps(out.as_mut_ptr().add(r * plane + to + 8 * c), v)
                        };
                    }
                }
            }
            _ => {
                let mut values = [0f32; WIDE];
                for (r, a) in acc.iter().enumerate() {
                    for (c, &v) in a.iter().enumerate() {
                        // SAFETY: 8 values inside `values`.
                        unsafe { _mm256_storeu_ps(values.as_mut_ptr().add(8 * c), v) };
                    }
                    p.store(
                        at.j,
                        &values[..at.width],
                        &mut out[r * plane..(r + 1) * plane],
                    );
                }
            }
        }
    }

    /// Output channels `o..o + R` at positions `j..j + 24`, summed over
    /// every input channel and tap, with the chain applied.
    ///
    /// # Safety
    /// As [`channels_avx2`], and `j + 24 <= flat + SLACK`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sums256<const R: usize>(p: &Problem, o: usize, j: usize) -> [[__m256; 3]; R] {
        let (g, l) = (p.g, p.l);
        let k = l.taps.len();
        let w = p.weights(o);
        let mut acc: [[__m256; 3]; R] = std::array::from_fn(|r| [_mm256_set1_ps(p.bias[o + r]); 3]);
        for i in 0..g.ci {
            // SAFETY: `Layout::of` checked that every tap of positions up
            // to flat + SLACK is inside the buffer from channel i; `w`
            // holds PACK weights per step, o + R inside the run.
            unsafe {
                let x = p.planes.as_ptr().add(i * l.channel + j);
                let w = w.as_ptr().add(i * k * PACK);
                for (t, &at) in l.taps.iter().enumerate() {
                    let s = x.add(at);
                    let xs = [
                        _mm256_loadu_ps(s),
                        _mm256_loadu_ps(s.add(8)),
                        _mm256_loadu_ps(s.add(16)),
                    ];
                    let w = w.add(t * PACK);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm256_broadcast_ss(&*w.add(r));
                        for (a, &xv) in a.iter_mut().zip(&xs) {
                            *a = _mm256_fmadd_ps(xv, b, *a);
                        }
                    }
                }
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            for &(fun, c) in p.post {
                let c = _mm256_set1_ps(c[o + r]);
                for v in a.iter_mut() {
                    *v = match fun {
                        PostFun::Mul => _mm256_mul_ps(*v, c),
                        PostFun::Add => _mm256_add_ps(*v, c),
                        PostFun::Max => _mm256_max_ps(*v, c),
                        PostFun::Min => _mm256_min_ps(*v, c),
                    };
                }
            }
        }
        acc
    }

    /// # Safety
    /// The processor has AVX-512F; [`super::channels`]' checks hold.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn channels_avx512(p: &Problem, o: usize, out: &mut [f32]) {
        let plane = p.g.oh * p.g.ow;
        let count = out.len() / plane;
        super::walk(p, o, count, SLACK, 8, |at, r, rows| {
            let out = &mut out[r * plane..(r + rows) * plane];
            // SAFETY: as in `channels_avx2`.
            unsafe {
                match rows {
                    8 => at512::<8>(p, o + r, at, out),
                    4 => at512::<4>(p, o + r, at, out),
                    2 => at512::<2>(p, o + r, at, out),
                    _ => at512::<1>(p, o + r, at, out),
                }
            }
        });
    }

    /// Output channels `o..o + R` (`out`: `R` channels) at the block `at`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn at512<const R: usize>(p: &Problem, o: usize, at: Block, out: &mut [f32]) {
        let plane = p.g.oh * p.g.ow;
        // SAFETY: the caller's contract.
        let acc = unsafe { sums512::<R>(p, o, at.j) };
        match at.to {
            Some(to) => {
                let masks: [__mmask16; 2] = std::array::from_fn(|c| {
                    let n = at.width.saturating_sub(16 * c).min(16);
                    ((1u32 << n) - 1) as __mmask16
                });
                for (r, a) in acc.iter().enumerate() {
                    for (c, &v) in a.iter().enumerate() {
                        // SAFETY: the masked values are inside one output row.
                        unsafe {
                            _mm512_mask_storeu_ps(
                                out.as_mut_ptr().add(r * plane + to + 16 * c),
                                masks[c],
                                v,
                            )
                        };
                    }
                }
            }
            None => {
                let mut values = [0f32; SLACK];
                for (r, a) in acc.iter().enumerate() {
                    for (c, &v) in a.iter().enumerate() {
                        // SAFETY: 16 values inside `values`.
                        unsafe { _mm512_storeu_ps(values.as_mut_ptr().add(16 * c), v) };
                    }
                    p.store(
                        at.j,
                        &values[..at.width],
                        &mut out[r * plane..(r + 1) * plane],
                    );
                }
            }
        }
    }

    /// Output channels `o..o + R` at positions `j..j + 32`, summed over
    /// every input channel and tap, with the chain applied.
    ///
    /// # Safety
    /// As [`channels_avx512`], and `j + 32 <= flat + SLACK`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sums512<const R: usize>(p: &Problem, o: usize, j: usize) -> [[__m512; 2]; R] {
        let (g, l) = (p.g, p.l);
        let k = l.taps.len();
        let w = p.weights(o);
        let mut acc: [[__m512; 2]; R] = std::array::from_fn(|r| [_mm512_set1_ps(p.bias[o + r]); 2]);
        for i in 0..g.ci {
            // SAFETY: as in `sums256`, for 32 positions.
            unsafe {
                let x = p.planes.as_ptr().add(i * l.channel + j);
                let w = w.as_ptr().add(i * k * PACK);
                for (t, &at) in l.taps.iter().enumerate() {
                    let s = x.add(at);
                    let xs = [_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16))];
                    let w = w.add(t * PACK);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*w.add(r));
                        for (a, &xv) in a.iter_mut().zip(&xs) {
                            *a = _mm512_fmadd_ps(xv, b, *a);
                        }
                    }
                }
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            for &(fun, c) in p.post {
                let c = _mm512_set1_ps(c[o + r]);
                for v in a.iter_mut() {
                    *v = match fun {
                        PostFun::Mul => _mm512_mul_ps(*v, c),
                        PostFun::Add => _mm512_add_ps(*v, c),
                        PostFun::Max => _mm512_max_ps(*v, c),
                        PostFun::Min => _mm512_min_ps(*v, c),
                    };
                }
            }
        }
        acc
    }
}

/// Replaces every convolution [`DirectConv`] can run, with the chain
/// after it. Returns how many it replaced.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    // On x86-64 only (`Isa::detect`), unless this build has debug
    // assertions or `EDGEFLEET_CONV=tract` (`lowering::enabled`).
    let Some(isa) = Isa::detect().filter(|_| lowering::enabled("EDGEFLEET_CONV")) else {
        return Ok(0);
    };
    lower_with(model, isa, false)
}

/// With `every`, also the convolutions whose blocks tract's products
/// would beat (`Layout::fills_blocks`): the tests compare those too.
fn lower_with(model: &mut TypedModel, isa: Isa, every: bool) -> TractResult<usize> {
    let mut found = Vec::new();
    for id in model.eval_order()? {
        if let Some((last, op)) =
            matched(model, id, isa)?.filter(|(_, op)| every || op.layout.fills_blocks(&op.geometry))
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

/// Node `id` as a [`DirectConv`]: the last node of the chain it takes in,
/// and the op.
fn matched(model: &TypedModel, id: usize, isa: Isa) -> TractResult<Option<(usize, DirectConv)>> {
    let node = &model.nodes[id];
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let (ci, co) = (spec.input_channels, spec.output_channels);
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format.c_is_last()
        || spec.rank() != 2
        || conv.group != 1
        || node.inputs.len() != 3
        || ci == 0
        || co == 0
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
    if *data.c() != ci
        || kernel.shape() != [co, ci, kh, kw]
        || !(bias.len() == 1 || bias.len() == co)
    {
        return Ok(None);
    }
    let padding = spec.computed_padding(hw);
    let geometry = Geometry {
        n: data.n().copied().unwrap_or(1),
        ci,
        co,
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
    let g = &geometry;
    let (expected, channel_axis): (TVec<usize>, usize) = if spec.data_format.has_n() {
        (tvec!(g.n, co, g.oh, g.ow), 1)
    } else {
        (tvec!(co, g.oh, g.ow), 0)
    };
    if expected.as_slice() != out_shape
        || [g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.oh, g.ow].contains(&0)
    {
        return Ok(None);
    }
    let k = kernel.try_as_plain_ram()?.as_slice::<f32>()?;
    let steps = ci * kh * kw;
    // Packed in place (the weights of a large model are tens of
    // megabytes: no second copy), a block of PACK channels at a time.
    let mut weights_p = Tensor::zero::<f32>(&[co.div_ceil(PACK), steps, PACK])?;
    {
        let mut view = weights_p.try_as_plain_ram_mut()?;
        let packed = view.as_slice_mut::<f32>()?;
        for (filters, block) in k
            .chunks(steps * PACK)
            .zip(packed.chunks_exact_mut(steps * PACK))
        {
            for (lane, filter) in filters.chunks_exact(steps).enumerate() {
                for (step, &v) in filter.iter().enumerate() {
                    block[step * PACK + lane] = v;
                }
            }
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
        DirectConv {
            layout: Layout::of(g),
            geometry,
            weights_p: Arc::new(weights_p),
            bias: Arc::new(tensor1(&bias)),
            post,
            isa,
            output_shape,
        },
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
        dilations: [usize; 2],
        padding: PaddingSpec,
        bias_per_channel: bool,
        /// A per-channel scale and a ReLU after the convolution.
        chain: bool,
    }

    /// One `Conv` node over a source, with the kernel and bias as consts
    /// and, with `chain`, a `Mul` by a per-channel constant and a `Max`
    /// with zero after it: decluttered as a load leaves it.
    fn conv_model(case: &Case, rng: &mut Lcg) -> TractResult<(TypedModel, Tensor)> {
        let Case {
            n,
            ci,
            co,
            hw,
            kernel: k,
            ..
        } = *case;
        let mut model = TypedModel::default();
        let shape: TVec<usize> = if case.format.has_n() {
            tvec!(n, ci, hw[0], hw[1])
        } else {
            tvec!(ci, hw[0], hw[1])
        };
        let x = model.add_source("x", f32::fact(&shape))?;
        // Weights in [-0.25, 0.25]: sums of up to a few hundred products
        // of values in [-1, 1] stay small.
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
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: case.format,
                kernel_shape: tvec!(k[0], k[1]),
                padding: case.padding.clone(),
                dilations: Some(tvec!(case.dilations[0], case.dilations[1])),
                strides: Some(tvec!(case.strides[0], case.strides[1])),
                input_channels: ci,
                output_channels: co,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let mut y = model.wire_node("conv", conv, &[x, kernel, bias])?[0];
        if case.chain {
            let per_channel: TVec<usize> = if case.format.has_n() {
                tvec!(1, co, 1, 1)
            } else {
                tvec!(co, 1, 1)
            };
            let rank = per_channel.len();
            let scale = Tensor::from_shape(&per_channel, &rng.values(co, 1000.0))?;
            let scale = model.add_const("scale", scale)?;
            let zero = model.add_const("zero", tensor0(0f32).broadcast_into_rank(rank)?)?;
            y = model.wire_node("scaled", math::mul(), &[y, scale])?[0];
            y = model.wire_node("relu", math::max(), &[y, zero])?[0];
        }
        model.select_output_outlets(&[y])?;
        let input = Tensor::from_shape(&shape, &rng.values(shape.iter().product(), 1000.0))?;
        Ok((model, input))
    }

    /// tract's own optimized op and ours, on the same input.
    fn compare(case: &Case, rng: &mut Lcg) -> TractResult<()> {
        let (model, input) = conv_model(case, rng)?;
        let lower = |m: &mut TypedModel, isa| lower_with(m, isa, true);
        let model = model.into_decluttered()?;
        compare_with_tract(case, &model, &input, lower, "DirectConv", &["Mul", "Max"])
    }

    #[test]
    fn every_geometry_computes_what_tracts_convolution_computes() -> TractResult<()> {
        let mut rng = Lcg(3);
        let explicit = |t: usize, l: usize, b: usize, r: usize| {
            PaddingSpec::Explicit(tvec!(t, l), tvec!(b, r))
        };
        let base = Case {
            format: DataFormat::NCHW,
            n: 1,
            ci: 16,
            co: 24,
            hw: [20, 33],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            padding: explicit(1, 1, 1, 1),
            bias_per_channel: true,
            chain: true,
        };
        let mut cases = vec![
            base.clone(),
            // A decoder's: stride 2, and an image narrower than a block.
            Case {
                ci: 32,
                co: 64,
                hw: [16, 16],
                strides: [2, 2],
                ..base.clone()
            },
            // A first layer: three channels, a 7x7 kernel at stride 2.
            Case {
                ci: 3,
                co: 8,
                hw: [30, 41],
                kernel: [7, 7],
                strides: [2, 2],
                padding: explicit(3, 3, 3, 3),
                ..base.clone()
            },
            // 2x2 at stride 2 (patches), no bias per channel, no chain.
            // (Declutter makes a 1x1 convolution a product, strided or not.)
            Case {
                kernel: [2, 2],
                strides: [2, 2],
                padding: PaddingSpec::Valid,
                bias_per_channel: false,
                chain: false,
                ..base.clone()
            },
            // Dilated, channels only (CHW), a batch of three.
            Case {
                dilations: [2, 3],
                padding: PaddingSpec::SameUpper,
                format: DataFormat::CHW,
                ..base.clone()
            },
            Case {
                n: 3,
                co: 13,
                ..base.clone()
            },
            // One output position; a kernel as large as the image.
            Case {
                hw: [3, 3],
                padding: PaddingSpec::Valid,
                ..base.clone()
            },
        ];
        let paddings = |rng: &mut Lcg| match rng.below(4) {
            0 => PaddingSpec::Valid,
            1 => PaddingSpec::SameUpper,
            2 => PaddingSpec::SameLower,
            _ => explicit(rng.below(4), rng.below(4), rng.below(4), rng.below(4)),
        };
        for _ in 0..60 {
            let kernel = [1 + rng.below(5), 1 + rng.below(5)];
            if kernel == [1, 1] {
                continue;
            }
            let dilations = [1 + rng.below(2), 1 + rng.below(3)];
            let reach = |a: usize| (kernel[a] - 1) * dilations[a] + 1;
            cases.push(Case {
                format: if rng.below(4) == 0 {
                    DataFormat::CHW
                } else {
                    DataFormat::NCHW
                },
                n: 1 + rng.below(2),
                ci: 1 + rng.below(20),
                co: 1 + rng.below(20),
                hw: [reach(0) + rng.below(12), reach(1) + rng.below(40)],
                kernel,
                strides: [1 + rng.below(3), 1 + rng.below(3)],
                dilations,
                padding: paddings(&mut rng),
                bias_per_channel: rng.below(3) != 0,
                chain: rng.below(2) == 0,
            });
        }
        for case in &cases {
            compare(case, &mut rng)?;
        }
        Ok(())
    }

    #[test]
    fn only_ungrouped_f32_convolutions_with_constant_weights_are_lowered() -> TractResult<()> {
        let mut rng = Lcg(1);
        let base = Case {
            format: DataFormat::NCHW,
            n: 1,
            ci: 4,
            co: 6,
            hw: [8, 8],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            padding: PaddingSpec::Valid,
            bias_per_channel: true,
            chain: false,
        };
        let (model, _) = conv_model(&base, &mut rng)?;
        assert_eq!(lower_with(&mut model.clone(), Isa::Baseline, false)?, 1);
        // One output position: tract's, as blocks would compute mostly
        // unused positions, unless every convolution is asked for.
        let few = Case {
            hw: [3, 3],
            ..base.clone()
        };
        let (few, _) = conv_model(&few, &mut rng)?;
        assert_eq!(lower_with(&mut few.clone(), Isa::Baseline, false)?, 0);
        assert_eq!(lower_with(&mut few.clone(), Isa::Baseline, true)?, 1);
        let node = model.node_id_by_name("conv")?;
        let conv = model.nodes[node].op_as::<Conv>().unwrap().clone();
        // Channel-last, grouped, or another kernel layout: tract's.
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
            let mut changed = model.clone();
            changed.nodes[node].op = Box::new(other.clone());
            assert!(
                matched(&changed, node, Isa::Baseline)?.is_none(),
                "{other:?}"
            );
        }
        // Weights computed at run time (a second source): tract's.
        let mut changed = model.clone();
        let w = changed.add_source("w", f32::fact([6, 4, 3, 3]))?;
        changed.nodes[node].inputs[1] = w;
        assert!(matched(&changed, node, Isa::Baseline)?.is_none());
        Ok(())
    }
}

//! 1×1 convolutions on x86-64: a register-blocked product with the
//! per-channel affine map and clamp that follow it, in one pass.
//!
//! Declutter turns a 1×1 convolution (group 1, stride 1, no padding) into
//! an `EinSum` `IHW,OI->OHW`: a product of the weights `[O, I]` with the
//! image seen as `[I, H·W]`. Codegen makes it tract's `OptMatMul` behind
//! an `OptMatMulPack` that repacks the image into panels on every
//! inference. With the few input channels of a mobile network's
//! bottlenecks (8 to 48 in cls) each of tract's output tiles does a
//! handful of multiply-adds between its per-tile set-up and its fused
//! epilogue: the per-node profile measured 3 to 13 G multiply-adds a
//! second on them, where this processor does more than 40, and the 1×1
//! convolutions were half of cls's time (0.75 of 1.5 ms, plus 0.13 of
//! packing).
//!
//! [`lower`] replaces such an `EinSum`, before codegen, with [`Conv1x1`],
//! together with the chain of per-channel or scalar `Mul`, `Add`, `Max`
//! and `Min` by constants that declutter leaves after it (a folded batch
//! norm, a ReLU or ReLU6) when the chain has no other reader. The op reads
//! the image where it is, with no packing: blocks of four output channels
//! by 24 columns keep their sums in twelve AVX2 registers over every input
//! channel, the weights are stored transposed at load so the four a block
//! needs are adjacent, and the chain runs on the registers before the one
//! store (AVX-512: blocks of eight channels by 32 columns in 16
//! registers). Results differ from tract's in the last bits (another summation
//! order, fused multiply-adds); the tests compare the two on many shapes,
//! and every model's golden self-test runs through it.
//!
//! Only f32, only on processors with AVX2 and FMA or AVX-512, only in builds without
//! debug assertions (see `depthwise::enabled` for why), and not with
//! `EDGEFLEET_CONV1X1=tract`, which the benchmark's lever table uses to
//! compare the two. ARM keeps tract's NEON products.

use tract_nnef::internal::*;

use crate::lowering::{self, Replacement};
use crate::threads::par_output;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::change_axes::AxisOp;
use tract_nnef::tract_core::ops::einsum::EinSum;
use tract_nnef::tract_core::ops::math::{Add, Max, Min, Mul};

/// The longest chain after the product that the op takes in.
pub(crate) const MAX_POST: usize = 6;

/// Which compilation of the loops runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Isa {
    /// Plain Rust: the tests compare it too; [`lower`] never picks it.
    #[cfg_attr(not(test), allow(dead_code))]
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// What [`lower`] runs on this processor, if anything.
    pub(crate) fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Isa::Avx2Fma);
            }
        }
        None
    }

    /// Every compilation this processor runs, the portable one first: what
    /// the tests compare.
    #[cfg(test)]
    pub(crate) fn here() -> Vec<Isa> {
        // pushed to on x86 only
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut isas = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            isas.push(Isa::Avx2Fma);
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        isas
    }
}

/// One step of the chain after the product: `v = fun(v, values[channel])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PostFun {
    Mul,
    Add,
    Max,
    Min,
}

impl PostFun {
    fn of(op: &TypedBinOp) -> Option<PostFun> {
        let m = &*op.0;
        Some(if m.is::<Mul>() {
            PostFun::Mul
        } else if m.is::<Add>() {
            PostFun::Add
        } else if m.is::<Max>() {
            PostFun::Max
        } else if m.is::<Min>() {
            PostFun::Min
        } else {
            return None;
        })
    }

    pub(crate) fn apply(self, v: f32, c: f32) -> f32 {
        match self {
            PostFun::Mul => v * c,
            PostFun::Add => v + c,
            PostFun::Max => v.max(c),
            PostFun::Min => v.min(c),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Post {
    pub(crate) fun: PostFun,
    /// One value per output channel (a scalar constant is repeated).
    pub(crate) values: Arc<Tensor>,
}

impl Post {
    /// The steps' functions, for an op's `info`: `Mul, Max, Min`.
    pub(crate) fn names(post: &[Post]) -> String {
        let names: Vec<String> = post.iter().map(|p| format!("{:?}", p.fun)).collect();
        names.join(", ")
    }

    /// Each step's function and values, as the loops read them.
    pub(crate) fn slices(post: &[Post]) -> TractResult<Vec<(PostFun, &[f32])>> {
        post.iter()
            .map(|p| Ok((p.fun, p.values.try_as_plain_ram()?.as_slice::<f32>()?)))
            .collect()
    }
}

/// `out[o, j] = post(Σ_i w[o, i] · x[i, j])` over an f32 image `[I, H, W]`
/// or `[1, I, H, W]`, output `[O, H, W]` or `[1, O, H, W]`. The weights
/// and the chain's constants are part of the op. Only [`lower`] makes one
/// with a vector `isa`, and only on a processor that has it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Conv1x1 {
    /// Output channels, input channels, values per channel (H·W).
    m: usize,
    k: usize,
    n: usize,
    /// The weights transposed, `[I, O]`: row `i` holds input channel `i`'s
    /// weight for every output channel.
    weights_t: Arc<Tensor>,
    post: Vec<Post>,
    /// Which input of the `EinSum` was the image (the other, the weights).
    image_input: usize,
    isa: Isa,
    output_shape: TVec<usize>,
}

impl Op for Conv1x1 {
    fn name(&self) -> StaticName {
        "Conv1x1".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}x{} weights over {} values, then [{}], {:?}",
            self.m,
            self.k,
            self.n,
            Post::names(&self.post),
            self.isa
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for Conv1x1 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(x.len() == self.k * self.n, "Conv1x1 image size");
        let w = self.weights_t.try_as_plain_ram()?.as_slice::<f32>()?;
        let post = Post::slices(&self.post)?;
        let problem = Problem {
            m: self.m,
            k: self.k,
            n: self.n,
            w,
            x,
            post: &post,
        };
        ensure!(
            self.output_shape.iter().product::<usize>() == self.m * self.n,
            "Conv1x1 output size"
        );
        let work = self.m * self.n * self.k;
        let out = par_output(&self.output_shape, self.n, work, |first, chunk| {
            rows(self.isa, &problem, first, chunk);
            Ok(())
        })?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Conv1x1 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "Conv1x1 takes the image alone");
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (self.m * self.n * self.k).to_dim()
        )))
    }

    as_op!();
}

/// One evaluation's product: `w` is `[k, m]` (the weights transposed),
/// `x` is `[k, n]`, and every `post` slice has `m` values.
struct Problem<'a> {
    m: usize,
    k: usize,
    n: usize,
    w: &'a [f32],
    x: &'a [f32],
    post: &'a [(PostFun, &'a [f32])],
}

impl Problem<'_> {
    /// Output value `(o, j)`, one multiply-add at a time: the portable
    /// loops, and the vector loops' last columns.
    fn value(&self, o: usize, j: usize) -> f32 {
        let mut acc = 0f32;
        for i in 0..self.k {
            acc = self.w[i * self.m + o].mul_add(self.x[i * self.n + j], acc);
        }
        for &(fun, values) in self.post {
            acc = fun.apply(acc, values[o]);
        }
        acc
    }
}

/// Output rows (channels) `first..` into `out` (whole rows), with the
/// loops compiled for `isa`.
#[allow(unsafe_code)]
fn rows(isa: Isa, p: &Problem, first: usize, out: &mut [f32]) {
    let count = out.len() / p.n;
    assert!(first + count <= p.m && out.len() == count * p.n);
    assert!(p.w.len() == p.k * p.m && p.x.len() == p.k * p.n);
    assert!(p.post.iter().all(|(_, v)| v.len() == p.m));
    match isa {
        Isa::Baseline => {
            for (r, row) in out.chunks_mut(p.n).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = p.value(first + r, j);
                }
            }
        }
        // SAFETY: `Isa::detect` chose it only on a processor with AVX2 and
        // FMA (the tests only where `is_x86_feature_detected!` says so);
        // the sizes were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::rows_avx2(p, first, out) },
        // SAFETY: as above, with AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512(p, first, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PostFun, Problem};
    use crate::row_blocks::row_blocks;

    /// Output columns one full block spans: three registers of eight.
    const WIDE: usize = 24;

    /// # Safety
    /// The processor has AVX2 and FMA; `p`'s slices have the sizes its
    /// doc gives, `out` holds whole rows of `n` from row `first`, and
    /// `first + out.len() / n <= m`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_avx2(p: &Problem, first: usize, out: &mut [f32]) {
        let n = p.n;
        for (r, rows) in row_blocks(out.len() / n, 4) {
            let o = first + r;
            let out = &mut out[r * n..(r + rows) * n];
            // SAFETY: the function's contract, for rows o..o + rows.
            unsafe {
                match rows {
                    4 => block_rows::<4>(p, o, out),
                    2 => block_rows::<2>(p, o, out),
                    _ => block_rows::<1>(p, o, out),
                }
            }
        }
    }

    /// Output rows `o..o + R` (`out`: `R` rows of `n`), in blocks of 24
    /// columns, then 8, then one at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_rows<const R: usize>(p: &Problem, o: usize, out: &mut [f32]) {
        let Problem {
            m,
            k,
            n,
            w,
            x,
            post,
        } = *p;
        let wp = w.as_ptr().wrapping_add(o);
        let xp = x.as_ptr();
        let mut j = 0;
        while j + WIDE <= n {
            let mut acc = [[_mm256_setzero_ps(); 3]; R];
            for i in 0..k {
                // SAFETY: i < k, j + 24 <= n: inside `x`; o + R <= m: inside
                // row i of `w`.
                unsafe {
                    let s = xp.add(i * n + j);
                    let xs = [
                        _mm256_loadu_ps(s),
                        _mm256_loadu_ps(s.add(8)),
                        _mm256_loadu_ps(s.add(16)),
                    ];
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm256_broadcast_ss(&*wp.add(i * m + r));
                        for (a, &xv) in a.iter_mut().zip(&xs) {
                            *a = _mm256_fmadd_ps(xv, b, *a);
                        }
                    }
                }
            }
            for (r, a) in acc.iter_mut().enumerate() {
                for (c, v) in a.iter_mut().enumerate() {
                    *v = chain(*v, post, o + r);
                    // SAFETY: row r < R of `out`, columns j + 8c + 8 <= n.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * n + j + 8 * c), *v) };
                }
            }
            j += WIDE;
        }
        while j + 8 <= n {
            let mut acc = [_mm256_setzero_ps(); R];
            for i in 0..k {
                // SAFETY: as above, with j + 8 <= n.
                unsafe {
                    let xv = _mm256_loadu_ps(xp.add(i * n + j));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm256_broadcast_ss(&*wp.add(i * m + r));
                        *a = _mm256_fmadd_ps(xv, b, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let v = chain(*a, post, o + r);
                // SAFETY: row r < R of `out`, columns j + 8 <= n.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * n + j), v) };
            }
            j += 8;
        }
        for j in j..n {
            for r in 0..R {
                out[r * n + j] = p.value(o + r, j);
            }
        }
    }

    /// AVX-512: blocks of eight output rows (then four, two, one) by 32
    /// columns (two registers), then 16 columns at a time, the last ones
    /// masked.
    ///
    /// # Safety
    /// The processor has AVX-512F; as [`rows_avx2`] otherwise.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_avx512(p: &Problem, first: usize, out: &mut [f32]) {
        let n = p.n;
        for (r, rows) in row_blocks(out.len() / n, 8) {
            let o = first + r;
            let out = &mut out[r * n..(r + rows) * n];
            let mut j = 0;
            // SAFETY: the function's contract, for rows o..o + rows; each
            // block's columns are inside the row (the last one masked).
            unsafe {
                while j + 32 <= n {
                    match rows {
                        8 => block512::<8, 2>(p, o, j, !0, out),
                        4 => block512::<4, 2>(p, o, j, !0, out),
                        2 => block512::<2, 2>(p, o, j, !0, out),
                        _ => block512::<1, 2>(p, o, j, !0, out),
                    }
                    j += 32;
                }
                while j < n {
                    let width = 16.min(n - j);
                    let mask: __mmask16 = if width == 16 { !0 } else { (1 << width) - 1 };
                    match rows {
                        8 => block512::<8, 1>(p, o, j, mask, out),
                        4 => block512::<4, 1>(p, o, j, mask, out),
                        2 => block512::<2, 1>(p, o, j, mask, out),
                        _ => block512::<1, 1>(p, o, j, mask, out),
                    }
                    j += width;
                }
            }
        }
    }

    /// Output rows `o..o + R`, columns `j..j + 16 C` (the last register
    /// masked by `mask`), summed in registers over every input channel.
    ///
    /// # Safety
    /// As [`rows_avx512`]; the masked columns are inside the row.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block512<const R: usize, const C: usize>(
        p: &Problem,
        o: usize,
        j: usize,
        mask: __mmask16,
        out: &mut [f32],
    ) {
        let Problem {
            m,
            k,
            n,
            w,
            x,
            post,
        } = *p;
        let wp = w.as_ptr().wrapping_add(o);
        let xp = x.as_ptr().wrapping_add(j);
        let masks: [__mmask16; C] = std::array::from_fn(|c| if c + 1 == C { mask } else { !0 });
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for i in 0..k {
            // SAFETY: the caller's contract: row i of `x` from column j,
            // masked; row i of `w` at o..o + R.
            unsafe {
                let s = xp.add(i * n);
                let xs: [__m512; C] =
                    std::array::from_fn(|c| _mm512_maskz_loadu_ps(masks[c], s.add(16 * c)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*wp.add(i * m + r));
                    for (a, &xv) in a.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(xv, b, *a);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let consts: [f32; super::MAX_POST] =
                std::array::from_fn(|p| post.get(p).map_or(0.0, |(_, v)| v[o + r]));
            for (c, &v) in a.iter().enumerate() {
                let mut v = v;
                for (&(fun, _), &value) in post.iter().zip(&consts) {
                    let value = _mm512_set1_ps(value);
                    v = match fun {
                        PostFun::Mul => _mm512_mul_ps(v, value),
                        PostFun::Add => _mm512_add_ps(v, value),
                        PostFun::Max => _mm512_max_ps(v, value),
                        PostFun::Min => _mm512_min_ps(v, value),
                    };
                }
                // SAFETY: row r < R of `out`, masked columns inside it.
                unsafe {
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * n + j + 16 * c), masks[c], v)
                };
            }
        }
    }

    /// The chain after the product on eight values of output row `o`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn chain(mut v: __m256, post: &[(PostFun, &[f32])], o: usize) -> __m256 {
        for &(fun, values) in post {
            let c = _mm256_set1_ps(values[o]);
            v = match fun {
                PostFun::Mul => _mm256_mul_ps(v, c),
                PostFun::Add => _mm256_add_ps(v, c),
                PostFun::Max => _mm256_max_ps(v, c),
                PostFun::Min => _mm256_min_ps(v, c),
            };
        }
        v
    }
}

/// Replaces every 1×1 convolution product [`Conv1x1`] can run, with the
/// chain after it. Returns how many it replaced.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    // On x86-64 only (`Isa::detect`), unless this build has debug
    // assertions or `EDGEFLEET_CONV1X1=tract` (`lowering::enabled`).
    let Some(isa) = Isa::detect().filter(|_| lowering::enabled("EDGEFLEET_CONV1X1")) else {
        return Ok(0);
    };
    lower_with(model, isa)
}

fn lower_with(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let mut found = Vec::new();
    for id in model.eval_order()? {
        if let Some((first, last, op)) = matched(model, id, isa)? {
            found.push(Replacement {
                first,
                input: op.image_input,
                last,
                op,
            });
        }
    }
    lowering::replace(model, &found, "conv1x1")
}

/// Node `id` as a [`Conv1x1`]: the `EinSum` and the last node of the chain
/// it takes in.
fn matched(
    model: &TypedModel,
    id: usize,
    isa: Isa,
) -> TractResult<Option<(usize, usize, Conv1x1)>> {
    let node = &model.nodes[id];
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
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
    let Some(out_shape) = output.shape.as_concrete() else {
        return Ok(None);
    };
    let Some((wi, product)) =
        (0..2).find_map(|wi| Some((wi, Product::of(einsum, &facts, out_shape, wi)?)))
    else {
        return Ok(None);
    };
    let Some(weights) = facts[wi].konst.as_ref() else {
        return Ok(None);
    };
    let Product {
        m,
        k,
        n,
        m_first,
        channel_axis,
    } = product;
    let w = weights.try_as_plain_ram()?.as_slice::<f32>()?;
    let weights_t = if m_first {
        // `[m, k]` to `[k, m]` by tiles that stay in the cache, into the
        // tensor itself.
        const TILE: usize = 32;
        let mut t = Tensor::zero::<f32>(&[k, m])?;
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let t = view.as_slice_mut::<f32>()?;
            for r0 in (0..m).step_by(TILE) {
                for i0 in (0..k).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(m) {
                        let row = &w[r * k..][i0..(i0 + TILE).min(k)];
                        for (i, &v) in (i0..).zip(row) {
                            t[i * m + r] = v;
                        }
                    }
                }
            }
        }
        t
    } else {
        Tensor::from_shape(&[k, m], w)?
    };
    let (last, post, output_shape) = chain(model, id, out_shape, channel_axis, m)?;
    Ok(Some((
        id,
        last,
        Conv1x1 {
            m,
            k,
            n,
            weights_t: Arc::new(weights_t),
            post,
            image_input: 1 - wi,
            isa,
            output_shape,
        },
    )))
}

/// An `EinSum` that is a 1×1 convolution, whatever its axis letters and
/// unit axes: constant weights with one output-channel axis `M` and one
/// input-channel axis `K`, an image whose axes are `K` then the ones it
/// passes through, an output whose axes are `M` then those same ones in
/// the same order. Axes of size 1 may sit anywhere (ONNX's batch of one,
/// the NNEF form's leading axis): they change no offset.
struct Product {
    m: usize,
    k: usize,
    /// Values per channel: the passed-through axes' product.
    n: usize,
    /// Whether the weights are `[M, K]` (else `[K, M]`).
    m_first: bool,
    /// Where `M` is in the output.
    channel_axis: usize,
}

impl Product {
    fn of(
        einsum: &EinSum,
        facts: &[&TypedFact],
        out_shape: &[usize],
        wi: usize,
    ) -> Option<Product> {
        let xi = 1 - wi;
        let w_shape = facts[wi].shape.as_concrete()?;
        let x_shape = facts[xi].shape.as_concrete()?;
        facts[wi].konst.as_ref()?;
        let (mut m_axis, mut k_axis, mut through) = (None, None, Vec::new());
        for axis in einsum.axes.iter_all_axes() {
            let (pw, px, po) = (&axis.inputs[wi], &axis.inputs[xi], &axis.outputs[0]);
            if pw.len() > 1 || px.len() > 1 || po.len() > 1 {
                return None;
            }
            let dims: Vec<usize> = pw
                .iter()
                .map(|&p| w_shape[p])
                .chain(px.iter().map(|&p| x_shape[p]))
                .chain(po.iter().map(|&p| out_shape[p]))
                .collect();
            if dims.windows(2).any(|d| d[0] != d[1]) {
                return None;
            }
            match (pw.first(), px.first(), po.first()) {
                (Some(&w), Some(&x), None) if k_axis.is_none() => k_axis = Some((w, x)),
                (Some(&w), None, Some(&o)) if m_axis.is_none() => m_axis = Some((w, o)),
                (None, Some(&x), Some(&o)) => through.push((x, o)),
                _ if dims.iter().all(|&d| d == 1) => {}
                _ => return None,
            }
        }
        let ((kw, kx), (mw, mo)) = (k_axis?, m_axis?);
        let (k, m) = (x_shape[kx], out_shape[mo]);
        // The layouts: past the unit axes, the image is [K, through...] and
        // the output [M, through...], in the same order.
        through.retain(|&(x, _)| x_shape[x] != 1);
        let mut by_x = through.clone();
        by_x.sort();
        let mut by_o = through.clone();
        by_o.sort_by_key(|&(_, o)| o);
        if by_x != by_o
            || (0..kx).any(|a| x_shape[a] != 1)
            || by_x.first().is_some_and(|&(x, _)| x < kx)
            || (0..mo).any(|a| out_shape[a] != 1)
            || by_o.first().is_some_and(|&(_, o)| o < mo)
            || w_shape.iter().product::<usize>() != m * k
            || m == 0
            || k == 0
        {
            return None;
        }
        // Unit axes of the weights change no offset either.
        let m_first = mw < kw;
        let n = through.iter().map(|&(x, _)| x_shape[x]).product();
        Some(Product {
            m,
            k,
            n,
            m_first,
            channel_axis: mo,
        })
    }
}

/// The chain after the product at node `id`: the per-channel or scalar
/// `Mul`/`Add`/`Max`/`Min` that each read only the previous node, across
/// the removal or insertion of unit axes. Returns its last node, its
/// steps, and the shape that node outputs.
pub(crate) fn chain(
    model: &TypedModel,
    id: usize,
    out_shape: &[usize],
    mut channel_axis: usize,
    m: usize,
) -> TractResult<(usize, Vec<Post>, TVec<usize>)> {
    let outputs = model.output_outlets()?;
    let mut shape: TVec<usize> = out_shape.into();
    let (mut last, mut end_shape) = (id, shape.clone());
    let mut post = Vec::new();
    let mut at = id;
    while post.len() < MAX_POST {
        let outlet = OutletId::new(at, 0);
        let succs = model.outlet_successors(outlet);
        if outputs.contains(&outlet) || succs.len() != 1 {
            break;
        }
        let next = &model.nodes[succs[0].node];
        let Some(next_shape) = next
            .outputs
            .first()
            .and_then(|o| o.fact.shape.as_concrete())
            .filter(|_| next.outputs.len() == 1)
        else {
            break;
        };
        if let Some(op) = next.op_as::<AxisOp>() {
            match *op {
                AxisOp::Rm(a) if a < shape.len() && shape[a] == 1 && a != channel_axis => {
                    channel_axis -= usize::from(a < channel_axis);
                }
                AxisOp::Add(a) if a <= shape.len() => {
                    channel_axis += usize::from(a <= channel_axis)
                }
                _ => break,
            }
            shape = next_shape.into();
            at = next.id;
            continue;
        }
        let Some(fun) = next.op_as::<TypedBinOp>().and_then(PostFun::of) else {
            break;
        };
        if next.inputs.len() != 2 || next_shape != &*shape {
            break;
        }
        let other = next.inputs[1 - succs[0].slot];
        let Some(values) = per_channel(model, other, shape.len(), channel_axis, m)? else {
            break;
        };
        post.push(Post {
            fun,
            values: Arc::new(tensor1(&values)),
        });
        at = next.id;
        (last, end_shape) = (at, shape.clone());
    }
    Ok((last, post, end_shape))
}

/// The `m` values, one per output channel, of an f32 constant at `outlet`
/// that is either one value or varies only along the channel axis of an
/// output of rank `rank`.
fn per_channel(
    model: &TypedModel,
    outlet: OutletId,
    rank: usize,
    channel_axis: usize,
    m: usize,
) -> TractResult<Option<Vec<f32>>> {
    let fact = model.outlet_fact(outlet)?;
    let Some(k) = &fact.konst else {
        return Ok(None);
    };
    if k.datum_type() != f32::datum_type() || k.rank() > rank {
        return Ok(None);
    }
    let values = k.try_as_plain_ram()?.as_slice::<f32>()?;
    if values.len() == 1 {
        return Ok(Some(vec![values[0]; m]));
    }
    // Right-aligned against the output's axes, as broadcasting is.
    let offset = rank - k.rank();
    let along_channels = k
        .shape()
        .iter()
        .enumerate()
        .all(|(a, &d)| d == 1 || (a + offset == channel_axis && d == m));
    Ok((along_channels && values.len() == m).then(|| values.to_vec()))
}

#[cfg(test)]
mod tests {
    use tract_nnef::tract_core::ops::math;

    use super::*;
    use crate::test_rng::Lcg;

    #[derive(Clone, Copy, Debug)]
    struct Case {
        m: usize,
        k: usize,
        h: usize,
        w: usize,
        form: Form,
    }

    /// How the product is written.
    #[derive(Clone, Copy, Debug)]
    enum Form {
        /// As ONNX's declutter leaves it: `IHW,OI->OHW`, with or without a
        /// batch axis of one on the image (`N`) and on the output.
        Onnx { batched_in: bool, batched_out: bool },
        /// As tract's NNEF reader builds it: the weights `[1, O, I]` first,
        /// the image flattened to `[1, I, H·W]`, `amk,akn->amn`, then the
        /// leading axis removed.
        Nnef,
    }

    fn onnx(m: usize, k: usize, h: usize, w: usize) -> Case {
        let form = Form::Onnx {
            batched_in: false,
            batched_out: false,
        };
        Case { m, k, h, w, form }
    }

    /// Where the test's clamp cuts: inside the range its values take.
    const CAP: f32 = 0.25;

    /// A 1×1 product over a source, then a folded batch norm (`Mul`, `Add`
    /// per channel) and a clamp (`Max`, `Min` by scalars, as ReLU6 is), as
    /// declutter or the NNEF reader leave a 1×1 convolution.
    fn product_model(case: &Case, rng: &mut Lcg) -> TractResult<(TypedModel, Tensor)> {
        let Case { m, k, h, w, form } = *case;
        let mut model = TypedModel::default();
        let weights = rng.values(m * k, 8000.0);
        let (in_shape, channel_shape, product): (TVec<usize>, TVec<usize>, OutletId) = match form {
            Form::Onnx {
                batched_in,
                batched_out,
            } => {
                let in_shape: TVec<usize> = if batched_in {
                    tvec!(1, k, h, w)
                } else {
                    tvec!(k, h, w)
                };
                let x = model.add_source("x", f32::fact(&in_shape))?;
                let weights = model.add_const("w", Tensor::from_shape(&[m, k], &weights)?)?;
                let form = format!(
                    "{}IHW,OI->{}OHW",
                    if batched_in { "N" } else { "" },
                    if batched_out { "N" } else { "" }
                );
                let op = EinSum::new(form.parse()?, f32::datum_type());
                let product = model.wire_node("product", op, &[x, weights])?[0];
                let channel_shape: TVec<usize> = if batched_out {
                    tvec!(1, m, 1, 1)
                } else {
                    tvec!(m, 1, 1)
                };
                (in_shape, channel_shape, product)
            }
            Form::Nnef => {
                let in_shape: TVec<usize> = tvec!(1, k, h * w);
                let x = model.add_source("x", f32::fact(&in_shape))?;
                let weights = model.add_const("w", Tensor::from_shape(&[1, m, k], &weights)?)?;
                let op = EinSum::new("amk,akn->amn".parse()?, f32::datum_type());
                let product = model.wire_node("product", op, &[weights, x])?[0];
                let product = model.wire_node("squeezed", AxisOp::Rm(0), &[product])?[0];
                (in_shape, tvec!(m, 1), product)
            }
        };
        let rank = channel_shape.len();
        let scale = model.add_const(
            "scale",
            Tensor::from_shape(&channel_shape, &rng.values(m, 1000.0))?,
        )?;
        let shift = model.add_const(
            "shift",
            Tensor::from_shape(&channel_shape, &rng.values(m, 1000.0))?,
        )?;
        let zero = model.add_const("zero", tensor0(0f32).broadcast_into_rank(rank)?)?;
        let cap = model.add_const("cap", tensor0(CAP).broadcast_into_rank(rank)?)?;
        let v = model.wire_node("scaled", math::mul(), &[product, scale])?[0];
        let v = model.wire_node("shifted", math::add(), &[shift, v])?[0];
        let v = model.wire_node("relu", math::max(), &[v, zero])?[0];
        let v = model.wire_node("relu6", math::min(), &[v, cap])?[0];
        model.select_output_outlets(&[v])?;
        let input = Tensor::from_shape(&in_shape, &rng.values(k * h * w, 2000.0))?;
        // The NNEF form is kept as the reader builds it: a load does not
        // declutter it.
        Ok(match form {
            Form::Onnx { .. } => (model.into_decluttered()?, input),
            Form::Nnef => (model, input),
        })
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_optimized()?.into_runnable()?;
        let out = plan.run(tvec!(input.clone().into_tvalue()))?;
        Ok(out[0].clone().into_tensor())
    }

    #[test]
    fn every_shape_computes_what_tracts_product_computes() -> TractResult<()> {
        let mut rng = Lcg(11);
        let mut cases = Vec::new();
        // Rows: blocks of 4, 2, 1; columns: blocks of 24, 8, single ones.
        for (m, k) in [
            (1, 1),
            (3, 5),
            (4, 8),
            (7, 16),
            (8, 3),
            (24, 8),
            (33, 40),
            (88, 16),
            (200, 32),
        ] {
            for (h, w) in [(1, 1), (1, 7), (3, 8), (2, 12), (6, 96), (5, 13), (12, 24)] {
                cases.push(onnx(m, k, h, w));
            }
        }
        for (batched_in, batched_out) in [(true, false), (false, true), (true, true)] {
            let form = Form::Onnx {
                batched_in,
                batched_out,
            };
            cases.push(Case {
                m: 8,
                k: 8,
                h: 24,
                w: 96,
                form,
            });
            cases.push(Case {
                m: 5,
                k: 9,
                h: 3,
                w: 11,
                form,
            });
        }
        for (m, k, h, w) in [
            (8, 8, 24, 96),
            (200, 32, 2, 96),
            (5, 9, 3, 11),
            (1, 3, 1, 1),
        ] {
            cases.push(Case {
                m,
                k,
                h,
                w,
                form: Form::Nnef,
            });
        }
        let mut clamped = [0usize; 3];
        for case in &cases {
            let (model, input) = product_model(case, &mut rng)?;
            let expected = run(model.clone(), &input)?;
            let expected = expected.try_as_plain_ram()?.as_slice::<f32>()?;
            for isa in Isa::here() {
                let mut lowered = model.clone();
                assert_eq!(lower_with(&mut lowered, isa)?, 1, "{case:?}");
                // The whole chain went into the one node.
                let ops: Vec<String> = lowered
                    .eval_order()?
                    .iter()
                    .map(|&id| lowered.nodes[id].op().name().to_string())
                    .collect();
                assert!(
                    !ops.iter()
                        .any(|o| o == "EinSum" || o.contains("Mul") || o == "RmAxis"),
                    "{case:?} {ops:?}"
                );
                let got = run(lowered, &input)?;
                let got = got.try_as_plain_ram()?.as_slice::<f32>()?;
                assert_eq!(got.len(), expected.len());
                // Inputs in [-0.5, 0.5], weights in [-0.125, 0.125], scale
                // and shift in [-1, 1]: values stay near 1, and another
                // summation order moves them by far less than the bound.
                for (j, (g, e)) in got.iter().zip(expected).enumerate() {
                    assert!((g - e).abs() <= 1e-5, "{case:?} {isa:?} at {j}: {g} vs {e}");
                }
                assert!(got.iter().all(|v| (0.0..=CAP).contains(v)));
                clamped[0] += got.iter().filter(|&&v| v == 0.0).count();
                clamped[1] += got.iter().filter(|&&v| v == CAP).count();
                clamped[2] += got.iter().filter(|&&v| v > 0.0 && v < CAP).count();
            }
        }
        // Both ends of the clamp were reached, and values between them.
        assert!(clamped.iter().all(|&c| c > 1000), "{clamped:?}");
        Ok(())
    }

    #[test]
    fn only_constant_f32_1x1_products_are_lowered_and_the_chain_stops_at_a_second_reader()
    -> TractResult<()> {
        let mut rng = Lcg(5);
        let isa = Isa::Baseline;
        // Weights computed at run time (a second source): not lowered.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([4, 3, 5]))?;
        let w = model.add_source("w", f32::fact([6, 4]))?;
        let y = model.wire_node(
            "product",
            EinSum::new("IHW,OI->OHW".parse()?, f32::datum_type()),
            &[x, w],
        )?[0];
        model.select_output_outlets(&[y])?;
        assert_eq!(lower_with(&mut model, isa)?, 0);

        // Another form of product (a contraction over H): not lowered.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([4, 3, 5]))?;
        let w = model.add_const("w", Tensor::from_shape(&[6, 3], &rng.values(18, 1.0))?)?;
        let y = model.wire_node(
            "product",
            EinSum::new("IHW,OH->IOW".parse()?, f32::datum_type()),
            &[x, w],
        )?[0];
        model.select_output_outlets(&[y])?;
        assert_eq!(lower_with(&mut model, isa)?, 0);

        // The scaled value is read twice: only the product and the scale
        // go in; the shift stays a node of its own.
        let case = onnx(6, 4, 3, 5);
        let (mut model, input) = product_model(&case, &mut rng)?;
        let scaled = model.node_id_by_name("scaled")?;
        let relu6 = model.node_id_by_name("relu6")?;
        model.select_output_outlets(&[OutletId::new(relu6, 0), OutletId::new(scaled, 0)])?;
        let expected = {
            let plan = model.clone().into_optimized()?.into_runnable()?;
            plan.run(tvec!(input.clone().into_tvalue()))?
        };
        assert_eq!(lower_with(&mut model, isa)?, 1);
        let lowered = model
            .nodes
            .iter()
            .find_map(|n| n.op_as::<Conv1x1>())
            .unwrap();
        assert_eq!(lowered.post.len(), 1);
        assert_eq!(lowered.post[0].fun, PostFun::Mul);
        let plan = model.into_optimized()?.into_runnable()?;
        let got = plan.run(tvec!(input.into_tvalue()))?;
        for (g, e) in got.iter().zip(&expected) {
            let (g, e) = (
                g.try_as_plain_ram()?.as_slice::<f32>()?,
                e.try_as_plain_ram()?.as_slice::<f32>()?,
            );
            assert!(g.iter().zip(e).all(|(a, b)| (a - b).abs() < 1e-5));
        }
        Ok(())
    }
}

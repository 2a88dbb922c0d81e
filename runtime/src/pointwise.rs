//! Elementwise expressions of one tensor, in one pass.
//!
//! MobileNetV3-class models (cls, rec) follow most convolutions with
//! hard-swish, `x * clip(x + 3, 0, 6) / 6`, and PP-OCRv4 (rec) wraps it in
//! learnable affine blocks, `(x * a + b) … * c + d` with scalar `a`…`d`.
//! After declutter that is six to nine binary ops with scalar operands,
//! reading one tensor `x` twice. tract 0.23.9's codegen fuses a straight
//! run of such ops into one in-place pass (`OptBinChain`), but `x` has two
//! consumers here, so it makes two or three chains: each a full pass over
//! the tensor, the first starting with a copy of `x` (it is shared), the
//! last reading both. Those chains were the largest ops after the matrix
//! products in the per-op profiles of docs/benchmarks.md (rec:
//! `OptBinChain(Add+Max+Min)` 3.0 ms and `OptBinChain(Mul+Mul+Add)` 1.6 ms
//! of 24 ms).
//!
//! [`lower`] finds each such expression before codegen and replaces it with
//! one [`Pointwise`] node, which reads the tensor once and writes it once,
//! in place when the node holds the only reference to it. A hard-swish
//! (with or without the affine maps) runs in AVX2 registers, eight values
//! at a time (`x86::hard_swish`); any other expression, and any processor
//! without AVX2, runs as a short program of binary steps over blocks of
//! the tensor that stay in L1. Either way each step is the op tract would
//! have run, on the same operands in the same order, so the results are
//! bit for bit tract's.
//!
//! What is fused (a *region*): starting from any outlet `x`, every node
//! downstream whose op is an f32 `Add`, `Sub`, `Mul`, `Div`, `Min` or
//! `Max` of the same shape as `x`, each operand being `x`, an earlier node
//! of the region or a one-element constant. A region is replaced when
//! exactly one of its nodes is read from outside it, when it has at least
//! two nodes and when some value in it is read twice inside it. A straight
//! chain is left to tract: codegen already runs it in one pass, or folds it
//! into the matrix product before it.
//!
//! Builds with debug assertions keep tract's ops (this crate is not
//! optimized there, tract is; see `depthwise::enabled`), and so does
//! `EDGEFLEET_POINTWISE=tract`, which the benchmark's lever table runs.

use std::collections::{BTreeSet, HashMap};

use tract_nnef::internal::*;

use crate::threads::par_output;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::element_wise::ElementWiseOp;
use tract_nnef::tract_core::ops::math::{Add, Div, Max, Min, Mul, Recip, Square, Sub, SubF};
use tract_nnef::tract_core::tract_linalg::multithread::par_chunks_mut;

/// Elements per block: every value of a block's program stays in L1
/// (`MAX_STEPS + 1` blocks of 1 KiB).
const BLOCK: usize = 256;

/// The longest program a node runs: a larger expression is cut to its
/// longest part that is one.
const MAX_STEPS: usize = 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fun {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
}

impl Fun {
    /// tract's f32 kernel for the op, as its `bin_to_super_type!` writes
    /// it (`SubF` is a `Sub` with its operands swapped).
    fn of(op: &TypedBinOp) -> Option<(Fun, bool)> {
        let m = &*op.0;
        Some(if m.is::<Add>() {
            (Fun::Add, false)
        } else if m.is::<Sub>() {
            (Fun::Sub, false)
        } else if m.is::<SubF>() {
            (Fun::Sub, true)
        } else if m.is::<Mul>() {
            (Fun::Mul, false)
        } else if m.is::<Div>() {
            (Fun::Div, false)
        } else if m.is::<Min>() {
            (Fun::Min, false)
        } else if m.is::<Max>() {
            (Fun::Max, false)
        } else {
            return None;
        })
    }
}

/// A step's operand: value `i` of the program (0 is the input, `i + 1` is
/// step `i`'s result) or a constant, kept as its bits so the op can be
/// hashed and compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Arg {
    Value(usize),
    Scalar(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Step {
    fun: Fun,
    a: Arg,
    b: Arg,
}

/// One pass of an elementwise program over its input; the output is the
/// last step's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pointwise {
    steps: Vec<Step>,
    /// The same program as one hard-swish expression, which AVX2
    /// processors run in registers (`x86::hard_swish`), when it is one.
    hard_swish: Option<HardSwish>,
}

impl Pointwise {
    fn new(steps: Vec<Step>) -> Pointwise {
        let hard_swish = HardSwish::of(&steps);
        Pointwise { steps, hard_swish }
    }
}

/// `y = post(v * min(max(v + shift, low), high))` with `v = pre(x)`, where
/// `pre` and `post` are each an optional product then an optional sum with
/// a constant (`max` and `min` may come the other way round). hard-swish as
/// exporters write it (cls), inside PP-OCRv4's learnable affine blocks
/// (rec). Each constant is kept as its bits; `None` is a step the program
/// does not have, so nothing is computed in its place and the result is
/// the program's bit for bit.
// Only x86-64 has the kernel; elsewhere the steps run.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct HardSwish {
    pre_mul: Option<u32>,
    pre_add: Option<u32>,
    shift: u32,
    low: u32,
    high: u32,
    max_first: bool,
    post_mul: Option<u32>,
    post_add: Option<u32>,
}

impl HardSwish {
    fn of(steps: &[Step]) -> Option<HardSwish> {
        // The one step reading two values: `v * gate`. Steps up to `v` are
        // `pre`, those between are the gate, those after are `post`.
        let join = steps
            .iter()
            .position(|s| matches!((s.a, s.b), (Arg::Value(_), Arg::Value(_))))?;
        let s = steps[join];
        let chained = |(i, s): (usize, &Step)| i == join || s.on_previous(i);
        if s.fun != Fun::Mul || !steps.iter().enumerate().all(chained) {
            return None;
        }
        let v = match (s.a, s.b) {
            (Arg::Value(a), Arg::Value(b)) if b == join && a < join => a,
            (Arg::Value(a), Arg::Value(b)) if a == join && b < join => b,
            _ => return None,
        };
        let (pre, gate, post) = (&steps[..v], &steps[v..join], &steps[join + 1..]);
        let (pre_mul, pre_add) = affine(pre)?;
        let (post_mul, post_add) = affine(post)?;
        let [shift, first, second] = gate else {
            return None;
        };
        let shift = shift.additive()?;
        let (max_first, low, high) = match (first.fun, second.fun) {
            (Fun::Max, Fun::Min) => (true, first.constant()?, second.constant()?),
            (Fun::Min, Fun::Max) => (false, second.constant()?, first.constant()?),
            _ => return None,
        };
        Some(HardSwish {
            pre_mul,
            pre_add,
            shift,
            low,
            high,
            max_first,
            post_mul,
            post_add,
        })
    }
}

/// An optional product then an optional sum with a constant.
fn affine(steps: &[Step]) -> Option<(Option<u32>, Option<u32>)> {
    match steps {
        [] => Some((None, None)),
        [m] if m.fun == Fun::Mul => Some((Some(m.commuted()?), None)),
        [a] => Some((None, Some(a.additive()?))),
        [m, a] if m.fun == Fun::Mul => Some((Some(m.commuted()?), Some(a.additive()?))),
        _ => None,
    }
}

impl Step {
    /// Whether step `i` reads the value made right before it (step `i`
    /// makes value `i + 1`) and a constant.
    fn on_previous(&self, i: usize) -> bool {
        matches!((self.a, self.b),
            (Arg::Value(v), Arg::Scalar(_)) | (Arg::Scalar(_), Arg::Value(v)) if v == i)
    }

    /// The constant of `value op constant`, in that order.
    fn constant(&self) -> Option<u32> {
        match (self.a, self.b) {
            (Arg::Value(_), Arg::Scalar(c)) => Some(c),
            _ => None,
        }
    }

    /// The constant of a product, in either order (IEEE products commute).
    fn commuted(&self) -> Option<u32> {
        match (self.a, self.b) {
            (Arg::Value(_), Arg::Scalar(c)) | (Arg::Scalar(c), Arg::Value(_)) => Some(c),
            _ => None,
        }
    }

    /// The constant `c` of `v + c`, `c + v` or `v - c` (`v + -c`, the same
    /// bits), as a sum.
    fn additive(&self) -> Option<u32> {
        match self.fun {
            Fun::Add => self.commuted(),
            Fun::Sub => self.constant().map(|c| (-f32::from_bits(c)).to_bits()),
            _ => None,
        }
    }
}

impl Op for Pointwise {
    fn name(&self) -> StaticName {
        "Pointwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let arg = |a: &Arg| match a {
            Arg::Value(0) => "x".to_string(),
            Arg::Value(i) => format!("v{i}"),
            Arg::Scalar(bits) => format!("{}", f32::from_bits(*bits)),
        };
        Ok(self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| format!("v{} = {:?}({}, {})", i + 1, s.fun, arg(&s.a), arg(&s.b)))
            .collect())
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for Pointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(x.datum_type() == f32::datum_type(), "Pointwise runs f32");
        let len = x.len();
        let work = len * self.steps.len();
        let out = if x.is_exclusive() {
            // The last reader of `x`: write over it.
            let mut x = x.into_tensor();
            {
                let mut plain = x.try_as_plain_ram_mut()?;
                let data = plain.as_slice_mut::<f32>()?;
                par_chunks_mut(data, 1, work, |_, chunk| {
                    self.run(None, chunk);
                    Ok(())
                })?;
            }
            x
        } else {
            let plain = x.try_as_plain_ram()?;
            let src = plain.as_slice::<f32>()?;
            par_output(x.shape(), 1, work, |first, chunk| {
                self.run(Some(&src[first..first + chunk.len()]), chunk);
                Ok(())
            })?
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Pointwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(inputs[0].without_value()))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let count: TDim = inputs[0].shape.iter().product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            count * self.steps.len()
        )))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        // Elementwise with scalar operands: any layout of `x` will do.
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }

    as_op!();
}

impl Pointwise {
    /// The program over `dst`: in place when `src` is `None`, else from
    /// `src` (as long as `dst`).
    fn run(&self, src: Option<&[f32]>, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2, checked just above.
            #[allow(unsafe_code)]
            unsafe {
                return match &self.hard_swish {
                    Some(h) => x86::hard_swish(h, src, dst),
                    None => self.run_avx2(src, dst),
                };
            }
        }
        self.run_blocks(src, dst)
    }

    /// [`Pointwise::run_blocks`] compiled for AVX2: this crate is built for
    /// baseline x86-64 (SSE2) unless a board profile says otherwise, and
    /// every step is a loop the compiler vectorizes.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, src: Option<&[f32]>, dst: &mut [f32]) {
        self.run_blocks(src, dst)
    }

    #[inline(always)]
    fn run_blocks(&self, src: Option<&[f32]>, dst: &mut [f32]) {
        let mut values = [[0f32; BLOCK]; MAX_STEPS + 1];
        let last = self.steps.len();
        for (k, out) in dst.chunks_mut(BLOCK).enumerate() {
            let n = out.len();
            match src {
                Some(src) => values[0][..n].copy_from_slice(&src[k * BLOCK..][..n]),
                None => values[0][..n].copy_from_slice(out),
            }
            for (i, step) in self.steps.iter().enumerate() {
                let (done, rest) = values.split_at_mut(i + 1);
                let d = &mut rest[0][..n];
                match (step.a, step.b) {
                    (Arg::Value(a), Arg::Value(b)) => {
                        both(step.fun, d, &done[a][..n], &done[b][..n])
                    }
                    (Arg::Value(a), Arg::Scalar(s)) => {
                        scalar_right(step.fun, d, &done[a][..n], f32::from_bits(s))
                    }
                    (Arg::Scalar(s), Arg::Value(b)) => {
                        scalar_left(step.fun, d, f32::from_bits(s), &done[b][..n])
                    }
                    // `program` never makes one.
                    (Arg::Scalar(_), Arg::Scalar(_)) => unreachable!("a step of two constants"),
                }
            }
            out.copy_from_slice(&values[last][..n]);
        }
    }
}

/// tract's f32 kernels (tract-core's `ops/math`), each its own
/// monomorphic loop so that every one vectorizes.
macro_rules! dispatch {
    ($fun:expr, $with:ident($($arg:expr),*)) => {
        match $fun {
            Fun::Add => $with($($arg,)* |a: f32, b: f32| a + b),
            Fun::Sub => $with($($arg,)* |a: f32, b: f32| a - b),
            Fun::Mul => $with($($arg,)* |a: f32, b: f32| a * b),
            Fun::Div => $with($($arg,)* |a: f32, b: f32| a / b),
            Fun::Min => $with($($arg,)* |a: f32, b: f32| a.min(b)),
            Fun::Max => $with($($arg,)* |a: f32, b: f32| a.max(b)),
        }
    };
}

#[inline(always)]
fn both(fun: Fun, d: &mut [f32], a: &[f32], b: &[f32]) {
    #[inline(always)]
    fn with(d: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
        for ((d, a), b) in d.iter_mut().zip(a).zip(b) {
            *d = f(*a, *b);
        }
    }
    dispatch!(fun, with(d, a, b))
}

#[inline(always)]
fn scalar_right(fun: Fun, d: &mut [f32], a: &[f32], s: f32) {
    #[inline(always)]
    fn with(d: &mut [f32], a: &[f32], s: f32, f: impl Fn(f32, f32) -> f32) {
        for (d, a) in d.iter_mut().zip(a) {
            *d = f(*a, s);
        }
    }
    dispatch!(fun, with(d, a, s))
}

#[inline(always)]
fn scalar_left(fun: Fun, d: &mut [f32], s: f32, b: &[f32]) {
    #[inline(always)]
    fn with(d: &mut [f32], s: f32, b: &[f32], f: impl Fn(f32, f32) -> f32) {
        for (d, b) in d.iter_mut().zip(b) {
            *d = f(s, *b);
        }
    }
    dispatch!(fun, with(d, s, b))
}

/// [`HardSwish`] on AVX2, eight values at a time, all in registers.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::HardSwish;

    /// # Safety
    /// The processor must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn hard_swish(h: &HardSwish, src: Option<&[f32]>, dst: &mut [f32]) {
        let splat = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let (shift, low, high) = (splat(h.shift), splat(h.low), splat(h.high));
        let pre_mul = h.pre_mul.map(splat);
        let pre_add = h.pre_add.map(splat);
        let post_mul = h.post_mul.map(splat);
        let post_add = h.post_add.map(splat);
        let eval = |x: __m256| {
            let mut v = x;
            if let Some(m) = pre_mul {
                v = _mm256_mul_ps(v, m);
            }
            if let Some(a) = pre_add {
                v = _mm256_add_ps(v, a);
            }
            let mut g = _mm256_add_ps(v, shift);
            g = if h.max_first {
                min(max(g, low), high)
            } else {
                max(min(g, high), low)
            };
            let mut y = _mm256_mul_ps(v, g);
            if let Some(m) = post_mul {
                y = _mm256_mul_ps(y, m);
            }
            if let Some(a) = post_add {
                y = _mm256_add_ps(y, a);
            }
            y
        };
        let len = dst.len();
        let full = len - len % 8;
        for at in (0..full).step_by(8) {
            let from = match src {
                Some(src) => src[at..at + 8].as_ptr(),
                None => dst[at..at + 8].as_ptr(),
            };
            // SAFETY: `from` and `dst[at..]` hold eight values.
            unsafe {
                let y = eval(_mm256_loadu_ps(from));
                _mm256_storeu_ps(dst[at..at + 8].as_mut_ptr(), y);
            }
        }
        if full < len {
            let mut tail = [0f32; 8];
            let n = len - full;
            match src {
                Some(src) => tail[..n].copy_from_slice(&src[full..]),
                None => tail[..n].copy_from_slice(&dst[full..]),
            }
            // SAFETY: `tail` holds eight values.
            unsafe {
                let y = eval(_mm256_loadu_ps(tail.as_ptr()));
                _mm256_storeu_ps(tail.as_mut_ptr(), y);
            }
            dst[full..].copy_from_slice(&tail[..n]);
        }
    }

    /// `f32::max(a, b)`, which returns `a` on a tie (±0) and the operand
    /// that is not NaN; `maxps` returns its second operand on a tie and
    /// whenever either is NaN.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(_mm256_max_ps(b, a), b, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
    }

    /// `f32::min(a, b)`, as [`max`].
    #[target_feature(enable = "avx2")]
    #[inline]
    fn min(a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(_mm256_min_ps(b, a), b, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
    }
}

/// Replaces every region (see the module's notes) with a [`Pointwise`]
/// node. Returns how many it replaced.
pub fn lower(model: &mut TypedModel) -> TractResult<usize> {
    if !enabled() {
        return Ok(0);
    }
    fuse(model)
}

/// Unless this build has debug assertions or `EDGEFLEET_POINTWISE=tract`
/// ([`crate::lowering::enabled`]).
fn enabled() -> bool {
    crate::lowering::enabled("EDGEFLEET_POINTWISE")
}

fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let order = model.eval_order()?;
    let mut position = vec![usize::MAX; model.nodes.len()];
    for (i, &id) in order.iter().enumerate() {
        position[id] = i;
    }
    let mut taken = vec![false; model.nodes.len()];
    let mut regions = Vec::new();
    for &id in &order {
        // A region's output may start another region (a hard-swish whose
        // output is read elsewhere too, then another on it).
        if taken[id] && !regions.iter().any(|r: &Region| r.output == id) {
            continue;
        }
        for slot in 0..model.nodes[id].outputs.len() {
            let root = OutletId::new(id, slot);
            if let Some(region) = region(model, root, &position, &taken)? {
                for &member in &region.members {
                    taken[member] = true;
                }
                regions.push(region);
                break;
            }
        }
    }
    // A region's root may be an earlier region's output, which its
    // patch replaced.
    let mut moved: HashMap<OutletId, OutletId> = HashMap::new();
    for region in &regions {
        let mut patch = TypedModelPatch::default();
        let root = moved.get(&region.root).copied().unwrap_or(region.root);
        let x = patch.tap_model(model, root)?;
        let name = format!("{}.pointwise", model.nodes[region.output].name);
        let y = patch.wire_node(&name, region.op.clone(), &[x])?[0];
        let output = OutletId::new(region.output, 0);
        patch.shunt_outside(model, output, y)?;
        patch.apply(model)?;
        moved.insert(output, OutletId::new(model.node_id_by_name(&name)?, 0));
    }
    // The replaced nodes are unreachable now; codegen compacts them away.
    Ok(regions.len())
}

struct Region {
    root: OutletId,
    /// In evaluation order.
    members: Vec<usize>,
    /// The one member read from outside the region.
    output: usize,
    op: Pointwise,
}

/// The elementwise expression of `root` starting at it, when it is one to
/// replace.
fn region(
    model: &TypedModel,
    root: OutletId,
    position: &[usize],
    taken: &[bool],
) -> TractResult<Option<Region>> {
    let fact = model.outlet_fact(root)?;
    if fact.datum_type != f32::datum_type() || fact.shape.as_concrete().is_none() {
        return Ok(None);
    }
    // Candidates in evaluation order: an input from later in the order can
    // not join any more once a node is visited.
    let mut candidates = BTreeSet::new();
    let push_successors = |candidates: &mut BTreeSet<(usize, usize)>, outlet: OutletId| {
        for succ in model.outlet_successors(outlet) {
            candidates.insert((position[succ.node], succ.node));
        }
    };
    push_successors(&mut candidates, root);
    let mut members: Vec<usize> = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let value_of = |members: &[usize], outlet: OutletId| -> Option<usize> {
        if outlet == root {
            Some(0)
        } else if outlet.slot == 0 {
            members
                .iter()
                .position(|&m| m == outlet.node)
                .map(|i| i + 1)
        } else {
            None
        }
    };
    while let Some((_, id)) = candidates.pop_first() {
        let node = &model.nodes[id];
        if taken[id]
            || node.outputs.len() != 1
            || node.outputs[0].fact.datum_type != f32::datum_type()
            || node.outputs[0].fact.shape != fact.shape
        {
            continue;
        }
        let Some(step) = step(model, node, |outlet| value_of(&members, outlet))? else {
            continue;
        };
        if steps.len() == MAX_STEPS {
            break;
        }
        steps.push(step);
        members.push(id);
        push_successors(&mut candidates, OutletId::new(id, 0));
    }
    // The longest prefix (in evaluation order) that is an expression: only
    // its last member is read from outside it (or is a model output), and
    // it is worth a node.
    let outputs = model.output_outlets()?;
    for len in (2..=members.len()).rev() {
        let prefix = &members[..len];
        let escapes = |&m: &usize| {
            let outlet = &model.nodes[m].outputs[0];
            outputs.contains(&OutletId::new(m, 0))
                || outlet.successors.is_empty()
                || outlet.successors.iter().any(|s| !prefix.contains(&s.node))
        };
        if prefix[..len - 1].iter().any(escapes) || !worth_it(&steps[..len]) {
            continue;
        }
        return Ok(Some(Region {
            root,
            members: prefix.to_vec(),
            output: prefix[len - 1],
            op: Pointwise::new(steps[..len].to_vec()),
        }));
    }
    Ok(None)
}

/// Where tract's chains would take several passes: some value is read by
/// two steps. A straight chain it runs in one pass already, or folds into
/// the matrix product before it.
fn worth_it(steps: &[Step]) -> bool {
    let mut reads = vec![0usize; steps.len() + 1];
    for step in steps {
        for arg in [step.a, step.b] {
            if let Arg::Value(v) = arg {
                reads[v] += 1;
            }
        }
    }
    reads.iter().any(|&r| r >= 2)
}

/// Node `node` as a step, when its op is one and each operand is a value
/// of the program (`value_of`) or a scalar constant.
fn step(
    model: &TypedModel,
    node: &TypedNode,
    value_of: impl Fn(OutletId) -> Option<usize>,
) -> TractResult<Option<Step>> {
    // Declutter writes `x * x` as `Square` and `a / x` as `a * Recip(x)`:
    // tract's f32 kernels for those are `x.powi(2)` (`x * x`) and
    // `x.recip()` (`1 / x`).
    if let Some(op) = node.op_as::<ElementWiseOp>() {
        let Some(v) = value_of(node.inputs[0]) else {
            return Ok(None);
        };
        let v = Arg::Value(v);
        return Ok(if op.1.is_some() {
            None
        } else if op.0.is::<Square>() {
            Some(Step {
                fun: Fun::Mul,
                a: v,
                b: v,
            })
        } else if op.0.is::<Recip>() {
            Some(Step {
                fun: Fun::Div,
                a: Arg::Scalar(1f32.to_bits()),
                b: v,
            })
        } else {
            None
        });
    }
    let Some((fun, swapped)) = node.op_as::<TypedBinOp>().and_then(Fun::of) else {
        return Ok(None);
    };
    if node.inputs.len() != 2 {
        return Ok(None);
    }
    let mut args = [Arg::Value(0); 2];
    for (arg, &input) in args.iter_mut().zip(&node.inputs) {
        *arg = if let Some(v) = value_of(input) {
            Arg::Value(v)
        } else if let Some(s) = scalar(model, input)? {
            Arg::Scalar(s.to_bits())
        } else {
            return Ok(None);
        };
    }
    if args.iter().all(|a| matches!(a, Arg::Scalar(_))) {
        return Ok(None);
    }
    if swapped {
        args.swap(0, 1);
    }
    Ok(Some(Step {
        fun,
        a: args[0],
        b: args[1],
    }))
}

/// The value of a one-element f32 constant at `outlet`.
fn scalar(model: &TypedModel, outlet: OutletId) -> TractResult<Option<f32>> {
    let fact = model.outlet_fact(outlet)?;
    Ok(match &fact.konst {
        Some(k) if k.datum_type() == f32::datum_type() && k.len() == 1 => {
            Some(k.try_as_plain_ram()?.as_slice::<f32>()?[0])
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use tract_nnef::tract_core::ops::math;

    use super::*;
    use crate::test_rng::Lcg;

    fn bin(fun: usize) -> TypedBinOp {
        match fun {
            0 => math::add(),
            1 => math::sub(),
            2 => TypedBinOp(Box::new(SubF), None),
            3 => math::mul(),
            4 => math::min(),
            5 => math::max(),
            _ => math::div(),
        }
    }

    fn scalar_const(model: &mut TypedModel, rank: usize, v: f32) -> TractResult<OutletId> {
        let name = format!("c{}", model.nodes.len());
        model.add_const(name, tensor0(v).broadcast_into_rank(rank)?)
    }

    /// hard-swish as ONNX exporters write it and declutter leaves it:
    /// `x * min(max(x + 3, 0), 6) * (1/6)`.
    fn hard_swish(model: &mut TypedModel, x: OutletId, name: &str) -> TractResult<OutletId> {
        let rank = model.outlet_fact(x)?.rank();
        let c = |m: &mut TypedModel, v| scalar_const(m, rank, v);
        let (three, zero, six, sixth) = (
            c(model, 3.0)?,
            c(model, 0.0)?,
            c(model, 6.0)?,
            c(model, 1.0 / 6.0)?,
        );
        let t = model.wire_node(format!("{name}.add"), math::add(), &[x, three])?[0];
        let t = model.wire_node(format!("{name}.max"), math::max(), &[t, zero])?[0];
        let t = model.wire_node(format!("{name}.min"), math::min(), &[t, six])?[0];
        let t = model.wire_node(format!("{name}.mul"), math::mul(), &[x, t])?[0];
        Ok(model.wire_node(format!("{name}.scale"), math::mul(), &[t, sixth])?[0])
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<TVec<Tensor>> {
        let plan = model.into_runnable()?;
        let out = plan.run(tvec!(input.clone().into_tvalue()))?;
        Ok(out.into_iter().map(|t| t.into_tensor()).collect())
    }

    fn input(shape: &[usize], rng: &mut Lcg) -> TractResult<Tensor> {
        let len = shape.iter().product();
        // Exact zeros and the constants' neighbourhood included.
        let values: Vec<f32> = (0..len).map(|_| rng.centred(250.0)).collect();
        tensor1(&values).into_shape(shape)
    }

    fn same_bits(ours: &Tensor, tracts: &Tensor, what: &str) -> TractResult<()> {
        assert_eq!(ours.shape(), tracts.shape(), "{what}");
        let (a, b) = (
            ours.to_plain_array_view::<f32>()?,
            tracts.to_plain_array_view::<f32>()?,
        );
        for (i, (a, b)) in a.iter().zip(b.iter()).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{what}: element {i} is {a}, tract's {b}"
            );
        }
        Ok(())
    }

    /// tract's own declutter and codegen of `model`, and the same with
    /// [`fuse`] between them, as a load runs it: the same outputs bit for
    /// bit. Returns how many regions were fused.
    fn compare(model: TypedModel, input: &Tensor, what: &str) -> TractResult<usize> {
        let tracts = run(model.clone().into_optimized()?, input)?;
        let mut ours = model;
        crate::optimizer::declutter(&mut ours)?;
        let fused = fuse(&mut ours)?;
        crate::optimizer::optimize(&mut ours)?;
        let kept = ours.nodes.iter().filter(|n| n.op_is::<Pointwise>()).count();
        assert_eq!(kept, fused, "{what}: codegen dropped a Pointwise node");
        // And with every hard-swish run as a program of steps.
        let mut steps = ours.clone();
        for node in &mut steps.nodes {
            if let Some(op) = node.op_as_mut::<Pointwise>() {
                op.hard_swish = None;
            }
        }
        for (model, how) in [(ours, "as compiled"), (steps, "as steps")] {
            let ours = run(model, input)?;
            assert_eq!(ours.len(), tracts.len());
            for (o, t) in ours.iter().zip(&tracts) {
                same_bits(o, t, &format!("{what}, {how}"))?;
            }
        }
        Ok(fused)
    }

    /// Random programs of every op with value and constant operands on
    /// either side, each reading `x` twice, on shapes shorter and longer
    /// than a block.
    #[test]
    fn every_program_computes_what_tracts_ops_compute() -> TractResult<()> {
        let mut rng = Lcg(11);
        let shapes: [&[usize]; 5] = [&[7], &[2, 3, 5, 7], &[BLOCK], &[1, 16, 9, 11], &[3, 1000]];
        for case in 0..200 {
            let shape = shapes[case % shapes.len()];
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(shape))?;
            let mut values = vec![x];
            let steps = 2 + rng.below(MAX_STEPS - 1);
            for k in 0..steps {
                // Each step reads the one before (so none is left unread)
                // and the last reads `x` again (so `x` is read twice).
                let a = values[k];
                let b = if k + 1 == steps && k > 0 {
                    x
                } else if rng.below(2) == 0 {
                    values[rng.below(values.len())]
                } else {
                    scalar_const(&mut model, shape.len(), rng.centred(250.0))?
                };
                let (a, b) = if rng.below(2) == 0 { (a, b) } else { (b, a) };
                // Declutter makes a division by a value a `Recip` and a
                // product, and `Recip` is not one of the steps.
                let divisor_is_scalar = model.outlet_fact(b)?.konst.is_some();
                let op = bin(rng.below(if divisor_is_scalar { 7 } else { 6 }));
                let v = model.wire_node(format!("s{k}"), op, &[a, b])?[0];
                values.push(v);
            }
            model.select_output_outlets(&[*values.last().unwrap()])?;
            let input = input(shape, &mut rng)?;
            let what = format!("case {case}, {steps} steps over {shape:?}");
            assert_eq!(compare(model.clone(), &input, &what)?, 1, "{what}");

            // `x` read outside the region too: the node must not write
            // over it.
            model.select_output_outlets(&[*values.last().unwrap(), x])?;
            assert_eq!(compare(model, &input, &what)?, 1, "{what}, x shared");
        }
        Ok(())
    }

    /// hard-swish with every pre and post affine map, either clip order,
    /// products and sums with the constant on either side: each is
    /// recognized as one, and computes what tract computes, on ordinary
    /// values and on ±0, ±inf, NaN and the clip's edges.
    #[test]
    fn every_hard_swish_form_computes_what_tracts_ops_compute() -> TractResult<()> {
        let mut rng = Lcg(13);
        let shape = [2, 3, 7, 5];
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -3.0,
            3.0,
            -6.0,
        ];
        let values: Vec<f32> = (0..shape.iter().product())
            .map(|i| {
                special
                    .get(i)
                    .copied()
                    .unwrap_or_else(|| rng.centred(250.0))
            })
            .collect();
        let input = tensor1(&values).into_shape(&shape)?;
        let affines: [&[(usize, bool)]; 6] = [
            &[],
            &[(3, false)],
            &[(3, true)],
            &[(0, false)],
            &[(1, false)],
            &[(3, false), (0, true)],
        ];
        let mut case = 0;
        for pre in affines {
            for post in affines {
                for max_first in [true, false] {
                    case += 1;
                    let mut model = TypedModel::default();
                    let x = model.add_source("x", f32::fact(shape))?;
                    let mut affine =
                        |m: &mut TypedModel, v: OutletId, steps: &[(usize, bool)], at: &str| {
                            steps
                                .iter()
                                .enumerate()
                                .try_fold(v, |v, (i, &(fun, flip))| {
                                    let c = scalar_const(m, 4, rng.centred(250.0))?;
                                    let ins = if flip { [c, v] } else { [v, c] };
                                    Ok::<_, TractError>(
                                        m.wire_node(format!("{at}{i}"), bin(fun), &ins)?[0],
                                    )
                                })
                        };
                    let v = affine(&mut model, x, pre, "pre")?;
                    let three = scalar_const(&mut model, 4, 3.0)?;
                    let g = model.wire_node("shift", math::add(), &[v, three])?[0];
                    let (low, high) = (
                        scalar_const(&mut model, 4, 0.0)?,
                        scalar_const(&mut model, 4, 6.0)?,
                    );
                    let g = if max_first {
                        let g = model.wire_node("max", math::max(), &[g, low])?[0];
                        model.wire_node("min", math::min(), &[g, high])?[0]
                    } else {
                        let g = model.wire_node("min", math::min(), &[g, high])?[0];
                        model.wire_node("max", math::max(), &[g, low])?[0]
                    };
                    let y = model.wire_node("gate", math::mul(), &[g, v])?[0];
                    let y = affine(&mut model, y, post, "post")?;
                    model.select_output_outlets(&[y])?;
                    let what =
                        format!("case {case}: pre {pre:?}, post {post:?}, max first {max_first}");
                    let mut lowered = model.clone();
                    crate::optimizer::declutter(&mut lowered)?;
                    assert_eq!(fuse(&mut lowered)?, 1, "{what}");
                    let op = lowered
                        .nodes
                        .iter()
                        .find_map(|n| n.op_as::<Pointwise>())
                        .unwrap();
                    assert!(op.hard_swish.is_some(), "{what}: {:?}", op.steps);
                    assert_eq!(compare(model, &input, &what)?, 1, "{what}");
                }
            }
        }
        Ok(())
    }

    #[cfg(feature = "threads")]
    #[test]
    fn a_program_split_over_threads_computes_what_tract_computes() -> TractResult<()> {
        use tract_nnef::tract_core::tract_linalg::multithread::{
            Executor, multithread_tract_scope,
        };
        let mut rng = Lcg(5);
        let shape = [1, 16, 48, 161];
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape))?;
        let y = hard_swish(&mut model, x, "hs")?;
        model.select_output_outlets(&[y])?;
        let input = input(&shape, &mut rng)?;
        let fused = multithread_tract_scope(Executor::multithread(2), || {
            compare(model, &input, "two threads")
        })?;
        assert_eq!(fused, 1);
        Ok(())
    }

    #[test]
    fn only_expressions_reading_a_value_twice_are_fused() -> TractResult<()> {
        let mut rng = Lcg(3);
        let shape = [1, 4, 6, 6];
        let input = input(&shape, &mut rng)?;
        let source = |m: &mut TypedModel| m.add_source("x", f32::fact(shape));

        // hard-swish: fused, and nothing of it is left to tract.
        let mut model = TypedModel::default();
        let x = source(&mut model)?;
        let y = hard_swish(&mut model, x, "hs")?;
        model.select_output_outlets(&[y])?;
        assert_eq!(compare(model.clone(), &input, "hard-swish")?, 1);
        crate::optimizer::declutter(&mut model)?;
        fuse(&mut model)?;
        crate::optimizer::optimize(&mut model)?;
        let ops: Vec<String> = model
            .nodes
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        assert_eq!(ops, ["Source", "Pointwise"], "{ops:?}");

        // One after the other: one expression.
        let mut model = TypedModel::default();
        let x = source(&mut model)?;
        let y = hard_swish(&mut model, x, "a")?;
        let y = hard_swish(&mut model, y, "b")?;
        model.select_output_outlets(&[y])?;
        assert_eq!(compare(model, &input, "hard-swish twice")?, 1);

        // ... unless the first's output is read elsewhere too: then each
        // is an expression of its own, the second starting at the first's
        // output.
        let mut model = TypedModel::default();
        let x = source(&mut model)?;
        let y = hard_swish(&mut model, x, "a")?;
        let b = model.add_const("b", tensor1(&[1f32, 2., 3., 4.]).into_shape(&[1, 4, 1, 1])?)?;
        let side = model.wire_node("side", math::add(), &[y, b])?[0];
        let y = hard_swish(&mut model, y, "b")?;
        model.select_output_outlets(&[y, side])?;
        assert_eq!(compare(model, &input, "hard-swish twice, read between")?, 2);

        // A straight chain: tract's codegen runs it in one pass already.
        let mut model = TypedModel::default();
        let x = source(&mut model)?;
        let one = scalar_const(&mut model, 4, 1.0)?;
        let t = model.wire_node("add", math::add(), &[x, one])?[0];
        let two = scalar_const(&mut model, 4, 2.0)?;
        let t = model.wire_node("mul", math::mul(), &[t, two])?[0];
        model.select_output_outlets(&[t])?;
        assert_eq!(compare(model, &input, "chain")?, 0);

        // An intermediate read from outside: it would have to be written.
        let mut model = TypedModel::default();
        let x = source(&mut model)?;
        let y = hard_swish(&mut model, x, "hs")?;
        let clipped = model.node_id_by_name("hs.min")?;
        model.select_output_outlets(&[y, OutletId::new(clipped, 0)])?;
        assert_eq!(compare(model, &input, "intermediate output")?, 0);

        // A per-channel operand is not a scalar: the `x + b` step breaks
        // the expression into straight chains.
        let mut model = TypedModel::default();
        let x = source(&mut model)?;
        let b = model.add_const("b", tensor1(&[1f32, 2., 3., 4.]).into_shape(&[1, 4, 1, 1])?)?;
        let t = model.wire_node("add", math::add(), &[x, b])?[0];
        let zero = scalar_const(&mut model, 4, 0.0)?;
        let t = model.wire_node("max", math::max(), &[t, zero])?[0];
        let t = model.wire_node("mul", math::mul(), &[x, t])?[0];
        model.select_output_outlets(&[t])?;
        assert_eq!(compare(model, &input, "per-channel operand")?, 0);

        // Not f32.
        let mut model = TypedModel::default();
        let x = model.add_source("x", i32::fact(shape))?;
        let one = model.add_const("one", tensor0(1i32).broadcast_into_rank(4)?)?;
        let t = model.wire_node("add", math::add(), &[x, one])?[0];
        let t = model.wire_node("mul", math::mul(), &[x, t])?[0];
        model.select_output_outlets(&[t])?;
        assert_eq!(fuse(&mut model)?, 0);
        Ok(())
    }
}

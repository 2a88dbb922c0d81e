//! tract's `PropConst` pass, with the f32 arithmetic of large constants
//! done by plain loops.
//!
//! Declutter folds a `BatchNormalization` (and any per-channel `Mul`,
//! `Add`, `Sub` or `Div`) into the convolution before it by wiring the
//! kernel times a per-output-channel operand, `[O, I, KH, KW]` by
//! `[O, 1, 1, 1]`; `PropConst` then evaluates that product. tract's binary
//! ops evaluate a broadcast operand through ndarray's `Zip`, element by
//! element with an index walk: on ResNet-18's 11 M weights that took about
//! half of the whole declutter (`perf`, docs/architectures.md). Here such
//! a node, when tract's pass would fold it, is folded first by [`eval`]:
//! the axes merged into runs, each run an inner loop over slices. The
//! values are the same bits (one IEEE operation per element either way);
//! everything else, and every other node, is tract's pass. Folding is
//! confluent, so the graph that comes out is the one tract's declutter
//! builds (the driver's tests compare them node for node).

use std::fmt;

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::konst::Const;
use tract_nnef::tract_core::ops::math::{Add, Div, Mul, Sub};
use tract_nnef::tract_core::optim::{CONST_FOLD_MEM_BUDGET, OptimizerSession, TypedPass};

/// How `format!("{pass:?}")` starts for tract's pass, which this wraps.
pub(super) const NAME: &str = "PropConst";

#[cfg(test)]
thread_local! {
    /// Nodes folded here rather than by tract's pass, on this thread.
    pub(super) static FOLDED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Below this many output values tract's own evaluation is as good.
const LARGE: usize = 1 << 12;

/// tract's pass (its type is private to tract: the optimizer's own
/// instance), after the large f32 folds of this one.
#[derive(Clone)]
pub(super) struct PropConst {
    tract: Box<dyn TypedPass>,
    from: usize,
}

impl PropConst {
    pub(super) fn wrapping(tract: Box<dyn TypedPass>) -> PropConst {
        PropConst { tract, from: 0 }
    }
}

impl fmt::Debug for PropConst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NAME)
    }
}

impl TypedPass for PropConst {
    fn reset(&mut self) -> TractResult<()> {
        self.from = 0;
        self.tract.reset()
    }

    fn next(
        &mut self,
        session: &mut OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        while self.from < model.nodes.len() {
            let node = &model.nodes[self.from];
            self.from += 1;
            if let Some(value) = foldable(model, node)? {
                #[cfg(test)]
                FOLDED.with(|n| n.set(n.get() + 1));
                let mut patch = TypedModelPatch::default();
                let wire =
                    patch.wire_node(&node.name, Const::new(value.into_arc_tensor())?, &[])?[0];
                patch.shunt_outside(model, node.id.into(), wire)?;
                // Its readers now read a constant: look at them again,
                // wherever they are (a node a patch wired has a higher id
                // than the original nodes that read it).
                for inlet in &node.outputs[0].successors {
                    self.from = self.from.min(inlet.node);
                }
                return Ok(Some(patch));
            }
        }
        let patch = self.tract.next(session, model)?;
        // What tract folds makes constants of the inputs of the nodes that
        // read it: look at those again.
        if let Some(p) = &patch {
            for outlet in p.shunts.keys() {
                for inlet in &model.nodes[outlet.node].outputs[outlet.slot].successors {
                    self.from = self.from.min(inlet.node);
                }
            }
        }
        Ok(patch)
    }
}

/// The value of a large f32 arithmetic node whose inputs are constants,
/// where tract's `PropConst` would fold it (its conditions: every input a
/// constant read only by this node or within the fold memory budget, and
/// an output no larger than its inputs or that budget).
fn foldable(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Tensor>> {
    let Some(bin) = node.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let Some(kind) = Kind::of(bin) else {
        return Ok(None);
    };
    // A node already shunted (its output read by nothing and not a model
    // output) is left for compaction.
    let out = OutletId::new(node.id, 0);
    if node.outputs[0].successors.is_empty() && !model.outputs.contains(&out) {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    if facts.len() != 2 || node.outputs[0].fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(2);
    for (fact, outlet) in facts.iter().zip(&node.inputs) {
        let Some(k) = &fact.konst else {
            return Ok(None);
        };
        let sole = model.node(outlet.node).outputs[outlet.slot]
            .successors
            .len()
            == 1;
        let within = (k.volume() * 4) as u64 <= CONST_FOLD_MEM_BUDGET;
        if k.datum_type() != f32::datum_type() || !k.is_plain_ram() || !(sole || within) {
            return Ok(None);
        }
        values.push(k.clone());
    }
    let (a, b) = (&values[0], &values[1]);
    let Ok(shape) = tract_nnef::tract_core::broadcast::multi_broadcast(&[a.shape(), b.shape()])
    else {
        return Ok(None);
    };
    let volume: usize = shape.iter().product();
    let input_mem = ((a.volume() + b.volume()) * 4) as u64;
    if volume < LARGE || (volume * 4) as u64 > input_mem.max(CONST_FOLD_MEM_BUDGET) {
        return Ok(None);
    }
    let a_plain = a.try_as_plain_ram()?;
    let b_plain = b.try_as_plain_ram()?;
    let mut out = vec![0f32; volume];
    eval(
        kind,
        (a.shape(), a_plain.as_slice::<f32>()?),
        (b.shape(), b_plain.as_slice::<f32>()?),
        &shape,
        &mut out,
    );
    Ok(Some(Tensor::from_shape(&shape, &out)?))
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Add,
    Sub,
    Mul,
    Div,
}

impl Kind {
    fn of(bin: &TypedBinOp) -> Option<Kind> {
        if bin.1.is_some_and(|dt| dt != f32::datum_type()) {
            return None;
        }
        let op = &bin.0;
        Some(if op.is::<Add>() {
            Kind::Add
        } else if op.is::<Sub>() {
            Kind::Sub
        } else if op.is::<Mul>() {
            Kind::Mul
        } else if op.is::<Div>() {
            Kind::Div
        } else {
            return None;
        })
    }

    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Kind::Add => a + b,
            Kind::Sub => a - b,
            Kind::Mul => a * b,
            Kind::Div => a / b,
        }
    }
}

/// `out = a ∘ b` over the broadcast `shape`, row-major. Axes are merged
/// into runs along which each operand either advances (it has that axis)
/// or stays (it is broadcast there); the innermost run is a loop over
/// slices, the outer runs an index walk.
fn eval(
    kind: Kind,
    a: (&[usize], &[f32]),
    b: (&[usize], &[f32]),
    shape: &[usize],
    out: &mut [f32],
) {
    // Per axis: (length, a advances, b advances), axes of length 1 dropped.
    let rank = shape.len();
    let padded = |s: &[usize], i: usize| -> usize {
        let lead = rank - s.len();
        if i < lead { 1 } else { s[i - lead] }
    };
    let mut runs: Vec<(usize, bool, bool)> = Vec::new();
    for (i, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let kinds = (padded(a.0, i) == n, padded(b.0, i) == n);
        match runs.last_mut() {
            Some((len, ka, kb)) if (*ka, *kb) == kinds => *len *= n,
            _ => runs.push((n, kinds.0, kinds.1)),
        }
    }
    let Some(&(inner, a_moves, b_moves)) = runs.last() else {
        out[0] = kind.apply(a.1[0], b.1[0]);
        return;
    };
    let outer = &runs[..runs.len() - 1];
    // Each operand's stride (in values) per outer run: the product of the
    // runs after it along which it advances.
    let strides = |moves: fn(&(usize, bool, bool)) -> bool| -> Vec<usize> {
        let mut s = vec![0; outer.len()];
        let mut step = if moves(&runs[runs.len() - 1]) {
            inner
        } else {
            1
        };
        for i in (0..outer.len()).rev() {
            if moves(&outer[i]) {
                s[i] = step;
                step *= outer[i].0;
            }
        }
        s
    };
    let (sa, sb) = (strides(|r| r.1), strides(|r| r.2));
    let mut index = vec![0usize; outer.len()];
    let (mut ia, mut ib) = (0usize, 0usize);
    for row in out.chunks_exact_mut(inner) {
        match (a_moves, b_moves) {
            (true, true) => {
                let (ra, rb) = (&a.1[ia..ia + inner], &b.1[ib..ib + inner]);
                for ((o, &x), &y) in row.iter_mut().zip(ra).zip(rb) {
                    *o = kind.apply(x, y);
                }
            }
            (true, false) => {
                let y = b.1[ib];
                for (o, &x) in row.iter_mut().zip(&a.1[ia..ia + inner]) {
                    *o = kind.apply(x, y);
                }
            }
            (false, true) => {
                let x = a.1[ia];
                for (o, &y) in row.iter_mut().zip(&b.1[ib..ib + inner]) {
                    *o = kind.apply(x, y);
                }
            }
            (false, false) => {
                unreachable!("a run along which neither operand advances has length 1")
            }
        }
        // The next outer index, odometer-wise.
        for i in (0..outer.len()).rev() {
            index[i] += 1;
            ia += sa[i];
            ib += sb[i];
            if index[i] < outer[i].0 {
                break;
            }
            ia -= sa[i] * outer[i].0;
            ib -= sb[i] * outer[i].0;
            index[i] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_nnef::tract_core::ops::math;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        // Odd divisors: quotients and sums that round.
        let v: Vec<f32> = crate::test_rng::Lcg(seed).values(n, 37.0);
        Tensor::from_shape(shape, &v).unwrap()
    }

    /// tract's declutter and codegen each still have the pass this wraps
    /// (a tract upgrade that renamed it would otherwise leave the slow
    /// folds in place without a word).
    #[test]
    fn tracts_optimizers_have_the_pass_this_wraps() {
        use tract_nnef::tract_core::optim::Optimizer;
        for passes in [Optimizer::declutter().passes, Optimizer::codegen().passes] {
            let names: Vec<String> = passes.iter().map(|p| format!("{p:?}")).collect();
            let n = names.iter().filter(|n| n.starts_with(NAME)).count();
            assert_eq!(n, 1, "{names:?}");
        }
    }

    /// Every op on broadcast shapes of each kind, against tract's own
    /// evaluation, bit for bit.
    #[test]
    fn the_loops_give_tracts_values_bit_for_bit() {
        let pairs: [(&[usize], &[usize]); 9] = [
            (&[64, 32, 3, 3], &[64, 1, 1, 1]),
            (&[64, 32, 3, 3], &[64, 32, 3, 3]),
            (&[1, 64, 28, 28], &[1, 64, 1, 1]),
            (&[1, 64, 28, 28], &[28]),
            (&[8, 1, 5, 7], &[1, 6, 1, 7]),
            (&[1, 16, 1], &[1, 16, 300]),
            (&[300], &[1]),
            (&[4, 1, 1], &[4, 5, 6]),
            (&[1], &[1]),
        ];
        for (i, (sa, sb)) in pairs.iter().enumerate() {
            for (j, (kind, op)) in [
                (Kind::Add, math::add()),
                (Kind::Sub, math::sub()),
                (Kind::Mul, math::mul()),
                (Kind::Div, math::div()),
            ]
            .into_iter()
            .enumerate()
            {
                for (a, b) in [(sa, sb), (sb, sa)] {
                    let ta = random(a, (i * 8 + j) as u64);
                    let tb = random(b, (i * 8 + j + 100) as u64);
                    let shape = tract_nnef::tract_core::broadcast::multi_broadcast(&[
                        ta.shape(),
                        tb.shape(),
                    ])
                    .unwrap();
                    let mut out = vec![0f32; shape.iter().product()];
                    eval(
                        kind,
                        (
                            ta.shape(),
                            ta.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
                        ),
                        (
                            tb.shape(),
                            tb.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
                        ),
                        &shape,
                        &mut out,
                    );
                    let theirs =
                        op.0.eval(
                            ta.clone().into_tvalue(),
                            tb.clone().into_tvalue(),
                            f32::datum_type(),
                        )
                        .unwrap();
                    assert_eq!(theirs.shape(), &*shape, "{kind:?} {a:?} {b:?}");
                    let theirs = theirs.try_as_plain_ram().unwrap();
                    let theirs = theirs.as_slice::<f32>().unwrap();
                    assert!(
                        out.iter()
                            .zip(theirs)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{kind:?} {a:?} {b:?}"
                    );
                }
            }
        }
    }
}

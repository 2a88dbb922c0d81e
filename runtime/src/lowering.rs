//! What the runtime's lowerings ([`crate::depthwise`], [`crate::conv1x1`],
//! [`crate::direct_conv`], [`crate::direct_deconv`], [`crate::pointwise`],
//! [`crate::resize`], [`crate::maxpool`]) share: when they run, and how an op of ours takes
//! the place of a node and the chain after it.

use tract_nnef::internal::*;

/// Whether a lowering runs: unless the environment sets `var` to
/// `tract` (the benchmark's lever table compares the two), and not in
/// builds with debug assertions. There this crate is compiled unoptimized
/// while tract (a dependency) is optimized, so an op of ours would be
/// slower than tract's (the demo's health watch measured it, and its v3
/// canary then no longer rolled back in time). The unit tests call the
/// ops directly, in any build.
pub(crate) fn enabled(var: &str) -> bool {
    !cfg!(debug_assertions) && std::env::var(var).map_or(true, |v| v != "tract")
}

/// An op of ours for the nodes from `first` to `last` (a chain whose
/// inner nodes have no other reader): it reads `first`'s input `input`,
/// and its output replaces `last`'s.
pub(crate) struct Replacement<O> {
    pub(crate) first: usize,
    pub(crate) input: usize,
    pub(crate) last: usize,
    pub(crate) op: O,
}

/// Wires each replacement's op, named after its first node with
/// `suffix`, in place of its chain. Returns how many. The replaced nodes
/// are unreachable afterwards; codegen compacts them away.
pub(crate) fn replace<O: TypedOp + Clone>(
    model: &mut TypedModel,
    found: &[Replacement<O>],
    suffix: &str,
) -> TractResult<usize> {
    for r in found {
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, model.nodes[r.first].inputs[r.input])?;
        let name = format!("{}.{suffix}", model.nodes[r.first].name);
        let y = patch.wire_node(name, r.op.clone(), &[x])?[0];
        patch.shunt_outside(model, OutletId::new(r.last, 0), y)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

/// Replaces, in place (the same inputs, the same output), the op of every
/// node whose op is a `T` for which `ours` gives one of ours. Returns how
/// many.
pub(crate) fn replace_ops<T: Op, O: TypedOp>(
    model: &mut TypedModel,
    ours: impl Fn(&TypedModel, usize, &T) -> TractResult<Option<O>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes.len() {
        let Some(theirs) = model.nodes[id].op_as::<T>() else {
            continue;
        };
        if let Some(op) = ours(model, id, theirs)? {
            model.nodes[id].op = Box::new(op);
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// The output fact of an op of ours that reads an f32 tensor first and
/// writes one of `shape`; `what` names the op in the error otherwise.
pub(crate) fn f32_output(
    inputs: &[&TypedFact],
    shape: &[usize],
    what: &str,
) -> TractResult<TVec<TypedFact>> {
    ensure!(
        inputs
            .first()
            .is_some_and(|f| f.datum_type == f32::datum_type()),
        "{what} takes f32"
    );
    Ok(tvec!(f32::fact(shape)))
}

/// The comparison the lowerings' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::fmt::Debug;

    use tract_nnef::internal::*;

    use crate::conv1x1::Isa;

    /// Runs a plan of `model` on `input`: its first output.
    pub(crate) fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let plan = model.into_runnable()?;
        let out = plan.run(tvec!(input.clone().into_tvalue()))?;
        Ok(out[0].clone().into_tensor())
    }

    /// `model` (decluttered) optimized by tract, against the same with
    /// `lower` run first for every compilation this processor has: `lower`
    /// replaces one node, `op` is then in the plan and no op named with
    /// any of `fused` (the chain it took in); two compute threads give the
    /// same bits as one, and every value is within 1e-5 (relative above
    /// 1) of tract's.
    pub(crate) fn compare_with_tract(
        case: &impl Debug,
        model: &TypedModel,
        input: &Tensor,
        lower: impl Fn(&mut TypedModel, Isa) -> TractResult<usize>,
        op: &str,
        fused: &[&str],
    ) -> TractResult<()> {
        let tracts = run(model.clone().into_optimized()?, input)?;
        for isa in Isa::here() {
            let mut ours = model.clone();
            assert_eq!(lower(&mut ours, isa)?, 1, "not lowered: {case:?}");
            crate::optimizer::optimize(&mut ours)?;
            let ops: Vec<String> = ours
                .nodes
                .iter()
                .map(|n| n.op().name().to_string())
                .collect();
            assert!(ops.iter().any(|o| o == op), "{case:?}: {ops:?}");
            assert!(
                !ops.iter().any(|o| fused.iter().any(|f| o.contains(f))),
                "{case:?}: {ops:?}"
            );
            // Two compute threads split the output channels into runs
            // that may start anywhere: the same values, bit for bit.
            let split = crate::threads::Threads::new(2, "lowering-test")?
                .run(|| run(ours.clone(), input))?;
            let ours = run(ours, input)?;
            assert_eq!(ours, split, "{case:?} {isa:?} on two threads");
            assert_eq!(ours.shape(), tracts.shape(), "{case:?}");
            let (a, b) = (
                ours.try_as_plain_ram()?.as_slice::<f32>()?,
                tracts.try_as_plain_ram()?.as_slice::<f32>()?,
            );
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{case:?} {isa:?}: element {i} is {a}, tract's {b}"
                );
            }
        }
        Ok(())
    }
}

//! What the runtime's lowerings ([`crate::depthwise`], [`crate::conv1x1`],
//! [`crate::direct_conv`], [`crate::direct_deconv`], [`crate::pointwise`],
//! [`crate::resize`]) share: when they run, and how an op of ours takes
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

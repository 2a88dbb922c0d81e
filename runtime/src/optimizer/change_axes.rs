//! tract's `ChangeAxes` declutter pass, making the same patches in the
//! same order, with the bookkeeping of each patch kept proportional to it.
//!
//! The pass tries an axis change (a suggested one, or dropping a unit axis)
//! from every node, and propagates each through the graph until every op it
//! reaches accepts it or one refuses. tract 0.23.9 then builds the patch
//! for an accepted change by walking the whole graph in evaluation order,
//! looking every node and every input up in SipHash maps; an ONNX model
//! accepts a change or two hundred per load, and that walk was about half
//! of the pass (scripts/bench_notes.md). Here nothing walks the graph per
//! patch: each node's place in the evaluation order is computed once per
//! round of the pass and carried over each patch ([`Ranks`]), so a patch
//! orders the nodes it changes and asks the readers of the wires it
//! replaces where they stand, at a cost that grows with the patch alone.
//! (cls: 208 patches in the first round, each had computed the order of
//! about 700 nodes.) Debug builds and the tests check the carried ranks
//! against `eval_order()` after every patch. The same goes for names: a
//! scalar constant copied for one reader is named as tract's
//! `unique_name` names it, the first of `name`, `name.1`, `name.2`, …
//! that no node bears, but looked up in an index of the graph's names
//! ([`NameIndex`]) instead of compared with every node, once per
//! candidate.
//!
//! The bookkeeping of the tries is kept small too: the pass tries a few
//! thousand changes per round (cls: about 3 400 refused in the first),
//! and each remembers every change it explored. tract keeps them as
//! `AxisChange`s, some 300 bytes each, in SipHash sets that start empty
//! on every call; here they are keys of a few words ([`Key`]) in sets
//! whose memory is kept from call to call.
//!
//! What the pass decides is tract's: the order nodes are tried in, the
//! changes tried, which ones propagation explores and where it stops, and
//! the nodes, wires and names of each patch. The optimizer's tests compare
//! the resulting graphs node for node with tract's on every model in
//! `models/` and on graphs of other shapes in `tests/data/`.

use std::collections::hash_map::Entry;
use std::fmt;

use super::{Map, Set};

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::change_axes::{AxisChange, AxisChangeConsequence, AxisOp, InOut};
use tract_nnef::tract_core::ops::dummy::Dummy;
use tract_nnef::tract_core::ops::einsum::EinSum;
use tract_nnef::tract_core::ops::konst::Const;
use tract_nnef::tract_core::ops::source::TypedSource;
use tract_nnef::tract_core::optim::{OptimizerSession, TypedPass};

/// What tract's pass calls itself (its `Debug`): the driver finds the pass
/// to replace by it.
pub(super) const NAME: &str = "ChangeAxes";

/// The pass: the changes tried since the last reset, the node the last
/// accepted one came from (the next call resumes there), and where each
/// node stands in the graph's evaluation order.
#[derive(Clone, Default)]
pub(super) struct ChangeAxes {
    tried: Set<Key>,
    from: usize,
    ranks: Option<Ranks>,
    /// The nodes the last patch adds, in the order the driver adds them.
    pending: Option<Pending>,
    /// Which node bears which name (built once per round, like the ranks).
    names: Option<NameIndex>,
    /// The changes explored by one call; kept between calls for its memory.
    explored: Set<Key>,
    /// What each `EinSum` answered to each change (see [`EinSums`]).
    einsums: EinSums,
}

/// `EinSum::change_axes` answers from the op alone (its axes, renamed as
/// the change says, parsed and checked again: a fifth of the pass's time
/// for cls), and the pass asks the same einsum the same question in call
/// after call: each call explores afresh. A node keeps its op within a
/// round (a patch adds new nodes and leaves the old ones to become
/// dummies), so the answers are kept for the round, by node, side and
/// change, and given only while the node is still an einsum.
type EinSums = Map<(usize, InOut, Key), Option<AxisChangeConsequence>>;

/// An axis change as a set member: the change itself, in a few words
/// unless it is a reshape. Two keys are equal when their changes are
/// equal field for field. (tract's `AxisOp` hashes its fields but compares
/// some differently, `Move(1, 2)` equal to `Move(2, 1)`; in tract's sets
/// the two land apart all the same, their hashes differ, and here they
/// are apart by construction.)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Axes(OutletId, u8, usize, usize),
    Reshape(Box<AxisChange>),
}

impl Key {
    fn of(change: &AxisChange) -> Key {
        let outlet = change.outlet;
        match change.op {
            AxisOp::Add(at) => Key::Axes(outlet, 0, at, 0),
            AxisOp::Rm(at) => Key::Axes(outlet, 1, at, 0),
            AxisOp::Move(from, to) => Key::Axes(outlet, 2, from, to),
            AxisOp::Reshape(..) => Key::Reshape(Box::new(change.clone())),
        }
    }
}

/// The nodes bearing each name, for tract's `unique_name` without a scan
/// of the graph per candidate name. Built once per round; each call
/// indexes the nodes added since the last one. The driver renames only
/// the nodes a patch adds (to make them unique, before this indexes them)
/// and the nodes it drops (to `Dummy-node-{id}`), so an entry is checked
/// against its node's current name when looked up, and a dummy's name is
/// found from the id in it.
#[derive(Clone, Debug, Default)]
struct NameIndex {
    nodes: Map<String, Vec<usize>>,
    indexed: usize,
}

impl NameIndex {
    /// Indexes the nodes added since the last call.
    fn catch_up(&mut self, model: &TypedModel) {
        for node in model.nodes.get(self.indexed..).unwrap_or_default() {
            self.nodes
                .entry(node.name.clone())
                .or_default()
                .push(node.id);
        }
        self.indexed = model.nodes.len();
    }

    fn taken(&self, model: &TypedModel, name: &str) -> bool {
        let bears = |id: usize| model.nodes.get(id).is_some_and(|n| n.name == name);
        self.nodes
            .get(name)
            .is_some_and(|ids| ids.iter().any(|&id| bears(id)))
            || name
                .strip_prefix("Dummy-node-")
                .and_then(|id| id.parse().ok())
                .is_some_and(bears)
    }

    /// tract's `Graph::unique_name`: `prefix` if no node bears it,
    /// otherwise the first `prefix.N` none does.
    fn unique(&self, model: &TypedModel, prefix: &str) -> String {
        if !self.taken(model, prefix) {
            return prefix.to_string();
        }
        (1..)
            .map(|n| format!("{prefix}.{n}"))
            .find(|name| !self.taken(model, name))
            .unwrap_or_default()
    }
}

/// Each node's place in tract's evaluation order (`eval_order()`), for
/// comparisons only: `None` for a node that order does not reach. Computed
/// once per round of the pass, then carried over each patch: a patch of
/// this pass replaces nodes one for one, with the same wiring, so a new
/// node takes the place of the node it replaces, and the order of every
/// node but a scalar constant stays what it was. A scalar constant the
/// patch copies for one reader ranks just before it; where scalar
/// constants stand is never asked (they are neither replaced nor readers).
#[derive(Clone, Debug)]
struct Ranks(Vec<Option<u64>>);

impl Ranks {
    fn of(model: &TypedModel) -> TractResult<Ranks> {
        let mut ranks = vec![None; model.nodes.len()];
        for (position, node) in model.eval_order()?.into_iter().enumerate() {
            ranks[node] = Some(2 * position as u64 + 2);
        }
        Ok(Ranks(ranks))
    }

    fn get(&self, node: usize) -> Option<u64> {
        self.0.get(node).copied().flatten()
    }

    /// The ranks once the driver has applied the patch `pending` describes.
    fn extend(&mut self, pending: &Pending) {
        self.0.truncate(pending.before);
        for added in &pending.added {
            let rank = match *added {
                Added::Replaces(old) => self.get(old),
                Added::ScalarFor(reader) => self.get(reader).map(|r| r - 1),
            };
            self.0.push(rank);
        }
    }

    /// That the carried-over ranks order the graph as `eval_order()` does
    /// (debug builds and tests: every patch of every test graph).
    #[cfg(debug_assertions)]
    fn check(&self, model: &TypedModel) -> TractResult<()> {
        let ranked = |id: usize| {
            let node = model.node(id);
            !node.op_is::<Dummy>() && node.op_as::<Const>().is_none_or(|k| k.val().volume() != 1)
        };
        let order: Vec<usize> = model
            .eval_order()?
            .into_iter()
            .filter(|&n| ranked(n))
            .collect();
        let ours: Vec<u64> = order
            .iter()
            .map(|&n| self.get(n).with_context(|| format!("no rank for #{n}")))
            .collect::<TractResult<_>>()?;
        ensure!(
            ours.windows(2).all(|w| w[0] < w[1]),
            "ranks out of evaluation order"
        );
        let reached = (0..model.nodes.len())
            .filter(|&n| ranked(n) && self.get(n).is_some())
            .count();
        ensure!(
            reached == order.len(),
            "a ranked node the evaluation does not reach"
        );
        Ok(())
    }
}

/// What a patch adds, node by node, in order (taps are not nodes of the
/// graph it is applied to).
#[derive(Clone, Copy, Debug)]
enum Added {
    /// The changed copy of node `.0`.
    Replaces(usize),
    /// A scalar constant, copied and changed for node `.0` alone.
    ScalarFor(usize),
}

/// The last patch returned: the graph's size before it, and its nodes.
#[derive(Clone, Debug)]
struct Pending {
    before: usize,
    added: Vec<Added>,
}

impl ChangeAxes {
    /// The ranks of `model`: carried over the patch returned last if the
    /// driver applied it (or kept if it did not), computed otherwise.
    fn ranks(&mut self, model: &TypedModel) -> TractResult<Ranks> {
        let len = model.nodes.len();
        let ranks = match (self.ranks.take(), self.pending.take()) {
            (Some(mut ranks), Some(p)) if len == p.before + p.added.len() => {
                ranks.extend(&p);
                #[cfg(debug_assertions)]
                ranks.check(model)?;
                ranks
            }
            (Some(ranks), Some(p)) if len == p.before => ranks,
            _ => Ranks::of(model)?,
        };
        Ok(ranks)
    }
}

impl fmt::Debug for ChangeAxes {
    /// The name tract's pass prints, in errors and in the driver's lookup.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NAME)
    }
}

impl TypedPass for ChangeAxes {
    fn reset(&mut self) -> TractResult<()> {
        self.tried.clear();
        self.from = 0;
        // the driver compacts between rounds: node ids change
        self.ranks = None;
        self.pending = None;
        self.names = None;
        self.einsums.clear();
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        let ranks = self.ranks(model)?;
        let mut names = self.names.take().unwrap_or_default();
        names.catch_up(model);
        let mut explored = std::mem::take(&mut self.explored);
        explored.clear();
        let mut locked = model.output_outlets()?.to_vec();
        locked.extend(model.input_outlets()?.iter());
        for node in &model.nodes[self.from..] {
            if node.op_is::<Dummy>() {
                continue;
            }
            let suggested = node
                .op
                .suggested_axis_changes()?
                .into_iter()
                .map(|(io, op)| AxisChange {
                    outlet: io.as_outlet(node),
                    op,
                });
            let unit_axes = node.outputs.iter().enumerate().flat_map(|(slot, output)| {
                output
                    .fact
                    .shape
                    .iter()
                    .enumerate()
                    .filter(|(_, dim)| dim.is_one())
                    .map(move |(ix, _)| AxisChange {
                        outlet: OutletId::new(node.id, slot),
                        op: AxisOp::Rm(ix),
                    })
            });
            // tract tries the suggestions first, then the unit axes
            for change in suggested.chain(unit_axes) {
                if !self.tried.insert(Key::of(&change)) {
                    continue;
                }
                // tract fails the whole load when an op cannot be wired
                // with a change (`Conv`, after declutter folded a
                // channel-wise Mul and Add into its bias, refuses an axis
                // added to that bias: "Bias should be scalar or a vector
                // with one value per output channel"; found by
                // scripts/make_model_zoo.py, fixture
                // tests/data/zoo/conv_bias_axis_change). A change only
                // rearranges axes: skipping it leaves a graph that computes
                // the same, and the patch was not applied yet.
                let propagated =
                    propagate(model, &change, &locked, &mut explored, &mut self.einsums);
                let Ok(patch) = propagated.and_then(|accepted| {
                    accepted
                        .map(|accepted| patch(model, &change, accepted, &ranks, &names))
                        .transpose()
                }) else {
                    continue;
                };
                if let Some((patch, added)) = patch {
                    self.from = node.id;
                    self.pending = Some(Pending {
                        before: model.nodes.len(),
                        added,
                    });
                    self.ranks = Some(ranks);
                    self.names = Some(names);
                    self.explored = explored;
                    return Ok(Some(patch));
                }
            }
        }
        self.ranks = Some(ranks);
        self.names = Some(names);
        self.explored = explored;
        Ok(None)
    }
}

/// Where an accepted change leads: the new axis op on every wire it
/// reaches, the ops that must change, the constants that must change
/// (their new tensors are made only once the change is accepted), and the
/// scalar constants to copy (changed for one consumer instead of
/// propagated upstream).
struct Accepted {
    wires: Map<OutletId, AxisOp>,
    ops: Map<usize, Box<dyn TypedOp>>,
    consts: Map<usize, AxisOp>,
    scalars: Map<InletId, (OutletId, AxisOp)>,
}

/// tract's `change_axes` without bounds: propagates `start`, and returns
/// where it leads if no node refuses it and no wire gets two different
/// changes.
fn propagate(
    model: &TypedModel,
    start: &AxisChange,
    locked: &[OutletId],
    explored: &mut Set<Key>,
    einsums: &mut EinSums,
) -> TractResult<Option<Accepted>> {
    if explored.contains(&Key::of(start)) {
        return Ok(None);
    }
    if model
        .node(start.outlet.node)
        .op_as::<Const>()
        .is_some_and(|c| c.val().volume() == 1 && c.val().is_plain_ram())
    {
        return Ok(None);
    }
    let mut accepted = Accepted {
        wires: Map::default(),
        ops: Map::default(),
        consts: Map::default(),
        scalars: Map::default(),
    };
    accepted.wires.insert(start.outlet, start.op.clone());
    let mut todo: Vec<(AxisChange, Option<usize>)> = vec![(start.clone(), None)];
    while let Some((change, emitter)) = todo.pop() {
        if !explored.insert(Key::of(&change)) {
            return Ok(None);
        }
        let outlet = change.outlet;
        if locked.contains(&outlet) {
            return Ok(None);
        }
        let consumers = model.outlet_successors(outlet).iter();
        let ends = std::iter::once((outlet.node, InOut::Out(outlet.slot)))
            .chain(consumers.map(|inlet| (inlet.node, InOut::In(inlet.slot))));
        for (node_id, io) in ends {
            if Some(node_id) == emitter {
                continue;
            }
            let node = model.node(node_id);
            // a node reached a second time takes the change only if it is
            // an EinSum (tract's rule)
            let (op, first_reach) = match accepted.ops.get(&node_id) {
                Some(op) if op.is::<EinSum>() => (op, false),
                Some(_) => return Ok(None),
                None if accepted.consts.contains_key(&node_id) => return Ok(None),
                None => (&node.op, true),
            };
            let consequence = if let Some(konst) = plain_const(node, io) {
                // what `Const::change_axes` answers, without copying the
                // tensor: most changes that reach a weight are refused
                // further on (four in five, for cls and rec)
                if !takes(konst.val(), &change.op) {
                    return Ok(None);
                }
                accepted.consts.insert(node_id, change.op.clone());
                AxisChangeConsequence {
                    substitute_op: None,
                    wire_changes: tvec!((io, change.op.clone())),
                }
            } else {
                let asked = (first_reach && node.op_is::<EinSum>())
                    .then(|| (node_id, io, Key::of(&change)));
                let consequence = match asked.as_ref().and_then(|a| einsums.get(a)) {
                    Some(answer) => answer.clone(),
                    None => {
                        let consequence = op
                            .change_axes(model, node, io, &change.op)
                            .with_context(|| format!("Propagating {change:?} to node {node}"))?;
                        if let Some(asked) = asked {
                            einsums.insert(asked, consequence.clone());
                        }
                        consequence
                    }
                };
                let Some(consequence) = consequence else {
                    return Ok(None);
                };
                consequence
            };
            if let Some(op) = consequence.substitute_op {
                accepted.ops.insert(node_id, op);
            }
            for (wire, op) in consequence.wire_changes {
                let outlet = wire.as_outlet(node);
                if let InOut::In(slot) = wire
                    && model
                        .node(outlet.node)
                        .op_as::<Const>()
                        .is_some_and(|k| k.val().volume() == 1)
                {
                    accepted
                        .scalars
                        .insert(InletId::new(node_id, slot), (outlet, op));
                    continue;
                }
                match accepted.wires.entry(outlet) {
                    Entry::Vacant(entry) => {
                        entry.insert(op.clone());
                        todo.push((AxisChange { outlet, op }, Some(node_id)));
                    }
                    Entry::Occupied(previous) if *previous.get() == op => {}
                    Entry::Occupied(_) => return Ok(None),
                }
            }
        }
    }
    // the constants' new tensors, now that the change is accepted
    for (node_id, op) in std::mem::take(&mut accepted.consts) {
        let node = model.node(node_id);
        let substitute = node
            .op
            .change_axes(model, node, InOut::Out(0), &op)?
            .and_then(|consequence| consequence.substitute_op);
        let Some(substitute) = substitute else {
            // `takes` said yes where tract says no: refuse the change, as
            // tract would have (only a tract upgrade can get here)
            debug_assert!(false, "{node} refused {op:?}");
            return Ok(None);
        };
        accepted.ops.insert(node_id, substitute);
    }
    Ok(Some(accepted))
}

/// A constant whose `change_axes` depends only on its tensor's shape: plain
/// memory, no exotic fact, reached through its output.
fn plain_const(node: &TypedNode, io: InOut) -> Option<&Const> {
    let konst = node.op_as::<Const>()?;
    let plain = konst.exotic_fact().is_none() && konst.val().is_plain_ram();
    (plain && io == InOut::Out(0)).then_some(konst)
}

/// Whether `AxisOp::change_tensor(tensor, false)` succeeds, decided from
/// the shape the way it decides: the op needs the axes it names; adding an
/// axis always works, removing one needs it to be 1, moving needs both
/// positions, reshaping needs the shape to match and the volume to stay.
fn takes(tensor: &Tensor, change: &AxisOp) -> bool {
    let rank = tensor.rank();
    if change.required_rank() > rank {
        return false;
    }
    match change.canonical().as_ref() {
        AxisOp::Add(_) => true,
        AxisOp::Rm(ix) => tensor.shape()[*ix] == 1,
        AxisOp::Move(from, to) => *from < rank && *to < rank,
        AxisOp::Reshape(..) => {
            let mut shape: TVec<usize> = tensor.shape().into();
            change.change_shape_array(&mut shape, true).is_ok()
                && shape.iter().product::<usize>() == tensor.len()
        }
    }
}

/// The patch for an accepted change, node for node the one tract builds:
/// the changed nodes rewired in evaluation order (tapping the wires they
/// read from the rest of the graph), and every reader of a wire the patch
/// replaces or taps shunted to it. tract finds both by walking the whole
/// graph in evaluation order; here the ranks order the changed nodes, and
/// a wire's readers are asked where they stand: a reader of a tapped wire
/// that the walk reaches before the tap is made is not shunted, as in
/// tract's walk. Returns the nodes it adds, for the ranks.
fn patch(
    model: &TypedModel,
    start: &AxisChange,
    accepted: Accepted,
    ranks: &Ranks,
    names: &NameIndex,
) -> TractResult<(TypedModelPatch, Vec<Added>)> {
    let Accepted {
        wires,
        ops,
        scalars,
        ..
    } = accepted;
    let mut changed: Vec<(u64, usize)> = wires
        .keys()
        .map(|o| o.node)
        .chain(ops.keys().copied())
        .filter_map(|node| Some((ranks.get(node)?, node)))
        .collect();
    changed.sort_unstable();
    changed.dedup();
    let mut patch = TypedModelPatch::new(format!("{start:?}"));
    let mut added = Vec::with_capacity(changed.len());
    // the wires of the model the patch has a wire for; for a tapped one,
    // the rank of the changed node that tapped it
    let mut in_patch: Map<OutletId, OutletId> = Map::default();
    let mut tapped_at: Map<OutletId, u64> = Map::default();
    for &(rank, node_id) in &changed {
        let node = model.node(node_id);
        let mut inputs: TVec<OutletId> = tvec!();
        for (slot, orig) in node.inputs.iter().enumerate() {
            let wire = if let Some((scalar, change)) = scalars.get(&InletId::new(node_id, slot)) {
                let konst = model.node(scalar.node);
                let mut value = konst
                    .op_as::<Const>()
                    .context("a rewired scalar is a constant")?
                    .val()
                    .clone()
                    .into_tensor();
                change.change_tensor(&mut value, false)?;
                let name = names.unique(model, &konst.name);
                debug_assert_eq!(name, model.unique_name(&konst.name));
                added.push(Added::ScalarFor(node_id));
                patch.add_const(name, value)?
            } else if let Some(&wire) = in_patch.get(orig) {
                wire
            } else {
                let tap = patch.tap_model(model, *orig)?;
                in_patch.insert(*orig, tap);
                tapped_at.insert(*orig, rank);
                tap
            };
            inputs.push(wire);
        }
        let op = ops
            .get(&node_id)
            .cloned()
            .unwrap_or_else(|| node.op.clone());
        let outputs = patch
            .wire_node(&node.name, op.clone(), &inputs)
            .with_context(|| format!("wiring changed op {op:?}"))?;
        added.push(Added::Replaces(node_id));
        if outputs.len() == 1 && patch.node(outputs[0].node).op_is::<TypedSource>() {
            patch.inputs.insert(outputs[0].node, node_id);
        }
        for (slot, wire) in outputs.iter().enumerate() {
            in_patch.insert(OutletId::new(node_id, slot), *wire);
        }
    }
    let is_changed = |node: usize| {
        ranks
            .get(node)
            .is_some_and(|r| changed.binary_search(&(r, node)).is_ok())
    };
    let mut wires: Vec<(OutletId, OutletId)> = in_patch.iter().map(|(&o, &b)| (o, b)).collect();
    wires.sort_unstable();
    for (orig, by) in wires {
        let after = tapped_at.get(&orig).copied();
        let shunted = model.outlet_successors(orig).iter().any(|reader| {
            !is_changed(reader.node)
                && ranks
                    .get(reader.node)
                    .is_some_and(|r| after.is_none_or(|t| r > t))
        });
        if shunted {
            patch.shunt_outside(model, orig, by)?;
        }
    }
    for output in model.output_outlets()? {
        if let Some(&by) = in_patch.get(output) {
            // unchecked, as tract's pass shunts the model's outputs
            patch.shunts.insert(*output, by);
        }
    }
    Ok((patch, added))
}

#[cfg(test)]
#[cfg(feature = "onnx")]
mod tests {
    use super::*;

    /// tract's declutter still has a pass of that name, so the driver
    /// replaces it (a tract upgrade that renamed it would otherwise leave
    /// tract's own in place without a word).
    #[test]
    fn tracts_declutter_has_the_pass_this_replaces() {
        use tract_nnef::tract_core::optim::Optimizer;
        let passes = Optimizer::declutter().passes;
        let names: Vec<String> = passes.iter().map(|p| format!("{p:?}")).collect();
        assert_eq!(names.iter().filter(|n| *n == NAME).count(), 1, "{names:?}");
    }
}

//! tract's `declutter()` and `optimize()`, driven here so that each patch
//! costs what it changes, not the size of the graph.
//!
//! tract 0.23.9 optimizes a model by applying hundreds of small patches,
//! one at a time (`OptimizerSession::optimize`): 757 for cls, 778 for rec
//! (scripts/bench_notes.md). Its `ModelPatch::apply`, for every node a
//! patch adds, first compares that node's op with the op of every node in
//! the graph, looking for a duplicate to reuse, and then adds the node
//! anyway: on a match the loop only moves on to the next candidate, so the
//! scan decides nothing (tract-core's `model/patch.rs`). It is most of the
//! time a load spends optimizing, and it grows with nodes × patches.
//!
//! [`declutter`] and [`optimize`] run tract's own passes, in tract's order,
//! with tract's round structure, loop watchdog and compaction, and apply
//! each patch with [`apply`]: the same edits as tract's `apply`, in the
//! same order, without that scan. One pass of declutter, `ChangeAxes`, is
//! replaced by [`change_axes`]'s, which makes the same patches at a cost
//! that grows with each patch rather than with the graph; `PropConst` is
//! wrapped by [`prop_const`]'s, which folds large f32 arithmetic on
//! constants (a batch norm into its convolution's weights) by plain loops
//! where tract's walks ndarray indices. The graph that
//! comes out is the one tract's own `declutter()` and `optimize()`
//! produce, node for node (the tests compare them on every model in
//! `models/` and on graphs of other shapes in `tests/data/`).
//!
//! One difference, deliberately kept small: a pass that optimizes a nested
//! body (a `Scan`'s, for LSTM/GRU) does so through tract's session, with
//! tract's `apply`, and its loop watchdog is that session's, not ours. So
//! does codegen's `MergeConsecutiveSameRoleAxes`, whose rewrite rules are
//! private to tract.

use std::collections::{HashMap, HashSet};

use tract_nnef::internal::*;
use tract_nnef::tract_core::model::{STAGE_OPTIMIZED, TRACT_STAGE};
use tract_nnef::tract_core::optim::{Optimizer, TypedPass};

mod change_axes;
mod prop_const;

/// A map and a set with a fast hasher (hashbrown's): their keys are node
/// names, ids and axis changes of the graph being optimized.
type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;
type Set<K> = HashSet<K, foldhash::fast::FixedState>;

/// `TypedModel::declutter`, with [`apply`].
pub fn declutter(model: &mut TypedModel) -> TractResult<()> {
    run(&Optimizer::declutter(), model)
}

/// `TypedModel::optimize` (codegen), with [`apply`]; marks the model
/// optimized as tract does.
pub fn optimize(model: &mut TypedModel) -> TractResult<()> {
    run(&Optimizer::codegen(), model)?;
    // The driver made room for patches, and compaction keeps it (see
    // `run` and `compact`); the plan keeps the optimized graph for as long
    // as the model serves, and the room it touched would stay resident.
    model.nodes.shrink_to_fit();
    model.properties.insert(
        TRACT_STAGE.to_string(),
        rctensor0(STAGE_OPTIMIZED.to_string()),
    );
    Ok(())
}

/// Removes every cast of a value to the type it already has, in one patch.
///
/// tract's NNEF reader wraps each operand of a binary op in a cast to the
/// op's common type, f32 to f32 in these graphs, and declutter (which an
/// NNEF load skips: the packer stored a decluttered graph) would remove
/// them again. Codegen removes them too, one patch each, but only after
/// the lowerings (`conv1x1`, `pointwise`), which look for ops that read
/// each other directly.
pub fn drop_identity_casts(model: &mut TypedModel) -> TractResult<()> {
    use tract_nnef::tract_core::ops::cast::Cast;
    let identity = |model: &TypedModel, id: usize| -> TractResult<bool> {
        let node = &model.nodes[id];
        Ok(match node.op_as::<Cast>() {
            Some(cast) if node.inputs.len() == 1 => {
                model.outlet_fact(node.inputs[0])?.datum_type == cast.to
            }
            _ => false,
        })
    };
    let mut patch = TypedModelPatch::default();
    let mut taps: HashMap<OutletId, OutletId> = HashMap::new();
    for id in 0..model.nodes.len() {
        if !identity(model, id)? {
            continue;
        }
        // A chain of them goes back to the first value that is not one.
        let mut from = model.nodes[id].inputs[0];
        while identity(model, from.node)? {
            from = model.nodes[from.node].inputs[0];
        }
        let tap = match taps.get(&from) {
            Some(&tap) => tap,
            None => {
                let tap = patch.tap_model(model, from)?;
                taps.insert(from, tap);
                tap
            }
        };
        patch.shunt_outside(model, OutletId::new(id, 0), tap)?;
    }
    if !taps.is_empty() {
        patch.apply(model)?;
    }
    Ok(())
}

/// `OptimizerSession::optimize`: rounds of every pass until a round
/// applies no patch; each pass repeats until it applies none.
fn run(optimizer: &Optimizer, model: &mut TypedModel) -> TractResult<()> {
    let _proof_session = model.symbols.proof_cache_session();
    let mut session = optimizer.session();
    let mut seen: HashSet<String> = HashSet::new();
    let mut applied = 0usize;
    compact(model).context("during optimizer preflight compaction")?;
    // Room for the patches' nodes (each about 1.5 KB): growing the vector
    // one doubling at a time copied it into memory touched for the first
    // time. Room left unused is never touched; `optimize` gives it back.
    model.nodes.reserve(2 * model.nodes.len());
    model
        .check_names()
        .context("after optimizer preflight compaction")?;
    let mut names = Names::of(model);
    // The graph changes only by the patches applied and the passes that
    // edit it directly; `compact()` after neither would find it as the
    // last compaction left it (see `Compaction`).
    let mut compaction = Compaction::default();
    // tract's passes, but `ChangeAxes` is ours: the same patches, each
    // built in time proportional to it (change_axes.rs); and `PropConst`
    // folds large f32 arithmetic by plain loops first (prop_const.rs)
    let template: Vec<Box<dyn TypedPass>> = optimizer
        .passes
        .iter()
        .map(|pass| {
            let name = format!("{pass:?}");
            if name == change_axes::NAME {
                Box::new(change_axes::ChangeAxes::default())
            } else if name.starts_with(prop_const::NAME) {
                Box::new(prop_const::PropConst::wrapping(pass.clone()))
            } else {
                pass.clone()
            }
        })
        .collect();
    loop {
        let before = applied;
        let mut passes = template.clone();
        for pass in passes.iter_mut() {
            loop {
                let pass_before = applied;
                pass.reset()?;
                while let Some(mut patch) = pass.next(&mut session, model)? {
                    if let Some(watchdog) = patch.dont_apply_twice.take()
                        && !seen.insert(watchdog)
                    {
                        continue;
                    }
                    apply(patch, model, &mut names)
                        .with_context(|| format!("running pass {pass:?}"))?;
                    applied += 1;
                    compaction.changed();
                }
                if pass.run_direct(model)? {
                    names = Names::of(model);
                    compaction.changed();
                }
                if applied == pass_before {
                    break;
                }
                compaction
                    .compact(model, &mut names)
                    .with_context(|| format!("after pass {pass:?}"))?;
            }
            compaction.compact(model, &mut names)?;
        }
        if applied == before {
            return Ok(());
        }
        compaction.compact(model, &mut names)?;
    }
}

/// tract's driver compacts the graph after every pass, and again after
/// every round: about thirty times per declutter, each an evaluation
/// order of the whole graph (cls: 2 ms of a load). Most find the graph
/// as the last one left it, nothing applied in between. `compact()` only
/// renumbers the nodes in evaluation order and drops the rest, and that
/// order depends on the graph's wiring, not its numbering, so compacting
/// a graph again before it changes leaves it as it is; those calls are
/// skipped. The others run [`compact`], tract's compaction without its
/// spare nodes.
///
/// Starts clean: the driver's preflight compacts.
#[derive(Default)]
struct Compaction {
    /// Whether the graph changed since the last compaction.
    dirty: bool,
}

impl Compaction {
    fn changed(&mut self) {
        self.dirty = true;
    }

    /// `compact()`, which drops the dummies, and their names with them.
    fn compact(&mut self, model: &mut TypedModel, names: &mut Names) -> TractResult<()> {
        if !self.dirty {
            #[cfg(debug_assertions)]
            {
                let wiring = |m: &TypedModel| -> Vec<_> {
                    let nodes = m.nodes.iter().map(|n| {
                        let readers = n.outputs.iter().map(|o| o.successors.clone());
                        (
                            n.name.clone(),
                            n.inputs.clone(),
                            readers.collect::<Vec<_>>(),
                        )
                    });
                    nodes.collect()
                };
                let mut again = model.clone();
                again.compact()?;
                ensure!(
                    wiring(&again) == wiring(model)
                        && again.inputs == model.inputs
                        && again.outputs == model.outputs,
                    "compacting an unchanged graph changed it"
                );
            }
            return Ok(());
        }
        for name in compact(model)? {
            names.remove(&name);
        }
        debug_assert!(names.0 == Names::of(model).0, "names after compaction");
        self.dirty = false;
        Ok(())
    }
}

/// tract's `Graph::compact()` (tract-core 0.23.9, model/graph.rs): the
/// nodes in evaluation order, then any model input it does not reach, the
/// rest dropped; ids, wires, inputs, outputs and labels renumbered; a
/// model input that is not a source becomes one. tract moves the kept
/// nodes into a new vector of as many dummy nodes, made for the purpose;
/// here they are swapped into place within the graph's own vector. A node
/// is about 1.5 KB (its output facts are stored inline), so each new
/// vector was megabytes of memory touched for the first time, and its
/// page faults were most of a compaction's time (in a profile of cls
/// loads, 1.6 of 2.7 ms). The vector also keeps its capacity for the next
/// pass's patches.
/// Returns the names of the nodes dropped.
fn compact(model: &mut TypedModel) -> TractResult<Vec<String>> {
    let mut order = model.eval_order()?;
    if order.len() == model.nodes.len() && order.iter().enumerate().all(|(a, b)| a == *b) {
        return Ok(Vec::new());
    }
    for input in &model.inputs {
        if !order.contains(&input.node) {
            order.push(input.node);
        }
    }
    let kept = order.len();
    let mut old_to_new = vec![usize::MAX; model.nodes.len()];
    for (ix, &id) in order.iter().enumerate() {
        ensure!(
            old_to_new[id] == usize::MAX,
            "a node twice in the evaluation order"
        );
        old_to_new[id] = ix;
    }
    // Each swap puts one kept node where it goes (no two go to the same
    // place), so a place once filled is not touched again, and the dropped
    // nodes end up after the kept ones.
    let mut place = old_to_new.clone();
    for ix in 0..place.len() {
        while place[ix] != usize::MAX && place[ix] != ix {
            let to = place[ix];
            model.nodes.swap(ix, to);
            place.swap(ix, to);
        }
    }
    let dropped = model.nodes.drain(kept..).map(|node| node.name).collect();
    let inputs = &model.inputs;
    for node in model.nodes.iter_mut() {
        if inputs.iter().any(|i| i.node == node.id) && !TypedModel::is_source(&node.op) {
            node.inputs.clear();
            let fact = node.outputs[0].fact.clone();
            node.op = Box::new(tract_nnef::tract_core::ops::source::TypedSource::new(fact));
        }
        node.id = old_to_new[node.id];
        for input in &mut node.inputs {
            input.node = old_to_new[input.node];
            ensure!(input.node < kept, "a kept node reads a dropped one");
        }
        for output in &mut node.outputs {
            for reader in &mut output.successors {
                reader.node = old_to_new[reader.node];
            }
            output.successors.retain(|s| s.node < kept);
            output.successors.sort();
        }
    }
    for outlet in model.inputs.iter_mut().chain(model.outputs.iter_mut()) {
        outlet.node = old_to_new[outlet.node];
        ensure!(outlet.node < kept, "a model input or output was dropped");
    }
    model.outlet_labels = std::mem::take(&mut model.outlet_labels)
        .into_iter()
        .map(|(k, v)| (OutletId::new(old_to_new[k.node], k.slot), v))
        .filter(|(k, _)| k.node < kept)
        .collect();
    ensure!(model.nodes.iter().enumerate().all(|(ix, n)| n.id == ix));
    Ok(dropped)
}

/// How many nodes of the graph bear each name: what tract's
/// `unique_name` finds by comparing with every node, kept up to date by
/// [`apply`] and by compaction, which drops nodes.
struct Names(Map<String, usize>);

impl Names {
    fn of(model: &TypedModel) -> Names {
        let mut names = Names(Map::default());
        names.0.reserve(model.nodes.len());
        for node in &model.nodes {
            names.add(&node.name);
        }
        names
    }

    fn count(&self, name: &str) -> usize {
        self.0.get(name).copied().unwrap_or(0)
    }

    fn add(&mut self, name: &str) {
        match self.0.get_mut(name) {
            Some(count) => *count += 1,
            None => {
                self.0.insert(name.to_string(), 1);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(c) = self.0.get_mut(name) {
            *c -= 1;
            if *c == 0 {
                self.0.remove(name);
            }
        }
    }

    fn rename(&mut self, node: &mut TypedNode, name: String) {
        self.remove(&node.name);
        self.add(&name);
        node.name = name;
    }
}

/// `ModelPatch::apply` without the duplicate scan (see the module doc):
/// adds the patch's nodes, moves the shunted wires' consumers, wires the
/// new nodes, turns the obliterated and the now unused nodes into dummies
/// (which the next `compact()` drops), and makes the new nodes' names
/// unique.
fn apply(patch: TypedModelPatch, target: &mut TypedModel, names: &mut Names) -> TractResult<()> {
    let TypedModelPatch {
        model: patch,
        taps: mut mapping,
        shunts,
        obliterate,
        inputs: replaced_inputs,
        ..
    } = patch;
    let mut all_inputs: Vec<(usize, Vec<OutletId>)> = Vec::new();
    let mut model_input_outlets = target.input_outlets()?.to_vec();
    let mut new_nodes = Vec::new();
    for node in patch.nodes {
        if TypedModel::is_source(&node.op) && mapping.contains_key(&OutletId::new(node.id, 0)) {
            // a tap: the wire it stands for is already in the target
            continue;
        }
        let Node {
            id: patch_node_id,
            name,
            inputs,
            op,
            outputs,
        } = node;
        let n_outputs = outputs.len();
        let facts = outputs.into_iter().map(|o| o.fact).collect();
        names.add(&name);
        let added = target.add_node(name, op, facts)?;
        new_nodes.push(added);
        for ix in 0..n_outputs {
            mapping.insert(OutletId::new(patch_node_id, ix), OutletId::new(added, ix));
        }
        all_inputs.push((added, inputs));
        if TypedModel::is_source(&target.node(added).op) {
            // an input replacement
            let replaced = replaced_inputs.get(&patch_node_id).copied();
            for outlet in model_input_outlets.iter_mut() {
                if Some(outlet.node) == replaced {
                    outlet.node = added;
                }
            }
        }
    }
    let mut shunts: Vec<(OutletId, OutletId)> = shunts.into_iter().collect();
    shunts.sort();
    for &(outlet, by) in &shunts {
        let replace_by = mapping[&by];
        let succs = target.nodes()[outlet.node].outputs[outlet.slot]
            .successors
            .clone();
        for succ in succs {
            target.add_edge(replace_by, succ)?;
        }
        for o in target.outputs.iter_mut() {
            if *o == outlet {
                *o = replace_by;
            }
        }
        if let Some(label) = target.outlet_labels.remove(&outlet) {
            target.set_outlet_label(replace_by, label)?;
        }
    }
    // new node ids increase in insertion order: this is tract's sorted order
    for (node, inputs) in &all_inputs {
        for (ix, input) in inputs.iter().enumerate() {
            target.add_edge(mapping[input], InletId::new(*node, ix))?;
        }
    }
    for node in obliterate {
        target.node_mut(node).op = target.create_dummy();
    }
    target.set_input_outlets(&model_input_outlets)?;
    collect_garbage(
        target,
        names,
        shunts.iter().map(|(outlet, _)| outlet.node).collect(),
    );
    unique_names(target, names, &new_nodes);
    Ok(())
}

/// Nodes whose outputs nobody reads any more (starting from the shunted
/// ones, then their inputs) become dummies.
fn collect_garbage(target: &mut TypedModel, names: &mut Names, mut maybe: Vec<usize>) {
    let mut queued: Set<usize> = maybe.iter().copied().collect();
    while let Some(id) = maybe.pop() {
        queued.remove(&id);
        if target.outputs.iter().any(|o| o.node == id)
            || target.inputs.iter().any(|i| i.node == id)
            || !target
                .node(id)
                .outputs
                .iter()
                .all(|o| o.successors.is_empty())
        {
            continue;
        }
        let dummy = target.create_dummy();
        let node = target.node_mut(id);
        node.op = dummy;
        names.rename(node, format!("Dummy-node-{id}"));
        node.outputs.clear();
        let inputs = std::mem::take(&mut node.inputs);
        for input in inputs {
            target.node_mut(input.node).outputs[input.slot]
                .successors
                .retain(|s| s.node != id);
            if queued.insert(input.node) {
                maybe.push(input.node);
            }
        }
    }
}

/// tract's naming of a patch's nodes: a name with a `#` keeps what is
/// before it, made unique; a name another node has gets `.1`, `.2`, …
fn unique_names(target: &mut TypedModel, names: &mut Names, new_nodes: &[usize]) {
    for &n in new_nodes {
        let name = &target.nodes[n].name;
        let prefix = match name.split_once('#') {
            Some((prefix, _)) => prefix.to_string(),
            None if names.count(name) > 1 => name.clone(),
            None => continue,
        };
        let mut unique = prefix.clone();
        let mut suffix = 0;
        while names.count(&unique) > 0 {
            suffix += 1;
            unique = format!("{prefix}.{suffix}");
        }
        names.rename(&mut target.nodes[n], unique);
    }
}

#[cfg(test)]
#[cfg(feature = "onnx")]
pub(crate) mod tests {
    use super::*;

    /// Everything the plan is built from: each node's name, op, inputs,
    /// output facts and consumers, the model's inputs, outputs and labels.
    fn dump(model: &TypedModel) -> Vec<String> {
        let mut lines: Vec<String> = model
            .nodes
            .iter()
            .map(|n| {
                let outputs: Vec<String> = n
                    .outputs
                    .iter()
                    .map(|o| format!("{:?} -> {:?}", o.fact, o.successors))
                    .collect();
                format!(
                    "#{} {} {:?} <- {:?} => {outputs:?}",
                    n.id, n.name, n.op, n.inputs
                )
            })
            .collect();
        lines.push(format!(
            "inputs {:?} outputs {:?}",
            model.inputs, model.outputs
        ));
        let mut labels: Vec<_> = model.outlet_labels.iter().collect();
        labels.sort();
        lines.push(format!("labels {labels:?}"));
        lines
    }

    fn assert_same(ours: &TypedModel, tracts: &TypedModel, what: &str) {
        let (ours, tracts) = (dump(ours), dump(tracts));
        assert_eq!(ours.len(), tracts.len(), "{what}: node count");
        for (a, b) in ours.iter().zip(&tracts) {
            assert_eq!(a, b, "{what}");
        }
    }

    /// Every ONNX model in models/.
    pub(crate) const MODELS: [(&str, &str); 5] = [
        ("cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        ("cls-int8", "cls_int8.onnx"),
        ("cls-int8-pw", "cls_int8_pw.onnx"),
        ("multi", "multi_io.onnx"),
        ("rec", "ch_PP-OCRv4_rec_infer.onnx"),
    ];

    /// The repository's model `models/{dir}/{file}`, typed with its golden
    /// input shapes pinned, as the runtime loads ONNX.
    fn typed(dir: &str, file: &str) -> TypedModel {
        let (bytes, _, specs) = crate::model::tests::model_and_inputs(dir, file);
        crate::model::pinned_typed(edgefleet_wire::manifest::ModelFormat::Onnx, &bytes, &specs)
            .unwrap()
            .0
    }

    /// Every model in models/: declutter from ONNX, then optimize the
    /// decluttered graph (what an NNEF bundle holds), each compared node
    /// for node with tract's own `declutter()` and `optimize()`.
    #[test]
    fn the_driver_builds_the_graph_tract_builds_on_every_repository_model() {
        for (dir, file) in MODELS {
            same_as_tracts(typed(dir, file), dir);
        }
    }

    /// The same on graph shapes the repository's models do not have
    /// (scripts/make_optimizer_models.py: attention heads, 1-D convs, unit
    /// axes, pools and resize, an LSTM, a ResNet block whose batch norms
    /// `prop_const` folds) and on a QDQ-quantized classifier.
    #[test]
    fn the_driver_builds_the_graph_tract_builds_on_other_graph_shapes() {
        let models: [(&str, &[usize]); 7] = [
            ("tests/data/optimizer/attention.onnx", &[1, 16, 32]),
            ("tests/data/optimizer/conv1d.onnx", &[1, 8, 100]),
            ("tests/data/optimizer/unit_axes.onnx", &[1, 1, 32, 1]),
            ("tests/data/optimizer/cnn.onnx", &[1, 3, 32, 32]),
            ("tests/data/optimizer/lstm.onnx", &[5, 1, 8]),
            ("tests/data/optimizer/residual.onnx", &[1, 32, 16, 16]),
            ("tests/data/cls_qdq_softmax.onnx", &[1, 3, 48, 192]),
        ];
        use tract_onnx::prelude::InferenceModelExt;
        for (path, shape) in models {
            let mut model = tract_onnx::onnx()
                .model_for_path(crate::model::tests::repo(path))
                .unwrap();
            model.set_input_fact(0, f32::fact(shape).into()).unwrap();
            let folded = prop_const::FOLDED.with(|n| n.get());
            same_as_tracts(model.into_typed().unwrap(), path);
            let folded = prop_const::FOLDED.with(|n| n.get()) - folded;
            // The residual block's two 3×3 kernels, times a batch norm's
            // scale and divided by a per-channel operand, are folded by
            // prop_const's loops (the small folds are tract's).
            if path.ends_with("residual.onnx") {
                assert_eq!(folded, 2, "{path}");
            }
        }
    }

    /// The same on every zoo graph (tests/data/zoo: convolutions of every
    /// kind, resizes, attention, a GRU), typed as the runtime types ONNX.
    /// One of them tract's own declutter refuses (an axis change its `Conv`
    /// cannot take, see change_axes.rs): there the driver must succeed.
    #[test]
    fn the_driver_builds_the_graph_tract_builds_on_every_zoo_graph() {
        use crate::model::tests::{npz, zoo_dirs};
        let mut compared = 0;
        for dir in zoo_dirs() {
            let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
            let specs: Vec<_> = npz(&dir.join("in.npz")).iter().map(|t| t.spec()).collect();
            let onnx = edgefleet_wire::manifest::ModelFormat::Onnx;
            let typed = crate::model::pinned_typed(onnx, &bytes, &specs).unwrap().0;
            let what = dir.display().to_string();
            if typed.clone().into_decluttered().is_err() {
                let mut ours = typed;
                declutter(&mut ours).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                continue;
            }
            same_as_tracts(typed, &what);
            compared += 1;
        }
        assert!(compared >= 20, "{compared}");
    }

    fn same_as_tracts(typed: TypedModel, what: &str) {
        let mut ours = typed.clone();
        declutter(&mut ours).unwrap();
        let tracts = typed.into_decluttered().unwrap();
        assert_same(&ours, &tracts, &format!("{what}: declutter"));

        let mut ours = tracts.clone();
        optimize(&mut ours).unwrap();
        let mut tracts = tracts;
        tracts.optimize().unwrap();
        assert_same(&ours, &tracts, &format!("{what}: optimize"));
        assert!(ours.properties.contains_key(TRACT_STAGE), "{what}");
    }
}

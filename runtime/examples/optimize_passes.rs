//! What tract's `optimize()` does to a decluttered model, the step every
//! NNEF load pays (an ONNX load pays `declutter()` before it; both are
//! timed). Then drives tract's own optimizer passes one patch at a time,
//! in `OptimizerSession::optimize`'s order, and counts the patches each
//! pass applies: every patch is a `ModelPatch::apply`, which scans the
//! whole graph. The counts in scripts/bench_notes.md come from here.
//!
//! ```text
//! cargo run --release -p edgefleet-runtime --example optimize_passes -- \
//!     models/rec/ch_PP-OCRv4_rec_infer.onnx 1,3,48,320
//! ```

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::optim::Optimizer;

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(shape)) = (args.next(), args.next()) else {
        eprintln!("usage: optimize_passes MODEL.onnx N,C,H,W [repeats]");
        std::process::exit(2);
    };
    let shape: Vec<usize> = shape.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let repeats: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);

    let mut model = tract_onnx::onnx().model_for_path(&path)?;
    model.set_input_fact(0, f32::fact(&shape).into())?;
    let typed = model.into_typed()?;
    let typed_again = typed.clone();
    let mut declutter = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        typed.clone().into_decluttered()?;
        declutter.push(t.elapsed());
    }
    let decluttered = typed.into_decluttered()?;

    // optimize() as the device calls it, for the total to compare against.
    let mut optimize = Vec::new();
    let mut optimized_nodes = 0;
    for _ in 0..repeats {
        let mut m = decluttered.clone();
        let t = Instant::now();
        m.optimize()?;
        optimize.push(t.elapsed());
        optimized_nodes = m.nodes.len();
    }
    println!(
        "{} nodes decluttered; declutter median {:.1} ms; optimize first {:.1} ms, median {:.1} ms",
        decluttered.nodes.len(),
        median_ms(&mut declutter),
        optimize[0].as_secs_f64() * 1e3,
        median_ms(&mut optimize)
    );

    // The same, through edgefleet_runtime::optimizer (no duplicate scan).
    let mut ours_declutter = Vec::new();
    let mut ours_optimize = Vec::new();
    for _ in 0..repeats {
        let mut m = typed_again.clone();
        let t = Instant::now();
        edgefleet_runtime::optimizer::declutter(&mut m)?;
        ours_declutter.push(t.elapsed());
        let mut m = decluttered.clone();
        let t = Instant::now();
        edgefleet_runtime::optimizer::optimize(&mut m)?;
        ours_optimize.push(t.elapsed());
    }
    println!(
        "edgefleet optimizer: declutter median {:.1} ms; optimize median {:.1} ms",
        median_ms(&mut ours_declutter),
        median_ms(&mut ours_optimize)
    );

    // The same passes, one patch at a time, counting what each applies.
    let optimizer = Optimizer::codegen();
    let mut session = optimizer.session();
    let mut m = decluttered.clone();
    let mut patches: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = HashSet::new();
    m.compact()?;
    for round in 0.. {
        let mut in_round = 0;
        for pass in optimizer.passes.clone().iter_mut() {
            let count = patches.entry(format!("{pass:?}")).or_default();
            loop {
                let mut applied = 0;
                pass.reset()?;
                while let Some(mut patch) = pass.next(&mut session, &m)? {
                    if let Some(watchdog) = patch.dont_apply_twice.take()
                        && !seen.insert(watchdog)
                    {
                        continue;
                    }
                    patch.apply(&mut m)?;
                    applied += 1;
                }
                if pass.run_direct(&mut m)? {
                    applied += 1;
                }
                *count += applied;
                in_round += applied;
                if applied == 0 {
                    break;
                }
                m.compact()?;
            }
            m.compact()?;
        }
        println!("round {round}: {in_round} patches");
        if in_round == 0 {
            break;
        }
        m.compact()?;
    }
    println!(
        "{} nodes optimized ({optimized_nodes} by optimize())",
        m.nodes.len()
    );
    for (name, count) in &patches {
        println!("{name}: {count} patches");
    }
    Ok(())
}

fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

//! Where an ONNX load's time goes, phase by phase (medians of N loads in
//! one process, front ends built first, as the agent does at start).
//!
//! ```text
//! cargo run --release -p edgefleet-runtime --example load_phases -- \
//!     models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx 1,3,48,192 [repeats]
//! ```

use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceModelExt;

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(shape)) = (args.next(), args.next()) else {
        eprintln!("usage: load_phases MODEL.onnx N,C,H,W [repeats]");
        std::process::exit(2);
    };
    let shape: Vec<usize> = shape.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let repeats: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(9);
    let bytes = std::fs::read(&path)?;
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    edgefleet_runtime::warm_up();

    let mut phases: Vec<(&str, Vec<Duration>)> = [
        "parse",
        "analyse",
        "incorporate",
        "into_typed (all)",
        "declutter",
        "runtime load (all)",
    ]
    .iter()
    .map(|n| (*n, Vec::new()))
    .collect();
    for _ in 0..repeats {
        let t = Instant::now();
        let mut model = onnx.model_for_read(&mut &bytes[..])?;
        phases[0].1.push(t.elapsed());
        model.set_input_fact(0, f32::fact(&shape).into())?;
        let fresh = model.clone();
        let t = Instant::now();
        model.analyse(false)?;
        phases[1].1.push(t.elapsed());
        let t = Instant::now();
        let _ = model.incorporate()?;
        phases[2].1.push(t.elapsed());
        let t = Instant::now();
        let mut typed = fresh.into_typed()?;
        phases[3].1.push(t.elapsed());
        let t = Instant::now();
        edgefleet_runtime::optimizer::declutter(&mut typed)?;
        phases[4].1.push(t.elapsed());
    }
    let spec = edgefleet_wire::tensor::TensorSpec {
        name: edgefleet_runtime::declared_inputs(
            edgefleet_wire::manifest::ModelFormat::Onnx,
            &bytes,
        )?[0]
            .clone(),
        dtype: edgefleet_wire::tensor::DType::F32,
        shape: shape.iter().map(|&d| d as u64).collect(),
    };
    for _ in 0..repeats {
        let t = Instant::now();
        let m = edgefleet_runtime::Model::load(
            edgefleet_wire::manifest::ModelFormat::Onnx,
            &bytes,
            std::slice::from_ref(&spec),
            None,
        );
        phases[5].1.push(t.elapsed());
        if let Err(e) = m {
            eprintln!("runtime load: {e}");
        }
    }
    for (name, times) in &mut phases {
        times.sort();
        println!(
            "{name:>20}: {:7.2} ms",
            times[times.len() / 2].as_secs_f64() * 1e3
        );
    }
    Ok(())
}

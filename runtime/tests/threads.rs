//! `[engine] threads`: intra-op parallelism on a real model. The outputs
//! must not change, and the pool's threads must do part of the work.
#![cfg(feature = "threads")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use edgefleet_runtime::{Model, Threads};
use edgefleet_wire::manifest::ModelFormat;
use edgefleet_wire::npz::{NpzLimits, read_npz};
use edgefleet_wire::tensor::{NamedTensor, max_abs_diff};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn npz(p: &str) -> Vec<NamedTensor> {
    read_npz(std::fs::File::open(repo(p)).unwrap(), NpzLimits::default()).unwrap()
}

/// CPU time (user + system, in clock ticks) of each of this process's
/// threads whose name starts with `prefix`.
fn cpu_ticks_of_threads(prefix: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        out.push(f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap());
    }
    out
}

#[test]
fn two_compute_threads_share_the_work_and_change_no_output() {
    let bytes = std::fs::read(repo("models/rec/ch_PP-OCRv4_rec_infer.onnx")).unwrap();
    let inputs = npz("models/rec/golden/in_0.npz");
    let expected = npz("models/rec/golden/out_0.npz");
    let specs: Vec<_> = inputs.iter().map(NamedTensor::spec).collect();
    let model = Model::load(ModelFormat::Onnx, &bytes, &specs, None).unwrap();

    let single = model.session().unwrap().run(&inputs).unwrap();
    let threads = Threads::new(2, "rt-test-pool").unwrap();
    assert_eq!(threads.count(), 2);
    let outputs = threads.run(|| {
        let mut session = model.session().unwrap();
        let mut last = Vec::new();
        // Enough work (about a second) for the pool threads' share to
        // show in their CPU time, whose unit is a clock tick.
        for _ in 0..40 {
            last = session.run(&inputs).unwrap();
        }
        last
    });
    // The inference ran on one pool thread; the other sleeps until tract
    // splits work off, so its CPU time shows that it took some.
    let ticks = cpu_ticks_of_threads("rt-test-pool");
    assert_eq!(ticks.len(), 2, "a pool of two named threads");
    assert!(
        ticks.iter().all(|&t| t > 0),
        "both threads worked: {ticks:?} ticks"
    );
    for ((a, b), want) in outputs.iter().zip(&single).zip(&expected) {
        // tract splits products by output tiles, so no sum is reordered.
        assert_eq!(a.tensor, b.tensor, "{}: threads changed the output", a.name);
        let d = max_abs_diff(&a.tensor, &want.tensor).unwrap();
        assert!(
            d.max_abs < 1e-4,
            "{}: {} from the reference",
            a.name,
            d.max_abs
        );
    }
}

#[test]
fn one_thread_runs_on_the_caller_only() {
    let t = Threads::new(1, "rt-test-one").unwrap();
    assert_eq!(t.count(), 1);
    assert!(
        cpu_ticks_of_threads("rt-test-one").is_empty(),
        "no pool for one thread"
    );
}

//! Drift detection on the real models: `fleetctl bundle pack --baseline`
//! builds the histograms from calibration lines; the agent's engine then
//! sees live traffic.
//!
//! - Classifier: 10k inferences drawn from 300 held-out in-distribution
//!   lines raise no alarm; underexposed, low-contrast and blurred captures
//!   each raise one within 500 inferences.
//! - Recognizer (about 10x the classifier's compute per line): the same
//!   claims, with the engine running the 400 held-out and 64 shifted lines
//!   once each and the drift monitor fed 10k (resp. 500) observations that
//!   cycle through those real inputs and outputs, exactly as the engine
//!   feeds it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use edge_agent::bundle::open_bytes;
use edge_agent::drift::{DriftConfig, DriftMonitor};
use edge_agent::engine::{Engine, EngineConfig, prepare};
use edge_agent::metrics::Metrics;
use edgefleet_wire::bundle::Limits;
use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::manifest::{DriftBaseline, NonFiniteInputs, TargetArch};
use edgefleet_wire::npz::{NpzLimits, read_npz, to_npz_bytes};
use edgefleet_wire::tensor::{NamedTensor, Tensor};
use edgefleet_wire::verify::TrustRoot;
use fleetctl::pack::{PackRequest, PayloadCompression, pack};

use common::repo;
use integ::common;

/// Packing `model` as `name` 1.0.0 with these golden (input, output)
/// files and the drift baseline from `baseline`.
fn request(
    name: &str,
    model: std::path::PathBuf,
    (golden_inputs, golden_outputs): (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>),
    baseline: std::path::PathBuf,
) -> PackRequest {
    PackRequest {
        model,
        name: name.parse().unwrap(),
        version: semver::Version::new(1, 0, 0),
        sequence: 1,
        golden_inputs,
        golden_outputs,
        tolerance: 1e-4,
        keys: vec![signing_key_from_seed([1; 32])],
        now: edgefleet_wire::time::unix_now(),
        expires_in: 86_400,
        nnef: false,
        targets: TargetArch::ALL.to_vec(),
        min_agent_version: semver::Version::new(0, 1, 0),
        non_finite_inputs: NonFiniteInputs::Reject,
        baseline: Some(baseline),
        max_latency_ms: None,
        compression: PayloadCompression::Auto,
    }
}

/// A signed bundle of `models/{dir}` with the baseline from its
/// `drift/calib.npz`, and that baseline.
fn with_baseline(dir: &str, file: &str, calib: u64) -> (Vec<u8>, DriftBaseline) {
    let golden = |k: &str| {
        (0..2)
            .map(|i| repo(&format!("models/{dir}/golden/{k}_{i}.npz")))
            .collect::<Vec<_>>()
    };
    let packed = pack(&request(
        dir,
        repo(&format!("models/{dir}/{file}")),
        (golden("in"), golden("out")),
        repo(&format!("models/{dir}/drift/calib.npz")),
    ))
    .unwrap();
    let b = packed.manifest.drift_baseline.clone().unwrap();
    assert_eq!(b.samples, calib);
    assert_eq!(b.inputs.len(), 6, "mean and std of 3 channels");
    assert!(b.output.is_some());
    (packed.bundle, b)
}

/// The first `rows` rows of `t`, with `shape` (same element count).
fn rows(t: &Tensor, rows: usize, shape: Vec<u64>) -> Tensor {
    let row_bytes = t.data().len() / t.shape()[0] as usize;
    Tensor::from_bytes(t.dtype(), shape, t.data()[..rows * row_bytes].to_vec()).unwrap()
}

/// For an input whose golden file has a batch of 2, calibration rows
/// stacked on the batch axis make one sample per 2 rows, and whole inputs
/// (`[N, 2, ...]`) one each; a row count that does not divide is refused
/// with the shapes the packer takes (it used to read past the array and
/// panic).
#[test]
fn calibration_for_a_batched_input_is_split_into_whole_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &str| {
        let f = std::fs::File::open(repo(p)).unwrap();
        read_npz(std::io::BufReader::new(f), NpzLimits::default()).unwrap()
    };
    let write = |file: &str, t: &NamedTensor| {
        let path = dir.path().join(file);
        std::fs::write(&path, to_npz_bytes(std::slice::from_ref(t)).unwrap()).unwrap();
        path
    };
    let (a, b) = (
        &read("models/cls/golden/in_0.npz")[0],
        &read("models/cls/golden/in_1.npz")[0],
    );
    let pair = [a.tensor.data(), b.tensor.data()].concat();
    let batched = NamedTensor::new(
        a.name.clone(),
        Tensor::from_bytes(a.tensor.dtype(), vec![2, 3, 48, 192], pair).unwrap(),
    );
    let golden = write("in.npz", &batched);
    let calib = read("models/cls/drift/calib.npz").remove(0);
    let pack_with = |baseline: std::path::PathBuf| {
        pack(&request(
            "cls",
            repo("models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            (vec![golden.clone()], Vec::new()),
            baseline,
        ))
    };
    let samples = |r: fleetctl::error::Result<fleetctl::pack::Packed>| {
        r.unwrap().manifest.drift_baseline.unwrap().samples
    };
    let as_rows = |n: usize| {
        NamedTensor::new(
            calib.name.clone(),
            rows(&calib.tensor, n, vec![n as u64, 3, 48, 192]),
        )
    };
    assert_eq!(samples(pack_with(write("rows.npz", &as_rows(6)))), 3);
    let whole = NamedTensor::new(
        calib.name.clone(),
        rows(&calib.tensor, 6, vec![3, 2, 3, 48, 192]),
    );
    assert_eq!(samples(pack_with(write("whole.npz", &whole))), 3);
    let e = pack_with(write("odd.npz", &as_rows(5)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[N, 2, 3, 48, 192] or [rows, 3, 48, 192] with rows a multiple of 2"),
        "{e}"
    );
}

fn cls_with_baseline() -> Vec<u8> {
    with_baseline("cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx", 300).0
}

/// Per-sample `[1, 3, 48, W]` f32 inputs from a float16 set.
fn samples(rel: &str) -> Vec<Vec<NamedTensor>> {
    let f = std::fs::File::open(repo(rel)).unwrap();
    let arrays = read_npz(std::io::BufReader::new(f), NpzLimits::default()).unwrap();
    let x = &arrays[0].tensor;
    let n = x.shape()[0] as usize;
    let per = x.element_count() / n;
    (0..n)
        .map(|i| {
            let v: Vec<f32> = (i * per..(i + 1) * per)
                .map(|k| x.get_f64(k) as f32)
                .collect();
            vec![NamedTensor {
                name: "x".into(),
                tensor: Tensor::from_f32(vec![1, 3, 48, x.shape()[3]], &v).unwrap(),
            }]
        })
        .collect()
}

/// A fresh engine serving the bundle (fresh drift window).
fn engine(bundle: &[u8]) -> Arc<Engine> {
    let root = TrustRoot::new([signing_key_from_seed([1; 32]).verifying_key()], 1).unwrap();
    let tb = open_bytes(bundle, &root, &Limits::default(), "bundle").unwrap();
    let (model, _) = prepare(tb).unwrap();
    assert!(model.drift.is_some(), "the baseline reached the device");
    let e = Engine::start(EngineConfig::default(), Arc::new(Metrics::default())).unwrap();
    e.activate(model);
    e
}

/// Runs `n` inferences cycling through `set`; returns the index (1-based)
/// of the inference after which the first alert was raised.
async fn first_alert(e: &Engine, set: &[Vec<NamedTensor>], n: usize) -> Option<usize> {
    for i in 0..n {
        e.infer(set[i % set.len()].clone()).await.unwrap();
        let m = e.active().unwrap();
        if !m.drift_alerts.lock().unwrap().is_empty() {
            return Some(i + 1);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_in_distribution_inferences_raise_no_alarm() {
    let bundle = cls_with_baseline();
    let e = engine(&bundle);
    let holdout = samples("models/cls/drift/holdout.npz");
    assert_eq!(first_alert(&e, &holdout, 10_000).await, None);
    let m = e.active().unwrap();
    let snap = m.drift.as_ref().unwrap().lock().unwrap().snapshot();
    let worst = snap.first().unwrap();
    assert!(worst.psi < 0.2, "{worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_captures_raise_an_alarm_within_500_inferences() {
    let bundle = cls_with_baseline();
    for shift in ["brightness", "contrast", "blur"] {
        let e = engine(&bundle);
        let set = samples(&format!("models/cls/drift/{shift}.npz"));
        let at = first_alert(&e, &set, 500).await;
        assert!(at.is_some(), "{shift}: no drift alarm in 500 inferences");
        let m = e.active().unwrap();
        let alert = m.drift_alerts.lock().unwrap()[0].clone();
        assert!(
            alert.values.iter().all(|v| v.psi > 0.2),
            "{shift}: {alert:?}"
        );
        eprintln!(
            "{shift}: alarm after {} inferences: {:?}",
            at.unwrap(),
            alert.values.first()
        );
    }
}

/// Runs every sample through the engine once: (inputs, output score).
async fn scored(e: &Engine, set: Vec<Vec<NamedTensor>>) -> Vec<(Vec<NamedTensor>, Option<f64>)> {
    let mut out = Vec::with_capacity(set.len());
    for inputs in set {
        let r = e.infer(inputs.clone()).await.unwrap();
        out.push((inputs, edgefleet_wire::drift::output_score(&r.outputs)));
    }
    out
}

/// Feeds `n` observations cycling through `seen`; the 1-based index of the
/// first alert.
fn first_monitor_alert(
    m: &mut DriftMonitor,
    seen: &[(Vec<NamedTensor>, Option<f64>)],
    n: usize,
) -> Option<(usize, edge_agent::drift::DriftAlert)> {
    (0..n).find_map(|i| {
        let (inputs, score) = &seen[i % seen.len()];
        m.observe_scored(inputs, *score).map(|a| (i + 1, a))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recognizer_raises_no_false_alarm_and_catches_shifted_captures() {
    let (bundle, baseline) = with_baseline("rec", "ch_PP-OCRv4_rec_infer.onnx", 400);
    let e = engine(&bundle);

    let holdout = scored(&e, samples("models/rec/drift/holdout.npz")).await;
    let mut m = DriftMonitor::new(&baseline, DriftConfig::default());
    assert!(first_monitor_alert(&mut m, &holdout, 10_000).is_none());
    let worst = m.snapshot()[0].clone();
    assert!(worst.psi < 0.2, "{worst:?}");
    eprintln!("in distribution after 10k: worst {worst:?}");

    for shift in ["brightness", "contrast", "blur"] {
        let set = scored(&e, samples(&format!("models/rec/drift/{shift}.npz"))).await;
        let mut m = DriftMonitor::new(&baseline, DriftConfig::default());
        let (at, alert) = first_monitor_alert(&mut m, &set, 500)
            .unwrap_or_else(|| panic!("{shift}: no drift alarm in 500 observations"));
        assert!(
            alert.values.iter().all(|v| v.psi > 0.2),
            "{shift}: {alert:?}"
        );
        eprintln!("{shift}: alarm after {at}: {:?}", alert.values.first());
    }
}

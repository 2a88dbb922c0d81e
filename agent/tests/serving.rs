//! The agent's serving path end to end: real models from models/, packed
//! into signed bundles, verified, self-tested and served over a real HTTP
//! server on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_agent::api::{self, ApiConfig, NPZ_CONTENT_TYPE};
use edge_agent::bundle::{TrustedBundle, open_bytes};
use edge_agent::compiled::CompiledModels;
use edge_agent::engine::{ActiveModel, Compiled, Engine, EngineConfig, prepare, prepare_with};
use edge_agent::error::AgentError;
use edge_agent::metrics::Metrics;
use edgefleet_runtime::{Model, TRACT_VERSION};
use edgefleet_wire::bundle::{Limits, Signed, compress_model, write_bundle};
use edgefleet_wire::keys::{encode_public_key, signing_key_from_seed};
use edgefleet_wire::manifest::{
    GoldenCase, GoldenSet, Manifest, ModelFormat, NonFiniteInputs, ReferenceSource, TargetArch,
};
use edgefleet_wire::names::ModelName;
use edgefleet_wire::npz::{NpzLimits, from_npz_bytes, to_npz_bytes};
use edgefleet_wire::tensor::{NamedTensor, Tensor, max_abs_diff};
use edgefleet_wire::time::unix_now as now_unix;
use edgefleet_wire::verify::TrustRoot;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(rel)
}

fn npz(rel: &str) -> Vec<NamedTensor> {
    from_npz_bytes(&std::fs::read(repo(rel)).unwrap(), NpzLimits::default()).unwrap()
}

/// A real model with its ORT golden cases.
struct Fixture {
    name: &'static str,
    model: &'static str,
    dir: &'static str,
    cases: usize,
    tolerance: f32,
}

const CLS: Fixture = Fixture {
    name: "ppocr-cls",
    model: "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    dir: "models/cls",
    cases: 4,
    tolerance: 1e-4,
};
const REC: Fixture = Fixture {
    name: "ppocr-rec",
    model: "models/rec/ch_PP-OCRv4_rec_infer.onnx",
    dir: "models/rec",
    cases: 2,
    tolerance: 1e-4,
};
const INT8: Fixture = Fixture {
    name: "ppocr-cls-int8",
    model: "models/cls-int8/cls_int8.onnx",
    dir: "models/cls-int8",
    cases: 4,
    tolerance: 1e-4,
};
const MULTI: Fixture = Fixture {
    name: "multi-io",
    model: "models/multi/multi_io.onnx",
    dir: "models/multi",
    cases: 2,
    tolerance: 1e-5,
};

fn cases(f: &Fixture) -> Vec<GoldenCase> {
    (0..f.cases)
        .map(|i| GoldenCase {
            inputs: npz(&format!("{}/golden/in_{i}.npz", f.dir)),
            outputs: npz(&format!("{}/golden/out_{i}.npz", f.dir)),
        })
        .collect()
}

/// Packs a bundle the way fleetctl does (minus its checks, which are
/// fleetctl's own tests), optionally with reference outputs shifted.
fn bundle_bytes(f: &Fixture, sequence: u64, shift_reference: f32) -> Vec<u8> {
    bundle_bytes_with(f, sequence, shift_reference, |_| {})
}

/// [`bundle_bytes`] with the manifest edited before it is signed.
fn bundle_bytes_with(
    f: &Fixture,
    sequence: u64,
    shift_reference: f32,
    edit: impl FnOnce(&mut Manifest),
) -> Vec<u8> {
    bundle_bytes_in(f, ModelFormat::Onnx, sequence, shift_reference, edit)
}

/// [`bundle_bytes_with`] in either format (NNEF as the packer converts it).
fn bundle_bytes_in(
    f: &Fixture,
    format: ModelFormat,
    sequence: u64,
    shift_reference: f32,
    edit: impl FnOnce(&mut Manifest),
) -> Vec<u8> {
    let onnx = std::fs::read(repo(f.model)).unwrap();
    let mut cases = cases(f);
    let specs: Vec<_> = cases[0].inputs.iter().map(NamedTensor::spec).collect();
    let model = Model::load(ModelFormat::Onnx, &onnx, &specs, None).unwrap();
    // Order golden tensors like the model's specs.
    for c in &mut cases {
        c.outputs
            .sort_by_key(|t| model.outputs().iter().position(|s| s.name == t.name));
        if shift_reference != 0.0 {
            let t = &mut c.outputs[0];
            let shifted: Vec<f32> = t
                .tensor
                .as_f32()
                .unwrap()
                .iter()
                .map(|v| v + shift_reference)
                .collect();
            t.tensor = Tensor::from_f32(t.tensor.shape().to_vec(), &shifted).unwrap();
        }
    }
    let stored = match format {
        ModelFormat::Onnx => onnx,
        ModelFormat::Nnef => edgefleet_runtime::onnx_to_nnef(&onnx, &specs).unwrap(),
    };
    let (payload, compressed) = compress_model(&stored, format, 3).unwrap();
    let now = now_unix();
    let manifest = Manifest {
        name: ModelName::new(f.name).unwrap(),
        version: semver::Version::new(1, 0, sequence),
        sequence,
        created_at: now,
        expires_at: now + 3600,
        payload,
        tract_version: TRACT_VERSION.into(),
        inputs: specs,
        outputs: model.outputs().to_vec(),
        targets: TargetArch::ALL.to_vec(),
        min_agent_version: semver::Version::new(0, 1, 0),
        non_finite_inputs: NonFiniteInputs::Reject,
        golden: GoldenSet {
            tolerance: f.tolerance,
            reference: ReferenceSource::External,
            cases,
        },
        drift_baseline: None,
        pack_latency: None,
    };
    let mut manifest = manifest;
    edit(&mut manifest);
    let key = signing_key_from_seed([9; 32]);
    let signed = Signed::sign(&manifest, &[&key]).unwrap();
    let mut out = Vec::new();
    write_bundle(&mut out, &signed, &compressed).unwrap();
    out
}

/// The model's signed digest is compared while tract parses the bytes (on
/// a second thread for a model over two hashing chunks, rec; before the
/// parse for a smaller one, cls): a bundle signed with a wrong one opens,
/// since its payload matched, but never loads.
#[test]
fn a_model_signed_with_a_wrong_digest_opens_but_never_loads() {
    for f in [&CLS, &REC] {
        let b = bundle_bytes_with(f, 1, 0.0, |m| m.payload.sha256[0] ^= 1);
        let tb = open_bytes(&b, &root(), &Limits::default(), f.name).unwrap();
        let err = prepare(tb).map(|_| ()).unwrap_err();
        assert!(
            matches!(&err, AgentError::Bundle { source, .. } if source.code() == "hash_mismatch"),
            "{}: {err}",
            f.name
        );
    }
}

/// Every golden case's outputs from `m`, run directly on its plan.
fn answers(m: &ActiveModel, f: &Fixture) -> Vec<Vec<NamedTensor>> {
    let mut session = m.model.session().unwrap();
    cases(f)
        .iter()
        .map(|c| session.run(&c.inputs).unwrap())
        .collect()
}

/// An installed ONNX model is kept compiled (its decluttered graph as NNEF,
/// next to the bundle) once it passed its self-test. The next load of that
/// bundle comes from it and answers exactly as the ONNX did; a compiled
/// file with a flipped byte is deleted, and the bundle loads as if there
/// were none and writes it again. multi has two inputs and two outputs,
/// which the compiled form takes by position.
#[test]
fn an_onnx_model_kept_compiled_loads_from_it_next_time_and_answers_the_same() {
    for f in [&CLS, &MULTI] {
        let dir = tempfile::tempdir().unwrap();
        let models = CompiledModels::new(dir.path());
        let compiled = Compiled {
            models: models.clone(),
            key: "b1".into(),
        };
        let bytes = bundle_bytes(f, 1, 0.0);
        let open = || open_bytes(&bytes, &root(), &Limits::default(), f.name).unwrap();

        let first = prepare_with(open(), Some(compiled.clone())).unwrap();
        assert!(!first.timings.compiled, "{}", f.name);
        assert_eq!(
            models.lookup("b1"),
            None,
            "written only once the model passed"
        );
        first
            .compiling
            .expect("an ONNX model is kept")
            .join()
            .unwrap();
        let found = models.lookup("b1").expect("written");

        let second = prepare_with(open(), Some(compiled.clone())).unwrap();
        assert!(second.timings.compiled, "{}", f.name);
        assert!(second.compiling.is_none());
        assert_eq!(second.model.info, {
            let mut i = first.model.info.clone();
            i.loaded_at = second.model.info.loaded_at;
            i
        });
        assert_eq!(
            answers(&second.model, f),
            answers(&first.model, f),
            "{}",
            f.name
        );

        let mut flipped = std::fs::read(&found.path).unwrap();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x10;
        std::fs::write(&found.path, &flipped).unwrap();
        let third = prepare_with(open(), Some(compiled.clone())).unwrap();
        assert!(
            !third.timings.compiled,
            "{}: a corrupt file is not used",
            f.name
        );
        assert!(!found.path.exists() || std::fs::read(&found.path).unwrap() != flipped);
        third.compiling.expect("written again").join().unwrap();
        let fourth = prepare_with(open(), Some(compiled)).unwrap();
        assert!(fourth.timings.compiled, "{}", f.name);
        assert_eq!(
            answers(&fourth.model, f),
            answers(&first.model, f),
            "{}",
            f.name
        );
    }
}

/// A compiled file whose digest matches but whose model does not answer as
/// the bundle's golden cases say (here: one weight tensor zeroed) fails the
/// self-test: it is deleted and never serves, and the bundle's own model
/// does. Such a failure would repeat, so this runtime does not write that
/// bundle's compiled form again. An NNEF bundle is never compiled again.
#[test]
fn a_compiled_model_that_fails_the_self_test_is_deleted_and_the_bundle_serves() {
    let dir = tempfile::tempdir().unwrap();
    let models = CompiledModels::new(dir.path());
    let compiled = Compiled {
        models: models.clone(),
        key: "b1".into(),
    };
    let bytes = bundle_bytes(&CLS, 1, 0.0);
    let open = || open_bytes(&bytes, &root(), &Limits::default(), CLS.name).unwrap();
    let first = prepare_with(open(), Some(compiled.clone())).unwrap();
    first.compiling.unwrap().join().unwrap();
    let good = std::fs::read(models.lookup("b1").unwrap().path).unwrap();

    // The largest weight file of the tar, past tract's 128-byte header.
    let mut out = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(&good[..]);
    let mut entries: Vec<(tar::Header, std::path::PathBuf, Vec<u8>)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (e.header().clone(), e.path().unwrap().into_owned(), data)
        })
        .collect();
    let largest = entries
        .iter_mut()
        .filter(|(_, p, _)| p.extension().is_some_and(|x| x == "dat"))
        .max_by_key(|(_, _, d)| d.len())
        .unwrap();
    largest.2[128..].fill(0);
    for (mut h, p, d) in entries {
        out.append_data(&mut h, p, &d[..]).unwrap();
    }
    let zeroed = out.into_inner().unwrap();
    let before = edge_agent::compiled::COUNTS
        .rejected
        .load(std::sync::atomic::Ordering::Relaxed);
    models.store("b1", &zeroed).unwrap();

    let second = prepare_with(open(), Some(compiled.clone())).unwrap();
    assert!(!second.timings.compiled, "the zeroed model must not serve");
    assert!(
        edge_agent::compiled::COUNTS
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    );
    assert_eq!(answers(&second.model, &CLS), answers(&first.model, &CLS));
    second.compiling.unwrap().join().unwrap();
    assert_eq!(models.lookup("b1"), None, "not written again");
    let third = prepare_with(open(), Some(compiled)).unwrap();
    assert!(!third.timings.compiled);
    assert_eq!(answers(&third.model, &CLS), answers(&first.model, &CLS));

    // An NNEF bundle is loaded as it is.
    let nnef = bundle_bytes_in(&CLS, ModelFormat::Nnef, 1, 0.0, |_| {});
    let nnef = open_bytes(&nnef, &root(), &Limits::default(), "nnef").unwrap();
    let p = prepare_with(
        nnef,
        Some(Compiled {
            models: models.clone(),
            key: "b2".into(),
        }),
    )
    .unwrap();
    assert!(p.compiling.is_none() && !p.timings.compiled);
    assert_eq!(models.lookup("b2"), None);
}

fn root() -> TrustRoot {
    TrustRoot::new([signing_key_from_seed([9; 32]).verifying_key()], 1).unwrap()
}

fn trusted(f: &Fixture) -> TrustedBundle {
    open_bytes(
        &bundle_bytes(f, 1, 0.0),
        &root(),
        &Limits::default(),
        f.name,
    )
    .unwrap()
}

struct Server {
    url: String,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(f: Option<&Fixture>, engine_cfg: EngineConfig, api_cfg: ApiConfig) -> Server {
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(engine_cfg, metrics.clone()).unwrap();
    if let Some(f) = f {
        let b = trusted(f);
        let (active, _) = tokio::task::spawn_blocking(move || prepare(b))
            .await
            .unwrap()
            .unwrap();
        engine.activate(active);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let app = api::router(engine.clone(), metrics.clone(), &api_cfg);
    tokio::spawn(api::serve(listener, app, stop.clone()));
    Server {
        url,
        engine,
        metrics,
        stop,
    }
}

fn json_inputs(inputs: &[NamedTensor]) -> Value {
    let map: serde_json::Map<String, Value> = inputs
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                serde_json::to_value(edge_agent::codec::encode_tensor(&t.tensor)).unwrap(),
            )
        })
        .collect();
    json!({ "inputs": map })
}

fn tensor_from_json(v: &Value) -> Tensor {
    let dtype = v["dtype"].as_str().unwrap();
    let shape: Vec<u64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    let data = v["data"].as_array().unwrap();
    match dtype {
        "f32" => Tensor::from_f32(
            shape,
            &data
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect::<Vec<_>>(),
        )
        .unwrap(),
        "i64" => Tensor::from_i64(
            shape,
            &data.iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>(),
        )
        .unwrap(),
        other => panic!("unexpected output dtype {other}"),
    }
}

async fn post_json(url: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = edge_agent::tls::default_client()
        .post(format!("{url}/v1/infer"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap(), headers)
}

async fn post_raw(
    url: &str,
    ct: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>, reqwest::header::HeaderMap) {
    let r = edge_agent::tls::default_client()
        .post(format!("{url}/v1/infer"))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.bytes().await.unwrap().to_vec(), headers)
}

async fn assert_serves_references(f: &Fixture) {
    let server = serve(Some(f), EngineConfig::default(), ApiConfig::default()).await;
    for (i, case) in cases(f).iter().enumerate() {
        // JSON form.
        let (status, body, _) = post_json(&server.url, &json_inputs(&case.inputs)).await;
        assert_eq!(status, 200, "{}: {body}", f.name);
        assert_eq!(body["model"]["name"], f.name);
        assert!(body["latency_ms"].as_f64().unwrap() > 0.0);
        for expected in &case.outputs {
            let got = tensor_from_json(&body["outputs"][&expected.name]);
            let d = max_abs_diff(&got, &expected.tensor).unwrap();
            assert!(
                d.max_abs <= f64::from(f.tolerance),
                "{} case {i} output {}: {d:?}",
                f.name,
                expected.name
            );
        }
        // npz form, answered in npz.
        let (status, bytes, headers) = post_raw(
            &server.url,
            NPZ_CONTENT_TYPE,
            to_npz_bytes(&case.inputs).unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(headers["content-type"], NPZ_CONTENT_TYPE);
        assert_eq!(headers["x-model-name"], f.name);
        let outs = from_npz_bytes(&bytes, NpzLimits::default()).unwrap();
        for expected in &case.outputs {
            let got = outs.iter().find(|o| o.name == expected.name).unwrap();
            let d = max_abs_diff(&got.tensor, &expected.tensor).unwrap();
            assert!(
                d.max_abs <= f64::from(f.tolerance),
                "{} npz case {i} output {}: {d:?}",
                f.name,
                expected.name
            );
        }
    }
}

#[tokio::test]
async fn engine_threads_start_a_shared_compute_pool_and_keep_outputs_exact() {
    let tract_threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|c| c.starts_with("tract-"))
            .count()
    };
    let before = tract_threads();
    let server = serve(
        Some(&REC),
        EngineConfig {
            workers: 2,
            queue: 16,
            threads: 3,
        },
        ApiConfig::default(),
    )
    .await;
    // A pool of `threads` per worker.
    assert_eq!(tract_threads() - before, 2 * 3);
    for (i, case) in cases(&REC).iter().enumerate() {
        let out = server.engine.infer(case.inputs.clone()).await.unwrap();
        for expected in &case.outputs {
            let got = out
                .outputs
                .iter()
                .find(|o| o.name == expected.name)
                .unwrap();
            let d = max_abs_diff(&got.tensor, &expected.tensor).unwrap();
            assert!(d.max_abs <= f64::from(REC.tolerance), "case {i}: {d:?}");
        }
    }
    let e = Engine::start(
        EngineConfig {
            threads: 0,
            ..EngineConfig::default()
        },
        server.metrics.clone(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("[engine] threads"), "{e}");
}

#[tokio::test]
async fn serves_the_cls_model_with_outputs_matching_ort() {
    assert_serves_references(&CLS).await;
}

#[tokio::test]
async fn serves_the_rec_model_with_outputs_matching_ort() {
    assert_serves_references(&REC).await;
}

#[tokio::test]
async fn serves_the_int8_classifier_with_outputs_matching_ort() {
    assert_serves_references(&INT8).await;
}

#[tokio::test]
async fn serves_a_multi_input_int64_two_output_model() {
    assert_serves_references(&MULTI).await;
}

#[tokio::test]
async fn reports_the_active_model_and_health() {
    let server = serve(Some(&CLS), EngineConfig::default(), ApiConfig::default()).await;
    let m: Value = edge_agent::tls::default_client()
        .get(format!("{}/v1/model", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["name"], "ppocr-cls");
    assert_eq!(m["version"], "1.0.1");
    assert_eq!(m["sequence"], 1);
    assert_eq!(m["inputs"][0]["name"], "x");
    assert_eq!(m["outputs"][0]["shape"], json!([1, 2]));
    assert!(m["loaded_at"].as_u64().unwrap() > 1_700_000_000);
    let h = edge_agent::tls::default_client()
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);

    let empty = serve(None, EngineConfig::default(), ApiConfig::default()).await;
    let h = edge_agent::tls::default_client()
        .get(format!("{}/healthz", empty.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 503);
    let (status, body, _) = post_json(&empty.url, &json!({"inputs": {}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_model"))
    );
}

#[tokio::test]
async fn every_bad_input_gets_a_specific_4xx_and_the_model_keeps_serving() {
    let server = serve(
        Some(&MULTI),
        EngineConfig::default(),
        ApiConfig {
            max_body_bytes: 64 * 1024,
            ..ApiConfig::default()
        },
    )
    .await;
    let good = cases(&MULTI)[0].inputs.clone();
    let good_json = json_inputs(&good);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut v = good_json.clone();
        edit(&mut v);
        v
    };
    let json_cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "unknown input",
            with(&|v| {
                v["inputs"]["nope"] = json!({"dtype": "f32", "shape": [1], "data": [1.0]});
            }),
            400,
            "unknown_input",
        ),
        (
            "missing input",
            with(&|v| {
                v["inputs"].as_object_mut().unwrap().remove("step/ids");
            }),
            400,
            "missing_input",
        ),
        (
            "wrong dtype",
            with(&|v| {
                v["inputs"]["step/ids"]["dtype"] = json!("i32");
            }),
            400,
            "wrong_dtype",
        ),
        (
            "wrong shape",
            with(&|v| {
                v["inputs"]["x"]["shape"] = json!([2, 4]);
            }),
            400,
            "wrong_shape",
        ),
        (
            "element count",
            with(&|v| {
                v["inputs"]["x"]["data"].as_array_mut().unwrap().pop();
            }),
            400,
            "element_count",
        ),
        (
            "NaN (null) when the manifest forbids it",
            with(&|v| {
                v["inputs"]["x"]["data"][0] = Value::Null;
            }),
            400,
            "non_finite_input",
        ),
        (
            "unknown dtype",
            with(&|v| {
                v["inputs"]["x"]["dtype"] = json!("complex64");
            }),
            400,
            "unknown_dtype",
        ),
        (
            "no inputs field",
            json!({"input": {}}),
            400,
            "malformed_json",
        ),
    ];
    for (what, body, status, code) in json_cases {
        let (s, b, _) = post_json(&server.url, &body).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {b}"
        );
        assert!(!b["error"]["message"].as_str().unwrap().is_empty());
    }
    let raw_cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            "application/json",
            b"{\"inputs\": {".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "malformed npz",
            NPZ_CONTENT_TYPE,
            b"PK\x03\x04 garbage".to_vec(),
            400,
            "malformed_npz",
        ),
        (
            "body over the limit",
            "application/json",
            vec![b' '; 65 * 1024],
            413,
            "body_too_large",
        ),
        (
            "unsupported media type",
            "text/plain",
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "NaN in an npz body",
            NPZ_CONTENT_TYPE,
            {
                let mut ts = good.clone();
                let x = ts.iter_mut().find(|t| t.name == "x").unwrap();
                let mut v = x.tensor.as_f32().unwrap();
                v[3] = f32::NAN;
                x.tensor = Tensor::from_f32(x.tensor.shape().to_vec(), &v).unwrap();
                to_npz_bytes(&ts).unwrap()
            },
            400,
            "non_finite_input",
        ),
    ];
    for (what, ct, body, status, code) in raw_cases {
        let (s, b, _) = post_raw(&server.url, ct, body).await;
        let v: Value = serde_json::from_slice(&b)
            .unwrap_or_else(|_| panic!("{what}: not JSON: {}", String::from_utf8_lossy(&b)));
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {v}"
        );
    }
    // After all of that, the model still answers correctly.
    let (s, b, _) = post_json(&server.url, &good_json).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(server.metrics.requests_with_status(200), 1);
    assert!(server.metrics.requests_with_status(400) >= 10);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let server = serve(
        Some(&REC),
        EngineConfig {
            workers: 1,
            queue: 1,
            threads: 1,
        },
        ApiConfig::default(),
    )
    .await;
    let body = json_inputs(&cases(&REC)[0].inputs);
    let mut handles = Vec::new();
    for _ in 0..12 {
        let url = server.url.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move { post_json(&url, &body).await }));
    }
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let (s, b, headers) = h.await.unwrap();
        match s {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert_eq!(b["error"]["code"], "queue_full");
                assert_eq!(headers["retry-after"], "1");
            }
            other => panic!("unexpected status {other}: {b}"),
        }
    }
    assert!(ok >= 1, "the queue still serves");
    assert!(
        busy >= 1,
        "12 concurrent rec inferences through a 1-slot queue must overflow"
    );
    assert_eq!(server.engine.queue_depth(), 0);
}

/// tract panics on some input values it cannot take (a Gather index past
/// its table). The worker catches it and answers 500 with what tract
/// said, counts it, rebuilds its session, and the next request is served.
#[tokio::test]
async fn an_input_that_makes_tract_panic_gets_an_error_and_the_model_keeps_serving() {
    let server = serve(Some(&MULTI), EngineConfig::default(), ApiConfig::default()).await;
    let case = &cases(&MULTI)[0];
    let mut bad = case.inputs.clone();
    let ids = &mut bad
        .iter_mut()
        .find(|t| t.name == "step/ids")
        .unwrap()
        .tensor;
    *ids = Tensor::from_i64(ids.shape().to_vec(), &vec![1_000_000; ids.element_count()]).unwrap();
    let (status, body, _) = post_json(&server.url, &json_inputs(&bad)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "inference_failed", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("worker panicked (") && msg.contains("the session was rebuilt"),
        "{msg}"
    );
    let panics = server
        .metrics
        .worker_panics
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(panics, 1);

    let (status, body, _) = post_json(&server.url, &json_inputs(&case.inputs)).await;
    assert_eq!(status, 200, "{body}");
    for expected in &case.outputs {
        let got = tensor_from_json(&body["outputs"][&expected.name]);
        let diff = max_abs_diff(&got, &expected.tensor).unwrap();
        assert!(diff.max_abs <= 1e-5, "{}: {diff:?}", expected.name);
    }
}

#[tokio::test]
async fn exposes_prometheus_metrics() {
    let server = serve(Some(&CLS), EngineConfig::default(), ApiConfig::default()).await;
    let body = json_inputs(&cases(&CLS)[0].inputs);
    post_json(&server.url, &body).await;
    post_json(&server.url, &json!({"bad": 1})).await;
    let text = edge_agent::tls::default_client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "edge_agent_requests_total{status=\"200\"} 1",
        "edge_agent_requests_total{status=\"400\"} 1",
        "edge_agent_errors_total{code=\"malformed_json\"} 1",
        "edge_agent_inference_seconds_count 1",
        "edge_agent_inference_seconds_bucket{le=\"+Inf\"} 1",
        "edge_agent_queue_depth 0",
        "edge_agent_active_model_info{name=\"ppocr-cls\",version=\"1.0.1\",sequence=\"1\"} 1",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[tokio::test]
async fn requires_a_bearer_token_when_one_is_configured() {
    let cfg = ApiConfig {
        token: Some("s3cret".into()),
        ..ApiConfig::default()
    };
    let server = serve(Some(&CLS), EngineConfig::default(), cfg).await;
    let client = edge_agent::tls::default_client();
    let r = client
        .get(format!("{}/v1/model", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{}/v1/model", server.url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{}/v1/model", server.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health stays open for supervisors.
    assert_eq!(
        client
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn binding_beyond_loopback_requires_a_token() {
    let open = ApiConfig {
        listen: "0.0.0.0:8080".parse().unwrap(),
        ..ApiConfig::default()
    };
    assert_eq!(open.validate().unwrap_err().code(), "config");
    let with_token = ApiConfig {
        token: Some("t".into()),
        ..open
    };
    with_token.validate().unwrap();
    ApiConfig::default().validate().unwrap();
}

#[test]
fn a_model_failing_its_self_test_is_never_prepared() {
    let b = open_bytes(
        &bundle_bytes(&CLS, 1, 0.5),
        &root(),
        &Limits::default(),
        "shifted",
    )
    .unwrap();
    let err = prepare(b).unwrap_err();
    assert_eq!(err.code(), "self_test_failed");
    let msg = err.to_string();
    assert!(msg.contains("output"), "{msg}");
    assert!(msg.contains("max abs"), "{msg}");
}

#[test]
fn rejects_a_bundle_from_an_untrusted_key_before_loading_it() {
    let other = TrustRoot::new([signing_key_from_seed([8; 32]).verifying_key()], 1).unwrap();
    let err = open_bytes(
        &bundle_bytes(&MULTI, 1, 0.0),
        &other,
        &Limits::default(),
        "x",
    )
    .unwrap_err();
    assert_eq!(err.code(), "unknown_key");
}

/// Writes a bundle and its trusted public key into `dir`.
fn bundle_on_disk(f: &Fixture, dir: &Path) -> (PathBuf, PathBuf) {
    let bundle = dir.join(format!("{}.bundle", f.name));
    std::fs::write(&bundle, bundle_bytes(f, 1, 0.0)).unwrap();
    let key = dir.join("trusted.pub");
    std::fs::write(
        &key,
        edgefleet_wire::keys::encode_public_key(&signing_key_from_seed([9; 32]).verifying_key()),
    )
    .unwrap();
    (bundle, key)
}

fn agent(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn infer_cli_runs_a_file_and_a_folder_matching_ort() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, key) = bundle_on_disk(&MULTI, dir.path());
    let (b, k) = (bundle.to_str().unwrap(), key.to_str().unwrap());
    let out = dir.path().join("out.npz");
    let o = agent(&[
        "infer",
        "--bundle",
        b,
        "--trust",
        k,
        "--inputs",
        repo("models/multi/golden/in_0.npz").to_str().unwrap(),
        "--outputs",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let check = |got: &Path, case: usize| {
        let outs = from_npz_bytes(&std::fs::read(got).unwrap(), NpzLimits::default()).unwrap();
        for expected in npz(&format!("models/multi/golden/out_{case}.npz")) {
            let g = outs.iter().find(|t| t.name == expected.name).unwrap();
            assert!(max_abs_diff(&g.tensor, &expected.tensor).unwrap().max_abs <= 1e-5);
        }
    };
    check(&out, 0);

    let input_dir = dir.path().join("in");
    let output_dir = dir.path().join("out");
    std::fs::create_dir(&input_dir).unwrap();
    for i in 0..2 {
        std::fs::copy(
            repo(&format!("models/multi/golden/in_{i}.npz")),
            input_dir.join(format!("case{i}.npz")),
        )
        .unwrap();
    }
    let o = agent(&[
        "infer",
        "--bundle",
        b,
        "--trust",
        k,
        "--input-dir",
        input_dir.to_str().unwrap(),
        "--output-dir",
        output_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check(&output_dir.join("case0.npz"), 0);
    check(&output_dir.join("case1.npz"), 1);

    // An untrusted key is refused before anything runs.
    let other = dir.path().join("other.pub");
    std::fs::write(
        &other,
        edgefleet_wire::keys::encode_public_key(&signing_key_from_seed([3; 32]).verifying_key()),
    )
    .unwrap();
    let o = agent(&[
        "infer",
        "--bundle",
        b,
        "--trust",
        other.to_str().unwrap(),
        "--inputs",
        "x.npz",
        "--outputs",
        "y.npz",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown key"));
}

#[test]
fn bench_cli_prints_the_documented_json_keys_for_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, key) = bundle_on_disk(&CLS, dir.path());
    for mode in ["in-process", "http-json", "http-npz", "bare"] {
        let o = agent(&[
            "bench",
            "--bundle",
            bundle.to_str().unwrap(),
            "--trust",
            key.to_str().unwrap(),
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--mode",
            mode,
            "--json",
        ]);
        assert!(
            o.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let j: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["mode"], mode);
        assert_eq!(j["iterations"], 3);
        for k in [
            "verify_ms",
            "load_ms",
            "self_test_ms",
            "min_ms",
            "median_ms",
            "p90_ms",
            "p99_ms",
        ] {
            assert!(
                j[k].as_f64().is_some_and(|v| v >= 0.0),
                "{mode}: {k} in {j}"
            );
        }
        assert!(j["rss_bytes"].as_u64().unwrap() > 1 << 20, "{mode}: {j}");
        // Only NNEF graphs come pre-parsed; this bundle is ONNX.
        assert_eq!(j["graph_preparsed"], false, "{mode}: {j}");
        assert!(j["min_ms"].as_f64() <= j["p99_ms"].as_f64());
    }
}

#[tokio::test]
async fn inputs_validated_for_a_swapped_out_model_are_revalidated_not_trusted() {
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::start(EngineConfig::default(), metrics).unwrap();
    let prep = |f: &'static Fixture| {
        let b = trusted(f);
        tokio::task::spawn_blocking(move || prepare(b).unwrap().0)
    };
    let cls = engine.activate(prep(&CLS).await.unwrap());
    let cls_inputs = cases(&CLS)[0].inputs.clone();
    cls.model.check_inputs(&cls_inputs).unwrap();
    let ok = engine
        .infer_validated(cls_inputs.clone(), &cls)
        .await
        .unwrap();
    assert_eq!(ok.model.info.name, "ppocr-cls");
    // The model changes between validation and execution.
    engine.activate(prep(&MULTI).await.unwrap());
    match engine.infer_validated(cls_inputs, &cls).await {
        Err(edge_agent::engine::InferError::Runtime(e)) => {
            assert!(
                matches!(e.code(), "wrong_shape" | "missing_input" | "unknown_input"),
                "{e}"
            )
        }
        other => panic!("expected a validation error from the new model, got {other:?}"),
    }
}

#[test]
fn serve_cli_verifies_self_tests_and_serves_until_terminated() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (bundle, key) = bundle_on_disk(&MULTI, dir.path());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args([
            "serve",
            "--bundle",
            bundle.to_str().unwrap(),
            "--trust",
            key.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .strip_prefix("listening on ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model: Value = rt.block_on(async {
        edge_agent::tls::default_client()
            .get(format!("{url}/v1/model"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(model["name"], "multi-io");
    let (status, body, _) = rt.block_on(post_json(&url, &json_inputs(&cases(&MULTI)[0].inputs)));
    assert_eq!(status, 200, "{body}");
    // SIGTERM: graceful shutdown, exit 0.
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");

    // A non-loopback address without a token is refused before serving.
    let o = agent(&[
        "serve",
        "--bundle",
        bundle.to_str().unwrap(),
        "--trust",
        key.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("requires an API bearer token"));
}

/// `edge-agent config check`: good configs pass without starting
/// anything; a missing key file, bad TLS files and an unenrollable setup
/// fail naming the file and key; `--reach` reports an unreachable server.
#[test]
fn config_check_loads_everything_the_daemon_would_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("release.pub"),
        encode_public_key(&signing_key_from_seed([1; 32]).verifying_key()),
    )
    .unwrap();
    let check = |name: &str, text: &str, extra: &[&str]| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["config", "check", "--config", p.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let base = "device_id = \"d1\"\ndata_dir = \"state\"\n[trust]\nkeys = [\"release.pub\"]\n";
    let (code, out, err) = check("ok.toml", base, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("[trust]: version 1") && out.contains("is good"),
        "{out}"
    );
    assert!(!d.join("state/store").exists(), "nothing started");

    let (code, _, err) = check(
        "nokey.toml",
        "data_dir = \"state\"\n[trust]\nkeys = [\"gone.pub\"]\n",
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("gone.pub"), "{err}");

    let server = "[server]\nurl = \"https://127.0.0.1:9\"\nca_file = \"release.pub\"\n";
    let (code, _, err) = check("tls.toml", &format!("{base}{server}"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("[server]") && err.contains("ca_file"), "{err}");

    let server = "[server]\nurl = \"http://127.0.0.1:9\"\n";
    let (code, _, err) = check("noenroll.toml", &format!("{base}{server}"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("enrollment_token"), "{err}");

    let server = "[server]\nurl = \"http://127.0.0.1:9\"\nenrollment_token = \"e\"\n";
    let (code, out, _) = check("enroll.toml", &format!("{base}{server}"), &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("not enrolled yet"), "{out}");
    let (code, _, err) = check("reach.toml", &format!("{base}{server}"), &["--reach"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unreachable"), "{err}");
}

#[tokio::test]
async fn feedback_is_counted_for_the_serving_model_and_bad_feedback_is_refused() {
    let server = serve(Some(&CLS), EngineConfig::default(), ApiConfig::default()).await;
    let http = edge_agent::tls::default_client();
    let post = |body: String| {
        let http = http.clone();
        let url = format!("{}/v1/feedback", server.url);
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (body, status, code) in [
        ("{\"value\": \"high\"}", 400, "bad_feedback"),
        ("not json", 400, "bad_feedback"),
        ("{\"value\": 1, \"extra\": 2}", 400, "bad_feedback"),
        (
            "{\"value\": 1, \"model\": \"ppocr-cls@0.9.0\"}",
            409,
            "model_mismatch",
        ),
    ] {
        let (s, v) = post(body.into()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
    }
    for (value, model) in [(1.0, "\"ppocr-cls@1.0.1\""), (0.5, "null"), (0.0, "null")] {
        let (s, v) = post(format!("{{\"value\": {value}, \"model\": {model}}}")).await;
        assert_eq!(s, 202, "{v}");
        assert_eq!(v["model"], "ppocr-cls@1.0.1");
    }
    // The telemetry task takes the interval's sum.
    let active = server.engine.active().unwrap();
    let r = active.stats.take_reward().unwrap();
    assert_eq!((r.count, r.sum, r.sum_sq), (3, 1.5, 1.25));
    assert!(active.stats.take_reward().is_none(), "taken once");
    let empty = serve(None, EngineConfig::default(), ApiConfig::default()).await;
    let r = http
        .post(format!("{}/v1/feedback", empty.url))
        .json(&json!({"value": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

//! End-to-end tests of `fleetctl keygen` and `fleetctl bundle pack|verify|inspect`
//! on the real models in models/. They run the real binary and check exit
//! codes and the one-line reasons operators see.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn model(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(
        p.exists(),
        "missing fixture {} (see models/README.md)",
        p.display()
    );
    p
}

fn fleetctl(args: &[&str]) -> Output {
    Command::new(integ::bins::bin("fleetctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Asserts failure with exactly one line on stderr containing `reason`.
#[track_caller]
fn refused(o: &Output, reason: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success\nstdout: {}",
        stdout(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    assert!(
        lines[0].contains(reason),
        "expected {reason:?} in: {}",
        lines[0]
    );
}

struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new(names: &[&str]) -> Keys {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            ok(fleetctl(&[
                "keygen",
                "--out",
                dir.path().join(n).to_str().unwrap(),
            ]));
        }
        Keys { dir }
    }
    fn key(&self, n: &str) -> String {
        self.path(&format!("{n}.key"))
    }
    fn public(&self, n: &str) -> String {
        self.path(&format!("{n}.pub"))
    }
    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).to_str().unwrap().to_string()
    }
}

fn golden_args(dir: &str, cases: usize, with_outputs: bool) -> Vec<String> {
    golden_args_in(&format!("{dir}/golden"), cases, with_outputs)
}

/// `--golden-inputs` (and `--golden-outputs`) for `in_<i>.npz` (and
/// `out_<i>.npz`) in `golden`.
fn golden_args_in(golden: &str, cases: usize, with_outputs: bool) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..cases {
        v.push("--golden-inputs".into());
        v.push(
            model(&format!("{golden}/in_{i}.npz"))
                .to_str()
                .unwrap()
                .into(),
        );
        if with_outputs {
            v.push("--golden-outputs".into());
            v.push(
                model(&format!("{golden}/out_{i}.npz"))
                    .to_str()
                    .unwrap()
                    .into(),
            );
        }
    }
    v
}

fn pack(
    keys: &Keys,
    signers: &[&str],
    model_path: &str,
    name: &str,
    golden: Vec<String>,
    extra: &[&str],
    out: &str,
) -> Output {
    let mut args: Vec<String> = vec![
        "bundle".into(),
        "pack".into(),
        "--model".into(),
        model(model_path).to_str().unwrap().into(),
        "--name".into(),
        name.into(),
        "--version".into(),
        "1.0.0".into(),
        "--sequence".into(),
        "1".into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(golden);
    for s in signers {
        args.push("--key".into());
        args.push(keys.key(s));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    fleetctl(&refs)
}

fn cls_bundle(keys: &Keys, signers: &[&str], extra: &[&str], out: &str) -> Output {
    pack(
        keys,
        signers,
        "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ppocr-cls",
        golden_args("models/cls", 4, true),
        extra,
        out,
    )
}

fn verify(file: &str, trust: &[String], threshold: Option<&str>) -> Output {
    let mut args = vec!["bundle", "verify", file];
    for t in trust {
        args.push("--trust");
        args.push(t);
    }
    if let Some(t) = threshold {
        args.push("--threshold");
        args.push(t);
    }
    fleetctl(&args)
}

#[test]
fn keygen_writes_a_0600_secret_key_and_a_public_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let keys = Keys::new(&["ops"]);
    let mode = std::fs::metadata(keys.key("ops"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let public = std::fs::read_to_string(keys.public("ops")).unwrap();
    assert!(public.starts_with("edgefleet-ed25519-public "), "{public}");
    let again = fleetctl(&["keygen", "--out", &keys.path("ops")]);
    refused(&again, "exists");
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn packs_verifies_and_inspects_the_cls_model_against_ort_references() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("cls.bundle");
    let packed = ok(cls_bundle(&keys, &["a"], &[], &out));
    assert!(
        stdout(&packed).contains("4 golden case(s) pass"),
        "{}",
        stdout(&packed)
    );
    assert!(
        stderr(&packed).is_empty(),
        "no warning expected with references: {}",
        stderr(&packed)
    );
    let v = ok(verify(&out, &[keys.public("a")], None));
    assert!(
        stdout(&v).starts_with("ok: ppocr-cls 1.0.0"),
        "{}",
        stdout(&v)
    );

    let inspected = ok(fleetctl(&["bundle", "inspect", &out, "--json"]));
    let j: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(j["name"], "ppocr-cls");
    assert_eq!(j["sequence"], 1);
    assert_eq!(j["payload"]["format"], "onnx");
    assert_eq!(j["inputs"][0]["name"], "x");
    assert_eq!(j["inputs"][0]["shape"], serde_json::json!([1, 3, 48, 192]));
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([1, 2]));
    assert_eq!(j["golden"]["cases"], 4);
    assert_eq!(j["golden"]["reference"], "external");
    assert_eq!(j["tract_version"], "0.23.9");
    assert_eq!(
        j["targets"],
        serde_json::json!(["x86_64", "aarch64", "armv7"])
    );
    // The packer timed the stored form on this machine and signed that in.
    let l = &j["pack_latency"];
    let median = l["median_ms"].as_f64().unwrap();
    assert!(
        median > 0.0 && median <= l["p90_ms"].as_f64().unwrap(),
        "{l}"
    );
    assert!(
        (5..=100).contains(&l["iterations"].as_u64().unwrap()),
        "{l}"
    );
    assert_eq!(l["threads"], 1);
    assert!(
        l["machine"]
            .as_str()
            .unwrap()
            .starts_with(std::env::consts::ARCH),
        "{l}"
    );
    assert!(
        stdout(&packed).contains(&format!("latency     median {median:.3} ms")),
        "pack prints what it recorded: {}",
        stdout(&packed)
    );
    let text = ok(fleetctl(&["bundle", "inspect", &out]));
    assert!(stdout(&text).contains("NOT verified"), "{}", stdout(&text));
    assert!(
        stdout(&text).contains(&format!("latency     median {median:.3} ms")),
        "{}",
        stdout(&text)
    );
}

#[test]
fn max_latency_ms_refuses_a_model_slower_than_that_here() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("slow.bundle");
    // No real model runs in a nanosecond: always over the limit.
    let o = cls_bundle(&keys, &["a"], &["--max-latency-ms", "0.000001"], &out);
    refused(&o, "refusing to pack: median latency");
    assert!(
        stderr(&o).contains("above --max-latency-ms"),
        "{}",
        stderr(&o)
    );
    assert!(!std::path::Path::new(&out).exists(), "nothing written");
    let usage = cls_bundle(&keys, &["a"], &["--max-latency-ms", "-3"], &out);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    // A generous limit packs, and the bundle records the measurement.
    ok(cls_bundle(
        &keys,
        &["a"],
        &["--max-latency-ms", "60000"],
        &out,
    ));
}

#[test]
fn packs_the_cls_model_as_nnef_and_the_nnef_form_passes_the_same_references() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("cls-nnef.bundle");
    ok(cls_bundle(&keys, &["a"], &["--nnef"], &out));
    ok(verify(&out, &[keys.public("a")], None));
    let j: serde_json::Value =
        serde_json::from_slice(&ok(fleetctl(&["bundle", "inspect", &out, "--json"])).stdout)
            .unwrap();
    assert_eq!(j["payload"]["format"], "nnef");
    // The device builds the graph from the packer's stored parse
    // (runtime::graph_ast), not by parsing graph.nnef again.
    let bench = ok(Command::new(integ::bins::bin("edge-agent"))
        .args(["bench", "--bundle", &out, "--trust", &keys.public("a")])
        .args(["--iterations", "2", "--warmup", "0", "--json"])
        .output()
        .unwrap());
    let b: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!(b["graph_preparsed"], true, "{b}");
}

#[test]
fn packs_and_verifies_the_rec_model_as_onnx_and_nnef() {
    let keys = Keys::new(&["a"]);
    // The NNEF form also proves the dictionary metadata (which tract cannot
    // round-trip through NNEF) does not break the export.
    for (out, extra) in [
        (keys.path("rec.bundle"), vec![]),
        (keys.path("rec-nnef.bundle"), vec!["--nnef"]),
    ] {
        ok(pack(
            &keys,
            &["a"],
            "models/rec/ch_PP-OCRv4_rec_infer.onnx",
            "ppocr-rec",
            golden_args("models/rec", 2, true),
            &extra,
            &out,
        ));
        ok(verify(&out, &[keys.public("a")], None));
    }
}

/// `--compression auto` stores rec's float weights as they are (zstd would
/// save under a tenth) in a format-2 bundle, keeps zstd for cls (which it
/// shrinks by more), and either way the agent serves the exact model.
#[test]
fn auto_compression_stores_what_zstd_barely_shrinks_and_the_agent_serves_it() {
    let keys = Keys::new(&["a"]);
    let inspect = |file: &str| -> serde_json::Value {
        serde_json::from_slice(&ok(fleetctl(&["bundle", "inspect", file, "--json"])).stdout)
            .unwrap()
    };
    let header_version = |file: &str| {
        let b = std::fs::read(file).unwrap();
        u16::from_le_bytes([b[8], b[9]])
    };
    let rec = "models/rec/ch_PP-OCRv4_rec_infer.onnx";
    let stored = keys.path("rec.bundle");
    let zstd = keys.path("rec-zstd.bundle");
    for (out, extra) in [(&stored, vec![]), (&zstd, vec!["--compression", "zstd"])] {
        ok(pack(
            &keys,
            &["a"],
            rec,
            "ppocr-rec",
            golden_args("models/rec", 1, true),
            &extra,
            out,
        ));
        ok(verify(out, &[keys.public("a")], None));
    }
    let j = inspect(&stored);
    let onnx = std::fs::read(model(rec)).unwrap();
    assert_eq!(j["payload"]["compression"], "none", "{j}");
    assert_eq!(j["payload"]["compressed_len"], onnx.len());
    assert_eq!(header_version(&stored), 2);
    assert_eq!(inspect(&zstd)["payload"]["compression"], "zstd");
    assert_eq!(header_version(&zstd), 1);
    let cls = keys.path("cls.bundle");
    ok(cls_bundle(&keys, &["a"], &[], &cls));
    assert_eq!(inspect(&cls)["payload"]["compression"], "zstd");
    assert_eq!(header_version(&cls), 1);
    let forced = keys.path("cls-stored.bundle");
    ok(cls_bundle(
        &keys,
        &["a"],
        &["--compression", "none"],
        &forced,
    ));
    ok(verify(&forced, &[keys.public("a")], None));
    assert_eq!(inspect(&forced)["payload"]["compression"], "none");
    assert_eq!(header_version(&forced), 2);

    // The device verifies the stored payload and serves ORT's outputs.
    for bundle in [&stored, &zstd] {
        let got = keys.path("out.npz");
        ok(Command::new(integ::bins::bin("edge-agent"))
            .args(["infer", "--bundle", bundle, "--trust", &keys.public("a")])
            .args([
                "--inputs",
                model("models/rec/golden/in_0.npz").to_str().unwrap(),
            ])
            .args(["--outputs", &got])
            .output()
            .unwrap());
        ok(Command::new(integ::bins::bin("edge-agent"))
            .args([
                "compare",
                &got,
                model("models/rec/golden/out_0.npz").to_str().unwrap(),
            ])
            .args(["--tolerance", "1e-4"])
            .output()
            .unwrap());
    }
}

#[test]
fn packs_the_int8_classifiers_that_tract_runs_correctly() {
    let keys = Keys::new(&["a"]);
    // Every convolution quantized, and the pointwise-only recipe
    // (scripts/quantize.py --pointwise): both against ORT's outputs.
    for (dir, file) in [
        ("models/cls-int8", "cls_int8.onnx"),
        ("models/cls-int8-pw", "cls_int8_pw.onnx"),
    ] {
        let out = keys.path(&format!("{file}.bundle"));
        ok(pack(
            &keys,
            &["a"],
            &format!("{dir}/{file}"),
            "ppocr-cls-int8",
            golden_args(dir, 4, true),
            &[],
            &out,
        ));
        ok(verify(&out, &[keys.public("a")], None));
    }
}

#[test]
fn refuses_a_model_tract_cannot_load_with_one_line_naming_node_and_op() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("vad.bundle");
    let dir = tempfile::tempdir().unwrap();
    // Golden inputs shaped like Silero's: input [1,512], state [2,1,128], sr scalar.
    let golden = dir.path().join("vad_in.npz");
    let tensors = vec![
        edgefleet_wire::tensor::NamedTensor::new(
            "input",
            edgefleet_wire::tensor::Tensor::from_f32(vec![1, 512], &[0.0; 512]).unwrap(),
        ),
        edgefleet_wire::tensor::NamedTensor::new(
            "state",
            edgefleet_wire::tensor::Tensor::from_f32(vec![2, 1, 128], &[0.0; 256]).unwrap(),
        ),
        edgefleet_wire::tensor::NamedTensor::new(
            "sr",
            edgefleet_wire::tensor::Tensor::from_i64(vec![], &[16000]).unwrap(),
        ),
    ];
    std::fs::write(
        &golden,
        edgefleet_wire::npz::to_npz_bytes(&tensors).unwrap(),
    )
    .unwrap();
    let o = pack(
        &keys,
        &["a"],
        "tests/data/silero_vad_16k_op15.onnx",
        "silero-vad",
        vec!["--golden-inputs".into(), golden.to_str().unwrap().into()],
        &[],
        &out,
    );
    refused(&o, "cannot load model");
    let line = stderr(&o);
    assert!(line.contains("If"), "names the failing op: {line}");
    assert!(line.contains("node"), "names the failing node: {line}");
    assert!(!Path::new(&out).exists(), "no bundle may be written");
}

/// The classifier quantized on every op, Softmax included: its output is
/// quantized to steps of 1/255, and the runtime's differs from ONNX
/// Runtime's [254/255, 0] by one step (tract alone answered [1.0, 1.0]:
/// runtime `tract_fixes::shield_quantized_softmax`). The default tolerance
/// refuses that, naming the output and the difference, and writes nothing;
/// a tolerance of one step packs it.
#[test]
fn refuses_a_model_whose_tract_outputs_disagree_with_the_reference() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("qdq.bundle");
    let golden = || golden_args_in("tests/data/cls_qdq_softmax_golden", 1, true);
    let qdq = "tests/data/cls_qdq_softmax.onnx";
    let o = pack(&keys, &["a"], qdq, "cls-qdq", golden(), &[], &out);
    refused(&o, "refusing to pack");
    let line = stderr(&o);
    assert!(line.contains("max abs"), "{line}");
    assert!(line.contains("tolerance"), "{line}");
    assert!(line.contains("output \""), "names the output: {line}");
    assert!(!Path::new(&out).exists());

    let packed = ok(pack(
        &keys,
        &["a"],
        qdq,
        "cls-qdq",
        golden(),
        &["--tolerance", "0.004"],
        &out,
    ));
    assert!(
        stdout(&packed).contains("1 golden case(s) pass"),
        "{}",
        stdout(&packed)
    );
}

#[test]
fn without_references_records_tract_outputs_and_warns() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("selfref.bundle");
    let o = ok(pack(
        &keys,
        &["a"],
        "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ppocr-cls",
        golden_args("models/cls", 1, false),
        &[],
        &out,
    ));
    assert!(
        stderr(&o).contains("warning: no --golden-outputs"),
        "{}",
        stderr(&o)
    );
    let j: serde_json::Value =
        serde_json::from_slice(&ok(fleetctl(&["bundle", "inspect", &out, "--json"])).stdout)
            .unwrap();
    assert_eq!(j["golden"]["reference"], "tract_self");
}

#[test]
fn refuses_golden_files_that_do_not_match_the_model() {
    let keys = Keys::new(&["a"]);
    let out = keys.path("x.bundle");
    // The multi-input model's goldens do not carry the classifier's input "x".
    let o = pack(
        &keys,
        &["a"],
        "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ppocr-cls",
        golden_args("models/multi", 1, false),
        &[],
        &out,
    );
    refused(&o, "is not a model input");
    let bad_duration = cls_bundle(&keys, &["a"], &["--expires-in", "90"], &out);
    refused(&bad_duration, "bad duration");
    assert_eq!(bad_duration.status.code(), Some(2));
}

#[test]
fn every_tamper_case_exits_nonzero_with_its_reason() {
    let keys = Keys::new(&["a", "b", "stranger"]);
    let good = keys.path("good.bundle");
    ok(cls_bundle(&keys, &["a"], &[], &good));
    let bytes = std::fs::read(&good).unwrap();
    let tampered = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        let p = keys.path(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let trust_a = [keys.public("a")];
    let manifest_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let sig_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;

    let magic = tampered("magic.bundle", &|b| b[0] ^= 0x01);
    refused(&verify(&magic, &trust_a, None), "bad magic");
    let version = tampered("version.bundle", &|b| b[8] = 9);
    refused(&verify(&version, &trust_a, None), "bad version");
    let manifest = tampered("manifest.bundle", &|b| b[20 + manifest_len / 2] ^= 0x10);
    refused(&verify(&manifest, &trust_a, None), "bad signature");
    let signature = tampered("sig.bundle", &|b| b[20 + manifest_len + 2 + 32 + 5] ^= 0x04);
    refused(&verify(&signature, &trust_a, None), "bad signature");
    let payload_at = 20 + manifest_len + sig_len + 100;
    let payload = tampered("payload.bundle", &|b| b[payload_at] ^= 0x80);
    refused(&verify(&payload, &trust_a, None), "hash mismatch");
    let truncated = tampered("truncated.bundle", &|b| b.truncate(b.len() - 1));
    refused(&verify(&truncated, &trust_a, None), "truncated");
    let too_large = tampered("large.bundle", &|b| {
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    refused(&verify(&too_large, &trust_a, None), "too large");

    refused(
        &verify(&good, &[keys.public("stranger")], None),
        "unknown key",
    );
    refused(
        &verify(&good, &[keys.public("a"), keys.public("b")], Some("2")),
        "threshold not met",
    );

    let both = keys.path("both.bundle");
    ok(cls_bundle(&keys, &["a", "b"], &[], &both));
    ok(verify(
        &both,
        &[keys.public("a"), keys.public("b")],
        Some("2"),
    ));

    // Mix and match: cls manifest + signatures with another bundle's payload.
    let nnef = keys.path("nnef.bundle");
    ok(cls_bundle(&keys, &["a"], &["--nnef"], &nnef));
    let other = std::fs::read(&nnef).unwrap();
    let other_manifest_len = u32::from_le_bytes(other[12..16].try_into().unwrap()) as usize;
    let other_sig_len = u32::from_le_bytes(other[16..20].try_into().unwrap()) as usize;
    let mixed = tampered("mixed.bundle", &|b| {
        b.truncate(20 + manifest_len + sig_len);
        b.extend_from_slice(&other[20 + other_manifest_len + other_sig_len..]);
    });
    let o = verify(&mixed, &trust_a, None);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("hash mismatch") || e.contains("truncated") || e.contains("trailing data"),
        "{e}"
    );

    let short_lived = keys.path("short.bundle");
    ok(cls_bundle(
        &keys,
        &["a"],
        &["--expires-in", "1s"],
        &short_lived,
    ));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refused(&verify(&short_lived, &trust_a, None), "expired");
}

/// `fleetctl devices list` follows the server's pages (`Link: rel="next"`,
/// 500 devices a page by default) and lists the whole fleet, filters kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_pages_through_the_whole_fleet() {
    use integ::fleet::{ENROLL, TestFleet, VIEWER};
    let fleet = TestFleet::start().await;
    let n = 1_203;
    // Enrolled 100 at a time (each waits for its store commit).
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let board = if i % 3 == 0 { "rpi4" } else { "jetson" };
            let req = fleet
                .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
                .json(&serde_json::json!({"enrollment_token": ENROLL, "device_id": format!("dev-{i:05}"),
                       "tags": {"board": board}, "arch": "aarch64", "agent_version": "0.1.0"}));
            set.spawn(async move {
                let r = req.send().await.unwrap();
                assert!(r.status().is_success(), "enroll {i}: {}", r.status());
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
    let list = |args: Vec<String>| {
        let url = fleet.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut a = vec![
                "devices", "list", "--json", "--server", &url, "--token", VIEWER,
            ];
            a.extend(args.iter().map(String::as_str));
            let o = ok(fleetctl(&a));
            let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
            v.into_iter()
                .map(|d| d["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
    };
    let all = list(vec![]).await.unwrap();
    assert_eq!(all.len(), n, "every device, across three pages");
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), n, "no device twice");
    let rpi = list(vec!["--tag".into(), "board=rpi4".into()])
        .await
        .unwrap();
    assert_eq!(rpi.len(), n.div_ceil(3));

    // A device whose tag carries terminal escape sequences: the server
    // refuses it, or fleetctl's table shows them escaped, never raw.
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let r = fleet
        .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
        .json(&serde_json::json!({"enrollment_token": ENROLL, "device_id": "evil-1",
               "tags": {"board": "rpi4", "note": evil}, "arch": "aarch64", "agent_version": "0.1.0"}))
        .send()
        .await
        .unwrap();
    if r.status().is_success() {
        let url = fleet.url.clone();
        let out = tokio::task::spawn_blocking(move || {
            ok(fleetctl(&[
                "devices",
                "list",
                "--server",
                &url,
                "--token",
                VIEWER,
                "--tag",
                "board=rpi4",
            ]))
        })
        .await
        .unwrap();
        let text = stdout(&out);
        assert!(text.contains("evil-1"), "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "raw control characters: {text:?}"
        );
        assert!(text.contains("\\u{1b}]0;pwned"), "{text}");
    } else {
        assert!(r.status().is_client_error(), "{}", r.status());
    }
}

/// `fleetctl token create|list|revoke` against a real server: the secret
/// is printed once, it enrolls devices with its fixed tags up to its use
/// count, and a revoked token enrolls nobody; only an admin may manage them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_list_revoke() {
    use integ::fleet::{ADMIN, OPERATOR, TestFleet};
    let fleet = TestFleet::start().await;
    let url = fleet.url.clone();
    let run = |args: Vec<&'static str>, token: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut a: Vec<&str> = args;
            a.extend(["--server", url.as_str(), "--token", token]);
            fleetctl(&a)
        })
    };
    let o = run(
        vec![
            "token",
            "create",
            "batch-7",
            "--expires-in",
            "2h",
            "--max-uses",
            "2",
            "--tag",
            "site=lyon",
        ],
        ADMIN,
    )
    .await
    .unwrap();
    let o = ok(o);
    let secret = stdout(&o).trim().to_string();
    assert!(secret.len() >= 32, "{secret:?}");
    assert!(stderr(&o).contains("shown only now"), "{}", stderr(&o));
    let enroll = |id: &str, token: &str| {
        fleet
            .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
            .json(
                &serde_json::json!({"enrollment_token": token, "device_id": id,
                   "tags": {"board": "rpi4"}, "arch": "aarch64", "agent_version": "0.1.0"}),
            )
            .send()
    };
    assert!(enroll("b7-1", &secret).await.unwrap().status().is_success());
    let d = fleet.device("b7-1").await;
    assert_eq!(d["tags"]["site"], "lyon", "{d}");
    let o = ok(run(vec!["token", "list", "--json"], ADMIN).await.unwrap());
    let list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let t = list.iter().find(|t| t["name"] == "batch-7").unwrap();
    assert_eq!(
        (t["uses"].as_u64(), t["max_uses"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        !stdout(&o).contains(&secret),
        "the list never shows the secret"
    );
    ok(run(vec!["token", "revoke", "batch-7"], ADMIN)
        .await
        .unwrap());
    let r = enroll("b7-2", &secret).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    // An operator may not create tokens.
    let o = run(vec!["token", "create", "sneaky"], OPERATOR)
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));
}

/// fleetctl in scripts: `--json` on every command, the documented exit
/// codes (2 usage, 3 paused, 4 aborted, 5 not found), id prefixes and
/// `name@version`, and the commands scripts need (`rollout list`,
/// `devices show|tag`, `audit`, API tokens with their config line,
/// completions, man pages) against a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_get_json_exit_codes_prefixes_and_every_command() {
    use integ::bundles::{Model, Pack};
    use integ::fleet::{ENROLL, OPERATOR, TestFleet};
    let fleet = TestFleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("m.bundle");
    std::fs::write(&bundle, Pack::new(Model::MultiIo, 1).bytes()).unwrap();
    let url = fleet.url.clone();
    let run = move |args: Vec<String>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend(["--server", url.as_str(), "--token", OPERATOR]);
            fleetctl(&a)
        })
    };
    let v = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let json_of = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
    };
    let code = |o: &Output| o.status.code();

    let pushed = json_of(&ok(run(v(&[
        "bundle",
        "push",
        bundle.to_str().unwrap(),
        "--json",
    ]))
    .await
    .unwrap()));
    let id = pushed["id"].as_str().unwrap().to_string();

    // One device (its reports sent here by hand) for a rollout to finish.
    let r = fleet
        .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
        .json(
            &serde_json::json!({"enrollment_token": ENROLL, "device_id": "solo-1",
               "tags": {"board": "solo"}, "arch": "aarch64", "agent_version": "0.1.0"}),
        )
        .send()
        .await
        .unwrap();
    let cred: serde_json::Value = r.json().await.unwrap();
    let cred = cred["credential"].as_str().unwrap().to_string();

    // name@version resolves; once the device reports the bundle
    // committed, the rollout completes and --watch exits 0.
    let r1 = json_of(&ok(run(v(&[
        "rollout",
        "create",
        "--bundle",
        "multi-io@1.1.0",
        "--selector",
        "board=solo",
        "--stages",
        "100:0",
        "--json",
    ]))
    .await
    .unwrap()));
    assert_eq!(r1["bundle"]["id"], id.as_str(), "{r1}");
    let r1_id = r1["id"].as_str().unwrap().to_string();
    // The device reports as an agent does, every half second.
    let reporter = {
        let req = fleet
            .req(reqwest::Method::POST, "/api/v1/device/report", Some(&cred))
            .json(&serde_json::json!({
                "active": r1["bundle"], "staged": null, "last_failed": null,
                "state": "committed", "reason": null,
            }));
        tokio::spawn(async move {
            loop {
                let r = req.try_clone().unwrap().send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        })
    };
    let o = run(v(&["rollout", "status", &r1_id[..6], "--watch", "--json"]))
        .await
        .unwrap();
    reporter.abort();
    assert_eq!(code(&o), Some(0), "completed: {}", stderr(&o));
    // Completed because the device runs it (not because it went silent).
    let last = serde_json::Deserializer::from_slice(&o.stdout)
        .into_iter::<serde_json::Value>()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!(last["phase"]["state"], "completed", "{last}");
    assert_eq!(last["stages"][0]["running"], 1, "{last}");
    assert_eq!(code(&o), Some(0), "completed: {}", stderr(&o));

    // A unique id prefix resolves too; pausing makes --watch exit 3, an
    // abort 4.
    let r2 = json_of(&ok(run(v(&[
        "rollout",
        "create",
        "--bundle",
        &id[..10],
        "--selector",
        "board=none",
        "--stages",
        "50:10m,100:0",
        "--json",
    ]))
    .await
    .unwrap()));
    let r2_id = r2["id"].as_str().unwrap().to_string();
    let paused = json_of(&ok(run(v(&["rollout", "pause", &r2_id[..8], "--json"]))
        .await
        .unwrap()));
    assert_eq!(paused["phase"]["state"], "paused", "{paused}");
    let o = run(v(&["rollout", "status", &r2_id, "--watch"]))
        .await
        .unwrap();
    assert_eq!(code(&o), Some(3), "paused: {}", stderr(&o));
    assert!(stderr(&o).contains("paused"), "{}", stderr(&o));
    let resumed = json_of(&ok(run(v(&["rollout", "resume", &r2_id, "--json"]))
        .await
        .unwrap()));
    assert_eq!(resumed["phase"]["state"], "running", "{resumed}");
    ok(run(v(&["rollout", "abort", &r2_id, "--json"]))
        .await
        .unwrap());
    let o = run(v(&["rollout", "status", &r2_id, "--watch", "--json"]))
        .await
        .unwrap();
    assert_eq!(code(&o), Some(4), "aborted: {}", stderr(&o));
    let list = json_of(&ok(run(v(&["rollout", "list", "--json"])).await.unwrap()));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // Not found: 5. Usage: 2 (ours and clap's).
    let o = run(v(&["devices", "show", "nope"])).await.unwrap();
    assert_eq!(code(&o), Some(5), "{}", stderr(&o));
    let o = run(v(&["rollout", "status", "ffffffff"])).await.unwrap();
    assert_eq!(code(&o), Some(5), "{}", stderr(&o));
    let o = run(v(&[
        "rollout",
        "create",
        "--bundle",
        "nope@9.9.9",
        "--stages",
        "100:0",
    ]))
    .await
    .unwrap();
    assert_eq!(code(&o), Some(5), "{}", stderr(&o));
    let o = run(v(&[
        "rollout", "create", "--bundle", &id, "--stages", "100",
    ]))
    .await
    .unwrap();
    assert_eq!(code(&o), Some(2), "{}", stderr(&o));
    let o = run(v(&[
        "rollout",
        "create",
        "--bundle",
        &id,
        "--stages",
        "100:0",
        "--shadow-sample-rate",
        "0.5",
    ]))
    .await
    .unwrap();
    assert_eq!(code(&o), Some(2), "shadow needs samples: {}", stderr(&o));
    let o = run(v(&["rollout", "frobnicate"])).await.unwrap();
    assert_eq!(code(&o), Some(2), "{}", stderr(&o));
    // Shadow flags reach the server, which checks their ranges.
    let o = run(v(&[
        "rollout",
        "create",
        "--bundle",
        &id,
        "--stages",
        "100:0",
        "--selector",
        "board=none",
        "--shadow-sample-rate",
        "7",
        "--shadow-samples",
        "10",
    ]))
    .await
    .unwrap();
    assert_eq!(code(&o), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("sample_rate"), "{}", stderr(&o));
    let shadowed = json_of(&ok(run(v(&[
        "rollout",
        "create",
        "--bundle",
        &id,
        "--stages",
        "100:0",
        "--selector",
        "board=none",
        "--shadow-sample-rate",
        "0.25",
        "--shadow-samples",
        "40",
        "--json",
    ]))
    .await
    .unwrap()));
    assert_eq!(shadowed["shadow"]["samples"], 40, "{shadowed}");

    // devices show and tag.
    let r = fleet
        .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
        .json(
            &serde_json::json!({"enrollment_token": ENROLL, "device_id": "pi-9",
               "tags": {"board": "rpi4"}, "arch": "aarch64", "agent_version": "0.1.0"}),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let tagged = json_of(&ok(run(v(&[
        "devices",
        "tag",
        "pi-9",
        "site=lyon",
        "--remove",
        "board",
        "--json",
    ]))
    .await
    .unwrap()));
    assert_eq!(
        tagged["tags"],
        serde_json::json!({"site": "lyon"}),
        "{tagged}"
    );
    let shown = json_of(&ok(run(v(&["devices", "show", "pi-9", "--json"]))
        .await
        .unwrap()));
    assert_eq!(shown["tags"]["site"], "lyon");
    let text = stdout(&ok(run(v(&["devices", "show", "pi-9"])).await.unwrap()));
    assert!(
        text.contains("site=lyon") && text.contains("aarch64"),
        "{text}"
    );

    // The audit log shows who did what.
    let audit = json_of(&ok(run(v(&["audit", "--json"])).await.unwrap()));
    let entries = audit.as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["who"] == "ops" && e["action"].as_str().unwrap_or("").starts_with("rollout")),
        "{audit}"
    );

    // API tokens: printed once, with the config line holding only the hash.
    let o = ok(run(v(&["token", "create", "ci-bot", "--role", "viewer"]))
        .await
        .unwrap());
    let token = stdout(&o).trim().to_string();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let conf = stderr(&o);
    assert!(
        conf.contains(&format!("token_sha256 = \"{sha}\"")),
        "{conf}"
    );
    assert!(
        conf.contains("role = \"viewer\"") && !conf.contains(&token),
        "{conf}"
    );
    let o = run(v(&["token", "create", "x", "--role", "root"]))
        .await
        .unwrap();
    assert_eq!(code(&o), Some(2));

    // Offline commands take --json too; completions and man pages.
    let k = dir.path().join("k");
    let kj = json_of(&ok(fleetctl(&[
        "keygen",
        "--out",
        k.to_str().unwrap(),
        "--json",
    ])));
    assert_eq!(kj["key_id"].as_str().map(str::len), Some(64), "{kj}");
    let vj = json_of(&ok(fleetctl(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--trust",
        integ::fleet::trust_key(dir.path(), 1).to_str().unwrap(),
        "--json",
    ])));
    assert_eq!(vj["ok"], true, "{vj}");
    let comp = stdout(&ok(fleetctl(&["completions", "bash"])));
    assert!(
        comp.contains("fleetctl") && comp.contains("rollout"),
        "{comp:.200}"
    );
    let man = dir.path().join("man");
    ok(fleetctl(&["man", "--out", man.to_str().unwrap()]));
    for page in [
        "fleetctl.1",
        "fleetctl-rollout-create.1",
        "fleetctl-trust-rotate.1",
    ] {
        assert!(man.join(page).exists(), "{page} missing");
    }
}

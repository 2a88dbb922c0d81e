//! The agent's OTA engine against the real fleet server: real HTTP on
//! 127.0.0.1:0, real sled stores, the real cls model from models/.
//! Rollouts, attacks (tampered, expired, older, other arch, failing
//! self-test), degradation in production with automatic rollback, and a
//! hot swap under load with zero failed requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_agent::config::AgentConfig;
use edgefleet_wire::bundle::{Limits, read_signed, write_bundle};
use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::manifest::TargetArch;
use serde_json::{Value, json};

use common::repo;
use integ::agent::InProcAgent as Agent;
use integ::bundles::{Model, Pack};
use integ::common;
use integ::fleet::{OPERATOR, TestFleet, trust_key};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn cls(minor: u64) -> Pack {
    Pack::new(Model::Cls, minor)
}

/// The cls classifier as bundle `cls` version `1.<minor>.0`.
fn cls_bundle(p: &Pack) -> Vec<u8> {
    p.bytes()
}

/// A correctly signed bundle whose golden references are wrong: it passes
/// every signature check and fails the device's self-test.
fn failing_self_test_bundle(version: u64) -> Vec<u8> {
    let good = cls_bundle(&cls(version));
    let mut r = &good[..];
    let signed = read_signed(&mut r, &Limits::default()).unwrap();
    let payload = r.to_vec();
    let mut m = signed.peek_unverified().unwrap();
    let out = &mut m.golden.cases[0].outputs[0].tensor;
    let (dtype, shape, mut data) = out.clone().into_parts();
    // Swap the two class probabilities of case 0.
    let (a, b) = data.split_at_mut(4);
    a.swap_with_slice(&mut b[..4]);
    *out = edgefleet_wire::tensor::Tensor::from_bytes(dtype, shape, data).unwrap();
    let key = signing_key_from_seed([1; 32]);
    let resigned = edgefleet_wire::bundle::Signed::sign(&m, &[&key]).unwrap();
    let mut bytes = Vec::new();
    write_bundle(&mut bytes, &resigned, &payload).unwrap();
    bytes
}

/// The fleet server; it trusts keys 1 and 2 (devices trust only key 1).
async fn start_server() -> TestFleet {
    TestFleet::start_with(|cfg, dir| cfg.trust.keys.push(trust_key(dir, 2))).await
}

/// The tests' agent config (integ::agent), trusting key 1 only.
fn agent_config(server: &TestFleet, data: &Path, id: &str, board: &str) -> AgentConfig {
    std::fs::create_dir_all(data).unwrap();
    Agent::config(&server.url, data, id, board, vec![trust_key(data, 1)])
}

fn golden_npz() -> Vec<u8> {
    std::fs::read(repo("models/cls/golden/in_0.npz")).unwrap()
}

fn active_version(s: &Value) -> Option<&str> {
    s["record"]["active"]["version"].as_str()
}

/// Keeps `n` clients sending inferences; counts non-200 answers.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(agent_url: &str, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let body = golden_npz();
        let tasks = (0..n)
            .map(|_| {
                let (stop, ok, failed, body) =
                    (stop.clone(), ok.clone(), failed.clone(), body.clone());
                let url = format!("{agent_url}/v1/infer");
                tokio::spawn(async move {
                    let http = edge_agent::tls::default_client();
                    while !stop.load(Ordering::Relaxed) {
                        let r = http
                            .post(&url)
                            .header("content-type", "application/x-npz")
                            .body(body.clone())
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Enrolls a fresh agent and installs v1 through a rollout.
async fn agent_on_v1(server: &TestFleet, dir: &Path, id: &str, board: &str) -> (Agent, String) {
    let v1 = server.push(cls_bundle(&cls(1))).await;
    let agent = Agent::start(agent_config(server, dir, id, board)).await;
    server.rollout_gated(&v1, board, json!({})).await;
    agent
        .wait_for("v1 committed", 60, |s| {
            s["state"] == "committed" && active_version(s) == Some("1.1.0")
        })
        .await;
    (agent, v1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrolls_installs_a_rollout_and_reports_committed() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, v1) = agent_on_v1(&server, dir.path(), "dev-a", "rpi4").await;
    assert_eq!(agent.model_version().await.as_deref(), Some("1.1.0"));
    assert_eq!(agent.infer(&golden_npz()).await, 200);
    // The server sees what the device runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = server.device("dev-a").await;
        if d["state"] == "committed" && d["active"]["id"] == v1.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "server view: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The credential was persisted: a restart does not re-enroll (the
    // server would answer 409 device_exists) and serves v1 at once.
    agent.stop().await;
    let agent = Agent::start(agent_config(&server, dir.path(), "dev-a", "rpi4")).await;
    assert_eq!(agent.model_version().await.as_deref(), Some("1.1.0"));
    let floor: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/floor.json")).unwrap())
            .unwrap();
    assert_eq!(floor["models"]["cls"]["sequence"], 10);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attacks_are_refused_and_the_active_model_keeps_serving() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = agent_on_v1(&server, dir.path(), "dev-b", "jetson").await;
    let body = golden_npz();

    // Bytes changed on the server after the push (a compromised mirror).
    let tampered = server.push(cls_bundle(&cls(2))).await;
    let f = server.stored_file(&tampered);
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();

    let untrusted = server
        .push(cls_bundle(&Pack {
            key_seed: 2,
            ..cls(3)
        }))
        .await;
    // Valid when pushed (packing takes seconds on a loaded machine), expired
    // by the time the device sees it.
    let issued = now();
    let expiring = server
        .push(cls_bundle(&Pack {
            expires_in: 20,
            issued: Some(issued),
            ..cls(4)
        }))
        .await;
    let other_arch = server
        .push(cls_bundle(&Pack {
            targets: vec![if cfg!(target_arch = "aarch64") {
                TargetArch::X86_64
            } else {
                TargetArch::Aarch64
            }],
            ..cls(5)
        }))
        .await;
    let bad_self_test = server.push(failing_self_test_bundle(6)).await;
    // Let `expiring` expire.
    while now() <= issued + 20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Anti-rollback: a lower sequence than the committed v1 (sequence 10).
    // The server refuses to store it (409), so it reaches the device the
    // other way, sideloaded: the device's own floor must refuse it too.
    let older_bytes = cls_bundle(&Pack {
        sequence: 5,
        ..cls(0)
    });
    let r = server
        .http
        .post(format!("{}/api/v1/bundles", server.url))
        .bearer_auth(OPERATOR)
        .body(older_bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "sequence_not_above_newest", "{v}");
    let older = edgefleet_wire::bundle::content_address(&older_bytes);

    let cases = [
        (tampered, "hash"),
        (untrusted, "unknown key"),
        (expiring, "expired"),
        (other_arch, "wrong arch"),
        (bad_self_test, "self-test failed"),
        (older, "anti-rollback"),
    ];
    for (bundle, reason) in cases {
        let rollout = if reason == "anti-rollback" {
            let r = agent
                .http
                .post(format!("{}/v1/install", agent.url))
                .body(older_bytes.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            None
        } else {
            Some(server.rollout_gated(&bundle, "jetson", json!({})).await)
        };
        let s = agent
            .wait_for(reason, 60, |s| {
                s["record"]["last_failed"]["id"] == bundle.as_str() && s["state"] == "failed"
            })
            .await;
        let why = s["record"]["reason"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "expected {reason:?} in {why:?}");
        assert_eq!(active_version(&s), Some("1.1.0"));
        assert_eq!(agent.model_version().await.as_deref(), Some("1.1.0"));
        assert_eq!(agent.infer(&body).await, 200);
        // The server records the failure reason.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d = server.device("dev-b").await;
            if d["last_failed"]["id"] == bundle.as_str()
                && d["reason"].as_str().is_some_and(|r| r.contains(reason))
            {
                assert_eq!(d["active"]["version"], "1.1.0");
                break;
            }
            assert!(Instant::now() < deadline, "server view: {d:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(rollout) = rollout {
            server.abort(&rollout).await;
        }
    }
    let floor: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/floor.json")).unwrap())
            .unwrap();
    assert_eq!(
        floor["models"]["cls"]["sequence"], 10,
        "no attack raised the floor"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_slow_in_production_is_rolled_back_within_the_watch_window() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = server.push(cls_bundle(&cls(1))).await;
    let mut cfg = agent_config(&server, dir.path(), "dev-c", "rpi5");
    // v2 passes its self-test (faults never touch it) but every live
    // inference takes 150 ms longer.
    cfg.testing
        .inject_latency_ms
        .insert("cls@1.2.0".into(), 150);
    cfg.update.watch_secs = 30;
    let agent = Agent::start(cfg).await;
    server.rollout_gated(&v1, "rpi5", json!({})).await;
    agent
        .wait_for("v1 serving", 60, |s| active_version(s) == Some("1.1.0"))
        .await;
    // Live traffic from here on, so v1 has a latency baseline (and its
    // 1000-inference window ends).
    let load = Load::start(&agent.url, 2);
    agent
        .wait_for("v1 committed", 60, |s| s["state"] == "committed")
        .await;
    let v2 = server.push(cls_bundle(&cls(2))).await;
    let started = Instant::now();
    server.rollout_gated(&v2, "rpi5", json!({})).await;
    let s = agent
        .wait_for("automatic rollback", 60, |s| {
            s["state"] == "rolled_back" && active_version(s) == Some("1.1.0")
        })
        .await;
    let (ok, failed) = load.finish().await;
    let why = s["record"]["reason"].as_str().unwrap();
    assert!(why.contains("p95 latency"), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "rolled back within the 30 s window"
    );
    assert_eq!(active_version(&s), Some("1.1.0"));
    assert_eq!(s["record"]["last_failed"]["id"], v2.as_str());
    assert_eq!(agent.model_version().await.as_deref(), Some("1.1.0"));
    assert_eq!(
        failed, 0,
        "no request failed across swap and rollback ({ok} ok)"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = server.device("dev-c").await;
        if d["state"] == "rolled_back" && d["active"]["id"] == v1.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "server view: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swaps_under_load_fail_no_request() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = agent_on_v1(&server, dir.path(), "dev-d", "orin").await;
    let load = Load::start(&agent.url, 4);
    for v in 2..=4u64 {
        let id = server.push(cls_bundle(&cls(v))).await;
        server.rollout_gated(&id, "orin", json!({})).await;
        let want = format!("1.{v}.0");
        agent
            .wait_for(&want, 60, |s| {
                s["state"] == "committed" && active_version(s) == Some(want.as_str())
            })
            .await;
    }
    let (ok, failed) = load.finish().await;
    assert!(ok > 50, "the load ran ({ok} requests)");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    // Only the active and last-known-good bundles stay on disk, with
    // nothing else but their compiled models (docs/ARCHITECTURE.md).
    let files: Vec<_> = std::fs::read_dir(dir.path().join("state/bundles"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    let bundles: Vec<&str> = files
        .iter()
        .filter_map(|f| f.strip_suffix(".bundle"))
        .collect();
    assert_eq!(bundles.len(), 2, "{files:?}");
    for f in &files {
        let (id, kind) = f.split_once('.').unwrap();
        assert!(
            bundles.contains(&id) && (kind == "bundle" || kind.starts_with("compiled-")),
            "{f} is not a kept bundle or its compiled model: {files:?}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_sends_the_device_back_to_its_previous_bundle() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = agent_on_v1(&server, dir.path(), "dev-e", "rpi3").await;
    let v2 = server.push(cls_bundle(&cls(2))).await;
    // Baking for 10 minutes: still running when the operator aborts.
    let r = server
        .create_rollout(json!({
            "bundle": v2,
            "selector": {"board": "rpi3"},
            "stages": [{"percent": 100, "bake_minutes": 10}],
        }))
        .await;
    agent
        .wait_for("v2 committed", 60, |s| {
            s["state"] == "committed" && active_version(s) == Some("1.2.0")
        })
        .await;
    server.abort(&r).await;
    // An explicit rollback below the floor, to a bundle this device ran.
    let s = agent
        .wait_for("back on v1", 60, |s| {
            s["state"] == "committed" && active_version(s) == Some("1.1.0")
        })
        .await;
    assert_eq!(agent.model_version().await.as_deref(), Some("1.1.0"));
    let floor: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/floor.json")).unwrap())
            .unwrap();
    assert_eq!(floor["models"]["cls"]["sequence"], 20, "{s:#}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sideloads_through_the_same_path() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&server, dir.path(), "dev-f", "qemu");
    cfg.server.url = None; // air-gapped
    let agent = Agent::start(cfg).await;
    assert_eq!(agent.model_version().await, None, "nothing installed yet");
    let post = |bytes: Vec<u8>| {
        let http = agent.http.clone();
        let url = format!("{}/v1/install", agent.url);
        async move { http.post(url).body(bytes).send().await.unwrap() }
    };
    let r = post(cls_bundle(&cls(1))).await;
    assert_eq!(r.status(), 202);
    agent
        .wait_for("sideloaded v1", 60, |s| {
            s["state"] == "committed" && active_version(s) == Some("1.1.0")
        })
        .await;
    let load = Load::start(&agent.url, 1);
    // Garbage is refused up front with a reason; tampered bytes by the
    // same verification as server updates.
    let r = post(b"this is not a bundle, just some text that is long enough".to_vec()).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "bad_magic", "{v}");
    let mut evil = cls_bundle(&cls(2));
    let n = evil.len();
    evil[n - 50] ^= 1;
    assert_eq!(post(evil).await.status(), 202);
    let s = agent
        .wait_for("tampered sideload refused", 60, |s| s["state"] == "failed")
        .await;
    assert!(
        s["record"]["reason"].as_str().unwrap().contains("hash"),
        "{s:#}"
    );
    let (_, failed) = load.finish().await;
    assert_eq!(failed, 0);
    agent.stop().await;
}

/// The int8 classifier as bundle `cls` (same inputs and outputs as fp32).
fn cls_int8_bundle(minor: u64) -> Vec<u8> {
    Pack::new(Model::ClsInt8, minor).bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_mode_activates_only_a_candidate_that_agrees() {
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = agent_on_v1(&server, dir.path(), "dev-s", "rpi4").await;
    let load = Load::start(&agent.url, 2);
    let shadow_rollout = |bundle: String, shadow: Value| {
        let http = server.http.clone();
        let url = format!("{}/api/v1/rollouts", server.url);
        async move {
            let r = http
                .post(url)
                .bearer_auth(OPERATOR)
                .json(&json!({"bundle": bundle, "selector": {"board": "rpi4"},
                              "stages": [{"percent": 100, "bake_minutes": 0}],
                              "shadow": shadow}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            let v: Value = r.json().await.unwrap();
            v["id"].as_str().unwrap().to_string()
        }
    };

    // The int8 model is not bit-identical to fp32 on live traffic (about
    // 1e-11 on this input after the softmax): a 1e-13 bound fails, and the
    // candidate never serves (it would also be 15x slower here).
    let int8 = server.push(cls_int8_bundle(2)).await;
    let refused = shadow_rollout(
        int8.clone(),
        json!({"sample_rate": 1.0, "samples": 20, "max_abs_diff": 1e-13}),
    )
    .await;
    let s = agent
        .wait_for("shadow refused", 120, |s| {
            s["state"] == "failed" && s["record"]["last_failed"]["id"] == int8.as_str()
        })
        .await;
    let why = s["record"]["reason"].as_str().unwrap();
    assert!(why.contains("shadow max abs diff"), "{why}");
    assert!(s["record"]["shadow"]["samples"].as_u64().unwrap() >= 20);
    assert_eq!(active_version(&s), Some("1.1.0"));
    // One rollout at a time per device: the operator aborts the refused one.
    server.abort(&refused).await;

    // The same fp32 model agrees exactly: activated after 20 mirrored requests.
    let v3 = server.push(cls_bundle(&cls(3))).await;
    shadow_rollout(
        v3.clone(),
        json!({"sample_rate": 1.0, "samples": 20, "min_top1_agreement": 0.99, "max_abs_diff": 1e-6}),
    )
    .await;
    let s = agent
        .wait_for("shadow passed", 120, |s| {
            s["state"] == "committed" && active_version(s) == Some("1.3.0")
        })
        .await;
    assert_eq!(s["record"]["shadow"]["top1_agreement"], 1.0);
    let (_, failed) = load.finish().await;
    assert_eq!(
        failed, 0,
        "the shadow never answered or broke a client request"
    );
    agent.stop().await;
}

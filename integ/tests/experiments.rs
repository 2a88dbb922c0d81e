//! An A/B experiment end to end: a real server with the embedded broker,
//! in-process agents on two boards, two bundles of a real model. Arm A
//! carries the test-only latency fault (every live inference 25 ms
//! slower); the local apps post rewards for the model that answered them.
//! The experiment must reach a significant latency verdict against A on
//! always-valid intervals, explain it, and `fleetctl experiment conclude`
//! must roll B out to the whole cohort.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integ::agent::InProcAgent;
use integ::bundles::{Model, Pack};
use integ::common::{free_port, repo};
use integ::fleet::{OPERATOR, TestFleet, ok, trust_key};
use serde_json::{Value, json};

/// An app on the device: infers, then reports an outcome for the model
/// that answered (B's answers are better for this app).
fn app(url: &str, stop: Arc<AtomicBool>, seed: u64) -> tokio::task::JoinHandle<u64> {
    let body = std::fs::read(repo("models/multi/golden/in_0.npz")).unwrap();
    let url = url.to_string();
    tokio::spawn(async move {
        let http = edge_agent::tls::default_client();
        let mut rng = fleet_server::stats::Rng::new(seed);
        let mut posted = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok(r) = http
                .post(format!("{url}/v1/infer"))
                .header("content-type", "application/x-npz")
                .body(body.clone())
                .send()
                .await
            else {
                continue;
            };
            let (name, version) = (
                r.headers()
                    .get("x-model-name")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                r.headers()
                    .get("x-model-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            );
            if !r.status().is_success() {
                continue;
            }
            let base = if version == "1.2.0" { 0.8 } else { 0.6 };
            let value = base + 0.1 * rng.normal();
            let f = http
                .post(format!("{url}/v1/feedback"))
                .json(&json!({"value": value, "model": format!("{name}@{version}")}))
                .send()
                .await;
            // 409 when the model changed between the answer and the feedback.
            if f.is_ok_and(|f| f.status() == 202) {
                posted += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        posted
    })
}

fn verdict<'a>(e: &'a Value, metric: &str) -> &'a Value {
    e["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["metric"] == metric)
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_arm_loses_significantly_and_conclude_rolls_out_the_winner() {
    let mqtt_port = free_port();
    let server = TestFleet::start_with_broker(mqtt_port, 250).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for (id, board) in [
        ("cam-1", "rpi4"),
        ("cam-2", "rpi4"),
        ("gate-1", "rpi5"),
        ("gate-2", "rpi5"),
    ] {
        let c = InProcAgent::config(
            &server.url,
            &dir.path().join(id),
            id,
            board,
            vec![trust_key(dir.path(), 1)],
        );
        let mut c = InProcAgent::over_mqtt(c, mqtt_port);
        // Arm A passes its self-test but serves 25 ms slower.
        c.testing
            .inject_latency_ms
            .insert("multi-io@1.1.0".into(), 25);
        agents.push(InProcAgent::start(c).await);
    }
    let t0 = Instant::now();
    let a = server.push(Pack::new(Model::MultiIo, 1).bytes()).await;
    let r0 = server
        .create_rollout(json!({"bundle": a, "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .await;
    for ag in &agents {
        ag.wait_for("A committed", 90, |s| {
            s["state"] == "committed" && s["record"]["active"]["version"] == "1.1.0"
        })
        .await;
    }
    let _ = r0;
    eprintln!("A committed everywhere after {:?}", t0.elapsed());
    let stop = Arc::new(AtomicBool::new(false));
    let apps: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, ag)| app(&ag.url, stop.clone(), i as u64))
        .collect();
    server.push(Pack::new(Model::MultiIo, 2).bytes()).await;

    // A rollout cannot take devices an experiment holds, and vice versa.
    let out = ok(server.fleetctl(
        OPERATOR,
        &[
            "experiment",
            "create",
            "--name",
            "faster-io",
            "--a",
            "multi-io@1.1.0",
            "--b",
            "multi-io@1.2.0",
            "--guardrail",
            "error_rate:50",
            "--json",
        ],
    ));
    let created: Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["devices_a"], 2, "{created:#}");
    assert_eq!(created["devices_b"], 2, "{created:#}");
    // Stratified: one of each board's two devices on B.
    assert_eq!(created["b_share_by_board"]["rpi4"], 0.5, "{created:#}");
    assert_eq!(created["b_share_by_board"]["rpi5"], 0.5, "{created:#}");
    let clash = server
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
        .json(&json!({"bundle": a, "selector": {"board": "rpi4"}, "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(clash.status(), 409);

    // The verdict: B's p95 is significantly lower; the reward too is in.
    let deadline = Instant::now() + Duration::from_secs(120);
    let e = loop {
        let e = server.get_json(&format!("/api/v1/experiments/{id}")).await;
        let v = verdict(&e, "latency_p95_ms");
        let r = verdict(&e, "reward");
        if v["significant"] == true
            && r["a"]["n"].as_u64() > Some(5)
            && r["b"]["n"].as_u64() > Some(5)
        {
            break e;
        }
        assert!(Instant::now() < deadline, "no verdict: {e:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("verdict after {:?}", t0.elapsed());
    let v = verdict(&e, "latency_p95_ms");
    assert_eq!(v["better"], "b", "{e:#}");
    assert!(v["effect"].as_f64().unwrap() < -10.0, "{v:#}");
    assert!(v["effect_high"].as_f64().unwrap() < 0.0, "{v:#}");
    assert!(
        v["a"]["mean"].as_f64().unwrap() > 20.0,
        "A carries the 25 ms fault: {v:#}"
    );
    assert_eq!(e["phase"]["state"], "running", "the guardrail did not fire");
    let status = ok(server.fleetctl(OPERATOR, &["experiment", "status", "faster-io"]));
    eprintln!("{status}");
    assert!(
        status.contains("latency_p95_ms (primary)") && status.contains("B is better"),
        "{status}"
    );

    // Conclude: B becomes a rollout to the whole cohort.
    let out = ok(server.fleetctl(OPERATOR, &["experiment", "conclude", &id[..8], "--json"]));
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["phase"]["state"], "concluded", "{done:#}");
    assert_eq!(done["phase"]["winner"], "b");
    let rollout = done["phase"]["rollout"].as_str().unwrap().to_string();
    for ag in &agents {
        ag.wait_for("B everywhere", 90, |s| {
            s["record"]["active"]["version"] == "1.2.0" && s["state"] == "committed"
        })
        .await;
    }
    eprintln!("B everywhere after {:?}", t0.elapsed());
    let r = server.wait_rollout(&rollout, "completed", 30).await;
    assert_eq!(r["bundle"]["version"], "1.2.0");
    // Concluded is final; the audit names who did what.
    let again = server.fleetctl(OPERATOR, &["experiment", "stop", &id]);
    assert!(!again.status.success());
    let audit: Value = server
        .req(reqwest::Method::GET, "/api/v1/audit", Some(OPERATOR))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for action in ["experiment.create", "experiment.conclude"] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["action"] == action && x["target"] == id.as_str()),
            "{action}: {audit:#}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut posted = 0;
    for a in apps {
        posted += a.await.unwrap();
    }
    assert!(posted > 20, "feedback accepted: {posted}");
    for ag in agents {
        ag.stop().await;
    }
}

//! The web console in a real browser: Debian's headless Chromium, driven by
//! playwright-core (tests/console/console.test.mjs), against a real server
//! with in-process agents mid-rollout. One rollout is paused by a health
//! gate (its canary errors in production and rolls back); another is
//! running. The script checks that the overview counts match the API, the
//! paused rollout names the breached gate and its observed value, the pause
//! button pauses (and a viewer's open page sees it live), a viewer gets no
//! action buttons and cannot act, CSRF is enforced, and every view fits a
//! phone-sized screen. With EDGEFLEET_SCREENSHOTS=DIR it saves a screenshot
//! of each view there (docs/console/ holds the committed ones).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integ::agent::InProcAgent;
use integ::bundles::{Model, Pack};
use integ::common::{free_port, repo};
use integ::fleet::{OPERATOR, TestFleet, VIEWER, trust_key};
use serde_json::{Value, json};

fn chromium() -> Option<PathBuf> {
    std::env::var_os("EDGEFLEET_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
}

/// Steady local traffic to an agent until `stop` (the health watch needs
/// inferences to judge a model).
fn load(url: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let body = std::fs::read(repo("models/multi/golden/in_0.npz")).unwrap();
    let url = format!("{url}/v1/infer");
    tokio::spawn(async move {
        let http = edge_agent::tls::default_client();
        while !stop.load(Ordering::Relaxed) {
            let _ = http
                .post(&url)
                .header("content-type", "application/x-npz")
                .body(body.clone())
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_headless_chromium_against_a_fleet_mid_rollout() {
    let script = repo("tests/console/console.test.mjs");
    let driver = repo("tests/console/node_modules/playwright-core");
    let Some(chromium) = chromium().filter(|_| driver.exists()) else {
        assert!(
            std::env::var("EDGEFLEET_REQUIRE_BROWSER").is_err(),
            "the browser tests must run here: install chromium and `npm ci --prefix tests/console`"
        );
        eprintln!("SKIPPED: no chromium or no tests/console/node_modules");
        return;
    };
    let mqtt_port = free_port();
    let server = TestFleet::start_with_broker(mqtt_port, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path();
    let mut agents = Vec::new();
    for (id, board) in [
        ("cam-01", "rpi4"),
        ("cam-02", "rpi4"),
        ("cam-03", "rpi4"),
        ("cam-04", "rpi4"),
        ("gate-01", "rpi5"),
        ("gate-02", "rpi5"),
        ("jet-01", "orin"),
        ("jet-02", "orin"),
    ] {
        let c = InProcAgent::config(
            &server.url,
            &dir.path().join(id),
            id,
            board,
            vec![trust_key(keys, 1)],
        );
        let mut c = InProcAgent::over_mqtt(c, mqtt_port);
        // multi-io 1.2.0 passes its self-test but fails in production.
        c.testing.inject_errors = vec!["multi-io@1.2.0".into()];
        agents.push((board, InProcAgent::start(c).await));
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = agents
        .iter()
        .map(|(_, a)| load(&a.url, stop_load.clone()))
        .collect();

    // Everyone runs v1.
    let v1 = server.push(Pack::new(Model::MultiIo, 1).bytes()).await;
    let r0 = server
        .create_rollout(json!({"bundle": v1, "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .await;
    server.wait_rollout(&r0, "completed", 120).await;
    for (_, a) in &agents {
        a.wait_for("v1 committed", 120, |s| {
            s["state"] == "committed" && s["record"]["active"]["version"] == "1.1.0"
        })
        .await;
    }
    // v2 on the rpi4 cameras: its canary rolls back, the gate pauses it.
    let v2 = server.push(Pack::new(Model::MultiIo, 2).bytes()).await;
    let paused = server
        .create_rollout(json!({
            "bundle": v2, "selector": {"board": "rpi4"},
            "stages": [{"percent": 25, "bake_minutes": 0}, {"percent": 100, "bake_minutes": 0}],
            "gates": {"max_rollback_pct": 20.0, "max_error_rate": 0.05},
        }))
        .await;
    let p = server.wait_rollout(&paused, "paused", 120).await;
    assert!(
        p["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["action"] == "pause" && d["observed"].is_number()),
        "{p:#}"
    );
    // v3 on the rpi5 gates: a canary stage baking for hours (running).
    let v3 = server.push(Pack::new(Model::MultiIo, 3).bytes()).await;
    let running = server
        .create_rollout(json!({
            "bundle": v3, "selector": {"board": "rpi5"},
            "stages": [{"percent": 50, "bake_minutes": 600}, {"percent": 100, "bake_minutes": 0}],
        }))
        .await;
    server.wait_rollout(&running, "running", 30).await;
    // An A/B experiment on the orin boards: v1 against v3.
    let r = server
        .req(reqwest::Method::POST, "/api/v1/experiments", Some(OPERATOR))
        .json(&json!({"name": "io-speed", "a": v1, "b": v3, "selector": {"board": "orin"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let experiment = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Some telemetry history for the device page's charts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let points = server.get_json("/api/v1/devices/cam-01/telemetry").await;
        if points.as_array().unwrap().len() >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "no telemetry history: {points}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let shots = std::env::var("EDGEFLEET_SCREENSHOTS").unwrap_or_default();
    let out = tokio::task::spawn_blocking({
        let (url, chromium) = (server.url.clone(), chromium.clone());
        let (paused, running) = (paused.clone(), running.clone());
        let experiment_id = experiment.clone();
        move || {
            Command::new("node")
                .arg(&script)
                .env("EF_URL", url)
                .env("EF_OPERATOR", OPERATOR)
                .env("EF_VIEWER", VIEWER)
                .env("EF_PAUSED", paused)
                .env("EF_RUNNING", running)
                .env("EF_EXPERIMENT", experiment_id)
                .env("EF_DEVICE", "cam-01")
                .env("EF_CHROMIUM", chromium)
                .env("EF_SCREENSHOTS", shots)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "the browser checks failed");
    // What the browser did, seen from the API: the running rollout was
    // paused by the operator's session, and the audit names the operator.
    let r = server
        .get_json(&format!("/api/v1/rollouts/{running}"))
        .await;
    assert_eq!(r["phase"]["state"], "paused", "{r:#}");
    let last = r["decisions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["action"], "pause");
    assert_eq!(last["gate"], "operator");
    let audit: Value = server
        .req(reqwest::Method::GET, "/api/v1/audit", Some(OPERATOR))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["who"] == "ops"
            && e["action"] == "rollout.pause"
            && e["target"] == running.as_str()),
        "the pause is audited as the operator: {audit:#}"
    );
    // The operator stopped the experiment from its page.
    let e = server
        .get_json(&format!("/api/v1/experiments/{experiment}"))
        .await;
    assert_eq!(e["phase"]["state"], "stopped", "{e:#}");
    // A paused-by-gate rollout was never acted on by the viewer.
    assert_eq!(
        server.get_json(&format!("/api/v1/rollouts/{paused}")).await["phase"]["state"],
        "paused"
    );

    // Wrong console logins meet the address's lockout like wrong bearer
    // tokens do (last: it locks out 127.0.0.1).
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let r = server
            .req(reqwest::Method::POST, "/ui/login", None)
            .json(&json!({"token": "guess"}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&401), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");

    stop_load.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    for (_, a) in agents {
        a.stop().await;
    }
}

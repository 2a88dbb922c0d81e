//! The fleet server over real HTTP on 127.0.0.1:0 with a real sled store:
//! auth, the bundle registry (verify on push, immutability, Range/ETag
//! downloads) and the device side (enroll, desired with ETag, report).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::repo;
use integ::bundles::{Model, Pack};
use integ::common;

use integ::fleet::{ADMIN, ENROLL, OPERATOR, TestFleet, VIEWER};

/// A multi_io bundle signed by key `seed`, version 1.0.`patch`.
fn bundle(seed: u8, patch: u64, expires_in: u64) -> Vec<u8> {
    Pack {
        patch,
        sequence: patch + 1,
        key_seed: seed,
        expires_in,
        ..Pack::new(Model::MultiIo, 0)
    }
    .bytes()
}

async fn start() -> TestFleet {
    start_with_tick(5000).await
}

async fn start_with_tick(tick_ms: u64) -> TestFleet {
    TestFleet::start_with(|cfg, _| cfg.rollout_tick_ms = tick_ms).await
}

/// `POST /api/v1/devices/enroll` for device `id` tagged `board`.
async fn enroll(s: &TestFleet, id: &str, board: &str) -> (StatusCode, Value) {
    let body = json!({"enrollment_token": ENROLL, "device_id": id, "tags": {"board": board}, "arch": "aarch64", "agent_version": "0.1.0"});
    let r = s
        .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status();
    (st, r.json().await.unwrap())
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn pushes_valid_bundles_and_rejects_tampered_untrusted_and_conflicting_ones() {
    let s = start().await;
    let good = bundle(1, 0, 86_400);
    let (status, rec) = s.push_as(Some(OPERATOR), good.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["name"], "multi-io");
    assert_eq!(rec["size"], good.len());
    // Same bytes again: idempotent.
    assert_eq!(
        s.push_as(Some(OPERATOR), good.clone()).await.0,
        StatusCode::OK
    );
    // Same name+version, different bytes (another expiry): immutable.
    let (status, body) = s.push_as(Some(OPERATOR), bundle(1, 0, 3600)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "bundle_conflict"),
        "{body}"
    );
    // Tampered payload.
    let mut evil = bundle(1, 1, 86_400);
    let n = evil.len();
    evil[n - 10] ^= 0x01;
    let (status, body) = s.push_as(Some(OPERATOR), evil).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hash mismatch")
    );
    // Signed by a key the server does not trust.
    let (status, body) = s.push_as(Some(OPERATOR), bundle(2, 2, 86_400)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "unknown_key"),
        "{body}"
    );
    // Garbage.
    let (status, body) = s
        .push_as(
            Some(OPERATOR),
            b"this is definitely not an edgefleet bundle".to_vec(),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "bad_magic"),
        "{body}"
    );
    // Roles.
    assert_eq!(
        s.push_as(Some(VIEWER), good.clone()).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.push_as(None, good.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.push_as(Some("nope"), good).await.0,
        StatusCode::UNAUTHORIZED
    );

    let list: Value = s.get_json("/api/v1/bundles").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the valid bundle is stored: {list}"
    );
    let audit: Value = s
        .req(reqwest::Method::GET, "/api/v1/audit", Some(ADMIN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit[0]["who"], "ops");
    assert_eq!(audit[0]["action"], "bundle.push");
}

#[tokio::test]
async fn downloads_resume_with_range_and_revalidate_with_etag() {
    let s = start().await;
    let bytes = bundle(1, 0, 86_400);
    let (_, rec) = s.push_as(Some(OPERATOR), bytes.clone()).await;
    let id = rec["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/bundles/{id}/download");
    let (_, dev) = enroll(&s, "pi-1", "rpi4").await;
    let cred = dev["credential"].as_str().unwrap().to_string();
    let (_, other) = enroll(&s, "pi-2", "jetson-orin").await;
    let other = other["credential"].as_str().unwrap().to_string();

    // Least privilege: a device may fetch only what its desired state names.
    let refused = s
        .req(reqwest::Method::GET, &path, Some(&cred))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(code(&body), "bundle_not_assigned");
    let r = s
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
        .json(&json!({"bundle": id, "selector": {"board": "rpi4"}, "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // pi-2 is not in that rollout: still refused.
    let refused = s
        .req(reqwest::Method::GET, &path, Some(&other))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // A first attempt that "broke" after 1000 bytes, then a resume.
    let first = s
        .req(reqwest::Method::GET, &path, Some(&cred))
        .header("range", "bytes=0-999")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        first.headers()["content-range"],
        format!("bytes 0-999/{}", bytes.len())
    );
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    let mut got = first.bytes().await.unwrap().to_vec();
    let rest = s
        .req(reqwest::Method::GET, &path, Some(&cred))
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    got.extend_from_slice(&rest.bytes().await.unwrap());
    assert_eq!(got, bytes);

    // Viewers watch; they do not take model weights home.
    let viewer = s
        .req(reqwest::Method::GET, &path, Some(VIEWER))
        .send()
        .await
        .unwrap();
    assert_eq!(viewer.status(), StatusCode::FORBIDDEN);
    let full = s
        .req(reqwest::Method::GET, &path, Some(OPERATOR))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    assert_eq!(full.bytes().await.unwrap().to_vec(), bytes);

    let cached = s
        .req(reqwest::Method::GET, &path, Some(&cred))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let past_end = s
        .req(reqwest::Method::GET, &path, Some(&cred))
        .header("range", format!("bytes={}-", bytes.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past_end.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let missing = s
        .req(
            reqwest::Method::GET,
            &format!("/api/v1/bundles/{}/download", "0".repeat(64)),
            Some(OPERATOR),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let traversal = s
        .req(
            reqwest::Method::GET,
            "/api/v1/bundles/..%2F..%2Fetc/download",
            Some(OPERATOR),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(traversal.status(), StatusCode::NOT_FOUND);

    let m = s
        .req(reqwest::Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), StatusCode::UNAUTHORIZED);
    let text = s.metrics(VIEWER).await;
    assert!(text.contains("fleet_bundle_downloads_total 3"), "{text}");
    assert!(
        text.contains("fleet_devices{state=\"unreported\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("fleet_api_request_seconds_count{route=\"/api/v1/bundles/{id}/download\",method=\"GET\",status=\"206\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn devices_enroll_read_only_their_own_desired_state_and_report() {
    let s = start().await;
    let (status, a) = enroll(&s, "pi-a", "rpi4").await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    let cred_a = a["credential"].as_str().unwrap().to_string();
    let (_, b) = enroll(&s, "jetson-b", "jetson-orin").await;
    let cred_b = b["credential"].as_str().unwrap().to_string();
    assert_ne!(cred_a, cred_b);

    // Enrollment refusals.
    let (status, body) = enroll(&s, "pi-a", "rpi4").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "device_exists")
    );
    let (status, body) = enroll(&s, "../etc", "rpi4").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "bad_device_id")
    );
    let r = s
        .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
        .json(&json!({"enrollment_token": "wrong", "device_id": "x", "arch": "aarch64", "agent_version": "0.1.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s
        .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Desired state: the credential names the device; ETag revalidation.
    let r = s
        .req(
            reqwest::Method::GET,
            "/api/v1/device/desired",
            Some(&cred_a),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let desired: Value = r.json().await.unwrap();
    assert_eq!(desired["bundle"], Value::Null);
    let r = s
        .req(
            reqwest::Method::GET,
            "/api/v1/device/desired",
            Some(&cred_a),
        )
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // Operators and strangers cannot use the device endpoints, devices cannot use operator ones.
    let r = s
        .req(
            reqwest::Method::GET,
            "/api/v1/device/desired",
            Some(OPERATOR),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .req(
            reqwest::Method::GET,
            "/api/v1/device/desired",
            Some("forged"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s
        .req(
            reqwest::Method::GET,
            "/api/v1/devices/jetson-b",
            Some(&cred_a),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Report: the device is the source of truth, including a fallback.
    let report = json!({
        "active": {"id": "aa", "name": "multi-io", "version": "1.0.0", "sequence": 1},
        "staged": null,
        "last_failed": {"id": "bb", "name": "multi-io", "version": "1.0.1", "sequence": 2},
        "state": "rolled_back",
        "reason": "p95 latency 80 ms above 40 ms",
        "health": {"inferences": 10, "errors": 0, "p95_latency_ms": 3.5}
    });
    let r = s
        .req(
            reqwest::Method::POST,
            "/api/v1/device/report",
            Some(&cred_b),
        )
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s
        .req(
            reqwest::Method::POST,
            "/api/v1/device/report",
            Some(&cred_b),
        )
        .body("{\"state\": 3}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let dev: Value = s.get_json("/api/v1/devices/jetson-b").await;
    assert_eq!(dev["active"]["version"], "1.0.0");
    assert_eq!(dev["last_failed"]["version"], "1.0.1");
    assert_eq!(dev["state"], "rolled_back");
    assert!(
        dev.get("credential_sha256").is_none(),
        "hashes are not exposed"
    );

    // Filters and tag edits.
    let list: Value = s.get_json("/api/v1/devices?tag=board=rpi4").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], "pi-a");
    let list: Value = s.get_json("/api/v1/devices?version=1.0.0").await;
    assert_eq!(list[0]["id"], "jetson-b");
    let list: Value = s.get_json("/api/v1/devices?status=rolled_back").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let r = s
        .req(
            reqwest::Method::GET,
            "/api/v1/devices?color=red",
            Some(VIEWER),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .req(
            reqwest::Method::PATCH,
            "/api/v1/devices/pi-a",
            Some(OPERATOR),
        )
        .json(&json!({"tags": {"board": "rpi5", "site": "lab"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(reqwest::Method::PATCH, "/api/v1/devices/pi-a", Some(VIEWER))
        .json(&json!({"tags": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .req(
            reqwest::Method::PATCH,
            "/api/v1/devices/pi-a",
            Some(OPERATOR),
        )
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .req(reqwest::Method::GET, "/api/v1/devices/nobody", Some(VIEWER))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let health = s
        .req(reqwest::Method::GET, "/healthz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// A simulated device: polls its desired state and reports it runs it,
/// with the latency it would measure on that bundle.
struct SimDevice {
    id: String,
    cred: String,
    active: Value,
}

impl SimDevice {
    async fn step(&mut self, s: &TestFleet, p95_for: &dyn Fn(&str) -> f64) {
        let desired: Value = s
            .req(
                reqwest::Method::GET,
                "/api/v1/device/desired",
                Some(&self.cred),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !desired["bundle"].is_null() {
            self.active = desired["bundle"].clone();
        }
        let version = self.active["version"].as_str().unwrap_or("").to_string();
        let report = json!({
            "active": self.active, "staged": null, "last_failed": null, "state": "committed", "reason": null,
            "health": {"inferences": 100, "errors": 0, "p95_latency_ms": p95_for(&version)}
        });
        let r = s
            .req(
                reqwest::Method::POST,
                "/api/v1/device/report",
                Some(&self.cred),
            )
            .json(&report)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
}

/// How many devices the server wants on version 1.0.1.
async fn desired_v2(s: &TestFleet) -> usize {
    let devs: Value = s.get_json("/api/v1/devices").await;
    devs.as_array()
        .unwrap()
        .iter()
        .filter(|d| d["desired"]["version"] == "1.0.1")
        .count()
}

/// Polls a rollout until `done` holds (bounded: 5 s).
async fn wait_for(s: &TestFleet, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let st = rollout_status(s, id).await;
        if done(&st) {
            return st;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "rollout {id} never reached the expected state: {}",
        rollout_status(s, id).await
    );
}

async fn rollout_status(s: &TestFleet, id: &str) -> Value {
    s.get_json(&format!("/api/v1/rollouts/{id}")).await
}

#[tokio::test]
async fn a_rollout_over_20_devices_advances_pauses_on_a_breached_gate_and_aborts_back() {
    let s = start_with_tick(50).await;
    let mut ids = Vec::new();
    for patch in 0..3 {
        let (status, rec) = s.push_as(Some(OPERATOR), bundle(1, patch, 86_400)).await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(rec["id"].as_str().unwrap().to_string());
    }
    let v1 = json!({"id": ids[0], "name": "multi-io", "version": "1.0.0", "sequence": 1});
    let mut fleet = Vec::new();
    for i in 0..20 {
        let board = ["rpi4", "jetson-nano"][i % 2];
        let (_, e) = enroll(&s, &format!("sim-{i:02}"), board).await;
        fleet.push(SimDevice {
            id: format!("sim-{i:02}"),
            cred: e["credential"].as_str().unwrap().into(),
            active: v1.clone(),
        });
    }
    let healthy = |_: &str| 4.0;
    for d in &mut fleet {
        d.step(&s, &healthy).await;
    }

    // v2: three stages, no bake time, gated on latency.
    let create = json!({"bundle": ids[1], "selector": {}, "stages": [{"percent": 25, "bake_minutes": 0}, {"percent": 50, "bake_minutes": 0}, {"percent": 100, "bake_minutes": 0}],
                        "gates": {"max_p95_latency_ms": 50.0, "min_reporting_devices": 1}});
    let r = s
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let rid = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        created["stages"][0]["devices"], 6,
        "25% of each board (5 of 10, rounded up: 3 + 3)"
    );
    assert_eq!(desired_v2(&s).await, 6, "only the canaries are told first");

    // Devices poll and report in rounds until the rollout completes.
    for _ in 0..40 {
        for d in &mut fleet {
            d.step(&s, &healthy).await;
        }
        if rollout_status(&s, &rid).await["phase"]["state"] == "completed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let st = wait_for(&s, &rid, |st| st["phase"]["state"] == "completed").await;
    assert_eq!(st["stages"][2]["running"], 20);
    // Each automatic step explains itself: 6 canaries, then +4, then +10.
    let steps: Vec<(String, usize)> = st["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["action"].as_str().unwrap().to_string(),
                d["devices"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            ("advance".into(), 4),
            ("advance".into(), 10),
            ("complete".into(), 0)
        ],
        "{st}"
    );
    let on_v2: Value = s.get_json("/api/v1/devices?version=1.0.1").await;
    assert_eq!(on_v2.as_array().unwrap().len(), 20);

    // v3 is slow in production: the canaries report p95 120 ms.
    let slow_v3 = |v: &str| if v == "1.0.2" { 120.0 } else { 4.0 };
    let create = json!({"bundle": ids[2], "stages": [{"percent": 10, "bake_minutes": 0}, {"percent": 100, "bake_minutes": 0}],
                        "gates": {"max_p95_latency_ms": 50.0}});
    let r = s
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
        .json(&create)
        .send()
        .await
        .unwrap();
    let rid3 = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut paused = Value::Null;
    for _ in 0..40 {
        for d in &mut fleet {
            d.step(&s, &slow_v3).await;
        }
        paused = rollout_status(&s, &rid3).await;
        if paused["phase"]["state"] == "paused" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(
        paused["phase"]["state"], "paused",
        "the latency gate must pause v3"
    );
    assert_eq!(
        paused["phase"]["stage"], 0,
        "it never left the canary stage"
    );
    let decision = &paused["decisions"][0];
    assert_eq!(decision["gate"], "max_p95_latency_ms");
    assert_eq!(decision["threshold"], 50.0);
    assert_eq!(decision["observed"], 120.0);
    let canaries: Vec<String> = decision["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert!(!canaries.is_empty() && canaries.len() <= 2, "{canaries:?}");

    // Abort: the canaries go back to v2, explicitly as a rollback.
    let r = s
        .req(
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{rid3}/abort"),
            Some(OPERATOR),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for d in fleet.iter_mut().filter(|d| canaries.contains(&d.id)) {
        d.step(&s, &slow_v3).await;
        assert_eq!(d.active["version"], "1.0.1", "{} returned to v2", d.id);
    }
    let text = s.metrics(VIEWER).await;
    for needle in [
        "fleet_rollouts{phase=\"completed\"} 1",
        "fleet_rollouts{phase=\"aborted\"} 1",
        "fleet_devices{state=\"committed\"} 20",
    ] {
        assert!(text.contains(needle), "missing {needle} in {text}");
    }
    let r = s
        .req(
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{rid3}/resume"),
            Some(OPERATOR),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "aborted is final");
    let r = s
        .req(
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{rid3}/explode"),
            Some(OPERATOR),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let bad = json!({"bundle": ids[2], "stages": [{"percent": 50, "bake_minutes": 0}]});
    let r = s
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(VIEWER))
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let unknown =
        json!({"bundle": "0".repeat(64), "stages": [{"percent": 100, "bake_minutes": 0}]});
    let r = s
        .req(reqwest::Method::POST, "/api/v1/rollouts", Some(OPERATOR))
        .json(&unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

/// Runs fleetctl against the server (off the async runtime, which serves it).
async fn fleetctl(s: &TestFleet, token: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(integ::bins::bin("fleetctl"));
    cmd.args(args)
        .env("FLEETCTL_SERVER", &s.url)
        .env("FLEETCTL_TOKEN", token);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn fleetctl_drives_bundles_devices_and_rollouts() {
    let s = start_with_tick(100).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.bundle");
    std::fs::write(&file, bundle(1, 0, 86_400)).unwrap();
    let f = file.to_str().unwrap();

    let o = fleetctl(&s, OPERATOR, &["bundle", "push", f, "--json"]).await;
    assert!(o.status.success(), "{}", out(&o));
    let rec: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = rec["id"].as_str().unwrap().to_string();
    let o = fleetctl(&s, VIEWER, &["bundle", "push", f]).await;
    assert!(!o.status.success());
    assert!(out(&o).contains("forbidden"), "{}", out(&o));
    let o = fleetctl(&s, VIEWER, &["bundle", "list"]).await;
    assert!(
        o.status.success() && out(&o).contains("multi-io"),
        "{}",
        out(&o)
    );

    for (i, board) in ["rpi4", "rpi4", "jetson-orin"].iter().enumerate() {
        enroll(&s, &format!("d{i}"), board).await;
    }
    let o = fleetctl(
        &s,
        VIEWER,
        &["devices", "list", "--tag", "board=rpi4", "--json"],
    )
    .await;
    let devs: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(devs.as_array().unwrap().len(), 2, "{devs}");
    let o = fleetctl(&s, VIEWER, &["devices", "list"]).await;
    assert!(
        out(&o).contains("DEVICE") && out(&o).contains("d2"),
        "{}",
        out(&o)
    );

    let o = fleetctl(
        &s,
        OPERATOR,
        &[
            "rollout",
            "create",
            "--bundle",
            &id,
            "--selector",
            "board=rpi4",
            "--stages",
            "50:1m,100:0",
            "--max-p95-latency-ms",
            "50",
            "--json",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", out(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rid = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["stages"][0]["bake_minutes"], 1);
    assert_eq!(
        r["stages"][1]["devices"], 2,
        "the selector keeps the Jetson out"
    );
    assert_eq!(r["gates"]["max_p95_latency_ms"], 50.0);

    let o = fleetctl(&s, VIEWER, &["rollout", "status", &rid]).await;
    assert!(
        o.status.success() && out(&o).contains("RUNNING") && out(&o).contains("50%"),
        "{}",
        out(&o)
    );
    let o = fleetctl(&s, OPERATOR, &["rollout", "pause", &rid]).await;
    assert!(
        o.status.success() && out(&o).contains("PAUSED"),
        "{}",
        out(&o)
    );
    let o = fleetctl(&s, OPERATOR, &["rollout", "pause", &rid]).await;
    assert!(
        !o.status.success() && out(&o).contains("transition_not_allowed"),
        "{}",
        out(&o)
    );
    let o = fleetctl(&s, OPERATOR, &["rollout", "abort", &rid]).await;
    assert!(
        o.status.success() && out(&o).contains("ABORTED"),
        "{}",
        out(&o)
    );
    assert!(out(&o).contains("abort by operator"), "{}", out(&o));

    let o = fleetctl(
        &s,
        OPERATOR,
        &["rollout", "create", "--bundle", &id, "--stages", "50:5x"],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    let mut cmd = std::process::Command::new(integ::bins::bin("fleetctl"));
    cmd.args(["bundle", "list"])
        .env_remove("FLEETCTL_SERVER")
        .env_remove("FLEETCTL_TOKEN");
    let o = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(out(&o).contains("no server"), "{}", out(&o));
}

#[tokio::test]
async fn serves_the_committed_openapi_document_to_authenticated_callers() {
    let s = start().await;
    let r = s
        .req(reqwest::Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s
        .req(reqwest::Method::GET, "/api/v1/openapi.json", Some(VIEWER))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let served = r.text().await.unwrap();
    let committed = std::fs::read_to_string(repo("docs/openapi.json")).unwrap();
    assert_eq!(
        served, committed,
        "docs/openapi.json differs from the served document"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    assert!(doc["paths"]["/api/v1/rollouts/{id}/{action}"]["post"].is_object());
}

/// A push refused before its upload is read (a viewer's token; a size
/// over `max_bundle_bytes`) reaches fleetctl as that refusal. Before the
/// server read and dropped the rest of a refused upload, it closed on
/// unread bytes, the kernel reset the connection, and fleetctl said
/// "request or response body error" every time with a 40 MiB file.
#[tokio::test]
async fn fleetctl_hears_why_a_big_push_is_refused() {
    let s = TestFleet::start_with(|cfg, _| cfg.http.max_bundle_bytes = 4 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bundle");
    std::fs::write(&file, vec![0x5au8; 40 << 20]).unwrap();
    let f = file.to_str().unwrap();
    for _ in 0..3 {
        let o = fleetctl(&s, VIEWER, &["bundle", "push", f]).await;
        assert!(!o.status.success());
        assert!(out(&o).contains("403 Forbidden forbidden"), "{}", out(&o));
        let o = fleetctl(&s, OPERATOR, &["bundle", "push", f]).await;
        assert!(!o.status.success());
        assert!(out(&o).contains("413 Payload Too Large"), "{}", out(&o));
    }
}

//! Maintenance windows and device-side defer, end to end: a real server
//! and two in-process agents on a real model.
//!
//! - `cam-1` (board rpi4, time zone Asia/Kolkata, an injected clock) gets
//!   a tag window (`fleetctl window set --tag board=rpi4`) that opens three
//!   hours from now in *its* zone. The rollout's bundle is downloaded,
//!   verified and self-tested at once, then the device waits: it keeps
//!   serving the old model, reports `waiting` with the window's opening,
//!   the rollout shows "waiting for window (next: …)" and neither pauses
//!   nor counts it as failed. Moving its clock into the window activates
//!   the new model.
//! - `cam-2` (board rpi5, no window) has a busy local app that defers with
//!   `POST /v1/defer`; `DELETE /v1/defer` lets it activate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use integ::agent::InProcAgent;
use integ::bundles::{Model, Pack};
use integ::fleet::{OPERATOR, TestFleet, ok, trust_key};
use serde_json::{Value, json};

/// Asia/Kolkata is UTC+05:30 all year.
const KOLKATA: i64 = 5 * 3600 + 1800;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn activation_waits_for_the_window_and_the_local_app_after_the_download() {
    let server = TestFleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trust = vec![trust_key(dir.path(), 1)];

    // cam-1 runs on a clock the test moves.
    let offset = Arc::new(AtomicI64::new(0));
    let clock: edge_agent::updater::Clock = {
        let offset = offset.clone();
        Arc::new(move || {
            (edgefleet_wire::time::unix_now() as i64 + offset.load(Ordering::SeqCst)) as u64
        })
    };
    let mut c1 = InProcAgent::config(
        &server.url,
        &dir.path().join("cam-1"),
        "cam-1",
        "rpi4",
        trust.clone(),
    );
    c1.update.time_zone = Some("Asia/Kolkata".into());
    let cam1 = InProcAgent::start_with_clock(c1, clock).await;
    let cam2 = InProcAgent::start(InProcAgent::config(
        &server.url,
        &dir.path().join("cam-2"),
        "cam-2",
        "rpi5",
        trust,
    ))
    .await;

    // Both run v1 (no window yet).
    let v1 = server.push(Pack::new(Model::MultiIo, 1).bytes()).await;
    server
        .create_rollout(json!({"bundle": v1, "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .await;
    for a in [&cam1, &cam2] {
        a.wait_for("v1 committed", 90, |s| {
            s["state"] == "committed" && s["record"]["active"]["version"] == "1.1.0"
        })
        .await;
    }

    // A window on rpi4 boards, in each device's own zone: one hour, opening
    // three hours (rounded up to the minute) from now on cam-1's wall clock.
    let now = edgefleet_wire::time::unix_now() as i64;
    let local = now + KOLKATA;
    let start_sod = ((local % 86_400) / 60 + 1) * 60 + 3 * 3600;
    let (sh, sm) = ((start_sod / 3600) % 24, (start_sod % 3600) / 60);
    let spec = format!("daily {sh:02}:{sm:02}-{:02}:{sm:02}", (sh + 1) % 24);
    let mut open_local = local - local % 86_400 + (start_sod % 86_400);
    if open_local <= local {
        open_local += 86_400;
    }
    let expected_open = (open_local - KOLKATA) as u64;
    let set = ok(server.fleetctl(OPERATOR, &["window", "set", "--tag", "board=rpi4", &spec]));
    assert!(set.contains("tag:board=rpi4"), "{set}");
    let listed = ok(server.fleetctl(OPERATOR, &["window", "list", "--json"]));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        listed[0]["schedule"]["windows"][0],
        spec.as_str(),
        "{listed}"
    );
    // A window that cannot open is refused with the parser's words.
    let bad = server.fleetctl(
        OPERATOR,
        &["window", "set", "--tag", "board=rpi4", "daily 25:00-26:00"],
    );
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad time"));
    let r = server
        .put_window(
            "tag:board=rpi4",
            json!({"windows": ["daily 01:00-02:00"], "time_zone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_window", "{e}");

    // cam-2's app is busy.
    let defer: Value = cam2
        .http
        .post(format!("{}/v1/defer", cam2.url))
        .json(&json!({"seconds": 3600, "reason": "recording"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(defer["busy_until"].as_u64().is_some(), "{defer}");

    // v2 goes out to both.
    let v2 = server.push(Pack::new(Model::MultiIo, 2).bytes()).await;
    let rollout = server
        .create_rollout(json!({"bundle": v2, "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .await;
    let s1 = cam1
        .wait_for("cam-1 waits for its window", 90, |s| {
            s["state"] == "waiting"
        })
        .await;
    // Downloaded, verified and self-tested before the window: the bundle
    // file is on disk and the phase past self-test; v1 still serves.
    assert_eq!(s1["record"]["phase"]["target"]["bundle"]["id"], v2.as_str());
    assert!(
        dir.path()
            .join(format!("cam-1/state/bundles/{v2}.bundle"))
            .exists(),
        "the download happened before the window"
    );
    assert_eq!(cam1.model_version().await.as_deref(), Some("1.1.0"));
    assert_eq!(s1["record"]["phase"]["until"], expected_open, "{s1:#}");
    let reason = s1["record"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("waiting for window (next: "), "{reason}");
    assert!(
        reason.contains("+05:30"),
        "read in the device's zone: {reason}"
    );
    let s2 = cam2
        .wait_for("cam-2 deferred by its app", 90, |s| s["state"] == "waiting")
        .await;
    let reason2 = s2["record"]["reason"].as_str().unwrap();
    assert!(
        reason2.contains("deferred by the local app") && reason2.contains("recording"),
        "{reason2}"
    );
    assert_eq!(cam2.model_version().await.as_deref(), Some("1.1.0"));

    // The server sees them waiting: not failed, not pending, not paused.
    let mut view = Value::Null;
    for _ in 0..100 {
        view = server
            .get_json(&format!("/api/v1/rollouts/{rollout}"))
            .await;
        if view["stages"][0]["waiting"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let stage = &view["stages"][0];
    assert_eq!(stage["waiting"], 2, "{view:#}");
    assert_eq!(
        (stage["failed"].as_u64(), stage["pending"].as_u64()),
        (Some(0), Some(0)),
        "{view:#}"
    );
    assert_eq!(view["phase"]["state"], "running", "{view:#}");
    let d1 = server.device("cam-1").await;
    assert_eq!(d1["state"], "waiting");
    assert_eq!(d1["activate_at"], expected_open);
    assert_eq!(d1["window"]["scope"], "tag:board=rpi4", "{d1:#}");
    let status = ok(server.fleetctl(OPERATOR, &["rollout", "status", &rollout]));
    assert!(status.contains("waiting for window (next: "), "{status}");
    let desired_cam2 = server.device("cam-2").await;
    assert!(
        desired_cam2.get("window").is_none_or(Value::is_null),
        "{desired_cam2:#}"
    );

    // The app is done: cam-2 activates at once.
    let released = cam2
        .http
        .delete(format!("{}/v1/defer", cam2.url))
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    cam2.wait_for("cam-2 committed v2", 60, |s| {
        s["state"] == "committed" && s["record"]["active"]["version"] == "1.2.0"
    })
    .await;
    // cam-1 still waits: the rollout does not complete without it.
    assert_eq!(cam1.model_version().await.as_deref(), Some("1.1.0"));
    let view = server
        .get_json(&format!("/api/v1/rollouts/{rollout}"))
        .await;
    assert_eq!(view["phase"]["state"], "running", "{view:#}");

    // cam-1's clock reaches the window: it activates v2 and the rollout
    // completes.
    offset.store(expected_open as i64 - now + 1, Ordering::SeqCst);
    cam1.wait_for("cam-1 committed v2 in its window", 60, |s| {
        s["state"] == "committed" && s["record"]["active"]["version"] == "1.2.0"
    })
    .await;
    let done = server.wait_rollout(&rollout, "completed", 60).await;
    assert_eq!(done["stages"][0]["running"], 2, "{done:#}");

    cam1.stop().await;
    cam2.stop().await;
}

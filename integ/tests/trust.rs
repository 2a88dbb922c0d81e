//! Trust-root rotation across a fleet: a real server, in-process agents
//! and the real `fleetctl`. A compromised release key is rotated out (two
//! rotations); a device that was off walks the chain; bundles signed by the
//! removed key are refused by the server and by every device; the new key
//! works; the accepted version survives a restart; forged rotations fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use edgefleet_wire::keys::{encode_secret_key, signing_key_from_seed};
use edgefleet_wire::trust::{SignedTrust, TrustDoc};
use integ::agent::InProcAgent;
use integ::bundles::{Model, Pack};
use integ::fleet::{ADMIN, OPERATOR, TestFleet, ok, trust_key};
use serde_json::Value;

fn secret_key(dir: &Path, seed: u8) -> PathBuf {
    let p = dir.join(format!("k{seed}.key"));
    std::fs::write(&p, encode_secret_key(&signing_key_from_seed([seed; 32]))).unwrap();
    p
}

fn multi(minor: u64, key_seed: u8) -> Vec<u8> {
    Pack {
        key_seed,
        ..Pack::new(Model::MultiIo, minor)
    }
    .bytes()
}

fn active(s: &Value) -> Option<&str> {
    s["record"]["active"]["version"].as_str()
}

async fn server_sees(server: &TestFleet, id: &str, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = server.device(id).await;
        if pred(&d) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}; server view: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_trust(server: &TestFleet, token: &str, doc: &SignedTrust) -> (u16, Value) {
    let r = server
        .req(reqwest::Method::POST, "/api/v1/trust", Some(token))
        .json(doc)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_key_is_rotated_out_across_the_fleet() {
    let server = TestFleet::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path();
    let (k1, k2, k3) = (
        secret_key(keys, 1),
        secret_key(keys, 2),
        secret_key(keys, 3),
    );
    let agent_cfg = |id: &str| {
        InProcAgent::config(
            &server.url,
            &dir.path().join(id),
            id,
            "rpi4",
            vec![trust_key(keys, 1)],
        )
    };
    let a = InProcAgent::start(agent_cfg("dev-a")).await;
    let b = InProcAgent::start(agent_cfg("dev-b")).await;
    let v1 = server.push(multi(1, 1)).await;
    let r1 = server.roll_out(&v1, "rpi4").await;
    for agent in [&a, &b] {
        agent
            .wait_for("v1 committed", 60, |s| {
                s["state"] == "committed" && active(s) == Some("1.1.0") && s["trust_version"] == 1
            })
            .await;
    }
    server.abort(&r1).await;
    // Signed by key 1 before anyone knew it had leaked.
    let signed_by_k1 = server.push(multi(2, 1)).await;

    // dev-b is off while both rotations happen.
    b.stop().await;
    let out = ok(server.fleetctl(
        ADMIN,
        &[
            "trust",
            "rotate",
            "--old-key",
            k1.to_str().unwrap(),
            "--new-key",
            k2.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("trust version 2"), "{out}");
    let out = ok(server.fleetctl(
        ADMIN,
        &[
            "trust",
            "rotate",
            "--old-key",
            k2.to_str().unwrap(),
            "--new-key",
            k3.to_str().unwrap(),
            "--json",
        ],
    ));
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["version"], 3);
    assert_eq!(view["chain"].as_array().unwrap().len(), 2);

    // Only an admin rotates; the removed key alone cannot take it back.
    let k1_sk = signing_key_from_seed([1; 32]);
    let forged = SignedTrust::sign(
        &TrustDoc::new(4, &[k1_sk.verifying_key()], 1, 4_000_000_000).unwrap(),
        &[&k1_sk],
    )
    .unwrap();
    let (status, body) = post_trust(&server, OPERATOR, &forged).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = post_trust(&server, ADMIN, &forged).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "rotation_refused", "{body}");
    let stale = serde_json::from_value::<SignedTrust>(view["chain"][0].clone()).unwrap();
    let (status, body) = post_trust(&server, ADMIN, &stale).await;
    assert_eq!(status, 409, "an old version again: {body}");

    // The server refuses new pushes signed by the removed key.
    let (status, body) = server.push_as(Some(OPERATOR), multi(3, 1)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "unknown_key", "{body}");

    // dev-a follows (one version at a time, from its desired state).
    a.wait_for("dev-a on trust version 3", 60, |s| s["trust_version"] == 3)
        .await;
    server_sees(&server, "dev-a", "dev-a reports trust version 3", |d| {
        d["trust_version"] == 3
    })
    .await;
    let chain_file = dir.path().join("dev-a/state/trust.json");
    let kept: Vec<SignedTrust> =
        serde_json::from_slice(&std::fs::read(&chain_file).unwrap()).unwrap();
    assert_eq!(kept.len(), 2, "versions 2 and 3 are on disk");

    // The bundle signed by key 1 before the rotation reaches the devices:
    // they refuse it and keep serving v1.
    let r2 = server.roll_out(&signed_by_k1, "rpi4").await;
    let s = a
        .wait_for("dev-a refuses the key-1 bundle", 60, |s| {
            s["record"]["last_failed"]["id"] == signed_by_k1.as_str() && s["state"] == "failed"
        })
        .await;
    let why = s["record"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("unknown key"), "{why}");
    assert_eq!(a.model_version().await.as_deref(), Some("1.1.0"));

    // dev-b comes back on version 1: it walks 2 then 3 (its desired state
    // names only version 3), then refuses the key-1 bundle too.
    let b = InProcAgent::start(agent_cfg("dev-b")).await;
    assert_eq!(b.model_version().await.as_deref(), Some("1.1.0"));
    let s = b
        .wait_for(
            "dev-b walks the chain and refuses the key-1 bundle",
            60,
            |s| {
                s["trust_version"] == 3
                    && s["record"]["last_failed"]["id"] == signed_by_k1.as_str()
                    && s["state"] == "failed"
            },
        )
        .await;
    let why = s["record"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("unknown key"), "{why}");
    server.abort(&r2).await;

    // The new key works everywhere.
    let v4 = server.push(multi(4, 3)).await;
    server.roll_out(&v4, "rpi4").await;
    for agent in [&a, &b] {
        agent
            .wait_for("v4 (key 3) committed", 60, |s| {
                s["state"] == "committed" && active(s) == Some("1.4.0")
            })
            .await;
    }

    // A restart keeps version 3: it never goes back to the configured key.
    a.stop().await;
    let a = InProcAgent::start(agent_cfg("dev-a")).await;
    let s = a.status().await;
    assert_eq!(s["trust_version"], 3, "{s:#}");
    assert_eq!(a.model_version().await.as_deref(), Some("1.4.0"));
    let metrics = integ::common::metrics_text(&a.http, &a.url, None).await;
    assert!(metrics.contains("edge_agent_trust_version 3"), "{metrics}");

    // The audit log names who rotated.
    let audit: Value = server
        .req(reqwest::Method::GET, "/api/v1/audit", Some(ADMIN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rotations: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "trust.rotate")
        .collect();
    assert_eq!(rotations.len(), 2, "{audit:#}");
    assert!(rotations.iter().all(|e| e["who"] == "root"), "{audit:#}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_server_keeps_the_chain_and_new_boards_start_from_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    std::fs::create_dir_all(&data).unwrap();
    let data2 = data.clone();
    let server = TestFleet::start_with(move |cfg, _| cfg.data_dir = data2).await;
    let (k1, k2) = (secret_key(dir.path(), 1), secret_key(dir.path(), 2));
    // Offline co-signing: write, sign, push.
    let doc = dir.path().join("v2.json");
    ok(server.fleetctl(
        ADMIN,
        &[
            "trust",
            "rotate",
            "--old-key",
            k1.to_str().unwrap(),
            "--new-key",
            k2.to_str().unwrap(),
            "--out",
            doc.to_str().unwrap(),
        ],
    ));
    let written: SignedTrust = serde_json::from_slice(&std::fs::read(&doc).unwrap()).unwrap();
    assert_eq!(written.signatures.len(), 2);
    // Re-signing with a key already on it replaces that signature.
    ok(server.fleetctl(
        ADMIN,
        &[
            "trust",
            "sign",
            doc.to_str().unwrap(),
            "--key",
            k2.to_str().unwrap(),
        ],
    ));
    let out = ok(server.fleetctl(ADMIN, &["trust", "push", doc.to_str().unwrap()]));
    assert!(out.contains("trust version 2"), "{out}");
    drop(server);
    // The store is free once the stopped server let go of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = fleet_server::config::ServerConfig {
        data_dir: data.clone(),
        ..Default::default()
    };
    while fleet_server::server::open_store(&probe).is_err() {
        assert!(
            Instant::now() < deadline,
            "the stopped server keeps its store"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let data3 = data.clone();
    let server = TestFleet::start_with(move |cfg, _| cfg.data_dir = data3).await;
    let v: Value = server
        .req(reqwest::Method::GET, "/api/v1/trust", Some(OPERATOR))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["version"], 2, "{v}");
    // A board provisioned now starts from the document, not key 1.
    let provisioned = dir.path().join("trust-now.json");
    ok(server.fleetctl(
        OPERATOR,
        &["trust", "show", "--out", provisioned.to_str().unwrap()],
    ));
    let mut cfg = InProcAgent::config(
        &server.url,
        &dir.path().join("new"),
        "dev-new",
        "rpi4",
        vec![],
    );
    cfg.trust.document = Some(provisioned);
    let agent = InProcAgent::start(cfg).await;
    let v = server.push(multi(1, 2)).await;
    server.roll_out(&v, "rpi4").await;
    agent
        .wait_for("a key-2 bundle committed", 60, |s| {
            s["state"] == "committed" && active(s) == Some("1.1.0") && s["trust_version"] == 2
        })
        .await;
    agent.stop().await;
}

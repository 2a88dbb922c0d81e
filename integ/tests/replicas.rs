//! Two fleet-server processes on one PostgreSQL (Debian's, started by the
//! test), one S3 bucket (`s3s-fs`) for bundle bytes and Debian's
//! mosquitto with per-device ACLs (a shared subscription the standby
//! takes its share of, `ingest_slots`), each
//! server with its own data folder and port, behind a load balancer that
//! checks `/readyz`: one is active, the other waits as a standby (the
//! store's active lease) that answers health checks but serves nothing.
//! kill -9 of the active one in the middle of a staged rollout: the
//! standby takes the lease, becomes ready on its port, finishes the
//! rollout from the same bucket, ingests the devices' MQTT telemetry, and
//! no device is ever sent back to the bundle it left. Then everything
//! restarts, PostgreSQL, the bucket and the broker included, and nothing
//! is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use integ::agent::InProcAgent as Agent;
use integ::balancer::Balancer;
use integ::bundles::{Model, Pack};
use integ::common::{counter, free_port, mosquitto_or_skip, sample};
use integ::fleet::{
    OPERATOR, ServerProc, TestFleet, VIEWER, assert_credential_needs_its_certificate,
    assert_forbidden, config_file_http, desired_through, enroll_through, trust_key,
};
use integ::mosquitto::Mosquitto;
use integ::pki::{assert_refused_at_handshake, https_client, pki_for};
use integ::postgres::Postgres;
use integ::s3::S3;

/// Replica `name`'s configuration (`name.toml`, data in `data-name`) on
/// `port`, with the shared `extra` sections.
fn replica(dir: &Path, name: &str, port: u16, extra: &str) -> PathBuf {
    replica_http(dir, name, port, "", extra)
}

/// [`replica`], with `http` lines in its `[http]` section.
fn replica_http(dir: &Path, name: &str, port: u16, http: &str, extra: &str) -> PathBuf {
    let data = dir.join(format!("data-{name}"));
    config_file_http(dir, &format!("{name}.toml"), &data, port, http, extra)
}

/// Two replicas on the `shared` sections (a `[store] url` and the rest):
/// `a` started first and active, then `b` waiting as its standby; with
/// `http` lines in their `[http]` sections.
struct Pair {
    a: ServerProc,
    b: ServerProc,
    ports: (u16, u16),
    configs: (PathBuf, PathBuf),
}

fn two_replicas(dir: &Path, [http_a, http_b]: [&str; 2], shared: &str) -> Pair {
    let (port_a, port_b) = (free_port(), free_port());
    let configs = (
        replica_http(dir, "a", port_a, http_a, shared),
        replica_http(dir, "b", port_b, http_b, shared),
    );
    let mut a = ServerProc::start(&configs.0, port_a);
    a.wait_log("active: this server holds the store's lease", 30);
    let mut b = ServerProc::start(&configs.1, port_b);
    b.wait_log("standby: another fleet-server is active", 30);
    Pair {
        a,
        b,
        ports: (port_a, port_b),
        configs,
    }
}

/// What a standby answers: alive, not ready (a balancer that checks
/// /readyz sends it nothing), everything else forwarded to the active
/// server, and its role in /metrics.
async fn assert_standby(port: u16) {
    let standby = TestFleet::attach(port);
    let get = |path: &str, token| standby.req(reqwest::Method::GET, path, token);
    let r = get("/healthz", None).send().await.unwrap();
    assert_eq!(r.status(), 200, "a standby is alive");
    let r = get("/readyz", None).send().await.unwrap();
    assert_eq!(r.status(), 503, "a standby is not ready");
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "standby");
    // Forwarded: the active server answers, credentials and all.
    let r = get("/api/v1/devices", Some(OPERATOR)).send().await.unwrap();
    assert_eq!(r.status(), 200, "a standby forwards to the active server");
    let r = get("/api/v1/devices", None).send().await.unwrap();
    assert_eq!(r.status(), 401, "the active server still checks the token");
    // A request a standby already forwarded is never forwarded again.
    let r = get("/api/v1/devices", Some(OPERATOR))
        .header("x-edgefleet-forwarded-by", "standby")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "standby");
    // /metrics wants a token there too.
    let r = get("/metrics", None).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let m = standby.metrics(VIEWER).await;
    assert_eq!(sample(&m, "fleet_server_active"), Some(0), "{m}");
    assert!(counter(&m, "fleet_standby_forwarded_total") >= 2, "{m}");
}

/// A client on its own loopback address.
fn client_from(last: u8) -> reqwest::Client {
    edge_agent::tls::install_provider();
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, last]))
        .build()
        .unwrap()
}

/// Sends bad tokens to `url` from `client` until the per-address lockout
/// answers 429; whether it did within 40 tries.
async fn locked_out(client: &reqwest::Client, url: &str, forged: Option<&str>) -> bool {
    for _ in 0..40 {
        let mut r = client.get(url).bearer_auth("not-a-token");
        if let Some(addr) = forged {
            r = r.header("x-edgefleet-client-addr", addr);
        }
        match r.send().await.unwrap().status().as_u16() {
            429 => return true,
            401 => {}
            s => panic!("{url}: {s}"),
        }
    }
    false
}

/// The active server limits the client a standby forwards for, not the
/// standby: an attacker's failed logins through the standby lock out the
/// attacker's address only. And a client that claims another address
/// itself is not believed.
async fn assert_real_clients_are_limited(active: u16, standby: u16) {
    let through_standby = format!("http://127.0.0.1:{standby}/api/v1/devices");
    assert!(locked_out(&client_from(2), &through_standby, None).await);
    let r = client_from(3)
        .get(&through_standby)
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "the lockout is the attacker's, not the standby's"
    );
    let direct = format!("http://127.0.0.1:{active}/api/v1/devices");
    assert!(
        locked_out(&client_from(4), &direct, Some("127.0.0.99")).await,
        "a forged client address header is not believed"
    );
    let r = client_from(5)
        .get(&direct)
        .bearer_auth(OPERATOR)
        .header("x-edgefleet-forwarded-by", "a-guess")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "a request vouched for by a wrong secret");
}

fn active_version(s: &Value) -> Option<String> {
    s["record"]["active"]["version"].as_str().map(String::from)
}

/// Every active version each agent reported, in order, without repeats.
type Seen = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// Polls the agents' local status until `stop`, recording versions.
fn watch(agents: Vec<(String, String)>, seen: Seen, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let http = edge_agent::tls::default_client();
        while !stop.is_cancelled() {
            for (id, url) in &agents {
                let Ok(r) = http.get(format!("{url}/v1/status")).send().await else {
                    continue;
                };
                let Ok(s) = r.json::<Value>().await else {
                    continue;
                };
                if let Some(v) = active_version(&s) {
                    let mut seen = seen.lock().unwrap();
                    let list = seen.entry(id.clone()).or_default();
                    if list.last() != Some(&v) {
                        list.push(v);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// Waits until the server shows telemetry of `device` numbered above
/// `after`; its sequence number.
async fn wait_telemetry(fleet: &TestFleet, device: &str, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = fleet.device(device).await;
        if let Some(seq) = d["telemetry"]["seq"].as_u64().filter(|&s| s > after) {
            return seq;
        }
        assert!(
            Instant::now() < deadline,
            "no telemetry after {after}: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_mid_rollout_and_no_device_goes_backwards() {
    let test = "a_standby_takes_over_mid_rollout_…";
    let Some(mut pg) = Postgres::start(test) else {
        return;
    };
    let Some(mut s3) = S3::start(test, "fleet") else {
        return;
    };
    let Some(mosquitto_bin) = mosquitto_or_skip(test) else {
        return;
    };
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), &mosquitto_bin, "dash-secret");
    // Nothing shared on disk: state in PostgreSQL, bundle bytes in the
    // bucket, devices on the broker. Each server on its own port, behind
    // the balancer.
    let shared = format!(
        "[store]\nurl = \"{url}\"\n{}{}",
        s3.bundles_toml("bundles", true),
        broker.server_toml_slots("server-secret", Some("fleet"), 1)
    );
    let Pair {
        a,
        mut b,
        ports: (port_a, port_b),
        configs: (cfg_a, cfg_b),
    } = two_replicas(dir.path(), ["", ""], &shared);
    assert_standby(port_b).await;
    assert_real_clients_are_limited(port_a, port_b).await;
    let m = TestFleet::attach(port_a).metrics(VIEWER).await;
    assert_eq!(sample(&m, "fleet_server_active"), Some(1), "{m}");
    let lb = Balancer::start(&[port_a, port_b]).await;
    lb.wait_ready(&[port_a], 30).await;
    let fleet = TestFleet::attach(lb.port);

    // Four devices on v1: three through the balancer, the fourth
    // configured with the standby's address (it enrolls and updates
    // through the standby, which forwards).
    let v1 = fleet.push(Pack::new(Model::Cls, 1).bytes()).await;
    let adir = tempfile::tempdir().unwrap();
    let trust = vec![trust_key(adir.path(), 1)];
    let standby_url = format!("http://127.0.0.1:{port_b}");
    let mut agents = Vec::new();
    for i in 1..=4 {
        let d = adir.path().join(format!("pi-{i}"));
        let server = if i == 4 { &standby_url } else { &fleet.url };
        agents.push((
            format!("pi-{i}"),
            Agent::start(Agent::over_mqtt(
                Agent::config(server, &d, &format!("pi-{i}"), "rpi4", trust.clone()),
                broker.port,
            ))
            .await,
        ));
    }
    let r1 = fleet.rollout_gated(&v1, "rpi4", json!({})).await;
    fleet.wait_rollout(&r1, "completed", 90).await;

    let seen: Seen = Arc::default();
    let stop_watch = tokio_util::sync::CancellationToken::new();
    watch(
        agents
            .iter()
            .map(|(id, a)| (id.clone(), a.url.clone()))
            .collect(),
        seen.clone(),
        stop_watch.clone(),
    );

    // v2, pushed through the standby (a streamed upload, forwarded), in
    // two stages; the first one bakes long enough to kill the active
    // server in the middle of the rollout.
    let v2 = TestFleet::attach(port_b)
        .push(Pack::new(Model::Cls, 2).bytes())
        .await;
    let r2 = fleet
        .create_rollout(json!({
            "bundle": v2,
            "selector": {"board": "rpi4"},
            "stages": [
                {"percent": 34, "bake_minutes": 0, "bake_seconds": 4},
                {"percent": 100, "bake_minutes": 0},
            ],
            "gates": {},
        }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let on_v2 = seen
            .lock()
            .unwrap()
            .values()
            .filter(|l| l.last().map(String::as_str) == Some("1.2.0"))
            .count();
        if on_v2 >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no device took v2: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = fleet.get_json(&format!("/api/v1/rollouts/{r2}")).await;
    assert_eq!(r["phase"]["state"], "running", "mid-rollout: {r:#}");
    // The devices' telemetry reaches the active server over the broker.
    let seq_before = wait_telemetry(&fleet, "pi-1", 0).await;
    // pi-4's enrollment and the v2 upload went through the standby, and
    // the attacker's failed logins.
    let m = TestFleet::attach(port_b).metrics(VIEWER).await;
    assert!(counter(&m, "fleet_standby_forwarded_total") > 5, "{m}");
    // Its check-ins, reports and downloads were answered by the standby
    // (the reports through the inbox the active server applies; the
    // downloads as redirects to the bucket, `presign_downloads`).
    for answered in [
        "fleet_standby_checkins_served_total",
        "fleet_standby_reports_stored_total",
        "fleet_standby_downloads_redirected_total",
    ] {
        assert!(counter(&m, answered) > 0, "{answered}: {m}");
    }
    assert_eq!(
        counter(&m, "fleet_standby_forward_failures_total"),
        0,
        "{m}"
    );
    // The standby takes its share of the devices' messages.
    assert!(
        counter(&m, "fleet_standby_mqtt_messages_stored_total") > 0,
        "{m}"
    );
    a.kill();
    let killed = Instant::now();

    // The standby takes the lease, becomes ready, and finishes the
    // rollout: the balancer now sends everything to it.
    b.wait_log("active: this server holds the store's lease", 30);
    lb.wait_ready(&[port_b], 60).await;
    // Reported, not asserted (no timed assertions in tests): docs/deploy.md.
    eprintln!(
        "the standby took over and passes /readyz {:.2} s after the kill -9",
        killed.elapsed().as_secs_f64()
    );
    // Its own slot's session, left when it took over, is adopted.
    b.wait_log("adopted a gone standby's broker session", 30);
    let done = fleet.wait_rollout(&r2, "completed", 120).await;
    for (_, agent) in &agents {
        agent
            .wait_for("v2 committed", 60, |s| {
                s["state"] == "committed" && active_version(s).as_deref() == Some("1.2.0")
            })
            .await;
    }
    // The new active server ingests the devices' telemetry (its shared
    // subscription on the broker).
    wait_telemetry(&fleet, "pi-1", seq_before).await;
    stop_watch.cancel();
    // No device ever went back: each ran v1, then v2, nothing after.
    for (id, list) in seen.lock().unwrap().iter() {
        assert_eq!(list, &["1.1.0", "1.2.0"], "{id}: {list:?}");
    }
    // The rollout's record holds both servers' decisions, in order.
    let decisions = done["decisions"].as_array().map_or(0, Vec::len);
    assert!(decisions >= 2, "{done:#}");

    // Restart everything: nothing is lost.
    b.kill();
    pg.restart();
    s3.restart();
    let mut a = ServerProc::start(&cfg_a, port_a);
    a.wait_log("active: this server holds the store's lease", 30);
    lb.wait_ready(&[port_a], 60).await;
    // b again, a standby now (pi-4 reaches the fleet through it).
    let mut b = ServerProc::start(&cfg_b, port_b);
    b.wait_log("standby: another fleet-server is active", 30);
    let r = fleet.get_json(&format!("/api/v1/rollouts/{r2}")).await;
    assert_eq!(r["phase"]["state"], "completed", "{r:#}");
    for (id, _) in &agents {
        let d = fleet.device(id).await;
        assert_eq!(d["active"]["id"], v2.as_str(), "{id}: {d:#}");
        assert_eq!(d["desired"]["id"], v2.as_str(), "{id}: {d:#}");
    }
    // The bundles' bytes are still there for a device that comes later.
    let v3 = fleet.push(Pack::new(Model::Cls, 3).bytes()).await;
    let r3 = fleet.roll_out(&v3, "rpi4").await;
    fleet.wait_rollout(&r3, "completed", 120).await;
    assert_eq!(s3.objects("bundles").len(), 3);
    for (_, agent) in agents {
        agent.stop().await;
    }
    b.stop();
    a.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_its_lease_stops_and_import_refuses_a_live_database() {
    let Some(mut pg) = Postgres::start("a_server_that_lost_its_lease_…") else {
        return;
    };
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let (port, port_b) = (free_port(), free_port());
    let store = format!("[store]\nurl = \"{url}\"");
    let cfg = replica(dir.path(), "a", port, &store);
    let mut a = ServerProc::start(&cfg, port);
    a.wait_log("active: this server holds the store's lease", 30);
    // An import under a running server would leave its memory stale.
    let doc = dir.path().join("empty.json");
    std::fs::write(
        &doc,
        json!({"format": "edgefleet-store-export", "version": 1, "source": "sled",
               "exported_at": 0, "bundles": [], "devices": [], "rollouts": [],
               "experiments": [], "enrollment_tokens": [], "trust": [], "windows": [],
               "audit": []})
        .to_string(),
    )
    .unwrap();
    let o = ServerProc::run(&cfg, &["import", "--in", doc.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stop it before importing"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A standby stops cleanly on SIGTERM (exit 0: it closes its
    // database sessions off the async runtime).
    let cfg_b = replica(dir.path(), "b", port_b, &store);
    let mut b = ServerProc::start(&cfg_b, port_b);
    b.wait_log("standby: another fleet-server is active", 30);
    b.stop();
    // The database goes away under the active server: its lease session
    // ends, so it stops instead of serving a database a standby may own.
    pg.stop();
    let status = a.wait_exit(30);
    assert_eq!(status.code(), Some(1), "{}", a.log());
    assert!(
        a.log().contains("lost the store's active lease"),
        "{}",
        a.log()
    );
}

/// Two replicas on https with device certificates required
/// (`[http] client_ca`, `device_certs = "required"`): the standby
/// terminates TLS, verifies the device's certificate and carries it to
/// the active server, which checks that it names the device. So a device
/// flashed with the standby's address enrolls and checks in with its own
/// certificate, and gets nothing with none or with another device's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_certificates_reach_the_active_server_through_a_standby() {
    let Some(pg) = Postgres::start("device_certificates_reach_the_active_…") else {
        return;
    };
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_for(dir.path(), "fleet", &["cert-a", "cert-b"]);
    let other = pki_for(dir.path(), "other", &["cert-a"]);
    let store = format!("[store]\nurl = \"{url}\"");
    let http = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{ca}\"\n\
         device_certs = \"required\"\nreplica_ca = \"{ca}\"",
        pki.server_cert.display(),
        pki.server_key.display(),
        ca = pki.ca.display(),
    );
    let Pair {
        a,
        b,
        ports: (port_a, port_b),
        ..
    } = two_replicas(dir.path(), [&http, &http], &store);

    let standby = format!("https://127.0.0.1:{port_b}");
    let device = |i: usize| {
        let (_, cert, key) = &pki.devices[i];
        https_client(&standby, &pki.ca, Some((cert.as_path(), key.as_path())))
    };
    let (cert_a, cert_b, no_cert) = (device(0), device(1), https_client(&standby, &pki.ca, None));

    // Without a certificate, or with another device's: refused by the
    // active server, so the certificate reached it.
    let r = enroll_through(&no_cert, &standby, "cert-a").await;
    assert_forbidden(&r, "client_certificate_required");
    let r = enroll_through(&cert_b, &standby, "cert-a").await;
    assert_forbidden(&r, "client_certificate_mismatch");
    // With its own: enrolled, through the standby.
    let (s, v) = enroll_through(&cert_a, &standby, "cert-a").await;
    assert!((200..300).contains(&s), "{s} {v}");
    let credential = v["credential"].as_str().unwrap().to_string();

    assert_credential_needs_its_certificate(&standby, &credential, [&cert_a, &no_cert, &cert_b])
        .await;
    // The standby's own handshake refuses another CA's certificate.
    let (_, cert, key) = &other.devices[0];
    let foreign = https_client(&standby, &pki.ca, Some((cert, key)));
    assert_refused_at_handshake(&foreign, &format!("{standby}/api/v1/device/desired")).await;
    // The same device directly on the active server: one fleet.
    let active = format!("https://127.0.0.1:{port_a}");
    let direct = https_client(
        &active,
        &pki.ca,
        Some((&pki.devices[0].1, &pki.devices[0].2)),
    );
    let (s, v) = desired_through(&direct, &active, &credential).await;
    assert_eq!(s, 200, "{v}");

    // Counted on both sides: what the standby forwarded, what the active
    // server refused.
    // (A check-in the standby's copy of the fleet knows is answered and
    // refused there; one it does not know yet is forwarded.)
    let text = integ::common::metrics_text(&no_cert, &standby, Some(VIEWER)).await;
    assert_eq!(sample(&text, "fleet_server_active"), Some(0), "{text}");
    let standby_refused = counter(&text, "fleet_client_cert_refusals_total");
    assert!(
        counter(&text, "fleet_standby_forwarded_total")
            + counter(&text, "fleet_standby_checkins_served_total")
            + standby_refused
            >= 6,
        "{text}"
    );
    assert_eq!(
        counter(&text, "fleet_standby_forward_failures_total"),
        0,
        "{text}"
    );
    let op_a = https_client(&active, &pki.ca, None);
    let text = integ::common::metrics_text(&op_a, &active, Some(VIEWER)).await;
    assert!(
        counter(&text, "fleet_client_cert_refusals_total") + standby_refused >= 4,
        "{text}"
    );
    // Once the standby's copy knows the device, it checks the
    // certificate itself: the same three answers, none forwarded.
    let before = counter(
        &integ::common::metrics_text(&no_cert, &standby, Some(VIEWER)).await,
        "fleet_standby_forwarded_total",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = integ::common::metrics_text(&no_cert, &standby, Some(VIEWER)).await;
        if sample(&text, "fleet_standby_fleet_devices") == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_credential_needs_its_certificate(&standby, &credential, [&cert_a, &no_cert, &cert_b])
        .await;
    let text = integ::common::metrics_text(&no_cert, &standby, Some(VIEWER)).await;
    assert_eq!(
        counter(&text, "fleet_standby_forwarded_total"),
        before,
        "{text}"
    );
    assert!(
        counter(&text, "fleet_client_cert_refusals_total") >= standby_refused + 2,
        "{text}"
    );
    b.stop();
    a.stop();
}

/// A device's MQTT connection: its client and the publishes the broker
/// acknowledged so far.
struct MqttDevice {
    id: String,
    client: rumqttc::AsyncClient,
    acked: Arc<std::sync::atomic::AtomicU64>,
}

impl MqttDevice {
    /// Logs in as `id` with `credential` (retrying while the server's
    /// password file has not reached mosquitto yet).
    async fn connect(port: u16, id: &str, credential: &str) -> MqttDevice {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut o = MqttOptions::new(id, "127.0.0.1", port);
            o.set_credentials(id, credential);
            o.set_keep_alive(Duration::from_secs(30));
            let (client, mut el) = AsyncClient::new(o, 256);
            let ok = loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        break a.code == rumqttc::ConnectReturnCode::Success;
                    }
                    Ok(_) => {}
                    Err(_) => break false,
                }
            };
            if ok {
                let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let a = acked.clone();
                tokio::spawn(async move {
                    while let Ok(e) = el.poll().await {
                        if let Event::Incoming(Packet::PubAck(_)) = e {
                            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
                return MqttDevice {
                    id: id.into(),
                    client,
                    acked,
                };
            }
            assert!(Instant::now() < deadline, "{id} cannot log in to mosquitto");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Publishes events `{wave}-0` … `{wave}-{n-1}` (QoS 1).
    async fn publish_events(&self, wave: &str, n: u64) {
        for i in 0..n {
            let e = json!({"at": 1_000_000 + i, "event": format!("{wave}-{i}")});
            self.client
                .publish(
                    format!("edgefleet/v1/{}/events", self.id),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&e).unwrap(),
                )
                .await
                .unwrap();
        }
    }
}

/// Waits until every device acknowledged `n` publishes in all.
async fn wait_acked(devices: &[MqttDevice], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while devices
        .iter()
        .any(|d| d.acked.load(std::sync::atomic::Ordering::SeqCst) < n)
    {
        assert!(
            Instant::now() < deadline,
            "the broker did not take every publish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every device publishes `n` events of `wave`; waits until the broker
/// acknowledged `total` publishes of each in all, then until the server
/// holds every event of the wave.
async fn wave(fleet: &TestFleet, devices: &[MqttDevice], wave: &str, n: u64, total: u64) {
    for d in devices {
        d.publish_events(wave, n).await;
    }
    wait_acked(devices, total).await;
    wait_events(fleet, devices, wave, n).await;
}

/// Waits until `log()` holds `what` more than `than` times.
async fn wait_count(log: impl Fn() -> String, what: &str, than: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while log().matches(what).count() <= than {
        assert!(
            Instant::now() < deadline,
            "{what:?} not more than {than} times: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the server holds events `{wave}-0` … of every device.
async fn wait_events(fleet: &TestFleet, devices: &[MqttDevice], wave: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for d in devices {
        loop {
            let v = fleet.device(&d.id).await;
            let names: Vec<&str> = v["events"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["event"].as_str()).collect())
                .unwrap_or_default();
            let missing: Vec<String> = (0..n)
                .map(|i| format!("{wave}-{i}"))
                .filter(|e| !names.contains(&e.as_str()))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: events {missing:?} never arrived: {v:#}",
                d.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `[mqtt] ingest_slots`: the standby takes its share of the shared
/// subscription (its own broker login, messages stored in the
/// database's inbox, applied by the active server). Frozen, then
/// killed with its share of a wave still unacknowledged in its broker
/// session, the active server adopts that session and nothing is lost;
/// restarted, it takes a share again. Device ids that are server logins
/// are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replicas_split_the_ingest_and_a_dead_standbys_share_is_adopted() {
    let test = "the_replicas_split_the_ingest_…";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let Some(mosquitto_bin) = mosquitto_or_skip(test) else {
        return;
    };
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), &mosquitto_bin, "dash-secret");
    let mqtt = broker.server_toml_slots("server-secret", Some("fleet"), 2);
    let shared = format!("[store]\nurl = \"{url}\"\n{mqtt}");
    let Pair {
        a,
        mut b,
        ports: (port_a, port_b),
        configs: (_, cfg_b),
    } = two_replicas(dir.path(), ["", ""], &shared);
    b.wait_log("subscribed to the device topics", 30);
    let fleet = TestFleet::attach(port_a);
    let http = reqwest::Client::new();

    // The server's broker logins are not device ids.
    for id in ["fleet-server", "fleet-server-1", "fleet-server-7"] {
        let (status, body) = enroll_through(&http, &fleet.url, id).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("reserved_device_id")),
            "{id}: {body}"
        );
    }
    let mut devices = Vec::new();
    for i in 0..8 {
        let id = format!("cam-{i}");
        let (status, body) = enroll_through(&http, &fleet.url, &id).await;
        assert_eq!(status, 201, "{body}");
        let credential = body["credential"].as_str().unwrap().to_string();
        devices.push(MqttDevice::connect(broker.port, &id, &credential).await);
    }

    // Wave 1: split between the two servers, all applied.
    wave(&fleet, &devices, "w1", 5, 5).await;
    let mb = TestFleet::attach(port_b).metrics(VIEWER).await;
    let stored = counter(&mb, "fleet_standby_mqtt_messages_stored_total");
    assert!(stored > 0, "the standby took no share: {mb}");
    assert!(stored < 40, "the standby took everything: {mb}");
    let ma = fleet.metrics(VIEWER).await;
    assert!(
        counter(&ma, "fleet_mqtt_inbox_applied_total") >= stored,
        "{ma}\n{mb}"
    );

    // The standby's database session holding its slot breaks: it stops
    // taking messages (the slot may be adopted at once), the active
    // server adopts the slot, the standby claims one again, and the next
    // wave arrives whole.
    terminate_one(
        &url,
        "pg_locks WHERE locktype = 'advisory' AND classid = 1701213036 \
         AND objid = 1 AND objsubid = 2",
        "the standby holds slot 1",
    );
    b.wait_log("lost its ingest slot's lock", 30);
    wait_adoptions(&fleet, 1).await;
    // (Slot 2 while the active server adopts slot 1, or slot 1 after.)
    wait_count(|| b.log(), "taking a share of the device messages", 1).await;
    wait_count(|| b.log(), "subscribed to the device topics", 1).await;
    wave(&fleet, &devices, "w1b", 3, 8).await;
    let mb2 = TestFleet::attach(port_b).metrics(VIEWER).await;
    assert!(
        counter(&mb2, "fleet_standby_mqtt_messages_stored_total") > stored,
        "the standby takes a share again: {mb2}"
    );

    // Wave 2 while the standby is frozen: its share waits, unacknowledged,
    // in its broker session. Killed, its slot is free: the active server
    // adopts the session and applies that share.
    let before = counter(
        &fleet.metrics(VIEWER).await,
        "fleet_mqtt_slot_adopted_messages_total",
    );
    let st = std::process::Command::new("kill")
        .args(["-STOP", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    for d in &devices {
        d.publish_events("w2", 5).await;
    }
    wait_acked(&devices, 13).await;
    b.kill();
    wait_events(&fleet, &devices, "w2", 5).await;
    // The adoption ends a second after its last message.
    let ma = wait_adoptions(&fleet, 2).await;
    assert!(
        counter(&ma, "fleet_mqtt_slot_adopted_messages_total") > before,
        "the frozen standby's share came from its adopted session: {ma}"
    );
    assert!(a.log().contains("adopted a gone standby's broker session"));

    // The standby comes back and takes a share again (the slot was
    // freed by the adoption); wave 3 arrives whole.
    // (Its log file goes on: count what the new process adds.)
    let earlier = std::fs::read_to_string(cfg_b.with_extension("log"))
        .unwrap()
        .matches("subscribed to the device topics")
        .count();
    let mut b = ServerProc::start(&cfg_b, port_b);
    b.wait_log("standby: another fleet-server is active", 30);
    wait_count(|| b.log(), "subscribed to the device topics", earlier).await;
    wave(&fleet, &devices, "w3", 5, 18).await;
    let mb = TestFleet::attach(port_b).metrics(VIEWER).await;
    assert!(
        counter(&mb, "fleet_standby_mqtt_messages_stored_total") > 0,
        "{mb}"
    );
    // A clean stop of the standby leaves its slot for adoption too.
    b.stop();
    wait_adoptions(&fleet, 3).await;
    a.stop();
}

/// Ends the one database session `from` (a `FROM …` clause over rows
/// with a `pid`) selects, with `psql` on `url`.
fn terminate_one(url: &str, from: &str, what: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-tAc"])
        .arg(format!(
            "SELECT count(pg_terminate_backend(pid)) FROM {from}"
        ))
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the active server adopted `n` slot sessions; its metrics.
async fn wait_adoptions(fleet: &TestFleet, n: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = fleet.metrics(VIEWER).await;
        if counter(&m, "fleet_mqtt_slot_adoptions_total") >= n {
            return m;
        }
        assert!(Instant::now() < deadline, "{n} adoptions expected: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A check-in at `base` with `credential` (and `If-None-Match`): status,
/// ETag and body.
async fn check_in(
    http: &reqwest::Client,
    base: &str,
    credential: &str,
    etag: Option<&str>,
) -> (u16, Option<String>, Vec<u8>) {
    let mut r = http
        .get(format!("{base}/api/v1/device/desired"))
        .bearer_auth(credential)
        .timeout(Duration::from_secs(10));
    if let Some(e) = etag {
        r = r.header("if-none-match", e);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    (status, etag, r.bytes().await.unwrap().to_vec())
}

/// Waits until the standby answers `credential`'s check-in with the
/// active server's document (the same bytes and ETag) and `done` holds of
/// it; its ETag and the document.
async fn wait_same(
    http: &reqwest::Client,
    (active, standby): (&str, &str),
    credential: &str,
    done: impl Fn(&Value) -> bool,
) -> (String, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = check_in(http, active, credential, None).await;
        let b = check_in(http, standby, credential, None).await;
        let doc: Value = serde_json::from_slice(&a.2).unwrap_or(Value::Null);
        if a.0 == 200 && a == b && done(&doc) {
            return (a.1.unwrap(), doc);
        }
        assert!(
            Instant::now() < deadline,
            "the standby answers {} {:?} {}, the active server {} {:?} {}",
            b.0,
            b.1,
            String::from_utf8_lossy(&b.2),
            a.0,
            a.1,
            String::from_utf8_lossy(&a.2)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `signal` (`-STOP`, `-CONT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let st = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A standby answers device check-ins itself, from its own copy of the
/// fleet that the store's change feed keeps current: the active server's
/// document and ETag (and its 304), after a rollout, a window change, a
/// revocation and a new device; with the active server frozen; and again
/// after the feed's database session is killed (forwarded meanwhile,
/// then the copy is loaded whole again). With the active server frozen it
/// also sends the devices their bundles from the bucket (whole, ranged,
/// 304) and takes their reports into the inbox, which the active server
/// applies once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_answers_check_ins_reports_and_downloads_itself() {
    let test = "a_standby_answers_check_ins_…";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let Some(s3) = S3::start(test, "fleet") else {
        return;
    };
    let url = pg.database("fleet");
    let dir = tempfile::tempdir().unwrap();
    let store = format!(
        "[store]\nurl = \"{url}\"\n{}",
        s3.bundles_toml("bundles", false)
    );
    let Pair {
        a,
        mut b,
        ports: (port_a, port_b),
        ..
    } = two_replicas(dir.path(), ["", "standby_ready = \"serving\"\n"], &store);
    b.wait_log("answering device check-ins from its copy of the fleet", 30);
    let fleet = TestFleet::attach(port_a);
    let standby_fleet = TestFleet::attach(port_b);
    let http = reqwest::Client::new();
    let standby = standby_fleet.url.clone();
    // `standby_ready = "serving"`: a balancer may send it devices.
    let r = http.get(format!("{standby}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a serving standby is ready");
    assert_eq!(r.text().await.unwrap(), "standby\n");
    let both = (fleet.url.as_str(), standby.as_str());

    // Three devices enrolled on the active server: the standby's copy
    // learns them and answers their check-ins.
    let mut creds = Vec::new();
    for i in 0..3 {
        let (s, v) = enroll_through(&http, &fleet.url, &format!("cam-{i}")).await;
        assert_eq!(s, 201, "{v}");
        creds.push(v["credential"].as_str().unwrap().to_string());
    }
    for c in &creds {
        wait_same(&http, both, c, |d| d["bundle"].is_null()).await;
    }
    let m = standby_fleet.metrics(VIEWER).await;
    assert_eq!(sample(&m, "fleet_standby_fleet_devices"), Some(3), "{m}");
    assert!(
        counter(&m, "fleet_standby_checkins_served_total") >= 3,
        "{m}"
    );
    let forwarded = counter(&m, "fleet_standby_forwarded_total");

    // A rollout gives them a bundle: the copy follows, 304 included.
    let v1_bytes = Pack::new(Model::Cls, 1).bytes();
    let v1 = fleet.push(v1_bytes.clone()).await;
    let v2 = fleet.push(Pack::new(Model::Cls, 2).bytes()).await;
    fleet
        .create_rollout(json!({
            "bundle": v1, "selector": {},
            "stages": [{"percent": 100, "bake_minutes": 0}], "gates": {},
        }))
        .await;
    let mut bundle_ref = Value::Null;
    for c in &creds {
        let (etag, doc) = wait_same(&http, both, c, |d| d["bundle"]["id"] == v1.as_str()).await;
        let (s, e, _) = check_in(&http, &standby, c, Some(&etag)).await;
        assert_eq!((s, e.as_deref()), (304, Some(etag.as_str())));
        bundle_ref = doc["bundle"].clone();
    }

    // A maintenance window (a fleet-wide change) reaches cam-0's document.
    let r = fleet
        .put_window(
            "device:cam-0",
            json!({"windows": ["daily 01:00-02:00"], "time_zone": "UTC"}),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    wait_same(&http, both, &creds[0], |d| !d["window"].is_null()).await;

    // With the active server frozen, the standby still answers.
    signal(a.pid(), "-STOP");
    for c in &creds {
        let (s, _, body) = check_in(&http, &standby, c, None).await;
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((s, doc["bundle"]["id"].as_str()), (200, Some(v1.as_str())));
    }
    // Its bundle, from the bucket: whole, a range, and 304 for its ETag.
    let download = |range: Option<&str>, etag: Option<&str>| {
        let mut r = http
            .get(format!("{standby}/api/v1/bundles/{v1}/download"))
            .bearer_auth(&creds[0])
            .timeout(Duration::from_secs(10));
        if let Some(range) = range {
            r = r.header("range", range);
        }
        if let Some(e) = etag {
            r = r.header("if-none-match", e);
        }
        r.send()
    };
    let tag = format!("\"{v1}\"");
    let r = download(None, None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), tag);
    assert!(r.bytes().await.unwrap() == v1_bytes, "the bundle's bytes");
    let r = download(Some("bytes=100-199"), None).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes 100-199/{}", v1_bytes.len())
    );
    assert!(r.bytes().await.unwrap() == v1_bytes[100..200]);
    let r = download(None, Some(&tag)).await.unwrap();
    assert_eq!(r.status(), 304);
    // A report, durable in the inbox before the 204; a malformed one is
    // refused as the active server would.
    let report = |body: Vec<u8>| {
        http.post(format!("{standby}/api/v1/device/report"))
            .bearer_auth(&creds[0])
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(10))
            .send()
    };
    let sent = json!({
        "active": bundle_ref, "staged": null, "last_failed": null,
        "state": "committed", "reason": "reported to the standby",
        "agent_version": "0.9.9-standby",
    });
    let r = report(serde_json::to_vec(&sent).unwrap()).await.unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let r = report(b"{\"state\": 5}".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "malformed_json", "{v}");
    signal(a.pid(), "-CONT");
    let m = standby_fleet.metrics(VIEWER).await;
    assert_eq!(
        counter(&m, "fleet_standby_forwarded_total"),
        forwarded,
        "every call of a known device was answered, none forwarded: {m}"
    );
    assert_eq!(counter(&m, "fleet_standby_downloads_total"), 2, "{m}");
    assert_eq!(counter(&m, "fleet_standby_reports_stored_total"), 1, "{m}");
    // Running again, the active server applies the report from the inbox.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = fleet.device("cam-0").await;
        if d["agent_version"] == "0.9.9-standby" {
            assert_eq!(d["active"]["id"], v1.as_str(), "{d:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the report was not applied: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counted once the inbox row is gone (just after the device shows it).
    loop {
        let m = fleet.metrics(VIEWER).await;
        match counter(&m, "fleet_standby_reports_applied_total") {
            0 => assert!(Instant::now() < deadline, "{m}"),
            n => {
                assert_eq!(n, 1, "{m}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A bundle the device's desired state does not name: the active
    // server decides (and refuses).
    let r = http
        .get(format!("{standby}/api/v1/bundles/{v2}/download"))
        .bearer_auth(&creds[0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let m = standby_fleet.metrics(VIEWER).await;
    assert_eq!(
        counter(&m, "fleet_standby_forwarded_total"),
        forwarded + 1,
        "{m}"
    );

    // Revoked on the active server: refused by the standby too.
    let r = http
        .post(format!("{}/api/v1/devices/cam-2/revoke", fleet.url))
        .bearer_auth(integ::fleet::ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while check_in(&http, &standby, &creds[2], None).await.0 != 401 {
        assert!(Instant::now() < deadline, "the standby still serves cam-2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The feed's database session dies: the standby says so, forwards
    // check-ins meanwhile, then loads its copy whole again.
    terminate_one(
        &url,
        "pg_stat_activity WHERE application_name = 'fleet-server change feed'",
        "one change feed session",
    );
    b.wait_log("the store's change feed broke", 30);
    wait_count(
        || b.log(),
        "answering device check-ins from its copy of the fleet",
        1,
    )
    .await;
    // Current again: a device enrolled now is served from the copy.
    let (s, v) = enroll_through(&http, &fleet.url, "cam-3").await;
    assert_eq!(s, 201, "{v}");
    let cam3 = v["credential"].as_str().unwrap().to_string();
    wait_same(&http, both, &cam3, |_| true).await;
    wait_same(&http, both, &creds[0], |d| !d["window"].is_null()).await;
    let m = standby_fleet.metrics(VIEWER).await;
    assert!(counter(&m, "fleet_standby_feed_failures_total") >= 1, "{m}");
    assert!(counter(&m, "fleet_standby_fleet_loads_total") >= 2, "{m}");
    assert!(
        counter(&m, "fleet_standby_fleet_changes_applied_total") >= 3,
        "{m}"
    );
    assert_eq!(sample(&m, "fleet_standby_fleet_devices"), Some(4), "{m}");
    b.stop();
    a.stop();
}

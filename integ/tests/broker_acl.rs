//! Device isolation on the broker, for the embedded broker and for
//! Debian's mosquitto run with the published configuration
//! (docs/brokers/mosquitto.conf and mosquitto.acl, the password file kept
//! by the fleet server): a device cannot publish under another id,
//! subscribe to the whole fleet or to another's commands, or take over
//! another's session; a dashboard login cannot publish. A positive control
//! in each case shows the same client can do what it may.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_server::config::{MqttConfig, Role, ServerConfig, TokenConfig};
use fleet_sim::mqtt::Conn;
use integ::bundles::{Model, Pack};
use integ::common::{counter, metrics_text, mosquitto_bin};
use integ::mosquitto::Mosquitto;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use integ::fleet::{ADMIN, ENROLL, OPERATOR, TestFleet, VIEWER};
const SERVER_PASSWORD: &str = "server-secret";
const DASH_PASSWORD: &str = "dash-secret";

fn telemetry(p95: f64) -> Vec<u8> {
    serde_json::to_vec(&edgefleet_wire::telemetry::Telemetry {
        at: 1,
        interval_secs: 10,
        seq: 1,
        inferences: 100,
        latency_ms: Some(edgefleet_wire::telemetry::Latency {
            p50: p95 / 2.0,
            p95,
            p99: p95,
        }),
        ..Default::default()
    })
    .unwrap()
}

struct Fleet {
    url: String,
    mqtt: String,
    http: reqwest::Client,
    stop: CancellationToken,
    _mosquitto: Option<Mosquitto>,
    /// What a dashboard logs in with.
    dash: (String, String),
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The shared test configuration (integ::fleet), its files in `dir`.
fn base_config(dir: &Path) -> ServerConfig {
    TestFleet::config(dir)
}

async fn start(
    cfg: ServerConfig,
    mosquitto: Option<Mosquitto>,
    mqtt: String,
    dash: (&str, &str),
) -> Fleet {
    let stop = CancellationToken::new();
    let (running, serve) = fleet_server::server::start(cfg, stop.clone())
        .await
        .unwrap();
    tokio::spawn(serve);
    Fleet {
        url: format!("http://{}", running.addr),
        mqtt: running
            .mqtt_url
            .filter(|_| mosquitto.is_none())
            .unwrap_or(mqtt),
        http: edge_agent::tls::default_client(),
        stop,
        _mosquitto: mosquitto,
        dash: (dash.0.into(), dash.1.into()),
    }
}

async fn embedded(dir: &Path) -> Fleet {
    let mut cfg = base_config(dir);
    cfg.mqtt = Some(MqttConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..MqttConfig::default()
    });
    start(cfg, None, String::new(), ("grafana", VIEWER)).await
}

/// mosquitto with the published config; the fleet server keeps its
/// password file and makes it reload.
async fn mosquitto(dir: &Path, bin: &Path) -> Fleet {
    let broker = Mosquitto::start(dir, bin, DASH_PASSWORD);
    let mut cfg = base_config(dir);
    cfg.mqtt = Some(broker.server_config(SERVER_PASSWORD));
    let url = broker.url();
    start(cfg, Some(broker), url, ("dashboard", DASH_PASSWORD)).await
}

impl Fleet {
    async fn enroll(&self, id: &str) -> String {
        let r = self
            .http
            .post(format!("{}/api/v1/devices/enroll", self.url))
            .json(
                &json!({"enrollment_token": ENROLL, "device_id": id, "tags": {"board": "rpi4"},
                          "arch": "aarch64", "agent_version": "0.1.0"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["credential"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn push(&self, bytes: Vec<u8>) -> String {
        let r = self
            .http
            .post(format!("{}/api/v1/bundles", self.url))
            .bearer_auth(OPERATOR)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn rollout(&self, bundle: &str) {
        let r = self
            .http
            .post(format!("{}/api/v1/rollouts", self.url))
            .bearer_auth(OPERATOR)
            .json(&json!({"bundle": bundle, "stages": [{"percent": 100, "bake_minutes": 0}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    async fn device(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/api/v1/devices/{id}", self.url))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn addr(&self) -> String {
        self.mqtt.trim_start_matches("mqtt://").to_string()
    }

    /// Connects, retrying while an external broker has not reloaded the
    /// password file yet.
    async fn connect(&self, client: &str, user: &str, pass: &str) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match Conn::connect(&self.addr(), client, user, pass, 30, None).await {
                Ok(c) => return c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{user} cannot log in: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// What a subscriber saw within `wait`.
async fn drain(c: &mut Conn, wait: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline, c.poll(wait)).await {
        if let fleet_sim::mqtt::Incoming::Message(t, p) = m {
            got.push((t, p));
        }
    }
    got
}

async fn isolation(f: &Fleet) {
    let a = f.enroll("pi-a").await;
    let b = f.enroll("pi-b").await;
    let mut dash = f.connect("grafana-1", &f.dash.0, &f.dash.1).await;
    assert!(
        dash.subscribe("edgefleet/v1/#").await.unwrap(),
        "dashboards read the fleet"
    );
    let mut pb = f.connect("pi-b", "pi-b", &b).await;
    assert!(pb.subscribe("edgefleet/v1/pi-b/cmd").await.unwrap());

    // Positive control: pi-a's own telemetry is stored and seen.
    let mut pa = f.connect("pi-a", "pi-a", &a).await;
    pa.publish(
        "edgefleet/v1/pi-a/telemetry",
        telemetry(7.0),
        false,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.device("pi-a").await["telemetry"]["latency_ms"]["p95"] != 7.0 {
        assert!(
            Instant::now() < deadline,
            "pi-a's own telemetry never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = drain(&mut dash, Duration::from_secs(1)).await;
    assert!(
        seen.iter().any(|(t, _)| t == "edgefleet/v1/pi-a/telemetry"),
        "{seen:?}"
    );

    // pi-a may not read the fleet or pi-b's commands: the embedded broker
    // refuses the subscriptions, mosquitto grants them but delivers
    // nothing pi-a may not read. Either way nothing of pi-b's arrives.
    let mut spy = f.connect("pi-a", "pi-a", &a).await;
    let wide = spy.subscribe("edgefleet/v1/#").await.unwrap_or(false);
    let other = spy
        .subscribe("edgefleet/v1/pi-b/cmd")
        .await
        .unwrap_or(false);
    if f._mosquitto.is_none() {
        assert!(!wide && !other, "the embedded broker refuses both");
    }
    // Traffic for pi-b: its telemetry, and a command (a rollout's notice).
    pb.publish(
        "edgefleet/v1/pi-b/telemetry",
        telemetry(8.0),
        false,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let bundle = f.push(Pack::new(Model::MultiIo, 1).bytes()).await;
    f.rollout(&bundle).await;
    let to_b = drain(&mut pb, Duration::from_secs(3)).await;
    assert!(
        to_b.iter().any(|(t, _)| t == "edgefleet/v1/pi-b/cmd"),
        "pi-b gets its own command: {to_b:?}"
    );
    let spied = drain(&mut spy, Duration::from_secs(1)).await;
    assert!(
        !spied
            .iter()
            .any(|(t, _)| t.starts_with("edgefleet/v1/pi-b/")),
        "pi-a read pi-b's traffic: {spied:?}"
    );
    // pi-a may not publish as pi-b: a slow p95 would pause a rollout on pi-b.
    let mut pa = f.connect("pi-a", "pi-a", &a).await;
    let _ = pa
        .publish(
            "edgefleet/v1/pi-b/telemetry",
            telemetry(5000.0),
            false,
            Duration::from_secs(2),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        f.device("pi-b").await["telemetry"]["latency_ms"]["p95"],
        8.0,
        "a spoofed record reached pi-b's view"
    );
    let seen = drain(&mut dash, Duration::from_secs(1)).await;
    assert!(
        !seen.iter().any(|(_, p)| *p == telemetry(5000.0)),
        "a spoofed record reached subscribers: {seen:?}"
    );

    // pi-a may not take over pi-b's session: pi-b stays connected.
    let _ = Conn::connect(&f.addr(), "pi-b", "pi-a", &a, 30, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pb.publish(
        "edgefleet/v1/pi-b/telemetry",
        telemetry(9.0),
        false,
        Duration::from_secs(10),
    )
    .await
    .expect("pi-b lost its session to pi-a");

    // A dashboard may not publish: neither a device's telemetry nor a
    // command to a device.
    let mut pa = f.connect("pi-a", "pi-a", &a).await;
    assert!(pa.subscribe("edgefleet/v1/pi-a/cmd").await.unwrap());
    let _ = dash
        .publish(
            "edgefleet/v1/pi-a/telemetry",
            telemetry(4000.0),
            false,
            Duration::from_secs(2),
        )
        .await;
    let mut dash = f.connect("grafana-1", &f.dash.0, &f.dash.1).await;
    let _ = dash
        .publish(
            "edgefleet/v1/pi-a/cmd",
            b"{\"kind\":\"report_now\",\"at\":1}".to_vec(),
            false,
            Duration::from_secs(2),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        f.device("pi-a").await["telemetry"]["latency_ms"]["p95"],
        7.0
    );
    let got = drain(&mut pa, Duration::from_secs(1)).await;
    assert!(
        got.is_empty(),
        "a dashboard's command reached the device: {got:?}"
    );
    pb.publish(
        "edgefleet/v1/pi-b/telemetry",
        telemetry(9.0),
        false,
        Duration::from_secs(10),
    )
    .await
    .expect("pi-b's session is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_isolates_devices_and_keeps_dashboards_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let f = embedded(dir.path()).await;
    isolation(&f).await;
    // The embedded broker also refuses the attempts outright.
    let a = f.enroll("pi-c").await;
    let err = Conn::connect(&f.addr(), "pi-b", "pi-c", &a, 30, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("BadClientId"), "{err}");
    for id in ["fleet-server", "pi-a"] {
        let err = Conn::connect(&f.addr(), id, "x", VIEWER, 30, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("BadClientId"), "{id}: {err}");
    }
    let metrics = metrics_text(&f.http, &f.url, Some(OPERATOR)).await;
    assert!(
        counter(&metrics, "fleet_mqtt_publishes_denied_total") >= 2,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "fleet_mqtt_subscribes_denied_total"),
        2,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_published_config_isolates_devices_too() {
    let Some(bin) = mosquitto_bin() else {
        assert!(
            std::env::var("EDGEFLEET_REQUIRE_MOSQUITTO").is_err(),
            "mosquitto is required here but not installed"
        );
        eprintln!("SKIPPED: mosquitto is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = mosquitto(dir.path(), &bin).await;
    isolation(&f).await;
    // Revoked: the device's login is gone from the password file.
    let a = f.enroll("pi-r").await;
    let _c = f.connect("pi-r", "pi-r", &a).await;
    let r = f
        .http
        .post(format!("{}/api/v1/devices/pi-r/revoke", f.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Conn::connect(&f.addr(), "pi-r", "pi-r", &a, 30, None)
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "a revoked device still logs in");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// EMQX/VerneMQ ask the server over HTTP (docs/brokers.md): the same
/// answers as the embedded broker, and only a `broker` token may ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_auth_and_acl_hooks_give_external_brokers_the_same_answers() {
    const BROKER: &str = "broker-token";
    let fleet = TestFleet::start_with(|cfg, _| {
        cfg.auth.tokens.push(TokenConfig {
            name: "emqx".into(),
            role: Role::Broker,
            token: Some(BROKER.into()),
            token_sha256: None,
        });
    })
    .await;
    let enroll = |id: &str| {
        json!({"enrollment_token": ENROLL, "device_id": id, "tags": {"board": "rpi4"},
               "arch": "aarch64", "agent_version": "0.1.0"})
    };
    let mut creds = Vec::new();
    for id in ["dev-a", "dev-b"] {
        let r = fleet
            .req(reqwest::Method::POST, "/api/v1/devices/enroll", None)
            .json(&enroll(id))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "enroll {id}: {}", r.status());
        let v: Value = r.json().await.unwrap();
        creds.push(v["credential"].as_str().unwrap().to_string());
    }
    let ask = |path: &'static str, token: &'static str, body: Value| {
        let req = fleet
            .req(reqwest::Method::POST, path, Some(token))
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, v["result"].as_str().unwrap_or("").to_string())
        }
    };
    let auth = |clientid: &str, username: &str, password: &str| json!({"clientid": clientid, "username": username, "password": password});
    let acl = |clientid: &str, topic: &str, action: &str| json!({"clientid": clientid, "username": clientid, "topic": topic, "action": action});
    let a = "/api/v1/mqtt/auth";
    let c = "/api/v1/mqtt/acl";
    // Logins: a device with its own credential; not with another's, not
    // under another's client id; a dashboard with a viewer token.
    assert_eq!(
        ask(a, BROKER, auth("dev-a", "dev-a", &creds[0])).await,
        (200, "allow".into())
    );
    assert_eq!(
        ask(a, BROKER, auth("dev-a", "dev-a", &creds[1])).await,
        (200, "deny".into())
    );
    assert_eq!(
        ask(a, BROKER, auth("dev-b", "dev-a", &creds[0])).await,
        (200, "deny".into())
    );
    assert_eq!(
        ask(a, BROKER, auth("grafana", "grafana", VIEWER)).await,
        (200, "allow".into())
    );
    assert_eq!(
        ask(a, BROKER, auth("grafana", "grafana", "wrong")).await,
        (200, "deny".into())
    );
    // Topics: own telemetry yes, another's no; own commands yes, the
    // fleet no.
    let t = |id: &str, kind: &str| format!("edgefleet/v1/{id}/{kind}");
    assert_eq!(
        ask(c, BROKER, acl("dev-a", &t("dev-a", "telemetry"), "publish")).await,
        (200, "allow".into())
    );
    assert_eq!(
        ask(c, BROKER, acl("dev-a", &t("dev-b", "telemetry"), "publish")).await,
        (200, "deny".into())
    );
    assert_eq!(
        ask(c, BROKER, acl("dev-a", &t("dev-a", "cmd"), "subscribe")).await,
        (200, "allow".into())
    );
    assert_eq!(
        ask(c, BROKER, acl("dev-a", "edgefleet/v1/#", "subscribe")).await,
        (200, "deny".into())
    );
    assert_eq!(
        ask(c, BROKER, acl("dev-a", &t("dev-b", "cmd"), "subscribe")).await,
        (200, "deny".into())
    );
    // A dashboard reads and never publishes.
    assert_eq!(
        ask(c, BROKER, acl("grafana", "edgefleet/v1/#", "subscribe")).await,
        (200, "allow".into())
    );
    assert_eq!(
        ask(
            c,
            BROKER,
            acl("grafana", &t("dev-a", "telemetry"), "publish")
        )
        .await,
        (200, "deny".into())
    );
    // Only the broker's token may ask; an operator token may not.
    let (status, _) = ask(a, OPERATOR, auth("dev-a", "dev-a", &creds[0])).await;
    assert_eq!(status, 403);
    let (status, _) = ask(c, ADMIN, acl("dev-a", &t("dev-a", "telemetry"), "publish")).await;
    assert_eq!(status, 403);
}

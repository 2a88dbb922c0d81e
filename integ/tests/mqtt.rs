//! MQTT end to end, against two real brokers: the fleet server's embedded
//! one (a real `fleet-server` process, restarted for outages) and Debian's
//! mosquitto on an ephemeral port (when installed; CI installs it and sets
//! `EDGEFLEET_REQUIRE_MOSQUITTO=1`).
//!
//! - state (retained, Last Will), telemetry and events reach a subscriber;
//! - the server ingests them and its "update available" notice makes the
//!   agent poll at once;
//! - across a broker outage during live inference every event arrives at
//!   least once and in order, telemetry within the outbox cap is complete,
//!   and over the cap the missing records match the drop counter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::config::AgentConfig;
use edgefleet_wire::telemetry::{DeviceEvent, DeviceState, Telemetry, decode_telemetry};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use common::{free_port, metrics_text, mosquitto_bin, repo, write_key};
use integ::agent::InProcAgent as Agent;
use integ::bundles::{Model, Pack};
use integ::common;

use integ::fleet::{ENROLL, OPERATOR, ServerProc, TestFleet};

fn cls_bundle(minor: u64) -> Vec<u8> {
    Pack {
        sequence: minor,
        ..Pack::new(Model::Cls, minor)
    }
    .bytes()
}

/// A broker the test can stop and start on a fixed port.
enum Broker {
    /// A `fleet-server` process with its embedded broker (its log in
    /// `fleet-server.log` beside the config, shown if it fails to start).
    Embedded {
        config: PathBuf,
        server: Option<ServerProc>,
    },
    Mosquitto {
        bin: PathBuf,
        port: u16,
        child: Option<Child>,
    },
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker on {port} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Broker {
    fn embedded(dir: &Path, port: u16) -> Broker {
        let key = write_key(dir);
        let config = dir.join("fleet-server.toml");
        std::fs::write(
            &config,
            format!(
                r#"data_dir = "{data}"
[http]
listen = "127.0.0.1:{http}"
[trust]
keys = ["{key}"]
[auth]
enrollment_tokens = ["{ENROLL}"]
[[auth.tokens]]
name = "ops"
role = "admin"
token = "{OPERATOR}"
[mqtt]
listen = "127.0.0.1:{port}"
"#,
                data = dir.join("server-data").display(),
                key = key.display(),
                http = free_port(),
            ),
        )
        .unwrap();
        Broker::Embedded {
            config,
            server: None,
        }
    }

    /// The fleet server's URL (embedded broker only).
    fn http_url(&self) -> Option<String> {
        match self {
            Broker::Embedded { config, .. } => {
                let text = std::fs::read_to_string(config).unwrap();
                text.lines()
                    .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
                    .map(|p| format!("http://127.0.0.1:{}", p.trim_end_matches('"')))
            }
            Broker::Mosquitto { .. } => None,
        }
    }

    fn port(&self) -> u16 {
        match self {
            Broker::Embedded { config, .. } => {
                let text = std::fs::read_to_string(config).unwrap();
                text.lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
                    .and_then(|p| p.trim_end_matches('"').parse().ok())
                    .unwrap()
            }
            Broker::Mosquitto { port, .. } => *port,
        }
    }

    fn start(&mut self) {
        let port = self.port();
        match self {
            Broker::Embedded { config, server } => {
                // Waits for the broker's port; panics with the server's
                // log if it exits or does not listen in time.
                *server = Some(ServerProc::start(config, port));
            }
            Broker::Mosquitto { bin, port, child } => {
                *child = Some(
                    Command::new(&*bin)
                        .args(["-p", &port.to_string()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
                wait_port(*port);
            }
        }
    }

    fn stop(&mut self) {
        match self {
            Broker::Embedded { server, .. } => {
                if let Some(s) = server.take() {
                    s.kill();
                }
            }
            Broker::Mosquitto { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The agent's network path to the broker. The test closes it with the
/// outage and opens it again only once its own subscriber is back, so the
/// observer cannot miss the replay.
struct Link {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    async fn start(upstream: u16) -> Link {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let o2 = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = l.accept().await else {
                    return;
                };
                if !o2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                tokio::spawn(async move {
                    if let Ok(mut up) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Link { port, open }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Everything a subscriber saw, in arrival order.
#[derive(Default)]
struct Seen {
    messages: Vec<(String, Vec<u8>, bool)>,
    subacks: u64,
}

/// A dashboard-like subscriber (`edgefleet/v1/#`) that reconnects.
fn subscribe(port: u16, id: &str) -> (Arc<Mutex<Seen>>, CancellationToken) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = CancellationToken::new();
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_credentials("dashboard", OPERATOR);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 64);
    let (s2, stop2) = (seen.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                e = el.poll() => e,
                () = stop2.cancelled() => return,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = client.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe("edgefleet/v1/#", QoS::AtLeastOnce).await;
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => s2.lock().unwrap().subacks += 1,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    s2.lock().unwrap().messages.push((
                        p.topic.clone(),
                        p.payload.to_vec(),
                        p.retain,
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    (seen, stop)
}

fn agent_config(dir: &Path, id: &str, mqtt_port: u16) -> AgentConfig {
    let mut c = AgentConfig {
        device_id: Some(id.into()),
        data_dir: dir.join("agent"),
        ..AgentConfig::default()
    };
    c.tags.insert("board".into(), "rpi4".into());
    c.trust.keys = vec![write_key(dir)];
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.engine.queue = 64;
    c.update.watch_secs = 1;
    // Tests run in parallel on 2 cores: tolerate scheduling noise.
    c.update.max_p95_ratio = 3.0;
    c.update.p95_slack_ms = 20.0;
    c.mqtt.url = Some(format!("mqtt://127.0.0.1:{mqtt_port}"));
    c.mqtt.telemetry_interval_secs = 1;
    c.mqtt.reconnect_min_ms = 200;
    c.mqtt.reconnect_max_ms = 1000;
    c.mqtt.keep_alive_secs = 5;
    c
}

/// Keeps one client inferring until stopped.
fn live_load(url: &str) -> (CancellationToken, tokio::task::JoinHandle<u64>) {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let url = format!("{url}/v1/infer");
    let body = std::fs::read(repo("models/cls/golden/in_0.npz")).unwrap();
    let h = tokio::spawn(async move {
        let http = edge_agent::tls::default_client();
        let mut failed = 0;
        while !s.is_cancelled() {
            let r = http
                .post(&url)
                .header("content-type", "application/x-npz")
                .body(body.clone())
                .send()
                .await;
            if !matches!(r, Ok(ref r) if r.status() == 200) {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        failed
    });
    (stop, h)
}

fn events_of(seen: &Seen, device: &str) -> Vec<(String, String)> {
    let topic = format!("edgefleet/v1/{device}/events");
    seen.messages
        .iter()
        .filter(|(t, _, _)| *t == topic)
        .map(|(_, p, _)| {
            let e: DeviceEvent = serde_json::from_slice(p).unwrap();
            (e.event, e.bundle.map(|b| b.version).unwrap_or_default())
        })
        .collect()
}

fn telemetry_of(seen: &Seen, device: &str) -> Vec<Telemetry> {
    let topic = format!("edgefleet/v1/{device}/telemetry");
    seen.messages
        .iter()
        .filter(|(t, _, _)| *t == topic)
        .map(|(_, p, _)| decode_telemetry(p).unwrap())
        .collect()
}

/// First occurrences, in order (duplicates from replays removed).
fn first_occurrences<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut seen = BTreeSet::new();
    v.iter()
        .filter(|x| seen.insert((*x).clone()))
        .cloned()
        .collect()
}

const INSTALL_EVENTS: [&str; 6] = [
    "download_started",
    "downloaded",
    "verified",
    "self_test_passed",
    "activated",
    "committed",
];

/// The outage scenario on one broker. `cap`: outbox bytes.
async fn outage(mut broker: Broker, dir: &Path, cap: u64, device: &str) {
    broker.start();
    let port = broker.port();
    let (seen, sub_stop) = subscribe(port, &format!("sub-{device}"));
    let link = Link::start(port).await;
    let mut cfg = agent_config(dir, device, link.port);
    match broker.http_url() {
        // The embedded broker takes devices only as themselves: enroll,
        // and log in with the device's own credential.
        Some(url) => {
            cfg.server.url = Some(url);
            cfg.server.enrollment_token = Some(ENROLL.into());
            cfg.server.poll_interval_secs = 1;
            cfg.server.report_interval_secs = 1;
        }
        // mosquitto here runs without authentication.
        None => {
            cfg.mqtt.username = Some("ops".into());
            cfg.mqtt.password = Some(OPERATOR.into());
        }
    }
    cfg.mqtt.outbox_max_bytes = cap;
    let agent = Agent::start(cfg).await;
    agent.install(cls_bundle(1), "1.1.0").await;
    let (load_stop, load) = live_load(&agent.url);

    // Outage: the agent keeps serving, installs v2, and queues telemetry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    link.set_open(false);
    broker.stop();
    agent.install(cls_bundle(2), "1.2.0").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let subacks = seen.lock().unwrap().subacks;
    broker.start();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().subacks == subacks {
        assert!(
            Instant::now() < deadline,
            "the test subscriber did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    link.set_open(true);

    // Wait for the outbox to drain, for one more telemetry record (so the
    // last drops sit before a delivered record), and for that to drain too.
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.metric("edge_agent_outbox_records").await > 0 {
            assert!(Instant::now() < deadline, "the outbox never drained");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    load_stop.cancel();
    let failed = load.await.unwrap();
    let dropped = agent
        .metric("edge_agent_outbox_dropped_telemetry_total")
        .await;
    let dropped_events = agent.metric("edge_agent_outbox_dropped_events_total").await;
    agent.stop().await;
    sub_stop.cancel();

    assert_eq!(failed, 0, "inference kept working through the outage");
    let seen = seen.lock().unwrap();
    // Events: every one, in order (replays may repeat some).
    let raw_events = events_of(&seen, device);
    eprintln!(
        "{device}: {} messages, events {raw_events:?}",
        seen.messages.len()
    );
    let events = first_occurrences(&raw_events);
    let expected: Vec<(String, String)> = ["1.1.0", "1.2.0"]
        .iter()
        .flat_map(|v| {
            INSTALL_EVENTS
                .iter()
                .map(|e| (e.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(events, expected, "events in order");
    assert_eq!(dropped_events, 0);
    // Telemetry: records are numbered per boot; gaps are exactly the drops.
    let seqs: BTreeSet<u64> = telemetry_of(&seen, device).iter().map(|t| t.seq).collect();
    let last = *seqs.iter().max().unwrap();
    let missing = last - seqs.len() as u64;
    eprintln!("{device}: telemetry seqs {seqs:?}, dropped {dropped}");
    assert_eq!(
        missing, dropped,
        "missing telemetry {missing} vs counter {dropped}"
    );
    let t = telemetry_of(&seen, device);
    assert!(t.iter().any(|t| t.inferences > 0 && t.latency_ms.is_some()));
    if cap >= 1 << 20 {
        assert_eq!(dropped, 0, "within the cap nothing is dropped");
    } else {
        assert!(
            dropped > 0,
            "a {cap}-byte outbox must drop during a 6 s outage"
        );
    }
    // The retained state says online.
    let state_topic = format!("edgefleet/v1/{device}/state");
    let last_state = seen
        .messages
        .iter()
        .rev()
        .filter(|(t, _, _)| *t == state_topic)
        .map(|(_, p, _)| serde_json::from_slice::<DeviceState>(p).unwrap())
        .find(|s| s.online)
        .unwrap();
    assert_eq!(last_state.active.unwrap().version, "1.2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_on_the_embedded_broker_loses_no_event_and_counts_drops() {
    for (cap, name) in [(8u64 << 20, "emb-full"), (1500, "emb-tiny")] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::embedded(dir.path(), free_port());
        outage(broker, dir.path(), cap, name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_on_mosquitto_loses_no_event_and_counts_drops() {
    let Some(bin) = mosquitto_bin() else {
        assert!(
            std::env::var("EDGEFLEET_REQUIRE_MOSQUITTO").is_err(),
            "mosquitto is required here but not installed"
        );
        eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
        return;
    };
    for (cap, name) in [(8u64 << 20, "mos-full"), (1500, "mos-tiny")] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::Mosquitto {
            bin: bin.clone(),
            port: free_port(),
            child: None,
        };
        outage(broker, dir.path(), cap, name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_ingests_telemetry_and_its_notice_triggers_an_immediate_poll() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let fleet = TestFleet::start_with(|cfg, _| {
        cfg.rollout_tick_ms = 200;
        cfg.mqtt = Some(fleet_server::mqtt::MqttConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            ..Default::default()
        });
    })
    .await;
    let server = fleet.url.clone();
    let http = edge_agent::tls::default_client();
    let (seen, sub_stop) = subscribe(port, "dash-1");
    // And an operator with nothing but mosquitto_sub (when installed).
    let mosquitto_sub = ["/usr/bin/mosquitto_sub", "/usr/local/bin/mosquitto_sub"]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|bin| {
            let out = dir.path().join("mosquitto_sub.txt");
            let child = Command::new(bin)
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args([
                    "-u",
                    "dashboard",
                    "-P",
                    OPERATOR,
                    "-v",
                    "-t",
                    "edgefleet/v1/#",
                ])
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (child, out)
        });
    if mosquitto_sub.is_none() {
        assert!(
            std::env::var("EDGEFLEET_REQUIRE_MOSQUITTO").is_err(),
            "mosquitto_sub is required here but not installed"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut acfg = agent_config(dir.path(), "pi-7", port);
    acfg.server.url = Some(server.clone());
    acfg.server.enrollment_token = Some(ENROLL.into());
    // Far apart: only the MQTT notice can make the agent poll in time.
    acfg.server.poll_interval_secs = 600;
    acfg.server.poll_jitter = 0.0;
    acfg.server.report_interval_secs = 1;
    let agent = Agent::start(acfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // enrolled, first poll done

    let r = http
        .post(format!("{server}/api/v1/bundles"))
        .bearer_auth(OPERATOR)
        .body(cls_bundle(1))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let r = http
        .post(format!("{server}/api/v1/rollouts"))
        .bearer_auth(OPERATOR)
        .json(&json!({"bundle": id, "selector": {"board": "rpi4"},
                      "stages": [{"percent": 100, "bake_minutes": 0}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = agent.status().await;
        if s["record"]["active"]["id"] == id.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "never installed: {s:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (load_stop, load) = live_load(&agent.url);
    // The device view fills from MQTT: online, telemetry, events.
    let deadline = Instant::now() + Duration::from_secs(60);
    let d = loop {
        let d: Value = http
            .get(format!("{server}/api/v1/devices/pi-7"))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let committed = d["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["event"] == "committed"));
        if committed && d["telemetry"]["inferences"].as_u64().unwrap_or(0) > 0 {
            break d;
        }
        assert!(Instant::now() < deadline, "device view: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "installed long before the 600 s poll"
    );
    assert_eq!(d["online"], true);
    assert!(d["telemetry"]["latency_ms"]["p95"].as_f64().unwrap() > 0.0);
    let metrics = metrics_text(&http, &server, Some(OPERATOR)).await;
    assert!(metrics.contains("fleet_devices_online 1"), "{metrics}");
    // Aggregated by model, never one series per device.
    assert!(
        metrics.contains("fleet_model_latency_p95_seconds{model=\"cls\",version=\"1.1.0\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("pi-7"), "no per-device series: {metrics}");
    load_stop.cancel();
    assert_eq!(load.await.unwrap(), 0);

    // A device cannot log in to the broker with a wrong credential.
    let mut opts = MqttOptions::new("pi-7", "127.0.0.1", port);
    opts.set_credentials("pi-7", "wrong");
    let (_c, mut el) = AsyncClient::new(opts, 8);
    let refused = tokio::time::timeout(Duration::from_secs(5), el.poll())
        .await
        .map(|r| r.is_err())
        .unwrap_or(true);
    assert!(refused, "a wrong credential must be refused");

    // Graceful stop: the retained state goes offline.
    agent.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    sub_stop.cancel();
    let seen = seen.lock().unwrap();
    let states: Vec<DeviceState> = seen
        .messages
        .iter()
        .filter(|(t, _, _)| t == "edgefleet/v1/pi-7/state")
        .map(|(_, p, _)| serde_json::from_slice(p).unwrap())
        .collect();
    assert!(states.first().unwrap().online, "birth message");
    assert!(
        !states.last().unwrap().online,
        "offline on stop: {states:?}"
    );
    // mosquitto_sub saw the device come online, report, update and go offline.
    if let Some((mut child, out)) = mosquitto_sub {
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let find = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
        let online =
            find(&|l| l.starts_with("edgefleet/v1/pi-7/state ") && l.contains("\"online\":true"));
        let telemetry = find(&|l| l.starts_with("edgefleet/v1/pi-7/telemetry "));
        let committed =
            find(&|l| l.starts_with("edgefleet/v1/pi-7/events ") && l.contains("\"committed\""));
        let offline = lines.iter().rposition(|l| {
            l.starts_with("edgefleet/v1/pi-7/state ") && l.contains("\"online\":false")
        });
        assert!(
            online.is_some() && telemetry.is_some() && committed.is_some() && offline.is_some(),
            "mosquitto_sub output:\n{text}"
        );
        assert!(online < committed && committed < offline, "order:\n{text}");
    }
}

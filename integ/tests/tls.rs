//! TLS on both device links, with a private fleet CA made for the test
//! (rcgen) and real peers:
//!
//! - `https://`: a TLS-terminating proxy (tokio-rustls) in front of a real
//!   fleet server. An agent trusting the fleet CA enrolls, reports and
//!   installs a rollout's bundle through it (Range download included); an
//!   agent trusting another CA never enrolls and keeps serving locally.
//! - `mqtts://`: Debian's mosquitto with a TLS listener that requires client
//!   certificates (mutual TLS). An agent with the device certificate comes
//!   online (retained state) and reports telemetry; one without a
//!   certificate is refused and never appears.
//! - device client certificates on the fleet server's own HTTPS
//!   (`[http] client_ca`, `device_certs = "required"`): a device enrolls
//!   and reports only with a certificate naming it; a stolen certificate,
//!   none, or another CA's gets nothing; operators need none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::config::AgentConfig;
use edge_agent::tls::TlsFiles;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use common::{counter, free_port, metrics_text, mosquitto_bin, write_key};
use integ::agent::InProcAgent as Agent;
use integ::bundles::{Model, Pack};
use integ::common;

use integ::fleet::{
    ENROLL, OPERATOR, TestFleet, assert_credential_needs_its_certificate, assert_forbidden,
    enroll_through,
};
use integ::pki::{Pki, assert_refused_at_handshake, https_client, pki, pki_for};

fn cls_bundle() -> Vec<u8> {
    Pack {
        sequence: 1,
        ..Pack::new(Model::Cls, 0)
    }
    .bytes()
}

/// Terminates TLS on 127.0.0.1 and forwards plain TCP to `upstream`.
async fn tls_proxy(pki: &Pki, upstream: std::net::SocketAddr) -> u16 {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that rejects our certificate fails here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    port
}

fn agent_config(dir: &Path, id: &str) -> AgentConfig {
    let mut c = AgentConfig {
        device_id: Some(id.into()),
        data_dir: dir.join(id),
        ..AgentConfig::default()
    };
    c.tags.insert("board".into(), "rpi4".into());
    c.trust.keys = vec![write_key(dir)];
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.update.watch_secs = 1;
    c.update.max_p95_ratio = 3.0;
    c.update.p95_slack_ms = 20.0;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reach_the_fleet_server_over_https_only_with_the_fleet_ca() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = pki(dir.path(), "fleet");
    let other = pki(dir.path(), "other");

    let server = TestFleet::start_with(|cfg, _| cfg.rollout_tick_ms = 200).await;
    let (addr, server_stop) = (server.addr, server.stop.clone());
    let plain = format!("http://{addr}");
    let port = tls_proxy(&fleet, addr).await;

    let https_agent = |id: &str, ca: &Path| {
        let mut c = agent_config(dir.path(), id);
        c.server.url = Some(format!("https://127.0.0.1:{port}"));
        c.server.ca_file = Some(ca.to_path_buf());
        c.server.enrollment_token = Some(ENROLL.into());
        c.server.poll_interval_secs = 1;
        c.server.report_interval_secs = 1;
        c
    };
    let good = Agent::start(https_agent("tls-good", &fleet.ca)).await;
    let bad = Agent::start(https_agent("tls-bad", &other.ca)).await;

    // The operator side talks plain HTTP to the server itself.
    let http = edge_agent::tls::default_client();
    let push = http
        .post(format!("{plain}/api/v1/bundles"))
        .bearer_auth(OPERATOR)
        .body(cls_bundle())
        .send()
        .await
        .unwrap();
    assert!(push.status().is_success(), "{}", push.status());
    let bundle: Value = push.json().await.unwrap();
    let r = http
        .post(format!("{plain}/api/v1/rollouts"))
        .bearer_auth(OPERATOR)
        .json(&json!({
            "bundle": bundle["id"],
            "selector": {"board": "rpi4"},
            "stages": [{"percent": 100, "bake_minutes": 0}],
            "gates": {"max_failed_devices_pct": 100.0, "min_reporting_devices": 0},
        }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    // The agent with the fleet CA enrolls, downloads over TLS, self-tests
    // and commits; the server sees it from its reports.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d: Value = http
            .get(format!("{plain}/api/v1/devices/tls-good"))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["state"] == "committed" && d["active"]["version"] == "1.0.0" {
            break;
        }
        assert!(Instant::now() < deadline, "tls-good never committed: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The agent trusting another CA refused the server's certificate on
    // every attempt: it never enrolled, and its local API still answers.
    let r = http
        .get(format!("{plain}/api/v1/devices/tls-bad"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    assert!(bad.answers().await);

    good.stop().await;
    bad.stop().await;
    server_stop.cancel();
}

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a subscriber saw: (topic, payload).
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn tls_subscriber(port: u16, files: &TlsFiles, stop: CancellationToken) -> Seen {
    let seen: Seen = Arc::default();
    let mut opts = MqttOptions::new("tls-dashboard", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(edge_agent::tls::client_config(files).unwrap()),
    )));
    let (client, mut el) = AsyncClient::new(opts, 16);
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                e = el.poll() => e,
                () = stop.cancelled() => return,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = client.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe("edgefleet/v1/#", QoS::AtLeastOnce).await;
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    s2.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    seen
}

fn states_of(seen: &Seen, device: &str) -> Vec<Value> {
    let topic = format!("edgefleet/v1/{device}/state");
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t == topic)
        .map(|(_, p)| serde_json::from_slice(p).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_publish_over_mutual_tls_to_mosquitto_only_with_a_device_certificate() {
    let Some(bin) = mosquitto_bin() else {
        assert!(
            std::env::var_os("EDGEFLEET_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto is required here but not installed"
        );
        eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fleet = pki(dir.path(), "fleet");
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             user root\n",
            ca = fleet.ca.display(),
            cert = fleet.server_cert.display(),
            key = fleet.server_key.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("mosquitto.log");
    let _broker = Mosquitto(
        Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let device_files = TlsFiles {
        ca_file: Some(fleet.ca.clone()),
        client_cert_file: Some(fleet.client_cert.clone()),
        client_key_file: Some(fleet.client_key.clone()),
    };
    let stop_sub = CancellationToken::new();
    let seen = tls_subscriber(port, &device_files, stop_sub.clone());

    let mqtts_agent = |id: &str, with_cert: bool| {
        let mut c = agent_config(dir.path(), id);
        c.mqtt.url = Some(format!("mqtts://127.0.0.1:{port}"));
        c.mqtt.username = Some(id.into());
        c.mqtt.password = Some("unused".into());
        c.mqtt.ca_file = Some(fleet.ca.clone());
        if with_cert {
            c.mqtt.client_cert_file = Some(fleet.client_cert.clone());
            c.mqtt.client_key_file = Some(fleet.client_key.clone());
        }
        c.mqtt.telemetry_interval_secs = 1;
        c.mqtt.reconnect_min_ms = 200;
        c.mqtt.reconnect_max_ms = 1000;
        c.mqtt.keep_alive_secs = 5;
        c
    };
    let good = Agent::start(mqtts_agent("mtls-good", true)).await;
    let bad = Agent::start(mqtts_agent("mtls-anon", false)).await;

    // Online (retained birth) and at least two telemetry records.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let online = states_of(&seen, "mtls-good")
            .iter()
            .any(|s| s["online"] == true);
        let telemetry = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == "edgefleet/v1/mtls-good/telemetry")
            .count();
        if online && telemetry >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no state/telemetry over mTLS (online {online}, telemetry {telemetry}); \
             mosquitto log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent without a certificate has been refused for as long as the
    // other took to report twice; its local API still answers.
    let seen_anon = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.starts_with("edgefleet/v1/mtls-anon/"))
        .count();
    assert_eq!(seen_anon, 0);
    assert!(bad.answers().await);

    // A clean stop publishes the offline state, still over TLS.
    good.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !states_of(&seen, "mtls-good")
        .last()
        .is_some_and(|s| s["online"] == false)
    {
        assert!(Instant::now() < deadline, "no offline state after stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bad.stop().await;
    stop_sub.cancel();
}

/// The fleet server terminates TLS itself (`[http] tls_cert`/`tls_key`):
/// an agent with the fleet CA enrolls and reports over HTTPS, one with
/// another CA never gets through, and fleetctl reaches it with
/// `--ca-file` (and refuses it without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_server_speaks_https_to_agents_and_fleetctl() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = pki(dir.path(), "fleet");
    let other = pki(dir.path(), "other");
    let (cert, key) = (fleet.server_cert.clone(), fleet.server_key.clone());
    let server = TestFleet::start_with(move |cfg, _| {
        cfg.http.tls_cert = Some(cert);
        cfg.http.tls_key = Some(key);
    })
    .await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    let https_agent = |id: &str, ca: &Path| {
        let mut c = agent_config(dir.path(), id);
        c.server.url = Some(url.clone());
        c.server.ca_file = Some(ca.to_path_buf());
        c.server.enrollment_token = Some(ENROLL.into());
        c.server.poll_interval_secs = 1;
        c.server.report_interval_secs = 1;
        c
    };
    let good = Agent::start(https_agent("https-good", &fleet.ca)).await;
    let bad = Agent::start(https_agent("https-bad", &other.ca)).await;

    // fleetctl with the fleet CA lists the device once it has reported.
    let fleetctl = |ca: Option<PathBuf>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = std::process::Command::new(integ::bins::bin("fleetctl"));
            c.args([
                "devices", "list", "--json", "--server", &url, "--token", OPERATOR,
            ]);
            if let Some(ca) = ca {
                c.arg("--ca-file").arg(ca);
            }
            c.output().unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = fleetctl(Some(fleet.ca.clone())).await.unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
        if list
            .iter()
            .any(|d| d["id"] == "https-good" && d["last_seen"].is_u64())
        {
            assert!(
                list.iter().all(|d| d["id"] != "https-bad"),
                "an agent with another CA got through: {list:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "https-good never reported: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Without the CA (system roots), fleetctl refuses the certificate.
    let o = fleetctl(None).await.unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Plain HTTP to the HTTPS port gets nothing.
    let plain = edge_agent::tls::default_client()
        .get(format!("http://127.0.0.1:{}/healthz", server.addr.port()))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    assert!(bad.answers().await);
    good.stop().await;
    bad.stop().await;
}

/// The embedded broker speaks MQTT over TLS itself (`[mqtt] tls_cert`/
/// `tls_key`): an agent trusting the fleet CA comes online over
/// `mqtts://` with its own credential; one trusting another CA never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_speaks_mqtts_to_agents_with_the_fleet_ca() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = pki(dir.path(), "fleet");
    let other = pki(dir.path(), "other");
    let (cert, key) = (fleet.server_cert.clone(), fleet.server_key.clone());
    let server = TestFleet::start_with(move |cfg, _| {
        cfg.mqtt = Some(fleet_server::mqtt::MqttConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..Default::default()
        });
    })
    .await;
    let mqtt = server.mqtt_url.clone().unwrap();
    assert!(mqtt.starts_with("mqtts://"), "{mqtt}");
    let agent = |id: &str, ca: &Path| {
        let mut c = agent_config(dir.path(), id);
        c.server.url = Some(server.url.clone());
        c.server.enrollment_token = Some(ENROLL.into());
        c.server.poll_interval_secs = 1;
        c.server.report_interval_secs = 1;
        c.mqtt.url = Some(mqtt.clone());
        c.mqtt.ca_file = Some(ca.to_path_buf());
        c.mqtt.telemetry_interval_secs = 1;
        c.mqtt.reconnect_min_ms = 200;
        c.mqtt.reconnect_max_ms = 1000;
        c
    };
    let good = Agent::start(agent("mqtts-good", &fleet.ca)).await;
    let bad = Agent::start(agent("mqtts-bad", &other.ca)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = server.device("mqtts-good").await;
        if d["online"] == true && d["telemetry"].is_object() {
            break;
        }
        assert!(Instant::now() < deadline, "never online over mqtts: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other agent enrolled over HTTP but never got through TLS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = server.device("mqtts-bad").await;
    assert_ne!(d["online"], true, "{d:#}");
    assert!(d["telemetry"].is_null(), "{d:#}");
    good.stop().await;
    bad.stop().await;
}

/// A reqwest client trusting `ca`, with a client identity if given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_need_a_client_certificate_naming_them_when_the_server_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = pki_for(dir.path(), "fleet", &["cert-a", "cert-b"]);
    let other = pki_for(dir.path(), "other", &["cert-a"]);
    let (cert, key, ca) = (
        fleet.server_cert.clone(),
        fleet.server_key.clone(),
        fleet.ca.clone(),
    );
    let server = TestFleet::start_with(move |cfg, _| {
        cfg.http.tls_cert = Some(cert);
        cfg.http.tls_key = Some(key);
        cfg.http.client_ca = Some(ca);
        cfg.http.device_certs = fleet_server::config::DeviceCerts::Required;
    })
    .await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let (a_cert, a_key) = (&fleet.devices[0].1, &fleet.devices[0].2);
    let (b_cert, b_key) = (&fleet.devices[1].1, &fleet.devices[1].2);

    // The device with its certificate enrolls and reports.
    let mut c = agent_config(dir.path(), "cert-a");
    c.server.url = Some(url.clone());
    c.server.ca_file = Some(fleet.ca.clone());
    c.server.client_cert_file = Some(a_cert.clone());
    c.server.client_key_file = Some(a_key.clone());
    c.server.enrollment_token = Some(ENROLL.into());
    c.server.poll_interval_secs = 1;
    c.server.report_interval_secs = 1;
    let agent = Agent::start(c).await;
    let operator = https_client(&url, &fleet.ca, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = operator
            .get(format!("{url}/api/v1/devices/cert-a"))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap();
        // Operators need no certificate.
        if r.status().is_success() {
            let d: Value = r.json().await.unwrap();
            if d["last_seen"].is_u64() && d["state"].is_string() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "cert-a never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let credential = std::fs::read_to_string(dir.path().join("cert-a/credential")).unwrap();

    // A stolen enrollment token without a certificate, or with another
    // device's, enrolls nothing.
    let no_cert = https_client(&url, &fleet.ca, None);
    let (a_client, b_client) = (
        https_client(&url, &fleet.ca, Some((a_cert, a_key))),
        https_client(&url, &fleet.ca, Some((b_cert, b_key))),
    );
    let a = enroll_through(&no_cert, &url, "cert-x").await;
    assert_forbidden(&a, "client_certificate_required");
    let a = enroll_through(&a_client, &url, "cert-x").await;
    assert_forbidden(&a, "client_certificate_mismatch");

    // cert-a's credential works only with cert-a's certificate.
    assert_credential_needs_its_certificate(&url, &credential, [&a_client, &no_cert, &b_client])
        .await;
    // A certificate naming cert-a from another CA fails the handshake.
    let (_, cert, key) = &other.devices[0];
    let foreign = https_client(&url, &fleet.ca, Some((cert, key)));
    assert_refused_at_handshake(&foreign, &format!("{url}/api/v1/device/desired")).await;
    let metrics = metrics_text(&operator, &url, Some(OPERATOR)).await;
    let refusals = counter(&metrics, "fleet_client_cert_refusals_total");
    assert!(refusals >= 4, "{refusals} refusals counted");
    assert!(agent.answers().await);
    agent.stop().await;
}

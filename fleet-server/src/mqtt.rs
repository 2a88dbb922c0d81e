//! MQTT on the server side: an optional embedded broker (rumqttd) that
//! checks device credentials against the store, the ingestion of device
//! state, telemetry and events into device status, and the "update
//! available" notices sent when a device's desired state changes.
//!
//! The server talks to its broker as an ordinary MQTT client (rumqttc over
//! TCP), so an external broker works the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use edgefleet_wire::telemetry::{
    Command, CommandKind, DeviceEvent, DeviceState, TOPIC_PREFIX, Telemetry, TopicKind, Topics,
    decode_telemetry, parse_topic,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{Tokens, sha256_hex};
use crate::config::Role;
use crate::error::{Error, Result};
use crate::store::Store;

/// Events kept per device for the API.
pub const EVENTS_KEPT: usize = 20;

/// `[mqtt]` in fleet-server.toml. Absent: no MQTT.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Start the embedded broker. Default true.
    pub embedded: bool,
    /// Where the embedded broker listens. Default `127.0.0.1:1883`; port 0
    /// picks a free port (tests).
    pub listen: SocketAddr,
    /// An external broker (`mqtt://host:port`) when `embedded = false`.
    pub url: Option<String>,
    /// The server's login at an external broker.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            embedded: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            url: None,
            username: None,
            password: None,
        }
    }
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct MqttMetrics {
    pub messages: AtomicU64,
    pub rejected: AtomicU64,
    pub notices: AtomicU64,
}

/// The running MQTT side.
#[derive(Debug, Clone)]
pub struct Mqtt {
    /// Where devices connect (`mqtt://host:port`).
    pub url: String,
    pub metrics: Arc<MqttMetrics>,
}

/// Picks a free loopback port for the broker when asked for port 0
/// (rumqttd does not report the port it bound).
fn resolve_listen(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr).map_err(|e| Error::io(addr.to_string(), e))?;
    l.local_addr().map_err(|e| Error::io("broker port", e))
}

/// Who may connect to the embedded broker: the server itself (a random
/// internal secret), devices (client id = username = device id, password =
/// the device credential) and operators' dashboards (any username, an
/// operator bearer token of at least the viewer role as password).
fn start_broker(
    listen: SocketAddr,
    store: Arc<dyn Store>,
    tokens: Tokens,
    internal: (String, String),
    metrics: Arc<MqttMetrics>,
) -> Result<()> {
    let mut conn = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    conn.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let store = store.clone();
        let tokens = tokens.clone();
        let internal = internal.clone();
        let metrics = metrics.clone();
        async move {
            let ok = if user == internal.0 {
                pass == internal.1
            } else if tokens
                .find(&pass)
                .is_some_and(|(_, role)| role >= Role::Viewer)
            {
                true
            } else {
                matches!(
                    store.device_by_credential(&sha256_hex(&pass)),
                    Ok(Some(d)) if d.id == user && client_id == user
                )
            };
            if !ok {
                metrics.rejected.fetch_add(1, Relaxed);
                tracing::warn!(client = %client_id, user = %user, "mqtt login refused");
            }
            ok
        }
    });
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_string(),
        rumqttd::ServerSettings {
            name: "v4".into(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: conn,
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| Error::io("mqtt broker thread", e))?;
    // Wait until it accepts connections.
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Usage(format!(
        "the embedded MQTT broker did not start on {listen}"
    )))
}

fn split_url(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| Error::Usage(format!("[mqtt] url {url:?}: use mqtt://host:port")))?;
    match rest.trim_end_matches('/').rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse()
                .map_err(|_| Error::Usage(format!("[mqtt] url {url:?}: bad port")))?,
        )),
        None => Ok((rest.to_string(), 1883)),
    }
}

/// Starts the broker (if embedded) and the server's client: ingestion and
/// notices. `notices` carries device ids whose desired state changed.
pub fn start(
    cfg: &MqttConfig,
    store: Arc<dyn Store>,
    tokens: Tokens,
    notices: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
) -> Result<Mqtt> {
    let metrics = Arc::new(MqttMetrics::default());
    let (url, user, pass) = if cfg.embedded {
        let listen = resolve_listen(cfg.listen)?;
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).map_err(|e| Error::Store(format!("random: {e}")))?;
        let internal = ("fleet-server".to_string(), hex::encode(secret));
        start_broker(
            listen,
            store.clone(),
            tokens,
            internal.clone(),
            metrics.clone(),
        )?;
        tracing::info!(%listen, "embedded MQTT broker started");
        (format!("mqtt://{listen}"), internal.0, internal.1)
    } else {
        let url = cfg
            .url
            .clone()
            .ok_or_else(|| Error::Usage("[mqtt] embedded = false needs url".into()))?;
        (
            url,
            cfg.username
                .clone()
                .unwrap_or_else(|| "fleet-server".into()),
            cfg.password.clone().unwrap_or_default(),
        )
    };
    let (host, port) = split_url(&url)?;
    let mut opts = MqttOptions::new("fleet-server", host, port);
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, eventloop) = AsyncClient::new(opts, 256);
    tokio::spawn(ingest_loop(
        client.clone(),
        eventloop,
        store,
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(notice_loop(client, notices, metrics.clone(), shutdown));
    Ok(Mqtt { url, metrics })
}

async fn ingest_loop(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    store: Arc<dyn Store>,
    metrics: Arc<MqttMetrics>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let polled = tokio::select! {
            p = eventloop.poll() => p,
            () = shutdown.cancelled() => return,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                let c = client.clone();
                tokio::spawn(async move {
                    for kind in ["state", "telemetry", "events"] {
                        let _ = c
                            .subscribe(format!("{TOPIC_PREFIX}/+/{kind}"), QoS::AtLeastOnce)
                            .await;
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                metrics.messages.fetch_add(1, Relaxed);
                let store = store.clone();
                let topic = p.topic.clone();
                let payload = p.payload.to_vec();
                // sled writes: off the event loop.
                let r =
                    tokio::task::spawn_blocking(move || ingest(&*store, &topic, &payload)).await;
                if let Ok(Err(e)) = r {
                    tracing::debug!(topic = %p.topic, error = %e, "ignored an MQTT message");
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                let ms = (500u64 << failures.min(6)).min(30_000);
                tracing::warn!(error = %e, retry_in_ms = ms, "server MQTT connection lost");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// Applies one device message to the device's record.
pub fn ingest(store: &dyn Store, topic: &str, payload: &[u8]) -> Result<()> {
    let Some((device, kind)) = parse_topic(topic) else {
        return Err(Error::Usage(format!("unknown topic {topic}")));
    };
    let bad = |e: String| Error::Usage(format!("{topic}: {e}"));
    enum Message {
        State(DeviceState),
        Telemetry(Box<Telemetry>),
        Event(DeviceEvent),
    }
    let msg = match kind {
        TopicKind::State => {
            Message::State(serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?)
        }
        TopicKind::Telemetry => Message::Telemetry(Box::new(
            decode_telemetry(payload).map_err(|e| bad(e.to_string()))?,
        )),
        TopicKind::Events => {
            Message::Event(serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?)
        }
        TopicKind::Cmd => return Ok(()),
    };
    let now = edgefleet_wire::time::unix_now();
    // Atomic against the HTTP report and the controller writing the same
    // record: a plain get-then-put lost events here under load.
    let updated = store.update_device(device, &mut |d| {
        match &msg {
            Message::State(s) => {
                d.online = Some(s.online);
                if s.online {
                    d.last_seen = Some(now);
                }
                d.mqtt_state = Some(s.clone());
            }
            Message::Telemetry(t) => {
                d.telemetry = Some((**t).clone());
                d.online = Some(true);
                d.last_seen = Some(now);
            }
            Message::Event(e) => {
                // Replays after an outage may repeat an event: keep it once.
                if !d.events.contains(e) {
                    d.events.push(e.clone());
                    let n = d.events.len();
                    if n > EVENTS_KEPT {
                        d.events.drain(..n - EVENTS_KEPT);
                    }
                }
                d.last_seen = Some(now);
            }
        }
        true
    })?;
    match updated {
        Some(_) => Ok(()),
        None => Err(Error::Usage(format!("unknown device {device}"))),
    }
}

async fn notice_loop(
    client: AsyncClient,
    mut notices: mpsc::UnboundedReceiver<String>,
    metrics: Arc<MqttMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        let device = tokio::select! {
            d = notices.recv() => match d { Some(d) => d, None => return },
            () = shutdown.cancelled() => return,
        };
        let cmd = Command {
            kind: CommandKind::UpdateAvailable,
            at: edgefleet_wire::time::unix_now(),
        };
        let Ok(payload) = serde_json::to_vec(&cmd) else {
            continue;
        };
        // Not retained: a device that is offline polls when it returns.
        if client
            .publish(Topics::new(&device).cmd, QoS::AtLeastOnce, false, payload)
            .await
            .is_ok()
        {
            metrics.notices.fetch_add(1, Relaxed);
        }
    }
}

/// Prometheus lines: devices online, per-device telemetry gauges, counters.
pub fn render_metrics(m: &Mqtt, store: &dyn Store) -> Result<String> {
    use std::fmt::Write as _;
    let esc = edgefleet_wire::prom::escape;
    let mut out = String::new();
    let devices = store.list_devices()?;
    let online = devices.iter().filter(|d| d.online == Some(true)).count();
    let _ = writeln!(
        out,
        "# HELP fleet_devices_online Devices whose MQTT state says online.\n# TYPE fleet_devices_online gauge\nfleet_devices_online {online}"
    );
    let _ = writeln!(
        out,
        "# HELP fleet_device_latency_p95_ms p95 inference latency of the last telemetry interval.\n# TYPE fleet_device_latency_p95_ms gauge"
    );
    for d in &devices {
        if let Some(l) = d.telemetry.as_ref().and_then(|t| t.latency_ms.as_ref()) {
            let _ = writeln!(
                out,
                "fleet_device_latency_p95_ms{{device=\"{}\"}} {}",
                esc(&d.id),
                l.p95
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP fleet_device_drift_psi Largest drift PSI in the last telemetry record.\n# TYPE fleet_device_drift_psi gauge"
    );
    for d in &devices {
        if let Some(t) = &d.telemetry
            && let Some(max) = t.drift.iter().map(|v| v.psi).reduce(f64::max)
        {
            let _ = writeln!(
                out,
                "fleet_device_drift_psi{{device=\"{}\"}} {max}",
                esc(&d.id)
            );
        }
    }
    for (name, help, v) in [
        (
            "fleet_mqtt_messages_total",
            "Device messages ingested.",
            m.metrics.messages.load(Relaxed),
        ),
        (
            "fleet_mqtt_logins_refused_total",
            "MQTT logins the embedded broker refused.",
            m.metrics.rejected.load(Relaxed),
        ),
        (
            "fleet_mqtt_notices_total",
            "Update-available notices published.",
            m.metrics.notices.load(Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    Ok(out)
}

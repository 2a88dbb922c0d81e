//! MQTT on the server side: the embedded broker or the server's client of
//! an external one, the lossless ingest of device messages, the "update
//! available" notices, and the HTTP auth/ACL endpoints external brokers
//! (EMQX, VerneMQ) ask.
//!
//! # Layout
//! - [`acl`]: who may log in and publish or subscribe to what;
//! - [`broker`]: the embedded broker;
//! - [`external`]: the server as a client of an external broker (shared
//!   subscriptions, manual acknowledgements after the store commit).

pub mod acl;
pub mod broker;
pub mod external;
pub mod mosquitto;
pub mod shared;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use edgefleet_wire::telemetry::{Command, CommandKind, Topics};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiResult, AppState, read_json};
use crate::auth::Action;
use crate::ingest::Ingest;

pub use crate::config::MqttConfig;

/// Where notices and kicks go.
#[derive(Debug)]
enum Link {
    Embedded(Arc<broker::Broker>),
    External(external::Client),
}

/// The running MQTT side.
#[derive(Debug)]
pub struct Mqtt {
    /// Where devices connect (`mqtt://host:port`).
    pub url: String,
    pub ingest: Ingest,
    link: Link,
    pub notices: AtomicU64,
    pub notices_failed: AtomicU64,
    /// Set when the server keeps an external mosquitto's password file.
    pub mosquitto: Option<Arc<mosquitto::Sync>>,
    /// Set when standbys take a share of the ingest (`ingest_slots`).
    pub shared: Option<Arc<shared::SharedMetrics>>,
}

impl Mqtt {
    pub fn embedded(url: String, ingest: Ingest, b: Arc<broker::Broker>) -> Mqtt {
        Mqtt {
            url,
            ingest,
            link: Link::Embedded(b),
            notices: AtomicU64::new(0),
            notices_failed: AtomicU64::new(0),
            mosquitto: None,
            shared: None,
        }
    }

    pub fn external(
        url: String,
        ingest: Ingest,
        c: external::Client,
        mosquitto: Option<Arc<mosquitto::Sync>>,
    ) -> Mqtt {
        Mqtt {
            url,
            ingest,
            link: Link::External(c),
            notices: AtomicU64::new(0),
            notices_failed: AtomicU64::new(0),
            mosquitto,
            shared: None,
        }
    }

    /// Closes a device's connection (revoked or decommissioned). With an
    /// external broker the device is refused at its next login (for
    /// mosquitto: dropped from the password file at once).
    pub fn disconnect(&self, device: &str) {
        if let Link::Embedded(b) = &self.link {
            b.kick(device);
        }
        if let Some(m) = &self.mosquitto {
            m.changed();
        }
    }

    fn notify(&self, device: &str) {
        let cmd = Command {
            kind: CommandKind::UpdateAvailable,
            at: edgefleet_wire::time::unix_now(),
        };
        let Ok(payload) = serde_json::to_vec(&cmd) else {
            return;
        };
        let topic = Topics::new(device).cmd;
        // Not retained: a device that is offline polls when it returns.
        let ok = match &self.link {
            Link::Embedded(b) => {
                b.publish(&topic, payload, false);
                true
            }
            Link::External(c) => c.publish(topic, payload),
        };
        if ok {
            self.notices.fetch_add(1, Relaxed);
        } else {
            self.notices_failed.fetch_add(1, Relaxed);
        }
    }

    /// Prometheus lines of the broker, the ingest and the notices.
    pub fn render_metrics(&self, out: &mut String) {
        let i = &self.ingest.metrics;
        crate::metrics::counter(
            out,
            "fleet_mqtt_messages_received_total",
            "Device messages taken from the broker.",
            i.received.load(Relaxed),
        );
        crate::metrics::counter(
            out,
            "fleet_mqtt_messages_ingested_total",
            "Device messages committed to the store (then acknowledged).",
            i.ingested.load(Relaxed),
        );
        crate::metrics::counter(
            out,
            "fleet_mqtt_notices_total",
            "Update-available notices published.",
            self.notices.load(Relaxed),
        );
        crate::metrics::counter(
            out,
            "fleet_mqtt_notices_failed_total",
            "Update-available notices that could not be queued.",
            self.notices_failed.load(Relaxed),
        );
        crate::metrics::family(
            out,
            "fleet_mqtt_messages_refused_total",
            "counter",
            "Device messages not used, by reason.",
        );
        for (r, n) in i.refused() {
            let _ = writeln!(
                out,
                "fleet_mqtt_messages_refused_total{{reason=\"{}\"}} {n}",
                r.as_str()
            );
        }
        crate::metrics::gauge(
            out,
            "fleet_mqtt_ingest_queue",
            "Device messages waiting for the store.",
            self.ingest.backlog() as u64,
        );
        if let Some(sh) = &self.shared {
            crate::metrics::counter(
                out,
                "fleet_mqtt_inbox_applied_total",
                "Device messages standbys took and stored that this server applied.",
                sh.applied.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_slot_adoptions_total",
                "Broker sessions of gone standbys adopted (emptied and unsubscribed).",
                sh.adoptions.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_slot_adopted_messages_total",
                "Device messages taken from adopted sessions.",
                sh.adopted_messages.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_slot_adoption_failures_total",
                "Adoptions that did not finish (tried again).",
                sh.adoption_failures.load(Relaxed),
            );
        }
        if let Link::Embedded(b) = &self.link {
            let m = &b.metrics;
            crate::metrics::gauge(
                out,
                "fleet_mqtt_connections",
                "Clients connected to the embedded broker.",
                b.connected(),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_connects_total",
                "Logins accepted.",
                m.connects.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_connections_over_limit_total",
                "Connections closed at once: the broker was at max_connections.",
                m.refused_connection_limit.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_publishes_denied_total",
                "Publishes refused by the ACL (the connection is closed).",
                m.publishes_denied.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_subscribes_denied_total",
                "Subscriptions refused by the ACL.",
                m.subscribes_denied.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_delivered_total",
                "Messages queued to subscribers.",
                m.delivered.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_dropped_slow_subscriber_total",
                "Messages a subscriber too slow to keep up did not get (dashboards; never the ingest).",
                m.dropped_slow_subscriber.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_session_takeovers_total",
                "Reconnects that replaced the same client's older connection.",
                m.takeovers.load(Relaxed),
            );
            crate::metrics::counter(
                out,
                "fleet_mqtt_protocol_errors_total",
                "Connections closed for a malformed or unexpected packet.",
                m.protocol_errors.load(Relaxed),
            );
            crate::metrics::family(
                out,
                "fleet_mqtt_logins_refused_total",
                "counter",
                "Logins refused, by reason.",
            );
            if let Ok(r) = m.refused.lock() {
                for (reason, n) in r.iter() {
                    let _ = writeln!(
                        out,
                        "fleet_mqtt_logins_refused_total{{reason=\"{reason}\"}} {n}"
                    );
                }
            }
        }
    }
}

/// Publishes a notice for every device id that arrives, at most `per_sec`
/// a second (a stage of 5,000 devices must not make 5,000 devices check in
/// within the same millisecond; devices poll on their own anyway), until
/// `shutdown`.
pub async fn notice_loop(
    mqtt: Arc<Mqtt>,
    mut rx: mpsc::Receiver<String>,
    per_sec: u32,
    shutdown: CancellationToken,
) -> crate::error::Result<()> {
    let gap = std::time::Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
    let mut next = tokio::time::Instant::now();
    loop {
        let device = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => return Ok(()) },
            () = shutdown.cancelled() => return Ok(()),
        };
        let now = tokio::time::Instant::now();
        if next > now {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
        next = next.max(now) + gap;
        mqtt.notify(&device);
    }
}

/// `POST /api/v1/mqtt/auth` (EMQX's HTTP authentication request).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct BrokerAuthRequest {
    pub clientid: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /api/v1/mqtt/acl` (EMQX's HTTP authorization request).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct BrokerAclRequest {
    pub clientid: String,
    #[serde(default)]
    pub username: Option<String>,
    pub topic: String,
    /// `publish` or `subscribe`.
    pub action: String,
}

/// `{"result": "allow" | "deny"}`.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct BrokerDecision {
    pub result: String,
    #[serde(default)]
    pub is_superuser: bool,
}

fn decision(ok: bool) -> axum::Json<BrokerDecision> {
    axum::Json(BrokerDecision {
        result: if ok { "allow" } else { "deny" }.into(),
        is_superuser: false,
    })
}

#[utoipa::path(post, path = "/api/v1/mqtt/auth", tag = "mqtt",
    request_body = BrokerAuthRequest,
    responses((status = 200, body = BrokerDecision), (status = 401, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
pub async fn http_auth(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<axum::Json<BrokerDecision>> {
    s.allow(&headers, Action::BrokerAuth)?;
    let req: BrokerAuthRequest = read_json(&s, body, &headers, "auth request").await?;
    let ok = acl::login(
        &s.fleet,
        &s.tokens,
        &req.clientid,
        req.username.as_deref(),
        req.password.as_deref().map(str::as_bytes),
    )
    .is_ok();
    Ok(decision(ok))
}

#[utoipa::path(post, path = "/api/v1/mqtt/acl", tag = "mqtt",
    request_body = BrokerAclRequest,
    responses((status = 200, body = BrokerDecision), (status = 401, body = edgefleet_wire::api::v1::ErrorBody),
              (status = 403, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
pub async fn http_acl(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<axum::Json<BrokerDecision>> {
    s.allow(&headers, Action::BrokerAuth)?;
    let req: BrokerAclRequest = read_json(&s, body, &headers, "acl request").await?;
    // The broker authenticated the client; here its identity is the device
    // id it logged in as (client id = username = device id) or a reader.
    let login = if s.fleet.get(&req.clientid).is_some()
        && req.username.as_deref().is_none_or(|u| u == req.clientid)
    {
        Some(acl::Login::Device(req.clientid.clone()))
    } else {
        None
    };
    let ok = match (login, req.action.as_str()) {
        (Some(l), "publish") => acl::may_publish(&l, &req.topic),
        (Some(l), "subscribe") => acl::may_subscribe(&l, &req.topic),
        // Readers (dashboards) authenticate with a token the broker
        // passed at login; at this point only read access is possible.
        (None, "subscribe") => acl::may_subscribe(
            &acl::Login::Reader {
                name: req.username.unwrap_or_default(),
                principal: crate::auth::Principal::Viewer,
            },
            &req.topic,
        ),
        _ => false,
    };
    Ok(decision(ok))
}

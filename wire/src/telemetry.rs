//! MQTT topics and payloads (v1). Documented with examples in docs/mqtt.md.
//!
//! - `edgefleet/v1/{device}/state` (retained, QoS 1): [`DeviceState`]; the
//!   Last Will sets it to `online: false`.
//! - `edgefleet/v1/{device}/telemetry` (QoS 1): [`Telemetry`], JSON by
//!   default or postcard for metered links (first byte `{` tells them apart).
//! - `edgefleet/v1/{device}/events` (QoS 1): [`DeviceEvent`].
//! - `edgefleet/v1/{device}/cmd` (server → device, QoS 1): [`Command`].

use serde::{Deserialize, Serialize};

use crate::device::{BundleRef, UpdateState};

pub const TOPIC_PREFIX: &str = "edgefleet/v1";

/// The four topics of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub state: String,
    pub telemetry: String,
    pub events: String,
    pub cmd: String,
}

impl Topics {
    pub fn new(device_id: &str) -> Topics {
        let t = |s: &str| format!("{TOPIC_PREFIX}/{device_id}/{s}");
        Topics {
            state: t("state"),
            telemetry: t("telemetry"),
            events: t("events"),
            cmd: t("cmd"),
        }
    }
}

/// Which of a device's topics a topic name is, and whose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicKind {
    State,
    Telemetry,
    Events,
    Cmd,
}

/// Splits `edgefleet/v1/{device}/{kind}`.
pub fn parse_topic(topic: &str) -> Option<(&str, TopicKind)> {
    let rest = topic.strip_prefix(TOPIC_PREFIX)?.strip_prefix('/')?;
    let (device, kind) = rest.split_once('/')?;
    if device.is_empty() || device.contains(['+', '#']) {
        return None;
    }
    let kind = match kind {
        "state" => TopicKind::State,
        "telemetry" => TopicKind::Telemetry,
        "events" => TopicKind::Events,
        "cmd" => TopicKind::Cmd,
        _ => return None,
    };
    Some((device, kind))
}

/// Birth message (and every change), retained. The Last Will carries the
/// same shape with `online: false`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceState {
    pub device_id: String,
    pub online: bool,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub board: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub active: Option<BundleRef>,
    #[serde(default)]
    pub last_known_good: Option<BundleRef>,
    #[serde(default)]
    pub update_state: Option<UpdateState>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Unix seconds the agent started.
    #[serde(default)]
    pub boot_time: Option<u64>,
    /// Unix seconds of this message.
    pub at: u64,
}

/// Latency percentiles over the interval, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// The outbox as the device sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutboxStats {
    pub depth: u64,
    pub bytes: u64,
    pub dropped_telemetry: u64,
    pub dropped_events: u64,
}

/// Application outcomes of an interval (`POST /v1/feedback` on the agent):
/// how many, their sum and sum of squares (so the server can pool them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reward {
    pub count: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

/// Population stability index of one drift feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DriftValue {
    pub feature: String,
    pub psi: f64,
}

/// One telemetry record, every `telemetry_interval_secs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Telemetry {
    /// Unix seconds at the end of the interval.
    pub at: u64,
    pub interval_secs: u64,
    /// Monotonic per boot: gaps show dropped records.
    pub seq: u64,
    /// The model that served the interval (`name@version`).
    pub model: Option<String>,
    pub inferences: u64,
    pub errors: u64,
    /// Over the interval; `None` without inferences.
    pub latency_ms: Option<Latency>,
    pub queue_depth: u64,
    pub cpu_pct: f64,
    pub rss_bytes: u64,
    /// From /sys/class/thermal when present.
    pub temperature_c: Option<f64>,
    /// Free bytes on the data dir's filesystem.
    pub disk_free_bytes: Option<u64>,
    pub uptime_secs: u64,
    pub outbox: OutboxStats,
    /// MQTT payload bytes sent since boot (metered links).
    pub bytes_sent: u64,
    #[serde(default)]
    pub drift: Vec<DriftValue>,
    /// Feedback the local application posted for the serving model in the
    /// interval; `None` without any. Last, so older postcard records (which
    /// end before it) still decode.
    #[serde(default)]
    pub reward: Option<Reward>,
}

/// An update lifecycle event or a drift alert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceEvent {
    pub at: u64,
    /// `downloaded`, `verified`, `rejected`, `self_test_passed`,
    /// `self_test_failed`, `shadow_*`, `activated`, `rolled_back`,
    /// `committed`, `cancelled`, `download_started`, `drift`.
    pub event: String,
    #[serde(default)]
    pub bundle: Option<BundleRef>,
    #[serde(default)]
    pub reason: Option<String>,
    /// For `drift`: the values that crossed the threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<DriftValue>,
}

/// What the server asks of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// The desired state changed: poll now.
    UpdateAvailable,
    /// Send a report and a telemetry record now.
    ReportNow,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Command {
    pub kind: CommandKind,
    pub at: u64,
}

/// Telemetry as postcard (the compact encoding for metered links).
pub fn telemetry_to_postcard(t: &Telemetry) -> crate::Result<Vec<u8>> {
    postcard::to_allocvec(t).map_err(|e| crate::Error::malformed("telemetry", e))
}

/// Decodes telemetry in either encoding.
pub fn decode_telemetry(payload: &[u8]) -> crate::Result<Telemetry> {
    if payload.first() == Some(&b'{') {
        serde_json::from_slice(payload).map_err(|e| crate::Error::malformed("telemetry", e))
    } else {
        match postcard::from_bytes::<Telemetry>(payload) {
            Ok(t) => Ok(t),
            // Agents before `reward` end their records one field earlier.
            Err(_) => postcard::from_bytes::<legacy::TelemetryNoReward>(payload)
                .map(Telemetry::from)
                .map_err(|e| crate::Error::malformed("telemetry", e)),
        }
    }
}

mod legacy {
    use super::*;

    /// [`Telemetry`] as agents before feedback sent it (postcard has no
    /// field names, so a missing trailing field is a decode error).
    #[derive(Debug, Deserialize)]
    pub struct TelemetryNoReward {
        at: u64,
        interval_secs: u64,
        seq: u64,
        model: Option<String>,
        inferences: u64,
        errors: u64,
        latency_ms: Option<Latency>,
        queue_depth: u64,
        cpu_pct: f64,
        rss_bytes: u64,
        temperature_c: Option<f64>,
        disk_free_bytes: Option<u64>,
        uptime_secs: u64,
        outbox: OutboxStats,
        bytes_sent: u64,
        drift: Vec<DriftValue>,
    }

    impl From<TelemetryNoReward> for Telemetry {
        fn from(t: TelemetryNoReward) -> Telemetry {
            Telemetry {
                at: t.at,
                interval_secs: t.interval_secs,
                seq: t.seq,
                model: t.model,
                inferences: t.inferences,
                errors: t.errors,
                latency_ms: t.latency_ms,
                queue_depth: t.queue_depth,
                cpu_pct: t.cpu_pct,
                rss_bytes: t.rss_bytes,
                temperature_c: t.temperature_c,
                disk_free_bytes: t.disk_free_bytes,
                uptime_secs: t.uptime_secs,
                outbox: t.outbox,
                bytes_sent: t.bytes_sent,
                drift: t.drift,
                reward: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topics_round_trip() {
        let t = Topics::new("pi-01");
        assert_eq!(t.state, "edgefleet/v1/pi-01/state");
        assert_eq!(parse_topic(&t.events), Some(("pi-01", TopicKind::Events)));
        assert_eq!(parse_topic("edgefleet/v1/+/state"), None);
        assert_eq!(parse_topic("edgefleet/v2/pi/state"), None);
        assert_eq!(parse_topic("edgefleet/v1/pi/other"), None);
    }

    #[test]
    fn postcard_records_of_agents_before_feedback_still_decode() {
        let mut t = Telemetry {
            at: 7,
            model: Some("cls@1.0.0".into()),
            inferences: 3,
            ..Telemetry::default()
        };
        let now = telemetry_to_postcard(&t).unwrap();
        // `reward: None` is postcard's single 0 byte at the end: without it
        // the bytes are what an older agent sent.
        assert_eq!(now.last(), Some(&0));
        let old = &now[..now.len() - 1];
        assert_eq!(decode_telemetry(old).unwrap(), t);
        t.reward = Some(Reward {
            count: 2,
            sum: 1.5,
            sum_sq: 1.25,
        });
        let with = telemetry_to_postcard(&t).unwrap();
        assert_eq!(decode_telemetry(&with).unwrap(), t);
    }

    #[test]
    fn telemetry_decodes_from_json_and_postcard_and_postcard_is_smaller() {
        let t = Telemetry {
            at: 1_800_000_000,
            interval_secs: 10,
            seq: 7,
            model: Some("cls@1.2.0".into()),
            inferences: 1234,
            errors: 1,
            latency_ms: Some(Latency {
                p50: 3.1,
                p95: 4.2,
                p99: 9.9,
            }),
            queue_depth: 0,
            cpu_pct: 12.5,
            rss_bytes: 40 << 20,
            temperature_c: Some(51.2),
            disk_free_bytes: Some(8 << 30),
            uptime_secs: 3600,
            outbox: OutboxStats::default(),
            bytes_sent: 123_456,
            drift: vec![DriftValue {
                feature: "x[c=0]".into(),
                psi: 0.03,
            }],
            reward: None,
        };
        let json = serde_json::to_vec(&t).unwrap();
        let pc = telemetry_to_postcard(&t).unwrap();
        assert_eq!(decode_telemetry(&json).unwrap(), t);
        assert_eq!(decode_telemetry(&pc).unwrap(), t);
        assert!(pc.len() * 3 < json.len(), "{} vs {}", pc.len(), json.len());
    }
}

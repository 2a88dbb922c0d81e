//! The device ↔ fleet-server protocol (v1, JSON over HTTP): enrollment,
//! desired state (written by the server) and reported state (written by the
//! device, which is the source of truth for what it runs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /api/v1/devices/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// A shared enrollment token configured on the server.
    pub enrollment_token: String,
    /// Requested device id (hostname, serial). The server may refuse it.
    pub device_id: String,
    /// Tags such as `board=rpi4`.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub arch: String,
    pub agent_version: String,
}

/// The credential a device uses from then on. The server keeps only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: String,
    pub credential: String,
}

/// A bundle as devices and reports refer to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// sha256 of the bundle file, hex: the content address.
    pub id: String,
    pub name: String,
    pub version: String,
    pub sequence: u64,
}

/// What the server wants a device to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// `None`: keep whatever is running.
    pub bundle: Option<BundleRef>,
    /// Download path relative to the server URL.
    pub download: Option<String>,
    pub rollout_id: Option<String>,
    /// Set when the server asks for a rollback to a bundle the device ran
    /// before (the only case where a lower sequence may be installed).
    #[serde(default)]
    pub rollback: bool,
}

/// Update lifecycle state as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Idle,
    Downloading,
    Verifying,
    Staged,
    SelfTesting,
    Shadowing,
    Watching,
    Committed,
    Failed,
    RolledBack,
}

/// Health numbers over the device's last reporting window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub inferences: u64,
    pub errors: u64,
    pub p95_latency_ms: Option<f64>,
}

/// `POST /api/v1/device/report`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub active: Option<BundleRef>,
    pub staged: Option<BundleRef>,
    pub last_failed: Option<BundleRef>,
    pub state: UpdateState,
    pub reason: Option<String>,
    #[serde(default)]
    pub health: Health,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_round_trips_with_snake_case_states() {
        let r = DeviceReport {
            active: Some(BundleRef {
                id: "ab".into(),
                name: "cls".into(),
                version: "1.0.0".into(),
                sequence: 3,
            }),
            staged: None,
            last_failed: None,
            state: UpdateState::RolledBack,
            reason: Some("p95 latency 80 ms > 40 ms".into()),
            health: Health::default(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"rolled_back\""), "{s}");
        assert_eq!(serde_json::from_str::<DeviceReport>(&s).unwrap(), r);
    }
}

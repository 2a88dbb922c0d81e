//! The device ↔ fleet-server protocol (v1, JSON over HTTP): enrollment,
//! desired state (written by the server) and reported state (written by the
//! device, which is the source of truth for what it runs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /api/v1/devices/enroll`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    pub device_id: String,
    pub credential: String,
}

/// A bundle as devices and reports refer to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundleRef {
    /// sha256 of the bundle file, hex: the content address.
    pub id: String,
    pub name: String,
    pub version: String,
    pub sequence: u64,
}

/// Health limits a device applies while it watches a newly activated
/// model, taken from the rollout's gates. Unset fields use the agent's
/// configured defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WatchPolicy {
    /// Errors / inferences over the watch window.
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// Absolute p95 latency limit, in milliseconds.
    #[serde(default)]
    pub max_p95_latency_ms: Option<f64>,
}

/// Run the candidate beside the active model on a sample of live requests
/// before activating it. The candidate never answers clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShadowRequest {
    /// Fraction of live requests mirrored to the candidate, in (0, 1].
    pub sample_rate: f64,
    /// Mirrored requests compared before deciding.
    pub samples: u32,
    /// Minimum top-1 agreement of the first output (classifiers).
    #[serde(default)]
    pub min_top1_agreement: Option<f64>,
    /// Largest allowed max-abs difference over all outputs.
    #[serde(default)]
    pub max_abs_diff: Option<f64>,
}

/// What the server wants a device to run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Health limits for the watch window after activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchPolicy>,
    /// Shadow the candidate before activating it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowRequest>,
    /// The fleet's newest trust document (after a key rotation). A device
    /// more than one version behind fetches the chain from `/api/v1/trust`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<crate::trust::SignedTrust>,
    /// The maintenance windows this device activates in (its own, its
    /// tag's or the rollout's). Downloads, verification and self-tests run
    /// at any time; only the swap waits. Unset: activate at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::window::Schedule>,
}

/// Update lifecycle state as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Idle,
    Downloading,
    /// Waiting for a condition on the device (e.g. free disk space) before
    /// it can go on; the report's `reason` says which and the numbers.
    Blocked,
    Verifying,
    Staged,
    SelfTesting,
    Shadowing,
    Watching,
    Committed,
    Failed,
    RolledBack,
    /// Downloaded, verified and self-tested; the activation waits for a
    /// maintenance window or for the local app (`reason` says which,
    /// `activate_at` when it may go on). Last: postcard encodes variants
    /// by index.
    Waiting,
}

impl UpdateState {
    /// Every state, in the machine's order (Prometheus state sets).
    pub const ALL: [UpdateState; 12] = [
        UpdateState::Idle,
        UpdateState::Downloading,
        UpdateState::Blocked,
        UpdateState::Verifying,
        UpdateState::Staged,
        UpdateState::SelfTesting,
        UpdateState::Shadowing,
        UpdateState::Waiting,
        UpdateState::Watching,
        UpdateState::Committed,
        UpdateState::Failed,
        UpdateState::RolledBack,
    ];

    /// The snake_case name, as in JSON (`rolled_back`).
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Idle => "idle",
            UpdateState::Downloading => "downloading",
            UpdateState::Blocked => "blocked",
            UpdateState::Verifying => "verifying",
            UpdateState::Staged => "staged",
            UpdateState::SelfTesting => "self_testing",
            UpdateState::Shadowing => "shadowing",
            UpdateState::Watching => "watching",
            UpdateState::Committed => "committed",
            UpdateState::Failed => "failed",
            UpdateState::RolledBack => "rolled_back",
            UpdateState::Waiting => "waiting",
        }
    }
}

/// Health numbers over the device's last reporting window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub inferences: u64,
    pub errors: u64,
    pub p95_latency_ms: Option<f64>,
}

/// How a shadowed candidate agreed with the active model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShadowAgreement {
    pub samples: u64,
    /// Fraction of samples whose first output's arg-max matched.
    pub top1_agreement: Option<f64>,
    pub max_abs_diff: f64,
}

/// `POST /api/v1/device/report`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceReport {
    pub active: Option<BundleRef>,
    pub staged: Option<BundleRef>,
    pub last_failed: Option<BundleRef>,
    pub state: UpdateState,
    pub reason: Option<String>,
    #[serde(default)]
    pub health: Health,
    /// The bundle the device falls back to (last known good).
    #[serde(default)]
    pub last_known_good: Option<BundleRef>,
    /// Set while and after shadowing a candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowAgreement>,
    /// Agent version, so the inventory follows agent upgrades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Failed transfer attempts for the current target since it last made
    /// progress (cut connections, corrupted or truncated bytes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// Set while the device runs degraded but serving:
    /// `insufficient_space: …` (its disk is full) or `store_io_error: …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// The trust version the device verifies bundles with (1: its
    /// configured keys; higher after rotations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_version: Option<u64>,
    /// While `waiting`: when the activation may go on (unix seconds; the
    /// next window opening or the end of the app's defer), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_at: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
            last_known_good: None,
            shadow: None,
            agent_version: None,
            retries: 0,
            degraded: None,
            trust_version: None,
            activate_at: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"rolled_back\""), "{s}");
        for st in [
            UpdateState::Idle,
            UpdateState::SelfTesting,
            UpdateState::RolledBack,
        ] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        assert_eq!(serde_json::from_str::<DeviceReport>(&s).unwrap(), r);
    }
}

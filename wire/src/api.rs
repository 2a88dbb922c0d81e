//! The operator API (`/api/v1/...`): every request and response body the
//! fleet server's handlers, `fleetctl`'s typed client and the console share.
//! One definition per shape: the server serializes these structs, the
//! OpenAPI document is derived from them, and clients deserialize them.
//!
//! The device protocol (enroll, desired, report) is in [`crate::device`].

pub mod v1 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use crate::device::{BundleRef, Health, ShadowAgreement, ShadowRequest, UpdateState};
    use crate::telemetry::{DeviceEvent, Telemetry};

    /// `POST /api/v1/enrollment-tokens`.
    #[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(deny_unknown_fields)]
    pub struct CreateEnrollmentToken {
        /// 1-64 of `[A-Za-z0-9._-]`.
        pub name: String,
        /// Seconds from now, at most 366 days.
        pub expires_in_secs: u64,
        /// Devices enrolled with it, at least 1.
        pub max_uses: u64,
        /// Tags every device enrolled with it gets.
        #[serde(default)]
        pub tags: BTreeMap<String, String>,
        /// Tag keys devices may set themselves. Default `["board"]`.
        #[serde(default = "default_allowed")]
        pub allowed_tags: Vec<String>,
    }

    fn default_allowed() -> Vec<String> {
        vec!["board".into()]
    }

    /// `GET /api/v1/trust`: the fleet's trust version now and the chain of
    /// signed documents since the configured keys (version 1).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct TrustView {
        pub version: u64,
        /// Public keys of this version, 64 hex characters each.
        pub keys: Vec<String>,
        pub threshold: u32,
        /// None for the configured keys (version 1).
        pub expires_at: Option<u64>,
        /// Versions 2.. in order; empty before the first rotation.
        pub chain: Vec<crate::trust::SignedTrust>,
    }

    /// A token as listed (never the secret or its hash).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct EnrollmentTokenView {
        pub name: String,
        pub tags: BTreeMap<String, String>,
        pub allowed_tags: Vec<String>,
        pub expires_at: u64,
        pub max_uses: u64,
        pub uses: u64,
        pub created_at: u64,
        pub created_by: String,
        pub revoked_at: Option<u64>,
    }

    /// The answer to a create: the only time the secret is shown.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct CreatedEnrollmentToken {
        pub token: String,
        #[serde(flatten)]
        pub view: EnrollmentTokenView,
    }

    /// Every error response: `{"error": {"code", "message"}}`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct ErrorBody {
        pub error: ErrorDetail,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct ErrorDetail {
        /// Stable and machine-readable, e.g. `bad_signature`, `expired`,
        /// `malformed_json`, `not_found`, `rate_limited`.
        pub code: String,
        /// Safe to show to the caller; details stay in the server log.
        pub message: String,
    }

    impl ErrorBody {
        pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorBody {
            ErrorBody {
                error: ErrorDetail {
                    code: code.into(),
                    message: message.into(),
                },
            }
        }
    }

    /// A bundle in the registry (`POST/GET /api/v1/bundles`).
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct BundleView {
        /// sha256 of the bundle file, hex: its content address.
        pub id: String,
        pub name: String,
        pub version: String,
        pub sequence: u64,
        pub size: u64,
        /// `onnx` or `nnef`.
        pub format: String,
        pub targets: Vec<String>,
        pub expires_at: u64,
        pub uploaded_at: u64,
        pub uploaded_by: String,
    }

    impl BundleView {
        pub fn to_ref(&self) -> BundleRef {
            BundleRef {
                id: self.id.clone(),
                name: self.name.clone(),
                version: self.version.clone(),
                sequence: self.sequence,
            }
        }
    }

    /// A device as operators see it (`GET /api/v1/devices/{id}`); never
    /// its credential or the credential's hash.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct DeviceView {
        pub id: String,
        pub tags: BTreeMap<String, String>,
        pub arch: String,
        pub agent_version: String,
        pub enrolled_at: u64,
        pub last_seen: Option<u64>,
        /// What the server wants it to run.
        pub desired: Option<BundleRef>,
        pub rollout: Option<String>,
        /// What the device reports running: the source of truth.
        pub active: Option<BundleRef>,
        pub staged: Option<BundleRef>,
        pub last_failed: Option<BundleRef>,
        pub state: Option<UpdateState>,
        pub reason: Option<String>,
        /// Failed transfer attempts for the current target since its
        /// download last made progress.
        #[serde(default)]
        pub retries: u32,
        /// Set while the device runs degraded but serving (a full disk:
        /// `insufficient_space: …`).
        #[serde(default)]
        pub degraded: Option<String>,
        /// The trust version the device verifies bundles with (reported).
        #[serde(default)]
        pub trust_version: Option<u64>,
        pub health: Option<Health>,
        pub last_known_good: Option<BundleRef>,
        pub shadow: Option<ShadowAgreement>,
        /// From MQTT (state topic, Last Will).
        pub online: Option<bool>,
        pub telemetry: Option<Telemetry>,
        /// The most recent lifecycle events (MQTT).
        pub events: Vec<DeviceEvent>,
    }

    /// `PATCH /api/v1/devices/{id}`: replaces the device's tags.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(deny_unknown_fields)]
    pub struct PatchDevice {
        pub tags: BTreeMap<String, String>,
    }

    /// One privileged action, append-only (`GET /api/v1/audit`).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct AuditEntry {
        pub at: u64,
        /// The token's name (`ops`), or `device:<id>`.
        pub who: String,
        pub action: String,
        pub target: String,
    }

    /// One canary stage: the share of the selected fleet that runs the
    /// bundle once the stage starts, and how long it bakes.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct Stage {
        /// 1..=100, strictly increasing, the last one 100.
        pub percent: u8,
        pub bake_minutes: u32,
        /// Finer than minutes (demos, labs); wins over `bake_minutes` when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub bake_seconds: Option<u32>,
    }

    impl Stage {
        /// The bake time in seconds.
        pub fn bake_secs(&self) -> u64 {
            self.bake_seconds
                .map_or(u64::from(self.bake_minutes) * 60, u64::from)
        }
    }

    /// Health gates checked over the devices already in the rollout. The
    /// latency and error-rate gates also become the devices' own watch
    /// limits, so a device rolls back on the numbers that would pause the
    /// rollout.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(default, deny_unknown_fields)]
    pub struct Gates {
        /// 0..=100.
        pub max_failed_devices_pct: Option<f64>,
        /// 0..=100.
        pub max_rollback_pct: Option<f64>,
        /// Milliseconds, > 0.
        pub max_p95_latency_ms: Option<f64>,
        /// 0..=1.
        pub max_error_rate: Option<f64>,
        /// Devices that must run the bundle and report before a stage
        /// passes. Default: every device of the stage that is online.
        pub min_reporting_devices: Option<u32>,
    }

    /// `POST /api/v1/rollouts`.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(deny_unknown_fields)]
    pub struct CreateRollout {
        /// Bundle id (sha256) as returned by `POST /api/v1/bundles`.
        pub bundle: String,
        /// Tags a device must all carry. Empty: every device.
        #[serde(default)]
        pub selector: BTreeMap<String, String>,
        pub stages: Vec<Stage>,
        #[serde(default)]
        pub gates: Gates,
        /// Shadow the candidate on live traffic before activating it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shadow: Option<ShadowRequest>,
    }

    /// Lifecycle of a rollout.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(tag = "state", rename_all = "snake_case")]
    pub enum Phase {
        Running { stage: usize, stage_started: u64 },
        Paused { stage: usize, stage_started: u64 },
        Completed { at: u64 },
        Aborted { at: u64 },
    }

    impl Phase {
        pub fn name(&self) -> &'static str {
            match self {
                Phase::Running { .. } => "running",
                Phase::Paused { .. } => "paused",
                Phase::Completed { .. } => "completed",
                Phase::Aborted { .. } => "aborted",
            }
        }

        /// The current stage of a running or paused rollout.
        pub fn stage(&self) -> Option<usize> {
            match self {
                Phase::Running { stage, .. } | Phase::Paused { stage, .. } => Some(*stage),
                _ => None,
            }
        }

        /// Completed or aborted: nothing will change any more.
        pub fn is_final(&self) -> bool {
            matches!(self, Phase::Completed { .. } | Phase::Aborted { .. })
        }
    }

    /// Why the controller (or an operator) advanced, paused, completed or
    /// stopped a rollout: the gate, its threshold, what was observed and on
    /// which devices.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct Decision {
        pub at: u64,
        /// `advance`, `pause`, `complete`, `resume`, `abort`, `promote`, `supersede`.
        pub action: String,
        /// The gate, e.g. `max_p95_latency_ms`; `operator` for manual actions.
        pub gate: String,
        pub threshold: Option<f64>,
        pub observed: Option<f64>,
        /// Device ids the decision is about (at most [`DECISION_DEVICES`]).
        pub devices: Vec<String>,
        /// How many devices the decision is about in all.
        #[serde(default)]
        pub device_count: u64,
        pub message: String,
    }

    /// Device ids kept in one decision: the record must not grow with the
    /// fleet.
    pub const DECISION_DEVICES: usize = 20;

    impl Decision {
        /// A decision about `devices`, of which the first
        /// [`DECISION_DEVICES`] are kept by id and all are counted.
        pub fn new(
            at: u64,
            action: &str,
            gate: &str,
            threshold: Option<f64>,
            observed: Option<f64>,
            mut devices: Vec<String>,
            message: String,
        ) -> Decision {
            let device_count = devices.len() as u64;
            devices.truncate(DECISION_DEVICES);
            Decision {
                at,
                action: action.into(),
                gate: gate.into(),
                threshold,
                observed,
                devices,
                device_count,
                message,
            }
        }
    }

    /// Progress of one stage.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct StageProgress {
        pub percent: u8,
        pub bake_minutes: u32,
        /// The bake time in seconds.
        pub bake_seconds: u64,
        /// Devices in the stage (cumulative: stage 2 includes stage 1's).
        pub devices: u64,
        /// Running the bundle.
        pub running: u64,
        /// Neither running it nor failed on it yet.
        pub pending: u64,
        /// Refused it (verification, self-test, shadow).
        pub failed: u64,
        /// Activated it and rolled back on their own.
        pub rolled_back: u64,
        /// Pending devices whose MQTT state says offline.
        #[serde(default)]
        pub offline: u64,
    }

    /// A rollout with its progress (`GET /api/v1/rollouts/{id}`).
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct RolloutView {
        pub id: String,
        pub bundle: BundleRef,
        pub selector: BTreeMap<String, String>,
        pub gates: Gates,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shadow: Option<ShadowRequest>,
        pub phase: Phase,
        pub created_at: u64,
        pub stages: Vec<StageProgress>,
        /// Every automatic or operator decision, oldest first.
        pub decisions: Vec<Decision>,
    }

    /// `POST /api/v1/rollouts/{id}/{action}`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(rename_all = "snake_case")]
    pub enum RolloutAction {
        Pause,
        Resume,
        Abort,
        Promote,
    }

    impl RolloutAction {
        pub fn as_str(self) -> &'static str {
            match self {
                RolloutAction::Pause => "pause",
                RolloutAction::Resume => "resume",
                RolloutAction::Abort => "abort",
                RolloutAction::Promote => "promote",
            }
        }

        pub fn parse(s: &str) -> Option<RolloutAction> {
            Some(match s {
                "pause" => RolloutAction::Pause,
                "resume" => RolloutAction::Resume,
                "abort" => RolloutAction::Abort,
                "promote" => RolloutAction::Promote,
                _ => return None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn phases_keep_their_tagged_json_form() {
        let p = Phase::Running {
            stage: 1,
            stage_started: 5,
        };
        let s = serde_json::to_string(&p).unwrap_or_default();
        assert_eq!(s, r#"{"state":"running","stage":1,"stage_started":5}"#);
        assert_eq!(serde_json::from_str::<Phase>(&s).ok(), Some(p));
    }

    #[test]
    fn create_rollout_refuses_unknown_fields_and_defaults_the_rest() {
        let ok: CreateRollout =
            serde_json::from_str(r#"{"bundle":"ab","stages":[{"percent":100,"bake_minutes":0}]}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(ok.selector.is_empty() && ok.gates == Gates::default() && ok.shadow.is_none());
        assert!(
            serde_json::from_str::<CreateRollout>(r#"{"bundle":"ab","stages":[],"typo":1}"#)
                .is_err()
        );
    }

    #[test]
    fn actions_round_trip_through_their_names() {
        for a in [
            RolloutAction::Pause,
            RolloutAction::Resume,
            RolloutAction::Abort,
            RolloutAction::Promote,
        ] {
            assert_eq!(RolloutAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(RolloutAction::parse("explode"), None);
    }
}

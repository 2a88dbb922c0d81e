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
        /// While `waiting`: when the activation may go on (unix seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub activate_at: Option<u64>,
        /// The maintenance windows in its desired state and where they
        /// come from (`device`, `tag site=berlin`, `rollout`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub window: Option<WindowEntry>,
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
        /// Devices activate only inside these maintenance windows (unless
        /// their own device or tag windows say otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub window: Option<crate::window::Schedule>,
    }

    /// Maintenance windows set on a device or a tag (`GET
    /// /api/v1/windows`; `PUT /api/v1/windows/{scope}` takes the schedule).
    /// A device's desired state carries the first that applies: its own,
    /// then its tags' (in tag order), then its rollout's.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct WindowEntry {
        /// `device:<id>`, `tag:<key>=<value>`, or `rollout` (read only).
        pub scope: String,
        pub schedule: crate::window::Schedule,
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
    /// `GET /api/v1/summary`: the fleet at a glance (the console's
    /// overview). Devices are counted by reported update state
    /// (`unreported` before the first report), by the model they run
    /// (`name@version`, `none`), by board tag (`none`) and by MQTT
    /// presence (`online`, `offline`, `unknown` without MQTT).
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct FleetSummary {
        pub devices: u64,
        pub by_state: BTreeMap<String, u64>,
        pub by_version: BTreeMap<String, u64>,
        pub by_board: BTreeMap<String, u64>,
        pub by_presence: BTreeMap<String, u64>,
        /// Rollouts by phase (`running`, `paused`, `completed`, `aborted`).
        pub rollouts: BTreeMap<String, u64>,
    }

    /// One point of a device's recent telemetry
    /// (`GET /api/v1/devices/{id}/telemetry`), kept in memory by the
    /// server: the last [`TELEMETRY_POINTS`] records heard over MQTT.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct TelemetryPoint {
        /// Unix seconds at the end of the interval.
        pub at: u64,
        /// The model that served the interval (`name@version`).
        pub model: Option<String>,
        pub inferences_per_sec: f32,
        pub errors: u32,
        pub p95_latency_ms: Option<f32>,
        pub cpu_pct: f32,
        pub temperature_c: Option<f32>,
        /// The highest drift PSI over the model's inputs.
        pub drift_psi_max: Option<f32>,
    }

    /// What an experiment compares, per arm. `lower` is better for every
    /// metric but `reward` (the application's own outcome, higher better).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(rename_all = "snake_case")]
    pub enum Metric {
        LatencyP50Ms,
        LatencyP95Ms,
        ErrorRate,
        DriftPsi,
        Reward,
    }

    impl Metric {
        pub const ALL: [Metric; 5] = [
            Metric::LatencyP50Ms,
            Metric::LatencyP95Ms,
            Metric::ErrorRate,
            Metric::DriftPsi,
            Metric::Reward,
        ];

        pub fn as_str(self) -> &'static str {
            match self {
                Metric::LatencyP50Ms => "latency_p50_ms",
                Metric::LatencyP95Ms => "latency_p95_ms",
                Metric::ErrorRate => "error_rate",
                Metric::DriftPsi => "drift_psi",
                Metric::Reward => "reward",
            }
        }

        /// Whether a higher value is better.
        pub fn higher_is_better(self) -> bool {
            matches!(self, Metric::Reward)
        }
    }

    /// How devices are split between the arms.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(rename_all = "snake_case")]
    pub enum Allocation {
        /// `split_pct` of each board's devices on B, for the whole run.
        #[default]
        Fixed,
        /// Thompson sampling on the primary metric: devices move toward the
        /// arm more likely to be better, within `min_share` and
        /// `max_switches_per_hour`.
        Thompson,
    }

    /// Stop the experiment (and send B's devices back to A) when B is
    /// worse than A on `metric` by more than `max_worse_pct` percent of A's
    /// mean, with the experiment's confidence.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(deny_unknown_fields)]
    pub struct Guardrail {
        pub metric: Metric,
        pub max_worse_pct: f64,
    }

    /// `POST /api/v1/experiments`.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(deny_unknown_fields)]
    pub struct CreateExperiment {
        /// 1-64 of [A-Za-z0-9._-].
        pub name: String,
        /// Arm A, the control: a bundle id, a unique prefix, or NAME@VERSION.
        pub a: String,
        /// Arm B, the candidate. With the same model name as A, its
        /// sequence must be higher (devices return to A as a rollback).
        pub b: String,
        /// Tags a device must all carry. Empty: every device.
        #[serde(default)]
        pub selector: BTreeMap<String, String>,
        /// Percent of each board's devices on B (fixed allocation; the
        /// bandit's start). Default 50.
        #[serde(default)]
        pub split_pct: Option<f64>,
        #[serde(default)]
        pub allocation: Allocation,
        /// The metric the verdict and the bandit follow. Default
        /// `latency_p95_ms`.
        #[serde(default)]
        pub primary: Option<Metric>,
        #[serde(default)]
        pub guardrail: Option<Guardrail>,
        /// Of the confidence sequences. Default 0.95.
        #[serde(default)]
        pub confidence: Option<f64>,
        /// Bandit: the least share of devices each arm keeps. Default 0.1.
        #[serde(default)]
        pub min_share: Option<f64>,
        /// Bandit: arm changes per device per hour at most (each costs a
        /// download and a swap). Default 1.
        #[serde(default)]
        pub max_switches_per_hour: Option<u32>,
    }

    /// One arm's numbers for one metric.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct ArmEstimate {
        /// Observations: telemetry intervals of the arm's devices.
        pub n: u64,
        pub mean: Option<f64>,
        /// The always-valid confidence sequence for the mean.
        pub low: Option<f64>,
        pub high: Option<f64>,
    }

    /// The verdict on one metric: B − A with an always-valid interval.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct MetricVerdict {
        pub metric: Metric,
        pub higher_is_better: bool,
        pub a: ArmEstimate,
        pub b: ArmEstimate,
        /// mean(B) − mean(A).
        pub effect: Option<f64>,
        pub effect_low: Option<f64>,
        pub effect_high: Option<f64>,
        /// The effect relative to A's mean, in percent.
        pub effect_pct: Option<f64>,
        /// The interval excludes 0.
        pub significant: bool,
        /// `a` or `b` when significant.
        pub better: Option<String>,
    }

    /// Where an experiment is.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(tag = "state", rename_all = "snake_case")]
    pub enum ExperimentPhase {
        Running,
        /// By an operator or the guardrail; B's devices went back to A.
        Stopped {
            at: u64,
            reason: String,
        },
        /// `winner` became a rollout (`rollout`), or A was kept.
        Concluded {
            at: u64,
            winner: String,
            rollout: Option<String>,
        },
    }

    /// `GET /api/v1/experiments/{id}`.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    pub struct ExperimentView {
        pub id: String,
        pub name: String,
        pub a: BundleRef,
        pub b: BundleRef,
        pub selector: BTreeMap<String, String>,
        pub allocation: Allocation,
        pub split_pct: f64,
        pub primary: Metric,
        pub guardrail: Option<Guardrail>,
        pub confidence: f64,
        pub phase: ExperimentPhase,
        pub created_at: u64,
        /// Devices assigned to each arm now.
        pub devices_a: u64,
        pub devices_b: u64,
        /// Devices assigned to B by board.
        pub b_share_by_board: BTreeMap<String, f64>,
        pub verdicts: Vec<MetricVerdict>,
        /// The verdict in words.
        pub summary: String,
        pub decisions: Vec<Decision>,
    }

    /// `POST /api/v1/experiments/{id}/conclude`.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
    #[serde(deny_unknown_fields)]
    pub struct ConcludeExperiment {
        /// `a` or `b`; default: the arm significantly better on the
        /// primary metric (409 when there is none yet).
        #[serde(default)]
        pub winner: Option<String>,
        /// The winner's rollout stages (default: one stage, 100 %).
        #[serde(default)]
        pub stages: Option<Vec<Stage>>,
        #[serde(default)]
        pub gates: Option<Gates>,
    }

    /// Telemetry points the server keeps per device.
    pub const TELEMETRY_POINTS: usize = 60;

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
        /// Ready (downloaded and self-tested) but waiting for a maintenance
        /// window or their local app: neither pending nor failed.
        #[serde(default)]
        pub waiting: u64,
        /// The earliest time one of them may activate (unix seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub next_window: Option<u64>,
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub window: Option<crate::window::Schedule>,
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

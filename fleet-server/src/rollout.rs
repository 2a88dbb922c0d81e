//! Staged rollouts: the pure controller.
//!
//! [`next`] is the single transition function `(rollout, fleet, command,
//! now) -> (rollout, effects)`. It does no I/O and takes the clock as an
//! argument, so tests drive it with a fake clock; the driver
//! ([`crate::controller`]) persists the result and applies the effects
//! (desired-state changes). Every automatic advance, pause or completion
//! records a [`Decision`] naming the gate, the threshold, the observed
//! value and the devices.
//!
//! The rollout record does not grow with the fleet: what a device ran
//! before joining (for abort) is kept on the device, and decisions keep at
//! most [`edgefleet_wire::api::v1::DECISION_DEVICES`] ids with a count.

use std::collections::BTreeMap;

use edgefleet_wire::device::{BundleRef, Health, UpdateState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use edgefleet_wire::api::v1::{Decision, Gates, Phase, Stage};

/// What an operator asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub bundle: BundleRef,
    /// Tags a device must all carry (`board=rpi4`, ...). Empty: every device.
    pub selector: BTreeMap<String, String>,
    pub stages: Vec<Stage>,
    pub gates: Gates,
    /// Devices shadow the candidate on live traffic before activating it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<edgefleet_wire::device::ShadowRequest>,
    /// Devices activate only inside these maintenance windows (their own
    /// device or tag windows come first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<edgefleet_wire::window::Schedule>,
}

/// Checks a maintenance schedule the way devices will read it: every
/// window parses and a named zone exists in the server's tz database.
pub fn validate_window(s: &edgefleet_wire::window::Schedule) -> Result<(), String> {
    s.compile().map_err(|e| e.to_string())?;
    s.zone(&jiff::tz::TimeZone::UTC)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A rollout and why it is where it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub phase: Phase,
    pub created_at: u64,
    pub decisions: Vec<Decision>,
}

/// A device as the controller sees it: identity, tags, what it reports and
/// whether it can be heard.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceStatus {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub active: Option<BundleRef>,
    pub last_failed: Option<BundleRef>,
    pub state: Option<UpdateState>,
    pub health: Health,
    pub last_seen: Option<u64>,
    /// Offline over MQTT, or silent for longer than the server's
    /// `offline_after_secs`.
    pub offline: bool,
    /// The rollout it joined and what it ran before (for abort).
    pub joined: Option<(String, Option<BundleRef>)>,
    /// The bundle it is installing (reported).
    pub staged: Option<BundleRef>,
    /// While `waiting`: when it may activate (reported).
    pub activate_at: Option<u64>,
}

/// A desired-state change for one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    pub device: String,
    pub bundle: Option<BundleRef>,
    /// Set on abort: a return to a bundle the device already ran.
    pub rollback: bool,
    /// The device joins this rollout now, having run this before.
    pub joins: Option<Option<BundleRef>>,
}

/// Inputs to [`next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Periodic evaluation.
    Tick,
    Pause,
    Resume,
    Abort,
    /// Skip the rest of the current stage's bake time.
    Promote,
    /// A newer rollout now targets some of this rollout's devices: stop
    /// without sending anyone back (the newer rollout sets their desired
    /// state).
    Supersede,
}

/// Disallowed transitions.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error("the rollout is {0}; it cannot be {1}")]
    NotAllowed(&'static str, &'static str),
    #[error("invalid rollout: {0}")]
    Invalid(String),
}

/// The documented range of every gate.
pub const GATE_RANGES: [(&str, f64, f64); 4] = [
    ("max_failed_devices_pct", 0.0, 100.0),
    ("max_rollback_pct", 0.0, 100.0),
    ("max_p95_latency_ms", 0.0, 3_600_000.0),
    ("max_error_rate", 0.0, 1.0),
];

impl RolloutSpec {
    /// Stages must grow strictly and end at 100%; gates and shadow settings
    /// must lie within their documented ranges.
    pub fn validate(&self) -> Result<(), RolloutError> {
        let bad = |m: String| Err(RolloutError::Invalid(m));
        if self.stages.is_empty() {
            return bad("at least one stage is required".into());
        }
        if self.stages.len() > 20 {
            return bad("at most 20 stages".into());
        }
        let mut last = 0;
        for s in &self.stages {
            if s.percent == 0 || s.percent > 100 || s.percent <= last {
                return bad(format!(
                    "stage percents must increase within 1..=100, got {:?}",
                    self.stages.iter().map(|s| s.percent).collect::<Vec<_>>()
                ));
            }
            last = s.percent;
        }
        if last != 100 {
            return bad("the last stage must be 100%".into());
        }
        let g = &self.gates;
        for ((name, lo, hi), v) in GATE_RANGES.iter().zip([
            g.max_failed_devices_pct,
            g.max_rollback_pct,
            g.max_p95_latency_ms,
            g.max_error_rate,
        ]) {
            if v.is_some_and(|v| !v.is_finite() || v < *lo || v > *hi) {
                return bad(format!("gate {name} must be a number within {lo}..={hi}"));
            }
        }
        if g.max_p95_latency_ms == Some(0.0) {
            return bad("gate max_p95_latency_ms must be above 0".into());
        }
        if let Some(s) = &self.shadow {
            if !(s.sample_rate > 0.0 && s.sample_rate <= 1.0) {
                return bad("shadow sample_rate must be within (0, 1]".into());
            }
            if s.samples == 0 || s.samples > 1_000_000 {
                return bad("shadow samples must be within 1..=1000000".into());
            }
            if s.min_top1_agreement
                .is_some_and(|v| !(0.0..=1.0).contains(&v))
            {
                return bad("shadow min_top1_agreement must be within 0..=1".into());
            }
            if s.max_abs_diff.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return bad("shadow max_abs_diff must be a non-negative number".into());
            }
        }
        if let Some(w) = &self.window {
            validate_window(w).map_err(|e| RolloutError::Invalid(format!("window: {e}")))?;
        }
        Ok(())
    }
}

/// Stable position of a device within a rollout, in `[0, 2^64)`.
pub fn device_rank(device_id: &str, rollout_id: &str) -> u64 {
    let h = Sha256::digest(format!("{device_id}\0{rollout_id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b)
}

/// Whether a device's tags match a selector.
pub fn selects(selector: &BTreeMap<String, String>, tags: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// Devices selected by the rollout, in the order they join it. Devices are
/// grouped by their `board` tag and each group contributes its own share,
/// so every stage includes every board type the selector matches.
pub fn targets_for_stage<'a>(
    r: &Rollout,
    fleet: &'a [DeviceStatus],
    stage: usize,
) -> Vec<&'a DeviceStatus> {
    let percent = u64::from(r.spec.stages.get(stage).map_or(100, |s| s.percent));
    let mut groups: BTreeMap<Option<&str>, Vec<&DeviceStatus>> = BTreeMap::new();
    for d in fleet {
        if selects(&r.spec.selector, &d.tags) {
            groups
                .entry(d.tags.get("board").map(String::as_str))
                .or_default()
                .push(d);
        }
    }
    let mut out = Vec::new();
    for (_, mut g) in groups {
        // One hash per device, not one per comparison.
        g.sort_by_cached_key(|d| (device_rank(&d.id, &r.id), d.id.clone()));
        let take = (g.len() as u64 * percent).div_ceil(100) as usize;
        out.extend(g.into_iter().take(take));
    }
    out
}

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// How a device in a stage stands with the rollout's bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Runs it and reported so since `since`.
    Running,
    /// Refused it (verification, self-test, shadow, transfer).
    Failed,
    /// Activated it and rolled back on its own.
    RolledBack,
    /// Cannot be heard; accounted for, not waited for.
    Offline,
    /// Installed it and waits for a maintenance window (or its local app)
    /// to activate it: neither failed nor stalled.
    Waiting,
    /// None of the above yet.
    Pending,
}

/// Where `d` stands with `bundle`, counting reports after `since` only.
pub fn standing(d: &DeviceStatus, bundle: &BundleRef, since: u64) -> Standing {
    let failed_on = d.last_failed.as_ref().is_some_and(|f| f.id == bundle.id);
    let runs = d.active.as_ref().is_some_and(|a| a.id == bundle.id);
    match d.state {
        Some(UpdateState::Failed) if failed_on && !runs => return Standing::Failed,
        Some(UpdateState::RolledBack) if failed_on && !runs => return Standing::RolledBack,
        _ => {}
    }
    // Strictly after (clock in seconds): a report from the same second may
    // predate the stage.
    if runs && d.last_seen.is_some_and(|t| t > since) {
        return Standing::Running;
    }
    if d.offline {
        return Standing::Offline;
    }
    if d.state == Some(UpdateState::Waiting) && d.staged.as_ref().is_some_and(|s| s.id == bundle.id)
    {
        return Standing::Waiting;
    }
    Standing::Pending
}

/// Counts of a set of devices by [`Standing`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub running: usize,
    pub failed: usize,
    pub rolled_back: usize,
    pub offline: usize,
    pub pending: usize,
    pub waiting: usize,
    /// The earliest `activate_at` of the waiting devices.
    pub next_window: Option<u64>,
}

impl Tally {
    pub fn of(devices: &[&DeviceStatus], bundle: &BundleRef, since: u64) -> Tally {
        let mut t = Tally::default();
        for d in devices {
            match standing(d, bundle, since) {
                Standing::Running => t.running += 1,
                Standing::Failed => t.failed += 1,
                Standing::RolledBack => t.rolled_back += 1,
                Standing::Offline => t.offline += 1,
                Standing::Pending => t.pending += 1,
                Standing::Waiting => {
                    t.waiting += 1;
                    if let Some(at) = d.activate_at {
                        t.next_window = Some(t.next_window.map_or(at, |n| n.min(at)));
                    }
                }
            }
        }
        t
    }

    pub fn total(&self) -> usize {
        self.running + self.failed + self.rolled_back + self.offline + self.pending + self.waiting
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{} running, {} failed, {} rolled back, {} offline, {} pending",
            self.running, self.failed, self.rolled_back, self.offline, self.pending
        );
        if self.waiting > 0 {
            s.push_str(&format!(", {} {}", self.waiting, self.waiting_words()));
        }
        s
    }

    /// `waiting for window (next: 2026-12-04T02:00:00Z)`.
    pub fn waiting_words(&self) -> String {
        match self.next_window {
            Some(at) => format!(
                "waiting for window (next: {})",
                jiff::Timestamp::from_second(at as i64)
                    .map_or_else(|_| at.to_string(), |t| t.to_string())
            ),
            None => "waiting for window".to_string(),
        }
    }
}

/// Checks the gates over the devices already in the rollout. Returns the
/// first breach as a decision.
fn breached(r: &Rollout, cohort: &[&DeviceStatus], now: u64) -> Option<Decision> {
    let b = &r.spec.bundle;
    let g = &r.spec.gates;
    let on_bundle = |d: &&&DeviceStatus| d.active.as_ref().is_some_and(|a| a.id == b.id);
    let failed_with = |d: &&&DeviceStatus, st: UpdateState| {
        d.state == Some(st) && d.last_failed.as_ref().is_some_and(|f| f.id == b.id)
    };
    let decision =
        |gate: &str, threshold: f64, observed: f64, devices: Vec<String>, what: String| {
            Decision::new(
                now,
                "pause",
                gate,
                Some(threshold),
                Some(observed),
                devices,
                what,
            )
        };
    let ids = |it: Vec<&&DeviceStatus>| it.into_iter().map(|d| d.id.clone()).collect::<Vec<_>>();

    if let Some(max) = g.max_failed_devices_pct {
        let bad: Vec<_> = cohort
            .iter()
            .filter(|d| failed_with(d, UpdateState::Failed))
            .collect();
        let p = pct(bad.len(), cohort.len());
        if !bad.is_empty() && p > max {
            return Some(decision(
                "max_failed_devices_pct",
                max,
                p,
                ids(bad),
                format!("{p:.1}% of devices failed to install (max {max}%)"),
            ));
        }
    }
    if let Some(max) = g.max_rollback_pct {
        let bad: Vec<_> = cohort
            .iter()
            .filter(|d| failed_with(d, UpdateState::RolledBack))
            .collect();
        let p = pct(bad.len(), cohort.len());
        if !bad.is_empty() && p > max {
            return Some(decision(
                "max_rollback_pct",
                max,
                p,
                ids(bad),
                format!("{p:.1}% of devices rolled back (max {max}%)"),
            ));
        }
    }
    if let Some(max) = g.max_p95_latency_ms {
        let bad: Vec<_> = cohort
            .iter()
            .filter(on_bundle)
            .filter(|d| d.health.p95_latency_ms.is_some_and(|p| p > max))
            .collect();
        if !bad.is_empty() {
            let worst = bad
                .iter()
                .filter_map(|d| d.health.p95_latency_ms)
                .fold(0.0, f64::max);
            return Some(decision(
                "max_p95_latency_ms",
                max,
                worst,
                ids(bad),
                format!("p95 latency {worst:.1} ms above {max} ms"),
            ));
        }
    }
    if let Some(max) = g.max_error_rate {
        let running: Vec<_> = cohort.iter().filter(on_bundle).collect();
        let (inf, err) = running.iter().fold((0u64, 0u64), |(i, e), d| {
            (i + d.health.inferences, e + d.health.errors)
        });
        if inf > 0 {
            let rate = err as f64 / inf as f64;
            if rate > max {
                let bad = running
                    .into_iter()
                    .filter(|d| d.health.errors > 0)
                    .collect();
                return Some(decision(
                    "max_error_rate",
                    max,
                    rate,
                    ids(bad),
                    format!("error rate {rate:.4} above {max}"),
                ));
            }
        }
    }
    None
}

/// Desired-state changes for the devices of a stage; devices that join the
/// rollout now bring what they ran before.
fn desired_effects(r: &Rollout, targets: &[&DeviceStatus]) -> Vec<Effect> {
    targets
        .iter()
        .map(|d| Effect {
            device: d.id.clone(),
            bundle: Some(r.spec.bundle.clone()),
            rollback: false,
            joins: match &d.joined {
                Some((id, _)) if *id == r.id => None,
                _ => Some(d.active.clone()),
            },
        })
        .collect()
}

fn operator(now: u64, action: &str) -> Decision {
    Decision::new(
        now,
        action,
        "operator",
        None,
        None,
        Vec::new(),
        format!("{action} by operator"),
    )
}

/// How long a baked stage may wait for devices that neither settle nor go
/// offline before that becomes a recorded pause.
pub fn settle_timeout(bake: u64) -> u64 {
    (3 * bake).max(600)
}

/// The transition function. See the module docs.
pub fn next(
    r: &Rollout,
    fleet: &[DeviceStatus],
    cmd: Command,
    now: u64,
) -> Result<(Rollout, Vec<Effect>), RolloutError> {
    let mut out = r.clone();
    let mut effects = Vec::new();
    match (cmd, &r.phase) {
        (
            Command::Tick,
            Phase::Running {
                stage,
                stage_started,
            },
        ) => {
            let (stage, started) = (*stage, *stage_started);
            let targets = targets_for_stage(r, fleet, stage);
            // Devices that enrolled after this stage started join it now.
            effects.extend(desired_effects(r, &targets));
            if let Some(decision) = breached(r, &targets, now) {
                out.phase = Phase::Paused {
                    stage,
                    stage_started: started,
                };
                out.decisions.push(decision);
                return Ok((out, effects));
            }
            let bake = r.spec.stages[stage].bake_secs();
            if now < started + bake {
                return Ok((out, effects));
            }
            let tally = Tally::of(&targets, &r.spec.bundle, started);
            let last = stage + 1 == r.spec.stages.len();
            // Every device must settle (run it and report, fail on it, or
            // be offline) — except that an explicit minimum lets a canary
            // stage go on once that many run it. The last stage always
            // waits for everyone: "completed" accounts for every device.
            // A stage with no device yet waits for devices to enroll.
            //
            // Devices waiting for a maintenance window are settled but not
            // done: a canary stage goes on once at least one device runs
            // the bundle (someone must have judged it) and the rest run it,
            // failed, are offline or wait; the last stage waits for them
            // to activate. Either way waiting is never a reason to pause.
            let needed = match r.spec.gates.min_reporting_devices {
                Some(min) if !last => (min as usize).min(targets.len().max(1)),
                Some(min) => (min as usize).min(targets.len() - tally.offline),
                None => 0,
            };
            let enough = !targets.is_empty()
                && match r.spec.gates.min_reporting_devices {
                    Some(_) if !last => tally.running >= needed,
                    Some(_) => tally.pending == 0 && tally.waiting == 0 && tally.running >= needed,
                    None if last => tally.pending == 0 && tally.waiting == 0,
                    None => tally.pending == 0 && (tally.waiting == 0 || tally.running > 0),
                };
            // Short only by devices that wait for their window: hold.
            let held_by_windows = tally.waiting > 0
                && tally.pending == 0
                && tally.running + tally.waiting >= needed.max(1);
            if !enough && held_by_windows {
                return Ok((out, effects));
            }
            if !enough {
                // Devices that never settle hold the stage; after a while
                // that becomes a recorded pause naming them.
                if now >= started + settle_timeout(bake) {
                    let waiting: Vec<String> = targets
                        .iter()
                        .filter(|d| standing(d, &r.spec.bundle, started) == Standing::Pending)
                        .map(|d| d.id.clone())
                        .collect();
                    let min = r
                        .spec
                        .gates
                        .min_reporting_devices
                        .map_or(targets.len() - tally.offline, |m| m as usize);
                    out.phase = Phase::Paused {
                        stage,
                        stage_started: started,
                    };
                    let message = if targets.is_empty() {
                        format!(
                            "no device matches the selector {:?} after {} s",
                            r.spec.selector,
                            now - started
                        )
                    } else {
                        format!(
                            "only {} device(s) reported on the new bundle after {} s, {min} required ({})",
                            tally.running,
                            now - started,
                            tally.summary()
                        )
                    };
                    out.decisions.push(Decision::new(
                        now,
                        "pause",
                        "min_reporting_devices",
                        Some(min.max(1) as f64),
                        Some(tally.running as f64),
                        waiting,
                        message,
                    ));
                }
                return Ok((out, effects));
            }
            let explain = |action: &str, devices: Vec<String>, message: String| {
                Decision::new(
                    now,
                    action,
                    "bake",
                    Some(bake as f64),
                    Some(tally.running as f64),
                    devices,
                    message,
                )
            };
            if !last {
                out.phase = Phase::Running {
                    stage: stage + 1,
                    stage_started: now,
                };
                let next_targets = targets_for_stage(r, fleet, stage + 1);
                let joining: Vec<String> = next_targets
                    .iter()
                    .filter(|d| !targets.iter().any(|t| t.id == d.id))
                    .map(|d| d.id.clone())
                    .collect();
                out.decisions.push(explain(
                    "advance",
                    joining,
                    format!(
                        "stage {} ({}%) passed: baked {} s, {}; stage {} ({}%) started",
                        stage + 1,
                        r.spec.stages[stage].percent,
                        bake,
                        tally.summary(),
                        stage + 2,
                        r.spec.stages[stage + 1].percent
                    ),
                ));
                effects = desired_effects(r, &next_targets);
            } else {
                out.phase = Phase::Completed { at: now };
                let unfinished: Vec<String> = targets
                    .iter()
                    .filter(|d| standing(d, &r.spec.bundle, started) != Standing::Running)
                    .map(|d| d.id.clone())
                    .collect();
                out.decisions.push(explain(
                    "complete",
                    unfinished,
                    format!(
                        "completed: {} of {} device(s) run the bundle; {}",
                        tally.running,
                        targets.len(),
                        tally.summary()
                    ),
                ));
            }
            Ok((out, effects))
        }
        (Command::Tick, _) => Ok((out, effects)),
        (
            Command::Pause,
            Phase::Running {
                stage,
                stage_started,
            },
        ) => {
            out.phase = Phase::Paused {
                stage: *stage,
                stage_started: *stage_started,
            };
            out.decisions.push(operator(now, "pause"));
            Ok((out, effects))
        }
        (Command::Resume, Phase::Paused { stage, .. }) => {
            // A resumed stage bakes again from now.
            out.phase = Phase::Running {
                stage: *stage,
                stage_started: now,
            };
            out.decisions.push(operator(now, "resume"));
            Ok((out, effects))
        }
        (Command::Promote, Phase::Running { stage, .. } | Phase::Paused { stage, .. }) => {
            out.decisions.push(operator(now, "promote"));
            if stage + 1 < r.spec.stages.len() {
                out.phase = Phase::Running {
                    stage: stage + 1,
                    stage_started: now,
                };
                effects = desired_effects(r, &targets_for_stage(r, fleet, stage + 1));
            } else {
                out.phase = Phase::Completed { at: now };
            }
            Ok((out, effects))
        }
        // A completed rollout can still be undone: the devices go back too.
        (
            Command::Abort,
            Phase::Running { .. } | Phase::Paused { .. } | Phase::Completed { .. },
        ) => {
            out.phase = Phase::Aborted { at: now };
            out.decisions.push(operator(now, "abort"));
            // Everyone who joined goes back to what they ran before.
            effects = fleet
                .iter()
                .filter_map(|d| match &d.joined {
                    Some((id, prev)) if *id == r.id => Some(Effect {
                        device: d.id.clone(),
                        bundle: prev.clone(),
                        rollback: prev.is_some(),
                        joins: None,
                    }),
                    _ => None,
                })
                .collect();
            Ok((out, effects))
        }
        (Command::Supersede, Phase::Running { .. } | Phase::Paused { .. }) => {
            out.phase = Phase::Aborted { at: now };
            out.decisions.push(Decision {
                message: "superseded by a newer rollout for the same devices".into(),
                gate: "supersede".into(),
                ..operator(now, "supersede")
            });
            Ok((out, Vec::new()))
        }
        (Command::Supersede, p) => Err(RolloutError::NotAllowed(p.name(), "superseded")),
        (Command::Pause, p) => Err(RolloutError::NotAllowed(p.name(), "paused")),
        (Command::Resume, p) => Err(RolloutError::NotAllowed(p.name(), "resumed")),
        (Command::Promote, p) => Err(RolloutError::NotAllowed(p.name(), "promoted")),
        (Command::Abort, p) => Err(RolloutError::NotAllowed(p.name(), "aborted")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn bref(id: &str, seq: u64) -> BundleRef {
        BundleRef {
            id: id.into(),
            name: "cls".into(),
            version: format!("1.0.{seq}"),
            sequence: seq,
        }
    }

    fn fleet(n: usize, boards: &[&str]) -> Vec<DeviceStatus> {
        (0..n)
            .map(|i| DeviceStatus {
                id: format!("dev-{i:02}"),
                tags: [("board".to_string(), boards[i % boards.len()].to_string())].into(),
                active: Some(bref("old", 1)),
                last_failed: None,
                state: Some(UpdateState::Committed),
                health: Health::default(),
                last_seen: Some(T0),
                offline: false,
                joined: None,
                staged: None,
                activate_at: None,
            })
            .collect()
    }

    fn rollout(gates: Gates) -> Rollout {
        Rollout {
            id: "r1".into(),
            spec: RolloutSpec {
                bundle: bref("new", 2),
                selector: BTreeMap::new(),
                stages: vec![
                    Stage {
                        percent: 10,
                        bake_minutes: 5,
                        bake_seconds: None,
                    },
                    Stage {
                        percent: 50,
                        bake_minutes: 10,
                        bake_seconds: None,
                    },
                    Stage {
                        percent: 100,
                        bake_minutes: 0,
                        bake_seconds: None,
                    },
                ],
                gates,
                shadow: None,
                window: None,
            },
            phase: Phase::Running {
                stage: 0,
                stage_started: T0,
            },
            created_at: T0,
            decisions: Vec::new(),
        }
    }

    /// Devices that were told to run the bundle report it, healthy.
    fn apply(fleet: &mut [DeviceStatus], effects: &[Effect], now: u64) {
        for e in effects {
            let d = fleet.iter_mut().find(|d| d.id == e.device).unwrap();
            if let Some(prev) = &e.joins {
                d.joined = Some(("r1".into(), prev.clone()));
            }
            d.active = e.bundle.clone();
            d.last_seen = Some(now);
            d.health = Health {
                inferences: 100,
                errors: 0,
                p95_latency_ms: Some(4.0),
            };
        }
    }

    fn stage_of(r: &Rollout) -> Option<usize> {
        match r.phase {
            Phase::Running { stage, .. } | Phase::Paused { stage, .. } => Some(stage),
            _ => None,
        }
    }

    #[test]
    fn advances_through_stages_after_bake_time_and_completes() {
        let mut f = fleet(20, &["rpi4"]);
        let r = rollout(Gates {
            min_reporting_devices: Some(1),
            ..Gates::default()
        });
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        assert_eq!(eff.len(), 2, "10% of 20");
        apply(&mut f, &eff, T0 + 10);
        // Not baked yet.
        let (r, _) = next(&r, &f, Command::Tick, T0 + 299).unwrap();
        assert_eq!(stage_of(&r), Some(0));
        let (r, eff) = next(&r, &f, Command::Tick, T0 + 300).unwrap();
        assert_eq!(stage_of(&r), Some(1));
        assert_eq!(eff.len(), 10, "50% of 20, including the first two");
        apply(&mut f, &eff, T0 + 310);
        let (r, eff) = next(&r, &f, Command::Tick, T0 + 300 + 600).unwrap();
        assert_eq!(stage_of(&r), Some(2));
        assert_eq!(eff.len(), 20);
        apply(&mut f, &eff, T0 + 910);
        let (r, _) = next(&r, &f, Command::Tick, T0 + 920).unwrap();
        assert!(matches!(r.phase, Phase::Completed { .. }), "{:?}", r.phase);
        assert!(f.iter().all(|d| d.joined.is_some()));
        let done = r.decisions.last().unwrap();
        assert_eq!(done.action, "complete");
        assert!(done.message.contains("20 of 20"), "{}", done.message);
    }

    /// Devices told to run the bundle installed it and wait for a window.
    fn wait(fleet: &mut [DeviceStatus], effects: &[Effect], now: u64, at: u64) {
        for e in effects {
            let d = fleet.iter_mut().find(|d| d.id == e.device).unwrap();
            if let Some(prev) = &e.joins {
                d.joined = Some(("r1".into(), prev.clone()));
            }
            d.state = Some(UpdateState::Waiting);
            d.staged = e.bundle.clone();
            d.activate_at = Some(at);
            d.last_seen = Some(now);
        }
    }

    #[test]
    fn devices_waiting_for_a_window_hold_a_stage_without_pausing_or_failing_it() {
        let mut f = fleet(20, &["rpi4"]);
        let r = rollout(Gates::default());
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        wait(&mut f, &eff, T0 + 10, T0 + 50_000);
        let t = Tally::of(&targets_for_stage(&r, &f, 0), &r.spec.bundle, T0);
        assert_eq!((t.waiting, t.pending, t.failed), (2, 0, 0));
        assert_eq!(t.next_window, Some(T0 + 50_000));
        assert!(
            t.summary().contains("2 waiting for window (next: "),
            "{}",
            t.summary()
        );
        // Long past the bake time and the settle timeout: held, not paused.
        let (r, eff) = next(&r, &f, Command::Tick, T0 + 40_000).unwrap();
        assert_eq!(stage_of(&r), Some(0));
        assert!(matches!(r.phase, Phase::Running { .. }), "{:?}", r.phase);
        assert!(r.decisions.is_empty(), "{:?}", r.decisions);
        assert_eq!(eff.len(), 2, "the stage's devices keep their desired state");
        // The window opens: one activates; the stage goes on with the
        // other still waiting.
        let first = &eff[..1];
        apply(&mut f, first, T0 + 50_010);
        for d in f.iter_mut().filter(|d| d.id == first[0].device) {
            d.state = Some(UpdateState::Committed);
        }
        let (r, eff) = next(&r, &f, Command::Tick, T0 + 50_020).unwrap();
        assert_eq!(stage_of(&r), Some(1), "{:?}", r.decisions);
        assert!(
            r.decisions[0].message.contains("1 waiting for window"),
            "{}",
            r.decisions[0].message
        );
        // The last stage completes only once every device runs it.
        wait(&mut f, &eff, T0 + 50_030, T0 + 130_000);
        let (r, eff) = next(&r, &f, Command::Tick, T0 + 51_000).unwrap();
        assert_eq!(stage_of(&r), Some(2), "{:?}", r.decisions);
        wait(&mut f, &eff, T0 + 51_010, T0 + 130_000);
        let (r, _) = next(&r, &f, Command::Tick, T0 + 120_000).unwrap();
        assert_eq!(stage_of(&r), Some(2), "waiting devices hold completion");
        assert!(matches!(r.phase, Phase::Running { .. }));
        apply(&mut f, &eff, T0 + 130_010);
        for d in &mut f {
            d.state = Some(UpdateState::Committed);
        }
        let (r, _) = next(&r, &f, Command::Tick, T0 + 130_020).unwrap();
        assert!(matches!(r.phase, Phase::Completed { .. }), "{:?}", r.phase);
    }

    #[test]
    fn stage_membership_is_stable_and_grows_monotonically() {
        let f = fleet(40, &["rpi4"]);
        let r = rollout(Gates::default());
        let s0: Vec<String> = targets_for_stage(&r, &f, 0)
            .iter()
            .map(|d| d.id.clone())
            .collect();
        let s1: Vec<String> = targets_for_stage(&r, &f, 1)
            .iter()
            .map(|d| d.id.clone())
            .collect();
        assert_eq!(
            s0,
            targets_for_stage(&r, &f, 0)
                .iter()
                .map(|d| d.id.clone())
                .collect::<Vec<_>>()
        );
        assert!(s0.iter().all(|d| s1.contains(d)));
        let mut other = r.clone();
        other.id = "r2".into();
        let o0: Vec<String> = targets_for_stage(&other, &f, 0)
            .iter()
            .map(|d| d.id.clone())
            .collect();
        assert_ne!(s0, o0, "another rollout picks another canary set");
    }

    #[test]
    fn every_stage_includes_every_board_type() {
        let f = fleet(30, &["rpi4", "jetson-nano", "rpi3"]);
        let r = rollout(Gates::default());
        let s0 = targets_for_stage(&r, &f, 0);
        for board in ["rpi4", "jetson-nano", "rpi3"] {
            assert!(
                s0.iter().any(|d| d.tags["board"] == board),
                "{board} missing from the first stage"
            );
        }
    }

    #[test]
    fn selector_limits_the_rollout() {
        let f = fleet(10, &["rpi4", "jetson-nano"]);
        let mut r = rollout(Gates::default());
        r.spec.selector = [("board".to_string(), "rpi4".to_string())].into();
        let all = targets_for_stage(&r, &f, 2);
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|d| d.tags["board"] == "rpi4"));
    }

    #[test]
    fn pauses_on_a_latency_breach_and_records_why() {
        let mut f = fleet(20, &["rpi4"]);
        let r = rollout(Gates {
            max_p95_latency_ms: Some(20.0),
            ..Gates::default()
        });
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        apply(&mut f, &eff, T0 + 5);
        let slow = eff[0].device.clone();
        f.iter_mut()
            .find(|d| d.id == slow)
            .unwrap()
            .health
            .p95_latency_ms = Some(85.0);
        let (r, _) = next(&r, &f, Command::Tick, T0 + 60).unwrap();
        assert!(
            matches!(r.phase, Phase::Paused { stage: 0, .. }),
            "{:?}",
            r.phase
        );
        let d = r.decisions.last().unwrap();
        assert_eq!(d.gate, "max_p95_latency_ms");
        assert_eq!(d.threshold, Some(20.0));
        assert_eq!(d.observed, Some(85.0));
        assert_eq!(d.devices, vec![slow]);
        // Paused rollouts do not advance, however long they wait.
        let (r, _) = next(&r, &f, Command::Tick, T0 + 100_000).unwrap();
        assert_eq!(stage_of(&r), Some(0));
    }

    #[test]
    fn pauses_when_devices_roll_back_on_their_own() {
        let mut f = fleet(20, &["rpi4"]);
        let r = rollout(Gates {
            max_rollback_pct: Some(0.0),
            ..Gates::default()
        });
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        apply(&mut f, &eff, T0 + 5);
        let dev = f.iter_mut().find(|d| d.id == eff[1].device).unwrap();
        dev.active = Some(bref("old", 1));
        dev.last_failed = Some(bref("new", 2));
        dev.state = Some(UpdateState::RolledBack);
        let (r, _) = next(&r, &f, Command::Tick, T0 + 60).unwrap();
        let d = r.decisions.last().unwrap();
        assert_eq!(d.gate, "max_rollback_pct");
        assert_eq!(d.observed, Some(50.0));
        assert_eq!(d.devices, vec![eff[1].device.clone()]);
    }

    #[test]
    fn pauses_on_error_rate() {
        let mut f = fleet(10, &["rpi4"]);
        let r = rollout(Gates {
            max_error_rate: Some(0.01),
            ..Gates::default()
        });
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        apply(&mut f, &eff, T0 + 5);
        f.iter_mut()
            .find(|d| d.id == eff[0].device)
            .unwrap()
            .health
            .errors = 50;
        let (r, _) = next(&r, &f, Command::Tick, T0 + 60).unwrap();
        assert_eq!(r.decisions.last().unwrap().gate, "max_error_rate");
    }

    #[test]
    fn devices_that_never_report_hold_the_stage_then_pause_it() {
        let f = fleet(20, &["rpi4"]);
        let r = rollout(Gates {
            min_reporting_devices: Some(2),
            ..Gates::default()
        });
        let (r, _) = next(&r, &f, Command::Tick, T0).unwrap();
        // Nobody installs or reports: baked, but held.
        let (r, _) = next(&r, &f, Command::Tick, T0 + 300).unwrap();
        assert!(matches!(r.phase, Phase::Running { stage: 0, .. }));
        assert!(r.decisions.is_empty());
        let (r, _) = next(&r, &f, Command::Tick, T0 + 900).unwrap();
        assert!(matches!(r.phase, Phase::Paused { stage: 0, .. }));
        let d = r.decisions.last().unwrap();
        assert_eq!(d.gate, "min_reporting_devices");
        assert_eq!(d.devices.len(), 2);
    }

    #[test]
    fn abort_sends_devices_back_to_their_previous_bundle() {
        let mut f = fleet(20, &["rpi4"]);
        f[0].active = None; // a device that ran nothing before
        let r = rollout(Gates::default());
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        apply(&mut f, &eff, T0 + 5);
        let (r, eff) = next(&r, &f, Command::Promote, T0 + 10).unwrap();
        apply(&mut f, &eff, T0 + 15);
        let (r, back) = next(&r, &f, Command::Abort, T0 + 20).unwrap();
        assert!(matches!(r.phase, Phase::Aborted { .. }));
        assert_eq!(back.len(), f.iter().filter(|d| d.joined.is_some()).count());
        assert_eq!(back.len(), 10, "the devices of stages 1 and 2");
        for e in &back {
            let d = f.iter().find(|d| d.id == e.device).unwrap();
            let before = d.joined.as_ref().unwrap().1.clone();
            assert_eq!(e.bundle, before);
            assert_eq!(e.rollback, before.is_some());
        }
        assert!(back.iter().any(|e| e.bundle == Some(bref("old", 1))));
        assert!(
            next(&r, &f, Command::Resume, T0 + 30).is_err(),
            "aborted is final"
        );
    }

    #[test]
    fn pause_resume_and_disallowed_transitions() {
        let f = fleet(10, &["rpi4"]);
        let r = rollout(Gates::default());
        let (r, _) = next(&r, &f, Command::Pause, T0 + 1).unwrap();
        assert!(matches!(r.phase, Phase::Paused { .. }));
        assert_eq!(
            next(&r, &f, Command::Pause, T0 + 2).unwrap_err(),
            RolloutError::NotAllowed("paused", "paused")
        );
        let (r, _) = next(&r, &f, Command::Resume, T0 + 3).unwrap();
        assert_eq!(
            r.phase,
            Phase::Running {
                stage: 0,
                stage_started: T0 + 3
            }
        );
        assert!(next(&r, &f, Command::Resume, T0 + 4).is_err());
        assert_eq!(r.decisions.len(), 2);
    }

    #[test]
    fn validates_stages_and_gates() {
        let mut r = rollout(Gates::default());
        r.spec.validate().unwrap();
        r.spec.stages = vec![
            Stage {
                percent: 50,
                bake_minutes: 1,
                bake_seconds: None,
            },
            Stage {
                percent: 10,
                bake_minutes: 1,
                bake_seconds: None,
            },
        ];
        assert!(r.spec.validate().is_err());
        r.spec.stages = vec![Stage {
            percent: 50,
            bake_minutes: 1,
            bake_seconds: None,
        }];
        assert!(r.spec.validate().is_err(), "must end at 100%");
        r.spec.stages = vec![Stage {
            percent: 100,
            bake_minutes: 0,
            bake_seconds: None,
        }];
        r.spec.gates.max_error_rate = Some(-1.0);
        assert!(r.spec.validate().is_err());
    }

    #[test]
    fn supersede_stops_without_sending_devices_back() {
        let f = fleet(4, &["rpi4"]);
        let r = rollout(Gates::default());
        let (r, _) = next(&r, &f, Command::Tick, 10).unwrap();
        let (r, effects) = next(&r, &f, Command::Supersede, 20).unwrap();
        assert!(matches!(r.phase, Phase::Aborted { at: 20 }));
        assert!(effects.is_empty(), "the newer rollout owns the devices now");
        assert_eq!(r.decisions.last().unwrap().action, "supersede");
        assert!(next(&r, &f, Command::Supersede, 30).is_err());
    }

    #[test]
    fn a_zero_bake_stage_waits_for_every_device_and_completion_accounts_for_all() {
        let mut f = fleet(10, &["rpi4"]);
        let mut r = rollout(Gates::default());
        r.spec.stages = vec![Stage {
            percent: 100,
            bake_minutes: 0,
            bake_seconds: None,
        }];
        let (r, eff) = next(&r, &f, Command::Tick, T0).unwrap();
        assert_eq!(eff.len(), 10);
        // Only some devices report: a zero bake does not complete the rollout.
        apply(&mut f, &eff[..3], T0 + 5);
        let (r, _) = next(&r, &f, Command::Tick, T0 + 10).unwrap();
        assert!(matches!(r.phase, Phase::Running { .. }), "{:?}", r.phase);
        // One fails, two go offline, the rest install.
        let failed = eff[3].device.clone();
        let d = f.iter_mut().find(|d| d.id == failed).unwrap();
        d.state = Some(UpdateState::Failed);
        d.last_failed = Some(bref("new", 2));
        for e in &eff[4..6] {
            f.iter_mut().find(|d| d.id == e.device).unwrap().offline = true;
        }
        apply(&mut f, &eff[6..], T0 + 15);
        let (r, _) = next(&r, &f, Command::Tick, T0 + 20).unwrap();
        assert!(matches!(r.phase, Phase::Completed { .. }), "{:?}", r.phase);
        let d = r.decisions.last().unwrap();
        assert_eq!(d.action, "complete");
        assert!(
            d.message.contains("7 of 10")
                && d.message.contains("1 failed")
                && d.message.contains("2 offline"),
            "{}",
            d.message
        );
        assert_eq!(d.device_count, 3, "the devices not running it are named");
    }

    #[test]
    fn decisions_stay_small_whatever_the_fleet_size() {
        let f = fleet(5000, &["rpi4"]);
        let r = rollout(Gates::default());
        let (r, _) = next(&r, &f, Command::Tick, T0).unwrap();
        let (r, _) = next(&r, &f, Command::Tick, T0 + 1000).unwrap();
        let d = r.decisions.last().unwrap();
        assert_eq!(d.gate, "min_reporting_devices");
        assert_eq!(d.device_count, 500);
        assert_eq!(d.devices.len(), edgefleet_wire::api::v1::DECISION_DEVICES);
        let encoded = serde_json::to_vec(&r).unwrap();
        assert!(encoded.len() < 8 * 1024, "{} bytes", encoded.len());
    }

    #[test]
    fn validates_shadow_and_gate_ranges() {
        let mut r = rollout(Gates::default());
        for (gates, ok) in [
            (
                Gates {
                    max_error_rate: Some(1.5),
                    ..Gates::default()
                },
                false,
            ),
            (
                Gates {
                    max_error_rate: Some(0.5),
                    ..Gates::default()
                },
                true,
            ),
            (
                Gates {
                    max_rollback_pct: Some(101.0),
                    ..Gates::default()
                },
                false,
            ),
            (
                Gates {
                    max_p95_latency_ms: Some(0.0),
                    ..Gates::default()
                },
                false,
            ),
            (
                Gates {
                    max_p95_latency_ms: Some(f64::NAN),
                    ..Gates::default()
                },
                false,
            ),
        ] {
            r.spec.gates = gates;
            assert_eq!(r.spec.validate().is_ok(), ok, "{:?}", r.spec.gates);
        }
        r.spec.gates = Gates::default();
        for (rate, samples, ok) in [
            (-1.0, 10, false),
            (7.0, 10, false),
            (0.5, 0, false),
            (0.5, 10, true),
        ] {
            r.spec.shadow = Some(edgefleet_wire::device::ShadowRequest {
                sample_rate: rate,
                samples,
                min_top1_agreement: None,
                max_abs_diff: None,
            });
            assert_eq!(r.spec.validate().is_ok(), ok, "{rate} {samples}");
        }
    }
}

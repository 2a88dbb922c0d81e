//! A/B experiments between two bundles on live devices: a stable,
//! per-board stratified split (or a Thompson-sampling bandit), per-arm
//! metrics from the devices' telemetry, an always-valid verdict
//! ([`crate::stats`]), a guardrail, and conclusion into a rollout.
//!
//! Like [`crate::rollout`], the logic here is pure: [`tick`] takes the
//! experiment, the devices and the time and returns the new experiment and
//! the desired-state changes; the controller makes them durable.
//!
//! Arm A is the control (what devices run), B the candidate. A device goes
//! to B only while it runs A, so it can always come back: with the same
//! model name and a lower sequence, the return is an explicit rollback to
//! a bundle the device ran, which its anti-rollback floor allows.

use std::collections::BTreeMap;

use edgefleet_wire::api::v1::{
    Allocation, ArmEstimate, Decision, ExperimentPhase, ExperimentView, Guardrail, Metric,
    MetricVerdict,
};
use edgefleet_wire::device::BundleRef;
use edgefleet_wire::telemetry::Telemetry;
use serde::{Deserialize, Serialize};

use crate::rollout::{Effect, device_rank, selects};
use crate::stats::{Limits, Moments, Rng, Slot, allocate, effect, interval, prob_b_better};

/// What an operator asks for (validated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentSpec {
    pub name: String,
    pub a: BundleRef,
    pub b: BundleRef,
    pub selector: BTreeMap<String, String>,
    /// Percent of each board's devices on B (the bandit's start).
    pub split_pct: f64,
    pub allocation: Allocation,
    pub primary: Metric,
    pub guardrail: Option<Guardrail>,
    pub confidence: f64,
    pub min_share: f64,
    pub max_switches_per_hour: u32,
}

impl ExperimentSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.a.id == self.b.id {
            return Err("arms a and b are the same bundle".into());
        }
        if self.a.name == self.b.name && self.b.sequence <= self.a.sequence {
            return Err(format!(
                "b ({} sequence {}) must have a higher sequence than a ({}): devices move up to b and back to a as a rollback",
                self.b.version, self.b.sequence, self.a.version
            ));
        }
        if !(self.split_pct > 0.0 && self.split_pct < 100.0) {
            return Err(format!("split_pct {} is not in (0, 100)", self.split_pct));
        }
        if !(self.confidence > 0.5 && self.confidence < 1.0) {
            return Err(format!("confidence {} is not in (0.5, 1)", self.confidence));
        }
        if !(0.0..0.5).contains(&self.min_share) {
            return Err(format!("min_share {} is not in [0, 0.5)", self.min_share));
        }
        if self.max_switches_per_hour == 0 {
            return Err("max_switches_per_hour must be at least 1".into());
        }
        if let Some(g) = &self.guardrail
            && !(g.max_worse_pct.is_finite() && g.max_worse_pct >= 0.0)
        {
            return Err(format!(
                "guardrail max_worse_pct {} is not ≥ 0",
                g.max_worse_pct
            ));
        }
        Ok(())
    }

    fn alpha(&self) -> f64 {
        1.0 - self.confidence
    }

    pub fn arm(&self, arm: Arm) -> &BundleRef {
        match arm {
            Arm::A => &self.a,
            Arm::B => &self.b,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    A,
    B,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::A => "a",
            Arm::B => "b",
        }
    }
}

/// An experiment and what it has measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: String,
    pub spec: ExperimentSpec,
    pub phase: ExperimentPhase,
    pub created_at: u64,
    /// Device → arm, for every device of the cohort.
    pub assignments: BTreeMap<String, Arm>,
    /// Per arm and metric, over every telemetry interval of the arm's
    /// devices while they ran the arm's bundle.
    pub stats_a: BTreeMap<Metric, Moments>,
    pub stats_b: BTreeMap<Metric, Moments>,
    /// When each device last changed arm (bandit), within the last hour.
    #[serde(default)]
    pub switches: BTreeMap<String, Vec<u64>>,
    pub decisions: Vec<Decision>,
    /// The last telemetry record counted per device (its `at`). In memory:
    /// after a restart at most one record per device is counted twice.
    #[serde(skip)]
    pub seen: BTreeMap<String, u64>,
    /// When the record was last stored (the controller throttles writes
    /// of statistics alone).
    #[serde(skip)]
    pub persisted_at: u64,
}

/// Decisions kept per experiment: the first and the newest.
pub const DECISIONS_KEPT: usize = 200;

fn push_decision(e: &mut Experiment, d: Decision) {
    e.decisions.push(d);
    if e.decisions.len() > DECISIONS_KEPT {
        // Keep the first (how it started); drop the oldest after it.
        e.decisions.remove(1);
    }
}

/// A device as an experiment sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpDevice {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub active: Option<BundleRef>,
    pub telemetry: Option<Telemetry>,
    /// What its desired state names now, and whether as a rollback.
    pub desired: Option<(BundleRef, bool)>,
    /// The rollout or experiment its desired state came from.
    pub owner: Option<String>,
    /// Held by a running or paused rollout or another running experiment.
    pub claimed: bool,
}

impl Experiment {
    pub fn new(id: String, spec: ExperimentSpec, now: u64) -> Experiment {
        Experiment {
            id,
            spec,
            phase: ExperimentPhase::Running,
            created_at: now,
            assignments: BTreeMap::new(),
            stats_a: BTreeMap::new(),
            stats_b: BTreeMap::new(),
            switches: BTreeMap::new(),
            decisions: Vec::new(),
            seen: BTreeMap::new(),
            persisted_at: 0,
        }
    }

    pub fn is_running(&self) -> bool {
        self.phase == ExperimentPhase::Running
    }

    fn stats(&self, arm: Arm) -> &BTreeMap<Metric, Moments> {
        match arm {
            Arm::A => &self.stats_a,
            Arm::B => &self.stats_b,
        }
    }

    fn moments(&self, arm: Arm, m: Metric) -> Moments {
        self.stats(arm).get(&m).copied().unwrap_or_default()
    }

    /// The verdict on metric `m` at the experiment's confidence.
    pub fn verdict(&self, m: Metric) -> MetricVerdict {
        let alpha = self.spec.alpha();
        let (a, b) = (self.moments(Arm::A, m), self.moments(Arm::B, m));
        let est = |x: &Moments| {
            let iv = interval(x, alpha);
            ArmEstimate {
                n: x.n,
                mean: (x.n > 0).then_some(x.mean),
                low: iv.map(|v| v.1),
                high: iv.map(|v| v.2),
            }
        };
        let e = effect(&a, &b, alpha);
        let significant = e.is_some_and(|(_, lo, hi)| lo > 0.0 || hi < 0.0);
        let better = if significant {
            e.map(|(d, _, _)| {
                if (d > 0.0) == m.higher_is_better() {
                    "b".to_string()
                } else {
                    "a".to_string()
                }
            })
        } else {
            None
        };
        MetricVerdict {
            metric: m,
            higher_is_better: m.higher_is_better(),
            a: est(&a),
            b: est(&b),
            effect: e.map(|v| v.0),
            effect_low: e.map(|v| v.1),
            effect_high: e.map(|v| v.2),
            effect_pct: e
                .filter(|_| a.mean.abs() > f64::EPSILON)
                .map(|v| 100.0 * v.0 / a.mean.abs()),
            significant,
            better,
        }
    }

    /// The arm significantly better on the primary metric, if any.
    pub fn winner(&self) -> Option<Arm> {
        match self.verdict(self.spec.primary).better.as_deref() {
            Some("a") => Some(Arm::A),
            Some("b") => Some(Arm::B),
            _ => None,
        }
    }

    pub fn view(&self) -> ExperimentView {
        let verdicts: Vec<MetricVerdict> = Metric::ALL
            .iter()
            .map(|m| self.verdict(*m))
            .filter(|v| v.a.n > 0 || v.b.n > 0 || v.metric == self.spec.primary)
            .collect();
        let (mut na, mut nb) = (0u64, 0u64);
        for arm in self.assignments.values() {
            match arm {
                Arm::A => na += 1,
                Arm::B => nb += 1,
            }
        }
        ExperimentView {
            id: self.id.clone(),
            name: self.spec.name.clone(),
            a: self.spec.a.clone(),
            b: self.spec.b.clone(),
            selector: self.spec.selector.clone(),
            allocation: self.spec.allocation,
            split_pct: self.spec.split_pct,
            primary: self.spec.primary,
            guardrail: self.spec.guardrail.clone(),
            confidence: self.spec.confidence,
            phase: self.phase.clone(),
            created_at: self.created_at,
            devices_a: na,
            devices_b: nb,
            b_share_by_board: BTreeMap::new(),
            summary: summary(self, &verdicts),
            verdicts,
            decisions: self.decisions.clone(),
        }
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// The verdict in words: one sentence per metric, primary first.
pub fn summary(e: &Experiment, verdicts: &[MetricVerdict]) -> String {
    let conf = format!("{:.0}%", 100.0 * e.spec.confidence);
    let mut lines = Vec::new();
    let mut ordered: Vec<&MetricVerdict> = verdicts.iter().collect();
    ordered.sort_by_key(|v| v.metric != e.spec.primary);
    for v in ordered {
        let name = v.metric.as_str();
        let tag = if v.metric == e.spec.primary {
            " (primary)"
        } else {
            ""
        };
        let line = match (v.a.mean, v.b.mean, v.effect) {
            (Some(a), Some(b), Some(d)) => {
                let lo = v.effect_low.unwrap_or(f64::NAN);
                let hi = v.effect_high.unwrap_or(f64::NAN);
                let pct = v
                    .effect_pct
                    .map(|p| format!(" ({p:+.1}%)"))
                    .unwrap_or_default();
                let word = match v.better.as_deref() {
                    Some(arm) => format!(
                        "{} is better: significant at {conf}, the interval excludes 0",
                        arm.to_uppercase()
                    ),
                    None => {
                        format!("no significant difference yet at {conf} (the interval includes 0)")
                    }
                };
                format!(
                    "{name}{tag}: A {} (n={}), B {} (n={}); B − A = {}{pct}, {conf} interval [{}, {}]: {word}.",
                    fmt(a),
                    v.a.n,
                    fmt(b),
                    v.b.n,
                    fmt(d),
                    fmt(lo),
                    fmt(hi)
                )
            }
            _ => format!(
                "{name}{tag}: not enough data yet (A n={}, B n={}; {} each needed).",
                v.a.n,
                v.b.n,
                crate::stats::MIN_N
            ),
        };
        lines.push(line);
    }
    match &e.phase {
        ExperimentPhase::Running => {}
        ExperimentPhase::Stopped { reason, .. } => lines.push(format!("Stopped: {reason}.")),
        ExperimentPhase::Concluded {
            winner, rollout, ..
        } => lines.push(match rollout {
            Some(r) => format!("Concluded: {winner} won; rolled out by rollout {r}."),
            None => format!("Concluded: {winner} kept."),
        }),
    }
    lines.join("\n")
}

/// The observations one telemetry record gives, per metric.
pub fn observations(t: &Telemetry) -> Vec<(Metric, f64)> {
    let mut out = Vec::new();
    if let Some(l) = &t.latency_ms {
        out.push((Metric::LatencyP50Ms, l.p50));
        out.push((Metric::LatencyP95Ms, l.p95));
    }
    if t.inferences > 0 {
        out.push((Metric::ErrorRate, t.errors as f64 / t.inferences as f64));
    }
    if let Some(m) = t.drift.iter().map(|d| d.psi).reduce(f64::max) {
        out.push((Metric::DriftPsi, m));
    }
    if let Some(r) = &t.reward
        && r.count > 0
    {
        out.push((Metric::Reward, r.sum / r.count as f64));
    }
    out
}

fn board(tags: &BTreeMap<String, String>) -> String {
    tags.get("board").cloned().unwrap_or_else(|| "none".into())
}

fn runs(d: &ExpDevice, b: &BundleRef) -> bool {
    d.active.as_ref().is_some_and(|a| a.id == b.id)
}

/// The desired-state change that puts `d` on `arm` (if any is needed).
fn effect_for(e: &Experiment, d: &ExpDevice, arm: Arm) -> Option<Effect> {
    let bundle = e.spec.arm(arm).clone();
    // Back down to A (same model, lower sequence) is an explicit rollback;
    // the flag stays while the desired bundle does not change.
    let down = arm == Arm::A && e.spec.a.name == e.spec.b.name;
    let rollback = match &d.desired {
        Some((b, r)) if b.id == bundle.id => *r,
        _ => down && d.active.as_ref().is_some_and(|x| x.id == e.spec.b.id),
    };
    if d.owner.as_deref() == Some(e.id.as_str())
        && d.desired
            .as_ref()
            .is_some_and(|(b, r)| b.id == bundle.id && *r == rollback)
    {
        return None;
    }
    Some(Effect {
        device: d.id.clone(),
        bundle: Some(bundle),
        rollback,
        joins: if d.owner.as_deref() == Some(e.id.as_str()) {
            None
        } else {
            Some(d.active.clone())
        },
    })
}

fn decision(now: u64, action: &str, gate: &str, devices: Vec<String>, message: String) -> Decision {
    Decision::new(now, action, gate, None, None, devices, message)
}

/// One evaluation: assigns new devices, counts new telemetry, applies the
/// guardrail, re-allocates (bandit), and returns the desired-state changes.
pub fn tick(
    e: &Experiment,
    fleet: &[ExpDevice],
    now: u64,
    rng: &mut Rng,
) -> (Experiment, Vec<Effect>) {
    let mut out = e.clone();
    if !e.is_running() {
        return (out, Vec::new());
    }
    let cohort: Vec<&ExpDevice> = fleet
        .iter()
        .filter(|d| selects(&e.spec.selector, &d.tags))
        .filter(|d| !d.claimed || d.owner.as_deref() == Some(e.id.as_str()))
        .collect();
    // Gone (decommissioned, re-tagged, taken by a rollout): forgotten.
    out.assignments
        .retain(|id, _| cohort.iter().any(|d| d.id == *id));
    out.seen.retain(|id, _| out.assignments.contains_key(id));

    // New devices, per board, in stable hash order, toward the board's
    // target share of B. Only a device that runs A may go to B.
    let target = e.spec.split_pct / 100.0;
    let mut boards: BTreeMap<String, Vec<&ExpDevice>> = BTreeMap::new();
    for d in &cohort {
        boards.entry(board(&d.tags)).or_default().push(d);
    }
    let mut joined = Vec::new();
    for devices in boards.values() {
        let mut on_b = devices
            .iter()
            .filter(|d| out.assignments.get(&d.id) == Some(&Arm::B))
            .count();
        let mut known = devices
            .iter()
            .filter(|d| out.assignments.contains_key(&d.id))
            .count();
        let mut fresh: Vec<&&ExpDevice> = devices
            .iter()
            .filter(|d| !out.assignments.contains_key(&d.id))
            .collect();
        fresh.sort_by_key(|d| (device_rank(&d.id, &e.id), d.id.clone()));
        for d in fresh {
            known += 1;
            let arm = if runs(d, &e.spec.a) && (on_b as f64) < target * known as f64 - 1e-9 {
                on_b += 1;
                Arm::B
            } else {
                Arm::A
            };
            out.assignments.insert(d.id.clone(), arm);
            joined.push(d.id.clone());
        }
    }
    if !joined.is_empty() {
        let msg = format!("{} devices joined the experiment", joined.len());
        push_decision(&mut out, decision(now, "assign", "split", joined, msg));
    }

    // New telemetry, counted for the arm whose bundle served it.
    for d in &cohort {
        let (Some(arm), Some(t)) = (out.assignments.get(&d.id).copied(), &d.telemetry) else {
            continue;
        };
        if out.seen.get(&d.id).is_some_and(|at| *at >= t.at) {
            continue;
        }
        out.seen.insert(d.id.clone(), t.at);
        let b = e.spec.arm(arm);
        if t.model.as_deref() != Some(format!("{}@{}", b.name, b.version).as_str()) {
            continue;
        }
        let stats = match arm {
            Arm::A => &mut out.stats_a,
            Arm::B => &mut out.stats_b,
        };
        for (m, x) in observations(t) {
            stats.entry(m).or_default().push(x);
        }
    }

    // The guardrail: B worse than A by more than allowed, confidently.
    if let Some(g) = &e.spec.guardrail {
        let v = out.verdict(g.metric);
        let margin = g.max_worse_pct / 100.0 * v.a.mean.unwrap_or(0.0).abs();
        let breached = match (v.effect_low, v.effect_high) {
            (Some(lo), _) if !g.metric.higher_is_better() => lo > margin,
            (_, Some(hi)) if g.metric.higher_is_better() => hi < -margin,
            _ => false,
        };
        if breached {
            let b_devices: Vec<String> = out
                .assignments
                .iter()
                .filter(|(_, a)| **a == Arm::B)
                .map(|(id, _)| id.clone())
                .collect();
            let reason = format!(
                "guardrail {}: B is worse than A by more than {}% (B − A in [{}, {}], A {})",
                g.metric.as_str(),
                g.max_worse_pct,
                fmt(v.effect_low.unwrap_or(f64::NAN)),
                fmt(v.effect_high.unwrap_or(f64::NAN)),
                fmt(v.a.mean.unwrap_or(f64::NAN))
            );
            let mut d = Decision::new(
                now,
                "stop",
                g.metric.as_str(),
                Some(g.max_worse_pct),
                v.effect_pct,
                b_devices,
                reason.clone(),
            );
            d.message = reason.clone();
            push_decision(&mut out, d);
            out.phase = ExperimentPhase::Stopped { at: now, reason };
            return stop_effects(out, fleet);
        }
    }

    // The bandit moves devices between arms, per board.
    if e.spec.allocation == Allocation::Thompson {
        let m = e.spec.primary;
        let (a, b) = (out.moments(Arm::A, m), out.moments(Arm::B, m));
        for list in out.switches.values_mut() {
            list.retain(|t| *t + 3600 > now);
        }
        out.switches.retain(|_, l| !l.is_empty());
        let limits = Limits {
            min_share: e.spec.min_share,
            max_switches_per_hour: e.spec.max_switches_per_hour,
        };
        let mut moved = Vec::new();
        for devices in boards.values() {
            let slots: Vec<Slot> = devices
                .iter()
                .filter_map(|d| {
                    let arm = *out.assignments.get(&d.id)?;
                    Some(Slot {
                        device: d.id.clone(),
                        on_b: arm == Arm::B,
                        recent_switches: out.switches.get(&d.id).map_or(0, |l| l.len() as u32),
                        may_go_b: runs(d, &e.spec.a),
                    })
                })
                .collect();
            for (id, to_b) in allocate(&a, &b, m.higher_is_better(), &slots, limits, rng) {
                out.assignments
                    .insert(id.clone(), if to_b { Arm::B } else { Arm::A });
                out.switches.entry(id.clone()).or_default().push(now);
                moved.push(id);
            }
        }
        if !moved.is_empty() {
            let p = prob_b_better(&a, &b, m.higher_is_better(), rng);
            let msg = format!(
                "bandit: P(B better on {}) ≈ {:.2}; {} devices changed arm",
                m.as_str(),
                p,
                moved.len()
            );
            push_decision(
                &mut out,
                decision(now, "reallocate", "thompson", moved, msg),
            );
        }
    }

    let effects = cohort
        .iter()
        .filter_map(|d| {
            let arm = *out.assignments.get(&d.id)?;
            effect_for(&out, d, arm)
        })
        .collect();
    (out, effects)
}

/// Everyone on A (B's devices as a rollback); the experiment is over.
fn stop_effects(out: Experiment, fleet: &[ExpDevice]) -> (Experiment, Vec<Effect>) {
    let effects = fleet
        .iter()
        .filter(|d| out.assignments.contains_key(&d.id))
        .filter_map(|d| effect_for(&out, d, Arm::A))
        .collect();
    (out, effects)
}

/// An operator stops the experiment: every device back on A.
pub fn stop(
    e: &Experiment,
    fleet: &[ExpDevice],
    now: u64,
    reason: &str,
) -> (Experiment, Vec<Effect>) {
    let mut out = e.clone();
    out.phase = ExperimentPhase::Stopped {
        at: now,
        reason: reason.to_string(),
    };
    push_decision(
        &mut out,
        decision(now, "stop", "operator", Vec::new(), reason.to_string()),
    );
    stop_effects(out, fleet)
}

/// The experiment ends with `winner`. For B, the caller creates the
/// rollout (and records its id); for A, B's devices go back to A.
pub fn conclude(
    e: &Experiment,
    fleet: &[ExpDevice],
    now: u64,
    winner: Arm,
    rollout: Option<String>,
) -> (Experiment, Vec<Effect>) {
    let mut out = e.clone();
    out.phase = ExperimentPhase::Concluded {
        at: now,
        winner: winner.as_str().into(),
        rollout: rollout.clone(),
    };
    let msg = match &rollout {
        Some(r) => format!("concluded: B won; rollout {r} takes it to the whole cohort"),
        None => "concluded: A kept; B's devices return to A".to_string(),
    };
    push_decision(
        &mut out,
        decision(now, "conclude", "operator", Vec::new(), msg),
    );
    match winner {
        Arm::A => stop_effects(out, fleet),
        Arm::B => (out, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use edgefleet_wire::telemetry::Latency;

    fn bundle(id: &str, version: &str, seq: u64) -> BundleRef {
        BundleRef {
            id: id.into(),
            name: "cls".into(),
            version: version.into(),
            sequence: seq,
        }
    }

    fn spec(allocation: Allocation) -> ExperimentSpec {
        ExperimentSpec {
            name: "x".into(),
            a: bundle("aaa", "1.0.0", 1),
            b: bundle("bbb", "2.0.0", 2),
            selector: BTreeMap::new(),
            split_pct: 50.0,
            allocation,
            primary: Metric::LatencyP95Ms,
            guardrail: None,
            confidence: 0.95,
            min_share: 0.1,
            max_switches_per_hour: 1,
        }
    }

    fn device(i: usize, board: &str, active: &BundleRef) -> ExpDevice {
        ExpDevice {
            id: format!("{board}-{i:02}"),
            tags: BTreeMap::from([("board".into(), board.into())]),
            active: Some(active.clone()),
            telemetry: None,
            desired: Some((active.clone(), false)),
            owner: None,
            claimed: false,
        }
    }

    fn fleet(a: &BundleRef) -> Vec<ExpDevice> {
        let mut f: Vec<ExpDevice> = (0..10).map(|i| device(i, "rpi4", a)).collect();
        f.extend((0..6).map(|i| device(i, "orin", a)));
        f
    }

    /// Devices do what the effects say and report telemetry with p95
    /// `p95(arm)`.
    fn step(
        e: &Experiment,
        f: &mut [ExpDevice],
        effects: &[Effect],
        at: u64,
        p95: impl Fn(&str) -> f64,
    ) {
        for fx in effects {
            let d = f.iter_mut().find(|d| d.id == fx.device).unwrap();
            d.active = fx.bundle.clone();
            d.desired = fx.bundle.clone().map(|b| (b, fx.rollback));
            d.owner = Some(e.id.clone());
        }
        for d in f.iter_mut() {
            let a = d.active.clone().unwrap();
            d.telemetry = Some(Telemetry {
                at,
                model: Some(format!("{}@{}", a.name, a.version)),
                inferences: 100,
                latency_ms: Some(Latency {
                    p50: p95(&a.version) / 2.0,
                    p95: p95(&a.version) + (at % 7) as f64 * 0.1,
                    p99: p95(&a.version),
                }),
                ..Telemetry::default()
            });
        }
    }

    #[test]
    fn the_split_is_stratified_per_board_and_stable() {
        let s = spec(Allocation::Fixed);
        let f = fleet(&s.a);
        let e = Experiment::new("e1".into(), s.clone(), 0);
        let (e2, effects) = tick(&e, &f, 1, &mut Rng::new(1));
        let on_b = |board: &str| {
            e2.assignments
                .iter()
                .filter(|(id, a)| id.starts_with(board) && **a == Arm::B)
                .count()
        };
        assert_eq!(on_b("rpi4"), 5);
        assert_eq!(on_b("orin"), 3);
        assert_eq!(
            effects
                .iter()
                .filter(|x| x.bundle.as_ref() == Some(&s.b))
                .count(),
            8
        );
        // Again: nobody moves, and the devices already told need nothing.
        let mut f2 = f.clone();
        step(&e2, &mut f2, &effects, 2, |_| 10.0);
        let (e3, again) = tick(&e2, &f2, 3, &mut Rng::new(1));
        assert_eq!(e3.assignments, e2.assignments);
        assert!(again.is_empty(), "{again:?}");
        // A device that does not run A never goes to B.
        let mut f3 = f.clone();
        let other = bundle("zzz", "0.9.0", 0);
        for d in f3.iter_mut() {
            d.active = Some(other.clone());
        }
        let (e4, _) = tick(&e, &f3, 1, &mut Rng::new(1));
        assert!(e4.assignments.values().all(|a| *a == Arm::A));
    }

    #[test]
    fn a_slower_arm_is_found_significant_and_b_wins() {
        let s = spec(Allocation::Fixed);
        let mut f = fleet(&s.a);
        let mut e = Experiment::new("e1".into(), s, 0);
        let mut rng = Rng::new(5);
        for t in 1..40 {
            let (n, fx) = tick(&e, &f, t, &mut rng);
            step(
                &n,
                &mut f,
                &fx,
                t,
                |v| if v == "1.0.0" { 40.0 } else { 10.0 },
            );
            e = n;
        }
        let v = e.verdict(Metric::LatencyP95Ms);
        assert!(v.significant, "{v:?}");
        assert_eq!(v.better.as_deref(), Some("b"));
        assert!(v.effect.unwrap() < -25.0 && v.effect_high.unwrap() < 0.0);
        assert_eq!(e.winner(), Some(Arm::B));
        let text = e.view().summary;
        assert!(
            text.contains("B is better") && text.contains("latency_p95_ms (primary)"),
            "{text}"
        );
    }

    #[test]
    fn no_difference_is_not_significant() {
        let s = spec(Allocation::Fixed);
        let mut f = fleet(&s.a);
        let mut e = Experiment::new("e1".into(), s, 0);
        let mut rng = Rng::new(5);
        for t in 1..40 {
            let (n, fx) = tick(&e, &f, t, &mut rng);
            step(&n, &mut f, &fx, t, |_| 10.0);
            e = n;
        }
        assert!(!e.verdict(Metric::LatencyP95Ms).significant);
        assert_eq!(e.winner(), None);
    }

    #[test]
    fn the_guardrail_stops_and_sends_b_back_to_a_as_a_rollback() {
        let mut s = spec(Allocation::Fixed);
        s.guardrail = Some(Guardrail {
            metric: Metric::LatencyP95Ms,
            max_worse_pct: 20.0,
        });
        let mut f = fleet(&s.a);
        let mut e = Experiment::new("e1".into(), s.clone(), 0);
        let mut rng = Rng::new(5);
        let mut last = Vec::new();
        for t in 1..40 {
            let (n, fx) = tick(&e, &f, t, &mut rng);
            last = fx.clone();
            step(
                &n,
                &mut f,
                &fx,
                t,
                |v| if v == "2.0.0" { 40.0 } else { 10.0 },
            );
            e = n;
            if !e.is_running() {
                break;
            }
        }
        assert!(
            matches!(e.phase, ExperimentPhase::Stopped { .. }),
            "{:?}",
            e.phase
        );
        let back: Vec<&Effect> = last
            .iter()
            .filter(|x| x.bundle.as_ref() == Some(&s.a))
            .collect();
        assert_eq!(back.len(), 8, "{last:?}");
        assert!(back.iter().all(|x| x.rollback));
        assert!(f.iter().all(|d| d.active.as_ref() == Some(&s.a)));
    }

    #[test]
    fn the_bandit_moves_devices_to_the_better_arm_within_limits() {
        let s = spec(Allocation::Thompson);
        let mut f = fleet(&s.a);
        let mut e = Experiment::new("e1".into(), s.clone(), 0);
        let mut rng = Rng::new(9);
        // Ticks a minute apart: each device may switch once an hour.
        for t in 1..30 {
            let (n, fx) = tick(&e, &f, t * 60, &mut rng);
            step(&n, &mut f, &fx, t * 60, |v| {
                if v == "2.0.0" { 5.0 } else { 20.0 }
            });
            e = n;
        }
        let on_b = e.assignments.values().filter(|a| **a == Arm::B).count();
        // min_share 0.1 keeps one device per board on A: 9 of 10, 5 of 6.
        assert_eq!(on_b, 14, "{:?}", e.assignments);
        assert!(e.switches.values().all(|l| l.len() <= 1));
        assert!(e.decisions.iter().any(|d| d.action == "reallocate"));
    }

    #[test]
    fn stop_and_conclude() {
        let s = spec(Allocation::Fixed);
        let mut f = fleet(&s.a);
        let e = Experiment::new("e1".into(), s.clone(), 0);
        let (e, fx) = tick(&e, &f, 1, &mut Rng::new(1));
        step(&e, &mut f, &fx, 1, |_| 1.0);
        let (stopped, fx) = stop(&e, &f, 2, "by operator");
        assert!(!stopped.is_running());
        assert_eq!(fx.len(), 8);
        assert!(
            fx.iter()
                .all(|x| x.rollback && x.bundle.as_ref() == Some(&s.a))
        );
        let (won, fx) = conclude(&e, &f, 2, Arm::B, Some("r9".into()));
        assert!(fx.is_empty());
        assert!(won.view().summary.contains("rollout r9"));
        let (kept, fx) = conclude(&e, &f, 2, Arm::A, None);
        assert_eq!(fx.len(), 8);
        assert!(
            matches!(kept.phase, ExperimentPhase::Concluded { ref winner, .. } if winner == "a")
        );
    }

    #[test]
    fn decisions_are_capped_keeping_the_first() {
        let mut e = Experiment::new("e1".into(), spec(Allocation::Fixed), 0);
        for i in 0..(DECISIONS_KEPT as u64 + 50) {
            push_decision(
                &mut e,
                decision(i, "assign", "split", Vec::new(), format!("{i}")),
            );
        }
        assert_eq!(e.decisions.len(), DECISIONS_KEPT);
        assert_eq!(e.decisions[0].message, "0");
        assert_eq!(
            e.decisions.last().unwrap().message,
            format!("{}", DECISIONS_KEPT + 49)
        );
    }

    #[test]
    fn experiments_survive_a_restart_of_the_store() {
        use crate::store::{Store, Write};
        let dir = tempfile::tempdir().unwrap();
        let mut e = Experiment::new("e1".into(), spec(Allocation::Thompson), 5);
        e.assignments.insert("d1".into(), Arm::B);
        e.stats_a.entry(Metric::LatencyP95Ms).or_default().push(3.0);
        e.seen.insert("d1".into(), 9);
        {
            let s = crate::store::sled::SledStore::open(dir.path()).unwrap();
            s.commit(&[Write::Experiment(Box::new(e.clone()))]).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            match crate::store::sled::SledStore::open(dir.path()) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(err) => panic!("{err}"),
            }
        };
        let back = s.load().unwrap().experiments;
        e.seen.clear();
        assert_eq!(back, vec![e]);
    }

    #[test]
    fn specs_are_checked() {
        let mut s = spec(Allocation::Fixed);
        assert!(s.validate().is_ok());
        s.b.sequence = 1;
        assert!(s.validate().unwrap_err().contains("higher sequence"));
        let mut s = spec(Allocation::Fixed);
        s.split_pct = 100.0;
        assert!(s.validate().is_err());
        let mut s = spec(Allocation::Fixed);
        s.b = s.a.clone();
        assert!(s.validate().is_err());
    }
}

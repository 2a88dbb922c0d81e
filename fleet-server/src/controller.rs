//! The rollout driver: serializes commands and periodic ticks, calls the
//! pure [`crate::rollout::next`], persists the new rollout and applies its
//! effects to devices' desired state.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_wire::api::v1::{RolloutView, StageProgress};
use edgefleet_wire::device::BundleRef;
use edgefleet_wire::device::UpdateState;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::rollout::{
    Command, DeviceStatus, Effect, Phase, Rollout, RolloutError, RolloutSpec, next,
    targets_for_stage,
};
use crate::store::{DeviceRecord, Store};

/// Failures of a rollout command.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no such rollout")]
    NotFound,
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Store(#[from] Error),
}

/// Owns rollout transitions. One lock serializes them, so a tick and an
/// operator command never interleave.
pub struct Controller {
    store: Arc<dyn Store>,
    lock: tokio::sync::Mutex<()>,
    /// Device ids whose desired state changed (MQTT "update available").
    notify: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

/// The device's health for the gates: its report, with the p95 of the last
/// telemetry interval when that telemetry is about the model it reports
/// running (fresher than the report's window).
fn health_of(d: &DeviceRecord) -> edgefleet_wire::device::Health {
    let Some(r) = d.report.as_ref() else {
        return Default::default();
    };
    let mut h = r.health.clone();
    if let (Some(t), Some(a)) = (&d.telemetry, &r.active)
        && t.model.as_deref() == Some(format!("{}@{}", a.name, a.version).as_str())
        && let Some(l) = &t.latency_ms
    {
        h.p95_latency_ms = Some(l.p95);
    }
    h
}

pub fn status_of(d: &DeviceRecord) -> DeviceStatus {
    let r = d.report.as_ref();
    DeviceStatus {
        id: d.id.clone(),
        tags: d.tags.clone(),
        active: r.and_then(|r| r.active.clone()),
        last_failed: r.and_then(|r| r.last_failed.clone()),
        state: r.map(|r| r.state),
        health: health_of(d),
        last_seen: d.last_seen,
    }
}

impl Controller {
    pub fn new(store: Arc<dyn Store>) -> Controller {
        Controller {
            store,
            lock: tokio::sync::Mutex::new(()),
            notify: None,
        }
    }

    /// Sends the id of every device whose desired state changes.
    pub fn with_notifier(mut self, tx: tokio::sync::mpsc::UnboundedSender<String>) -> Controller {
        self.notify = Some(tx);
        self
    }

    fn fleet(&self) -> Result<Vec<DeviceStatus>> {
        Ok(self.store.list_devices()?.iter().map(status_of).collect())
    }

    fn apply(&self, rollout_id: &str, effects: &[Effect]) -> Result<()> {
        for e in effects {
            let mut changed = false;
            self.store.update_device(&e.device, &mut |d| {
                changed = d.desired != e.bundle
                    || d.desired_rollout.as_deref() != Some(rollout_id)
                    || d.desired_rollback != e.rollback;
                d.desired.clone_from(&e.bundle);
                d.desired_rollout = Some(rollout_id.to_string());
                d.desired_rollback = e.rollback;
                changed
            })?;
            if changed && let Some(n) = &self.notify {
                let _ = n.send(e.device.clone());
            }
        }
        Ok(())
    }

    /// Creates a rollout and runs its first tick (stage 0 devices get the bundle).
    pub async fn create(
        &self,
        id: String,
        bundle: BundleRef,
        spec: RolloutSpec,
        now: u64,
    ) -> Result<Rollout, ControllerError> {
        spec.validate()?;
        let _g = self.lock.lock().await;
        let r = Rollout {
            id,
            spec: RolloutSpec { bundle, ..spec },
            phase: Phase::Running {
                stage: 0,
                stage_started: now,
            },
            created_at: now,
            previous: Default::default(),
            decisions: Vec::new(),
        };
        let fleet = self.fleet()?;
        // One rollout drives a device at a time: a new rollout supersedes
        // running or paused ones whose devices it shares.
        let last = |x: &Rollout| x.spec.stages.len().saturating_sub(1);
        let ours: std::collections::BTreeSet<&str> =
            crate::rollout::targets_for_stage(&r, &fleet, last(&r))
                .iter()
                .map(|d| d.id.as_str())
                .collect();
        for old in self.store.list_rollouts()? {
            if !matches!(old.phase, Phase::Running { .. } | Phase::Paused { .. }) {
                continue;
            }
            let overlaps = crate::rollout::targets_for_stage(&old, &fleet, last(&old))
                .iter()
                .any(|d| ours.contains(d.id.as_str()));
            if overlaps {
                let (mut old, _) = next(&old, &fleet, Command::Supersede, now)?;
                if let Some(d) = old.decisions.last_mut() {
                    d.message = format!("superseded by rollout {}", r.id);
                }
                self.store.put_rollout(&old)?;
            }
        }
        let (r, effects) = next(&r, &fleet, Command::Tick, now)?;
        self.store.put_rollout(&r)?;
        self.apply(&r.id, &effects)?;
        Ok(r)
    }

    /// Applies an operator command.
    pub async fn command(
        &self,
        id: &str,
        cmd: Command,
        now: u64,
    ) -> Result<Rollout, ControllerError> {
        let _g = self.lock.lock().await;
        let r = self
            .store
            .get_rollout(id)?
            .ok_or(ControllerError::NotFound)?;
        let (r, effects) = next(&r, &self.fleet()?, cmd, now)?;
        self.store.put_rollout(&r)?;
        self.apply(&r.id, &effects)?;
        Ok(r)
    }

    /// Evaluates every running rollout once.
    pub async fn tick(&self, now: u64) -> Result<()> {
        let _g = self.lock.lock().await;
        let fleet = self.fleet()?;
        for r in self.store.list_rollouts()? {
            if !matches!(r.phase, Phase::Running { .. }) {
                continue;
            }
            let (n, effects) =
                next(&r, &fleet, Command::Tick, now).map_err(|e| Error::Store(e.to_string()))?;
            if n != r {
                self.store.put_rollout(&n)?;
                if let Some(d) = n
                    .decisions
                    .last()
                    .filter(|_| n.decisions.len() > r.decisions.len())
                {
                    tracing::warn!(rollout = %n.id, gate = %d.gate, observed = ?d.observed, threshold = ?d.threshold, devices = ?d.devices, "rollout paused: {}", d.message);
                }
            }
            self.apply(&n.id, &effects)?;
        }
        Ok(())
    }

    /// Progress of a rollout per stage and per device state.
    pub fn progress(&self, r: &Rollout) -> Result<RolloutView> {
        Ok(progress_in(r, &self.fleet()?))
    }

    /// Progress of every rollout, reading the fleet once.
    pub fn progress_all(&self) -> Result<Vec<RolloutView>> {
        let fleet = self.fleet()?;
        Ok(self
            .store
            .list_rollouts()?
            .iter()
            .map(|r| progress_in(r, &fleet))
            .collect())
    }
}

/// Progress of `r` against an already-read fleet.
fn progress_in(r: &Rollout, fleet: &[DeviceStatus]) -> RolloutView {
    let bundle = &r.spec.bundle.id;
    let stages = r
        .spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let targets = targets_for_stage(r, fleet, i);
            let count =
                |f: &dyn Fn(&DeviceStatus) -> bool| targets.iter().filter(|d| f(d)).count() as u64;
            let running = |d: &DeviceStatus| d.active.as_ref().is_some_and(|a| &a.id == bundle);
            let failed_on =
                |d: &DeviceStatus| d.last_failed.as_ref().is_some_and(|f| &f.id == bundle);
            StageProgress {
                percent: s.percent,
                bake_minutes: s.bake_minutes,
                bake_seconds: s.bake_secs(),
                devices: targets.len() as u64,
                running: count(&running),
                failed: count(&|d| failed_on(d) && d.state == Some(UpdateState::Failed)),
                rolled_back: count(&|d| failed_on(d) && d.state == Some(UpdateState::RolledBack)),
                pending: count(&|d| !running(d) && !failed_on(d)),
                offline: 0,
            }
        })
        .collect();
    RolloutView {
        id: r.id.clone(),
        bundle: r.spec.bundle.clone(),
        selector: r.spec.selector.clone(),
        gates: r.spec.gates.clone(),
        shadow: r.spec.shadow.clone(),
        phase: r.phase.clone(),
        created_at: r.created_at,
        stages,
        decisions: r.decisions.clone(),
    }
}

/// Ticks every `every` until cancelled. A failing tick is logged, not fatal.
pub async fn run_ticker(controller: Arc<Controller>, every: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {
                if let Err(e) = controller.tick(edgefleet_wire::time::unix_now()).await {
                    tracing::error!(error = %e, "rollout tick failed");
                }
            }
        }
    }
}

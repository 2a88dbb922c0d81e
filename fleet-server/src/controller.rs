//! The rollout driver: serializes commands and periodic ticks, calls the
//! pure [`crate::rollout::next`] on the in-memory fleet, makes the new
//! rollout record and the devices' desired states durable, and only then
//! shows them to devices (so a desired state never goes backwards across a
//! restart). Each rollout's progress is computed once per tick and served
//! from memory.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edgefleet_wire::api::v1::{RolloutView, StageProgress};
use edgefleet_wire::device::{BundleRef, Health, WatchPolicy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::fleet::{DesiredDoc, Fleet, RolloutTerms, lock};
use crate::rollout::{
    Command, DeviceStatus, Effect, Phase, Rollout, RolloutError, RolloutSpec, Tally, next,
    targets_for_stage,
};
use crate::store::{Desired, DeviceRecord, Joined, Part, RecentBundle, Write};
use crate::writer::{WriteError, Writer};

/// Failures of a rollout command.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("no such rollout")]
    NotFound,
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Store(#[from] Error),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Device writes per commit when a transition changes many devices.
const COMMIT_CHUNK: usize = 500;

/// How long a device may still download a bundle its desired state no
/// longer names (it may be mid-transfer when a rollout is superseded).
pub const DOWNLOAD_GRACE_SECS: u64 = 3600;

struct Entry {
    rollout: Rollout,
    view: RolloutView,
}

/// Owns rollout transitions. One lock serializes them, so a tick and an
/// operator command never interleave.
pub struct Controller {
    fleet: Arc<Fleet>,
    writer: Writer,
    rollouts: RwLock<BTreeMap<String, Entry>>,
    lock: tokio::sync::Mutex<()>,
    /// Device ids whose desired state changed (MQTT "update available").
    notify: Option<mpsc::Sender<String>>,
    /// A device silent for longer counts as offline for the stages.
    offline_after: u64,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

/// The device's health for the gates: its report, with the p95 of the last
/// telemetry interval when that telemetry is about the model it reports
/// running (fresher than the report's window).
fn health_of(d: &DeviceRecord) -> Health {
    let Some(r) = d.report() else {
        return Health::default();
    };
    let mut h = r.health.clone();
    if let (Some(t), Some(a)) = (&d.live.telemetry, &r.active)
        && t.model.as_deref() == Some(format!("{}@{}", a.name, a.version).as_str())
        && let Some(l) = &t.latency_ms
    {
        h.p95_latency_ms = Some(l.p95);
    }
    h
}

/// A device as the controller sees it at `now`.
pub fn status_of(d: &DeviceRecord, now: u64, offline_after: u64) -> DeviceStatus {
    let r = d.report();
    let last_seen = d.last_seen();
    DeviceStatus {
        id: d.id.clone(),
        tags: d.identity.tags.clone(),
        active: r.and_then(|r| r.active.clone()),
        last_failed: r.and_then(|r| r.last_failed.clone()),
        state: r.map(|r| r.state),
        health: health_of(d),
        last_seen,
        offline: d.live.online == Some(false) || last_seen.is_none_or(|t| t + offline_after < now),
        joined: d
            .desired
            .joined
            .as_ref()
            .map(|j| (j.rollout.clone(), j.previous.clone())),
    }
}

/// A rollout's terms for its devices' desired state.
pub fn terms_of(spec: &RolloutSpec) -> RolloutTerms {
    RolloutTerms {
        watch: Some(WatchPolicy {
            max_error_rate: spec.gates.max_error_rate,
            max_p95_latency_ms: spec.gates.max_p95_latency_ms,
        }),
        shadow: spec.shadow.clone(),
    }
}

/// Progress of `r` against an already-read fleet.
pub fn progress(r: &Rollout, fleet: &[DeviceStatus]) -> RolloutView {
    let stages = r
        .spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let targets = targets_for_stage(r, fleet, i);
            // Running means running it now, whenever it was reported.
            let t = Tally::of(&targets, &r.spec.bundle, 0);
            StageProgress {
                percent: s.percent,
                bake_minutes: s.bake_minutes,
                bake_seconds: s.bake_secs(),
                devices: targets.len() as u64,
                running: t.running as u64,
                pending: (t.pending + t.offline) as u64,
                failed: t.failed as u64,
                rolled_back: t.rolled_back as u64,
                offline: t.offline as u64,
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

impl Controller {
    pub fn new(
        fleet: Arc<Fleet>,
        writer: Writer,
        rollouts: Vec<Rollout>,
        offline_after: u64,
        notify: Option<mpsc::Sender<String>>,
        now: u64,
    ) -> Controller {
        let c = Controller {
            fleet,
            writer,
            rollouts: RwLock::new(BTreeMap::new()),
            lock: tokio::sync::Mutex::new(()),
            notify,
            offline_after,
        };
        let statuses = c.statuses(now);
        let mut map = c.rollouts.write().unwrap_or_else(|e| e.into_inner());
        for r in rollouts {
            let view = progress(&r, &statuses);
            map.insert(r.id.clone(), Entry { rollout: r, view });
        }
        drop(map);
        c
    }

    /// The rollout terms of each loaded rollout, for the fleet's documents.
    pub fn terms_table(rollouts: &[Rollout]) -> BTreeMap<String, RolloutTerms> {
        rollouts
            .iter()
            .map(|r| (r.id.clone(), terms_of(&r.spec)))
            .collect()
    }

    fn statuses(&self, now: u64) -> Vec<DeviceStatus> {
        self.fleet
            .cells()
            .iter()
            .map(|c| status_of(&lock(c).rec, now, self.offline_after))
            .collect()
    }

    pub fn terms(&self, rollout: Option<&str>) -> RolloutTerms {
        rollout
            .and_then(|id| {
                self.rollouts
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(id)
                    .map(|e| terms_of(&e.rollout.spec))
            })
            .unwrap_or_default()
    }

    /// Makes the rollouts and the devices' new desired states durable, then
    /// shows them: the fleet's documents, the cached views, MQTT notices.
    async fn apply(
        &self,
        rollouts: Vec<Rollout>,
        effects: &[(String, Effect)],
        statuses: &[DeviceStatus],
        now: u64,
    ) -> Result<(), ControllerError> {
        let mut writes: Vec<Write> = rollouts
            .iter()
            .map(|r| Write::Rollout(Box::new(r.clone())))
            .collect();
        let mut changed: Vec<(String, Desired, String)> = Vec::new();
        for (rollout_id, e) in effects {
            let Some(cell) = self.fleet.get(&e.device) else {
                continue;
            };
            let d = lock(&cell);
            let old = &d.rec.desired;
            let mut new = Desired {
                bundle: e.bundle.clone(),
                rollout: Some(rollout_id.clone()),
                rollback: e.rollback,
                joined: match &e.joins {
                    Some(previous) => Some(Joined {
                        rollout: rollout_id.clone(),
                        previous: previous.clone(),
                    }),
                    None => old.joined.clone(),
                },
                recent: old.recent.clone(),
            };
            if new == *old {
                continue;
            }
            // The bundle it was told to fetch before stays downloadable for
            // a while: it may be mid-transfer.
            if let Some(prev) = &old.bundle
                && new.bundle.as_ref().is_none_or(|b| b.id != prev.id)
            {
                new.recent.retain(|r| r.id != prev.id && r.until > now);
                new.recent.push(RecentBundle {
                    id: prev.id.clone(),
                    until: now + DOWNLOAD_GRACE_SECS,
                });
                let n = new.recent.len();
                if n > 4 {
                    new.recent.drain(..n - 4);
                }
            }
            writes.push(Write::Device(e.device.clone(), Part::Desired(new.clone())));
            changed.push((e.device.clone(), new, rollout_id.clone()));
        }
        // In chunks: a stage of thousands of devices must not hold the
        // writer (and every device report waiting on it) for one huge batch.
        // The rollout records go last, after every device write.
        let (rollout_writes, device_writes): (Vec<Write>, Vec<Write>) = writes
            .into_iter()
            .partition(|w| matches!(w, Write::Rollout(_)));
        let mut device_writes = device_writes;
        while !device_writes.is_empty() {
            let rest = device_writes.split_off(device_writes.len().min(COMMIT_CHUNK));
            self.writer.commit(device_writes).await?;
            device_writes = rest;
        }
        self.writer.commit(rollout_writes).await?;
        // Durable: now devices may see it.
        {
            let mut map = self.rollouts.write().unwrap_or_else(|e| e.into_inner());
            for r in rollouts {
                let view = progress(&r, statuses);
                map.insert(r.id.clone(), Entry { rollout: r, view });
            }
        }
        for (id, desired, rollout_id) in changed {
            let Some(cell) = self.fleet.get(&id) else {
                continue;
            };
            let terms = self.terms(Some(&rollout_id));
            {
                let mut d = lock(&cell);
                // Read under the lock: see Fleet::set_trust.
                d.doc = Arc::new(DesiredDoc::of(
                    &desired,
                    &terms,
                    self.fleet.trust_doc().as_deref(),
                ));
                d.rec.desired = desired;
            }
            if let Some(n) = &self.notify {
                // A device that misses a notice polls anyway.
                let _ = n.try_send(id);
            }
        }
        Ok(())
    }

    /// Creates a rollout and runs its first tick (stage 0 devices get the
    /// bundle). Running or paused rollouts sharing devices are superseded.
    pub async fn create(
        &self,
        id: String,
        spec: RolloutSpec,
        now: u64,
    ) -> Result<RolloutView, ControllerError> {
        spec.validate()?;
        let _g = self.lock.lock().await;
        let r = Rollout {
            id,
            spec,
            phase: Phase::Running {
                stage: 0,
                stage_started: now,
            },
            created_at: now,
            decisions: Vec::new(),
        };
        let fleet = self.statuses(now);
        let last = |x: &Rollout| x.spec.stages.len().saturating_sub(1);
        let ours: std::collections::BTreeSet<&str> = targets_for_stage(&r, &fleet, last(&r))
            .iter()
            .map(|d| d.id.as_str())
            .collect();
        let active: Vec<Rollout> = self
            .rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| {
                matches!(
                    e.rollout.phase,
                    Phase::Running { .. } | Phase::Paused { .. }
                )
            })
            .map(|e| e.rollout.clone())
            .collect();
        let mut changed = Vec::new();
        for old in active {
            let overlaps = targets_for_stage(&old, &fleet, last(&old))
                .iter()
                .any(|d| ours.contains(d.id.as_str()));
            if overlaps {
                let (mut old, _) = next(&old, &fleet, Command::Supersede, now)?;
                if let Some(d) = old.decisions.last_mut() {
                    d.message = format!("superseded by rollout {}", r.id);
                }
                tracing::info!(rollout = %old.id, by = %r.id, "rollout superseded");
                changed.push(old);
            }
        }
        let (r, effects) = next(&r, &fleet, Command::Tick, now)?;
        let id = r.id.clone();
        changed.push(r);
        let effects: Vec<_> = effects.into_iter().map(|e| (id.clone(), e)).collect();
        self.apply(changed, &effects, &fleet, now).await?;
        tracing::info!(rollout = %id, "rollout created");
        self.view(&id).ok_or(ControllerError::NotFound)
    }

    /// Applies an operator command.
    pub async fn command(
        &self,
        id: &str,
        cmd: Command,
        now: u64,
    ) -> Result<RolloutView, ControllerError> {
        let _g = self.lock.lock().await;
        let r = self.rollout(id).ok_or(ControllerError::NotFound)?;
        let fleet = self.statuses(now);
        let (r, effects) = next(&r, &fleet, cmd, now)?;
        log_decisions(&r, 1);
        let effects: Vec<_> = effects.into_iter().map(|e| (r.id.clone(), e)).collect();
        self.apply(vec![r], &effects, &fleet, now).await?;
        self.view(id).ok_or(ControllerError::NotFound)
    }

    fn rollout(&self, id: &str) -> Option<Rollout> {
        self.rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|e| e.rollout.clone())
    }

    /// Evaluates every running rollout once and refreshes the progress of
    /// running and paused ones. Idle when no rollout is running or paused.
    pub async fn tick(&self, now: u64) -> Result<(), ControllerError> {
        let _g = self.lock.lock().await;
        let live: Vec<Rollout> = self
            .rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| {
                matches!(
                    e.rollout.phase,
                    Phase::Running { .. } | Phase::Paused { .. }
                )
            })
            .map(|e| e.rollout.clone())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let fleet = self.statuses(now);
        let mut updated = Vec::new();
        let mut effects = Vec::new();
        for r in live {
            let (n, fx) = next(&r, &fleet, Command::Tick, now)?;
            log_decisions(&n, n.decisions.len() - r.decisions.len());
            effects.extend(fx.into_iter().map(|e| (n.id.clone(), e)));
            updated.push(n);
        }
        // Records that did not change are not rewritten; views refresh anyway.
        let (dirty, clean): (Vec<Rollout>, Vec<Rollout>) = updated
            .into_iter()
            .partition(|n| self.rollout(&n.id).as_ref() != Some(n));
        self.apply(dirty, &effects, &fleet, now).await?;
        let mut map = self.rollouts.write().unwrap_or_else(|e| e.into_inner());
        for r in clean {
            let view = progress(&r, &fleet);
            if let Some(e) = map.get_mut(&r.id) {
                e.view = view;
            }
        }
        Ok(())
    }

    /// A rollout with its progress as of the last tick or command.
    pub fn view(&self, id: &str) -> Option<RolloutView> {
        self.rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|e| e.view.clone())
    }

    /// Every rollout, newest first.
    pub fn views(&self) -> Vec<RolloutView> {
        let mut v: Vec<RolloutView> = self
            .rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.view.clone())
            .collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Rollouts by phase (for /metrics).
    pub fn phases(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for e in self
            .rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *out.entry(e.rollout.phase.name()).or_default() += 1;
        }
        out
    }

    /// Whether `bundle` is referenced by a rollout (for the registry).
    pub fn uses_bundle(&self, bundle: &BundleRef) -> bool {
        self.rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| e.rollout.spec.bundle.id == bundle.id)
    }
}

/// Logs the newest `n` decisions by what happened.
fn log_decisions(r: &Rollout, n: usize) {
    for d in r.decisions.iter().rev().take(n).rev() {
        match d.action.as_str() {
            "pause" => {
                tracing::warn!(rollout = %r.id, gate = %d.gate, observed = ?d.observed, threshold = ?d.threshold, devices = ?d.devices, device_count = d.device_count, "rollout paused: {}", d.message)
            }
            "complete" => tracing::info!(rollout = %r.id, "rollout completed: {}", d.message),
            "advance" => {
                tracing::info!(rollout = %r.id, joining = d.device_count, "rollout advanced: {}", d.message)
            }
            other => {
                tracing::info!(rollout = %r.id, action = other, "rollout {other}: {}", d.message)
            }
        }
    }
}

/// Ticks every `every` until cancelled. A failing tick is logged, not fatal.
pub async fn run_ticker(
    controller: Arc<Controller>,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = interval.tick() => {
                if let Err(e) = controller.tick(edgefleet_wire::time::unix_now()).await {
                    tracing::error!(error = %e, "rollout tick failed");
                }
            }
        }
    }
}

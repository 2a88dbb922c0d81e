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
use crate::experiment::{Arm, ExpDevice, Experiment};
use crate::fleet::{Fleet, RolloutTerms, lock};
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
    /// Another rollout or experiment holds some of the devices.
    #[error("{0}")]
    Conflict(String),
    #[error("invalid experiment: {0}")]
    Invalid(String),
}

/// How often a running experiment's statistics are stored when nothing
/// else about it changed (a crash loses at most this much of them).
const STATS_PERSIST_SECS: u64 = 30;

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
    /// A/B experiments (crate::experiment), ticked after the rollouts.
    experiments: RwLock<BTreeMap<String, Experiment>>,
    /// The bandit's randomness.
    rng: std::sync::Mutex<crate::stats::Rng>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

/// A running or paused rollout: it holds its devices, and a tick or a new
/// rollout can change it.
fn is_live(phase: &Phase) -> bool {
    matches!(phase, Phase::Running { .. } | Phase::Paused { .. })
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
        staged: r.and_then(|r| r.staged.clone()),
        activate_at: r.and_then(|r| r.activate_at),
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
        window: spec.window.clone(),
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
                waiting: t.waiting as u64,
                next_window: t.next_window,
            }
        })
        .collect();
    RolloutView {
        id: r.id.clone(),
        bundle: r.spec.bundle.clone(),
        selector: r.spec.selector.clone(),
        gates: r.spec.gates.clone(),
        shadow: r.spec.shadow.clone(),
        window: r.spec.window.clone(),
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
            experiments: RwLock::new(BTreeMap::new()),
            rng: std::sync::Mutex::new(crate::stats::Rng::new(now ^ 0x5DEE_CE66_D1CE)),
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
        self.apply_all(rollouts, Vec::new(), effects, statuses, now)
            .await
    }

    async fn apply_all(
        &self,
        rollouts: Vec<Rollout>,
        experiments: Vec<Experiment>,
        effects: &[(String, Effect)],
        statuses: &[DeviceStatus],
        now: u64,
    ) -> Result<(), ControllerError> {
        let mut writes: Vec<Write> = rollouts
            .iter()
            .map(|r| Write::Rollout(Box::new(r.clone())))
            .chain(
                experiments
                    .iter()
                    .map(|e| Write::Experiment(Box::new(e.clone()))),
            )
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
            .partition(|w| matches!(w, Write::Rollout(_) | Write::Experiment(_)));
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
        {
            let mut map = self.experiments.write().unwrap_or_else(|e| e.into_inner());
            for e in experiments {
                map.insert(e.id.clone(), e);
            }
        }
        for (id, desired, rollout_id) in changed {
            let Some(cell) = self.fleet.get(&id) else {
                continue;
            };
            let terms = self.terms(Some(&rollout_id));
            {
                let mut d = lock(&cell);
                d.rec.desired = desired;
                // Read under the lock: see Fleet::set_trust.
                self.fleet.rebuild(&mut d, &terms);
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
        if let Some((exp, dev)) = self
            .experiments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.is_running())
            .find_map(|e| {
                e.assignments
                    .keys()
                    .find(|d| ours.contains(d.as_str()))
                    .map(|d| (e.id.clone(), d.clone()))
            })
        {
            return Err(ControllerError::Conflict(format!(
                "device {dev} is in running experiment {exp}; stop or conclude it first"
            )));
        }
        let active = self.live_rollouts();
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

    /// Running and paused rollouts (the ones a tick or a new rollout can
    /// change; see [`is_live`]).
    fn live_rollouts(&self) -> Vec<Rollout> {
        self.rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| is_live(&e.rollout.phase))
            .map(|e| e.rollout.clone())
            .collect()
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
        let live = self.live_rollouts();
        self.tick_experiments(now).await?;
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

    /// Whether `bundle` is referenced by a rollout or an experiment (for
    /// the registry).
    pub fn uses_bundle(&self, bundle: &BundleRef) -> bool {
        self.rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| e.rollout.spec.bundle.id == bundle.id)
            || self
                .experiments
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(|e| e.spec.a.id == bundle.id || e.spec.b.id == bundle.id)
    }
}

/// Operator commands on an experiment.
#[derive(Clone, Debug)]
pub enum ExperimentCommand {
    Stop,
    /// The winner (None: the significant one on the primary metric), and
    /// for B the rollout to create (its id and spec without the bundle).
    Conclude {
        winner: Option<Arm>,
        rollout_id: String,
        stages: Vec<crate::rollout::Stage>,
        gates: crate::rollout::Gates,
    },
}

impl Controller {
    /// The experiments as stored (at start).
    pub fn load_experiments(&self, experiments: Vec<Experiment>) {
        let mut map = self.experiments.write().unwrap_or_else(|e| e.into_inner());
        for e in experiments {
            map.insert(e.id.clone(), e);
        }
    }

    /// Every device as experiments see it: who holds it now.
    fn exp_devices(&self) -> Vec<ExpDevice> {
        // Who holds devices, read first: no map lock is held while device
        // locks are taken (writers of those maps take device locks).
        let mut holders: std::collections::HashSet<String> = self
            .rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| is_live(&e.rollout.phase))
            .map(|e| e.rollout.id.clone())
            .collect();
        holders.extend(
            self.experiments
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter(|e| e.is_running())
                .map(|e| e.id.clone()),
        );
        let holds = |owner: &str| holders.contains(owner);
        self.fleet
            .cells()
            .iter()
            .map(|c| {
                let d = lock(c);
                let r = &d.rec;
                let owner = r.desired.rollout.clone();
                ExpDevice {
                    id: r.id.clone(),
                    tags: r.identity.tags.clone(),
                    active: r.report().and_then(|x| x.active.clone()),
                    telemetry: r.live.telemetry.clone(),
                    desired: r.desired.bundle.clone().map(|b| (b, r.desired.rollback)),
                    claimed: owner.as_deref().is_some_and(holds),
                    owner,
                }
            })
            .collect()
    }

    fn experiment(&self, id: &str) -> Option<Experiment> {
        self.experiments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Resolves an experiment id, a unique prefix (4+) or its name.
    pub fn find_experiment(&self, key: &str) -> Result<String, ControllerError> {
        let map = self.experiments.read().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(key) {
            return Ok(key.to_string());
        }
        // A name means the running experiment of that name, if there is
        // one (names are reused once an experiment is over).
        if let Some(e) = map.values().find(|e| e.is_running() && e.spec.name == key) {
            return Ok(e.id.clone());
        }
        let hits: Vec<&Experiment> = map
            .values()
            .filter(|e| (key.len() >= 4 && e.id.starts_with(key)) || e.spec.name == key)
            .collect();
        match hits.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(ControllerError::NotFound),
            many => Err(ControllerError::Conflict(format!(
                "{key:?} names {} experiments; use more of the id",
                many.len()
            ))),
        }
    }

    pub fn experiment_view(&self, id: &str) -> Option<edgefleet_wire::api::v1::ExperimentView> {
        self.experiment(id).map(|e| self.view_of(&e))
    }

    fn view_of(&self, e: &Experiment) -> edgefleet_wire::api::v1::ExperimentView {
        let mut v = e.view();
        let mut per: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for c in self.fleet.cells() {
            let d = lock(&c);
            if let Some(arm) = e.assignments.get(&d.rec.id) {
                let board = d
                    .rec
                    .identity
                    .tags
                    .get("board")
                    .cloned()
                    .unwrap_or_else(|| "none".into());
                let x = per.entry(board).or_default();
                x.0 += 1;
                x.1 += u64::from(*arm == Arm::B);
            }
        }
        v.b_share_by_board = per
            .into_iter()
            .map(|(b, (n, on_b))| (b, on_b as f64 / n.max(1) as f64))
            .collect();
        v
    }

    /// Every experiment, newest first.
    pub fn experiment_views(&self) -> Vec<edgefleet_wire::api::v1::ExperimentView> {
        let list: Vec<Experiment> = self
            .experiments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut v: Vec<_> = list.iter().map(|e| self.view_of(e)).collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Starts an experiment and runs its first tick. Devices held by a
    /// running or paused rollout, or another running experiment, are left
    /// out; if that leaves none of the selected devices, it is a conflict.
    pub async fn create_experiment(
        &self,
        id: String,
        spec: crate::experiment::ExperimentSpec,
        now: u64,
    ) -> Result<edgefleet_wire::api::v1::ExperimentView, ControllerError> {
        spec.validate().map_err(ControllerError::Invalid)?;
        let _g = self.lock.lock().await;
        if self
            .experiments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| e.is_running() && e.spec.name == spec.name)
        {
            return Err(ControllerError::Conflict(format!(
                "an experiment named {:?} is running",
                spec.name
            )));
        }
        let devices = self.exp_devices();
        let selected: Vec<&ExpDevice> = devices
            .iter()
            .filter(|d| crate::rollout::selects(&spec.selector, &d.tags))
            .collect();
        if let Some(d) = selected.iter().find(|d| d.claimed) {
            return Err(ControllerError::Conflict(format!(
                "device {} is held by {}; let it finish, or stop it, first",
                d.id,
                d.owner.as_deref().unwrap_or("?")
            )));
        }
        let e = Experiment::new(id.clone(), spec, now);
        let (e, effects) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            crate::experiment::tick(&e, &devices, now, &mut rng)
        };
        let effects: Vec<_> = effects.into_iter().map(|x| (id.clone(), x)).collect();
        let statuses = self.statuses(now);
        self.apply_all(Vec::new(), vec![e], &effects, &statuses, now)
            .await?;
        tracing::info!(experiment = %id, "experiment started");
        self.experiment_view(&id).ok_or(ControllerError::NotFound)
    }

    async fn tick_experiments(&self, now: u64) -> Result<(), ControllerError> {
        let running: Vec<Experiment> = self
            .experiments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.is_running())
            .cloned()
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        let devices = self.exp_devices();
        let statuses = self.statuses(now);
        let mut dirty = Vec::new();
        let mut effects = Vec::new();
        for e in running {
            let (n, fx) = {
                let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                crate::experiment::tick(&e, &devices, now, &mut rng)
            };
            if let edgefleet_wire::api::v1::ExperimentPhase::Stopped { reason, .. } = &n.phase {
                tracing::warn!(experiment = %n.id, "experiment stopped: {reason}");
            }
            effects.extend(fx.into_iter().map(|x| (n.id.clone(), x)));
            // Stats change with every telemetry record: they are stored at
            // most every STATS_PERSIST_SECS; anything else (assignments,
            // decisions, the phase) at once. The `seen` marks live in
            // memory only.
            let structural = n.phase != e.phase
                || n.assignments != e.assignments
                || n.decisions.last() != e.decisions.last()
                || n.switches != e.switches;
            let stats_changed = n.stats_a != e.stats_a || n.stats_b != e.stats_b;
            let mut n = n;
            let stale = now.saturating_sub(n.persisted_at) >= STATS_PERSIST_SECS;
            if structural || (stats_changed && stale) {
                n.persisted_at = now;
                dirty.push(n);
            } else {
                self.experiments
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(n.id.clone(), n);
            }
        }
        self.apply_all(Vec::new(), dirty, &effects, &statuses, now)
            .await
    }

    /// Stops or concludes an experiment.
    pub async fn experiment_command(
        &self,
        id: &str,
        cmd: ExperimentCommand,
        now: u64,
    ) -> Result<edgefleet_wire::api::v1::ExperimentView, ControllerError> {
        let rollout = {
            let _g = self.lock.lock().await;
            let e = self.experiment(id).ok_or(ControllerError::NotFound)?;
            if !e.is_running() {
                return Err(ControllerError::Conflict(format!(
                    "the experiment is {}",
                    match e.phase {
                        edgefleet_wire::api::v1::ExperimentPhase::Stopped { .. } => "stopped",
                        _ => "concluded",
                    }
                )));
            }
            let devices = self.exp_devices();
            let statuses = self.statuses(now);
            let (n, fx, rollout) = match cmd {
                ExperimentCommand::Stop => {
                    let (n, fx) =
                        crate::experiment::stop(&e, &devices, now, "stopped by an operator");
                    (n, fx, None)
                }
                ExperimentCommand::Conclude {
                    winner,
                    rollout_id,
                    stages,
                    gates,
                } => {
                    let winner = winner.or_else(|| e.winner()).ok_or_else(|| {
                        ControllerError::Conflict(format!(
                            "no arm is significantly better on {} yet; name the winner to conclude anyway",
                            e.spec.primary.as_str()
                        ))
                    })?;
                    match winner {
                        Arm::A => {
                            let (n, fx) =
                                crate::experiment::conclude(&e, &devices, now, Arm::A, None);
                            (n, fx, None)
                        }
                        Arm::B => {
                            let spec = RolloutSpec {
                                bundle: e.spec.b.clone(),
                                selector: e.spec.selector.clone(),
                                stages,
                                gates,
                                shadow: None,
                                window: None,
                            };
                            spec.validate()?;
                            let (n, fx) = crate::experiment::conclude(
                                &e,
                                &devices,
                                now,
                                Arm::B,
                                Some(rollout_id.clone()),
                            );
                            (n, fx, Some((rollout_id, spec)))
                        }
                    }
                }
            };
            let effects: Vec<_> = fx.into_iter().map(|x| (n.id.clone(), x)).collect();
            self.apply_all(Vec::new(), vec![n], &effects, &statuses, now)
                .await?;
            rollout
        };
        if let Some((rid, spec)) = rollout {
            self.create(rid, spec, now).await?;
        }
        self.experiment_view(id).ok_or(ControllerError::NotFound)
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

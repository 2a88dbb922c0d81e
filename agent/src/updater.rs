//! The driver of the update machine ([`crate::update`]): it performs the
//! effects (download, verify, self-test, shadow, swap, watch, rollback,
//! garbage collection), turns their outcomes into events, and persists the
//! record after every step, before the next effect runs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgefleet_wire::bundle::Limits;
use edgefleet_wire::device::{BundleRef, DesiredState, ShadowAgreement};
use edgefleet_wire::verify::{Expiry, TrustRoot};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::bundle::{TrustedBundle, now_unix, open_file_with};
use crate::client::{Download, ServerClient};
use crate::config::AgentConfig;
use crate::engine::{ActiveModel, Engine, Faults, Shadow, prepare};
use crate::error::AgentError;
use crate::floor::FloorFile;
use crate::health::{Verdict, WatchLimits, WatchSample, judge};
use crate::store::Store;
use crate::update::{Effect, Event, Lifecycle, Record, Target, next};

/// Store key of the update record.
pub const RECORD_KEY: &str = "update";

/// A lifecycle event for reports and MQTT.
#[derive(Clone, Debug, Serialize)]
pub struct Notice {
    pub at: u64,
    pub event: Lifecycle,
    pub bundle: Option<BundleRef>,
    pub reason: Option<String>,
}

/// Bundle files of a data dir: `bundles/<id>.bundle`, `bundles/<id>.part`.
#[derive(Clone, Debug)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    pub fn new(data_dir: &Path) -> Result<Slots, AgentError> {
        let dir = data_dir.join("bundles");
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
        Ok(Slots { dir })
    }

    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bundle"))
    }

    pub fn part(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.part"))
    }

    /// Deletes every bundle file except `keep`.
    pub fn collect(&self, keep: &[&str]) -> Result<usize, AgentError> {
        let mut removed = 0;
        let rd = std::fs::read_dir(&self.dir).map_err(|e| AgentError::io(&self.dir, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let id = name.split('.').next().unwrap_or_default();
            if !keep.contains(&id) {
                std::fs::remove_file(entry.path()).map_err(|e| AgentError::io(entry.path(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// sha256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, AgentError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| AgentError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Turns the server's desired state into an install target.
pub fn target_of(d: &DesiredState) -> Option<Target> {
    Some(Target {
        bundle: d.bundle.clone()?,
        download: d.download.clone(),
        rollback: d.rollback,
        rollout_id: d.rollout_id.clone(),
        watch: d.watch.clone(),
        shadow: d.shadow.clone(),
    })
}

/// The test-only faults configured for a bundle.
pub fn faults_for(cfg: &AgentConfig, name: &str, version: &str) -> Faults {
    let key = format!("{name}@{version}");
    Faults {
        extra_latency: Duration::from_millis(
            cfg.testing
                .inject_latency_ms
                .get(&key)
                .copied()
                .unwrap_or(0),
        ),
        fail: cfg.testing.inject_errors.contains(&key),
    }
}

/// Loads a bundle already installed here (active or last known good).
/// Expiry is not enforced: it was checked when the bundle was installed,
/// and an expired model keeps serving rather than leave the device with
/// none (the signature and digests are still checked).
pub fn load_installed(
    slots: &Slots,
    root: &TrustRoot,
    b: &BundleRef,
    cfg: &AgentConfig,
) -> Result<ActiveModel, AgentError> {
    let tb = open_file_with(
        &slots.bundle(&b.id),
        root,
        &Limits::default(),
        Expiry::Ignore,
    )?;
    let (mut m, _) = prepare(&tb)?;
    m.bundle_id = b.id.clone();
    m.faults = faults_for(cfg, &m.info.name, &m.info.version);
    Ok(m)
}

/// Everything an effect needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Ctx {
    pub cfg: Arc<AgentConfig>,
    pub store: Arc<dyn Store>,
    pub floor: FloorFile,
    pub slots: Slots,
    pub engine: Arc<Engine>,
    pub root: TrustRoot,
    pub client: Arc<OnceLock<ServerClient>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

/// What the rest of the agent sees.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub record: Record,
    /// Bumped on every step, so watchers see repeated identical records.
    pub step: u64,
}

/// The outcome of a performed effect.
enum Outcome {
    Event(Event),
    Verified(Box<TrustedBundle>),
    Tested(Box<ActiveModel>),
    Shadowed {
        model: Box<ActiveModel>,
        agreement: ShadowAgreement,
        passed: Result<(), String>,
    },
    Nothing,
}

/// The driver. Owns the record.
pub struct Updater {
    ctx: Ctx,
    record: Record,
    verified: Option<(String, TrustedBundle)>,
    staged: Option<(String, ActiveModel)>,
    baseline_p95: Option<f64>,
    download_failures: u32,
    status: watch::Sender<Status>,
    notices: mpsc::UnboundedSender<Notice>,
    step: u64,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

fn backoff(cfg: &AgentConfig, failures: u32) -> Duration {
    let base = cfg
        .update
        .retry_min_ms
        .saturating_mul(1u64 << failures.min(20))
        .min(cfg.update.retry_max_ms);
    // ±25 % jitter so a fleet does not retry in lockstep.
    let jitter = (now_nanos() % 500) as f64 / 1000.0 - 0.25;
    Duration::from_millis((base as f64 * (1.0 + jitter)) as u64)
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0)
}

impl Updater {
    pub fn new(
        ctx: Ctx,
        record: Record,
        status: watch::Sender<Status>,
        notices: mpsc::UnboundedSender<Notice>,
    ) -> Updater {
        Updater {
            ctx,
            record,
            verified: None,
            staged: None,
            baseline_p95: None,
            download_failures: 0,
            status,
            notices,
            step: 0,
        }
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// One transition: compute, persist, publish. Disallowed (stale)
    /// events are logged and ignored.
    fn apply(&mut self, event: Event) -> Vec<Effect> {
        tracing::debug!(?event, "update event");
        match next(&self.record, event, now_unix()) {
            Ok((rec, effects)) => {
                if rec.phase.state() != self.record.phase.state() {
                    // Tests and the kill harness read these lines.
                    tracing::info!(
                        state = ?rec.phase.state(),
                        target = rec.phase.target().map(|t| t.bundle.version.as_str()),
                        "update state"
                    );
                }
                self.record = rec;
                self.persist();
                effects
            }
            Err(e) => {
                tracing::debug!(error = %e, "ignored a stale update event");
                Vec::new()
            }
        }
    }

    fn persist(&mut self) {
        match serde_json::to_vec(&self.record) {
            Ok(b) => {
                if let Err(e) = self.ctx.store.put(RECORD_KEY, &b) {
                    tracing::error!(error = %e, "cannot persist the update record");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the update record"),
        }
        self.step += 1;
        let _ = self.status.send(Status {
            record: self.record.clone(),
            step: self.step,
        });
    }

    /// Runs until `shutdown`. `desired` carries targets from the server
    /// poller and from sideloads.
    pub async fn run(mut self, mut desired: mpsc::Receiver<Target>, shutdown: CancellationToken) {
        let mut queue: VecDeque<Effect> = self
            .apply(Event::Boot {
                max_watch_restarts: self.ctx.cfg.update.max_watch_restarts,
            })
            .into();
        self.persist();
        loop {
            let Some(effect) = queue.pop_front() else {
                tokio::select! {
                    t = desired.recv() => match t {
                        Some(t) => queue.extend(self.apply(Event::Desired(Some(t)))),
                        None => return,
                    },
                    () = shutdown.cancelled() => return,
                }
                continue;
            };
            if let Some(more) = self.inline(&effect) {
                queue.extend(more);
                continue;
            }
            let preemptible = matches!(
                effect,
                Effect::Download { .. } | Effect::Watch { .. } | Effect::Shadow { .. }
            );
            let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<u64>();
            let delay = match &effect {
                Effect::Download { .. } if self.download_failures > 0 => {
                    backoff(&self.ctx.cfg, self.download_failures - 1)
                }
                _ => Duration::ZERO,
            };
            let fut = perform(
                self.ctx.clone(),
                effect,
                delay,
                progress_tx,
                self.verified.take(),
                self.staged.take(),
                self.baseline_p95,
            );
            tokio::pin!(fut);
            let outcome = loop {
                tokio::select! {
                    o = &mut fut => break Some(o),
                    Some(offset) = progress_rx.recv() => {
                        let _ = self.apply(Event::DownloadProgress { offset });
                    }
                    t = desired.recv(), if preemptible => {
                        let Some(t) = t else { return };
                        let before = self.record.phase.target().map(|t| t.bundle.id.clone());
                        let fx = self.apply(Event::Desired(Some(t)));
                        let after = self.record.phase.target().map(|t| t.bundle.id.clone());
                        if before != after {
                            // Superseded: drop the running effect.
                            queue.clear();
                            queue.extend(fx);
                            break None;
                        }
                        queue.extend(fx);
                    }
                    () = shutdown.cancelled() => return,
                }
            };
            let Some(outcome) = outcome else { continue };
            let event = match outcome {
                Outcome::Event(e) => Some(e),
                Outcome::Verified(tb) => {
                    let id = self
                        .record
                        .phase
                        .target()
                        .map(|t| t.bundle.id.clone())
                        .unwrap_or_default();
                    self.verified = Some((id, *tb));
                    Some(Event::Verified)
                }
                Outcome::Tested(m) => {
                    let id = self
                        .record
                        .phase
                        .target()
                        .map(|t| t.bundle.id.clone())
                        .unwrap_or_default();
                    self.staged = Some((id, *m));
                    Some(Event::SelfTestPassed)
                }
                Outcome::Shadowed {
                    model,
                    agreement,
                    passed,
                } => {
                    let id = model.bundle_id.clone();
                    self.staged = Some((id, *model));
                    Some(Event::ShadowDone { agreement, passed })
                }
                Outcome::Nothing => None,
            };
            if let Some(e) = event {
                match &e {
                    Event::DownloadFailed { reason } => {
                        self.download_failures += 1;
                        tracing::warn!(%reason, attempt = self.download_failures, "download failed; will retry");
                    }
                    Event::Downloaded => self.download_failures = 0,
                    _ => {}
                }
                queue.extend(self.apply(e));
            }
        }
    }

    /// Quick effects run in place; returns `None` for effects that need
    /// [`perform`].
    fn inline(&mut self, effect: &Effect) -> Option<Vec<Effect>> {
        match effect {
            Effect::Announce { what, reason } => {
                let bundle = self
                    .record
                    .phase
                    .target()
                    .map(|t| t.bundle.clone())
                    .or_else(|| self.record.last_failed.clone().filter(|_| reason.is_some()))
                    .or_else(|| self.record.active.clone());
                let _ = self.notices.send(Notice {
                    at: now_unix(),
                    event: *what,
                    bundle,
                    reason: reason.clone(),
                });
                Some(Vec::new())
            }
            Effect::DiscardDownload { id } => {
                let keep = [
                    self.record.active.as_ref().map(|b| b.id.as_str()),
                    self.record.last_known_good.as_ref().map(|b| b.id.as_str()),
                ];
                let _ = std::fs::remove_file(self.ctx.slots.part(id));
                if !keep.contains(&Some(id.as_str())) {
                    let _ = std::fs::remove_file(self.ctx.slots.bundle(id));
                }
                if self.verified.as_ref().is_some_and(|(v, _)| v == id) {
                    self.verified = None;
                }
                if self.staged.as_ref().is_some_and(|(v, _)| v == id) {
                    self.staged = None;
                }
                Some(Vec::new())
            }
            Effect::CollectGarbage => {
                let mut keep: Vec<&str> = Vec::new();
                for b in [&self.record.active, &self.record.last_known_good]
                    .into_iter()
                    .flatten()
                {
                    keep.push(&b.id);
                }
                if let Some(t) = self.record.phase.target() {
                    keep.push(&t.bundle.id);
                }
                if let Some(t) = &self.record.pending {
                    keep.push(&t.bundle.id);
                }
                match self.ctx.slots.collect(&keep) {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "collected old bundles"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "bundle garbage collection failed"),
                }
                Some(Vec::new())
            }
            Effect::Activate { .. } => {
                // The previous model's latency is the regression baseline.
                self.baseline_p95 = self.ctx.engine.active().and_then(|m| {
                    (m.stats
                        .inferences
                        .load(std::sync::atomic::Ordering::Relaxed)
                        >= self.ctx.cfg.update.watch_min_inferences)
                        .then(|| m.stats.p95_ms())
                        .flatten()
                });
                None
            }
            Effect::SelfTest { .. } => {
                // Staged → SelfTesting is recorded before the model loads.
                let _ = self.apply(Event::SelfTestStarted);
                None
            }
            _ => None,
        }
    }
}

/// Performs a long effect. Owns its inputs so the driver can race it
/// against new desired states.
async fn perform(
    ctx: Ctx,
    effect: Effect,
    delay: Duration,
    progress: mpsc::UnboundedSender<u64>,
    verified: Option<(String, TrustedBundle)>,
    staged: Option<(String, ActiveModel)>,
    baseline_p95: Option<f64>,
) -> Outcome {
    match effect {
        Effect::Download { target, offset } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            download(&ctx, &target, offset, progress).await
        }
        Effect::Verify { target } => {
            let ctx2 = ctx.clone();
            blocking(move || verify(&ctx2, &target)).await
        }
        Effect::SelfTest { target } => {
            let tb = match verified {
                Some((id, tb)) if id == target.bundle.id => tb,
                _ => match blocking({
                    let target = target.clone();
                    move || verify(&ctx, &target)
                })
                .await
                {
                    Outcome::Verified(tb) => *tb,
                    other => return other,
                },
            };
            let id = target.bundle.id.clone();
            blocking(move || match prepare(&tb) {
                Ok((mut m, _)) => {
                    m.bundle_id = id;
                    Outcome::Tested(Box::new(m))
                }
                Err(e) => Outcome::Event(Event::SelfTestFailed {
                    reason: e.to_string(),
                }),
            })
            .await
        }
        Effect::Shadow { target } => shadow(&ctx, &target, staged).await,
        Effect::Activate { target } => {
            let model = match staged {
                Some((id, m)) if id == target.bundle.id => m,
                _ => {
                    return Outcome::Event(Event::ActivationFailed {
                        reason: "internal: no staged model to activate".into(),
                    });
                }
            };
            let floor = ctx.floor.clone();
            let (name, seq, id) = (
                model.info.name.clone(),
                model.info.sequence,
                target.bundle.id.clone(),
            );
            // TUF-style: the floor is durable before the model serves.
            let raised = tokio::task::spawn_blocking(move || {
                let mut f = floor.load()?;
                if f.raise(&name, seq, &id) {
                    floor.save(&f)?;
                }
                Ok::<_, AgentError>(())
            })
            .await;
            match raised {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Outcome::Event(Event::ActivationFailed {
                        reason: format!("cannot raise the anti-rollback floor: {e}"),
                    });
                }
                Err(e) => {
                    return Outcome::Event(Event::ActivationFailed {
                        reason: e.to_string(),
                    });
                }
            }
            let mut model = model;
            model.faults = faults_for(&ctx.cfg, &model.info.name, &model.info.version);
            ctx.engine.activate(model);
            Outcome::Event(Event::Activated)
        }
        Effect::Watch { target } => watch_health(&ctx, &target, baseline_p95).await,
        Effect::Rollback { to } => {
            let Some(to) = to else {
                tracing::error!("no last known good bundle: the failing model keeps serving");
                return Outcome::Event(Event::RolledBackTo {
                    to: ctx.engine.active().map(|m| bundle_ref_of(&m)),
                });
            };
            let ctx2 = ctx.clone();
            let to2 = to.clone();
            let loaded =
                blocking(move || load_installed(&ctx2.slots, &ctx2.root, &to2, &ctx2.cfg)).await;
            match loaded {
                Ok(m) => {
                    let floor = ctx.floor.clone();
                    let (name, seq, id) = (m.info.name.clone(), m.info.sequence, to.id.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        let mut f = floor.load()?;
                        if f.raise(&name, seq, &id) {
                            floor.save(&f)?;
                        }
                        Ok::<_, AgentError>(())
                    })
                    .await;
                    ctx.engine.activate(m);
                    Outcome::Event(Event::RolledBackTo { to: Some(to) })
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the last known good bundle; keeping the current model");
                    Outcome::Event(Event::RolledBackTo {
                        to: ctx.engine.active().map(|m| bundle_ref_of(&m)),
                    })
                }
            }
        }
        Effect::Announce { .. } | Effect::DiscardDownload { .. } | Effect::CollectGarbage => {
            Outcome::Nothing
        }
    }
}

/// The reference of a loaded model (its id is the manifest's bundle id).
fn bundle_ref_of(m: &ActiveModel) -> BundleRef {
    BundleRef {
        id: m.bundle_id.clone(),
        name: m.info.name.clone(),
        version: m.info.version.clone(),
        sequence: m.info.sequence,
    }
}

async fn blocking<T>(f: impl FnOnce() -> T + Send + 'static) -> T
where
    T: From<JoinFailure> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => T::from(JoinFailure(e.to_string())),
    }
}

/// A blocking task that panicked.
struct JoinFailure(String);

impl From<JoinFailure> for Outcome {
    fn from(e: JoinFailure) -> Self {
        Outcome::Event(Event::Rejected {
            reason: format!("internal: task failed: {}", e.0),
        })
    }
}

impl<T> From<JoinFailure> for Result<T, AgentError> {
    fn from(e: JoinFailure) -> Self {
        Err(AgentError::Invariant(e.0))
    }
}

async fn download(
    ctx: &Ctx,
    target: &Target,
    offset: u64,
    progress: mpsc::UnboundedSender<u64>,
) -> Outcome {
    let id = &target.bundle.id;
    let dest = ctx.slots.bundle(id);
    if dest.exists() {
        return Outcome::Event(Event::Downloaded);
    }
    let Some(path) = &target.download else {
        return Outcome::Event(Event::Rejected {
            reason: format!("sideloaded bundle {id} is missing from {}", dest.display()),
        });
    };
    let Some(client) = ctx.client.get() else {
        return Outcome::Event(Event::DownloadFailed {
            reason: "not enrolled with a fleet server yet".into(),
        });
    };
    let part = ctx.slots.part(id);
    let job = Download {
        path,
        part: &part,
        offset,
        expected_id: id,
        max_bytes: ctx.cfg.update.max_bundle_bytes,
        bytes_per_sec: ctx.cfg.testing.download_bytes_per_sec,
    };
    let r = client
        .download(job, |o| {
            let _ = progress.send(o);
        })
        .await;
    match r {
        Ok(()) => match std::fs::rename(&part, &dest) {
            Ok(()) => Outcome::Event(Event::Downloaded),
            Err(e) => Outcome::Event(Event::DownloadFailed {
                reason: format!("{}: {e}", dest.display()),
            }),
        },
        Err(AgentError::Refused(reason)) => Outcome::Event(Event::Rejected { reason }),
        Err(e @ AgentError::Server { status: 404, .. }) => Outcome::Event(Event::Rejected {
            reason: e.to_string(),
        }),
        Err(e) => Outcome::Event(Event::DownloadFailed {
            reason: e.to_string(),
        }),
    }
}

/// Content address, signatures, expiry, arch, agent version, anti-rollback.
fn verify(ctx: &Ctx, target: &Target) -> Outcome {
    let reject = |reason: String| Outcome::Event(Event::Rejected { reason });
    let path = ctx.slots.bundle(&target.bundle.id);
    match file_sha256(&path) {
        Ok(h) if h == target.bundle.id => {}
        Ok(h) => {
            return reject(format!(
                "bundle file hashes to {h}, expected {}",
                target.bundle.id
            ));
        }
        Err(e) => return reject(e.to_string()),
    }
    let tb = match open_file_with(
        &path,
        &ctx.root,
        &Limits::default(),
        Expiry::Enforce { now: now_unix() },
    ) {
        Ok(tb) => tb,
        Err(e) => return reject(format!("{} ({})", e, e.code())),
    };
    let floor = match ctx.floor.load() {
        Ok(f) => f,
        Err(e) => return reject(e.to_string()),
    };
    let m = &tb.manifest;
    if let Err(refusal) = floor.permits(
        m.name.as_str(),
        m.sequence,
        &target.bundle.id,
        target.rollback,
    ) {
        return reject(refusal.to_string());
    }
    Outcome::Verified(Box::new(tb))
}

fn watch_limits(ctx: &Ctx, target: &Target, baseline_p95: Option<f64>) -> WatchLimits {
    let u = &ctx.cfg.update;
    let policy = target.watch.clone().unwrap_or_default();
    WatchLimits {
        window_secs: u.watch_secs,
        window_inferences: u.watch_inferences,
        min_inferences: u.watch_min_inferences,
        max_error_rate: policy.max_error_rate.unwrap_or(u.max_error_rate),
        max_p95_ms: policy.max_p95_latency_ms,
        baseline_p95_ms: baseline_p95,
        max_p95_ratio: u.max_p95_ratio,
        p95_slack_ms: u.p95_slack_ms,
    }
}

async fn watch_health(ctx: &Ctx, target: &Target, baseline_p95: Option<f64>) -> Outcome {
    use std::sync::atomic::Ordering::Relaxed;
    let limits = watch_limits(ctx, target, baseline_p95);
    let since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(m) = ctx.engine.active() else {
            continue;
        };
        let sample = WatchSample {
            elapsed_secs: since.elapsed().as_secs(),
            inferences: m.stats.inferences.load(Relaxed) + m.stats.errors.load(Relaxed),
            errors: m.stats.errors.load(Relaxed),
            non_finite: m.stats.non_finite.load(Relaxed),
            panics: m.stats.panics.load(Relaxed),
            p95_ms: m.stats.p95_ms(),
        };
        match judge(&limits, &sample) {
            Verdict::Continue => {}
            Verdict::Pass => return Outcome::Event(Event::WatchPassed),
            Verdict::Breach(reason) => return Outcome::Event(Event::HealthBreached { reason }),
        }
    }
}

async fn shadow(ctx: &Ctx, target: &Target, staged: Option<(String, ActiveModel)>) -> Outcome {
    let (Some(req), Some((id, model))) = (target.shadow.clone(), staged) else {
        return Outcome::Event(Event::ShadowDone {
            agreement: ShadowAgreement::default(),
            passed: Err("internal: nothing to shadow".into()),
        });
    };
    let sh = ctx
        .engine
        .start_shadow(Shadow::new(model, req.sample_rate.clamp(0.0, 1.0)));
    let acc = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let acc = sh.agreement();
        if acc.samples >= u64::from(req.samples.max(1)) {
            break acc;
        }
    };
    ctx.engine.stop_shadow();
    let top1 = (acc.top1_samples > 0).then(|| acc.top1_matches as f64 / acc.top1_samples as f64);
    let agreement = ShadowAgreement {
        samples: acc.samples,
        top1_agreement: top1,
        max_abs_diff: acc.max_abs_diff,
    };
    let mut passed = Ok(());
    if acc.errors > 0 {
        passed = Err(format!(
            "the candidate failed {} of {} shadow inferences",
            acc.errors, acc.samples
        ));
    } else if let Some(min) = req.min_top1_agreement {
        match top1 {
            Some(t) if t >= min => {}
            Some(t) => passed = Err(format!("shadow top-1 agreement {t:.3} < {min:.3}")),
            None => passed = Err("shadow top-1 agreement not measurable for this model".into()),
        }
    }
    if passed.is_ok()
        && let Some(max) = req.max_abs_diff
        && acc.max_abs_diff > max
    {
        passed = Err(format!(
            "shadow max abs diff {:.3e} > {max:.3e}",
            acc.max_abs_diff
        ));
    }
    // Hand the candidate back for activation (workers drop their clones
    // right after each mirrored request).
    let mut sh = sh;
    for _ in 0..50 {
        match Arc::try_unwrap(sh) {
            Ok(s) => {
                let mut model = s.model;
                model.bundle_id = id;
                return Outcome::Shadowed {
                    model: Box::new(model),
                    agreement,
                    passed,
                };
            }
            Err(back) => {
                sh = back;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Outcome::Event(Event::ShadowDone {
        agreement,
        passed: Err("internal: the candidate is still referenced".into()),
    })
}

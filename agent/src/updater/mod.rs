//! The driver of the update machine ([`crate::update`]). It performs the
//! effects, turns their outcomes into events, and persists every record
//! `next` returns before any of that step's effects runs: if the record
//! cannot be written (a full disk, a failing store), no effect runs until
//! it can. The driver never edits the record itself.
//!
//! # Layout
//! - this module: the loop, persistence, quick effects (announce, discard,
//!   garbage collection);
//! - [`slots`]: bundle files and free space;
//! - [`download`]: resumable, content-addressed transfers and their fault
//!   classes;
//! - [`verify`]: verification and loading of installed bundles;
//! - [`swap`]: activation (floor first) and rollback;
//! - [`shadow`]: the candidate on mirrored live traffic;
//! - [`hold`]: maintenance windows and the local app's defers before a swap;
//! - [`watch`]: the health watch after a swap.

mod download;
pub mod hold;
mod shadow;
pub mod slots;
mod swap;
mod verify;
mod watch;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgefleet_wire::backoff::Backoff;
use edgefleet_wire::device::{BundleRef, DesiredState, ShadowAgreement};
use serde::Serialize;
use tokio::sync::{mpsc, watch as watch_channel};
use tokio_util::sync::CancellationToken;

use crate::bundle::TrustedBundle;
use crate::client::ServerClient;
use crate::config::AgentConfig;
use crate::engine::{ActiveModel, Engine, Faults, prepare_with};
use crate::error::AgentError;
use crate::floor::FloorFile;
use crate::store::Store;
use crate::update::{Effect, Event, Lifecycle, Record, Target, next};

pub use download::CHECKPOINT_BYTES;
pub use slots::Slots;
pub use verify::load_installed;

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

/// The wall clock in unix seconds; tests inject their own.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The real clock.
pub fn system_clock() -> Clock {
    Arc::new(edgefleet_wire::time::unix_now)
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
        window: d.window.clone(),
    })
}

/// The test-only faults configured for a bundle (`[testing]`, only in
/// builds with the `testing` feature).
#[cfg(feature = "testing")]
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

/// Device builds inject nothing.
#[cfg(not(feature = "testing"))]
pub fn faults_for(_: &AgentConfig, _: &str, _: &str) -> Faults {
    Faults::default()
}

/// The test-only download throughput cap.
#[cfg(feature = "testing")]
fn download_cap(cfg: &AgentConfig) -> Option<u64> {
    cfg.testing.download_bytes_per_sec
}

#[cfg(not(feature = "testing"))]
fn download_cap(_: &AgentConfig) -> Option<u64> {
    None
}

/// Everything an effect needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Ctx {
    pub cfg: Arc<AgentConfig>,
    pub store: Arc<dyn Store>,
    pub floor: FloorFile,
    pub slots: Slots,
    pub engine: Arc<Engine>,
    pub trust: Arc<crate::trust::TrustState>,
    pub client: Arc<OnceLock<ServerClient>>,
    pub clock: Clock,
    /// Maintenance windows and the local app's defers.
    pub activation: Arc<hold::Activation>,
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
    /// The record could not be written; no effect runs until it is.
    pub store_error: Option<String>,
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
    status: watch_channel::Sender<Status>,
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

/// Delay before a download attempt: none for the first, the backoff for
/// retries, the longest for a device that reported the transfer failed.
fn download_delay(cfg: &AgentConfig, attempt: u32, patient: bool) -> Duration {
    let b = Backoff::from_millis(cfg.update.retry_min_ms, cfg.update.retry_max_ms);
    match (attempt, patient) {
        (_, true) => b.delay(u32::MAX),
        (0, false) => Duration::ZERO,
        (n, false) => b.delay(n - 1),
    }
}

/// Backoff between attempts to write the record.
const PERSIST_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

impl Updater {
    pub fn new(
        ctx: Ctx,
        record: Record,
        status: watch_channel::Sender<Status>,
        notices: mpsc::UnboundedSender<Notice>,
    ) -> Updater {
        Updater {
            ctx,
            record,
            verified: None,
            staged: None,
            baseline_p95: None,
            status,
            notices,
            step: 0,
        }
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    fn publish(&mut self, store_error: Option<String>) {
        self.step += 1;
        let _ = self.status.send(Status {
            record: self.record.clone(),
            step: self.step,
            store_error,
        });
    }

    /// The transition of `event`, without persisting: `None` for a stale
    /// event (logged and ignored).
    fn transition(&mut self, event: Event) -> Option<Vec<Effect>> {
        tracing::debug!(?event, "update event");
        match next(&self.record, event, (self.ctx.clock)()) {
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
                Some(effects)
            }
            Err(e) => {
                tracing::debug!(error = %e, "ignored a stale update event");
                None
            }
        }
    }

    /// Writes the record, durably.
    pub fn persist(&self) -> Result<(), AgentError> {
        let b = serde_json::to_vec(&self.record)
            .map_err(|e| AgentError::Invariant(format!("cannot encode the update record: {e}")))?;
        self.ctx.store.put(crate::updater::RECORD_KEY, &b)
    }

    /// One step: transition, persist, publish. The effects are returned
    /// only once the record is durable; after a failed write there are
    /// none (the loop uses [`Updater::commit`], which retries the write).
    pub fn apply(&mut self, event: Event) -> Result<Vec<Effect>, AgentError> {
        let Some(effects) = self.transition(event) else {
            return Ok(Vec::new());
        };
        match self.persist() {
            Ok(()) => {
                self.publish(None);
                Ok(effects)
            }
            Err(e) => {
                // Reports say where the device really is; nothing acts on it.
                self.publish(Some(e.to_string()));
                Err(e)
            }
        }
    }

    /// One step whose effects run only once its record is durable: the
    /// write is retried (the store asked to recover in between) until it
    /// succeeds. `None` on shutdown.
    async fn commit(&mut self, event: Event, shutdown: &CancellationToken) -> Option<Vec<Effect>> {
        let Some(effects) = self.transition(event) else {
            return Some(Vec::new());
        };
        let mut attempt = 0u32;
        loop {
            match self.persist() {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(attempts = attempt, "the update record is written again");
                    }
                    self.publish(None);
                    return Some(effects);
                }
                Err(e) => {
                    if attempt == 0 {
                        tracing::error!(error = %e, "cannot persist the update record; its effects wait until it is written");
                        self.publish(Some(e.to_string()));
                    }
                    self.ctx.store.recover(&e);
                    // Room for the record: old bundle files go first.
                    self.collect_garbage();
                    tokio::select! {
                        () = tokio::time::sleep(PERSIST_RETRY.delay(attempt)) => {}
                        () = shutdown.cancelled() => return None,
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Bundle ids that must stay on disk.
    fn keep(&self) -> Vec<String> {
        let r = &self.record;
        [&r.active, &r.last_known_good]
            .into_iter()
            .flatten()
            .map(|b| b.id.clone())
            .chain(r.phase.target().map(|t| t.bundle.id.clone()))
            .chain(r.pending.as_ref().map(|t| t.bundle.id.clone()))
            .collect()
    }

    /// Deletes bundle files beyond active, last known good, the target and
    /// the pending one.
    fn collect_garbage(&self) -> u64 {
        let keep = self.keep();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        match self.ctx.slots.collect(&keep) {
            Ok(freed) => freed,
            Err(e) => {
                tracing::warn!(error = %e, "bundle garbage collection failed");
                0
            }
        }
    }

    /// Runs until `shutdown`. `served` is the bundle the daemon loaded at
    /// start; `desired` carries targets from the server poller and from
    /// sideloads.
    pub async fn run(
        mut self,
        served: Option<BundleRef>,
        mut desired: mpsc::Receiver<Target>,
        shutdown: CancellationToken,
    ) {
        let boot = Event::Boot {
            served,
            max_watch_restarts: self.ctx.cfg.update.max_watch_restarts,
        };
        let Some(fx) = self.commit(boot, &shutdown).await else {
            return;
        };
        let mut queue: VecDeque<Effect> = fx.into();
        loop {
            let Some(effect) = queue.pop_front() else {
                tokio::select! {
                    t = desired.recv() => match t {
                        Some(t) => match self.commit(Event::Desired(Some(t)), &shutdown).await {
                            Some(fx) => queue.extend(fx),
                            None => return,
                        },
                        None => return,
                    },
                    () = shutdown.cancelled() => return,
                }
                continue;
            };
            if self.inline(&effect) {
                continue;
            }
            let preemptible = matches!(
                effect,
                Effect::Download { .. }
                    | Effect::AwaitSpace { .. }
                    | Effect::Watch { .. }
                    | Effect::Shadow { .. }
                    | Effect::AwaitWindow { .. }
            );
            let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<u64>();
            // Only the effects that use the loaded candidate take it.
            let takes = matches!(
                effect,
                Effect::SelfTest { .. } | Effect::Shadow { .. } | Effect::Activate { .. }
            );
            let fut = perform(
                self.ctx.clone(),
                effect,
                progress_tx,
                if takes { self.verified.take() } else { None },
                if takes { self.staged.take() } else { None },
                self.baseline_p95,
            );
            tokio::pin!(fut);
            let outcome = loop {
                tokio::select! {
                    o = &mut fut => break Some(o),
                    Some(offset) = progress_rx.recv() => {
                        // Informational (resumes start after the bytes in
                        // the part file): not flushed, never blocking.
                        if self.transition(Event::DownloadProgress { offset }).is_some() {
                            if let Ok(b) = serde_json::to_vec(&self.record) {
                                let _ = self.ctx.store.put_lazy(RECORD_KEY, &b);
                            }
                            self.publish(None);
                        }
                    }
                    t = desired.recv(), if preemptible => {
                        let Some(t) = t else { return };
                        let before = running_key(&self.record);
                        let Some(fx) = self.commit(Event::Desired(Some(t)), &shutdown).await else {
                            return;
                        };
                        let after = running_key(&self.record);
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
            let current = self.record.phase.target().map(|t| t.bundle.id.clone());
            let event = match outcome {
                Outcome::Event(e) => Some(e),
                Outcome::Verified(tb) => {
                    self.verified = current.map(|id| (id, *tb));
                    Some(Event::Verified)
                }
                Outcome::Tested(m) => {
                    self.staged = current.map(|id| (id, *m));
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
                if let Event::DownloadFailed { reason, .. } = &e {
                    tracing::warn!(%reason, "download failed; will retry");
                }
                if matches!(e, Event::Held(_)) {
                    // A wait may last hours: do not keep a second model in
                    // memory for it; the swap loads it again.
                    self.staged = None;
                    self.verified = None;
                }
                match self.commit(e, &shutdown).await {
                    Some(fx) => queue.extend(fx),
                    None => return,
                }
            }
        }
    }

    /// Quick effects run in place; returns whether `effect` was one.
    fn inline(&mut self, effect: &Effect) -> bool {
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
                    at: (self.ctx.clock)(),
                    event: *what,
                    bundle,
                    reason: reason.clone(),
                });
                true
            }
            Effect::DiscardDownload { id } => {
                let keep = [
                    self.record.active.as_ref().map(|b| b.id.as_str()),
                    self.record.last_known_good.as_ref().map(|b| b.id.as_str()),
                ];
                for (path, kept) in [
                    (self.ctx.slots.part(id), false),
                    (self.ctx.slots.bundle(id), keep.contains(&Some(id.as_str()))),
                ] {
                    if kept {
                        continue;
                    }
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot delete a discarded bundle file");
                        }
                    }
                }
                if self.verified.as_ref().is_some_and(|(v, _)| v == id) {
                    self.verified = None;
                }
                if self.staged.as_ref().is_some_and(|(v, _)| v == id) {
                    self.staged = None;
                }
                true
            }
            Effect::CollectGarbage => {
                let freed = self.collect_garbage();
                if freed > 0 {
                    tracing::info!(bytes = freed, "collected old bundles");
                }
                true
            }
            Effect::Download { .. } | Effect::AwaitSpace { .. } => {
                // Old bundles go before a download needs their room.
                self.collect_garbage();
                false
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
                false
            }
            _ => false,
        }
    }
}

/// Performs a long effect. Owns its inputs so the driver can race it
/// against new desired states.
async fn perform(
    ctx: Ctx,
    effect: Effect,
    progress: mpsc::UnboundedSender<u64>,
    verified: Option<(String, TrustedBundle)>,
    staged: Option<(String, ActiveModel)>,
    baseline_p95: Option<f64>,
) -> Outcome {
    match effect {
        Effect::Download {
            target,
            attempt,
            patient,
        } => {
            let delay = download_delay(&ctx.cfg, attempt, patient);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Outcome::Event(download::download(&ctx, &target, progress).await)
        }
        Effect::AwaitSpace { needed, .. } => await_space(&ctx, needed).await,
        Effect::Verify { target } => {
            let ctx2 = ctx.clone();
            blocking(move || verify::verify(&ctx2, &target)).await
        }
        Effect::SelfTest { target } => self_test(ctx, target, verified).await,
        Effect::Shadow { target } => shadow::shadow(&ctx, &target, staged).await,
        Effect::AwaitWindow {
            target,
            ready_since,
            held,
        } => hold::await_window(&ctx, &target, ready_since, held).await,
        Effect::Activate { target } => swap::activate(&ctx, &target, staged).await,
        Effect::Watch { target, since } => {
            watch::watch_health(&ctx, &target, since, baseline_p95).await
        }
        Effect::Rollback { to } => swap::rollback(&ctx, to).await,
        Effect::Announce { .. } | Effect::DiscardDownload { .. } | Effect::CollectGarbage => {
            Outcome::Nothing
        }
    }
}

/// Verifies (unless `verified` is this bundle) and loads the installed
/// bundle, running its golden self-test: [`Outcome::Tested`] or the event
/// that says why not.
async fn self_test(ctx: Ctx, target: Target, verified: Option<(String, TrustedBundle)>) -> Outcome {
    // Kept now, so that the next load of this bundle starts faster.
    let compiled = ctx.slots.compiled_for(&target.bundle.id, &ctx.cfg);
    let tb = match verified {
        Some((id, tb)) if id == target.bundle.id => tb,
        _ => match blocking({
            let target = target.clone();
            move || verify::verify(&ctx, &target)
        })
        .await
        {
            Outcome::Verified(tb) => *tb,
            other => return other,
        },
    };
    let id = target.bundle.id.clone();
    blocking(move || match prepare_with(tb, compiled) {
        Ok(crate::engine::Prepared { model: mut m, .. }) => {
            m.bundle_id = id;
            Outcome::Tested(Box::new(m))
        }
        // The model's signed digest is compared as it loads: a mismatch is
        // the bundle's fault, as at verification, not the model's.
        Err(e @ AgentError::Bundle { .. }) => Outcome::Event(Event::Rejected {
            reason: format!("{} ({})", e, e.code()),
        }),
        Err(e) => Outcome::Event(Event::SelfTestFailed {
            reason: e.to_string(),
        }),
    })
    .await
}

/// What a running effect works on: a new desired state that changes it
/// supersedes the effect. The bundle, and while waiting for a window the
/// whole target (a changed window is judged again at once).
fn running_key(r: &Record) -> Option<(String, Option<Target>)> {
    let t = r.phase.target()?;
    let waiting = matches!(r.phase, crate::update::Phase::Waiting { .. });
    Some((t.bundle.id.clone(), waiting.then(|| t.clone())))
}

/// Waits until `needed` bytes are free in the slots' filesystem.
async fn await_space(ctx: &Ctx, needed: u64) -> Outcome {
    let b = Backoff::from_millis(
        ctx.cfg.update.retry_min_ms,
        ctx.cfg.update.retry_max_ms.min(30_000),
    );
    let mut attempt = 0;
    // Compiled models are derived data: they go before an update waits.
    let mut compiled = true;
    loop {
        match ctx.slots.free_bytes() {
            Ok(free) if free >= needed => return Outcome::Event(Event::SpaceAvailable),
            Ok(_) if compiled => {
                compiled = false;
                let slots = ctx.slots.clone();
                // A panicked discard freed nothing.
                let freed = tokio::task::spawn_blocking(move || slots.discard_compiled())
                    .await
                    .unwrap_or(0);
                if freed > 0 {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read free space"),
        }
        tokio::time::sleep(b.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
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

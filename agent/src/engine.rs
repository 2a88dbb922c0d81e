//! The inference engine: the active model, a bounded queue and dedicated
//! worker threads, each owning one tract state.
//!
//! Models are swapped atomically ([`Engine::activate`]): a worker notices a
//! new generation before its next job and builds a fresh session, so a job
//! that was already running finishes on the old model and no request sees a
//! half-installed one.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use edgefleet_runtime::{Session, Threads};
use edgefleet_wire::tensor::NamedTensor;

use crate::error::{AgentError, RuntimeError};
use crate::metrics::Metrics;
pub use crate::model::{
    ActiveModel, Compiled, Faults, ModelInfo, ModelStats, PrepareTimings, Prepared, prepare,
    prepare_with,
};

/// A finished inference.
#[derive(Debug)]
pub struct InferOutput {
    pub outputs: Vec<NamedTensor>,
    pub model: Arc<ActiveModel>,
    /// Time spent in the worker (queue wait excluded).
    pub compute: Duration,
}

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: the client should retry later (HTTP 503).
    QueueFull,
    /// No model is active.
    NoModel,
    /// The workers are gone (shutdown).
    Stopped,
}

type Reply = tokio::sync::oneshot::Sender<Result<InferOutput, RuntimeError>>;

struct Job {
    inputs: Vec<NamedTensor>,
    /// Generation of the model the inputs were validated against, if any.
    validated_for: Option<u64>,
    reply: Reply,
}

/// Sizing of the worker pool.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Worker threads, each with its own tract state. Default 1.
    pub workers: usize,
    /// Jobs that may wait for a worker before requests get 503. Default 16.
    pub queue: usize,
    /// Compute threads one inference may use (intra-op parallelism): each
    /// worker gets a pool of this many. Default 1: an inference runs on its
    /// worker's thread alone.
    pub threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 1,
            queue: 16,
            threads: 1,
        }
    }
}

/// The active model plus the worker pool that serves it.
pub struct Engine {
    slot: Arc<ArcSwapOption<ActiveModel>>,
    shadow: Arc<ArcSwapOption<Shadow>>,
    tx: crossbeam_channel::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("queued", &self.tx.len())
            .finish()
    }
}

impl Engine {
    /// Starts the workers. They exit when the engine is dropped.
    pub fn start(config: EngineConfig, metrics: Arc<Metrics>) -> Result<Arc<Engine>, AgentError> {
        if config.workers == 0 || config.queue == 0 {
            return Err(AgentError::Config(
                "workers and queue must be at least 1".into(),
            ));
        }
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue);
        let slot: Arc<ArcSwapOption<ActiveModel>> = Arc::new(ArcSwapOption::empty());
        let shadow: Arc<ArcSwapOption<Shadow>> = Arc::new(ArcSwapOption::empty());
        for i in 0..config.workers {
            let rx = rx.clone();
            let slot = slot.clone();
            let shadow = shadow.clone();
            let metrics = metrics.clone();
            // Each worker runs on its own pool of `threads` compute threads.
            let threads = Threads::new(config.threads, &format!("tract-w{i}"))
                .map_err(|e| AgentError::Config(format!("[engine] threads: {e}")))?;
            if i == 0 && threads.count() < config.threads {
                tracing::warn!(
                    threads = config.threads,
                    "[engine] threads: this agent was built without the `threads` feature; each inference runs on its worker's thread"
                );
            }
            std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || threads.run(|| worker(rx, slot, shadow, metrics)))
                .map_err(|e| AgentError::Invariant(format!("cannot spawn worker: {e}")))?;
        }
        Ok(Arc::new(Engine {
            slot,
            shadow,
            tx,
            metrics,
        }))
    }

    /// Makes `model` the active model. Jobs already running finish on the
    /// previous one; every job taken after this call runs on the new one.
    pub fn activate(&self, model: ActiveModel) -> Arc<ActiveModel> {
        let model = Arc::new(model);
        self.metrics.set_active_model(&model.info);
        self.slot.store(Some(model.clone()));
        model
    }

    /// Starts mirroring sampled live requests to a candidate.
    pub fn start_shadow(&self, shadow: Shadow) -> Arc<Shadow> {
        let s = Arc::new(shadow);
        self.shadow.store(Some(s.clone()));
        s
    }

    /// Stops shadowing; returns the candidate.
    pub fn stop_shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.swap(None)
    }

    /// Stops serving (nothing active).
    pub fn deactivate(&self) {
        self.slot.store(None);
    }

    pub fn active(&self) -> Option<Arc<ActiveModel>> {
        self.slot.load_full()
    }

    /// Jobs waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }

    /// Queues an inference. Fails fast when the queue is full.
    pub fn submit(&self, inputs: Vec<NamedTensor>) -> Result<ReplyRx, SubmitError> {
        self.submit_job(inputs, None)
    }

    /// Queues inputs already validated with `model.model.check_inputs`:
    /// the worker skips validation if that model is still the active one.
    pub fn submit_validated(
        &self,
        inputs: Vec<NamedTensor>,
        model: &ActiveModel,
    ) -> Result<ReplyRx, SubmitError> {
        self.submit_job(inputs, Some(model.generation()))
    }

    fn submit_job(
        &self,
        inputs: Vec<NamedTensor>,
        validated_for: Option<u64>,
    ) -> Result<ReplyRx, SubmitError> {
        if self.slot.load().is_none() {
            return Err(SubmitError::NoModel);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            inputs,
            validated_for,
            reply,
        };
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics
                    .queue_depth
                    .store(self.tx.len() as u64, Ordering::Relaxed);
                Ok(rx)
            }
            Err(crossbeam_channel::TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// Runs one inference and waits for it (for callers outside HTTP).
    pub async fn infer(&self, inputs: Vec<NamedTensor>) -> Result<InferOutput, InferError> {
        wait(self.submit(inputs).map_err(InferError::Submit)?).await
    }

    /// Like [`Engine::infer`] for inputs validated against `model`.
    pub async fn infer_validated(
        &self,
        inputs: Vec<NamedTensor>,
        model: &ActiveModel,
    ) -> Result<InferOutput, InferError> {
        wait(
            self.submit_validated(inputs, model)
                .map_err(InferError::Submit)?,
        )
        .await
    }
}

/// The receiving end of a queued job.
pub type ReplyRx = tokio::sync::oneshot::Receiver<Result<InferOutput, RuntimeError>>;

async fn wait(rx: ReplyRx) -> Result<InferOutput, InferError> {
    rx.await
        .map_err(|_| InferError::Submit(SubmitError::Stopped))?
        .map_err(InferError::Runtime)
}

/// Either side of a failed [`Engine::infer`].
#[derive(Debug)]
pub enum InferError {
    Submit(SubmitError),
    Runtime(RuntimeError),
}

fn worker(
    rx: crossbeam_channel::Receiver<Job>,
    slot: Arc<ArcSwapOption<ActiveModel>>,
    shadow: Arc<ArcSwapOption<Shadow>>,
    metrics: Arc<Metrics>,
) {
    let mut current: Option<(Arc<ActiveModel>, Session)> = None;
    let mut shadow_session: Option<(u64, Session)> = None;
    for job in rx.iter() {
        metrics
            .queue_depth
            .store(rx.len() as u64, Ordering::Relaxed);
        let Some(active) = slot.load_full() else {
            let _ = job.reply.send(Err(RuntimeError::Inference {
                detail: "no model is active".into(),
            }));
            continue;
        };
        let stale = current
            .as_ref()
            .is_none_or(|(m, _)| m.generation() != active.generation());
        if stale {
            match active.model.session() {
                Ok(s) => current = Some((active.clone(), s)),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                    continue;
                }
            }
        }
        let Some((model, session)) = current.as_mut() else {
            continue;
        };
        let t0 = Instant::now();
        let prevalidated = job.validated_for == Some(model.generation());
        let running = model.clone();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if prevalidated {
                session.run_prevalidated(&job.inputs)
            } else {
                session.run(&job.inputs)
            }
        }));
        let faults = model.faults;
        if !faults.extra_latency.is_zero() {
            std::thread::sleep(faults.extra_latency);
        }
        let compute = t0.elapsed();
        let stats = &model.stats;
        let result = match result {
            Ok(Ok(_)) if faults.fail => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(RuntimeError::Inference {
                    detail: "injected fault ([testing] inject_errors)".into(),
                })
            }
            Ok(Ok(outputs)) => {
                stats.inferences.fetch_add(1, Ordering::Relaxed);
                stats.record(compute.as_secs_f32() * 1000.0);
                if outputs.iter().any(|o| o.tensor.has_non_finite()) {
                    stats.non_finite.fetch_add(1, Ordering::Relaxed);
                }
                Ok(InferOutput {
                    outputs,
                    model: model.clone(),
                    compute,
                })
            }
            Ok(Err(e)) => {
                // Bad client input is the client's error, not the model's.
                if matches!(e, RuntimeError::Inference { .. }) {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
            Err(panic) => {
                // A panicking op may leave the state inconsistent: rebuild it.
                metrics.worker_panics.fetch_add(1, Ordering::Relaxed);
                stats.panics.fetch_add(1, Ordering::Relaxed);
                current = None;
                // What tract said (e.g. a Gather index past its table: an
                // input value the model cannot take), one line, bounded.
                let said = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .map(|m| {
                        let line = m.lines().next().unwrap_or_default();
                        let end = line.floor_char_boundary(200);
                        format!(" ({})", &line[..end])
                    })
                    .unwrap_or_default();
                Err(RuntimeError::Inference {
                    detail: format!("the inference worker panicked{said}; the session was rebuilt"),
                })
            }
        };
        // The score is taken before the outputs go to the client.
        let drift_score = match (&result, &running.drift) {
            (Ok(out), Some(_)) => Some(edgefleet_wire::drift::output_score(&out.outputs)),
            _ => None,
        };
        let shadow_inputs = match (&result, shadow.load_full()) {
            (Ok(out), Some(sh)) if sh.sample() => Some((sh, out.outputs.clone())),
            _ => None,
        };
        let _ = job.reply.send(result);
        if let (Some(score), Some(d)) = (drift_score, &running.drift)
            && let Ok(mut d) = d.lock()
            && let Some(alert) = d.observe_scored(&job.inputs, score)
            && let Ok(mut q) = running.drift_alerts.lock()
        {
            q.push(alert);
        }
        // The client has its answer; now compare the candidate, if any.
        if let Some((sh, active_out)) = shadow_inputs {
            run_shadow(&sh, &mut shadow_session, &job.inputs, &active_out);
        }
    }
}

/// A candidate running beside the active model (shadow mode).
#[derive(Debug)]
pub struct Shadow {
    pub model: ActiveModel,
    /// Fraction of live requests mirrored, in (0, 1].
    pub sample_rate: f64,
    acc: std::sync::Mutex<ShadowAcc>,
    rng: AtomicU64,
}

/// Running agreement between the candidate and the active model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShadowAcc {
    pub samples: u64,
    pub top1_matches: u64,
    /// Samples where top-1 applied (first output has a class axis).
    pub top1_samples: u64,
    pub max_abs_diff: f64,
    pub errors: u64,
}

impl Shadow {
    pub fn new(model: ActiveModel, sample_rate: f64) -> Shadow {
        Shadow {
            model,
            sample_rate,
            acc: std::sync::Mutex::new(ShadowAcc::default()),
            // Seeded from the OS; xorshift must not start at zero.
            rng: AtomicU64::new(
                ((edgefleet_wire::backoff::random_unit() * (1u64 << 53) as f64) as u64) | 1,
            ),
        }
    }

    fn sample(&self) -> bool {
        if self.sample_rate >= 1.0 {
            return true;
        }
        // xorshift64*: enough for sampling, no rand dependency.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        u < self.sample_rate
    }

    pub fn agreement(&self) -> ShadowAcc {
        self.acc.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Arg-max over the whole first output (batch 1: the top class).
fn argmax(v: impl Iterator<Item = f64>) -> Option<usize> {
    v.enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

fn run_shadow(
    sh: &Arc<Shadow>,
    session: &mut Option<(u64, Session)>,
    inputs: &[NamedTensor],
    active: &[NamedTensor],
) {
    if session
        .as_ref()
        .is_none_or(|(g, _)| *g != sh.model.generation())
    {
        match sh.model.model.session() {
            Ok(s) => *session = Some((sh.model.generation(), s)),
            Err(_) => return,
        }
    }
    let Some((_, s)) = session.as_mut() else {
        return;
    };
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| s.run(inputs)));
    let Ok(mut acc) = sh.acc.lock() else {
        return;
    };
    acc.samples += 1;
    let Ok(Ok(out)) = out else {
        acc.errors += 1;
        return;
    };
    for (a, c) in active.iter().zip(&out) {
        let d = edgefleet_wire::tensor::max_abs_diff(&c.tensor, &a.tensor)
            .map_or(f64::INFINITY, |d| d.max_abs);
        acc.max_abs_diff = acc.max_abs_diff.max(d);
    }
    if let (Some(a), Some(c)) = (active.first(), out.first())
        && a.tensor.shape().len() >= 2
        && a.tensor.shape() == c.tensor.shape()
    {
        acc.top1_samples += 1;
        if argmax(a.tensor.iter_f64()) == argmax(c.tensor.iter_f64()) {
            acc.top1_matches += 1;
        }
    }
}

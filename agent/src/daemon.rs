//! `edge-agent run`: the device daemon. It serves the installed model at
//! once, enrolls if it must, then polls the desired state, drives updates
//! and reports every transition.
//!
//! Tasks (one cancellation token; a task that ends early stops the daemon):
//! the local API, the updater, the desired-state poller, the reporter and,
//! when configured, MQTT telemetry.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgefleet_wire::device::EnrollRequest;
use edgefleet_wire::manifest::TargetArch;
use tokio::sync::{Notify, mpsc, watch};

pub use crate::shared::Shared;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiConfig, Control};
use crate::client::{Poll, ServerClient};
use crate::config::AgentConfig;
use crate::engine::{Engine, EngineConfig};
use crate::error::AgentError;
use crate::floor::FloorFile;
use crate::metrics::Metrics;
use crate::store::{SledStore, Store, StoreOptions, write_atomic};
use crate::trust::TrustState;
use crate::update::Record;
use crate::updater::{Ctx, Notice, RECORD_KEY, Slots, Status, Updater, load_installed, target_of};

fn credential_path(cfg: &AgentConfig) -> PathBuf {
    cfg.data_dir.join("credential")
}

/// Serves the recorded active model (falling back to last known good) so
/// the device answers before it talks to anyone. Returns what serves; the
/// update machine records it (`Event::Boot`).
fn serve_installed(
    rec: &Record,
    slots: &Slots,
    trust: &TrustState,
    cfg: &AgentConfig,
    engine: &Engine,
) -> Option<edgefleet_wire::device::BundleRef> {
    for b in [&rec.active, &rec.last_known_good].into_iter().flatten() {
        match load_installed(slots, trust, b, cfg) {
            Ok(m) => {
                tracing::info!(name = %m.info.name, version = %m.info.version, "serving installed model");
                engine.activate(m);
                return Some(b.clone());
            }
            Err(e) => tracing::error!(bundle = %b.id, error = %e, "cannot load installed bundle"),
        }
    }
    if rec.active.is_some() {
        tracing::error!("no installed bundle loads: waiting for the server");
    }
    None
}

/// Runs the daemon until `shutdown`.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let (addr, device, daemon) = start(cfg, shutdown).await?;
    // Tests and scripts read this line to find an ephemeral port.
    println!("listening on http://{addr} device {device}");
    daemon.await
}

/// Starts the daemon: returns the local API address, the device id and a
/// future that runs until `shutdown` (or until a task fails).
pub async fn start(
    cfg: AgentConfig,
    shutdown: CancellationToken,
) -> Result<
    (
        std::net::SocketAddr,
        String,
        impl Future<Output = Result<(), AgentError>> + use<>,
    ),
    AgentError,
> {
    start_with_clock(cfg, crate::updater::system_clock(), shutdown).await
}

/// [`start`] on an injected wall clock (unix seconds) for the update
/// machine: the watch window, maintenance windows and defers read it.
pub async fn start_with_clock(
    cfg: AgentConfig,
    clock: crate::updater::Clock,
    shutdown: CancellationToken,
) -> Result<
    (
        std::net::SocketAddr,
        String,
        impl Future<Output = Result<(), AgentError>> + use<>,
    ),
    AgentError,
> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| AgentError::io(&cfg.data_dir, e))?;
    let device_id = cfg.device_id();
    // Bad TLS files fail the start, not a background task later.
    for (url, scheme, files) in [
        (&cfg.server.url, "https://", cfg.server_tls()),
        (&cfg.mqtt.url, "mqtts://", cfg.mqtt_tls()),
    ] {
        if url.as_deref().is_some_and(|u| u.starts_with(scheme)) {
            crate::tls::client_config(&files)?;
        }
    }
    // A chain that cannot be read refuses the start (see crate::trust).
    let trust = Arc::new(TrustState::open(&cfg.trust, &cfg.data_dir)?);
    let slots = Slots::new(&cfg.data_dir)?;
    let open_store = || {
        SledStore::open_with(
            &cfg.data_dir.join("store"),
            StoreOptions {
                reserve_bytes: cfg.update.store_reserve_bytes,
            },
        )
    };
    // A full disk is never a reason not to serve: past the store's own
    // reserve, partial downloads make room (they are fetched again).
    let store = match open_store() {
        Err(AgentError::NoSpace(e)) if slots.discard_partials() > 0 => {
            tracing::warn!(error = %e, "disk full at start; retrying with partial downloads discarded");
            open_store()?
        }
        r => r?,
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let floor = FloorFile::new(&cfg.data_dir);
    // An unreadable floor must not be guessed lower: refuse to start.
    floor.load()?;
    let metrics = Arc::new(Metrics::default());
    metrics
        .trust_version
        .store(trust.version(), std::sync::atomic::Ordering::Relaxed);
    // tract's front ends are built once per process: build them now, so
    // that the first update's cold start does not pay for them.
    let warm_up = tokio::task::spawn_blocking(edgefleet_runtime::warm_up)
        .await
        .map_err(|e| AgentError::Invariant(format!("warm-up: {e}")))?;
    tracing::info!(
        warm_up_ms = warm_up.as_secs_f64() * 1e3,
        workers = cfg.engine.workers,
        threads = cfg.engine.threads,
        "inference engine warmed up"
    );
    let engine = Engine::start(
        EngineConfig {
            workers: cfg.engine.workers,
            queue: cfg.engine.queue,
            threads: cfg.engine.threads,
        },
        metrics.clone(),
    )?;

    let record: Record = match store.get(RECORD_KEY)? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::error!(error = %e, "unreadable update record; starting from idle");
            Record::default()
        }),
        None => Record::default(),
    };
    let served = {
        let (slots, trust, cfg, engine) =
            (slots.clone(), trust.clone(), cfg.clone(), engine.clone());
        let rec = record.clone();
        tokio::task::spawn_blocking(move || serve_installed(&rec, &slots, &trust, &cfg, &engine))
            .await
            .map_err(|e| AgentError::Invariant(e.to_string()))?
    };

    let (status_tx, status_rx) = watch::channel(Status {
        record: record.clone(),
        step: 0,
        store_error: None,
    });
    let (notice_tx, notice_rx) = mpsc::unbounded_channel::<Notice>();
    let (desired_tx, desired_rx) = mpsc::channel(8);

    let client_cell: Arc<OnceLock<ServerClient>> = Arc::new(OnceLock::new());
    let credential_cell: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
    let shared = Shared {
        cfg: cfg.clone(),
        device_id: device_id.clone(),
        engine: engine.clone(),
        metrics: metrics.clone(),
        store: store.clone(),
        status: status_rx.clone(),
        poll_now: Arc::new(Notify::new()),
        report_now: Arc::new(Notify::new()),
        client: client_cell.clone(),
        credential: credential_cell.clone(),
        booted_at: edgefleet_wire::time::unix_now(),
        trust: trust.clone(),
        trust_problem: Arc::default(),
    };

    let counters = Arc::new(crate::telemetry::Counters::default());

    // Local API first: the device serves before it talks to anyone.
    let api_cfg = ApiConfig {
        listen: cfg.http.listen,
        max_body_bytes: cfg.http.max_body_bytes,
        token: cfg.http.token.clone(),
    };
    api_cfg.validate()?;
    let listener = tokio::net::TcpListener::bind(api_cfg.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: api_cfg.listen.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::Invariant(e.to_string()))?;
    let activation = Arc::new(crate::updater::hold::Activation::new(
        &cfg.update,
        clock.clone(),
    ));
    let control = Arc::new(Control {
        activation: Some(activation.clone()),
        status: status_rx.clone(),
        sideload: desired_tx.clone(),
        slots: slots.clone(),
        max_bundle_bytes: cfg.update.max_bundle_bytes,
        extra_metrics: Some(crate::telemetry::metrics_text(
            counters.clone(),
            store.clone(),
            engine.clone(),
            cfg.data_dir.clone(),
        )),
        report: Some({
            let shared = shared.clone();
            Arc::new(move || shared.report())
        }),
    });
    let app = api::router_with(engine.clone(), metrics.clone(), &api_cfg, Some(control));

    let tasks = TaskTracker::new();
    let stop = shutdown.child_token();
    let failed = CancellationToken::new();
    let guard = |name: &'static str, failed: CancellationToken| {
        move |r: Result<(), AgentError>| {
            if let Err(e) = r {
                tracing::error!(task = name, error = %e, "task failed");
                failed.cancel();
            }
        }
    };

    {
        let stop = stop.clone();
        let on_exit = guard("api", failed.clone());
        tasks.spawn(async move {
            on_exit(
                api::serve(listener, app, stop)
                    .await
                    .map_err(|source| AgentError::Listen {
                        addr: addr.to_string(),
                        source,
                    }),
            );
        });
    }

    let ctx = Ctx {
        cfg: cfg.clone(),
        store: store.clone(),
        floor,
        slots,
        engine: engine.clone(),
        trust: trust.clone(),
        client: client_cell.clone(),
        clock,
        activation,
    };
    let updater = Updater::new(ctx, record, status_tx, notice_tx);
    tasks.spawn(updater.run(served, desired_rx, stop.clone()));

    // Lifecycle notices: log, report now, and queue for MQTT.
    let (mqtt_tx, mqtt_rx) = mpsc::unbounded_channel::<Notice>();
    {
        let mut notice_rx = notice_rx;
        let report_now = shared.report_now.clone();
        let mqtt_on = cfg.mqtt.url.is_some();
        tasks.spawn(async move {
            while let Some(n) = notice_rx.recv().await {
                tracing::info!(event = ?n.event, reason = ?n.reason, "update event");
                report_now.notify_one();
                if mqtt_on {
                    let _ = mqtt_tx.send(n);
                }
            }
        });
    }

    if let Some(url) = cfg.server.url.clone() {
        let shared2 = shared.clone();
        let stop2 = stop.clone();
        let on_exit = guard("server", failed.clone());
        tasks.spawn(async move {
            on_exit(server_loop(shared2, url, desired_tx, stop2).await);
        });
    }

    if let Some(url) = cfg.mqtt.url.clone() {
        let shared2 = shared.clone();
        let stop2 = stop.clone();
        let counters = counters.clone();
        let on_exit = guard("mqtt", failed.clone());
        tasks.spawn(async move {
            // Device credentials come from enrollment unless configured.
            let username = shared2
                .cfg
                .mqtt
                .username
                .clone()
                .unwrap_or_else(|| shared2.device_id.clone());
            let password = loop {
                if let Some(p) = shared2.cfg.mqtt.password.clone() {
                    break p;
                }
                if let Some(c) = shared2.credential.get() {
                    break c.clone();
                }
                if shared2.cfg.server.url.is_none() {
                    on_exit(Err(AgentError::Config(
                        "[mqtt] needs username/password when there is no [server] url".into(),
                    )));
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = stop2.cancelled() => return,
                }
            };
            on_exit(
                crate::telemetry::run(shared2, url, username, password, counters, mqtt_rx, stop2)
                    .await,
            );
        });
    }
    // systemd: ready once the installed model serves; watchdog pings while
    // the runtime is alive.
    let notifier = crate::sdnotify::Notifier::from_env();
    notifier.status(&match engine.active() {
        Some(m) => format!("serving {} {}", m.info.name, m.info.version),
        None => "no model installed yet".to_string(),
    });
    notifier.ready();
    if let Some(every) = notifier.watchdog_interval() {
        let n = notifier.clone();
        let stop2 = stop.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => n.watchdog(),
                    () = stop2.cancelled() => return,
                }
            }
        });
    }
    tasks.close();

    let daemon = async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = failed.cancelled() => {}
        }
        notifier.stopping();
        stop.cancel();
        engine.deactivate();
        tasks.wait().await;
        if failed.is_cancelled() {
            return Err(AgentError::Invariant(
                "a daemon task failed (see log)".into(),
            ));
        }
        Ok(())
    };
    Ok((addr, device_id, daemon))
}

/// Enrolls once (persisting the credential), then polls and reports.
async fn server_loop(
    shared: Shared,
    url: String,
    desired_tx: mpsc::Sender<crate::update::Target>,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let cfg = shared.cfg.clone();
    let base = ServerClient::new(
        &url,
        Duration::from_secs(cfg.server.timeout_secs),
        &cfg.server_tls(),
    )?;
    let cred_path = credential_path(&cfg);
    let credential = match std::fs::read_to_string(&cred_path) {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            let Some(token) = cfg.server.enrollment_token.clone() else {
                return Err(AgentError::Config(
                    "[server] enrollment_token is needed for the first start".into(),
                ));
            };
            let req = EnrollRequest {
                enrollment_token: token,
                device_id: shared.device_id.clone(),
                tags: cfg.tags.clone(),
                arch: TargetArch::current()
                    .map_or("unknown", TargetArch::name)
                    .to_string(),
                agent_version: crate::AGENT_VERSION.to_string(),
            };
            let mut failures = 0u32;
            let resp = loop {
                match base.enroll(&req).await {
                    Ok(r) => break r,
                    // A refused enrollment will not succeed by retrying.
                    Err(
                        e @ AgentError::Server {
                            status: 400..=499, ..
                        },
                    ) => return Err(e),
                    Err(e) => {
                        failures += 1;
                        let wait = retry_delay(&cfg, failures);
                        tracing::warn!(error = %e, retry_in = ?wait, "enrollment failed");
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = stop.cancelled() => return Ok(()),
                        }
                    }
                }
            };
            // 0600 from the first byte: the credential is a bearer secret.
            write_atomic(&cred_path, resp.credential.as_bytes(), 0o600)?;
            tracing::info!(device = %resp.device_id, "enrolled");
            resp.credential
        }
    };
    let client = base.with_credential(credential.clone());
    let _ = shared.client.set(client.clone());
    let _ = shared.credential.set(credential);

    let poll = poll_loop(shared.clone(), client.clone(), desired_tx, stop.clone());
    let report = report_loop(shared.clone(), client, stop.clone());
    tokio::join!(poll, report);
    Ok(())
}

/// The delay before retry number `failures` (1 for the first retry).
fn retry_delay(cfg: &AgentConfig, failures: u32) -> Duration {
    edgefleet_wire::backoff::Backoff::from_millis(cfg.update.retry_min_ms, cfg.update.retry_max_ms)
        .delay(failures.saturating_sub(1))
}

async fn poll_loop(
    shared: Shared,
    client: ServerClient,
    desired_tx: mpsc::Sender<crate::update::Target>,
    stop: CancellationToken,
) {
    let cfg = &shared.cfg.server;
    let mut etag: Option<String> = None;
    loop {
        match client.desired(etag.as_deref()).await {
            Ok(Poll::NotModified) => {}
            Ok(Poll::Changed { desired, etag: e }) => {
                // Verified under an older root, a bundle signed by new keys
                // would be refused for good: until the device follows the
                // fleet's trust version, hold the target and fetch the
                // desired state again at the next poll.
                if follow_trust(&shared, &client, &desired).await {
                    etag = Some(e);
                    if let Some(t) = target_of(&desired)
                        && desired_tx.send(t).await.is_err()
                    {
                        return;
                    }
                } else {
                    etag = None;
                }
            }
            Err(e) => tracing::warn!(error = %e, "desired-state poll failed"),
        }
        let base = cfg.poll_interval_secs as f64;
        let wait = Duration::from_secs_f64(
            base * (1.0 + cfg.poll_jitter * edgefleet_wire::backoff::random_unit()),
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.poll_now.notified() => {
                // A notice reaches many devices at once: spread the polls
                // so a rollout does not make the fleet check in together.
                let spread = Duration::from_secs_f64(
                    cfg.notice_spread_secs * edgefleet_wire::backoff::random_unit(),
                );
                tokio::select! {
                    () = tokio::time::sleep(spread) => {}
                    () = stop.cancelled() => return,
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Walks to the trust version the desired state names (fetching the chain
/// when the device is more than one version behind). Returns whether the
/// device may act on the desired state: its trust is current and fresh.
async fn follow_trust(
    shared: &Shared,
    client: &ServerClient,
    desired: &edgefleet_wire::device::DesiredState,
) -> bool {
    let set_problem = |p: Option<String>| {
        *shared
            .trust_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    };
    let wanted = match desired.trust.as_ref().map(|d| d.peek_unverified()) {
        None => None,
        Some(Ok(d)) => Some(d.version),
        Some(Err(e)) => {
            tracing::error!(error = %e, "unreadable trust document in the desired state");
            set_problem(Some(format!("trust_refused: {e}")));
            return false;
        }
    };
    if let Some(wanted) = wanted.filter(|w| *w > shared.trust.version()) {
        let trust = shared.trust.clone();
        let first: Vec<_> = desired.trust.iter().cloned().collect();
        let mut outcome = tokio::task::spawn_blocking(move || trust.advance(&first)).await;
        if !matches!(&outcome, Ok(Ok((v, _))) if *v >= wanted) {
            // More than one version behind (or a gap): walk the whole chain.
            match client.trust().await {
                Ok(view) => {
                    let trust = shared.trust.clone();
                    outcome = tokio::task::spawn_blocking(move || trust.advance(&view.chain)).await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot fetch the trust chain"),
            }
        }
        match outcome {
            Ok(Ok((v, refusal))) => {
                shared
                    .metrics
                    .trust_version
                    .store(v, std::sync::atomic::Ordering::Relaxed);
                if v > 1 {
                    tracing::info!(version = v, "trust version");
                }
                if v < wanted {
                    let why = refusal.map_or_else(
                        || format!("trust version {wanted} not reached (at {v})"),
                        |e| e.to_string(),
                    );
                    tracing::error!(at = v, wanted, reason = %why, "trust rotation refused");
                    shared
                        .metrics
                        .trust_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    set_problem(Some(format!("trust_refused: {why}")));
                    return false;
                }
            }
            Ok(Err(e)) => {
                // Persisting failed (a full disk): not used until it is kept.
                tracing::error!(error = %e, "cannot keep the trust chain");
                set_problem(Some(format!("trust_not_kept: {e}")));
                return false;
            }
            Err(e) => {
                tracing::error!(error = %e, "trust task failed");
                return false;
            }
        }
    }
    let current = shared.trust.current();
    if let Err(e) = current.check_fresh(edgefleet_wire::time::unix_now()) {
        tracing::error!(error = %e, "not installing: the trust version expired");
        set_problem(Some(format!("trust_expired: {e}")));
        return false;
    }
    set_problem(None);
    true
}

async fn report_loop(shared: Shared, client: ServerClient, stop: CancellationToken) {
    let mut status = shared.status.clone();
    let interval = Duration::from_secs(shared.cfg.server.report_interval_secs.max(1));
    let mut failures = 0u32;
    loop {
        let report = shared.report();
        match client.report(&report).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "report failed");
            }
        }
        let wait = if failures > 0 {
            retry_delay(&shared.cfg, failures).min(interval)
        } else {
            interval
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            r = status.changed() => if r.is_err() { return },
            () = shared.report_now.notified() => {}
            () = stop.cancelled() => return,
        }
    }
}

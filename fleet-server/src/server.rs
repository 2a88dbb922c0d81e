//! Starting the fleet server: load the store into memory, start the writer,
//! the controller, MQTT and the HTTP listener, and run them under one
//! cancellation token and one task tracker. Any long-lived task that ends
//! before shutdown fails the server: no half-alive daemons.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_wire::keys::decode_public_key;
use edgefleet_wire::verify::TrustRoot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{AppState, router};
use crate::auth::Tokens;
use crate::config::ServerConfig;
use crate::controller::{Controller, run_ticker};
use crate::enrollment::Enrollment;
use crate::error::{Error, Result};
use crate::fleet::Fleet;
use crate::ingest::Ingest;
use crate::mqtt::Mqtt;
use crate::registry::Registry;
use crate::standby::Standby;
use crate::store::Store;
use crate::writer::Writer;

/// Jobs that may wait for the store writer.
const WRITE_QUEUE: usize = 8192;

fn trust_root(config: &ServerConfig) -> Result<TrustRoot> {
    let mut keys = Vec::new();
    for p in &config.trust.keys {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::Usage(format!("[trust] keys: {}: {e}", p.display())))?;
        keys.push(decode_public_key(&text).map_err(|source| Error::File {
            path: p.clone(),
            source,
        })?);
    }
    TrustRoot::new(keys, config.trust.threshold).map_err(|e| {
        Error::Usage(format!(
            "[trust]: {e} (list the release public keys in trust.keys)"
        ))
    })
}

/// `fleet-server --check-config`: what [`start`] would load, without
/// binding or opening the store; one line per thing found good.
pub fn check(config: &ServerConfig) -> Result<Vec<String>> {
    let mut ok = Vec::new();
    let root = trust_root(config)?;
    ok.push(format!(
        "[trust]: threshold {} of {} key(s)",
        root.threshold(),
        root.key_ids().count()
    ));
    let tokens = Tokens::from_config(&config.auth.tokens)
        .map_err(|e| Error::Usage(format!("[auth]: {e}")))?;
    drop(tokens);
    ok.push(format!(
        "[auth]: {} operator token(s), {} enrollment token(s)",
        config.auth.tokens.len(),
        config.auth.enrollment_tokens.len()
    ));
    if tls_acceptor(
        "[http]",
        &config.http.tls_cert,
        &config.http.tls_key,
        &config.http.client_ca,
    )?
    .is_some()
    {
        ok.push(format!(
            "[http]: TLS files load{}",
            if config.http.client_ca.is_some() {
                ", with device client certificates"
            } else {
                ""
            }
        ));
    }
    check_advertise(config)?;
    if let Some(ca) = &config.http.replica_ca {
        crate::standby::forward_client(Some(ca))?;
        ok.push("[http]: replica_ca loads".into());
    }
    if let Some(mc) = &config.mqtt
        && tls_acceptor("[mqtt]", &mc.tls_cert, &mc.tls_key, &None)?.is_some()
    {
        ok.push("[mqtt]: TLS files load".into());
    }
    if let Some(url) = &config.store.url {
        ok.push(crate::store::postgres::probe(url)?);
    }
    if config.bundles.url.is_some() {
        // The bucket answers with these credentials. A blocking caller:
        // the runtime's handle from spawn_blocking, else one of its own.
        let open = crate::blobs::Blobs::open(&config.data_dir, &config.bundles);
        let blobs = match tokio::runtime::Handle::try_current() {
            Ok(h) => h.block_on(open)?,
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("a runtime for the bucket check", e))?
                .block_on(open)?,
        };
        ok.push(format!("[bundles]: {} answers", blobs.describe()));
    }
    // The data dir must take writes (the store, the registry's uploads).
    std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
    let probe = config.data_dir.join(".check-config");
    std::fs::write(&probe, b"ok").map_err(|e| Error::io(&probe, e))?;
    let _ = std::fs::remove_file(&probe);
    ok.push(format!(
        "data_dir {} is writable",
        config.data_dir.display()
    ));
    Ok(ok)
}

/// Connections waiting to be accepted: a whole fleet reconnecting after
/// an outage arrives at once.
const BACKLOG: u32 = 4096;

/// A listening socket with a deep accept backlog.
fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| Error::io(addr.to_string(), e))?;
    sock.set_reuseaddr(true)
        .map_err(|e| Error::io(addr.to_string(), e))?;
    sock.bind(addr)
        .map_err(|e| Error::io(addr.to_string(), e))?;
    sock.listen(BACKLOG)
        .map_err(|e| Error::io(addr.to_string(), e))
}

/// Opens the configured store.
pub fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>> {
    crate::store::open(config)
}

/// A started server: its HTTP address and the future that runs it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// `mqtt://host:port` devices connect to, when MQTT is configured.
    pub mqtt_url: Option<String>,
}

/// Binds the configured addresses; returns where they are and a future
/// that serves until `shutdown` is cancelled (or a task fails).
pub async fn bind(
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<()>> + use<>)> {
    let (running, fut) = start(config.clone(), shutdown).await?;
    Ok((running.addr, fut))
}

/// Everything [`bind`] does, with the MQTT address too.
pub async fn start(
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(Running, impl Future<Output = Result<()>> + use<>)> {
    let config = Arc::new(config);
    let trust = trust_root(&config)?;
    let tokens = Tokens::from_config(&config.auth.tokens)
        .map_err(|e| Error::Usage(format!("[auth]: {e}")))?;
    if config.http.client_ca.is_some() && config.http.tls_cert.is_none() {
        return Err(Error::Usage(
            "[http] client_ca needs tls_cert and tls_key: client certificates are a TLS feature"
                .into(),
        ));
    }
    if config.http.device_certs == crate::config::DeviceCerts::Required
        && config.http.client_ca.is_none()
    {
        return Err(Error::Usage(
            "[http] device_certs = \"required\" needs client_ca".into(),
        ));
    }
    let tls = tls_acceptor(
        "[http]",
        &config.http.tls_cert,
        &config.http.tls_key,
        &config.http.client_ca,
    )?;
    let idle = Duration::from_secs(config.http.idle_timeout_secs.max(1));
    check_advertise(&config)?;
    let store = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || open_store(&c))
            .await
            .map_err(|e| Error::Store(e.to_string()))??
    };
    // On a shared database one server is active; the others wait here,
    // answering as standbys on their HTTP address.
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| Error::Store(format!("random: {e}")))?;
    let me = crate::store::LeaseHolder {
        name: format!(
            "{} pid {} http {}",
            hostname(),
            std::process::id(),
            config.http.listen
        ),
        url: advertised(&config),
        secret: Some(hex::encode(secret)),
    };
    let shared_ingest = shared_ingest(&config)?;
    config.limits.validate().map_err(Error::Usage)?;
    let (epoch, standby) = take_lease(
        &config,
        &store,
        &shutdown,
        (&tls, idle),
        &tokens,
        &me,
        shared_ingest.clone(),
    )
    .await?;
    if epoch > 0 {
        tracing::info!(epoch, "active: this server holds the store's lease");
    }
    let snapshot = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.load())
            .await
            .map_err(|e| Error::Store(e.to_string()))??
    };
    tracing::info!(
        devices = snapshot.devices.len(),
        bundles = snapshot.bundles.len(),
        rollouts = snapshot.rollouts.len(),
        backend = store.backend(),
        "store loaded"
    );
    let terms = Controller::terms_table(&snapshot.rollouts);
    let trust = Arc::new(crate::trust::TrustChain::load(trust, &snapshot.trust)?);
    if trust.current().version() > 1 {
        tracing::info!(version = trust.current().version(), "trust chain loaded");
    }
    let fleet = Arc::new(Fleet::load(
        snapshot.devices,
        |r| r.and_then(|id| terms.get(id).cloned()).unwrap_or_default(),
        trust.newest_document(),
        snapshot
            .windows
            .iter()
            .map(|w| (w.scope.clone(), w.schedule.clone()))
            .collect(),
    ));
    let (writer, writer_thread) =
        Writer::start(store.clone(), WRITE_QUEUE).map_err(|e| Error::io("store writer", e))?;
    let registry =
        Arc::new(Registry::open(&config.data_dir, &config.bundles, snapshot.bundles).await?);
    tracing::info!(at = %registry.blobs.describe(), "bundle files");
    let enrollment = Arc::new(Enrollment::new(
        &config.auth.enrollment_tokens,
        &config.auth.enrollment_tags,
        snapshot.enrollment_tokens,
    ));

    let tasks = TaskTracker::new();
    let stop = shutdown.child_token();
    // A critical task that ends early cancels everything and fails `run`.
    let failed = CancellationToken::new();
    let spawn = |name: &'static str,
                 fut: std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>| {
        let (failed, stop) = (failed.clone(), stop.clone());
        tasks.spawn(async move {
            let r = fut.await;
            if !stop.is_cancelled() {
                match r {
                    Ok(()) => tracing::error!(task = name, "a server task ended unexpectedly"),
                    Err(e) => tracing::error!(task = name, error = %e, "a server task failed"),
                }
                failed.cancel();
            }
        });
    };

    let (notice_tx, notice_rx) = tokio::sync::mpsc::channel::<String>(16_384);
    let controller = Arc::new(Controller::new(
        fleet.clone(),
        writer.clone(),
        snapshot.rollouts,
        config.rollouts.offline_after_secs,
        config.mqtt.as_ref().map(|_| notice_tx),
        edgefleet_wire::time::unix_now(),
    ));
    controller.load_experiments(snapshot.experiments);

    let limits = Arc::new(crate::limits::Limits::new(&config.limits));
    let mut mqtt = None;
    let mut mqtt_url = None;
    // Device messages from MQTT and, on a shared store, what the standbys
    // stored in the inbox (their share of the MQTT messages, the device
    // reports they answered) go through one ingest.
    let ingest = (config.mqtt.is_some() || epoch > 0).then(|| {
        let (ingest, ingest_worker) = Ingest::start(
            fleet.clone(),
            writer.clone(),
            config.ingest_queue(),
            stop.clone(),
        );
        spawn("mqtt-ingest", Box::pin(ingest_worker));
        ingest
    });
    let inbox = match (&ingest, epoch > 0) {
        (Some(ingest), true) => {
            let m = Arc::new(crate::mqtt::shared::SharedMetrics::default());
            spawn(
                "inbox",
                Box::pin(crate::mqtt::shared::drain(
                    store.clone(),
                    ingest.clone(),
                    m.clone(),
                    stop.clone(),
                )),
            );
            Some(m)
        }
        _ => None,
    };
    if let (Some(mc), Some(ingest)) = (&config.mqtt, ingest) {
        let m = if mc.embedded {
            let listener = listen(mc.listen)?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::io("mqtt listener", e))?;
            let broker_tls = tls_acceptor("[mqtt]", &mc.tls_cert, &mc.tls_key, &None)?;
            let scheme = if broker_tls.is_some() {
                "mqtts"
            } else {
                "mqtt"
            };
            let broker = crate::mqtt::broker::Broker::new(
                fleet.clone(),
                tokens.clone(),
                ingest.clone(),
                mc.max_connections,
                limits.clone(),
            );
            spawn(
                "mqtt-broker",
                Box::pin(broker.clone().serve(listener, broker_tls, stop.clone())),
            );
            tracing::info!(%addr, "embedded MQTT broker started");
            Mqtt::embedded(format!("{scheme}://{addr}"), ingest, broker)
        } else {
            let (client, run) = crate::mqtt::external::start(
                mc,
                "fleet-server".into(),
                ingest.clone(),
                stop.clone(),
            )?;
            spawn("mqtt-client", Box::pin(run));
            if shared_ingest.is_some()
                && let Some(m) = inbox.clone()
            {
                spawn(
                    "mqtt-adopt",
                    Box::pin(crate::mqtt::shared::adopt(
                        mc.clone(),
                        store.clone(),
                        ingest.clone(),
                        m.clone(),
                        stop.clone(),
                    )),
                );
            }
            let sync = match &mc.mosquitto {
                Some(mq) => {
                    let sync = crate::mqtt::mosquitto::Sync::new(
                        mq.clone(),
                        mc.username.as_deref().unwrap_or("fleet-server"),
                        mc.password.as_deref().unwrap_or_default(),
                        mc.ingest_slots,
                    )?;
                    spawn(
                        "mosquitto-passwords",
                        Box::pin(sync.clone().run(fleet.clone(), stop.clone())),
                    );
                    Some(sync)
                }
                None => None,
            };
            let mut m = Mqtt::external(mc.url.clone().unwrap_or_default(), ingest, client, sync);
            m.shared = inbox.clone().filter(|_| shared_ingest.is_some());
            m
        };
        let m = Arc::new(m);
        spawn(
            "mqtt-notices",
            Box::pin(crate::mqtt::notice_loop(
                m.clone(),
                notice_rx,
                mc.notices_per_sec,
                stop.clone(),
            )),
        );
        mqtt_url = Some(m.url.clone());
        mqtt = Some(m);
    }

    if epoch > 0 {
        spawn(
            "store-lease",
            Box::pin(watch_lease(store.clone(), stop.clone())),
        );
    }
    spawn(
        "rollout-ticker",
        Box::pin(run_ticker(
            controller.clone(),
            Duration::from_millis(config.rollout_tick_ms.max(10)),
            stop.clone(),
        )),
    );

    let state = AppState {
        config: config.clone(),
        store,
        fleet,
        writer,
        controller,
        registry,
        trust,
        tokens,
        enrollment,
        downloads: Arc::new(tokio::sync::Semaphore::new(
            config.http.download_concurrency.max(1),
        )),
        metrics: Arc::new(crate::metrics::ServerMetrics::default()),
        limits,
        mqtt,
        inbox,
        sessions: Arc::new(crate::ui::Sessions::default()),
        streams: Arc::new(tokio::sync::Semaphore::new(
            crate::api::console::MAX_STREAMS,
        )),
        stop: stop.clone(),
        replica_secret: (epoch > 0)
            .then(|| me.secret.as_deref().map(Arc::from))
            .flatten(),
    };
    // A standby's socket, or a new one: a server taking over never
    // refuses a connection on its port.
    let listener = match standby {
        Some(standby) => standby.hand_over(),
        None => Arc::new(listen(config.http.listen)?),
    };
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    let app = router(state);
    spawn(
        "http",
        Box::pin(crate::http::serve(listener, app, idle, tls, stop.clone())),
    );
    tasks.close();

    let run = async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = failed.cancelled() => {}
        }
        stop.cancel();
        tasks.wait().await;
        // The writer finishes what was queued, then its thread ends.
        drop(writer_thread);
        if failed.is_cancelled() && !shutdown.is_cancelled() {
            return Err(Error::Store("a server task failed (see the log)".into()));
        }
        Ok(())
    };
    Ok((Running { addr, mqtt_url }, run))
}

/// `[mqtt] ingest_slots` when set: the standbys' share of the ingest
/// needs an external broker, a shared subscription and a shared store.
fn shared_ingest(config: &ServerConfig) -> Result<Option<crate::config::MqttConfig>> {
    let Some(mc) = config.mqtt.as_ref().filter(|m| m.ingest_slots > 0) else {
        return Ok(None);
    };
    if mc.embedded || mc.share_group.is_none() || config.store.url.is_none() {
        return Err(Error::Usage(
            "[mqtt] ingest_slots needs embedded = false, a share_group and a shared \
             [store] url: standbys take their share of an external broker's shared \
             subscription into the shared store"
                .into(),
        ));
    }
    Ok(Some(mc.clone()))
}

/// Waits for the store's lease (at once for a store only this process
/// opens). While another server holds it, listens as a [`Standby`] (and
/// takes a share of the device messages with `shared_ingest`); returns
/// the lease epoch and that standby, now answering `starting`.
async fn take_lease(
    config: &ServerConfig,
    store: &Arc<dyn Store>,
    shutdown: &CancellationToken,
    (tls, idle): (&Option<tokio_rustls::TlsAcceptor>, Duration),
    tokens: &Tokens,
    me: &crate::store::LeaseHolder,
    shared_ingest: Option<crate::config::MqttConfig>,
) -> Result<(u64, Option<Standby>)> {
    let shared = Arc::new(crate::standby::Shared::default());
    let (waiting_tx, mut waiting) = tokio::sync::watch::channel(false);
    let holder = me.name.clone();
    let (s, stop, sh, me) = (store.clone(), shutdown.clone(), shared.clone(), me.clone());
    let mut acquire = tokio::task::spawn_blocking(move || {
        s.acquire_active(&me, &|active| {
            if let Ok(mut a) = sh.active.lock() {
                a.clone_from(active);
            }
            waiting_tx.send_replace(true);
            !stop.is_cancelled()
        })
    });
    let mut standby = None;
    let share_stop = shutdown.child_token();
    let mut share = None;
    let root = trust_root(config)?;
    let epoch = loop {
        tokio::select! {
            r = &mut acquire => break r.map_err(|e| Error::Store(e.to_string()))??,
            Ok(()) = waiting.changed(), if standby.is_none() => {
                let listener = listen(config.http.listen)?;
                let client = crate::standby::forward_client(config.http.replica_ca.as_deref())?;
                let local = standby_local(config, store, &share_stop);
                tracing::info!(
                    listen = %config.http.listen,
                    "standby: answering health checks and devices' check-ins, reports and downloads, forwarding the rest to the active server"
                );
                standby = Some(Standby::start(
                    listener,
                    tls.clone(),
                    idle,
                    (tokens.clone(), shared.clone()),
                    client,
                    Some(local.clone()),
                ));
                tokio::spawn(crate::follow::follow(
                    store.clone(),
                    root.clone(),
                    local.copy.clone(),
                    share_stop.clone(),
                ));
                if let Some(mc) = &shared_ingest {
                    share = Some(tokio::spawn(crate::mqtt::shared::standby(
                        mc.clone(),
                        store.clone(),
                        holder.clone(),
                        shared.ingest.clone(),
                        share_stop.clone(),
                    )));
                }
            }
        }
    };
    // Taking over (or stopping): the standby's share ends first, and its
    // slot's session is left for the adoption.
    share_stop.cancel();
    if let Some(share) = share {
        let _ = share.await;
    }
    let Some(epoch) = epoch else {
        return Err(Error::Usage("stopped while waiting as a standby".into()));
    };
    if let Some(s) = &standby {
        s.taking_over();
    }
    Ok((epoch, standby))
}

/// What a standby answers devices with: a copy of the fleet the change
/// feed keeps current (stores without a feed have no standbys), the inbox
/// for their reports, and the bundle bucket, opened in the background (a
/// slow bucket must not hold up a takeover; downloads are forwarded until
/// it answers).
fn standby_local(
    config: &ServerConfig,
    store: &Arc<dyn Store>,
    stop: &CancellationToken,
) -> Arc<crate::standby::Local> {
    let (reports, worker) = Ingest::start_inbox(
        store.clone(),
        0,
        Arc::new(crate::ingest::IngestMetrics::default()),
        config.ingest_queue(),
        stop.clone(),
    );
    tokio::spawn(worker);
    let local = Arc::new(crate::standby::Local::new(
        Arc::new(crate::follow::Copy::default()),
        crate::limits::Limits::new(&config.limits),
        config.http.clone(),
        reports,
    ));
    if config.bundles.is_bucket() {
        let (l, data_dir, bundles) = (
            local.clone(),
            config.data_dir.clone(),
            config.bundles.clone(),
        );
        tokio::spawn(async move {
            match crate::blobs::Blobs::open(&data_dir, &bundles).await {
                Ok(b) => {
                    tracing::info!(at = %b.describe(), "standby: serving devices' downloads from the bundle bucket");
                    let _ = l.blobs.set(b);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "standby: cannot open the bundle bucket; downloads are forwarded")
                }
            }
        });
    }
    local
}

/// `[http] advertise_url` is an http(s) URL with a host, if given.
fn check_advertise(config: &ServerConfig) -> Result<()> {
    let Some(u) = &config.http.advertise_url else {
        return Ok(());
    };
    match reqwest::Url::parse(u) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        Ok(_) => Err(Error::Usage(format!(
            "[http] advertise_url {u:?}: an http:// or https:// URL with a host is needed"
        ))),
        Err(e) => Err(Error::Usage(format!("[http] advertise_url {u:?}: {e}"))),
    }
}

/// Where standbys forward to while this server is active: `[http]
/// advertise_url`, else the listen address when it names one.
fn advertised(config: &ServerConfig) -> Option<String> {
    if let Some(u) = &config.http.advertise_url {
        return Some(u.clone());
    }
    let l = config.http.listen;
    let scheme = http_scheme(config);
    (!l.ip().is_unspecified() && l.port() != 0).then(|| format!("{scheme}://{l}"))
}

/// `https` when the API listens with TLS.
fn http_scheme(config: &ServerConfig) -> &'static str {
    if config.http.tls_cert.is_some() {
        "https"
    } else {
        "http"
    }
}

/// Runs the server until `shutdown` is cancelled.
pub async fn run(config: ServerConfig, shutdown: CancellationToken) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let scheme = http_scheme(&config);
    let (running, serve) = match start(config, shutdown.clone()).await {
        Ok(started) => started,
        // SIGTERM while a standby: a clean stop.
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    // Scripts and tests read these lines.
    if let Some(u) = &running.mqtt_url {
        println!("mqtt broker at {u}");
    }
    println!("fleet-server listening on {scheme}://{}", running.addr);
    tracing::info!(addr = %running.addr, data_dir = %data_dir.display(), "fleet server started");
    serve.await
}

/// How often the active server checks that it still holds the lease.
const LEASE_CHECK: Duration = Duration::from_secs(1);

/// Ends with an error (stopping the server) once the store's active lease
/// is lost: a standby may be serving the database already.
async fn watch_lease(store: Arc<dyn Store>, stop: CancellationToken) -> Result<()> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(LEASE_CHECK) => {}
        }
        let s = store.clone();
        let held = tokio::task::spawn_blocking(move || s.still_active())
            .await
            .unwrap_or(false);
        if !held {
            return Err(Error::Fenced(
                "lost the store's active lease (its database session ended or another \
                 server took over): stopping; a restart waits as a standby"
                    .into(),
            ));
        }
    }
}

/// This machine's name, for the lease holder shown to standbys.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The certificates of PEM file `path` (`what` names the setting in
/// errors); a file without one is an error.
pub(crate) fn pem_certs(
    what: &str,
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Usage(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Usage(format!(
            "{what} {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// Trust anchors: every certificate of PEM file `file` (each must be a
/// usable CA, or the error names `what`), else the system's CAs (one
/// rustls cannot use is skipped, as browsers do).
pub(crate) fn root_store(
    what: &str,
    file: Option<&std::path::Path>,
) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    match file {
        Some(f) => {
            for c in pem_certs(what, f)? {
                store
                    .add(c)
                    .map_err(|e| Error::Usage(format!("{what} {}: {e}", f.display())))?;
            }
        }
        None => {
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    Ok(store)
}

/// The private key in PEM file `path`.
pub(crate) fn pem_key(
    what: &str,
    path: &std::path::Path,
) -> Result<rustls::pki_types::PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::Usage(format!("{what} {}: {e}", path.display())))
}

/// The TLS acceptor of a listener when its `tls_cert` and `tls_key` are
/// set (both or neither); bad files fail the start with the file and the
/// reason.
fn tls_acceptor(
    section: &str,
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    client_ca: &Option<std::path::PathBuf>,
) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => {
            return Err(Error::Usage(format!(
                "{section} tls_cert and tls_key go together"
            )));
        }
    };
    let chain = pem_certs(&format!("{section} tls_cert"), cert)?;
    let key = pem_key(&format!("{section} tls_key"), key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Usage(format!("tls: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(&format!("{section} client_ca"), ca)? {
                roots.add(c).map_err(|e| {
                    Error::Usage(format!("{section} client_ca {}: {e}", ca.display()))
                })?;
            }
            // A certificate is checked whenever one is presented; whether
            // a device must present one is decided per request (operators
            // never need one).
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::Usage(format!("{section} client_ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| Error::Usage(format!("{section} tls_cert/tls_key: {e}")))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(listen: &str, tls: bool, advertise: Option<&str>) -> ServerConfig {
        let mut c = ServerConfig::default();
        c.http.listen = listen.parse().unwrap();
        c.http.tls_cert = tls.then(|| "cert.pem".into());
        c.http.advertise_url = advertise.map(String::from);
        c
    }

    #[test]
    fn ingest_slots_need_an_external_broker_a_share_group_and_a_shared_store() {
        let with = |embedded: bool, group: Option<&str>, store: Option<&str>, slots: u32| {
            let mut c = ServerConfig {
                mqtt: Some(crate::config::MqttConfig {
                    embedded,
                    url: Some("mqtt://127.0.0.1:1883".into()),
                    share_group: group.map(String::from),
                    ingest_slots: slots,
                    ..Default::default()
                }),
                ..Default::default()
            };
            c.store.url = store.map(String::from);
            shared_ingest(&c)
        };
        let pg = Some("postgres://fleet@db/fleet");
        assert!(with(false, Some("fleet"), pg, 2).unwrap().is_some());
        assert!(with(false, Some("fleet"), pg, 0).unwrap().is_none());
        assert!(with(true, None, None, 0).unwrap().is_none());
        for (embedded, group, store) in [
            (true, Some("fleet"), pg),
            (false, None, pg),
            (false, Some("fleet"), None),
        ] {
            let e = with(embedded, group, store, 1).unwrap_err().to_string();
            assert!(e.contains("ingest_slots"), "{e}");
        }
    }

    #[test]
    fn the_advertised_url_is_the_listen_address_only_when_it_names_one() {
        let a = |l, tls, adv| advertised(&http(l, tls, adv));
        assert_eq!(
            a("10.0.0.1:7070", false, None).as_deref(),
            Some("http://10.0.0.1:7070")
        );
        assert_eq!(
            a("10.0.0.1:7443", true, None).as_deref(),
            Some("https://10.0.0.1:7443")
        );
        assert_eq!(
            a("[::1]:7070", false, None).as_deref(),
            Some("http://[::1]:7070")
        );
        assert_eq!(a("0.0.0.0:7070", false, None), None);
        assert_eq!(a("[::]:7070", false, None), None);
        assert_eq!(a("10.0.0.1:0", false, None), None);
        assert_eq!(
            a("0.0.0.0:7070", false, Some("http://fleet-a:7070")).as_deref(),
            Some("http://fleet-a:7070")
        );
        for bad in ["ftp://fleet-a", "fleet-a:7070", "http://", "not a url"] {
            let e = check_advertise(&http("0.0.0.0:7070", false, Some(bad))).unwrap_err();
            assert!(e.to_string().contains("advertise_url"), "{bad}: {e}");
        }
        check_advertise(&http(
            "0.0.0.0:7070",
            false,
            Some("https://fleet-a.internal:7443/"),
        ))
        .unwrap();
    }
}

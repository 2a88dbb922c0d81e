//! MQTT: the retained birth/death state, periodic telemetry, lifecycle
//! events, and the server's commands, over rumqttc.
//!
//! Every event and telemetry record goes to the store's outbox first and
//! leaves it only on PUBACK, so nothing is lost across broker outages or
//! agent restarts. The outbox is bounded: telemetry is dropped before
//! events, and drops are counted in the telemetry itself.
//!
//! Publishing is stop-and-wait (one outbox record in flight): a record is
//! retried until acknowledged, so each arrives once or more, and in order,
//! even across reconnects (rumqttc drops its in-flight queue on a clean
//! session, FACTS.md). rumqttc has no reconnect backoff; the event loop task
//! adds exponential backoff with jitter and is never blocked by publishing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use edgefleet_wire::telemetry::{
    Command, CommandKind, DeviceEvent, DeviceState, OutboxStats, Telemetry, Topics,
    telemetry_to_postcard,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, Encoding};
use crate::error::AgentError;
use crate::shared::Shared;
use crate::store::RecordClass;
use crate::updater::Notice;
use edgefleet_wire::time::unix_now as now_unix;

/// Counters shown in telemetry and /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub dropped_telemetry: AtomicU64,
    pub dropped_events: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub published: AtomicU64,
    pub connects: AtomicU64,
    /// The outbox record being published (0: none). It is never dropped
    /// for room: it may already have arrived, and a drop must mean "lost".
    pub inflight: AtomicU64,
}

/// Prometheus lines for the outbox and MQTT counters.
pub fn metrics_text(
    counters: Arc<Counters>,
    store: Arc<dyn crate::store::Store>,
    engine: Arc<crate::engine::Engine>,
    data_dir: std::path::PathBuf,
) -> crate::api::ExtraMetrics {
    Arc::new(move || {
        use std::fmt::Write as _;
        let (depth, bytes) = store.outbox_depth();
        let health = store.health();
        let mut out = String::new();
        // The family is always declared; the sample only where the board
        // has a thermal zone.
        out.push_str(
            "# HELP edge_agent_temperature_celsius The board's first thermal zone.\n\
             # TYPE edge_agent_temperature_celsius gauge\n",
        );
        if let Some(t) = board_temperature() {
            let _ = writeln!(out, "edge_agent_temperature_celsius {t}");
        }
        if let Some(free) = disk_free(&data_dir) {
            let _ = writeln!(
                out,
                "# HELP edge_agent_disk_free_bytes Free bytes on the data directory's filesystem.\n# TYPE edge_agent_disk_free_bytes gauge\nedge_agent_disk_free_bytes {free}"
            );
        }
        if let Some(m) = engine.active()
            && let Some(d) = &m.drift
            && let Ok(d) = d.lock()
        {
            out.push_str(&crate::drift::render_prometheus(
                &d.snapshot(),
                d.alerting(),
            ));
        }
        for (name, help, kind, v) in [
            (
                "edge_agent_outbox_records",
                "Records waiting in the MQTT outbox.",
                "gauge",
                depth,
            ),
            (
                "edge_agent_outbox_bytes",
                "Bytes waiting in the MQTT outbox.",
                "gauge",
                bytes,
            ),
            (
                "edge_agent_outbox_dropped_telemetry_total",
                "Telemetry records dropped because the outbox was full.",
                "counter",
                counters.dropped_telemetry.load(Relaxed),
            ),
            (
                "edge_agent_outbox_dropped_events_total",
                "Events dropped because the outbox held nothing else to drop.",
                "counter",
                counters.dropped_events.load(Relaxed),
            ),
            (
                "edge_agent_mqtt_bytes_sent_total",
                "MQTT payload bytes sent since start.",
                "counter",
                counters.bytes_sent.load(Relaxed),
            ),
            (
                "edge_agent_store_no_space_errors_total",
                "Store writes refused because the disk (or quota) was full.",
                "counter",
                health.no_space_errors,
            ),
            (
                "edge_agent_store_io_errors_total",
                "Store writes that failed with another I/O error.",
                "counter",
                health.io_errors,
            ),
            (
                "edge_agent_store_reopens_total",
                "Times the store was reopened after an error.",
                "counter",
                health.reopens,
            ),
            (
                "edge_agent_store_degraded",
                "1 while store writes fail (see the device report's `degraded`).",
                "gauge",
                u64::from(health.condition.is_some()),
            ),
            (
                "edge_agent_store_reserve_released",
                "1 while the store's space reserve is given up to a full disk.",
                "gauge",
                u64::from(health.reserve_released),
            ),
            (
                "edge_agent_mqtt_connects_total",
                "MQTT connections established since start.",
                "counter",
                counters.connects.load(Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    })
}

/// `mqtt://host:port` → (host, port).
pub fn parse_url(url: &str) -> Result<(String, u16, bool), AgentError> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false)
    } else {
        return Err(AgentError::Config(format!(
            "[mqtt] url {url:?}: use mqtt://host:port or mqtts://host:port"
        )));
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse()
                .map_err(|_| AgentError::Config(format!("[mqtt] url {url:?}: bad port")))?,
            tls,
        )),
        None => Ok((rest.to_string(), if tls { 8883 } else { 1883 }, tls)),
    }
}

/// Board temperature in °C from the first thermal zone, when present.
pub fn board_temperature() -> Option<f64> {
    let s = std::fs::read_to_string("/sys/class/thermal/thermal_zone0/temp").ok()?;
    s.trim().parse::<f64>().ok().map(|m| m / 1000.0)
}

/// Free bytes for unprivileged users on the filesystem holding `path`.
pub fn disk_free(path: &std::path::Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

fn state_of(shared: &Shared, online: bool) -> DeviceState {
    let rec = shared.status.borrow().record.clone();
    DeviceState {
        device_id: shared.device_id.clone(),
        online,
        agent_version: Some(crate::AGENT_VERSION.to_string()),
        board: shared.cfg.tags.get("board").cloned(),
        arch: edgefleet_wire::manifest::TargetArch::current().map(|a| a.name().to_string()),
        active: rec.active.clone(),
        last_known_good: rec.last_known_good.clone(),
        update_state: Some(rec.phase.state()),
        reason: rec.reason.clone(),
        boot_time: Some(shared.booted_at),
        at: now_unix(),
    }
}

/// Writes a lifecycle event to the outbox.
fn enqueue_event(shared: &Shared, counters: &Counters, topics: &Topics, ev: &DeviceEvent) {
    let Ok(payload) = serde_json::to_vec(ev) else {
        return;
    };
    match shared.store.outbox_push(
        RecordClass::Event,
        &topics.events,
        &payload,
        shared.cfg.mqtt.outbox_max_bytes,
        counters.inflight.load(Relaxed),
    ) {
        Ok(o) => {
            counters
                .dropped_telemetry
                .fetch_add(o.dropped_telemetry, Relaxed);
            counters.dropped_events.fetch_add(o.dropped_events, Relaxed);
        }
        Err(e) => {
            // The store counts and logs it (rate-limited).
            tracing::debug!(error = %e, "cannot queue an event");
            shared.store.recover(&e);
        }
    }
}

/// Builds telemetry records from the engine's counters.
struct Sampler {
    last_cpu: f64,
    last_at: std::time::Instant,
    last_totals: (u64, u64, u64),
    seq: u64,
}

impl Sampler {
    fn new() -> Sampler {
        Sampler {
            last_cpu: crate::procstat::cpu_seconds(),
            last_at: std::time::Instant::now(),
            last_totals: (0, 0, 0),
            seq: 0,
        }
    }

    fn sample(&mut self, shared: &Shared, counters: &Counters) -> Telemetry {
        let now = std::time::Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-3);
        let cpu = crate::procstat::cpu_seconds();
        let cpu_pct = ((cpu - self.last_cpu) / dt * 100.0).max(0.0);
        self.last_cpu = cpu;
        self.last_at = now;
        let active = shared.engine.active();
        let reward = active.as_ref().and_then(|m| m.stats.take_reward());
        let (model, inferences, errors, latency) = match &active {
            Some(m) => {
                let gen_id = m.generation();
                let ok = m.stats.inferences.load(Relaxed);
                let err = m.stats.errors.load(Relaxed);
                let (prev_gen, prev_ok, prev_err) = self.last_totals;
                let (d_ok, d_err) = if prev_gen == gen_id {
                    (ok.saturating_sub(prev_ok), err.saturating_sub(prev_err))
                } else {
                    (ok, err)
                };
                self.last_totals = (gen_id, ok, err);
                let lat = m.stats.take_interval();
                (
                    Some(format!("{}@{}", m.info.name, m.info.version)),
                    d_ok + d_err,
                    d_err,
                    edgefleet_wire::stats::latency_summary(lat),
                )
            }
            None => (None, 0, 0, None),
        };
        let (depth, bytes) = shared.store.outbox_depth();
        self.seq += 1;
        Telemetry {
            at: now_unix(),
            interval_secs: shared.cfg.mqtt.telemetry_interval_secs,
            seq: self.seq,
            model,
            inferences,
            errors,
            latency_ms: latency,
            queue_depth: shared.engine.queue_depth() as u64,
            cpu_pct,
            rss_bytes: crate::procstat::rss_bytes(),
            temperature_c: board_temperature(),
            disk_free_bytes: disk_free(&shared.cfg.data_dir),
            uptime_secs: now_unix().saturating_sub(shared.booted_at),
            outbox: OutboxStats {
                depth,
                bytes,
                dropped_telemetry: counters.dropped_telemetry.load(Relaxed),
                dropped_events: counters.dropped_events.load(Relaxed),
            },
            bytes_sent: counters.bytes_sent.load(Relaxed),
            drift: active
                .as_ref()
                .and_then(|m| m.drift.as_ref())
                .and_then(|d| d.lock().ok().map(|d| d.snapshot()))
                .unwrap_or_default(),
            reward,
        }
    }
}

fn encode_telemetry(cfg: &AgentConfig, t: &Telemetry) -> Option<Vec<u8>> {
    match cfg.mqtt.encoding {
        Encoding::Json => serde_json::to_vec(t).ok(),
        Encoding::Postcard => telemetry_to_postcard(t).ok(),
    }
}

/// Connection state shared by the event loop and the publisher.
struct Link {
    /// 0 while disconnected, else the connection epoch.
    epoch: watch::Sender<u64>,
    sent: Arc<Notify>,
    last_sent: AtomicU64,
    acked: Arc<Notify>,
    last_acked: AtomicU64,
}

/// Runs MQTT until `stop`: event loop, publisher, telemetry timer and the
/// lifecycle-event feed.
pub async fn run(
    shared: Shared,
    url: String,
    username: String,
    password: String,
    counters: Arc<Counters>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let cfg = shared.cfg.clone();
    let (host, port, tls) = parse_url(&url)?;
    let topics = Topics::new(&shared.device_id);
    let mut opts = MqttOptions::new(shared.device_id.clone(), host, port);
    opts.set_credentials(username, password);
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keep_alive_secs.max(5)));
    opts.set_clean_session(true);
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    if tls {
        let config = crate::tls::client_config(&cfg.mqtt_tls())?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    let will = serde_json::to_vec(&state_of(&shared, false))
        .map_err(|e| AgentError::Invariant(e.to_string()))?;
    opts.set_last_will(LastWill::new(
        topics.state.clone(),
        will,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    let (epoch_tx, epoch_rx) = watch::channel(0u64);
    let link = Arc::new(Link {
        epoch: epoch_tx,
        sent: Arc::new(Notify::new()),
        last_sent: AtomicU64::new(u64::MAX),
        acked: Arc::new(Notify::new()),
        last_acked: AtomicU64::new(u64::MAX),
    });
    let outbox_changed = Arc::new(Notify::new());
    let telemetry_now = Arc::new(Notify::new());

    // The event loop: polled forever, with backoff on errors. It never
    // publishes itself.
    let ev_link = link.clone();
    let ev_stop = stop.clone();
    let ev_client = client.clone();
    let ev_shared = shared.clone();
    let ev_topics = topics.clone();
    let ev_counters = counters.clone();
    let ev_telemetry_now = telemetry_now.clone();
    let event_loop = async move {
        let mut failures: u32 = 0;
        let mut epoch: u64 = 0;
        loop {
            let polled = tokio::select! {
                p = eventloop.poll() => p,
                () = ev_stop.cancelled() => {
                    // Say goodbye on purpose (retained offline state), then
                    // disconnect cleanly; the Last Will covers crashes.
                    if *ev_link.epoch.borrow() != 0 {
                        if let Ok(bytes) = serde_json::to_vec(&state_of(&ev_shared, false)) {
                            let _ = ev_client.try_publish(ev_topics.state.clone(), QoS::AtLeastOnce, true, bytes);
                        }
                        let _ = ev_client.try_disconnect();
                        let flush = async {
                            loop {
                                match eventloop.poll().await {
                                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                                    Ok(_) => {}
                                }
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
                    }
                    return;
                }
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    epoch += 1;
                    ev_counters.connects.fetch_add(1, Relaxed);
                    tracing::info!(epoch, "mqtt connected");
                    let _ = ev_link.epoch.send(epoch);
                    let c = ev_client.clone();
                    let t = ev_topics.cmd.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe(t, QoS::AtLeastOnce).await;
                    });
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    ev_link.last_sent.store(u64::from(pkid), Relaxed);
                    ev_link.sent.notify_waiters();
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    ev_link.last_acked.store(u64::from(ack.pkid), Relaxed);
                    ev_link.acked.notify_waiters();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ev_topics.cmd => {
                    match serde_json::from_slice::<Command>(&p.payload) {
                        Ok(c) => match c.kind {
                            CommandKind::UpdateAvailable => ev_shared.poll_now.notify_one(),
                            CommandKind::ReportNow => {
                                ev_shared.report_now.notify_one();
                                ev_telemetry_now.notify_one();
                            }
                        },
                        Err(e) => tracing::warn!(error = %e, "ignored a malformed command"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = ev_link.epoch.send(0);
                    failures += 1;
                    let m = &ev_shared.cfg.mqtt;
                    let wait = edgefleet_wire::backoff::Backoff::from_millis(
                        m.reconnect_min_ms,
                        m.reconnect_max_ms,
                    )
                    .delay(failures.saturating_sub(1));
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "mqtt connection lost");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = ev_stop.cancelled() => return,
                    }
                }
            }
        }
    };

    // Lifecycle events and the telemetry timer feed the outbox.
    let feed_shared = shared.clone();
    let feed_counters = counters.clone();
    let feed_topics = topics.clone();
    let feed_changed = outbox_changed.clone();
    let feed_stop = stop.clone();
    let feed = async move {
        let mut sampler = Sampler::new();
        let interval = Duration::from_secs(feed_shared.cfg.mqtt.telemetry_interval_secs.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                n = notices.recv() => {
                    let Some(n) = n else { return };
                    let ev = DeviceEvent {
                        at: n.at,
                        event: serde_json::to_value(n.event)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        bundle: n.bundle,
                        reason: n.reason,
                        drift: Vec::new(),
                    };
                    enqueue_event(&feed_shared, &feed_counters, &feed_topics, &ev);
                }
                _ = tick.tick() => {}
                () = telemetry_now.notified() => {}
                () = feed_stop.cancelled() => return,
            }
            // Drift alerts raised by the workers since the last wake-up.
            let alerts = feed_shared
                .engine
                .active()
                .and_then(|m| {
                    m.drift_alerts
                        .lock()
                        .ok()
                        .map(|mut q| std::mem::take(&mut *q))
                })
                .unwrap_or_default();
            for a in alerts {
                let active = feed_shared.status.borrow().record.active.clone();
                let ev = DeviceEvent {
                    at: now_unix(),
                    event: "drift".into(),
                    bundle: active,
                    reason: Some(format!(
                        "PSI over {} inferences: {}",
                        a.samples,
                        a.values
                            .iter()
                            .map(|v| format!("{} {:.2}", v.feature, v.psi))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    drift: a.values,
                };
                enqueue_event(&feed_shared, &feed_counters, &feed_topics, &ev);
            }
            // Telemetry on the tick (and on "report now").
            if tick_due(&mut sampler, interval) {
                let t = sampler.sample(&feed_shared, &feed_counters);
                if let Some(payload) = encode_telemetry(&feed_shared.cfg, &t) {
                    match feed_shared.store.outbox_push(
                        RecordClass::Telemetry,
                        &feed_topics.telemetry,
                        &payload,
                        feed_shared.cfg.mqtt.outbox_max_bytes,
                        feed_counters.inflight.load(Relaxed),
                    ) {
                        Ok(o) => {
                            feed_counters
                                .dropped_telemetry
                                .fetch_add(o.dropped_telemetry, Relaxed);
                            feed_counters
                                .dropped_events
                                .fetch_add(o.dropped_events, Relaxed);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot queue telemetry");
                            feed_shared.store.recover(&e);
                        }
                    }
                }
            }
            feed_changed.notify_one();
        }
    };

    let publisher = publish_loop(
        shared.clone(),
        client.clone(),
        link.clone(),
        epoch_rx,
        topics.clone(),
        counters.clone(),
        outbox_changed.clone(),
        stop.clone(),
    );
    tokio::join!(event_loop, feed, publisher);
    Ok(())
}

/// Telemetry is due when an interval passed since the last sample (events
/// wake the feed too, without producing telemetry).
fn tick_due(s: &mut Sampler, interval: Duration) -> bool {
    s.last_at.elapsed() + Duration::from_millis(50) >= interval
}

/// Publishes one message and waits for its PUBACK on this connection.
/// Returns false if the connection went away first (the caller retries).
async fn publish_acked(
    client: &AsyncClient,
    link: &Link,
    epoch_rx: &mut watch::Receiver<u64>,
    topic: &str,
    retain: bool,
    payload: Vec<u8>,
) -> bool {
    let epoch = *epoch_rx.borrow();
    let sent = link.sent.notified();
    tokio::pin!(sent);
    sent.as_mut().enable();
    if client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .is_err()
    {
        return false;
    }
    // Our publish is the only one in flight: the next outgoing publish id is ours.
    let pkid = tokio::select! {
        () = &mut sent => link.last_sent.load(Relaxed),
        _ = epoch_rx.wait_for(|e| *e != epoch) => return false,
        () = tokio::time::sleep(Duration::from_secs(30)) => return false,
    };
    loop {
        let acked = link.acked.notified();
        tokio::pin!(acked);
        acked.as_mut().enable();
        if link.last_acked.load(Relaxed) == pkid {
            return true;
        }
        tokio::select! {
            () = &mut acked => {
                if link.last_acked.load(Relaxed) == pkid {
                    return true;
                }
            }
            _ = epoch_rx.wait_for(|e| *e != epoch) => return false,
            () = tokio::time::sleep(Duration::from_secs(30)) => return false,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish_loop(
    shared: Shared,
    client: AsyncClient,
    link: Arc<Link>,
    mut epoch_rx: watch::Receiver<u64>,
    topics: Topics,
    counters: Arc<Counters>,
    outbox_changed: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut status = shared.status.clone();
    let mut state_sent_epoch = 0u64;
    let mut state_step = u64::MAX;
    let mut acked = 0u64;
    loop {
        // Wait for a connection.
        tokio::select! {
            r = epoch_rx.wait_for(|e| *e != 0) => if r.is_err() { return },
            () = stop.cancelled() => return,
        }
        let epoch = *epoch_rx.borrow();
        // The retained state first: on every (re)connect and every change.
        let step = status.borrow_and_update().step;
        if state_sent_epoch != epoch || state_step != step {
            let Ok(payload) = serde_json::to_vec(&state_of(&shared, true)) else {
                continue;
            };
            let n = payload.len() as u64;
            if publish_acked(&client, &link, &mut epoch_rx, &topics.state, true, payload).await {
                counters.bytes_sent.fetch_add(n, Relaxed);
                state_sent_epoch = epoch;
                state_step = step;
            }
            continue;
        }
        // Then the outbox, oldest first, one at a time. `acked` skips
        // records the broker has but the store could not delete (a full
        // disk): they are not sent again until a restart.
        let next = shared
            .store
            .outbox_after(acked, 1)
            .ok()
            .and_then(|v| v.into_iter().next());
        if let Some(rec) = next {
            let n = rec.payload.len() as u64;
            if publish_acked(
                &client,
                &link,
                &mut epoch_rx,
                &rec.topic,
                false,
                rec.payload,
            )
            .await
            {
                counters.bytes_sent.fetch_add(n, Relaxed);
                counters.published.fetch_add(1, Relaxed);
                acked = rec.seq;
                if let Err(e) = shared.store.outbox_remove(rec.seq) {
                    // The store counts and logs it (rate-limited).
                    tracing::debug!(error = %e, "cannot remove an acknowledged record");
                    shared.store.recover(&e);
                }
            }
            continue;
        }
        tokio::select! {
            () = outbox_changed.notified() => {}
            r = status.changed() => if r.is_err() { return },
            _ = epoch_rx.wait_for(|e| *e != epoch) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_mqtt_urls() {
        assert_eq!(
            parse_url("mqtt://fleet:1884").unwrap(),
            ("fleet".into(), 1884, false)
        );
        assert_eq!(
            parse_url("mqtt://fleet").unwrap(),
            ("fleet".into(), 1883, false)
        );
        assert_eq!(
            parse_url("mqtts://fleet").unwrap(),
            ("fleet".into(), 8883, true)
        );
        assert_eq!(
            parse_url("mqtts://fleet:8884/").unwrap(),
            ("fleet".into(), 8884, true)
        );
        assert!(parse_url("http://fleet:1883").is_err());
        assert!(parse_url("mqtt://fleet:x").is_err());
    }

    #[test]
    fn disk_free_reads_the_data_dir_filesystem() {
        let d = tempfile::tempdir().unwrap();
        assert!(disk_free(d.path()).unwrap() > 0);
    }
}

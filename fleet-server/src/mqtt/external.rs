//! The server as a client of an external broker (mosquitto, EMQX,
//! VerneMQ): it subscribes to the devices' topics — through a shared
//! subscription when replicas split the load — and acknowledges each
//! message only after the store committed it (manual acks on a
//! persistent session), so the broker redelivers anything the server did
//! not store. The rumqttc event loop is polled in its own task, with the
//! one backoff policy on errors; nothing awaits a publish inside it.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_wire::backoff::Backoff;
use edgefleet_wire::telemetry::TOPIC_PREFIX;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::error::{Error, Result};
use crate::ingest::{Ingest, Refusal};

/// The publishing side, for notices.
#[derive(Clone, Debug)]
pub struct Client {
    client: AsyncClient,
}

impl Client {
    /// Queues a publish without waiting (false if the queue is full).
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
    }
}

/// `mqtt://host[:port]` → (host, port).
pub fn split_url(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| Error::Usage(format!("[mqtt] url {url:?}: use mqtt://host:port")))?;
    match rest.trim_end_matches('/').rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse()
                .map_err(|_| Error::Usage(format!("[mqtt] url {url:?}: bad port")))?,
        )),
        None => Ok((rest.to_string(), 1883)),
    }
}

/// The subscriptions: every device's state, telemetry and events.
pub fn filters(share_group: Option<&str>) -> Vec<String> {
    ["state", "telemetry", "events"]
        .iter()
        .map(|k| match share_group {
            Some(g) => format!("$share/{g}/{TOPIC_PREFIX}/+/{k}"),
            None => format!("{TOPIC_PREFIX}/+/{k}"),
        })
        .collect()
}

/// The broker login of shared-ingest slot `n`: the server's own
/// username with `-n` (`fleet-server-1`); same password.
pub fn slot_login(cfg: &MqttConfig, n: u32) -> String {
    format!("{}-{n}", cfg.username.as_deref().unwrap_or("fleet-server"))
}

/// The connection options: `client_id`, logging in as `username` (the
/// server's own when `None`), a persistent session and manual acks.
fn options(cfg: &MqttConfig, client_id: String, username: Option<String>) -> Result<MqttOptions> {
    let url = cfg
        .url
        .clone()
        .ok_or_else(|| Error::Usage("[mqtt] embedded = false needs url".into()))?;
    let (host, port) = split_url(&url)?;
    let mut opts = MqttOptions::new(client_id, host, port);
    if let Some(u) = username.or_else(|| cfg.username.clone()) {
        opts.set_credentials(u, cfg.password.clone().unwrap_or_default());
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    // A persistent session and manual acks: unacknowledged messages are
    // the broker's to redeliver.
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_inflight(1000);
    Ok(opts)
}

/// Connects as `client_id` with the server's login; returns the
/// publishing client and the loop that ingests until `shutdown`.
pub fn start(
    cfg: &MqttConfig,
    client_id: String,
    ingest: Ingest,
    shutdown: CancellationToken,
) -> Result<(Client, impl Future<Output = Result<()>> + use<>)> {
    let opts = options(cfg, client_id, None)?;
    let (client, eventloop) = AsyncClient::new(opts, 4096);
    let filters = filters(cfg.share_group.as_deref());
    let c = client.clone();
    let run = run(c, eventloop, ingest, filters, shutdown);
    Ok((Client { client }, run))
}

/// A standby's share of the ingest: logs in as slot `n`
/// ([`slot_login`], also its client id) and ingests its share of the
/// shared subscription into `ingest` (the inbox) until `shutdown`.
pub fn start_slot(
    cfg: &MqttConfig,
    n: u32,
    ingest: Ingest,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = Result<()>> + use<>> {
    let login = slot_login(cfg, n);
    let opts = options(cfg, login.clone(), Some(login))?;
    let (client, eventloop) = AsyncClient::new(opts, 4096);
    Ok(run(
        client,
        eventloop,
        ingest,
        filters(cfg.share_group.as_deref()),
        shutdown,
    ))
}

/// How long an adoption waits after the last message before it ends.
const ADOPT_QUIET: Duration = Duration::from_secs(1);
/// How long an adoption may take in all.
const ADOPT_LIMIT: Duration = Duration::from_secs(120);

/// Adopts the broker session of slot `n`, whose standby is gone: logs in
/// as it (the session and what the broker queued there come back),
/// unsubscribes it from the shared subscription (so the broker stops
/// giving it a share), ingests every message it gets into `ingest`
/// (acknowledged once stored), and logs out once nothing came for a
/// second after the unsubscription. Returns the messages taken.
pub async fn adopt(cfg: &MqttConfig, n: u32, ingest: &Ingest) -> Result<u64> {
    let login = slot_login(cfg, n);
    let mut opts = options(cfg, login.clone(), Some(login.clone()))?;
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let filters = filters(cfg.share_group.as_deref());
    let mut tasks = tokio::task::JoinSet::new();
    let (mut unsubscribed, mut taken, mut failed) = (0usize, 0u64, 0u64);
    let mut last = tokio::time::Instant::now();
    let deadline = last + ADOPT_LIMIT;
    loop {
        let polled = tokio::select! {
            p = eventloop.poll() => p,
            () = tokio::time::sleep_until(deadline) => {
                return Err(Error::Store(format!("adopting {login}: no end after {ADOPT_LIMIT:?}")));
            }
            () = tokio::time::sleep_until(last + ADOPT_QUIET),
                if unsubscribed == filters.len() && tasks.is_empty() => {
                break;
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if !matches!(done, Ok(true)) {
                    failed += 1;
                }
                continue;
            }
        };
        match polled.map_err(|e| Error::Store(format!("adopting {login}: {e}")))? {
            Event::Incoming(Packet::ConnAck(ack)) => {
                tracing::info!(
                    login = %login,
                    session_present = ack.session_present,
                    "adopting a gone standby's broker session"
                );
                for f in &filters {
                    client
                        .unsubscribe(f.clone())
                        .await
                        .map_err(|e| Error::Store(format!("adopting {login}: {e}")))?;
                }
            }
            Event::Incoming(Packet::UnsubAck(_)) => {
                unsubscribed += 1;
                last = tokio::time::Instant::now();
            }
            Event::Incoming(Packet::Publish(p)) => {
                taken += 1;
                last = tokio::time::Instant::now();
                let (c, ingest) = (client.clone(), ingest.clone());
                tasks.spawn(async move {
                    let outcome = ingest.submit(p.topic.clone(), p.payload.clone()).await;
                    if outcome == Err(Refusal::Store) {
                        return false;
                    }
                    c.ack(&p).await.is_ok()
                });
            }
            _ => {}
        }
    }
    // A message not stored stays in the session: adopted again later.
    if failed > 0 {
        return Err(Error::Store(format!(
            "adopting {login}: {failed} messages not stored"
        )));
    }
    // The acknowledgements are queued before the DISCONNECT: poll until
    // it is out.
    client
        .disconnect()
        .await
        .map_err(|e| Error::Store(format!("adopting {login}: {e}")))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    Ok(taken)
}

async fn run(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    ingest: Ingest,
    filters: Vec<String>,
    shutdown: CancellationToken,
) -> Result<()> {
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0u32;
    // Messages in the store pipeline at once (their acks pending).
    let window = Arc::new(Semaphore::new(1000));
    loop {
        let polled = tokio::select! {
            p = eventloop.poll() => p,
            () = shutdown.cancelled() => return Ok(()),
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the external MQTT broker"
                );
                let all = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if client.try_subscribe_many(all).is_err() {
                    tracing::error!("cannot queue the subscriptions");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    tracing::error!(
                        refused,
                        "the broker refused subscriptions to the device topics"
                    );
                } else {
                    tracing::info!("subscribed to the device topics");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(permit) = window.clone().acquire_owned().await else {
                    return Ok(());
                };
                let (c, ingest) = (client.clone(), ingest.clone());
                // Off the event loop: store, then acknowledge. The permit
                // bounds the store pipeline only: it is released before
                // the ack, whose queue this loop drains. Holding it over
                // the ack deadlocked the loop once the request queue was
                // full (of acks and notices): no more reads, no pings, and
                // the broker dropped the session for its keep-alive
                // (fleet-scale.sh at 10k devices on mosquitto).
                tokio::spawn(async move {
                    let outcome = ingest.submit(p.topic.clone(), p.payload.clone()).await;
                    drop(permit);
                    if outcome != Err(Refusal::Store) {
                        // Stored, or refused for good (counted): ack either way.
                        let _ = c.ack(&p).await;
                    }
                });
            }
            Ok(_) => {}
            Err(e) => {
                let wait = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "external MQTT broker connection lost");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_shared_filters() {
        assert_eq!(split_url("mqtt://b:1884").unwrap(), ("b".into(), 1884));
        assert_eq!(split_url("mqtt://b").unwrap(), ("b".into(), 1883));
        assert!(split_url("http://b").is_err());
        assert_eq!(
            filters(Some("fleet"))[1],
            "$share/fleet/edgefleet/v1/+/telemetry"
        );
        assert_eq!(filters(None)[0], "edgefleet/v1/+/state");
    }
}

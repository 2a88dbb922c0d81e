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

/// Connects; returns the publishing client and the loop that ingests
/// until `shutdown`.
pub fn start(
    cfg: &MqttConfig,
    client_id: String,
    ingest: Ingest,
    shutdown: CancellationToken,
) -> Result<(Client, impl Future<Output = Result<()>> + use<>)> {
    let url = cfg
        .url
        .clone()
        .ok_or_else(|| Error::Usage("[mqtt] embedded = false needs url".into()))?;
    let (host, port) = split_url(&url)?;
    let mut opts = MqttOptions::new(client_id, host, port);
    if let Some(u) = &cfg.username {
        opts.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    // A persistent session and manual acks: unacknowledged messages are
    // the broker's to redeliver.
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_inflight(1000);
    let (client, eventloop) = AsyncClient::new(opts, 4096);
    let filters = filters(cfg.share_group.as_deref());
    let c = client.clone();
    let run = run(c, eventloop, ingest, filters, shutdown);
    Ok((Client { client }, run))
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
                for f in &filters {
                    if client.try_subscribe(f.clone(), QoS::AtLeastOnce).is_err() {
                        tracing::error!(filter = %f, "cannot queue a subscription");
                    }
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

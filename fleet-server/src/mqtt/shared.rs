//! The ingest shared by replicas on an external broker (`[mqtt]
//! share_group` with `ingest_slots`; docs/brokers.md, "Replicas").
//!
//! - A **standby** claims a slot in the store, logs in to the broker as
//!   that slot (`fleet-server-1`, …: a session of its own, persistent)
//!   and takes its share of the shared subscription: each message goes
//!   to the store's inbox and is acknowledged once committed there.
//! - The **active server** subscribes as before (`fleet-server`), and
//!   applies the inbox in order ([`drain`]): a message leaves the inbox
//!   only once its writes are committed (or it is refused for good).
//! - The broker keeps giving a share to a slot whose standby died (its
//!   persistent session queues them). The active server **adopts** such
//!   a session ([`adopt`]): a slot in use whose lock no standby holds is
//!   logged in to, unsubscribed, emptied into the ingest, and freed.
//!
//! A standby that becomes active leaves its slot the same way: it stops
//! taking messages, lets go of the slot, and adopts its own session.
//!
//! The inbox also carries the device reports standbys answer over HTTP
//! (`$edgefleet/report/{device}`, docs/deploy.md "Standbys answer device
//! calls"): the active server drains it on every shared store, with or
//! without MQTT.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::error::{Error, Result};
use crate::ingest::{Ingest, IngestMetrics, Refusal, Source};
use crate::store::Store;

/// Inbox messages applied at once at most.
const DRAIN_BATCH: usize = 2048;
/// How often the active server looks at an empty inbox.
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// How often the active server looks for slots to adopt.
const ADOPT_EVERY: Duration = Duration::from_secs(2);
/// How often a standby without a slot tries again.
const CLAIM_EVERY: Duration = Duration::from_secs(5);
/// How often a standby checks that it still holds its slot.
const SLOT_CHECK: Duration = Duration::from_secs(1);

/// The active server's counters of the shared ingest.
#[derive(Debug, Default)]
pub struct SharedMetrics {
    /// Inbox messages applied (or refused for good) and removed.
    pub applied: AtomicU64,
    /// Of those, device reports a standby took over HTTP and applied here.
    pub reports: AtomicU64,
    /// Slot sessions adopted, and the messages taken from them.
    pub adoptions: AtomicU64,
    pub adopted_messages: AtomicU64,
    pub adoption_failures: AtomicU64,
}

/// Sleeps `d`; false if `stop` came first.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stop.cancelled() => false,
    }
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(s.as_ref()))
        .await
        .map_err(|e| Error::Store(e.to_string()))?
}

/// The active server: applies the standbys' inbox through `ingest`, in
/// the order they stored it, until `stop`.
pub async fn drain(
    store: Arc<dyn Store>,
    ingest: Ingest,
    m: Arc<SharedMetrics>,
    stop: CancellationToken,
) -> Result<()> {
    loop {
        let rows = match blocking(&store, |s| s.inbox_take(DRAIN_BATCH)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared ingest's inbox");
                Vec::new()
            }
        };
        if rows.is_empty() {
            if pause(DRAIN_IDLE, &stop).await {
                continue;
            }
            return Ok(());
        }
        // Queued in order (one batch of the ingest, mostly), then awaited.
        let outcomes = futures_util::future::join_all(rows.iter().map(|r| {
            ingest.submit_from(
                Source::Inbox,
                r.topic.clone(),
                bytes::Bytes::from(r.payload.clone()),
            )
        }))
        .await;
        let reports = rows
            .iter()
            .zip(&outcomes)
            .filter(|(r, o)| o.is_ok() && r.topic.starts_with(crate::ingest::REPORT_TOPIC))
            .count() as u64;
        let done: Vec<i64> = rows
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o != Err(Refusal::Store))
            .map(|(r, _)| r.id)
            .collect();
        let n = done.len() as u64;
        let stored = done.len() == rows.len();
        if let Err(e) = blocking(&store, move |s| s.inbox_done(&done)).await {
            // Applied again later: at least once, as from the broker.
            tracing::warn!(error = %e, "cannot empty the shared ingest's inbox");
        } else {
            m.applied.fetch_add(n, Relaxed);
            m.reports.fetch_add(reports, Relaxed);
        }
        if !stored && !pause(Duration::from_secs(1), &stop).await {
            return Ok(());
        }
    }
}

/// The active server: adopts the broker session of every slot in use
/// whose standby is gone, until `stop`.
pub async fn adopt(
    cfg: MqttConfig,
    store: Arc<dyn Store>,
    ingest: Ingest,
    m: Arc<SharedMetrics>,
    stop: CancellationToken,
) -> Result<()> {
    loop {
        match blocking(&store, |s| s.orphaned_ingest_slots()).await {
            Ok(slots) => {
                for n in slots {
                    let r = tokio::select! {
                        r = super::external::adopt(&cfg, n, &ingest) => r,
                        () = stop.cancelled() => return Ok(()),
                    };
                    let drained = match r {
                        Ok(taken) => {
                            tracing::info!(
                                slot = n,
                                taken,
                                "adopted a gone standby's broker session"
                            );
                            m.adoptions.fetch_add(1, Relaxed);
                            m.adopted_messages.fetch_add(taken, Relaxed);
                            true
                        }
                        Err(e) => {
                            tracing::warn!(slot = n, error = %e, "cannot adopt a gone standby's broker session; trying again");
                            m.adoption_failures.fetch_add(1, Relaxed);
                            false
                        }
                    };
                    if let Err(e) =
                        blocking(&store, move |s| s.ingest_slot_adopted(n, drained)).await
                    {
                        tracing::warn!(slot = n, error = %e, "cannot mark an ingest slot adopted");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for ingest slots to adopt"),
        }
        if !pause(ADOPT_EVERY, &stop).await {
            return Ok(());
        }
    }
}

/// A standby's share: claims a slot (retrying while all are taken),
/// ingests into the inbox while it holds the slot's lock, and claims
/// again when it lost it; until `stop`. Each time it lets go of the slot,
/// whose session the active server then adopts.
pub async fn standby(
    cfg: MqttConfig,
    store: Arc<dyn Store>,
    holder: String,
    metrics: Arc<std::sync::Mutex<Option<Arc<IngestMetrics>>>>,
    stop: CancellationToken,
) {
    let m = Arc::new(IngestMetrics::default());
    if let Ok(mut shown) = metrics.lock() {
        *shown = Some(m.clone());
    }
    while let Some(slot) = claim(&cfg, &store, &holder, &stop).await {
        share(&cfg, &store, slot, m.clone(), &stop).await;
    }
}

/// A free slot, claimed; `None` once `stop`.
async fn claim(
    cfg: &MqttConfig,
    store: &Arc<dyn Store>,
    holder: &str,
    stop: &CancellationToken,
) -> Option<u32> {
    loop {
        if stop.is_cancelled() {
            return None;
        }
        let (s, h) = (cfg.ingest_slots, holder.to_string());
        match blocking(store, move |st| st.claim_ingest_slot(s, &h)).await {
            Ok(Some(n)) => return Some(n),
            Ok(None) => tracing::warn!(
                slots = cfg.ingest_slots,
                "standby: every shared-ingest slot is taken ([mqtt] ingest_slots); not ingesting"
            ),
            Err(e) => tracing::warn!(error = %e, "standby: cannot claim a shared-ingest slot"),
        }
        if !pause(CLAIM_EVERY, stop).await {
            return None;
        }
    }
}

/// Takes slot `slot`'s share into the inbox until `stop`, or until the
/// slot's lock is gone (its database session broke: the active server
/// may be adopting the slot already); then lets go of the slot.
async fn share(
    cfg: &MqttConfig,
    store: &Arc<dyn Store>,
    slot: u32,
    m: Arc<IngestMetrics>,
    stop: &CancellationToken,
) {
    let login = super::external::slot_login(cfg, slot);
    tracing::info!(slot, %login, "standby: taking a share of the device messages into the inbox");
    let inner = stop.child_token();
    let (ingest, worker) =
        Ingest::start_inbox(store.clone(), slot, m, cfg.ingest_queue, inner.clone());
    match super::external::start_slot(cfg, slot, ingest, inner.clone()) {
        Ok(run) => {
            let worker = tokio::spawn(worker);
            let run = tokio::spawn(run);
            loop {
                tokio::select! {
                    () = inner.cancelled() => break,
                    () = tokio::time::sleep(SLOT_CHECK) => {}
                }
                let held = blocking(store, |s| Ok(s.holds_ingest_slot()))
                    .await
                    .unwrap_or(false);
                if !held {
                    tracing::warn!(
                        slot,
                        "standby: lost its ingest slot's lock (database session); stops taking messages"
                    );
                    break;
                }
            }
            inner.cancel();
            let _ = run.await;
            let _ = worker.await;
        }
        Err(e) => {
            tracing::error!(error = %e, "standby: cannot take a share of the device messages");
            pause(CLAIM_EVERY, stop).await;
        }
    }
    // Whatever the broker gave this session and it did not acknowledge
    // stays there, for the adoption.
    if let Err(e) = blocking(store, |s| s.leave_ingest_slot()).await {
        tracing::warn!(error = %e, "standby: cannot let go of its ingest slot");
    }
}

//! Device messages from MQTT into the inventory: decode, check, apply to
//! memory, commit in batches, then acknowledge.
//!
//! Whoever takes a message from a device (the embedded broker, or the
//! server's client of an external broker) hands it to [`Ingest::submit`]
//! and acknowledges it to the device (PUBACK) only when the returned
//! future resolves: by then the message is in the store. The queue is
//! bounded, so a burst larger than the store can take slows the devices'
//! publishing down instead of losing what was acknowledged. Messages that
//! cannot be used are refused with a reason and counted.
//!
//! On a shared store the active server also applies what standbys took
//! and stored in the inbox ([`crate::mqtt::shared::drain`]): their share of
//! the MQTT messages, and device reports (`POST /api/v1/device/report`) a
//! standby answered, under [`REPORT_TOPIC`], which only that path accepts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use edgefleet_wire::telemetry::{
    DeviceEvent, DeviceState, Telemetry, TopicKind, decode_telemetry, parse_topic,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, lock};
use crate::store::{Part, Reported, Store, Write};
use crate::writer::Writer;

/// Largest device message accepted.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Messages applied and committed together at most.
const MAX_BATCH: usize = 2048;
/// The inbox topic of a device report a standby took (`{REPORT_TOPIC}/{device}`,
/// a [`Reported`] in JSON). `$` topics never come from a broker's clients.
pub const REPORT_TOPIC: &str = "$edgefleet/report";

/// Why a message was not used. Stable names for /metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    UnknownTopic,
    Malformed,
    TooLarge,
    UnknownDevice,
    /// The payload names another device than its topic.
    WrongDevice,
    /// The store refused the write.
    Store,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownTopic => "unknown_topic",
            Refusal::Malformed => "malformed",
            Refusal::TooLarge => "too_large",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::WrongDevice => "wrong_device",
            Refusal::Store => "store",
        }
    }
}

/// A decoded device message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    State(DeviceState),
    Telemetry(Box<Telemetry>),
    Event(DeviceEvent),
    /// A device's HTTP report, taken by a standby.
    Report(Box<Reported>),
}

/// Where a message came from: only a replica's inbox carries reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A broker (a device's or a dashboard's publish).
    Broker,
    /// A standby's inbox row.
    Inbox,
}

/// Decodes a message from `source`: a device topic, or a report from a
/// standby's inbox.
pub fn decode_from(
    source: Source,
    topic: &str,
    payload: &[u8],
) -> Result<(String, Message), Refusal> {
    let Some(device) = topic
        .strip_prefix(REPORT_TOPIC)
        .and_then(|t| t.strip_prefix('/'))
    else {
        return decode(topic, payload);
    };
    if source != Source::Inbox || device.is_empty() {
        return Err(Refusal::UnknownTopic);
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::TooLarge);
    }
    let r: Reported = serde_json::from_slice(payload).map_err(|_| Refusal::Malformed)?;
    Ok((device.to_string(), Message::Report(Box::new(r))))
}

/// Records a device's report on `d`: the reported state, and the agent
/// version in its identity when that changed. Returns the writes.
pub fn record_report(d: &mut crate::fleet::Device, id: &str, reported: Reported) -> Vec<Write> {
    let mut writes = Vec::with_capacity(2);
    // The inventory follows agent upgrades.
    if let Some(v) = &reported.report.agent_version
        && *v != d.rec.identity.agent_version
    {
        d.rec.identity.agent_version.clone_from(v);
        writes.push(Write::Device(
            id.to_string(),
            Part::Identity(d.rec.identity.clone()),
        ));
    }
    d.rec.reported = Some(reported.clone());
    writes.push(Write::Device(id.to_string(), Part::Reported(reported)));
    writes
}

/// Decodes the payload of `edgefleet/v1/{device}/{kind}`.
pub fn decode(topic: &str, payload: &[u8]) -> Result<(String, Message), Refusal> {
    let (device, kind) = parse_topic(topic).ok_or(Refusal::UnknownTopic)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::TooLarge);
    }
    let msg = match kind {
        TopicKind::State => {
            let s: DeviceState = serde_json::from_slice(payload).map_err(|_| Refusal::Malformed)?;
            if s.device_id != device {
                return Err(Refusal::WrongDevice);
            }
            Message::State(s)
        }
        TopicKind::Telemetry => Message::Telemetry(Box::new(
            decode_telemetry(payload).map_err(|_| Refusal::Malformed)?,
        )),
        TopicKind::Events => {
            Message::Event(serde_json::from_slice(payload).map_err(|_| Refusal::Malformed)?)
        }
        // Commands go to devices, never come from them.
        TopicKind::Cmd => return Err(Refusal::UnknownTopic),
    };
    Ok((device.to_string(), msg))
}

/// Applies one message to its device in memory; returns the writes that
/// make it durable.
pub fn apply(fleet: &Fleet, device: &str, msg: Message, now: u64) -> Result<Vec<Write>, Refusal> {
    let cell = fleet.get(device).ok_or(Refusal::UnknownDevice)?;
    let mut d = lock(&cell);
    if d.rec.is_revoked() {
        return Err(Refusal::UnknownDevice);
    }
    if let Message::Telemetry(t) = &msg {
        d.remember(t);
    }
    let live = &mut d.rec.live;
    let writes = match msg {
        Message::Report(r) => {
            // A report a standby stored may be applied after a newer one
            // the device made here: the device's newest word stands.
            if d.rec.reported.as_ref().is_some_and(|old| old.at > r.at) {
                return Ok(Vec::new());
            }
            record_report(&mut d, device, *r)
        }
        Message::State(s) => {
            live.online = Some(s.online);
            if s.online {
                live.at = Some(now);
            }
            live.state = Some(s);
            vec![Write::Device(device.to_string(), Part::Live(live.clone()))]
        }
        Message::Telemetry(t) => {
            live.telemetry = Some(*t);
            live.online = Some(true);
            live.at = Some(now);
            vec![Write::Device(device.to_string(), Part::Live(live.clone()))]
        }
        Message::Event(e) => {
            live.at = Some(now);
            let live = Write::Device(device.to_string(), Part::Live(live.clone()));
            // Replays after an outage may repeat an event: kept once.
            if d.rec.push_event(e.clone()) {
                vec![live, Write::DeviceEvent(device.to_string(), e)]
            } else {
                vec![live]
            }
        }
    };
    Ok(writes)
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub received: AtomicU64,
    /// Committed to the store, then acknowledged.
    pub ingested: AtomicU64,
    pub batches: AtomicU64,
    refused: Mutex<BTreeMap<Refusal, u64>>,
}

impl IngestMetrics {
    pub fn refuse(&self, r: Refusal) {
        if let Ok(mut m) = self.refused.lock() {
            *m.entry(r).or_default() += 1;
        }
    }

    pub fn refused(&self) -> BTreeMap<Refusal, u64> {
        self.refused.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The outcome given back to whoever acknowledges the message.
pub type Outcome = Result<(), Refusal>;

struct Job {
    source: Source,
    topic: String,
    payload: bytes::Bytes,
    done: oneshot::Sender<Outcome>,
}

/// The ingest queue. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Ingest {
    tx: mpsc::Sender<Job>,
    pub metrics: Arc<IngestMetrics>,
}

impl Ingest {
    /// Starts the worker; `capacity` messages may wait.
    pub fn start(
        fleet: Arc<Fleet>,
        writer: Writer,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> (Ingest, impl Future<Output = crate::error::Result<()>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let metrics = Arc::new(IngestMetrics::default());
        let worker = run(fleet, writer, rx, metrics.clone(), shutdown);
        (Ingest { tx, metrics }, worker)
    }

    /// Queues a broker's message (waiting for room: backpressure) and
    /// resolves once it is durable or refused. `Err(Store)` also when the
    /// server stops.
    pub async fn submit(&self, topic: String, payload: bytes::Bytes) -> Outcome {
        self.submit_from(Source::Broker, topic, payload).await
    }

    /// [`Ingest::submit`] for a message from `source`.
    pub async fn submit_from(
        &self,
        source: Source,
        topic: String,
        payload: bytes::Bytes,
    ) -> Outcome {
        self.metrics.received.fetch_add(1, Relaxed);
        let (done, wait) = oneshot::channel();
        if self
            .tx
            .send(Job {
                source,
                topic,
                payload,
                done,
            })
            .await
            .is_err()
        {
            return Err(Refusal::Store);
        }
        wait.await.unwrap_or(Err(Refusal::Store))
    }

    /// A standby's ingest: each batch goes to the shared store's inbox as
    /// it came (from broker slot `slot`), for the active server to apply;
    /// resolved once committed there.
    pub fn start_inbox(
        store: Arc<dyn Store>,
        slot: u32,
        metrics: Arc<IngestMetrics>,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> (Ingest, impl Future<Output = crate::error::Result<()>>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let worker = run_inbox(store, slot, rx, metrics.clone(), shutdown);
        (Ingest { tx, metrics }, worker)
    }

    /// Messages waiting.
    pub fn backlog(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

async fn run(
    fleet: Arc<Fleet>,
    writer: Writer,
    mut rx: mpsc::Receiver<Job>,
    m: Arc<IngestMetrics>,
    shutdown: CancellationToken,
) -> crate::error::Result<()> {
    while let Some(jobs) = next_batch(&mut rx, &shutdown).await {
        let now = edgefleet_wire::time::unix_now();
        let mut writes = Vec::with_capacity(jobs.len());
        let mut waiting = Vec::with_capacity(jobs.len());
        for j in jobs {
            match decode_from(j.source, &j.topic, &j.payload)
                .and_then(|(dev, msg)| apply(&fleet, &dev, msg, now))
            {
                Ok(w) => {
                    writes.extend(w);
                    waiting.push(j.done);
                }
                Err(r) => {
                    m.refuse(r);
                    tracing::debug!(topic = %j.topic, reason = r.as_str(), "refused a device message");
                    let _ = j.done.send(Err(r));
                }
            }
        }
        if waiting.is_empty() {
            continue;
        }
        let outcome = writer.commit(writes).await.map_err(|e| {
            tracing::error!(error = %e, "cannot store device messages");
            Refusal::Store
        });
        settle(&m, waiting, outcome);
    }
    Ok(())
}

/// The next batch of waiting messages (at least one, waiting for it);
/// `None` once stopped.
async fn next_batch(
    rx: &mut mpsc::Receiver<Job>,
    shutdown: &CancellationToken,
) -> Option<Vec<Job>> {
    let first = tokio::select! {
        j = rx.recv() => j?,
        () = shutdown.cancelled() => return None,
    };
    let mut jobs = vec![first];
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// Counts a committed (or failed) batch and tells each message's waiter.
fn settle(m: &IngestMetrics, waiting: Vec<oneshot::Sender<Outcome>>, outcome: Outcome) {
    m.batches.fetch_add(1, Relaxed);
    if outcome.is_ok() {
        m.ingested.fetch_add(waiting.len() as u64, Relaxed);
    } else {
        for _ in &waiting {
            m.refuse(Refusal::Store);
        }
    }
    for w in waiting {
        let _ = w.send(outcome);
    }
}

async fn run_inbox(
    store: Arc<dyn Store>,
    slot: u32,
    mut rx: mpsc::Receiver<Job>,
    m: Arc<IngestMetrics>,
    shutdown: CancellationToken,
) -> crate::error::Result<()> {
    while let Some(jobs) = next_batch(&mut rx, &shutdown).await {
        // The active server decodes and checks them; only what cannot be
        // a device message is refused here.
        let mut batch = Vec::with_capacity(jobs.len());
        let mut waiting = Vec::with_capacity(jobs.len());
        for j in jobs {
            if j.payload.len() > MAX_PAYLOAD {
                m.refuse(Refusal::TooLarge);
                let _ = j.done.send(Err(Refusal::TooLarge));
                continue;
            }
            batch.push((j.topic, j.payload.to_vec()));
            waiting.push(j.done);
        }
        if waiting.is_empty() {
            continue;
        }
        let s = store.clone();
        let outcome = tokio::task::spawn_blocking(move || s.inbox_push(slot, &batch))
            .await
            .map_err(|e| crate::error::Error::Store(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot store device messages in the inbox");
                Refusal::Store
            });
        settle(&m, waiting, outcome);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeviceRecord, Identity};

    fn fleet() -> Fleet {
        let f = Fleet::default();
        f.insert(DeviceRecord::enrolled(
            "pi-1".into(),
            Identity {
                tags: Default::default(),
                arch: "aarch64".into(),
                agent_version: "0.1.0".into(),
                credential_sha256: "c".into(),
                enrolled_at: 1,
                enrolled_with: None,
                revoked_at: None,
                broker_password: None,
            },
        ));
        f
    }

    #[test]
    fn refusals_have_reasons() {
        assert_eq!(
            decode("other/topic", b"{}").unwrap_err(),
            Refusal::UnknownTopic
        );
        assert_eq!(
            decode("edgefleet/v1/pi-1/cmd", b"{}").unwrap_err(),
            Refusal::UnknownTopic
        );
        assert_eq!(
            decode("edgefleet/v1/pi-1/telemetry", b"{nope").unwrap_err(),
            Refusal::Malformed
        );
        assert_eq!(
            decode(
                "edgefleet/v1/pi-1/state",
                br#"{"device_id":"pi-2","online":true,"at":1}"#
            )
            .unwrap_err(),
            Refusal::WrongDevice
        );
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            decode("edgefleet/v1/pi-1/events", &big).unwrap_err(),
            Refusal::TooLarge
        );
        let (dev, msg) = decode("edgefleet/v1/ghost/events", br#"{"at":1,"event":"x"}"#).unwrap();
        assert_eq!(
            apply(&fleet(), &dev, msg, 5).unwrap_err(),
            Refusal::UnknownDevice
        );
    }

    #[test]
    fn reports_come_only_from_the_inbox_and_the_newest_one_stands() {
        let f = fleet();
        let payload = |at: u64, version: &str| {
            serde_json::to_vec(&serde_json::json!({
                "report": {"active": null, "staged": null, "last_failed": null,
                           "state": "idle", "reason": null, "agent_version": version},
                "at": at,
            }))
            .unwrap()
        };
        let topic = format!("{REPORT_TOPIC}/pi-1");
        // A broker's client can never pass for a standby's inbox.
        assert_eq!(
            decode_from(Source::Broker, &topic, &payload(5, "0.2.0")).unwrap_err(),
            Refusal::UnknownTopic
        );
        assert_eq!(
            decode_from(
                Source::Inbox,
                &format!("{REPORT_TOPIC}/"),
                &payload(5, "0.2.0")
            )
            .unwrap_err(),
            Refusal::UnknownTopic
        );
        assert_eq!(
            decode_from(Source::Inbox, &topic, b"{").unwrap_err(),
            Refusal::Malformed
        );
        let (dev, msg) = decode_from(Source::Inbox, &topic, &payload(5, "0.2.0")).unwrap();
        let writes = apply(&f, &dev, msg, 9).unwrap();
        assert!(
            matches!(
                writes.as_slice(),
                [
                    Write::Device(_, Part::Identity(_)),
                    Write::Device(_, Part::Reported(_))
                ]
            ),
            "the agent version and the report: {writes:?}"
        );
        // An older report applied late changes nothing.
        let (dev, msg) = decode_from(Source::Inbox, &topic, &payload(4, "0.1.5")).unwrap();
        assert!(apply(&f, &dev, msg, 10).unwrap().is_empty());
        let cell = f.get("pi-1").unwrap();
        let d = lock(&cell);
        assert_eq!(d.rec.identity.agent_version, "0.2.0");
        assert_eq!(d.rec.reported.as_ref().map(|r| r.at), Some(5));
        // The inbox carries the MQTT share too.
        drop(d);
        let (dev, msg) = decode_from(
            Source::Inbox,
            "edgefleet/v1/pi-1/events",
            br#"{"at":1,"event":"x"}"#,
        )
        .unwrap();
        assert_eq!(apply(&f, &dev, msg, 11).unwrap().len(), 2);
    }

    #[test]
    fn events_are_kept_once_and_state_sets_online() {
        let f = fleet();
        let ev = br#"{"at":1,"event":"committed"}"#;
        let (dev, msg) = decode("edgefleet/v1/pi-1/events", ev).unwrap();
        assert_eq!(apply(&f, &dev, msg.clone(), 5).unwrap().len(), 2);
        assert_eq!(apply(&f, &dev, msg, 6).unwrap().len(), 1, "a replay");
        let (dev, msg) = decode(
            "edgefleet/v1/pi-1/state",
            br#"{"device_id":"pi-1","online":false,"at":1}"#,
        )
        .unwrap();
        apply(&f, &dev, msg, 7).unwrap();
        let cell = f.get("pi-1").unwrap();
        let d = lock(&cell);
        assert_eq!(d.rec.live.online, Some(false));
        assert_eq!(d.rec.events.len(), 1);
    }
}

//! The write-behind path: every durable change goes through one thread
//! that takes the queued [`Write`]s in batches, keeps only the last write
//! of each device part, and commits each batch as one store transaction.
//!
//! Callers that promise durability to someone (a 204 to a device report, a
//! PUBACK to a device's MQTT message) wait for their batch's commit; the
//! queue is bounded, so a slow disk pushes back on them instead of growing
//! memory. A batch that fails on I/O (a full disk) is retried until it
//! commits; a write refused by the store's rules (a conflicting bundle
//! claim) is dropped and its caller told why.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use edgefleet_wire::backoff::Backoff;
use edgefleet_wire::prom::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::store::{Store, Write};

/// Writes in one batch at most.
pub const MAX_BATCH: usize = 4096;

/// Why a write did not commit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The store refused it (e.g. a name claimed by another bundle).
    #[error("refused by the store: {0}")]
    Refused(String),
    /// The writer stopped (shutdown).
    #[error("the store writer has stopped")]
    Stopped,
}

struct Job {
    writes: Vec<Write>,
    ack: Option<oneshot::Sender<Result<(), WriteError>>>,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct WriterMetrics {
    pub batches: AtomicU64,
    pub writes: AtomicU64,
    /// Writes superseded by a later write of the same device part in the
    /// same batch.
    pub coalesced: AtomicU64,
    pub failures: AtomicU64,
    pub refused: AtomicU64,
    pub queued: AtomicU64,
    pub commit_seconds: Histogram,
}

/// The handle to the writer thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    pub metrics: Arc<WriterMetrics>,
}

impl Writer {
    /// Starts the writer thread on `store`; at most `capacity` jobs wait.
    pub fn start(
        store: Arc<dyn Store>,
        capacity: usize,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let metrics = Arc::new(WriterMetrics::default());
        let m = metrics.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(store, rx, m))?;
        Ok((Writer { tx, metrics }, handle))
    }

    /// Queues `writes` and waits until they are durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        if writes.is_empty() {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.metrics.queued.fetch_add(1, Relaxed);
        self.tx
            .send(Job {
                writes,
                ack: Some(ack),
            })
            .await
            .map_err(|_| WriteError::Stopped)?;
        done.await.map_err(|_| WriteError::Stopped)?
    }

    /// Queues `writes` without waiting for the commit (only for room in
    /// the queue): for changes whose loss in a crash costs nothing that
    /// the next write does not restore.
    pub async fn submit(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.metrics.queued.fetch_add(1, Relaxed);
        self.tx
            .send(Job { writes, ack: None })
            .await
            .map_err(|_| WriteError::Stopped)
    }

    /// Jobs waiting for the writer.
    pub fn backlog(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Keeps the last write of each device part; everything else in order.
fn coalesce(writes: Vec<Write>) -> (Vec<Write>, u64) {
    let mut last: HashMap<(String, u8), usize> = HashMap::new();
    for (i, w) in writes.iter().enumerate() {
        if let Write::Device(id, p) = w {
            last.insert((id.clone(), p.kind()), i);
        }
    }
    let before = writes.len();
    let kept: Vec<Write> = writes
        .into_iter()
        .enumerate()
        .filter(|(i, w)| match w {
            Write::Device(id, p) => last.get(&(id.clone(), p.kind())) == Some(i),
            _ => true,
        })
        .map(|(_, w)| w)
        .collect();
    let dropped = (before - kept.len()) as u64;
    (kept, dropped)
}

const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

/// How long the writer waits for more jobs once it has one (group commit):
/// a trickle of 1,000 messages a second then costs ~1/LINGER flushes a
/// second instead of 1,000, for a few ms of latency.
const LINGER: Duration = Duration::from_millis(10);

fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Job>, m: Arc<WriterMetrics>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].writes.len();
        let until = Instant::now() + LINGER;
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.writes.len();
                    jobs.push(j);
                }
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_micros(500));
                }
                Err(_) => break,
            }
        }
        m.queued.fetch_sub(jobs.len() as u64, Relaxed);
        commit_jobs(store.as_ref(), jobs, &m);
    }
}

/// Commits `jobs` as one batch; on a refusal, finds the refused jobs by
/// committing them one by one. I/O failures are retried until they pass.
fn commit_jobs(store: &dyn Store, jobs: Vec<Job>, m: &WriterMetrics) {
    let all: Vec<Write> = jobs.iter().flat_map(|j| j.writes.iter().cloned()).collect();
    match commit_retrying(store, all, m) {
        Ok(()) => {
            for j in jobs {
                if let Some(a) = j.ack {
                    let _ = a.send(Ok(()));
                }
            }
        }
        Err(_) if jobs.len() > 1 => {
            for j in jobs {
                commit_jobs(store, vec![j], m);
            }
        }
        Err(reason) => {
            m.refused.fetch_add(1, Relaxed);
            tracing::warn!(%reason, "the store refused a write");
            for j in jobs {
                if let Some(a) = j.ack {
                    let _ = a.send(Err(WriteError::Refused(reason.clone())));
                }
            }
        }
    }
}

/// `Err` only for a refusal by the store's rules; I/O is retried.
fn commit_retrying(store: &dyn Store, writes: Vec<Write>, m: &WriterMetrics) -> Result<(), String> {
    let (writes, coalesced) = coalesce(writes);
    m.coalesced.fetch_add(coalesced, Relaxed);
    let mut attempt = 0u32;
    let mut last_log: Option<Instant> = None;
    loop {
        let t0 = Instant::now();
        match store.commit(&writes) {
            Ok(()) => {
                m.commit_seconds.observe(t0.elapsed());
                m.batches.fetch_add(1, Relaxed);
                m.writes.fetch_add(writes.len() as u64, Relaxed);
                if attempt > 0 {
                    tracing::info!(attempts = attempt + 1, "the store accepts writes again");
                }
                return Ok(());
            }
            Err(Error::Conflict(reason) | Error::Fenced(reason)) => return Err(reason),
            Err(e) => {
                m.failures.fetch_add(1, Relaxed);
                // One line per minute, not one per retry.
                if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::error!(error = %e, writes = writes.len(), "store commit failed; retrying (writers wait)");
                    last_log = Some(Instant::now());
                }
                std::thread::sleep(RETRY.delay(attempt));
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Live, Part};

    fn live(id: &str, at: u64) -> Write {
        Write::Device(
            id.into(),
            Part::Live(Live {
                at: Some(at),
                ..Live::default()
            }),
        )
    }

    #[test]
    fn coalescing_keeps_the_last_write_of_each_part_in_order() {
        let (kept, dropped) = coalesce(vec![live("a", 1), live("b", 1), live("a", 2)]);
        assert_eq!(dropped, 1);
        assert_eq!(kept, vec![live("b", 1), live("a", 2)]);
    }

    #[tokio::test]
    async fn commits_wait_for_durability_and_refusals_are_isolated() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sled::SledStore::open(dir.path()).unwrap());
        let (w, _thread) = Writer::start(store.clone(), 16).unwrap();
        let b = |id: &str| crate::store::BundleRecord {
            id: id.into(),
            name: "cls".into(),
            version: "1.0.0".into(),
            sequence: 1,
            size: 1,
            format: "onnx".into(),
            targets: vec![],
            expires_at: 1,
            uploaded_at: 1,
            uploaded_by: "t".into(),
        };
        w.commit(vec![Write::Bundle(b("aa"))]).await.unwrap();
        // Many jobs at once, one of them refused: only that one fails.
        let mut waits = Vec::new();
        for i in 0..50 {
            let w = w.clone();
            let write = if i == 25 {
                Write::Bundle(b("bb"))
            } else {
                live(&format!("d{i}"), i)
            };
            waits.push(tokio::spawn(async move { w.commit(vec![write]).await }));
        }
        let mut refused = 0;
        for (i, h) in waits.into_iter().enumerate() {
            match h.await.unwrap() {
                Ok(()) => assert_ne!(i, 25),
                Err(WriteError::Refused(r)) => {
                    assert_eq!(i, 25);
                    assert!(r.contains("already bundle aa"), "{r}");
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(refused, 1);
        assert_eq!(store.load().unwrap().bundles.len(), 1);
    }
}

//! The update driver against a store that fails its writes (a full disk, a
//! broken sled): no effect of a step may run before that step's record is
//! durable, and everything resumes once the store writes again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edge_agent::config::AgentConfig;
use edge_agent::engine::{Engine, EngineConfig};
use edge_agent::error::AgentError;
use edge_agent::floor::FloorFile;
use edge_agent::metrics::Metrics;
use edge_agent::store::{OutboxRecord, PushOutcome, RecordClass, SledStore, Store};
use edge_agent::trust::TrustState;
use edge_agent::update::{Event, Lifecycle, Phase, Record, Target};
use edge_agent::updater::{Ctx, Notice, RECORD_KEY, Slots, Status, Updater, system_clock};
use edgefleet_wire::device::{BundleRef, UpdateState};
use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::verify::TrustRoot;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A real sled store whose writes fail while `failing` is set, like a full
/// disk; it counts the recoveries the driver asks for.
struct FaultyStore {
    inner: SledStore,
    failing: AtomicBool,
    recoveries: AtomicU64,
}

impl FaultyStore {
    fn check(&self) -> Result<(), AgentError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(AgentError::Store(
                "injected: No space left on device".into(),
            ));
        }
        Ok(())
    }
}

impl Store for FaultyStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, AgentError> {
        self.inner.get(key)
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<(), AgentError> {
        self.check()?;
        self.inner.put(key, value)
    }
    fn put_lazy(&self, key: &str, value: &[u8]) -> Result<(), AgentError> {
        self.check()?;
        self.inner.put_lazy(key, value)
    }
    fn remove(&self, key: &str) -> Result<(), AgentError> {
        self.check()?;
        self.inner.remove(key)
    }
    fn outbox_push(
        &self,
        class: RecordClass,
        topic: &str,
        payload: &[u8],
        cap_bytes: u64,
        protect: u64,
    ) -> Result<PushOutcome, AgentError> {
        self.check()?;
        self.inner
            .outbox_push(class, topic, payload, cap_bytes, protect)
    }
    fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxRecord>, AgentError> {
        self.inner.outbox_after(after, limit)
    }
    fn outbox_remove(&self, seq: u64) -> Result<(), AgentError> {
        self.check()?;
        self.inner.outbox_remove(seq)
    }
    fn outbox_depth(&self) -> (u64, u64) {
        self.inner.outbox_depth()
    }
    fn recover(&self, _error: &AgentError) {
        self.recoveries.fetch_add(1, Ordering::SeqCst);
    }
}

fn sideload_target() -> Target {
    Target {
        bundle: BundleRef {
            id: "ab".repeat(32),
            name: "cls".into(),
            version: "1.0.1".into(),
            sequence: 1,
        },
        // No download path and no file in the slots: the download effect
        // refuses it at once, which makes it easy to see whether it ran.
        download: None,
        rollback: false,
        rollout_id: None,
        watch: None,
        shadow: None,
        window: None,
    }
}

fn stored_record(store: &FaultyStore) -> Option<Record> {
    store
        .inner
        .get(RECORD_KEY)
        .unwrap()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_persist_runs_no_effect_until_the_record_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        data_dir: dir.path().to_path_buf(),
        ..AgentConfig::default()
    };
    let store = Arc::new(FaultyStore {
        inner: SledStore::open(&dir.path().join("store")).unwrap(),
        failing: AtomicBool::new(false),
        recoveries: AtomicU64::new(0),
    });
    let ctx = Ctx {
        cfg: Arc::new(cfg),
        store: store.clone(),
        floor: FloorFile::new(dir.path()),
        slots: Slots::new(dir.path()).unwrap(),
        engine: Engine::start(EngineConfig::default(), Arc::new(Metrics::default())).unwrap(),
        trust: Arc::new(
            TrustState::with_root(
                TrustRoot::new([signing_key_from_seed([1; 32]).verifying_key()], 1).unwrap(),
                dir.path(),
            )
            .unwrap(),
        ),
        client: Arc::new(OnceLock::new()),
        clock: system_clock(),
        activation: Arc::new(edge_agent::updater::hold::Activation::new(
            &AgentConfig::default().update,
            system_clock(),
        )),
    };
    let (status_tx, mut status_rx) = watch::channel(Status::default());
    let (notice_tx, mut notices) = mpsc::unbounded_channel::<Notice>();
    let (desired_tx, desired_rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let updater = Updater::new(ctx, Record::default(), status_tx, notice_tx);
    let run = tokio::spawn(updater.run(None, desired_rx, stop.clone()));

    // Boot is written while the store works.
    tokio::time::timeout(Duration::from_secs(5), status_rx.wait_for(|s| s.step >= 1))
        .await
        .unwrap()
        .unwrap();
    let before = stored_record(&store).unwrap();
    assert_eq!(before.phase, Phase::Idle);

    // The disk fills; a sideload arrives.
    store.failing.store(true, Ordering::SeqCst);
    desired_tx.send(sideload_target()).await.unwrap();
    let held = tokio::time::timeout(
        Duration::from_secs(5),
        status_rx.wait_for(|s| s.store_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    // Reports tell the truth: the machine moved on...
    assert_eq!(held.record.phase.state(), UpdateState::Downloading);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // ...but nothing acted on it: no notice, no download (which would have
    // refused the missing file at once), and the disk still has the old record.
    assert!(
        notices.try_recv().is_err(),
        "an effect ran before its record was written"
    );
    assert_eq!(
        status_rx.borrow().record.phase.state(),
        UpdateState::Downloading
    );
    assert_eq!(stored_record(&store).unwrap(), before);
    assert!(
        store.recoveries.load(Ordering::SeqCst) >= 2,
        "the driver retries and asks the store to recover"
    );

    // Space again: the held step is written, then its effects run.
    store.failing.store(false, Ordering::SeqCst);
    let mut seen = Vec::new();
    while !seen.contains(&Lifecycle::Rejected) {
        let n = tokio::time::timeout(Duration::from_secs(15), notices.recv())
            .await
            .expect("the held effects never ran")
            .unwrap();
        seen.push(n.event);
    }
    assert_eq!(seen[0], Lifecycle::DownloadStarted);
    let after = stored_record(&store).unwrap();
    assert_eq!(after.phase.state(), UpdateState::Failed);
    assert!(
        after.reason.as_deref().unwrap().contains("missing"),
        "{after:?}"
    );
    stop.cancel();
    run.await.unwrap();
}

#[test]
fn apply_returns_no_effects_when_the_record_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultyStore {
        inner: SledStore::open(&dir.path().join("store")).unwrap(),
        failing: AtomicBool::new(true),
        recoveries: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let ctx = Ctx {
        cfg: Arc::new(AgentConfig::default()),
        store: store.clone(),
        floor: FloorFile::new(dir.path()),
        slots: Slots::new(dir.path()).unwrap(),
        engine: Engine::start(EngineConfig::default(), Arc::new(Metrics::default())).unwrap(),
        trust: Arc::new(
            TrustState::with_root(
                TrustRoot::new([signing_key_from_seed([1; 32]).verifying_key()], 1).unwrap(),
                dir.path(),
            )
            .unwrap(),
        ),
        client: Arc::new(OnceLock::new()),
        clock: system_clock(),
        activation: Arc::new(edge_agent::updater::hold::Activation::new(
            &AgentConfig::default().update,
            system_clock(),
        )),
    };
    let (status_tx, status_rx) = watch::channel(Status::default());
    let (notice_tx, _notices) = mpsc::unbounded_channel::<Notice>();
    let mut u = Updater::new(ctx, Record::default(), status_tx, notice_tx);
    let err = u
        .apply(Event::Desired(Some(sideload_target())))
        .unwrap_err();
    assert!(err.to_string().contains("No space"), "{err}");
    assert!(status_rx.borrow().store_error.is_some());
    assert!(store.inner.get(RECORD_KEY).unwrap().is_none());
}

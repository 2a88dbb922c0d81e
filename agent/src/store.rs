//! Local state behind a small [`Store`] trait, with sled as the default
//! (FACTS.md: pinned 0.34.7, flushed after every write that matters,
//! corruption on open treated as recoverable). It holds the update record,
//! the download offset and the MQTT outbox. The anti-rollback floor lives
//! in its own fsynced file ([`crate::floor`]), the credential too.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::AgentError;

/// What an outbox record is; telemetry is dropped first when full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordClass {
    Event = 0,
    Telemetry = 1,
}

/// One queued MQTT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Monotonic across restarts: publish order.
    pub seq: u64,
    pub class: RecordClass,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The outcome of [`Store::outbox_push`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushOutcome {
    pub seq: u64,
    /// Records dropped to make room (oldest telemetry first).
    pub dropped_telemetry: u64,
    pub dropped_events: u64,
}

/// What the store has been through, for reports and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Set while the store cannot write (a full disk, an I/O error):
    /// `insufficient_space: …` or `store_io_error: …`. Cleared by the next
    /// successful write.
    pub condition: Option<String>,
    /// Writes refused because the filesystem (or quota) was full.
    pub no_space_errors: u64,
    /// Other I/O errors.
    pub io_errors: u64,
    /// Times the store was reopened after an error.
    pub reopens: u64,
    /// The space reserve was given up to keep the store writable.
    pub reserve_released: bool,
    /// Where a corrupt store was moved at start (kept for inspection).
    pub moved_aside: Option<String>,
}

/// Durable local state.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, AgentError>;
    /// Durable when it returns.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), AgentError>;
    /// Not flushed: for values that are cheap to lose (a download offset
    /// behind the file is re-read from the file).
    fn put_lazy(&self, key: &str, value: &[u8]) -> Result<(), AgentError>;
    fn remove(&self, key: &str) -> Result<(), AgentError>;

    /// Appends to the outbox, dropping old records beyond `cap_bytes`
    /// (never the record `protect`, which is being published).
    fn outbox_push(
        &self,
        class: RecordClass,
        topic: &str,
        payload: &[u8],
        cap_bytes: u64,
        protect: u64,
    ) -> Result<PushOutcome, AgentError>;
    /// Up to `limit` records with `seq > after`, in order.
    fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxRecord>, AgentError>;
    fn outbox_remove(&self, seq: u64) -> Result<(), AgentError>;
    /// (records, bytes) queued.
    fn outbox_depth(&self) -> (u64, u64);
    /// Called after a failed write, before it is retried: a store that
    /// stays broken after an I/O error (sled does) reopens itself here.
    fn recover(&self, _error: &AgentError) {}
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }
}

/// How an error of the store is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The filesystem or quota is full: wait for space, never discard.
    NoSpace,
    /// The device or filesystem failed (EIO, read-only, permissions): the
    /// data may be fine, so it is never discarded either.
    Io,
    /// The store's own files do not parse: moved aside at open.
    Corrupt,
}

fn classify(e: &sled::Error) -> Failure {
    match e {
        sled::Error::Io(io) => classify_io(io),
        _ => Failure::Corrupt,
    }
}

fn classify_io(io: &std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    // sled wraps some OS errors in a custom error whose message is the
    // original; its kind survives.
    if io.kind() == K::StorageFull || matches!(io.raw_os_error(), Some(28 | 122)) {
        return Failure::NoSpace;
    }
    match io.kind() {
        K::InvalidData | K::UnexpectedEof => Failure::Corrupt,
        _ => Failure::Io,
    }
}

/// The open sled database.
#[derive(Debug)]
struct Db {
    db: sled::Db,
    kv: sled::Tree,
    outbox: sled::Tree,
}

/// sled, at `data_dir/store`, with a space reserve beside it.
///
/// sled stays failed after its first I/O error, and needs about one
/// segment (512 KiB) free to open at all. So the store:
/// - keeps a reserve file (`store.reserve`, default 2 MiB) it gives up
///   when the disk is full, so it can always open and write the update
///   record, and takes back once space returns;
/// - reopens itself in [`Store::recover`] after a failed write;
/// - moves itself aside only when its files are corrupt, never for a full
///   disk or an I/O error.
#[derive(Debug)]
pub struct SledStore {
    dir: PathBuf,
    reserve: PathBuf,
    reserve_bytes: u64,
    db: std::sync::RwLock<Option<Db>>,
    /// (records, bytes), kept in memory; recomputed at open.
    depth: Mutex<(u64, u64)>,
    health: Mutex<StoreHealth>,
    /// When a reopen was last tried (reopens are rate-limited).
    last_reopen: Mutex<Option<std::time::Instant>>,
}

/// Options of [`SledStore::open_with`].
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Size of the space reserve; 0 keeps none.
    pub reserve_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            reserve_bytes: 2 * 1024 * 1024,
        }
    }
}

fn store_err(path: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Store(format!("{path}: {e}"))
}

fn unavailable() -> AgentError {
    AgentError::Store("the store is not open (reopening after an error)".into())
}

fn encode(class: RecordClass, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + topic.len() + payload.len());
    v.push(class as u8);
    v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(payload);
    v
}

fn decode(seq: u64, v: &[u8]) -> Option<OutboxRecord> {
    let class = match *v.first()? {
        0 => RecordClass::Event,
        1 => RecordClass::Telemetry,
        _ => return None,
    };
    let n = u16::from_be_bytes([*v.get(1)?, *v.get(2)?]) as usize;
    let topic = std::str::from_utf8(v.get(3..3 + n)?).ok()?.to_string();
    Some(OutboxRecord {
        seq,
        class,
        topic,
        payload: v.get(3 + n..)?.to_vec(),
    })
}

/// Opens sled; a panic (sled panics on some corruptions) is corruption.
///
/// A dropped handle releases sled's file lock only when its flusher
/// thread lets go of the last reference, a moment later: a reopen in the
/// same process retries the lock for a few seconds instead of failing.
fn open_db(dir: &Path) -> Result<(Db, (u64, u64)), (Failure, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open_db_once(dir) {
            Err((_, e))
                if e.contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn open_db_once(dir: &Path) -> Result<(Db, (u64, u64)), (Failure, String)> {
    let opened = std::panic::catch_unwind(|| -> Result<_, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(4 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .open()?;
        let kv = db.open_tree("kv")?;
        let outbox = db.open_tree("outbox")?;
        let mut depth = (0u64, 0u64);
        for item in outbox.iter() {
            let (_, v) = item?;
            depth.0 += 1;
            depth.1 += v.len() as u64;
        }
        Ok((Db { db, kv, outbox }, depth))
    });
    match opened {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err((classify(&e), format!("{}: {e}", dir.display()))),
        Err(_) => Err((
            Failure::Corrupt,
            format!("{}: sled panicked while opening", dir.display()),
        )),
    }
}

/// Writes `n` zero bytes to `path` (really allocated, not sparse) and
/// syncs it.
fn write_reserve(path: &Path, n: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("reserve-tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..k])?;
            left -= k as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl SledStore {
    /// Opens the store with the default options.
    pub fn open(dir: &Path) -> Result<SledStore, AgentError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens the store.
    /// - A full disk: the reserve is given up so sled can open; the store
    ///   reports `insufficient_space` until a write succeeds again.
    /// - Corrupt files (sled reports corruption after power loss,
    ///   FACTS.md): moved aside, reported, and a fresh store created; the
    ///   device then re-reads its slots and the server.
    /// - Any other I/O error fails the start: the data may be fine.
    pub fn open_with(dir: &Path, opts: StoreOptions) -> Result<SledStore, AgentError> {
        let reserve = PathBuf::from(format!("{}.reserve", dir.display()));
        let store = SledStore {
            dir: dir.to_path_buf(),
            reserve,
            reserve_bytes: opts.reserve_bytes,
            db: std::sync::RwLock::new(None),
            depth: Mutex::new((0, 0)),
            health: Mutex::new(StoreHealth::default()),
            last_reopen: Mutex::new(None),
        };
        let mut attempt = open_db(dir);
        if let Err((Failure::NoSpace, e)) = &attempt {
            let e = e.clone();
            store.note(Failure::NoSpace, &e);
            if store.release_reserve() {
                tracing::warn!(error = %e, "disk full: gave up the space reserve to open the store");
                attempt = open_db(dir);
            }
        }
        if let Err((Failure::Corrupt, e)) = &attempt {
            let aside = PathBuf::from(format!(
                "{}.corrupt-{}",
                dir.display(),
                edgefleet_wire::time::unix_now()
            ));
            tracing::error!(error = %e, aside = %aside.display(), "store corrupt; moved aside, starting a fresh one");
            std::fs::rename(dir, &aside).map_err(|e| AgentError::io(dir, e))?;
            if let Ok(mut h) = store.health.lock() {
                h.moved_aside = Some(aside.display().to_string());
            }
            attempt = open_db(dir);
        }
        let (db, depth) = attempt.map_err(|(f, e)| match f {
            Failure::NoSpace => AgentError::NoSpace(e),
            Failure::Io | Failure::Corrupt => AgentError::Store(e),
        })?;
        if let Ok(mut d) = store.db.write() {
            *d = Some(db);
        }
        if let Ok(mut d) = store.depth.lock() {
            *d = depth;
        }
        store.restore_reserve();
        if store.reserve_bytes > 0
            && !store.reserve.exists()
            && let Ok(mut h) = store.health.lock()
        {
            // Given up before a restart, or never room for it.
            h.reserve_released = true;
        }
        Ok(store)
    }

    /// Deletes the reserve file; whether there was one.
    fn release_reserve(&self) -> bool {
        match std::fs::remove_file(&self.reserve) {
            Ok(()) => {
                if let Ok(mut h) = self.health.lock() {
                    h.reserve_released = true;
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Writes the reserve back when there is room for it and more.
    fn restore_reserve(&self) {
        if self.reserve_bytes == 0 || self.reserve.exists() {
            return;
        }
        let parent = self.reserve.parent().unwrap_or(Path::new("."));
        let free = crate::updater::slots::free_bytes(parent).unwrap_or(0);
        // Only with twice the reserve free: never the write that fills it.
        if free < self.reserve_bytes.saturating_mul(3) {
            return;
        }
        match write_reserve(&self.reserve, self.reserve_bytes) {
            Ok(()) => {
                if let Ok(mut h) = self.health.lock() {
                    if h.reserve_released {
                        tracing::info!(bytes = self.reserve_bytes, "space reserve restored");
                    }
                    h.reserve_released = false;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot write the space reserve"),
        }
    }

    /// Counts an error and sets the condition (one log line per change and
    /// at most one a minute otherwise: a full disk must not flood the log).
    fn note(&self, f: Failure, detail: &str) {
        let Ok(mut h) = self.health.lock() else {
            return;
        };
        let condition = match f {
            Failure::NoSpace => {
                h.no_space_errors += 1;
                format!("insufficient_space: the data directory's filesystem is full ({detail})")
            }
            Failure::Io | Failure::Corrupt => {
                h.io_errors += 1;
                format!("store_io_error: {detail}")
            }
        };
        let changed = h.condition.as_deref().map(|c| c.split(':').next())
            != Some(condition.split(':').next());
        h.condition = Some(condition);
        drop(h);
        if changed || LOG_LIMIT.allow() {
            tracing::error!(error = %detail, "store write failed; retrying after recovery");
        }
    }

    /// Maps a sled error (counted, logged at a bounded rate).
    fn fail(&self, what: &str, e: sled::Error) -> AgentError {
        let detail = format!("{what}: {e}");
        self.note(classify(&e), &detail);
        AgentError::Store(detail)
    }

    /// A write went through: the condition, if any, is over.
    fn ok(&self) {
        let released = match self.health.lock() {
            Ok(mut h) => {
                if h.condition.take().is_some() {
                    tracing::info!("store writes succeed again");
                }
                h.reserve_released
            }
            Err(_) => false,
        };
        // Take the reserve back once space returns (checked at most every
        // few seconds).
        if released && RESERVE_CHECK.allow() {
            self.restore_reserve();
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Db) -> Result<T, AgentError>) -> Result<T, AgentError> {
        let guard = self
            .db
            .read()
            .map_err(|_| AgentError::Invariant("store lock poisoned".into()))?;
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(unavailable()),
        }
    }

    fn flush(&self, db: &Db) -> Result<(), AgentError> {
        db.db.flush().map_err(|e| self.fail("store flush", e))?;
        self.ok();
        Ok(())
    }

    fn drop_oldest(
        &self,
        db: &Db,
        class: RecordClass,
        protect: u64,
    ) -> Result<Option<u64>, AgentError> {
        for item in db.outbox.iter() {
            let (k, v) = item.map_err(|e| self.fail("outbox", e))?;
            if v.first() == Some(&(class as u8)) && k.as_ref() != protect.to_be_bytes() {
                db.outbox.remove(&k).map_err(|e| self.fail("outbox", e))?;
                return Ok(Some(v.len() as u64));
            }
        }
        Ok(None)
    }
}

/// One store error line a minute at most, beyond condition changes.
static LOG_LIMIT: RateLimit = RateLimit::new(60);
/// How often a released reserve is retried.
static RESERVE_CHECK: RateLimit = RateLimit::new(5);

/// Allows one event per `secs` seconds.
struct RateLimit {
    secs: u64,
    last: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    const fn new(secs: u64) -> Self {
        RateLimit {
            secs,
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn allow(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = edgefleet_wire::time::unix_now();
        let last = self.last.load(Relaxed);
        now >= last.saturating_add(self.secs)
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

impl Store for SledStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, AgentError> {
        self.with(|db| {
            Ok(db
                .kv
                .get(key)
                .map_err(|e| store_err(key, e))?
                .map(|v| v.to_vec()))
        })
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<(), AgentError> {
        self.with(|db| {
            db.kv.insert(key, value).map_err(|e| self.fail(key, e))?;
            self.flush(db)
        })
    }

    fn put_lazy(&self, key: &str, value: &[u8]) -> Result<(), AgentError> {
        self.with(|db| {
            db.kv.insert(key, value).map_err(|e| self.fail(key, e))?;
            Ok(())
        })
    }

    fn remove(&self, key: &str) -> Result<(), AgentError> {
        self.with(|db| {
            db.kv.remove(key).map_err(|e| self.fail(key, e))?;
            self.flush(db)
        })
    }

    fn outbox_push(
        &self,
        class: RecordClass,
        topic: &str,
        payload: &[u8],
        cap_bytes: u64,
        protect: u64,
    ) -> Result<PushOutcome, AgentError> {
        let value = encode(class, topic, payload);
        let size = value.len() as u64;
        if size > cap_bytes {
            return Err(AgentError::Store(format!(
                "outbox record of {size} bytes exceeds the outbox cap of {cap_bytes} bytes"
            )));
        }
        self.with(|db| {
            let mut depth = self
                .depth
                .lock()
                .map_err(|_| AgentError::Invariant("outbox lock poisoned".into()))?;
            let mut out = PushOutcome::default();
            // Make room: telemetry goes first; events only when no telemetry is left.
            while depth.1 + size > cap_bytes {
                if let Some(n) = self.drop_oldest(db, RecordClass::Telemetry, protect)? {
                    out.dropped_telemetry += 1;
                    depth.0 -= 1;
                    depth.1 -= n;
                } else if class == RecordClass::Event
                    && let Some(n) = self.drop_oldest(db, RecordClass::Event, protect)?
                {
                    out.dropped_events += 1;
                    depth.0 -= 1;
                    depth.1 -= n;
                } else {
                    // Only events are queued and this is telemetry: drop it.
                    out.dropped_telemetry += 1;
                    return Ok(out);
                }
            }
            // +1: sequence 0 means "from the start" in `outbox_after`.
            let seq = db.db.generate_id().map_err(|e| self.fail("outbox", e))? + 1;
            db.outbox
                .insert(seq.to_be_bytes(), value)
                .map_err(|e| self.fail("outbox", e))?;
            depth.0 += 1;
            depth.1 += size;
            drop(depth);
            // Events must survive a crash before PUBACK; telemetry rides on the
            // periodic flush.
            if class == RecordClass::Event {
                self.flush(db)?;
            }
            out.seq = seq;
            Ok(out)
        })
    }

    fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxRecord>, AgentError> {
        self.with(|db| {
            let mut out = Vec::new();
            let start = after.saturating_add(1).to_be_bytes();
            for item in db.outbox.range(start..) {
                let (k, v) = item.map_err(|e| store_err("outbox", e))?;
                let Ok(kb) = <[u8; 8]>::try_from(k.as_ref()) else {
                    continue;
                };
                if let Some(r) = decode(u64::from_be_bytes(kb), &v) {
                    out.push(r);
                }
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn outbox_remove(&self, seq: u64) -> Result<(), AgentError> {
        self.with(|db| {
            if let Some(v) = db
                .outbox
                .remove(seq.to_be_bytes())
                .map_err(|e| self.fail("outbox", e))?
                && let Ok(mut d) = self.depth.lock()
            {
                d.0 = d.0.saturating_sub(1);
                d.1 = d.1.saturating_sub(v.len() as u64);
            }
            Ok(())
        })
    }

    fn outbox_depth(&self) -> (u64, u64) {
        self.depth.lock().map(|d| *d).unwrap_or((0, 0))
    }

    /// Reopens sled (it stays failed after an I/O error), at most once a
    /// second; on a full disk the reserve is given up first.
    fn recover(&self, _error: &AgentError) {
        let failed = self
            .health
            .lock()
            .map(|h| h.condition.clone())
            .unwrap_or(None);
        let Some(condition) = failed else {
            return;
        };
        if let Ok(mut last) = self.last_reopen.lock() {
            if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let Ok(mut slot) = self.db.write() else {
            return;
        };
        // sled holds a file lock: the old handle goes before the new one.
        drop(slot.take());
        let full = condition.starts_with("insufficient_space");
        if full && self.release_reserve() {
            tracing::warn!(
                bytes = self.reserve_bytes,
                "disk full: gave up the space reserve so the update record stays writable"
            );
        }
        match open_db(&self.dir) {
            Ok((db, depth)) => {
                *slot = Some(db);
                drop(slot);
                if let Ok(mut d) = self.depth.lock() {
                    *d = depth;
                }
                if let Ok(mut h) = self.health.lock() {
                    h.reopens += 1;
                }
                tracing::info!("store reopened");
                self.restore_reserve();
            }
            Err((f, e)) => {
                drop(slot);
                self.note(f, &e);
            }
        }
    }

    fn health(&self) -> StoreHealth {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Writes `bytes` to `path` atomically and durably, with permissions
/// `mode` from the first byte on: temp file, fsync, rename, fsync of the
/// folder.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    // A stale temp file may have other permissions: start from scratch,
    // so a secret is never readable, not even for an instant.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(&tmp, e)),
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| AgentError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| AgentError::io(&tmp, e))?;
        f.sync_all().map_err(|e| AgentError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().map_err(|e| AgentError::io(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kv_and_outbox_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store");
        {
            let s = SledStore::open(&p).unwrap();
            s.put("k", b"v").unwrap();
            for i in 0..5u8 {
                s.outbox_push(RecordClass::Event, "t/e", &[i], 1 << 20, 0)
                    .unwrap();
            }
        }
        let s = SledStore::open(&p).unwrap();
        assert_eq!(s.get("k").unwrap().unwrap(), b"v");
        let recs = s.outbox_after(0, 100).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(s.outbox_depth().0, 5);
        s.outbox_remove(recs[0].seq).unwrap();
        assert_eq!(s.outbox_after(0, 100).unwrap().len(), 4);
        assert_eq!(s.outbox_depth().0, 4);
    }

    #[test]
    fn a_full_outbox_drops_oldest_telemetry_before_any_event() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(&dir.path().join("store")).unwrap();
        let rec = |c| encode(c, "t", &[0u8; 97]).len() as u64; // 101 bytes
        let cap = rec(RecordClass::Event) * 4;
        s.outbox_push(RecordClass::Event, "t", &[1; 97], cap, 0)
            .unwrap();
        s.outbox_push(RecordClass::Telemetry, "t", &[2; 97], cap, 0)
            .unwrap();
        s.outbox_push(RecordClass::Telemetry, "t", &[3; 97], cap, 0)
            .unwrap();
        s.outbox_push(RecordClass::Event, "t", &[4; 97], cap, 0)
            .unwrap();
        // Full. An event pushes out the oldest telemetry (2), then (3).
        let o = s
            .outbox_push(RecordClass::Event, "t", &[5; 97], cap, 0)
            .unwrap();
        assert_eq!((o.dropped_telemetry, o.dropped_events), (1, 0));
        let o = s
            .outbox_push(RecordClass::Event, "t", &[6; 97], cap, 0)
            .unwrap();
        assert_eq!((o.dropped_telemetry, o.dropped_events), (1, 0));
        let kept: Vec<u8> = s
            .outbox_after(0, 10)
            .unwrap()
            .iter()
            .map(|r| r.payload[0])
            .collect();
        assert_eq!(kept, vec![1, 4, 5, 6]);
        // Only events left: new telemetry is dropped, a new event drops the oldest event.
        let o = s
            .outbox_push(RecordClass::Telemetry, "t", &[7; 97], cap, 0)
            .unwrap();
        assert_eq!(o.dropped_telemetry, 1);
        let o = s
            .outbox_push(RecordClass::Event, "t", &[8; 97], cap, 0)
            .unwrap();
        assert_eq!(o.dropped_events, 1);
        let kept: Vec<u8> = s
            .outbox_after(0, 10)
            .unwrap()
            .iter()
            .map(|r| r.payload[0])
            .collect();
        assert_eq!(kept, vec![4, 5, 6, 8]);
        assert_eq!(s.outbox_depth(), (4, cap));
    }

    #[test]
    fn an_unreadable_store_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(p.join("db"), vec![0xAB; 4096]).unwrap();
        let s = SledStore::open(&p).unwrap();
        s.put("k", b"v").unwrap();
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
        assert!(aside, "the corrupt store was kept for inspection");
    }

    /// A tmpfs of `mib` MiB, unmounted on drop; `None` without root.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(mib: u32) -> Option<Tmpfs> {
            use std::os::unix::fs::MetadataExt as _;
            // /proc/self belongs to the effective user.
            if std::fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
                eprintln!("SKIPPED: mounting a small tmpfs needs root (CI runs as root)");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            if !ok {
                // Root without CAP_SYS_ADMIN (some containers). CI sets
                // EDGEFLEET_REQUIRE_TMPFS=1 where it can mount, so it never skips.
                assert!(
                    std::env::var("EDGEFLEET_REQUIRE_TMPFS").is_err(),
                    "mount -t tmpfs failed and EDGEFLEET_REQUIRE_TMPFS is set"
                );
                eprintln!(
                    "SKIPPED: mount -t tmpfs is not permitted here (root without CAP_SYS_ADMIN)"
                );
                return None;
            }
            Some(Tmpfs(dir))
        }

        /// Fills the filesystem; the file is `filler`.
        fn fill(&self) -> PathBuf {
            use std::io::Write as _;
            let p = self.0.path().join("filler");
            let mut f = std::fs::File::create(&p).unwrap();
            let buf = vec![0u8; 4096];
            while f.write_all(&buf).is_ok() {}
            p
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_is_survived_reported_and_never_taken_for_corruption() {
        let Some(fs) = Tmpfs::mount(8) else { return };
        let dir = fs.0.path().join("store");
        let opts = StoreOptions {
            reserve_bytes: 2 * 1024 * 1024,
        };
        let s = SledStore::open_with(&dir, opts).unwrap();
        s.put("record", b"v1").unwrap();
        assert!(
            dir.with_extension("reserve").exists(),
            "the reserve is kept"
        );
        let filler = fs.fill();

        // Writes fail as "no space", counted, with a condition to report.
        let mut failed = None;
        for i in 0..10_000u32 {
            if let Err(e) = s.put(&format!("k{i}"), &[7u8; 1024]) {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("a write fails on a full disk");
        let h = s.health();
        assert!(h.no_space_errors >= 1, "{h:?}");
        assert!(
            h.condition
                .as_deref()
                .unwrap_or("")
                .starts_with("insufficient_space"),
            "{h:?}"
        );
        // sled stays failed until reopened; recovery gives up the reserve
        // and the update record is writable again, disk still full.
        s.recover(&e);
        s.put("record", b"v2").unwrap();
        let h = s.health();
        assert!(h.reserve_released && h.reopens == 1, "{h:?}");
        assert_eq!(h.condition, None, "{h:?}");

        // A restart on the still-full disk opens the same store: nothing
        // is moved aside, the record is there.
        drop(s);
        let s = SledStore::open_with(&dir, opts).unwrap();
        assert_eq!(s.get("record").unwrap().unwrap(), b"v2");
        assert_eq!(s.health().moved_aside, None);
        let aside = std::fs::read_dir(fs.0.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
        assert!(!aside, "a full disk is not corruption");

        // Space returns: the reserve is taken back.
        std::fs::remove_file(filler).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !dir.with_extension("reserve").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "reserve not restored: {:?}, {} bytes free",
                s.health(),
                crate::updater::slots::free_bytes(fs.0.path()).unwrap()
            );
            s.put("record", b"v3").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(!s.health().reserve_released);
    }

    #[test]
    fn write_atomic_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("floor.json");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
    }
}

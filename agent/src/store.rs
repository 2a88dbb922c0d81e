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
}

/// sled, at `data_dir/store`.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    kv: sled::Tree,
    outbox: sled::Tree,
    /// (records, bytes), kept in memory; recomputed at open.
    depth: Mutex<(u64, u64)>,
}

fn store_err(path: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Store(format!("{path}: {e}"))
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

impl SledStore {
    /// Opens the store. A store that cannot be opened (sled reports
    /// corruption after power loss, FACTS.md) is moved aside and a fresh
    /// one created: the device then re-reads its slots and the server.
    pub fn open(dir: &Path) -> Result<SledStore, AgentError> {
        // sled may panic rather than report some corruptions.
        let first = std::panic::catch_unwind(|| Self::open_once(dir)).unwrap_or_else(|_| {
            Err(AgentError::Store(format!(
                "{}: sled panicked while opening",
                dir.display()
            )))
        });
        match first {
            Ok(s) => Ok(s),
            Err(e) => {
                let aside = PathBuf::from(format!(
                    "{}.corrupt-{}",
                    dir.display(),
                    edgefleet_wire::time::unix_now()
                ));
                tracing::error!(error = %e, aside = %aside.display(), "store unreadable; starting a fresh one");
                std::fs::rename(dir, &aside).map_err(|e| AgentError::io(dir, e))?;
                Self::open_once(dir)
            }
        }
    }

    fn open_once(dir: &Path) -> Result<SledStore, AgentError> {
        let p = dir.display().to_string();
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(4 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| store_err(&p, e))?;
        let kv = db.open_tree("kv").map_err(|e| store_err(&p, e))?;
        let outbox = db.open_tree("outbox").map_err(|e| store_err(&p, e))?;
        let mut depth = (0u64, 0u64);
        for item in outbox.iter() {
            let (_, v) = item.map_err(|e| store_err(&p, e))?;
            depth.0 += 1;
            depth.1 += v.len() as u64;
        }
        Ok(SledStore {
            db,
            kv,
            outbox,
            depth: Mutex::new(depth),
        })
    }

    fn flush(&self) -> Result<(), AgentError> {
        self.db.flush().map_err(|e| store_err("store flush", e))?;
        Ok(())
    }

    fn drop_oldest(&self, class: RecordClass, protect: u64) -> Result<Option<u64>, AgentError> {
        for item in self.outbox.iter() {
            let (k, v) = item.map_err(|e| store_err("outbox", e))?;
            if v.first() == Some(&(class as u8)) && k.as_ref() != protect.to_be_bytes() {
                self.outbox.remove(&k).map_err(|e| store_err("outbox", e))?;
                return Ok(Some(v.len() as u64));
            }
        }
        Ok(None)
    }
}

impl Store for SledStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self
            .kv
            .get(key)
            .map_err(|e| store_err(key, e))?
            .map(|v| v.to_vec()))
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<(), AgentError> {
        self.kv.insert(key, value).map_err(|e| store_err(key, e))?;
        self.flush()
    }

    fn put_lazy(&self, key: &str, value: &[u8]) -> Result<(), AgentError> {
        self.kv.insert(key, value).map_err(|e| store_err(key, e))?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), AgentError> {
        self.kv.remove(key).map_err(|e| store_err(key, e))?;
        self.flush()
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
        let mut depth = self
            .depth
            .lock()
            .map_err(|_| AgentError::Invariant("outbox lock poisoned".into()))?;
        let mut out = PushOutcome::default();
        // Make room: telemetry goes first; events only when no telemetry is left.
        while depth.1 + size > cap_bytes {
            if let Some(n) = self.drop_oldest(RecordClass::Telemetry, protect)? {
                out.dropped_telemetry += 1;
                depth.0 -= 1;
                depth.1 -= n;
            } else if class == RecordClass::Event
                && let Some(n) = self.drop_oldest(RecordClass::Event, protect)?
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
        let seq = self.db.generate_id().map_err(|e| store_err("outbox", e))? + 1;
        self.outbox
            .insert(seq.to_be_bytes(), value)
            .map_err(|e| store_err("outbox", e))?;
        depth.0 += 1;
        depth.1 += size;
        drop(depth);
        // Events must survive a crash before PUBACK; telemetry rides on the
        // periodic flush.
        if class == RecordClass::Event {
            self.flush()?;
        }
        out.seq = seq;
        Ok(out)
    }

    fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxRecord>, AgentError> {
        let mut out = Vec::new();
        let start = after.saturating_add(1).to_be_bytes();
        for item in self.outbox.range(start..) {
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
    }

    fn outbox_remove(&self, seq: u64) -> Result<(), AgentError> {
        if let Some(v) = self
            .outbox
            .remove(seq.to_be_bytes())
            .map_err(|e| store_err("outbox", e))?
            && let Ok(mut d) = self.depth.lock()
        {
            d.0 = d.0.saturating_sub(1);
            d.1 = d.1.saturating_sub(v.len() as u64);
        }
        Ok(())
    }

    fn outbox_depth(&self) -> (u64, u64) {
        self.depth.lock().map(|d| *d).unwrap_or((0, 0))
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

//! Persistent state of the fleet server behind a [`Store`] trait, with sled
//! as the embedded default. Records are JSON so they stay readable and can
//! gain fields. Bundle files themselves live on disk, content-addressed
//! (see [`crate::registry`]).

use std::collections::BTreeMap;
use std::path::Path;

use edgefleet_wire::device::{BundleRef, DeviceReport};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rollout::Rollout;

/// A bundle in the registry: stored as the API shows it.
pub type BundleRecord = edgefleet_wire::api::v1::BundleView;

/// A device in the inventory. `report` is what the device last said it
/// runs: the source of truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub arch: String,
    pub agent_version: String,
    /// sha256 of the device credential, hex. The credential itself is never stored.
    pub credential_sha256: String,
    pub enrolled_at: u64,
    pub last_seen: Option<u64>,
    pub desired: Option<BundleRef>,
    pub desired_rollout: Option<String>,
    /// The desired bundle is an explicit rollback (abort) to one the device ran.
    #[serde(default)]
    pub desired_rollback: bool,
    pub report: Option<DeviceReport>,
    /// From MQTT: the retained state (birth/death), the last telemetry
    /// record and the most recent lifecycle events.
    #[serde(default)]
    pub online: Option<bool>,
    #[serde(default)]
    pub mqtt_state: Option<edgefleet_wire::telemetry::DeviceState>,
    #[serde(default)]
    pub telemetry: Option<edgefleet_wire::telemetry::Telemetry>,
    #[serde(default)]
    pub events: Vec<edgefleet_wire::telemetry::DeviceEvent>,
}

impl DeviceRecord {
    /// A device as enrollment creates it: known to the server, nothing
    /// desired, reported or heard over MQTT yet.
    pub fn enrolled(
        id: String,
        tags: BTreeMap<String, String>,
        arch: String,
        agent_version: String,
        credential_sha256: String,
        at: u64,
    ) -> DeviceRecord {
        DeviceRecord {
            id,
            tags,
            arch,
            agent_version,
            credential_sha256,
            enrolled_at: at,
            last_seen: Some(at),
            desired: None,
            desired_rollout: None,
            desired_rollback: false,
            report: None,
            online: None,
            mqtt_state: None,
            telemetry: None,
            events: Vec::new(),
        }
    }
}

pub use edgefleet_wire::api::v1::AuditEntry;

/// Storage operations the server needs. Implementations must make every
/// `put` durable before returning.
pub trait Store: Send + Sync + 'static {
    fn get_bundle(&self, id: &str) -> Result<Option<BundleRecord>>;
    fn find_bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>>;
    /// Inserts a bundle unless one with the same name and version exists;
    /// returns the existing record in that case.
    fn insert_bundle(&self, rec: &BundleRecord) -> Result<Option<BundleRecord>>;
    fn list_bundles(&self) -> Result<Vec<BundleRecord>>;
    fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>>;
    /// Enrolls a new device; returns `false` (and writes nothing) when a
    /// device with that id exists.
    fn insert_device(&self, d: &DeviceRecord) -> Result<bool>;
    /// Read-modify-write of one device record, atomic against every other
    /// writer: HTTP reports, MQTT ingest, the rollout controller and
    /// operators all touch the same record, and a plain get-then-put would
    /// let one of them silently undo another's change. `change` may run more
    /// than once (on a lost race) and returns whether to write. It must not
    /// change the id or the credential. Returns the record as stored, or
    /// `None` for an unknown device.
    fn update_device(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord) -> bool,
    ) -> Result<Option<DeviceRecord>>;
    fn list_devices(&self) -> Result<Vec<DeviceRecord>>;
    fn device_by_credential(&self, credential_sha256: &str) -> Result<Option<DeviceRecord>>;
    fn append_audit(&self, e: &AuditEntry) -> Result<()>;
    fn list_audit(&self) -> Result<Vec<AuditEntry>>;
    fn get_rollout(&self, id: &str) -> Result<Option<Rollout>>;
    fn put_rollout(&self, r: &Rollout) -> Result<()>;
    fn list_rollouts(&self) -> Result<Vec<Rollout>>;
}

/// The sled-backed store (sled 0.34; FACTS.md: flush after writes that matter).
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    bundles: sled::Tree,
    bundle_names: sled::Tree,
    devices: sled::Tree,
    credentials: sled::Tree,
    audit: sled::Tree,
    rollouts: sled::Tree,
}

fn db_err(e: sled::Error) -> Error {
    Error::Store(e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Store(e.to_string()))
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Store(format!("corrupt record: {e}")))
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore> {
        let db = sled::open(path).map_err(db_err)?;
        let tree = |n: &str| db.open_tree(n).map_err(db_err);
        Ok(SledStore {
            bundles: tree("bundles")?,
            bundle_names: tree("bundle_names")?,
            devices: tree("devices")?,
            credentials: tree("credentials")?,
            audit: tree("audit")?,
            rollouts: tree("rollouts")?,
            db,
        })
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(db_err)
    }

    fn all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>> {
        tree.iter()
            .values()
            .map(|v| dec(&v.map_err(db_err)?))
            .collect()
    }
}

impl Store for SledStore {
    fn get_bundle(&self, id: &str) -> Result<Option<BundleRecord>> {
        self.bundles
            .get(id)
            .map_err(db_err)?
            .map(|v| dec(&v))
            .transpose()
    }

    fn find_bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        match self
            .bundle_names
            .get(format!("{name}@{version}"))
            .map_err(db_err)?
        {
            Some(id) => self.get_bundle(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    fn insert_bundle(&self, rec: &BundleRecord) -> Result<Option<BundleRecord>> {
        let key = format!("{}@{}", rec.name, rec.version);
        // compare_and_swap makes name@version claims race-free.
        match self
            .bundle_names
            .compare_and_swap(&key, None as Option<&[u8]>, Some(rec.id.as_bytes()))
            .map_err(db_err)?
        {
            Ok(()) => {
                self.bundles.insert(&rec.id, enc(rec)?).map_err(db_err)?;
                self.flush()?;
                Ok(None)
            }
            Err(existing) => {
                let id = existing
                    .current
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                Ok(self.get_bundle(&id)?)
            }
        }
    }

    fn list_bundles(&self) -> Result<Vec<BundleRecord>> {
        Self::all(&self.bundles)
    }

    fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices
            .get(id)
            .map_err(db_err)?
            .map(|v| dec(&v))
            .transpose()
    }

    fn insert_device(&self, d: &DeviceRecord) -> Result<bool> {
        // The credential index first: a device is only reachable by its
        // credential once its record exists, and an orphan index entry is
        // harmless (device_by_credential checks the record).
        self.credentials
            .insert(&d.credential_sha256, d.id.as_bytes())
            .map_err(db_err)?;
        let claimed = self
            .devices
            .compare_and_swap(&d.id, None as Option<&[u8]>, Some(enc(d)?))
            .map_err(db_err)?
            .is_ok();
        if !claimed {
            self.credentials
                .remove(&d.credential_sha256)
                .map_err(db_err)?;
        }
        self.flush()?;
        Ok(claimed)
    }

    fn update_device(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord) -> bool,
    ) -> Result<Option<DeviceRecord>> {
        loop {
            let Some(old) = self.devices.get(id).map_err(db_err)? else {
                return Ok(None);
            };
            let mut d: DeviceRecord = dec(&old)?;
            let (id_before, credential_before) = (d.id.clone(), d.credential_sha256.clone());
            if !change(&mut d) {
                return Ok(Some(d));
            }
            if d.id != id_before || d.credential_sha256 != credential_before {
                return Err(Error::Store(format!(
                    "device {id}: an update may not change the id or the credential"
                )));
            }
            // Another writer got in between: read again and redo the change.
            if self
                .devices
                .compare_and_swap(id, Some(old), Some(enc(&d)?))
                .map_err(db_err)?
                .is_ok()
            {
                self.flush()?;
                return Ok(Some(d));
            }
        }
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>> {
        Self::all(&self.devices)
    }

    fn device_by_credential(&self, credential_sha256: &str) -> Result<Option<DeviceRecord>> {
        match self.credentials.get(credential_sha256).map_err(db_err)? {
            Some(id) => {
                let d = self.get_device(&String::from_utf8_lossy(&id))?;
                // A re-enrolled device has a new credential; the old one is dead.
                Ok(d.filter(|d| d.credential_sha256 == credential_sha256))
            }
            None => Ok(None),
        }
    }

    fn append_audit(&self, e: &AuditEntry) -> Result<()> {
        let key = self.db.generate_id().map_err(db_err)?.to_be_bytes();
        self.audit.insert(key, enc(e)?).map_err(db_err)?;
        self.flush()
    }

    fn list_audit(&self) -> Result<Vec<AuditEntry>> {
        Self::all(&self.audit)
    }

    fn get_rollout(&self, id: &str) -> Result<Option<Rollout>> {
        self.rollouts
            .get(id)
            .map_err(db_err)?
            .map(|v| dec(&v))
            .transpose()
    }

    fn put_rollout(&self, r: &Rollout) -> Result<()> {
        self.rollouts.insert(&r.id, enc(r)?).map_err(db_err)?;
        self.flush()
    }

    fn list_rollouts(&self) -> Result<Vec<Rollout>> {
        Self::all(&self.rollouts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, credential: &str) -> DeviceRecord {
        DeviceRecord::enrolled(
            id.into(),
            BTreeMap::new(),
            "aarch64".into(),
            "0.1.0".into(),
            credential.into(),
            1,
        )
    }

    #[test]
    fn concurrent_updates_of_one_device_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        assert!(store.insert_device(&device("pi-1", "c1")).unwrap());
        // Four writers (think: HTTP report, MQTT ingest, controller,
        // operator) each add their own keys to the same record.
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let key = format!("w{w}-{i}");
                        let stored = store
                            .update_device("pi-1", &mut |d| {
                                d.tags.insert(key.clone(), "x".into());
                                true
                            })
                            .unwrap();
                        assert!(stored.unwrap().tags.contains_key(&key));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let d = store.get_device("pi-1").unwrap().unwrap();
        assert_eq!(d.tags.len(), 200, "lost updates: {:?}", d.tags.keys());
    }

    #[test]
    fn updates_refuse_unknown_devices_and_identity_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert!(
            store
                .update_device("ghost", &mut |_| true)
                .unwrap()
                .is_none()
        );
        assert!(store.insert_device(&device("pi-1", "c1")).unwrap());
        let err = store
            .update_device("pi-1", &mut |d| {
                d.credential_sha256 = "stolen".into();
                true
            })
            .unwrap_err();
        assert!(err.to_string().contains("credential"), "{err}");
        // A change that asks not to be written is not written.
        store
            .update_device("pi-1", &mut |d| {
                d.arch = "armv7".into();
                false
            })
            .unwrap();
        assert_eq!(store.get_device("pi-1").unwrap().unwrap().arch, "aarch64");
    }

    #[test]
    fn a_second_enrollment_under_one_id_is_refused_and_its_credential_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert!(store.insert_device(&device("pi-1", "first")).unwrap());
        assert!(!store.insert_device(&device("pi-1", "second")).unwrap());
        assert!(store.device_by_credential("second").unwrap().is_none());
        assert_eq!(
            store.device_by_credential("first").unwrap().unwrap().id,
            "pi-1"
        );
    }
}

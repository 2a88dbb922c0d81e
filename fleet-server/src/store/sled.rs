//! The embedded store: sled 0.34.7 (FACTS.md: the last stable release,
//! flushed after every batch). Everything lives in one tree with prefixed
//! keys, so a batch of writes is one atomic `apply_batch` and one flush.
//!
//! Keys: `b/{id}` bundle, `n/{name}@{version}` its claim, `d/{id}/{i|d|r|l}`
//! device parts, `e/{id}` its events, `r/{id}` rollout, `x/{id}`
//! experiment, `t/{name}` enrollment token, `a/{seq}` audit entry. Values are JSON, readable and
//! able to gain fields.
//!
//! Stores written by edgefleet 0.1 (one tree per record type, whole device
//! records) are migrated into this layout the first time they are opened.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use edgefleet_wire::telemetry::DeviceEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    AuditEntry, Desired, DeviceRecord, EVENTS_KEPT, Identity, Live, Part, Reported, Snapshot,
    Store, Write,
};
use crate::error::{Error, Result};
use crate::rollout::Rollout;

/// The sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    audit_seq: AtomicU64,
}

fn db_err(e: sled::Error) -> Error {
    Error::Store(e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Store(e.to_string()))
}

fn dec<T: DeserializeOwned>(key: &[u8], b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| {
        Error::Store(format!(
            "corrupt record {}: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

const AUDIT_SEQ: &[u8] = b"m/audit_seq";

fn part_key(id: &str, p: &Part) -> String {
    let c = match p {
        Part::Identity(_) => 'i',
        Part::Desired(_) => 'd',
        Part::Reported(_) => 'r',
        Part::Live(_) => 'l',
    };
    format!("d/{id}/{c}")
}

fn part_value(p: &Part) -> Result<Vec<u8>> {
    match p {
        Part::Identity(v) => enc(v),
        Part::Desired(v) => enc(v),
        Part::Reported(v) => enc(v),
        Part::Live(v) => enc(v),
    }
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(db_err)?;
        let tree = db.open_tree("v2").map_err(db_err)?;
        let seq = match tree.get(AUDIT_SEQ).map_err(db_err)? {
            Some(v) => {
                let mut b = [0u8; 8];
                if v.len() == 8 {
                    b.copy_from_slice(&v);
                }
                u64::from_be_bytes(b)
            }
            None => 0,
        };
        let s = SledStore {
            db,
            tree,
            audit_seq: AtomicU64::new(seq),
        };
        s.migrate_v1()?;
        Ok(s)
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        self.tree
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                dec(&k, &v)
            })
            .collect()
    }

    fn events_of(&self, id: &str) -> Result<VecDeque<DeviceEvent>> {
        let key = format!("e/{id}");
        match self.tree.get(&key).map_err(db_err)? {
            Some(v) => dec(key.as_bytes(), &v),
            None => Ok(VecDeque::new()),
        }
    }

    /// Moves an edgefleet 0.1 store (trees `bundles`, `bundle_names`,
    /// `devices`, `audit`, `rollouts`) into this layout, once.
    fn migrate_v1(&self) -> Result<()> {
        let names = self.db.tree_names();
        if !names.iter().any(|n| n.as_ref() == b"devices") || !self.tree.is_empty() {
            return Ok(());
        }
        let open = |n: &str| self.db.open_tree(n).map_err(db_err);
        let (bundles, devices, audit, rollouts) = (
            open("bundles")?,
            open("devices")?,
            open("audit")?,
            open("rollouts")?,
        );
        let mut batch = Vec::new();
        for kv in bundles.iter() {
            let (k, v) = kv.map_err(db_err)?;
            batch.push(Write::Bundle(dec(&k, &v)?));
        }
        // Rollouts kept what each device ran before joining; devices keep it now.
        let mut joined: HashMap<String, super::Joined> = HashMap::new();
        for kv in rollouts.iter() {
            let (k, v) = kv.map_err(db_err)?;
            let mut r: serde_json::Value = dec(&k, &v)?;
            let previous = r
                .get_mut("previous")
                .map(serde_json::Value::take)
                .unwrap_or_default();
            let r: Rollout = serde_json::from_value(r)
                .map_err(|e| Error::Store(format!("migrating rollout: {e}")))?;
            if let Ok(prev) = serde_json::from_value::<
                BTreeMap<String, Option<edgefleet_wire::device::BundleRef>>,
            >(previous)
            {
                for (dev, p) in prev {
                    joined.insert(
                        dev,
                        super::Joined {
                            rollout: r.id.clone(),
                            previous: p,
                        },
                    );
                }
            }
            batch.push(Write::Rollout(Box::new(r)));
        }
        for kv in devices.iter() {
            let (k, v) = kv.map_err(db_err)?;
            let old: v1::Device = dec(&k, &v)?;
            let mut rec = DeviceRecord::enrolled(
                old.id.clone(),
                Identity {
                    tags: old.tags,
                    arch: old.arch,
                    agent_version: old.agent_version,
                    credential_sha256: old.credential_sha256,
                    enrolled_at: old.enrolled_at,
                    enrolled_with: None,
                    revoked_at: None,
                    broker_password: None,
                },
            );
            rec.desired = Desired {
                bundle: old.desired,
                rollout: old.desired_rollout.clone(),
                rollback: old.desired_rollback,
                joined: joined.remove(&old.id),
                recent: Vec::new(),
            };
            let seen = old.last_seen.unwrap_or(old.enrolled_at);
            rec.reported = old.report.map(|report| Reported { report, at: seen });
            rec.live = Live {
                online: old.online,
                state: old.mqtt_state,
                telemetry: old.telemetry,
                at: Some(seen),
            };
            rec.events = old.events.into_iter().collect();
            batch.push(Write::NewDevice(Box::new(rec)));
        }
        for kv in audit.iter() {
            let (k, v) = kv.map_err(db_err)?;
            batch.push(Write::Audit(dec(&k, &v)?));
        }
        let n = batch.len();
        self.commit(&batch)?;
        tracing::info!(
            records = n,
            "migrated an edgefleet 0.1 store to the v2 layout"
        );
        Ok(())
    }
}

/// The 0.1 device record, for the migration.
mod v1 {
    use std::collections::BTreeMap;

    use edgefleet_wire::device::{BundleRef, DeviceReport};
    use edgefleet_wire::telemetry::{DeviceEvent, DeviceState, Telemetry};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct Device {
        pub id: String,
        pub tags: BTreeMap<String, String>,
        pub arch: String,
        pub agent_version: String,
        pub credential_sha256: String,
        pub enrolled_at: u64,
        pub last_seen: Option<u64>,
        pub desired: Option<BundleRef>,
        pub desired_rollout: Option<String>,
        #[serde(default)]
        pub desired_rollback: bool,
        pub report: Option<DeviceReport>,
        #[serde(default)]
        pub online: Option<bool>,
        #[serde(default)]
        pub mqtt_state: Option<DeviceState>,
        #[serde(default)]
        pub telemetry: Option<Telemetry>,
        #[serde(default)]
        pub events: Vec<DeviceEvent>,
    }
}

impl Store for SledStore {
    fn load(&self) -> Result<Snapshot> {
        let mut snap = Snapshot {
            bundles: self.scan("b/")?,
            rollouts: self.scan("r/")?,
            enrollment_tokens: self.scan("t/")?,
            trust: self.scan("k/")?,
            experiments: self.scan("x/")?,
            windows: self.scan("w/")?,
            devices: Vec::new(),
        };
        // d/{id}/{part}: parts of one device are adjacent.
        let mut parts: BTreeMap<String, (Option<Identity>, Desired, Option<Reported>, Live)> =
            BTreeMap::new();
        for kv in self.tree.scan_prefix("d/") {
            let (k, v) = kv.map_err(db_err)?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let Some((id, part)) = key
                .strip_prefix("d/")
                .and_then(|rest| rest.rsplit_once('/'))
            else {
                continue;
            };
            let entry = parts.entry(id.to_string()).or_default();
            match part {
                "i" => entry.0 = Some(dec(&k, &v)?),
                "d" => entry.1 = dec(&k, &v)?,
                "r" => entry.2 = Some(dec(&k, &v)?),
                "l" => entry.3 = dec(&k, &v)?,
                _ => {}
            }
        }
        for (id, (identity, desired, reported, live)) in parts {
            // Parts without an identity are leftovers of a removed device.
            let Some(identity) = identity else { continue };
            let events = self.events_of(&id)?;
            snap.devices.push(DeviceRecord {
                id,
                identity,
                desired,
                reported,
                live,
                events,
            });
        }
        Ok(snap)
    }

    fn commit(&self, writes: &[Write]) -> Result<()> {
        let mut batch = sled::Batch::default();
        // Read-modify-write state of this batch (later writes see earlier ones).
        let mut names: HashMap<String, String> = HashMap::new();
        let mut events: HashMap<String, VecDeque<DeviceEvent>> = HashMap::new();
        let mut seq = self.audit_seq.load(Ordering::SeqCst);
        let put = |b: &mut sled::Batch, k: String, v: Vec<u8>| b.insert(k.as_bytes(), v);
        for w in writes {
            match w {
                Write::Bundle(b) => {
                    let claim = format!("n/{}@{}", b.name, b.version);
                    let existing = match names.get(&claim) {
                        Some(id) => Some(id.clone()),
                        None => self
                            .tree
                            .get(&claim)
                            .map_err(db_err)?
                            .map(|v| String::from_utf8_lossy(&v).into_owned()),
                    };
                    match existing {
                        Some(id) if id != b.id => {
                            return Err(Error::Conflict(format!(
                                "{} {} is already bundle {id}",
                                b.name, b.version
                            )));
                        }
                        _ => {}
                    }
                    names.insert(claim.clone(), b.id.clone());
                    put(&mut batch, claim, b.id.as_bytes().to_vec());
                    put(&mut batch, format!("b/{}", b.id), enc(b)?);
                }
                Write::Rollout(r) => put(&mut batch, format!("r/{}", r.id), enc(r)?),
                Write::Experiment(e) => put(&mut batch, format!("x/{}", e.id), enc(e)?),
                Write::Window(scope, Some(schedule)) => {
                    let entry = edgefleet_wire::api::v1::WindowEntry {
                        scope: scope.clone(),
                        schedule: schedule.clone(),
                    };
                    put(&mut batch, format!("w/{scope}"), enc(&entry)?);
                }
                Write::Window(scope, None) => {
                    batch.remove(format!("w/{scope}").as_bytes());
                }
                Write::Audit(a) => {
                    seq += 1;
                    put(&mut batch, format!("a/{seq:016x}"), enc(a)?);
                }
                Write::NewDevice(d) => {
                    let id = &d.id;
                    for p in [
                        Part::Identity(d.identity.clone()),
                        Part::Desired(d.desired.clone()),
                        Part::Live(d.live.clone()),
                    ]
                    .into_iter()
                    .chain(d.reported.clone().map(Part::Reported))
                    {
                        put(&mut batch, part_key(id, &p), part_value(&p)?);
                    }
                    events.insert(id.clone(), d.events.clone());
                    put(&mut batch, format!("e/{id}"), enc(&d.events)?);
                }
                Write::Device(id, p) => put(&mut batch, part_key(id, p), part_value(p)?),
                Write::DeviceEvent(id, e) => {
                    let ring = match events.remove(id) {
                        Some(r) => r,
                        None => self.events_of(id)?,
                    };
                    let mut ring = ring;
                    if !ring.contains(e) {
                        ring.push_back(e.clone());
                        while ring.len() > EVENTS_KEPT {
                            ring.pop_front();
                        }
                    }
                    put(&mut batch, format!("e/{id}"), enc(&ring)?);
                    events.insert(id.clone(), ring);
                }
                Write::RemoveDevice(id) => {
                    for c in ['i', 'd', 'r', 'l'] {
                        batch.remove(format!("d/{id}/{c}").as_bytes());
                    }
                    batch.remove(format!("e/{id}").as_bytes());
                    events.remove(id);
                }
                Write::EnrollmentToken(t) => put(&mut batch, format!("t/{}", t.name), enc(t)?),
                Write::Trust(doc) => {
                    // Keyed by version: scans return the chain in order.
                    let version = doc
                        .peek_unverified()
                        .map_err(|e| crate::error::Error::Store(format!("trust document: {e}")))?
                        .version;
                    put(&mut batch, format!("k/{version:020}"), enc(doc)?);
                }
            }
        }
        batch.insert(AUDIT_SEQ, &seq.to_be_bytes());
        self.tree.apply_batch(batch).map_err(db_err)?;
        self.db.flush().map_err(db_err)?;
        self.audit_seq.store(seq, Ordering::SeqCst);
        Ok(())
    }

    fn audit(&self, after: Option<u64>, limit: usize) -> Result<Vec<(u64, AuditEntry)>> {
        let start = format!("a/{:016x}", after.map_or(0, |a| a + 1));
        let mut out = Vec::new();
        for kv in self.tree.range(start.as_bytes()..b"a0".as_slice()) {
            let (k, v) = kv.map_err(db_err)?;
            let pos = std::str::from_utf8(&k[2..])
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(0);
            out.push((pos, dec(&k, &v)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn backend(&self) -> &'static str {
        "sled"
    }
}

// The Store contract tests run against sled and PostgreSQL alike:
// integ/tests/store.rs.

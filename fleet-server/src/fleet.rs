//! The device inventory in memory: every record, an index by credential,
//! and each device's desired-state document (JSON body and ETag) ready to
//! serve. Check-ins, reports and MQTT ingest read and change it without
//! touching the store; their durable writes go through [`crate::writer`].
//! A check-in costs O(1) in fleet size.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use edgefleet_wire::api::v1::{DeviceView, WindowEntry};
use edgefleet_wire::device::{DesiredState, ShadowRequest, WatchPolicy};
use edgefleet_wire::trust::SignedTrust;
use edgefleet_wire::window::Schedule;

use crate::store::{Desired, DeviceRecord};

/// A device's desired state as served: the JSON body and its ETag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredDoc {
    pub etag: String,
    pub body: Vec<u8>,
}

/// What a rollout adds to a device's desired state: the watch limits (its
/// gates, so the device rolls back on the numbers that would pause the
/// rollout), shadow mode and its maintenance windows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutTerms {
    pub watch: Option<WatchPolicy>,
    pub shadow: Option<ShadowRequest>,
    pub window: Option<Schedule>,
}

/// Maintenance windows set on devices and tags, by scope: `device:<id>`,
/// `tag:<key>=<value>`.
pub type WindowTable = BTreeMap<String, Schedule>;

/// The scope of a device's own window.
pub fn device_scope(id: &str) -> String {
    format!("device:{id}")
}

/// The window that applies to a device and where it comes from: its own,
/// then its tags' in tag order, then its rollout's.
pub fn window_for(
    table: &WindowTable,
    id: &str,
    tags: &BTreeMap<String, String>,
    rollout: Option<&Schedule>,
) -> Option<WindowEntry> {
    let own = table
        .get_key_value(&device_scope(id))
        .map(|(k, v)| (k.clone(), v));
    let tagged = || {
        tags.iter().find_map(|(k, v)| {
            let scope = format!("tag:{k}={v}");
            table.get(&scope).map(|s| (scope, s))
        })
    };
    own.or_else(tagged)
        .map(|(scope, s)| WindowEntry {
            scope,
            schedule: s.clone(),
        })
        .or_else(|| {
            rollout.map(|s| WindowEntry {
                scope: "rollout".into(),
                schedule: s.clone(),
            })
        })
}

impl DesiredDoc {
    /// The document of `d`; `window` is what [`window_for`] resolved.
    pub fn of(
        d: &Desired,
        terms: &RolloutTerms,
        trust: Option<&SignedTrust>,
        window: Option<&Schedule>,
    ) -> DesiredDoc {
        let state = DesiredState {
            download: d
                .bundle
                .as_ref()
                .map(|b| format!("/api/v1/bundles/{}/download", b.id)),
            bundle: d.bundle.clone(),
            rollout_id: d.rollout.clone(),
            rollback: d.rollback,
            // An abort's rollback is judged by the device's own limits.
            watch: terms.watch.clone().filter(|_| !d.rollback),
            shadow: terms.shadow.clone().filter(|_| !d.rollback),
            trust: trust.cloned(),
            // An abort's rollback is an emergency brake: never held.
            window: window
                .cloned()
                .filter(|_| !d.rollback && d.bundle.is_some()),
        };
        let body = serde_json::to_vec(&state).unwrap_or_else(|_| b"{}".to_vec());
        let etag = format!(
            "\"{}\"",
            &edgefleet_wire::bundle::content_address(&body)[..32]
        );
        DesiredDoc { etag, body }
    }
}

/// One device in memory.
#[derive(Debug)]
pub struct Device {
    pub rec: DeviceRecord,
    pub doc: Arc<DesiredDoc>,
    /// Recent telemetry, newest last, at most
    /// [`edgefleet_wire::api::v1::TELEMETRY_POINTS`]; in memory only (a
    /// restart starts it again; the newest record is in `rec.live`).
    pub history: std::collections::VecDeque<edgefleet_wire::api::v1::TelemetryPoint>,
}

impl Device {
    pub fn new(rec: DeviceRecord, doc: Arc<DesiredDoc>) -> Device {
        Device {
            rec,
            doc,
            history: std::collections::VecDeque::new(),
        }
    }

    /// Keeps a telemetry record's point, dropping the oldest beyond the cap.
    pub fn remember(&mut self, t: &edgefleet_wire::telemetry::Telemetry) {
        use edgefleet_wire::api::v1::{TELEMETRY_POINTS, TelemetryPoint};
        if self.history.len() >= TELEMETRY_POINTS {
            self.history.pop_front();
        }
        let secs = t.interval_secs.max(1) as f64;
        self.history.push_back(TelemetryPoint {
            at: t.at,
            model: t.model.clone(),
            inferences_per_sec: (t.inferences as f64 / secs) as f32,
            errors: u32::try_from(t.errors).unwrap_or(u32::MAX),
            p95_latency_ms: t.latency_ms.as_ref().map(|l| l.p95 as f32),
            cpu_pct: t.cpu_pct as f32,
            temperature_c: t.temperature_c.map(|c| c as f32),
            drift_psi_max: t
                .drift
                .iter()
                .map(|d| d.psi)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                .map(|v| v as f32),
        });
    }
}

/// A device's lock. Poisoning is ignored: every change to a record is
/// complete before anything that could panic.
pub type DeviceCell = Arc<Mutex<Device>>;

pub fn lock(cell: &DeviceCell) -> MutexGuard<'_, Device> {
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// The inventory.
#[derive(Debug, Default)]
pub struct Fleet {
    devices: RwLock<BTreeMap<String, DeviceCell>>,
    credentials: RwLock<HashMap<String, String>>,
    /// Bumped when devices join or leave or change tags (cohort caches).
    generation: AtomicU64,
    /// The newest trust document, part of every desired state.
    trust: RwLock<Option<Arc<SignedTrust>>>,
    /// Device and tag maintenance windows.
    windows: RwLock<Arc<WindowTable>>,
    /// Serializes changes to `windows` (read, change, commit, show).
    pub windows_lock: tokio::sync::Mutex<()>,
}

impl Fleet {
    /// The inventory as loaded; `terms` gives each device's rollout terms.
    pub fn load(
        records: Vec<DeviceRecord>,
        terms: impl Fn(Option<&str>) -> RolloutTerms,
        trust: Option<SignedTrust>,
        windows: WindowTable,
    ) -> Fleet {
        let f = Fleet {
            trust: RwLock::new(trust.map(Arc::new)),
            windows: RwLock::new(Arc::new(windows)),
            ..Fleet::default()
        };
        {
            let mut devices = f.devices.write().unwrap_or_else(|e| e.into_inner());
            let mut creds = f.credentials.write().unwrap_or_else(|e| e.into_inner());
            for rec in records {
                let doc = Arc::new(f.doc_of(&rec, &terms(rec.desired.rollout.as_deref())));
                if !rec.is_revoked() {
                    creds.insert(rec.identity.credential_sha256.clone(), rec.id.clone());
                }
                devices.insert(rec.id.clone(), Arc::new(Mutex::new(Device::new(rec, doc))));
            }
        }
        f
    }

    /// The newest trust document (none before the first rotation).
    pub fn trust_doc(&self) -> Option<Arc<SignedTrust>> {
        self.trust.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a new trust document in every desired state. Writers of a
    /// device's document read the trust document under the device's lock,
    /// after this stored it, so none keeps the old one.
    pub fn set_trust(&self, doc: SignedTrust, terms: impl Fn(Option<&str>) -> RolloutTerms) {
        *self.trust.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(doc));
        self.rebuild_all(terms);
    }

    /// The device and tag maintenance windows.
    pub fn windows(&self) -> Arc<WindowTable> {
        self.windows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the window table and every desired state it changes (as
    /// [`Fleet::set_trust`]).
    pub fn set_windows(&self, table: WindowTable, terms: impl Fn(Option<&str>) -> RolloutTerms) {
        *self.windows.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.rebuild_all(terms);
    }

    /// Rebuilds every device's document (after the rollout terms changed).
    pub fn rebuild_all(&self, terms: impl Fn(Option<&str>) -> RolloutTerms) {
        for cell in self.cells() {
            let mut d = lock(&cell);
            let t = terms(d.rec.desired.rollout.as_deref());
            self.rebuild(&mut d, &t);
        }
    }

    /// The window that applies to `rec` under `terms`, and where it is set.
    pub fn window_of(&self, rec: &DeviceRecord, terms: &RolloutTerms) -> Option<WindowEntry> {
        window_for(
            &self.windows(),
            &rec.id,
            &rec.identity.tags,
            terms.window.as_ref(),
        )
    }

    /// The document of `rec` now: its desired state, the rollout's terms,
    /// the newest trust document and its maintenance window.
    pub fn doc_of(&self, rec: &DeviceRecord, terms: &RolloutTerms) -> DesiredDoc {
        let window = self.window_of(rec, terms);
        DesiredDoc::of(
            &rec.desired,
            terms,
            self.trust_doc().as_deref(),
            window.as_ref().map(|w| &w.schedule),
        )
    }

    /// Rebuilds a device's document after its record changed; call with
    /// the device locked (see [`Fleet::set_trust`]).
    pub fn rebuild(&self, d: &mut Device, terms: &RolloutTerms) {
        d.doc = Arc::new(self.doc_of(&d.rec, terms));
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn touch_generation(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.devices.read().map(|d| d.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: &str) -> Option<DeviceCell> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The device a credential (by its sha256) belongs to.
    pub fn by_credential(&self, credential_sha256: &str) -> Option<DeviceCell> {
        let id = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(credential_sha256)
            .cloned()?;
        let cell = self.get(&id)?;
        // A revoked or re-enrolled credential is dead.
        let ok = {
            let d = lock(&cell);
            d.rec.identity.credential_sha256 == credential_sha256 && !d.rec.is_revoked()
        };
        ok.then_some(cell)
    }

    /// Adds a newly enrolled device; `false` (and nothing changes) when the
    /// id is taken.
    pub fn insert(&self, rec: DeviceRecord) -> bool {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if devices.contains_key(&rec.id) {
            return false;
        }
        self.credentials
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.identity.credential_sha256.clone(), rec.id.clone());
        let doc = Arc::new(self.doc_of(&rec, &RolloutTerms::default()));
        devices.insert(rec.id.clone(), Arc::new(Mutex::new(Device::new(rec, doc))));
        drop(devices);
        self.touch_generation();
        true
    }

    /// A standby's copy ([`crate::follow`]): the device as now stored,
    /// replacing what was held, its credential index and document with it.
    pub fn put(&self, rec: DeviceRecord, terms: &RolloutTerms) {
        let Some(cell) = self.get(&rec.id) else {
            let (id, cred, revoked) = (
                rec.id.clone(),
                rec.identity.credential_sha256.clone(),
                rec.is_revoked(),
            );
            if self.insert(rec) && revoked {
                self.forget_credential(&cred);
            }
            if let Some(cell) = self.get(&id) {
                self.rebuild(&mut lock(&cell), terms);
            }
            return;
        };
        let mut d = lock(&cell);
        let old = &d.rec.identity.credential_sha256;
        // The index is touched only when the credential changed: check-ins
        // read it while a rollout's changes stream in.
        if rec.is_revoked() && !d.rec.is_revoked() {
            self.forget_credential(old);
            self.forget_credential(&rec.identity.credential_sha256);
        } else if !rec.is_revoked() && *old != rec.identity.credential_sha256 {
            self.forget_credential(old);
            self.credentials
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(rec.identity.credential_sha256.clone(), rec.id.clone());
        }
        if d.rec.identity.tags != rec.identity.tags {
            self.touch_generation();
        }
        d.rec = rec;
        self.rebuild(&mut d, terms);
    }

    /// Forgets a device (decommissioning).
    pub fn remove(&self, id: &str) -> Option<DeviceCell> {
        let cell = self
            .devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)?;
        let cred = lock(&cell).rec.identity.credential_sha256.clone();
        self.credentials
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cred);
        self.touch_generation();
        Some(cell)
    }

    /// Drops a credential from the index (revocation).
    pub fn forget_credential(&self, credential_sha256: &str) {
        self.credentials
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(credential_sha256);
    }

    /// Every device cell, in id order (a snapshot of the index; the cells
    /// are live).
    pub fn cells(&self) -> Vec<DeviceCell> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Up to `limit` devices with ids after `cursor` that pass `keep`, in
    /// id order, and whether more follow.
    pub fn page(
        &self,
        cursor: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&DeviceRecord) -> bool,
    ) -> (Vec<DeviceView>, bool) {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let range: Box<dyn Iterator<Item = (&String, &DeviceCell)>> = match cursor {
            Some(c) => Box::new(
                devices.range::<str, _>((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)),
            ),
            None => Box::new(devices.iter()),
        };
        let mut out = Vec::new();
        for (_, cell) in range {
            let d = lock(cell);
            if !keep(&d.rec) {
                continue;
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(view(&d.rec));
        }
        (out, false)
    }
}

/// The device as operators see it (no credential hash).
pub fn view(d: &DeviceRecord) -> DeviceView {
    let report = d.report();
    DeviceView {
        id: d.id.clone(),
        tags: d.identity.tags.clone(),
        arch: d.identity.arch.clone(),
        agent_version: d.identity.agent_version.clone(),
        enrolled_at: d.identity.enrolled_at,
        last_seen: d.last_seen(),
        desired: d.desired.bundle.clone(),
        rollout: d.desired.rollout.clone(),
        active: report.and_then(|r| r.active.clone()),
        staged: report.and_then(|r| r.staged.clone()),
        last_failed: report.and_then(|r| r.last_failed.clone()),
        state: report.map(|r| r.state),
        reason: report.and_then(|r| r.reason.clone()),
        retries: report.map_or(0, |r| r.retries),
        degraded: report.and_then(|r| r.degraded.clone()),
        trust_version: report.and_then(|r| r.trust_version),
        activate_at: report
            .filter(|r| r.state == edgefleet_wire::device::UpdateState::Waiting)
            .and_then(|r| r.activate_at),
        window: None,
        health: report.map(|r| r.health.clone()),
        last_known_good: report.and_then(|r| r.last_known_good.clone()),
        shadow: report.and_then(|r| r.shadow.clone()),
        online: d.live.online,
        telemetry: d.live.telemetry.clone(),
        events: d.events.iter().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Identity;

    fn rec(id: &str, cred: &str) -> DeviceRecord {
        DeviceRecord::enrolled(
            id.into(),
            Identity {
                tags: BTreeMap::new(),
                arch: "aarch64".into(),
                agent_version: "0.1.0".into(),
                credential_sha256: cred.into(),
                enrolled_at: 1,
                enrolled_with: None,
                revoked_at: None,
                broker_password: None,
            },
        )
    }

    #[test]
    fn ids_are_claimed_once_and_credentials_find_their_device() {
        let f = Fleet::default();
        assert!(f.insert(rec("pi-1", "c1")));
        assert!(!f.insert(rec("pi-1", "c2")), "an id is claimed once");
        assert!(f.by_credential("c2").is_none());
        assert_eq!(lock(&f.by_credential("c1").unwrap()).rec.id, "pi-1");
        // Revoked: the credential is dead even before it leaves the index.
        lock(&f.get("pi-1").unwrap()).rec.identity.revoked_at = Some(5);
        assert!(f.by_credential("c1").is_none());
    }

    #[test]
    fn a_copy_takes_stored_records_with_their_credentials_and_documents() {
        let f = Fleet::default();
        let terms = RolloutTerms::default();
        // New, then re-enrolled with another credential: the old one is dead.
        f.put(rec("pi-1", "c1"), &terms);
        assert_eq!(lock(&f.by_credential("c1").unwrap()).rec.id, "pi-1");
        let before = lock(&f.get("pi-1").unwrap()).doc.etag.clone();
        let mut r = rec("pi-1", "c2");
        r.desired.rollout = Some("r1".into());
        r.desired.bundle = Some(edgefleet_wire::device::BundleRef {
            id: "b1".into(),
            name: "cls".into(),
            version: "1.0.0".into(),
            sequence: 1,
        });
        f.put(r.clone(), &terms);
        assert!(f.by_credential("c1").is_none());
        let cell = f.by_credential("c2").unwrap();
        let doc = lock(&cell).doc.clone();
        assert_ne!(doc.etag, before, "the document follows the desired state");
        assert_eq!(*doc, f.doc_of(&r, &terms));
        // Revoked: dead at once, and out of the index.
        r.identity.revoked_at = Some(9);
        f.put(r.clone(), &terms);
        assert!(f.by_credential("c2").is_none());
        assert!(!f.credentials.read().unwrap().contains_key("c2"));
        // A device first seen revoked never enters the index.
        let mut gone = rec("pi-2", "c3");
        gone.identity.revoked_at = Some(1);
        f.put(gone, &terms);
        assert!(f.get("pi-2").is_some() && f.by_credential("c3").is_none());
        assert!(!f.credentials.read().unwrap().contains_key("c3"));
    }

    #[test]
    fn pages_walk_the_fleet_in_id_order_with_filters() {
        let f = Fleet::default();
        for i in 0..25 {
            f.insert(rec(&format!("d{i:02}"), &format!("c{i}")));
        }
        let odd = |r: &DeviceRecord| r.id.ends_with(['1', '3', '5', '7', '9']);
        let (p1, more) = f.page(None, 5, odd);
        assert!(more);
        assert_eq!(p1.first().unwrap().id, "d01");
        let (p2, more) = f.page(Some(&p1.last().unwrap().id), 5, odd);
        assert!(more);
        assert_eq!(p2.first().unwrap().id, "d11");
        let (p3, more) = f.page(Some(&p2.last().unwrap().id), 5, odd);
        assert!(!more);
        assert_eq!(p3.len(), 2);
    }

    #[test]
    fn the_etag_changes_with_the_desired_state_and_only_then() {
        let mut d = Desired::default();
        let a = DesiredDoc::of(&d, &RolloutTerms::default(), None, None);
        assert_eq!(a, DesiredDoc::of(&d, &RolloutTerms::default(), None, None));
        d.rollout = Some("r1".into());
        assert_ne!(
            a.etag,
            DesiredDoc::of(&d, &RolloutTerms::default(), None, None).etag
        );
    }

    fn sched(w: &str) -> Schedule {
        Schedule {
            windows: vec![w.into()],
            time_zone: None,
        }
    }

    #[test]
    fn a_devices_window_is_its_own_then_its_tags_then_its_rollouts() {
        let mut table = WindowTable::new();
        table.insert("tag:site=berlin".into(), sched("daily 01:00-02:00"));
        table.insert("tag:board=rpi4".into(), sched("daily 03:00-04:00"));
        let tags: BTreeMap<String, String> = [
            ("board".to_string(), "rpi4".to_string()),
            ("site".to_string(), "berlin".to_string()),
        ]
        .into();
        let rollout = sched("daily 05:00-06:00");
        // Tags in key order: board before site.
        let w = window_for(&table, "d1", &tags, Some(&rollout)).unwrap();
        assert_eq!(w.scope, "tag:board=rpi4");
        table.insert(device_scope("d1"), sched("daily 07:00-08:00"));
        let w = window_for(&table, "d1", &tags, Some(&rollout)).unwrap();
        assert_eq!(
            (w.scope.as_str(), w.schedule.windows[0].as_str()),
            ("device:d1", "daily 07:00-08:00")
        );
        let w = window_for(&table, "d2", &BTreeMap::new(), Some(&rollout)).unwrap();
        assert_eq!(w.scope, "rollout");
        assert_eq!(window_for(&table, "d2", &BTreeMap::new(), None), None);
        // The document carries it, except for an abort's rollback.
        let mut d = Desired {
            bundle: Some(edgefleet_wire::device::BundleRef {
                id: "b".into(),
                name: "cls".into(),
                version: "1.0.0".into(),
                sequence: 1,
            }),
            ..Desired::default()
        };
        let doc = DesiredDoc::of(&d, &RolloutTerms::default(), None, Some(&rollout));
        let state: DesiredState = serde_json::from_slice(&doc.body).unwrap();
        assert_eq!(state.window, Some(rollout.clone()));
        d.rollback = true;
        let doc = DesiredDoc::of(&d, &RolloutTerms::default(), None, Some(&rollout));
        let state: DesiredState = serde_json::from_slice(&doc.body).unwrap();
        assert_eq!(state.window, None);
    }
}

//! A standby's copy of the fleet, kept current by the store's change feed
//! ([`Store::watch_fleet`]), so that the standby answers device check-ins
//! (`GET /api/v1/device/desired`) itself instead of forwarding them
//! (docs/deploy.md, "Standbys answer device calls").
//!
//! The copy holds what a desired-state document is made of: each device's
//! identity (credential, tags, revocation) and desired state, the
//! rollouts' terms, the windows and the newest trust document. It is
//! built by the same code as the active server's ([`Fleet::load`],
//! [`Fleet::doc_of`]), so both serve the same bytes under the same ETag.
//!
//! Freshness: the feed is told of a change once its transaction commits
//! (PostgreSQL delivers notifications in commit order), and the copy then
//! reads the changed rows, so it trails the database by that round trip.
//! While the feed is down (its session broke, the database restarts) the
//! copy is dropped and check-ins are forwarded; once it listens again the
//! copy is loaded whole, so nothing missed in between stays missed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use edgefleet_wire::verify::TrustRoot;
use tokio_util::sync::CancellationToken;

use crate::controller::Controller;
use crate::error::Result;
use crate::fleet::{Fleet, RolloutTerms, WindowTable};
use crate::store::{DeviceRecord, FleetChange, Snapshot, Store};

/// The copy and its counters.
#[derive(Debug, Default)]
pub struct Copy {
    /// `None` while the feed is down: nothing is answered from it.
    fleet: RwLock<Option<Arc<Fleet>>>,
    terms: Mutex<BTreeMap<String, RolloutTerms>>,
    /// Check-ins answered from the copy.
    pub served: AtomicU64,
    /// Device changes applied from the feed.
    pub applied: AtomicU64,
    /// Whole loads (the first, and one after each break of the feed).
    pub loads: AtomicU64,
    /// Breaks of the feed.
    pub failures: AtomicU64,
    /// Check-ins refused for their client certificate.
    pub cert_refusals: AtomicU64,
    /// Check-ins refused by the device's request budget.
    pub limited: AtomicU64,
}

impl Copy {
    /// The copy, when it is current.
    pub fn fleet(&self) -> Option<Arc<Fleet>> {
        self.fleet.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many devices the copy holds (0 while the feed is down).
    pub fn devices(&self) -> usize {
        self.fleet().map_or(0, |f| f.len())
    }

    fn terms_of(terms: &BTreeMap<String, RolloutTerms>, rollout: Option<&str>) -> RolloutTerms {
        rollout
            .and_then(|id| terms.get(id).cloned())
            .unwrap_or_default()
    }

    /// Replaces the copy with `snap`, as the active server loads it.
    fn load(&self, snap: Snapshot, root: &TrustRoot) -> Result<()> {
        let terms = Controller::terms_table(&snap.rollouts);
        let trust = crate::trust::TrustChain::load(root.clone(), &snap.trust)?;
        let windows = windows(&snap);
        let fleet = Fleet::load(
            snap.devices,
            |r| Self::terms_of(&terms, r),
            trust.newest_document(),
            windows,
        );
        *self.terms.lock().unwrap_or_else(|e| e.into_inner()) = terms;
        *self.fleet.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fleet));
        self.loads.fetch_add(1, Relaxed);
        Ok(())
    }

    /// A rollout, window or trust document changed: `snap` holds them all.
    fn fleetwide(&self, snap: &Snapshot, root: &TrustRoot) -> Result<()> {
        let Some(fleet) = self.fleet() else {
            return Ok(());
        };
        let new_terms = Controller::terms_table(&snap.rollouts);
        let trust = crate::trust::TrustChain::load(root.clone(), &snap.trust)?.newest_document();
        let windows = windows(snap);
        let mut terms = self.terms.lock().unwrap_or_else(|e| e.into_inner());
        let terms_changed = *terms != new_terms;
        *terms = new_terms;
        let lookup = |r: Option<&str>| Self::terms_of(&terms, r);
        let mut rebuilt = false;
        if let Some(doc) = trust
            && fleet.trust_doc().as_deref() != Some(&doc)
        {
            fleet.set_trust(doc, lookup);
            rebuilt = true;
        }
        if *fleet.windows() != windows {
            fleet.set_windows(windows, lookup);
            rebuilt = true;
        }
        if terms_changed && !rebuilt {
            fleet.rebuild_all(lookup);
        }
        Ok(())
    }

    /// The devices of `ids` changed; `recs` is how they are stored now
    /// (a device left out was removed).
    fn devices_changed(&self, ids: &[String], recs: Vec<DeviceRecord>) {
        let Some(fleet) = self.fleet() else {
            return;
        };
        let terms = self.terms.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        for rec in recs {
            gone.remove(rec.id.as_str());
            let t = Self::terms_of(&terms, rec.desired.rollout.as_deref());
            fleet.put(rec, &t);
        }
        for id in gone {
            fleet.remove(id);
        }
        self.applied.fetch_add(ids.len() as u64, Relaxed);
    }

    fn lost(&self) {
        *self.fleet.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn windows(snap: &Snapshot) -> WindowTable {
    snap.windows
        .iter()
        .map(|w| (w.scope.clone(), w.schedule.clone()))
        .collect()
}

/// Keeps `copy` current until `stop`; a broken feed is listened to again
/// (and the copy loaded again) a second later.
pub async fn follow(
    store: Arc<dyn Store>,
    root: TrustRoot,
    copy: Arc<Copy>,
    stop: CancellationToken,
) {
    let r = tokio::task::spawn_blocking(move || run(&*store, &root, &copy, &stop)).await;
    if let Err(e) = r {
        tracing::error!(error = %e, "standby: the change feed's thread failed");
    }
}

fn run(store: &dyn Store, root: &TrustRoot, copy: &Copy, stop: &CancellationToken) {
    while !stop.is_cancelled() {
        let r = store.watch_fleet(&mut |change| {
            match change {
                FleetChange::Listening => {
                    let snap = store.load()?;
                    let n = snap.devices.len();
                    copy.load(snap, root)?;
                    tracing::info!(
                        devices = n,
                        "standby: answering device check-ins from its copy of the fleet \
                         (kept current by the store's change feed)"
                    );
                }
                FleetChange::Fleetwide => copy.fleetwide(&store.load_fleetwide()?, root)?,
                FleetChange::Devices(ids) => {
                    let recs = store.devices(&ids)?;
                    copy.devices_changed(&ids, recs);
                }
                FleetChange::Quiet => {}
            }
            Ok(!stop.is_cancelled())
        });
        copy.lost();
        if let Err(e) = r {
            copy.failures.fetch_add(1, Relaxed);
            tracing::warn!(
                error = %e,
                "standby: the store's change feed broke; check-ins are forwarded to the \
                 active server until it is back"
            );
            for _ in 0..10 {
                if stop.is_cancelled() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

//! `fleet-server export` / `import`: the whole store as one JSON
//! document, so a deployment moves between backends (sled → PostgreSQL)
//! without re-enrolling a device. Credentials move as their hashes, so
//! every device keeps logging in with the credential it has.
//!
//! Bundle files are not in the document: they stay where `[bundles]`
//! keeps them (`data_dir/bundles`), which the new deployment points at.

use serde::{Deserialize, Serialize};

use super::{AuditEntry, BundleRecord, DeviceRecord, EnrollmentToken, Store, Write};
use crate::error::{Error, Result};
use crate::experiment::Experiment;
use crate::rollout::Rollout;

/// What `format` says in every export.
pub const FORMAT: &str = "edgefleet-store-export";
/// The document version this server writes and reads.
pub const VERSION: u32 = 1;

/// Audit entries read per page while exporting.
const AUDIT_PAGE: usize = 10_000;

/// The whole store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Export {
    pub format: String,
    pub version: u32,
    /// Which backend it came from (`sled`, `postgres`).
    pub source: String,
    pub exported_at: u64,
    pub bundles: Vec<BundleRecord>,
    pub devices: Vec<DeviceRecord>,
    pub rollouts: Vec<Rollout>,
    pub experiments: Vec<Experiment>,
    pub enrollment_tokens: Vec<EnrollmentToken>,
    pub trust: Vec<edgefleet_wire::trust::SignedTrust>,
    pub windows: Vec<edgefleet_wire::api::v1::WindowEntry>,
    /// Oldest first (positions are renumbered by the importing store).
    pub audit: Vec<AuditEntry>,
}

/// Counts, for what `export` and `import` print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub bundles: usize,
    pub devices: usize,
    pub rollouts: usize,
    pub audit: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bundles, {} devices, {} rollouts, {} audit entries",
            self.bundles, self.devices, self.rollouts, self.audit
        )
    }
}

impl Export {
    pub fn counts(&self) -> Counts {
        Counts {
            bundles: self.bundles.len(),
            devices: self.devices.len(),
            rollouts: self.rollouts.len(),
            audit: self.audit.len(),
        }
    }
}

/// Reads everything from `store`.
pub fn export(store: &dyn Store, now: u64) -> Result<Export> {
    let snap = store.load()?;
    let mut audit = Vec::new();
    let mut after = None;
    loop {
        let page = store.audit(after, AUDIT_PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.0);
        audit.extend(page.into_iter().map(|(_, a)| a));
    }
    Ok(Export {
        format: FORMAT.into(),
        version: VERSION,
        source: store.backend().into(),
        exported_at: now,
        bundles: snap.bundles,
        devices: snap.devices,
        rollouts: snap.rollouts,
        experiments: snap.experiments,
        enrollment_tokens: snap.enrollment_tokens,
        trust: snap.trust,
        windows: snap.windows,
        audit,
    })
}

/// Writes `doc` into `store` in one transaction. The store must be empty:
/// an import never merges into a running fleet's state.
pub fn import(store: &dyn Store, doc: Export) -> Result<Counts> {
    if doc.format != FORMAT {
        return Err(Error::Usage(format!(
            "not an edgefleet store export (format {:?}, want {FORMAT:?})",
            doc.format
        )));
    }
    if doc.version != VERSION {
        return Err(Error::Usage(format!(
            "export version {} is not readable by this fleet-server (it reads {VERSION})",
            doc.version
        )));
    }
    let existing = store.load()?;
    if !existing.devices.is_empty() || !existing.bundles.is_empty() || !existing.rollouts.is_empty()
    {
        return Err(Error::Usage(format!(
            "the {} store already holds {} devices, {} bundles and {} rollouts: \
             import only into an empty store",
            store.backend(),
            existing.devices.len(),
            existing.bundles.len(),
            existing.rollouts.len()
        )));
    }
    let counts = doc.counts();
    let mut batch: Vec<Write> = Vec::new();
    batch.extend(doc.trust.into_iter().map(Write::Trust));
    batch.extend(doc.bundles.into_iter().map(Write::Bundle));
    batch.extend(
        doc.enrollment_tokens
            .into_iter()
            .map(Write::EnrollmentToken),
    );
    batch.extend(
        doc.rollouts
            .into_iter()
            .map(|r| Write::Rollout(Box::new(r))),
    );
    batch.extend(
        doc.experiments
            .into_iter()
            .map(|x| Write::Experiment(Box::new(x))),
    );
    batch.extend(
        doc.windows
            .into_iter()
            .map(|w| Write::Window(w.scope, Some(w.schedule))),
    );
    batch.extend(
        doc.devices
            .into_iter()
            .map(|d| Write::NewDevice(Box::new(d))),
    );
    batch.extend(doc.audit.into_iter().map(Write::Audit));
    store.commit(&batch)?;
    Ok(counts)
}

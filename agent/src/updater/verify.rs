//! The verify effect and loading of installed bundles: content address,
//! signatures (threshold), expiry, target arch, agent version, model
//! format and the anti-rollback floor, before any model byte is parsed.

use edgefleet_wire::bundle::Limits;
use edgefleet_wire::device::BundleRef;
use edgefleet_wire::time::unix_now;
use edgefleet_wire::verify::Expiry;

use super::slots::{Slots, file_content_address};
use super::{Ctx, Outcome};
use crate::bundle::open_file_with;
use crate::config::AgentConfig;
use crate::engine::{ActiveModel, prepare_with};
use crate::error::AgentError;
use crate::trust::TrustState;
use crate::update::{Event, Target};

/// Checks the staged file of `target`; a refusal is final for the bundle.
pub(super) fn verify(ctx: &Ctx, target: &Target) -> Outcome {
    let reject = |reason: String| Outcome::Event(Event::Rejected { reason });
    let path = ctx.slots.bundle(&target.bundle.id);
    match file_content_address(&path) {
        Ok(h) if h == target.bundle.id => {}
        Ok(h) => {
            return reject(format!(
                "bundle file hashes to {h}, expected {}",
                target.bundle.id
            ));
        }
        Err(e) => return reject(e.to_string()),
    }
    // Installs follow the newest trust version only, and only while it is fresh.
    let trusted = ctx.trust.current();
    if let Err(e) = trusted.check_fresh(unix_now()) {
        return reject(format!("{} ({})", e, e.code()));
    }
    let tb = match open_file_with(
        &path,
        trusted.root(),
        &Limits::default(),
        Expiry::Enforce { now: unix_now() },
    ) {
        Ok(tb) => tb,
        Err(e) => return reject(format!("{} ({})", e, e.code())),
    };
    let floor = match ctx.floor.load() {
        Ok(f) => f,
        Err(e) => return reject(e.to_string()),
    };
    let m = &tb.manifest;
    if let Err(refusal) = floor.permits(
        m.name.as_str(),
        m.sequence,
        &target.bundle.id,
        target.rollback,
    ) {
        return reject(refusal.to_string());
    }
    Outcome::Verified(Box::new(tb))
}

/// Loads a bundle already installed here (active or last known good).
/// Expiry is not enforced: it was checked when the bundle was installed,
/// and an expired model keeps serving rather than leave the device with
/// none (the signature and digests are still checked, against the newest
/// trust version that knows the signer: see [`crate::trust`]).
pub fn load_installed(
    slots: &Slots,
    trust: &TrustState,
    b: &BundleRef,
    cfg: &AgentConfig,
) -> Result<ActiveModel, AgentError> {
    let path = slots.bundle(&b.id);
    let mut roots = trust.roots_newest_first().into_iter().peekable();
    let tb = loop {
        let Some(root) = roots.next() else {
            return Err(AgentError::Invariant("a trust chain has a root".into()));
        };
        match open_file_with(&path, &root, &Limits::default(), Expiry::Ignore) {
            Ok(tb) => break tb,
            Err(AgentError::Bundle { source, .. })
                if roots.peek().is_some()
                    && matches!(source.code(), "unknown_key" | "threshold_not_met") => {}
            Err(e) => return Err(e),
        }
    };
    let mut m = prepare_with(tb, slots.compiled_for(&b.id, cfg))?.model;
    m.bundle_id = b.id.clone();
    m.faults = super::faults_for(cfg, &m.info.name, &m.info.version);
    Ok(m)
}

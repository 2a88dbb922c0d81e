//! Activation and rollback: the anti-rollback floor is raised durably
//! (TUF 5.4.4: rollback protection) before a model serves, and a rollback
//! swaps the last known good bundle back in.

use edgefleet_wire::device::BundleRef;
use edgefleet_wire::manifest::Manifest;
use edgefleet_wire::verify::Verified;

use super::{Ctx, Outcome, blocking, faults_for, verify::load_installed};
use crate::engine::ActiveModel;
use crate::error::AgentError;
use crate::floor::FloorFile;
use crate::update::{Event, Target};

/// Records that the verified bundle `id` runs here (raising the floor if
/// its sequence is higher), durably.
fn raise_floor(
    floor: &FloorFile,
    manifest: &Verified<Manifest>,
    id: &str,
) -> Result<(), AgentError> {
    let mut f = floor.load()?;
    if f.raise(manifest, id) {
        floor.save(&f)?;
    }
    Ok(())
}

pub(super) async fn activate(
    ctx: &Ctx,
    target: &Target,
    staged: Option<(String, ActiveModel)>,
) -> Outcome {
    let model = match staged {
        Some((id, m)) if id == target.bundle.id => m,
        // Dropped while it waited for a window: the file on disk is checked
        // and loaded again, self-test included.
        _ => match super::self_test(ctx.clone(), target.clone(), None).await {
            Outcome::Tested(m) => *m,
            Outcome::Event(Event::SelfTestFailed { reason } | Event::Rejected { reason }) => {
                return Outcome::Event(Event::ActivationFailed {
                    reason: format!("the bundle failed its checks again before the swap: {reason}"),
                });
            }
            _ => {
                return Outcome::Event(Event::ActivationFailed {
                    reason: "internal: the bundle could not be loaded for the swap".into(),
                });
            }
        },
    };
    let floor = ctx.floor.clone();
    let manifest = model.manifest.clone();
    let id = target.bundle.id.clone();
    // The floor is durable before the model serves.
    let raised: Result<(), AgentError> =
        blocking(move || raise_floor(&floor, &manifest, &id)).await;
    if let Err(e) = raised {
        return Outcome::Event(Event::ActivationFailed {
            reason: format!("cannot raise the anti-rollback floor: {e}"),
        });
    }
    let mut model = model;
    model.faults = faults_for(&ctx.cfg, &model.info.name, &model.info.version);
    ctx.engine.activate(model);
    Outcome::Event(Event::Activated)
}

/// What serves now, as the record names it.
fn serving(ctx: &Ctx) -> Option<BundleRef> {
    ctx.engine
        .active()
        .map(|m| m.manifest.bundle_ref(&m.bundle_id))
}

pub(super) async fn rollback(ctx: &Ctx, to: Option<BundleRef>) -> Outcome {
    let Some(to) = to else {
        tracing::error!("no last known good bundle: the failing model keeps serving");
        return Outcome::Event(Event::RolledBackTo { to: serving(ctx) });
    };
    let ctx2 = ctx.clone();
    let to2 = to.clone();
    let loaded: Result<ActiveModel, AgentError> =
        blocking(move || load_installed(&ctx2.slots, &ctx2.trust, &to2, &ctx2.cfg)).await;
    match loaded {
        Ok(m) => {
            // The last known good bundle ran here, so it is on the floor's
            // list already; this only repairs a floor file that lost it. A
            // failure must not keep the failing model serving: say so, swap.
            let floor = ctx.floor.clone();
            let (manifest, id) = (m.manifest.clone(), to.id.clone());
            let raised: Result<(), AgentError> =
                blocking(move || raise_floor(&floor, &manifest, &id)).await;
            if let Err(e) = raised {
                tracing::error!(error = %e, bundle = %to.id, "rollback: cannot record the bundle in the anti-rollback floor; swapping anyway");
            }
            ctx.engine.activate(m);
            Outcome::Event(Event::RolledBackTo { to: Some(to) })
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot load the last known good bundle; keeping the current model");
            Outcome::Event(Event::RolledBackTo { to: serving(ctx) })
        }
    }
}

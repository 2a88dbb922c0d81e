//! The shadow effect: the candidate runs beside the active model on a
//! sample of live requests (after each client got its answer) until enough
//! samples were compared; the candidate is then handed back for
//! activation, or refused.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_wire::device::ShadowAgreement;

use super::{Ctx, Outcome};
use crate::engine::{ActiveModel, Shadow};
use crate::update::{Event, Target};

pub(super) async fn shadow(
    ctx: &Ctx,
    target: &Target,
    staged: Option<(String, ActiveModel)>,
) -> Outcome {
    let (Some(req), Some((id, model))) = (target.shadow.clone(), staged) else {
        return Outcome::Event(Event::ShadowDone {
            agreement: ShadowAgreement::default(),
            passed: Err("internal: nothing to shadow".into()),
        });
    };
    let sh = ctx
        .engine
        .start_shadow(Shadow::new(model, req.sample_rate.clamp(0.0, 1.0)));
    let acc = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let acc = sh.agreement();
        if acc.samples >= u64::from(req.samples.max(1)) {
            break acc;
        }
    };
    ctx.engine.stop_shadow();
    let top1 = (acc.top1_samples > 0).then(|| acc.top1_matches as f64 / acc.top1_samples as f64);
    let agreement = ShadowAgreement {
        samples: acc.samples,
        top1_agreement: top1,
        max_abs_diff: acc.max_abs_diff,
    };
    let mut passed = Ok(());
    if acc.errors > 0 {
        passed = Err(format!(
            "the candidate failed {} of {} shadow inferences",
            acc.errors, acc.samples
        ));
    } else if let Some(min) = req.min_top1_agreement {
        match top1 {
            Some(t) if t >= min => {}
            Some(t) => passed = Err(format!("shadow top-1 agreement {t:.3} < {min:.3}")),
            None => passed = Err("shadow top-1 agreement not measurable for this model".into()),
        }
    }
    if passed.is_ok()
        && let Some(max) = req.max_abs_diff
        && acc.max_abs_diff > max
    {
        passed = Err(format!(
            "shadow max abs diff {:.3e} > {max:.3e}",
            acc.max_abs_diff
        ));
    }
    // Hand the candidate back for activation (workers drop their clones
    // right after each mirrored request).
    let mut sh = sh;
    for _ in 0..50 {
        match Arc::try_unwrap(sh) {
            Ok(s) => {
                let mut model = s.model;
                model.bundle_id = id;
                return Outcome::Shadowed {
                    model: Box::new(model),
                    agreement,
                    passed,
                };
            }
            Err(back) => {
                sh = back;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Outcome::Event(Event::ShadowDone {
        agreement,
        passed: Err("internal: the candidate is still referenced".into()),
    })
}

//! The watch effect: judges the newly active model until its window has
//! passed. The window is measured from the activation time in the record
//! (`Watching.since`) on the injected clock, so a restart does not start it
//! over and tests can run it on a fake clock.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{Ctx, Outcome};
use crate::health::{Verdict, WatchLimits, WatchSample, judge};
use crate::update::{Event, Target};

/// How often the watch samples the model's counters.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

pub(super) fn watch_limits(ctx: &Ctx, target: &Target, baseline_p95: Option<f64>) -> WatchLimits {
    let u = &ctx.cfg.update;
    let policy = target.watch.clone().unwrap_or_default();
    WatchLimits {
        window_secs: u.watch_secs,
        window_inferences: u.watch_inferences,
        min_inferences: u.watch_min_inferences,
        max_error_rate: policy.max_error_rate.unwrap_or(u.max_error_rate),
        max_p95_ms: policy.max_p95_latency_ms,
        baseline_p95_ms: baseline_p95,
        max_p95_ratio: u.max_p95_ratio,
        p95_slack_ms: u.p95_slack_ms,
    }
}

pub(super) async fn watch_health(
    ctx: &Ctx,
    target: &Target,
    since: u64,
    baseline_p95: Option<f64>,
) -> Outcome {
    let limits = watch_limits(ctx, target, baseline_p95);
    loop {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let Some(m) = ctx.engine.active() else {
            continue;
        };
        let sample = WatchSample {
            elapsed_secs: (ctx.clock)().saturating_sub(since),
            inferences: m.stats.inferences.load(Relaxed) + m.stats.errors.load(Relaxed),
            errors: m.stats.errors.load(Relaxed),
            non_finite: m.stats.non_finite.load(Relaxed),
            panics: m.stats.panics.load(Relaxed),
            p95_ms: m.stats.p95_ms(),
        };
        match judge(&limits, &sample) {
            Verdict::Continue => {}
            Verdict::Pass => return Outcome::Event(Event::WatchPassed),
            Verdict::Breach(reason) => return Outcome::Event(Event::HealthBreached { reason }),
        }
    }
}

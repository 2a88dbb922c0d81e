//! Judging a newly activated model during its watch window (pure).
//!
//! The window ends after `window_secs` or `window_inferences`, whichever
//! comes first. Before that, any worker panic or NaN/Inf output is a
//! breach at once; the error rate and the p95 latency are judged once
//! `min_inferences` have run. Latency is compared with the absolute limit
//! from the rollout's gates and with the previous model's p95 times
//! `max_p95_ratio` (plus a small slack so scheduler jitter on a fast model
//! is not a regression).

use serde::Serialize;

/// Limits for one watch.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchLimits {
    pub window_secs: u64,
    pub window_inferences: u64,
    pub min_inferences: u64,
    pub max_error_rate: f64,
    pub max_p95_ms: Option<f64>,
    pub baseline_p95_ms: Option<f64>,
    pub max_p95_ratio: f64,
    pub p95_slack_ms: f64,
}

/// What the active model did since activation.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WatchSample {
    pub elapsed_secs: u64,
    pub inferences: u64,
    pub errors: u64,
    pub non_finite: u64,
    pub panics: u64,
    pub p95_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Continue,
    Pass,
    /// The reason names the metric, its value and the limit.
    Breach(String),
}

impl WatchLimits {
    /// The effective p95 limit in ms, and how it was derived.
    pub fn p95_limit(&self) -> Option<(f64, String)> {
        let relative = self.baseline_p95_ms.map(|b| {
            (
                b * self.max_p95_ratio + self.p95_slack_ms,
                format!(
                    "{:.1} × previous model's {b:.1} ms + {:.0} ms",
                    self.max_p95_ratio, self.p95_slack_ms
                ),
            )
        });
        let absolute = self
            .max_p95_ms
            .map(|m| (m, "the rollout's max_p95_latency_ms".to_string()));
        match (relative, absolute) {
            (Some(r), Some(a)) => Some(if r.0 <= a.0 { r } else { a }),
            (r, a) => r.or(a),
        }
    }
}

pub fn judge(l: &WatchLimits, s: &WatchSample) -> Verdict {
    if s.panics > 0 {
        return Verdict::Breach(format!(
            "the inference worker panicked {} time(s) on the new model",
            s.panics
        ));
    }
    if s.non_finite > 0 {
        return Verdict::Breach(format!(
            "{} of {} inferences produced NaN or infinite outputs",
            s.non_finite, s.inferences
        ));
    }
    if s.inferences >= l.min_inferences.max(1) {
        let rate = s.errors as f64 / s.inferences as f64;
        if rate > l.max_error_rate {
            return Verdict::Breach(format!(
                "error rate {rate:.3} > {:.3} ({} errors in {} inferences)",
                l.max_error_rate, s.errors, s.inferences
            ));
        }
        if let (Some(p95), Some((limit, why))) = (s.p95_ms, l.p95_limit())
            && p95 > limit
        {
            return Verdict::Breach(format!(
                "p95 latency {p95:.1} ms > {limit:.1} ms ({why}) over {} inferences",
                s.inferences
            ));
        }
    }
    if s.elapsed_secs >= l.window_secs || s.inferences >= l.window_inferences {
        return Verdict::Pass;
    }
    Verdict::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> WatchLimits {
        WatchLimits {
            window_secs: 60,
            window_inferences: 100,
            min_inferences: 10,
            max_error_rate: 0.05,
            max_p95_ms: None,
            baseline_p95_ms: Some(10.0),
            max_p95_ratio: 2.0,
            p95_slack_ms: 5.0,
        }
    }

    #[test]
    fn slow_models_breach_against_the_previous_baseline() {
        let s = WatchSample {
            inferences: 20,
            p95_ms: Some(40.0),
            ..WatchSample::default()
        };
        let Verdict::Breach(why) = judge(&limits(), &s) else {
            panic!("expected a breach");
        };
        assert!(why.contains("p95 latency 40.0 ms > 25.0 ms"), "{why}");
        let ok = WatchSample {
            p95_ms: Some(24.0),
            ..s
        };
        assert_eq!(judge(&limits(), &ok), Verdict::Continue);
    }

    #[test]
    fn the_tighter_of_absolute_and_relative_limits_applies() {
        let mut l = limits();
        l.max_p95_ms = Some(12.0);
        assert_eq!(l.p95_limit().unwrap().0, 12.0);
        l.baseline_p95_ms = None;
        assert_eq!(l.p95_limit().unwrap().0, 12.0);
        l.max_p95_ms = None;
        assert!(l.p95_limit().is_none());
    }

    #[test]
    fn errors_nan_and_panics_breach() {
        let l = limits();
        let errs = WatchSample {
            inferences: 20,
            errors: 5,
            ..WatchSample::default()
        };
        assert!(matches!(judge(&l, &errs), Verdict::Breach(w) if w.contains("error rate 0.250")));
        let nan = WatchSample {
            inferences: 1,
            non_finite: 1,
            ..WatchSample::default()
        };
        assert!(matches!(judge(&l, &nan), Verdict::Breach(w) if w.contains("NaN")));
        let panics = WatchSample {
            panics: 1,
            ..WatchSample::default()
        };
        assert!(matches!(judge(&l, &panics), Verdict::Breach(w) if w.contains("panicked")));
    }

    #[test]
    fn too_few_inferences_are_not_judged_and_the_window_ends() {
        let l = limits();
        let few = WatchSample {
            inferences: 3,
            errors: 3,
            ..WatchSample::default()
        };
        assert_eq!(judge(&l, &few), Verdict::Continue);
        let late = WatchSample {
            elapsed_secs: 60,
            ..few.clone()
        };
        assert_eq!(judge(&l, &late), Verdict::Pass);
        let many = WatchSample {
            inferences: 100,
            p95_ms: Some(9.0),
            ..WatchSample::default()
        };
        assert_eq!(judge(&l, &many), Verdict::Pass);
    }
}

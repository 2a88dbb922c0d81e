//! On-device drift detection: rolling histograms of the features defined in
//! [`edgefleet_wire::drift`] over the last `window` inferences, compared
//! with the bundle's baseline by PSI. Updating costs O(features) per
//! inference (a ring of bin indices), plus one pass over the inputs to
//! compute channel means and deviations.

use std::collections::VecDeque;

use edgefleet_wire::drift::{BINS, bin_of, input_features, output_score, psi};
use edgefleet_wire::manifest::{DriftBaseline, Histogram};
use edgefleet_wire::telemetry::DriftValue;
use edgefleet_wire::tensor::NamedTensor;

/// Window and threshold. Defaults: 500 inferences, PSI 0.2, judged from
/// 200 inferences on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftConfig {
    pub window: usize,
    pub threshold: f64,
    pub min_samples: usize,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            window: 500,
            threshold: 0.2,
            min_samples: 200,
        }
    }
}

/// A threshold crossing.
#[derive(Clone, Debug, PartialEq)]
pub struct DriftAlert {
    /// The features over the threshold, worst first.
    pub values: Vec<DriftValue>,
    pub samples: usize,
}

/// Rolling histograms for one model.
#[derive(Debug)]
pub struct DriftMonitor {
    histograms: Vec<Histogram>,
    config: DriftConfig,
    ring: VecDeque<Vec<u8>>,
    counts: Vec<[u64; BINS]>,
    alerting: bool,
    alerts: u64,
}

impl DriftMonitor {
    pub fn new(baseline: &DriftBaseline, config: DriftConfig) -> DriftMonitor {
        let mut histograms = baseline.inputs.clone();
        if let Some(o) = &baseline.output {
            histograms.push(o.clone());
        }
        let n = histograms.len();
        DriftMonitor {
            histograms,
            config,
            ring: VecDeque::with_capacity(config.window),
            counts: vec![[0; BINS]; n],
            alerting: false,
            alerts: 0,
        }
    }

    /// Adds one inference; returns an alert when the largest PSI crosses the
    /// threshold (once, until it falls below half of it again).
    pub fn observe(
        &mut self,
        inputs: &[NamedTensor],
        outputs: &[NamedTensor],
    ) -> Option<DriftAlert> {
        self.observe_scored(inputs, output_score(outputs))
    }

    /// Like [`DriftMonitor::observe`] with the output score already taken
    /// (the engine takes it before the outputs go to the client).
    pub fn observe_scored(
        &mut self,
        inputs: &[NamedTensor],
        score: Option<f64>,
    ) -> Option<DriftAlert> {
        let mut values: Vec<f64> = input_features(inputs).into_iter().map(|(_, v)| v).collect();
        if self.histograms.len() > values.len() {
            values.push(score.unwrap_or(0.0));
        }
        if values.len() != self.histograms.len() {
            return None; // a baseline for another input layout
        }
        let bins: Vec<u8> = self
            .histograms
            .iter()
            .zip(&values)
            .map(|(h, v)| bin_of(&h.edges, *v) as u8)
            .collect();
        if self.ring.len() == self.config.window
            && let Some(old) = self.ring.pop_front()
        {
            for (c, b) in self.counts.iter_mut().zip(old) {
                c[usize::from(b)] -= 1;
            }
        }
        for (c, b) in self.counts.iter_mut().zip(&bins) {
            c[usize::from(*b)] += 1;
        }
        self.ring.push_back(bins);
        if self.ring.len() < self.config.min_samples.min(self.config.window) {
            return None;
        }
        let snapshot = self.snapshot();
        let worst = snapshot.first().map_or(0.0, |v| v.psi);
        if !self.alerting && worst > self.config.threshold {
            self.alerting = true;
            self.alerts += 1;
            return Some(DriftAlert {
                values: snapshot
                    .into_iter()
                    .filter(|v| v.psi > self.config.threshold)
                    .collect(),
                samples: self.ring.len(),
            });
        }
        if self.alerting && worst < self.config.threshold / 2.0 {
            self.alerting = false;
        }
        None
    }

    /// PSI per feature over the current window, worst first (empty until
    /// `min_samples`).
    pub fn snapshot(&self) -> Vec<DriftValue> {
        if self.ring.len() < self.config.min_samples.min(self.config.window) {
            return Vec::new();
        }
        let mut v: Vec<DriftValue> = self
            .histograms
            .iter()
            .zip(&self.counts)
            .map(|(h, c)| DriftValue {
                feature: h.feature.clone(),
                psi: psi(h, c),
            })
            .collect();
        v.sort_by(|a, b| b.psi.total_cmp(&a.psi));
        v
    }

    pub fn alerting(&self) -> bool {
        self.alerting
    }

    /// Alerts raised so far.
    pub fn alerts(&self) -> u64 {
        self.alerts
    }

    pub fn samples(&self) -> usize {
        self.ring.len()
    }
}

/// Prometheus lines for the PSI values.
pub fn render_prometheus(values: &[DriftValue], alerting: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# HELP edge_agent_drift_psi Population stability index of a drift feature over the window.\n# TYPE edge_agent_drift_psi gauge\n",
    );
    for v in values {
        let _ = writeln!(
            out,
            "edge_agent_drift_psi{{feature=\"{}\"}} {}",
            edgefleet_wire::prom::escape(&v.feature),
            v.psi
        );
    }
    let _ = writeln!(
        out,
        "# HELP edge_agent_drift_alerting Whether drift is above the threshold (1) or not (0).\n# TYPE edge_agent_drift_alerting gauge\nedge_agent_drift_alerting {}",
        u8::from(alerting)
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use edgefleet_wire::drift::baseline;
    use edgefleet_wire::tensor::Tensor;

    fn x(v: f32) -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "x".into(),
            tensor: Tensor::from_f32(vec![1, 1, 2], &[v, v + 1.0]).unwrap(),
        }]
    }

    fn monitor() -> DriftMonitor {
        let samples: Vec<_> = (0..1000)
            .map(|i| input_features(&x((i % 100) as f32)))
            .collect();
        let b = baseline(&samples, &[]);
        DriftMonitor::new(
            &b,
            DriftConfig {
                window: 100,
                threshold: 0.2,
                min_samples: 100,
            },
        )
    }

    #[test]
    fn alerts_once_on_a_shift_and_rearms_after_recovery() {
        let mut m = monitor();
        // Any 100 consecutive values of (37 i) mod 100 are a permutation of
        // 0..100: the window matches the baseline exactly.
        for i in 0..300 {
            assert!(m.observe(&x(((i * 37) % 100) as f32), &[]).is_none());
        }
        let mut alerts = 0;
        for i in 0..300 {
            if m.observe(&x((i % 100) as f32 + 200.0), &[]).is_some() {
                alerts += 1;
            }
        }
        assert_eq!(alerts, 1, "one alert per episode");
        assert!(m.alerting());
        for i in 0..300 {
            m.observe(&x(((i * 37) % 100) as f32), &[]);
        }
        assert!(!m.alerting(), "re-armed after the window recovered");
        assert_eq!(m.samples(), 100, "the window stays bounded");
    }

    #[test]
    fn renders_prometheus_lines() {
        let text = render_prometheus(
            &[DriftValue {
                feature: "x[c=0].mean".into(),
                psi: 0.5,
            }],
            true,
        );
        assert!(text.contains("edge_agent_drift_psi{feature=\"x[c=0].mean\"} 0.5"));
        assert!(text.contains("edge_agent_drift_alerting 1"));
    }
}

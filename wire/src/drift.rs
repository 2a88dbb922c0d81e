//! Drift features, baselines and the population stability index (PSI).
//! The packer and the device compute features with the same functions, so
//! a baseline means the same thing on both sides.
//!
//! Features, per sample (one inference):
//! - every input of rank ≥ 3 with batch 1 (`[1, C, …]`, e.g. NCHW images):
//!   the mean and the standard deviation of each channel `c`, named
//!   `{input}[c={c}].mean` / `.std` (brightness shifts the means, contrast
//!   and blur shift the deviations);
//! - any other input: the mean and deviation of the whole tensor;
//! - the model's score: the maximum of the first output's last axis (the
//!   top class probability), averaged over the other positions (e.g. the
//!   recognizer's per-character maxima).
//!
//! A histogram has [`BINS`] bins whose inner edges are the calibration
//! quantiles; the outer bins are open-ended. Fractions are floored at
//! [`EPSILON`] so PSI stays finite: `PSI = Σ (a − e) · ln(a / e)`.

use crate::manifest::{DriftBaseline, Histogram};
use crate::tensor::NamedTensor;

pub const BINS: usize = 10;
pub const EPSILON: f64 = 1e-4;
/// Name of the output-score feature.
pub const SCORE: &str = "score";

/// (feature name, value) for one sample's inputs.
pub fn input_features(inputs: &[NamedTensor]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for t in inputs {
        let shape = t.tensor.shape();
        let n = t.tensor.element_count();
        if n == 0 {
            continue;
        }
        if shape.len() >= 3 && shape[0] == 1 && shape[1] > 0 {
            let c = shape[1] as usize;
            let per = n / c;
            for ch in 0..c {
                let (m, s) = mean_std((ch * per..(ch + 1) * per).map(|i| t.tensor.get_f64(i)));
                out.push((format!("{}[c={ch}].mean", t.name), m));
                out.push((format!("{}[c={ch}].std", t.name), s));
            }
        } else {
            let (m, s) = mean_std(t.tensor.iter_f64());
            out.push((format!("{}.mean", t.name), m));
            out.push((format!("{}.std", t.name), s));
        }
    }
    out
}

fn mean_std(it: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
    for v in it {
        n += 1.0;
        sum += v;
        sq += v * v;
    }
    if n == 0.0 {
        return (0.0, 0.0);
    }
    let m = sum / n;
    (m, (sq / n - m * m).max(0.0).sqrt())
}

/// The top score of the first output (mean over positions of the max over
/// the last axis).
pub fn output_score(outputs: &[NamedTensor]) -> Option<f64> {
    let t = &outputs.first()?.tensor;
    let last = *t.shape().last()? as usize;
    if last == 0 {
        return None;
    }
    let n = t.element_count();
    let rows = n / last;
    let mut total = 0.0;
    for r in 0..rows {
        let mut best = f64::NEG_INFINITY;
        for i in r * last..(r + 1) * last {
            best = best.max(t.get_f64(i));
        }
        total += best;
    }
    Some(total / rows.max(1) as f64)
}

/// Builds one histogram from calibration values.
pub fn histogram(feature: &str, values: &[f64]) -> Histogram {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let mut edges = Vec::with_capacity(BINS + 1);
    if v.is_empty() {
        edges = vec![0.0; BINS + 1];
    } else {
        for k in 0..=BINS {
            let idx = ((v.len() - 1) as f64 * k as f64 / BINS as f64).round() as usize;
            edges.push(v[idx] as f32);
        }
    }
    let mut counts = vec![0u64; BINS];
    for x in &v {
        counts[bin_of(&edges, *x)] += 1;
    }
    Histogram {
        feature: feature.to_string(),
        edges,
        fractions: fractions(&counts),
    }
}

/// Which bin `v` falls in: by the inner edges; the outer bins are open.
pub fn bin_of(edges: &[f32], v: f64) -> usize {
    let inner = &edges[1..edges.len().saturating_sub(1).max(1)];
    inner
        .iter()
        .take_while(|e| f64::from(**e) <= v)
        .count()
        .min(BINS - 1)
}

fn fractions(counts: &[u64]) -> Vec<f32> {
    let total: u64 = counts.iter().sum();
    let raw: Vec<f64> = counts
        .iter()
        .map(|c| {
            if total == 0 {
                1.0 / counts.len() as f64
            } else {
                (*c as f64 / total as f64).max(EPSILON)
            }
        })
        .collect();
    let s: f64 = raw.iter().sum();
    raw.iter().map(|x| (x / s) as f32).collect()
}

/// PSI of observed bin counts against a baseline histogram.
pub fn psi(expected: &Histogram, counts: &[u64]) -> f64 {
    let actual = fractions(counts);
    expected
        .fractions
        .iter()
        .zip(actual)
        .map(|(e, a)| {
            let (e, a) = (f64::from(*e).max(EPSILON), f64::from(a).max(EPSILON));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// A baseline from per-sample input features and scores.
pub fn baseline(samples: &[Vec<(String, f64)>], scores: &[f64]) -> DriftBaseline {
    let names: Vec<String> = samples
        .first()
        .map(|s| s.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let inputs = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let vals: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.get(i).map(|x| x.1))
                .collect();
            histogram(n, &vals)
        })
        .collect();
    DriftBaseline {
        inputs,
        output: (!scores.is_empty()).then(|| histogram(SCORE, scores)),
        samples: samples.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn identical_distributions_have_near_zero_psi_and_shifted_ones_do_not() {
        let vals: Vec<f64> = (0..1000).map(|i| (i % 100) as f64).collect();
        let h = histogram("f", &vals);
        let mut same = vec![0u64; BINS];
        for v in &vals {
            same[bin_of(&h.edges, *v)] += 1;
        }
        assert!(psi(&h, &same) < 0.01, "{}", psi(&h, &same));
        let mut shifted = vec![0u64; BINS];
        for v in &vals {
            shifted[bin_of(&h.edges, v + 30.0)] += 1;
        }
        assert!(psi(&h, &shifted) > 0.5, "{}", psi(&h, &shifted));
    }

    #[test]
    fn psi_matches_a_hand_computed_value() {
        let h = Histogram {
            feature: "f".into(),
            edges: vec![0.0, 1.0, 2.0],
            fractions: vec![0.5, 0.5],
        };
        // 0.25/0.75 against 0.5/0.5: (0.25-0.5)ln(0.5) + (0.75-0.5)ln(1.5)
        let expected = -0.25 * 0.5f64.ln() + 0.25 * 1.5f64.ln();
        let got = psi(&h, &[1, 3]);
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn outer_bins_are_open_ended() {
        let h = histogram("f", &(0..100).map(f64::from).collect::<Vec<_>>());
        assert_eq!(bin_of(&h.edges, -1e9), 0);
        assert_eq!(bin_of(&h.edges, 1e9), BINS - 1);
    }

    #[test]
    fn features_are_per_channel_mean_and_std_and_the_top_score() {
        let mut data = vec![0.0f32; 2 * 4];
        data[4..].copy_from_slice(&[1.0, 3.0, 1.0, 3.0]);
        let x = NamedTensor {
            name: "x".into(),
            tensor: Tensor::from_f32(vec![1, 2, 2, 2], &data).unwrap(),
        };
        let f = input_features(&[x]);
        assert_eq!(f[0], ("x[c=0].mean".into(), 0.0));
        assert_eq!(f[2], ("x[c=1].mean".into(), 2.0));
        assert_eq!(f[3], ("x[c=1].std".into(), 1.0));
        let y = NamedTensor {
            name: "y".into(),
            tensor: Tensor::from_f32(vec![1, 2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]).unwrap(),
        };
        assert!((output_score(&[y]).unwrap() - 0.6).abs() < 1e-6);
    }
}

//! The one percentile definition of edgefleet: nearest rank. The device's
//! watch window, its telemetry, the rollout gates and `edge-agent bench`
//! all use it, so "p95" means the same number everywhere.

use crate::telemetry::Latency;

/// The `q`-quantile (0 < q ≤ 1) of sorted values, nearest-rank: the
/// smallest value with at least `q` of the values at or below it.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// p50, p95 and p99 of latencies in milliseconds (any order).
pub fn latency_summary(mut ms: Vec<f32>) -> Option<Latency> {
    ms.sort_by(f32::total_cmp);
    let at = |q| nearest_rank(&ms, q).map(f64::from);
    Some(Latency {
        p50: at(0.5)?,
        p95: at(0.95)?,
        p99: at(0.99)?,
    })
}

/// The p95 of latencies in milliseconds (any order).
pub fn p95(ms: &[f32]) -> Option<f64> {
    let mut v = ms.to_vec();
    v.sort_by(f32::total_cmp);
    nearest_rank(&v, 0.95).map(f64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_of_one_to_one_hundred() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.95), Some(95.0));
        assert_eq!(nearest_rank(&v, 0.5), Some(50.0));
        assert_eq!(nearest_rank(&v, 1.0), Some(100.0));
        assert_eq!(nearest_rank(&v, 0.0), Some(1.0));
        assert_eq!(nearest_rank::<f64>(&[], 0.5), None);
    }

    #[test]
    fn small_samples_take_the_top_value_for_high_quantiles() {
        // 19 values: rank ceil(19 × 0.95) = 19, the largest.
        let v: Vec<f32> = (1..=19).rev().map(|x| x as f32).collect();
        assert_eq!(p95(&v), Some(19.0));
        let s = latency_summary(v).unwrap_or_else(|| panic!("empty"));
        assert_eq!((s.p50, s.p95, s.p99), (10.0, 19.0, 19.0));
        assert!(latency_summary(Vec::new()).is_none());
    }
}

//! The one retry policy of edgefleet: exponential backoff with "equal
//! jitter" (half the delay fixed, half uniformly random), so a fleet that
//! lost its server at the same instant does not come back in lockstep.
//! Download retries, enrollment, reports, MQTT reconnects on both sides
//! use it. The jitter comes from the OS random source, never the clock.

use std::time::Duration;

/// Delays grow as `min × 2^attempt`, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max }
    }

    pub fn from_millis(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff::new(
            Duration::from_millis(min_ms),
            Duration::from_millis(max_ms.max(min_ms)),
        )
    }

    /// The ceiling of retry `attempt` (0 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `attempt`, with `unit` in `[0, 1)` drawn by
    /// the caller: within `[ceiling / 2, ceiling)`. Pure, for tests.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let c = self.ceiling(attempt);
        c / 2 + c.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
    }

    /// The delay before retry `attempt`, jittered from the OS RNG.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_unit())
    }
}

/// A uniformly distributed value in `[0, 1)` from the OS random source
/// (0.5 if that source fails, which only costs the jitter).
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    // 53 random bits: every double in [0, 1) with that spacing.
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_and_stops_at_max() {
        let b = Backoff::from_millis(100, 1000);
        let ceilings: Vec<u128> = (0..6).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_within_half_and_whole_ceiling() {
        let b = Backoff::from_millis(1000, 60_000);
        assert_eq!(b.delay_with(0, 0.0), Duration::from_millis(500));
        assert!(b.delay_with(0, 0.999_999) < Duration::from_millis(1000));
        for a in 0..10 {
            let d = b.delay(a);
            assert!(d >= b.ceiling(a) / 2 && d <= b.ceiling(a), "{a}: {d:?}");
        }
    }

    #[test]
    fn random_units_spread_over_the_interval() {
        let v: Vec<f64> = (0..2000).map(|_| random_unit()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        let low = v.iter().filter(|x| **x < 0.5).count();
        // Binomial(2000, 0.5): ±200 is more than 8 standard deviations.
        assert!((800..1200).contains(&low), "{low} of 2000 below 0.5");
    }
}

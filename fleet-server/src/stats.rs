//! Statistics for experiments: running moments, always-valid confidence
//! sequences, and the Thompson-sampling allocator. Pure functions, no I/O,
//! no clock: experiments call them with their numbers, tests with
//! simulations.
//!
//! # Why confidence *sequences*
//! Operators watch an experiment while it runs. A t-test re-run on every
//! refresh is wrong (peeking inflates its error rate far beyond α). A
//! confidence sequence holds at every sample size at once: the chance that
//! it *ever* excludes the true mean is at most α, so it can be looked at
//! continuously and acted on the moment it excludes zero.
//!
//! We use the asymptotic confidence sequence of Waudby-Smith, Arbour,
//! Sinha, Kennedy and Ramdas ("Time-uniform central limit theory and
//! asymptotic confidence sequences", 2021/2024), the normal-mixture
//! boundary with an estimated variance:
//!
//! ```text
//! mean ± σ̂ · sqrt( 2(nρ² + 1) / (n²ρ²) · ln( sqrt(nρ² + 1) / α ) )
//! ```
//!
//! with ρ tuned to be tightest near `n* = 100` observations. The effect
//! B − A uses one sequence per arm at α/2 each (a union bound), so it is
//! conservative but valid for arms of any sizes.

/// Count, mean and sum of squared deviations (Welford), mergeable.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    /// The sample variance (0 below two observations).
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            (self.m2 / (self.n - 1) as f64).max(0.0)
        }
    }
}

/// Observations before a sequence is reported at all.
pub const MIN_N: u64 = 5;

/// The sample size the sequence is tightest at.
const N_STAR: f64 = 100.0;

/// Half-width of the asymptotic confidence sequence for a mean after `n`
/// observations with sample variance `var`, at level `alpha`.
pub fn cs_half_width(n: u64, var: f64, alpha: f64) -> f64 {
    if n == 0 {
        return f64::INFINITY;
    }
    let n = n as f64;
    let l = -2.0 * alpha.ln();
    let rho2 = (l + (l + 1.0).ln()) / N_STAR;
    let a = n * rho2 + 1.0;
    let radius = (2.0 * a / (n * n * rho2) * (a.sqrt() / alpha).ln()).sqrt();
    var.max(0.0).sqrt() * radius
}

/// A mean with its always-valid interval at `alpha` (None below [`MIN_N`]).
pub fn interval(m: &Moments, alpha: f64) -> Option<(f64, f64, f64)> {
    if m.n < MIN_N {
        return None;
    }
    let h = cs_half_width(m.n, m.variance(), alpha);
    Some((m.mean, m.mean - h, m.mean + h))
}

/// B − A with an always-valid interval at `alpha` (each arm at α/2).
pub fn effect(a: &Moments, b: &Moments, alpha: f64) -> Option<(f64, f64, f64)> {
    let (ma, la, ha) = interval(a, alpha / 2.0)?;
    let (mb, lb, hb) = interval(b, alpha / 2.0)?;
    Some((mb - ma, lb - ha, hb - la))
}

/// A small deterministic generator (splitmix64): the allocator takes one
/// so simulations are seeded and repeatable.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The posterior probability that B is better than A, by Thompson draws
/// from normal posteriors of each arm's mean (a flat prior; an arm with
/// fewer than two observations is maximally uncertain).
pub fn prob_b_better(a: &Moments, b: &Moments, higher_is_better: bool, rng: &mut Rng) -> f64 {
    if a.n < 2 || b.n < 2 {
        return 0.5;
    }
    const DRAWS: u32 = 2000;
    let sd = |m: &Moments| (m.variance() / m.n as f64).sqrt();
    let (sa, sb) = (sd(a), sd(b));
    let mut wins = 0u32;
    for _ in 0..DRAWS {
        let xa = a.mean + sa * rng.normal();
        let xb = b.mean + sb * rng.normal();
        if (xb > xa) == higher_is_better && xb != xa {
            wins += 1;
        }
    }
    f64::from(wins) / f64::from(DRAWS)
}

/// One device as the allocator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub device: String,
    /// On B now.
    pub on_b: bool,
    /// Arm changes in the last hour.
    pub recent_switches: u32,
    /// May go to B (it runs A, so it can come back).
    pub may_go_b: bool,
}

/// Allocation limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Each arm keeps at least this share of the devices.
    pub min_share: f64,
    pub max_switches_per_hour: u32,
}

/// Thompson allocation: the share of devices on B follows the posterior
/// probability that B is better, clamped to `[min_share, 1 − min_share]`.
/// Returns the devices to move (id, to B?). Devices over their switch
/// budget stay; among the rest, those switched least move first.
pub fn allocate(
    a: &Moments,
    b: &Moments,
    higher_is_better: bool,
    slots: &[Slot],
    limits: Limits,
    rng: &mut Rng,
) -> Vec<(String, bool)> {
    if slots.is_empty() {
        return Vec::new();
    }
    let p = prob_b_better(a, b, higher_is_better, rng);
    let share = p.clamp(limits.min_share, 1.0 - limits.min_share);
    let n = slots.len();
    let want_b = ((share * n as f64).round() as usize).min(n);
    let on_b = slots.iter().filter(|s| s.on_b).count();
    let movable = |s: &&Slot| s.recent_switches < limits.max_switches_per_hour;
    let mut moves = Vec::new();
    if want_b > on_b {
        let mut c: Vec<&Slot> = slots
            .iter()
            .filter(|s| !s.on_b && s.may_go_b)
            .filter(movable)
            .collect();
        c.sort_by(|x, y| {
            x.recent_switches
                .cmp(&y.recent_switches)
                .then(x.device.cmp(&y.device))
        });
        moves.extend(
            c.into_iter()
                .take(want_b - on_b)
                .map(|s| (s.device.clone(), true)),
        );
    } else if on_b > want_b {
        let mut c: Vec<&Slot> = slots.iter().filter(|s| s.on_b).filter(movable).collect();
        c.sort_by(|x, y| {
            x.recent_switches
                .cmp(&y.recent_switches)
                .then(x.device.cmp(&y.device))
        });
        moves.extend(
            c.into_iter()
                .take(on_b - want_b)
                .map(|s| (s.device.clone(), false)),
        );
    }
    moves
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn moments(xs: &[f64]) -> Moments {
        let mut m = Moments::default();
        for x in xs {
            m.push(*x);
        }
        m
    }

    #[test]
    fn moments_match_the_textbook_formulas() {
        let m = moments(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m.n, 8);
        assert!((m.mean - 5.0).abs() < 1e-12);
        assert!((m.variance() - 32.0 / 7.0).abs() < 1e-12);
        let mut n = m;
        n.push(f64::NAN);
        assert_eq!(n, m, "non-finite values are ignored");
    }

    #[test]
    fn the_sequence_shrinks_with_n_and_is_wider_than_a_fixed_n_interval() {
        let w = |n| cs_half_width(n, 1.0, 0.05);
        assert!(w(10) > w(100) && w(100) > w(1000) && w(1000) > w(100_000));
        // At n*, wider than the fixed-n 1.96/sqrt(n) (the price of peeking),
        // but within a small factor of it.
        let fixed = 1.96 / 100f64.sqrt();
        assert!(w(100) > fixed && w(100) < 2.0 * fixed, "{}", w(100));
        assert_eq!(cs_half_width(100, 0.0, 0.05), 0.0);
    }

    /// Under the null (A and B the same), watching after every observation
    /// for 2000 observations, the sequence excludes 0 in at most about α of
    /// the runs. A t-interval re-checked the same way does far worse.
    #[test]
    fn peeking_at_every_step_keeps_the_error_rate_near_alpha() {
        let mut rng = Rng::new(7);
        let runs = 300;
        let (mut cs_false, mut t_false) = (0, 0);
        for _ in 0..runs {
            let (mut a, mut b) = (Moments::default(), Moments::default());
            let (mut cs_hit, mut t_hit) = (false, false);
            for _ in 0..2000 {
                a.push(rng.normal());
                b.push(rng.normal());
                if let Some((_, lo, hi)) = effect(&a, &b, 0.05)
                    && (lo > 0.0 || hi < 0.0)
                {
                    cs_hit = true;
                }
                if a.n >= MIN_N {
                    let se = (a.variance() / a.n as f64 + b.variance() / b.n as f64).sqrt();
                    if ((b.mean - a.mean) / se).abs() > 1.96 {
                        t_hit = true;
                    }
                }
            }
            cs_false += u32::from(cs_hit);
            t_false += u32::from(t_hit);
        }
        let cs_rate = f64::from(cs_false) / f64::from(runs);
        let t_rate = f64::from(t_false) / f64::from(runs);
        assert!(cs_rate <= 0.06, "confidence sequence: {cs_rate}");
        assert!(t_rate > 0.25, "peeking at a t-test: {t_rate}");
    }

    #[test]
    fn a_real_difference_is_found() {
        let mut rng = Rng::new(11);
        let (mut a, mut b) = (Moments::default(), Moments::default());
        for _ in 0..400 {
            a.push(10.0 + rng.normal());
            b.push(9.0 + rng.normal());
        }
        let (e, lo, hi) = effect(&a, &b, 0.05).unwrap();
        assert!(
            (e + 1.0).abs() < 0.3 && hi < 0.0 && lo < e,
            "{e} [{lo}, {hi}]"
        );
    }

    fn slots(n: usize, on_b: usize) -> Vec<Slot> {
        (0..n)
            .map(|i| Slot {
                device: format!("d{i:03}"),
                on_b: i < on_b,
                recent_switches: 0,
                may_go_b: true,
            })
            .collect()
    }

    #[test]
    fn the_allocator_respects_min_share_and_switch_budgets() {
        let mut rng = Rng::new(3);
        let a = moments(&[1.0, 1.1, 0.9, 1.0, 1.05, 0.95]);
        let b = moments(&[5.0, 5.1, 4.9, 5.0, 5.05, 4.95]);
        // B is clearly better (higher): all but min_share move to B.
        let limits = Limits {
            min_share: 0.1,
            max_switches_per_hour: 1,
        };
        let moves = allocate(&a, &b, true, &slots(20, 10), limits, &mut rng);
        assert_eq!(moves.len(), 8);
        assert!(moves.iter().all(|(_, to_b)| *to_b));
        // Devices that switched this hour stay put.
        let mut s = slots(20, 10);
        for x in s.iter_mut().skip(10).take(5) {
            x.recent_switches = 1;
        }
        let moves = allocate(&a, &b, true, &s, limits, &mut rng);
        assert_eq!(moves.len(), 5);
        // A device that never ran A cannot be sent to B (no way back).
        let mut s = slots(20, 10);
        for x in s.iter_mut().skip(10) {
            x.may_go_b = false;
        }
        assert!(allocate(&a, &b, true, &s, limits, &mut rng).is_empty());
        // Lower is better: B loses its devices down to min_share.
        let moves = allocate(&a, &b, false, &slots(20, 10), limits, &mut rng);
        assert_eq!(moves.len(), 8);
        assert!(moves.iter().all(|(_, to_b)| !*to_b));
    }

    /// Simulation: Bernoulli-like rewards, arm B better by `gap`. The bandit
    /// re-allocates every round (each device may switch once a round); the
    /// regret (reward lost against always using the better arm) is summed.
    pub fn simulate(seed: u64, gap: f64, rounds: u32, bandit: bool) -> f64 {
        let mut rng = Rng::new(seed);
        let n = 50;
        let (pa, pb) = (0.5, 0.5 + gap);
        let mut s = slots(n, n / 2);
        let (mut a, mut b) = (Moments::default(), Moments::default());
        let mut regret = 0.0;
        let limits = Limits {
            min_share: 0.1,
            max_switches_per_hour: 1,
        };
        for _ in 0..rounds {
            for slot in &s {
                let p = if slot.on_b { pb } else { pa };
                let r = if rng.unit() < p { 1.0 } else { 0.0 };
                if slot.on_b {
                    b.push(r);
                } else {
                    a.push(r);
                }
                regret += pb - p;
            }
            if bandit {
                for (dev, to_b) in allocate(&a, &b, true, &s, limits, &mut rng) {
                    if let Some(x) = s.iter_mut().find(|x| x.device == dev) {
                        x.on_b = to_b;
                    }
                }
            }
        }
        regret
    }

    #[test]
    fn thompson_converges_on_the_better_arm_with_less_regret_than_a_fixed_split() {
        for gap in [0.05, 0.1, 0.2] {
            let (mut bandit, mut fixed) = (0.0, 0.0);
            for seed in 0..10 {
                bandit += simulate(seed, gap, 60, true);
                fixed += simulate(seed, gap, 60, false);
            }
            assert!(
                bandit < 0.6 * fixed,
                "gap {gap}: bandit regret {bandit}, fixed split {fixed}"
            );
        }
    }

    /// The regret table in docs/experiments.md (printed with
    /// `cargo test -p fleet-server --lib regret_table -- --nocapture`):
    /// the bandit beats the fixed split at every gap.
    #[test]
    fn regret_table() {
        println!("| gap (B − A) | fixed 50/50 split | Thompson | ratio |");
        println!("|---|---|---|---|");
        for gap in [0.02, 0.05, 0.1, 0.2] {
            let (mut bandit, mut fixed) = (0.0, 0.0);
            for seed in 0..20 {
                bandit += simulate(seed, gap, 60, true);
                fixed += simulate(seed, gap, 60, false);
            }
            assert!(bandit < fixed, "gap {gap}: {bandit} vs {fixed}");
            println!(
                "| {gap} | {:.1} | {:.1} | {:.2} |",
                fixed / 20.0,
                bandit / 20.0,
                bandit / fixed
            );
        }
    }
}

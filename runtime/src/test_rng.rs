//! A small deterministic generator for the unit tests: their cases must
//! be the same on every run.

pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One of `(k - 1000) / divisor` for `k` in `0..=2000`: zero included.
    pub fn centred(&mut self, divisor: f32) -> f32 {
        (self.below(2001) as f32 - 1000.0) / divisor
    }

    pub fn values(&mut self, len: usize, divisor: f32) -> Vec<f32> {
        (0..len).map(|_| self.centred(divisor)).collect()
    }
}

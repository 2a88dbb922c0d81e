//! Rate limits, in memory, with token buckets:
//!
//! - **failed authentication, per source address** (bad bearer tokens,
//!   bad enrollment tokens, bad broker logins): a burst, then one attempt
//!   per refill interval. A locked-out address gets 429 with `Retry-After`
//!   for anything without valid credentials, and every attempt while
//!   locked out extends the lockout (backoff, capped). Requests *with*
//!   valid credentials always pass the address check, so an honest fleet
//!   behind one NAT address (or 10,000 simulated devices on loopback) is
//!   never throttled by an attacker beside it, and never by its own
//!   successful traffic: only failures count.
//! - **authenticated traffic, per device and per operator token**: far
//!   above what an agent or fleetctl does (an agent checks in every 30 s),
//!   so only a runaway or hostile client meets it.
//!
//! The tables are bounded: idle entries (full buckets) are dropped when a
//! table reaches its cap, and past the cap new keys share one bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Failed authentications an address may make at once. Default 20.
    pub auth_failure_burst: u32,
    /// Then this many per minute. Default 6.
    pub auth_failures_per_minute: u32,
    /// The longest lockout, however long the attempts go on. Default 3600.
    pub max_lockout_secs: u64,
    /// Requests a device may make at once. Default 120.
    pub device_burst: u32,
    /// Then this many per second. Default 5.
    pub device_requests_per_sec: u32,
    /// Requests an operator token may make at once. Default 2000.
    pub token_burst: u32,
    /// Then this many per second. Default 500.
    pub token_requests_per_sec: u32,
    /// Entries kept per table. Default 200,000.
    pub max_tracked: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            auth_failure_burst: 20,
            auth_failures_per_minute: 6,
            max_lockout_secs: 3600,
            device_burst: 120,
            device_requests_per_sec: 5,
            token_burst: 2000,
            token_requests_per_sec: 500,
            max_tracked: 200_000,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("auth_failure_burst", self.auth_failure_burst),
            ("auth_failures_per_minute", self.auth_failures_per_minute),
            ("device_burst", self.device_burst),
            ("device_requests_per_sec", self.device_requests_per_sec),
            ("token_burst", self.token_burst),
            ("token_requests_per_sec", self.token_requests_per_sec),
        ] {
            if v == 0 {
                return Err(format!("[limits] {name} must be > 0"));
            }
        }
        if self.max_tracked < 16 {
            return Err("[limits] max_tracked must be >= 16".into());
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One table of buckets with the same rate.
#[derive(Debug)]
struct Table<K> {
    burst: f64,
    per_sec: f64,
    /// How far below zero failures may push a bucket (the longest lockout).
    floor: f64,
    max: usize,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> Table<K> {
    fn new(burst: u32, per_sec: f64, max_wait: Duration, max: usize) -> Self {
        Table {
            burst: f64::from(burst),
            per_sec,
            floor: -(max_wait.as_secs_f64() * per_sec),
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * self.per_sec).min(self.burst);
        b.at = now;
    }

    /// Applies `f` to the key's bucket (created full).
    fn with<T>(&self, key: &K, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.max && !map.contains_key(key) {
            // Drop whoever is idle (full again); if nobody is, the new key
            // waits for room by sharing the fate of the oldest entry.
            map.retain(|_, b| {
                let dt = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + dt * self.per_sec < self.burst
            });
            if map.len() >= self.max
                && let Some(k) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone())
            {
                map.remove(&k);
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(b, now);
        f(b)
    }

    fn wait(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens) / self.per_sec).max(0.0))
            .max(Duration::from_secs(1))
    }

    /// Takes one token: `Err(wait)` when there is none.
    fn take(&self, key: &K) -> Result<(), Duration> {
        self.with(key, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                Err(self.wait(b.tokens))
            }
        })
    }

    /// Charges one, going below zero down to the floor (a penalty).
    fn charge(&self, key: &K) {
        self.with(key, |b| b.tokens = (b.tokens - 1.0).max(self.floor));
    }

    /// `Some(wait)` while the bucket has no token.
    fn empty(&self, key: &K) -> Option<Duration> {
        self.with(key, |b| (b.tokens < 1.0).then(|| self.wait(b.tokens)))
    }
}

/// What was over its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    AuthFailures,
    Device,
    Token,
}

impl Limited {
    pub fn as_str(self) -> &'static str {
        match self {
            Limited::AuthFailures => "auth_failures",
            Limited::Device => "device",
            Limited::Token => "token",
        }
    }
}

/// The server's rate limits.
#[derive(Debug)]
pub struct Limits {
    sources: Table<IpAddr>,
    devices: Table<String>,
    tokens: Table<String>,
    /// Requests refused, by [`Limited`].
    pub refused: [AtomicU64; 3],
    /// Failed authentications counted.
    pub auth_failures: AtomicU64,
}

impl Limits {
    pub fn new(c: &LimitsConfig) -> Limits {
        let max_lockout = Duration::from_secs(c.max_lockout_secs);
        Limits {
            sources: Table::new(
                c.auth_failure_burst,
                f64::from(c.auth_failures_per_minute) / 60.0,
                max_lockout,
                c.max_tracked,
            ),
            devices: Table::new(
                c.device_burst,
                f64::from(c.device_requests_per_sec),
                Duration::ZERO,
                c.max_tracked,
            ),
            tokens: Table::new(
                c.token_burst,
                f64::from(c.token_requests_per_sec),
                Duration::ZERO,
                c.max_tracked,
            ),
            refused: Default::default(),
            auth_failures: AtomicU64::new(0),
        }
    }

    fn refuse(&self, what: Limited, wait: Duration) -> (Limited, Duration) {
        self.refused[what as usize].fetch_add(1, Relaxed);
        (what, wait)
    }

    /// Before handling a request without valid credentials from `ip`:
    /// `Err` while the address is locked out (and the attempt extends it).
    pub fn unauthenticated(&self, ip: IpAddr) -> Result<(), (Limited, Duration)> {
        match self.sources.empty(&ip) {
            Some(_) => {
                self.sources.charge(&ip);
                let wait = self.sources.empty(&ip).unwrap_or(Duration::from_secs(1));
                Err(self.refuse(Limited::AuthFailures, wait))
            }
            None => Ok(()),
        }
    }

    /// After a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.auth_failures.fetch_add(1, Relaxed);
        self.sources.charge(&ip);
    }

    /// One request of device `id`.
    pub fn device(&self, id: &str) -> Result<(), (Limited, Duration)> {
        self.devices
            .take(&id.to_string())
            .map_err(|w| self.refuse(Limited::Device, w))
    }

    /// One request with operator token `name`.
    pub fn token(&self, name: &str) -> Result<(), (Limited, Duration)> {
        self.tokens
            .take(&name.to_string())
            .map_err(|w| self.refuse(Limited::Token, w))
    }

    /// Prometheus lines.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        crate::metrics::family(
            out,
            "fleet_rate_limited_total",
            "counter",
            "Requests and broker logins refused with 429 (or CONNACK refused), by limit.",
        );
        for l in [Limited::AuthFailures, Limited::Device, Limited::Token] {
            let _ = writeln!(
                out,
                "fleet_rate_limited_total{{limit=\"{}\"}} {}",
                l.as_str(),
                self.refused[l as usize].load(Relaxed)
            );
        }
        crate::metrics::counter(
            out,
            "fleet_auth_failures_total",
            "Failed authentications (API and broker).",
            self.auth_failures.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            auth_failure_burst: 3,
            auth_failures_per_minute: 60,
            max_lockout_secs: 10,
            device_burst: 2,
            device_requests_per_sec: 1,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn failures_lock_an_address_out_and_attempts_extend_it() {
        let l = Limits::new(&cfg());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.unauthenticated(ip).is_ok());
            l.failed(ip);
        }
        let (what, wait1) = l.unauthenticated(ip).unwrap_err();
        assert_eq!(what, Limited::AuthFailures);
        for _ in 0..5 {
            let _ = l.unauthenticated(ip);
        }
        let (_, wait2) = l.unauthenticated(ip).unwrap_err();
        assert!(wait2 > wait1, "{wait1:?} then {wait2:?}");
        // Capped, and nobody else is affected.
        for _ in 0..1000 {
            let _ = l.unauthenticated(ip);
        }
        let (_, wait3) = l.unauthenticated(ip).unwrap_err();
        assert!(wait3 <= Duration::from_secs(12), "{wait3:?}");
        assert!(l.unauthenticated(other).is_ok());
        assert!(l.refused[Limited::AuthFailures as usize].load(Relaxed) > 1000);
    }

    #[test]
    fn devices_have_their_own_budgets() {
        let l = Limits::new(&cfg());
        assert!(l.device("a").is_ok());
        assert!(l.device("a").is_ok());
        assert_eq!(l.device("a").unwrap_err().0, Limited::Device);
        assert!(l.device("b").is_ok());
    }

    #[test]
    fn tables_stay_bounded() {
        let l = Limits::new(&LimitsConfig {
            max_tracked: 16,
            ..cfg()
        });
        for i in 0..10_000 {
            let _ = l.device(&format!("d{i}"));
        }
        let n = l.devices.map.lock().unwrap().len();
        assert!(n <= 16, "{n}");
    }
}

//! The wall clock, in the unit every record and message uses: unix seconds.
//! Pure code takes `now` as an argument; only drivers call this.

/// Current unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

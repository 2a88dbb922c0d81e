//! Human durations as operators type them: `30s`, `10m`, `12h`, `90d`.

use crate::error::{Error, Result};

/// Parses `<digits><unit>` with unit `s`, `m`, `h` or `d` into seconds.
/// A bare number is rejected: units are never guessed.
pub fn parse_duration(s: &str) -> Result<u64> {
    let bad = || {
        Error::Usage(format!(
            "bad duration {s:?}: use a number followed by s, m, h or d (e.g. 30s, 10m, 12h, 90d)"
        ))
    };
    let unit = s.chars().last().ok_or_else(bad)?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Formats unix seconds as RFC 3339 UTC (`2026-11-22T11:26:36Z`).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("30s").unwrap(), 30);
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("90d").unwrap(), 7_776_000);
    }

    #[test]
    fn rejects_missing_or_unknown_units_and_overflow() {
        for s in ["", "30", "d", "5w", "-3d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_347_996), "2026-11-22T11:46:36Z");
    }
}

//! Maintenance windows: when a device may activate a new model.
//!
//! A [`Schedule`] is a list of windows and an optional IANA time zone. A
//! schedule without a zone is read in the device's own time zone. Each
//! window is one of:
//!
//! - **days and a time range**: `Mon-Fri 02:00-04:00`, `Sat,Sun
//!   00:00-24:00`, `daily 22:30-05:00` (a range that ends at or before its
//!   start runs past midnight into the next day), `weekdays 01:00-03:00`,
//!   `weekends …`, or just `02:00-04:00` (every day). The days name the
//!   day a window *opens*.
//! - **cron-like**: `cron <minute> <hour> <day-of-month> <month>
//!   <day-of-week> [for] <duration>`, e.g. `cron 0 2 * * 1-5 for 2h`: the
//!   window opens at every time the five fields match (standard cron
//!   syntax: `*`, lists, ranges, `/step`; day of week 0-7 with 0 and 7
//!   Sunday, or `mon`…`sun`; when both day fields are restricted either
//!   may match) and stays open for the duration (`90m`, `2h`, `1h30m`,
//!   `1d`; at most 7 days).
//!
//! Evaluation is pure: it takes the time (unix seconds) and the zone. On
//! daylight-saving days a wall time that does not exist (02:30 when the
//! clocks jump from 02:00 to 03:00) is read with the offset after the
//! jump, the earlier of the two instants, so a window keeps its length; a wall time that happens twice is
//! its first occurrence.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// At most this many windows per schedule.
pub const MAX_WINDOWS: usize = 16;
/// The longest window spec accepted, in bytes.
pub const MAX_SPEC_LEN: usize = 120;
/// The longest cron-window duration, in minutes (7 days).
pub const MAX_DURATION_MIN: u32 = 7 * 24 * 60;

/// When activations are allowed (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Schedule {
    /// `Mon-Fri 02:00-04:00`, `daily 22:00-05:00`, `cron 0 2 * * 1-5 for 2h`.
    pub windows: Vec<String>,
    /// IANA name (`Europe/Berlin`, `UTC`); unset: the device's own zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// Why a schedule is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("a schedule needs at least one window")]
    Empty,
    #[error("at most {MAX_WINDOWS} windows per schedule")]
    TooMany,
    #[error("window {spec:?}: {why}")]
    Invalid { spec: String, why: String },
    #[error("unknown time zone {0:?}")]
    UnknownZone(String),
}

/// A parsed window.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// Opens on `days` (bit 0 Monday … bit 6 Sunday) at `start` minutes
    /// after midnight, closes at `end` (same day when `end > start`, else
    /// the next day; 1440 is midnight at the end of the day).
    Range {
        days: u8,
        start: u16,
        end: u16,
    },
    Cron(Box<Cron>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Cron {
    minutes: u64,
    hours: u32,
    /// Bits 1..=31.
    doms: u32,
    /// Bits 1..=12.
    months: u16,
    /// Bit 0 Sunday … bit 6 Saturday.
    dows: u8,
    dom_any: bool,
    dow_any: bool,
    duration_min: u32,
}

impl Cron {
    fn matches_day(&self, d: Date) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.doms & (1 << d.day()) != 0;
        let dow = self.dows & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            // Cron's rule: with both restricted, either may match.
            (false, false) => dom || dow,
        }
    }
}

/// A validated schedule, ready to evaluate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    rules: Vec<Rule>,
}

impl Schedule {
    /// Parses every window. The zone name is checked by the caller, which
    /// knows where zones come from ([`Schedule::zone`]).
    pub fn compile(&self) -> Result<Compiled, WindowError> {
        if self.windows.is_empty() {
            return Err(WindowError::Empty);
        }
        if self.windows.len() > MAX_WINDOWS {
            return Err(WindowError::TooMany);
        }
        let rules = self
            .windows
            .iter()
            .map(|s| {
                parse_rule(s).map_err(|why| WindowError::Invalid {
                    spec: s.chars().take(MAX_SPEC_LEN).collect(),
                    why,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Compiled { rules })
    }

    /// The zone to read the schedule in: its own, or `device` when unset.
    pub fn zone(&self, device: &TimeZone) -> Result<TimeZone, WindowError> {
        match &self.time_zone {
            None => Ok(device.clone()),
            Some(name) => TimeZone::get(name).map_err(|_| WindowError::UnknownZone(name.clone())),
        }
    }

    /// One line for humans: `Mon-Fri 02:00-04:00; Sat 00:00-24:00
    /// (Europe/Berlin)`.
    pub fn describe(&self) -> String {
        let zone = self.time_zone.as_deref().unwrap_or("device time");
        format!("{} ({zone})", self.windows.join("; "))
    }
}

/// The first date of the scan for windows open at a given day: cron
/// windows last up to 7 days, overnight ranges one.
const LOOKBACK_DAYS: i64 = 8;
/// How far ahead the next opening is looked for (a Feb 29 window opens
/// once in four years).
const LOOKAHEAD_DAYS: i64 = 4 * 366 + 1;

impl Compiled {
    /// Whether a window is open at `now` (unix seconds) in `tz`.
    pub fn is_open(&self, now: u64, tz: &TimeZone) -> bool {
        let Some(today) = local_date(now, tz) else {
            return false;
        };
        let now = now as i64;
        let mut day = shift(today, -LOOKBACK_DAYS);
        while let Some(d) = day {
            if d > today {
                break;
            }
            if self.intervals(d, tz).any(|(s, e)| s <= now && now < e) {
                return true;
            }
            day = d.tomorrow().ok();
        }
        false
    }

    /// The next time after `now` a window opens (unix seconds), if any
    /// within four years. Meaningful when [`Compiled::is_open`] is false.
    pub fn next_open(&self, now: u64, tz: &TimeZone) -> Option<u64> {
        let today = local_date(now, tz)?;
        let now = now as i64;
        let mut day = shift(today, -1);
        for _ in 0..LOOKAHEAD_DAYS + 1 {
            let d = day?;
            // Openings of one day all come after those of the days before.
            if let Some(s) = self
                .intervals(d, tz)
                .map(|(s, _)| s)
                .filter(|s| *s > now)
                .min()
            {
                return u64::try_from(s).ok();
            }
            day = d.tomorrow().ok();
        }
        None
    }

    /// When the window open at `now` closes (unix seconds); `None` when
    /// none is open. Overlapping windows are not merged.
    pub fn closes_at(&self, now: u64, tz: &TimeZone) -> Option<u64> {
        let today = local_date(now, tz)?;
        let now = now as i64;
        let mut best: Option<i64> = None;
        let mut day = shift(today, -LOOKBACK_DAYS);
        while let Some(d) = day {
            if d > today {
                break;
            }
            for (s, e) in self.intervals(d, tz) {
                if s <= now && now < e {
                    best = Some(best.map_or(e, |b| b.max(e)));
                }
            }
            day = d.tomorrow().ok();
        }
        best.and_then(|b| u64::try_from(b).ok())
    }

    /// The windows that open on local date `d`, as `[start, end)` unix
    /// seconds.
    fn intervals<'a>(&'a self, d: Date, tz: &'a TimeZone) -> impl Iterator<Item = (i64, i64)> + 'a {
        self.rules.iter().flat_map(move |rule| {
            let mut out = Vec::new();
            match rule {
                Rule::Range { days, start, end } => {
                    if days & (1 << d.weekday().to_monday_zero_offset()) != 0 {
                        let s = at(d, *start, tz);
                        let e = if end > start {
                            at(d, *end, tz)
                        } else {
                            shift(d, 1).and_then(|n| at(n, *end, tz))
                        };
                        if let (Some(s), Some(e)) = (s, e) {
                            out.push((s, e));
                        }
                    }
                }
                Rule::Cron(c) => {
                    if c.matches_day(d) {
                        for h in (0..24).filter(|h| c.hours & (1 << h) != 0) {
                            for m in (0..60).filter(|m| c.minutes & (1u64 << m) != 0) {
                                if let Some(s) = at(d, h * 60 + m, tz) {
                                    out.push((s, s + i64::from(c.duration_min) * 60));
                                }
                            }
                        }
                    }
                }
            }
            out
        })
    }
}

fn local_date(now: u64, tz: &TimeZone) -> Option<Date> {
    let ts = Timestamp::from_second(i64::try_from(now).ok()?).ok()?;
    Some(tz.to_datetime(ts).date())
}

fn shift(d: Date, days: i64) -> Option<Date> {
    d.checked_add(jiff::Span::new().try_days(days).ok()?).ok()
}

/// Unix seconds of `minutes` after local midnight of `d` (1440: the next
/// midnight).
fn at(d: Date, minutes: u16, tz: &TimeZone) -> Option<i64> {
    let (d, minutes) = if minutes >= 1440 {
        (shift(d, 1)?, minutes - 1440)
    } else {
        (d, minutes)
    };
    let dt = d.at((minutes / 60) as i8, (minutes % 60) as i8, 0, 0);
    tz.to_ambiguous_timestamp(dt)
        .earlier()
        .ok()
        .map(Timestamp::as_second)
}

// ---------- parsing ----------

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn parse_rule(spec: &str) -> Result<Rule, String> {
    if spec.len() > MAX_SPEC_LEN {
        return Err(format!("longer than {MAX_SPEC_LEN} bytes"));
    }
    let lower = spec.trim().to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    match words.as_slice() {
        ["cron", rest @ ..] => parse_cron(rest),
        [range] if range.contains(':') => parse_range(0x7f, range),
        [days, range] => parse_range(parse_days(days)?, range),
        _ => Err(
            "expected `<days> HH:MM-HH:MM` (e.g. `Mon-Fri 02:00-04:00`) or `cron <min> <hour> <dom> <month> <dow> for <duration>`"
                .into(),
        ),
    }
}

fn parse_days(s: &str) -> Result<u8, String> {
    match s {
        "daily" | "everyday" | "*" => return Ok(0x7f),
        "weekdays" => return Ok(0x1f),
        "weekends" => return Ok(0x60),
        _ => {}
    }
    let day = |w: &str| -> Result<u8, String> {
        DAY_NAMES
            .iter()
            .position(|n| w.len() >= 3 && n.starts_with(&w[..3]) && full_name(n).starts_with(w))
            .map(|i| i as u8)
            .ok_or_else(|| {
                format!("unknown day {w:?} (use mon … sun, daily, weekdays or weekends)")
            })
    };
    let mut mask = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                // Fri-Mon wraps over the weekend.
                let mut i = a;
                loop {
                    mask |= 1 << i;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

fn full_name(short: &str) -> &'static str {
    match short {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

fn parse_time(s: &str) -> Result<u16, String> {
    let bad = || format!("bad time {s:?} (use HH:MM, 00:00 to 24:00)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn parse_range(days: u8, s: &str) -> Result<Rule, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("bad time range {s:?} (use HH:MM-HH:MM)"))?;
    let (start, end) = (parse_time(a)?, parse_time(b)?);
    if start == 1440 {
        return Err("a window cannot open at 24:00; use 00:00".into());
    }
    if start == end {
        return Err(format!(
            "the range {s:?} is empty; for a whole day use 00:00-24:00"
        ));
    }
    Ok(Rule::Range { days, start, end })
}

/// A cron field as a bit set over `lo..=hi`; `names` are matched too.
fn cron_field(s: &str, lo: u32, hi: u32, names: &[&str]) -> Result<(u64, bool), String> {
    let any = s == "*";
    let value = |w: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| *n == w) {
            return Ok(i as u32 + lo);
        }
        let v: u32 = w.parse().map_err(|_| format!("bad cron value {w:?}"))?;
        if v < lo || v > hi {
            return Err(format!("cron value {v} outside {lo}-{hi}"));
        }
        Ok(v)
    };
    let mut mask = 0u64;
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st: u32 = st
                    .parse()
                    .ok()
                    .filter(|st| *st > 0)
                    .ok_or_else(|| format!("bad cron step {st:?}"))?;
                (r, st)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/15` means from 5 to the end in steps of 15.
            (v, if step > 1 { hi } else { v })
        };
        if a > b {
            return Err(format!("bad cron range {range:?}"));
        }
        let mut v = a;
        while v <= b {
            mask |= 1 << v;
            v += step;
        }
    }
    Ok((mask, any))
}

fn parse_duration(s: &str) -> Result<u32, String> {
    let bad = || format!("bad duration {s:?} (use e.g. 90m, 2h, 1h30m, 1d)");
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            'm' => 1,
            'h' => 60,
            'd' => 1440,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(unit));
        num.clear();
    }
    if !num.is_empty() || total == 0 {
        return Err(bad());
    }
    if total > u64::from(MAX_DURATION_MIN) {
        return Err(format!("duration {s:?} is longer than 7 days"));
    }
    Ok(total as u32)
}

fn parse_cron(words: &[&str]) -> Result<Rule, String> {
    let (fields, duration) = match words {
        [m, h, dom, mon, dow, "for", d] | [m, h, dom, mon, dow, d] => {
            ([*m, *h, *dom, *mon, *dow], *d)
        }
        _ => {
            return Err(
                "a cron window is `cron <minute> <hour> <day-of-month> <month> <day-of-week> for <duration>`"
                    .into(),
            );
        }
    };
    let (minutes, _) = cron_field(fields[0], 0, 59, &[])?;
    let (hours, _) = cron_field(fields[1], 0, 23, &[])?;
    let (doms, dom_any) = cron_field(fields[2], 1, 31, &[])?;
    let months_names = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let (months, _) = cron_field(fields[3], 1, 12, &months_names)?;
    let (dows, dow_any) = cron_field(
        fields[4],
        0,
        7,
        &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    )?;
    // 7 is Sunday too.
    let dows = ((dows | (dows >> 7)) & 0x7f) as u8;
    let c = Cron {
        minutes,
        hours: hours as u32,
        doms: doms as u32,
        months: months as u16,
        dows,
        dom_any,
        dow_any,
        duration_min: parse_duration(duration)?,
    };
    // A window that never opens (`30 2 31 2 *`) is a mistake, not a policy.
    let mut d = jiff::civil::date(2024, 1, 1);
    let possible = (0..LOOKAHEAD_DAYS).any(|_| {
        let hit = c.matches_day(d);
        d = d.tomorrow().unwrap_or(d);
        hit
    });
    if !possible {
        return Err("the day-of-month and month fields never match a real date".into());
    }
    Ok(Rule::Cron(Box::new(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::Offset;

    fn sched(w: &[&str]) -> Compiled {
        Schedule {
            windows: w.iter().map(|s| s.to_string()).collect(),
            time_zone: None,
        }
        .compile()
        .unwrap()
    }

    /// Unix seconds of a UTC wall time.
    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> u64 {
        jiff::civil::date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned_datetime(TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second() as u64
    }

    #[test]
    fn day_ranges_open_and_close_on_time() {
        let s = sched(&["Mon-Fri 02:00-04:00"]);
        let tz = TimeZone::UTC;
        // 2026-12-03 is a Thursday.
        assert!(!s.is_open(utc(2026, 12, 3, 1, 59), &tz));
        assert!(s.is_open(utc(2026, 12, 3, 2, 0), &tz));
        assert!(s.is_open(utc(2026, 12, 3, 3, 59), &tz));
        assert!(!s.is_open(utc(2026, 12, 3, 4, 0), &tz));
        assert_eq!(
            s.next_open(utc(2026, 12, 3, 4, 0), &tz),
            Some(utc(2026, 12, 4, 2, 0))
        );
        assert_eq!(
            s.closes_at(utc(2026, 12, 3, 3, 0), &tz),
            Some(utc(2026, 12, 3, 4, 0))
        );
        // Friday after the window: the next one is Monday.
        assert!(!s.is_open(utc(2026, 12, 5, 3, 0), &tz));
        assert_eq!(
            s.next_open(utc(2026, 12, 4, 5, 0), &tz),
            Some(utc(2026, 12, 7, 2, 0))
        );
    }

    #[test]
    fn overnight_ranges_belong_to_the_day_they_open() {
        let s = sched(&["Fri 22:00-06:00"]);
        let tz = TimeZone::UTC;
        assert!(s.is_open(utc(2026, 12, 4, 23, 0), &tz));
        assert!(
            s.is_open(utc(2026, 12, 5, 5, 59), &tz),
            "Saturday morning is Friday's window"
        );
        assert!(!s.is_open(utc(2026, 12, 5, 6, 0), &tz));
        assert!(
            !s.is_open(utc(2026, 12, 4, 5, 0), &tz),
            "Friday morning is Thursday's, closed"
        );
        assert_eq!(
            s.closes_at(utc(2026, 12, 5, 1, 0), &tz),
            Some(utc(2026, 12, 5, 6, 0))
        );
        let all_day = sched(&["weekends 00:00-24:00"]);
        assert!(all_day.is_open(utc(2026, 12, 6, 23, 59), &tz));
        assert!(!all_day.is_open(utc(2026, 12, 7, 0, 0), &tz));
    }

    #[test]
    fn the_device_zone_moves_the_window() {
        // +05:30 all year: 02:00 local is 20:30 UTC the day before.
        let kolkata = TimeZone::fixed(Offset::from_seconds(5 * 3600 + 1800).unwrap());
        let s = sched(&["daily 02:00-03:00"]);
        assert!(s.is_open(utc(2026, 12, 3, 20, 30), &kolkata));
        assert!(!s.is_open(utc(2026, 12, 3, 2, 30), &kolkata));
        assert_eq!(
            s.next_open(utc(2026, 12, 3, 12, 0), &kolkata),
            Some(utc(2026, 12, 3, 20, 30))
        );
    }

    #[test]
    fn daylight_saving_days_keep_local_wall_times() {
        // Needs the system's tz database (Debian's tzdata; `.ci/run` installs it).
        let berlin = TimeZone::get("Europe/Berlin").expect("tzdata is installed");
        let s = sched(&["daily 02:30-03:30"]);
        // 2026-03-29: the clocks jump from 02:00 CET to 03:00 CEST. The
        // window still lasts an hour: 02:30 read at +02:00 is 00:30 UTC,
        // and it closes at 03:30 CEST, 01:30 UTC.
        assert!(s.is_open(utc(2026, 3, 29, 0, 45), &berlin));
        assert!(!s.is_open(utc(2026, 3, 29, 1, 30), &berlin));
        // The next day it is 02:30-03:30 CEST = 00:30-01:30 UTC.
        assert!(s.is_open(utc(2026, 3, 30, 0, 30), &berlin));
        assert!(!s.is_open(utc(2026, 3, 30, 1, 30), &berlin));
        // Winter: 02:30 CET is 01:30 UTC.
        assert!(s.is_open(utc(2026, 12, 3, 1, 30), &berlin));
        assert!(!s.is_open(utc(2026, 12, 3, 0, 30), &berlin));
    }

    #[test]
    fn cron_windows_follow_cron_rules() {
        let tz = TimeZone::UTC;
        let s = sched(&["cron 0 2 * * 1-5 for 2h"]);
        assert!(s.is_open(utc(2026, 12, 3, 3, 0), &tz));
        assert!(!s.is_open(utc(2026, 12, 5, 3, 0), &tz), "Saturday");
        assert_eq!(
            s.next_open(utc(2026, 12, 4, 4, 0), &tz),
            Some(utc(2026, 12, 7, 2, 0))
        );
        // Every 15 minutes for 5 minutes.
        let q = sched(&["cron */15 * * * * 5m"]);
        assert!(q.is_open(utc(2026, 12, 3, 10, 33), &tz));
        assert!(!q.is_open(utc(2026, 12, 3, 10, 37), &tz));
        assert!(q.is_open(utc(2026, 12, 3, 10, 47), &tz));
        assert_eq!(
            q.next_open(utc(2026, 12, 3, 10, 37), &tz),
            Some(utc(2026, 12, 3, 10, 45))
        );
        // Both day fields restricted: either matches (the 1st, or Sundays).
        let e = sched(&["cron 0 0 1 * sun 1d"]);
        assert!(
            e.is_open(utc(2026, 12, 1, 12, 0), &tz),
            "the 1st, a Tuesday"
        );
        assert!(e.is_open(utc(2026, 12, 6, 12, 0), &tz), "a Sunday");
        assert!(!e.is_open(utc(2026, 12, 3, 12, 0), &tz));
        // 7 is Sunday too; a window may run for days.
        let w = sched(&["cron 0 20 * * 7 for 2d"]);
        assert!(
            w.is_open(utc(2026, 12, 8, 19, 0), &tz),
            "Tuesday, 47 h after Sunday 20:00"
        );
        assert!(!w.is_open(utc(2026, 12, 8, 20, 0), &tz));
        // Feb 29 opens once in four years.
        let leap = sched(&["cron 0 0 29 2 * 1h"]);
        assert_eq!(
            leap.next_open(utc(2026, 12, 3, 0, 0), &tz),
            Some(utc(2028, 2, 29, 0, 0))
        );
    }

    #[test]
    fn several_windows_combine() {
        let s = sched(&["Mon-Fri 02:00-04:00", "Sat,Sun 10:00-12:00"]);
        let tz = TimeZone::UTC;
        assert!(s.is_open(utc(2026, 12, 5, 11, 0), &tz));
        assert_eq!(
            s.next_open(utc(2026, 12, 5, 12, 0), &tz),
            Some(utc(2026, 12, 6, 10, 0))
        );
    }

    #[test]
    fn bad_specs_get_precise_errors() {
        let err = |w: &str| {
            Schedule {
                windows: vec![w.into()],
                time_zone: None,
            }
            .compile()
            .unwrap_err()
            .to_string()
        };
        assert!(
            err("Mon-Fri 2-4").contains("bad time"),
            "{}",
            err("Mon-Fri 2-4")
        );
        assert!(err("Funday 02:00-04:00").contains("unknown day"));
        assert!(err("daily 02:00-02:00").contains("empty"));
        assert!(err("daily 25:00-26:00").contains("bad time"));
        assert!(err("cron 0 2 * * *").contains("cron window is"));
        assert!(err("cron 0 2 * * * 9d").contains("longer than 7 days"));
        assert!(err("cron 61 2 * * * 1h").contains("outside 0-59"));
        assert!(err("cron 0 2 31 2 * 1h").contains("never match"));
        assert!(err("sometimes").contains("expected"));
        assert_eq!(Schedule::default().compile(), Err(WindowError::Empty));
        let many = Schedule {
            windows: vec!["daily 01:00-02:00".into(); MAX_WINDOWS + 1],
            time_zone: None,
        };
        assert_eq!(many.compile(), Err(WindowError::TooMany));
        let zone = Schedule {
            windows: vec!["daily 01:00-02:00".into()],
            time_zone: Some("Mars/Olympus".into()),
        };
        assert_eq!(
            zone.zone(&TimeZone::UTC),
            Err(WindowError::UnknownZone("Mars/Olympus".into()))
        );
    }

    #[test]
    fn day_names_and_wrapping_ranges_parse() {
        assert_eq!(parse_days("fri-mon").unwrap(), 0b111_0001);
        assert_eq!(parse_days("monday,wednesday").unwrap(), 0b101);
        assert_eq!(parse_days("weekdays").unwrap(), 0x1f);
        assert!(parse_days("mo").is_err());
        assert!(parse_days("mondays").is_err());
    }
}

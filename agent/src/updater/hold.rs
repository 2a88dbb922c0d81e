//! The activation gate: a ready update (downloaded, verified, self-tested,
//! shadowed) swaps in only inside a maintenance window and when the local
//! app does not defer it.
//!
//! - Windows come with the desired state ([`crate::update::Target::window`])
//!   and are read in the schedule's zone or the device's
//!   (`[update] time_zone`, else the system's).
//! - The local app defers with `POST /v1/defer {"seconds": N}` while busy,
//!   or, with `[update] defer_activation`, every update waits until the app
//!   calls `DELETE /v1/defer`. Either way for at most `max_defer_secs` from
//!   when the update was ready ([`crate::update::Record::ready`], kept
//!   across restarts).
//! - A rollback the server asks for (abort) is never held.
//!
//! [`decide`] is pure (time, target, defer state → open or a [`Hold`]); the
//! driver's effect ([`await_window`]) re-decides every few seconds on the
//! injected clock and at once when the app changes its defer, and reports
//! a hold only when it changes.

use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;
use tokio::sync::Notify;

use super::{Clock, Ctx, Outcome};
use crate::update::{Event, Hold, Target};

/// Unix seconds before which the clock is taken as not set yet (boards
/// without a real-time clock boot in 1970 until NTP answers): windows
/// cannot be judged on it.
pub const CLOCK_PLAUSIBLE_FROM: u64 = 1_700_000_000;

/// How often a hold is re-decided without a nudge (clock jumps, windows
/// opening).
const RECHECK: Duration = Duration::from_secs(5);

/// The local app's defer, as the API set it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defer {
    /// Busy until (unix seconds); 0: not busy.
    pub busy_until: u64,
    pub reason: Option<String>,
    /// The last `DELETE /v1/defer` (unix seconds).
    pub released_at: Option<u64>,
}

/// The device's activation policy and the app's defer.
pub struct Activation {
    pub tz: TimeZone,
    /// The zone's name for people (`Europe/Berlin`, `UTC`, `system`).
    pub zone_name: String,
    pub defer_activation: bool,
    pub max_defer_secs: u64,
    clock: Clock,
    state: Mutex<Defer>,
    /// Woken when the app changes its defer.
    pub changed: Notify,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("zone", &self.zone_name)
            .field("defer_activation", &self.defer_activation)
            .finish_non_exhaustive()
    }
}

/// `GET/POST/DELETE /v1/defer`.
#[derive(Clone, Debug, Serialize)]
pub struct DeferView {
    /// Unix seconds the app said it is busy until, if still ahead.
    pub busy_until: Option<u64>,
    pub reason: Option<String>,
    /// `[update] defer_activation`: updates wait for `DELETE /v1/defer`.
    pub defer_activation: bool,
    pub max_defer_secs: u64,
    /// The zone maintenance windows without their own are read in.
    pub time_zone: String,
    pub now: u64,
}

impl Activation {
    /// The policy of `[update]`: an unknown configured zone was refused by
    /// config validation; without one the system's zone (UTC if none).
    pub fn new(cfg: &crate::config::UpdateSection, clock: Clock) -> Activation {
        let (tz, zone_name) = match cfg.time_zone.as_deref().map(TimeZone::get) {
            Some(Ok(tz)) => (tz, cfg.time_zone.clone().unwrap_or_default()),
            _ => {
                let tz = TimeZone::system();
                let name = tz.iana_name().unwrap_or("system").to_string();
                (tz, name)
            }
        };
        Activation {
            tz,
            zone_name,
            defer_activation: cfg.defer_activation,
            max_defer_secs: cfg.max_defer_secs,
            clock,
            state: Mutex::new(Defer::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Defer> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    pub fn defer_state(&self) -> Defer {
        self.lock().clone()
    }

    /// The app is busy for `secs` more seconds (0: not busy any more).
    /// Capped at `max_defer_secs` from now; the cap from when an update
    /// was ready applies when it is judged.
    pub fn defer(&self, secs: u64, reason: Option<String>) -> DeferView {
        let now = self.now();
        {
            let mut d = self.lock();
            d.busy_until = if secs == 0 {
                0
            } else {
                now.saturating_add(secs.min(self.max_defer_secs))
            };
            d.reason = reason.filter(|_| secs > 0);
        }
        self.changed.notify_waiters();
        self.view()
    }

    /// `DELETE /v1/defer`: not busy, and updates held by
    /// `defer_activation` may go.
    pub fn release(&self) -> DeferView {
        let now = self.now();
        {
            let mut d = self.lock();
            d.busy_until = 0;
            d.reason = None;
            d.released_at = Some(now);
        }
        self.changed.notify_waiters();
        self.view()
    }

    pub fn view(&self) -> DeferView {
        let now = self.now();
        let d = self.defer_state();
        DeferView {
            busy_until: (d.busy_until > now).then_some(d.busy_until),
            reason: d.reason.filter(|_| d.busy_until > now),
            defer_activation: self.defer_activation,
            max_defer_secs: self.max_defer_secs,
            time_zone: self.zone_name.clone(),
            now,
        }
    }
}

/// `at` as local time in `tz`: `2026-12-04T02:00:00+01:00`.
pub fn local_time(at: u64, tz: &TimeZone) -> String {
    match Timestamp::from_second(i64::try_from(at).unwrap_or(i64::MAX)) {
        Ok(ts) => ts.display_with_offset(tz.to_offset(ts)).to_string(),
        Err(_) => at.to_string(),
    }
}

/// Whether `target` may swap in at `now`: `Ok(None)` yes, `Ok(Some(hold))`
/// not yet, `Err` never (its window cannot be read: a bad schedule or an
/// unknown zone).
pub fn decide(
    now: u64,
    target: &Target,
    ready_since: u64,
    defer: &Defer,
    act: &Activation,
) -> Result<Option<Hold>, String> {
    // A rollback the server asks for is an emergency brake: never held.
    if target.rollback {
        return Ok(None);
    }
    if let Some(s) = &target.window {
        let rules = s
            .compile()
            .map_err(|e| format!("maintenance window: {e}"))?;
        let tz = s
            .zone(&act.tz)
            .map_err(|e| format!("maintenance window: {e}"))?;
        if now < CLOCK_PLAUSIBLE_FROM {
            return Ok(Some(Hold {
                reason: format!(
                    "waiting for window: the clock is not set yet (it reads {now}); windows are judged once it is"
                ),
                until: None,
            }));
        }
        if !rules.is_open(now, &tz) {
            let next = rules.next_open(now, &tz);
            let reason = match next {
                Some(at) => format!("waiting for window (next: {})", local_time(at, &tz)),
                None => "waiting for window (none opens within four years)".to_string(),
            };
            return Ok(Some(Hold {
                reason,
                until: next,
            }));
        }
    }
    let deadline = ready_since.saturating_add(act.max_defer_secs);
    if now < deadline {
        if defer.busy_until > now {
            let until = defer.busy_until.min(deadline);
            let why = defer
                .reason
                .as_deref()
                .map_or_else(String::new, |r| format!(" ({r})"));
            return Ok(Some(Hold {
                reason: format!(
                    "deferred by the local app until {}{why}",
                    local_time(until, &act.tz)
                ),
                until: Some(until),
            }));
        }
        let released = defer.released_at.is_some_and(|t| t >= ready_since);
        if act.defer_activation && !released {
            return Ok(Some(Hold {
                reason: format!(
                    "deferred: waiting for the local app to allow the activation (DELETE /v1/defer), at most until {}",
                    local_time(deadline, &act.tz)
                ),
                until: Some(deadline),
            }));
        }
    }
    Ok(None)
}

/// The effect: decides, and while the hold stays what the record says
/// (`held`), waits; returns when the swap may go on, the hold changed, or
/// the window cannot be read.
pub(super) async fn await_window(
    ctx: &Ctx,
    target: &Target,
    ready_since: u64,
    held: Option<Hold>,
) -> Outcome {
    let act = &ctx.activation;
    loop {
        // Registered before deciding: a defer change in between wakes us.
        let changed = act.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = (ctx.clock)();
        match decide(now, target, ready_since, &act.defer_state(), act) {
            Err(reason) => return Outcome::Event(Event::Rejected { reason }),
            Ok(None) => return Outcome::Event(Event::WindowOpen),
            Ok(Some(h)) if held.as_ref() != Some(&h) => {
                return Outcome::Event(Event::Held(h));
            }
            Ok(Some(h)) => {
                let wait = h
                    .until
                    .map_or(RECHECK, |u| Duration::from_secs(u.saturating_sub(now)))
                    .clamp(Duration::from_millis(200), RECHECK);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut changed => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use edgefleet_wire::device::BundleRef;
    use edgefleet_wire::window::Schedule;

    use super::*;

    /// 2026-12-03T12:00:00Z, a Thursday.
    const NOON: u64 = 1_796_299_200;

    fn act(defer_activation: bool) -> Activation {
        let cfg = crate::config::UpdateSection {
            time_zone: Some("UTC".into()),
            defer_activation,
            max_defer_secs: 3600,
            ..Default::default()
        };
        Activation::new(&cfg, Arc::new(|| NOON))
    }

    fn target(window: Option<&[&str]>) -> Target {
        Target {
            bundle: BundleRef {
                id: "b".into(),
                name: "cls".into(),
                version: "1.1.0".into(),
                sequence: 2,
            },
            download: None,
            rollback: false,
            rollout_id: None,
            watch: None,
            shadow: None,
            window: window.map(|w| Schedule {
                windows: w.iter().map(|s| s.to_string()).collect(),
                time_zone: None,
            }),
        }
    }

    #[test]
    fn noon_is_what_the_tests_say() {
        assert_eq!(
            local_time(NOON, &TimeZone::UTC),
            "2026-12-03T12:00:00+00:00"
        );
    }

    #[test]
    fn no_window_and_no_defer_activates_at_once() {
        let a = act(false);
        assert_eq!(
            decide(NOON, &target(None), NOON, &Defer::default(), &a),
            Ok(None)
        );
    }

    #[test]
    fn a_closed_window_holds_until_it_opens() {
        let a = act(false);
        let t = target(Some(&["daily 02:00-04:00"]));
        let h = decide(NOON, &t, NOON, &Defer::default(), &a)
            .unwrap()
            .unwrap();
        assert_eq!(
            h.reason,
            "waiting for window (next: 2026-12-04T02:00:00+00:00)"
        );
        assert_eq!(h.until, Some(NOON + 14 * 3600));
        // Inside the window: go.
        assert_eq!(
            decide(NOON + 14 * 3600, &t, NOON, &Defer::default(), &a),
            Ok(None)
        );
        // A rollback is never held.
        let mut back = t.clone();
        back.rollback = true;
        assert_eq!(decide(NOON, &back, NOON, &Defer::default(), &a), Ok(None));
    }

    #[test]
    fn the_schedule_zone_or_the_device_zone_decides() {
        let cfg = crate::config::UpdateSection {
            time_zone: Some("Asia/Kolkata".into()),
            ..Default::default()
        };
        let a = Activation::new(&cfg, Arc::new(|| NOON));
        // 12:00 UTC is 17:30 in Kolkata: inside 17:00-18:00 there.
        let t = target(Some(&["daily 17:00-18:00"]));
        assert_eq!(decide(NOON, &t, NOON, &Defer::default(), &a), Ok(None));
        // The same window pinned to UTC is closed.
        let mut utc = t.clone();
        utc.window.as_mut().unwrap().time_zone = Some("UTC".into());
        let h = decide(NOON, &utc, NOON, &Defer::default(), &a)
            .unwrap()
            .unwrap();
        assert_eq!(h.until, Some(NOON + 5 * 3600));
    }

    #[test]
    fn an_unset_clock_holds_and_a_bad_window_is_refused() {
        let a = act(false);
        let t = target(Some(&["daily 02:00-04:00"]));
        let h = decide(86_400, &t, 86_400, &Defer::default(), &a)
            .unwrap()
            .unwrap();
        assert!(h.reason.contains("clock is not set"), "{}", h.reason);
        let bad = target(Some(&["someday"]));
        let e = decide(NOON, &bad, NOON, &Defer::default(), &a).unwrap_err();
        assert!(e.starts_with("maintenance window:"), "{e}");
    }

    #[test]
    fn the_app_defers_within_the_maximum() {
        let a = act(false);
        let t = target(None);
        let busy = Defer {
            busy_until: NOON + 600,
            reason: Some("printing".into()),
            released_at: None,
        };
        let h = decide(NOON, &t, NOON, &busy, &a).unwrap().unwrap();
        assert_eq!(h.until, Some(NOON + 600));
        assert!(h.reason.contains("(printing)"), "{}", h.reason);
        // Ready an hour ago: the maximum defer is used up.
        assert_eq!(decide(NOON, &t, NOON - 3600, &busy, &a), Ok(None));
        // Ready 55 minutes ago: held only up to the maximum.
        let h = decide(NOON, &t, NOON - 3300, &busy, &a).unwrap().unwrap();
        assert_eq!(h.until, Some(NOON + 300));
    }

    #[test]
    fn defer_activation_waits_for_the_apps_release() {
        let a = act(true);
        let t = target(None);
        let h = decide(NOON, &t, NOON, &Defer::default(), &a)
            .unwrap()
            .unwrap();
        assert_eq!(h.until, Some(NOON + 3600));
        assert!(h.reason.contains("DELETE /v1/defer"), "{}", h.reason);
        // A release from before the update was ready does not count.
        let old = Defer {
            released_at: Some(NOON - 10),
            ..Defer::default()
        };
        assert!(decide(NOON, &t, NOON, &old, &a).unwrap().is_some());
        let now = Defer {
            released_at: Some(NOON),
            ..Defer::default()
        };
        assert_eq!(decide(NOON, &t, NOON, &now, &a), Ok(None));
        assert_eq!(
            decide(NOON + 3600, &t, NOON, &Defer::default(), &a),
            Ok(None)
        );
    }

    #[test]
    fn defers_are_capped_and_released() {
        let a = act(false);
        let v = a.defer(10 * 3600, Some("job".into()));
        assert_eq!(v.busy_until, Some(NOON + 3600));
        assert_eq!(v.reason.as_deref(), Some("job"));
        let v = a.release();
        assert_eq!(v.busy_until, None);
        assert_eq!(a.defer_state().released_at, Some(NOON));
    }
}

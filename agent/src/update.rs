//! The update state machine: one persisted record and one transition
//! function, [`next`]. It does no I/O and takes the time as an argument;
//! the driver ([`crate::updater`]) performs the [`Effect`]s, feeds their
//! outcomes back as [`Event`]s and writes the record after every step. It
//! is the only writer of the record: the driver persists what `next`
//! returns and nothing else.
//!
//! ```text
//! Idle/Committed/Failed/RolledBack ──desired──▶ Downloading{offset}
//!   Downloading ──no space──▶ Blocked ──space──▶ Downloading
//!   Downloading ──transfer fault──▶ Downloading (retry; corrupt transfers
//!                                   are counted, and after the limit the
//!                                   device reports failed, still retrying)
//!   Downloading ──downloaded──▶ Verifying ──verified──▶ SelfTesting
//!   SelfTesting ──passed──▶ Shadowing? ──▶ AwaitWindow
//!   AwaitWindow ──held──▶ Waiting{reason, until} ──open──▶ Activate
//!               ──open──▶ Activate
//!   Activate ──activated──▶ Watching ──window passed──▶ Committed
//!                           Watching ──health breach──▶ RolledBack{reason}
//!   any step ──rejected / failed──▶ Failed{reason}
//! ```
//!
//! Crash safety comes from where the record says the device is: a restart
//! in any step before activation serves the recorded active model and
//! re-verifies the file on disk; a restart while watching counts against
//! the new model (after `max_watch_restarts` it is rolled back). What the
//! agent managed to serve at start is itself an event ([`Event::Boot`]).

use std::collections::VecDeque;

use edgefleet_wire::device::{BundleRef, ShadowAgreement, ShadowRequest, UpdateState, WatchPolicy};
use edgefleet_wire::window::Schedule;
use serde::{Deserialize, Serialize};

/// What the device was asked to install.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub bundle: BundleRef,
    /// Server-relative download path; `None` for a sideloaded file.
    pub download: Option<String>,
    /// An explicit rollback to a bundle this device ran before.
    pub rollback: bool,
    pub rollout_id: Option<String>,
    pub watch: Option<WatchPolicy>,
    pub shadow: Option<ShadowRequest>,
    /// Maintenance windows: the swap waits for one to be open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Schedule>,
}

/// Why a ready update is not activated yet, and when that may change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// `waiting for window (next: 2026-12-04T02:00:00+01:00)`, or the
    /// local app's defer.
    pub reason: String,
    /// Unix seconds when the activation may go on, if known.
    pub until: Option<u64>,
}

/// When the target first became ready to activate (self-tested, shadowed):
/// the local app's defers are bounded from here, across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub bundle_id: String,
    pub since: u64,
}

/// Where an update stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Downloading {
        target: Target,
        offset: u64,
        /// Consecutive transfers whose bytes did not hash to the bundle id.
        #[serde(default)]
        corrupt: u32,
        /// Failed attempts since the transfer last moved (the driver's
        /// backoff grows with it).
        #[serde(default)]
        retries: u32,
        /// `corrupt` reached the limit: the device reports `failed` (reason
        /// `transfer_corrupted`) and keeps retrying at the longest backoff.
        #[serde(default)]
        gave_up: bool,
    },
    /// Waiting for disk space before the download can go on.
    Blocked {
        target: Target,
        offset: u64,
        /// Free bytes the rest of the download needs.
        needed: u64,
        reason: String,
    },
    Verifying {
        target: Target,
    },
    /// Written by agents before 0.2; read as "verify again" at boot.
    Staged {
        target: Target,
    },
    SelfTesting {
        target: Target,
    },
    Shadowing {
        target: Target,
    },
    /// Ready, but the swap waits for a maintenance window or the local
    /// app. A restart verifies and self-tests the file again, then waits
    /// again.
    Waiting {
        target: Target,
        reason: String,
        until: Option<u64>,
    },
    /// `target` is active; `since` is unix seconds of activation: the watch
    /// window is measured from it, across restarts.
    Watching {
        target: Target,
        since: u64,
        restarts: u32,
    },
    Committed,
    Failed {
        reason: String,
    },
    RolledBack {
        reason: String,
    },
}

impl Phase {
    pub fn state(&self) -> UpdateState {
        match self {
            Phase::Idle => UpdateState::Idle,
            Phase::Downloading { gave_up: true, .. } => UpdateState::Failed,
            Phase::Downloading { .. } => UpdateState::Downloading,
            Phase::Blocked { .. } => UpdateState::Blocked,
            Phase::Verifying { .. } => UpdateState::Verifying,
            Phase::Staged { .. } => UpdateState::Staged,
            Phase::SelfTesting { .. } => UpdateState::SelfTesting,
            Phase::Shadowing { .. } => UpdateState::Shadowing,
            Phase::Waiting { .. } => UpdateState::Waiting,
            Phase::Watching { .. } => UpdateState::Watching,
            Phase::Committed => UpdateState::Committed,
            Phase::Failed { .. } => UpdateState::Failed,
            Phase::RolledBack { .. } => UpdateState::RolledBack,
        }
    }

    /// The update in progress, if any.
    pub fn target(&self) -> Option<&Target> {
        match self {
            Phase::Downloading { target, .. }
            | Phase::Blocked { target, .. }
            | Phase::Verifying { target }
            | Phase::Staged { target }
            | Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. }
            | Phase::Watching { target, .. } => Some(target),
            _ => None,
        }
    }

    fn target_mut(&mut self) -> Option<&mut Target> {
        match self {
            Phase::Downloading { target, .. }
            | Phase::Blocked { target, .. }
            | Phase::Verifying { target }
            | Phase::Staged { target }
            | Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. }
            | Phase::Watching { target, .. } => Some(target),
            _ => None,
        }
    }

    /// When a waiting update may go on (unix seconds), if known.
    pub fn activate_at(&self) -> Option<u64> {
        match self {
            Phase::Waiting { until, .. } => *until,
            _ => None,
        }
    }

    /// Failed transfer attempts of the download in progress since it last
    /// made progress (0 outside a download).
    pub fn retries(&self) -> u32 {
        match self {
            Phase::Downloading { retries, .. } => *retries,
            _ => 0,
        }
    }

    fn resting(&self) -> bool {
        self.target().is_none()
    }
}

/// Failed bundles remembered, per rollout.
pub const FAILED_MEMORY: usize = 16;

/// A bundle that failed here (refused, failed its self-test or shadow, or
/// rolled back), and the rollout that asked for it. The same rollout naming
/// it again is ignored (no install loops); a new rollout or a sideload of
/// the same bundle is tried again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub bundle_id: String,
    pub rollout_id: Option<String>,
}

/// The persisted update record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub phase: Phase,
    /// The bundle being served.
    pub active: Option<BundleRef>,
    /// The last committed bundle before `active`: the local rollback target.
    pub last_known_good: Option<BundleRef>,
    pub last_failed: Option<BundleRef>,
    /// Why the last update ended the way it did (or why it is stuck).
    pub reason: Option<String>,
    /// A desired state that arrived while watching, applied afterwards.
    pub pending: Option<Target>,
    #[serde(default)]
    pub failures: VecDeque<Failure>,
    pub shadow: Option<ShadowAgreement>,
    /// When the target became ready to activate (bounds the app's defers).
    #[serde(default)]
    pub ready: Option<Ready>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            phase: Phase::Idle,
            active: None,
            last_known_good: None,
            last_failed: None,
            reason: None,
            pending: None,
            failures: VecDeque::new(),
            shadow: None,
            ready: None,
        }
    }
}

impl Record {
    /// Whether this target already failed here for the rollout that asks
    /// for it again.
    fn failed_before(&self, t: &Target) -> bool {
        t.rollout_id.is_some()
            && self
                .failures
                .iter()
                .any(|f| f.bundle_id == t.bundle.id && f.rollout_id == t.rollout_id)
    }

    /// When `t` became ready to activate; starts the clock at `now` the
    /// first time.
    fn ready_since(&mut self, t: &Target, now: u64) -> u64 {
        match &self.ready {
            Some(r) if r.bundle_id == t.bundle.id => r.since,
            _ => {
                self.ready = Some(Ready {
                    bundle_id: t.bundle.id.clone(),
                    since: now,
                });
                now
            }
        }
    }
}

/// Lifecycle events for reports and MQTT (`edgefleet/v1/{id}/events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    DownloadStarted,
    /// A transfer fault; the download is retried.
    DownloadRetry,
    /// Waiting for disk space.
    Blocked,
    Downloaded,
    Verified,
    Rejected,
    SelfTestPassed,
    SelfTestFailed,
    ShadowStarted,
    ShadowPassed,
    ShadowFailed,
    /// Ready; the swap waits for a maintenance window or the local app.
    Waiting,
    Activated,
    RolledBack,
    Committed,
    Cancelled,
}

/// How a download attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferFault {
    /// Connection, timeout, server error, a body cut short: the bytes so
    /// far are kept and the transfer resumes.
    Transport,
    /// The bytes did not hash to the content address (flipped, truncated
    /// or replaced on the way): they are dropped and the transfer starts
    /// over. Says nothing about the bundle itself.
    Corrupted,
}

/// Inputs to the machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The process started with this record. `served` is what the agent
    /// managed to load and serve before anything else: the recorded active
    /// bundle, the last known good one when the active one would not load,
    /// or nothing.
    Boot {
        served: Option<BundleRef>,
        max_watch_restarts: u32,
    },
    /// The server (or a sideload) asks for this bundle; `None`: keep what runs.
    Desired(Option<Target>),
    DownloadProgress {
        offset: u64,
    },
    Downloaded,
    /// Retried by the driver with backoff. After `max_corrupt` corrupted
    /// transfers in a row the device reports `failed` but keeps retrying.
    DownloadFailed {
        reason: String,
        fault: TransferFault,
        max_corrupt: u32,
    },
    /// Not enough free space for the rest of the download (`needed` bytes).
    NoSpace {
        reason: String,
        needed: u64,
    },
    /// Space is available again (checked by the driver).
    SpaceAvailable,
    Verified,
    /// Signature, expiry, anti-rollback, arch, agent version, size: final
    /// for this bundle and rollout.
    Rejected {
        reason: String,
    },
    SelfTestPassed,
    SelfTestFailed {
        reason: String,
    },
    ShadowDone {
        agreement: ShadowAgreement,
        passed: Result<(), String>,
    },
    /// A window is open and nothing defers: swap now.
    WindowOpen,
    /// The swap waits (a new or changed reason).
    Held(Hold),
    Activated,
    /// The activation itself failed (e.g. the floor could not be written).
    ActivationFailed {
        reason: String,
    },
    HealthBreached {
        reason: String,
    },
    WatchPassed,
    /// The local rollback finished: `to` is serving again.
    RolledBackTo {
        to: Option<BundleRef>,
    },
}

/// Work for the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Fetch `target`, resuming from what is already on disk. `attempt` is
    /// 0 for a fresh start and counts retries (the driver's backoff);
    /// `patient` retries wait the longest backoff.
    Download {
        target: Target,
        attempt: u32,
        patient: bool,
    },
    /// Wait (collecting garbage) until `needed` bytes are free.
    AwaitSpace {
        target: Target,
        needed: u64,
    },
    /// Drop the partial download of bundle `id`.
    DiscardDownload {
        id: String,
    },
    Verify {
        target: Target,
    },
    SelfTest {
        target: Target,
    },
    Shadow {
        target: Target,
    },
    /// Decide whether the swap may happen now; wait while nothing changes
    /// from `held` (the hold already recorded). `ready_since` bounds the
    /// local app's defers.
    AwaitWindow {
        target: Target,
        ready_since: u64,
        held: Option<Hold>,
    },
    /// Raise the anti-rollback floor durably, then swap the model in.
    Activate {
        target: Target,
    },
    /// Judge the active model until its window, which started at `since`
    /// (unix seconds), has passed.
    Watch {
        target: Target,
        since: u64,
    },
    /// Swap back to `to` (last known good), reason already recorded.
    Rollback {
        to: Option<BundleRef>,
    },
    /// Delete bundles other than active, last known good and the target.
    CollectGarbage,
    /// Tell the server and MQTT.
    Announce {
        what: Lifecycle,
        reason: Option<String>,
    },
}

/// A transition the machine refuses (a bug in the driver or a stale event).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("update machine: event {event} is not allowed in state {state:?}")]
pub struct Disallowed {
    pub event: &'static str,
    pub state: UpdateState,
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Boot { .. } => "boot",
        Event::Desired(_) => "desired",
        Event::DownloadProgress { .. } => "download_progress",
        Event::Downloaded => "downloaded",
        Event::DownloadFailed { .. } => "download_failed",
        Event::NoSpace { .. } => "no_space",
        Event::SpaceAvailable => "space_available",
        Event::Verified => "verified",
        Event::Rejected { .. } => "rejected",
        Event::SelfTestPassed => "self_test_passed",
        Event::SelfTestFailed { .. } => "self_test_failed",
        Event::ShadowDone { .. } => "shadow_done",
        Event::WindowOpen => "window_open",
        Event::Held(_) => "held",
        Event::Activated => "activated",
        Event::ActivationFailed { .. } => "activation_failed",
        Event::HealthBreached { .. } => "health_breached",
        Event::WatchPassed => "watch_passed",
        Event::RolledBackTo { .. } => "rolled_back_to",
    }
}

fn announce(what: Lifecycle, reason: Option<String>) -> Effect {
    Effect::Announce { what, reason }
}

/// The update is ready to activate: ask the driver whether it may.
fn await_window(r: &mut Record, target: &Target, held: Option<Hold>, now: u64) -> Effect {
    Effect::AwaitWindow {
        target: target.clone(),
        ready_since: r.ready_since(target, now),
        held,
    }
}

fn download(target: &Target, attempt: u32, patient: bool) -> Effect {
    Effect::Download {
        target: target.clone(),
        attempt,
        patient,
    }
}

/// The transition function: `(record, event, now) → (record, effects)`.
pub fn next(rec: &Record, event: Event, now: u64) -> Result<(Record, Vec<Effect>), Disallowed> {
    let mut r = rec.clone();
    let mut fx = Vec::new();
    let disallowed = || Disallowed {
        event: event_name(&event),
        state: rec.phase.state(),
    };
    match (&rec.phase, event.clone()) {
        // ---- restart -------------------------------------------------
        (
            _,
            Event::Boot {
                served,
                max_watch_restarts,
            },
        ) => {
            let fell_back = served.is_some() && served != rec.active;
            if fell_back {
                // The active bundle would not load; the last known good one
                // serves. Anything that was being watched has failed.
                let to = served.clone();
                let reason = format!(
                    "the active bundle could not be loaded at start; fell back to {}",
                    to.as_ref()
                        .map_or_else(String::new, |b| format!("{} {}", b.name, b.version))
                );
                r.reason = Some(reason.clone());
                if let Phase::Watching { target, .. } = &rec.phase {
                    remember_failure(&mut r, target);
                    r.last_failed = Some(target.bundle.clone());
                    r.phase = Phase::RolledBack {
                        reason: reason.clone(),
                    };
                    fx.push(announce(Lifecycle::RolledBack, Some(reason)));
                }
                r.active = to;
            }
            match r.phase.clone() {
                Phase::Downloading {
                    target,
                    retries,
                    gave_up,
                    ..
                } => {
                    fx.push(download(&target, retries, gave_up));
                }
                Phase::Blocked { target, needed, .. } => {
                    fx.push(Effect::AwaitSpace { target, needed });
                }
                // Everything between download and activation restarts from
                // verification: the file on disk is re-checked, never trusted.
                Phase::Verifying { target }
                | Phase::Staged { target }
                | Phase::SelfTesting { target }
                | Phase::Shadowing { target }
                | Phase::Waiting { target, .. } => {
                    r.phase = Phase::Verifying {
                        target: target.clone(),
                    };
                    fx.push(Effect::Verify { target });
                }
                Phase::Watching {
                    target,
                    restarts,
                    since,
                } => {
                    let restarts = restarts + 1;
                    if restarts >= max_watch_restarts {
                        let reason = format!(
                            "the agent restarted {restarts} times while watching {} {}",
                            target.bundle.name, target.bundle.version
                        );
                        fail_active(&mut r, &mut fx, &target, reason);
                    } else {
                        r.phase = Phase::Watching {
                            target: target.clone(),
                            since,
                            restarts,
                        };
                        fx.push(Effect::Watch { target, since });
                    }
                }
                Phase::Idle
                | Phase::Committed
                | Phase::Failed { .. }
                | Phase::RolledBack { .. } => {
                    if let Some(p) = r.pending.take() {
                        let (r2, more) = next(&r, Event::Desired(Some(p)), now)?;
                        fx.extend(more);
                        return Ok((r2, fx));
                    }
                }
            }
        }

        // ---- desired state --------------------------------------------
        (phase, Event::Desired(want)) => {
            let Some(want) = want else {
                return Ok((r, fx));
            };
            let same_as_active = rec.active.as_ref().is_some_and(|a| a.id == want.bundle.id);
            let same_as_current = phase
                .target()
                .is_some_and(|t| t.bundle.id == want.bundle.id);
            if same_as_current {
                // Same bundle, maybe new rollout parameters: nothing to
                // redo, but a changed maintenance window applies to the
                // swap that has not happened yet.
                let cur = phase.target().map(|t| t.window.clone());
                if !matches!(phase, Phase::Watching { .. }) && cur != Some(want.window.clone()) {
                    if let Some(t) = r.phase.target_mut() {
                        t.window = want.window.clone();
                    }
                    if let Phase::Waiting {
                        target,
                        reason,
                        until,
                    } = r.phase.clone()
                    {
                        let held = Hold { reason, until };
                        fx.push(await_window(&mut r, &target, Some(held), now));
                    }
                }
                return Ok((r, fx));
            }
            if let Phase::Watching { target, .. } = phase {
                let back_to_lkg = want.rollback
                    && rec
                        .last_known_good
                        .as_ref()
                        .is_some_and(|l| l.id == want.bundle.id);
                if back_to_lkg {
                    let reason = format!(
                        "rollback to {} {} requested by the server",
                        want.bundle.name, want.bundle.version
                    );
                    fail_active(&mut r, &mut fx, target, reason);
                } else {
                    // Finish judging the running model first.
                    r.pending = Some(want);
                }
                return Ok((r, fx));
            }
            if let Some(t) = phase.target() {
                if matches!(phase, Phase::Downloading { .. } | Phase::Blocked { .. }) {
                    fx.push(Effect::DiscardDownload {
                        id: t.bundle.id.clone(),
                    });
                }
                fx.push(announce(
                    Lifecycle::Cancelled,
                    Some(format!(
                        "superseded by {} {}",
                        want.bundle.name, want.bundle.version
                    )),
                ));
            }
            if same_as_active {
                r.phase = if phase.resting() {
                    rec.phase.clone()
                } else {
                    Phase::Committed
                };
                r.reason = None;
                return Ok((r, fx));
            }
            if rec.failed_before(&want) {
                // Already failed here for this rollout: report, don't loop.
                if !phase.resting() {
                    r.phase = Phase::Failed {
                        reason: format!(
                            "{} {} failed here before",
                            want.bundle.name, want.bundle.version
                        ),
                    };
                }
                return Ok((r, fx));
            }
            r.reason = None;
            r.shadow = None;
            r.ready = None;
            r.phase = Phase::Downloading {
                target: want.clone(),
                offset: 0,
                corrupt: 0,
                retries: 0,
                gave_up: false,
            };
            fx.push(announce(Lifecycle::DownloadStarted, None));
            fx.push(download(&want, 0, false));
        }

        // ---- download ---------------------------------------------------
        (Phase::Downloading { .. }, Event::DownloadProgress { offset }) => {
            if let Phase::Downloading {
                offset: o, retries, ..
            } = &mut r.phase
            {
                // A transfer that moves again is working: back off from
                // scratch if it breaks later.
                if offset > *o {
                    *retries = 0;
                }
                *o = offset;
            }
        }
        (
            Phase::Downloading {
                target,
                offset,
                corrupt,
                retries,
                gave_up,
            },
            Event::DownloadFailed {
                reason,
                fault,
                max_corrupt,
            },
        ) => {
            // A transfer fault says nothing about the bundle: retry (the
            // driver backs off); a new desired state still supersedes it.
            let (offset, corrupt) = match fault {
                TransferFault::Transport => (*offset, *corrupt),
                TransferFault::Corrupted => (0, corrupt + 1),
            };
            let give_up = *gave_up || corrupt >= max_corrupt.max(1);
            if give_up && !*gave_up {
                let why = format!(
                    "transfer_corrupted: {corrupt} corrupted transfers in a row, the last: {reason}; still retrying"
                );
                r.reason = Some(why.clone());
                r.last_failed = Some(target.bundle.clone());
                fx.push(announce(Lifecycle::Rejected, Some(why)));
            } else {
                r.reason = Some(format!("download retry: {reason}"));
                fx.push(announce(Lifecycle::DownloadRetry, Some(reason)));
            }
            let retries = retries + 1;
            r.phase = Phase::Downloading {
                target: target.clone(),
                offset,
                corrupt,
                retries,
                gave_up: give_up,
            };
            fx.push(download(target, retries, give_up));
        }
        (Phase::Downloading { target, offset, .. }, Event::NoSpace { reason, needed }) => {
            r.reason = Some(reason.clone());
            r.phase = Phase::Blocked {
                target: target.clone(),
                offset: *offset,
                needed,
                reason: reason.clone(),
            };
            fx.push(announce(Lifecycle::Blocked, Some(reason)));
            fx.push(Effect::AwaitSpace {
                target: target.clone(),
                needed,
            });
        }
        (Phase::Blocked { target, offset, .. }, Event::SpaceAvailable) => {
            r.reason = None;
            r.phase = Phase::Downloading {
                target: target.clone(),
                offset: *offset,
                corrupt: 0,
                retries: 0,
                gave_up: false,
            };
            fx.push(download(target, 0, false));
        }
        (Phase::Downloading { target, .. }, Event::Downloaded) => {
            r.reason = None;
            r.phase = Phase::Verifying {
                target: target.clone(),
            };
            fx.push(announce(Lifecycle::Downloaded, None));
            fx.push(Effect::Verify {
                target: target.clone(),
            });
        }

        // ---- verify, self-test, shadow ------------------------------------
        (Phase::Verifying { target }, Event::Verified) => {
            r.phase = Phase::SelfTesting {
                target: target.clone(),
            };
            fx.push(announce(Lifecycle::Verified, None));
            fx.push(Effect::SelfTest {
                target: target.clone(),
            });
        }
        (
            Phase::Downloading { target, .. }
            | Phase::Blocked { target, .. }
            | Phase::Verifying { target }
            | Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. },
            Event::Rejected { reason },
        ) => {
            fail_candidate(&mut r, &mut fx, target, Lifecycle::Rejected, reason);
        }
        (Phase::SelfTesting { target }, Event::SelfTestPassed) => {
            fx.push(announce(Lifecycle::SelfTestPassed, None));
            if target.shadow.is_some() {
                r.phase = Phase::Shadowing {
                    target: target.clone(),
                };
                fx.push(announce(Lifecycle::ShadowStarted, None));
                fx.push(Effect::Shadow {
                    target: target.clone(),
                });
            } else {
                fx.push(await_window(&mut r, target, None, now));
            }
        }
        (Phase::SelfTesting { target }, Event::SelfTestFailed { reason }) => {
            fail_candidate(&mut r, &mut fx, target, Lifecycle::SelfTestFailed, reason);
        }
        (Phase::Shadowing { target }, Event::ShadowDone { agreement, passed }) => {
            r.shadow = Some(agreement);
            match passed {
                Ok(()) => {
                    fx.push(announce(Lifecycle::ShadowPassed, None));
                    fx.push(await_window(&mut r, target, None, now));
                }
                Err(reason) => {
                    fail_candidate(&mut r, &mut fx, target, Lifecycle::ShadowFailed, reason);
                }
            }
        }

        // ---- maintenance windows and defers -------------------------------
        (
            Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. },
            Event::WindowOpen,
        ) => {
            fx.push(Effect::Activate {
                target: target.clone(),
            });
        }
        (
            Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. },
            Event::Held(hold),
        ) => {
            if !matches!(rec.phase, Phase::Waiting { .. }) {
                fx.push(announce(Lifecycle::Waiting, Some(hold.reason.clone())));
            }
            r.reason = Some(hold.reason.clone());
            r.phase = Phase::Waiting {
                target: target.clone(),
                reason: hold.reason.clone(),
                until: hold.until,
            };
            fx.push(await_window(&mut r, target, Some(hold), now));
        }

        // ---- activation and watch -------------------------------------------
        (
            Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. },
            Event::Activated,
        ) => {
            // The previous committed model becomes the rollback target.
            r.last_known_good = rec.active.clone().or(rec.last_known_good.clone());
            r.ready = None;
            r.reason = None;
            r.active = Some(target.bundle.clone());
            r.phase = Phase::Watching {
                target: target.clone(),
                since: now,
                restarts: 0,
            };
            fx.push(announce(Lifecycle::Activated, None));
            fx.push(Effect::Watch {
                target: target.clone(),
                since: now,
            });
        }
        (
            Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Waiting { target, .. },
            Event::ActivationFailed { reason },
        ) => {
            fail_candidate(&mut r, &mut fx, target, Lifecycle::Rejected, reason);
        }
        (Phase::Watching { target, .. }, Event::HealthBreached { reason }) => {
            fail_active(&mut r, &mut fx, target, reason);
        }
        (Phase::Watching { .. }, Event::WatchPassed) => {
            r.phase = Phase::Committed;
            r.reason = None;
            fx.push(announce(Lifecycle::Committed, None));
            fx.push(Effect::CollectGarbage);
            if let Some(p) = r.pending.take() {
                let (r2, more) = next(&r, Event::Desired(Some(p)), now)?;
                fx.extend(more);
                return Ok((r2, fx));
            }
        }
        (Phase::RolledBack { .. }, Event::RolledBackTo { to }) => {
            r.active = to;
            fx.push(Effect::CollectGarbage);
            if let Some(p) = r.pending.take() {
                let (r2, more) = next(&r, Event::Desired(Some(p)), now)?;
                fx.extend(more);
                return Ok((r2, fx));
            }
        }
        _ => return Err(disallowed()),
    }
    Ok((r, fx))
}

fn remember_failure(r: &mut Record, target: &Target) {
    let f = Failure {
        bundle_id: target.bundle.id.clone(),
        rollout_id: target.rollout_id.clone(),
    };
    if !r.failures.contains(&f) {
        r.failures.push_back(f);
    }
    while r.failures.len() > FAILED_MEMORY {
        r.failures.pop_front();
    }
}

/// A candidate that never served: the active model is untouched.
fn fail_candidate(
    r: &mut Record,
    fx: &mut Vec<Effect>,
    target: &Target,
    what: Lifecycle,
    reason: String,
) {
    remember_failure(r, target);
    r.last_failed = Some(target.bundle.clone());
    r.reason = Some(reason.clone());
    r.ready = None;
    r.phase = Phase::Failed {
        reason: reason.clone(),
    };
    fx.push(Effect::DiscardDownload {
        id: target.bundle.id.clone(),
    });
    fx.push(announce(what, Some(reason)));
}

/// The active (watched) model failed: go back to last known good.
fn fail_active(r: &mut Record, fx: &mut Vec<Effect>, target: &Target, reason: String) {
    remember_failure(r, target);
    r.last_failed = Some(target.bundle.clone());
    r.reason = Some(reason.clone());
    r.phase = Phase::RolledBack {
        reason: reason.clone(),
    };
    fx.push(announce(Lifecycle::RolledBack, Some(reason)));
    fx.push(Effect::Rollback {
        to: r.last_known_good.clone(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bref(id: &str, seq: u64) -> BundleRef {
        BundleRef {
            id: id.into(),
            name: "cls".into(),
            version: format!("1.0.{seq}"),
            sequence: seq,
        }
    }

    fn target(id: &str, seq: u64) -> Target {
        Target {
            bundle: bref(id, seq),
            download: Some(format!("/api/v1/bundles/{id}/download")),
            rollback: false,
            rollout_id: Some("r1".into()),
            watch: None,
            shadow: None,
            window: None,
        }
    }

    fn step(r: &Record, e: Event) -> (Record, Vec<Effect>) {
        next(r, e, 1000).unwrap()
    }

    fn committed_on(id: &str, seq: u64) -> Record {
        Record {
            phase: Phase::Committed,
            active: Some(bref(id, seq)),
            ..Record::default()
        }
    }

    fn has(fx: &[Effect], pred: impl Fn(&Effect) -> bool) -> bool {
        fx.iter().any(pred)
    }

    fn boot(served: Option<BundleRef>) -> Event {
        Event::Boot {
            served,
            max_watch_restarts: 3,
        }
    }

    /// From committed on a to watching b.
    fn watching_b() -> Record {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, _) = step(&r, Event::Downloaded);
        let (r, _) = step(&r, Event::Verified);
        let (r, _) = step(&r, Event::SelfTestPassed);
        step(&r, Event::Activated).0
    }

    fn failed_transfer(fault: TransferFault) -> Event {
        Event::DownloadFailed {
            reason: "downloaded bytes hash to 00…".into(),
            fault,
            max_corrupt: 3,
        }
    }

    #[test]
    fn happy_path_runs_download_verify_selftest_activate_watch_commit() {
        let r = committed_on("a", 1);
        let (r, fx) = step(&r, Event::Desired(Some(target("b", 2))));
        assert!(matches!(r.phase, Phase::Downloading { offset: 0, .. }));
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download { attempt: 0, .. }
        )));
        let (r, _) = step(&r, Event::DownloadProgress { offset: 500 });
        assert!(matches!(r.phase, Phase::Downloading { offset: 500, .. }));
        let (r, fx) = step(&r, Event::Downloaded);
        assert!(has(&fx, |e| matches!(e, Effect::Verify { .. })));
        // Verified goes straight to the self-test: no intermediate step.
        let (r, fx) = step(&r, Event::Verified);
        assert_eq!(r.phase.state(), UpdateState::SelfTesting);
        assert!(has(&fx, |e| matches!(e, Effect::SelfTest { .. })));
        let (r, fx) = step(&r, Event::SelfTestPassed);
        assert!(has(&fx, |e| matches!(
            e,
            Effect::AwaitWindow {
                ready_since: 1000,
                held: None,
                ..
            }
        )));
        let (r, fx) = step(&r, Event::WindowOpen);
        assert!(has(&fx, |e| matches!(e, Effect::Activate { .. })));
        assert_eq!(
            r.active.as_ref().unwrap().id,
            "a",
            "not active before the swap"
        );
        let (r, fx) = step(&r, Event::Activated);
        assert_eq!(r.active.as_ref().unwrap().id, "b");
        assert_eq!(r.last_known_good.as_ref().unwrap().id, "a");
        assert!(matches!(r.phase, Phase::Watching { since: 1000, .. }));
        assert!(has(&fx, |e| matches!(e, Effect::Watch { since: 1000, .. })));
        let (r, fx) = step(&r, Event::WatchPassed);
        assert_eq!(r.phase, Phase::Committed);
        assert!(has(&fx, |e| matches!(e, Effect::CollectGarbage)));
    }

    #[test]
    fn health_breach_rolls_back_and_is_not_retried_for_the_same_rollout() {
        let (r, fx) = step(
            &watching_b(),
            Event::HealthBreached {
                reason: "p95 80 ms > 40 ms".into(),
            },
        );
        assert_eq!(r.phase.state(), UpdateState::RolledBack);
        assert_eq!(r.last_failed.as_ref().unwrap().id, "b");
        assert!(has(
            &fx,
            |e| matches!(e, Effect::Rollback { to: Some(b) } if b.id == "a")
        ));
        let (r, _) = step(
            &r,
            Event::RolledBackTo {
                to: Some(bref("a", 1)),
            },
        );
        assert_eq!(r.active.as_ref().unwrap().id, "a");
        // The same rollout still wants b: no reinstall loop.
        let (r2, fx) = step(&r, Event::Desired(Some(target("b", 2))));
        assert_eq!(r2.phase.state(), UpdateState::RolledBack);
        assert!(!has(&fx, |e| matches!(e, Effect::Download { .. })));
        // A new rollout of the same bundle, or a sideload, is tried again.
        for rollout in [Some("r2".to_string()), None] {
            let mut t = target("b", 2);
            t.rollout_id = rollout;
            let (r3, fx) = step(&r, Event::Desired(Some(t)));
            assert_eq!(r3.phase.state(), UpdateState::Downloading);
            assert!(has(&fx, |e| matches!(e, Effect::Download { .. })));
        }
    }

    #[test]
    fn rejected_and_self_test_failures_keep_the_active_model() {
        for failing in [
            Event::Rejected {
                reason: "bad signature".into(),
            },
            Event::SelfTestFailed {
                reason: "case 0".into(),
            },
        ] {
            let r = committed_on("a", 1);
            let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
            let (r, _) = step(&r, Event::Downloaded);
            let r = if matches!(failing, Event::SelfTestFailed { .. }) {
                step(&r, Event::Verified).0
            } else {
                r
            };
            let (r, fx) = step(&r, failing);
            assert_eq!(r.phase.state(), UpdateState::Failed);
            assert_eq!(r.active.as_ref().unwrap().id, "a");
            assert_eq!(r.last_failed.as_ref().unwrap().id, "b");
            assert!(has(
                &fx,
                |e| matches!(e, Effect::DiscardDownload { id } if id == "b")
            ));
        }
    }

    #[test]
    fn transport_faults_resume_and_corrupted_transfers_start_over() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, _) = step(&r, Event::DownloadProgress { offset: 4096 });
        let (r, fx) = step(&r, failed_transfer(TransferFault::Transport));
        assert!(matches!(
            r.phase,
            Phase::Downloading {
                offset: 4096,
                corrupt: 0,
                retries: 1,
                gave_up: false,
                ..
            }
        ));
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download {
                attempt: 1,
                patient: false,
                ..
            }
        )));
        let (r, fx) = step(&r, failed_transfer(TransferFault::Corrupted));
        assert!(matches!(
            r.phase,
            Phase::Downloading {
                offset: 0,
                corrupt: 1,
                retries: 2,
                ..
            }
        ));
        assert_eq!(r.phase.state(), UpdateState::Downloading);
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Announce {
                what: Lifecycle::DownloadRetry,
                reason: Some(_)
            }
        )));
        // Progress resets the backoff, not the corruption count.
        let (r, _) = step(&r, Event::DownloadProgress { offset: 100 });
        assert!(matches!(
            r.phase,
            Phase::Downloading {
                corrupt: 1,
                retries: 0,
                ..
            }
        ));
    }

    #[test]
    fn repeated_corruption_reports_failed_and_keeps_retrying_until_it_converges() {
        let r = committed_on("a", 1);
        let (mut r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        for _ in 0..2 {
            r = step(&r, failed_transfer(TransferFault::Corrupted)).0;
            assert_eq!(r.phase.state(), UpdateState::Downloading);
        }
        let (r, fx) = step(&r, failed_transfer(TransferFault::Corrupted));
        assert_eq!(r.phase.state(), UpdateState::Failed);
        assert!(r.reason.as_ref().unwrap().starts_with("transfer_corrupted"));
        assert_eq!(r.last_failed.as_ref().unwrap().id, "b");
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download { patient: true, .. }
        )));
        // The server still names b: nothing to redo, the retries go on.
        let (same, fx) = step(&r, Event::Desired(Some(target("b", 2))));
        assert_eq!(same, r);
        assert!(fx.is_empty());
        let (r, fx) = step(&r, failed_transfer(TransferFault::Transport));
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download { patient: true, .. }
        )));
        // The transport turns honest.
        let (r, _) = step(&r, Event::Downloaded);
        assert_eq!(r.phase.state(), UpdateState::Verifying);
        assert_eq!(r.reason, None);
        let (r, _) = step(&r, Event::Verified);
        let (r, _) = step(&r, Event::SelfTestPassed);
        let (r, _) = step(&r, Event::Activated);
        assert_eq!(r.active.as_ref().unwrap().id, "b");
    }

    #[test]
    fn a_full_disk_blocks_the_download_until_space_returns() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, _) = step(&r, Event::DownloadProgress { offset: 700 });
        let (r, fx) = step(
            &r,
            Event::NoSpace {
                reason: "insufficient_space: need 5000000 bytes, 1000 free".into(),
                needed: 5_000_000,
            },
        );
        assert_eq!(r.phase.state(), UpdateState::Blocked);
        assert!(r.reason.as_ref().unwrap().starts_with("insufficient_space"));
        assert!(has(&fx, |e| matches!(
            e,
            Effect::AwaitSpace {
                needed: 5_000_000,
                ..
            }
        )));
        // A restart keeps waiting.
        let (_, fx) = step(&r, boot(Some(bref("a", 1))));
        assert!(has(&fx, |e| matches!(e, Effect::AwaitSpace { .. })));
        let (r, fx) = step(&r, Event::SpaceAvailable);
        assert!(matches!(r.phase, Phase::Downloading { offset: 700, .. }));
        assert_eq!(r.reason, None);
        assert!(has(&fx, |e| matches!(e, Effect::Download { .. })));
    }

    #[test]
    fn a_new_desired_state_supersedes_a_stuck_download() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, fx) = step(&r, failed_transfer(TransferFault::Transport));
        assert!(has(&fx, |e| matches!(e, Effect::Download { .. })));
        let (r, fx) = step(&r, Event::Desired(Some(target("c", 3))));
        assert!(has(
            &fx,
            |e| matches!(e, Effect::DiscardDownload { id } if id == "b")
        ));
        assert!(matches!(&r.phase, Phase::Downloading { target, .. } if target.bundle.id == "c"));
    }

    #[test]
    fn desired_equal_to_active_cancels_an_update() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let mut back = target("a", 1);
        back.rollback = true;
        let (r, fx) = step(&r, Event::Desired(Some(back)));
        assert_eq!(r.phase, Phase::Committed);
        assert!(has(&fx, |e| matches!(e, Effect::DiscardDownload { .. })));
    }

    #[test]
    fn a_server_rollback_while_watching_returns_at_once_other_changes_wait() {
        let watching = watching_b();
        let (r, fx) = step(&watching, Event::Desired(Some(target("c", 3))));
        assert_eq!(r.phase.state(), UpdateState::Watching);
        assert_eq!(r.pending.as_ref().unwrap().bundle.id, "c");
        assert!(fx.is_empty());
        let (r, fx) = step(&r, Event::WatchPassed);
        assert!(matches!(&r.phase, Phase::Downloading { target, .. } if target.bundle.id == "c"));
        assert!(has(&fx, |e| matches!(e, Effect::CollectGarbage)));

        let mut back = target("a", 1);
        back.rollback = true;
        let (r, fx) = step(&watching, Event::Desired(Some(back)));
        assert_eq!(r.phase.state(), UpdateState::RolledBack);
        assert!(has(
            &fx,
            |e| matches!(e, Effect::Rollback { to: Some(b) } if b.id == "a")
        ));
    }

    #[test]
    fn boot_resumes_each_phase_safely() {
        let t = target("b", 2);
        let down = Record {
            phase: Phase::Downloading {
                target: t.clone(),
                offset: 4096,
                corrupt: 0,
                retries: 2,
                gave_up: false,
            },
            ..committed_on("a", 1)
        };
        let (r, fx) = step(&down, boot(Some(bref("a", 1))));
        assert_eq!(r, down, "boot records nothing new while downloading");
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download { attempt: 2, .. }
        )));

        for phase in [
            Phase::Verifying { target: t.clone() },
            Phase::Staged { target: t.clone() },
            Phase::SelfTesting { target: t.clone() },
            Phase::Shadowing { target: t.clone() },
        ] {
            let rec = Record {
                phase,
                ..committed_on("a", 1)
            };
            let (r, fx) = step(&rec, boot(Some(bref("a", 1))));
            assert_eq!(r.phase.state(), UpdateState::Verifying);
            assert!(has(&fx, |e| matches!(e, Effect::Verify { .. })));
        }

        let mut watching = Record {
            phase: Phase::Watching {
                target: t.clone(),
                since: 5,
                restarts: 0,
            },
            active: Some(bref("b", 2)),
            last_known_good: Some(bref("a", 1)),
            ..Record::default()
        };
        for expected in [1, 2] {
            let (r, fx) = step(&watching, boot(Some(bref("b", 2))));
            assert!(
                matches!(r.phase, Phase::Watching { restarts, since: 5, .. } if restarts == expected)
            );
            // The window still runs from the activation, not from the restart.
            assert!(has(&fx, |e| matches!(e, Effect::Watch { since: 5, .. })));
            watching = r;
        }
        let (r, fx) = step(&watching, boot(Some(bref("b", 2))));
        assert_eq!(r.phase.state(), UpdateState::RolledBack);
        assert!(r.reason.as_ref().unwrap().contains("restarted 3 times"));
        assert!(has(&fx, |e| matches!(e, Effect::Rollback { .. })));
    }

    #[test]
    fn boot_on_the_last_known_good_records_the_fallback() {
        let watching = Record {
            phase: Phase::Watching {
                target: target("b", 2),
                since: 5,
                restarts: 0,
            },
            active: Some(bref("b", 2)),
            last_known_good: Some(bref("a", 1)),
            ..Record::default()
        };
        // b would not load at start; a serves.
        let (r, fx) = step(&watching, boot(Some(bref("a", 1))));
        assert_eq!(r.active.as_ref().unwrap().id, "a");
        assert_eq!(r.phase.state(), UpdateState::RolledBack);
        assert_eq!(r.last_failed.as_ref().unwrap().id, "b");
        assert!(
            r.reason
                .as_ref()
                .unwrap()
                .contains("fell back to cls 1.0.1")
        );
        assert!(!has(&fx, |e| matches!(
            e,
            Effect::Rollback { .. } | Effect::Watch { .. }
        )));
        // Committed on b, b unreadable: a serves, the record says so.
        let committed = Record {
            last_known_good: Some(bref("a", 1)),
            ..committed_on("b", 2)
        };
        let (r, _) = step(&committed, boot(Some(bref("a", 1))));
        assert_eq!(r.active.as_ref().unwrap().id, "a");
        assert_eq!(r.phase, Phase::Committed);
        assert!(r.reason.is_some());
        // Nothing loads: the record is left as it is, for the server to fix.
        let (r, fx) = step(&committed, boot(None));
        assert_eq!(r, committed);
        assert!(fx.is_empty());
    }

    #[test]
    fn shadow_gates_activation() {
        let mut t = target("b", 2);
        t.shadow = Some(ShadowRequest {
            sample_rate: 1.0,
            samples: 10,
            min_top1_agreement: Some(0.9),
            max_abs_diff: None,
        });
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(t)));
        let (r, _) = step(&r, Event::Downloaded);
        let (r, _) = step(&r, Event::Verified);
        let (r, fx) = step(&r, Event::SelfTestPassed);
        assert_eq!(r.phase.state(), UpdateState::Shadowing);
        assert!(has(&fx, |e| matches!(e, Effect::Shadow { .. })));
        let agreement = ShadowAgreement {
            samples: 10,
            top1_agreement: Some(0.5),
            max_abs_diff: 0.7,
        };
        let (r2, fx) = step(
            &r,
            Event::ShadowDone {
                agreement: agreement.clone(),
                passed: Err("top-1 agreement 0.50 < 0.90".into()),
            },
        );
        assert_eq!(r2.phase.state(), UpdateState::Failed);
        assert_eq!(r2.active.as_ref().unwrap().id, "a");
        assert!(!has(&fx, |e| matches!(e, Effect::Activate { .. })));
        let (_, fx) = step(
            &r,
            Event::ShadowDone {
                agreement,
                passed: Ok(()),
            },
        );
        assert!(has(&fx, |e| matches!(e, Effect::AwaitWindow { .. })));
    }

    fn window(spec: &str) -> Option<Schedule> {
        Some(Schedule {
            windows: vec![spec.into()],
            time_zone: None,
        })
    }

    /// A record whose target `b` passed its self-test.
    fn ready_b(t: Target) -> Record {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(t)));
        let (r, _) = step(&r, Event::Downloaded);
        let (r, _) = step(&r, Event::Verified);
        r
    }

    #[test]
    fn a_held_update_waits_then_activates_when_the_window_opens() {
        let mut t = target("b", 2);
        t.window = window("daily 02:00-04:00");
        let r = ready_b(t);
        let (r, fx) = next(&r, Event::SelfTestPassed, 500).unwrap();
        assert!(has(&fx, |e| matches!(
            e,
            Effect::AwaitWindow {
                ready_since: 500,
                ..
            }
        )));
        let hold = Hold {
            reason: "waiting for window (next: …)".into(),
            until: Some(9000),
        };
        let (r, fx) = next(&r, Event::Held(hold.clone()), 600).unwrap();
        assert_eq!(r.phase.state(), UpdateState::Waiting);
        assert_eq!(r.phase.activate_at(), Some(9000));
        assert_eq!(r.reason.as_deref(), Some("waiting for window (next: …)"));
        assert_eq!(r.active.as_ref().unwrap().id, "a", "still serving a");
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Announce {
                what: Lifecycle::Waiting,
                ..
            }
        )));
        // The defer bound counts from when it was first ready.
        assert!(has(&fx, |e| matches!(
            e,
            Effect::AwaitWindow { ready_since: 500, held: Some(h), .. } if *h == hold
        )));
        // A changed hold is recorded without a second announcement.
        let later = Hold {
            reason: "deferred by the local app".into(),
            until: Some(9100),
        };
        let (r, fx) = next(&r, Event::Held(later), 700).unwrap();
        assert_eq!(r.phase.activate_at(), Some(9100));
        assert!(!has(&fx, |e| matches!(e, Effect::Announce { .. })));
        let (r, fx) = next(&r, Event::WindowOpen, 9000).unwrap();
        assert!(has(&fx, |e| matches!(e, Effect::Activate { .. })));
        let (r, _) = next(&r, Event::Activated, 9001).unwrap();
        assert!(matches!(r.phase, Phase::Watching { since: 9001, .. }));
        assert_eq!(r.active.as_ref().unwrap().id, "b");
        assert_eq!(r.ready, None);
        assert_eq!(r.reason, None);
    }

    #[test]
    fn a_restart_while_waiting_verifies_again_and_keeps_the_defer_bound() {
        let mut t = target("b", 2);
        t.window = window("daily 02:00-04:00");
        let r = ready_b(t);
        let (r, _) = next(&r, Event::SelfTestPassed, 500).unwrap();
        let hold = Hold {
            reason: "waiting".into(),
            until: None,
        };
        let (r, _) = next(&r, Event::Held(hold), 600).unwrap();
        let (r, fx) = next(
            &r,
            Event::Boot {
                served: Some(bref("a", 1)),
                max_watch_restarts: 3,
            },
            5000,
        )
        .unwrap();
        assert_eq!(r.phase.state(), UpdateState::Verifying);
        assert!(has(&fx, |e| matches!(e, Effect::Verify { .. })));
        let (r, _) = next(&r, Event::Verified, 5001).unwrap();
        let (_, fx) = next(&r, Event::SelfTestPassed, 5002).unwrap();
        assert!(
            has(&fx, |e| matches!(
                e,
                Effect::AwaitWindow {
                    ready_since: 500,
                    ..
                }
            )),
            "{fx:?}"
        );
    }

    #[test]
    fn a_new_window_for_the_waiting_bundle_is_judged_again() {
        let mut t = target("b", 2);
        t.window = window("daily 02:00-04:00");
        let r = ready_b(t.clone());
        let (r, _) = step(&r, Event::SelfTestPassed);
        let hold = Hold {
            reason: "waiting".into(),
            until: Some(9000),
        };
        let (r, _) = step(&r, Event::Held(hold.clone()));
        // The operator lifts the window: the same bundle without one.
        let mut lifted = t.clone();
        lifted.window = None;
        let (r2, fx) = step(&r, Event::Desired(Some(lifted)));
        assert_eq!(r2.phase.state(), UpdateState::Waiting);
        assert!(has(&fx, |e| matches!(
            e,
            Effect::AwaitWindow { target, held: Some(h), .. } if target.window.is_none() && *h == hold
        )));
        // The same desired state again changes nothing.
        let (_, fx) = step(&r, Event::Desired(Some(t)));
        assert!(fx.is_empty(), "{fx:?}");
        // A newer bundle supersedes the wait.
        let (r3, fx) = step(&r, Event::Desired(Some(target("c", 3))));
        assert_eq!(r3.phase.state(), UpdateState::Downloading);
        assert_eq!(r3.ready, None);
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Announce {
                what: Lifecycle::Cancelled,
                ..
            }
        )));
    }

    #[test]
    fn a_window_set_while_downloading_applies_to_the_swap() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let mut t = target("b", 2);
        t.window = window("daily 02:00-04:00");
        let (r, fx) = step(&r, Event::Desired(Some(t.clone())));
        assert!(fx.is_empty(), "the download goes on: {fx:?}");
        assert_eq!(r.phase.target().unwrap().window, t.window);
    }

    #[test]
    fn an_unreadable_window_fails_the_candidate() {
        let r = ready_b(target("b", 2));
        let (r, _) = step(&r, Event::SelfTestPassed);
        let (r, fx) = step(
            &r,
            Event::Rejected {
                reason: "maintenance window: unknown time zone".into(),
            },
        );
        assert_eq!(r.phase.state(), UpdateState::Failed);
        assert_eq!(r.active.as_ref().unwrap().id, "a");
        assert!(has(&fx, |e| matches!(e, Effect::DiscardDownload { .. })));
    }

    #[test]
    fn stale_events_are_disallowed() {
        let r = committed_on("a", 1);
        for e in [
            Event::Verified,
            Event::Activated,
            Event::WatchPassed,
            Event::Downloaded,
            Event::SpaceAvailable,
            failed_transfer(TransferFault::Corrupted),
            Event::HealthBreached { reason: "x".into() },
        ] {
            let err = next(&r, e, 0).unwrap_err();
            assert_eq!(err.state, UpdateState::Committed);
        }
    }

    #[test]
    fn records_of_older_agents_still_load() {
        // 0.1 wrote `recently_failed` and phases without the new counters.
        let old = r#"{"phase":{"phase":"downloading","target":{"bundle":{"id":"b","name":"cls","version":"1.0.2","sequence":2},"download":"/x","rollback":false,"rollout_id":"r1","watch":null,"shadow":null},"offset":10},"active":null,"last_known_good":null,"last_failed":null,"reason":null,"pending":null,"recently_failed":["z"],"shadow":null}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert!(matches!(
            r.phase,
            Phase::Downloading {
                offset: 10,
                corrupt: 0,
                gave_up: false,
                ..
            }
        ));
        assert!(r.failures.is_empty());
    }
}

//! The update state machine: one persisted record and one transition
//! function, [`next`]. It does no I/O and takes the time as an argument;
//! the driver ([`crate::updater`]) performs the [`Effect`]s, feeds their
//! outcomes back as [`Event`]s and writes the record after every step.
//!
//! ```text
//! Idle/Committed/Failed/RolledBack ──desired──▶ Downloading{offset}
//!   Downloading ──downloaded──▶ Verifying ──verified──▶ Staged
//!   Staged ──(self-test starts)──▶ SelfTesting ──passed──▶ Shadowing? ──▶ Activate
//!   Activate ──activated──▶ Watching ──window passed──▶ Committed
//!                           Watching ──health breach──▶ RolledBack{reason}
//!   any step ──rejected / failed──▶ Failed{reason}
//! ```
//!
//! Crash safety comes from where the record says the device is: a restart
//! in any step before activation serves the recorded active model and
//! re-verifies the staged file; a restart while watching counts against
//! the new model (after `max_watch_restarts` it is rolled back).

use std::collections::VecDeque;

use edgefleet_wire::device::{BundleRef, ShadowAgreement, ShadowRequest, UpdateState, WatchPolicy};
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
}

/// Where an update stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Downloading {
        target: Target,
        offset: u64,
    },
    Verifying {
        target: Target,
    },
    Staged {
        target: Target,
    },
    SelfTesting {
        target: Target,
    },
    Shadowing {
        target: Target,
    },
    /// `target` is active; `since` is unix seconds of activation.
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
            Phase::Downloading { .. } => UpdateState::Downloading,
            Phase::Verifying { .. } => UpdateState::Verifying,
            Phase::Staged { .. } => UpdateState::Staged,
            Phase::SelfTesting { .. } => UpdateState::SelfTesting,
            Phase::Shadowing { .. } => UpdateState::Shadowing,
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
            | Phase::Verifying { target }
            | Phase::Staged { target }
            | Phase::SelfTesting { target }
            | Phase::Shadowing { target }
            | Phase::Watching { target, .. } => Some(target),
            _ => None,
        }
    }

    fn resting(&self) -> bool {
        self.target().is_none()
    }
}

/// Bundle ids that failed here recently are not retried (no install loops).
pub const FAILED_MEMORY: usize = 16;

/// The persisted update record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub phase: Phase,
    /// The bundle being served.
    pub active: Option<BundleRef>,
    /// The last committed bundle before `active`: the local rollback target.
    pub last_known_good: Option<BundleRef>,
    pub last_failed: Option<BundleRef>,
    /// Why the last update ended the way it did.
    pub reason: Option<String>,
    /// A desired state that arrived while watching, applied afterwards.
    pub pending: Option<Target>,
    pub recently_failed: VecDeque<String>,
    pub shadow: Option<ShadowAgreement>,
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
            recently_failed: VecDeque::new(),
            shadow: None,
        }
    }
}

/// Lifecycle events for reports and MQTT (`edgefleet/v1/{id}/events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    DownloadStarted,
    Downloaded,
    Verified,
    Rejected,
    SelfTestPassed,
    SelfTestFailed,
    ShadowStarted,
    ShadowPassed,
    ShadowFailed,
    Activated,
    RolledBack,
    Committed,
    Cancelled,
}

/// Inputs to the machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The process started with this record.
    Boot {
        max_watch_restarts: u32,
    },
    /// The server (or a sideload) asks for this bundle; `None`: keep what runs.
    Desired(Option<Target>),
    DownloadProgress {
        offset: u64,
    },
    Downloaded,
    /// Transient download failure: retried by the driver with backoff.
    DownloadFailed {
        reason: String,
    },
    Verified,
    /// The driver began loading the staged model beside the active one.
    SelfTestStarted,
    /// Signature, expiry, anti-rollback, arch, agent version, digest: final.
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
    /// Fetch `target` from byte `offset` (0 starts afresh).
    Download {
        target: Target,
        offset: u64,
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
    /// Raise the anti-rollback floor durably, then swap the model in.
    Activate {
        target: Target,
    },
    /// Start (or restart) the health watch of the active model.
    Watch {
        target: Target,
    },
    /// Swap back to `to` (last known good), reason already recorded.
    Rollback {
        to: Option<BundleRef>,
    },
    /// Delete bundles other than active and last known good.
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
        Event::Verified => "verified",
        Event::SelfTestStarted => "self_test_started",
        Event::Rejected { .. } => "rejected",
        Event::SelfTestPassed => "self_test_passed",
        Event::SelfTestFailed { .. } => "self_test_failed",
        Event::ShadowDone { .. } => "shadow_done",
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
        (_, Event::Boot { max_watch_restarts }) => match rec.phase.clone() {
            Phase::Downloading { target, offset } => {
                fx.push(Effect::Download { target, offset });
            }
            // Everything between download and activation restarts from
            // verification: the file on disk is re-checked, never trusted.
            Phase::Verifying { target }
            | Phase::Staged { target }
            | Phase::SelfTesting { target }
            | Phase::Shadowing { target } => {
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
                    fx.push(Effect::Watch { target });
                }
            }
            Phase::Idle | Phase::Committed | Phase::Failed { .. } | Phase::RolledBack { .. } => {
                if let Some(p) = r.pending.take() {
                    return next(&r, Event::Desired(Some(p)), now);
                }
            }
        },

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
                // Same bundle, maybe new rollout parameters: nothing to redo.
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
                if matches!(phase, Phase::Downloading { .. }) {
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
                return Ok((r, fx));
            }
            if rec.recently_failed.contains(&want.bundle.id) {
                // Already failed here: report, don't loop.
                if !phase.resting() {
                    r.phase = Phase::Failed {
                        reason: format!("{} failed here before", want.bundle.id),
                    };
                }
                return Ok((r, fx));
            }
            r.reason = None;
            r.shadow = None;
            r.phase = Phase::Downloading {
                target: want.clone(),
                offset: 0,
            };
            fx.push(announce(Lifecycle::DownloadStarted, None));
            fx.push(Effect::Download {
                target: want,
                offset: 0,
            });
        }

        // ---- download ---------------------------------------------------
        (Phase::Downloading { target, .. }, Event::DownloadProgress { offset }) => {
            r.phase = Phase::Downloading {
                target: target.clone(),
                offset,
            };
        }
        (Phase::Downloading { target, offset }, Event::DownloadFailed { .. }) => {
            // Transient: the driver retries with backoff from `offset`; a
            // new desired state still supersedes it at any time.
            fx.push(Effect::Download {
                target: target.clone(),
                offset: *offset,
            });
        }
        (Phase::Downloading { target, .. }, Event::Downloaded) => {
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
            r.phase = Phase::Staged {
                target: target.clone(),
            };
            fx.push(announce(Lifecycle::Verified, None));
            fx.push(Effect::SelfTest {
                target: target.clone(),
            });
        }
        (Phase::Staged { target }, Event::SelfTestStarted) => {
            r.phase = Phase::SelfTesting {
                target: target.clone(),
            };
        }
        (
            Phase::Downloading { target, .. }
            | Phase::Verifying { target }
            | Phase::Staged { target },
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
                fx.push(Effect::Activate {
                    target: target.clone(),
                });
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
                    fx.push(Effect::Activate {
                        target: target.clone(),
                    });
                }
                Err(reason) => {
                    fail_candidate(&mut r, &mut fx, target, Lifecycle::ShadowFailed, reason);
                }
            }
        }

        // ---- activation and watch -------------------------------------------
        (Phase::SelfTesting { target } | Phase::Shadowing { target }, Event::Activated) => {
            // The previous committed model becomes the rollback target.
            if !matches!(rec.phase, Phase::Watching { .. }) {
                r.last_known_good = rec.active.clone().or(rec.last_known_good.clone());
            }
            r.active = Some(target.bundle.clone());
            r.phase = Phase::Watching {
                target: target.clone(),
                since: now,
                restarts: 0,
            };
            fx.push(announce(Lifecycle::Activated, None));
            fx.push(Effect::Watch {
                target: target.clone(),
            });
        }
        (
            Phase::SelfTesting { target } | Phase::Shadowing { target },
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

fn remember_failure(r: &mut Record, id: &str) {
    if !r.recently_failed.iter().any(|f| f == id) {
        r.recently_failed.push_back(id.to_string());
    }
    while r.recently_failed.len() > FAILED_MEMORY {
        r.recently_failed.pop_front();
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
    remember_failure(r, &target.bundle.id);
    r.last_failed = Some(target.bundle.clone());
    r.reason = Some(reason.clone());
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
    remember_failure(r, &target.bundle.id);
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
    #![allow(clippy::unwrap_used)]
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
            rollout_id: None,
            watch: None,
            shadow: None,
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

    #[test]
    fn happy_path_runs_download_verify_selftest_activate_watch_commit() {
        let r = committed_on("a", 1);
        let (r, fx) = step(&r, Event::Desired(Some(target("b", 2))));
        assert!(matches!(r.phase, Phase::Downloading { offset: 0, .. }));
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download { offset: 0, .. }
        )));
        let (r, _) = step(&r, Event::DownloadProgress { offset: 500 });
        assert!(matches!(r.phase, Phase::Downloading { offset: 500, .. }));
        let (r, fx) = step(&r, Event::Downloaded);
        assert!(has(&fx, |e| matches!(e, Effect::Verify { .. })));
        let (r, fx) = step(&r, Event::Verified);
        assert_eq!(r.phase.state(), UpdateState::Staged);
        assert!(has(&fx, |e| matches!(e, Effect::SelfTest { .. })));
        let (r, _) = step(&r, Event::SelfTestStarted);
        assert_eq!(r.phase.state(), UpdateState::SelfTesting);
        let (r, fx) = step(&r, Event::SelfTestPassed);
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
        assert!(has(&fx, |e| matches!(e, Effect::Watch { .. })));
        let (r, fx) = step(&r, Event::WatchPassed);
        assert_eq!(r.phase, Phase::Committed);
        assert!(has(&fx, |e| matches!(e, Effect::CollectGarbage)));
    }

    #[test]
    fn health_breach_rolls_back_to_last_known_good_and_never_retries() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, _) = step(&r, Event::Downloaded);
        let (r, _) = step(&r, Event::Verified);
        let (r, _) = step(&r, Event::SelfTestStarted);
        let (r, _) = step(&r, Event::SelfTestPassed);
        let (r, _) = step(&r, Event::Activated);
        let (r, fx) = step(
            &r,
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
        // The server still wants b: no reinstall loop.
        let (r2, fx) = step(&r, Event::Desired(Some(target("b", 2))));
        assert_eq!(r2.phase.state(), UpdateState::RolledBack);
        assert!(!has(&fx, |e| matches!(e, Effect::Download { .. })));
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
                step(&step(&r, Event::Verified).0, Event::SelfTestStarted).0
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
    fn a_new_desired_state_supersedes_a_stuck_download() {
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, fx) = step(
            &r,
            Event::DownloadFailed {
                reason: "connection refused".into(),
            },
        );
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
        let r = committed_on("a", 1);
        let (r, _) = step(&r, Event::Desired(Some(target("b", 2))));
        let (r, _) = step(&r, Event::Downloaded);
        let (r, _) = step(&r, Event::Verified);
        let (r, _) = step(&r, Event::SelfTestStarted);
        let (r, _) = step(&r, Event::SelfTestPassed);
        let (watching, _) = step(&r, Event::Activated);

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
            },
            ..committed_on("a", 1)
        };
        let (_, fx) = step(
            &down,
            Event::Boot {
                max_watch_restarts: 3,
            },
        );
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Download { offset: 4096, .. }
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
            let (r, fx) = step(
                &rec,
                Event::Boot {
                    max_watch_restarts: 3,
                },
            );
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
            let (r, fx) = step(
                &watching,
                Event::Boot {
                    max_watch_restarts: 3,
                },
            );
            assert!(matches!(r.phase, Phase::Watching { restarts, .. } if restarts == expected));
            assert!(has(&fx, |e| matches!(e, Effect::Watch { .. })));
            watching = r;
        }
        let (r, fx) = step(
            &watching,
            Event::Boot {
                max_watch_restarts: 3,
            },
        );
        assert_eq!(r.phase.state(), UpdateState::RolledBack);
        assert!(r.reason.as_ref().unwrap().contains("restarted 3 times"));
        assert!(has(&fx, |e| matches!(e, Effect::Rollback { .. })));
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
        let (r, _) = step(&r, Event::SelfTestStarted);
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
        assert!(has(&fx, |e| matches!(e, Effect::Activate { .. })));
    }

    #[test]
    fn stale_events_are_disallowed() {
        let r = committed_on("a", 1);
        for e in [
            Event::Verified,
            Event::Activated,
            Event::WatchPassed,
            Event::Downloaded,
            Event::HealthBreached { reason: "x".into() },
        ] {
            let err = next(&r, e, 0).unwrap_err();
            assert_eq!(err.state, UpdateState::Committed);
        }
    }
}

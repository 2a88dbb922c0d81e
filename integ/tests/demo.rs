//! README's first command, end to end: `scripts/demo.sh` runs a real fleet
//! server, 8 real agents and three releases, and exits non-zero unless every
//! step happened (canary stages, automatic rollback, auto-pause, fleet on v2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use integ::bins;

#[test]
fn the_demo_runs_every_step_and_ends_with_the_fleet_on_v2() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(root.join("scripts/demo.sh"))
        .env("DEMO_QUIET", "1")
        .env("EDGEFLEET_BIN_DIR", bins::bin_dir())
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for expected in [
        "all 8 devices run and committed cls 1.0.0",
        "all 8 devices run and committed cls 2.0.0",
        "gate max_rollback_pct",
        "rolled back on their own",
        "DEMO OK",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

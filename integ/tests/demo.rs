//! README's first command, end to end: `scripts/demo.sh` runs a real fleet
//! server, 8 real agents and three releases, and exits non-zero unless every
//! step happened (canary stages, automatic rollback, auto-pause, fleet on v2).
//! Then again with `DEMO_TLS=1`: HTTPS, mqtts and device client
//! certificates (one after the other: each run loads both cores).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use integ::bins;

fn run_demo(tls: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(root.join("scripts/demo.sh"))
        .env("DEMO_QUIET", "1")
        .env("DEMO_TLS", if tls { "1" } else { "0" })
        .env("EDGEFLEET_BIN_DIR", bins::bin_dir())
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo (tls: {tls}) failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let mut expected = vec![
        "all 8 devices run and committed cls 1.0.0",
        "all 8 devices run and committed cls 2.0.0",
        "gate max_rollback_pct",
        "rolled back on their own",
        "DEMO OK",
    ];
    if tls {
        expected.push("Over TLS: HTTPS API and mqtts broker");
    }
    for e in expected {
        assert!(
            stdout.contains(e),
            "missing {e:?} (tls: {tls}) in:\n{stdout}"
        );
    }
}

#[test]
fn the_demo_runs_every_step_and_ends_with_the_fleet_on_v2() {
    run_demo(false);
    run_demo(true);
}

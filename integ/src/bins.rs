//! The workspace's binaries (`fleet-server`, `fleetctl`, `edge-agent`,
//! `fleet-sim`) as `cargo test` builds them (each crate has an integration
//! test, so cargo builds its binary), for tests that start them as processes.
//!
//! They must come from the test build itself: a plain `cargo build -p …`
//! resolves features without dev-dependencies, and that different feature
//! set recompiles every dependency, tract included (20 minutes of a cold CI
//! run on 2 cores).

use std::path::PathBuf;
use std::process::Command;

/// The folder holding the binaries, after building the workspace's test
/// targets (a no-op inside `cargo test --workspace`; it makes a lone
/// `cargo test -p fleet-server --test kill` use a fresh `edge-agent`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--workspace", "--locked", "--no-run", "-q"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo test --no-run");
    assert!(st.success(), "building the workspace's test targets failed");
    for b in ["fleet-server", "fleetctl", "edge-agent", "fleet-sim"] {
        assert!(dir.join(b).exists(), "{} missing", dir.join(b).display());
    }
    dir
}

/// One of the workspace's binaries (`fleet-server`, `fleetctl`, `edge-agent`).
pub fn bin(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(bin_dir).join(name)
}

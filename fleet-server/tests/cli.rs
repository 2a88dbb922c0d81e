//! The `fleet-server` binary's contract with its supervisor: a bad config
//! is a usage error (exit 2) naming the file and the key, before anything
//! starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_fleet-server"))
        .args(args)
        .output()
        .expect("run fleet-server");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_missing_or_invalid_config_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.toml");
    let (code, err) = run(&["--config", missing.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope.toml"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[http]\nlisten = \"127.0.0.1:0\"\nlisten_twice = 1\n").expect("write");
    let (code, err) = run(&["--config", bad.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown field") && err.contains("listen_twice"),
        "{err}"
    );
}

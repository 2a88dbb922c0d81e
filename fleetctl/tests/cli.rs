//! fleetctl's exit codes and error lines, which scripts rely on: 0 ok,
//! 1 an error, 2 a usage error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn fleetctl(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .env_remove("FLEETCTL_SERVER")
        .env_remove("FLEETCTL_TOKEN")
        .output()
        .expect("run fleetctl");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    // Unknown subcommand, missing arguments: clap's usage error.
    assert_eq!(fleetctl(&["bundle", "frobnicate"]).0, 2);
    assert_eq!(fleetctl(&["rollout", "create"]).0, 2);
    // No server configured: our usage error, with what to do.
    let (code, _, err) = fleetctl(&["bundle", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("FLEETCTL_SERVER"), "{err}");
    // A bad duration is a usage error too.
    let (code, _, err) = fleetctl(&[
        "rollout",
        "create",
        "--bundle",
        "x",
        "--stages",
        "10:5x",
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "t",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad duration"), "{err}");
    // A file that is not a bundle: an error (1) with the reason first.
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("junk.bundle");
    std::fs::write(&f, b"not a bundle at all, just text").expect("write");
    let key = dir.path().join("k");
    assert_eq!(
        fleetctl(&["keygen", "--out", key.to_str().expect("utf-8")]).0,
        0
    );
    let (code, _, err) = fleetctl(&[
        "bundle",
        "verify",
        f.to_str().expect("utf-8"),
        "--trust",
        &format!("{}.pub", key.display()),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad magic") || err.contains("magic"), "{err}");
    // An unreachable server: an error (1), naming it.
    let (code, _, err) = fleetctl(&[
        "bundle",
        "list",
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "t",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
}

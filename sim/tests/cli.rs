//! `fleet-sim` refuses to start without what it needs (exit 2, clap's
//! usage error) and fails clearly when the server is not there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn usage_errors_exit_2_and_an_absent_server_fails_with_a_message() {
    let o = Command::new(env!("CARGO_BIN_EXE_fleet-sim"))
        .args(["--devices", "3"])
        .output()
        .expect("run fleet-sim");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--token"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let o = Command::new(env!("CARGO_BIN_EXE_fleet-sim"))
        .args(["--token", "t", "--enrollment-token", "e", "--devices", "2"])
        .args(["--steady-secs", "0", "--server"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--mqtt", &format!("mqtt://127.0.0.1:{port}")])
        .output()
        .expect("run fleet-sim");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("enrolled 0 devices"), "{err}");
}

//! The `fleet-server` binary's contract with its supervisor: a bad config
//! is a usage error (exit 2) naming the file and the key, before anything
//! starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let (code, _, err) = run_out(args);
    (code, err)
}

/// Exit code, stdout, stderr.
fn run_out(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_fleet-server"))
        .args(args)
        .env_remove("FLEET_SERVER_LOG_FORMAT")
        .output()
        .expect("run fleet-server");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn check_config_loads_keys_tokens_and_tls_files_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let key = d.join("release.pub");
    std::fs::write(
        &key,
        edgefleet_wire::keys::encode_public_key(
            &edgefleet_wire::keys::signing_key_from_seed([1; 32]).verifying_key(),
        ),
    )
    .expect("write");
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let data = d.join("data");
    let good = write(
        "good.toml",
        format!(
            "data_dir = {data:?}\n[trust]\nkeys = [{key:?}]\n[auth]\nenrollment_tokens = [\"e\"]\n"
        ),
    );
    let (code, out, err) = run_out(&["--config", good.to_str().expect("utf-8"), "--check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("config is good") && out.contains("[trust]"),
        "{out}"
    );
    // Nothing started: no store was created.
    assert!(!data.join("store").exists());

    let missing_key = write(
        "k.toml",
        format!(
            "data_dir = {data:?}\n[trust]\nkeys = [{:?}]\n",
            d.join("gone.pub")
        ),
    );
    let (code, _, err) = run_out(&[
        "--config",
        missing_key.to_str().expect("utf-8"),
        "--check-config",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("[trust] keys") && err.contains("gone.pub"),
        "{err}"
    );

    let bad_tls = write(
        "t.toml",
        format!(
            "data_dir = {data:?}\n[http]\ntls_cert = {:?}\ntls_key = {:?}\n[trust]\nkeys = [{key:?}]\n",
            key, key
        ),
    );
    let (code, _, err) = run_out(&[
        "--config",
        bad_tls.to_str().expect("utf-8"),
        "--check-config",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[http] tls_cert"), "{err}");
    let required_without_ca = write(
        "r.toml",
        format!(
            "data_dir = {data:?}\n[http]\ndevice_certs = \"required\"\n[trust]\nkeys = [{key:?}]\n"
        ),
    );
    let (code, _, err) = run_out(&["--config", required_without_ca.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("client_ca"), "{err}");
}

#[test]
fn version_names_commit_and_target_and_logs_are_plain_or_json() {
    let (code, out, _) = run_out(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.contains("commit ") && out.contains("target "), "{out}");
    // Not a terminal: no colour codes; --log-format json: one object a line.
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("release.pub");
    std::fs::write(
        &key,
        edgefleet_wire::keys::encode_public_key(
            &edgefleet_wire::keys::signing_key_from_seed([1; 32]).verifying_key(),
        ),
    )
    .expect("write");
    for format in ["text", "json"] {
        let cfg = dir.path().join(format!("{format}.toml"));
        let data = dir.path().join(format);
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[trust]\nkeys = [{key:?}]\n"
            ),
        )
        .expect("write");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-server"))
            .args([
                "--config",
                cfg.to_str().expect("utf-8"),
                "--log-format",
                format,
            ])
            .env("FLEET_SERVER_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        // It logs while starting; the "listening on" line says it started.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read");
        assert!(line.contains("listening on"), "{line}");
        child.kill().expect("kill");
        let o = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains('\u{1b}'), "{format}: colour codes in {err:?}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "{format}: no log lines");
        if format == "json" {
            for l in lines {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
            }
        }
    }
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

#[test]
fn the_commented_example_config_passes_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/fleet-server.example.toml");
    let cfg = dir.path().join("fleet-server.toml");
    std::fs::copy(&example, &cfg).expect("copy the example");
    for (name, seed) in [("release-a.pub", 1u8), ("release-b.pub", 2)] {
        std::fs::write(
            dir.path().join(name),
            edgefleet_wire::keys::encode_public_key(
                &edgefleet_wire::keys::signing_key_from_seed([seed; 32]).verifying_key(),
            ),
        )
        .expect("write a key");
    }
    let (code, out, err) = run_out(&["--config", cfg.to_str().expect("utf-8"), "--check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config is good"), "{out}");
}

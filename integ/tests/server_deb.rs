//! `scripts/build-server-deb.sh` packages this build's fleet-server: the
//! package metadata, its files, the conffile, maintainer scripts that
//! parse, a unit systemd accepts, and a packaged binary that accepts the
//! packaged config once the release key it names exists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use integ::common::repo;

#[track_caller]
fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_server_deb_holds_the_binary_unit_config_and_user_setup() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no dpkg-deb (not a Debian machine)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let bin = integ::bins::bin("fleet-server");
    // Uncompressed: xz on a debug build's binary takes a minute.
    let listing = run(Command::new("bash")
        .env("DEB_COMPRESS", "none")
        .arg(repo("scripts/build-server-deb.sh"))
        .arg("--bin")
        .arg(&bin)
        .arg("--out")
        .arg(out.path()));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("no .deb: {listing}"));

    let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "fleet-server");
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>= 2.") && depends.contains("adduser"),
        "{depends}"
    );
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for f in [
        "./usr/bin/fleet-server",
        "./lib/systemd/system/fleet-server.service",
        "./etc/fleet-server/fleet-server.toml",
        "./usr/share/doc/fleet-server/deploy.md",
        "./usr/share/doc/fleet-server/fleet-server.example.toml",
    ] {
        assert!(contents.contains(f), "{f} missing:\n{contents}");
    }
    assert!(
        contents.contains("root/root"),
        "files owned by root:\n{contents}"
    );

    let x = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(x.path()));
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(x.path().join("DEBIAN")));
    let conffiles = std::fs::read_to_string(x.path().join("DEBIAN/conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/fleet-server/fleet-server.toml");
    for s in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh")
            .arg("-n")
            .arg(x.path().join("DEBIAN").join(s)));
    }

    // The packaged binary with the packaged config: only the release key
    // (which the operator supplies) is missing; with it the check passes.
    let cfg_text =
        std::fs::read_to_string(x.path().join("etc/fleet-server/fleet-server.toml")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let key = integ::common::write_key(state.path());
    let cfg = state.path().join("fleet-server.toml");
    std::fs::write(
        &cfg,
        cfg_text
            .replace("/etc/fleet-server/release.pub", key.to_str().unwrap())
            .replace("/var/lib/fleet-server", state.path().to_str().unwrap()),
    )
    .unwrap();
    let packaged = x.path().join("usr/bin/fleet-server");
    let checked = run(Command::new(&packaged)
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config"));
    assert!(checked.contains("config is good"), "{checked}");
    let missing_key = Command::new(&packaged)
        .arg("--config")
        .arg(x.path().join("etc/fleet-server/fleet-server.toml"))
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(missing_key.status.code(), Some(2), "no release key yet");

    // systemd's own check of the unit, where systemd is installed.
    let unit = x.path().join("lib/systemd/system/fleet-server.service");
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
    {
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            // verify also checks that ExecStart exists on this machine.
            let relevant: Vec<&str> = err
                .lines()
                .filter(|l| !l.contains("/usr/bin/fleet-server") && !l.trim().is_empty())
                .filter(|l| l.contains("fleet-server.service"))
                .collect();
            assert!(relevant.is_empty(), "systemd-analyze verify:\n{err}");
        }
        Err(_) => eprintln!("no systemd-analyze: the unit is not verified"),
    }
}

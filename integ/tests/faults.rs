//! Real faults between a real `edge-agent run` process and a real fleet
//! server, each followed by an honest spell in which the device must
//! converge on its own:
//! - a proxy on the download path flips bytes, truncates, cuts the
//!   connection at random points, replays another bundle, stalls, and
//!   answers 500s;
//! - the agent's data directory (a small tmpfs) fills up mid-rollout, the
//!   agent is killed and restarted on the full disk, and space returns;
//! - the compiled form the agent keeps of an installed model is corrupted
//!   between two starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integ::agent::{AgentProc, floor_sequence};
use integ::bundles::{Model, Pack};
use integ::common::write_key;
use integ::fleet::{ENROLL, TestFleet};
use integ::proxy::{Fault, FaultProxy};
use serde_json::Value;

fn agent_config(dir: &Path, data: &Path, server: &str, key: &Path, device: &str) -> PathBuf {
    let config = dir.join(format!("{device}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"device_id = "{device}"
data_dir = "{data}"
[tags]
board = "test"
[server]
url = "{server}"
enrollment_token = "{ENROLL}"
poll_interval_secs = 1
report_interval_secs = 1
[trust]
keys = ["{key}"]
[http]
listen = "127.0.0.1:0"
[update]
watch_secs = 1
retry_min_ms = 100
retry_max_ms = 700
max_corrupt_transfers = 2
download_idle_timeout_secs = 2
free_space_margin_bytes = 1048576
"#,
            data = data.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    config
}

/// Waits until the agent has committed bundle `id`.
async fn until_committed(http: &reqwest::Client, agent: &AgentProc, id: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = agent.status(http).await;
        if s["state"] == "committed" && s["record"]["active"]["id"] == id {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: did not converge: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_faults_are_retried_until_the_transport_is_honest() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path());
    let fleet = TestFleet::start().await;
    let proxy = FaultProxy::start(fleet.addr).await;
    let data = dir.path().join("agent");
    let config = agent_config(dir.path(), &data, &proxy.url(), &key, "flaky-1");
    let log = dir.path().join("agent.log");
    let agent = AgentProc::spawn(&config, &log);
    let http = edge_agent::tls::default_client();

    let v1 = Pack::new(Model::Cls, 1).bytes();
    let id1 = fleet.push(v1.clone()).await;
    fleet.roll_out(&id1, "test").await;
    until_committed(&http, &agent, &id1, "v1 over an honest link").await;

    proxy.set_replay(v1);
    let mut serving = "1.1.0".to_string();
    let modes = [
        Fault::Flip,
        Fault::Truncate,
        Fault::Replay,
        Fault::Stall,
        Fault::Error500,
        Fault::Cut,
    ];
    for (i, fault) in modes.into_iter().enumerate() {
        let bytes = Pack::new(Model::Cls, 2 + i as u64).bytes();
        let size = bytes.len() as u64;
        let id = fleet.push(bytes).await;
        let before = (proxy.tampered(), proxy.download_bytes());
        proxy.set(fault);
        fleet.roll_out(&id, "test").await;

        // The faulty link is retried, and the server sees it.
        let want_tampered = if fault == Fault::Cut { 5 } else { 3 };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen_retry = false;
        let mut seen_failed = false;
        loop {
            let d = fleet.device("flaky-1").await;
            seen_retry |= d["retries"].as_u64().unwrap_or(0) > 0;
            seen_failed |= d["state"] == "failed"
                && d["reason"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("transfer_corrupted");
            let enough = proxy.tampered() - before.0 >= want_tampered;
            if enough && seen_retry {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{fault:?}: {} tampered downloads, retries seen {seen_retry}; device {d:#}",
                proxy.tampered() - before.0
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The old model serves throughout.
        assert_eq!(
            agent.serves_cls_golden(&http, &format!("{fault:?}")).await,
            serving
        );
        if matches!(fault, Fault::Flip | Fault::Truncate | Fault::Replay) {
            // Corrupted bytes: after two in a row the device reports
            // `failed` (transfer_corrupted) and keeps retrying.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !seen_failed {
                let d = fleet.device("flaky-1").await;
                seen_failed = d["state"] == "failed"
                    && d["reason"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("transfer_corrupted");
                assert!(
                    Instant::now() < deadline,
                    "{fault:?}: never reported transfer_corrupted: {d:#}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        // Honest again: the device converges without an operator.
        proxy.set(Fault::Honest);
        until_committed(&http, &agent, &id, &format!("after {fault:?}")).await;
        let version = format!("1.{}.0", 2 + i);
        assert_eq!(
            agent.serves_cls_golden(&http, &format!("{fault:?}")).await,
            version
        );
        serving = version;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = fleet.device("flaky-1").await;
            if d["active"]["id"] == id.as_str() && d["state"] == "committed" {
                assert_eq!(d["retries"], 0, "{d:#}");
                break;
            }
            assert!(Instant::now() < deadline, "server view: {d:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if fault == Fault::Cut {
            // Resumes start where the part file ends: cut at random
            // points, the link carries little more than the bundle once.
            let carried = proxy.download_bytes() - before.1;
            eprintln!(
                "cut {} times: {carried} bytes carried for a {size}-byte bundle",
                proxy.tampered() - before.0
            );
            assert!(
                (carried as f64) < 1.2 * size as f64,
                "{carried} bytes crossed the link for a {size}-byte bundle"
            );
        }
    }
}

/// A tmpfs of `mib` MiB; `None` (with a message) unless root.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u32) -> Option<Tmpfs> {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
            eprintln!(
                "SKIPPED: the full-disk test mounts a small tmpfs, which needs root (CI runs as root)"
            );
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        if !ok {
            // Root without CAP_SYS_ADMIN (some containers). CI sets
            // EDGEFLEET_REQUIRE_TMPFS=1 where it can mount, so it never skips.
            assert!(
                std::env::var("EDGEFLEET_REQUIRE_TMPFS").is_err(),
                "mount -t tmpfs failed and EDGEFLEET_REQUIRE_TMPFS is set"
            );
            eprintln!("SKIPPED: mount -t tmpfs is not permitted here (root without CAP_SYS_ADMIN)");
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }

    /// Fills the filesystem with `filler`; its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let buf = vec![0u8; 4096];
        while f.write_all(&buf).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_rollout_is_survived_and_converges_once_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent");
    let Some(fs) = Tmpfs::mount(&data, 24) else {
        return;
    };
    let key = write_key(dir.path());
    let fleet = TestFleet::start().await;
    let config = agent_config(dir.path(), &data, &fleet.url, &key, "full-1");
    let log = dir.path().join("agent.log");
    let mut agent = AgentProc::spawn(&config, &log);
    let http = edge_agent::tls::default_client();

    let id1 = fleet.push(Pack::new(Model::Cls, 1).bytes()).await;
    fleet.roll_out(&id1, "test").await;
    until_committed(&http, &agent, &id1, "v1").await;
    assert_eq!(floor_sequence(&data, "cls"), 10);
    until_written(&agent).await;
    let compiled_v1 = compiled_files(&data);
    assert_eq!(compiled_v1.len(), 1, "{compiled_v1:?}");

    // The disk fills; v2 is rolled out.
    let filler = fs.fill();
    let id2 = fleet.push(Pack::new(Model::Cls, 2).bytes()).await;
    fleet.roll_out(&id2, "test").await;
    let blocked = |d: &Value| {
        d["state"] == "blocked"
            && d["reason"]
                .as_str()
                .unwrap_or("")
                .contains("insufficient_space")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = fleet.device("full-1").await;
        if blocked(&d) && d["staged"]["id"] == id2.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "never blocked: {d:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.serves_cls_golden(&http, "the agent").await, "1.1.0");
    // The compiled form of v1 is derived data: it made way for the download.
    assert!(
        compiled_files(&data).is_empty(),
        "{:?}",
        compiled_files(&data)
    );

    // kill -9 on the full disk, twice: it starts, serves v1 and reports
    // the condition each time.
    for round in 0..2 {
        agent.kill();
        let reports_before = fleet.device("full-1").await["last_seen"].as_u64();
        agent = AgentProc::spawn(&config, &log);
        assert_eq!(
            agent.serves_cls_golden(&http, "the agent").await,
            "1.1.0",
            "round {round}: serves its active model on a full disk"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = agent.status(&http).await;
            let d = fleet.device("full-1").await;
            let fresh = d["last_seen"].as_u64() > reports_before;
            if s["state"] == "blocked" && blocked(&d) && fresh {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: not reported blocked after restart: agent {s:#} server {d:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Nothing was taken for corruption.
        let aside: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("corrupt"))
            .collect();
        assert!(
            aside.is_empty(),
            "store moved aside on a full disk: {aside:?}"
        );
        // The record agrees with the floor: v1 active, floor 10.
        let s = agent.status(&http).await;
        assert_eq!(s["record"]["active"]["id"], id1.as_str());
        assert_eq!(floor_sequence(&data, "cls"), 10);
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    let store_errors = log_text
        .lines()
        .filter(|l| l.contains("store write failed"))
        .count();
    assert!(
        store_errors < 20,
        "{store_errors} store error lines: the full disk floods the log"
    );

    // Space returns: v2 installs with no operator action.
    std::fs::remove_file(filler).unwrap();
    until_committed(&http, &agent, &id2, "v2 once space returned").await;
    assert_eq!(floor_sequence(&data, "cls"), 20);
    // The record never lags the floor: after a kill -9, v2 serves.
    agent.kill();
    let agent = AgentProc::spawn(&config, &log);
    assert_eq!(agent.serves_cls_golden(&http, "the agent").await, "1.2.0");
    let s = agent.status(&http).await;
    assert_eq!(s["record"]["active"]["id"], id2.as_str(), "{s:#}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = fleet.device("full-1").await;
        if d["state"] == "committed" && d["active"]["id"] == id2.as_str() && d["degraded"].is_null()
        {
            break;
        }
        assert!(Instant::now() < deadline, "server view: {d:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(agent);
    drop(fs);
}

/// The agent keeps an installed ONNX model compiled next to its bundle and
/// starts from it after a kill -9. A byte flipped in that file is caught by
/// its digest: the next start deletes it, serves the bundle's own model
/// (golden outputs), and writes the compiled form again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_starts_from_the_kept_compiled_model_and_survives_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path());
    let data = dir.path().join("data");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"compiled-1\"\ndata_dir = \"{}\"\n[trust]\nkeys = [\"{}\"]\n[http]\nlisten = \"127.0.0.1:0\"\n",
            data.display(),
            key.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let http = edge_agent::tls::default_client();
    let mut agent = AgentProc::spawn(&config, &log);
    agent
        .sideload(&http, Pack::new(Model::Cls, 1).bytes())
        .await;
    assert_eq!(
        agent.serves_cls_golden(&http, "after install").await,
        "1.1.0"
    );
    until_written(&agent).await;
    assert_eq!(compiled_files(&data).len(), 1);

    agent.kill();
    agent = AgentProc::spawn(&config, &log);
    assert_eq!(
        agent.serves_cls_golden(&http, "after a restart").await,
        "1.1.0"
    );
    assert_eq!(
        compiled(&agent, "used").await,
        1,
        "the restart did not start from it"
    );
    assert_eq!(compiled(&agent, "rejected").await, 0);

    agent.kill();
    let file = compiled_files(&data).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let agent = AgentProc::spawn(&config, &log);
    assert_eq!(
        agent
            .serves_cls_golden(&http, "after the file was corrupted")
            .await,
        "1.1.0"
    );
    assert_eq!(compiled(&agent, "used").await, 0);
    assert_eq!(compiled(&agent, "rejected").await, 1);
    until_written(&agent).await;
    let again = compiled_files(&data);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(std::fs::read(&again[0]).unwrap(), bytes);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("compiled model rejected"),
        "the rejection is logged"
    );
}

/// The agent's count of compiled-model `event`s.
async fn compiled(agent: &AgentProc, event: &str) -> u64 {
    agent
        .counter(&format!(
            "edge_agent_compiled_models_total{{event=\"{event}\"}}"
        ))
        .await
}

/// Waits until the agent wrote a compiled model.
async fn until_written(agent: &AgentProc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while compiled(agent, "written").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the model was never kept compiled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The compiled models in an agent's data directory.
fn compiled_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("bundles"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".compiled-"))
                .collect()
        })
        .unwrap_or_default()
}

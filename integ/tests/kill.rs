//! Crash safety: a real `edge-agent run` process, updated by a real fleet
//! server, is killed with SIGKILL at many points of an update (download,
//! verify, self-test, swap, watch, commit) and restarted each time.
//!
//! After every kill it checks that:
//! - the anti-rollback floor file is whole and never went backwards;
//! - the restarted agent serves a model that passes the golden check (so it
//!   never serves a half-written one) and is one of the pushed bundles;
//! - the agent converges to the desired bundle, or to a recorded rollback.
//!
//! Iterations: `KILL_ITERATIONS` (default 50); `scripts/kill-test.sh N`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use integ::agent::{AgentProc, floor_sequence};
use integ::bundles::{Model, Pack};
use integ::common;
use integ::fleet::{ENROLL, TestFleet};

/// Tiny deterministic PRNG (no dependency): kill delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_kill_9_at_random_points_of_updates() {
    let iterations: u64 = std::env::var("KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let key = common::write_key(dir.path());

    let fleet = TestFleet::start().await;
    let server = fleet.url.clone();
    let http = edge_agent::tls::default_client();

    let data = dir.path().join("agent");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"device_id = "kill-1"
data_dir = "{data}"
[tags]
board = "qemu"
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
retry_max_ms = 1000
[testing]
download_bytes_per_sec = 1000000
"#,
            data = data.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");

    let mut pushed: BTreeMap<String, String> = BTreeMap::new(); // version -> id
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut agent = AgentProc::spawn(&config, &log);
    let mut floor = 0u64;
    let mut killed_in: BTreeMap<String, u64> = BTreeMap::new();
    // The phase each iteration aims its kill at (then a random delay).
    let aims = [
        "downloading",
        "self_testing",
        "watching",
        "committed",
        "any",
    ];

    for i in 1..=iterations {
        let t_iter = Instant::now();
        let version = format!("1.{i}.0");
        let bytes = Pack::new(Model::Cls, i).bytes();
        let id = fleet.push(bytes).await;
        pushed.insert(version.clone(), id.clone());
        fleet.roll_out(&id, "qemu").await;

        // Aim, then kill -9.
        let aim = aims[(i as usize) % aims.len()];
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{}/v1/status", agent.url)).send().await
                && let Ok(s) = r.json::<Value>().await
            {
                seen = s["state"].as_str().unwrap_or("").to_string();
                let on_target = s["record"]["phase"]["target"]["bundle"]["id"] == id.as_str()
                    || s["record"]["active"]["id"] == id.as_str();
                if on_target && (aim == "any" || seen == aim) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.next() % 150)).await;
        agent.child.kill().unwrap();
        agent.child.wait().unwrap();
        *killed_in.entry(seen.clone()).or_default() += 1;

        // The floor is whole and never went backwards.
        let now_floor = floor_sequence(&data, "cls");
        assert!(
            now_floor >= floor,
            "floor went back from {floor} to {now_floor}"
        );
        floor = now_floor;

        agent = AgentProc::spawn(&config, &log);
        // It serves a whole, self-tested model from the pushed set.
        let v = agent
            .serves_cls_golden(&http, &format!("iteration {i}, after the restart"))
            .await;
        assert!(pushed.contains_key(&v), "serving unknown version {v}");
        // It converges: the new bundle committed, or a recorded rollback.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            let s = agent.status(&http).await;
            let committed = s["state"] == "committed" && s["record"]["active"]["id"] == id.as_str();
            let recorded = matches!(s["state"].as_str(), Some("rolled_back" | "failed"))
                && s["record"]["last_failed"]["id"] == id.as_str()
                && s["record"]["reason"].is_string();
            if committed || recorded {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "iteration {i} (killed in {seen}): did not converge: {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let now_floor = floor_sequence(&data, "cls");
        assert!(
            now_floor >= floor,
            "floor went back from {floor} to {now_floor}"
        );
        floor = now_floor;
        eprintln!(
            "iteration {i}: killed while {seen}, {} in {:.1} s",
            status["state"],
            t_iter.elapsed().as_secs_f64()
        );
        if status["state"] != "committed" {
            eprintln!(
                "iteration {i}: recorded {}: {}",
                status["state"], status["record"]["reason"]
            );
        }
    }
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    eprintln!("kill points by state: {killed_in:?}");
    for must in ["downloading", "watching", "committed"] {
        assert!(
            iterations < 10 || killed_in.contains_key(must),
            "never killed while {must}: {killed_in:?}"
        );
    }
}

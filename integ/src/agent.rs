//! `edge-agent run` as a child process: spawn it on a config, find its
//! local API, kill it with SIGKILL, read its floor file.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_wire::npz::{NpzLimits, from_npz_bytes};
use edgefleet_wire::tensor::{NamedTensor, max_abs_diff};
use serde_json::Value;

use crate::common::repo;

/// A running agent; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Child,
    /// `http://127.0.0.1:<port>` of its local API.
    pub url: String,
}

impl AgentProc {
    /// Starts `edge-agent run --config <config>`, its stderr appended to
    /// `log`, and waits for the line naming its address.
    pub fn spawn(config: &Path, log: &Path) -> AgentProc {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the agent log");
        let mut child = Command::new(crate::bins::bin("edge-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env("EDGE_AGENT_LOG", "edge_agent=info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn edge-agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the agent's first line");
        let Some(url) = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(str::to_string)
        else {
            let _ = child.kill();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("the agent did not start (first line {line:?}); its log ends:\n{tail}");
        };
        AgentProc { child, url }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sideloads `bundle` through the local API (`POST /v1/install`).
    pub async fn sideload(&self, http: &reqwest::Client, bundle: Vec<u8>) {
        let r = http
            .post(format!("{}/v1/install", self.url))
            .body(bundle)
            .send()
            .await
            .expect("install");
        assert!(r.status().is_success(), "install: {}", r.status());
    }

    /// The value of `series` in its `/metrics` (absent counts as 0).
    pub async fn counter(&self, series: &str) -> u64 {
        let http = edge_agent::tls::default_client();
        let text = crate::common::metrics_text(&http, &self.url, None).await;
        crate::common::counter(&text, series)
    }

    /// `GET /v1/status`: the update machine's state and record.
    pub async fn status(&self, http: &reqwest::Client) -> Value {
        self.get_json(http, "/v1/status").await
    }

    /// `GET /v1/model`: what the agent serves.
    pub async fn model(&self, http: &reqwest::Client) -> Value {
        self.get_json(http, "/v1/model").await
    }

    async fn get_json(&self, http: &reqwest::Client, path: &str) -> Value {
        let r = http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Posts cls's first golden input: how far the answer is from cls's
    /// golden output (largest absolute difference), or the HTTP status when
    /// the agent did not answer 200.
    pub async fn cls_golden_diff(
        &self,
        http: &reqwest::Client,
    ) -> Result<f64, reqwest::StatusCode> {
        static GOLDEN: std::sync::OnceLock<(Vec<u8>, Vec<NamedTensor>)> =
            std::sync::OnceLock::new();
        let (golden_in, golden_out) = GOLDEN.get_or_init(|| {
            let input = std::fs::read(repo("models/cls/golden/in_0.npz")).unwrap();
            let output = from_npz_bytes(
                &std::fs::read(repo("models/cls/golden/out_0.npz")).unwrap(),
                NpzLimits::default(),
            )
            .unwrap();
            (input, output)
        });
        let r = http
            .post(format!("{}/v1/infer", self.url))
            .header("content-type", "application/x-npz")
            .body(golden_in.clone())
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            return Err(r.status());
        }
        let out = from_npz_bytes(&r.bytes().await.unwrap(), NpzLimits::default()).unwrap();
        Ok(max_abs_diff(&out[0].tensor, &golden_out[0].tensor)
            .unwrap()
            .max_abs)
    }

    /// Waits (up to 30 s) until the agent answers cls's first golden input
    /// with its golden output; the version it serves. `context` heads every
    /// failure message.
    pub async fn serves_cls_golden(&self, http: &reqwest::Client, context: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.cls_golden_diff(http).await {
                Ok(d) => {
                    assert!(d <= 1e-4, "{context}: output off by {d}");
                    let m = self.model(http).await;
                    return m["version"].as_str().unwrap().to_string();
                }
                Err(status) => {
                    assert!(
                        Instant::now() < deadline,
                        "{context}: no model served ({status})"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The anti-rollback floor of `model` in an agent's data dir (0: none).
pub fn floor_sequence(data: &Path, model: &str) -> u64 {
    match std::fs::read(data.join("floor.json")) {
        Ok(b) => {
            let v: Value = serde_json::from_slice(&b).expect("the floor file is always whole");
            v["models"][model]["sequence"].as_u64().unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// An agent in the test process (`edge_agent::daemon::start`), with the
/// tests' timings: polls and reports every second, short watch window,
/// fast retries. Stops when [`InProcAgent::stop`] is awaited.
pub struct InProcAgent {
    /// `http://127.0.0.1:<port>` of its local API.
    pub url: String,
    pub http: reqwest::Client,
    stop: tokio_util::sync::CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for InProcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcAgent")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl InProcAgent {
    /// The tests' agent config: enrolls at `server` as `id` tagged
    /// `board=<board>`, state in `data/state`, trusting the key files in
    /// `trust` (threshold 1).
    pub fn config(
        server_url: &str,
        data: &Path,
        id: &str,
        board: &str,
        trust: Vec<std::path::PathBuf>,
    ) -> edge_agent::config::AgentConfig {
        std::fs::create_dir_all(data).expect("agent dir");
        let mut c = edge_agent::config::AgentConfig {
            device_id: Some(id.into()),
            data_dir: data.join("state"),
            ..Default::default()
        };
        c.tags.insert("board".into(), board.into());
        c.server.url = Some(server_url.into());
        c.server.enrollment_token = Some(crate::fleet::ENROLL.into());
        c.server.poll_interval_secs = 1;
        c.server.report_interval_secs = 1;
        c.trust.keys = trust;
        c.http.listen = "127.0.0.1:0".parse().expect("address");
        c.engine.queue = 64;
        c.update.watch_secs = 2;
        c.update.watch_min_inferences = 10;
        c.update.retry_min_ms = 100;
        c.update.retry_max_ms = 1000;
        // Tests run in parallel on 2 cores: tolerate scheduling noise.
        c.update.max_p95_ratio = 3.0;
        c.update.p95_slack_ms = 20.0;
        c
    }

    /// `cfg` with telemetry every second over the broker at
    /// `127.0.0.1:mqtt_port`, reconnecting fast.
    pub fn over_mqtt(
        mut cfg: edge_agent::config::AgentConfig,
        mqtt_port: u16,
    ) -> edge_agent::config::AgentConfig {
        cfg.mqtt.url = Some(format!("mqtt://127.0.0.1:{mqtt_port}"));
        cfg.mqtt.telemetry_interval_secs = 1;
        cfg.mqtt.reconnect_min_ms = 200;
        cfg.mqtt.reconnect_max_ms = 1000;
        cfg
    }

    pub async fn start(cfg: edge_agent::config::AgentConfig) -> InProcAgent {
        Self::start_with_clock(cfg, edge_agent::updater::system_clock()).await
    }

    /// [`InProcAgent::start`] with an injected wall clock for the update
    /// machine (maintenance windows, defers, the watch window).
    pub async fn start_with_clock(
        cfg: edge_agent::config::AgentConfig,
        clock: edge_agent::updater::Clock,
    ) -> InProcAgent {
        let stop = tokio_util::sync::CancellationToken::new();
        // After a stop in this process, connection tasks of the old local
        // API may hold its store for a moment (a new process would not).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (addr, _, run) = loop {
            match edge_agent::daemon::start_with_clock(cfg.clone(), clock.clone(), stop.clone())
                .await
            {
                Ok(started) => break started,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the agent starts: {e}"),
            }
        };
        let done = tokio::spawn(async move {
            run.await.expect("the agent runs until stopped");
        });
        InProcAgent {
            url: format!("http://{addr}"),
            http: edge_agent::tls::default_client(),
            stop,
            done,
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.done.await.expect("the agent task");
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Value {
        self.http
            .get(format!("{}/v1/status", self.url))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status JSON")
    }

    /// The version of the model being served, if any.
    pub async fn model_version(&self) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/v1/model", self.url))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        v["version"].as_str().map(str::to_string)
    }

    /// One inference with an `.npz` body; the HTTP status (0 when the
    /// request did not get an answer).
    pub async fn infer(&self, npz: &[u8]) -> u16 {
        self.http
            .post(format!("{}/v1/infer", self.url))
            .header("content-type", "application/x-npz")
            .body(npz.to_vec())
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    /// Installs a bundle through the local API (`POST /v1/install`) and
    /// waits until it is committed as `version`.
    pub async fn install(&self, bundle: Vec<u8>, version: &str) {
        let r = self
            .http
            .post(format!("{}/v1/install", self.url))
            .body(bundle)
            .send()
            .await
            .expect("install");
        assert_eq!(r.status(), 202);
        self.wait_for(&format!("{version} committed"), 60, |s| {
            s["state"] == "committed" && s["record"]["active"]["version"] == version
        })
        .await;
    }

    /// The value of `name` in its `/metrics`; panics if it is not there.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = crate::common::metrics_text(&self.http, &self.url, None).await;
        crate::common::sample(&text, name).unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// The local API answers `GET /v1/status`.
    pub async fn answers(&self) -> bool {
        self.http
            .get(format!("{}/v1/status", self.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Waits until `pred` holds on the status, or panics with the last one.
    pub async fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; last status: {s:#}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

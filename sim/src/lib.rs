//! `fleet-sim`: N simulated devices speaking the agent's real protocol
//! against a running fleet server — enrollment, ETag check-ins, reports,
//! MQTT with the device's own credential (birth state with a Last Will,
//! telemetry, events, commands) — plus an operator who rolls out a real
//! bundle, a telemetry burst, and operator reads. It measures what a fleet
//! feels: check-in and report latency (steady and during the rollout),
//! connections accepted, rollout completion, downloads, telemetry the
//! broker acknowledged against what the server ingested, server CPU and
//! RSS.
//!
//! A sample of devices downloads the bundle for real (Range resume and
//! the content address checked); the others report the install as the
//! agent would, without the bytes.

//!
//! # Layout
//! - this module: the plan, the device loop, the operator, the results;
//! - [`mqtt`]: a small MQTT 3.1.1 client per simulated device.

pub mod mqtt;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_wire::api::v1::{CreateRollout, RolloutView, Stage};
use edgefleet_wire::device::{
    BundleRef, DesiredState, DeviceReport, EnrollRequest, EnrollResponse, Health, UpdateState,
};
use edgefleet_wire::telemetry::{DeviceEvent, DeviceState, Latency, Telemetry, Topics};
use serde::Serialize;
use tokio::sync::Semaphore;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Plan {
    pub server: String,
    /// Where /metrics is read (the server's counters): `server` unless
    /// that is a standby, which forwards everything else but answers
    /// /metrics with its own.
    pub metrics_server: String,
    pub mqtt: String,
    pub operator_token: String,
    pub enrollment_token: String,
    pub devices: usize,
    /// Prefix of device ids (several runs against one server).
    pub prefix: String,
    pub checkin_secs: f64,
    pub report_secs: f64,
    pub telemetry_secs: f64,
    /// Measure steady state this long before the rollout.
    pub steady_secs: u64,
    /// Then this long with telemetry only (its CPU cost alone).
    pub telemetry_only_secs: u64,
    /// The bundle to push and roll out (its bytes).
    pub bundle: Option<Vec<u8>>,
    /// Rollout stages, e.g. 10:0,100:0 (percent and bake seconds).
    pub stages: Vec<(u8, u32)>,
    /// Give up waiting for the rollout after this long.
    pub rollout_timeout_secs: u64,
    /// Devices that download the bundle for real.
    pub download_sample: usize,
    /// Telemetry messages each device sends back to back in the burst.
    pub burst: usize,
    /// The server's pid, for CPU and RSS.
    pub server_pid: Option<u32>,
    /// Connection attempts in flight at once while ramping up.
    pub connect_concurrency: usize,
}

/// A latency sample set.
#[derive(Debug, Default)]
pub struct Samples(Mutex<Vec<f64>>);

impl Samples {
    pub fn add(&self, d: Duration) {
        if let Ok(mut v) = self.0.lock() {
            v.push(d.as_secs_f64() * 1000.0);
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let mut v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by(f64::total_cmp);
        let at = |q| edgefleet_wire::stats::nearest_rank(&v, q).unwrap_or(0.0);
        LatencySummary {
            count: v.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: v.last().copied().unwrap_or(0.0),
        }
    }

    fn clear(&self) {
        if let Ok(mut v) = self.0.lock() {
            v.clear();
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Everything measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub devices: usize,
    pub enrolled: usize,
    pub mqtt_connected: u64,
    pub mqtt_connect_failures: u64,
    /// CONNACKs that refused a login and succeeded on a later attempt (an
    /// external broker that had not yet reloaded its password file).
    pub mqtt_connect_retries: u64,
    pub connack: LatencySummary,
    pub checkin_steady: LatencySummary,
    pub report_steady: LatencySummary,
    pub checkin_rollout: LatencySummary,
    pub report_rollout: LatencySummary,
    pub http_errors: u64,
    pub steady_server_cpu_pct: Option<f64>,
    pub steady_telemetry_per_sec: f64,
    /// Server CPU while devices send only telemetry.
    pub telemetry_only_cpu_pct: Option<f64>,
    pub telemetry_only_per_sec: f64,
    pub rollout_completed: bool,
    pub rollout_secs: Option<f64>,
    pub rollout_running: u64,
    pub rollout_targets: u64,
    pub rollout_phase: String,
    pub downloads_ok: u64,
    pub downloads_attempted: u64,
    pub download_retries_503: u64,
    pub burst_acked: u64,
    pub burst_msgs_per_sec: f64,
    /// Every device message the broker acknowledged (state, telemetry,
    /// events), counted by the devices.
    pub acked_total: u64,
    /// Every device message the server says it ingested.
    pub ingested_total: u64,
    /// Acknowledged but not ingested: must be 0.
    pub lost: u64,
    pub devices_page_ms: f64,
    pub devices_pages: usize,
    pub metrics_ms: f64,
    pub server_rss_mb: Option<f64>,
    pub server_peak_rss_mb: Option<f64>,
}

/// Shared between the device tasks and the orchestration.
#[derive(Debug, Default)]
struct Shared {
    checkin: Samples,
    report: Samples,
    connack: Samples,
    connected: AtomicU64,
    connect_failures: AtomicU64,
    connect_retries: AtomicU64,
    http_errors: AtomicU64,
    telemetry_acked: AtomicU64,
    /// Every PUBACKed publish.
    acked: AtomicU64,
    downloads_ok: AtomicU64,
    downloads_attempted: AtomicU64,
    retries_503: AtomicU64,
    stop: AtomicBool,
    /// Devices send only telemetry while set.
    http_paused: AtomicBool,
    /// Set to start the burst; devices count what they send.
    burst: AtomicBool,
    burst_acked: AtomicU64,
    burst_done: AtomicU64,
}

struct Device {
    id: String,
    credential: String,
    board: String,
    download: bool,
}

fn board(i: usize) -> &'static str {
    ["rpi4", "rpi5", "jetson-orin"][i % 3]
}

/// Runs the plan; prints progress to stderr.
pub async fn run(plan: Plan) -> Result<Results, String> {
    edge_agent_tls();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared::default());
    let mut results = Results {
        devices: plan.devices,
        ..Results::default()
    };

    // 1. Enroll.
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(64));
    let mut enrolls = Vec::with_capacity(plan.devices);
    for i in 0..plan.devices {
        let (http, plan, sem) = (http.clone(), plan.clone(), sem.clone());
        enrolls.push(tokio::spawn(async move {
            let _p = sem.acquire().await.ok()?;
            let id = format!("{}-{i:05}", plan.prefix);
            let req = EnrollRequest {
                enrollment_token: plan.enrollment_token.clone(),
                device_id: id.clone(),
                tags: BTreeMap::from([("board".to_string(), board(i).to_string())]),
                arch: "aarch64".into(),
                agent_version: "0.1.0".into(),
            };
            for _ in 0..5 {
                let r = http
                    .post(format!("{}/api/v1/devices/enroll", plan.server))
                    .json(&req)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let e: EnrollResponse = r.json().await.ok()?;
                        return Some(Device {
                            id,
                            credential: e.credential,
                            board: board(i).into(),
                            download: i < plan.download_sample,
                        });
                    }
                    Ok(r) if r.status() == 409 => return None,
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            None
        }));
    }
    let mut devices = Vec::new();
    for e in enrolls {
        if let Ok(Some(d)) = e.await {
            devices.push(d);
        }
    }
    results.enrolled = devices.len();
    if devices.is_empty() && plan.devices > 0 {
        return Err(format!(
            "no device could enroll at {} (enrolled 0 devices)",
            plan.server
        ));
    }
    eprintln!(
        "sim: enrolled {} devices in {:.1} s",
        devices.len(),
        t0.elapsed().as_secs_f64()
    );

    // 2. Connect and run every device.
    let connect_sem = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let mut tasks = Vec::new();
    for d in devices {
        let (http, plan, shared, sem) = (
            http.clone(),
            plan.clone(),
            shared.clone(),
            connect_sem.clone(),
        );
        tasks.push(tokio::spawn(async move {
            device_main(d, http, plan, shared, sem).await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.connected.load(Relaxed) + shared.connect_failures.load(Relaxed)
        < results.enrolled as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    results.mqtt_connected = shared.connected.load(Relaxed);
    results.mqtt_connect_failures = shared.connect_failures.load(Relaxed);
    results.mqtt_connect_retries = shared.connect_retries.load(Relaxed);
    results.connack = shared.connack.summary();
    eprintln!(
        "sim: {} connected, {} failed (CONNACK p99 {:.1} ms)",
        results.mqtt_connected, results.mqtt_connect_failures, results.connack.p99_ms
    );

    // 3. Steady state.
    shared.checkin.clear();
    shared.report.clear();
    let cpu0 = plan.server_pid.and_then(cpu_ticks);
    let tel0 = shared.telemetry_acked.load(Relaxed);
    let steady_t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(plan.steady_secs)).await;
    let steady = steady_t0.elapsed().as_secs_f64();
    if let (Some(a), Some(b)) = (cpu0, plan.server_pid.and_then(cpu_ticks)) {
        results.steady_server_cpu_pct = Some((b - a) as f64 / ticks_per_sec() / steady * 100.0);
    }
    results.steady_telemetry_per_sec =
        (shared.telemetry_acked.load(Relaxed) - tel0) as f64 / steady;
    results.checkin_steady = shared.checkin.summary();
    results.report_steady = shared.report.summary();
    eprintln!(
        "sim: steady {:.0} s: check-in p99 {:.1} ms, report p99 {:.1} ms, {:.0} telemetry/s, server CPU {:?}%",
        steady,
        results.checkin_steady.p99_ms,
        results.report_steady.p99_ms,
        results.steady_telemetry_per_sec,
        results.steady_server_cpu_pct
    );

    // 3b. Telemetry alone.
    if plan.telemetry_only_secs > 0 {
        shared.http_paused.store(true, Relaxed);
        // Let in-flight HTTP settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu0 = plan.server_pid.and_then(cpu_ticks);
        let tel0 = shared.telemetry_acked.load(Relaxed);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(plan.telemetry_only_secs)).await;
        let secs = t.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (cpu0, plan.server_pid.and_then(cpu_ticks)) {
            results.telemetry_only_cpu_pct = Some((b - a) as f64 / ticks_per_sec() / secs * 100.0);
        }
        results.telemetry_only_per_sec =
            (shared.telemetry_acked.load(Relaxed) - tel0) as f64 / secs;
        shared.http_paused.store(false, Relaxed);
        eprintln!(
            "sim: telemetry only {:.0} s: {:.0} msg/s, server CPU {:?}%",
            secs, results.telemetry_only_per_sec, results.telemetry_only_cpu_pct
        );
    }

    // 4. The rollout.
    shared.checkin.clear();
    shared.report.clear();
    if let Some(bytes) = &plan.bundle {
        let r = rollout(&http, &plan, bytes.clone()).await;
        match r {
            Ok((view, secs)) => {
                results.rollout_completed =
                    matches!(view.phase, edgefleet_wire::api::v1::Phase::Completed { .. });
                results.rollout_secs = Some(secs);
                results.rollout_phase = view.phase.name().into();
                let last = view.stages.last().cloned().unwrap_or_default();
                results.rollout_running = last.running;
                results.rollout_targets = last.devices;
            }
            Err(e) => {
                eprintln!("sim: rollout failed: {e}");
                results.rollout_phase = format!("error: {e}");
            }
        }
    }
    results.checkin_rollout = shared.checkin.summary();
    results.report_rollout = shared.report.summary();
    results.downloads_ok = shared.downloads_ok.load(Relaxed);
    results.downloads_attempted = shared.downloads_attempted.load(Relaxed);
    results.download_retries_503 = shared.retries_503.load(Relaxed);
    eprintln!(
        "sim: rollout {} in {:?} s, {}/{} on the bundle; check-in p99 {:.1} ms, report p99 {:.1} ms; downloads {}/{}",
        results.rollout_phase,
        results.rollout_secs,
        results.rollout_running,
        results.rollout_targets,
        results.checkin_rollout.p99_ms,
        results.report_rollout.p99_ms,
        results.downloads_ok,
        results.downloads_attempted
    );

    // 5. Telemetry burst.
    if plan.burst > 0 {
        let t = Instant::now();
        shared.burst.store(true, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(600);
        while shared.burst_done.load(Relaxed) < results.mqtt_connected && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        results.burst_acked = shared.burst_acked.load(Relaxed);
        results.burst_msgs_per_sec = results.burst_acked as f64 / secs;
        eprintln!(
            "sim: burst: {} acknowledged in {secs:.1} s ({:.0} msg/s)",
            results.burst_acked, results.burst_msgs_per_sec
        );
    }

    // 6. Operator reads.
    let t = Instant::now();
    let mut next = Some(format!("{}/api/v1/devices?limit=500", plan.server));
    let mut pages = 0;
    let mut worst: f64 = 0.0;
    while let Some(url) = next.take() {
        let tp = Instant::now();
        let r = http
            .get(&url)
            .bearer_auth(&plan.operator_token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        next = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(|l| l.split_once('<'))
            .and_then(|(_, r)| r.split_once('>'))
            .map(|(u, _)| format!("{}{u}", plan.server));
        let _ = r.bytes().await;
        worst = worst.max(tp.elapsed().as_secs_f64() * 1000.0);
        pages += 1;
        if pages > 1000 {
            break;
        }
    }
    let _ = t;
    results.devices_page_ms = worst;
    results.devices_pages = pages;
    let t = Instant::now();
    let _ = http
        .get(format!("{}/metrics", plan.metrics_server))
        .bearer_auth(&plan.operator_token)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await;
    results.metrics_ms = t.elapsed().as_secs_f64() * 1000.0;
    if let Some(pid) = plan.server_pid {
        results.server_rss_mb = proc_status_kb(pid, "VmRSS:").map(|k| k as f64 / 1024.0);
        results.server_peak_rss_mb = proc_status_kb(pid, "VmHWM:").map(|k| k as f64 / 1024.0);
    }
    results.http_errors = shared.http_errors.load(Relaxed);

    // Quiescent: every device disconnects cleanly (no Last Will), then
    // what the broker acknowledged must all be in the server.
    shared.stop.store(true, Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    results.acked_total = shared.acked.load(Relaxed);
    // An external broker acknowledges on receipt and the server drains its
    // queue afterwards: wait until the count reaches what was acknowledged,
    // or stops moving for 15 s (then the difference is lost).
    let mut last = (0, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(300);
    results.ingested_total = loop {
        let n = metric(&http, &plan, "fleet_mqtt_messages_ingested_total").await;
        if n >= results.acked_total
            || Instant::now() > deadline
            || (n == last.0 && last.1.elapsed() > Duration::from_secs(15))
        {
            break n;
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    results.lost = results.acked_total.saturating_sub(results.ingested_total);
    eprintln!(
        "sim: {} messages acknowledged, {} ingested: {} lost",
        results.acked_total, results.ingested_total, results.lost
    );
    Ok(results)
}

fn edge_agent_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Pushes the bundle, creates the rollout and waits for its end.
async fn rollout(
    http: &reqwest::Client,
    plan: &Plan,
    bytes: Vec<u8>,
) -> Result<(RolloutView, f64), String> {
    let id = edgefleet_wire::bundle::content_address(&bytes);
    let r = http
        .post(format!("{}/api/v1/bundles", plan.server))
        .bearer_auth(&plan.operator_token)
        .body(bytes)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!(
            "push: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let req = CreateRollout {
        bundle: id,
        selector: BTreeMap::new(),
        stages: plan
            .stages
            .iter()
            .map(|(p, b)| Stage {
                percent: *p,
                bake_minutes: b.div_ceil(60),
                bake_seconds: Some(*b),
            })
            .collect(),
        gates: Default::default(),
        shadow: None,
        window: None,
    };
    let t = Instant::now();
    let r = http
        .post(format!("{}/api/v1/rollouts", plan.server))
        .bearer_auth(&plan.operator_token)
        .json(&req)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!(
            "rollout: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let mut view: RolloutView = r.json().await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(plan.rollout_timeout_secs);
    while !view.phase.is_final() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        view = http
            .get(format!("{}/api/v1/rollouts/{}", plan.server, view.id))
            .bearer_auth(&plan.operator_token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((view, t.elapsed().as_secs_f64()))
}

/// A counter's value in the server's /metrics.
async fn metric(http: &reqwest::Client, plan: &Plan, name: &str) -> u64 {
    let Ok(r) = http
        .get(format!("{}/metrics", plan.metrics_server))
        .bearer_auth(&plan.operator_token)
        .send()
        .await
    else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from after the comm.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ticks_per_sec() -> f64 {
    100.0
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The agent polls within `notice_spread_secs` (2 s) of a notice.
fn notice_spread(seed: u64) -> Duration {
    Duration::from_secs_f64(2.0 * jitter(seed))
}

/// A pseudo-random fraction per device and tick (no shared RNG state).
fn jitter(seed: u64) -> f64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// One device's life: connect, then check in, report and send telemetry
/// on its timers; install what its desired state names.
async fn device_main(
    d: Device,
    http: reqwest::Client,
    plan: Plan,
    shared: Arc<Shared>,
    connect_sem: Arc<Semaphore>,
) {
    let topics = Topics::new(&d.id);
    let state = |online: bool, active: &Option<BundleRef>| {
        serde_json::to_vec(&DeviceState {
            device_id: d.id.clone(),
            online,
            agent_version: Some("0.1.0".into()),
            board: Some(d.board.clone()),
            arch: Some("aarch64".into()),
            active: active.clone(),
            last_known_good: None,
            update_state: None,
            reason: None,
            boot_time: None,
            at: edgefleet_wire::time::unix_now(),
        })
        .unwrap_or_default()
    };
    let mut active: Option<BundleRef> = None;
    let mut update_state = UpdateState::Idle;
    let mut etag: Option<String> = None;
    let mut seq = 0u64;
    let seed =
        d.id.bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));

    let mut conn = {
        let _p = connect_sem.acquire().await;
        let addr = plan.mqtt.trim_start_matches("mqtt://").to_string();
        // A refused login is retried as the agent reconnects: an external
        // broker learns a new device's password when it reloads its file.
        let mut attempt = 0;
        let connected = loop {
            let t = Instant::now();
            let r = mqtt::Conn::connect(
                &addr,
                &d.id,
                &d.id,
                &d.credential,
                60,
                Some((topics.state.clone(), state(false, &None))),
            )
            .await;
            match r {
                Err(e) if attempt < 20 && e.to_string().contains("connection refused") => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                r => {
                    if attempt > 0 && r.is_ok() {
                        shared.connect_retries.fetch_add(1, Relaxed);
                    }
                    break r.map(|c| (c, t));
                }
            }
        };
        match connected {
            Ok((mut c, t)) => {
                shared.connack.add(t.elapsed());
                let ok = c.subscribe(&topics.cmd).await.unwrap_or(false)
                    && c.publish(
                        &topics.state,
                        state(true, &None),
                        true,
                        Duration::from_secs(30),
                    )
                    .await
                    .is_ok();
                if ok {
                    shared.acked.fetch_add(1, Relaxed);
                    shared.connected.fetch_add(1, Relaxed);
                    Some(c)
                } else {
                    shared.connect_failures.fetch_add(1, Relaxed);
                    None
                }
            }
            Err(e) => {
                eprintln!("sim: {} cannot connect: {e}", d.id);
                shared.connect_failures.fetch_add(1, Relaxed);
                None
            }
        }
    };
    let start = tokio::time::Instant::now();
    let at = |secs: f64, j: f64| start + Duration::from_secs_f64(secs * j);
    let mut next_checkin = at(plan.checkin_secs, jitter(seed));
    let mut next_report = at(plan.report_secs, jitter(seed ^ 1));
    let mut next_telemetry = at(plan.telemetry_secs, jitter(seed ^ 2));
    let mut next_ping = start + Duration::from_secs(30);
    let mut burst_sent = false;
    let mut tick = 0u64;
    while !shared.stop.load(Relaxed) {
        tick += 1;
        let now = tokio::time::Instant::now();
        let http_paused = shared.http_paused.load(Relaxed);
        if http_paused {
            // Telemetry only (measuring its cost): HTTP waits, and resumes
            // spread over its intervals as before, not all at once.
            next_checkin =
                now + Duration::from_secs_f64(plan.checkin_secs * jitter(seed ^ tick ^ 11));
            next_report =
                now + Duration::from_secs_f64(plan.report_secs * jitter(seed ^ tick ^ 13));
        }
        let checkin_now = now >= next_checkin;
        if let Some(c) = conn.as_mut() {
            // Commands: a notice means check in now.
            match c.poll(Duration::from_millis(0)).await {
                // A notice: check in soon, spread as the agent does.
                Ok(Some(mqtt::Incoming::Message(t, _))) if t == topics.cmd => {
                    next_checkin = next_checkin.min(now + notice_spread(seed ^ tick));
                }
                Ok(_) => {}
                Err(_) => conn = None,
            }
        }
        if checkin_now {
            next_checkin = now
                + Duration::from_secs_f64(plan.checkin_secs * (0.9 + 0.2 * jitter(seed ^ tick)));
            let t = Instant::now();
            let mut rb = http
                .get(format!("{}/api/v1/device/desired", plan.server))
                .bearer_auth(&d.credential);
            if let Some(e) = &etag {
                rb = rb.header("if-none-match", e.clone());
            }
            match rb.send().await {
                Ok(r) if r.status() == 304 => shared.checkin.add(t.elapsed()),
                Ok(r) if r.status() == 200 => {
                    etag = r
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let desired: Option<DesiredState> = r.json().await.ok();
                    shared.checkin.add(t.elapsed());
                    if let Some(b) = desired.and_then(|x| x.bundle)
                        && active.as_ref().is_none_or(|a| a.id != b.id)
                    {
                        // Install: really download for the sample.
                        if let Some(c) = conn.as_mut() {
                            let ev = event("download_started", &b);
                            if c.publish(&topics.events, ev, false, Duration::from_secs(30))
                                .await
                                .is_ok()
                            {
                                shared.acked.fetch_add(1, Relaxed);
                            }
                        }
                        let ok = if d.download {
                            download(&http, &plan, &d, &b, &shared).await
                        } else {
                            tokio::time::sleep(Duration::from_millis(
                                500 + (jitter(seed ^ tick ^ 7) * 1500.0) as u64,
                            ))
                            .await;
                            true
                        };
                        if ok {
                            active = Some(b.clone());
                            update_state = UpdateState::Committed;
                            if let Some(c) = conn.as_mut() {
                                let ev = event("committed", &b);
                                if c.publish(&topics.events, ev, false, Duration::from_secs(30))
                                    .await
                                    .is_ok()
                                {
                                    shared.acked.fetch_add(1, Relaxed);
                                }
                                if c.publish(
                                    &topics.state,
                                    state(true, &active),
                                    true,
                                    Duration::from_secs(30),
                                )
                                .await
                                .is_ok()
                                {
                                    shared.acked.fetch_add(1, Relaxed);
                                }
                            }
                        } else {
                            update_state = UpdateState::Downloading;
                            etag = None;
                        }
                        next_report = tokio::time::Instant::now();
                    }
                }
                _ => {
                    shared.http_errors.fetch_add(1, Relaxed);
                }
            }
        }
        if tokio::time::Instant::now() >= next_report {
            next_report = tokio::time::Instant::now() + Duration::from_secs_f64(plan.report_secs);
            let report = DeviceReport {
                active: active.clone(),
                staged: None,
                last_failed: None,
                state: update_state,
                reason: None,
                health: Health {
                    inferences: 1000,
                    errors: 0,
                    p95_latency_ms: Some(5.0),
                },
                last_known_good: None,
                shadow: None,
                agent_version: Some("0.1.0".into()),
                retries: 0,
                degraded: None,
                trust_version: None,
                activate_at: None,
            };
            let t = Instant::now();
            match http
                .post(format!("{}/api/v1/device/report", plan.server))
                .bearer_auth(&d.credential)
                .json(&report)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => shared.report.add(t.elapsed()),
                _ => {
                    shared.http_errors.fetch_add(1, Relaxed);
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            let now = tokio::time::Instant::now();
            if now >= next_telemetry {
                next_telemetry = now + Duration::from_secs_f64(plan.telemetry_secs);
                seq += 1;
                let t = telemetry(seq, &active);
                match c
                    .publish(&topics.telemetry, t, false, Duration::from_secs(60))
                    .await
                {
                    Ok(_) => {
                        shared.telemetry_acked.fetch_add(1, Relaxed);
                        shared.acked.fetch_add(1, Relaxed);
                    }
                    Err(_) => conn = None,
                }
            } else if now >= next_ping {
                next_ping = now + Duration::from_secs(30);
                if c.ping().await.is_err() {
                    conn = None;
                }
            }
        }
        if shared.burst.load(Relaxed) && !burst_sent {
            burst_sent = true;
            if let Some(c) = conn.as_mut() {
                for _ in 0..plan.burst {
                    seq += 1;
                    match c
                        .publish(
                            &topics.telemetry,
                            telemetry(seq, &active),
                            false,
                            Duration::from_secs(120),
                        )
                        .await
                    {
                        Ok(_) => {
                            shared.burst_acked.fetch_add(1, Relaxed);
                            shared.telemetry_acked.fetch_add(1, Relaxed);
                            shared.acked.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            conn = None;
                            break;
                        }
                    }
                }
            }
            shared.burst_done.fetch_add(1, Relaxed);
        }
        let until = [next_checkin, next_report, next_telemetry, next_ping]
            .into_iter()
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
        // Wake for commands and the burst signal too.
        let wait = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_millis(250));
        match conn.as_mut() {
            Some(c) => match c.poll(wait).await {
                Ok(Some(mqtt::Incoming::Message(t, _))) if t == topics.cmd => {
                    next_checkin =
                        next_checkin.min(tokio::time::Instant::now() + notice_spread(seed ^ tick));
                }
                Ok(_) => {}
                Err(_) => conn = None,
            },
            None => tokio::time::sleep(wait).await,
        }
    }
    if let Some(c) = conn {
        let _ = c.disconnect().await;
    }
}

fn event(what: &str, b: &BundleRef) -> Vec<u8> {
    serde_json::to_vec(&DeviceEvent {
        at: edgefleet_wire::time::unix_now(),
        event: what.into(),
        bundle: Some(b.clone()),
        reason: None,
        drift: Vec::new(),
    })
    .unwrap_or_default()
}

fn telemetry(seq: u64, active: &Option<BundleRef>) -> Vec<u8> {
    serde_json::to_vec(&Telemetry {
        at: edgefleet_wire::time::unix_now(),
        interval_secs: 10,
        seq,
        model: active.as_ref().map(|a| format!("{}@{}", a.name, a.version)),
        inferences: 100,
        errors: 0,
        latency_ms: Some(Latency {
            p50: 3.0,
            p95: 5.0,
            p99: 7.0,
        }),
        queue_depth: 0,
        cpu_pct: 12.0,
        rss_bytes: 50 << 20,
        temperature_c: Some(48.0),
        disk_free_bytes: Some(1 << 30),
        uptime_secs: 100,
        outbox: Default::default(),
        bytes_sent: 0,
        drift: Vec::new(),
        reward: None,
    })
    .unwrap_or_default()
}

/// Downloads the bundle for real, resuming with Range after a cut, and
/// checks its content address. 503s are retried after `Retry-After`.
async fn download(
    http: &reqwest::Client,
    plan: &Plan,
    d: &Device,
    b: &BundleRef,
    shared: &Shared,
) -> bool {
    shared.downloads_attempted.fetch_add(1, Relaxed);
    let url = format!("{}/api/v1/bundles/{}/download", plan.server, b.id);
    let mut got: Vec<u8> = Vec::new();
    for _ in 0..60 {
        let mut rb = http.get(&url).bearer_auth(&d.credential);
        if !got.is_empty() {
            rb = rb.header("range", format!("bytes={}-", got.len()));
        }
        let Ok(mut r) = rb.send().await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if r.status() == 503 {
            shared.retries_503.fetch_add(1, Relaxed);
            let wait = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(2);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        if !(r.status() == 200 || r.status() == 206) {
            return false;
        }
        if r.status() == 200 {
            got.clear();
        }
        while let Ok(Some(chunk)) = r.chunk().await {
            got.extend_from_slice(&chunk);
        }
        if edgefleet_wire::bundle::content_address(&got) == b.id {
            shared.downloads_ok.fetch_add(1, Relaxed);
            return true;
        }
    }
    false
}

//! Prometheus metrics of the fleet server (`GET /metrics`, text format
//! 0.0.4). Names follow the Prometheus conventions: base units (seconds,
//! bytes), `_total` counters, `_info` metrics. Cardinality is bounded:
//! devices are aggregated by state, board, model and online, never one
//! series per device.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use edgefleet_wire::prom::{Histogram, escape as esc};

use crate::api::{ApiResult, AppState};
use crate::auth::Action;
use crate::fleet::lock;

/// The PSI at which the devices raise a drift alarm (wire::drift).
const DRIFT_ALARM_PSI: f64 = 0.2;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Routes are templates (`/api/v1/devices/{id}`), so the label sets are
/// bounded by the router.
type RouteKey = (String, String, u16);

#[derive(Debug, Default)]
pub struct ServerMetrics {
    pub downloads: Counter,
    pub downloads_refused: Counter,
    /// Downloads answered with a redirect to a presigned bucket URL.
    pub downloads_redirected: Counter,
    /// Device requests refused for a missing or mismatched client certificate.
    pub client_cert_refusals: Counter,
    requests: Mutex<BTreeMap<RouteKey, Histogram>>,
}

impl ServerMetrics {
    pub fn observe_request(&self, route: &str, method: &str, status: u16, d: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            m.entry((route.to_string(), method.to_string(), status))
                .or_default()
                .observe(d);
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a family; its samples follow.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One unlabelled counter with its family lines.
pub fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {v}");
}

/// One unlabelled gauge with its family lines.
pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {v}");
}

/// The build, and whether this replica serves (1) or is a standby (0):
/// across the replicas of one database, the sum is 1.
pub fn identity(out: &mut String, active: bool) {
    let _ = writeln!(
        out,
        "# HELP fleet_build_info The fleet server's build (value 1).\n# TYPE fleet_build_info gauge\nfleet_build_info{{version=\"{}\",commit=\"{}\",target=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        env!("EDGEFLEET_GIT_COMMIT"),
        env!("EDGEFLEET_TARGET")
    );
    gauge(
        out,
        "fleet_server_active",
        "1 when this server holds the store and serves, 0 while it waits as a standby.",
        u64::from(active),
    );
}

/// Renders everything.
pub fn render(s: &AppState) -> String {
    let mut out = String::with_capacity(8192);
    identity(&mut out, true);
    s.limits.render(&mut out);
    // Devices, aggregated (bounded by states × boards × models).
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_model: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut by_board: BTreeMap<String, u64> = BTreeMap::new();
    let (mut online, mut revoked) = (0u64, 0u64);
    let mut p95: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut drift_alarms = 0u64;
    // Per board: the hottest device and the least free disk.
    let mut hottest: BTreeMap<String, f64> = BTreeMap::new();
    let mut least_disk: BTreeMap<String, u64> = BTreeMap::new();
    let per_device = s.config.metrics.per_device;
    let mut devices = String::new();
    for cell in s.fleet.cells() {
        let d = lock(&cell);
        let r = &d.rec;
        let report = r.report();
        let board = r
            .identity
            .tags
            .get("board")
            .cloned()
            .unwrap_or_else(|| "none".into());
        if let Some(t) = r.live.telemetry.as_ref() {
            if let Some(c) = t.temperature_c {
                let e = hottest.entry(board.clone()).or_insert(c);
                *e = e.max(c);
            }
            if let Some(free) = t.disk_free_bytes {
                let e = least_disk.entry(board.clone()).or_insert(free);
                *e = (*e).min(free);
            }
        }
        if per_device {
            device_series(&mut devices, r);
        }
        *by_state
            .entry(
                report
                    .map_or("unreported", |r| r.state.as_str())
                    .to_string(),
            )
            .or_default() += 1;
        let (name, version) = report
            .and_then(|r| r.active.as_ref())
            .map_or(("none".to_string(), "none".to_string()), |a| {
                (a.name.clone(), a.version.clone())
            });
        if let Some(l) = r
            .live
            .telemetry
            .as_ref()
            .and_then(|t| t.latency_ms.as_ref())
        {
            p95.entry((name.clone(), version.clone()))
                .or_default()
                .push(l.p95 / 1000.0);
        }
        if r.live
            .telemetry
            .as_ref()
            .is_some_and(|t| t.drift.iter().any(|v| v.psi >= DRIFT_ALARM_PSI))
        {
            drift_alarms += 1;
        }
        *by_model.entry((name, version)).or_default() += 1;
        *by_board.entry(board).or_default() += 1;
        if r.live.online == Some(true) {
            online += 1;
        }
        if r.is_revoked() {
            revoked += 1;
        }
    }
    family(
        &mut out,
        "fleet_devices",
        "gauge",
        "Devices by reported update state.",
    );
    for (state, n) in &by_state {
        let _ = writeln!(out, "fleet_devices{{state=\"{}\"}} {n}", esc(state));
    }
    family(
        &mut out,
        "fleet_devices_by_model",
        "gauge",
        "Devices by the model they report running.",
    );
    for ((name, version), n) in &by_model {
        let _ = writeln!(
            out,
            "fleet_devices_by_model{{model=\"{}\",version=\"{}\"}} {n}",
            esc(name),
            esc(version)
        );
    }
    family(
        &mut out,
        "fleet_devices_by_board",
        "gauge",
        "Devices by board tag.",
    );
    for (board, n) in &by_board {
        let _ = writeln!(
            out,
            "fleet_devices_by_board{{board=\"{}\"}} {n}",
            esc(board)
        );
    }
    family(
        &mut out,
        "fleet_devices_online",
        "gauge",
        "Devices whose MQTT state says online.",
    );
    let _ = writeln!(out, "fleet_devices_online {online}");
    family(
        &mut out,
        "fleet_devices_revoked",
        "gauge",
        "Devices whose credential is revoked.",
    );
    let _ = writeln!(out, "fleet_devices_revoked {revoked}");
    family(
        &mut out,
        "fleet_devices_drift_alarm",
        "gauge",
        "Devices whose last telemetry has a drift value over its alarm threshold.",
    );
    let _ = writeln!(out, "fleet_devices_drift_alarm {drift_alarms}");
    family(
        &mut out,
        "fleet_model_latency_p95_seconds",
        "gauge",
        "The worst p95 inference latency reported in the last telemetry, by model.",
    );
    for ((name, version), v) in &p95 {
        let worst = v.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "fleet_model_latency_p95_seconds{{model=\"{}\",version=\"{}\"}} {worst}",
            esc(name),
            esc(version)
        );
    }
    family(
        &mut out,
        "fleet_board_temperature_max_celsius",
        "gauge",
        "The highest temperature in the last telemetry of the board's devices.",
    );
    for (board, c) in &hottest {
        let _ = writeln!(
            out,
            "fleet_board_temperature_max_celsius{{board=\"{}\"}} {c}",
            esc(board)
        );
    }
    family(
        &mut out,
        "fleet_board_disk_free_min_bytes",
        "gauge",
        "The least free disk in the last telemetry of the board's devices.",
    );
    for (board, b) in &least_disk {
        let _ = writeln!(
            out,
            "fleet_board_disk_free_min_bytes{{board=\"{}\"}} {b}",
            esc(board)
        );
    }
    if per_device {
        out.push_str(&by_family(&devices));
    }
    family(&mut out, "fleet_rollouts", "gauge", "Rollouts by phase.");
    let phases = s.controller.phases();
    for p in ["running", "paused", "completed", "aborted"] {
        let _ = writeln!(
            out,
            "fleet_rollouts{{phase=\"{p}\"}} {}",
            phases.get(p).copied().unwrap_or(0)
        );
    }
    if let Some(inbox) = &s.inbox {
        counter(
            &mut out,
            "fleet_inbox_applied_total",
            "Messages the standbys stored in the shared store's inbox that this server applied.",
            inbox.applied.load(Relaxed),
        );
        counter(
            &mut out,
            "fleet_standby_reports_applied_total",
            "Device reports a standby answered (POST /api/v1/device/report) that this server applied.",
            inbox.reports.load(Relaxed),
        );
    }
    for (name, help, v) in [
        (
            "fleet_bundle_downloads_total",
            "Bundle download responses (full or ranged).",
            s.metrics.downloads.get(),
        ),
        (
            "fleet_bundle_downloads_refused_total",
            "Downloads answered 503 at the concurrency limit.",
            s.metrics.downloads_refused.get(),
        ),
        (
            "fleet_bundle_downloads_redirected_total",
            "Downloads redirected to a presigned URL of the bundle bucket.",
            s.metrics.downloads_redirected.get(),
        ),
        (
            "fleet_client_cert_refusals_total",
            "Device requests refused for a missing client certificate or one naming another device.",
            s.metrics.client_cert_refusals.get(),
        ),
        (
            "fleet_store_batches_total",
            "Store transactions committed.",
            s.writer.metrics.batches.load(Relaxed),
        ),
        (
            "fleet_store_writes_total",
            "Writes committed.",
            s.writer.metrics.writes.load(Relaxed),
        ),
        (
            "fleet_store_writes_coalesced_total",
            "Writes superseded by a later write of the same device part in one batch.",
            s.writer.metrics.coalesced.load(Relaxed),
        ),
        (
            "fleet_store_commit_failures_total",
            "Store commits that failed (retried).",
            s.writer.metrics.failures.load(Relaxed),
        ),
        (
            "fleet_store_writes_refused_total",
            "Writes the store refused.",
            s.writer.metrics.refused.load(Relaxed),
        ),
    ] {
        counter(&mut out, name, help, v);
    }
    family(
        &mut out,
        "fleet_store_queue",
        "gauge",
        "Write jobs waiting for the store writer.",
    );
    let _ = writeln!(out, "fleet_store_queue {}", s.writer.backlog());
    s.writer.metrics.commit_seconds.render(
        "fleet_store_commit_seconds",
        "Time to commit one batch.",
        &mut out,
    );
    if let Some(m) = &s.mqtt {
        m.render_metrics(&mut out);
    }
    family(
        &mut out,
        "fleet_api_request_seconds",
        "histogram",
        "API requests by route template, method and status.",
    );
    if let Ok(reqs) = s.metrics.requests.lock() {
        for ((route, method, status), h) in reqs.iter() {
            h.render_series(
                "fleet_api_request_seconds",
                &format!(
                    "route=\"{}\",method=\"{}\",status=\"{status}\",",
                    esc(route),
                    esc(method)
                ),
                &mut out,
            );
        }
    }
    out
}

/// The per-device families, in the order [`PER_DEVICE`] lists them.
const PER_DEVICE: [(&str, &str); 4] = [
    (
        "fleet_device_info",
        "One per device (value 1): its board, model, version and update state.",
    ),
    (
        "fleet_device_online",
        "1 while the device's MQTT state says online.",
    ),
    (
        "fleet_device_latency_p95_seconds",
        "The p95 inference latency of the device's last telemetry.",
    ),
    (
        "fleet_device_drift_psi_max",
        "The highest drift PSI of the device's last telemetry.",
    ),
];

/// One device's series (`[metrics] per_device = true`), appended to
/// `out` family by family: the caller sorts them into families.
fn device_series(out: &mut String, r: &crate::store::DeviceRecord) {
    let id = esc(&r.id);
    let report = r.report();
    let (model, version) = report
        .and_then(|r| r.active.as_ref())
        .map_or(("none".to_string(), "none".to_string()), |a| {
            (a.name.clone(), a.version.clone())
        });
    let _ = writeln!(
        out,
        "fleet_device_info{{device=\"{id}\",board=\"{}\",model=\"{}\",version=\"{}\",state=\"{}\"}} 1",
        esc(r.identity.tags.get("board").map_or("none", String::as_str)),
        esc(&model),
        esc(&version),
        report.map_or("unreported", |r| r.state.as_str())
    );
    let _ = writeln!(
        out,
        "fleet_device_online{{device=\"{id}\"}} {}",
        u8::from(r.live.online == Some(true))
    );
    if let Some(t) = r.live.telemetry.as_ref() {
        if let Some(l) = t.latency_ms.as_ref() {
            let _ = writeln!(
                out,
                "fleet_device_latency_p95_seconds{{device=\"{id}\"}} {}",
                l.p95 / 1000.0
            );
        }
        if let Some(m) = t.drift.iter().map(|v| v.psi).reduce(f64::max) {
            let _ = writeln!(out, "fleet_device_drift_psi_max{{device=\"{id}\"}} {m}");
        }
    }
}

/// Groups per-device lines by family, each under its HELP and TYPE.
fn by_family(lines: &str) -> String {
    let mut out = String::with_capacity(lines.len() + 512);
    for (name, help) in PER_DEVICE {
        family(&mut out, name, "gauge", help);
        for l in lines.lines().filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        }) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
              (status = 401, body = edgefleet_wire::api::v1::ErrorBody)),
    security(("bearer" = [])))]
pub async fn serve(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    s.allow(&headers, Action::ReadFleet)?;
    let text = render(&s);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

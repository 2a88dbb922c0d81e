//! Prometheus metrics of the fleet server: devices by state and version and
//! rollouts by phase (computed from the store at scrape time), plus bundle
//! downloads and API latency (counted as they happen).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use edgefleet_wire::prom::{Histogram, escape as esc};

use crate::error::Result;
use crate::rollout::Phase;
use crate::store::Store;

#[derive(Debug, Default)]
pub struct ServerMetrics {
    pub downloads: AtomicU64,
    pub api_latency: Histogram,
}

impl ServerMetrics {
    pub fn render(&self, store: &dyn Store) -> Result<String> {
        let mut out = String::with_capacity(2048);
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_version: BTreeMap<(String, String), u64> = BTreeMap::new();
        for d in store.list_devices()? {
            let report = d.report.as_ref();
            let state = report
                .map_or("unreported", |r| r.state.as_str())
                .to_string();
            *by_state.entry(state).or_default() += 1;
            let (name, version) = report
                .and_then(|r| r.active.as_ref())
                .map_or(("none".to_string(), "none".to_string()), |a| {
                    (a.name.clone(), a.version.clone())
                });
            *by_version.entry((name, version)).or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP fleet_devices Devices by reported update state."
        );
        let _ = writeln!(out, "# TYPE fleet_devices gauge");
        for (state, n) in &by_state {
            let _ = writeln!(out, "fleet_devices{{state=\"{}\"}} {n}", esc(state));
        }
        let _ = writeln!(
            out,
            "# HELP fleet_devices_by_model Devices by the model they report running."
        );
        let _ = writeln!(out, "# TYPE fleet_devices_by_model gauge");
        for ((name, version), n) in &by_version {
            let _ = writeln!(
                out,
                "fleet_devices_by_model{{model=\"{}\",version=\"{}\"}} {n}",
                esc(name),
                esc(version)
            );
        }
        let mut phases: BTreeMap<&str, u64> = BTreeMap::new();
        for r in store.list_rollouts()? {
            let p = match r.phase {
                Phase::Running { .. } => "running",
                Phase::Paused { .. } => "paused",
                Phase::Completed { .. } => "completed",
                Phase::Aborted { .. } => "aborted",
            };
            *phases.entry(p).or_default() += 1;
        }
        let _ = writeln!(out, "# HELP fleet_rollouts Rollouts by phase.");
        let _ = writeln!(out, "# TYPE fleet_rollouts gauge");
        for p in ["running", "paused", "completed", "aborted"] {
            let _ = writeln!(
                out,
                "fleet_rollouts{{phase=\"{p}\"}} {}",
                phases.get(p).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleet_bundle_downloads_total Bundle download responses (full or ranged)."
        );
        let _ = writeln!(out, "# TYPE fleet_bundle_downloads_total counter");
        let _ = writeln!(
            out,
            "fleet_bundle_downloads_total {}",
            self.downloads.load(Ordering::Relaxed)
        );
        self.api_latency.render(
            "fleet_api_request_seconds",
            "API request latency.",
            &mut out,
        );
        Ok(out)
    }
}

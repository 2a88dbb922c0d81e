//! Prometheus metrics of the serving path, rendered by hand (text format
//! 0.0.4): a few atomics and a fixed-bucket histogram need no framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use edgefleet_wire::prom::{Histogram, escape};

use crate::model::ModelInfo;
use crate::procstat;

/// Counters and gauges of one agent process.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    pub latency: Histogram,
    pub queue_depth: AtomicU64,
    pub worker_panics: AtomicU64,
    /// The trust version bundles are verified with.
    pub trust_version: AtomicU64,
    /// Trust rotations refused (or not reached) from the desired state.
    pub trust_refused: AtomicU64,
    active: Mutex<Option<ModelInfo>>,
}

impl Metrics {
    /// Counts a finished request by HTTP status, and by error code if any.
    pub fn record_request(&self, status: u16, error_code: Option<&'static str>) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry(status).or_default() += 1;
        }
        if let Some(code) = error_code
            && let Ok(mut m) = self.errors.lock()
        {
            *m.entry(code).or_default() += 1;
        }
    }

    pub fn set_active_model(&self, info: &ModelInfo) {
        if let Ok(mut a) = self.active.lock() {
            *a = Some(info.clone());
        }
    }

    /// Requests answered with this status so far.
    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.requests
            .lock()
            .map(|m| m.get(&status).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP edge_agent_requests_total Inference requests by HTTP status."
        );
        let _ = writeln!(out, "# TYPE edge_agent_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for (status, n) in m.iter() {
                let _ = writeln!(out, "edge_agent_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP edge_agent_errors_total Failed inference requests by error code."
        );
        let _ = writeln!(out, "# TYPE edge_agent_errors_total counter");
        if let Ok(m) = self.errors.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(out, "edge_agent_errors_total{{code=\"{code}\"}} {n}");
            }
        }
        self.latency.render(
            "edge_agent_inference_seconds",
            "Inference latency per request (queue wait and compute).",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# HELP edge_agent_queue_depth Requests waiting for an inference worker."
        );
        let _ = writeln!(out, "# TYPE edge_agent_queue_depth gauge");
        let _ = writeln!(
            out,
            "edge_agent_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP edge_agent_worker_panics_total Inference worker panics (each rebuilt its session)."
        );
        let _ = writeln!(out, "# TYPE edge_agent_worker_panics_total counter");
        let _ = writeln!(
            out,
            "edge_agent_worker_panics_total {}",
            self.worker_panics.load(Ordering::Relaxed)
        );
        for (name, help, kind, v) in [
            (
                "edge_agent_trust_version",
                "The trust version bundles are verified with (1: the configured keys).",
                "gauge",
                &self.trust_version,
            ),
            (
                "edge_agent_trust_refused_total",
                "Trust rotations from the server that the device refused or could not reach.",
                "counter",
                &self.trust_refused,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let c = &crate::compiled::COUNTS;
        let _ = writeln!(
            out,
            "# HELP edge_agent_compiled_models_total Installed ONNX models kept compiled (docs/ARCHITECTURE.md): loads served from one, files written, files rejected and deleted, models not kept.\n# TYPE edge_agent_compiled_models_total counter"
        );
        for (event, v) in [
            ("used", &c.used),
            ("written", &c.written),
            ("rejected", &c.rejected),
            ("not_stored", &c.not_stored),
        ] {
            let _ = writeln!(
                out,
                "edge_agent_compiled_models_total{{event=\"{event}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP edge_agent_build_info The agent's build (value 1).\n# TYPE edge_agent_build_info gauge\nedge_agent_build_info{{version=\"{}\",commit=\"{}\",target=\"{}\",tract=\"0.23.9\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("EDGEFLEET_GIT_COMMIT"),
            env!("EDGEFLEET_TARGET"),
        );
        let _ = writeln!(
            out,
            "# HELP edge_agent_active_model_info The model being served (value 1)."
        );
        let _ = writeln!(out, "# TYPE edge_agent_active_model_info gauge");
        if let Ok(a) = self.active.lock()
            && let Some(info) = a.as_ref()
        {
            let _ = writeln!(
                out,
                "edge_agent_active_model_info{{name=\"{}\",version=\"{}\",sequence=\"{}\"}} 1",
                escape(&info.name),
                escape(&info.version),
                info.sequence
            );
        }
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes."
        );
        let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
        let _ = writeln!(
            out,
            "process_resident_memory_bytes {}",
            procstat::rss_bytes()
        );
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds."
        );
        let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
        let _ = writeln!(out, "process_cpu_seconds_total {}", procstat::cpu_seconds());
        out
    }
}

//! The handles every long-lived task of a running agent shares: config,
//! engine, store, the update status, and the wake-ups between tasks.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use edgefleet_wire::device::{DeviceReport, Health};
use tokio::sync::{Notify, watch};

use crate::client::ServerClient;
use crate::config::AgentConfig;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::updater::Status;

/// Shared handles of a running daemon.
#[derive(Clone)]
pub struct Shared {
    pub cfg: Arc<AgentConfig>,
    pub device_id: String,
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    pub status: watch::Receiver<Status>,
    /// Poll the server now (MQTT "update available").
    pub poll_now: Arc<Notify>,
    /// Report now (MQTT "report now").
    pub report_now: Arc<Notify>,
    pub client: Arc<OnceLock<ServerClient>>,
    pub credential: Arc<OnceLock<String>>,
    pub booted_at: u64,
    /// The trust chain bundles are verified with.
    pub trust: Arc<crate::trust::TrustState>,
    /// Why the device cannot follow the fleet's trust version, if it cannot.
    pub trust_problem: Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The device report: what runs, the update state, health of the active model.
    pub fn report(&self) -> DeviceReport {
        let rec = self.status.borrow().record.clone();
        let health = self
            .engine
            .active()
            .map(|m| Health {
                inferences: m.stats.inferences.load(Relaxed) + m.stats.errors.load(Relaxed),
                errors: m.stats.errors.load(Relaxed),
                p95_latency_ms: m.stats.p95_ms(),
            })
            .unwrap_or_default();
        let status = self.status.borrow();
        let store = self.store.health();
        let degraded = store
            .condition
            .or_else(|| status.store_error.clone())
            .or_else(|| {
                store.reserve_released.then(|| {
                    "insufficient_space: the disk is (nearly) full; the store has given up its space reserve"
                        .to_string()
                })
            })
            .or_else(|| {
                self.trust_problem
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            });
        drop(status);
        DeviceReport {
            retries: rec.phase.retries(),
            degraded,
            active: rec.active.clone(),
            staged: rec.phase.target().map(|t| t.bundle.clone()),
            last_failed: rec.last_failed.clone(),
            state: rec.phase.state(),
            reason: rec.reason.clone(),
            health,
            last_known_good: rec.last_known_good.clone(),
            shadow: rec.shadow.clone(),
            agent_version: Some(crate::AGENT_VERSION.to_string()),
            trust_version: Some(self.trust.version()),
            activate_at: rec.phase.activate_at(),
        }
    }
}

//! The edgefleet device agent.
//!
//! # Layout
//! - [`bundle`]: opening bundle files with the device's own checks.
//! - the model runtime (tract) is the `edgefleet-runtime` crate.
//! - [`model`]: a loaded, self-tested model and its statistics; [`engine`]:
//!   the active model, the bounded queue and the worker threads.
//! - [`api`]: the local HTTP API; [`codec`]: its JSON tensor form.
//! - [`metrics`]: Prometheus metrics; [`procstat`]: RSS and CPU from /proc.
//! - [`config`]: `agent.toml`; [`cli`]: the `edge-agent` subcommands.
//! - [`update`]: the pure update state machine; [`updater`]: its driver
//!   (download, verify, self-test, shadow, swap, watch, rollback).
//! - [`drift`]: rolling drift histograms and PSI alerts.
//! - [`health`]: judging a new model in its watch window.
//! - [`trust`]: the device's trust chain (key rotations, kept on disk);
//! - [`floor`]: the anti-rollback floor file; [`store`]: sled behind a trait
//!   (update record, outbox).
//! - [`client`]: the device side of the fleet server API.
//! - [`telemetry`]: MQTT state, telemetry, events and commands with a durable outbox.
//! - [`sdnotify`]: systemd readiness and watchdog.
//! - [`shared`]: the handles the daemon's tasks share; [`daemon`]: `edge-agent
//!   run`, tying the above together.
//! - [`error`]: error types.

pub mod api;
pub mod bundle;
pub mod check;
pub mod cli;
pub mod client;
pub mod codec;
pub mod compiled;
pub mod config;
pub mod daemon;
pub mod drift;
pub mod engine;
pub mod error;
pub mod floor;
pub mod health;
pub mod mem;
pub mod metrics;
pub mod model;
pub mod procstat;
pub mod sdnotify;
pub mod shared;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod trust;
pub mod update;
pub mod updater;

/// This agent's version, compared with a manifest's `min_agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

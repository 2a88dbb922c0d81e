//! The edgefleet device agent.
//!
//! # Layout
//! - [`bundle`]: opening bundle files with the device's own checks.
//! - [`runtime`]: tract model loading, per-worker sessions, golden self-test.
//! - [`engine`]: the active model, the bounded queue and the worker threads.
//! - [`api`]: the local HTTP API; [`codec`]: its JSON tensor form.
//! - [`metrics`]: Prometheus metrics; [`procstat`]: RSS and CPU from /proc.
//! - [`cli`]: the `edge-agent` subcommands.
//! - [`error`]: error types.

pub mod api;
pub mod bundle;
pub mod cli;
pub mod codec;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod procstat;
pub mod runtime;

/// This agent's version, compared with a manifest's `min_agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

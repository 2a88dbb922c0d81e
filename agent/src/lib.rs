//! The edgefleet device agent.
//!
//! # Layout
//! - [`runtime`]: tract model loading, per-worker sessions, golden self-test.
//! - [`error`]: the agent's error type.

pub mod error;
pub mod runtime;

/// This agent's version, compared with a manifest's `min_agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

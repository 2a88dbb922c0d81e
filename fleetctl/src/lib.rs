//! `fleetctl`, the operator CLI, as a library: the integration tests and
//! scripts drive the same code the binary runs.
//!
//! # Layout
//! - [`cli`]: argument definitions and the commands (output shapes are a
//!   public interface: extend, never rename).
//! - [`client`]: the typed client of the operator API (`edgefleet_wire::api::v1`).
//! - [`pack`]: bundle packing with golden-vector checks on the device runtime.
//! - [`duration`]: `30s`/`10m`/`12h`/`90d` parsing, RFC 3339 formatting.
//! - [`error`]: the error type and exit codes.

pub mod cli;
pub mod client;
pub mod duration;
pub mod error;
pub mod pack;

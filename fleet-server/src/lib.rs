//! The edgefleet fleet server and the `fleetctl` operator CLI.
//!
//! # Layout
//! - [`fleetctl`]: CLI definitions and command implementations.
//! - [`pack`]: bundle packing with golden-vector checks.
//! - [`duration`]: `30s`/`10m`/`12h`/`90d` parsing, RFC 3339 formatting.
//! - [`error`]: the error type.

pub mod duration;
pub mod error;
pub mod fleetctl;
pub mod pack;

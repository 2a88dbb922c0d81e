//! The edgefleet fleet server and the `fleetctl` operator CLI.
//!
//! # Layout
//! - [`fleetctl`]: CLI definitions and command implementations; [`client`]: its HTTP client.
//! - [`pack`]: bundle packing with golden-vector checks.
//! - [`duration`]: `30s`/`10m`/`12h`/`90d` parsing, RFC 3339 formatting.
//! - [`server`]: startup; [`config`]: `fleet-server.toml`.
//! - [`api`]: the HTTP API; [`auth`]: operator roles and device credentials.
//! - [`store`]: the `Store` trait and its sled implementation.
//! - [`registry`]: content-addressed bundle files.
//! - [`rollout`]: the pure staged-rollout controller; [`controller`]: its driver.
//! - [`mqtt`]: the embedded broker, telemetry ingestion, update notices.
//! - [`openapi`]: the generated OpenAPI document (docs/openapi.json).
//! - [`metrics`]: Prometheus metrics of the server.
//! - [`error`]: the error type.

pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod controller;
pub mod duration;
pub mod error;
pub mod fleetctl;
pub mod metrics;
pub mod mqtt;
pub mod openapi;
pub mod pack;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;

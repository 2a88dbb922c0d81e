//! The edgefleet fleet server. It depends on the wire crate only: no model
//! runtime is linked (packing is `fleetctl`'s job).
//!
//! # Layout
//! - [`server`]: startup; [`config`]: `fleet-server.toml`.
//! - [`api`]: the HTTP API; [`http_error`]: its error responses;
//!   [`auth`]: operator roles and device credentials.
//! - [`store`]: the `Store` trait and its sled implementation.
//! - [`registry`]: content-addressed bundle files.
//! - [`rollout`]: the pure staged-rollout controller; [`controller`]: its driver.
//! - [`mqtt`]: the embedded broker, telemetry ingestion, update notices.
//! - [`openapi`]: the generated OpenAPI document (docs/openapi.json).
//! - [`metrics`]: Prometheus metrics of the server.
//! - [`error`]: the error type.

pub mod api;
pub mod auth;
pub mod config;
pub mod controller;
pub mod error;
pub mod http_error;
pub mod metrics;
pub mod mqtt;
pub mod openapi;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;

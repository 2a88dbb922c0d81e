//! The edgefleet fleet server. It depends on the wire crate only: no model
//! runtime is linked (packing is `fleetctl`'s job).
//!
//! Reads are served from memory ([`fleet`], [`registry`], the
//! [`controller`]'s rollouts); writes go behind, batched, through one
//! [`writer`] thread into the [`store`].
//!
//! # Layout
//! - [`server`]: startup and task supervision; [`config`]: `fleet-server.toml`;
//!   [`standby`]: what a standby replica answers.
//! - [`http`]: the listener; [`api`]: the HTTP API; [`http_error`]: its
//!   error responses; [`auth`]: roles, device credentials and the policy table;
//!   [`ui`]: the web console (embedded static page, cookie sessions).
//! - [`fleet`]: the device inventory in memory, with each device's desired
//!   state ready to serve.
//! - [`enrollment`]: fleet-wide and per-batch enrollment tokens.
//! - [`store`]: the `Store` trait and its sled implementation; [`writer`]:
//!   the batching write-behind thread.
//! - [`registry`]: bundle records and content-addressed files.
//! - [`rollout`]: the pure staged-rollout controller; [`experiment`]: pure
//!   A/B experiments and bandits, on [`stats`] (confidence sequences, the
//!   Thompson allocator); [`controller`]: the driver of both.
//! - [`ingest`]: device messages into the store, lossless and batched.
//! - [`mqtt`]: the embedded broker, an external broker's client, ACLs, notices.
//! - [`openapi`]: the generated OpenAPI document (docs/openapi.json).
//! - [`metrics`]: Prometheus metrics of the server.
//! - [`error`]: the error type.

pub mod api;
pub mod auth;
pub mod blobs;
pub mod config;
pub mod controller;
pub mod enrollment;
pub mod error;
pub mod experiment;
pub mod fleet;
pub mod follow;
pub mod http;
pub mod http_error;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod mqtt;
pub mod openapi;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod standby;
pub mod stats;
pub mod store;
pub mod trust;
pub mod ui;
pub mod writer;

//! Shared fixtures of the end-to-end tests (`integ/tests/*.rs`): repository
//! paths, free ports, the test signing keys, the workspace's binaries and
//! Debian's mosquitto.
//!
//! # Layout
//! - [`common`]: paths, ports, keys, mosquitto.
//! - [`bins`]: the `fleet-server`, `fleetctl` and `edge-agent` binaries of this build.
//! - [`bundles`]: bundles of the real models, packed by `fleetctl`'s packer.
//! - [`fleet`]: [`fleet::TestFleet`], a real fleet server in the test
//!   process, and the operator calls the tests make.
//! - [`agent`]: `edge-agent run` as a child process.
//! - [`mosquitto`]: Debian's mosquitto with the published configuration.
//! - [`pki`]: certificate authorities and certificates made for a test.
//! - [`postgres`]: a throwaway PostgreSQL server from Debian's packages.
//! - [`s3`]: a throwaway S3-compatible server (`s3s-fs`).
//! - [`balancer`]: a load balancer with `/readyz` health checks, in front of
//!   fleet-server replicas.
//! - [`proxy`]: a fault-injecting HTTP proxy (flip, truncate, cut, replay,
//!   stall, 500s) between an agent and its server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod balancer;
pub mod bins;
pub mod bundles;
pub mod common;
pub mod fleet;
pub mod mosquitto;
pub mod pki;
pub mod postgres;
pub mod proxy;
pub mod s3;

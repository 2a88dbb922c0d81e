//! Everything that crosses a wire or a disk boundary between the edgefleet
//! agent, the fleet server and `fleetctl`.
//!
//! The crate is deliberately pure: no async runtime, no sockets, no file
//! paths. Functions take `Read`/`Write` and return values, so the same code
//! runs on the operator's laptop, the server and a 32-bit ARM board, and so
//! every decoder can be fuzzed in isolation.
//!
//! # Layout
//! - [`tensor`]: dtypes, tensor specs and raw little-endian tensors.
//! - [`npz`]: NumPy `.npy`/`.npz` reading and writing (golden vectors, API bodies).
//! - [`names`]: validated newtypes ([`names::ModelName`]).
//! - [`keys`]: ed25519 key files and key ids.
//! - [`manifest`]: the v1 bundle manifest (postcard-encoded, signed).
//! - [`bundle`]: the bundle file layout, [`bundle::Signed`], limits, payload checks.
//! - [`drift`]: drift features, baselines and PSI (shared by packer and device).
//! - [`device`]: the device ↔ server protocol (enroll, desired, report).
//! - [`telemetry`]: MQTT topics and payloads (state, telemetry, events, commands).
//! - [`verify`]: the trust root and the only way to obtain a [`verify::Verified`] manifest.
//! - [`trust`]: signed trust documents and the rotation rule (a TUF-style root chain).
//! - [`api`]: the operator API's request and response bodies (`api::v1`).
//! - [`backoff`]: the one retry policy; [`stats`]: the one percentile.
//! - [`prom`]: Prometheus text helpers; [`time`]: the wall clock in unix seconds.
//! - [`error`]: the error type and its stable reason codes.

pub mod api;
pub mod backoff;
pub mod bundle;
pub mod device;
pub mod drift;
pub mod error;
pub mod keys;
pub mod manifest;
pub mod names;
pub mod npz;
pub mod prom;
pub mod stats;
pub mod telemetry;
pub mod tensor;
pub mod time;
pub mod trust;
pub mod verify;
pub mod window;

pub use error::{Error, Result};

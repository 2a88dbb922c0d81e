//! The edgefleet model runtime: tract, wrapped so that what `fleetctl
//! bundle pack` checks is exactly what a device runs.
//!
//! # Layout
//! - [`model`]: loading ONNX/NNEF with input shapes pinned to the manifest,
//!   per-worker [`model::Session`]s, input checks, the golden self-test and
//!   the ONNX → NNEF conversion the packer uses.
//! - [`onnx_external`]: inlining an ONNX model's external weight files
//!   (the packer; feature `onnx`).
//! - [`depthwise`], [`conv1x1`], [`direct_conv`], [`direct_deconv`],
//!   [`pointwise`], [`resize`], [`maxpool`]: ops of ours that replace
//!   tract's for depthwise, 1×1, other dense and transposed convolutions
//!   (x86-64), element-wise expressions such as hard-swish, image resizing
//!   and max pooling, between declutter and codegen.
//! - [`threads`]: intra-op parallelism ([`Threads`], `[engine] threads`).
//! - [`error`]: [`RuntimeError`] and its stable reason codes.
//!
//! The `onnx` feature (on by default) compiles tract's ONNX front end;
//! without it only NNEF models load (the smaller device build).

pub mod conv1x1;
pub mod depthwise;
pub mod direct_conv;
pub mod direct_deconv;
pub mod error;
pub mod graph_ast;
mod lowering;
pub mod maxpool;
pub mod model;
mod nnef_ops;
#[cfg(feature = "onnx")]
pub mod onnx_external;
pub mod optimizer;
pub mod pointwise;
pub mod resize;
mod row_blocks;
#[cfg(test)]
mod test_rng;
pub mod threads;
mod tract_fixes;

pub use error::{Result, RuntimeError};
pub use model::{
    Decluttered, LoadTimings, Model, OpProfile, SelfTestReport, Session, TRACT_VERSION,
    check_format, declared_inputs, decluttered_epoch, from_tract, keep_kernels_in_bounds,
    onnx_to_nnef, quiet_error_backtraces, self_test, to_tract, warm_up,
};
#[cfg(feature = "onnx")]
pub use onnx_external::inline_external_data;
pub use threads::Threads;

/// tract itself, for callers that time it bare (`edge-agent bench --bare`).
pub use tract_nnef;

//! NNEF serializers for ops tract's declutter produces but tract-nnef
//! 0.23.9 cannot write, so that `fleetctl bundle pack --nnef` takes the
//! models that use them.
//!
//! - `GeluExact`: declutter fuses the erf form of GELU,
//!   `0.5 * x * (1 + erf(x / sqrt 2))` (ONNX `Gelu`, and what PyTorch
//!   exports for `nn.GELU()` in every transformer), into one op that has no
//!   NNEF dumper in tract 0.23.9 ("No serializer found for node …
//!   GeluExact").
//!
//! The ops live in their own registry, `edgefleet`: tract writes
//! `extension tract_registry edgefleet;` into a graph that uses one, and
//! only such a graph needs an agent that knows it. An older agent refuses
//! it at load (tract: "Registry not found"), in its self-test, before
//! anything is swapped.

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::nn::GeluExact;

/// The registry's id, as tract writes it in `extension tract_registry`.
pub(crate) const REGISTRY: &str = "edgefleet";

/// The fragment name of the exact (erf) GELU.
const GELU_EXACT: &str = "edgefleet_gelu_exact";

pub(crate) fn registry() -> Registry {
    let mut registry = Registry::new(REGISTRY)
        .with_doc("edgefleet: tract ops that tract-nnef 0.23.9 has no serializer for");
    // A unit op (no parameters): tract writes and reads it as
    // `edgefleet_gelu_exact(x)`.
    registry.register_unit_element_wise(GELU_EXACT, &GeluExact {});
    registry
}

//! `.npz` bodies arrive from local apps and operators: decode must not panic.
#![no_main]

use edgefleet_wire::npz::{NpzLimits, from_npz_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = from_npz_bytes(data, NpzLimits { max_entries: 16, max_total_bytes: 1 << 22 });
});

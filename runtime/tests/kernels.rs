//! Which of tract's kernels a process may run. Its own test binary: tract
//! reads the machine's instruction sets once per process, at the first
//! kernel it picks.

/// `keep_kernels_in_bounds` takes tract's AMX int8 matmul kernel out of the
/// instruction sets tract dispatches on, so no int8 matmul can reach it
/// (its loads run past the packed operand: see the function's docs). On a
/// CPU with `amx_int8` (this repository's CI machine has it) the set holds
/// the kernel without the call; elsewhere this holds either way.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_amx_int8_kernel_is_out_of_the_dispatch_set() {
    use edgefleet_runtime::tract_nnef::tract_core::tract_linalg::{isa, mmm_routines};
    if std::env::var_os("TRACT_CPU_ISA").is_some() {
        // the operator's own choice replaces ours, by design
        eprintln!("TRACT_CPU_ISA is set: nothing to check");
        return;
    }
    edgefleet_runtime::keep_kernels_in_bounds();
    let native = isa::native();
    assert!(!native.has(isa::Isa::X86_64AmxInt8), "{native:?}");
    let amx: Vec<String> = mmm_routines::runnable_for(&native)
        .iter()
        .map(|k| k.name().to_string())
        // avx512amx_mmm_i32_16x16; the f32 one (bf16, lossy) is opt-in
        .filter(|name| name.contains("amx") && name.contains("_i32_"))
        .collect();
    assert!(amx.is_empty(), "{amx:?}");
}

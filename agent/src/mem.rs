//! Giving freed memory back to the system after a model load.
//!
//! Loading a bundle frees tens of MiB at once: the compressed payload and
//! the model bytes after verification and parsing, and the self-test's
//! tract state. glibc keeps freed memory in each thread's arena for reuse,
//! so without a trim the agent's resident set stays at the load's peak
//! (measured with rec: 67 MiB resident instead of 53 MiB, latency the same;
//! docs/decisions.md). Only called after a load, never on the inference
//! path: a trim there would make the next inference fault its buffers in
//! again.

/// Returns the free pages of every malloc arena to the system (glibc's
/// `malloc_trim`). Elsewhere (musl's allocator returns memory itself) it
/// does nothing.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own
    // arenas, each under its lock; it is safe to call from any thread at
    // any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

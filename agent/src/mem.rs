//! Giving freed memory back to the system after a model load, and the
//! allocator thresholds that make a load's buffers reusable.
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

/// Fixes glibc's thresholds for serving large blocks with `mmap` (and for
/// trimming the heap's top) at the values glibc would reach on its own
/// once the process had freed a large block: 32 MiB and 64 MiB (512 KiB
/// and 1 MiB on 32-bit boards, glibc's ceilings there). Call it first
/// thing in `main`.
///
/// glibc starts a process at 128 KiB and raises the thresholds only as
/// mapped blocks are freed. A model load in a fresh process allocates and
/// frees hundreds of blocks above 128 KiB (the payload, the model bytes,
/// each weight as the front end copies and rewrites it), and at the
/// starting threshold each is a fresh mapping whose every page faults in
/// zeroed, then is unmapped. With the thresholds fixed, they come from
/// the heap and are reused. Measured with `edge-agent bench`, seven fresh
/// processes each, interleaved (docs/decisions.md): cls cold start 57.6
/// → 51.7 ms, rec 170.1 → 160.4 ms; resident set +1 to +3 MiB; inference
/// unchanged. [`release_freed`] still gives the load's free pages back.
///
/// An operator's own `GLIBC_TUNABLES` malloc thresholds are left alone.
/// Elsewhere (musl) it does nothing.
pub fn keep_large_blocks_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| {
            t.contains("glibc.malloc.mmap_threshold") || t.contains("glibc.malloc.trim_threshold")
        });
        if tuned {
            return;
        }
        // glibc refuses an mmap threshold above half its largest heap:
        // 32 MiB on 64-bit, 512 KiB on 32-bit.
        let mmap: libc::c_int = if cfg!(target_pointer_width = "64") {
            32 << 20
        } else {
            512 << 10
        };
        #[allow(unsafe_code)]
        // SAFETY: mallopt takes no pointer; it sets two of glibc's
        // parameters under the main arena's lock, from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * mmap);
        }
    }
}

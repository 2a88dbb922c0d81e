//! `mem::release_freed` gives memory back. Alone in its test binary: a
//! trim from a test running beside it would muddle the measurement.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// Frees 64 MiB of blocks (each below glibc's mmap threshold, so they
/// come from the arena) below a block that stays, so glibc cannot give
/// them back by shrinking its heap, and checks that the trim does.
#[test]
fn freed_blocks_below_a_live_one_leave_the_resident_set() {
    std::thread::spawn(|| {
        let blocks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8 | 1; 64 * 1024]).collect();
        let pin = vec![1u8; 1024];
        let before = edge_agent::procstat::rss_bytes();
        drop(blocks);
        let freed_only = edge_agent::procstat::rss_bytes();
        edge_agent::mem::release_freed();
        let trimmed = edge_agent::procstat::rss_bytes();
        drop(pin);
        let mib = |b: u64| b as f64 / 1048576.0;
        assert!(
            freed_only + (32 << 20) > before,
            "glibc gave the freed blocks back by itself ({:.1} -> {:.1} MiB): the test no longer tests the trim",
            mib(before),
            mib(freed_only)
        );
        assert!(
            trimmed + (32 << 20) < freed_only,
            "the trim gave back too little: {:.1} -> {:.1} MiB",
            mib(freed_only),
            mib(trimmed)
        );
    })
    .join()
    .unwrap();
}

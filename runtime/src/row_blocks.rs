//! How the register-blocked kernels ([`crate::depthwise`],
//! [`crate::conv1x1`]) walk their output rows.

/// Splits rows `0..count` into blocks of `widest` rows (a power of two),
/// then, for the last rows, of the largest halves of it that fit:
/// `(first row, rows)`, in order.
// Only the x86-64 kernels have register blocks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn row_blocks(count: usize, widest: usize) -> impl Iterator<Item = (usize, usize)> {
    debug_assert!(widest.is_power_of_two());
    let mut first = 0;
    std::iter::from_fn(move || {
        let left = count.checked_sub(first).filter(|&left| left > 0)?;
        let mut rows = widest;
        while rows > left {
            rows /= 2;
        }
        let block = (first, rows);
        first += rows;
        Some(block)
    })
}

#[cfg(test)]
mod tests {
    use super::row_blocks;

    #[test]
    fn blocks_cover_every_row_once_widest_first() {
        for widest in [1, 2, 4, 8] {
            for count in 0..40 {
                let blocks: Vec<(usize, usize)> = row_blocks(count, widest).collect();
                let mut next = 0;
                for &(first, rows) in &blocks {
                    assert_eq!(first, next, "{count} rows by {widest}: {blocks:?}");
                    assert!(rows.is_power_of_two() && rows <= widest);
                    next += rows;
                }
                assert_eq!(next, count);
                // Only the last rows, fewer than `widest`, go in smaller blocks.
                let full = blocks.iter().filter(|b| b.1 == widest).count();
                assert_eq!(full, count / widest, "{count} rows by {widest}: {blocks:?}");
                assert!(blocks.windows(2).all(|w| w[0].1 >= w[1].1));
            }
        }
    }
}

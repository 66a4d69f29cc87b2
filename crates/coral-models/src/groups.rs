//! Consecutive groups of work under a byte budget: what every walk over tensors or chunks
//! loads, hashes or stores at once.

use std::ops::Range;

/// Splits items of the given sizes, in order, into consecutive ranges whose sizes add up to at
/// most `budget` (a range holds one item at least, however large). Sizes saturate.
pub(crate) fn groups(sizes: impl IntoIterator<Item = u64>, budget: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum, mut n) = (0usize, 0u64, 0usize);
    for (i, size) in sizes.into_iter().enumerate() {
        if i > start && sum.saturating_add(size) > budget {
            out.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(size);
        n = i + 1;
    }
    if start < n {
        out.push(start..n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn groups_cover_everything_in_order_under_the_budget() {
        assert!(groups([], 10).is_empty());
        assert_eq!(groups([3, 3, 3, 3], 6), vec![0..2, 2..4]);
        // One item over the budget is a group of its own.
        assert_eq!(groups([1, 20, 1, 1], 5), vec![0..1, 1..2, 2..4]);
        assert_eq!(groups([u64::MAX, u64::MAX], 5), vec![0..1, 1..2]);
        assert_eq!(groups([0, 0, 0], 0), vec![0..3]);
    }
}

//! Asking the CPU for bytes before a pass over them reads them.
//!
//! On the project's machine the hardware prefetchers do not keep up with a pass that reads
//! memory in order at a few GB/s: SHA-256 of a 64 MiB tensor runs at 1.08 GB/s, against 1.68
//! GB/s over bytes in cache; asked for 4 KiB ahead, a kilobyte at a time, at 1.56 GB/s
//! (`docs/benchmarks.md`, "Hashing"). On all-MiniLM-L6-v2 (90.9 MB, in the page cache) that is
//! 82 ms of hashing against 50. The hints cost a few instructions a cache line; no crate offers
//! them beyond `core::arch`, which this wraps.
//!
//! ```
//! use sha2::{Digest, Sha256};
//!
//! let data = vec![7u8; 1 << 20];
//! let mut h = Sha256::new();
//! coral_core::prefetch::in_pieces(&data, |piece| h.update(piece));
//! assert_eq!(h.finalize(), Sha256::digest(&data));
//! ```

/// Bytes handed on at a time by [`in_pieces`].
pub const PIECE: usize = 1 << 10;

/// How far ahead of the pass [`in_pieces`] asks for bytes.
pub const AHEAD: usize = 4 << 10;

/// Calls `f` on `data` in order, a [`PIECE`] at a time, each time asking for the cache lines
/// [`AHEAD`] bytes further on. Short data (under 16 KiB) goes to `f` whole.
pub fn in_pieces(data: &[u8], mut f: impl FnMut(&[u8])) {
    if data.len() < 4 * AHEAD {
        f(data);
        return;
    }
    lines(data, 0, AHEAD);
    let mut start = 0;
    for piece in data.chunks(PIECE) {
        let ahead = start + AHEAD;
        lines(data, ahead, ahead + PIECE);
        f(piece);
        start += piece.len();
    }
}

/// Asks for the cache lines of `data[from..to]` (the part inside `data`). A hint: it reads
/// nothing and changes nothing.
#[inline]
pub fn lines(data: &[u8], from: usize, to: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (from..to.min(data.len())).step_by(64) {
        let p: *const u8 = &data[off];
        // SAFETY: a prefetch reads nothing into the program and cannot fault; SSE, which it
        // needs, is part of every x86-64 CPU; the address is inside `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, from, to);
}

/// Asks for the cache line holding `data[at]`, if there is one.
#[inline]
pub fn line(data: &[u8], at: usize) {
    lines(data, at, at.saturating_add(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_data_in_order() {
        for len in [0, 1, 100, 4 * AHEAD - 1, 4 * AHEAD, 4 * AHEAD + 1, 100_003] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut seen = Vec::new();
            in_pieces(&data, |p| seen.extend_from_slice(p));
            assert_eq!(seen, data, "{len} bytes");
        }
    }

    #[test]
    fn hints_past_the_end_do_nothing() {
        let data = [1u8; 10];
        lines(&data, 5, 1000);
        lines(&data, 1000, 2000);
        line(&data, usize::MAX);
        line(&[], 0);
    }
}

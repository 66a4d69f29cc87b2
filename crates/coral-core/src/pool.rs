//! Buffers of decoded weights given back once their bytes are consumed, for the next decode to
//! write into: memory the process has written already, so reusing it costs at most a `memset`,
//! where fresh memory costs a page fault and the kernel's zeroing of every page. On this
//! project's 2-core virtual machine, first touching 91 MB took 32 ms and writing it again 10 ms;
//! an export writes every byte of the model into fresh buffers unless they come back here.
//!
//! The pool is the process's: a store decodes into [`take`]n buffers, and whoever consumes a
//! loaded weight (an export writing it to a file, the Python package when numpy frees an array)
//! gives its buffer back with [`recycle`] or [`recycle_bytes`]. It keeps at most
//! `CORAL_BUFFER_CACHE_MB` MiB (256 unless set; 0 turns it off), and only buffers of 64 KiB or
//! more: the allocator reuses smaller ones well by itself.
//!
//! ```
//! let v = vec![7u8; 1 << 20];
//! let ptr = v.as_ptr();
//! coral_core::pool::recycle(v);
//! // A request it fits (at most twice the size asked for) gets the same memory back, with
//! // whatever bytes it held: the taker sizes it and writes it.
//! let mut again = coral_core::pool::take(600 << 10).unwrap();
//! assert_eq!(again.as_ptr(), ptr);
//! again.resize(600 << 10, 0);
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;

/// Buffers smaller than this are not kept.
pub const MIN_BYTES: usize = 64 << 10;

/// The kept buffers by capacity, and the bytes they hold: finding one that fits is a lookup,
/// however many small tensors a model has.
struct Pool {
    held: usize,
    by_capacity: BTreeMap<usize, Vec<Vec<u8>>>,
}

/// Buffers given back, for [`take`].
static POOL: Mutex<Pool> = Mutex::new(Pool {
    held: 0,
    by_capacity: BTreeMap::new(),
});

/// Most bytes the pool keeps: `CORAL_BUFFER_CACHE_MB` (MiB), else 256 MiB; 0 turns it off.
fn limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("CORAL_BUFFER_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(256)
            .saturating_mul(1 << 20)
    })
}

/// Gives a buffer back for later decodes: kept (bytes and all) while the pool holds under its
/// limit, else freed.
pub fn recycle(v: Vec<u8>) {
    let cap = v.capacity();
    if cap < MIN_BYTES {
        return;
    }
    let Ok(mut pool) = POOL.lock() else {
        return;
    };
    if pool.held.saturating_add(cap) > limit() {
        return;
    }
    pool.held += cap;
    pool.by_capacity.entry(cap).or_default().push(v);
}

/// [`recycle`] for a weight's bytes, when nothing else holds them (bytes shared with another
/// holder, or borrowed from a memory map, are left alone).
pub fn recycle_bytes(b: Bytes) {
    if b.len() < MIN_BYTES {
        return;
    }
    if b.is_unique() {
        // Unique: the conversion takes the buffer over (its bytes move only when they do not
        // start it, and a weight's do).
        recycle(Vec::from(b));
    }
}

/// A kept buffer with room for `n` bytes and at most twice that (the smallest such), or `None`.
/// Its length and bytes are what its last holder left: a taker that needs `n` zero bytes
/// clears it and resizes it; one that writes every byte only resizes it (no `memset` within
/// the old length).
pub fn take(n: usize) -> Option<Vec<u8>> {
    if n < MIN_BYTES / 2 {
        return None;
    }
    let mut pool = POOL.lock().ok()?;
    let cap = *pool.by_capacity.range(n..=n.saturating_mul(2)).next()?.0;
    let list = pool.by_capacity.get_mut(&cap)?;
    let v = list.pop()?;
    if list.is_empty() {
        pool.by_capacity.remove(&cap);
    }
    pool.held = pool.held.saturating_sub(v.capacity());
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_buffers_come_back_only_when_they_fit() {
        // Sizes no other test of this process asks for: the pool is the process's.
        let v = vec![0xABu8; (3 << 20) + 17];
        let ptr = v.as_ptr();
        recycle(v);
        // Small: not kept, and never asked of the pool.
        recycle(vec![1u8; 100]);
        assert!(take(10).is_none());
        // Too small a request for it (it would waste over half).
        assert!(take((1 << 20) + 1).is_none_or(|b| b.as_ptr() != ptr));
        let again = take((2 << 20) + 5).unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), (3 << 20) + 17);
        assert!(again.iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn unique_bytes_come_back_shared_ones_do_not() {
        let b = Bytes::from(vec![1u8; (5 << 20) + 3]);
        let ptr = b.as_ptr();
        let other = b.clone();
        recycle_bytes(b);
        assert!(take((5 << 20) + 3).is_none_or(|v| v.as_ptr() != ptr));
        recycle_bytes(other);
        let back = take((5 << 20) + 3).unwrap();
        assert_eq!(back.as_ptr(), ptr);
        // Borrowed bytes are never taken over.
        recycle_bytes(Bytes::from_static(&[0u8; 16]));
    }

    #[test]
    fn many_small_buffers_all_come_back() {
        // 1,000 buffers of one size no other test asks for: every one is found again, and
        // once they are all taken none is left of that size.
        let size = (100 << 10) + 13;
        let ptrs: std::collections::BTreeSet<usize> = (0..1000)
            .map(|_| {
                let v = vec![0u8; size];
                let p = v.as_ptr() as usize;
                recycle(v);
                p
            })
            .collect();
        let taken: Vec<Vec<u8>> = (0..1000).map(|_| take(size).unwrap()).collect();
        let back: std::collections::BTreeSet<usize> =
            taken.iter().map(|v| v.as_ptr() as usize).collect();
        assert_eq!(back, ptrs);
        assert!(take(size).is_none_or(|v| v.capacity() != size));
    }
}

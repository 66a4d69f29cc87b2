//! Large buffers backed by transparent huge pages where the kernel allows it: one page fault per
//! 2 MiB instead of per 4 KiB the first time they are written, which is most of the cost of
//! fresh memory for chunk-sized buffers.

const HUGE: usize = 2 << 20;

/// Advises huge pages for the whole 2 MiB pages inside `len` bytes at `ptr` (advice only).
fn advise(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let p = ptr as usize;
        let start = p.next_multiple_of(HUGE);
        let end = p.saturating_add(len) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice only, on whole pages inside one allocation; failure is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Buffers given back by [`recycle`], for [`zeroed`] to reuse: memory the process has written
/// already, so reusing it costs a `memset` instead of a page fault per page. On this project's
/// virtual machine first-touch faults cost about a third of a fresh load's CPU.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Most bytes [`recycle`] keeps: `CORAL_BUFFER_CACHE_MB` (MiB), else 256 MiB; 0 turns it off.
fn pool_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("CORAL_BUFFER_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(256)
            .saturating_mul(1 << 20)
    })
}

/// Gives a large buffer that held a loaded weight back for later loads to decode into (the
/// Python package does, when numpy frees an array it lent): kept while the pool holds under
/// its limit (see [`pool_limit`]), else freed. Buffers under 4 MiB are freed at once: the
/// allocator reuses those well by itself.
pub fn recycle(mut v: Vec<u8>) {
    if v.capacity() < 2 * HUGE {
        return;
    }
    v.clear();
    let Ok(mut pool) = POOL.lock() else {
        return;
    };
    let held: usize = pool.iter().map(Vec::capacity).sum();
    if held.saturating_add(v.capacity()) <= pool_limit() {
        pool.push(v);
    }
}

/// A recycled buffer for `n` bytes: the smallest with room for `n` and at most twice that.
fn reuse(n: usize) -> Option<Vec<u8>> {
    let mut pool = POOL.lock().ok()?;
    let (i, _) = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= n && v.capacity() / 2 <= n)
        .min_by_key(|(_, v)| v.capacity())?;
    Some(pool.swap_remove(i))
}

/// A zeroed buffer of `n` bytes (a recycled one, zeroed, or else untouched memory from the
/// allocator, advised before use), or `None` when the memory is not there (a size read from a
/// damaged file must not abort).
pub(crate) fn zeroed(n: usize) -> Option<Vec<u8>> {
    if n == 0 {
        return Some(Vec::new());
    }
    if n >= 2 * HUGE {
        if let Some(mut v) = reuse(n) {
            v.resize(n, 0);
            return Some(v);
        }
    }
    let layout = std::alloc::Layout::array::<u8>(n).ok()?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    if n >= 2 * HUGE {
        advise(ptr, n);
    }
    // SAFETY: allocated by the global allocator with the layout of `n` bytes aligned to 1, which
    // is what a Vec<u8> of capacity `n` uses; all `n` bytes are initialised (zero).
    Some(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// Makes room for `additional` more bytes in `v`, or fails (never aborts) when the memory is
/// not there. When it must grow to 2 MiB or more, the new allocation is advised before
/// anything is written to it.
pub(crate) fn reserve(
    v: &mut Vec<u8>,
    additional: usize,
) -> Result<(), std::collections::TryReserveError> {
    let need = v.len().saturating_add(additional);
    if v.capacity() >= need {
        return Ok(());
    }
    if need < HUGE {
        return v.try_reserve(additional);
    }
    let mut fresh = Vec::new();
    fresh.try_reserve_exact(need)?;
    advise(fresh.as_ptr(), need);
    fresh.extend_from_slice(v);
    *v = fresh;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reserve_keeps_the_contents_and_makes_room() {
        let mut v = vec![1u8, 2, 3];
        super::reserve(&mut v, 5 << 20).unwrap();
        assert!(super::reserve(&mut v, usize::MAX / 2).is_err());
        assert_eq!(v, [1, 2, 3]);
        assert!(v.capacity() >= 3 + (5 << 20));
        let z = super::zeroed(5 << 20).unwrap();
        assert_eq!(z.len(), 5 << 20);
        assert!(z.iter().all(|&b| b == 0));
        assert!(super::zeroed(0).unwrap().is_empty());
        assert!(super::zeroed(usize::MAX / 2).is_none());
    }

    #[test]
    fn recycled_buffers_come_back_zeroed_and_only_when_they_fit() {
        // Sizes no other test of this process asks for: the pool is the process's.
        let mut v = super::zeroed((37 << 20) + 3).unwrap();
        v.iter_mut().for_each(|b| *b = 0xAB);
        let ptr = v.as_ptr();
        super::recycle(v);
        // Small: not kept.
        super::recycle(vec![1u8; 100]);
        // Too small a request for it (it would waste over half): fresh memory.
        let small = super::zeroed(10 << 20).unwrap();
        assert_ne!(small.as_ptr(), ptr);
        // A fitting one gets it back, zeroed.
        let again = super::zeroed(30 << 20).unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 30 << 20);
        assert!(again.iter().all(|&b| b == 0));
    }
}

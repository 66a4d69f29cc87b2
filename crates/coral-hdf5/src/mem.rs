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

/// A zeroed buffer of `n` bytes (one given back to [`coral_core::pool`], zeroed, or else
/// untouched memory from the allocator, advised before use), or `None` when the memory is not
/// there (a size read from a damaged file must not abort).
pub(crate) fn zeroed(n: usize) -> Option<Vec<u8>> {
    match coral_core::pool::take(n) {
        Some(mut v) => {
            v.clear();
            v.resize(n, 0);
            Some(v)
        }
        None => fresh(n),
    }
}

/// A buffer of `n` bytes for a caller that writes every one of them: one given back to
/// [`coral_core::pool`] with whatever bytes it held (no `memset` within its old length), else
/// fresh zeroed memory as [`zeroed`] gives; `None` when the memory is not there.
pub(crate) fn for_overwrite(n: usize) -> Option<Vec<u8>> {
    match coral_core::pool::take(n) {
        Some(mut v) => {
            v.resize(n, 0);
            Some(v)
        }
        None => fresh(n),
    }
}

/// Untouched zeroed memory from the allocator, advised before use when it spans huge pages.
fn fresh(n: usize) -> Option<Vec<u8>> {
    if n == 0 {
        return Some(Vec::new());
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
    fn recycled_buffers_come_back_zeroed() {
        // A size no other test of this process asks for: the pool is the process's.
        let mut v = super::zeroed((37 << 20) + 3).unwrap();
        v.iter_mut().for_each(|b| *b = 0xAB);
        let ptr = v.as_ptr();
        coral_core::pool::recycle(v);
        let again = super::zeroed(30 << 20).unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 30 << 20);
        assert!(again.iter().all(|&b| b == 0));
    }
}

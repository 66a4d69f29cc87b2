//! The memory `HDF5Store::load_into` takes, measured by a counting global allocator (so this
//! file holds one test: nothing else allocates while it measures): about two windows of chunks
//! whatever the weight's size, where `load` takes the whole weight.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use coral_core::{DType, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
use coral_store_api::WeightStore;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at most while `f` runs, above what was allocated when it started.
fn peak_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (PEAK.load(Ordering::SeqCst).saturating_sub(base), out)
}

struct Discard(u64);

impl std::io::Write for Discard {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn load_into_takes_a_few_windows_whatever_the_weight() {
    // Two threads: windows of 8 MiB (8 chunks of 1 MiB).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = HDF5Store::open(
        dir.path().join("s.h5"),
        HDF5StoreOptions::new()
            .compression(Compression::None)
            .chunk_bytes(1 << 20),
    )
    .unwrap();
    let mib = 96usize;
    let n = mib << 20;
    let key = {
        let data: Vec<u8> = (0..n).map(|j| (j % 253) as u8).collect();
        let w = WeightTensor::from_bytes("big", vec![n / 4096, 1024], DType::F32, data).unwrap();
        store.store(&w).unwrap()
    };
    // Warm up once (thread-local buffers, HDF5's caches), then measure.
    pool.install(|| store.load_into(&key, &mut Discard(0)))
        .unwrap()
        .unwrap();
    let (streamed, (got, sink)) = peak_during(|| {
        let mut sink = Discard(0);
        let got = pool.install(|| store.load_into(&key, &mut sink));
        (got, sink)
    });
    let (_, hash) = got.unwrap().unwrap();
    assert_eq!((hash, sink.0), (key, n as u64));
    let (whole, w) = peak_during(|| pool.install(|| store.load(&key)));
    assert_eq!(w.unwrap().unwrap().nbytes(), n);
    eprintln!(
        "peak above the start: load_into {} KiB, load {} KiB, of a {mib} MiB weight",
        streamed >> 10,
        whole >> 10
    );
    // Four windows of 8 MiB (one read, one written, two for the hash), a chunk's buffers per
    // thread, and some slack.
    let bound = 4 * (8 << 20) + 2 * (2 << 20) + (8 << 20);
    assert!(
        streamed <= bound,
        "load_into took {streamed} bytes (bound {bound})"
    );
    assert!(whole >= n, "load takes the whole weight: {whole}");
}

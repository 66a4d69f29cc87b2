//! Partial and streamed loads of `HDF5Store` (feature `testing`, for its read counters): rows and
//! byte ranges read only the chunks that hold them and equal the same part of a full load, for
//! every kind of range; `load_into` holds a window of chunks, not the weight, and detects
//! corruption at its end; bad ranges are errors, never panics; reads stay right while other
//! threads delete and store (freeing the space located chunks were in).

use std::ops::Range;
use std::sync::OnceLock;

use coral_core::{ContentHash, DType, HashAlgorithm, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
use coral_store_api::testing::sample_tensor;
use coral_store_api::{RangeUnit, StoreError, WeightStore};
use proptest::prelude::*;

fn open(dir: &tempfile::TempDir, name: &str, opts: HDF5StoreOptions) -> HDF5Store {
    HDF5Store::open(dir.path().join(name), opts).unwrap()
}

/// 4 KiB chunks: a tensor of a few KiB has several.
fn small_chunks() -> HDF5StoreOptions {
    HDF5StoreOptions::new()
        .compression(Compression::Zstd)
        .chunk_bytes(4096)
}

/// A sink that keeps nothing: counts bytes and the largest single write.
#[derive(Default)]
struct Counting {
    bytes: u64,
    largest_write: usize,
    hasher: Option<coral_core::ContentHasher>,
}

impl std::io::Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len() as u64;
        self.largest_write = self.largest_write.max(buf.len());
        if let Some(h) = &mut self.hasher {
            h.update(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rows(store: &HDF5Store, key: &ContentHash, r: Range<usize>) -> WeightTensor {
    store.load_rows(key, r).unwrap().unwrap()
}

#[test]
fn a_row_slice_reads_only_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "s.h5", small_chunks());
    // 40-byte rows, 102 at most per 4 KiB chunk: 10 chunks, the rows spread evenly (101 a
    // chunk), the last of 94 rows.
    let w = sample_tensor("w", DType::F32, &[1003, 10], 1);
    let key = store.store(&w).unwrap();
    let row = 40;
    let stats = |what: &str, chunks: u64| {
        let s = store.take_read_stats_for_testing();
        assert_eq!(s.chunks, chunks, "{what}: chunks read ({s:?})");
        s
    };
    store.take_read_stats_for_testing();
    let r = rows(&store, &key, 250..260);
    assert_eq!(&r.data()[..], &w.data()[250 * row..260 * row]);
    assert_eq!(stats("rows 250..260", 1).max_decoded_bytes, 10 * row as u64);
    rows(&store, &key, 95..105);
    stats("rows 95..105 (chunks 0 and 1)", 2);
    rows(&store, &key, 101..202);
    stats("rows 101..202 (chunk 1 exactly)", 1);
    rows(&store, &key, 1002..1003);
    stats("the last row", 1);
    for r in [0..0, 500..500, 1003..1003] {
        assert_eq!(rows(&store, &key, r.clone()).shape(), &[0, 10]);
        stats(&format!("empty rows {r:?}"), 0);
    }
    rows(&store, &key, 0..1003);
    stats("every row", 10);
    let at = 250 * row as u64;
    let b = store
        .load_byte_range(&key, at + 3..at + 7)
        .unwrap()
        .unwrap();
    assert_eq!(&b[..], &w.data()[at as usize + 3..at as usize + 7]);
    stats("4 bytes of row 250", 1);
    let edge = 101 * row as u64;
    store.load_byte_range(&key, edge - 1..edge + 1).unwrap();
    stats("2 bytes across chunks 0 and 1", 2);
    store.load_byte_range(&key, 7..7).unwrap();
    stats("no bytes", 0);
    let mut sink = Vec::new();
    store.load_into(&key, &mut sink).unwrap().unwrap();
    assert!(sink[..] == w.data()[..]);
    stats("load_into", 10);
    store.load(&key).unwrap().unwrap();
    stats("load", 10);
    // Out of range: nothing read past the metadata.
    assert!(store.load_rows(&key, 990..1004).is_err());
    stats("rows past the end", 0);
}

#[test]
fn ranges_at_chunk_boundaries_equal_the_full_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "s.h5", small_chunks());
    // bf16, rows of 3 * 7 * 2 = 42 bytes: 97 at most per chunk, 4 chunks of 76 rows, the last
    // of 73.
    let w = sample_tensor("w3", DType::BF16, &[301, 3, 7], 2);
    let key = store.store(&w).unwrap();
    let row = 42;
    let mut points = vec![0usize, 1, 300, 301];
    for k in 1..=3 {
        points.extend([76 * k - 1, 76 * k, 76 * k + 1]);
    }
    for &a in &points {
        for &b in &points {
            if a > b {
                continue;
            }
            let got = rows(&store, &key, a..b);
            assert_eq!(got.shape(), &[b - a, 3, 7]);
            assert!(
                got.data()[..] == w.data()[a * row..b * row],
                "rows {a}..{b}"
            );
            let (x, y) = (a * row, b * row);
            for (x, y) in [
                (x, y),
                (x.saturating_sub(1), y),
                (x, (y + 1).min(w.nbytes())),
            ] {
                let got = store
                    .load_byte_range(&key, x as u64..y as u64)
                    .unwrap()
                    .unwrap();
                assert!(got[..] == w.data()[x..y], "bytes {x}..{y}");
            }
        }
    }
}

#[test]
fn load_into_detects_corruption_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
        let strict = open(&dir, &format!("strict-{algorithm:?}.h5"), small_chunks());
        let w = sample_tensor("victim", DType::F32, &[2000, 10], 3);
        let key = w.compute_hash_with(algorithm);
        strict.store_with_key(&w, &key).unwrap();
        assert!(strict.corrupt_for_testing(&key).unwrap());
        let mut sink = Counting::default();
        match strict.load_into(&key, &mut sink) {
            Err(StoreError::Integrity {
                name,
                expected,
                actual,
            }) => {
                assert_eq!((name.as_str(), expected), ("victim", key));
                assert_ne!(actual, key);
                assert_eq!(actual.algorithm(), algorithm);
            }
            other => panic!("{algorithm:?}: expected Integrity, got {other:?}"),
        }
        // Everything was written before the hash was known: the caller keeps it only on Ok.
        assert_eq!(sink.bytes, w.nbytes() as u64);
        // A slice is not verified: rows away from the damage are right, those in it are what
        // the chunk holds now.
        assert!(rows(&strict, &key, 500..600).data()[..] == w.data()[500 * 40..600 * 40]);
        let damaged = rows(&strict, &key, 0..1);
        assert_eq!(damaged.data()[0], w.data()[0] ^ 1);
        assert!(strict.load(&key).is_err(), "a full load still refuses it");

        let lenient = open(
            &dir,
            &format!("lenient-{algorithm:?}.h5"),
            small_chunks().strict_integrity(false),
        );
        lenient.store_with_key(&w, &key).unwrap();
        assert!(lenient.corrupt_for_testing(&key).unwrap());
        let mut sink = Vec::new();
        let (meta, actual) = lenient.load_into(&key, &mut sink).unwrap().unwrap();
        assert_eq!(meta.hash, Some(key));
        assert_ne!(actual, key);
        assert_eq!(
            actual,
            ContentHash::compute(algorithm, DType::F32, &[2000, 10], &sink)
        );
    }
}

#[test]
fn load_into_holds_a_window_not_the_weight() {
    // Two threads, whatever the machine: windows are sized by the pool's threads.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(
        &dir,
        "s.h5",
        HDF5StoreOptions::new()
            .compression(Compression::None)
            .chunk_bytes(256 << 10),
    );
    let mut seen = Vec::new();
    for (i, mib) in [24usize, 72].into_iter().enumerate() {
        // Rows of 4 KiB, a cheap pattern (the content does not matter here).
        let n = mib << 20;
        let data: Vec<u8> = (0..n).map(|j| (j % 251) as u8 ^ i as u8).collect();
        let shape = vec![n / 4096, 1024];
        let w = WeightTensor::from_bytes("big", shape.clone(), DType::F32, data).unwrap();
        let key = store.store(&w).unwrap();
        drop(w);
        store.take_read_stats_for_testing();
        let mut sink = Counting {
            hasher: Some(coral_core::ContentHasher::new(
                HashAlgorithm::Sha256,
                DType::F32,
                &shape,
            )),
            ..Counting::default()
        };
        let (_, hash) = pool
            .install(|| store.load_into(&key, &mut sink))
            .unwrap()
            .unwrap();
        assert_eq!(hash, key);
        assert_eq!(sink.bytes, n as u64);
        assert_eq!(
            sink.hasher.take().unwrap().finish(),
            key,
            "what the sink got"
        );
        let stats = store.take_read_stats_for_testing();
        assert_eq!(stats.chunks, (n / (256 << 10)) as u64);
        seen.push((stats.max_decoded_bytes, sink.largest_write));
    }
    // The same window (8 MiB: 32 chunks) for a weight three times the size: memory does not
    // grow with the weight.
    assert_eq!(seen[0], seen[1], "{seen:?}");
    assert_eq!(seen[0].0, 8 << 20, "{seen:?}");
    assert!(seen[0].1 as u64 <= seen[0].0, "{seen:?}");
}

#[test]
fn bad_ranges_are_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "s.h5", small_chunks());
    let w = sample_tensor("w", DType::I64, &[300, 5], 4);
    let key = store.store(&w).unwrap();
    let scalar = store
        .store(&sample_tensor("s", DType::F32, &[], 5))
        .unwrap();
    let rows_err = |k: &ContentHash, r: Range<usize>| match store.load_rows(k, r.clone()) {
        Err(StoreError::InvalidRange {
            key: got,
            unit: RangeUnit::Rows,
            start,
            end,
            ..
        }) => assert_eq!((got, start, end), (*k, r.start as u64, r.end as u64)),
        other => panic!("rows {r:?}: {other:?}"),
    };
    for r in [
        0..301,
        301..301,
        299..usize::MAX,
        usize::MAX..usize::MAX,
        Range { start: 10, end: 9 },
    ] {
        rows_err(&key, r);
    }
    rows_err(&scalar, 0..0);
    rows_err(&scalar, 0..1);
    let nb = w.nbytes() as u64;
    for r in [
        0..nb + 1,
        nb + 1..nb + 1,
        0..u64::MAX,
        u64::MAX..u64::MAX,
        Range { start: 10, end: 9 },
    ] {
        match store.load_byte_range(&key, r.clone()) {
            Err(StoreError::InvalidRange {
                unit: RangeUnit::Bytes,
                start,
                end,
                ..
            }) => assert_eq!((start, end), (r.start, r.end)),
            other => panic!("bytes {r:?}: {other:?}"),
        }
    }
    assert_eq!(
        store.load_byte_range(&scalar, 0..4).unwrap().unwrap().len(),
        4
    );
}

#[test]
fn slices_stay_right_while_others_delete_and_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "s.h5", small_chunks());
    let w = sample_tensor("kept", DType::F32, &[3000, 10], 6);
    let key = store.store(&w).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let running = || !stop.load(std::sync::atomic::Ordering::Relaxed);
    let cycles = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        // Deletes free space that the next store reuses: located chunks may go stale, those of
        // the weight being read included (it is deleted and stored again, elsewhere).
        s.spawn(|| {
            let mut i = 0u64;
            while running() {
                let other = sample_tensor("churn", DType::F32, &[500, 10], 100 + i % 3);
                let k = store.store(&other).unwrap();
                store.delete(&k).unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        s.spawn(|| {
            while running() {
                store.delete(&key).unwrap();
                store.store(&w).unwrap();
                cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Present most of the time, so that reads find it.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let (mut read, mut streamed) = (0, 0);
        // Until the weight was deleted and stored again a few times (commits may be slow).
        let mut round = 0usize;
        while round < 60 || cycles.load(std::sync::atomic::Ordering::Relaxed) < 5 {
            round += 1;
            assert!(round < 100_000, "the writers made no progress");
            let a = (round * 97) % 3000;
            let b = (a + 1 + round * 131).min(3000);
            // Absent for a moment is fine; present is right.
            if let Some(got) = store.load_rows(&key, a..b).unwrap() {
                assert!(got.data()[..] == w.data()[a * 40..b * 40], "round {round}");
                read += 1;
            }
            let mut sink = Vec::new();
            match store.load_into(&key, &mut sink) {
                Ok(Some((_, h))) => {
                    assert_eq!(h, key, "round {round}");
                    assert!(sink[..] == w.data()[..]);
                    streamed += 1;
                }
                Ok(None) => {}
                Err(e @ StoreError::Backend { .. }) if e.to_string().contains("deleted") => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!("{read} row reads and {streamed} streamed loads of {round} found the weight");
    });
}

/// Deterministically: the weight being read is deleted between locating its chunks and reading
/// them, another weight takes its space and it is stored again elsewhere. The read sees the
/// space epoch move and reads again, and gives the right data.
#[test]
fn a_read_whose_chunks_moved_is_done_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir, "s.h5", small_chunks()));
    // Random bits: incompressible, every chunk the same stored size, so the intruder's chunks
    // fit the freed space exactly.
    let w = sample_tensor("moved", DType::F32, &[1000, 10], 7);
    let key = store.store(&w).unwrap();
    let intruder = sample_tensor("intruder", DType::F32, &[1000, 10], 8);
    for what in ["load_rows", "load_byte_range", "load_into"] {
        let fired = Arc::new(AtomicBool::new(false));
        let (weak, f, w2, i2) = (
            Arc::downgrade(&store),
            fired.clone(),
            w.clone(),
            intruder.clone(),
        );
        store.set_after_locate_for_testing(Some(Box::new(move || {
            let Some(store) = weak.upgrade() else { return };
            if f.swap(true, Ordering::SeqCst) {
                return;
            }
            store.delete(&key).unwrap();
            let ik = store.store(&i2).unwrap();
            store.store(&w2).unwrap();
            store.delete(&ik).unwrap();
        })));
        store.take_read_stats_for_testing();
        match what {
            "load_rows" => {
                let got = rows(&store, &key, 100..900);
                assert!(got.data()[..] == w.data()[100 * 40..900 * 40], "{what}");
            }
            "load_byte_range" => {
                let got = store.load_byte_range(&key, 5..39_000).unwrap().unwrap();
                assert!(got[..] == w.data()[5..39_000], "{what}");
            }
            _ => {
                let mut sink = Vec::new();
                let (_, h) = store.load_into(&key, &mut sink).unwrap().unwrap();
                assert_eq!(h, key, "{what}");
                assert!(sink[..] == w.data()[..], "{what}");
            }
        }
        assert!(fired.load(Ordering::SeqCst), "{what}: the hook ran");
        let stats = store.take_read_stats_for_testing();
        assert!(stats.retries >= 1, "{what}: {stats:?}");
        store.set_after_locate_for_testing(None);
    }
}

/// One store for every proptest case, each case storing its own tensor.
fn shared() -> &'static HDF5Store {
    static STORE: OnceLock<(tempfile::TempDir, HDF5Store)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir, "props.h5", small_chunks());
            (dir, store)
        })
        .1
}

fn case() -> impl Strategy<Value = (DType, Vec<usize>, u64, [u64; 4])> {
    let dtype = prop::sample::select(vec![
        DType::U8,
        DType::Bool,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::F32,
        DType::F64,
    ]);
    let shape = prop_oneof![
        (1usize..5000).prop_map(|n| vec![n]),
        (1usize..400, 1usize..40).prop_map(|(a, b)| vec![a, b]),
        (1usize..200, 1usize..9, 1usize..9).prop_map(|(a, b, c)| vec![a, b, c]),
    ];
    (dtype, shape, any::<u64>(), any::<[u64; 4]>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random rows and bytes (empty ranges included) of random tensors equal the same part of a
    /// full load; ranges past the end are errors.
    #[test]
    fn random_ranges_equal_slices_of_the_full_load((dtype, shape, seed, picks) in case()) {
        let store = shared();
        let w = sample_tensor("p", dtype, &shape, seed);
        let key = store.store(&w).unwrap();
        let full = store.load(&key).unwrap().unwrap();
        prop_assert!(full.data()[..] == w.data()[..]);
        let n = shape[0] as u64;
        let nb = w.nbytes() as u64;
        let row = nb / n;
        let pick = |x: u64, m: u64| if x % 5 == 0 { m } else { x % (m + 1) };
        let a = pick(picks[0], n);
        let b = if picks[1] % 7 == 0 { a } else { pick(picks[1], n) };
        let (a, b) = (a.min(b) as usize, a.max(b) as usize);
        let got = store.load_rows(&key, a..b).unwrap().unwrap();
        prop_assert_eq!(got.shape()[0], b - a);
        prop_assert_eq!(&got.shape()[1..], &shape[1..]);
        prop_assert!(got.data()[..] == full.data()[a * row as usize..b * row as usize]);
        let x = pick(picks[2], nb);
        let y = if picks[3] % 7 == 0 { x } else { pick(picks[3], nb) };
        let (x, y) = (x.min(y), x.max(y));
        let bytes = store.load_byte_range(&key, x..y).unwrap().unwrap();
        prop_assert!(bytes[..] == full.data()[x as usize..y as usize]);
        let past = matches!(
            store.load_rows(&key, a..shape[0] + 1),
            Err(StoreError::InvalidRange { .. })
        );
        prop_assert!(past);
        let past = matches!(
            store.load_byte_range(&key, x..nb + 1 + (picks[3] % 100)),
            Err(StoreError::InvalidRange { .. })
        );
        prop_assert!(past);
        let mut sink = Vec::new();
        let (_, h) = store.load_into(&key, &mut sink).unwrap().unwrap();
        prop_assert_eq!(h, key);
        prop_assert!(sink[..] == full.data()[..]);
    }
}

/// A weight of 12,000 chunks (a chunk index many levels deep, with Coral's narrow index
/// nodes) stores, loads whole and in rows, and survives the store being opened again.
#[test]
fn a_weight_of_many_chunks_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let w = sample_tensor("many", DType::F32, &[12_000, 1024], 77);
    let key = {
        let store = open(&dir, "many.h5", small_chunks());
        store.store(&w).unwrap()
    };
    let store = open(&dir, "many.h5", small_chunks());
    let back = store.load(&key).unwrap().unwrap();
    assert!(back.data() == w.data(), "whole load differs");
    let rows = store.load_rows(&key, 5_999..6_003).unwrap().unwrap();
    assert!(
        rows.data() == &w.data()[5_999 * 4096..6_003 * 4096],
        "rows differ"
    );
}

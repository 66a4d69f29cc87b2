//! Loads read chunks outside HDF5's lock; a delete in another thread frees file space that new
//! writes reuse. A load that overlaps such a delete must still return either nothing or the
//! exact weight, never an error or other bytes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use coral_core::{DType, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::WeightStore;

fn tensor(name: &str, seed: u32) -> WeightTensor {
    let data: Vec<u8> = (0..256 * 1024u32)
        .flat_map(|i| {
            let x = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (((x >> 8) as f32 / 16_777_216.0 - 0.5) * 0.1).to_le_bytes()
        })
        .collect();
    WeightTensor::from_bytes(name, vec![512, 512], DType::F32, data).unwrap()
}

#[test]
fn loads_racing_deletes_and_rewrites_never_return_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = HDF5StoreOptions::new()
        .compression(Compression::Zstd)
        .level(1)
        .chunk_bytes(16 * 1024)
        .mode(Mode::Truncate);
    let store = HDF5Store::open(dir.path().join("s.h5"), opts).unwrap();
    let kept = tensor("kept", 1);
    let key = store.store(&kept).unwrap();
    let stop = AtomicBool::new(false);
    let (loaded, absent) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match store.load_batch(&[key]).unwrap().remove(&key) {
                        Some(w) => {
                            assert_eq!(w.data(), kept.data(), "a load returned other bytes");
                            loaded.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {
                            absent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::yield_now();
                }
            });
        }
        // Delete the weight, fill the freed space with others, store it again; repeat.
        for round in 0..30u32 {
            assert!(store.delete(&key).unwrap());
            let others: Vec<(String, WeightTensor)> = (0..3)
                .map(|j| {
                    let n = format!("other-{round}-{j}");
                    (n.clone(), tensor(&n, 1000 + round * 3 + j))
                })
                .collect();
            let keys = store.store_batch(&others).unwrap();
            assert_eq!(store.store(&kept).unwrap(), key);
            // Let loads start on it, so the next delete lands in the middle of some; now and
            // then long enough for whole loads.
            let ms = if round % 5 == 0 {
                60
            } else {
                5 + u64::from(round % 7)
            };
            std::thread::sleep(std::time::Duration::from_millis(ms));
            for k in keys.values() {
                assert!(store.delete(k).unwrap());
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(loaded.load(Ordering::Relaxed) > 0);
    eprintln!(
        "loads: {} found, {} absent",
        loaded.load(Ordering::Relaxed),
        absent.load(Ordering::Relaxed)
    );
}

/// A store used from inside rayon's own pool (as an application that parallelises with rayon
/// would): every worker blocked in a call on the store must not starve the compression that call
/// waits for.
#[test]
fn stores_and_loads_from_rayon_workers_finish() {
    use rayon::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let opts = HDF5StoreOptions::new()
            .compression(Compression::Zstd)
            .chunk_bytes(16 * 1024)
            .mode(Mode::Truncate);
        let store = HDF5Store::open(&path, opts).unwrap();
        let n = 4 * rayon::current_num_threads();
        let keys: Vec<_> = (0..n as u32)
            .into_par_iter()
            .map(|i| store.store(&tensor(&format!("t{i}"), i)).unwrap())
            .collect();
        let found = keys
            .par_iter()
            .filter(|k| store.load(k).unwrap().is_some())
            .count();
        let _ = tx.send(found == n);
    });
    let ok = rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("stores from rayon workers did not finish (deadlock)");
    assert!(ok);
}

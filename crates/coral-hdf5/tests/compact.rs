//! `HDF5Store::compact`: a store with weights, deltas and manifests, some deleted, compacts to a
//! file within 1.03× of a new store with the same contents, with every remaining object loading
//! verified and equal; chunks are copied as stored; leftovers are left behind and reported;
//! the empty store and a read-only store.

use std::collections::BTreeMap;
use std::path::Path;

use coral_core::{ContentHash, DType, ModelManifest, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testing::deltas::{lossless_delta, tuned_pair};
use coral_store_api::testing::manifests::sample_manifest;
use coral_store_api::{DeltaStore, ManifestStore, StoreError, WeightStore};

/// Normally distributed float32 values (mean 0, sd 0.02) from a fixed seed: weight-like data.
fn normal(name: &str, shape: &[usize], seed: u64) -> WeightTensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * 0.02) as f32
        })
        .collect();
    WeightTensor::from_vec(name, shape.to_vec(), values).unwrap()
}

fn options() -> HDF5StoreOptions {
    HDF5StoreOptions::new()
        .compression(Compression::Zstd)
        .chunk_bytes(64 << 10)
}

/// What a store should hold.
#[derive(Default)]
struct Contents {
    weights: BTreeMap<ContentHash, WeightTensor>,
    /// Delta key: (the delta as stored, the weight it rebuilds).
    deltas: BTreeMap<ContentHash, (coral_core::Delta, WeightTensor)>,
    manifests: Vec<ModelManifest>,
}

/// Fills `store` with weights (several shapes and dtypes, a scalar, an empty tensor), deltas
/// and manifests, then deletes some of each and replaces a manifest. Returns what remains.
fn populate(store: &HDF5Store) -> Contents {
    let mut c = Contents::default();
    let mut batch = Vec::new();
    for i in 0..24usize {
        let rows = 16 + (i * 37) % 200;
        batch.push(normal(&format!("layer.{i}.weight"), &[rows, 96], i as u64));
    }
    batch.push(normal("scalar", &[], 99));
    batch.push(normal("empty", &[0, 8], 98));
    let bf: Vec<u8> = normal("bf", &[64, 64], 97)
        .data()
        .chunks_exact(4)
        .flat_map(|b| [b[2], b[3]])
        .collect();
    batch.push(WeightTensor::from_bytes("bf", vec![64, 64], DType::BF16, bf).unwrap());
    let named: Vec<(String, WeightTensor)> = batch
        .iter()
        .map(|w| (w.name().to_owned(), w.clone()))
        .collect();
    let keys = store.store_batch(&named).unwrap();
    for w in &batch {
        c.weights.insert(keys[w.name()], w.clone());
    }
    for s in 0..3u64 {
        let (reference, tuned) = tuned_pair(&format!("emb{s}"), s);
        let rk = store.store(&reference).unwrap();
        c.weights.insert(rk, reference.clone());
        let delta = lossless_delta(&tuned, &reference, rk);
        let dk = tuned.compute_hash();
        store.store_delta(&delta, &dk).unwrap();
        c.deltas.insert(dk, (delta, tuned));
    }
    for (name, n) in [("model-a", 5), ("model-b", 3), ("model-c", 4)] {
        let m = sample_manifest(store, name, n);
        for t in &m.tensors {
            c.weights
                .insert(t.key, store.load(&t.key).unwrap().unwrap());
        }
        store.put_manifest(&m).unwrap();
        c.manifests.push(m);
    }
    // Deletes: every third weight of the batch, one delta (and then its reference), a manifest.
    for w in batch.iter().step_by(3) {
        let k = keys[w.name()];
        assert!(store.delete(&k).unwrap());
        c.weights.remove(&k);
    }
    let (&dk, (delta, _)) = c.deltas.iter().next().unwrap();
    let rk = delta.reference_hash;
    assert!(store.delete_delta(&dk).unwrap());
    c.deltas.remove(&dk);
    assert!(store.delete(&rk).unwrap());
    c.weights.remove(&rk);
    let gone = c.manifests.remove(1);
    assert!(store.delete_manifest(&gone.name).unwrap());
    // A replaced manifest leaves the old one's space behind.
    let mut m = c.manifests.remove(0);
    m.created_unix += 1;
    store.put_manifest(&m).unwrap();
    c.manifests.push(m);
    c
}

/// Writes `c` into a new store at `path`, in the order a user would.
fn write_fresh(path: &Path, c: &Contents) {
    let store = HDF5Store::open(path, options()).unwrap();
    let named: Vec<(String, WeightTensor)> = c
        .weights
        .values()
        .map(|w| (w.name().to_owned(), w.clone()))
        .collect();
    store.store_batch(&named).unwrap();
    for (dk, (delta, _)) in &c.deltas {
        store.store_delta(delta, dk).unwrap();
    }
    for m in &c.manifests {
        store.put_manifest(m).unwrap();
    }
}

/// Every object of `c` is in `store`, loads verified (strict integrity) and equals the original;
/// nothing else is listed.
fn check(store: &HDF5Store, c: &Contents, what: &str) {
    let mut want: Vec<ContentHash> = c.weights.keys().chain(c.deltas.keys()).copied().collect();
    want.sort();
    want.dedup();
    assert_eq!(store.list_weights().unwrap(), want, "{what}: list_weights");
    let loaded = store.load_batch(&want).unwrap();
    for (k, w) in &c.weights {
        let back = &loaded[k];
        assert_eq!(back.data(), w.data(), "{what}: {}", w.name());
        assert_eq!(back.metadata().name, w.name(), "{what}");
        assert_eq!(back.shape(), w.shape(), "{what}");
        assert_eq!(back.dtype(), w.dtype(), "{what}");
    }
    for (dk, (delta, tuned)) in &c.deltas {
        let d = store.load_delta(dk).unwrap().unwrap();
        assert_eq!(d.data, delta.data, "{what}: delta {dk}");
        assert_eq!(d.reference_hash, delta.reference_hash, "{what}");
        assert_eq!(d.delta_type, delta.delta_type, "{what}");
        assert_eq!(d.metadata, delta.metadata, "{what}");
        assert_eq!(loaded[dk].data(), tuned.data(), "{what}: rebuilt {dk}");
        assert_eq!(
            loaded[dk].metadata().layer_type,
            tuned.metadata().layer_type,
            "{what}"
        );
    }
    let mut names: Vec<_> = c.manifests.iter().map(|m| m.name.clone()).collect();
    names.sort();
    assert_eq!(store.list_manifests().unwrap(), names, "{what}: manifests");
    for m in &c.manifests {
        assert_eq!(
            store.get_manifest(&m.name).unwrap().as_ref(),
            Some(m),
            "{what}"
        );
    }
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn compact_keeps_every_object_and_shrinks_to_a_new_stores_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    let store = HDF5Store::open(&path, options()).unwrap();
    let c = populate(&store);
    check(&store, &c, "before");
    let stored_before = store.storage_info().unwrap().compressed_bytes;
    let before = size(&path);
    let r = store.compact().unwrap();
    assert_eq!(r.path, path);
    // The commit a compaction starts with may write HDF5's free-space records again, a few
    // hundred bytes (HDF5 2.x does; 1.10.8 does not).
    assert!(
        (before..before + 4096).contains(&r.bytes_before),
        "{before}: {r:?}"
    );
    assert_eq!(r.bytes_after, size(&path));
    assert!(r.bytes_after < before, "{r:?}");
    assert_eq!(r.reclaimed(), r.bytes_before - r.bytes_after);
    assert_eq!(r.weights, c.weights.len(), "{r:?}");
    assert_eq!(r.deltas, c.deltas.len(), "{r:?}");
    assert_eq!(r.manifests, c.manifests.len(), "{r:?}");
    assert_eq!(r.metadata, 0);
    assert_eq!(r.objects(), r.weights + r.deltas + r.manifests);
    assert!(r.skipped.is_empty(), "{r:?}");
    assert!(!dir.path().join("c.h5.compact-tmp").exists());
    assert!(!dir.path().join("c.h5.journal").exists());
    // Compacting a compacted store changes nothing: the output is deterministic.
    let bytes = std::fs::read(&path).unwrap();
    let r2 = store.compact().unwrap();
    assert_eq!(
        (r2.bytes_before, r2.bytes_after),
        (r.bytes_after, r.bytes_after)
    );
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "a second compaction changed the file"
    );
    // The same store keeps working on the new file, reads and writes.
    check(&store, &c, "after, same store");
    // Chunks were copied as stored: the same compressed bytes (a decode and re-encode through
    // HDF5's filters would give other zstd frames).
    assert_eq!(
        store.storage_info().unwrap().compressed_bytes,
        stored_before
    );
    let extra = normal("extra", &[32, 32], 1234);
    let ek = store.store(&extra).unwrap();
    assert_eq!(store.load(&ek).unwrap().unwrap().data(), extra.data());
    assert!(store.delete(&ek).unwrap());
    drop(store);
    let store = HDF5Store::open(&path, options().mode(Mode::Read)).unwrap();
    check(&store, &c, "after, reopened");
    drop(store);
    // Within 1.03× of a new store written with the same contents.
    let fresh = dir.path().join("fresh.h5");
    write_fresh(&fresh, &c);
    let (compacted, new) = (size(&path), size(&fresh));
    eprintln!(
        "compacted {compacted} B, a new store with the same contents {new} B, before {before} B"
    );
    assert!(
        compacted as f64 <= new as f64 * 1.03,
        "compacted {compacted} B, new store {new} B"
    );
}

#[test]
fn compact_of_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.h5");
    let store = HDF5Store::open(&path, options()).unwrap();
    let r = store.compact().unwrap();
    assert_eq!(r.objects(), 0);
    assert!(r.skipped.is_empty());
    assert!(store.list_weights().unwrap().is_empty());
    assert!(store.list_manifests().unwrap().is_empty());
    drop(store);
    let fresh = dir.path().join("fresh.h5");
    drop(HDF5Store::open(&fresh, options()).unwrap());
    assert!(size(&path) as f64 <= size(&fresh) as f64 * 1.03);
    let store = HDF5Store::open(&path, options().mode(Mode::Read)).unwrap();
    assert!(store.list_weights().unwrap().is_empty());
}

#[test]
fn compact_of_a_read_only_store_is_refused_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.h5");
    let w = normal("w", &[8, 8], 1);
    let k = {
        let store = HDF5Store::open(&path, options()).unwrap();
        store.store(&w).unwrap()
    };
    let bytes = std::fs::read(&path).unwrap();
    let store = HDF5Store::open(&path, options().mode(Mode::Read)).unwrap();
    let e = store.compact().unwrap_err();
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("r.h5"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(!dir.path().join("r.h5.compact-tmp").exists());
    assert_eq!(store.load(&k).unwrap().unwrap().data(), w.data());
}

#[test]
fn compact_of_a_closed_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = HDF5Store::open(dir.path().join("x.h5"), options()).unwrap();
    store.close().unwrap();
    let e = store.compact().unwrap_err();
    assert!(matches!(e, StoreError::Closed { .. }), "{e}");
}

/// Links that are not committed objects are left behind and reported; `metadata/` entries come
/// along with their attributes.
#[test]
fn compact_leaves_leftovers_behind_and_keeps_metadata_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.h5");
    let w = normal("w", &[16, 16], 2);
    let k = {
        let store = HDF5Store::open(&path, options()).unwrap();
        store.store(&w).unwrap()
    };
    let fake_key = "ab".repeat(32);
    {
        let f = hdf5::File::open_rw(&path).unwrap();
        let d = f
            .new_dataset::<u8>()
            .shape([4])
            .create("weights/not-a-key")
            .unwrap();
        d.write(&[1u8, 2, 3, 4]).unwrap();
        // A key without its `hash` attribute: an interrupted write.
        f.new_dataset::<u8>()
            .shape([4])
            .create(format!("weights/{fake_key}").as_str())
            .unwrap();
        f.new_dataset::<u8>()
            .shape([4])
            .create("models/m.tmp")
            .unwrap();
        let m = f
            .new_dataset::<f64>()
            .shape([3])
            .create("metadata/info")
            .unwrap();
        m.write(&[1.0, 2.0, 3.0]).unwrap();
        m.new_attr::<i64>()
            .create("version")
            .unwrap()
            .write_scalar(&7i64)
            .unwrap();
    }
    let store = HDF5Store::open(&path, options()).unwrap();
    let r = store.compact().unwrap();
    assert_eq!((r.weights, r.metadata), (1, 1), "{r:?}");
    let mut skipped = r.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        vec![
            "models/m.tmp: leftover of a manifest write".to_owned(),
            format!("weights/{fake_key}: not committed (an interrupted write)"),
            "weights/not-a-key: not a key".to_owned(),
        ],
        "{r:?}"
    );
    assert_eq!(store.list_weights().unwrap(), vec![k]);
    assert_eq!(store.load(&k).unwrap().unwrap().data(), w.data());
    drop(store);
    let f = hdf5::File::open(&path).unwrap();
    assert!(!f.link_exists("weights/not-a-key"));
    let g = f.group("weights").unwrap();
    assert_eq!(g.member_names().unwrap(), vec![k.to_hex()]);
    let m = f.dataset("metadata/info").unwrap();
    assert_eq!(m.read_raw::<f64>().unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(m.attr("version").unwrap().read_scalar::<i64>().unwrap(), 7);
    assert!(f
        .group("models")
        .unwrap()
        .member_names()
        .unwrap()
        .is_empty());
}

/// A `.compact-tmp` left by a killed compaction is removed on the next open for writing (and
/// left alone by readers).
#[test]
fn a_stale_compact_tmp_is_removed_on_open_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    drop(HDF5Store::open(&path, options()).unwrap());
    let tmp = dir.path().join("s.h5.compact-tmp");
    std::fs::write(&tmp, b"half a store").unwrap();
    drop(HDF5Store::open(&path, options().mode(Mode::Read)).unwrap());
    assert!(tmp.exists());
    drop(HDF5Store::open(&path, options()).unwrap());
    assert!(!tmp.exists());
    std::fs::write(&tmp, b"half a store").unwrap();
    let store = HDF5Store::open(&path, options().mode(Mode::Read)).unwrap();
    drop(store);
    let store = HDF5Store::open(&path, options().mode(Mode::ReadWrite)).unwrap();
    assert!(!tmp.exists());
    std::fs::write(&tmp, b"half a store").unwrap();
    store.compact().unwrap();
    assert!(!tmp.exists());
}

/// A store whose path was renamed over (its file is a dead inode) refuses to compact, and
/// leaves a `.compact-tmp` alone: it may belong to a compaction of the file now at the path.
#[test]
fn compact_refuses_when_the_path_names_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.h5");
    let other = dir.path().join("other.h5");
    let w = normal("w", &[8, 8], 3);
    let store = HDF5Store::open(&path, options()).unwrap();
    let k = store.store(&w).unwrap();
    drop(HDF5Store::open(&other, options()).unwrap());
    std::fs::rename(&other, &path).unwrap();
    let tmp = dir.path().join("p.h5.compact-tmp");
    std::fs::write(&tmp, b"someone else's").unwrap();
    let e = store.compact().unwrap_err();
    assert!(e.to_string().contains("no longer names"), "{e}");
    assert!(e.to_string().contains("p.h5"), "{e}");
    assert_eq!(std::fs::read(&tmp).unwrap(), b"someone else's");
    // The store still works on the file it has.
    assert_eq!(store.load(&k).unwrap().unwrap().data(), w.data());
}

/// Loads in other threads while the store compacts again and again: every load returns the
/// right data, nothing deadlocks. (A load spanning several read groups across a compaction
/// starts again, as after a delete, through `space_epoch`; this test rarely hits that window.)
#[test]
fn loads_racing_compactions_stay_correct() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.h5");
    let store = HDF5Store::open(&path, options()).unwrap();
    let weights: Vec<WeightTensor> = (0..24u64)
        .map(|i| normal(&format!("w{i}"), &[64 + i as usize * 8, 64], 500 + i))
        .collect();
    let named: Vec<(String, WeightTensor)> = weights
        .iter()
        .map(|w| (w.name().to_owned(), w.clone()))
        .collect();
    let keys = store.store_batch(&named).unwrap();
    // Garbage before every compaction, so each one moves the chunks.
    let keep: Vec<ContentHash> = weights.iter().map(|w| keys[w.name()]).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2 {
            let (store, keep, weights, stop) = (&store, &keep, &weights, &stop);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n == 0 {
                    let got = store.load_batch(keep).unwrap();
                    for (k, w) in keep.iter().zip(weights) {
                        assert_eq!(got[k].data(), w.data(), "thread {t}, load {n}");
                    }
                    n += 1;
                }
            });
        }
        for i in 0..12u64 {
            let g = normal(&format!("garbage{i}"), &[200, 64], 900 + i);
            let gk = store.store(&g).unwrap();
            assert!(store.delete(&gk).unwrap());
            let r = store.compact().unwrap();
            assert_eq!(r.weights, keep.len());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(store.list_weights().unwrap().len(), keep.len());
}

//! The weight section: the [`WeightStore`] contract.

use std::collections::{BTreeMap, BTreeSet};

use coral_core::{ContentHash, DType, HashAlgorithm, JsonMap, WeightTensor};
use serde_json::json;

use super::{assert_same_tensor, sample_tensor, special_float_tensors, Check, Harness, Rng};
use crate::error::StoreError;
use crate::info::StorageInfo;
use crate::traits::WeightStore;

/// Every check of the section, by name.
pub fn checks<H: Harness>() -> Vec<Check<H>> {
    vec![
        (
            "weights::round_trip_every_dtype",
            round_trip_every_dtype::<H>,
        ),
        (
            "weights::special_floats_bit_exact",
            special_floats_bit_exact::<H>,
        ),
        ("weights::large_tensors", large_tensors::<H>),
        ("weights::metadata_preserved", metadata_preserved::<H>),
        (
            "weights::store_existing_is_noop",
            store_existing_is_noop::<H>,
        ),
        ("weights::store_with_key", store_with_key::<H>),
        ("weights::legacy_xxh3_keys", legacy_xxh3_keys::<H>),
        ("weights::missing_keys", missing_keys::<H>),
        ("weights::delete", delete::<H>),
        ("weights::list_sorted", list_sorted::<H>),
        ("weights::metadata_without_data", metadata_without_data::<H>),
        ("weights::batches", batches::<H>),
        ("weights::hashed_weights", hashed_weights::<H>),
        ("weights::unhashed_batches", unhashed_batches::<H>),
        ("weights::deferred_commits", deferred_commits::<H>),
        ("weights::integrity_strict", integrity_strict::<H>),
        ("weights::integrity_lenient", integrity_lenient::<H>),
        ("weights::concurrent_use", concurrent_use::<H>),
        ("weights::storage_info", storage_info::<H>),
        ("weights::closed_store", closed_store::<H>),
        (
            "weights::slices_agree_with_load",
            slices_agree_with_load::<H>,
        ),
        ("weights::slices_out_of_range", slices_out_of_range::<H>),
        ("weights::load_into_verifies", load_into_verifies::<H>),
        ("weights::persistence", persistence::<H>),
    ]
}

/// Shapes every dtype is stored with: 0-d, empty (a zero dimension), 1-d, 2-d, 3-d.
pub const SHAPES: &[&[usize]] = &[&[], &[0], &[3, 0, 2], &[1], &[7], &[3, 5], &[2, 3, 4]];

/// Stores `w`, checks the key is its SHA-256 hash and that it loads back bit for bit with its
/// key in the metadata; returns the key.
pub fn store_and_check<S: WeightStore + ?Sized>(store: &S, w: &WeightTensor) -> ContentHash {
    let what = format!("{} {} {:?}", w.name(), w.dtype(), w.shape());
    let key = store
        .store(w)
        .unwrap_or_else(|e| panic!("{what}: store: {e}"));
    assert_eq!(key, w.compute_hash(), "{what}: key is not the SHA-256 hash");
    assert!(store.exists(&key).unwrap(), "{what}: exists after store");
    let back = store
        .load(&key)
        .unwrap_or_else(|e| panic!("{what}: load: {e}"))
        .unwrap_or_else(|| panic!("{what}: load gave None after store"));
    assert_same_tensor(&back, w, &what);
    assert_eq!(back.metadata().hash, Some(key), "{what}: loaded hash");
    key
}

/// Every dtype in every shape of [`SHAPES`] round-trips bit for bit.
pub fn round_trip_every_dtype<H: Harness>(h: &H) {
    let store = h.open(true);
    let mut keys = BTreeSet::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for (j, shape) in SHAPES.iter().enumerate() {
            let name = format!("t.{dtype}.{j}");
            let w = sample_tensor(&name, dtype, shape, (i * 100 + j) as u64);
            keys.insert(store_and_check(&store, &w));
        }
    }
    assert_eq!(
        store.list_weights().unwrap(),
        keys.into_iter().collect::<Vec<_>>()
    );
}

/// NaN payloads, -0.0, infinities and subnormals come back bit for bit.
pub fn special_floats_bit_exact<H: Harness>(h: &H) {
    let store = h.open(true);
    for w in special_float_tensors() {
        store_and_check(&store, &w);
    }
}

/// Tensors of several MiB (larger than any sensible chunk) round-trip, including shapes that are
/// not multiples of anything.
pub fn large_tensors<H: Harness>(h: &H) {
    let store = h.open(true);
    // Random f32 bits: incompressible.
    store_and_check(
        &store,
        &sample_tensor("large.random.f32", DType::F32, &[1531, 1027], 7),
    );
    // Weight-like bf16 values: compressible.
    let mut rng = Rng::new(11);
    let n = (3 << 20) / 2 + 3;
    let bytes: Vec<u8> = (0..n)
        .flat_map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            // bfloat16 is the top half of an f32 (truncated here; any bits will do).
            let bits = (((u - 0.5) * 0.1) as f32).to_bits() >> 16;
            (bits as u16).to_le_bytes()
        })
        .collect();
    let w = WeightTensor::from_bytes("large.bf16", vec![n], DType::BF16, bytes).unwrap();
    store_and_check(&store, &w);
    // Zeros: highly compressible, still exact.
    let z = WeightTensor::from_bytes(
        "large.zeros.f64",
        vec![512, 1024],
        DType::F64,
        vec![0u8; 4 << 20],
    )
    .unwrap();
    store_and_check(&store, &z);
}

fn rich_metadata(w: WeightTensor) -> WeightTensor {
    let mut meta = w.metadata().clone();
    meta.layer_type = Some("Linear".to_owned());
    meta.model_name = Some("bert-tiny/ünïcode model".to_owned());
    let mut info = JsonMap::new();
    info.insert("quantized".to_owned(), json!(false));
    info.insert("scale".to_owned(), json!(0.125));
    info.insert(
        "note".to_owned(),
        json!("a \"quoted\" note\nwith a newline"),
    );
    info.insert(
        "nested".to_owned(),
        json!({"levels": [1, 2, 3], "none": null}),
    );
    meta.compression_info = info;
    w.with_metadata(meta).unwrap()
}

fn assert_metadata_kept(
    got: &coral_core::WeightMetadata,
    want: &coral_core::WeightMetadata,
    what: &str,
) {
    assert_eq!(got.name, want.name, "{what}: name");
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert_eq!(got.dtype, want.dtype, "{what}: dtype");
    assert_eq!(got.layer_type, want.layer_type, "{what}: layer_type");
    assert_eq!(got.model_name, want.model_name, "{what}: model_name");
    for (k, v) in &want.compression_info {
        assert_eq!(
            got.compression_info.get(k),
            Some(v),
            "{what}: compression_info[{k:?}] (a backend may add entries, never lose or change one)"
        );
    }
}

/// Name, layer type, model name and compression info survive `load` and `get_metadata`; a
/// weight without them comes back without them.
pub fn metadata_preserved<H: Harness>(h: &H) {
    let store = h.open(true);
    let w = rich_metadata(sample_tensor(
        "encoder.layer.0.attention.self.query.weight",
        DType::F32,
        &[4, 6],
        1,
    ));
    let key = store_and_check(&store, &w);
    let back = store.load(&key).unwrap().unwrap();
    assert_metadata_kept(back.metadata(), w.metadata(), "load");
    let meta = store.get_metadata(&key).unwrap().unwrap();
    assert_metadata_kept(&meta, w.metadata(), "get_metadata");
    assert_eq!(meta.hash, Some(key), "get_metadata: hash");

    let plain = sample_tensor("plain", DType::I32, &[5], 2);
    let key = store_and_check(&store, &plain);
    let meta = store.get_metadata(&key).unwrap().unwrap();
    assert_eq!(meta.layer_type, None, "plain: layer_type");
    assert_eq!(meta.model_name, None, "plain: model_name");
}

/// Storing a weight whose key exists is a no-op returning the same key: the first metadata stays,
/// nothing is added.
pub fn store_existing_is_noop<H: Harness>(h: &H) {
    let store = h.open(true);
    let w = sample_tensor("first", DType::F32, &[8, 8], 3);
    let key = store_and_check(&store, &w);
    let info = store.storage_info().unwrap();
    assert_eq!(store.store(&w).unwrap(), key, "second store");
    let renamed = rich_metadata(w.clone());
    let mut renamed = renamed;
    renamed.set_name("second");
    assert_eq!(store.store(&renamed).unwrap(), key, "same data, other name");
    assert_eq!(
        store.store_with_key(&renamed, &key).unwrap(),
        key,
        "store_with_key"
    );
    assert_eq!(store.list_weights().unwrap(), vec![key]);
    assert_eq!(
        store.get_metadata(&key).unwrap().unwrap().name,
        "first",
        "the first metadata stays"
    );
    let after = store.storage_info().unwrap();
    assert_eq!(after.total_weights, info.total_weights, "total_weights");
    assert_eq!(after.total_bytes, info.total_bytes, "total_bytes");
}

/// `store_with_key` accepts the right key and refuses a wrong one with `KeyMismatch`, storing
/// nothing.
pub fn store_with_key<H: Harness>(h: &H) {
    let store = h.open(true);
    let w = sample_tensor("w", DType::F16, &[3, 3], 4);
    let other = sample_tensor("other", DType::F16, &[3, 3], 5);
    let wrong = other.compute_hash();
    match store.store_with_key(&w, &wrong) {
        Err(StoreError::KeyMismatch { name, key, actual }) => {
            assert_eq!(name, "w");
            assert_eq!(key, wrong);
            assert_eq!(actual, w.compute_hash());
        }
        other => panic!("wrong key: expected KeyMismatch, got {other:?}"),
    }
    // Same data under another dtype or shape hashes differently: also a mismatch.
    let reshaped = WeightTensor::from_bytes("w", vec![9], DType::F16, w.data().clone()).unwrap();
    assert!(matches!(
        store.store_with_key(&reshaped, &w.compute_hash()),
        Err(StoreError::KeyMismatch { .. })
    ));
    let wrong_legacy = other.compute_hash_with(HashAlgorithm::Xxh3Legacy);
    assert!(matches!(
        store.store_with_key(&w, &wrong_legacy),
        Err(StoreError::KeyMismatch { .. })
    ));
    assert!(
        !store.exists(&wrong).unwrap(),
        "nothing stored under the wrong key"
    );
    assert!(!store.exists(&wrong_legacy).unwrap());
    assert!(store.list_weights().unwrap().is_empty(), "nothing stored");
    assert_eq!(store.storage_info().unwrap().total_weights, 0);

    let key = w.compute_hash();
    assert_eq!(store.store_with_key(&w, &key).unwrap(), key);
    let back = store.load(&key).unwrap().unwrap();
    assert_same_tensor(&back, &w, "store_with_key");
}

/// Keys of the Python Coral (xxh3-64) given to `store_with_key` load verified under that key.
pub fn legacy_xxh3_keys<H: Harness>(h: &H) {
    let store = h.open(true);
    let mut keys = Vec::new();
    for (i, dtype) in [DType::F32, DType::F64, DType::I64, DType::F16, DType::U8]
        .into_iter()
        .enumerate()
    {
        let w = sample_tensor(&format!("legacy.{dtype}"), dtype, &[2, 5], 20 + i as u64);
        let key = w.compute_hash_with(HashAlgorithm::Xxh3Legacy);
        assert_eq!(key.to_hex().len(), 16);
        assert_eq!(store.store_with_key(&w, &key).unwrap(), key);
        assert!(store.exists(&key).unwrap());
        let back = store.load(&key).unwrap().unwrap();
        assert_same_tensor(&back, &w, "legacy key");
        assert_eq!(back.metadata().hash, Some(key));
        assert_eq!(store.get_metadata(&key).unwrap().unwrap().hash, Some(key));
        keys.push(key);
    }
    // The same data may be kept under its SHA-256 key too.
    let w = sample_tensor("legacy.f32", DType::F32, &[2, 5], 20);
    let sha = store_and_check(&store, &w);
    keys.push(sha);
    keys.sort();
    assert_eq!(store.list_weights().unwrap(), keys);
    let loaded = store.load_batch(&keys).unwrap();
    assert_eq!(loaded.len(), keys.len());
}

fn absent_keys() -> Vec<ContentHash> {
    vec![
        ContentHash::parse(&"0".repeat(64)).unwrap(),
        ContentHash::parse(&"f".repeat(64)).unwrap(),
        ContentHash::parse("0123456789abcdef").unwrap(),
        sample_tensor("absent", DType::F32, &[2], 99).compute_hash(),
    ]
}

/// Absent keys give `None` / `false` / nothing, never an error, in an empty store and in one
/// that holds other weights.
pub fn missing_keys<H: Harness>(h: &H) {
    let store = h.open(true);
    for round in 0..2 {
        for key in absent_keys() {
            assert!(
                store.load(&key).unwrap().is_none(),
                "round {round}: load {key}"
            );
            assert!(!store.exists(&key).unwrap(), "round {round}: exists {key}");
            assert!(
                store.get_metadata(&key).unwrap().is_none(),
                "round {round}: get_metadata {key}"
            );
            assert!(!store.delete(&key).unwrap(), "round {round}: delete {key}");
        }
        assert!(store.load_batch(&absent_keys()).unwrap().is_empty());
        store
            .store(&sample_tensor("present", DType::U16, &[4], 6))
            .unwrap();
    }
}

/// `delete` removes one weight and nothing else; deleting again is `false`; the weight can be
/// stored again.
pub fn delete<H: Harness>(h: &H) {
    let store = h.open(true);
    let a = sample_tensor("a", DType::F32, &[10], 30);
    let b = sample_tensor("b", DType::F32, &[10], 31);
    let ka = store_and_check(&store, &a);
    let kb = store_and_check(&store, &b);
    assert!(store.delete(&ka).unwrap(), "delete present");
    assert!(!store.exists(&ka).unwrap());
    assert!(store.load(&ka).unwrap().is_none());
    assert!(store.get_metadata(&ka).unwrap().is_none());
    assert_eq!(store.list_weights().unwrap(), vec![kb]);
    assert!(!store.delete(&ka).unwrap(), "delete again");
    assert_same_tensor(&store.load(&kb).unwrap().unwrap(), &b, "the other weight");
    assert_eq!(store.storage_info().unwrap().total_weights, 1);
    assert_eq!(store_and_check(&store, &a), ka, "store after delete");
    assert_eq!(store.list_weights().unwrap().len(), 2);
}

/// `list_weights` gives every key once, sorted.
pub fn list_sorted<H: Harness>(h: &H) {
    let store = h.open(true);
    assert!(store.list_weights().unwrap().is_empty());
    let mut want = BTreeSet::new();
    for i in 0..40u64 {
        let w = sample_tensor(&format!("w{i}"), DType::I8, &[3], 40 + i % 30);
        want.insert(store.store(&w).unwrap());
    }
    let got = store.list_weights().unwrap();
    assert_eq!(got, want.into_iter().collect::<Vec<_>>());
    assert_eq!(got.len(), 30);
}

/// `get_metadata` gives name, shape, dtype and hash without the data, also for 0-d and empty
/// tensors.
pub fn metadata_without_data<H: Harness>(h: &H) {
    let store = h.open(true);
    for (i, shape) in SHAPES.iter().enumerate() {
        let w = sample_tensor(&format!("m{i}"), DType::BF16, shape, 50 + i as u64);
        let key = store.store(&w).unwrap();
        let meta = store.get_metadata(&key).unwrap().unwrap();
        assert_eq!(meta.name, w.name());
        assert_eq!(meta.shape, w.shape());
        assert_eq!(meta.dtype, DType::BF16);
        assert_eq!(meta.hash, Some(key));
    }
}

/// `store_batch` returns name → key (a weight repeated under two names is stored once) and
/// `load_batch` returns exactly the present keys.
pub fn batches<H: Harness>(h: &H) {
    let store = h.open(true);
    assert!(store.store_batch(&[]).unwrap().is_empty());
    assert!(store.load_batch(&[]).unwrap().is_empty());
    let mut batch: Vec<(String, WeightTensor)> = (0..6u64)
        .map(|i| {
            let dtype = DType::ALL[(i as usize * 4) % DType::ALL.len()];
            let w = sample_tensor(&format!("batch.{i}"), dtype, &[4, 3], 60 + i);
            (format!("batch.{i}"), w)
        })
        .collect();
    let dup = batch[2].1.clone();
    batch.push(("batch.dup".to_owned(), dup.clone()));
    batch.push((
        "batch.empty".to_owned(),
        sample_tensor("batch.empty", DType::F32, &[0, 3], 0),
    ));
    let keys = store.store_batch(&batch).unwrap();
    assert_eq!(keys.len(), batch.len(), "one key per name");
    for (name, w) in &batch {
        assert_eq!(keys.get(name), Some(&w.compute_hash()), "key of {name}");
    }
    assert_eq!(keys["batch.dup"], keys["batch.2"]);
    let distinct: BTreeSet<ContentHash> = keys.values().copied().collect();
    assert_eq!(
        store.list_weights().unwrap(),
        distinct.iter().copied().collect::<Vec<_>>()
    );

    let mut ask: Vec<ContentHash> = distinct.iter().copied().collect();
    ask.extend(absent_keys());
    ask.push(keys["batch.0"]); // asked twice
    let loaded = store.load_batch(&ask).unwrap();
    assert_eq!(loaded.len(), distinct.len(), "absent keys are left out");
    for (name, w) in &batch {
        let got = &loaded[&keys[name]];
        assert_eq!(got.data()[..], w.data()[..], "load_batch data of {name}");
        assert_eq!(got.shape(), w.shape());
        assert_eq!(got.dtype(), w.dtype());
        assert_eq!(got.metadata().hash, Some(keys[name]));
    }
    // Storing the batch again is a no-op.
    assert_eq!(store.store_batch(&batch).unwrap(), keys);
    assert_eq!(store.list_weights().unwrap().len(), distinct.len());
}

fn corrupted<H: Harness>(
    h: &H,
    strict: bool,
    algorithm: HashAlgorithm,
) -> (H::Store, WeightTensor, ContentHash) {
    let store = h.open(strict);
    let w = sample_tensor("victim", DType::F32, &[16, 4], 70);
    let key = w.compute_hash_with(algorithm);
    store.store_with_key(&w, &key).unwrap();
    store
        .store(&sample_tensor("bystander", DType::F32, &[16, 4], 71))
        .unwrap();
    h.corrupt(&store, &key);
    (store, w, key)
}

/// A strict store refuses corrupt data with `Integrity` naming the weight, its key and the hash
/// of what was read; other weights stay readable.
pub fn integrity_strict<H: Harness>(h: &H) {
    for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
        let (store, _w, key) = corrupted(h, true, algorithm);
        match store.load(&key) {
            Err(StoreError::Integrity {
                name,
                expected,
                actual,
            }) => {
                assert_eq!(name, "victim", "{algorithm:?}: name");
                assert_eq!(expected, key, "{algorithm:?}: expected");
                assert_ne!(actual, key, "{algorithm:?}: actual");
                assert_eq!(
                    actual.algorithm(),
                    algorithm,
                    "{algorithm:?}: actual's algorithm"
                );
            }
            other => panic!("{algorithm:?}: expected Integrity, got {other:?}"),
        }
        assert!(
            matches!(store.load_batch(&[key]), Err(StoreError::Integrity { .. })),
            "{algorithm:?}: load_batch of a corrupt weight"
        );
        assert!(store.exists(&key).unwrap());
        let other = sample_tensor("bystander", DType::F32, &[16, 4], 71);
        assert_same_tensor(
            &store.load(&other.compute_hash()).unwrap().unwrap(),
            &other,
            "bystander",
        );
    }
}

/// A lenient store returns corrupt data (with a warning) instead of failing.
pub fn integrity_lenient<H: Harness>(h: &H) {
    for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
        let (store, w, key) = corrupted(h, false, algorithm);
        let back = store
            .load(&key)
            .unwrap_or_else(|e| panic!("{algorithm:?}: lenient load failed: {e}"))
            .unwrap_or_else(|| panic!("{algorithm:?}: lenient load gave None"));
        assert_eq!(back.shape(), w.shape());
        assert_ne!(
            back.data()[..],
            w.data()[..],
            "{algorithm:?}: the corruption is visible"
        );
        assert_ne!(back.compute_hash_with(algorithm), key);
        let batch = store.load_batch(&[key]).unwrap();
        assert_eq!(batch[&key].data()[..], back.data()[..]);
    }
}

/// Stores and loads from several threads at once, the same weights from several threads too.
pub fn concurrent_use<H: Harness>(h: &H) {
    let store = h.open(true);
    let threads = 4u64;
    let per_thread = 12u64;
    let results: Vec<Vec<ContentHash>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    let mut keys = Vec::new();
                    for i in 0..per_thread {
                        // Half the weights are shared by every thread.
                        let seed = if i % 2 == 0 {
                            1000 + i
                        } else {
                            2000 + t * 100 + i
                        };
                        let dtype = DType::ALL[(seed % 15) as usize];
                        let w = sample_tensor(&format!("c{seed}"), dtype, &[17, 5], seed);
                        let key = store.store(&w).unwrap();
                        assert_eq!(key, w.compute_hash());
                        let back = store.load(&key).unwrap().expect("just stored");
                        assert_eq!(back.data()[..], w.data()[..]);
                        assert!(store.exists(&key).unwrap());
                        let _ = store.list_weights().unwrap();
                        keys.push(key);
                    }
                    let loaded = store.load_batch(&keys).unwrap();
                    assert_eq!(loaded.len(), keys.len());
                    keys
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want: BTreeSet<ContentHash> = results.into_iter().flatten().collect();
    assert_eq!(want.len() as u64, per_thread / 2 + threads * per_thread / 2);
    assert_eq!(
        store.list_weights().unwrap(),
        want.iter().copied().collect::<Vec<_>>()
    );
    for key in &want {
        let w = store.load(key).unwrap().unwrap();
        assert_eq!(w.compute_hash(), *key);
    }
    assert_eq!(
        store.storage_info().unwrap().total_weights,
        want.len() as u64
    );
}

fn check_info(info: &StorageInfo, weights: u64, bytes: u64, what: &str) {
    assert_eq!(info.total_weights, weights, "{what}: total_weights");
    assert_eq!(info.total_bytes, bytes, "{what}: total_bytes");
    assert!(!info.backend.is_empty(), "{what}: backend name");
    let want = StorageInfo::saved_fraction(info.total_bytes, info.compressed_bytes);
    assert!(
        (info.compression_ratio - want).abs() < 1e-9,
        "{what}: compression_ratio {} is not 1 - compressed/total = {want}",
        info.compression_ratio
    );
    if bytes == 0 {
        assert_eq!(info.compression_ratio, 0.0, "{what}: ratio of nothing");
    }
}

/// `storage_info` counts distinct weights and their uncompressed bytes, and its ratio agrees with
/// its byte counts.
pub fn storage_info<H: Harness>(h: &H) {
    let store = h.open(true);
    check_info(&store.storage_info().unwrap(), 0, 0, "empty");
    let ws: Vec<WeightTensor> = (0..3u64)
        .map(|i| {
            sample_tensor(
                &format!("s{i}"),
                DType::F32,
                &[100, 10 + i as usize],
                80 + i,
            )
        })
        .collect();
    let zeros =
        WeightTensor::from_bytes("zeros", vec![64, 64], DType::F32, vec![0u8; 16384]).unwrap();
    let mut keys = Vec::new();
    for w in ws.iter().chain([&zeros]) {
        keys.push(store.store(w).unwrap());
    }
    store.store(&ws[0]).unwrap();
    let total: u64 = ws.iter().chain([&zeros]).map(|w| w.nbytes() as u64).sum();
    let info = store.storage_info().unwrap();
    check_info(&info, 4, total, "four weights");
    assert!(
        info.compressed_bytes > 0,
        "compressed_bytes of non-empty weights"
    );
    store.delete(&keys[1]).unwrap();
    check_info(
        &store.storage_info().unwrap(),
        3,
        total - ws[1].nbytes() as u64,
        "after delete",
    );
}

/// After `close`, every call fails with `Closed`.
pub fn closed_store<H: Harness>(h: &H) {
    let mut store = h.open(true);
    let w = sample_tensor("w", DType::F32, &[3], 90);
    let key = store.store(&w).unwrap();
    store.close().unwrap();
    let closed = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Closed { .. }) => {}
        other => panic!("{what} on a closed store: expected Closed, got {other:?}"),
    };
    closed(store.store(&w).map(drop), "store");
    closed(store.store_with_key(&w, &key).map(drop), "store_with_key");
    closed(store.load(&key).map(drop), "load");
    closed(store.exists(&key).map(drop), "exists");
    closed(store.delete(&key).map(drop), "delete");
    closed(store.list_weights().map(drop), "list_weights");
    closed(store.get_metadata(&key).map(drop), "get_metadata");
    closed(store.load_batch(&[key]).map(drop), "load_batch");
    closed(
        store.store_batch(&[("w".to_owned(), w.clone())]).map(drop),
        "store_batch",
    );
    closed(store.storage_info().map(drop), "storage_info");
    closed(store.load_rows(&key, 0..1).map(drop), "load_rows");
    closed(
        store.load_byte_range(&key, 0..1).map(drop),
        "load_byte_range",
    );
    closed(
        store.load_into(&key, &mut Vec::new()).map(drop),
        "load_into",
    );
}

/// What is stored survives closing and opening the same location again (for backends whose
/// [`Harness::reopen`] gives a store).
pub fn persistence<H: Harness>(h: &H) {
    let store = h.open(true);
    let mut want: BTreeMap<ContentHash, WeightTensor> = BTreeMap::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let w = rich_metadata(sample_tensor(
            &format!("p.{dtype}"),
            dtype,
            &[3, 2],
            95 + i as u64,
        ));
        want.insert(store.store(&w).unwrap(), w);
    }
    let legacy = sample_tensor("p.legacy", DType::F32, &[], 94);
    let lk = legacy.compute_hash_with(HashAlgorithm::Xxh3Legacy);
    store.store_with_key(&legacy, &lk).unwrap();
    want.insert(lk, legacy);
    let deleted = store
        .store(&sample_tensor("p.gone", DType::U8, &[9], 93))
        .unwrap();
    assert!(store.delete(&deleted).unwrap());
    let Some(store) = h.reopen(store) else {
        return;
    };
    assert_eq!(
        store.list_weights().unwrap(),
        want.keys().copied().collect::<Vec<_>>()
    );
    assert!(!store.exists(&deleted).unwrap());
    for (key, w) in &want {
        let back = store.load(key).unwrap().unwrap();
        assert_same_tensor(&back, w, "after reopen");
        assert_metadata_kept(back.metadata(), w.metadata(), "after reopen");
    }
    let info = store.storage_info().unwrap();
    check_info(
        &info,
        want.len() as u64,
        want.values().map(|w| w.nbytes() as u64).sum(),
        "after reopen",
    );
}

/// `store_hashed` / `store_hashed_batch` say what they wrote (in order, a duplicate in a batch
/// new only once, bytes only for what is new); `load_hashed` hands back the key it verified;
/// `stored_form` knows present keys and not absent ones.
pub fn hashed_weights<H: Harness>(h: &H) {
    use coral_core::HashedWeight;
    let store = h.open(true);
    let a = HashedWeight::new(sample_tensor("a", DType::F32, &[64, 16], 901));
    let b = HashedWeight::new(sample_tensor("b", DType::BF16, &[33], 902));
    let first = store.store_hashed(&a).expect("store_hashed");
    assert_eq!(first.key, *a.key());
    assert!(first.new, "a new weight is new");
    assert!(
        first.stored_bytes > 0,
        "a new weight takes bytes: {first:?}"
    );
    let again = store.store_hashed(&a).expect("store_hashed again");
    assert!(!again.new && again.stored_bytes == 0, "{again:?}");
    let batch = store
        .store_hashed_batch(&[b.clone(), a.clone(), b.clone()])
        .expect("store_hashed_batch");
    let keys: Vec<ContentHash> = batch.iter().map(|s| s.key).collect();
    assert_eq!(keys, vec![*b.key(), *a.key(), *b.key()], "results in order");
    let news: Vec<bool> = batch.iter().map(|s| s.new).collect();
    assert_eq!(news, vec![true, false, false], "{batch:?}");
    let back = store
        .load_hashed(b.key())
        .expect("load_hashed")
        .expect("present");
    assert_eq!(back.key(), b.key());
    assert_same_tensor(back.weight(), b.weight(), "load_hashed");
    let form = store.stored_form(a.key()).expect("stored_form");
    assert!(form.is_some(), "stored_form of a present key");
    if let Some(n) = form.and_then(|f| f.stored_bytes) {
        assert_eq!(n, first.stored_bytes, "stored_form and store_hashed agree");
    }
    let absent = ContentHash::Sha256([0xab; 32]);
    assert_eq!(
        store.stored_form(&absent).expect("stored_form absent"),
        None
    );
    assert!(store
        .load_hashed(&absent)
        .expect("load_hashed absent")
        .is_none());
}

/// `store_unhashed_batch` keys each weight by its SHA-256 hash and says what it wrote, in
/// order: a weight the store had and a repeat within the batch are not new, and take no bytes.
pub fn unhashed_batches<H: Harness>(h: &H) {
    let store = h.open(true);
    assert!(store
        .store_unhashed_batch(&[])
        .expect("empty batch")
        .is_empty());
    let a = sample_tensor("a", DType::F32, &[300, 7], 911);
    let b = sample_tensor("b", DType::BF16, &[1 << 16], 912);
    let c = sample_tensor("c", DType::I8, &[0], 913);
    let had = store.store(&a).expect("store a");
    let batch = store
        .store_unhashed_batch(&[b.clone(), a.clone(), c.clone(), b.clone()])
        .expect("store_unhashed_batch");
    let keys: Vec<ContentHash> = batch.iter().map(|s| s.key).collect();
    let want = vec![b.compute_hash(), had, c.compute_hash(), b.compute_hash()];
    assert_eq!(keys, want, "keys are SHA-256 hashes, in order");
    let news: Vec<bool> = batch.iter().map(|s| s.new).collect();
    assert_eq!(news, vec![true, false, true, false], "{batch:?}");
    assert!(batch[0].stored_bytes > 0, "{batch:?}");
    assert!(
        batch[1].stored_bytes == 0 && batch[3].stored_bytes == 0,
        "{batch:?}"
    );
    for (w, k) in [(&b, keys[0]), (&c, keys[2])] {
        let back = store.load(&k).expect("load").expect("present");
        assert_same_tensor(&back, w, "unhashed batch");
    }
}

/// Writes between `defer_commits` and `commit_deferred` (nested too) are all there after it,
/// and after the store is opened again; a `commit_deferred` with nothing deferred is harmless.
pub fn deferred_commits<H: Harness>(h: &H) {
    let store = h.open(true);
    store
        .commit_deferred()
        .expect("commit_deferred with nothing deferred");
    store.defer_commits().expect("defer_commits");
    let a = store_and_check(&store, &sample_tensor("a", DType::F32, &[40, 3], 921));
    store.defer_commits().expect("nested defer_commits");
    let b = store_and_check(&store, &sample_tensor("b", DType::F16, &[17], 922));
    store.commit_deferred().expect("inner commit_deferred");
    assert!(store.delete(&a).expect("delete a while deferred"));
    let c = store_and_check(&store, &sample_tensor("c", DType::U8, &[5, 5], 923));
    store.commit_deferred().expect("outer commit_deferred");
    assert_eq!(store.list_weights().expect("list"), sorted(vec![b, c]));
    let Some(store) = h.reopen(store) else {
        return;
    };
    assert_eq!(
        store.list_weights().expect("list after reopen"),
        sorted(vec![b, c])
    );
}

fn sorted(mut keys: Vec<ContentHash>) -> Vec<ContentHash> {
    keys.sort();
    keys
}

/// Checks `load_rows`, `load_byte_range` and `load_into` of `key` against `w` (its whole data,
/// as `load` gives it): the given row ranges, every chunk-like boundary, and `n_random` random
/// ranges of rows and of bytes.
pub fn check_slices<S: WeightStore + ?Sized>(
    store: &S,
    key: &ContentHash,
    w: &WeightTensor,
    rng: &mut Rng,
    n_random: usize,
) {
    let what = format!("{} {} {:?}", w.name(), w.dtype(), w.shape());
    let nbytes = w.nbytes();
    // Streamed: all of it, in order, under its key.
    let mut sink = Vec::new();
    let (meta, hash) = store
        .load_into(key, &mut sink)
        .unwrap_or_else(|e| panic!("{what}: load_into: {e}"))
        .unwrap_or_else(|| panic!("{what}: load_into gave None"));
    assert_eq!(hash, *key, "{what}: load_into's hash");
    assert_eq!(meta.hash, Some(*key), "{what}: load_into's metadata hash");
    assert_eq!(
        (meta.shape.as_slice(), meta.dtype),
        (w.shape(), w.dtype()),
        "{what}: load_into's metadata"
    );
    assert_eq!(meta.name, w.name(), "{what}: load_into's name");
    assert!(sink[..] == w.data()[..], "{what}: load_into's data");
    // Bytes.
    let mut byte_ranges = vec![0..0, 0..nbytes, nbytes..nbytes];
    for _ in 0..n_random {
        let a = (rng.next_u64() % (nbytes as u64 + 1)) as usize;
        let b = (rng.next_u64() % (nbytes as u64 + 1)) as usize;
        byte_ranges.push(a.min(b)..a.max(b));
    }
    for r in byte_ranges {
        let got = store
            .load_byte_range(key, r.start as u64..r.end as u64)
            .unwrap_or_else(|e| panic!("{what}: load_byte_range {r:?}: {e}"))
            .unwrap_or_else(|| panic!("{what}: load_byte_range {r:?} gave None"));
        assert!(got[..] == w.data()[r.clone()], "{what}: bytes {r:?}");
    }
    // Rows.
    let Some(&n) = w.shape().first() else {
        return;
    };
    let row = nbytes.checked_div(n).unwrap_or(0);
    let mut row_ranges = vec![0..0, 0..n, n..n, n / 2..n, 0..n / 2];
    for k in [1usize, 2, 3, 7] {
        if k < n {
            row_ranges.push(k - 1..k + 1);
            row_ranges.push(n - k..n);
        }
    }
    for _ in 0..n_random {
        let a = (rng.next_u64() % (n as u64 + 1)) as usize;
        let b = (rng.next_u64() % (n as u64 + 1)) as usize;
        row_ranges.push(a.min(b)..a.max(b));
    }
    for r in row_ranges {
        let got = store
            .load_rows(key, r.clone())
            .unwrap_or_else(|e| panic!("{what}: load_rows {r:?}: {e}"))
            .unwrap_or_else(|| panic!("{what}: load_rows {r:?} gave None"));
        let mut shape = w.shape().to_vec();
        shape[0] = r.len();
        assert_eq!(got.shape(), &shape[..], "{what}: rows {r:?}: shape");
        assert_eq!(got.dtype(), w.dtype(), "{what}: rows {r:?}: dtype");
        assert_eq!(got.name(), w.name(), "{what}: rows {r:?}: name");
        assert_eq!(
            got.metadata().hash,
            None,
            "{what}: rows {r:?} carry no hash"
        );
        assert!(
            got.data()[..] == w.data()[r.start * row..r.end * row],
            "{what}: rows {r:?}: data"
        );
    }
}

/// `load_rows`, `load_byte_range` and `load_into` agree with `load` for every dtype, in 0-d,
/// empty, 1-d, 2-d and 3-d shapes and a tensor of several MiB (several chunks), on empty
/// ranges, whole ranges, ranges at the start, the end and around small boundaries, and random
/// ones; the metadata of rows is the weight's own, without its hash; legacy keys stream under
/// their key; absent keys are `None` with nothing written.
pub fn slices_agree_with_load<H: Harness>(h: &H) {
    let store = h.open(true);
    let mut rng = Rng::new(4242);
    let shapes: &[&[usize]] = &[&[], &[0], &[3, 0, 2], &[1], &[1000], &[37, 13], &[9, 7, 5]];
    for (i, dtype) in [DType::F32, DType::BF16, DType::U8, DType::F64, DType::Bool]
        .into_iter()
        .enumerate()
    {
        for (j, shape) in shapes.iter().enumerate() {
            let w = rich_metadata(sample_tensor(
                &format!("slice.{dtype}.{j}"),
                dtype,
                shape,
                5000 + (i * 100 + j) as u64,
            ));
            let key = store.store(&w).unwrap();
            check_slices(&store, &key, &w, &mut rng, 12);
            let rows = store.load_rows(&key, 0..0).ok().flatten();
            if let Some(rows) = rows {
                assert_metadata_kept(
                    &coral_core::WeightMetadata {
                        shape: w.shape().to_vec(),
                        ..rows.metadata().clone()
                    },
                    w.metadata(),
                    "rows' metadata",
                );
            }
        }
    }
    // Several MiB: more than one chunk of any sensible size.
    let big = sample_tensor("slice.big", DType::F32, &[1100, 1029], 5999);
    let key = store.store(&big).unwrap();
    check_slices(&store, &key, &big, &mut rng, 8);
    // Legacy keys.
    let w = sample_tensor("slice.legacy", DType::F16, &[40, 3], 5998);
    let lk = w.compute_hash_with(HashAlgorithm::Xxh3Legacy);
    store.store_with_key(&w, &lk).unwrap();
    check_slices(&store, &lk, &w, &mut rng, 8);
    // A sink that fails: its error, naming the key.
    struct Broken;
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    match store.load_into(&key, &mut Broken) {
        Err(e @ StoreError::Backend { .. }) => {
            assert!(e.to_string().contains(&key.to_hex()), "{e}");
        }
        other => panic!("a broken sink: expected Backend, got {other:?}"),
    }
    // Absent keys.
    for key in absent_keys() {
        assert!(
            store.load_rows(&key, 0..1).unwrap().is_none(),
            "load_rows {key}"
        );
        assert!(
            store
                .load_rows(&key, std::ops::Range { start: 5, end: 1 })
                .unwrap()
                .is_none(),
            "load_rows {key}"
        );
        assert!(
            store.load_byte_range(&key, 0..1).unwrap().is_none(),
            "load_byte_range {key}"
        );
        let mut sink = Vec::new();
        assert!(
            store.load_into(&key, &mut sink).unwrap().is_none(),
            "load_into {key}"
        );
        assert!(sink.is_empty(), "load_into {key} wrote nothing");
    }
}

/// Rows of a 0-d weight, reversed ranges and ranges past the end are
/// [`StoreError::InvalidRange`] naming the key and the range, for rows and for bytes.
pub fn slices_out_of_range<H: Harness>(h: &H) {
    use crate::error::RangeUnit;
    let store = h.open(true);
    let check = |r: Result<(), StoreError>,
                 key: &ContentHash,
                 unit: RangeUnit,
                 range: (u64, u64),
                 what: &str| {
        match r {
            Err(e @ StoreError::InvalidRange { .. }) => {
                let StoreError::InvalidRange {
                    key: k,
                    unit: u,
                    start,
                    end,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((k, *u, (*start, *end)), (key, unit, range), "{what}: {e}");
                let msg = e.to_string();
                assert!(msg.contains(&key.to_hex()), "{what}: the key in {msg:?}");
                assert!(
                    msg.contains(&format!("{}..{}", range.0, range.1)),
                    "{what}: the range in {msg:?}"
                );
            }
            other => panic!("{what}: expected InvalidRange, got {other:?}"),
        }
    };
    let scalar = sample_tensor("oor.scalar", DType::F32, &[], 1);
    let sk = store.store(&scalar).unwrap();
    check(
        store.load_rows(&sk, 0..0).map(drop),
        &sk,
        RangeUnit::Rows,
        (0, 0),
        "rows of a 0-d weight",
    );
    check(
        store.load_rows(&sk, 0..1).map(drop),
        &sk,
        RangeUnit::Rows,
        (0, 1),
        "rows of a 0-d weight",
    );
    check(
        store.load_byte_range(&sk, 0..5).map(drop),
        &sk,
        RangeUnit::Bytes,
        (0, 5),
        "bytes past a scalar",
    );
    for shape in [&[6usize, 5][..], &[50], &[4, 3, 2], &[0, 3]] {
        let w = sample_tensor("oor", DType::I16, shape, 2);
        let key = store.store(&w).unwrap();
        let n = shape[0];
        let nb = w.nbytes() as u64;
        let what = format!("{shape:?}");
        for r in [0..n + 1, n + 1..n + 1, n..n + 3, usize::MAX - 1..usize::MAX] {
            check(
                store.load_rows(&key, r.clone()).map(drop),
                &key,
                RangeUnit::Rows,
                (r.start as u64, r.end as u64),
                &format!("{what}: rows {r:?}"),
            );
        }
        if n > 1 {
            let r = std::ops::Range { start: 2, end: 1 };
            check(
                store.load_rows(&key, r).map(drop),
                &key,
                RangeUnit::Rows,
                (2, 1),
                &format!("{what}: reversed rows"),
            );
        }
        for r in [
            0..nb + 1,
            nb + 1..nb + 1,
            nb..u64::MAX,
            std::ops::Range { start: 3, end: 2 },
        ] {
            if r.start <= r.end && r.end <= nb {
                continue;
            }
            check(
                store.load_byte_range(&key, r.clone()).map(drop),
                &key,
                RangeUnit::Bytes,
                (r.start, r.end),
                &format!("{what}: bytes {r:?}"),
            );
        }
    }
}

/// `load_into` verifies: a corrupt weight is [`StoreError::Integrity`] (naming the weight, its
/// key and the hash of what was read) in a strict store, and the corrupt data under its actual
/// hash in a lenient one, for SHA-256 and legacy keys.
pub fn load_into_verifies<H: Harness>(h: &H) {
    for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
        let (store, _w, key) = corrupted(h, true, algorithm);
        let mut sink = Vec::new();
        match store.load_into(&key, &mut sink) {
            Err(StoreError::Integrity {
                name,
                expected,
                actual,
            }) => {
                assert_eq!(name, "victim", "{algorithm:?}: name");
                assert_eq!(expected, key, "{algorithm:?}: expected");
                assert_ne!(actual, key, "{algorithm:?}: actual");
                assert_eq!(actual.algorithm(), algorithm);
            }
            other => panic!("{algorithm:?}: expected Integrity, got {other:?}"),
        }
        let other = sample_tensor("bystander", DType::F32, &[16, 4], 71);
        let mut sink = Vec::new();
        let (_, hash) = store
            .load_into(&other.compute_hash(), &mut sink)
            .unwrap()
            .unwrap();
        assert_eq!(hash, other.compute_hash());
        assert!(sink[..] == other.data()[..], "bystander streamed");

        let (store, w, key) = corrupted(h, false, algorithm);
        let lenient = store.load(&key).unwrap().unwrap();
        let mut sink = Vec::new();
        let (meta, hash) = store
            .load_into(&key, &mut sink)
            .unwrap_or_else(|e| panic!("{algorithm:?}: lenient load_into: {e}"))
            .unwrap();
        assert_eq!(meta.shape, w.shape());
        assert_ne!(hash, key, "{algorithm:?}: the actual hash");
        assert_eq!(hash, lenient.compute_hash_with(algorithm));
        assert!(
            sink[..] == lenient.data()[..],
            "{algorithm:?}: lenient data"
        );
    }
}

//! The delta section: the [`DeltaStore`] contract.

use std::collections::BTreeMap;

use coral_core::{ContentHash, DType, Delta, DeltaType, JsonMap, WeightTensor};
use serde_json::json;

use super::{sample_tensor, Check, Harness, Rng};
use crate::traits::{DeltaStore, WeightStore};

/// Every check of the section, by name.
pub fn checks<H>() -> Vec<Check<H>>
where
    H: Harness,
    H::Store: DeltaStore,
{
    vec![
        ("deltas::round_trip_every_type", round_trip_every_type::<H>),
        ("deltas::missing", missing::<H>),
        ("deltas::delete_delta", delete_delta::<H>),
        ("deltas::storage_info", storage_info::<H>),
        ("deltas::persistence", persistence::<H>),
    ]
}

/// A hand-built delta of `target` against `reference_key` with a random payload (it does not
/// decode to anything: only the delta methods may touch it).
pub fn sample_delta(
    delta_type: DeltaType,
    target: &WeightTensor,
    reference_key: ContentHash,
    seed: u64,
) -> Delta {
    let payload = Rng::new(seed).bytes(37 + seed as usize % 50);
    let mut metadata = JsonMap::new();
    metadata.insert("codec".to_owned(), json!("zstd-3"));
    metadata.insert("scale".to_owned(), json!(0.000_123_456_789_f64));
    metadata.insert("shape_hint".to_owned(), json!([1, 2, 3]));
    Delta {
        delta_type,
        compression_ratio: target.nbytes() as f64 / payload.len() as f64,
        data: payload.into(),
        metadata,
        original_shape: target.shape().to_vec(),
        original_dtype: target.dtype(),
        reference_hash: reference_key,
    }
}

/// A reference weight stored in full and a target (not stored) of the same shape.
fn pair<S: DeltaStore + ?Sized>(store: &S, seed: u64) -> (ContentHash, WeightTensor) {
    let reference = sample_tensor(&format!("ref{seed}"), DType::F32, &[8, 4], seed);
    let target = sample_tensor(&format!("target{seed}"), DType::F32, &[8, 4], seed + 1);
    (store.store(&reference).unwrap(), target)
}

/// Every delta type round-trips through `store_delta` / `load_delta`, stored under the key of the
/// weight it encodes; `delta_exists`, `exists` and `list_deltas` see it.
pub fn round_trip_every_type<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let mut keys = Vec::new();
    for (i, t) in DeltaType::ALL.into_iter().enumerate() {
        let (rk, target) = pair(&store, 10 * i as u64);
        let key = target.compute_hash();
        let d = sample_delta(t, &target, rk, i as u64);
        assert_eq!(
            store.store_delta(&d, &key).unwrap(),
            key,
            "{t}: store_delta"
        );
        assert!(store.delta_exists(&key).unwrap(), "{t}: delta_exists");
        assert!(store.exists(&key).unwrap(), "{t}: exists sees a delta");
        assert_eq!(
            store.load_delta(&key).unwrap().as_ref(),
            Some(&d),
            "{t}: load_delta"
        );
        keys.push(key);
    }
    keys.sort();
    assert_eq!(store.list_deltas().unwrap(), keys);
}

/// Absent deltas give `None` / `false`; a weight stored in full is not a delta.
pub fn missing<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (rk, _) = pair(&store, 1);
    for key in [rk, ContentHash::parse(&"e".repeat(64)).unwrap()] {
        assert!(
            store.load_delta(&key).unwrap().is_none(),
            "load_delta {key}"
        );
        assert!(!store.delta_exists(&key).unwrap(), "delta_exists {key}");
        assert!(!store.delete_delta(&key).unwrap(), "delete_delta {key}");
    }
    assert!(store.list_deltas().unwrap().is_empty());
    assert!(store.exists(&rk).unwrap(), "the weight is untouched");
}

/// `delete_delta` removes one delta; again is `false`.
pub fn delete_delta<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (rk, a) = pair(&store, 2);
    let (_, b) = pair(&store, 4);
    let (ka, kb) = (a.compute_hash(), b.compute_hash());
    store
        .store_delta(&sample_delta(DeltaType::XorFloat32, &a, rk, 1), &ka)
        .unwrap();
    store
        .store_delta(&sample_delta(DeltaType::Sparse, &b, rk, 2), &kb)
        .unwrap();
    assert!(store.delete_delta(&ka).unwrap());
    assert!(!store.delete_delta(&ka).unwrap(), "delete again");
    assert!(!store.delta_exists(&ka).unwrap());
    assert!(!store.exists(&ka).unwrap());
    assert!(store.load_delta(&ka).unwrap().is_none());
    assert_eq!(store.list_deltas().unwrap(), vec![kb]);
    assert!(store.delta_exists(&kb).unwrap());
    assert!(store.exists(&rk).unwrap(), "the reference stays");
}

/// `get_delta_storage_info` counts deltas, payload bytes, the bytes they stand for, and types.
pub fn storage_info<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let empty = store.get_delta_storage_info().unwrap();
    assert_eq!(empty.total_deltas, 0);
    assert_eq!(empty.total_delta_bytes, 0);
    assert_eq!(empty.total_original_bytes, 0);
    let types = [
        DeltaType::Compressed,
        DeltaType::Int8Quantized,
        DeltaType::Compressed,
    ];
    let (mut payload, mut original) = (0u64, 0u64);
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut first = None;
    for (i, t) in types.into_iter().enumerate() {
        let (rk, target) = pair(&store, 100 + 10 * i as u64);
        let d = sample_delta(t, &target, rk, 5 + i as u64);
        let key = target.compute_hash();
        store.store_delta(&d, &key).unwrap();
        first.get_or_insert(key);
        payload += d.nbytes() as u64;
        original += target.nbytes() as u64;
        *by_type.entry(t.name().to_owned()).or_default() += 1;
    }
    let info = store.get_delta_storage_info().unwrap();
    assert_eq!(info.total_deltas, 3);
    assert_eq!(info.total_delta_bytes, payload, "total_delta_bytes");
    assert_eq!(info.total_original_bytes, original, "total_original_bytes");
    assert_eq!(info.by_type, by_type, "by_type");
    let weights = store.storage_info().unwrap();
    assert_eq!(
        weights.total_weights, 3,
        "deltas are not weights stored in full"
    );
    assert_eq!(weights.deltas.total_deltas, 3, "storage_info().deltas");
    if let Some(k) = first {
        store.delete_delta(&k).unwrap();
    }
    assert_eq!(store.get_delta_storage_info().unwrap().total_deltas, 2);
}

/// Deltas survive closing and opening the store again.
pub fn persistence<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (rk, target) = pair(&store, 7);
    let key = target.compute_hash();
    let d = sample_delta(DeltaType::PerAxisScaled, &target, rk, 7);
    store.store_delta(&d, &key).unwrap();
    let Some(store) = h.reopen(store) else {
        return;
    };
    assert_eq!(store.load_delta(&key).unwrap(), Some(d));
    assert_eq!(store.list_deltas().unwrap(), vec![key]);
}

//! The delta section: the [`DeltaStore`] contract.

use std::collections::BTreeMap;

use coral_core::delta::encode_best_lossless;
use coral_core::{ContentHash, DType, Delta, DeltaType, JsonMap, WeightTensor};
use serde_json::json;

use super::{assert_same_tensor, sample_tensor, Check, Harness, Rng};
use crate::error::StoreError;
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
        ("deltas::weight_kept_as_delta", weight_kept_as_delta::<H>),
        ("deltas::chain_of_two", chain_of_two::<H>),
        (
            "deltas::slices_of_delta_weights",
            slices_of_delta_weights::<H>,
        ),
        ("deltas::delete_referenced", delete_referenced::<H>),
        ("deltas::missing_reference", missing_reference::<H>),
        (
            "deltas::cycles_and_long_chains",
            cycles_and_long_chains::<H>,
        ),
        ("deltas::corrupt_reference", corrupt_reference::<H>),
        (
            "deltas::persistence_of_delta_weights",
            persistence_of_delta_weights::<H>,
        ),
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

/// A weight-like float32 reference (random values, which compress poorly) and a fine-tuned copy
/// with a few elements changed, named `name`, with layer type and model name: a pair whose
/// lossless delta is far smaller than the weight.
pub fn tuned_pair(name: &str, seed: u64) -> (WeightTensor, WeightTensor) {
    let mut rng = Rng::new(seed);
    let base: Vec<f32> = (0..4096)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2)
        .collect();
    let reference = WeightTensor::from_vec(format!("{name}.base"), vec![64, 64], base).unwrap();
    (reference.clone(), tune(&reference, name, seed))
}

/// `w` with every 97th element nudged, renamed, with layer type and model name set.
pub fn tune(w: &WeightTensor, name: &str, seed: u64) -> WeightTensor {
    let mut values: Vec<f32> = w.to_array::<f32>().unwrap().iter().copied().collect();
    for v in values.iter_mut().skip(seed as usize % 97).step_by(97) {
        *v += 0.01;
    }
    let t = WeightTensor::from_vec(name, w.shape().to_vec(), values).unwrap();
    let mut meta = t.metadata().clone();
    meta.layer_type = Some("Linear".to_owned());
    meta.model_name = Some("tuned-model".to_owned());
    t.with_metadata(meta).unwrap()
}

/// The best lossless delta of `target` against `reference` (stored under `rk`).
pub fn lossless_delta(target: &WeightTensor, reference: &WeightTensor, rk: ContentHash) -> Delta {
    encode_best_lossless(target, reference, &rk)
        .unwrap()
        .expect("a lossless delta smaller than the weight")
}

fn assert_delta_weight<S: WeightStore + ?Sized>(
    store: &S,
    key: &ContentHash,
    want: &WeightTensor,
    what: &str,
) {
    assert!(store.exists(key).unwrap(), "{what}: exists");
    let back = store
        .load(key)
        .unwrap_or_else(|e| panic!("{what}: load: {e}"))
        .unwrap_or_else(|| panic!("{what}: load gave None"));
    assert_same_tensor(&back, want, what);
    assert_eq!(back.metadata().hash, Some(*key), "{what}: hash");
    assert_eq!(
        back.metadata().layer_type,
        want.metadata().layer_type,
        "{what}: layer_type"
    );
    assert_eq!(
        back.metadata().model_name,
        want.metadata().model_name,
        "{what}: model_name"
    );
    let meta = store
        .get_metadata(key)
        .unwrap_or_else(|e| panic!("{what}: get_metadata: {e}"))
        .unwrap_or_else(|| panic!("{what}: get_metadata gave None"));
    assert_eq!(meta.name, want.name(), "{what}: get_metadata name");
    assert_eq!(meta.shape, want.shape(), "{what}: get_metadata shape");
    assert_eq!(meta.dtype, want.dtype(), "{what}: get_metadata dtype");
    assert_eq!(meta.hash, Some(*key), "{what}: get_metadata hash");
}

/// A weight kept only as a delta is found by its own hash: `exists`, `get_metadata`, `load`,
/// `load_batch` and `list_weights` treat it like any weight, rebuilt through its reference and
/// verified.
pub fn weight_kept_as_delta<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (reference, target) = tuned_pair("encoder.layer.3.output.dense.weight", 1);
    let rk = store.store(&reference).unwrap();
    let tk = target.compute_hash();
    let delta = lossless_delta(&target, &reference, rk);
    assert!(delta.nbytes() < target.nbytes() / 4, "the delta is small");
    assert_eq!(store.store_delta(&delta, &tk).unwrap(), tk);
    assert_delta_weight(&store, &tk, &target, "delta weight");
    let batch = store.load_batch(&[tk, rk, tk]).unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[&tk].data()[..], target.data()[..], "load_batch");
    assert_eq!(batch[&rk].data()[..], reference.data()[..]);
    let mut want = vec![rk, tk];
    want.sort();
    assert_eq!(store.list_weights().unwrap(), want, "list_weights");
    assert_eq!(store.list_deltas().unwrap(), vec![tk]);
    // Storing the weight in full as well keeps it loadable.
    assert_eq!(store.store(&target).unwrap(), tk);
    assert_delta_weight(&store, &tk, &target, "delta and full");
}

/// `load_rows`, `load_byte_range` and `load_into` of weights kept as deltas (one and two links)
/// agree with `load`; a strict store's `load_into` of a delta whose reference is corrupt is
/// [`StoreError::Integrity`].
pub fn slices_of_delta_weights<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (reference, t1) = tuned_pair("slices", 3);
    let t2 = tune(&t1, "slices.2", 7);
    let rk = store.store(&reference).unwrap();
    let (k1, k2) = (t1.compute_hash(), t2.compute_hash());
    store
        .store_delta(&lossless_delta(&t1, &reference, rk), &k1)
        .unwrap();
    store
        .store_delta(&lossless_delta(&t2, &t1, k1), &k2)
        .unwrap();
    let mut rng = Rng::new(33);
    for (k, w) in [(k1, &t1), (k2, &t2)] {
        super::weights::check_slices(&store, &k, w, &mut rng, 10);
    }
    let mut sink = Vec::new();
    assert!(store.load_rows(&k2, 0..65).is_err(), "rows past the end");
    h.corrupt(&store, &rk);
    assert!(
        matches!(
            store.load_into(&k1, &mut sink),
            Err(StoreError::Integrity { .. })
        ),
        "load_into of a delta on a corrupt reference"
    );
}

/// A chain of two deltas: t2 against t1 (itself a delta) against a weight stored in full.
pub fn chain_of_two<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (reference, t1) = tuned_pair("chain", 2);
    let t2 = tune(&t1, "chain.2", 5);
    let rk = store.store(&reference).unwrap();
    let (k1, k2) = (t1.compute_hash(), t2.compute_hash());
    store
        .store_delta(&lossless_delta(&t1, &reference, rk), &k1)
        .unwrap();
    store
        .store_delta(&lossless_delta(&t2, &t1, k1), &k2)
        .unwrap();
    assert_delta_weight(&store, &k2, &t2, "second link");
    assert_delta_weight(&store, &k1, &t1, "first link");
    let batch = store.load_batch(&[k2, k1]).unwrap();
    assert_eq!(batch[&k2].data()[..], t2.data()[..]);
    assert_eq!(batch[&k1].data()[..], t1.data()[..]);
}

/// Deleting a weight that a delta refers to is refused with `Referenced`, or (a backend that
/// rewrites its dependents) leaves every weight readable. A delta weight nobody refers to
/// deletes like any weight.
pub fn delete_referenced<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (reference, t1) = tuned_pair("del", 3);
    let t2 = tune(&t1, "del.2", 6);
    let rk = store.store(&reference).unwrap();
    let (k1, k2) = (t1.compute_hash(), t2.compute_hash());
    store
        .store_delta(&lossless_delta(&t1, &reference, rk), &k1)
        .unwrap();
    store
        .store_delta(&lossless_delta(&t2, &t1, k1), &k2)
        .unwrap();
    for (key, what) in [(rk, "the full reference"), (k1, "a delta others refer to")] {
        match store.delete(&key) {
            Err(StoreError::Referenced { key: k, dependents }) => {
                assert_eq!(k, key, "{what}: Referenced key");
                assert_eq!(dependents, 1, "{what}: dependents");
                assert!(store.exists(&key).unwrap(), "{what}: still there");
            }
            Ok(_) => {}
            Err(e) => panic!("deleting {what}: expected Referenced or success, got {e}"),
        }
        assert_delta_weight(&store, &k2, &t2, &format!("after deleting {what}"));
    }
    // The end of the chain deletes, then its reference does.
    assert!(store.delete(&k2).unwrap(), "delete the last delta weight");
    assert!(!store.exists(&k2).unwrap());
    assert!(store.load(&k2).unwrap().is_none());
    assert!(!store.list_weights().unwrap().contains(&k2));
    if store.exists(&k1).unwrap() {
        assert!(store.delete(&k1).unwrap(), "nothing refers to t1 any more");
    }
    assert!(!store.exists(&k1).unwrap());
}

/// A delta whose reference is absent: `store_delta` refuses it, or loading it is
/// `MissingReference` naming both keys.
pub fn missing_reference<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (reference, target) = tuned_pair("orphan", 4);
    let rk = reference.compute_hash();
    let tk = target.compute_hash();
    let delta = lossless_delta(&target, &reference, rk);
    if store.store_delta(&delta, &tk).is_err() {
        assert!(!store.exists(&tk).unwrap(), "a refused delta is not stored");
        return;
    }
    match store.load(&tk) {
        Err(StoreError::MissingReference { key, reference }) => {
            assert_eq!((key, reference), (tk, rk));
        }
        other => panic!("expected MissingReference, got {other:?}"),
    }
    assert!(store.load_batch(&[tk]).is_err(), "load_batch");
}

/// Deltas that refer to each other, or a chain deeper than any store allows, give an error,
/// never a hang or a stack overflow.
pub fn cycles_and_long_chains<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let a = sample_tensor("a", DType::F32, &[8, 4], 1);
    let b = sample_tensor("b", DType::F32, &[8, 4], 2);
    let (ka, kb) = (a.compute_hash(), b.compute_hash());
    let stored_a = store.store_delta(&sample_delta(DeltaType::Compressed, &a, kb, 1), &ka);
    let stored_b = store.store_delta(&sample_delta(DeltaType::Compressed, &b, ka, 2), &kb);
    if stored_a.is_ok() && stored_b.is_ok() {
        assert!(store.load(&ka).is_err(), "a cycle of two deltas");
        assert!(
            store.get_metadata(&kb).is_err(),
            "get_metadata through a cycle"
        );
    }
    let store = h.open(true);
    let chain: Vec<WeightTensor> = (0..40)
        .map(|i| sample_tensor(&format!("c{i}"), DType::F32, &[8, 4], 100 + i))
        .collect();
    let keys: Vec<ContentHash> = chain.iter().map(WeightTensor::compute_hash).collect();
    store.store(&chain[39]).unwrap();
    let mut all_stored = true;
    for i in 0..39 {
        let d = sample_delta(DeltaType::Compressed, &chain[i], keys[i + 1], i as u64);
        all_stored &= store.store_delta(&d, &keys[i]).is_ok();
    }
    if all_stored {
        assert!(store.load(&keys[0]).is_err(), "a chain of 39 deltas");
    }
}

/// A corrupt reference: a strict store refuses the delta weight built on it; a lenient one
/// returns what it rebuilt.
pub fn corrupt_reference<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    for strict in [true, false] {
        let store = h.open(strict);
        let (reference, target) = tuned_pair("victim", 8);
        let rk = store.store(&reference).unwrap();
        let tk = target.compute_hash();
        store
            .store_delta(&lossless_delta(&target, &reference, rk), &tk)
            .unwrap();
        h.corrupt(&store, &rk);
        let r = store.load(&tk);
        if strict {
            assert!(
                matches!(r, Err(StoreError::Integrity { .. })),
                "strict: expected Integrity, got {r:?}"
            );
        } else {
            let w = r.unwrap().expect("lenient load");
            assert_eq!(w.shape(), target.shape());
            assert_ne!(w.data()[..], target.data()[..], "the corruption shows");
        }
    }
}

/// Weights kept as deltas survive closing and opening the store again.
pub fn persistence_of_delta_weights<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    let store = h.open(true);
    let (reference, target) = tuned_pair("kept", 9);
    let rk = store.store(&reference).unwrap();
    let tk = target.compute_hash();
    store
        .store_delta(&lossless_delta(&target, &reference, rk), &tk)
        .unwrap();
    let Some(store) = h.reopen(store) else {
        return;
    };
    assert_delta_weight(&store, &tk, &target, "after reopen");
}

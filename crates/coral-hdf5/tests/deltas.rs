//! Weights kept as deltas in an HDF5 store: found, listed and loaded by their own key; their
//! references cannot be deleted; everything survives reopening.

use coral_core::{DType, DeltaConfig, DeltaEncoder, DeltaType, WeightTensor};
use coral_hdf5::{HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::{DeltaStore, StoreError, WeightStore};

fn pair() -> (WeightTensor, WeightTensor) {
    let base: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.37).sin()).collect();
    let tuned: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 5 == 0 { v + 1e-3 } else { *v })
        .collect();
    (
        WeightTensor::from_vec("layer.weight", vec![64, 64], base).unwrap(),
        WeightTensor::from_vec("layer.weight.tuned", vec![64, 64], tuned).unwrap(),
    )
}

#[test]
fn weight_kept_as_delta_is_found_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.h5");
    let (reference, target) = pair();
    let tk = target.compute_hash();
    let rk = {
        let store = HDF5Store::open(&path, HDF5StoreOptions::new()).unwrap();
        let rk = store.store(&reference).unwrap();
        let enc = DeltaEncoder::new(DeltaConfig {
            delta_type: DeltaType::XorFloat32,
            ..DeltaConfig::default()
        });
        let delta = enc.encode_delta(&target, &reference, &rk).unwrap();
        assert_eq!(store.store_delta(&delta, &tk).unwrap(), tk);
        rk
    };
    let store = HDF5Store::open(&path, HDF5StoreOptions::new()).unwrap();
    assert!(store.exists(&tk).unwrap());
    assert!(store.delta_exists(&tk).unwrap());
    let mut keys = vec![rk, tk];
    keys.sort();
    assert_eq!(store.list_weights().unwrap(), keys);
    let meta = store.get_metadata(&tk).unwrap().unwrap();
    assert_eq!(meta.name, "layer.weight.tuned");
    assert_eq!(meta.shape, vec![64, 64]);
    assert_eq!(meta.dtype, DType::F32);
    let back = store.load(&tk).unwrap().unwrap();
    assert_eq!(back.data(), target.data());
    assert_eq!(back.name(), "layer.weight.tuned");
    let both = store.load_batch(&[rk, tk]).unwrap();
    assert_eq!(both[&tk].data(), target.data());
    assert_eq!(both[&rk].data(), reference.data());
    // The reference is needed: deleting it is refused, the file unchanged.
    let e = store.delete(&rk).unwrap_err();
    assert!(
        matches!(e, StoreError::Referenced { dependents: 1, .. }),
        "{e}"
    );
    assert!(store.exists(&rk).unwrap());
    let info = store.get_delta_storage_info().unwrap();
    assert_eq!(info.total_deltas, 1);
    assert_eq!(info.by_type.get("xor_float32"), Some(&1));
    // Once the delta is gone, the reference may go.
    assert!(store.delete_delta(&tk).unwrap());
    assert!(store.delete(&rk).unwrap());
    assert!(!store.exists(&tk).unwrap());
    drop(store);
    let ro = HDF5Store::open(&path, HDF5StoreOptions::new().mode(Mode::Read)).unwrap();
    assert!(ro.list_weights().unwrap().is_empty());
}

/// `store_delta_batch` writes many deltas in one commit: every one loads back by its key and
/// through the float codec's delta, and the file grows by far less than one commit per delta.
#[test]
fn a_batch_of_deltas_is_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let enc = DeltaEncoder::new(DeltaConfig::default());
    let mut sizes = Vec::new();
    for batched in [false, true] {
        let path = dir.path().join(format!("batch-{batched}.h5"));
        let store = HDF5Store::open(&path, HDF5StoreOptions::new()).unwrap();
        let mut deltas = Vec::new();
        let mut targets = Vec::new();
        for j in 0..40 {
            let base: Vec<f32> = (0..256)
                .map(|i| ((i + 7 * j) as f32 * 0.37).sin())
                .collect();
            let tuned: Vec<f32> = base
                .iter()
                .map(|v| f32::from_bits(v.to_bits() + 1))
                .collect();
            let r = WeightTensor::from_vec(format!("w{j}"), vec![256], base).unwrap();
            let t = WeightTensor::from_vec(format!("w{j}.ft"), vec![256], tuned).unwrap();
            let rk = store.store(&r).unwrap();
            let d = enc.encode_best_lossless(&t, &r, &rk).unwrap().unwrap();
            deltas.push((d, t.compute_hash()));
            targets.push(t);
        }
        let before = std::fs::metadata(&path).unwrap().len();
        if batched {
            let keys = store.store_delta_batch(&deltas).unwrap();
            assert_eq!(keys, deltas.iter().map(|(_, k)| *k).collect::<Vec<_>>());
        } else {
            for (d, k) in &deltas {
                store.store_delta(d, k).unwrap();
            }
        }
        drop(store);
        sizes.push(std::fs::metadata(&path).unwrap().len() - before);
        let store = HDF5Store::open(&path, HDF5StoreOptions::new().mode(Mode::Read)).unwrap();
        for (t, (_, k)) in targets.iter().zip(&deltas) {
            assert!(store.delta_exists(k).unwrap());
            assert_eq!(store.load(k).unwrap().unwrap().data(), t.data());
        }
    }
    assert!(
        sizes[1] * 2 < sizes[0],
        "one commit grew the file by {} bytes, one per delta by {}",
        sizes[1],
        sizes[0]
    );
}

//! How many commits writes make: one per call, or one for everything between
//! `defer_commits` and `commit_deferred` (what `coral add` does), counted as the syncs of the
//! store file that the file driver records.

use std::path::Path;

use coral_core::DType;
use coral_hdf5::testing::{self, DiskOp};
use coral_hdf5::{HDF5Store, HDF5StoreOptions};
use coral_store_api::testing::sample_tensor;
use coral_store_api::WeightStore;

fn batch(b: u64) -> Vec<coral_core::WeightTensor> {
    (0..3)
        .map(|i| sample_tensor(&format!("b{b}.{i}"), DType::F32, &[64, 32], b * 10 + i))
        .collect()
}

/// Stores three batches and deletes one weight, deferred or not; returns the syncs of the
/// store file while the store was open (its open and close included) and the keys it kept.
fn syncs_of(path: &Path, deferred: bool) -> (usize, Vec<coral_core::ContentHash>) {
    testing::start();
    let keys = {
        let store = HDF5Store::open(path, HDF5StoreOptions::new().chunk_bytes(4 << 10)).unwrap();
        if deferred {
            store.defer_commits().unwrap();
        }
        let mut keys = Vec::new();
        for b in 0..3 {
            let stored = store.store_unhashed_batch(&batch(b)).unwrap();
            keys.extend(stored.iter().map(|s| s.key));
        }
        assert!(store.delete(&keys.remove(0)).unwrap());
        if deferred {
            store.commit_deferred().unwrap();
        }
        keys.sort();
        assert_eq!(store.list_weights().unwrap(), keys);
        keys
    };
    let log = testing::stop();
    let syncs = log
        .iter()
        .filter(|op| matches!(op, DiskOp::Sync { path: p } if p == path))
        .count();
    (syncs, keys)
}

#[test]
fn deferred_writes_make_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (each, kept) = syncs_of(&dir.path().join("each.h5"), false);
    let (once, kept_deferred) = syncs_of(&dir.path().join("once.h5"), true);
    assert_eq!(kept, kept_deferred);
    // The new file's first commit at open, then three batches and a delete: four commits
    // more; deferred, one.
    assert_eq!(each, once + 3, "syncs: {each} one by one, {once} deferred");
    // Everything is there when the store opens again.
    let store = HDF5Store::open(
        dir.path().join("once.h5"),
        HDF5StoreOptions::new().mode(coral_hdf5::Mode::Read),
    )
    .unwrap();
    assert_eq!(store.list_weights().unwrap(), kept);
}

//! How many commits writes make: one per call, or one for everything between
//! `defer_commits` and `commit_deferred` (what `coral add` does), counted as the syncs of the
//! store file that the file driver records.

use std::path::Path;
use std::sync::Mutex;

use coral_core::DType;
use coral_hdf5::testing::{self, DiskOp};
use coral_hdf5::{HDF5Store, HDF5StoreOptions};
use coral_store_api::testing::sample_tensor;
use coral_store_api::WeightStore;

/// The driver's record is the process's: one test at a time records.
static RECORDING: Mutex<()> = Mutex::new(());

fn syncs_of_path(log: &[DiskOp], path: &Path) -> usize {
    log.iter()
        .filter(|op| matches!(op, DiskOp::Sync { path: p } if p == path))
        .count()
}

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
    (syncs_of_path(&log, path), keys)
}

#[test]
fn deferred_writes_make_one_commit() {
    let _one = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
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

/// A deferred commit closes the file and leaves it closed until the store is used again: a
/// store closed right after it (`coral add`) opens nothing more and commits nothing twice. One
/// read after it opens the file again (and sees everything); its close then commits again, as
/// every commit used to (the file was opened again at once).
#[test]
fn a_store_closed_after_its_commit_commits_once() {
    let _one = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let run = |path: &Path, read_after: bool| {
        testing::start();
        {
            let store =
                HDF5Store::open(path, HDF5StoreOptions::new().chunk_bytes(4 << 10)).unwrap();
            store.defer_commits().unwrap();
            store.store_unhashed_batch(&batch(0)).unwrap();
            store.commit_deferred().unwrap();
            if read_after {
                assert_eq!(store.list_weights().unwrap().len(), 3);
            }
        }
        syncs_of_path(&testing::stop(), path)
    };
    let closed = run(&dir.path().join("closed.h5"), false);
    let read = run(&dir.path().join("read.h5"), true);
    assert!(
        closed < read,
        "syncs: {closed} closed after the commit, {read} read after it"
    );
    for name in ["closed.h5", "read.h5"] {
        let store = HDF5Store::open(
            dir.path().join(name),
            HDF5StoreOptions::new().mode(coral_hdf5::Mode::Read),
        )
        .unwrap();
        let keys = store.list_weights().unwrap();
        assert_eq!(keys.len(), 3, "{name}");
        for key in keys {
            assert!(store.load(&key).unwrap().is_some(), "{name}: {key}");
        }
    }
}

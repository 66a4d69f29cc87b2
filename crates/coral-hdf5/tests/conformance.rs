//! The store-api conformance suite against `HDF5Store`, in several configurations.

use coral_core::ContentHash;
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
use coral_store_api::testing::{self, Harness};

struct H5Harness {
    dir: tempfile::TempDir,
    opts: HDF5StoreOptions,
    n: std::sync::atomic::AtomicUsize,
}

impl H5Harness {
    fn new(opts: HDF5StoreOptions) -> Self {
        H5Harness {
            dir: tempfile::tempdir().unwrap(),
            opts,
            n: Default::default(),
        }
    }
}

impl Harness for H5Harness {
    type Store = HDF5Store;

    fn open(&self, strict_integrity: bool) -> HDF5Store {
        let i = self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = self.dir.path().join(format!("store{i}.h5"));
        HDF5Store::open(path, self.opts.clone().strict_integrity(strict_integrity)).unwrap()
    }

    fn corrupt(&self, store: &HDF5Store, key: &ContentHash) {
        assert!(
            store.corrupt_for_testing(key).unwrap(),
            "corrupt: {key} not stored in full"
        );
    }

    fn reopen(&self, store: HDF5Store) -> Option<HDF5Store> {
        let path = store.path().to_path_buf();
        let opts = store.options().clone();
        drop(store);
        Some(HDF5Store::open(path, opts).unwrap())
    }
}

#[test]
fn default_gzip_shuffle() {
    testing::run_all(&H5Harness::new(HDF5StoreOptions::new()));
}

#[test]
fn zstd_small_chunks() {
    // 4 KiB chunks: many chunks per tensor, partial last chunks.
    testing::run_weights(&H5Harness::new(
        HDF5StoreOptions::new()
            .compression(Compression::Zstd)
            .chunk_bytes(4096),
    ));
}

#[test]
fn coral_float_codec() {
    // The float codec on every dtype (floats through it, the rest through zstd), whole and in
    // 4 KiB chunks.
    testing::run_all(&H5Harness::new(
        HDF5StoreOptions::new().compression(Compression::Coral),
    ));
    testing::run_weights(&H5Harness::new(
        HDF5StoreOptions::new()
            .compression(Compression::Coral)
            .chunk_bytes(4096),
    ));
}

#[test]
fn lzf_no_shuffle() {
    testing::run_weights(&H5Harness::new(
        HDF5StoreOptions::new()
            .compression(Compression::Lzf)
            .shuffle(false),
    ));
}

#[test]
fn uncompressed() {
    testing::run_weights(&H5Harness::new(
        HDF5StoreOptions::new().compression(Compression::None),
    ));
}

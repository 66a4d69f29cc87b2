//! The same weights stored into new stores give the same file, byte for byte, however the
//! compression threads happen to finish.

use coral_core::DType;
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
use coral_store_api::testing::sample_tensor;
use coral_store_api::WeightStore;

#[test]
fn the_same_batch_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Tensors of many chunks and of one, so chunks finish out of order.
    let batch: Vec<_> = (0..12u64)
        .map(|i| {
            let name = format!("layer.{i}.weight");
            let rows = if i % 3 == 0 { 400 } else { 16 + i as usize };
            let dtype = if i % 2 == 0 { DType::F32 } else { DType::BF16 };
            let t = sample_tensor(&name, dtype, &[rows, 256], i);
            (name, t)
        })
        .collect();
    for compression in [Compression::Zstd, Compression::Gzip] {
        let files: Vec<Vec<u8>> = (0..4)
            .map(|run| {
                let p = dir.path().join(format!("{compression}-{run}.h5"));
                let opts = HDF5StoreOptions::new()
                    .compression(compression)
                    .chunk_bytes(16 << 10);
                let store = HDF5Store::open(&p, opts).unwrap();
                store.store_batch(&batch).unwrap();
                drop(store);
                std::fs::read(&p).unwrap()
            })
            .collect();
        for (run, f) in files.iter().enumerate().skip(1) {
            assert_eq!(
                f.len(),
                files[0].len(),
                "{compression}: run {run} differs in size"
            );
            assert!(
                f == &files[0],
                "{compression}: run {run} differs in its bytes"
            );
        }
    }
}

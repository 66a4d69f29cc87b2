//! Test hook (feature `testing`): damaging a stored weight behind the store's back.

use std::sync::atomic::Ordering;

use coral_core::ContentHash;
use coral_store_api::Result;

use super::read::ChunkSrc;
use super::{corrupt, HDF5Store, RawRead};
use crate::chunk;
use crate::h5;

impl HDF5Store {
    /// Test hook: flips the lowest bit of the first data byte of the weight stored under `key`
    /// and writes it back through the dataset's own pipeline, so it still decodes but no longer
    /// hashes to its key. Returns false when the key is not stored in full or is empty.
    #[doc(hidden)]
    pub fn corrupt_for_testing(&self, key: &ContentHash) -> Result<bool> {
        let k = key.to_hex();
        self.with_write(|inner| {
            if !self.weight_present(inner, &k)? {
                return Ok(false);
            }
            let e = |e| self.err(e);
            let d = self.open_dataset(inner.weights.id(), &k).map_err(e)?;
            let meta = self.read_meta(d.id(), key)?;
            let es = meta.dtype.size();
            let raw = self.read_raw(d.id(), &k, meta.dtype, &meta.shape, false)?;
            // Rewriting a chunk frees its old space.
            self.space_epoch.fetch_add(1, Ordering::SeqCst);
            match raw {
                RawRead::Chunks {
                    pipeline,
                    chunk_bytes,
                    mut chunks,
                    ..
                } => {
                    let Some(Some((ChunkSrc::Bytes(bytes), mask))) =
                        chunks.get_mut(0).map(Option::take)
                    else {
                        return Ok(false);
                    };
                    let mut plain = chunk::decode(&pipeline, es, mask, bytes, chunk_bytes)
                        .map_err(|r| corrupt(&self.path, &k, r.to_string()))?;
                    let Some(b) = plain.first_mut() else {
                        return Ok(false);
                    };
                    *b ^= 1;
                    let (enc, mask) = chunk::encode(&pipeline, es, &plain)
                        .map_err(|r| corrupt(&self.path, &k, r.to_string()))?;
                    let offset = vec![0u64; meta.shape.len()];
                    // SAFETY: offset has rank entries; buffer valid.
                    let r = unsafe {
                        hdf5_sys::h5d::H5Dwrite_chunk(
                            d.id(),
                            hdf5_sys::h5p::H5P_DEFAULT,
                            mask,
                            offset.as_ptr(),
                            enc.len(),
                            enc.as_ptr() as *const _,
                        )
                    };
                    h5::check(r, || "corrupting".to_owned()).map_err(e)?;
                }
                RawRead::Whole(mut b) => {
                    let Some(x) = b.first_mut() else {
                        return Ok(false);
                    };
                    *x ^= 1;
                    let ftype = h5::dataset_type(d.id()).map_err(e)?;
                    // SAFETY: buffer holds the whole dataset in its file type.
                    let r = unsafe {
                        hdf5_sys::h5d::H5Dwrite(
                            d.id(),
                            ftype.id(),
                            hdf5_sys::h5s::H5S_ALL,
                            hdf5_sys::h5s::H5S_ALL,
                            hdf5_sys::h5p::H5P_DEFAULT,
                            b.as_ptr() as *const _,
                        )
                    };
                    h5::check(r, || "corrupting".to_owned()).map_err(e)?;
                }
            }
            drop(d);
            self.flush(inner)?;
            Ok(true)
        })
    }
}

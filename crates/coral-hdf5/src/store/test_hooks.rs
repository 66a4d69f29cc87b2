//! Test hooks (feature `testing`): damaging a stored weight behind the store's back, and
//! counting what reads do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use coral_core::ContentHash;
use coral_store_api::Result;

use super::read::ChunkSrc;
use super::{corrupt, HDF5Store, RawRead};
use crate::chunk;
use crate::h5;

/// A test's code run between locating chunks and reading them.
type Hook = Box<dyn FnMut() + Send>;

/// What reads did, counted since the store opened or the last
/// [`HDF5Store::take_read_stats_for_testing`], and a hook to run between locating chunks and
/// reading them.
#[derive(Default)]
pub(crate) struct Counters {
    chunks: AtomicU64,
    max_decoded: AtomicU64,
    retries: AtomicU64,
    after_locate: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("chunks", &self.chunks)
            .field("max_decoded", &self.max_decoded)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl Counters {
    /// One chunk read or located.
    pub(crate) fn chunk_read(&self) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
    }

    /// A buffer of `n` decoded bytes held at once by a partial or streamed load.
    pub(crate) fn decoded(&self, n: usize) {
        self.max_decoded.fetch_max(n as u64, Ordering::Relaxed);
    }

    /// A partial read done again because the space epoch moved.
    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs the hook of [`HDF5Store::set_after_locate_for_testing`], if any (outside the
    /// store's lock).
    pub(crate) fn after_locate(&self) {
        let hook = self
            .after_locate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut hook) = hook {
            hook();
            let mut slot = self.after_locate.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(hook);
            }
        }
    }
}

/// What reads did ([`HDF5Store::take_read_stats_for_testing`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Chunks read or located (by any load).
    pub chunks: u64,
    /// The largest buffer of decoded data `load_rows`, `load_byte_range` or one window of
    /// `load_into` held.
    pub max_decoded_bytes: u64,
    /// Partial reads (rows, bytes, windows) done again because file space was freed between
    /// locating their chunks and reading them.
    pub retries: u64,
}

impl HDF5Store {
    /// Test hook: what reads did since the store opened or the last call, and starts counting
    /// again.
    #[doc(hidden)]
    pub fn take_read_stats_for_testing(&self) -> ReadStats {
        ReadStats {
            chunks: self.test_counters.chunks.swap(0, Ordering::Relaxed),
            max_decoded_bytes: self.test_counters.max_decoded.swap(0, Ordering::Relaxed),
            retries: self.test_counters.retries.swap(0, Ordering::Relaxed),
        }
    }

    /// Test hook: `hook` runs in every partial read (`load_rows`, `load_byte_range`, each
    /// window of `load_into`) between locating its chunks under the lock and reading them
    /// outside it, on the reading thread; it may call the store (not a partial read: that one
    /// does not run the hook). `None` removes it.
    #[doc(hidden)]
    pub fn set_after_locate_for_testing(&self, hook: Option<Box<dyn FnMut() + Send>>) {
        *self
            .test_counters
            .after_locate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = hook;
    }

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

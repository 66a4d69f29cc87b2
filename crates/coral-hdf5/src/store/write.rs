//! Writing: the compression threads, planning and encoding datasets, creating them, writing
//! their chunks and attributes, and unlinking and committing (a flush).

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use bytes::Bytes;
use coral_core::{DType, WeightMetadata};
use coral_store_api::{Result, StoreError};
use hdf5_sys::h5i::hid_t;
use rayon::prelude::*;

use super::{commit_reopen, corrupt, HDF5Store, Inner};
use crate::chunk;
use crate::h5::{self, FilterInfo, H5Error, Hid};
use crate::options::Compression;

/// The threads that compress chunks for writes: a pool of their own, so that a caller running on
/// rayon's global pool (an application parallelising its stores with rayon) never waits, holding
/// the store, for work queued behind other global workers that wait for the store.
/// (`None` if no thread could be started: rayon's global pool is used then.)
pub(crate) fn compression_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("coral-hdf5-compress-{i}"))
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no compression threads of our own"))
            .ok()
    })
    .as_ref()
}

/// The largest buffer of `pool` (an empty one when there is none).
pub(crate) fn take_largest(pool: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
    let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
    match (0..pool.len()).max_by_key(|&i| pool[i].capacity()) {
        Some(i) => pool.swap_remove(i),
        None => Vec::new(),
    }
}

/// Runs `f` on this thread in a scope whose spawns run on [`compression_pool`]'s threads.
pub(crate) fn in_compression_scope<'scope, F>(f: F)
where
    F: for<'s> FnOnce(&'s rayon::Scope<'scope>),
{
    // In place: the closure runs on this thread (it waits for jobs to spawn) and only what it
    // spawns runs on the pool's threads.
    match compression_pool() {
        Some(pool) => pool.in_place_scope(f),
        None => rayon::in_place_scope(f),
    }
}

/// Uncompressed bytes of chunks compressed ahead of the writer at most: bounds what is in flight.
pub(crate) const IN_FLIGHT_BYTES: usize = 16 << 20;

/// Rows per chunk of a tensor of `d0` rows of `row_bytes` bytes: as few chunks as hold
/// `chunk_bytes` each, then rows spread evenly over them. HDF5 stores every chunk whole, so the
/// last one is padded to the full chunk; `floor(chunk_bytes / row_bytes)` rows a chunk would pad
/// the 30,522-row embeddings of all-MiniLM-L6-v2 by 2,238 rows (3.4 MB, and 107 KB of sign bits
/// under the float codec), even rows by 6.
pub(crate) fn chunk_rows(d0: usize, row_bytes: usize, chunk_bytes: usize) -> usize {
    let most = (chunk_bytes / row_bytes.max(1)).clamp(1, d0.max(1));
    let chunks = d0.div_ceil(most).max(1);
    d0.div_ceil(chunks).max(1)
}

/// A dataset to write: its layout and its data (compressed chunk by chunk while writing).
pub(crate) struct Encoded {
    pub(crate) key: String,
    pub(crate) dtype: DType,
    pub(crate) dims: Vec<u64>,
    pub(crate) layout: Layout,
    pub(crate) data: Bytes,
    /// The weight owner's hint: each chunk's input is released once compressed.
    pub(crate) release: Option<coral_core::Release>,
}

impl Encoded {
    /// Bytes of one chunk (0 for contiguous layouts).
    pub(crate) fn chunk_bytes(&self) -> usize {
        match &self.layout {
            Layout::Contiguous => 0,
            Layout::Chunked { rows, .. } => {
                let d0 = self.dims.first().copied().unwrap_or(1).max(1) as usize;
                self.data.len() / d0 * (*rows as usize)
            }
        }
    }

    /// Number of chunks (0 for contiguous layouts).
    pub(crate) fn n_chunks(&self) -> usize {
        let cb = self.chunk_bytes();
        if cb == 0 {
            0
        } else {
            self.data.len().div_ceil(cb)
        }
    }

    /// Compresses chunk `c` (the last one padded with zeros to a whole chunk) into `out`;
    /// returns its filter mask.
    pub(crate) fn encode_chunk(
        &self,
        c: usize,
        out: &mut Vec<u8>,
    ) -> std::result::Result<u32, chunk::ChunkError> {
        let Layout::Chunked { pipeline, .. } = &self.layout else {
            return Err(chunk::ChunkError("not chunked".to_owned()));
        };
        let cb = self.chunk_bytes();
        let start = c * cb;
        let end = (start + cb).min(self.data.len());
        let part = self
            .data
            .get(start..end)
            .ok_or_else(|| chunk::ChunkError(format!("chunk {c} out of range")))?;
        let es = self.dtype.size();
        if part.len() == cb {
            let r = chunk::encode_into(pipeline, es, part, out);
            if let Some(release) = &self.release {
                release.call(start..end);
            }
            r
        } else {
            thread_local! {
                static PADDED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            PADDED.with(|cell| {
                let mut padded = cell.borrow_mut();
                padded.clear();
                chunk::room(&mut padded, cb)?;
                padded.extend_from_slice(part);
                padded.resize(cb, 0);
                chunk::encode_into(pipeline, es, &padded, out)
            })
        }
    }
}

/// How a dataset is laid out.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// Scalars and empty tensors: contiguous, no filters.
    Contiguous,
    /// Chunked along the first axis with `rows` rows per chunk and this pipeline.
    Chunked {
        rows: u64,
        chunk_dims: Vec<u64>,
        pipeline: Vec<FilterInfo>,
    },
}

impl HDF5Store {
    /// Deletes the link `group/name`, which may free the space of its object. Call under the
    /// lock.
    pub(crate) fn unlink(&self, group: hid_t, name: &str) -> Result<()> {
        self.space_epoch.fetch_add(1, Ordering::SeqCst);
        h5::delete_link(group, name).map_err(|e| self.err(e))
    }

    /// Commits what this store wrote ([`commit_reopen`]), or, while commits are deferred
    /// ([`coral_store_api::WeightStore::defer_commits`]), notes that there is something to
    /// commit. Call under the lock.
    pub(crate) fn flush(&self, inner: &mut Inner) -> Result<()> {
        if self.deferred.load(Ordering::SeqCst) > 0 {
            self.uncommitted.store(true, Ordering::SeqCst);
            return Ok(());
        }
        commit_reopen(&self.path, &self.opts, inner)
    }

    /// Commits now, deferred or not (compaction copies the committed file). Call under the
    /// lock.
    pub(crate) fn commit_now(&self, inner: &mut Inner) -> Result<()> {
        self.uncommitted.store(false, Ordering::SeqCst);
        commit_reopen(&self.path, &self.opts, inner)
    }

    /// The pipeline new datasets of `dtype` get, rows of `row_values` values.
    pub(crate) fn pipeline(&self, dtype: DType, row_values: usize) -> Vec<FilterInfo> {
        let mut p = Vec::new();
        let es = dtype.size();
        let mut compression = self.opts.compression;
        if compression == Compression::Coral {
            match coral_core::codec::coral_kind(dtype) {
                // The codec models floats; anything else gets the byte-plane zstd encoder.
                coral_float_codec::Kind::Bytes => compression = Compression::Zstd,
                kind => {
                    return vec![FilterInfo {
                        id: h5::FILTER_CORAL,
                        cd: coral_h5plugin::cd_values(kind, row_values),
                    }]
                }
            }
        }
        if self.opts.shuffle && es > 1 && compression != Compression::None {
            p.push(FilterInfo {
                id: h5::FILTER_SHUFFLE,
                cd: vec![es as u32],
            });
        }
        match compression {
            Compression::None | Compression::Coral => {}
            Compression::Gzip => p.push(FilterInfo {
                id: h5::FILTER_DEFLATE,
                cd: vec![self.opts.effective_level().unwrap_or(4) as u32],
            }),
            Compression::Zstd => p.push(FilterInfo {
                id: h5::FILTER_ZSTD,
                cd: vec![self.opts.level.unwrap_or(1) as u32],
            }),
            Compression::Lzf => p.push(FilterInfo {
                id: h5::FILTER_LZF,
                cd: vec![],
            }),
        }
        p
    }

    /// Plans the layout of the tensor `key` of `dtype` and `shape`.
    pub(crate) fn layout(&self, key: &str, dtype: DType, shape: &[usize]) -> Result<Layout> {
        if shape.is_empty() || shape.contains(&0) {
            return Ok(Layout::Contiguous);
        }
        let row_bytes = shape[1..]
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                StoreError::InvalidConfig(format!("{key}: shape {shape:?}: a row's size overflows"))
            })?
            .max(1);
        let rows = chunk_rows(shape[0], row_bytes, self.opts.chunk_bytes);
        if rows.saturating_mul(row_bytes) > (u32::MAX as usize) {
            return Err(StoreError::InvalidConfig(format!(
                "shape {shape:?}: one row is {row_bytes} bytes, above HDF5's 4 GiB chunk limit"
            )));
        }
        let mut chunk_dims = vec![rows as u64];
        chunk_dims.extend(shape[1..].iter().map(|&d| d as u64));
        Ok(Layout::Chunked {
            rows: rows as u64,
            chunk_dims,
            pipeline: self.pipeline(dtype, row_bytes / dtype.size().max(1)),
        })
    }

    /// Encodes a tensor's data: chunks in parallel. Scalars and empty tensors are kept raw.
    pub(crate) fn encode(
        &self,
        key: String,
        dtype: DType,
        shape: &[usize],
        data: &Bytes,
        release: Option<coral_core::Release>,
    ) -> Result<Encoded> {
        let layout = self.layout(&key, dtype, shape)?;
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        Ok(Encoded {
            key,
            dtype,
            dims,
            layout,
            data: data.clone(),
            release,
        })
    }

    /// Creates the dataset of `enc` anonymously; contiguous data is written at once. Call
    /// under the lock.
    pub(crate) fn create_dataset(&self, inner: &Inner, enc: &Encoded) -> Result<Hid> {
        let e = |e| self.err(e);
        let ftype = h5::file_type(enc.dtype).map_err(e)?;
        let space = h5::simple_space(&enc.dims).map_err(e)?;
        let dcpl = match &enc.layout {
            Layout::Contiguous => h5::make_dcpl(None, &[]),
            Layout::Chunked {
                chunk_dims,
                pipeline,
                ..
            } => h5::make_dcpl(Some(chunk_dims), pipeline),
        }
        .map_err(e)?;
        let dset = h5::create_anon_dataset(inner.file.id(), ftype.id(), space.id(), dcpl.id())
            .map_err(e)?;
        if matches!(enc.layout, Layout::Contiguous) && !enc.data.is_empty() {
            // SAFETY: the buffer holds exactly the dataset's bytes in its file type.
            let r = unsafe {
                hdf5_sys::h5d::H5Dwrite(
                    dset.id(),
                    ftype.id(),
                    hdf5_sys::h5s::H5S_ALL,
                    hdf5_sys::h5s::H5S_ALL,
                    hdf5_sys::h5p::H5P_DEFAULT,
                    enc.data.as_ptr() as *const _,
                )
            };
            h5::check(r, || format!("writing {}", enc.key)).map_err(e)?;
        }
        Ok(dset)
    }

    /// Writes compressed chunk `c` of `enc` with direct chunk I/O. Call under the lock.
    pub(crate) fn write_chunk(
        &self,
        dset: &Hid,
        enc: &Encoded,
        c: usize,
        bytes: &[u8],
        mask: u32,
    ) -> Result<()> {
        let Layout::Chunked { rows, .. } = &enc.layout else {
            return Ok(());
        };
        let mut offset = vec![0u64; enc.dims.len()];
        offset[0] = c as u64 * rows;
        // SAFETY: offset has rank entries; buffer valid for its length.
        let r = unsafe {
            hdf5_sys::h5d::H5Dwrite_chunk(
                dset.id(),
                hdf5_sys::h5p::H5P_DEFAULT,
                mask,
                offset.as_ptr(),
                bytes.len(),
                bytes.as_ptr() as *const _,
            )
        };
        h5::check(r, || format!("writing chunk {c} of {}", enc.key)).map_err(|e| self.err(e))
    }

    /// Writes one dataset (a delta or a manifest; weights go through `ingest.rs`): its chunks
    /// are compressed on the compression threads, driven from a helper thread because this one
    /// holds the lock and must not wait for rayon work (see [`HDF5Store::with`]), then written in
    /// order; `attrs` (its commit marker last) and the link in `group` come after the last chunk.
    /// Call under the lock.
    pub(crate) fn write_dataset(
        &self,
        inner: &Inner,
        group: hid_t,
        enc: &Encoded,
        attrs: &dyn Fn(hid_t) -> std::result::Result<(), H5Error>,
    ) -> Result<()> {
        let compress = || {
            let run = || {
                (0..enc.n_chunks())
                    .into_par_iter()
                    .map(|c| {
                        let mut buf = Vec::new();
                        enc.encode_chunk(c, &mut buf).map(|mask| (buf, mask))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
            };
            match compression_pool() {
                Some(pool) => pool.install(run),
                None => run(),
            }
        };
        let chunks = std::thread::scope(|s| s.spawn(compress).join())
            .map_err(|_| corrupt(&self.path, &enc.key, "compressing: a worker panicked"))?
            .map_err(|err| corrupt(&self.path, &enc.key, format!("compressing: {err}")))?;
        let dset = self.create_dataset(inner, enc)?;
        for (c, (bytes, mask)) in chunks.iter().enumerate() {
            self.write_chunk(&dset, enc, c, bytes, *mask)?;
        }
        attrs(dset.id()).map_err(|e| self.err(e))?;
        h5::link_object(dset.id(), group, &enc.key).map_err(|e| self.err(e))
    }

    /// Writes a weight's attributes as the Python store does, `hash` last, except that the
    /// optional ones are left out when empty: `layer_type` and `model_name` when unset,
    /// `compression_info` when it is `{}`. The Python store reads each of them with `.get()`,
    /// a missing one as empty, and so does [`HDF5Store::read_meta`]; each costs about 70 bytes
    /// of object header and global heap per weight.
    pub(crate) fn weight_attrs(
        meta: &WeightMetadata,
        key: &str,
        obj: hid_t,
    ) -> std::result::Result<(), H5Error> {
        h5::write_str_attr(obj, "name", &meta.name)?;
        let shape: Vec<i64> = meta.shape.iter().map(|&d| d as i64).collect();
        h5::write_i64s_attr(obj, "shape", &shape)?;
        h5::write_str_attr(obj, "dtype", meta.dtype.name())?;
        for (attr, value) in [
            ("layer_type", &meta.layer_type),
            ("model_name", &meta.model_name),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                h5::write_str_attr(obj, attr, v)?;
            }
        }
        if !meta.compression_info.is_empty() {
            let ci = serde_json::Value::Object(meta.compression_info.clone()).to_string();
            h5::write_str_attr(obj, "compression_info", &ci)?;
        }
        h5::write_str_attr(obj, "hash", key)
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_rows;

    #[test]
    fn chunks_are_even_and_no_larger_than_asked() {
        // all-MiniLM-L6-v2's word embeddings, fp32 and bf16, in 4 MiB chunks.
        assert_eq!(chunk_rows(30522, 1536, 4 << 20), 2544);
        assert_eq!(chunk_rows(30522, 768, 4 << 20), 5087);
        assert_eq!(chunk_rows(10, 100, 4096), 10);
        assert_eq!(chunk_rows(100, 100, 4096), 34);
        assert_eq!(chunk_rows(7, 1 << 20, 4096), 1);
        assert_eq!(chunk_rows(1, 1, 4096), 1);
        for d0 in 1..300usize {
            for row in [1usize, 3, 64, 1000, 5000] {
                let r = chunk_rows(d0, row, 4096);
                let most = (4096 / row).clamp(1, d0);
                let chunks = d0.div_ceil(r);
                assert!(r <= most, "{d0} rows of {row} B: {r} rows a chunk");
                assert_eq!(
                    chunks,
                    d0.div_ceil(most),
                    "{d0} rows of {row} B: more chunks"
                );
                assert!(
                    chunks * r - d0 < chunks,
                    "{d0} rows of {row} B: padding {}",
                    chunks * r - d0
                );
            }
        }
    }
}

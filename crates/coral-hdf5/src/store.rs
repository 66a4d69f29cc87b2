//! `HDF5Store`: the seed's local store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use coral_core::{
    ContentHash, DType, HashAlgorithm, HashedWeight, JsonMap, WeightMetadata, WeightTensor,
};
use coral_store_api::{Result, StorageInfo, StoreError, Stored, StoredForm, WeightStore};
use hdf5_sys::h5i::hid_t;
use rayon::prelude::*;

use crate::chunk;
use crate::h5::{self, FilterInfo, H5Error, Hid, Kind};
use crate::ingest::KeyGiven;
use crate::journal;
use crate::options::{Compression, HDF5StoreOptions, Mode};

/// Group of full weights.
pub const WEIGHTS: &str = "weights";
/// The seed's legacy metadata group (created, left empty).
pub const METADATA: &str = "metadata";
/// Group of deltas.
pub const DELTAS: &str = "deltas";
/// Group of model manifests.
pub const MODELS: &str = "models";

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
/// Compressed bytes read per group in loads (one group decodes while the next is read).
const LOAD_GROUP_BYTES: usize = 16 << 20;

/// Coral's local store: one HDF5 file with the seed's layout (see `docs/format.md`).
///
/// Every method is safe to call from many threads; HDF5 calls are serialized on the library's
/// process-wide lock while hashing, compression and decompression run in parallel on rayon.
pub struct HDF5Store {
    pub(crate) path: PathBuf,
    pub(crate) opts: HDF5StoreOptions,
    pub(crate) inner: Mutex<Option<Inner>>,
    /// Bumped (under the mutex) before anything that may free file space: a load that read chunk
    /// locations under the mutex and the chunks themselves outside it checks that it did not
    /// change in between (see [`HDF5Store::load_full`]).
    pub(crate) space_epoch: AtomicU64,
    /// The file's bytes for the checked string reader, opened on first use (`crate::vlen`).
    pub(crate) raw: std::sync::OnceLock<Option<crate::vlen::RawFile>>,
}

impl std::fmt::Debug for HDF5Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HDF5Store")
            .field("path", &self.path)
            .field("options", &self.opts)
            .finish()
    }
}

/// The open file and its groups.
#[derive(Debug)]
pub(crate) struct Inner {
    // Field order is drop order: groups before the file.
    pub(crate) weights: Hid,
    pub(crate) deltas: Option<Hid>,
    pub(crate) models: Option<Hid>,
    pub(crate) file: Hid,
    pub(crate) writable: bool,
    /// The same file opened again for positional reads of chunks outside HDF5's lock (`None`
    /// when the file has a user block, whose chunk addresses are not file offsets).
    pub(crate) reader: Option<std::fs::File>,
    /// A writer's lock, held from before HDF5 opens the file until the store closes.
    pub(crate) lock: Option<journal::WriterLock>,
}

impl Inner {
    /// Closes the groups, then the file, reporting a failure of the file's close. Call under
    /// the lock.
    pub(crate) fn close(self) -> std::result::Result<(), H5Error> {
        let Inner {
            weights,
            deltas,
            models,
            file,
            ..
        } = self;
        drop((weights, deltas, models));
        file.close()
    }
}

/// A dataset to write: its layout and its data (compressed chunk by chunk while writing).
pub(crate) struct Encoded {
    pub(crate) key: String,
    pub(crate) dtype: DType,
    pub(crate) dims: Vec<u64>,
    pub(crate) layout: Layout,
    pub(crate) data: Bytes,
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
            chunk::encode_into(pipeline, es, part, out)
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

/// The error of a failed HDF5 call on the store at `path`. When the file driver saw the
/// operating system fail (a full disk, a read-only file system, a lock held elsewhere), that
/// is the error, in one line; HDF5's stack only adds its own layers of "unable to write".
pub(crate) fn h5err(path: &Path, e: H5Error) -> StoreError {
    if let Some(os) = journal::take_error() {
        return os_error(path, &e.what, os);
    }
    if e.is_lock_error() {
        return StoreError::Locked {
            location: path.display().to_string(),
            reason: e.to_string(),
        };
    }
    StoreError::backend(format!("{}", path.display()), e)
}

/// An operating-system error while doing `what` on the store at `path`.
pub(crate) fn os_error(path: &Path, what: &str, os: std::io::Error) -> StoreError {
    if os.kind() == std::io::ErrorKind::WouldBlock {
        return StoreError::Locked {
            location: path.display().to_string(),
            reason: os.to_string(),
        };
    }
    let at = path.display().to_string();
    if what.contains(&at) {
        StoreError::backend(what.to_owned(), os)
    } else {
        StoreError::backend(format!("{what} {at}"), os)
    }
}

pub(crate) fn corrupt(path: &Path, key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: path.display().to_string(),
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl HDF5Store {
    /// Opens (or creates, by mode) the store at `path`. Options are checked first: an invalid
    /// option leaves the file untouched. Errors name the path: a missing file in `r`/`r+` mode,
    /// a file that is not HDF5 ([`StoreError::NotAStore`]), an HDF5 file without the Coral
    /// layout opened `r`/`r+` (or with other content, opened `a`), a file another process holds
    /// for writing ([`StoreError::Locked`]).
    pub fn open(path: impl AsRef<Path>, opts: HDF5StoreOptions) -> Result<HDF5Store> {
        opts.validate()?;
        let path = path.as_ref().to_path_buf();
        let inner = open_file(&path, &opts)?;
        Ok(HDF5Store {
            path,
            opts,
            inner: Mutex::new(Some(inner)),
            space_epoch: AtomicU64::new(0),
            raw: std::sync::OnceLock::new(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> &HDF5StoreOptions {
        &self.opts
    }

    /// Runs `f` on the open file under the store's mutex and the HDF5 lock. `f` must never
    /// wait for rayon work (a parallel iterator, `join`, a scope's end): a rayon worker that
    /// waits runs other queued work meanwhile, and if that is a call on this store it waits for
    /// the mutex this thread holds. Hand such work to another thread instead (see `ingest.rs`).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inner) = guard.as_mut() else {
            return Err(StoreError::Closed {
                location: self.path.display().to_string(),
            });
        };
        h5::locked(|| f(inner))
    }

    pub(crate) fn with_write<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        self.with(|inner| {
            if !inner.writable {
                return Err(StoreError::ReadOnly {
                    location: self.path.display().to_string(),
                });
            }
            f(inner)
        })
    }

    pub(crate) fn err(&self, e: H5Error) -> StoreError {
        h5err(&self.path, e)
    }

    /// Deletes the link `group/name`, which may free the space of its object. Call under the
    /// lock.
    pub(crate) fn unlink(&self, group: hid_t, name: &str) -> Result<()> {
        self.space_epoch.fetch_add(1, Ordering::SeqCst);
        h5::delete_link(group, name).map_err(|e| self.err(e))
    }

    /// Commits what this store wrote ([`commit_reopen`]). Call under the lock.
    pub(crate) fn flush(&self, inner: &mut Inner) -> Result<()> {
        commit_reopen(&self.path, &self.opts, inner)
    }

    /// The pipeline new datasets of `dtype` get.
    pub(crate) fn pipeline(&self, dtype: DType) -> Vec<FilterInfo> {
        let mut p = Vec::new();
        let es = dtype.size();
        if self.opts.shuffle && es > 1 && self.opts.compression != Compression::None {
            p.push(FilterInfo {
                id: h5::FILTER_SHUFFLE,
                cd: vec![es as u32],
            });
        }
        match self.opts.compression {
            Compression::None => {}
            Compression::Gzip => p.push(FilterInfo {
                id: h5::FILTER_DEFLATE,
                cd: vec![self.opts.effective_level().unwrap_or(4) as u32],
            }),
            Compression::Zstd => p.push(FilterInfo {
                id: h5::FILTER_ZSTD,
                cd: vec![self.opts.effective_level().unwrap_or(1) as u32],
            }),
            Compression::Lzf => p.push(FilterInfo {
                id: h5::FILTER_LZF,
                cd: vec![],
            }),
        }
        p
    }

    /// Plans the layout of a tensor of `dtype` and `shape`.
    pub(crate) fn layout(&self, dtype: DType, shape: &[usize]) -> Result<Layout> {
        if shape.is_empty() || shape.contains(&0) {
            return Ok(Layout::Contiguous);
        }
        let row_elems: usize = shape[1..].iter().product();
        let row_bytes = row_elems.saturating_mul(dtype.size()).max(1);
        let rows = (self.opts.chunk_bytes / row_bytes).clamp(1, shape[0]);
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
            pipeline: self.pipeline(dtype),
        })
    }

    /// Encodes a tensor's data: chunks in parallel. Scalars and empty tensors are kept raw.
    pub(crate) fn encode(
        &self,
        key: String,
        dtype: DType,
        shape: &[usize],
        data: &Bytes,
    ) -> Result<Encoded> {
        let layout = self.layout(dtype, shape)?;
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        Ok(Encoded {
            key,
            dtype,
            dims,
            layout,
            data: data.clone(),
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

    /// Writes a weight's attributes exactly as the Python store does, `hash` last.
    pub(crate) fn weight_attrs(
        meta: &WeightMetadata,
        key: &str,
        obj: hid_t,
    ) -> std::result::Result<(), H5Error> {
        h5::write_str_attr(obj, "name", &meta.name)?;
        let shape: Vec<i64> = meta.shape.iter().map(|&d| d as i64).collect();
        h5::write_i64s_attr(obj, "shape", &shape)?;
        h5::write_str_attr(obj, "dtype", meta.dtype.name())?;
        h5::write_str_attr(obj, "layer_type", meta.layer_type.as_deref().unwrap_or(""))?;
        h5::write_str_attr(obj, "model_name", meta.model_name.as_deref().unwrap_or(""))?;
        let ci = serde_json::Value::Object(meta.compression_info.clone()).to_string();
        h5::write_str_attr(obj, "compression_info", &ci)?;
        h5::write_str_attr(obj, "hash", key)
    }

    /// True when `weights/<key>` exists and is committed (has its `hash` attribute).
    pub(crate) fn weight_present(&self, inner: &Inner, key: &str) -> Result<bool> {
        self.committed(inner.weights.id(), key, "hash")
    }

    /// True when `group/name` is a dataset that has its commit attribute `marker`, or a link
    /// whose object does not open. The journal rolls back interrupted writes, so such a link is
    /// damage (a flipped bit that libhdf5's own checks catch, as 1.14 and 2.x do for a
    /// dimension larger than its maximum): it counts as present, and its load fails naming it,
    /// rather than the weight silently going missing.
    pub(crate) fn committed(&self, group: hid_t, name: &str, marker: &str) -> Result<bool> {
        if !h5::link_exists(group, name).map_err(|e| self.err(e))? {
            return Ok(false);
        }
        let d = match self.open_dataset(group, name) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), name, error = %e, "an entry that does not open");
                return Ok(true);
            }
        };
        if let Some(raw) = self.raw() {
            if let Err(why) = raw.check_header(d.id()) {
                // Damaged, not absent: listed, and its load fails naming it (`read_meta`).
                tracing::debug!(path = %self.path.display(), name, error = %why, "damaged object header");
                return Ok(true);
            }
        }
        Ok(h5::attr_exists(d.id(), marker).unwrap_or(false))
    }

    /// Reads a weight's metadata from its dataset's attributes.
    pub(crate) fn read_meta(&self, dset: hid_t, key: &ContentHash) -> Result<WeightMetadata> {
        let k = key.to_hex();
        if let Some(raw) = self.raw() {
            raw.check_header(dset)
                .map_err(|why| corrupt(&self.path, &k, format!("object header: {why}")))?;
        }
        let e = |e| self.err(e);
        // An attribute that does not read is damage to this weight: the error names its key.
        let s = |name: &str| {
            h5::read_str_attr(dset, name, self.raw())
                .map_err(|err| corrupt(&self.path, &k, err.to_string()))
        };
        let name = s("name")?.unwrap_or_default();
        let dtype_name =
            s("dtype")?.ok_or_else(|| corrupt(&self.path, &k, "no dtype attribute"))?;
        let dtype = DType::from_name(&dtype_name)
            .map_err(|err| corrupt(&self.path, &k, err.to_string()))?;
        let shape = h5::read_i64s_attr(dset, "shape")
            .map_err(e)?
            .ok_or_else(|| corrupt(&self.path, &k, "no shape attribute"))?;
        let shape = shape
            .into_iter()
            .map(|d| {
                usize::try_from(d)
                    .map_err(|_| corrupt(&self.path, &k, format!("negative dimension {d}")))
            })
            .collect::<Result<Vec<usize>>>()?;
        let opt = |s: Option<String>| s.filter(|s| !s.is_empty());
        let layer_type = opt(s("layer_type")?);
        let model_name = opt(s("model_name")?);
        let ci = s("compression_info")?;
        let compression_info: JsonMap = match ci.as_deref() {
            None | Some("") => JsonMap::new(),
            Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(_) | Err(_) => {
                    return Err(corrupt(
                        &self.path,
                        &k,
                        format!("compression_info is not a JSON object: {s:?}"),
                    ))
                }
            },
        };
        let meta = WeightMetadata {
            name,
            shape,
            dtype,
            layer_type,
            model_name,
            compression_info,
            hash: Some(*key),
        };
        meta.checked_nbytes()
            .map_err(|err| corrupt(&self.path, &k, err.to_string()))?;
        Ok(meta)
    }

    /// Reads a dataset's stored bytes: compressed chunks for our own layout (decoded later, in
    /// parallel), or the whole array through HDF5's pipeline otherwise. With `locate`, chunks of
    /// our layout are not read but located (file offset and size), to be read later outside the
    /// lock through [`Inner::reader`].
    pub(crate) fn read_raw(
        &self,
        dset: hid_t,
        key: &str,
        dtype: DType,
        shape: &[usize],
        locate: bool,
    ) -> Result<RawRead> {
        let e = |e| self.err(e);
        let nbytes = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| corrupt(&self.path, key, "shape overflows"))?;
        let ftype = h5::dataset_type(dset).map_err(e)?;
        h5::check_readable_type(ftype.id(), dtype.size())
            .map_err(|r| corrupt(&self.path, key, r))?;
        let space = h5::dataset_space(dset).map_err(e)?;
        let dims = h5::space_dims(space.id()).map_err(e)?;
        let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let dims_bytes = dims
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d));
        if dims != want && !(dims.is_empty() && shape.is_empty()) {
            // h5py stores what numpy gives; accept any shape with the same element count.
            if dims_bytes != Some(nbytes as u64) {
                return Err(corrupt(
                    &self.path,
                    key,
                    format!("dataset shape {dims:?} does not match the shape attribute {shape:?}"),
                ));
            }
        }
        let dcpl = h5::dataset_dcpl(dset).map_err(e)?;
        let (pipeline, chunk_dims) = h5::dcpl_layout(dcpl.id()).map_err(e)?;
        // HDF5 creates no chunk larger than a fixed-size dimension; a layout that says so is
        // damaged, and libhdf5 would copy whole chunks of that size out of the smaller ones the
        // filters decode (SIGSEGV in H5Dread).
        if !chunk_dims.is_empty() {
            let max = h5::space_max_dims(space.id()).map_err(e)?;
            let too_big = chunk_dims.len() != dims.len()
                || chunk_dims
                    .iter()
                    .zip(dims.iter().zip(&max))
                    .any(|(&c, (&d, &m))| c > d && m == d);
            if too_big {
                return Err(corrupt(
                    &self.path,
                    key,
                    format!("chunks of {chunk_dims:?} for a dataset of {dims:?}"),
                ));
            }
        }
        let ours = !chunk_dims.is_empty()
            && chunk_dims.len() == dims.len()
            && chunk_dims[1..] == dims[1..]
            && chunk_dims[0] > 0
            && chunk::supported(&pipeline)
            && dims == want;
        if ours {
            let rows = chunk_dims[0];
            let n_chunks = dims[0].div_ceil(rows);
            // Sizes read from the file: checked, and allocations that may fail do (no abort).
            let chunk_bytes = shape[1..]
                .iter()
                .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
                .and_then(|row| row.checked_mul(usize::try_from(rows).ok()?))
                .ok_or_else(|| {
                    corrupt(&self.path, key, format!("chunks of {rows} rows overflow"))
                })?;
            let mut chunks = Vec::new();
            usize::try_from(n_chunks)
                .ok()
                .and_then(|n| chunks.try_reserve(n).ok())
                .ok_or_else(|| corrupt(&self.path, key, format!("{n_chunks} chunks")))?;
            let mut offset = vec![0u64; dims.len()];
            for i in 0..n_chunks {
                offset[0] = i * rows;
                let mut mask: u32 = 0;
                let mut addr: u64 = 0;
                let mut size: u64 = 0;
                // SAFETY: offset has rank entries; out pointers valid.
                let r = unsafe {
                    hdf5_sys::h5d::H5Dget_chunk_info_by_coord(
                        dset,
                        offset.as_ptr(),
                        &mut mask,
                        &mut addr,
                        &mut size,
                    )
                };
                h5::check(r, || format!("chunk {i} info of {key}")).map_err(e)?;
                if addr == u64::MAX || size == 0 {
                    chunks.push(None); // never written: fill value (zeros)
                    continue;
                }
                if size
                    > (chunk_bytes as u64)
                        .saturating_mul(2)
                        .saturating_add(1 << 20)
                {
                    return Err(corrupt(
                        &self.path,
                        key,
                        format!("chunk {i} is {size} bytes"),
                    ));
                }
                if locate {
                    chunks.push(Some((ChunkSrc::At { addr, size }, mask)));
                    continue;
                }
                let mut buf = usize::try_from(size)
                    .ok()
                    .and_then(crate::mem::zeroed)
                    .ok_or_else(|| {
                        corrupt(
                            &self.path,
                            key,
                            format!("cannot hold chunk {i} of {size} bytes"),
                        )
                    })?;
                let mut filters: u32 = 0;
                // SAFETY: buffer of the chunk's stored size.
                let r = unsafe { h5::read_chunk(dset, &offset, &mut filters, &mut buf) };
                h5::check(r, || format!("reading chunk {i} of {key}")).map_err(e)?;
                chunks.push(Some((ChunkSrc::Bytes(buf), filters)));
            }
            Ok(RawRead::Chunks {
                pipeline,
                chunk_bytes,
                chunks,
                nbytes,
            })
        } else {
            let mut buf = crate::mem::zeroed(nbytes)
                .ok_or_else(|| corrupt(&self.path, key, format!("cannot hold {nbytes} bytes")))?;
            if nbytes > 0 {
                // SAFETY: reading the whole dataset in its own (little-endian) file type into a
                // buffer of exactly its size.
                let r = unsafe {
                    hdf5_sys::h5d::H5Dread(
                        dset,
                        ftype.id(),
                        hdf5_sys::h5s::H5S_ALL,
                        hdf5_sys::h5s::H5S_ALL,
                        hdf5_sys::h5p::H5P_DEFAULT,
                        buf.as_mut_ptr() as *mut _,
                    )
                };
                h5::check(r, || format!("reading {key}")).map_err(e)?;
            }
            Ok(RawRead::Whole(buf))
        }
    }

    /// Checks `w` against `key`: the integrity error when strict, a warning otherwise.
    pub(crate) fn verify(&self, w: WeightTensor, key: &ContentHash) -> Result<HashedWeight> {
        coral_store_api::resolve::verified(w, key, self.opts.strict_integrity).map_err(|e| {
            if !matches!(e, StoreError::Integrity { .. }) {
                return e;
            }
            tracing::debug!(path = %self.path.display(), "integrity check failed");
            e
        })
    }

    /// Loads full weights (not deltas) for `keys`; absent ones are left out.
    ///
    /// Under the lock it reads metadata and locates chunks (and reads datasets that are not in
    /// Coral's chunk layout); outside it, chunks are read with positional reads on a second
    /// descriptor, decoded and verified on all cores, largest tensors first. Only an operation
    /// that frees file space (a delete, bumping `space_epoch` under the lock) could make a
    /// located chunk stale: when the epoch moved meanwhile, whatever was decoded is dropped and
    /// the load is done again, the last time with every chunk read under the lock.
    pub(crate) fn load_full(
        &self,
        keys: &[ContentHash],
    ) -> Result<HashMap<ContentHash, HashedWeight>> {
        const ATTEMPTS: usize = 3;
        for attempt in 0..=ATTEMPTS {
            let locate = attempt < ATTEMPTS;
            let (epoch, out) = self.load_full_once(keys, locate)?;
            if !locate || self.space_epoch.load(Ordering::SeqCst) == epoch {
                return out;
            }
            tracing::debug!(path = %self.path.display(), attempt, "file space freed during a load; loading again");
        }
        Err(corrupt(&self.path, "", "load retries exhausted"))
    }

    /// One pass of [`HDF5Store::load_full`]: the space epoch seen under the lock, and the result.
    #[allow(clippy::type_complexity)]
    fn load_full_once(
        &self,
        keys: &[ContentHash],
        locate: bool,
    ) -> Result<(u64, Result<HashMap<ContentHash, HashedWeight>>)> {
        type Group = Vec<(ContentHash, WeightMetadata, RawRead)>;
        let mut out = HashMap::with_capacity(keys.len());
        let mut seen = HashSet::new();
        let mut i = 0;
        let mut epoch = None;
        let reader = self.with(|inner| {
            Ok(match (&inner.reader, locate) {
                (Some(f), true) => Some(f.try_clone().map_err(|e| {
                    StoreError::backend(format!("reading {}", self.path.display()), e)
                })?),
                _ => None,
            })
        })?;
        // Reads one group (bounded bytes in memory) under the lock.
        let mut read_group = |i: &mut usize| -> Result<Group> {
            let mut group: Group = Vec::new();
            self.with(|inner| {
                let e0 = self.space_epoch.load(Ordering::SeqCst);
                if *epoch.get_or_insert(e0) != e0 && reader.is_some() {
                    return Ok(()); // located chunks may be stale: the caller starts again
                }
                let mut bytes = 0usize;
                while *i < keys.len() && (bytes < LOAD_GROUP_BYTES || group.is_empty()) {
                    let key = keys[*i];
                    *i += 1;
                    if !seen.insert(key) {
                        continue;
                    }
                    let k = key.to_hex();
                    if !self.weight_present(inner, &k)? {
                        continue;
                    }
                    let d = self
                        .open_dataset(inner.weights.id(), &k)
                        .map_err(|e| self.err(e))?;
                    let meta = self.read_meta(d.id(), &key)?;
                    let raw =
                        self.read_raw(d.id(), &k, meta.dtype, &meta.shape, reader.is_some())?;
                    bytes += raw.nbytes_in_flight();
                    group.push((key, meta, raw));
                }
                Ok(())
            })?;
            Ok(group)
        };
        let decode_group = |mut group: Group| -> Result<Vec<(ContentHash, HashedWeight)>> {
            // Largest first: hashing a large tensor is one thread's work, which the others
            // overlap with the smaller ones.
            group.sort_by_key(|(_, _, raw)| std::cmp::Reverse(raw.nbytes()));
            group
                .into_par_iter()
                .with_max_len(1)
                .map(|(key, meta, raw)| {
                    let k = key.to_hex();
                    let data = raw
                        .decode(meta.dtype.size(), reader.as_ref())
                        .map_err(|r| {
                            corrupt(&self.path, &k, format!("weight {:?}: {r}", meta.name))
                        })?;
                    let w = WeightTensor::new(meta, data)
                        .map_err(|err| corrupt(&self.path, &k, err.to_string()))?;
                    Ok((key, self.verify(w, &key)?))
                })
                .collect()
        };
        // Pipeline: read the next group while the previous one decodes and verifies.
        let mut pending = read_group(&mut i)?;
        let mut result = Ok(());
        while !pending.is_empty() {
            let current = std::mem::take(&mut pending);
            let more = i < keys.len();
            let (next, decoded) = rayon::join(
                || {
                    if more {
                        read_group(&mut i)
                    } else {
                        Ok(Vec::new())
                    }
                },
                || decode_group(current),
            );
            match decoded {
                Ok(d) => out.extend(d),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            pending = next?;
        }
        let epoch = epoch.unwrap_or_default();
        Ok((epoch, result.map(|()| out)))
    }

    /// Figures of the weights group.
    pub(crate) fn weights_info(&self, inner: &Inner) -> Result<(u64, u64, u64)> {
        let e = |e| self.err(e);
        let names = h5::link_names(inner.weights.id()).map_err(e)?;
        let (mut n, mut total, mut stored) = (0u64, 0u64, 0u64);
        for name in names {
            let Ok(key) = ContentHash::parse(&name) else {
                continue;
            };
            if !self.committed(inner.weights.id(), &name, "hash")? {
                continue;
            }
            let d = self.open_dataset(inner.weights.id(), &name).map_err(e)?;
            let meta = self.read_meta(d.id(), &key)?;
            n += 1;
            total += meta.checked_nbytes().unwrap_or(0) as u64;
            // SAFETY: valid dataset id.
            stored += unsafe { hdf5_sys::h5d::H5Dget_storage_size(d.id()) };
        }
        Ok((n, total, stored))
    }
}

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

/// Where a stored chunk's bytes are.
pub(crate) enum ChunkSrc {
    /// Read already.
    Bytes(Vec<u8>),
    /// At this file offset, this many bytes, to be read through [`Inner::reader`].
    At { addr: u64, size: u64 },
}

/// What was read for one dataset.
pub(crate) enum RawRead {
    /// Stored chunks (None: never written) and their filter masks, to decode.
    Chunks {
        pipeline: Vec<FilterInfo>,
        chunk_bytes: usize,
        chunks: Vec<Option<(ChunkSrc, u32)>>,
        nbytes: usize,
    },
    /// The whole array, already decoded by HDF5.
    Whole(Vec<u8>),
}

impl RawRead {
    /// Bytes held in memory (chunks located but not read count nothing).
    fn nbytes_in_flight(&self) -> usize {
        match self {
            RawRead::Chunks { chunks, .. } => chunks
                .iter()
                .flatten()
                .map(|(c, _)| match c {
                    ChunkSrc::Bytes(b) => b.len(),
                    ChunkSrc::At { .. } => 0,
                })
                .sum(),
            RawRead::Whole(b) => b.len(),
        }
    }

    /// The tensor's size in bytes.
    fn nbytes(&self) -> usize {
        match self {
            RawRead::Chunks { nbytes, .. } => *nbytes,
            RawRead::Whole(b) => b.len(),
        }
    }

    /// Decodes to the tensor's bytes (chunks in parallel, each read first through `reader`
    /// when only located).
    pub(crate) fn decode(
        self,
        element_size: usize,
        reader: Option<&std::fs::File>,
    ) -> std::result::Result<Vec<u8>, String> {
        thread_local! {
            static READ: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        match self {
            RawRead::Whole(b) => Ok(b),
            RawRead::Chunks {
                pipeline,
                chunk_bytes,
                chunks,
                nbytes,
            } => {
                let mut out = crate::mem::zeroed(nbytes)
                    .ok_or_else(|| format!("cannot allocate {nbytes} bytes"))?;
                out.par_chunks_mut(chunk_bytes.max(1))
                    .zip(chunks.into_par_iter())
                    .enumerate()
                    .try_for_each(|(i, (dst, c))| {
                        let mut decode = |bytes: &[u8], mask: u32| {
                            chunk::decode_into(
                                &pipeline,
                                element_size,
                                mask,
                                bytes,
                                chunk_bytes,
                                dst,
                            )
                            .map_err(|e| format!("chunk {i}: {e}"))
                        };
                        match c {
                            None => Ok::<(), String>(()),
                            Some((ChunkSrc::Bytes(bytes), mask)) => decode(&bytes, mask),
                            Some((ChunkSrc::At { addr, size }, mask)) => READ.with(|cell| {
                                let mut buf = cell.borrow_mut();
                                let file = reader.ok_or_else(|| {
                                    format!("chunk {i}: located, but the file has no reader")
                                })?;
                                let size = usize::try_from(size)
                                    .map_err(|_| format!("chunk {i} is {size} bytes"))?;
                                // The buffer only grows: no zeroing per chunk.
                                if buf.len() < size {
                                    let more = size - buf.len();
                                    chunk::room(&mut buf, more)
                                        .map_err(|e| format!("chunk {i}: {e}"))?;
                                    buf.resize(size, 0);
                                }
                                let buf = &mut buf[..size];
                                file.read_exact_at(buf, addr).map_err(|e| {
                                    format!("chunk {i}: reading {size} bytes at {addr}: {e}")
                                })?;
                                decode(buf, mask)
                            }),
                        }
                    })?;
                Ok(out)
            }
        }
    }
}

/// Marks the file's descriptor close-on-exec: HDF5 opens it without, so a child process spawned
/// while the store is open would inherit it, and with it the file lock, after we close.
pub(crate) fn set_cloexec(fid: hid_t) {
    let mut handle: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: for the default (sec2) driver the handle points to the `int` descriptor.
    unsafe {
        if hdf5_sys::h5f::H5Fget_vfd_handle(fid, hdf5_sys::h5p::H5P_DEFAULT, &mut handle) >= 0
            && !handle.is_null()
        {
            let fd = *(handle as *const libc::c_int);
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// The initial name-heap size of group `g` in a new file: room for about a hundred 64-character
/// keys in `weights/`; the other groups start small. HDF5 grows a heap that fills up.
pub(crate) fn heap_hint(g: &str) -> usize {
    if g == WEIGHTS {
        8 << 10
    } else {
        512
    }
}

pub(crate) fn open_file(path: &Path, opts: &HDF5StoreOptions) -> Result<Inner> {
    open_file_locked(path, opts, None)
}

/// [`open_file`] with the writer lock of `path` already held (a compaction locks its new file
/// before renaming it into place, so that no other writer gets in between).
pub(crate) fn open_file_locked(
    path: &Path,
    opts: &HDF5StoreOptions,
    held: Option<journal::WriterLock>,
) -> Result<Inner> {
    let loc = || path.display().to_string();
    let mode = opts.mode;
    // Roll back what a killed writer left half-done before anything reads the file.
    match journal::recover(path) {
        Ok(Some(r)) => {
            tracing::warn!(
                path = %loc(),
                records = r.records,
                size = r.committed,
                "rolled the store back to its last commit"
            );
            if r.committed == 0 {
                // Killed before its first commit: the store never existed.
                std::fs::remove_file(path).map_err(|e| {
                    StoreError::backend(format!("removing the uncommitted {}", loc()), e)
                })?;
            }
        }
        Ok(None) => {}
        Err(e) if mode == Mode::Read && e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(path = %loc(), "cannot roll back a read-only file: {e}");
        }
        Err(e) => {
            return Err(StoreError::backend(
                format!("rolling back {} from its journal", loc()),
                e,
            ))
        }
    }
    let exists = path.exists();
    if matches!(mode, Mode::Read | Mode::ReadWrite) && !exists {
        return Err(StoreError::backend(
            format!("opening {} (mode {})", loc(), mode.as_str()),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    if mode == Mode::CreateNew && exists {
        return Err(StoreError::backend(
            format!("creating {} (mode {})", loc(), mode.as_str()),
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file exists"),
        ));
    }
    let cpath = h5::cstr(&path.to_string_lossy()).map_err(|e| h5err(path, e))?;
    let open_existing = matches!(mode, Mode::Read | Mode::ReadWrite | Mode::Append) && exists;
    if open_existing {
        if path.is_dir() {
            return Err(StoreError::NotAStore {
                location: loc(),
                reason: "is a directory".to_owned(),
            });
        }
        let is = h5::locked(|| h5::is_hdf5(&cpath));
        if is <= 0 {
            return Err(StoreError::NotAStore {
                location: loc(),
                reason: "not an HDF5 file".to_owned(),
            });
        }
    } else if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::backend(format!("creating the directory of {}", loc()), e)
            })?;
        }
    }
    // Never silently without crash safety (checked before anything touches the file).
    if mode.writable() && !opts.allow_unjournaled && h5::locked(|| journal::driver().is_none()) {
        let (maj, min, rel) = h5::locked(journal::lib_version);
        return Err(StoreError::InvalidConfig(format!(
            "{}: the linked HDF5 is {maj}.{min}.{rel}, and Coral's crash-safe file driver \
                 knows 1.10.8 and later 1.10 releases, 1.14 and 2.x; writing would not survive a \
                 crash (HDF5StoreOptions::allow_unjournaled, or CORAL_ALLOW_UNJOURNALED=1, to \
                 write anyway)",
            loc()
        )));
    }
    // A writer locks the file before HDF5 opens it (creating it empty when it is new), and
    // keeps the lock while the file is closed and opened again at each commit.
    let lock = if mode.writable() {
        let lock = match held {
            Some(l) => l,
            None => journal::WriterLock::acquire(path, !open_existing, opts.wait)
                .map_err(|e| os_error(path, &format!("opening (mode {})", mode.as_str()), e))?,
        };
        if mode == Mode::Truncate {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0))
                .map_err(|e| os_error(path, "truncating", e))?;
        }
        Some(lock)
    } else {
        None
    };
    // A file a writer created but never committed is empty: it is a new store.
    let create = !open_existing
        || mode == Mode::Truncate
        || lock.as_ref().is_some_and(|l| l.len().is_ok_and(|n| n == 0));
    h5::locked(|| {
        let fid = open_h5(path, opts, create)?;
        let fid_raw = fid.id();
        set_cloexec(fid_raw);
        let has = |g: &str| h5::link_exists(fid_raw, g).map_err(|e| h5err(path, e));
        if mode.writable() {
            // Holding the write lock: a `<path>.compact-tmp` now is a killed compaction's.
            crate::compact::remove_stale_tmp(fid_raw, path)?;
        }
        if !has(WEIGHTS)? {
            let empty = h5::link_names(fid_raw)
                .map_err(|e| h5err(path, e))?
                .is_empty();
            let may_create = match mode {
                Mode::Read | Mode::ReadWrite => false,
                Mode::Append => empty,
                Mode::Truncate | Mode::CreateNew => true,
            };
            if !may_create {
                return Err(StoreError::NotAStore {
                    location: loc(),
                    reason: "an HDF5 file without the weights/ group".to_owned(),
                });
            }
        }
        let writable = mode.writable();
        if writable {
            for g in [WEIGHTS, METADATA, DELTAS, MODELS] {
                if !has(g)? {
                    drop(h5::create_group(fid_raw, g, heap_hint(g)).map_err(|e| h5err(path, e))?);
                }
            }
        }
        let (weights, deltas, models) = open_groups(path, fid_raw)?;
        // Chunk addresses are file offsets only without a user block.
        let reader = match h5::userblock_size(fid_raw) {
            Ok(0) => std::fs::File::open(path)
                .map_err(|e| tracing::debug!(path = %loc(), error = %e, "no second descriptor"))
                .ok(),
            _ => None,
        };
        let mut inner = Inner {
            weights,
            deltas,
            models,
            file: fid,
            writable,
            reader,
            lock,
        };
        if writable {
            commit_reopen(path, opts, &mut inner)?;
        }
        Ok(inner)
    })
}

/// Opens (or, with `create`, creates) the HDF5 file with Coral's property lists and the journal
/// driver. Call under the HDF5 lock.
fn open_h5(path: &Path, opts: &HDF5StoreOptions, create: bool) -> Result<Hid> {
    let loc = || path.display().to_string();
    let cpath = h5::cstr(&path.to_string_lossy()).map_err(|e| h5err(path, e))?;
    let fcpl = h5::make_fcpl(opts.persistent_free_space).map_err(|e| h5err(path, e))?;
    let fapl = h5::make_fapl(opts.mode.writable()).map_err(|e| h5err(path, e))?;
    journal::configure(journal::OpenConfig {
        wait: opts.wait,
        durable: opts.durable,
    });
    journal::take_error();
    // SAFETY: valid C string and property lists.
    let fid = unsafe {
        if create {
            hdf5_sys::h5f::H5Fcreate(
                cpath.as_ptr(),
                hdf5_sys::h5f::H5F_ACC_TRUNC,
                fcpl.id(),
                fapl.id(),
            )
        } else if opts.mode == Mode::Read {
            hdf5_sys::h5f::H5Fopen(cpath.as_ptr(), hdf5_sys::h5f::H5F_ACC_RDONLY, fapl.id())
        } else {
            hdf5_sys::h5f::H5Fopen(cpath.as_ptr(), hdf5_sys::h5f::H5F_ACC_RDWR, fapl.id())
        }
    };
    Hid::new(fid, Kind::File, || {
        format!("opening {} (mode {})", loc(), opts.mode.as_str())
    })
    .map_err(|e| h5err(path, e))
}

/// The store's groups in an open file: `weights/` (required), `deltas/` and `models/`.
fn open_groups(path: &Path, fid: hid_t) -> Result<(Hid, Option<Hid>, Option<Hid>)> {
    let has = |g: &str| h5::link_exists(fid, g).map_err(|e| h5err(path, e));
    let open = |g: &str| -> Result<Option<Hid>> {
        if has(g)? {
            h5::open_group(fid, g).map(Some).map_err(|e| h5err(path, e))
        } else {
            Ok(None)
        }
    };
    let weights = open(WEIGHTS)?.ok_or_else(|| StoreError::NotAStore {
        location: path.display().to_string(),
        reason: "no weights/ group".to_owned(),
    })?;
    Ok((weights, open(DELTAS)?, open(MODELS)?))
}

/// Commits a writer's changes by closing the file and opening it again. HDF5 writes its
/// persistent free-space managers only when a file closes: a flush leaves the file pointing at
/// free-space records that the open file has already reused, which a crash then turns into a
/// file HDF5 cannot open (seen with HDF5 1.10.8). Closing is the commit (the driver's
/// [`journal`] commit runs as the file closes); the writer lock stays held throughout. When the
/// commit fails, the driver rolls the file back to its last commit, and the store opens that.
/// Call under the HDF5 lock, with no other object of the file open.
pub(crate) fn commit_reopen(path: &Path, opts: &HDF5StoreOptions, inner: &mut Inner) -> Result<()> {
    let fid = inner.file.id();
    let weights = std::mem::replace(&mut inner.weights, Hid::closed(Kind::Group));
    drop((weights, inner.deltas.take(), inner.models.take()));
    // SAFETY: valid file id.
    let open = unsafe { hdf5_sys::h5f::H5Fget_obj_count(fid, hdf5_sys::h5f::H5F_OBJ_ALL) };
    let file = std::mem::replace(&mut inner.file, Hid::closed(Kind::File));
    let closed = if open > 1 {
        // Something else of the file is still open, so closing would not close it (and not
        // commit): an error in Coral, reported rather than hidden.
        drop(file);
        Err(StoreError::backend(
            format!("committing {}", path.display()),
            std::io::Error::other(format!("{} objects of the file are still open", open - 1)),
        ))
    } else {
        file.close().map_err(|e| h5err(path, e))
    };
    let fid = open_h5(path, opts, false)?;
    let (weights, deltas, models) = open_groups(path, fid.id())?;
    set_cloexec(fid.id());
    *inner = Inner {
        weights,
        deltas,
        models,
        file: fid,
        writable: inner.writable,
        reader: inner.reader.take(),
        lock: inner.lock.take(),
    };
    closed
}

impl WeightStore for HDF5Store {
    fn store_hashed(&self, weight: &HashedWeight) -> Result<Stored> {
        let r = self.store_many(&[(weight.weight(), KeyGiven::Known(*weight.key()))])?;
        r.into_iter()
            .next()
            .ok_or_else(|| corrupt(&self.path, "", "no key"))
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        self.opts.hash_algorithm
    }

    fn store(&self, weight: &WeightTensor) -> Result<ContentHash> {
        let r = self.store_many(&[(weight, KeyGiven::Compute)])?;
        r.into_iter()
            .next()
            .map(|s| s.key)
            .ok_or_else(|| corrupt(&self.path, "", "no key"))
    }

    fn store_with_key(&self, weight: &WeightTensor, key: &ContentHash) -> Result<ContentHash> {
        self.store_many(&[(weight, KeyGiven::Check(*key))])?;
        Ok(*key)
    }

    fn load_hashed(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        Ok(self
            .load_hashed_batch(std::slice::from_ref(key))?
            .remove(key))
    }

    fn exists(&self, key: &ContentHash) -> Result<bool> {
        self.with(|inner| {
            Ok(self.weight_present(inner, &key.to_hex())?
                || self.delta_present(inner, &key.to_hex())?)
        })
    }

    fn delete(&self, key: &ContentHash) -> Result<bool> {
        let dependents = self.dependents_of(key)?;
        if dependents > 0 {
            return Err(StoreError::Referenced {
                key: *key,
                dependents,
            });
        }
        self.with_write(|inner| {
            let k = key.to_hex();
            let mut deleted = false;
            let groups = std::iter::once(&inner.weights).chain(inner.deltas.as_ref());
            for g in groups {
                if h5::link_exists(g.id(), &k).map_err(|e| self.err(e))? {
                    self.unlink(g.id(), &k)?;
                    deleted = true;
                }
            }
            if deleted {
                self.flush(inner)?;
            }
            Ok(deleted)
        })
    }

    fn list_weights(&self) -> Result<Vec<ContentHash>> {
        let mut keys = self.with(|inner| {
            let e = |e| self.err(e);
            let mut out = Vec::new();
            for name in h5::link_names(inner.weights.id()).map_err(e)? {
                let Ok(key) = ContentHash::parse(&name) else {
                    continue;
                };
                if self.committed(inner.weights.id(), &name, "hash")? {
                    out.push(key);
                }
            }
            Ok(out)
        })?;
        keys.extend(self.list_delta_keys()?);
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    fn get_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>> {
        let full = self.with(|inner| {
            let k = key.to_hex();
            if !self.weight_present(inner, &k)? {
                return Ok(None);
            }
            let d = h5::open_dataset(inner.weights.id(), &k).map_err(|e| self.err(e))?;
            self.read_meta(d.id(), key).map(Some)
        })?;
        match full {
            Some(m) => Ok(Some(m)),
            None => self.delta_metadata(key),
        }
    }

    fn store_hashed_batch(&self, weights: &[HashedWeight]) -> Result<Vec<Stored>> {
        let items: Vec<(&WeightTensor, KeyGiven)> = weights
            .iter()
            .map(|w| (w.weight(), KeyGiven::Known(*w.key())))
            .collect();
        self.store_many(&items)
    }

    /// Hashes inside the pipeline, overlapped with compression and writes.
    fn store_batch(
        &self,
        weights: &[(String, WeightTensor)],
    ) -> Result<BTreeMap<String, ContentHash>> {
        let items: Vec<(&WeightTensor, KeyGiven)> = weights
            .iter()
            .map(|(_, w)| (w, KeyGiven::Compute))
            .collect();
        let stored = self.store_many(&items)?;
        Ok(weights
            .iter()
            .zip(stored)
            .map(|((n, _), s)| (n.clone(), s.key))
            .collect())
    }

    fn load_hashed_batch(
        &self,
        keys: &[ContentHash],
    ) -> Result<HashMap<ContentHash, HashedWeight>> {
        let mut out = self.load_full(keys)?;
        let missing: Vec<ContentHash> = keys
            .iter()
            .filter(|k| !out.contains_key(k))
            .copied()
            .collect();
        if !missing.is_empty() {
            for (k, w) in self.load_via_deltas(&missing)? {
                out.insert(k, w);
            }
        }
        Ok(out)
    }

    fn stored_form(&self, key: &ContentHash) -> Result<Option<StoredForm>> {
        let full = self.with(|inner| {
            let k = key.to_hex();
            if !self.weight_present(inner, &k)? {
                return Ok(None);
            }
            let e = |e| self.err(e);
            let d = self.open_dataset(inner.weights.id(), &k).map_err(e)?;
            let dcpl = h5::dataset_dcpl(d.id()).map_err(e)?;
            let (pipeline, _) = h5::dcpl_layout(dcpl.id()).map_err(e)?;
            // SAFETY: valid dataset id.
            let stored = unsafe { hdf5_sys::h5d::H5Dget_storage_size(d.id()) };
            Ok(Some(StoredForm {
                codec: Some(describe_pipeline(&pipeline)),
                delta: None,
                stored_bytes: Some(stored),
            }))
        })?;
        if full.is_some() {
            return Ok(full);
        }
        Ok(self.delta_header(key)?.map(|(d, _, stored)| StoredForm {
            codec: None,
            delta: Some((d.delta_type.name().to_owned(), d.reference_hash)),
            stored_bytes: Some(stored),
        }))
    }

    fn storage_info(&self) -> Result<StorageInfo> {
        // Every call that writes commits before it returns: nothing to flush here.
        let (n, total, stored, free) = self.with(|inner| {
            let (n, total, stored) = self.weights_info(inner)?;
            // SAFETY: valid file id, under the lock. HDF5 counts the sections of its
            // free-space managers (what a delete freed and later writes reuse).
            let free = unsafe { hdf5_sys::h5f::H5Fget_freespace(inner.file.id()) };
            journal::take_error();
            Ok((n, total, stored, u64::try_from(free).unwrap_or(0)))
        })?;
        let deltas = coral_store_api::DeltaStore::get_delta_storage_info(self)?;
        let file_size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(StorageInfo {
            backend: "hdf5".to_owned(),
            location: self.path.display().to_string(),
            file_size,
            reclaimable_bytes: free.min(file_size),
            total_weights: n,
            total_bytes: total,
            compressed_bytes: stored,
            compression_ratio: StorageInfo::saved_fraction(total, stored),
            compression: self.opts.describe(),
            deltas,
        })
    }

    fn close(&mut self) -> Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inner) = guard.take() else {
            return Ok(());
        };
        h5::locked(|| {
            // Closing the file commits what is left (the driver's commit runs as it closes);
            // after a failed write the driver rolls the file back to its last commit instead.
            let failed = inner.writable && journal::is_failed(inner.file.id());
            let Inner {
                weights,
                deltas,
                models,
                file,
                lock,
                ..
            } = inner;
            drop((weights, deltas, models));
            // SAFETY: valid file id.
            let open = unsafe {
                hdf5_sys::h5f::H5Fget_obj_count(
                    file.id(),
                    hdf5_sys::h5f::H5F_OBJ_DATASET
                        | hdf5_sys::h5f::H5F_OBJ_GROUP
                        | hdf5_sys::h5f::H5F_OBJ_DATATYPE
                        | hdf5_sys::h5f::H5F_OBJ_ATTR,
                )
            };
            if open > 0 {
                tracing::warn!(path = %self.path.display(), open, "objects still open at close");
            }
            let r = match file.close() {
                // HDF5 tries to flush once more as it closes, which fails on a failed file;
                // the driver has rolled it back to its last commit, and the write's own error
                // was reported when it happened.
                Err(e) if failed => {
                    journal::take_error();
                    tracing::debug!(path = %self.path.display(), error = %e, "closed after a failed write");
                    Ok(())
                }
                r => r.map_err(|e| self.err(e)),
            };
            drop(lock);
            r
        })
    }
}

impl Drop for HDF5Store {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(path = %self.path.display(), error = %e, "closing the HDF5 store failed");
        }
    }
}

/// A dataset's filter pipeline in the words of [`HDF5StoreOptions::describe`]
/// ("zstd-3+shuffle", "gzip-4", "none").
fn describe_pipeline(pipeline: &[FilterInfo]) -> String {
    let shuffle = pipeline.iter().any(|f| f.id == h5::FILTER_SHUFFLE);
    let codec = pipeline.iter().find_map(|f| match f.id {
        h5::FILTER_DEFLATE => Some(match f.cd.first() {
            Some(l) => format!("gzip-{l}"),
            None => "gzip".to_owned(),
        }),
        h5::FILTER_ZSTD => Some(match f.cd.first() {
            Some(l) => format!("zstd-{l}"),
            None => "zstd".to_owned(),
        }),
        h5::FILTER_LZF => Some("lzf".to_owned()),
        h5::FILTER_SHUFFLE => None,
        other => Some(format!("filter-{other}")),
    });
    match (codec, shuffle) {
        (Some(c), true) => format!("{c}+shuffle"),
        (Some(c), false) => c,
        (None, true) => "none+shuffle".to_owned(),
        (None, false) => "none".to_owned(),
    }
}

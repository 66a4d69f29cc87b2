//! Reading: presence and commit markers, a weight's metadata, a dataset's stored bytes, and
//! loading (and verifying) full weights.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use coral_core::{ContentHash, DType, HashedWeight, JsonMap, WeightMetadata, WeightTensor};
use coral_store_api::{Result, StoreError};
use hdf5_sys::h5i::hid_t;
use rayon::prelude::*;

use super::{corrupt, HDF5Store, Inner};
use crate::chunk;
use crate::h5::{self, FilterInfo, Hid};

/// Compressed bytes read per group in loads (one group decodes while the next is read).
const LOAD_GROUP_BYTES: usize = 16 << 20;

impl HDF5Store {
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
        match self.plan(dset, key, dtype, shape)? {
            Plan::Whole { ftype, nbytes } => self.read_whole(dset, key, ftype.id(), nbytes),
            Plan::Chunked {
                pipeline,
                grid,
                nbytes,
            } => {
                let chunks = self.read_chunks(dset, &grid, 0..grid.n_chunks, locate)?;
                Ok(RawRead::Chunks {
                    pipeline,
                    chunk_bytes: grid.chunk_bytes,
                    chunks,
                    nbytes,
                })
            }
        }
    }

    /// How a dataset's bytes are read, after checking its type, dims and chunk dims against the
    /// `dtype` and `shape` attributes: chunk by chunk in Coral's layout, whole otherwise.
    pub(crate) fn plan<'k>(
        &self,
        dset: hid_t,
        key: &'k str,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Plan<'k>> {
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
        self.check_dims(key, dtype, shape, &dims, nbytes)?;
        let dcpl = h5::dataset_dcpl(dset).map_err(e)?;
        let (pipeline, chunk_dims) = h5::dcpl_layout(dcpl.id()).map_err(e)?;
        if !chunk_dims.is_empty() {
            let max = h5::space_max_dims(space.id()).map_err(e)?;
            self.check_chunk_dims(key, &chunk_dims, &dims, &max)?;
        }
        if !coral_layout(&pipeline, &chunk_dims, &dims, shape) {
            return Ok(Plan::Whole { ftype, nbytes });
        }
        // Coral's layout: `chunk_dims`, `dims` and `shape` have one rank, at least 1.
        let grid = self.chunk_grid(key, dtype, shape, &dims, chunk_dims[0])?;
        Ok(Plan::Chunked {
            pipeline,
            grid,
            nbytes,
        })
    }

    /// Checks the dataset's `dims` against the `shape` attribute (`nbytes` bytes of `dtype`).
    fn check_dims(
        &self,
        key: &str,
        dtype: DType,
        shape: &[usize],
        dims: &[u64],
        nbytes: usize,
    ) -> Result<()> {
        let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        if dims == want || (dims.is_empty() && shape.is_empty()) {
            return Ok(());
        }
        // h5py stores what numpy gives; accept any shape with the same element count.
        let dims_bytes = dims
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d));
        if dims_bytes != Some(nbytes as u64) {
            return Err(corrupt(
                &self.path,
                key,
                format!("dataset shape {dims:?} does not match the shape attribute {shape:?}"),
            ));
        }
        Ok(())
    }

    /// HDF5 creates no chunk larger than a fixed-size dimension; a layout that says so is
    /// damaged, and libhdf5 would copy whole chunks of that size out of the smaller ones the
    /// filters decode (SIGSEGV in H5Dread). `max`: the dataset's maximum dims.
    fn check_chunk_dims(
        &self,
        key: &str,
        chunk_dims: &[u64],
        dims: &[u64],
        max: &[u64],
    ) -> Result<()> {
        let too_big = chunk_dims.len() != dims.len()
            || chunk_dims
                .iter()
                .zip(dims.iter().zip(max))
                .any(|(&c, (&d, &m))| c > d && m == d);
        if too_big {
            return Err(corrupt(
                &self.path,
                key,
                format!("chunks of {chunk_dims:?} for a dataset of {dims:?}"),
            ));
        }
        Ok(())
    }

    /// The chunks of a dataset in Coral's layout, `rows` rows each.
    fn chunk_grid<'k>(
        &self,
        key: &'k str,
        dtype: DType,
        shape: &[usize],
        dims: &[u64],
        rows: u64,
    ) -> Result<ChunkGrid<'k>> {
        // Sizes read from the file: checked.
        let overflow = || corrupt(&self.path, key, format!("chunks of {rows} rows overflow"));
        let row_bytes = shape[1..]
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(overflow)?;
        let chunk_bytes = usize::try_from(rows)
            .ok()
            .and_then(|r| row_bytes.checked_mul(r))
            .ok_or_else(overflow)?;
        Ok(ChunkGrid {
            key,
            rows,
            n_chunks: dims[0].div_ceil(rows),
            row_bytes,
            chunk_bytes,
            rank: dims.len(),
        })
    }

    /// Reads (with `locate`, locates) the chunks `range` of `grid`, in order; `None` for a
    /// chunk never written.
    pub(crate) fn read_chunks(
        &self,
        dset: hid_t,
        grid: &ChunkGrid<'_>,
        range: Range<u64>,
        locate: bool,
    ) -> Result<Vec<Option<(ChunkSrc, u32)>>> {
        let key = grid.key;
        if range.start > range.end || range.end > grid.n_chunks {
            return Err(corrupt(
                &self.path,
                key,
                format!("chunks {range:?} of {}", grid.n_chunks),
            ));
        }
        let n = range.end - range.start;
        // A count read from the file: an allocation that may fail does (no abort).
        let mut chunks = Vec::new();
        usize::try_from(n)
            .ok()
            .and_then(|n| chunks.try_reserve(n).ok())
            .ok_or_else(|| corrupt(&self.path, key, format!("{n} chunks")))?;
        let mut offset = vec![0u64; grid.rank];
        for i in range {
            // Below dims[0], as i < n_chunks: no overflow.
            offset[0] = i * grid.rows;
            chunks.push(self.read_chunk(dset, grid, i, &offset, locate)?);
        }
        Ok(chunks)
    }

    /// Reads (with `locate`, locates) chunk `i` of `grid`, at `offset`, with its filter mask;
    /// `None` when it was never written (its rows are the fill value, zeros).
    fn read_chunk(
        &self,
        dset: hid_t,
        grid: &ChunkGrid<'_>,
        i: u64,
        offset: &[u64],
        locate: bool,
    ) -> Result<Option<(ChunkSrc, u32)>> {
        let key = grid.key;
        #[cfg(feature = "testing")]
        self.test_counters.chunk_read();
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
        h5::check(r, || format!("chunk {i} info of {key}")).map_err(|e| self.err(e))?;
        if addr == u64::MAX || size == 0 {
            return Ok(None); // never written: fill value (zeros)
        }
        let most = (grid.chunk_bytes as u64)
            .saturating_mul(2)
            .saturating_add(1 << 20);
        if size > most {
            return Err(corrupt(
                &self.path,
                key,
                format!("chunk {i} is {size} bytes"),
            ));
        }
        if locate {
            return Ok(Some((ChunkSrc::At { addr, size }, mask)));
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
        let r = unsafe { h5::read_chunk(dset, offset, &mut filters, &mut buf) };
        h5::check(r, || format!("reading chunk {i} of {key}")).map_err(|e| self.err(e))?;
        Ok(Some((ChunkSrc::Bytes(buf), filters)))
    }

    /// Reads the whole dataset through HDF5's pipeline, in its own file type `ftype`:
    /// `nbytes` bytes.
    fn read_whole(&self, dset: hid_t, key: &str, ftype: hid_t, nbytes: usize) -> Result<RawRead> {
        let mut buf = crate::mem::zeroed(nbytes)
            .ok_or_else(|| corrupt(&self.path, key, format!("cannot hold {nbytes} bytes")))?;
        if nbytes > 0 {
            // SAFETY: reading the whole dataset in its own (little-endian) file type into a
            // buffer of exactly its size.
            let r = unsafe {
                hdf5_sys::h5d::H5Dread(
                    dset,
                    ftype,
                    hdf5_sys::h5s::H5S_ALL,
                    hdf5_sys::h5s::H5S_ALL,
                    hdf5_sys::h5p::H5P_DEFAULT,
                    buf.as_mut_ptr() as *mut _,
                )
            };
            h5::check(r, || format!("reading {key}")).map_err(|e| self.err(e))?;
        }
        Ok(RawRead::Whole(buf))
    }

    /// Checks `w` against `key`: the integrity error when strict, a warning otherwise.
    pub(crate) fn verify(&self, w: WeightTensor, key: &ContentHash) -> Result<HashedWeight> {
        coral_store_api::resolve::verified(w, key, self.opts.strict_integrity)
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
        // The epoch is taken with the reader, under the same lock: a compaction that swaps the
        // file between the two would otherwise leave this reader on the old file while chunks
        // are located in the new one, unnoticed (seen as "corrupt zstd data" now and then).
        let (reader, epoch0) = self.with(|inner| {
            let e0 = self.space_epoch.load(Ordering::SeqCst);
            let reader = match (&inner.reader, locate) {
                (Some(f), true) => Some(f.try_clone().map_err(|e| {
                    StoreError::backend(format!("reading {}", self.path.display()), e)
                })?),
                _ => None,
            };
            Ok((reader, e0))
        })?;
        let mut epoch = Some(epoch0);
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
                    // Only a bound on the group's memory: saturating.
                    bytes = bytes.saturating_add(raw.nbytes_in_flight());
                    group.push((key, meta, raw));
                }
                Ok(())
            })?;
            Ok(group)
        };
        type Decoded = Vec<(ContentHash, WeightTensor)>;
        let decode_group = |mut group: Group| -> Result<Decoded> {
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
                    Ok((key, w))
                })
                .collect()
        };
        let verify_group = |group: Decoded| -> Result<Vec<(ContentHash, HashedWeight)>> {
            group
                .into_par_iter()
                .with_max_len(1)
                .map(|(key, w)| Ok((key, self.verify(w, &key)?)))
                .collect()
        };
        // Pipeline: read the next group while the current one decodes and the previous one is
        // verified. Verifying apart from decoding keeps every core busy while one hashes a
        // large tensor (a single SHA-256 stream): the next group decodes meanwhile.
        let mut pending = read_group(&mut i)?;
        let mut decoded: Decoded = Vec::new();
        let mut result = Ok(());
        while !pending.is_empty() || !decoded.is_empty() {
            let current = std::mem::take(&mut pending);
            let to_verify = std::mem::take(&mut decoded);
            let more = i < keys.len();
            let ((next, dec), verified) = rayon::join(
                || {
                    rayon::join(
                        || {
                            if more {
                                read_group(&mut i)
                            } else {
                                Ok(Vec::new())
                            }
                        },
                        || decode_group(current),
                    )
                },
                || verify_group(to_verify),
            );
            match verified.and_then(|v| dec.map(|d| (v, d))) {
                Ok((v, d)) => {
                    out.extend(v);
                    decoded = d;
                }
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
            // Figures for statistics, from sizes the file gives: saturating.
            total = total.saturating_add(meta.checked_nbytes().unwrap_or(0) as u64);
            // SAFETY: valid dataset id.
            stored = stored.saturating_add(unsafe { hdf5_sys::h5d::H5Dget_storage_size(d.id()) });
        }
        Ok((n, total, stored))
    }
}

/// True when a dataset is in Coral's own chunk layout, which loads read chunk by chunk and
/// decode in parallel: chunked along the first axis only (whole rows of `dims`), through a
/// pipeline Coral decodes, with the dims of its `shape` attribute.
fn coral_layout(
    pipeline: &[FilterInfo],
    chunk_dims: &[u64],
    dims: &[u64],
    shape: &[usize],
) -> bool {
    let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    !chunk_dims.is_empty()
        && chunk_dims.len() == dims.len()
        && chunk_dims[1..] == dims[1..]
        && chunk_dims[0] > 0
        && chunk::supported(pipeline)
        && dims == want
}

/// The chunks of a dataset (`key`) in Coral's layout: `n_chunks` of `rows` rows of `row_bytes`
/// bytes, each `chunk_bytes` bytes decoded, in a dataset of rank `rank`.
pub(crate) struct ChunkGrid<'k> {
    pub(crate) key: &'k str,
    pub(crate) rows: u64,
    pub(crate) n_chunks: u64,
    pub(crate) row_bytes: usize,
    pub(crate) chunk_bytes: usize,
    pub(crate) rank: usize,
}

/// How a dataset's bytes are read ([`HDF5Store::plan`]).
pub(crate) enum Plan<'k> {
    /// Coral's layout: chunk by chunk, decoded by Coral, through `pipeline`.
    Chunked {
        pipeline: Vec<FilterInfo>,
        grid: ChunkGrid<'k>,
        nbytes: usize,
    },
    /// Anything else (h5py's datasets, scalars, empty tensors): the whole array through HDF5's
    /// pipeline, in its file type `ftype`.
    Whole { ftype: Hid, nbytes: usize },
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
        match self {
            RawRead::Whole(b) => Ok(b),
            RawRead::Chunks {
                pipeline,
                chunk_bytes,
                chunks,
                nbytes,
            } => {
                // Every byte is written below: decoded, or zero where no chunk was written.
                let mut out = crate::mem::for_overwrite(nbytes)
                    .ok_or_else(|| format!("cannot allocate {nbytes} bytes"))?;
                let covered = chunk_bytes.saturating_mul(chunks.len()).min(nbytes);
                out[covered..].fill(0);
                out.par_chunks_mut(chunk_bytes.max(1))
                    .zip(chunks.into_par_iter())
                    .enumerate()
                    .try_for_each(|(i, (dst, c))| match c {
                        None => {
                            // Never written: zeros (a reused buffer holds older bytes).
                            dst.fill(0);
                            Ok::<(), String>(())
                        }
                        Some((src, mask)) => with_stored(&src, reader, i as u64, |bytes| {
                            chunk::decode_into(
                                &pipeline,
                                element_size,
                                mask,
                                bytes,
                                chunk_bytes,
                                dst,
                            )
                            .map_err(|e| format!("chunk {i}: {e}"))
                        }),
                    })?;
                Ok(out)
            }
        }
    }
}

/// Runs `f` on the stored bytes of chunk `i`: those already read, or those at its location read
/// through `reader` into a buffer of this thread's (which only grows: no allocation or zeroing
/// per chunk).
pub(crate) fn with_stored<T>(
    src: &ChunkSrc,
    reader: Option<&std::fs::File>,
    i: u64,
    f: impl FnOnce(&[u8]) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    thread_local! {
        static READ: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    match src {
        ChunkSrc::Bytes(bytes) => f(bytes),
        &ChunkSrc::At { addr, size } => READ.with(|cell| {
            let mut buf = cell.borrow_mut();
            let file =
                reader.ok_or_else(|| format!("chunk {i}: located, but the file has no reader"))?;
            let size = usize::try_from(size).map_err(|_| format!("chunk {i} is {size} bytes"))?;
            if buf.len() < size {
                let more = size - buf.len();
                chunk::room(&mut buf, more).map_err(|e| format!("chunk {i}: {e}"))?;
                buf.resize(size, 0);
            }
            let buf = &mut buf[..size];
            file.read_exact_at(buf, addr)
                .map_err(|e| format!("chunk {i}: reading {size} bytes at {addr}: {e}"))?;
            f(buf)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::{ChunkSrc, RawRead};

    /// Decoding writes every byte of its buffer, which may come back from the pool with older
    /// bytes in it: stored chunks are decoded over them, chunks never written and bytes past
    /// the last chunk listed are zeros.
    #[test]
    fn decoding_into_a_reused_buffer_leaves_no_old_bytes() {
        let cb = 64 << 10;
        let nbytes = 3 * cb + 1000;
        for listed in [4usize, 2] {
            // A dirty buffer of a size no other test asks for, for the decode to take.
            coral_core::pool::recycle(vec![0xAB; nbytes + 7]);
            let chunk = |v: u8| Some((ChunkSrc::Bytes(vec![v; cb]), 0));
            let chunks = [chunk(1), None, chunk(3), chunk(4)]
                .into_iter()
                .take(listed)
                .collect();
            let out = RawRead::Chunks {
                pipeline: Vec::new(),
                chunk_bytes: cb,
                chunks,
                nbytes,
            }
            .decode(1, None)
            .unwrap();
            assert_eq!(out.len(), nbytes);
            let want = |i: usize| match (i / cb, listed) {
                (0, _) => 1,
                (2, 4) => 3,
                (3, 4) => 4,
                _ => 0,
            };
            assert!(
                out.iter().enumerate().all(|(i, &b)| b == want(i)),
                "{listed} chunks listed"
            );
        }
    }
}

//! Parts of one weight read from only the chunks they need: rows along the first axis
//! (`load_rows`), data bytes (`load_byte_range`), and the whole data streamed to a writer a
//! window of chunks at a time (`load_into`).
//!
//! Coral's layout chunks a weight along its first axis, `rows` rows per chunk
//! (`docs/format.md`), so rows `a..b` lie in chunks `a / rows` to `(b - 1) / rows`. Those chunks
//! are located under the store's lock and read and decoded outside it, in parallel, as
//! [`HDF5Store::load_full`] does, with the same guard: when the space epoch moved meanwhile (a
//! delete or a compaction may have reused a located chunk's space), what was decoded is dropped
//! and the read is done again, the last time with the chunks read under the lock. Each window of
//! a streamed load is such a read of its own, so the lock is never held across windows and other
//! calls go on between them.
//!
//! Weights kept as deltas, and datasets not in Coral's layout (h5py's, and the scalars and empty
//! tensors Coral stores contiguous), take the whole-weight path of [`coral_store_api::slice`].
//!
//! What is verified: rows and byte ranges are not checked against the key, which hashes the
//! whole weight (there are no per-chunk hashes); the codec's framing is (zstd frame sizes, zlib
//! checksums, decoded lengths). `load_into` hashes every byte as it writes it, in order, and
//! checks the key at the end.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use coral_core::{ContentHash, ContentHasher, WeightMetadata, WeightTensor};
use coral_store_api::{resolve, slice, Result, StoreError};
use rayon::prelude::*;

use super::read::{with_stored, ChunkSrc, Plan};
use super::{corrupt, HDF5Store};
use crate::chunk;
use crate::h5::FilterInfo;

/// Decoded bytes one window of `load_into` aims at. Up to four windows are in memory at once
/// (one read, one written, two waiting for or in the hash), and their buffers come back to
/// [`coral_core::pool`] for the windows after them: at 8 MiB, the 47 MB embedding of
/// all-MiniLM-L6-v2 writes up to a third of its windows into memory already faulted in, where
/// 16 MiB windows (three in all) all went to fresh memory.
const WINDOW_BYTES: usize = 8 << 20;

/// The most decoded bytes of one window, when more chunks than [`WINDOW_BYTES`] holds are needed
/// to give every thread one; a window holds at least one chunk whatever its size.
const WINDOW_MAX_BYTES: usize = 64 << 20;

/// Reads whose located chunks may have gone stale are done again this many times, then once
/// more with the chunks read under the lock.
const ATTEMPTS: usize = 3;

/// A weight's chunk layout, as a caller of [`HDF5Store::read_rows`] needs it.
#[derive(Debug, Clone, Copy)]
struct Grid {
    rows_per_chunk: u64,
    row_bytes: usize,
    chunk_bytes: usize,
}

/// Given the weight's metadata and layout: the rows to read (checked by the caller against the
/// metadata), or the caller's error.
type Want<'a> = dyn FnMut(&WeightMetadata, Grid) -> Result<Range<u64>> + 'a;

/// What [`HDF5Store::read_rows`] found.
enum Rows {
    /// Not stored in full: absent, or kept as a delta.
    Absent,
    /// Stored, but not in Coral's chunk layout.
    Foreign,
    /// The rows asked for, decoded.
    Read(Box<Part>),
}

/// Rows of a weight, decoded, with the metadata and layout they were read with.
struct Part {
    meta: WeightMetadata,
    rows: Range<u64>,
    grid: Grid,
    data: Vec<u8>,
}

/// What [`HDF5Store::locate_rows`] found under the lock.
enum Found {
    Absent,
    Foreign,
    Located(Box<Located>),
}

/// Rows of a weight whose chunks were located (or read) under the lock, to decode outside it.
struct Located {
    meta: WeightMetadata,
    rows: Range<u64>,
    grid: Grid,
    /// The index of `chunks[0]`.
    first_chunk: u64,
    pipeline: Vec<FilterInfo>,
    chunks: Vec<Option<(ChunkSrc, u32)>>,
    /// Set when chunks were only located: they are read through it, and may go stale.
    reader: Option<std::fs::File>,
    /// The space epoch under the lock.
    epoch: u64,
}

/// Chunks per window of `load_into` for chunks of `chunk_bytes` decoded bytes.
fn window_chunks(chunk_bytes: usize) -> u64 {
    let cb = chunk_bytes.max(1);
    let threads = rayon::current_num_threads();
    let n = (WINDOW_BYTES / cb).max(threads.min(WINDOW_MAX_BYTES / cb));
    n.max(1) as u64
}

/// The window of `load_into` that starts at row `start`.
fn window(start: u64) -> impl FnMut(&WeightMetadata, Grid) -> Result<Range<u64>> + Copy {
    move |meta, grid| {
        let n = meta.shape.first().copied().unwrap_or(0) as u64;
        let rows = grid
            .rows_per_chunk
            .saturating_mul(window_chunks(grid.chunk_bytes))
            .max(1);
        Ok(start.min(n)..start.saturating_add(rows).min(n))
    }
}

impl HDF5Store {
    /// `load_rows`: only the chunks that hold `rows`, decoded in parallel; unverified.
    pub(crate) fn load_rows_chunked(
        &self,
        key: &ContentHash,
        rows: Range<usize>,
    ) -> Result<Option<WeightTensor>> {
        let asked = rows.clone();
        let got = self.read_rows(key, &mut |meta, _| {
            slice::rows_to_bytes(key, meta, &asked)?;
            Ok(asked.start as u64..asked.end as u64)
        })?;
        match got {
            Rows::Absent | Rows::Foreign => slice::load_rows_whole(self, key, rows),
            Rows::Read(part) => {
                let meta = slice::rows_metadata(&part.meta, rows.len());
                WeightTensor::new(meta, part.data)
                    .map(Some)
                    .map_err(|e| corrupt(&self.path, &key.to_hex(), e.to_string()))
            }
        }
    }

    /// `load_byte_range`: the rows that hold `range` read as by
    /// [`load_rows_chunked`](Self::load_rows_chunked), then cut; unverified.
    pub(crate) fn load_byte_range_chunked(
        &self,
        key: &ContentHash,
        range: Range<u64>,
    ) -> Result<Option<Bytes>> {
        let asked = range.clone();
        let k = key.to_hex();
        let got = self.read_rows(key, &mut |meta, grid| {
            let nbytes = meta
                .checked_nbytes()
                .map_err(|e| corrupt(&self.path, &k, e.to_string()))?;
            slice::check_byte_range(key, &meta.name, nbytes as u64, &asked)?;
            let row = grid.row_bytes.max(1) as u64;
            let first = asked.start / row;
            let end = if asked.is_empty() {
                first
            } else {
                asked.end.div_ceil(row)
            };
            Ok(first..end)
        })?;
        let (rows, grid, data) = match got {
            Rows::Absent | Rows::Foreign => {
                return slice::load_byte_range_whole(self, key, range);
            }
            Rows::Read(part) => (part.rows, part.grid, part.data),
        };
        if asked.is_empty() {
            return Ok(Some(Bytes::new()));
        }
        // Where the first row read starts in the weight's data, and the range within the rows.
        let at = rows.start.saturating_mul(grid.row_bytes as u64);
        let part = usize::try_from(asked.start.saturating_sub(at))
            .ok()
            .zip(usize::try_from(asked.end.saturating_sub(at)).ok())
            .filter(|(a, b)| a <= b && *b <= data.len())
            .ok_or_else(|| {
                corrupt(
                    &self.path,
                    &k,
                    format!("bytes {asked:?} are not within the rows {rows:?} read"),
                )
            })?;
        // A small part of long rows is copied, so that the rows' buffer is not kept alive.
        Ok(Some(if (part.1 - part.0) < data.len() / 2 {
            Bytes::copy_from_slice(&data[part.0..part.1])
        } else {
            Bytes::from(data).slice(part.0..part.1)
        }))
    }

    /// `load_into`: windows of chunks read and decoded (in parallel) while the previous one is
    /// written, and hashed on a thread of its own, so the hash (one SHA-256 stream: 42 ms for
    /// all-MiniLM's 47 MB embedding) runs through the windows without holding up the reads and
    /// writes; at most four windows are held (one being read, one written, two waiting for or
    /// in the hash). Verified at the end.
    pub(crate) fn load_into_chunked(
        &self,
        key: &ContentHash,
        sink: &mut dyn std::io::Write,
    ) -> Result<Option<(WeightMetadata, ContentHash)>> {
        let (meta, first, mut next_start) = match self.read_rows(key, &mut window(0))? {
            Rows::Absent | Rows::Foreign => return slice::load_into_whole(self, key, sink),
            Rows::Read(part) => {
                let Part {
                    meta, rows, data, ..
                } = *part;
                (meta, data, rows.end)
            }
        };
        let n = meta.shape.first().copied().unwrap_or(0) as u64;
        let hasher = ContentHasher::new(key.algorithm(), meta.dtype, &meta.shape);
        let (to_hash, windows) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(1);
        let (streamed, hashed) = std::thread::scope(|ts| {
            let hashing = ts.spawn(move || {
                let mut hasher = hasher;
                for w in windows {
                    hasher.update(&w);
                    release_window(w);
                }
                hasher.finish()
            });
            let streamed = (|| -> Result<()> {
                let mut current = Arc::new(first);
                loop {
                    to_hash.send(Arc::clone(&current)).map_err(|_| {
                        slice::sink_error(key, std::io::Error::other("the hashing thread stopped"))
                    })?;
                    let mut next: Option<Result<Rows>> = None;
                    let mut written = Ok(());
                    // Not a `join`: the sink need not be `Send`, so it is written on this
                    // thread while the next window is read on the pool. Nothing here holds
                    // the store's lock.
                    rayon::in_place_scope(|s| {
                        if next_start < n {
                            let next = &mut next;
                            s.spawn(move |_| {
                                *next = Some(self.read_rows(key, &mut window(next_start)))
                            });
                        }
                        written = sink.write_all(&current);
                    });
                    written.map_err(|e| slice::sink_error(key, e))?;
                    let Some(next) = next else {
                        release_window(current);
                        return Ok(());
                    };
                    match next? {
                        Rows::Read(part)
                            if part.meta.shape == meta.shape
                                && part.meta.dtype == meta.dtype
                                && part.rows.start == next_start =>
                        {
                            release_window(std::mem::replace(&mut current, Arc::new(part.data)));
                            next_start = part.rows.end;
                        }
                        _ => {
                            return Err(StoreError::backend(
                                format!("reading weight {key} from {}", self.path.display()),
                                "it was deleted or replaced while it was being read",
                            ))
                        }
                    }
                }
            })();
            drop(to_hash);
            (streamed, hashing.join())
        });
        streamed?;
        let actual = hashed
            .map_err(|_| corrupt(&self.path, &key.to_hex(), "the hashing thread panicked"))?;
        resolve::check_hash(&meta.name, key, &actual, self.opts.strict_integrity)?;
        Ok(Some((meta, actual)))
    }

    /// Reads the rows `want` asks for of the weight stored in full under `key`, decoding only
    /// the chunks that hold them; located chunks that may have gone stale are read again (see
    /// [`HDF5Store::load_full`]).
    fn read_rows(&self, key: &ContentHash, want: &mut Want<'_>) -> Result<Rows> {
        let k = key.to_hex();
        for attempt in 0..=ATTEMPTS {
            let located = match self.locate_rows(key, &k, want, attempt < ATTEMPTS)? {
                Found::Absent => return Ok(Rows::Absent),
                Found::Foreign => return Ok(Rows::Foreign),
                Found::Located(l) => l,
            };
            let (may_be_stale, epoch) = (located.reader.is_some(), located.epoch);
            let name = located.meta.name.clone();
            #[cfg(feature = "testing")]
            self.test_counters.after_locate();
            let decoded = located.decode();
            if may_be_stale && self.space_epoch.load(Ordering::SeqCst) != epoch {
                tracing::debug!(path = %self.path.display(), attempt, "file space freed during a partial load; reading again");
                #[cfg(feature = "testing")]
                self.test_counters.retried();
                continue;
            }
            let part =
                decoded.map_err(|r| corrupt(&self.path, &k, format!("weight {name:?}: {r}")))?;
            #[cfg(feature = "testing")]
            self.test_counters.decoded(part.data.len());
            return Ok(Rows::Read(Box::new(part)));
        }
        Err(corrupt(&self.path, &k, "partial load retries exhausted"))
    }

    /// Under the lock: the weight's metadata and layout, the rows `want` asks for, and their
    /// chunks located (with `locate` and a reader) or read.
    fn locate_rows(
        &self,
        key: &ContentHash,
        k: &str,
        want: &mut Want<'_>,
        locate: bool,
    ) -> Result<Found> {
        self.with(|inner| {
            if !self.weight_present(inner, k)? {
                return Ok(Found::Absent);
            }
            let epoch = self.space_epoch.load(Ordering::SeqCst);
            let d = self
                .open_dataset(inner.weights.id(), k)
                .map_err(|e| self.err(e))?;
            let meta = self.read_meta(d.id(), key)?;
            let Plan::Chunked { pipeline, grid, .. } =
                self.plan(d.id(), k, meta.dtype, &meta.shape)?
            else {
                return Ok(Found::Foreign);
            };
            let layout = Grid {
                rows_per_chunk: grid.rows,
                row_bytes: grid.row_bytes,
                chunk_bytes: grid.chunk_bytes,
            };
            let rows = want(&meta, layout)?;
            // Coral's layout: the dataset's dims are the shape attribute's, rank at least 1.
            let n = meta.shape.first().copied().unwrap_or(0) as u64;
            if rows.start > rows.end || rows.end > n {
                return Err(corrupt(
                    &self.path,
                    k,
                    format!("rows {rows:?} asked of a weight of {n} rows"),
                ));
            }
            let first = rows.start / grid.rows;
            let end = if rows.is_empty() {
                first
            } else {
                (rows.end - 1) / grid.rows + 1
            };
            let reader = match (&inner.reader, locate) {
                (Some(f), true) => Some(f.try_clone().map_err(|e| {
                    StoreError::backend(format!("reading {}", self.path.display()), e)
                })?),
                _ => None,
            };
            let chunks = self.read_chunks(d.id(), &grid, first..end, reader.is_some())?;
            Ok(Found::Located(Box::new(Located {
                meta,
                rows,
                grid: layout,
                first_chunk: first,
                pipeline,
                chunks,
                reader,
                epoch,
            })))
        })
    }
}

impl Located {
    /// Reads (when only located) and decodes the chunks, in parallel, each into its part of the
    /// rows' buffer.
    fn decode(self) -> std::result::Result<Part, String> {
        let Located {
            meta,
            rows,
            grid,
            first_chunk,
            pipeline,
            chunks,
            reader,
            ..
        } = self;
        let Grid {
            rows_per_chunk,
            row_bytes,
            chunk_bytes,
        } = grid;
        let len = usize::try_from(rows.end - rows.start)
            .ok()
            .and_then(|n| n.checked_mul(row_bytes))
            .ok_or_else(|| format!("rows {rows:?} overflow"))?;
        let mut out =
            crate::mem::for_overwrite(len).ok_or_else(|| format!("cannot allocate {len} bytes"))?;
        let es = meta.dtype.size();
        // Each chunk's part of `out`, and where that part starts in the decoded chunk. The
        // chunks cover `rows` exactly, in order; every count is below the weight's rows, and a
        // part of a chunk is at most its `chunk_bytes`.
        let mut parts = Vec::with_capacity(chunks.len());
        let mut rest: &mut [u8] = &mut out;
        for (j, c) in chunks.into_iter().enumerate() {
            let i = first_chunk.saturating_add(j as u64);
            let c0 = i.saturating_mul(rows_per_chunk);
            let lo = c0.max(rows.start);
            let hi = c0.saturating_add(rows_per_chunk).min(rows.end);
            let bytes = |r: u64| {
                usize::try_from(r)
                    .ok()
                    .and_then(|r| r.checked_mul(row_bytes))
                    .ok_or_else(|| format!("chunk {i}: rows overflow"))
            };
            let (skip, take) = (bytes(lo.saturating_sub(c0))?, bytes(hi.saturating_sub(lo))?);
            if take > rest.len() {
                return Err(format!("chunk {i} is not within rows {rows:?}"));
            }
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            parts.push((i, dst, skip, c));
        }
        parts
            .into_par_iter()
            .with_max_len(1)
            .try_for_each(|(i, dst, skip, c)| match c {
                None => {
                    // Never written: zeros (a reused buffer holds older bytes).
                    dst.fill(0);
                    Ok(())
                }
                Some((src, mask)) => with_stored(&src, reader.as_ref(), i, |bytes| {
                    decode_part(&pipeline, es, mask, bytes, chunk_bytes, skip, dst)
                        .map_err(|e| format!("chunk {i}: {e}"))
                }),
            })?;
        Ok(Part {
            meta,
            rows,
            grid,
            data: out,
        })
    }
}

/// Decodes the bytes `skip..skip + dst.len()` of a chunk into `dst`: straight in when they are
/// its start, else through a buffer of this thread's that holds the chunk up to their end.
fn decode_part(
    pipeline: &[FilterInfo],
    element_size: usize,
    mask: u32,
    data: &[u8],
    chunk_bytes: usize,
    skip: usize,
    dst: &mut [u8],
) -> std::result::Result<(), chunk::ChunkError> {
    if skip == 0 {
        return chunk::decode_into(pipeline, element_size, mask, data, chunk_bytes, dst);
    }
    thread_local! {
        static PART: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PART.with(|cell| {
        let mut buf = cell.borrow_mut();
        let need = skip
            .checked_add(dst.len())
            .filter(|&n| n <= chunk_bytes)
            .ok_or_else(|| chunk::ChunkError(format!("bytes {skip}.. past the chunk's end")))?;
        if buf.len() < need {
            let more = need - buf.len();
            chunk::room(&mut buf, more)?;
            buf.resize(need, 0);
        }
        let whole = &mut buf[..need];
        chunk::decode_into(pipeline, element_size, mask, data, chunk_bytes, whole)?;
        dst.copy_from_slice(&whole[skip..]);
        Ok(())
    })
}

/// Gives a window back for reuse when this is its last holder (the writer or the hashing
/// thread, whichever is done with it last).
fn release_window(w: Arc<Vec<u8>>) {
    if let Ok(b) = Arc::try_unwrap(w) {
        coral_core::pool::recycle(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_a_few_chunks() {
        let threads = rayon::current_num_threads() as u64;
        assert!(window_chunks(4 << 20) >= 2.max(threads.min(16)));
        assert!(window_chunks(4 << 20) * (4 << 20) <= WINDOW_MAX_BYTES as u64);
        assert_eq!(window_chunks(256 << 20), 1);
        assert_eq!(window_chunks(0), window_chunks(1));
        assert!(window_chunks(1 << 20) >= 16.min(threads));
        let meta = WeightMetadata::new("w", vec![10], coral_core::DType::U8);
        let grid = Grid {
            rows_per_chunk: 3,
            row_bytes: 1,
            chunk_bytes: 3,
        };
        let mut w = window(9);
        assert_eq!(w(&meta, grid).unwrap(), 9..10);
        let mut w = window(12);
        assert_eq!(w(&meta, grid).unwrap(), 10..10);
    }
}

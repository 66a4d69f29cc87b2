//! `HDF5Store`: the seed's local store.
//!
//! The type and the [`WeightStore`] methods are here; the work is done in
//! [`open`] (the file, its driver, locks and groups, and the commit that reopens it),
//! [`read`] (metadata, stored bytes, loads and their verification), [`slices`] (rows, byte
//! ranges and streamed loads that read only the chunks they need) and [`write`] (encoding,
//! datasets, chunks, attributes, unlinks and flushes).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use coral_core::{ContentHash, HashAlgorithm, HashedWeight, WeightMetadata, WeightTensor};
use coral_store_api::{Result, StorageInfo, StoreError, Stored, StoredForm, WeightStore};

use crate::h5::{self, FilterInfo, H5Error, Hid};
use crate::ingest::KeyGiven;
use crate::journal;
use crate::options::HDF5StoreOptions;

mod open;
mod read;
mod slices;
#[cfg(feature = "testing")]
mod test_hooks;
mod write;

pub(crate) use open::{
    commit_close, commit_reopen, heap_hint, open_file, open_file_locked, reopen, set_cloexec,
};
pub(crate) use read::RawRead;
#[cfg(feature = "testing")]
pub use test_hooks::ReadStats;
pub(crate) use write::{in_compression_scope, take_largest, Encoded, IN_FLIGHT_BYTES};

/// Group of full weights.
pub const WEIGHTS: &str = "weights";
/// The seed's legacy metadata group (created, left empty).
pub const METADATA: &str = "metadata";
/// Group of deltas.
pub const DELTAS: &str = "deltas";
/// Group of model manifests.
pub const MODELS: &str = "models";

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
    /// Open [`WeightStore::defer_commits`] calls: while above 0, [`HDF5Store::flush`] only
    /// notes (in `uncommitted`) that there is something to commit.
    pub(crate) deferred: AtomicUsize,
    /// A flush was held back since the outermost `defer_commits`.
    pub(crate) uncommitted: AtomicBool,
    /// The file's bytes for the checked string reader, opened on first use (`crate::vlen`).
    pub(crate) raw: std::sync::OnceLock<Option<crate::vlen::RawFile>>,
    /// What reads did, for tests (`test_hooks`).
    #[cfg(feature = "testing")]
    pub(crate) test_counters: test_hooks::Counters,
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
    /// A commit closed the file ([`commit_close`]) and it opens again at the store's next use
    /// ([`Inner::ready`]): a store closed right after its last commit opens nothing more and
    /// commits nothing twice.
    pub(crate) closed_by_commit: bool,
}

impl Inner {
    /// Opens the file again when a commit left it closed. Call under the HDF5 lock.
    pub(crate) fn ready(&mut self, path: &Path, opts: &HDF5StoreOptions) -> Result<()> {
        if self.closed_by_commit {
            reopen(path, opts, self)?;
        }
        Ok(())
    }

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
            deferred: AtomicUsize::new(0),
            uncommitted: AtomicBool::new(false),
            raw: std::sync::OnceLock::new(),
            #[cfg(feature = "testing")]
            test_counters: test_hooks::Counters::default(),
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
        h5::locked(|| {
            inner.ready(&self.path, &self.opts)?;
            f(inner)
        })
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

    /// Reads and decodes (in parallel) only the chunks that hold `rows`: unverified, as the
    /// trait says. A weight kept as a delta, or in a dataset not in Coral's layout, is loaded
    /// whole (and verified) and cut.
    fn load_rows(&self, key: &ContentHash, rows: Range<usize>) -> Result<Option<WeightTensor>> {
        self.load_rows_chunked(key, rows)
    }

    /// Reads and decodes only the chunks that hold `range`: unverified, as the trait says.
    fn load_byte_range(&self, key: &ContentHash, range: Range<u64>) -> Result<Option<Bytes>> {
        self.load_byte_range_chunked(key, range)
    }

    /// Decodes a window of chunks at a time (16 to 64 MiB, or one chunk when chunks are
    /// larger; the next window decodes while the last is hashed and written), verified at the
    /// end. A weight kept as a delta, or in a dataset not in Coral's layout, is loaded whole.
    fn load_into(
        &self,
        key: &ContentHash,
        sink: &mut dyn std::io::Write,
    ) -> Result<Option<(WeightMetadata, ContentHash)>> {
        self.load_into_chunked(key, sink)
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

    /// Hashes inside the pipeline: while one thread hashes a large weight, the others
    /// compress (and this thread writes) the weights hashed before it.
    fn store_unhashed_batch(&self, weights: &[WeightTensor]) -> Result<Vec<Stored>> {
        let items: Vec<(&WeightTensor, KeyGiven)> =
            weights.iter().map(|w| (w, KeyGiven::Compute)).collect();
        self.store_many(&items)
    }

    fn defer_commits(&self) -> Result<()> {
        // Under the mutex, so that no flush is half-way through while the count changes.
        self.with(|_| {
            self.deferred.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn commit_deferred(&self) -> Result<()> {
        self.with(|inner| {
            let before = self
                .deferred
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
                .unwrap_or(0);
            if before == 1 && self.uncommitted.swap(false, Ordering::SeqCst) {
                // The file opens again only if the store is used again.
                commit_close(&self.path, inner)
            } else {
                Ok(())
            }
        })
    }

    fn store_hashed_batch(&self, weights: &[HashedWeight]) -> Result<Vec<Stored>> {
        let items: Vec<(&WeightTensor, KeyGiven)> = weights
            .iter()
            .map(|w| (w.weight(), KeyGiven::Known(*w.key())))
            .collect();
        self.store_many(&items)
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
        if inner.closed_by_commit {
            // The last commit closed the file: nothing is open, nothing left to commit; the
            // writer lock goes with `inner`.
            return Ok(());
        }
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

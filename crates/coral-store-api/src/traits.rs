//! The store traits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use coral_core::{
    ContentHash, Delta, HashAlgorithm, HashedWeight, ModelManifest, ModelName, WeightMetadata,
    WeightTensor,
};

use crate::error::Result;
use crate::info::{DeltaStorageInfo, StorageInfo};
use crate::lease::{Lease, LeaseKind, Leftovers};

/// What storing one weight did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The weight's key.
    pub key: ContentHash,
    /// False when the key was already present (nothing was written).
    pub new: bool,
    /// Bytes the weight now takes in the store (its compressed chunks or object); 0 when it
    /// was already present.
    pub stored_bytes: u64,
}

/// A content-addressed weight store: the seed's `WeightStore`.
///
/// Semantics every backend keeps (the conformance suite checks them):
/// - storing a weight whose key exists is a no-op that returns the key;
/// - `load` verifies the data against its key: a mismatch is [`crate::StoreError::Integrity`] in
///   strict mode, and a logged warning with the data otherwise;
/// - absent keys give `Ok(None)` / `Ok(false)`, never an error;
/// - a failed write leaves the store as it was.
///
/// In the style of `object_store`: a backend implements the few methods that touch its bytes
/// ([`store_hashed`](Self::store_hashed), [`load_hashed`](Self::load_hashed), `exists`, `delete`, `list_weights`,
/// `get_metadata`, `storage_info`, `close`); the rest ([`store`](Self::store),
/// [`store_with_key`](Self::store_with_key), the batches, the partial and streamed loads) are
/// provided on top of them, and a backend overrides one only to do better (the HDF5 store
/// compresses a batch on every core, the S3 store sends it concurrently, the HDF5 store reads
/// only the chunks a row range needs).
///
/// ```
/// use coral_core::{HashedWeight, WeightTensor};
/// use coral_store_api::{MemoryStore, WeightStore};
///
/// let store = MemoryStore::new();
/// let w = HashedWeight::new(WeightTensor::from_vec("w", vec![2], vec![1.0f32, 2.0])?);
/// let first = store.store_hashed(&w)?; // no second hash inside the store
/// assert!(first.new);
/// assert!(!store.store_hashed(&w)?.new);
/// assert_eq!(store.store(w.weight())?, *w.key());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait WeightStore: Send + Sync + std::fmt::Debug {
    /// Stores a weight whose hash is known: the store trusts the proof and does not hash it
    /// again. A no-op (with `new: false`) when the key is present.
    fn store_hashed(&self, weight: &HashedWeight) -> Result<Stored>;

    /// The algorithm [`store`](Self::store) keys new weights with: SHA-256 unless the store
    /// was configured otherwise.
    fn hash_algorithm(&self) -> HashAlgorithm {
        HashAlgorithm::Sha256
    }

    /// Stores a weight under its hash by [`hash_algorithm`](Self::hash_algorithm).
    fn store(&self, weight: &WeightTensor) -> Result<ContentHash> {
        let hashed = HashedWeight::with_algorithm(weight.clone(), self.hash_algorithm());
        Ok(self.store_hashed(&hashed)?.key)
    }

    /// Stores a weight under `key`, which must be the data's hash under the key's algorithm
    /// (SHA-256 or legacy xxh3-64); another key is [`crate::StoreError::KeyMismatch`].
    fn store_with_key(&self, weight: &WeightTensor, key: &ContentHash) -> Result<ContentHash> {
        let hashed = hash_against(weight, key)?;
        Ok(self.store_hashed(&hashed)?.key)
    }

    /// Loads a weight and verifies it against its key, handing over the hash it computed;
    /// `Ok(None)` when absent. In strict mode a mismatch is [`crate::StoreError::Integrity`];
    /// otherwise the weight comes back (with a logged warning) under its actual hash, so a
    /// caller that needs `key` itself compares [`HashedWeight::key`].
    fn load_hashed(&self, key: &ContentHash) -> Result<Option<HashedWeight>>;

    /// Loads and verifies a weight; `Ok(None)` when absent.
    fn load(&self, key: &ContentHash) -> Result<Option<WeightTensor>> {
        Ok(self.load_hashed(key)?.map(HashedWeight::into_weight))
    }

    /// Rows `rows` (`a..b`) along the first axis of the weight under `key`: shape
    /// `[b - a, rest...]`, and the metadata of the whole weight (name, dtype, layer type, model,
    /// compression info) without its hash, which the rows do not have. `Ok(None)` when absent.
    /// An empty range `a..a` (with `a` at most the first dimension) gives no rows; a 0-d
    /// weight, a reversed range or one past the first dimension is
    /// [`crate::StoreError::InvalidRange`], naming the key and the range.
    ///
    /// **Not verified against the key** when the backend reads only the chunks involved (the
    /// HDF5 store does): there are no per-chunk hashes, only the stored codec's framing is
    /// checked. Provided: the whole weight loaded (and so verified, also when kept as a
    /// delta) and cut, [`crate::slice::load_rows_whole`].
    fn load_rows(&self, key: &ContentHash, rows: Range<usize>) -> Result<Option<WeightTensor>> {
        crate::slice::load_rows_whole(self, key, rows)
    }

    /// The data bytes `range` (`a..b`, little-endian element bytes in row-major order) of the
    /// weight under `key`; `Ok(None)` when absent. A range need not fall on element bounds. An
    /// empty range `a..a` (with `a` at most the data's length) gives no bytes; a reversed range
    /// or one past the end is [`crate::StoreError::InvalidRange`].
    ///
    /// **Not verified against the key**, as [`load_rows`](Self::load_rows). Provided: the whole
    /// weight loaded and cut, [`crate::slice::load_byte_range_whole`].
    fn load_byte_range(&self, key: &ContentHash, range: Range<u64>) -> Result<Option<Bytes>> {
        crate::slice::load_byte_range_whole(self, key, range)
    }

    /// Writes the whole data of the weight under `key` to `sink` and verifies it as
    /// [`load_hashed`](Self::load_hashed) does; gives its metadata (as
    /// [`get_metadata`](Self::get_metadata)) and the hash of the data written. `Ok(None)`, with
    /// nothing written, when absent.
    ///
    /// A backend that overrides it (the HDF5 store) decodes the weight a few chunks at a time,
    /// writes them in order and hashes them as they go ([`coral_core::ContentHasher`]), so its
    /// memory stays bounded by a few chunks whatever the weight's size; it learns whether the
    /// data matches `key` only at the end. So on **any error the sink may hold part or all of
    /// the data**, corrupt data included: write to a temporary file and keep it only after
    /// `Ok`. In strict mode a mismatch is [`crate::StoreError::Integrity`]; otherwise a logged
    /// warning, and the hash returned is the data's actual hash (compare it with `key`).
    ///
    /// Provided: the whole weight loaded and verified, then written
    /// ([`crate::slice::load_into_whole`]); memory holds the whole weight. A weight kept as a
    /// delta is rebuilt whole this way by every backend.
    fn load_into(
        &self,
        key: &ContentHash,
        sink: &mut dyn std::io::Write,
    ) -> Result<Option<(WeightMetadata, ContentHash)>> {
        crate::slice::load_into_whole(self, key, sink)
    }

    /// True when the key is present (as a full weight or as a delta).
    fn exists(&self, key: &ContentHash) -> Result<bool>;

    /// Deletes a weight; `Ok(false)` when absent.
    fn delete(&self, key: &ContentHash) -> Result<bool>;

    /// Every key, sorted.
    fn list_weights(&self) -> Result<Vec<ContentHash>>;

    /// The metadata without the data; `Ok(None)` when absent.
    fn get_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>>;

    /// Stores many weights whose hashes are known, in order; returns what each store did, in
    /// the same order. All or nothing where the backend can (HDF5: a batch that fails links
    /// nothing).
    fn store_hashed_batch(&self, weights: &[HashedWeight]) -> Result<Vec<Stored>> {
        weights.iter().map(|w| self.store_hashed(w)).collect()
    }

    /// Stores many weights whose hashes are not known yet, in order, keyed by
    /// [`hash_algorithm`](Self::hash_algorithm); returns what each store did, in the same order
    /// (`new: false` for a weight the store had, or one repeated earlier in the batch). By
    /// default the weights are hashed on every core, then stored as a
    /// [`store_hashed_batch`](Self::store_hashed_batch); the HDF5 store hashes inside its
    /// pipeline instead, overlapped with compressing and writing the weights hashed before.
    /// All or nothing where the backend can.
    fn store_unhashed_batch(&self, weights: &[WeightTensor]) -> Result<Vec<Stored>> {
        use rayon::prelude::*;
        let algorithm = self.hash_algorithm();
        let hashed: Vec<HashedWeight> = weights
            .par_iter()
            .map(|w| HashedWeight::with_algorithm(w.clone(), algorithm))
            .collect();
        self.store_hashed_batch(&hashed)
    }

    /// Holds back commits until the matching [`commit_deferred`](Self::commit_deferred): the
    /// writes in between, from any thread, become durable (and visible to other processes)
    /// together, in one commit, and a crash before it loses them all. Calls nest. By default
    /// nothing is held: a backend whose writes are each their own object (S3, memory) has no
    /// commit to save. The HDF5 store commits by closing and reopening its file, with
    /// several syncs; an add makes one commit instead of one per batch.
    fn defer_commits(&self) -> Result<()> {
        Ok(())
    }

    /// Ends a [`defer_commits`](Self::defer_commits): the outermost one commits what was
    /// written since it. Also call it after a failure, to commit what the caller undid.
    fn commit_deferred(&self) -> Result<()> {
        Ok(())
    }

    /// The seed's `store_batch`: many weights, given as (name, weight); returns name → key.
    /// A [`store_unhashed_batch`](Self::store_unhashed_batch).
    fn store_batch(
        &self,
        weights: &[(String, WeightTensor)],
    ) -> Result<BTreeMap<String, ContentHash>> {
        let plain: Vec<WeightTensor> = weights.iter().map(|(_, w)| w.clone()).collect();
        let stored = self.store_unhashed_batch(&plain)?;
        Ok(weights
            .iter()
            .zip(stored)
            .map(|((name, _), s)| (name.clone(), s.key))
            .collect())
    }

    /// Loads and verifies many weights, as [`load_hashed`](Self::load_hashed); absent keys are
    /// left out of the map.
    fn load_hashed_batch(
        &self,
        keys: &[ContentHash],
    ) -> Result<HashMap<ContentHash, HashedWeight>> {
        let mut out = HashMap::with_capacity(keys.len());
        for k in keys {
            if let Some(w) = self.load_hashed(k)? {
                out.insert(*k, w);
            }
        }
        Ok(out)
    }

    /// Loads many weights; absent keys are left out of the map.
    fn load_batch(&self, keys: &[ContentHash]) -> Result<HashMap<ContentHash, WeightTensor>> {
        Ok(self
            .load_hashed_batch(keys)?
            .into_iter()
            .map(|(k, w)| (k, w.into_weight()))
            .collect())
    }

    /// How one key is kept (codec or delta, bytes as stored), for `coral show`; `Ok(None)` when
    /// absent. By default only what [`get_metadata`](Self::get_metadata) says, with the stored
    /// form unknown.
    fn stored_form(&self, key: &ContentHash) -> Result<Option<StoredForm>> {
        Ok(self.get_metadata(key)?.map(|_| StoredForm::default()))
    }

    /// The store's figures.
    fn storage_info(&self) -> Result<StorageInfo>;

    /// Flushes and releases resources; later calls fail with [`crate::StoreError::Closed`].
    /// Dropping a store closes it too.
    fn close(&mut self) -> Result<()>;
}

/// How one key is kept, as far as the backend tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredForm {
    /// The codec of a weight stored in full ("zstd-3+shuffle"), or `None` when unknown or kept
    /// as a delta.
    pub codec: Option<String>,
    /// The delta type and reference key when the weight is kept as a delta.
    pub delta: Option<(String, ContentHash)>,
    /// Bytes as stored (chunks, object or delta payload), when known.
    pub stored_bytes: Option<u64>,
}

/// Hashes `weight` with `key`'s algorithm for [`WeightStore::store_with_key`]:
/// [`crate::StoreError::KeyMismatch`] when it is not `key`.
pub fn hash_against(weight: &WeightTensor, key: &ContentHash) -> Result<HashedWeight> {
    let hashed = HashedWeight::with_algorithm(weight.clone(), key.algorithm());
    if hashed.key() != key {
        return Err(crate::StoreError::KeyMismatch {
            name: weight.name().to_owned(),
            key: *key,
            actual: *hashed.key(),
        });
    }
    Ok(hashed)
}

/// The seed's delta methods: a weight kept as a [`Delta`] against a reference weight.
pub trait DeltaStore: WeightStore {
    /// Stores a delta under the key of the weight it encodes; returns the key.
    fn store_delta(&self, delta: &Delta, delta_hash: &ContentHash) -> Result<ContentHash>;

    /// Stores several deltas, each under its weight's key; returns the keys in order. The
    /// default stores them one by one; a store that commits per call (HDF5) overrides it to
    /// commit once, as `store_batch` does for weights. On an error some may have been stored.
    fn store_delta_batch(&self, deltas: &[(Delta, ContentHash)]) -> Result<Vec<ContentHash>> {
        deltas.iter().map(|(d, k)| self.store_delta(d, k)).collect()
    }

    /// Loads a delta; `Ok(None)` when absent.
    fn load_delta(&self, delta_hash: &ContentHash) -> Result<Option<Delta>>;

    /// True when a delta is stored under the key.
    fn delta_exists(&self, delta_hash: &ContentHash) -> Result<bool>;

    /// Deletes a delta; `Ok(false)` when absent.
    fn delete_delta(&self, delta_hash: &ContentHash) -> Result<bool>;

    /// Every delta key, sorted.
    fn list_deltas(&self) -> Result<Vec<ContentHash>>;

    /// Delta figures. Provided: every delta read once through
    /// [`load_delta`](Self::load_delta) (which reads payloads, never decodes them against a
    /// reference); a backend that keeps the figures at hand overrides it.
    fn get_delta_storage_info(&self) -> Result<DeltaStorageInfo> {
        let mut info = DeltaStorageInfo::default();
        for k in self.list_deltas()? {
            if let Some(d) = self.load_delta(&k)? {
                info.add(&d);
            }
        }
        Ok(info)
    }
}

/// Model manifests kept beside the weights, and how the writers of a shared store keep out of
/// each other's way.
///
/// The last five methods (sharing, leases, commit times, leftovers) are provided: their
/// defaults suit a store with one writer at a time (an HDF5 file under its lock, the memory
/// store), and do nothing. A store that several processes may write at once (S3) overrides
/// them; see [`crate::lease`].
pub trait ManifestStore: WeightStore {
    /// Stores (or replaces) a model's manifest.
    fn put_manifest(&self, manifest: &ModelManifest) -> Result<()>;

    /// Loads a manifest; `Ok(None)` when absent.
    fn get_manifest(&self, name: &ModelName) -> Result<Option<ModelManifest>>;

    /// Every model name, sorted.
    fn list_manifests(&self) -> Result<Vec<ModelName>>;

    /// Deletes a manifest (not its weights); `Ok(false)` when absent.
    fn delete_manifest(&self, name: &ModelName) -> Result<bool>;

    /// True when other processes may write this store while this one does (an S3 prefix).
    /// Then a writer must not delete what it stored (another writer may already reference
    /// it), and a garbage collector must spare what was committed recently. False by default:
    /// one writer at a time.
    fn shares_writers(&self) -> bool {
        false
    }

    /// Takes a lease of `kind` for `operation` (a word shown to whoever waits for it, such as
    /// `"add"` or `"gc"`), waiting up to `wait` for conflicting leases to go; past that, fails
    /// with [`crate::StoreError::Locked`] naming a holder. By default a lease that holds
    /// nothing.
    fn acquire_lease(&self, kind: LeaseKind, operation: &str, wait: Duration) -> Result<Lease> {
        let _ = (operation, wait);
        Ok(Lease::none(kind))
    }

    /// Gives a lease back. By default nothing to do.
    fn release_lease(&self, lease: Lease) -> Result<()> {
        let _ = lease;
        Ok(())
    }

    /// The weights and deltas whose commit object (S3: the metadata object, or the delta
    /// object) was written less than `age` ago, by the store's clock. By default none: a store
    /// with one writer at a time has no write in progress while a garbage collector runs.
    fn committed_within(&self, age: Duration) -> Result<BTreeSet<ContentHash>> {
        let _ = age;
        Ok(BTreeSet::new())
    }

    /// Removes (or, with `dry_run`, only counts) what writes that never finished left and that
    /// is older than `older_than`: data objects without a commit object, reference markers of
    /// missing deltas, multipart uploads never completed. By default nothing.
    fn remove_leftovers(&self, older_than: Duration, dry_run: bool) -> Result<Leftovers> {
        let _ = (older_than, dry_run);
        Ok(Leftovers::default())
    }
}

/// A complete store: weights, deltas and manifests. Every backend is one; sync and the `coral`
/// command work on `&dyn Store`.
pub trait Store: WeightStore + DeltaStore + ManifestStore {}

impl<T: WeightStore + DeltaStore + ManifestStore + ?Sized> Store for T {}

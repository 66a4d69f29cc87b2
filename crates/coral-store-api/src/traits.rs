//! The store traits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use coral_core::{ContentHash, Delta, ModelManifest, ModelName, WeightMetadata, WeightTensor};

use crate::error::Result;
use crate::info::{DeltaStorageInfo, StorageInfo};
use crate::lease::{Lease, LeaseKind, Leftovers};

/// A content-addressed weight store: the seed's `WeightStore`.
///
/// Semantics every backend keeps (the conformance suite checks them):
/// - storing a weight whose key exists is a no-op that returns the key;
/// - `load` verifies the data against its key: a mismatch is [`crate::StoreError::Integrity`] in
///   strict mode, and a logged warning with the data otherwise;
/// - absent keys give `Ok(None)` / `Ok(false)`, never an error;
/// - a failed write leaves the store as it was.
pub trait WeightStore: Send + Sync + std::fmt::Debug {
    /// Stores a weight under its SHA-256 key, or the store's configured hash algorithm.
    fn store(&self, weight: &WeightTensor) -> Result<ContentHash>;

    /// Stores a weight under `key`, which must be the data's hash under the key's algorithm
    /// (SHA-256 or legacy xxh3-64); another key is [`crate::StoreError::KeyMismatch`].
    fn store_with_key(&self, weight: &WeightTensor, key: &ContentHash) -> Result<ContentHash>;

    /// Loads and verifies a weight; `Ok(None)` when absent.
    fn load(&self, key: &ContentHash) -> Result<Option<WeightTensor>>;

    /// True when the key is present (as a full weight or as a delta).
    fn exists(&self, key: &ContentHash) -> Result<bool>;

    /// Deletes a weight; `Ok(false)` when absent.
    fn delete(&self, key: &ContentHash) -> Result<bool>;

    /// Every key, sorted.
    fn list_weights(&self) -> Result<Vec<ContentHash>>;

    /// The metadata without the data; `Ok(None)` when absent.
    fn get_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>>;

    /// Stores many weights, given as (name, weight); returns name → key.
    fn store_batch(
        &self,
        weights: &[(String, WeightTensor)],
    ) -> Result<BTreeMap<String, ContentHash>> {
        weights
            .iter()
            .map(|(name, w)| Ok((name.clone(), self.store(w)?)))
            .collect()
    }

    /// Loads many weights; absent keys are left out of the map.
    fn load_batch(&self, keys: &[ContentHash]) -> Result<HashMap<ContentHash, WeightTensor>> {
        let mut out = HashMap::with_capacity(keys.len());
        for k in keys {
            if let Some(w) = self.load(k)? {
                out.insert(*k, w);
            }
        }
        Ok(out)
    }

    /// The store's figures.
    fn storage_info(&self) -> Result<StorageInfo>;

    /// Flushes and releases resources; later calls fail with [`crate::StoreError::Closed`].
    /// Dropping a store closes it too.
    fn close(&mut self) -> Result<()>;
}

/// The seed's delta methods: a weight kept as a [`Delta`] against a reference weight.
pub trait DeltaStore: WeightStore {
    /// Stores a delta under the key of the weight it encodes; returns the key.
    fn store_delta(&self, delta: &Delta, delta_hash: &ContentHash) -> Result<ContentHash>;

    /// Loads a delta; `Ok(None)` when absent.
    fn load_delta(&self, delta_hash: &ContentHash) -> Result<Option<Delta>>;

    /// True when a delta is stored under the key.
    fn delta_exists(&self, delta_hash: &ContentHash) -> Result<bool>;

    /// Deletes a delta; `Ok(false)` when absent.
    fn delete_delta(&self, delta_hash: &ContentHash) -> Result<bool>;

    /// Every delta key, sorted.
    fn list_deltas(&self) -> Result<Vec<ContentHash>>;

    /// Delta figures.
    fn get_delta_storage_info(&self) -> Result<DeltaStorageInfo>;
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

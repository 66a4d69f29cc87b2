//! The store traits.

use std::collections::{BTreeMap, HashMap};

use coral_core::{ContentHash, Delta, ModelManifest, ModelName, WeightMetadata, WeightTensor};

use crate::error::Result;
use crate::info::{DeltaStorageInfo, StorageInfo};

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

/// Model manifests kept beside the weights.
pub trait ManifestStore: WeightStore {
    /// Stores (or replaces) a model's manifest.
    fn put_manifest(&self, manifest: &ModelManifest) -> Result<()>;

    /// Loads a manifest; `Ok(None)` when absent.
    fn get_manifest(&self, name: &ModelName) -> Result<Option<ModelManifest>>;

    /// Every model name, sorted.
    fn list_manifests(&self) -> Result<Vec<ModelName>>;

    /// Deletes a manifest (not its weights); `Ok(false)` when absent.
    fn delete_manifest(&self, name: &ModelName) -> Result<bool>;
}

/// A complete store: weights, deltas and manifests. Every backend is one; sync and the `coral`
/// command work on `&dyn Store`.
pub trait Store: WeightStore + DeltaStore + ManifestStore {}

impl<T: WeightStore + DeltaStore + ManifestStore + ?Sized> Store for T {}

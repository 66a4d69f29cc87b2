//! `MemoryStore`: the in-memory reference backend.

use std::collections::BTreeMap;
use std::sync::RwLock;

use coral_core::{
    ContentHash, Delta, HashAlgorithm, HashedWeight, ModelManifest, ModelName, WeightMetadata,
    WeightTensor,
};

use crate::error::{Result, StoreError};
use crate::info::{DeltaStorageInfo, StorageInfo};
use crate::resolve::{self, DeltaSource};
use crate::traits::{DeltaStore, ManifestStore, Stored, StoredForm, WeightStore};

/// An in-memory store that keeps weights uncompressed. It passes the conformance suite and is
/// the reference for what a backend must do; use it in your own tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
    strict: bool,
    algorithm: HashAlgorithm,
}

#[derive(Debug, Default)]
struct Inner {
    weights: BTreeMap<ContentHash, WeightTensor>,
    deltas: BTreeMap<ContentHash, Delta>,
    manifests: BTreeMap<ModelName, ModelManifest>,
    closed: bool,
}

impl MemoryStore {
    /// An empty store with strict integrity checking and SHA-256 keys.
    pub fn new() -> Self {
        MemoryStore {
            inner: RwLock::default(),
            strict: true,
            algorithm: HashAlgorithm::Sha256,
        }
    }

    /// Sets strict integrity checking (on by default).
    pub fn with_strict_integrity(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Sets the hash algorithm `store` uses (SHA-256 by default).
    pub fn with_hash_algorithm(mut self, algorithm: HashAlgorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Replaces the stored bytes of `key` with `data` without updating the key: a test hook that
    /// simulates corruption. Returns false when the key is absent.
    pub fn corrupt_for_testing(&self, key: &ContentHash, data: Vec<u8>) -> bool {
        let mut inner = self.write_lock();
        match inner.weights.get(key) {
            Some(w) => match WeightTensor::new(w.metadata().clone(), data) {
                Ok(bad) => {
                    inner.weights.insert(*key, bad);
                    true
                }
                Err(_) => false,
            },
            None => false,
        }
    }

    /// The stored bytes of a weight kept in full, unverified: a test hook (see
    /// [`MemoryStore::corrupt_for_testing`]). `None` when the key is absent or held as a delta.
    pub fn raw_for_testing(&self, key: &ContentHash) -> Option<bytes::Bytes> {
        self.read_lock().weights.get(key).map(|w| w.data().clone())
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(inner: &Inner) -> Result<()> {
        if inner.closed {
            Err(StoreError::Closed {
                location: "memory".to_owned(),
            })
        } else {
            Ok(())
        }
    }
}

impl WeightStore for MemoryStore {
    fn store_hashed(&self, weight: &HashedWeight) -> Result<Stored> {
        let key = *weight.key();
        let mut inner = self.write_lock();
        Self::check_open(&inner)?;
        if inner.weights.contains_key(&key) {
            return Ok(Stored {
                key,
                new: false,
                stored_bytes: 0,
            });
        }
        let mut meta = weight.metadata().clone();
        meta.hash = Some(key);
        let stored = WeightTensor::new(meta, weight.data().clone())?;
        inner.weights.insert(key, stored);
        Ok(Stored {
            key,
            new: true,
            stored_bytes: weight.nbytes() as u64,
        })
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    fn load_hashed(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        match self.full_weight(key)? {
            Some(w) => Ok(Some(w)),
            None => resolve::resolve(self, key, self.strict),
        }
    }

    fn exists(&self, key: &ContentHash) -> Result<bool> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.weights.contains_key(key) || inner.deltas.contains_key(key))
    }

    /// Deletes a weight, stored in full or as a delta; refuses ([`StoreError::Referenced`]) while
    /// deltas use it as their reference.
    fn delete(&self, key: &ContentHash) -> Result<bool> {
        let mut inner = self.write_lock();
        Self::check_open(&inner)?;
        let dependents = resolve::dependents(&inner.deltas, key);
        if dependents > 0 {
            return Err(StoreError::Referenced {
                key: *key,
                dependents,
            });
        }
        let full = inner.weights.remove(key).is_some();
        let delta = inner.deltas.remove(key).is_some();
        Ok(full || delta)
    }

    /// Every key, stored in full or as a delta, sorted.
    fn list_weights(&self) -> Result<Vec<ContentHash>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        let keys: std::collections::BTreeSet<ContentHash> = inner
            .weights
            .keys()
            .chain(inner.deltas.keys())
            .copied()
            .collect();
        Ok(keys.into_iter().collect())
    }

    fn get_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>> {
        let full = {
            let inner = self.read_lock();
            Self::check_open(&inner)?;
            inner.weights.get(key).map(|w| w.metadata().clone())
        };
        match full {
            Some(m) => Ok(Some(m)),
            None => Ok(resolve::resolve(self, key, self.strict)?.map(|w| w.metadata().clone())),
        }
    }

    fn stored_form(&self, key: &ContentHash) -> Result<Option<StoredForm>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        if let Some(w) = inner.weights.get(key) {
            return Ok(Some(StoredForm {
                codec: Some("none".to_owned()),
                delta: None,
                stored_bytes: Some(w.nbytes() as u64),
            }));
        }
        Ok(inner.deltas.get(key).map(|d| StoredForm {
            codec: None,
            delta: Some((d.delta_type.name().to_owned(), d.reference_hash)),
            stored_bytes: Some(d.nbytes() as u64),
        }))
    }

    fn storage_info(&self) -> Result<StorageInfo> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        let total_bytes: u64 = inner.weights.values().map(|w| w.nbytes() as u64).sum();
        Ok(StorageInfo {
            backend: "memory".to_owned(),
            location: "memory".to_owned(),
            file_size: total_bytes,
            reclaimable_bytes: 0,
            total_weights: inner.weights.len() as u64,
            total_bytes,
            compressed_bytes: total_bytes,
            compression_ratio: 0.0,
            compression: "none".to_owned(),
            deltas: delta_info(&inner),
        })
    }

    fn close(&mut self) -> Result<()> {
        self.write_lock().closed = true;
        Ok(())
    }
}

impl DeltaSource for MemoryStore {
    fn location(&self) -> String {
        "memory".to_owned()
    }

    fn full_weight(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        let Some(w) = inner.weights.get(key).cloned() else {
            return Ok(None);
        };
        drop(inner);
        resolve::verified(w, key, self.strict).map(Some)
    }

    fn has_full_weight(&self, key: &ContentHash) -> Result<bool> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.weights.contains_key(key))
    }

    fn raw_delta(&self, key: &ContentHash) -> Result<Option<Delta>> {
        self.load_delta(key)
    }
}

impl DeltaStore for MemoryStore {
    fn store_delta(&self, delta: &Delta, delta_hash: &ContentHash) -> Result<ContentHash> {
        let mut inner = self.write_lock();
        Self::check_open(&inner)?;
        inner.deltas.insert(*delta_hash, delta.clone());
        Ok(*delta_hash)
    }

    fn load_delta(&self, delta_hash: &ContentHash) -> Result<Option<Delta>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.deltas.get(delta_hash).cloned())
    }

    fn delta_exists(&self, delta_hash: &ContentHash) -> Result<bool> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.deltas.contains_key(delta_hash))
    }

    fn delete_delta(&self, delta_hash: &ContentHash) -> Result<bool> {
        let mut inner = self.write_lock();
        Self::check_open(&inner)?;
        Ok(inner.deltas.remove(delta_hash).is_some())
    }

    fn list_deltas(&self) -> Result<Vec<ContentHash>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.deltas.keys().copied().collect())
    }

    fn get_delta_storage_info(&self) -> Result<DeltaStorageInfo> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(delta_info(&inner))
    }
}

fn delta_info(inner: &Inner) -> DeltaStorageInfo {
    let mut info = DeltaStorageInfo::default();
    for d in inner.deltas.values() {
        info.add(d);
    }
    info
}

impl ManifestStore for MemoryStore {
    fn put_manifest(&self, manifest: &ModelManifest) -> Result<()> {
        let mut inner = self.write_lock();
        Self::check_open(&inner)?;
        inner
            .manifests
            .insert(manifest.name.clone(), manifest.clone());
        Ok(())
    }

    fn get_manifest(&self, name: &ModelName) -> Result<Option<ModelManifest>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.manifests.get(name).cloned())
    }

    fn list_manifests(&self) -> Result<Vec<ModelName>> {
        let inner = self.read_lock();
        Self::check_open(&inner)?;
        Ok(inner.manifests.keys().cloned().collect())
    }

    fn delete_manifest(&self, name: &ModelName) -> Result<bool> {
        let mut inner = self.write_lock();
        Self::check_open(&inner)?;
        Ok(inner.manifests.remove(name).is_some())
    }
}

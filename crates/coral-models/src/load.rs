//! Loading one weight, verified once.

use coral_core::{ContentHash, HashedWeight, WeightTensor};
use coral_store_api::Store;

use crate::error::{bail, ModelError, Result};

/// Loads a weight by key, whether the store holds it whole or as a delta, verified once: the
/// store's `load_hashed` follows the delta chain (Coral's one walker,
/// `coral_store_api::resolve`) and hashes what it rebuilt; a weight that comes back under
/// another hash (a store opened without strict integrity) is refused here without hashing again.
pub fn load_resolved(store: &dyn Store, key: &ContentHash) -> Result<WeightTensor> {
    load_verified(store, key).map(HashedWeight::into_weight)
}

/// [`load_resolved`], keeping the proof of the hash: what `repair` hands on to
/// `store_hashed_batch`, so the weight is not hashed again on its way into the new store.
pub fn load_verified(store: &dyn Store, key: &ContentHash) -> Result<HashedWeight> {
    let w = store.load_hashed(key)?.ok_or_else(|| {
        ModelError::Inconsistent(format!("weight {key} is missing from the store"))
    })?;
    if w.key() != key {
        bail!(
            "weight {key} ({:?}) is damaged: its data hashes to {}",
            w.name(),
            w.key()
        );
    }
    Ok(w)
}

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

/// Tensors of at least this many bytes are streamed (decoded a few chunks at a time straight
/// into the output, hashed on the way) rather than loaded whole: what bounds an export's
/// memory. Export also streams any tensor larger than its groups (`export::stream_tensors`).
pub const STREAM_BYTES: usize = 32 << 20;

/// Writes a weight's data to `sink` as the store decodes it, and checks it: its key (the data
/// that went to `sink` hashes to `key`), dtype and shape (as `want` says, when given). Returns
/// the bytes written. On an error the sink may hold part of the data, or data that did not
/// verify: write to a temporary file and keep it only after `Ok`.
pub fn load_streamed(
    store: &dyn Store,
    key: &ContentHash,
    want: Option<(coral_core::DType, &[usize])>,
    sink: &mut dyn std::io::Write,
) -> Result<u64> {
    let mut counting = Counting { inner: sink, n: 0 };
    let (meta, actual) = store.load_into(key, &mut counting)?.ok_or_else(|| {
        ModelError::Inconsistent(format!("weight {key} is missing from the store"))
    })?;
    if actual != *key {
        bail!(
            "weight {key} ({:?}) is damaged: its data hashes to {actual}",
            meta.name
        );
    }
    if let Some((dtype, shape)) = want {
        if meta.dtype != dtype || meta.shape != shape {
            bail!(
                "stored weight is {} {:?}, the manifest says {dtype} {shape:?}",
                meta.dtype,
                meta.shape
            );
        }
    }
    Ok(counting.n)
}

/// A writer that counts what goes through.
struct Counting<'a> {
    inner: &'a mut dyn std::io::Write,
    n: u64,
}

impl std::io::Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

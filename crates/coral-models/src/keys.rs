//! Looking keys up: how a model's keys are kept, and hash prefixes.

use std::collections::{BTreeMap, BTreeSet};

use coral_core::{ContentHash, ModelManifest};
use coral_store_api::Store;

use crate::error::Result;

/// Counts of the distinct keys of a model's tensors by how they are stored (a folder model's
/// blob chunks are not counted: they are always weights).
pub fn key_kinds(store: &dyn Store, m: &ModelManifest) -> Result<BTreeMap<&'static str, usize>> {
    let mut out = BTreeMap::new();
    for k in m.tensors.iter().map(|t| &t.key).collect::<BTreeSet<_>>() {
        let kind = if store.delta_exists(k)? {
            "delta"
        } else if store.exists(k)? {
            "weight"
        } else {
            "missing"
        };
        *out.entry(kind).or_insert(0) += 1;
    }
    Ok(out)
}

/// The fewest hex digits of a key that `coral show` takes as a prefix.
pub const MIN_PREFIX_DIGITS: usize = 8;

/// The weights and deltas whose key starts with `prefix` (lowercase hex digits), in key order.
pub fn keys_with_prefix(store: &dyn Store, prefix: &str) -> Result<Vec<ContentHash>> {
    let mut out = BTreeSet::new();
    for k in store
        .list_weights()?
        .into_iter()
        .chain(store.list_deltas()?)
    {
        if k.to_hex().starts_with(prefix) {
            out.insert(k);
        }
    }
    Ok(out.into_iter().collect())
}

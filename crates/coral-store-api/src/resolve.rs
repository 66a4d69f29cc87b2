//! Rebuilding weights kept as deltas: the one logic every backend shares.
//!
//! A weight may be stored as a [`Delta`] against a reference weight, itself stored in full or as
//! another delta. [`resolve`] follows the references (at most [`MAX_DELTA_DEPTH`] deltas, cycles
//! refused), decodes each delta with [`DeltaEncoder::decode_delta`] and verifies every rebuilt
//! weight against its key: in strict mode a mismatch is [`StoreError::Integrity`], otherwise a
//! logged warning.
//!
//! A backend implements [`DeltaSource`] (its raw reads) and calls [`resolve`] from `load`,
//! `load_batch` and `get_metadata` when a key is not stored in full; [`dependents`] tells
//! `delete` whether deltas still need a weight.
//!
//! ```
//! use coral_store_api::{MemoryStore, WeightStore, DeltaStore};
//! use coral_core::{delta::encode_best_lossless, WeightTensor};
//!
//! let store = MemoryStore::new();
//! let base: Vec<f32> = (0..1024).map(|i| i as f32 * 0.001).collect();
//! let mut tuned = base.clone();
//! tuned[7] += 0.5;
//! let reference = WeightTensor::from_vec("w", vec![32, 32], base)?;
//! let target = WeightTensor::from_vec("w.tuned", vec![32, 32], tuned)?;
//! let rk = store.store(&reference)?;
//! let tk = target.compute_hash();
//! let delta = encode_best_lossless(&target, &reference, &rk)?.expect("a small delta");
//! store.store_delta(&delta, &tk)?;
//! // Found by its own hash, rebuilt through its reference and verified.
//! let back = store.load(&tk)?.expect("present");
//! assert_eq!(back.data(), target.data());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use coral_core::{ContentHash, Delta, DeltaConfig, DeltaEncoder, HashedWeight, WeightTensor};

use crate::error::{Result, StoreError};

/// The longest chain of deltas followed from a key to a weight stored in full.
pub const MAX_DELTA_DEPTH: usize = 8;

/// A backend's raw reads, for [`resolve`].
pub trait DeltaSource {
    /// The store's path or URL, for errors.
    fn location(&self) -> String;

    /// A weight stored in full (not through a delta), verified as the backend's `load` verifies
    /// it; `Ok(None)` when the key is not stored in full.
    fn full_weight(&self, key: &ContentHash) -> Result<Option<HashedWeight>>;

    /// True when `key` is stored in full. By default through
    /// [`full_weight`](Self::full_weight); a backend that can tell without reading the data
    /// overrides it.
    fn has_full_weight(&self, key: &ContentHash) -> Result<bool> {
        Ok(self.full_weight(key)?.is_some())
    }

    /// The delta stored under `key`; `Ok(None)` when there is none.
    fn raw_delta(&self, key: &ContentHash) -> Result<Option<Delta>>;
}

/// The deltas that lead from `key` to a weight stored in full: `[(key, its delta), (its
/// reference, that one's delta), ...]`, the last delta's reference being stored in full.
/// `Ok(None)` when no delta is stored under `key`. This is Coral's one walk along a chain:
/// [`resolve`] decodes along it, backends check metadata through it.
///
/// Errors: [`StoreError::MissingReference`] when a reference is absent,
/// [`StoreError::Corrupt`] for a cycle or a chain longer than [`MAX_DELTA_DEPTH`].
pub fn delta_chain<S: DeltaSource + ?Sized>(
    source: &S,
    key: &ContentHash,
) -> Result<Option<Vec<(ContentHash, Delta)>>> {
    let Some(first) = source.raw_delta(key)? else {
        return Ok(None);
    };
    let mut chain: Vec<(ContentHash, Delta)> = vec![(*key, first)];
    loop {
        let Some((below, delta)) = chain.last() else {
            return Ok(None);
        };
        let (below, reference) = (*below, delta.reference_hash);
        if source.has_full_weight(&reference)? {
            return Ok(Some(chain));
        }
        if chain.iter().any(|(k, _)| *k == reference) {
            return Err(StoreError::Corrupt {
                location: source.location(),
                key: key.to_hex(),
                reason: format!("the deltas form a cycle through {reference}"),
            });
        }
        if chain.len() >= MAX_DELTA_DEPTH {
            return Err(StoreError::Corrupt {
                location: source.location(),
                key: key.to_hex(),
                reason: format!("more than {MAX_DELTA_DEPTH} deltas lead to a stored weight"),
            });
        }
        match source.raw_delta(&reference)? {
            Some(next) => chain.push((reference, next)),
            None => {
                return Err(StoreError::MissingReference {
                    key: below,
                    reference,
                })
            }
        }
    }
}

/// Rebuilds the weight kept as a delta under `key`; `Ok(None)` when no delta is stored under it.
///
/// Errors: those of [`delta_chain`], [`StoreError::Core`] when a delta does not decode,
/// [`StoreError::Integrity`] (strict) when a rebuilt weight does not hash to its key.
pub fn resolve<S: DeltaSource + ?Sized>(
    source: &S,
    key: &ContentHash,
    strict: bool,
) -> Result<Option<HashedWeight>> {
    let Some(chain) = delta_chain(source, key)? else {
        return Ok(None);
    };
    let Some((below, last)) = chain.last() else {
        return Ok(None);
    };
    let base = source
        .full_weight(&last.reference_hash)?
        .ok_or(StoreError::MissingReference {
            key: *below,
            reference: last.reference_hash,
        })?;
    // Decode back up, verifying each step ourselves (typed errors, one policy).
    let encoder = DeltaEncoder::new(DeltaConfig {
        strict_reconstruction: false,
        ..DeltaConfig::default()
    });
    let mut current = base;
    for (k, delta) in chain.iter().rev() {
        let rebuilt = encoder
            .decode_delta(delta, current.weight(), k)
            .map_err(|e| {
                StoreError::core(
                    format!(
                        "rebuilding weight {k} from its {} delta against {} in {}",
                        delta.delta_type,
                        delta.reference_hash,
                        source.location()
                    ),
                    e,
                )
            })?;
        current = verified(rebuilt, k, strict)?;
    }
    Ok(Some(current))
}

/// Hashes a weight read or rebuilt for `key` and checks it: in strict mode a mismatch is
/// [`StoreError::Integrity`]; otherwise a logged warning, and the weight under its actual hash.
/// Every backend's load verifies through this.
pub fn verified(weight: WeightTensor, key: &ContentHash, strict: bool) -> Result<HashedWeight> {
    let hashed = HashedWeight::with_algorithm(weight, key.algorithm());
    check_hash(hashed.name(), key, hashed.key(), strict)?;
    Ok(hashed)
}

/// The policy of [`verified`] for a hash computed elsewhere (a streamed load hashes as it
/// writes, with [`coral_core::ContentHasher`]): `actual`, the hash of the data read for `key`
/// (weight `name`), must be `key`. In strict mode a mismatch is [`StoreError::Integrity`];
/// otherwise a logged warning and `Ok`.
pub fn check_hash(name: &str, key: &ContentHash, actual: &ContentHash, strict: bool) -> Result<()> {
    if actual != key {
        if strict {
            return Err(StoreError::Integrity {
                name: name.to_owned(),
                expected: *key,
                actual: *actual,
            });
        }
        tracing::warn!(key = %key, actual = %actual, name, "integrity check failed");
    }
    Ok(())
}

/// How many of `deltas` (key, delta) use `key` as their reference, not counting a delta stored
/// under `key` itself. A backend refuses to delete a weight with dependents
/// ([`StoreError::Referenced`]).
pub fn dependents<'a>(
    deltas: impl IntoIterator<Item = (&'a ContentHash, &'a Delta)>,
    key: &ContentHash,
) -> usize {
    deltas
        .into_iter()
        .filter(|(k, d)| d.reference_hash == *key && *k != key)
        .count()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use coral_core::{DType, DeltaType, JsonMap};

    use super::*;

    #[derive(Default)]
    struct Map {
        full: HashMap<ContentHash, HashedWeight>,
        deltas: HashMap<ContentHash, Delta>,
    }

    impl DeltaSource for Map {
        fn location(&self) -> String {
            "test".to_owned()
        }
        fn full_weight(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
            Ok(self.full.get(key).cloned())
        }
        fn raw_delta(&self, key: &ContentHash) -> Result<Option<Delta>> {
            Ok(self.deltas.get(key).cloned())
        }
    }

    fn junk(reference: ContentHash) -> Delta {
        Delta {
            delta_type: DeltaType::Compressed,
            data: vec![1, 2, 3].into(),
            metadata: JsonMap::new(),
            original_shape: vec![2],
            original_dtype: DType::F32,
            reference_hash: reference,
            compression_ratio: 1.0,
        }
    }

    fn key(b: u8) -> ContentHash {
        ContentHash::Sha256([b; 32])
    }

    #[test]
    fn absent_is_none() {
        assert!(resolve(&Map::default(), &key(1), true).unwrap().is_none());
    }

    #[test]
    fn cycles_and_long_chains_are_errors() {
        let mut m = Map::default();
        m.deltas.insert(key(1), junk(key(2)));
        m.deltas.insert(key(2), junk(key(1)));
        let e = resolve(&m, &key(1), true).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        let mut m = Map::default();
        for i in 0..20 {
            m.deltas.insert(key(i), junk(key(i + 1)));
        }
        let e = resolve(&m, &key(0), true).unwrap_err();
        assert!(e.to_string().contains("more than 8"), "{e}");
    }

    #[test]
    fn missing_reference_names_both_keys() {
        let mut m = Map::default();
        m.deltas.insert(key(1), junk(key(2)));
        m.deltas.insert(key(2), junk(key(3)));
        match resolve(&m, &key(1), true) {
            Err(StoreError::MissingReference { key: k, reference }) => {
                assert_eq!((k, reference), (key(2), key(3)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn undecodable_delta_is_a_core_error() {
        let mut m = Map::default();
        let r = WeightTensor::from_vec("r", vec![2], vec![1.0f32, 2.0]).unwrap();
        m.full.insert(key(2), HashedWeight::new(r));
        m.deltas.insert(key(1), junk(key(2)));
        let e = resolve(&m, &key(1), true).unwrap_err();
        assert!(matches!(e, StoreError::Core { .. }), "{e}");
    }

    #[test]
    fn dependents_counts_references() {
        let d = [
            (key(1), junk(key(9))),
            (key(2), junk(key(9))),
            (key(9), junk(key(9))),
        ];
        assert_eq!(dependents(d.iter().map(|(k, d)| (k, d)), &key(9)), 2);
        assert_eq!(dependents(d.iter().map(|(k, d)| (k, d)), &key(1)), 0);
    }
}

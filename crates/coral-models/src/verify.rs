//! `verify` and `repair`: every weight, delta and manifest checked; what verifies copied into
//! a new store.

use std::collections::HashSet;

use coral_core::{ContentHash, HashedWeight, ModelManifest};
use coral_store_api::Store;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{bail, Context, ModelError, Result};
use crate::load::load_verified;
use crate::load_resolved;

/// One failure found by [`verify`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    /// "weight", "delta" or "manifest".
    pub kind: &'static str,
    /// The key or model name.
    pub id: String,
    /// What is wrong.
    pub error: String,
}

/// What [`verify`] checked.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    /// Weights checked.
    pub weights: usize,
    /// Deltas checked.
    pub deltas: usize,
    /// Manifests checked.
    pub manifests: usize,
    /// Everything that failed.
    pub failures: Vec<Failure>,
}

/// Checks every weight (its data against its key), every delta (decoded against its reference,
/// against its key) and every manifest (each key present, the header consistent).
pub fn verify(store: &dyn Store, progress: &(dyn Fn(u64) + Sync)) -> Result<VerifyReport> {
    let weights = store.list_weights()?;
    let deltas = store.list_deltas()?;
    let delta_set: HashSet<ContentHash> = deltas.iter().copied().collect();
    let models = store.list_manifests()?;
    // One hash per weight: the store's `load_hashed` verifies, `load_resolved` compares keys.
    // Weights are streamed through the hash (a few chunks in memory, however large), deltas
    // rebuilt whole.
    let check = |kind: &'static str, key: &ContentHash| -> Option<Failure> {
        let r = if kind == "weight" {
            crate::load::load_streamed(store, key, None, &mut std::io::sink()).map(|_| ())
        } else {
            load_resolved(store, key).map(|_| ())
        };
        progress(1);
        r.err().map(|e| Failure {
            kind,
            id: key.to_hex(),
            error: e.one_line(),
        })
    };
    let full: Vec<&ContentHash> = weights.iter().filter(|k| !delta_set.contains(k)).collect();
    let mut failures: Vec<Failure> = full.par_iter().filter_map(|k| check("weight", k)).collect();
    failures.extend(
        deltas
            .par_iter()
            .filter_map(|k| check("delta", k))
            .collect::<Vec<_>>(),
    );
    // A model is as damaged as the weights and deltas it needs.
    let failed: HashSet<String> = failures.iter().map(|f| f.id.clone()).collect();
    for name in &models {
        let r = (|| -> Result<()> {
            let m = store.get_manifest(name)?.ok_or_else(|| {
                ModelError::Inconsistent("listed but cannot be loaded".to_string())
            })?;
            if m.name != *name {
                bail!("manifest names model {}", m.name);
            }
            for (what, key) in needs(&m) {
                if failed.contains(&key.to_hex()) {
                    bail!(
                        "{what}: {} {key} failed verification",
                        if delta_set.contains(key) {
                            "delta"
                        } else {
                            "weight"
                        },
                    );
                }
                if !store.exists(key)? && !store.delta_exists(key)? {
                    bail!("{what}: weight {key} is missing");
                }
            }
            crate::source::check_manifest(&m)
        })();
        progress(1);
        if let Err(e) = r {
            failures.push(Failure {
                kind: "manifest",
                id: name.to_string(),
                error: e.one_line(),
            });
        }
    }
    Ok(VerifyReport {
        weights: full.len(),
        deltas: deltas.len(),
        manifests: models.len(),
        failures,
    })
}

/// What [`repair`] copied, and what it could not.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RepairReport {
    /// Weights copied (each verified against its key on the way).
    pub weights: usize,
    /// Deltas copied (each decoded against its reference and verified).
    pub deltas: usize,
    /// Manifests copied (each with every tensor it needs copied).
    pub manifests: usize,
    /// What was lost: the weights, deltas and manifests that did not verify or need something
    /// lost, with the reason.
    pub lost: Vec<Failure>,
}

/// Largest sum of weight bytes [`repair`] holds at once.
const REPAIR_GROUP_BYTES: usize = 256 << 20;

/// Copies everything of `src` that still verifies into `dst` (a new store): every weight whose
/// data matches its key, every delta that decodes against a reference that verifies, every
/// manifest whose tensors are all copied; lists the rest as lost. Keys stay as they were
/// (legacy keys too). Nothing is decoded twice that `verify` decodes once, and at most
/// about 256 MB of weights are held at a time.
pub fn repair(
    src: &dyn Store,
    dst: &dyn Store,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RepairReport> {
    let weights = src.list_weights().context("listing the weights")?;
    let deltas = src.list_deltas().context("listing the deltas")?;
    let delta_set: HashSet<ContentHash> = deltas.iter().copied().collect();
    let models = src.list_manifests().context("listing the models")?;
    let mut report = RepairReport {
        weights: 0,
        deltas: 0,
        manifests: 0,
        lost: Vec::new(),
    };
    let mut copied: HashSet<ContentHash> = HashSet::new();
    let lost = |kind: &'static str, id: String, e: ModelError| Failure {
        kind,
        id,
        error: e.one_line(),
    };

    // Whole weights, a group at a time: loaded and verified in parallel, stored in one batch.
    let full: Vec<ContentHash> = weights
        .into_iter()
        .filter(|k| !delta_set.contains(k))
        .collect();
    let sizes: Vec<usize> = full
        .iter()
        .map(|k| {
            src.get_metadata(k).ok().flatten().map_or(0, |m| {
                m.shape
                    .iter()
                    .try_fold(m.dtype.size(), |a, &d| a.checked_mul(d))
                    .unwrap_or(usize::MAX)
            })
        })
        .collect();
    let mut start = 0;
    while start < full.len() {
        let mut end = start + 1;
        let mut bytes = sizes[start];
        while end < full.len() && bytes.saturating_add(sizes[end]) <= REPAIR_GROUP_BYTES {
            bytes += sizes[end];
            end += 1;
        }
        let group = &full[start..end];
        start = end;
        // Hashed once, by the source's load; the proof goes into the new store with the
        // weight (legacy xxh3 keys too: `store_hashed_batch` keeps the key it is given).
        let loaded: Vec<(ContentHash, Result<HashedWeight>)> = group
            .par_iter()
            .map(|k| {
                let r = load_verified(src, k);
                progress(1);
                (*k, r)
            })
            .collect();
        let mut batch: Vec<HashedWeight> = Vec::new();
        for (k, r) in loaded {
            match r {
                Ok(w) => batch.push(w),
                Err(e) => report.lost.push(lost("weight", k.to_hex(), e)),
            }
        }
        if !batch.is_empty() {
            let stored = dst.store_hashed_batch(&batch).context("storing weights")?;
            for (w, s) in batch.iter().zip(&stored) {
                if s.key != *w.key() {
                    bail!(
                        "the new store did not keep weight {} under its key",
                        w.key()
                    );
                }
                copied.insert(s.key);
            }
        }
    }
    report.weights = copied.len();

    // Deltas: one that decodes and verifies has a whole chain of references that verify, all
    // copied (the weights above, the deltas here).
    for k in &deltas {
        let r = load_resolved(src, k).and_then(|_| {
            src.load_delta(k)?
                .ok_or_else(|| ModelError::Inconsistent("listed but cannot be loaded".to_string()))
        });
        progress(1);
        match r {
            Ok(d) => {
                let got = dst
                    .store_delta(&d, k)
                    .with_context(|| format!("storing delta {k}"))?;
                if got != *k {
                    bail!("the new store keyed delta {k} as {got}");
                }
                copied.insert(*k);
                report.deltas += 1;
            }
            Err(e) => report.lost.push(lost("delta", k.to_hex(), e)),
        }
    }

    // Manifests whose every tensor made it.
    for name in &models {
        let r = (|| -> Result<ModelManifest> {
            let m = src.get_manifest(name)?.ok_or_else(|| {
                ModelError::Inconsistent("listed but cannot be loaded".to_string())
            })?;
            if m.name != *name {
                bail!("manifest names model {}", m.name);
            }
            crate::source::check_manifest(&m)?;
            for (what, key) in needs(&m) {
                if !copied.contains(key) {
                    bail!("{what}: {key} was lost");
                }
            }
            Ok(m)
        })();
        progress(1);
        match r {
            Ok(m) => {
                dst.put_manifest(&m)
                    .with_context(|| format!("storing model {name}"))?;
                report.manifests += 1;
            }
            Err(e) => report.lost.push(lost("manifest", name.to_string(), e)),
        }
    }
    Ok(report)
}

/// Every key a model needs, with what needs it: `tensor "NAME"`, or `FILE chunk I` for a
/// folder model's blobs.
fn needs(m: &ModelManifest) -> Vec<(String, &ContentHash)> {
    let mut out: Vec<(String, &ContentHash)> = m
        .tensors
        .iter()
        .map(|t| (format!("tensor {:?}", t.name), &t.key))
        .collect();
    for f in &m.files {
        if let coral_core::FileContent::Blob { chunks, .. } = &f.content {
            out.extend(
                chunks
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("{} chunk {i}", f.path), &c.key)),
            );
        }
    }
    out
}

//! `add`: a model file into a store, tensor by tensor: what the store has is reused, changed
//! tensors are delta-coded against a reference model, and the manifest is written last.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use coral_core::delta::encode_best_lossless;
use coral_core::{ContentHash, Delta, HashedWeight, ManifestTensor, ModelManifest, ModelName};
use coral_store_api::{LeaseKind, Store};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{inconsistent, Context, ModelError, Result};
use crate::source::{SourceFile, SourceTensor};

/// Options of [`add`].
#[derive(Debug, Clone)]
pub struct AddOptions {
    /// The model's name.
    pub name: ModelName,
    /// A model whose tensors serve as delta references.
    pub reference: Option<ModelName>,
    /// Largest sum of tensor bytes handled at once (at least one tensor is always taken).
    pub group_bytes: usize,
    /// Checked between groups: when set, the add stops and rolls back (Ctrl-C).
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
    /// How long to wait for a garbage collector's exclusive lease on a store that many
    /// writers share (S3) before giving up.
    pub wait: Duration,
}

impl AddOptions {
    /// Options for a model named `name`: no reference, groups of 256 MiB, no cancel flag, and
    /// a minute's wait for a garbage collector's lease.
    pub fn new(name: ModelName) -> Self {
        AddOptions {
            name,
            reference: None,
            group_bytes: 256 << 20,
            cancel: None,
            wait: Duration::from_secs(60),
        }
    }

    /// Delta-codes changed tensors against the model `reference`.
    pub fn with_reference(mut self, reference: ModelName) -> Self {
        self.reference = Some(reference);
        self
    }
}

/// What [`add`] did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AddReport {
    /// The model's name.
    pub name: String,
    /// Source format.
    pub format: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensors stored in full.
    pub new: usize,
    /// Tensors already in the store (or repeated in the file).
    pub reused: usize,
    /// Tensors stored as deltas against the reference.
    pub delta_coded: usize,
    /// Size of the input file.
    pub bytes_in: u64,
    /// Bytes the store grew by (weights and deltas as stored).
    pub bytes_stored: u64,
}

/// Adds a model: stores its tensors (reusing what the store has, delta-coding changed tensors
/// against the reference), then its manifest.
///
/// On a store that many writers share (S3) it holds a shared lease throughout, so no garbage
/// collector deletes what it stores or reuses before its manifest names it; a failed add there
/// deletes nothing (another writer may already use what it stored: `coral gc` removes it after
/// its grace period) and says how much it left. On a store with one writer at a time (HDF5,
/// memory) a failed add removes what it wrote.
pub fn add(
    store: &dyn Store,
    source: &SourceFile,
    opts: &AddOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<AddReport> {
    let lease = store.acquire_lease(LeaseKind::Shared, "add", opts.wait)?;
    let r = add_leased(store, source, opts, progress);
    // The manifest is written (or not) already: a lease that cannot be given back goes stale.
    if let Err(e) = store.release_lease(lease) {
        tracing::warn!("releasing the add's lease: {e} (it goes stale and is then ignored)");
    }
    r
}

fn add_leased(
    store: &dyn Store,
    source: &SourceFile,
    opts: &AddOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<AddReport> {
    if store.get_manifest(&opts.name)?.is_some() {
        return Err(ModelError::Exists(opts.name.clone()));
    }
    let reference = match &opts.reference {
        Some(r) => Some(store.get_manifest(r)?.ok_or_else(|| {
            ModelError::Invalid(format!("reference model {r} is not in the store"))
        })?),
        None => None,
    };
    let mut written = Written::default();
    let result = add_inner(
        store,
        source,
        opts,
        reference.as_ref(),
        &mut written,
        progress,
    );
    match result {
        Ok(report) => Ok(report),
        Err(e) if store.shares_writers() => match written.left_note() {
            Some(note) => {
                tracing::warn!("{note}");
                Err(ModelError::Context {
                    what: note,
                    source: Box::new(e),
                })
            }
            None => Err(e),
        },
        Err(e) => {
            written.roll_back(store);
            Err(e)
        }
    }
}

#[derive(Default)]
struct Written {
    weights: Vec<ContentHash>,
    deltas: Vec<ContentHash>,
}

impl Written {
    /// On a shared store nothing is rolled back: what this add stored may already be
    /// referenced by another writer, which found it present and did not store it again.
    fn left_note(&self) -> Option<String> {
        let (w, d) = (self.weights.len(), self.deltas.len());
        (w + d > 0).then(|| {
            format!(
                "the up to {w} weight(s) and {d} delta(s) it stored are left in the store (another \
                 writer may already use them); `coral gc` removes those no model needs once they \
                 are older than its grace period"
            )
        })
    }

    fn roll_back(&self, store: &dyn Store) {
        for k in self.deltas.iter().rev() {
            if let Err(e) = store.delete_delta(k) {
                tracing::warn!("rolling back delta {k}: {e}");
            }
        }
        for k in self.weights.iter().rev() {
            if let Err(e) = store.delete(k) {
                tracing::warn!("rolling back weight {k}: {e}");
            }
        }
    }
}

enum Plan {
    Reused,
    Full,
    Delta(Box<Delta>),
}

fn add_inner(
    store: &dyn Store,
    source: &SourceFile,
    opts: &AddOptions,
    reference: Option<&ModelManifest>,
    written: &mut Written,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<AddReport> {
    let ref_tensors: HashMap<&str, &ManifestTensor> = reference
        .map(|m| m.tensors.iter().map(|t| (t.name.as_str(), t)).collect())
        .unwrap_or_default();
    let mut report = AddReport {
        name: opts.name.to_string(),
        format: source.format().to_string(),
        tensors: source.tensors().len(),
        new: 0,
        reused: 0,
        delta_coded: 0,
        bytes_in: source.file_size(),
        bytes_stored: 0,
    };
    let mut seen: HashSet<ContentHash> = HashSet::new();
    let mut keys: Vec<ContentHash> = Vec::with_capacity(source.tensors().len());
    for group in groups(source.tensors(), opts.group_bytes) {
        if opts
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(ModelError::Interrupted);
        }
        // Each tensor is hashed once, here; the store trusts the proof.
        let tensors: Vec<HashedWeight> = group
            .par_iter()
            .map(|t| source.weight(t, &opts.name).map(HashedWeight::new))
            .collect::<Result<_>>()?;
        let plans: Vec<Plan> = tensors
            .par_iter()
            .map(|w| plan(store, &ref_tensors, w))
            .collect::<Result<_>>()?;
        write_group(store, &tensors, plans, &mut seen, &mut report, written)?;
        let hashes = tensors.iter().map(|w| *w.key());
        keys.extend(hashes);
        drop(tensors);
        source.release(group);
        progress(group.iter().map(|t| t.len as u64).sum());
    }
    if opts
        .cancel
        .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    {
        return Err(ModelError::Interrupted);
    }
    let manifest = source.manifest(&opts.name, &keys, opts.reference.clone())?;
    store
        .put_manifest(&manifest)
        .with_context(|| format!("writing manifest of {}", opts.name))?;
    Ok(report)
}

/// What one tensor needs: nothing (the store has it), to be stored in full, or a delta against
/// the reference model's tensor of the same name (only against weights held whole, so chains
/// stay one deep; kept only when smaller than the weight).
fn plan(
    store: &dyn Store,
    ref_tensors: &HashMap<&str, &ManifestTensor>,
    w: &HashedWeight,
) -> Result<Plan> {
    let key = w.key();
    if store.exists(key)? {
        return Ok(Plan::Reused);
    }
    let Some(rt) = ref_tensors.get(w.name()) else {
        return Ok(Plan::Full);
    };
    if rt.dtype != w.dtype() || rt.shape != w.shape() || rt.key == *key {
        return Ok(Plan::Full);
    }
    if store.delta_exists(&rt.key)? || !store.exists(&rt.key)? {
        return Ok(Plan::Full);
    }
    let base = store
        .load(&rt.key)?
        .ok_or_else(|| {
            ModelError::Inconsistent(format!("weight {} is missing from the store", rt.key))
        })
        .with_context(|| format!("loading reference tensor {:?}", rt.name))?;
    match encode_best_lossless(w, &base, &rt.key) {
        Ok(Some(d)) => Ok(Plan::Delta(Box::new(d))),
        Ok(None) => Ok(Plan::Full),
        Err(e) => {
            tracing::debug!("no delta for {:?}: {e}", w.name());
            Ok(Plan::Full)
        }
    }
}

/// Carries out a group's plans: deltas one by one, new weights in one batch (recorded in
/// `written` first, so a batch that fails half-way is rolled back too); counts into `report`.
fn write_group(
    store: &dyn Store,
    tensors: &[HashedWeight],
    plans: Vec<Plan>,
    seen: &mut HashSet<ContentHash>,
    report: &mut AddReport,
    written: &mut Written,
) -> Result<()> {
    let mut batch: Vec<HashedWeight> = Vec::new();
    for (w, plan) in tensors.iter().zip(plans) {
        let key = w.key();
        if !seen.insert(*key) {
            report.reused += 1;
            continue;
        }
        match plan {
            Plan::Reused => report.reused += 1,
            Plan::Full => {
                report.new += 1;
                batch.push(w.clone());
            }
            Plan::Delta(d) => {
                report.delta_coded += 1;
                let k = store
                    .store_delta(&d, key)
                    .with_context(|| format!("storing delta of {:?}", w.name()))?;
                if k != *key {
                    written.deltas.push(k);
                    inconsistent!(
                        "store returned key {k} for delta of {:?}, expected {key}",
                        w.name()
                    );
                }
                written.deltas.push(*key);
                report.bytes_stored = report.bytes_stored.saturating_add(d.nbytes() as u64);
            }
        }
    }
    if !batch.is_empty() {
        // Record first: a batch that fails half-way is rolled back too.
        written.weights.extend(batch.iter().map(|w| *w.key()));
        let stored = store
            .store_hashed_batch(&batch)
            .context("storing weights")?;
        for (w, s) in batch.iter().zip(&stored) {
            if s.key != *w.key() {
                inconsistent!(
                    "store did not keep {:?} under its key {}",
                    w.name(),
                    w.key()
                );
            }
            report.bytes_stored = report.bytes_stored.saturating_add(s.stored_bytes);
        }
    }
    Ok(())
}

/// Splits tensors into consecutive groups of at most `budget` bytes (one tensor at least).
fn groups(tensors: &[SourceTensor], budget: usize) -> Vec<&[SourceTensor]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut sum = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        if i > start && sum + t.len > budget {
            out.push(&tensors[start..i]);
            start = i;
            sum = 0;
        }
        sum += t.len;
    }
    if start < tensors.len() {
        out.push(&tensors[start..]);
    }
    out
}

//! `gc`: what no model needs, removed; on a shared store only what is older than a grace
//! period.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use coral_core::ContentHash;
use coral_store_api::{LeaseKind, Store};
use serde::Serialize;

use crate::error::{Context, Result};

/// What [`gc`] removed (or would remove, in a dry run).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GcReport {
    /// True when nothing was deleted.
    pub dry_run: bool,
    /// Weights not needed.
    pub weights: Vec<String>,
    /// Deltas not needed.
    pub deltas: Vec<String>,
    /// Bytes they took as stored: `weight_bytes + delta_bytes`.
    pub bytes: u64,
    /// Bytes the removed weights took as stored (compressed): how much less the store's
    /// figure for its weights is afterwards. In a dry run, an estimate: their raw size at the
    /// store's compression ratio.
    pub weight_bytes: u64,
    /// Bytes of the removed deltas' payloads.
    pub delta_bytes: u64,
    /// Bytes of free space in the store afterwards (a local file's, which later writes reuse
    /// and `compact` gives back; 0 for object stores).
    pub reclaimable_bytes: u64,
    /// The store's size afterwards.
    pub store_bytes: u64,
    /// The grace period applied, in seconds; `None` on a store with one writer at a time
    /// (HDF5), where it does not apply.
    pub grace_secs: Option<u64>,
    /// Weights and deltas no model needs that were kept because they were committed less than
    /// the grace period ago (or are the references of such deltas).
    pub kept: usize,
    /// Multipart uploads started more than the grace period ago and never completed, aborted
    /// (in a dry run: that would be).
    pub uploads_aborted: usize,
    /// Other leftovers of writes that never finished, older than the grace period, removed (in
    /// a dry run: that would be): data objects without a commit object, markers of missing
    /// deltas.
    pub leftovers_removed: usize,
}

/// The grace period of [`gc`] by default: one hour.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Options of [`gc_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct GcOptions {
    /// Only report what would be removed.
    pub dry_run: bool,
    /// On a store that many writers share (S3), what was committed less than this ago is kept,
    /// and multipart uploads younger than this are left alone ([`DEFAULT_GRACE`]).
    pub grace: Duration,
    /// How long to wait for the writers' leases to go (10 s).
    pub wait: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            grace: DEFAULT_GRACE,
            wait: Duration::from_secs(10),
        }
    }
}

/// True when a store after `r` is worth compacting: a quarter of its file (and at least 1 MiB)
/// is free space. Below that, later writes reuse the space, and a rewrite of the whole file
/// would cost more than it gives back.
pub fn worth_compacting(r: &GcReport) -> bool {
    r.reclaimable_bytes >= (1 << 20) && r.reclaimable_bytes.saturating_mul(4) >= r.store_bytes
}

/// Every key the store's manifests need, with the references of needed deltas (transitively).
pub fn needed_keys(store: &dyn Store) -> Result<BTreeSet<ContentHash>> {
    let deltas: HashSet<ContentHash> = store.list_deltas()?.into_iter().collect();
    needed_keys_with(store, &deltas)
}

/// [`needed_keys`], given the store's deltas (only those are looked up as deltas).
fn needed_keys_with(
    store: &dyn Store,
    deltas: &HashSet<ContentHash>,
) -> Result<BTreeSet<ContentHash>> {
    let mut needed = BTreeSet::new();
    let mut todo: Vec<ContentHash> = Vec::new();
    for name in store.list_manifests()? {
        // Removed since the listing (`coral rm` takes no lease): its keys are needed no more.
        let Some(m) = store.get_manifest(&name)? else {
            tracing::debug!("model {name} was removed while gc ran");
            continue;
        };
        todo.extend(m.keys().copied());
    }
    while let Some(k) = todo.pop() {
        if !needed.insert(k) {
            continue;
        }
        if !deltas.contains(&k) {
            continue;
        }
        if let Some(d) = store.load_delta(&k)? {
            todo.push(d.reference_hash);
        }
    }
    Ok(needed)
}

/// [`gc_with`] with the default options (grace period one hour, 10 s of waiting).
pub fn gc(store: &dyn Store, dry_run: bool) -> Result<GcReport> {
    gc_with(
        store,
        &GcOptions {
            dry_run,
            ..GcOptions::default()
        },
    )
}

/// Removes the weights and deltas no manifest needs.
///
/// On a store that many writers share (S3) it first takes an exclusive lease, waiting up to
/// `wait` for the writers at work (whose shared leases keep what they store safe until their
/// manifests name it); then it keeps what was committed less than the grace period ago (a
/// second line of defence, for writers that take no lease) and also removes the leftovers of
/// writes that never finished that are older than the grace period, abandoned multipart
/// uploads included. A dry run takes no lease and deletes nothing.
pub fn gc_with(store: &dyn Store, opts: &GcOptions) -> Result<GcReport> {
    let lease = if opts.dry_run {
        coral_store_api::Lease::none(LeaseKind::Exclusive)
    } else {
        store.acquire_lease(LeaseKind::Exclusive, "gc", opts.wait)?
    };
    let r = gc_leased(store, opts);
    if let Err(e) = store.release_lease(lease) {
        tracing::warn!(
            "releasing gc's lease: {e} (writers wait for it until it goes stale, 30 minutes)"
        );
    }
    r
}

fn gc_leased(store: &dyn Store, opts: &GcOptions) -> Result<GcReport> {
    let dry_run = opts.dry_run;
    let grace = store.shares_writers().then_some(opts.grace);
    // What exists first, then what the manifests need, then what is young: a weight listed
    // here whose manifest is not listed below was committed before this listing, so it is
    // young below unless its writer took longer than the grace period.
    let all_deltas = store.list_deltas()?;
    let all_weights = store.list_weights()?;
    let delta_set: HashSet<ContentHash> = all_deltas.iter().copied().collect();
    let needed = needed_keys_with(store, &delta_set)?;
    let young = match grace {
        Some(g) => store.committed_within(g)?,
        None => BTreeSet::new(),
    };
    // Young entries are kept, and so is the reference of a kept delta (transitively).
    let mut keep = needed.clone();
    let mut kept = 0usize;
    let mut todo: Vec<ContentHash> = young.into_iter().collect();
    while let Some(k) = todo.pop() {
        if !keep.insert(k) {
            continue;
        }
        kept += 1;
        // (Young entries are few: each is looked up, even one committed after the listing.)
        if let Some(d) = store.load_delta(&k)? {
            todo.push(d.reference_hash);
        }
    }
    let deltas: Vec<ContentHash> = all_deltas
        .iter()
        .filter(|k| !keep.contains(k))
        .copied()
        .collect();
    let weights: Vec<ContentHash> = all_weights
        .into_iter()
        .filter(|k| !keep.contains(k) && !delta_set.contains(k))
        .collect();
    let before = store.storage_info()?;
    let mut after = before.clone();
    // A dry run estimates the bytes; a real one measures them (below) from the store's own
    // figures for its weights and deltas (a local file's size or free space says little: what
    // a delete frees at the end of the file is not counted as free).
    let (mut weight_bytes, mut delta_bytes) = (0u64, 0u64);
    if dry_run {
        for k in &deltas {
            if let Some(d) = store.load_delta(k)? {
                delta_bytes += d.nbytes() as u64;
            }
        }
        let mut raw = 0u64;
        for k in &weights {
            if let Some(m) = store.get_metadata(k)? {
                raw += m.checked_nbytes().unwrap_or(0) as u64;
            }
        }
        weight_bytes = if before.total_bytes == 0 {
            raw
        } else {
            let ratio = before.compressed_bytes as f64 / before.total_bytes as f64;
            (raw as f64 * ratio).round() as u64
        };
    }
    if !dry_run {
        for k in &deltas {
            store
                .delete_delta(k)
                .with_context(|| format!("deleting delta {k}"))?;
        }
        for k in &weights {
            store
                .delete(k)
                .with_context(|| format!("deleting weight {k}"))?;
        }
    }
    let leftovers = store
        .remove_leftovers(grace.unwrap_or(Duration::ZERO), dry_run)
        .context("removing what unfinished writes left")?;
    if !dry_run {
        after = store.storage_info()?;
        weight_bytes = before
            .compressed_bytes
            .saturating_sub(after.compressed_bytes);
        delta_bytes = before
            .deltas
            .total_delta_bytes
            .saturating_sub(after.deltas.total_delta_bytes);
    }
    Ok(GcReport {
        dry_run,
        weights: weights.iter().map(|k| k.to_hex()).collect(),
        deltas: deltas.iter().map(|k| k.to_hex()).collect(),
        bytes: weight_bytes + delta_bytes,
        weight_bytes,
        delta_bytes,
        reclaimable_bytes: after.reclaimable_bytes,
        store_bytes: after.file_size,
        grace_secs: grace.map(|g| g.as_secs()),
        kept,
        uploads_aborted: leftovers.uploads,
        leftovers_removed: leftovers.data_objects + leftovers.markers,
    })
}

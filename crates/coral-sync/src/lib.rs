//! # coral-sync
//!
//! Copies weights, deltas and model manifests between any two Coral stores, through the store
//! traits alone (`&dyn Store`): HDF5 to S3, S3 to HDF5, memory to anything. It never names a
//! backend.
//!
//! [`sync`] moves only what the destination lacks, in an order that keeps the destination
//! consistent at every moment, so an interrupted sync leaves nothing half and a second run
//! finishes the job without moving anything twice:
//!
//! 1. weights the destination lacks, each verified against its key on the way, once: the
//!    source's `load_hashed` checks it and hands the proof (`HashedWeight`) to the
//!    destination's `store_hashed`;
//! 2. deltas the destination lacks, each only once its reference (a weight, or another delta) is
//!    there, in waves;
//! 3. manifests missing or different, each only once every key it lists is there.
//!
//! Work runs on a bounded pool of threads ([`SyncOptions::concurrency`]); a callback sees
//! progress; [`SyncOptions::dry_run`] counts without writing. [`push`], [`pull`] and [`both`] are
//! the directions.
//!
//! ```
//! use coral_store_api::{MemoryStore, WeightStore};
//! use coral_core::WeightTensor;
//! use coral_sync::{sync, SyncOptions};
//!
//! let a = MemoryStore::new();
//! let b = MemoryStore::new();
//! a.store(&WeightTensor::from_vec("x", vec![2], vec![1.0f32, 2.0])?)?;
//! let stats = sync(&a, &b, &SyncOptions::default())?;
//! assert_eq!(stats.weights.moved, 1);
//! let again = sync(&a, &b, &SyncOptions::default())?;
//! assert_eq!((again.weights.moved, again.weights.skipped), (0, 1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod seed;

pub use seed::{DownloadStats, SyncExt, UploadStats, SYNC_LEASE_WAIT};

use coral_core::{ContentHash, Delta, ModelName};
use coral_store_api::{Store, StoreError};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// What kind of entry a progress event or a failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A weight stored in full.
    Weight,
    /// A delta.
    Delta,
    /// A model manifest.
    Manifest,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Weight => "weight",
            Kind::Delta => "delta",
            Kind::Manifest => "manifest",
        })
    }
}

/// One progress event: an entry moved (or, in a dry run, that would move).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What kind of entry.
    pub kind: Kind,
    /// Its key or model name.
    pub key: String,
    /// Bytes it moved (tensor data, delta payload, manifest JSON).
    pub bytes: u64,
    /// Entries of all kinds done so far, this one included.
    pub done: u64,
    /// Entries of all kinds to move.
    pub total: u64,
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How to sync.
#[derive(Clone)]
pub struct SyncOptions {
    /// Count what would move without writing anything.
    pub dry_run: bool,
    /// Entries moved at once (threads); at least 1.
    pub concurrency: usize,
    /// Called after each entry moves, from the worker threads.
    pub progress: Option<ProgressFn>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            dry_run: false,
            // Per entry a load, then requests in turn (the data, then the commit object), each
            // waiting for a replicated engine's quorum: more in flight hides that latency.
            concurrency: 16,
            progress: None,
        }
    }
}

impl fmt::Debug for SyncOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncOptions")
            .field("dry_run", &self.dry_run)
            .field("concurrency", &self.concurrency)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .finish()
    }
}

impl SyncOptions {
    /// Sets the dry run.
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sets the concurrency.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Sets the progress callback.
    pub fn with_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }
}

/// Figures of one kind of entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    /// Entries moved (or, in a dry run, that would move).
    pub moved: u64,
    /// Entries the destination already had.
    pub skipped: u64,
    /// Bytes moved: tensor data bytes of weights, payload bytes of deltas, JSON bytes of
    /// manifests (what crosses between the stores before the destination compresses it).
    pub bytes: u64,
}

/// What a sync did, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStats {
    /// Weights stored in full.
    pub weights: KindStats,
    /// Deltas.
    pub deltas: KindStats,
    /// Manifests.
    pub manifests: KindStats,
    /// True when nothing was written.
    pub dry_run: bool,
}

impl SyncStats {
    /// Entries moved, all kinds.
    pub fn moved(&self) -> u64 {
        self.weights.moved + self.deltas.moved + self.manifests.moved
    }

    /// Entries skipped, all kinds.
    pub fn skipped(&self) -> u64 {
        self.weights.skipped + self.deltas.skipped + self.manifests.skipped
    }

    /// Bytes moved, all kinds.
    pub fn bytes(&self) -> u64 {
        self.weights.bytes + self.deltas.bytes + self.manifests.bytes
    }

    fn kind_mut(&mut self, kind: Kind) -> &mut KindStats {
        match kind {
            Kind::Weight => &mut self.weights,
            Kind::Delta => &mut self.deltas,
            Kind::Manifest => &mut self.manifests,
        }
    }

    /// Adds another run's figures (for [`both`]).
    pub fn merge(&mut self, other: &SyncStats) {
        for k in [Kind::Weight, Kind::Delta, Kind::Manifest] {
            let o = *match k {
                Kind::Weight => &other.weights,
                Kind::Delta => &other.deltas,
                Kind::Manifest => &other.manifests,
            };
            let s = self.kind_mut(k);
            s.moved += o.moved;
            s.skipped += o.skipped;
            s.bytes += o.bytes;
        }
    }
}

/// An entry that did not move.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What kind of entry.
    pub kind: Kind,
    /// Its key or model name.
    pub key: String,
    /// Why, typed: a caller tells an integrity error from a timeout by matching it (and the
    /// [`StoreError`] inside, when there is one).
    pub cause: FailureCause,
}

impl Failure {
    /// Why, in words, with the causes.
    pub fn reason(&self) -> String {
        self.cause.to_string()
    }
}

/// Why one entry did not move.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FailureCause {
    /// Reading it from the source failed (a timeout, a damaged weight in a strict store, ...).
    #[error("reading: {}", chain(&**.0))]
    Read(std::sync::Arc<StoreError>),
    /// Writing it to the destination failed.
    #[error("writing: {}", chain(&**.0))]
    Write(std::sync::Arc<StoreError>),
    /// Reading the destination's copy of a manifest failed.
    #[error("reading the destination's: {}", chain(&**.0))]
    ReadDestination(std::sync::Arc<StoreError>),
    /// The source's data hashes to another key (a store opened without strict integrity):
    /// not copied.
    #[error("reading: the data hashes to {actual}, not to its key (not copied)")]
    Integrity {
        /// What the data hashes to.
        actual: ContentHash,
    },
    /// It was listed, then gone from the source.
    #[error("vanished from the source")]
    Vanished,
    /// A delta whose reference is in neither store (or failed to move).
    #[error("its reference {0} is in neither store (or failed to move)")]
    MissingReference(ContentHash),
    /// A manifest that lists a key the destination lacks.
    #[error("key {0} it lists is not in the destination (not moved)")]
    MissingKey(ContentHash),
}

impl FailureCause {
    /// The store error behind it, when there is one.
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            FailureCause::Read(e) | FailureCause::Write(e) | FailureCause::ReadDestination(e) => {
                Some(e)
            }
            _ => None,
        }
    }

    fn read(e: StoreError) -> Self {
        FailureCause::Read(std::sync::Arc::new(e))
    }

    fn write(e: StoreError) -> Self {
        FailureCause::Write(std::sync::Arc::new(e))
    }
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Listing a store failed before anything moved.
    #[error("{what}: {source}")]
    Store {
        /// What was being done ("listing the source's weights").
        what: String,
        /// The cause.
        #[source]
        source: Box<StoreError>,
    },
    /// Some entries did not move; everything in `stats` did, and the destination holds no
    /// delta without its reference and no manifest without its weights. Running the sync again
    /// moves only what is still missing.
    #[error(
        "sync incomplete: {} entr(ies) moved, {} failed; first: {} {}: {}",
        stats.moved(), failures.len(),
        failures.first().map(|f| f.kind.to_string()).unwrap_or_default(),
        failures.first().map(|f| f.key.as_str()).unwrap_or_default(),
        failures.first().map(Failure::reason).unwrap_or_default()
    )]
    Incomplete {
        /// What did move.
        stats: SyncStats,
        /// What did not.
        failures: Vec<Failure>,
    },
    /// The options are not valid.
    #[error("invalid sync options: {0}")]
    InvalidOptions(String),
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct Run<'a> {
    src: &'a dyn Store,
    dst: &'a dyn Store,
    options: &'a SyncOptions,
    stats: Mutex<SyncStats>,
    failures: Mutex<Vec<Failure>>,
    done: AtomicU64,
    total: u64,
}

impl Run<'_> {
    fn moved(&self, kind: Kind, key: String, bytes: u64) {
        {
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            let k = s.kind_mut(kind);
            k.moved += 1;
            k.bytes += bytes;
        }
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(p) = &self.options.progress {
            p(&Progress {
                kind,
                key,
                bytes,
                done,
                total: self.total,
            });
        }
    }

    fn skipped(&self, kind: Kind, n: u64) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.kind_mut(kind).skipped += n;
    }

    fn failed(&self, kind: Kind, key: String, cause: FailureCause) {
        tracing::warn!(%kind, %key, reason = %cause, "sync: entry not moved");
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Failure { kind, key, cause });
    }

    fn weight(&self, key: &ContentHash) -> Result<(), FailureCause> {
        if self.options.dry_run {
            let bytes = match self.src.get_metadata(key) {
                Ok(Some(m)) => m.checked_nbytes().unwrap_or(0) as u64,
                Ok(None) => return Err(FailureCause::Vanished),
                Err(e) => return Err(FailureCause::read(e)),
            };
            self.moved(Kind::Weight, key.to_string(), bytes);
            return Ok(());
        }
        // Hashed once: the source's load verifies, and hands the proof to the destination.
        let w = self
            .src
            .load_hashed(key)
            .map_err(FailureCause::read)?
            .ok_or(FailureCause::Vanished)?;
        if w.key() != key {
            return Err(FailureCause::Integrity { actual: *w.key() });
        }
        self.dst.store_hashed(&w).map_err(FailureCause::write)?;
        self.moved(Kind::Weight, key.to_string(), w.nbytes() as u64);
        Ok(())
    }

    fn delta(&self, key: &ContentHash, d: &Delta) -> Result<(), FailureCause> {
        if !self.options.dry_run {
            self.dst.store_delta(d, key).map_err(FailureCause::write)?;
        }
        self.moved(Kind::Delta, key.to_string(), d.nbytes() as u64);
        Ok(())
    }

    fn manifest(
        &self,
        name: &ModelName,
        present: &BTreeSet<ContentHash>,
    ) -> Result<(), FailureCause> {
        let m = self
            .src
            .get_manifest(name)
            .map_err(FailureCause::read)?
            .ok_or(FailureCause::Vanished)?;
        match self.dst.get_manifest(name) {
            Ok(Some(existing)) if existing == m => {
                self.skipped(Kind::Manifest, 1);
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return Err(FailureCause::ReadDestination(std::sync::Arc::new(e))),
        }
        if let Some(missing) = m.keys().find(|k| !present.contains(k)) {
            return Err(FailureCause::MissingKey(*missing));
        }
        let bytes = m.to_json().map(|j| j.len() as u64).unwrap_or(0);
        if !self.options.dry_run {
            self.dst.put_manifest(&m).map_err(FailureCause::write)?;
        }
        self.moved(Kind::Manifest, name.to_string(), bytes);
        Ok(())
    }

    /// Stage 1: weights stored in full, concurrently. Returns those that moved.
    fn weights(&self, weights: &[ContentHash]) -> Vec<ContentHash> {
        weights
            .par_iter()
            .with_max_len(1)
            .filter_map(|k| match self.weight(k) {
                Ok(()) => Some(*k),
                Err(cause) => {
                    self.failed(Kind::Weight, k.to_string(), cause);
                    None
                }
            })
            .collect()
    }

    /// Stage 2: deltas, in waves, each once its reference (a weight or another delta) is in
    /// `present`; adds what moved to `present`.
    fn deltas(&self, deltas: &[ContentHash], present: &mut BTreeSet<ContentHash>) {
        let loaded: Vec<Option<(ContentHash, Delta)>> = deltas
            .par_iter()
            .with_max_len(1)
            .map(|k| {
                let cause = match self.src.load_delta(k) {
                    Ok(Some(d)) => return Some((*k, d)),
                    Ok(None) => FailureCause::Vanished,
                    Err(e) => FailureCause::read(e),
                };
                self.failed(Kind::Delta, k.to_string(), cause);
                None
            })
            .collect();
        let mut waiting: Vec<(ContentHash, Delta)> = loaded.into_iter().flatten().collect();
        loop {
            let (ready, rest): (Vec<_>, Vec<_>) = waiting
                .into_iter()
                .partition(|(_, d)| present.contains(&d.reference_hash));
            waiting = rest;
            if ready.is_empty() {
                break;
            }
            let moved: Vec<ContentHash> = ready
                .par_iter()
                .with_max_len(1)
                .filter_map(|(k, d)| match self.delta(k, d) {
                    Ok(()) => Some(*k),
                    Err(cause) => {
                        self.failed(Kind::Delta, k.to_string(), cause);
                        None
                    }
                })
                .collect();
            present.extend(moved);
        }
        for (k, d) in waiting {
            self.failed(
                Kind::Delta,
                k.to_string(),
                FailureCause::MissingReference(d.reference_hash),
            );
        }
    }

    /// Stage 3: manifests, each once every key it lists is in `present`.
    fn manifests(&self, manifests: &[ModelName], present: &BTreeSet<ContentHash>) {
        manifests.par_iter().with_max_len(1).for_each(|name| {
            if let Err(cause) = self.manifest(name, present) {
                self.failed(Kind::Manifest, name.to_string(), cause);
            }
        });
    }
}

fn listed<T>(r: coral_store_api::Result<T>, what: &str) -> Result<T, SyncError> {
    r.map_err(|source| SyncError::Store {
        what: what.to_owned(),
        source: Box::new(source),
    })
}

/// What the two sides hold, listed once before anything moves.
struct Listing {
    /// The source's keys (full weights, and maybe deltas: `list_weights` may list both).
    src_w: BTreeSet<ContentHash>,
    /// The source's deltas.
    src_d: BTreeSet<ContentHash>,
    /// Every key the destination holds, as a weight or a delta.
    dst_all: BTreeSet<ContentHash>,
    /// The source's models.
    manifests: Vec<ModelName>,
}

impl Listing {
    fn of(source: &dyn Store, destination: &dyn Store) -> Result<Self, SyncError> {
        let set = |v: Vec<ContentHash>| v.into_iter().collect::<BTreeSet<_>>();
        let src_w = set(listed(
            source.list_weights(),
            "listing the source's weights",
        )?);
        let src_d = set(listed(source.list_deltas(), "listing the source's deltas")?);
        let mut dst_all = set(listed(
            destination.list_weights(),
            "listing the destination's weights",
        )?);
        dst_all.extend(listed(
            destination.list_deltas(),
            "listing the destination's deltas",
        )?);
        let manifests = listed(source.list_manifests(), "listing the source's manifests")?;
        Ok(Listing {
            src_w,
            src_d,
            dst_all,
            manifests,
        })
    }
}

/// When `sync(source, destination, ..)` would write nothing (every weight and delta present,
/// every manifest equal), the figures of such a sync (all skipped); `None` when it would write.
/// Reads the listings and the manifests, nothing per weight: how `sync_from_local` decides
/// whether it needs a lease at all.
pub(crate) fn nothing_to_move(
    source: &dyn Store,
    destination: &dyn Store,
) -> Result<Option<SyncStats>, SyncError> {
    let l = Listing::of(source, destination)?;
    if l.src_w
        .iter()
        .chain(&l.src_d)
        .any(|k| !l.dst_all.contains(k))
    {
        return Ok(None);
    }
    for name in &l.manifests {
        let a = listed(source.get_manifest(name), "reading the source's manifests")?;
        let b = listed(
            destination.get_manifest(name),
            "reading the destination's manifests",
        )?;
        if a != b {
            return Ok(None);
        }
    }
    let mut stats = SyncStats::default();
    stats.weights.skipped = l.src_w.iter().filter(|k| !l.src_d.contains(k)).count() as u64;
    stats.deltas.skipped = l.src_d.len() as u64;
    stats.manifests.skipped = l.manifests.len() as u64;
    Ok(Some(stats))
}

/// Copies to `destination` every weight, delta and manifest of `source` it lacks.
///
/// Deltas go only after their reference weight is in the destination, manifests only after
/// every key they list is (manifests that differ are replaced by the source's). Entries that
/// fail are listed in [`SyncError::Incomplete`] with the figures of what did move.
pub fn sync(
    source: &dyn Store,
    destination: &dyn Store,
    options: &SyncOptions,
) -> Result<SyncStats, SyncError> {
    if options.concurrency == 0 {
        return Err(SyncError::InvalidOptions(
            "concurrency must be at least 1".into(),
        ));
    }
    let Listing {
        src_w,
        src_d,
        dst_all,
        manifests,
    } = Listing::of(source, destination)?;
    let weights: Vec<ContentHash> = src_w
        .iter()
        .filter(|k| !src_d.contains(k) && !dst_all.contains(k))
        .copied()
        .collect();
    let deltas: Vec<ContentHash> = src_d
        .iter()
        .filter(|k| !dst_all.contains(k))
        .copied()
        .collect();
    let run = Run {
        src: source,
        dst: destination,
        options,
        stats: Mutex::new(SyncStats {
            dry_run: options.dry_run,
            ..SyncStats::default()
        }),
        failures: Mutex::new(Vec::new()),
        done: AtomicU64::new(0),
        total: (weights.len() + deltas.len() + manifests.len()) as u64,
    };
    run.skipped(
        Kind::Weight,
        src_w
            .iter()
            .filter(|k| !src_d.contains(k) && dst_all.contains(k))
            .count() as u64,
    );
    run.skipped(
        Kind::Delta,
        src_d.iter().filter(|k| dst_all.contains(k)).count() as u64,
    );

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.concurrency)
        .thread_name(|i| format!("coral-sync-{i}"))
        .build()
        .map_err(|e| SyncError::InvalidOptions(format!("thread pool: {e}")))?;

    pool.install(|| {
        let mut present = dst_all.clone();
        present.extend(run.weights(&weights));
        run.deltas(&deltas, &mut present);
        run.manifests(&manifests, &present);
    });

    let stats = run.stats.into_inner().unwrap_or_else(|e| e.into_inner());
    let failures = run.failures.into_inner().unwrap_or_else(|e| e.into_inner());
    if failures.is_empty() {
        Ok(stats)
    } else {
        Err(SyncError::Incomplete { stats, failures })
    }
}

/// Local to remote: `sync(local, remote, options)`.
pub fn push(
    local: &dyn Store,
    remote: &dyn Store,
    options: &SyncOptions,
) -> Result<SyncStats, SyncError> {
    sync(local, remote, options)
}

/// Remote to local: `sync(remote, local, options)`.
pub fn pull(
    local: &dyn Store,
    remote: &dyn Store,
    options: &SyncOptions,
) -> Result<SyncStats, SyncError> {
    sync(remote, local, options)
}

/// Both ways: push, then pull. Returns (pushed, pulled). A manifest of the same name that
/// differs on the two sides ends as the local one on both.
pub fn both(
    local: &dyn Store,
    remote: &dyn Store,
    options: &SyncOptions,
) -> Result<(SyncStats, SyncStats), SyncError> {
    let pushed = push(local, remote, options)?;
    let pulled = pull(local, remote, options)?;
    Ok((pushed, pulled))
}

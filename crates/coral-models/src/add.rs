//! `add`: a model file or folder into a store, tensor by tensor and blob chunk by blob chunk:
//! what the store has is reused, changed tensors are delta-coded against a reference model
//! (named, or chosen automatically), and the manifest is written last.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use coral_core::delta::encode_best_lossless;
use coral_core::{
    BlobChunk, ContentHash, DType, Delta, FileContent, HashedWeight, ManifestFile, ManifestTensor,
    ModelFormat, ModelManifest, ModelName, WeightMetadata, WeightTensor,
};
use coral_store_api::{LeaseKind, Store};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{inconsistent, Context, ModelError, Result};
use crate::folder::{EntryKind, SourceFolder};
use crate::groups::groups;
use crate::source::{SourceFile, SourceTensor};

/// An unhashed tensor (one the reference has no counterpart of) counts for this share of its
/// bytes against [`AddOptions::group_bytes`].
const UNHASHED_SHARE: u64 = 8;

/// Which model changed tensors are delta-coded against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// The stored model whose tensor names, shapes and dtypes best match the new one's (ties:
    /// the newest), if any matches at all.
    Auto,
    /// No delta coding: changed tensors are stored whole.
    None,
    /// This model.
    Model(ModelName),
}

/// The name a model added from `path` gets when none is given: a folder's own name (after
/// following links, so `.` names the folder), else the file's name without its extension.
/// `None` when the path has no such name in UTF-8.
pub fn default_model_name(path: &std::path::Path) -> Option<String> {
    let name = if path.is_dir() {
        path.canonicalize().ok()?.file_name()?.to_owned()
    } else {
        path.file_stem()?.to_owned()
    };
    name.into_string().ok()
}

/// Options of [`add`].
#[derive(Debug, Clone)]
pub struct AddOptions {
    /// The model's name.
    pub name: ModelName,
    /// The model whose tensors serve as delta references.
    pub reference: Reference,
    /// Largest sum of tensor bytes handled at once (at least one tensor is always taken).
    pub group_bytes: usize,
    /// Checked between groups: when set, the add stops and rolls back (Ctrl-C).
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
    /// How long to wait for a garbage collector's exclusive lease on a store that many
    /// writers share (S3) before giving up.
    pub wait: Duration,
}

impl AddOptions {
    /// Options for a model named `name`: the reference chosen automatically, groups of 256 MiB,
    /// no cancel flag, and a minute's wait for a garbage collector's lease.
    pub fn new(name: ModelName) -> Self {
        AddOptions {
            name,
            reference: Reference::Auto,
            group_bytes: 256 << 20,
            cancel: None,
            wait: Duration::from_secs(60),
        }
    }

    /// Delta-codes changed tensors against the model `reference`.
    pub fn with_reference(mut self, reference: ModelName) -> Self {
        self.reference = Reference::Model(reference);
        self
    }

    /// Stores changed tensors whole, with no reference.
    pub fn without_reference(mut self) -> Self {
        self.reference = Reference::None;
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
    /// Size of the input file (of every file, for a folder).
    pub bytes_in: u64,
    /// Bytes the store grew by (weights, deltas and blob chunks as stored).
    pub bytes_stored: u64,
    /// The model changed tensors were delta-coded against, if any.
    pub reference: Option<String>,
    /// True when that model was chosen automatically.
    pub reference_auto: bool,
    /// For a folder: what each entry cost.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileReport>,
}

/// What [`add`] did with one entry of a folder.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileReport {
    /// The path in the folder.
    pub path: String,
    /// "safetensors", "blob", "dir" or "symlink".
    pub kind: String,
    /// Its size.
    pub bytes_in: u64,
    /// Bytes the store grew by for it.
    pub bytes_stored: u64,
    /// Tensors (safetensors) or chunks (blob) in it.
    pub parts: usize,
    /// Of those, how many the store already had.
    pub reused: usize,
}

/// A model to add: one file or a folder.
#[derive(Debug, Clone, Copy)]
pub enum SourceRef<'a> {
    /// A model file.
    File(&'a SourceFile),
    /// A model folder.
    Folder(&'a SourceFolder),
}

impl<'a> From<&'a SourceFile> for SourceRef<'a> {
    fn from(f: &'a SourceFile) -> Self {
        SourceRef::File(f)
    }
}

impl<'a> From<&'a SourceFolder> for SourceRef<'a> {
    fn from(f: &'a SourceFolder) -> Self {
        SourceRef::Folder(f)
    }
}

impl SourceRef<'_> {
    /// The bytes `add` reads, the sum its progress callback reaches: the tensors' data of a
    /// file, every file's size for a folder.
    pub fn progress_total(&self) -> u64 {
        match self {
            SourceRef::File(f) => f.tensors().iter().map(|t| t.len as u64).sum(),
            SourceRef::Folder(f) => f.total_bytes(),
        }
    }
}

/// Adds a model, a file or a folder: stores its tensors (reusing what the store has,
/// delta-coding changed tensors against the reference) and a folder's other files as blob
/// chunks, then its manifest. `progress` receives bytes done.
///
/// On a store that many writers share (S3) it holds a shared lease throughout, so no garbage
/// collector deletes what it stores or reuses before its manifest names it; a failed add there
/// deletes nothing (another writer may already use what it stored: `coral gc` removes it after
/// its grace period) and says how much it left. On a store with one writer at a time (HDF5,
/// memory) a failed add removes what it wrote. The whole add is one commit
/// ([`coral_store_api::WeightStore::defer_commits`]): on HDF5 a crash part-way leaves the store
/// as it was before the add.
pub fn add<'a>(
    store: &dyn Store,
    source: impl Into<SourceRef<'a>>,
    opts: &AddOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<AddReport> {
    let source = source.into();
    let lease = store.acquire_lease(LeaseKind::Shared, "add", opts.wait)?;
    // One commit for the whole add (HDF5: one close and reopen, one round of syncs), made
    // after the manifest, or after a failed add has removed what it wrote.
    let r = store
        .defer_commits()
        .map_err(ModelError::from)
        .and_then(|()| {
            let r = add_leased(store, source, opts, progress);
            let committed = store
                .commit_deferred()
                .with_context(|| format!("committing the add of {}", opts.name));
            r.and_then(|report| committed.map(|()| report))
        });
    // The manifest is written (or not) already: a lease that cannot be given back goes stale.
    if let Err(e) = store.release_lease(lease) {
        tracing::warn!("releasing the add's lease: {e} (it goes stale and is then ignored)");
    }
    r
}

fn add_leased(
    store: &dyn Store,
    source: SourceRef<'_>,
    opts: &AddOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<AddReport> {
    if store.get_manifest(&opts.name)?.is_some() {
        return Err(ModelError::Exists(opts.name.clone()));
    }
    let (reference, auto) = match &opts.reference {
        Reference::Model(r) => (
            Some(store.get_manifest(r)?.ok_or_else(|| {
                ModelError::Invalid(format!("reference model {r} is not in the store"))
            })?),
            false,
        ),
        Reference::None => (None, false),
        Reference::Auto => (choose_reference(store, source)?, true),
    };
    let mut written = Written::default();
    let result = Adder::new(store, opts, reference.as_ref(), &mut written, progress)
        .run(source)
        .map(|mut report| {
            report.reference_auto = auto && report.reference.is_some();
            report
        });
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

/// The (name, dtype, shape) of every tensor of a source.
fn signatures(source: SourceRef<'_>) -> Result<HashSet<(String, DType, Vec<usize>)>> {
    let mut out = HashSet::new();
    let mut put = |f: &SourceFile| {
        for t in f.tensors() {
            out.insert((t.name.clone(), t.dtype, t.shape.clone()));
        }
    };
    match source {
        SourceRef::File(f) => put(f),
        SourceRef::Folder(folder) => {
            for e in folder.entries() {
                if let EntryKind::Safetensors = e.kind {
                    put(&folder.open_safetensors(e)?);
                }
            }
        }
    }
    Ok(out)
}

/// The stored model whose tensors best match `source`'s by name, dtype and shape (the most
/// matches; ties: the newest, then the first name), or `None` when no model shares a tensor.
/// Costs one manifest read per model and no weight read.
pub fn choose_reference(store: &dyn Store, source: SourceRef<'_>) -> Result<Option<ModelManifest>> {
    let want = signatures(source)?;
    if want.is_empty() {
        return Ok(None);
    }
    let mut best: Option<(usize, u64, ModelManifest)> = None;
    for name in store.list_manifests()? {
        let Some(m) = store.get_manifest(&name)? else {
            continue;
        };
        let score = m
            .tensors
            .iter()
            .filter(|t| want.contains(&(t.name.clone(), t.dtype, t.shape.clone())))
            .count();
        if score == 0 {
            continue;
        }
        let better = match &best {
            None => true,
            Some((s, created, _)) => (score, m.created_unix) > (*s, *created),
        };
        if better {
            best = Some((score, m.created_unix, m));
        }
    }
    Ok(best.map(|(_, _, m)| m))
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

/// Counts of one part of the work (a file, a folder's entry).
#[derive(Default, Clone, Copy)]
struct Tally {
    parts: usize,
    reused: usize,
    bytes_stored: u64,
}

impl Tally {
    fn plus(self, o: Tally) -> Tally {
        Tally {
            parts: self.parts + o.parts,
            reused: self.reused + o.reused,
            bytes_stored: self.bytes_stored.saturating_add(o.bytes_stored),
        }
    }
}

/// One add's state: what is stored so far, across every file of a folder.
struct Adder<'a> {
    store: &'a dyn Store,
    opts: &'a AddOptions,
    ref_tensors: HashMap<&'a str, &'a ManifestTensor>,
    seen: HashSet<ContentHash>,
    report: AddReport,
    written: &'a mut Written,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl<'a> Adder<'a> {
    fn new(
        store: &'a dyn Store,
        opts: &'a AddOptions,
        reference: Option<&'a ModelManifest>,
        written: &'a mut Written,
        progress: &'a (dyn Fn(u64) + Sync),
    ) -> Self {
        Adder {
            store,
            opts,
            ref_tensors: reference
                .map(|m| m.tensors.iter().map(|t| (t.name.as_str(), t)).collect())
                .unwrap_or_default(),
            seen: HashSet::new(),
            report: AddReport {
                name: opts.name.to_string(),
                format: String::new(),
                tensors: 0,
                new: 0,
                reused: 0,
                delta_coded: 0,
                bytes_in: 0,
                bytes_stored: 0,
                reference: reference.map(|m| m.name.to_string()),
                reference_auto: false,
                files: Vec::new(),
            },
            written,
            progress,
        }
    }

    fn cancelled(&self) -> Result<()> {
        if self
            .opts
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(ModelError::Interrupted);
        }
        Ok(())
    }

    fn run(mut self, source: SourceRef<'_>) -> Result<AddReport> {
        let parent = self.report.reference.as_deref().map(ModelName::new);
        let parent = parent.transpose()?;
        let manifest = match source {
            SourceRef::File(src) => {
                self.report.format = src.format().to_string();
                self.report.bytes_in = src.file_size();
                let keys = self.tensors(src)?.0;
                self.cancelled()?;
                src.manifest(&self.opts.name, &keys, parent)?
            }
            SourceRef::Folder(folder) => self.folder(folder, parent)?,
        };
        self.store
            .put_manifest(&manifest)
            .with_context(|| format!("writing manifest of {}", self.opts.name))?;
        Ok(self.report)
    }

    /// Stores a file's tensors, in groups; returns their keys and what it cost.
    ///
    /// A tensor the reference model has under its name, dtype and shape is hashed here first:
    /// its key decides whether it is reused or delta-coded. Any other tensor can only be new
    /// or a copy of what the store has, so it goes to the store unhashed
    /// ([`coral_store_api::WeightStore::store_unhashed_batch`]), whose pipeline hashes one
    /// tensor while it compresses and writes others (the hash of a large tensor is a single
    /// SHA-256 stream, on one core).
    fn tensors(&mut self, source: &SourceFile) -> Result<(Vec<ContentHash>, Tally)> {
        self.report.tensors += source.tensors().len();
        let mut keys: Vec<ContentHash> = Vec::with_capacity(source.tensors().len());
        let mut tally = Tally::default();
        let all = source.tensors();
        let opts = self.opts;
        let refs = &self.ref_tensors;
        let candidates: Vec<bool> = all
            .iter()
            .map(|t| {
                refs.get(t.name.as_str())
                    .is_some_and(|r| r.dtype == t.dtype && r.shape == t.shape)
            })
            .collect();
        // A candidate holds its data (and its reference's, and its delta) for the group; an
        // unhashed tensor holds nothing, since the store's pipeline bounds what it has in
        // flight, so it counts for less: larger groups keep that pipeline full (on all-MiniLM
        // a 47 MB embedding hashed alone would leave every other core idle).
        let sizes = all.iter().zip(&candidates).map(|(t, &c)| {
            let len = t.len as u64;
            if c {
                len
            } else {
                len / UNHASHED_SHARE
            }
        });
        let groups: Vec<&[SourceTensor]> = groups(sizes, self.opts.group_bytes as u64)
            .into_iter()
            .map(|r| &all[r])
            .collect();
        // The candidates of a group are hashed while the group before it is stored.
        let hash = |first: usize, group: &[SourceTensor]| -> Result<Vec<HashedWeight>> {
            group
                .par_iter()
                .enumerate()
                .filter(|(i, _)| candidates[first + i])
                .map(|(_, t)| Ok(HashedWeight::new(source.weight(t, &opts.name)?)))
                .collect()
        };
        let mut first = 0;
        let mut hashed = groups.first().map(|g| hash(0, g));
        for (gi, group) in groups.iter().enumerate() {
            self.cancelled()?;
            let next_first = first + group.len();
            let is_candidate = &candidates[first..next_first];
            let hashed_now = hashed.take().unwrap_or_else(|| hash(first, group))?;
            let unhashed: Vec<WeightTensor> = group
                .iter()
                .zip(is_candidate)
                .filter(|(_, &c)| !c)
                .map(|(t, _)| source.weight(t, &opts.name))
                .collect::<Result<_>>()?;
            let plans: Vec<Plan> = hashed_now
                .par_iter()
                .map(|w| plan(self.store, &self.ref_tensors, w))
                .collect::<Result<_>>()?;
            let (stored, next) = rayon::join(
                || -> Result<(Tally, Vec<ContentHash>)> {
                    let a = self.write_group(&hashed_now, plans, true)?;
                    let (b, unhashed_keys) = self.write_unhashed(&unhashed, true)?;
                    Ok((a.plus(b), unhashed_keys))
                },
                || groups.get(gi + 1).map(|g| hash(next_first, g)),
            );
            hashed = next;
            let (t, unhashed_keys) = stored?;
            tally = tally.plus(t);
            // The group's keys in file order: a candidate's from its hash, any other's from
            // the store.
            let (mut planned, mut other) = (hashed_now.iter(), unhashed_keys.into_iter());
            for (t, &c) in group.iter().zip(is_candidate) {
                let key = if c {
                    planned.next().map(|w| *w.key())
                } else {
                    other.next()
                };
                keys.push(key.ok_or_else(|| {
                    ModelError::Inconsistent(format!("tensor {:?} got no key", t.name))
                })?);
            }
            drop((hashed_now, unhashed));
            if gi + 1 == groups.len() {
                source.release_in_background(group);
            } else {
                source.release(group);
            }
            (self.progress)(group.iter().map(|t| t.len as u64).sum());
            first = next_first;
        }
        Ok((keys, tally))
    }

    /// Stores a folder: every entry in order, then returns its manifest.
    fn folder(
        &mut self,
        folder: &SourceFolder,
        parent: Option<ModelName>,
    ) -> Result<ModelManifest> {
        self.report.format = ModelFormat::Folder.to_string();
        self.report.bytes_in = folder.total_bytes();
        let mut tensors: Vec<ManifestTensor> = Vec::new();
        let mut files: Vec<ManifestFile> = Vec::with_capacity(folder.entries().len());
        for e in folder.entries() {
            self.cancelled()?;
            let what = || format!("adding {}", e.path);
            let (content, tally) = match &e.kind {
                EntryKind::Dir => (FileContent::Dir, Tally::default()),
                EntryKind::Symlink(target) => (
                    FileContent::Symlink {
                        target: target.clone(),
                    },
                    Tally::default(),
                ),
                EntryKind::Safetensors => {
                    let src = folder.open_safetensors(e).with_context(what)?;
                    let (keys, tally) = self.tensors(&src).with_context(what)?;
                    let m = src.manifest(&self.opts.name, &keys, None)?;
                    let start = tensors.len();
                    tensors.extend(m.tensors);
                    (
                        FileContent::Safetensors {
                            size: src.file_size(),
                            header: m.safetensors_header.unwrap_or_default(),
                            tensors: [start, tensors.len()],
                        },
                        tally,
                    )
                }
                EntryKind::Blob => {
                    let (size, chunks, tally) = self.blob(folder, e).with_context(what)?;
                    (FileContent::Blob { size, chunks }, tally)
                }
            };
            let f = ManifestFile {
                path: e.path.clone(),
                mode: e.mode,
                content,
            };
            self.report.files.push(FileReport {
                path: f.path.clone(),
                kind: f.kind().to_string(),
                bytes_in: f.size(),
                bytes_stored: tally.bytes_stored,
                parts: tally.parts,
                reused: tally.reused,
            });
            files.push(f);
        }
        let m = ModelManifest {
            version: 1,
            name: self.opts.name.clone(),
            format: ModelFormat::Folder,
            tensors,
            safetensors_header: None,
            file_size: folder.total_bytes(),
            parent,
            created_unix: crate::source::created_unix(),
            files,
        };
        m.check_files()?;
        Ok(m)
    }

    /// Stores a blob's chunks (content-defined, so that an edit costs only the chunks around
    /// it); returns its size, its chunks and what it cost.
    fn blob(
        &mut self,
        folder: &SourceFolder,
        e: &crate::folder::FolderEntry,
    ) -> Result<(u64, Vec<BlobChunk>, Tally)> {
        let map = folder.map_blob(e)?;
        let data: &[u8] = map.as_ref().map_or(&[], |m| &m[..]);
        let bytes = match &map {
            Some(m) => crate::source::mapped_bytes(m.clone()),
            None => bytes::Bytes::new(),
        };
        let ranges = crate::folder::chunk_ranges(data);
        let mut chunks = Vec::with_capacity(ranges.len());
        let mut tally = Tally::default();
        let sizes = ranges.iter().map(|r| r.len() as u64);
        for group in groups(sizes, self.opts.group_bytes as u64) {
            self.cancelled()?;
            let (start, end) = (group.start, group.end);
            let sum: usize = ranges[start..end].iter().map(|r| r.len()).sum();
            let weights: Vec<WeightTensor> = ranges[start..end]
                .iter()
                .map(|r| {
                    let mut meta = WeightMetadata::new(
                        format!("{}@{}", e.path, r.start),
                        vec![r.len()],
                        DType::U8,
                    );
                    meta.model_name = Some(self.opts.name.to_string());
                    meta.layer_type = Some("blob".to_string());
                    Ok(WeightTensor::new(meta, bytes.slice(r.clone()))?)
                })
                .collect::<Result<_>>()?;
            // A chunk is stored or found present: no delta, so no hash is needed first.
            let (t, keys) = self.write_unhashed(&weights, false)?;
            tally = tally.plus(t);
            chunks.extend(weights.iter().zip(keys).map(|(w, key)| BlobChunk {
                key,
                len: w.nbytes() as u64,
            }));
            if let Some(m) = &map {
                crate::source::release_pages(m, ranges[start].start, ranges[end - 1].end);
            }
            (self.progress)(sum as u64);
        }
        Ok((data.len() as u64, chunks, tally))
    }

    /// Carries out a group's plans: deltas one by one, new weights in one batch (recorded in
    /// `written` first, so a batch that fails half-way is rolled back too); counts into the
    /// report (as tensors when `tensors`, else only in bytes: blob chunks), and returns the
    /// group's own counts.
    fn write_group(
        &mut self,
        tensors: &[HashedWeight],
        plans: Vec<Plan>,
        count_tensors: bool,
    ) -> Result<Tally> {
        let store = self.store;
        let mut tally = Tally {
            parts: tensors.len(),
            ..Tally::default()
        };
        let mut batch: Vec<HashedWeight> = Vec::new();
        let mut delta_batch: Vec<(coral_core::Delta, ContentHash)> = Vec::new();
        for (w, plan) in tensors.iter().zip(plans) {
            let key = w.key();
            if !self.seen.insert(*key) {
                tally.reused += 1;
                continue;
            }
            match plan {
                Plan::Reused => tally.reused += 1,
                Plan::Full => {
                    self.report.new += usize::from(count_tensors);
                    batch.push(w.clone());
                }
                Plan::Delta(d) => {
                    self.report.delta_coded += 1;
                    tally.bytes_stored = tally.bytes_stored.saturating_add(d.nbytes() as u64);
                    delta_batch.push((*d, *key));
                }
            }
        }
        if !delta_batch.is_empty() {
            // Record first: a batch that fails half-way is rolled back too.
            self.written
                .deltas
                .extend(delta_batch.iter().map(|(_, k)| *k));
            let keys = store
                .store_delta_batch(&delta_batch)
                .context("storing deltas")?;
            for ((_, want), k) in delta_batch.iter().zip(&keys) {
                if k != want {
                    self.written.deltas.push(*k);
                    inconsistent!("store returned key {k} for a delta, expected {want}");
                }
            }
        }
        if !batch.is_empty() {
            // Record first: a batch that fails half-way is rolled back too.
            self.written.weights.extend(batch.iter().map(|w| *w.key()));
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
                tally.bytes_stored = tally.bytes_stored.saturating_add(s.stored_bytes);
            }
        }
        if count_tensors {
            self.report.reused += tally.reused;
        }
        self.report.bytes_stored = self.report.bytes_stored.saturating_add(tally.bytes_stored);
        Ok(tally)
    }
}

impl Adder<'_> {
    /// Stores weights whose keys are not known yet ([`Store::store_unhashed_batch`]): each is
    /// new or already present. Counts into the report like [`Adder::write_group`]; returns the
    /// group's own counts and the keys, in order.
    fn write_unhashed(
        &mut self,
        weights: &[WeightTensor],
        count_tensors: bool,
    ) -> Result<(Tally, Vec<ContentHash>)> {
        let mut tally = Tally {
            parts: weights.len(),
            ..Tally::default()
        };
        if weights.is_empty() {
            return Ok((tally, Vec::new()));
        }
        let stored = self
            .store
            .store_unhashed_batch(weights)
            .context("storing weights")?;
        if stored.len() != weights.len() {
            inconsistent!(
                "store returned {} results for {} weights",
                stored.len(),
                weights.len()
            );
        }
        for s in &stored {
            self.seen.insert(s.key);
            if s.new {
                // A later failure of this add removes it again.
                self.written.weights.push(s.key);
                self.report.new += usize::from(count_tensors);
                tally.bytes_stored = tally.bytes_stored.saturating_add(s.stored_bytes);
            } else {
                tally.reused += 1;
            }
        }
        if count_tensors {
            self.report.reused += tally.reused;
        }
        self.report.bytes_stored = self.report.bytes_stored.saturating_add(tally.bytes_stored);
        Ok((tally, stored.into_iter().map(|s| s.key).collect()))
    }
}

/// What one tensor needs: nothing (the store has it), to be stored in full, or a delta against
/// the reference model's tensor of the same name. Deltas are taken only against weights held
/// whole, so chains stay one deep: when the reference's tensor is itself a delta, the new one
/// is coded against that delta's reference. A delta is kept only when the encoder finds it
/// smaller than the weight.
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
    let base_key = match store.load_delta(&rt.key)? {
        Some(d) => d.reference_hash,
        None => rt.key,
    };
    if base_key == *key || store.delta_exists(&base_key)? || !store.exists(&base_key)? {
        return Ok(Plan::Full);
    }
    let base = store
        .load(&base_key)?
        .ok_or_else(|| {
            ModelError::Inconsistent(format!("weight {base_key} is missing from the store"))
        })
        .with_context(|| format!("loading reference tensor {:?}", rt.name))?;
    if base.dtype() != w.dtype() || base.shape() != w.shape() {
        return Ok(Plan::Full);
    }
    match encode_best_lossless(w, &base, &base_key) {
        Ok(Some(d)) => Ok(Plan::Delta(Box::new(d))),
        Ok(None) => Ok(Plan::Full),
        Err(e) => {
            tracing::debug!("no delta for {:?}: {e}", w.name());
            Ok(Plan::Full)
        }
    }
}

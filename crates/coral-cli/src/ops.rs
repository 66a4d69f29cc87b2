//! What the commands do, on any [`Store`]: add, export, diff, verify, repair, gc.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use coral_core::delta::encode_best_lossless;
use coral_core::{
    ContentHash, DType, Delta, HashedWeight, ManifestTensor, ModelManifest, ModelName, WeightTensor,
};
use coral_store_api::{LeaseKind, Store};
use rayon::prelude::*;
use serde::Serialize;

use crate::source::{SourceFile, SourceTensor};

/// Loads a weight by key, whether the store holds it whole or as a delta, verified once: the
/// store's `load_hashed` follows the delta chain (Coral's one walker,
/// `coral_store_api::resolve`) and hashes what it rebuilt; a weight that comes back under
/// another hash (a store opened without strict integrity) is refused here without hashing again.
pub fn load_resolved(store: &dyn Store, key: &ContentHash) -> Result<WeightTensor> {
    let w = store
        .load_hashed(key)?
        .ok_or_else(|| anyhow!("weight {key} is missing from the store"))?;
    if w.key() != key {
        bail!(
            "weight {key} ({:?}) is damaged: its data hashes to {}",
            w.name(),
            w.key()
        );
    }
    Ok(w.into_weight())
}

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
        bail!(
            "model {} already exists (remove it first with `coral rm {}`)",
            opts.name,
            opts.name
        );
    }
    let reference = match &opts.reference {
        Some(r) => Some(
            store
                .get_manifest(r)?
                .ok_or_else(|| anyhow!("reference model {r} is not in the store"))?,
        ),
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
                Err(anyhow!("{e:#}; {note}"))
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
                "the up to {w} weight(s) and {d} delta(s) it stored are left in the store (another                  writer may already use them); `coral gc` removes those no model needs once they                  are older than its grace period"
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
        format: source.format().to_owned(),
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
            bail!("interrupted; nothing was added");
        }
        // Each tensor is hashed once, here; the store trusts the proof.
        let tensors: Vec<HashedWeight> = group
            .par_iter()
            .map(|t| source.weight(t, &opts.name).map(HashedWeight::new))
            .collect::<Result<_>>()?;
        // Decide, in parallel, what each tensor needs.
        let plans: Vec<Plan> = tensors
            .par_iter()
            .map(|w| -> Result<Plan> {
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
                // Only delta-code against weights held whole, so chains stay one deep.
                if store.delta_exists(&rt.key)? || !store.exists(&rt.key)? {
                    return Ok(Plan::Full);
                }
                let base = store
                    .load(&rt.key)?
                    .ok_or_else(|| anyhow!("weight {} is missing from the store", rt.key))
                    .with_context(|| format!("loading reference tensor {:?}", rt.name))?;
                match encode_best_lossless(w, &base, &rt.key) {
                    Ok(Some(d)) => Ok(Plan::Delta(Box::new(d))),
                    Ok(None) => Ok(Plan::Full),
                    Err(e) => {
                        tracing::debug!("no delta for {:?}: {e}", w.name());
                        Ok(Plan::Full)
                    }
                }
            })
            .collect::<Result<_>>()?;
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
                        bail!(
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
                    bail!(
                        "store did not keep {:?} under its key {}",
                        w.name(),
                        w.key()
                    );
                }
                report.bytes_stored = report.bytes_stored.saturating_add(s.stored_bytes);
            }
        }
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
        bail!("interrupted; nothing was added");
    }
    let manifest = source.manifest(&opts.name, &keys, opts.reference.clone())?;
    store
        .put_manifest(&manifest)
        .with_context(|| format!("writing manifest of {}", opts.name))?;
    Ok(report)
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

/// Writes a model back to `out` (through a temporary file renamed at the end). A safetensors
/// model is rebuilt byte for byte from its recorded header and offsets.
pub fn export(
    store: &dyn Store,
    name: &ModelName,
    out: &Path,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let m = store
        .get_manifest(name)?
        .ok_or_else(|| anyhow!("model {name} is not in the store"))?;
    clean_stale_tmp(out);
    let tmp = tmp_path(out);
    let res = (|| -> Result<u64> {
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let n = crate::source::write_model(store, &m, out, &mut w, group_bytes, progress)?;
        w.flush()?;
        w.into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .context("syncing output")?;
        Ok(n)
    })();
    match res {
        Ok(n) => {
            std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The suffix of an export's temporary file, before the exporting process's id.
const TMP_SUFFIX: &str = ".coral-tmp-";

fn tmp_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|s| s.to_os_string())
        .unwrap_or_default();
    name.push(format!("{TMP_SUFFIX}{}", std::process::id()));
    out.with_file_name(name)
}

/// True while a process with this id exists (`kill(pid, 0)`: permission denied means it does)
/// and has not exited (a zombie, not yet reaped, is dead).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(id) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if id <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(id, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses, STATE follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => true,
    }
}

/// Removes the temporary files that exports killed or crashed before their end left in `out`'s
/// folder (`NAME.coral-tmp-PID` whose process no longer exists; a live export's is left alone).
/// Returns the paths removed. Failures to list or remove are logged, never fatal.
pub fn clean_stale_tmp(out: &Path) -> Vec<PathBuf> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "not looking for stale exports");
            return removed;
        }
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, pid)) = name.rsplit_once(TMP_SUFFIX) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == me || pid_alive(pid) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed the temporary file of an export that did not finish");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale export")
            }
        }
    }
    removed
}

/// Loads the manifest's tensors in groups, in parallel within a group, and hands each to `f` in
/// order.
pub fn for_each_tensor(
    store: &dyn Store,
    m: &ModelManifest,
    group_bytes: usize,
    mut f: impl FnMut(&ManifestTensor, WeightTensor) -> Result<()>,
) -> Result<()> {
    let mut start = 0;
    while start < m.tensors.len() {
        let mut end = start;
        let mut sum = 0usize;
        while end < m.tensors.len() {
            let t = &m.tensors[end];
            let n = t
                .shape
                .iter()
                .fold(t.dtype.size(), |a, &d| a.saturating_mul(d));
            if end > start && sum.saturating_add(n) > group_bytes {
                break;
            }
            sum = sum.saturating_add(n);
            end += 1;
        }
        let group = &m.tensors[start..end];
        let loaded: Vec<WeightTensor> = group
            .par_iter()
            .map(|t| load_resolved(store, &t.key).with_context(|| format!("tensor {:?}", t.name)))
            .collect::<Result<_>>()?;
        for (t, w) in group.iter().zip(loaded) {
            if w.dtype() != t.dtype || w.shape() != t.shape.as_slice() {
                bail!(
                    "tensor {:?}: stored weight is {} {:?}, manifest says {} {:?}",
                    t.name,
                    w.dtype(),
                    w.shape(),
                    t.dtype,
                    t.shape
                );
            }
            f(t, w)?;
        }
        start = end;
    }
    Ok(())
}

/// One tensor's comparison in [`diff`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChangedTensor {
    /// Name.
    pub name: String,
    /// ‖a−b‖/‖a‖ (infinite when ‖a‖ is 0 and b differs), or `None` when shapes or dtypes differ.
    pub relative_change: Option<f64>,
    /// Why no relative change, when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What [`diff`] found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiffReport {
    /// Tensors with the same key in both.
    pub equal: Vec<String>,
    /// Tensors whose data differ.
    pub changed: Vec<ChangedTensor>,
    /// Tensors only in B.
    pub added: Vec<String>,
    /// Tensors only in A.
    pub removed: Vec<String>,
}

fn to_f64(w: &WeightTensor) -> Option<Vec<f64>> {
    let d = w.data();
    let n = w.dtype().size();
    let it = d.chunks_exact(n);
    let v: Vec<f64> = match w.dtype() {
        DType::F32 => it
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::F64 => it
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        DType::F16 => it
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::BF16 => it
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::I8 => it.map(|c| c[0] as i8 as f64).collect(),
        DType::U8 | DType::Bool => it.map(|c| c[0] as f64).collect(),
        DType::I16 => it
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
            .collect(),
        DType::U16 => it
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as f64)
            .collect(),
        DType::I32 => it
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::U32 => it
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::I64 => it
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        DType::U64 => it
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        DType::F8E4M3 | DType::F8E5M2 => return None,
    };
    Some(v)
}

/// ‖a−b‖/‖a‖ for same-shaped weights.
pub fn relative_change(a: &WeightTensor, b: &WeightTensor) -> Option<f64> {
    let (va, vb) = (to_f64(a)?, to_f64(b)?);
    if va.len() != vb.len() {
        return None;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in va.iter().zip(&vb) {
        num += (x - y) * (x - y);
        den += x * x;
    }
    Some(if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    })
}

/// Compares two models tensor by tensor (by name).
pub fn diff(store: &dyn Store, a: &ModelName, b: &ModelName) -> Result<DiffReport> {
    let ma = store
        .get_manifest(a)?
        .ok_or_else(|| anyhow!("model {a} is not in the store"))?;
    let mb = store
        .get_manifest(b)?
        .ok_or_else(|| anyhow!("model {b} is not in the store"))?;
    let tb: HashMap<&str, &ManifestTensor> =
        mb.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let ta: HashSet<&str> = ma.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut report = DiffReport {
        equal: vec![],
        changed: vec![],
        added: vec![],
        removed: vec![],
    };
    let mut to_compare = Vec::new();
    for t in &ma.tensors {
        match tb.get(t.name.as_str()) {
            None => report.removed.push(t.name.clone()),
            Some(u) if u.key == t.key => report.equal.push(t.name.clone()),
            Some(u) => to_compare.push((t, *u)),
        }
    }
    report.changed = to_compare
        .par_iter()
        .map(|(t, u)| -> Result<ChangedTensor> {
            if t.dtype != u.dtype || t.shape != u.shape {
                return Ok(ChangedTensor {
                    name: t.name.clone(),
                    relative_change: None,
                    note: Some(format!(
                        "{} {:?} -> {} {:?}",
                        t.dtype, t.shape, u.dtype, u.shape
                    )),
                });
            }
            let wa = load_resolved(store, &t.key)?;
            let wb = load_resolved(store, &u.key)?;
            let rc = relative_change(&wa, &wb);
            Ok(ChangedTensor {
                name: t.name.clone(),
                relative_change: rc,
                note: rc.is_none().then(|| format!("{} is not numeric", t.dtype)),
            })
        })
        .collect::<Result<_>>()?;
    report.added = mb
        .tensors
        .iter()
        .filter(|t| !ta.contains(t.name.as_str()))
        .map(|t| t.name.clone())
        .collect();
    Ok(report)
}

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
    let check = |kind: &'static str, key: &ContentHash| -> Option<Failure> {
        let r = if kind == "weight" {
            store
                .load(key)
                .map_err(anyhow::Error::from)
                .and_then(|w| match w {
                    Some(w) => w.verify(key).map_err(Into::into),
                    None => Err(anyhow!("listed but cannot be loaded")),
                })
        } else {
            load_resolved(store, key).map(|_| ())
        };
        progress(1);
        r.err().map(|e| Failure {
            kind,
            id: key.to_hex(),
            error: format!("{e:#}"),
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
            let m = store
                .get_manifest(name)?
                .ok_or_else(|| anyhow!("listed but cannot be loaded"))?;
            if m.name != *name {
                bail!("manifest names model {}", m.name);
            }
            for t in &m.tensors {
                if failed.contains(&t.key.to_hex()) {
                    bail!(
                        "tensor {:?}: {} {} failed verification",
                        t.name,
                        if delta_set.contains(&t.key) {
                            "delta"
                        } else {
                            "weight"
                        },
                        t.key
                    );
                }
                if !store.exists(&t.key)? && !store.delta_exists(&t.key)? {
                    bail!("tensor {:?}: weight {} is missing", t.name, t.key);
                }
            }
            crate::source::check_manifest(&m)
        })();
        progress(1);
        if let Err(e) = r {
            failures.push(Failure {
                kind: "manifest",
                id: name.to_string(),
                error: format!("{e:#}"),
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
    let lost = |kind: &'static str, id: String, e: anyhow::Error| Failure {
        kind,
        id,
        error: format!("{e:#}"),
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
        let loaded: Vec<(ContentHash, Result<WeightTensor>)> = group
            .par_iter()
            .map(|k| {
                let r = src
                    .load(k)
                    .map_err(anyhow::Error::from)
                    .and_then(|w| w.ok_or_else(|| anyhow!("listed but cannot be loaded")))
                    .and_then(|w| {
                        w.verify(k)?;
                        Ok(w)
                    });
                progress(1);
                (*k, r)
            })
            .collect();
        let mut batch: Vec<(String, WeightTensor)> = Vec::new();
        for (k, r) in loaded {
            match r {
                // Verified against a SHA-256 key, it is the key `store_batch` computes: no
                // second hash here.
                Ok(w) if k.algorithm() == coral_core::HashAlgorithm::Sha256 => {
                    batch.push((k.to_hex(), w))
                }
                // A legacy key (coral-ml's xxh3): stored under it as it was.
                Ok(w) => {
                    let got = dst
                        .store_with_key(&w, &k)
                        .with_context(|| format!("storing weight {k}"))?;
                    if got != k {
                        bail!("the new store keyed weight {k} as {got}");
                    }
                    copied.insert(k);
                }
                Err(e) => report.lost.push(lost("weight", k.to_hex(), e)),
            }
        }
        if !batch.is_empty() {
            let stored = dst.store_batch(&batch).context("storing weights")?;
            for (hex, _) in &batch {
                match stored.get(hex) {
                    Some(k) if k.to_hex() == *hex => {
                        copied.insert(*k);
                    }
                    _ => bail!("the new store did not keep weight {hex} under its key"),
                }
            }
        }
    }
    report.weights = copied.len();

    // Deltas: one that decodes and verifies has a whole chain of references that verify, all
    // copied (the weights above, the deltas here).
    for k in &deltas {
        let r = load_resolved(src, k).and_then(|_| {
            src.load_delta(k)?
                .ok_or_else(|| anyhow!("listed but cannot be loaded"))
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
            let m = src
                .get_manifest(name)?
                .ok_or_else(|| anyhow!("listed but cannot be loaded"))?;
            if m.name != *name {
                bail!("manifest names model {}", m.name);
            }
            crate::source::check_manifest(&m)?;
            for t in &m.tensors {
                if !copied.contains(&t.key) {
                    bail!("tensor {:?}: {} was lost", t.name, t.key);
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

/// Parses a duration as `coral gc --grace` takes it: a number of seconds, or a number followed
/// by `s`, `m`, `h` or `d` (`0`, `90s`, `30m`, `1.5h`, `2d`).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit.trim() {
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => bail!("{text:?} is not a duration: give a number with s, m, h or d (0, 90s, 30m, 6h)"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| {
            anyhow!("{text:?} is not a duration: give a number with s, m, h or d (0, 90s, 30m, 6h)")
        })?;
    let secs = n * scale;
    if secs > 1e12 {
        bail!("{text:?} is too long a duration");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration as [`parse_duration`] reads it back: `0s`, `90s`, `30m`, `6h`, `2d`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{:.3}s", d.as_secs_f64())
    } else if s == 0 {
        "0s".to_owned()
    } else if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Counts of the keys of a model by how they are stored.
pub fn key_kinds(store: &dyn Store, m: &ModelManifest) -> Result<BTreeMap<&'static str, usize>> {
    let mut out = BTreeMap::new();
    for k in m.keys().collect::<BTreeSet<_>>() {
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

/// Shared bytes of a memory-mapped file.
pub fn mapped_bytes(map: Arc<memmap2::Mmap>) -> Bytes {
    Bytes::from_owner(MapOwner(map))
}

struct MapOwner(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coral_formats::safetensors::build_header;
    use coral_store_api::{
        DeltaStorageInfo, DeltaStore, ManifestStore, MemoryStore, StorageInfo, StoreError,
        WeightStore,
    };
    use proptest::prelude::*;

    fn name(s: &str) -> ModelName {
        ModelName::new(s).unwrap()
    }

    /// A safetensors file of f32 tensors with the given values.
    fn model_file(dir: &Path, file: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
        let list: Vec<_> = tensors
            .iter()
            .map(|(n, s, _)| (n.to_string(), DType::F32, s.clone()))
            .collect();
        let (mut bytes, _) = build_header(&list).unwrap();
        for (_, _, v) in tensors {
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let p = dir.join(file);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn smooth(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.013 + seed).sin()).collect()
    }

    fn opts(n: &str, reference: Option<&str>) -> AddOptions {
        AddOptions {
            name: name(n),
            reference: reference.map(name),
            group_bytes: 4096,
            cancel: None,
            wait: Duration::from_secs(10),
        }
    }

    fn export_bytes(store: &dyn Store, model: &str, dir: &Path, ext: &str) -> Vec<u8> {
        let out = dir.join(format!("{model}.out.{ext}"));
        export(store, &name(model), &out, 4096, &|_| {}).unwrap();
        std::fs::read(out).unwrap()
    }

    #[test]
    fn add_export_dedup_delta_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        let base = vec![
            ("a", vec![64, 16], smooth(1024, 0.0)),
            ("b", vec![1024], smooth(1024, 1.0)),
            ("c", vec![1024], smooth(1024, 1.0)), // same data as b
            ("d", vec![3], vec![1.0, 2.0, 3.0]),
        ];
        let p = model_file(dir.path(), "base.safetensors", &base);
        let src = SourceFile::open(&p).unwrap();
        let r = add(&store, &src, &opts("base", None), &|_| {}).unwrap();
        assert_eq!((r.new, r.reused, r.delta_coded), (3, 1, 0));
        assert_eq!(
            export_bytes(&store, "base", dir.path(), "safetensors"),
            std::fs::read(&p).unwrap()
        );

        // A fine-tune: "a" slightly changed everywhere, the rest the same.
        let mut ft = base.clone();
        ft[0].2 = ft[0]
            .2
            .iter()
            .enumerate()
            .map(|(i, v)| v + 1e-4 * ((i % 7) as f32 - 3.0))
            .collect();
        let q = model_file(dir.path(), "ft.safetensors", &ft);
        let r = add(
            &store,
            &SourceFile::open(&q).unwrap(),
            &opts("ft", Some("base")),
            &|_| {},
        )
        .unwrap();
        assert_eq!((r.new, r.reused, r.delta_coded), (0, 3, 1), "{r:?}");
        assert_eq!(store.list_deltas().unwrap().len(), 1);
        assert_eq!(
            export_bytes(&store, "ft", dir.path(), "safetensors"),
            std::fs::read(&q).unwrap()
        );

        let d = diff(&store, &name("base"), &name("ft")).unwrap();
        assert_eq!(d.equal, ["b", "c", "d"]);
        assert_eq!(d.changed.len(), 1);
        let rc = d.changed[0].relative_change.unwrap();
        assert!(rc > 0.0 && rc < 1e-2, "{rc}");

        assert!(verify(&store, &|_| {}).unwrap().failures.is_empty());
        // Removing base keeps what ft needs, the reference of its delta included.
        assert!(store.delete_manifest(&name("base")).unwrap());
        let g = gc(&store, false).unwrap();
        assert!(g.weights.is_empty() && g.deltas.is_empty(), "{g:?}");
        assert_eq!(
            export_bytes(&store, "ft", dir.path(), "safetensors"),
            std::fs::read(&q).unwrap()
        );
        assert!(store.delete_manifest(&name("ft")).unwrap());
        let listed = store.list_weights().unwrap();
        let g = gc(&store, true).unwrap();
        assert_eq!((g.weights.len(), g.deltas.len()), (3, 1));
        assert_eq!(
            store.list_weights().unwrap(),
            listed,
            "dry run deletes nothing"
        );
        gc(&store, false).unwrap();
        assert!(store.list_weights().unwrap().is_empty());
        assert!(store.list_deltas().unwrap().is_empty());
    }

    #[test]
    fn add_refuses_existing_names_and_unknown_references() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        let p = model_file(
            dir.path(),
            "m.safetensors",
            &[("x", vec![2], vec![1.0, 2.0])],
        );
        let src = SourceFile::open(&p).unwrap();
        add(&store, &src, &opts("m", None), &|_| {}).unwrap();
        let e = add(&store, &src, &opts("m", None), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = add(&store, &src, &opts("n", Some("nope")), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("not in the store"), "{e}");
        assert!(store.get_manifest(&name("n")).unwrap().is_none());
    }

    #[test]
    fn a_cancelled_add_rolls_back() {
        static CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        let p = model_file(
            dir.path(),
            "m.safetensors",
            &[
                ("a", vec![1024], smooth(1024, 0.0)),
                ("b", vec![1024], smooth(1024, 2.0)),
            ],
        );
        let o = AddOptions {
            cancel: Some(&CANCEL),
            ..opts("m", None)
        };
        // Cancelled after the first group is stored.
        let e = add(&store, &SourceFile::open(&p).unwrap(), &o, &|_| {
            CANCEL.store(true, std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
        assert!(store.list_weights().unwrap().is_empty());
        assert!(store.list_manifests().unwrap().is_empty());
    }

    #[test]
    fn stale_export_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.safetensors");
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let me = std::process::id();
        let stale = dir.path().join(format!("other.npz.coral-tmp-{dead}"));
        let mine = dir.path().join(format!("m.safetensors.coral-tmp-{me}"));
        let live = dir.path().join("m.safetensors.coral-tmp-1");
        let unrelated = dir.path().join("m.safetensors.coral-tmp-x");
        for p in [&stale, &mine, &live, &unrelated] {
            std::fs::write(p, b"partial").unwrap();
        }
        assert_eq!(clean_stale_tmp(&out), vec![stale.clone()]);
        assert!(!stale.exists());
        assert!(mine.exists() && live.exists() && unrelated.exists());
    }

    #[test]
    fn verify_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        let p = model_file(
            dir.path(),
            "m.safetensors",
            &[("x", vec![2], vec![1.0, 2.0])],
        );
        add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("m", None),
            &|_| {},
        )
        .unwrap();
        let key = store.list_weights().unwrap()[0];
        let q = model_file(dir.path(), "n.safetensors", &[("y", vec![3], vec![4.0; 3])]);
        add(
            &store,
            &SourceFile::open(&q).unwrap(),
            &opts("n", None),
            &|_| {},
        )
        .unwrap();
        assert!(store.corrupt_for_testing(&key, vec![0; 8]));
        let r = verify(&store, &|_| {}).unwrap();
        // The damaged weight and the model that uses it; the other model is fine.
        let failed: Vec<(&str, &str)> =
            r.failures.iter().map(|f| (f.kind, f.id.as_str())).collect();
        let hex = key.to_hex();
        assert_eq!(
            failed,
            [("weight", hex.as_str()), ("manifest", "m")],
            "{r:?}"
        );
        assert!(r.failures[1].error.contains("failed verification"), "{r:?}");
        let out = dir.path().join("o.safetensors");
        assert!(export(&store, &name("m"), &out, 1 << 20, &|_| {}).is_err());
        assert!(!out.exists(), "a failed export leaves no file");
    }

    /// A store whose manifest writes fail for the model "fails" (add must then leave it as it
    /// was, or on a shared store leave what it stored); optionally one that says many writers
    /// share it, with the commit times the test gives and a log of its leases.
    #[derive(Debug, Default)]
    struct NoManifests {
        inner: MemoryStore,
        shared: bool,
        young: std::sync::Mutex<BTreeSet<ContentHash>>,
        leases: std::sync::Mutex<Vec<String>>,
    }

    impl NoManifests {
        fn shared() -> Self {
            NoManifests {
                shared: true,
                ..Default::default()
            }
        }
        fn log(&self) -> Vec<String> {
            self.leases.lock().unwrap().clone()
        }
    }

    impl WeightStore for NoManifests {
        fn store_hashed(
            &self,
            w: &coral_core::HashedWeight,
        ) -> coral_store_api::Result<coral_store_api::Stored> {
            self.inner.store_hashed(w)
        }
        fn load_hashed(
            &self,
            k: &ContentHash,
        ) -> coral_store_api::Result<Option<coral_core::HashedWeight>> {
            self.inner.load_hashed(k)
        }
        fn exists(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
            self.inner.exists(k)
        }
        fn delete(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
            self.inner.delete(k)
        }
        fn list_weights(&self) -> coral_store_api::Result<Vec<ContentHash>> {
            self.inner.list_weights()
        }
        fn get_metadata(
            &self,
            k: &ContentHash,
        ) -> coral_store_api::Result<Option<coral_core::WeightMetadata>> {
            self.inner.get_metadata(k)
        }
        fn storage_info(&self) -> coral_store_api::Result<StorageInfo> {
            self.inner.storage_info()
        }
        fn close(&mut self) -> coral_store_api::Result<()> {
            self.inner.close()
        }
    }

    impl DeltaStore for NoManifests {
        fn store_delta(&self, d: &Delta, k: &ContentHash) -> coral_store_api::Result<ContentHash> {
            self.inner.store_delta(d, k)
        }
        fn load_delta(&self, k: &ContentHash) -> coral_store_api::Result<Option<Delta>> {
            self.inner.load_delta(k)
        }
        fn delta_exists(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
            self.inner.delta_exists(k)
        }
        fn delete_delta(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
            self.inner.delete_delta(k)
        }
        fn list_deltas(&self) -> coral_store_api::Result<Vec<ContentHash>> {
            self.inner.list_deltas()
        }
        fn get_delta_storage_info(&self) -> coral_store_api::Result<DeltaStorageInfo> {
            self.inner.get_delta_storage_info()
        }
    }

    impl ManifestStore for NoManifests {
        fn put_manifest(&self, m: &ModelManifest) -> coral_store_api::Result<()> {
            if m.name.as_str() == "fails" {
                return Err(StoreError::ReadOnly {
                    location: "test".into(),
                });
            }
            self.inner.put_manifest(m)
        }
        fn get_manifest(&self, n: &ModelName) -> coral_store_api::Result<Option<ModelManifest>> {
            self.inner.get_manifest(n)
        }
        fn list_manifests(&self) -> coral_store_api::Result<Vec<ModelName>> {
            self.inner.list_manifests()
        }
        fn delete_manifest(&self, n: &ModelName) -> coral_store_api::Result<bool> {
            self.inner.delete_manifest(n)
        }
        fn shares_writers(&self) -> bool {
            self.shared
        }
        fn acquire_lease(
            &self,
            kind: LeaseKind,
            op: &str,
            _wait: Duration,
        ) -> coral_store_api::Result<coral_store_api::Lease> {
            let id = format!("{kind}:{op}");
            self.leases.lock().unwrap().push(format!("take {id}"));
            Ok(coral_store_api::Lease::held(kind, id))
        }
        fn release_lease(&self, lease: coral_store_api::Lease) -> coral_store_api::Result<()> {
            if let Some(id) = lease.id() {
                self.leases.lock().unwrap().push(format!("give {id}"));
            }
            Ok(())
        }
        fn committed_within(
            &self,
            age: Duration,
        ) -> coral_store_api::Result<BTreeSet<ContentHash>> {
            Ok(if age.is_zero() {
                BTreeSet::new()
            } else {
                self.young.lock().unwrap().clone()
            })
        }
    }

    #[test]
    fn a_failed_add_leaves_the_store_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let store = NoManifests::default();
        let base = vec![
            ("a", vec![1024], smooth(1024, 0.0)),
            ("b", vec![4], vec![1.0; 4]),
        ];
        let p = model_file(dir.path(), "base.safetensors", &base);
        add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("base", None),
            &|_| {},
        )
        .unwrap();
        let mut ft = base.clone();
        ft[0].2 = ft[0].2.iter().map(|v| v + 1e-4).collect();
        ft.push(("c", vec![8], smooth(8, 3.0)));
        let q = model_file(dir.path(), "ft.safetensors", &ft);
        let weights = store.list_weights().unwrap();
        let e = add(
            &store,
            &SourceFile::open(&q).unwrap(),
            &opts("fails", Some("base")),
            &|_| {},
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("read-only"), "{e:#}");
        assert_eq!(store.list_weights().unwrap(), weights);
        assert!(store.list_deltas().unwrap().is_empty());
        assert_eq!(store.list_manifests().unwrap(), vec![name("base")]);
    }

    #[test]
    fn a_failed_add_on_a_shared_store_leaves_what_it_stored_for_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = NoManifests::shared();
        let p = model_file(
            dir.path(),
            "m.safetensors",
            &[
                ("a", vec![1024], smooth(1024, 0.0)),
                ("b", vec![4], vec![1.0; 4]),
            ],
        );
        let e = add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("fails", None),
            &|_| {},
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("read-only"), "{msg}");
        assert!(
            msg.contains("the up to 2 weight(s) and 0 delta(s) it stored are left in the store"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        // Nothing deleted: another writer may already use them.
        assert_eq!(store.list_weights().unwrap().len(), 2);
        assert!(store.list_manifests().unwrap().is_empty());
        // The add held a shared lease, and gave it back.
        assert_eq!(store.log(), ["take shared:add", "give shared:add"]);
        // gc keeps them while they are young, removes them after.
        *store.young.lock().unwrap() = store.list_weights().unwrap().into_iter().collect();
        let g = gc(&store, false).unwrap();
        assert_eq!((g.weights.len(), g.kept, g.grace_secs), (0, 2, Some(3600)));
        let g = gc_with(
            &store,
            &GcOptions {
                grace: Duration::ZERO,
                ..GcOptions::default()
            },
        )
        .unwrap();
        assert_eq!((g.weights.len(), g.kept, g.grace_secs), (2, 0, Some(0)));
        assert!(store.list_weights().unwrap().is_empty());
    }

    #[test]
    fn gc_on_a_shared_store_takes_an_exclusive_lease_and_spares_young_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = NoManifests::shared();
        let base = vec![
            ("a", vec![64, 16], smooth(1024, 0.0)),
            ("b", vec![1024], smooth(1024, 1.0)),
        ];
        let p = model_file(dir.path(), "base.safetensors", &base);
        add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("base", None),
            &|_| {},
        )
        .unwrap();
        let mut ft = base.clone();
        ft[0].2 = ft[0]
            .2
            .iter()
            .enumerate()
            .map(|(i, v)| v + 1e-4 * ((i % 7) as f32 - 3.0))
            .collect();
        let q = model_file(dir.path(), "ft.safetensors", &ft);
        let r = add(
            &store,
            &SourceFile::open(&q).unwrap(),
            &opts("ft", Some("base")),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r.delta_coded, 1);
        let delta = store.list_deltas().unwrap()[0];
        for m in ["base", "ft"] {
            assert!(store.delete_manifest(&name(m)).unwrap());
        }
        store.leases.lock().unwrap().clear();
        // A dry run takes no lease; the young delta is kept, and so is its reference.
        store.young.lock().unwrap().insert(delta);
        let g = gc(&store, true).unwrap();
        assert_eq!(
            (g.weights.len(), g.deltas.len(), g.kept),
            (1, 0, 2),
            "{g:?}"
        );
        assert!(store.log().is_empty(), "{:?}", store.log());
        let g = gc(&store, false).unwrap();
        assert_eq!(
            (g.weights.len(), g.deltas.len(), g.kept),
            (1, 0, 2),
            "{g:?}"
        );
        assert_eq!(store.log(), ["take exclusive:gc", "give exclusive:gc"]);
        assert_eq!(store.list_deltas().unwrap(), vec![delta]);
        // Once old, both go.
        store.young.lock().unwrap().clear();
        let g = gc(&store, false).unwrap();
        assert_eq!(
            (g.weights.len(), g.deltas.len(), g.kept),
            (1, 1, 0),
            "{g:?}"
        );
        assert!(store.list_weights().unwrap().is_empty());
    }

    #[test]
    fn the_grace_period_does_not_apply_to_a_store_with_one_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = NoManifests::default();
        let p = model_file(
            dir.path(),
            "m.safetensors",
            &[("x", vec![2], vec![1.0, 2.0])],
        );
        add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("m", None),
            &|_| {},
        )
        .unwrap();
        store.delete_manifest(&name("m")).unwrap();
        *store.young.lock().unwrap() = store.list_weights().unwrap().into_iter().collect();
        let g = gc(&store, false).unwrap();
        assert_eq!((g.weights.len(), g.kept, g.grace_secs), (1, 0, None));
    }

    #[test]
    fn gc_reports_the_bytes_of_the_weights_it_removes() {
        let store = MemoryStore::new();
        let a = WeightTensor::from_vec("a", vec![64, 16], smooth(1024, 0.0)).unwrap();
        let b = WeightTensor::from_vec("b", vec![3], vec![1.0f32, 2.0, 3.0]).unwrap();
        for w in [&a, &b] {
            store.store(w).unwrap();
        }
        // No manifest names them: both go, 4096 + 12 bytes (the memory store keeps them raw).
        let dry = gc(&store, true).unwrap();
        assert_eq!(dry.weights.len(), 2, "{dry:?}");
        assert_eq!(
            (dry.weight_bytes, dry.delta_bytes, dry.bytes),
            (4108, 0, 4108)
        );
        let g = gc(&store, false).unwrap();
        assert_eq!(
            (g.weight_bytes, g.delta_bytes, g.bytes),
            (4108, 0, 4108),
            "{g:?}"
        );
        assert!(store.list_weights().unwrap().is_empty());
        let again = gc(&store, false).unwrap();
        assert_eq!(again.bytes, 0, "{again:?}");
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("0", 0.0),
            ("90", 90.0),
            ("90s", 90.0),
            ("30m", 1800.0),
            ("6h", 21_600.0),
            ("1.5h", 5400.0),
            ("2d", 172_800.0),
            (" 5 min", 300.0),
        ] {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_secs_f64(secs),
                "{text}"
            );
        }
        for bad in ["", "h", "-1s", "1x", "1e400", "nan", "1 week", "inf"] {
            let e = parse_duration(bad).unwrap_err().to_string();
            assert!(e.contains("duration"), "{bad}: {e}");
        }
        for (d, text) in [
            (0, "0s"),
            (90, "90s"),
            (1800, "30m"),
            (3600, "1h"),
            (86_400, "1d"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(d)), text);
            assert_eq!(parse_duration(text).unwrap(), Duration::from_secs(d));
        }
    }

    #[test]
    fn npy_and_npz_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        let mut npy = coral_formats::npy::header_bytes(
            DType::I32,
            &[2, 3],
            coral_formats::npy::NonNumpy::Refuse,
        )
        .unwrap();
        npy.extend((0..6i32).flat_map(|i| i.to_le_bytes()));
        let p = dir.path().join("arr.npy");
        std::fs::write(&p, &npy).unwrap();
        add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("arr", None),
            &|_| {},
        )
        .unwrap();
        assert_eq!(export_bytes(&store, "arr", dir.path(), "npy"), npy);

        let mut z = std::io::Cursor::new(Vec::new());
        let mut w = coral_formats::npz::Writer::new(&mut z);
        w.add("arr.npy", &npy).unwrap();
        w.add("other.npy", &npy).unwrap();
        w.finish().unwrap();
        let z = z.into_inner();
        let zp = dir.path().join("both.npz");
        std::fs::write(&zp, &z).unwrap();
        let r = add(
            &store,
            &SourceFile::open(&zp).unwrap(),
            &opts("both", None),
            &|_| {},
        )
        .unwrap();
        assert_eq!((r.new, r.reused), (0, 2));
        assert_eq!(export_bytes(&store, "both", dir.path(), "npz"), z);
        // A safetensors model goes out as .npz and back.
        let st = model_file(
            dir.path(),
            "s.safetensors",
            &[("x", vec![2], vec![1.0, 2.0])],
        );
        add(
            &store,
            &SourceFile::open(&st).unwrap(),
            &opts("s", None),
            &|_| {},
        )
        .unwrap();
        let zb = export_bytes(&store, "s", dir.path(), "npz");
        let members = coral_formats::npz::read(&zb).unwrap();
        assert_eq!(members[0].0, "x.npy");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_safetensors_model_round_trips(
            tensors in proptest::collection::vec((0usize..15, proptest::collection::vec(0usize..6, 0..3)), 1..6),
            fill in any::<u8>(),
            group in 1usize..64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let list: Vec<_> = tensors.iter().enumerate()
                .map(|(i, (d, s))| (format!("t{i}"), DType::ALL[*d], s.clone())).collect();
            let (mut bytes, offsets) = build_header(&list).unwrap();
            let total = offsets.last().map_or(0, |o| o[1]) as usize;
            bytes.extend((0..total).map(|i| (i as u8).wrapping_mul(fill)));
            let p = dir.path().join("m.safetensors");
            std::fs::write(&p, &bytes).unwrap();
            let store = MemoryStore::new();
            let o = AddOptions { name: name("m"), reference: None, group_bytes: group, cancel: None, wait: Duration::ZERO };
            let r = add(&store, &SourceFile::open(&p).unwrap(), &o, &|_| {}).unwrap();
            prop_assert_eq!(r.new + r.reused, list.len());
            let out = dir.path().join("o.safetensors");
            export(&store, &name("m"), &out, group, &|_| {}).unwrap();
            prop_assert_eq!(std::fs::read(out).unwrap(), bytes);
        }
    }
}

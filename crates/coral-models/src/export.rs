//! `export`: a model back out of a store, into a file written next to its destination and
//! renamed into place; and [`for_each_tensor`], the verified walk every reader shares.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use coral_core::{ManifestTensor, ModelManifest, ModelName, WeightTensor};
use coral_store_api::Store;
use rayon::prelude::*;

use crate::error::{bail, Context, ModelError, Result};
use crate::load_resolved;

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
        .ok_or_else(|| ModelError::NotFound(name.clone()))?;
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

//! `diff`: what changed between two models, tensor by tensor.

use std::collections::{HashMap, HashSet};

use coral_core::{
    ContentHash, DType, FileContent, ManifestFile, ManifestTensor, ModelFormat, ModelManifest,
    ModelName, WeightTensor,
};
use coral_store_api::Store;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::load_resolved;

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
    /// When either model is a folder: its files compared, by path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesDiff>,
}

/// The files of two models compared by path (a model stored from one file counts as a folder
/// of that one file, unnamed: it then shows as removed or added).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct FilesDiff {
    /// Paths whose content and mode are the same in both.
    pub equal: Vec<String>,
    /// Paths whose content, kind or mode differ.
    pub changed: Vec<String>,
    /// Paths only in B.
    pub added: Vec<String>,
    /// Paths only in A.
    pub removed: Vec<String>,
}

/// A file's content, comparable across models without reading data: keys, header, target.
fn fingerprint(m: &ModelManifest, f: &ManifestFile) -> (u32, String, Vec<ContentHash>) {
    match &f.content {
        FileContent::Dir => (f.mode, "dir".into(), vec![]),
        FileContent::Symlink { target } => (f.mode, format!("link {target}"), vec![]),
        FileContent::Safetensors { header, .. } => (
            f.mode,
            header.clone(),
            m.file_tensors(f).iter().map(|t| t.key).collect(),
        ),
        FileContent::Blob { chunks, .. } => (
            f.mode,
            "blob".into(),
            chunks.iter().map(|c| c.key).collect(),
        ),
    }
}

fn diff_files(a: &ModelManifest, b: &ModelManifest) -> FilesDiff {
    let fb: HashMap<&str, &ManifestFile> = b.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut d = FilesDiff::default();
    for f in &a.files {
        match fb.get(f.path.as_str()) {
            None => d.removed.push(f.path.clone()),
            Some(g) if fingerprint(a, f) == fingerprint(b, g) => d.equal.push(f.path.clone()),
            Some(_) => d.changed.push(f.path.clone()),
        }
    }
    let fa: HashSet<&str> = a.files.iter().map(|f| f.path.as_str()).collect();
    d.added = b
        .files
        .iter()
        .filter(|f| !fa.contains(f.path.as_str()))
        .map(|f| f.path.clone())
        .collect();
    d
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

/// Compares two models tensor by tensor (by name), and file by file when either is a folder.
pub fn diff(store: &dyn Store, a: &ModelName, b: &ModelName) -> Result<DiffReport> {
    let ma = store
        .get_manifest(a)?
        .ok_or_else(|| ModelError::NotFound(a.clone()))?;
    let mb = store
        .get_manifest(b)?
        .ok_or_else(|| ModelError::NotFound(b.clone()))?;
    let tb: HashMap<&str, &ManifestTensor> =
        mb.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let ta: HashSet<&str> = ma.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut report = DiffReport {
        equal: vec![],
        changed: vec![],
        added: vec![],
        removed: vec![],
        files: (ma.format == ModelFormat::Folder || mb.format == ModelFormat::Folder)
            .then(|| diff_files(&ma, &mb)),
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

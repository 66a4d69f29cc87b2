//! Model files in (safetensors, `.npy`, `.npz`), memory-mapped, and model files out.

use std::fs::File;
use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Arc;

use crate::error::{bail, Context, ModelError, Result};
use bytes::Bytes;
use coral_core::{DType, ManifestTensor, ModelFormat, ModelManifest, ModelName, WeightTensor};
use coral_store_api::Store;

use coral_formats::detect::{detect, FileKind};
use coral_formats::npy::{self, NonNumpy};
use coral_formats::{npz, safetensors as st};

/// One tensor of an input file.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Start of its data in the source's bytes.
    pub start: usize,
    /// Bytes of data.
    pub len: usize,
    /// Safetensors data offsets.
    pub data_offsets: Option<[u64; 2]>,
}

/// A parsed input file.
///
/// ```
/// use coral_core::DType;
/// use coral_formats::safetensors;
/// use coral_models::SourceFile;
///
/// // A two-tensor safetensors file, parsed strictly.
/// let (mut file, offsets) = safetensors::build_header(&[
///     ("w".to_string(), DType::F32, vec![2]),
///     ("b".to_string(), DType::U8, vec![3]),
/// ])?;
/// file.extend_from_slice(&[0u8; 11]);
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("m.safetensors");
/// std::fs::write(&path, &file)?;
/// let src = SourceFile::open(&path)?;
/// assert_eq!(src.tensors().len(), 2);
/// assert_eq!(offsets, vec![[0, 8], [8, 11]]);
///
/// // A PyTorch checkpoint is named as such.
/// let pt = dir.path().join("model.bin");
/// std::fs::write(&pt, b"\x80\x04\x95\x00\x00")?;
/// let err = SourceFile::open(&pt).unwrap_err();
/// assert!(err.to_string().contains("is a PyTorch pickle checkpoint"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SourceFile {
    format: ModelFormat,
    map: Option<Arc<memmap2::Mmap>>,
    bytes: Bytes,
    tensors: Vec<SourceTensor>,
    header: Option<String>,
    file_size: u64,
}

/// What the `coral` command reads, for refusals.
const READS: &str = "coral reads .safetensors, .npy and .npz files, and model folders (which \
                     keep any other file byte for byte: put it in one)";

/// The formats by file extension.
fn format_of(path: &Path) -> Option<ModelFormat> {
    ModelFormat::from_extension(path.extension()?.to_str()?)
}

impl SourceFile {
    /// Opens, maps and validates a model file.
    ///
    /// The format is the one its magic bytes show (`.npy`, ZIP for `.npz`), else the one its
    /// extension names, else safetensors. A file recognised as a model format Coral does not read
    /// (a PyTorch checkpoint, GGUF, HDF5) is refused with one line naming it.
    pub fn open(path: &Path) -> Result<SourceFile> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let file_size = meta.len();
        let map = if file_size == 0 {
            None
        } else {
            // SAFETY: the map is read-only and private; Coral never writes through it. A file
            // changed by another process while mapped is caught by the content hashes.
            Some(Arc::new(
                unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("memory-mapping {}", path.display()))?,
            ))
        };
        let bytes = match &map {
            Some(m) => mapped_bytes(m.clone()),
            None => Bytes::new(),
        };
        let kind = detect(&bytes);
        let format = match kind {
            FileKind::Npy => ModelFormat::Npy,
            FileKind::Zip => ModelFormat::Npz,
            FileKind::Unknown | FileKind::Safetensors => {
                format_of(path).unwrap_or(ModelFormat::Safetensors)
            }
            other => bail!("{} is {}; {READS}", path.display(), other.describe()),
        };
        let ctx = || format!("{} is not a valid {format} file", path.display());
        let mut src = SourceFile {
            format,
            map,
            bytes,
            tensors: Vec::new(),
            header: None,
            file_size,
        };
        match format {
            // Not from an extension or magic bytes: folders are `SourceFolder`s.
            ModelFormat::Folder => bail!("{} is not a folder model", path.display()),
            ModelFormat::Npy => {
                let h = npy::parse(&src.bytes).with_context(ctx)?;
                src.tensors.push(SourceTensor {
                    name: path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("array")
                        .to_owned(),
                    dtype: h.dtype,
                    shape: h.shape,
                    start: h.data_start,
                    len: src.bytes.len() - h.data_start,
                    data_offsets: None,
                });
            }
            ModelFormat::Npz => {
                let members = npz::read(&src.bytes).with_context(ctx)?;
                // Members may be deflated: gather their data into one buffer.
                let mut all = Vec::new();
                let mut tensors = Vec::new();
                for (name, data) in members {
                    let h = npy::parse(&data)
                        .with_context(|| format!("member {name:?}"))
                        .with_context(ctx)?;
                    let start = all.len();
                    all.extend_from_slice(&data[h.data_start..]);
                    tensors.push(SourceTensor {
                        name: name.strip_suffix(".npy").unwrap_or(&name).to_owned(),
                        dtype: h.dtype,
                        shape: h.shape,
                        start,
                        len: data.len() - h.data_start,
                        data_offsets: None,
                    });
                }
                src.map = None;
                src.bytes = Bytes::from(all);
                src.tensors = tensors;
            }
            ModelFormat::Safetensors => {
                let h = st::parse(&src.bytes).with_context(ctx)?;
                let base = h.data_start as usize;
                src.tensors = h
                    .tensors
                    .iter()
                    .map(|t| SourceTensor {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        start: base + t.begin as usize,
                        len: t.len() as usize,
                        data_offsets: Some([t.begin, t.end]),
                    })
                    .collect();
                src.header = Some(h.text);
            }
        }
        if let Some(m) = &src.map {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
        Ok(src)
    }

    /// The file's format.
    pub fn format(&self) -> ModelFormat {
        self.format
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    /// Size of the input file.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// Drops the mapped pages of tensors already stored, so resident memory stays near one group.
    pub fn release(&self, group: &[SourceTensor]) {
        if let Some((map, start, end)) = self.mapped_span(group) {
            release_pages(map, start, end);
        }
    }

    /// [`release`](Self::release) on a thread of its own, for the last group: dropping 90 MB of
    /// mapped pages takes 2.6 ms, which can run while the manifest is written and committed
    /// (most of a commit is waiting for the disk) rather than before.
    pub fn release_in_background(&self, group: &[SourceTensor]) {
        let Some((map, start, end)) = self.mapped_span(group) else {
            return;
        };
        let map = Arc::clone(map);
        let spawned = std::thread::Builder::new()
            .name("coral-release".into())
            .spawn(move || release_pages(&map, start, end));
        if spawned.is_err() {
            self.release(group);
        }
    }

    /// The map and the bytes `group` (tensors in file order) spans in it, if the file is mapped.
    fn mapped_span(&self, group: &[SourceTensor]) -> Option<(&Arc<memmap2::Mmap>, usize, usize)> {
        let (map, first, last) = (self.map.as_ref()?, group.first()?, group.last()?);
        Some((map, first.start, last.start.saturating_add(last.len)))
    }

    /// The tensor as a weight (its bytes shared with the map, not copied).
    pub fn weight(&self, t: &SourceTensor, model: &ModelName) -> Result<WeightTensor> {
        let end = t
            .start
            .checked_add(t.len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                ModelError::Inconsistent(format!("tensor {:?} lies outside the file", t.name))
            })?;
        let mut meta = coral_core::WeightMetadata::new(t.name.clone(), t.shape.clone(), t.dtype);
        meta.model_name = Some(model.to_string());
        let w = WeightTensor::new(meta, self.bytes.slice(t.start..end))?;
        Ok(match &self.map {
            // Hashing and the store's compression drop the pages they are done with, in a
            // file large enough for its pages to matter (see `RELEASE_ABOVE`).
            Some(map) if map.len() > RELEASE_ABOVE => {
                let (map, base) = (map.clone(), t.start);
                w.with_release(coral_core::Release::new(move |r| {
                    release_pages(&map, base + r.start, base + r.end)
                }))
            }
            _ => w,
        })
    }

    /// The manifest of this file stored under `name`, given each tensor's key.
    pub fn manifest(
        &self,
        name: &ModelName,
        keys: &[coral_core::ContentHash],
        parent: Option<ModelName>,
    ) -> Result<ModelManifest> {
        if keys.len() != self.tensors.len() {
            bail!(
                "internal: {} keys for {} tensors",
                keys.len(),
                self.tensors.len()
            );
        }
        let created_unix = created_unix();
        Ok(ModelManifest {
            version: 1,
            name: name.clone(),
            format: self.format,
            tensors: self
                .tensors
                .iter()
                .zip(keys)
                .map(|(t, k)| ManifestTensor {
                    name: t.name.clone(),
                    key: *k,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data_offsets: t.data_offsets,
                })
                .collect(),
            safetensors_header: self.header.clone(),
            file_size: self.file_size,
            parent,
            created_unix,
            files: Vec::new(),
        })
    }
}

/// Seconds since the Unix epoch, to record when a model was added. `SOURCE_DATE_EPOCH` (the
/// reproducible-builds convention) fixes it, so that the same model added to two new stores
/// gives the same file, byte for byte.
pub(crate) fn created_unix() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

fn out_format(m: &ModelManifest, out: &Path) -> ModelFormat {
    format_of(out).unwrap_or(m.format)
}

/// Checks a manifest's own consistency: for safetensors, that the recorded header parses and
/// describes exactly the manifest's tensors, and the file size adds up; for a folder, its
/// entries ([`ModelManifest::check_files`]) and each safetensors file's header likewise.
pub fn check_manifest(m: &ModelManifest) -> Result<()> {
    m.check_files()?;
    match m.format {
        ModelFormat::Safetensors => {
            let text = m.safetensors_header.as_ref().ok_or_else(|| {
                ModelError::Inconsistent("safetensors manifest without a header".to_string())
            })?;
            check_header(text, &m.tensors, m.file_size)
        }
        ModelFormat::Folder => {
            for f in &m.files {
                if let coral_core::FileContent::Safetensors { size, header, .. } = &f.content {
                    check_header(header, m.file_tensors(f), *size)
                        .with_context(|| format!("file {}", f.path))?;
                }
            }
            Ok(())
        }
        ModelFormat::Npy | ModelFormat::Npz => Ok(()),
    }
}

/// Checks a recorded safetensors header against the tensors it should describe, in order,
/// and the file's size.
fn check_header(text: &str, tensors: &[ManifestTensor], file_size: u64) -> Result<()> {
    let data_len = tensors
        .iter()
        .filter_map(|t| t.data_offsets.map(|o| o[1]))
        .max()
        .unwrap_or(0);
    let h = st::parse_header(text.as_bytes(), data_len).context("recorded header")?;
    if h.tensors.len() != tensors.len() {
        bail!(
            "header lists {} tensors, manifest {}",
            h.tensors.len(),
            tensors.len()
        );
    }
    for (e, t) in h.tensors.iter().zip(tensors) {
        if e.name != t.name
            || e.dtype != t.dtype
            || e.shape != t.shape
            || Some([e.begin, e.end]) != t.data_offsets
        {
            bail!("tensor {:?} disagrees with the recorded header", t.name);
        }
    }
    let size = 8 + text.len() as u64 + data_len;
    if size != file_size {
        bail!("file size {file_size} but header and data add up to {size}");
    }
    Ok(())
}

/// Writes a safetensors file from its recorded header and tensors: the header, then each
/// tensor's data where its offsets say. Returns the bytes written.
pub(crate) fn write_safetensors(
    store: &dyn Store,
    header: &str,
    tensors: &[ManifestTensor],
    w: &mut dyn WriteSeek,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut prefix = (header.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(header.as_bytes());
    let offsets: Vec<[u64; 2]> = tensors
        .iter()
        .map(|t| {
            t.data_offsets.ok_or_else(|| {
                ModelError::Inconsistent(format!("tensor {:?} has no offsets", t.name))
            })
        })
        .collect::<Result<_>>()?;
    write_st_data(store, &prefix, &offsets, tensors, w, group_bytes, progress)
}

/// Writes a safetensors file: `prefix` (length and header), then the tensors' data where
/// `offsets` say (checked to lay them out back to back). Returns the bytes written.
pub(crate) fn write_st_data(
    store: &dyn Store,
    prefix: &[u8],
    offsets: &[[u64; 2]],
    tensors: &[ManifestTensor],
    w: &mut dyn WriteSeek,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    crate::export::check_offsets(tensors, offsets)?;
    w.write_all(prefix)?;
    let n = crate::export::stream_tensors(store, tensors, w, group_bytes, progress)?;
    Ok(prefix.len() as u64 + n)
}

/// A file to write a model to: `.npz` members are written, then their headers completed.
pub trait WriteSeek: Write + Seek {}

impl<T: Write + Seek + ?Sized> WriteSeek for T {}

/// Writes a model to `w` in the format `out`'s extension names (the model's own by default).
/// Returns the bytes written.
pub fn write_model(
    store: &dyn Store,
    m: &ModelManifest,
    out: &Path,
    w: &mut dyn WriteSeek,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let format = out_format(m, out);
    if format != ModelFormat::Safetensors {
        // Refused before anything is written: NumPy has no bfloat16 or float8.
        for t in &m.tensors {
            if let Err(e) = npy::descr(t.dtype, NonNumpy::Refuse) {
                bail!("tensor {:?}: {e}", t.name);
            }
        }
    }
    match format {
        ModelFormat::Npy => {
            let [t] = m.tensors.as_slice() else {
                bail!(
                    "model {} has {} tensors; .npy holds one (export to .npz or .safetensors)",
                    m.name,
                    m.tensors.len()
                );
            };
            let h = npy::header_bytes(t.dtype, &t.shape, NonNumpy::Refuse)?;
            w.write_all(&h)?;
            let n = crate::export::stream_tensors(store, &m.tensors, w, group_bytes, progress)?;
            Ok(h.len() as u64 + n)
        }
        ModelFormat::Npz => {
            let mut zw = npz::Writer::new(w);
            crate::export::for_each_tensor(store, m, group_bytes, |t, wt| {
                let mut data = npy::header_bytes(t.dtype, &t.shape, NonNumpy::Refuse)?;
                data.extend_from_slice(wt.data());
                zw.add(&format!("{}.npy", t.name), &data)?;
                progress(wt.nbytes() as u64);
                Ok(())
            })?;
            Ok(zw.finish()?)
        }
        ModelFormat::Safetensors => match (&m.safetensors_header, m.format) {
            (Some(text), ModelFormat::Safetensors) => {
                check_manifest(m)?;
                write_safetensors(store, text, &m.tensors, w, group_bytes, progress)
            }
            _ => {
                let list: Vec<_> = m
                    .tensors
                    .iter()
                    .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                    .collect();
                let (prefix, offsets) = st::build_header(&list)?;
                write_st_data(
                    store,
                    &prefix,
                    &offsets,
                    &m.tensors,
                    w,
                    group_bytes,
                    progress,
                )
            }
        },
        ModelFormat::Folder => bail!(
            "model {} is a folder: export it to a folder, or one tensor with --tensor",
            m.name
        ),
    }
}
/// Files up to this size keep their pages mapped while they are added: dropping them after
/// hashing, to fault them in again for compression, cost 8% of the CPU time of adding
/// all-MiniLM-L6-v2 (91 MB; `perf stat`, 184 against 200 ms), and a file this small is at most
/// this much of page cache, which the kernel reclaims when it needs to. Larger files (a
/// multi-GB model) drop what they are done with, so that a process's memory stays a few
/// hundred MB whatever the model's size.
pub(crate) const RELEASE_ABOVE: usize = 256 << 20;

/// Drops the resident pages of `map` that lie wholly within bytes `[start, end)` (the last page
/// of the file counts as whole): they are read again from the file should they be touched.
pub(crate) fn release_pages(map: &memmap2::Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let end = end.min(map.len());
    let first = start.div_ceil(PAGE) * PAGE;
    let last = if end == map.len() {
        end
    } else {
        end / PAGE * PAGE
    };
    if last > first {
        // SAFETY: the mapping is a private read-only file mapping, never written: MADV_DONTNEED
        // only drops resident pages, which are read again from the file if touched.
        let r = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
        };
        if let Err(e) = r {
            tracing::debug!("madvise: {e}");
        }
    }
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

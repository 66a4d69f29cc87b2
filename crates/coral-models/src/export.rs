//! `export`: a model back out of a store, into a file written next to its destination and
//! renamed into place; and [`for_each_tensor`], the verified walk every reader shares.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt;

use coral_core::{
    BlobChunk, DType, FileContent, ManifestTensor, ModelFormat, ModelManifest, ModelName,
    WeightTensor,
};
use coral_formats::npy::{self, NonNumpy};
use coral_formats::safetensors as st;
use coral_store_api::Store;
use rayon::prelude::*;

use crate::error::{bail, Context, ModelError, Result};
use crate::groups::groups;
use crate::load_resolved;

/// Options of [`export_with`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Largest sum of tensor bytes loaded at once (at least one tensor is always taken).
    pub group_bytes: usize,
    /// Replace a folder that is not empty (a folder model's export refuses to otherwise).
    pub force: bool,
    /// Only these tensors, by name (`FILE:NAME` in a folder model where a name is in several
    /// files), into a `.safetensors` or `.npy` file: only their chunks are read.
    pub tensors: Vec<String>,
}

impl ExportOptions {
    /// The whole model, groups of `group_bytes`, no replacing.
    pub fn new(group_bytes: usize) -> Self {
        ExportOptions {
            group_bytes,
            force: false,
            tensors: Vec::new(),
        }
    }
}

/// Writes a model back to `out` (through a temporary file renamed at the end). A safetensors
/// model is rebuilt byte for byte from its recorded header and offsets; a folder model is
/// rebuilt as a folder, byte for byte. Returns the bytes written.
pub fn export(
    store: &dyn Store,
    name: &ModelName,
    out: &Path,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    export_with(store, name, out, &ExportOptions::new(group_bytes), progress)
}

/// [`export`] with options: a folder model into a folder (written beside it, every file
/// verified, then renamed into place; a non-empty folder is replaced only with `force`), or
/// only some tensors.
pub fn export_with(
    store: &dyn Store,
    name: &ModelName,
    out: &Path,
    opts: &ExportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let m = store
        .get_manifest(name)?
        .ok_or_else(|| ModelError::NotFound(name.clone()))?;
    clean_stale_tmp(out);
    if !opts.tensors.is_empty() {
        return export_tensors(store, &m, &opts.tensors, out, opts.group_bytes, progress);
    }
    if m.format == ModelFormat::Folder {
        if out
            .extension()
            .and_then(|e| e.to_str())
            .and_then(ModelFormat::from_extension)
            .is_some()
        {
            bail!(
                "model {name} is a folder: export it to a folder, or some of its tensors with \
                 --tensor, not to {}",
                out.display()
            );
        }
        return export_folder(store, &m, out, opts, progress);
    }
    if out.is_dir() {
        bail!(
            "{} is a folder; model {name} is one {} file: give the file's path",
            out.display(),
            m.format
        );
    }
    write_file(out, |w| {
        crate::source::write_model(store, &m, out, w, opts.group_bytes, progress)
    })
}

/// Writes a file through a temporary one beside it, synced, renamed into place at the end (and
/// removed on failure).
fn write_file(out: &Path, f: impl FnOnce(&mut BufWriter<WriteBack>) -> Result<u64>) -> Result<u64> {
    let tmp = tmp_path(out);
    let res = write_in_place(&tmp, f);
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

/// A file of a folder export, written in place (the folder itself is the temporary) and
/// synced.
fn write_in_place(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<WriteBack>) -> Result<u64>,
) -> Result<u64> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, WriteBack::new(file));
    let n = f(&mut w)?;
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", path.display()))?
        .into_file()
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(n)
}

/// Bytes of output between write-back requests: what is left for the final `sync_all` is at
/// most this (8 MiB; 32 MiB left 11 ms of syncing at the end of a 91 MB export here).
const WRITE_BACK_WINDOW: u64 = 8 << 20;

/// A file written front to back that keeps the page cache out of the way, as the kernel
/// developers recommend for streaming writes: after each [`WRITE_BACK_WINDOW`] it asks the
/// kernel to start writing that window to disk (`sync_file_range(WRITE)`), waits for the
/// window before it, and drops that one's pages (`posix_fadvise(DONTNEED)`). Without it, a
/// multi-GB export fills memory with dirty pages, and copying into the page cache slows as it
/// fills: on this machine a 4 GiB export took 8.7× the CPU of a 1 GiB one (13.9 s against
/// 1.6 s), and 3.3× with write-back (5.6 s against 1.7 s). Off Linux it is a plain file.
///
/// The requests run on a thread of their own: starting write-back makes the calling thread
/// walk the window's pages and submit them (15 ms for 32 MiB here), and waiting for a window
/// blocks on the disk, neither of which needs to hold up the next bytes. The writer waits for
/// that thread only when it is a whole window behind, so dirty pages stay within three
/// windows (24 MiB).
#[derive(Debug)]
pub(crate) struct WriteBack {
    file: File,
    /// Bytes written so far.
    pos: u64,
    /// Start of the window not yet handed to write-back.
    queued: u64,
    flusher: Flusher,
}

/// The write-back thread and its requests; dropping it lets the thread finish its last
/// request and waits for it.
#[derive(Debug)]
struct Flusher {
    /// Windows `(start, end)` for the thread (none before the first window, or when it could
    /// not start).
    windows: Option<std::sync::mpsc::SyncSender<(u64, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The thread was asked for (it starts once, at the first window).
    started: bool,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.windows = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WriteBack {
    pub(crate) fn new(file: File) -> Self {
        WriteBack {
            file,
            pos: 0,
            queued: 0,
            flusher: Flusher {
                windows: None,
                thread: None,
                started: false,
            },
        }
    }

    /// Hands the bytes since `queued` to the write-back thread, started at the first window (a
    /// file smaller than one window, as most of a folder's are, starts none).
    fn write_back(&mut self) {
        if !self.flusher.started {
            self.flusher.started = true;
            if let Ok(f) = self.file.try_clone() {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                let spawned = std::thread::Builder::new()
                    .name("coral-write-back".to_owned())
                    .spawn(move || write_back_windows(&f, rx));
                if let Ok(t) = spawned {
                    (self.flusher.windows, self.flusher.thread) = (Some(tx), Some(t));
                }
            }
        }
        if let Some(tx) = &self.flusher.windows {
            if tx.send((self.queued, self.pos)).is_err() {
                self.flusher.windows = None;
            }
        }
        self.queued = self.pos;
    }

    /// Stops the write-back thread (after its last request) and gives back the file.
    pub(crate) fn into_file(self) -> File {
        drop(self.flusher);
        self.file
    }
}

/// The write-back thread: for each window, starts writing it back, then waits for the window
/// before it and drops that one's pages. Failures are only hints lost: the final `sync_all`
/// reports real write errors.
fn write_back_windows(file: &File, windows: std::sync::mpsc::Receiver<(u64, u64)>) {
    let mut before: Option<(u64, u64)> = None;
    for (start, end) in windows {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = file.as_raw_fd();
            let range = |(a, b): (u64, u64)| {
                Some((
                    libc::off64_t::try_from(a).ok()?,
                    libc::off64_t::try_from(b.checked_sub(a)?).ok()?,
                ))
            };
            if let Some((off, len)) = range((start, end)) {
                // SAFETY: fd is this open file's descriptor; the calls take plain integers.
                unsafe { libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE) };
            }
            if let Some((off, len)) = before.and_then(range) {
                if len > 0 {
                    // SAFETY: as above.
                    unsafe {
                        libc::sync_file_range(
                            fd,
                            off,
                            len,
                            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                                | libc::SYNC_FILE_RANGE_WRITE
                                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                        );
                        libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED);
                    }
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        before = Some((start, end));
    }
}

impl Write for WriteBack {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.file.write(buf)?;
        self.pos += k as u64;
        if self.pos.saturating_sub(self.queued) >= WRITE_BACK_WINDOW {
            self.write_back();
        }
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// `.npz` seeks back to complete member headers; write-back starts afresh from wherever the
/// file is next written (windows skipped are left to the final sync).
impl std::io::Seek for WriteBack {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let p = self.file.seek(to)?;
        self.pos = p;
        self.queued = p;
        Ok(p)
    }
}

fn export_folder(
    store: &dyn Store,
    m: &ModelManifest,
    out: &Path,
    opts: &ExportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    crate::source::check_manifest(m)?;
    let replace = match std::fs::symlink_metadata(out) {
        Ok(meta) if meta.is_dir() => {
            let empty = std::fs::read_dir(out)
                .with_context(|| format!("listing {}", out.display()))?
                .next()
                .is_none();
            if !empty && !opts.force {
                bail!(
                    "{} is not empty; use --force to replace it with model {}",
                    out.display(),
                    m.name
                );
            }
            true
        }
        Ok(_) => bail!(
            "{} exists and is not a folder; model {} is a folder",
            out.display(),
            m.name
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let tmp = tmp_path(out);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let n = match write_tree(store, m, &tmp, opts.group_bytes, progress) {
        Ok(n) => n,
        Err(e) => {
            remove_tree(&tmp);
            return Err(e);
        }
    };
    if replace {
        // The old folder steps aside under a temporary name (removed as stale should this
        // process die), the new one takes its place, then the old one goes.
        let mut old_name = out
            .file_name()
            .map(|s| s.to_os_string())
            .unwrap_or_default();
        old_name.push(format!(".old{TMP_SUFFIX}{}", std::process::id()));
        let old = out.with_file_name(old_name);
        if let Err(e) = std::fs::rename(out, &old) {
            remove_tree(&tmp);
            return Err(e).with_context(|| format!("moving {} aside", out.display()));
        }
        if let Err(e) = std::fs::rename(&tmp, out) {
            let _ = std::fs::rename(&old, out);
            remove_tree(&tmp);
            return Err(e).with_context(|| format!("renaming to {}", out.display()));
        }
        remove_tree(&old);
    } else if let Err(e) = std::fs::rename(&tmp, out) {
        remove_tree(&tmp);
        return Err(e).with_context(|| format!("renaming to {}", out.display()));
    }
    Ok(n)
}

fn remove_tree(path: &Path) {
    // Folders made read-only by their recorded mode would refuse their removal.
    fn writable(p: &Path) {
        if let Ok(meta) = std::fs::symlink_metadata(p) {
            if meta.is_dir() {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
                if let Ok(rd) = std::fs::read_dir(p) {
                    for e in rd.flatten() {
                        writable(&e.path());
                    }
                }
            }
        }
    }
    writable(path);
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove");
    }
}

/// Writes every entry of a folder model below `root`; returns the bytes of the files.
fn write_tree(
    store: &dyn Store,
    m: &ModelManifest,
    root: &Path,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut total = 0u64;
    for f in &m.files {
        // Paths were checked (check_manifest): relative, plain components, parents first.
        let path = root.join(&f.path);
        let ctx = || format!("exporting {}", f.path);
        match &f.content {
            FileContent::Dir => std::fs::create_dir(&path)
                .with_context(|| format!("creating {}", path.display()))?,
            FileContent::Symlink { target } => std::os::unix::fs::symlink(target, &path)
                .with_context(|| format!("creating link {}", path.display()))?,
            FileContent::Safetensors { size, header, .. } => {
                let n = write_in_place(&path, |w| {
                    crate::source::write_safetensors(
                        store,
                        header,
                        m.file_tensors(f),
                        w,
                        group_bytes,
                        progress,
                    )
                })
                .with_context(ctx)?;
                if n != *size {
                    bail!("{}: wrote {n} bytes, the manifest says {size}", f.path);
                }
                total += n;
            }
            FileContent::Blob { size, chunks } => {
                let n = write_in_place(&path, |w| {
                    write_blob(store, chunks, w, group_bytes, progress)
                })
                .with_context(ctx)?;
                if n != *size {
                    bail!("{}: wrote {n} bytes, the manifest says {size}", f.path);
                }
                total += n;
            }
        }
        if !matches!(f.content, FileContent::Dir | FileContent::Symlink { .. }) {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o7777))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
    }
    // Folders' modes last, deepest first: a read-only folder would refuse what goes in it.
    for f in m.files.iter().rev() {
        if matches!(f.content, FileContent::Dir) {
            let path = root.join(&f.path);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o7777))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
    }
    File::open(root)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", root.display()))?;
    Ok(total)
}

/// Writes a blob's chunks in order, each loaded and verified, a group at a time.
fn write_blob(
    store: &dyn Store,
    chunks: &[BlobChunk],
    w: &mut dyn Write,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut n = 0u64;
    for group in groups(chunks.iter().map(|c| c.len), group_bytes as u64) {
        let (start, end) = (group.start, group.end);
        let loaded: Vec<WeightTensor> = chunks[start..end]
            .par_iter()
            .map(|c| load_resolved(store, &c.key).with_context(|| format!("blob chunk {}", c.key)))
            .collect::<Result<_>>()?;
        for (c, wt) in chunks[start..end].iter().zip(loaded) {
            if wt.dtype() != DType::U8 || wt.nbytes() as u64 != c.len {
                bail!(
                    "blob chunk {} is {} {:?}, the manifest says {} bytes",
                    c.key,
                    wt.dtype(),
                    wt.shape(),
                    c.len
                );
            }
            write_pieces(w, wt.data())?;
            n += c.len;
            progress(c.len);
        }
    }
    Ok(n)
}

/// Finds a tensor by name: `NAME`, or `FILE:NAME` for one of a folder model's files.
fn find_tensor<'m>(m: &'m ModelManifest, want: &str) -> Result<&'m ManifestTensor> {
    if m.format == ModelFormat::Folder {
        if let Some((file, name)) = want.split_once(':') {
            if let Some(f) = m.files.iter().find(|f| f.path == file) {
                return m
                    .file_tensors(f)
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "{file} of model {} has no tensor {name:?}",
                            m.name
                        ))
                    });
            }
        }
    }
    let hits: Vec<&ManifestTensor> = m.tensors.iter().filter(|t| t.name == want).collect();
    match hits.as_slice() {
        [t] => Ok(t),
        [] => Err(ModelError::Invalid(format!(
            "model {} has no tensor {want:?} (`coral show {}` lists them)",
            m.name, m.name
        ))),
        _ => {
            let files: Vec<&str> = m
                .files
                .iter()
                .filter(|f| m.file_tensors(f).iter().any(|t| t.name == want))
                .map(|f| f.path.as_str())
                .collect();
            Err(ModelError::Invalid(format!(
                "tensor {want:?} is in {} files of model {} ({}): name it FILE:NAME",
                hits.len(),
                m.name,
                files.join(", ")
            )))
        }
    }
}

/// Writes the named tensors of `m` to `out` (`.safetensors`, or `.npy` for one): only their
/// chunks are read, each tensor verified against its key.
fn export_tensors(
    store: &dyn Store,
    m: &ModelManifest,
    names: &[String],
    out: &Path,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut picked: Vec<ManifestTensor> = Vec::with_capacity(names.len());
    for n in names {
        let t = find_tensor(m, n)?;
        if picked.iter().any(|p| p.name == t.name) {
            bail!("tensor {:?} is asked for twice", t.name);
        }
        picked.push(t.clone());
    }
    let format = out
        .extension()
        .and_then(|e| e.to_str())
        .and_then(ModelFormat::from_extension);
    match format {
        Some(ModelFormat::Npy) => {
            let [t] = picked.as_slice() else {
                bail!(
                    "{} tensors asked for; a .npy file holds one (write a .safetensors file)",
                    picked.len()
                );
            };
            let h = npy::header_bytes(t.dtype, &t.shape, NonNumpy::Refuse)
                .map_err(|e| ModelError::Invalid(format!("tensor {:?}: {e}", t.name)))?;
            write_file(out, |w| {
                w.write_all(&h)?;
                Ok(h.len() as u64 + stream_tensors(store, &picked, w, group_bytes, progress)?)
            })
        }
        Some(ModelFormat::Safetensors) => {
            let list: Vec<_> = picked
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect();
            let (prefix, offsets) = st::build_header(&list)?;
            write_file(out, |w| {
                crate::source::write_st_data(
                    store,
                    &prefix,
                    &offsets,
                    &picked,
                    w,
                    group_bytes,
                    progress,
                )
            })
        }
        _ => bail!(
            "--tensor writes a .safetensors or .npy file, not {}",
            out.display()
        ),
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
        if pid == me || pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        let removed_it = match entry.file_type() {
            Ok(t) if t.is_file() => std::fs::remove_file(&path),
            // A folder export's temporary folder (or the old folder it was replacing).
            Ok(t) if t.is_dir() => {
                remove_tree(&path);
                if path.exists() {
                    continue;
                }
                Ok(())
            }
            _ => continue,
        };
        match removed_it {
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
    f: impl FnMut(&ManifestTensor, WeightTensor) -> Result<()>,
) -> Result<()> {
    for_each_tensor_in(store, &m.tensors, group_bytes, f)
}

/// [`for_each_tensor`] over some tensors (one file's of a folder model, or those asked for).
/// The next group loads on the pool while `f` takes this one's tensors on this thread, so at
/// most two groups are in memory.
pub fn for_each_tensor_in(
    store: &dyn Store,
    tensors: &[ManifestTensor],
    group_bytes: usize,
    f: impl FnMut(&ManifestTensor, WeightTensor) -> Result<()>,
) -> Result<()> {
    for_each_tensor_from(store, tensors, group_bytes, None, f)
}

/// The groups [`for_each_tensor_in`] loads `tensors` in.
fn tensor_groups(tensors: &[ManifestTensor], group_bytes: usize) -> Vec<Range<usize>> {
    groups(tensors.iter().map(manifest_nbytes), group_bytes as u64)
}

/// Loads one group of tensors, in parallel.
fn load_group(store: &dyn Store, group: &[ManifestTensor]) -> Result<Vec<WeightTensor>> {
    group
        .par_iter()
        .map(|t| load_resolved(store, &t.key).with_context(|| format!("tensor {:?}", t.name)))
        .collect()
}

/// [`for_each_tensor_in`], its first group (the first of [`tensor_groups`]) already loaded
/// when `first` holds it.
fn for_each_tensor_from(
    store: &dyn Store,
    tensors: &[ManifestTensor],
    group_bytes: usize,
    first: Option<Result<Vec<WeightTensor>>>,
    mut f: impl FnMut(&ManifestTensor, WeightTensor) -> Result<()>,
) -> Result<()> {
    let ranges = tensor_groups(tensors, group_bytes);
    let load = |group: &[ManifestTensor]| load_group(store, group);
    let mut loaded = first.or_else(|| ranges.first().map(|r| load(&tensors[r.clone()])));
    for (gi, range) in ranges.iter().enumerate() {
        let group = &tensors[range.clone()];
        let this = match loaded.take() {
            Some(l) => l?,
            None => load(group)?,
        };
        if this.len() != group.len() {
            bail!(
                "{} tensors loaded for a group of {}",
                this.len(),
                group.len()
            );
        }
        let mut next = None;
        let mut handed = Ok(());
        // Not a `join`: `f` need not be `Send` (it writes to the caller's file).
        rayon::in_place_scope(|s| {
            if let Some(r) = ranges.get(gi + 1) {
                let (next, load) = (&mut next, &load);
                s.spawn(move |_| *next = Some(load(&tensors[r.clone()])));
            }
            handed = group.iter().zip(this).try_for_each(|(t, w)| {
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
                f(t, w)
            });
        });
        handed?;
        loaded = next;
    }
    Ok(())
}

/// A tensor's size by its manifest entry (saturating: only for grouping and streaming choices).
fn manifest_nbytes(t: &ManifestTensor) -> u64 {
    t.nbytes().unwrap_or(u64::MAX)
}

/// Writes the data of `tensors`, in order, to `w`, each verified against its key: tensors of
/// [`crate::load::STREAM_BYTES`] or more, or larger than `group_bytes`, streamed as the store
/// decodes them (memory bounded by a few chunks), runs of smaller ones loaded in parallel
/// groups of `group_bytes` (the first group of a run while the streamed tensor before it goes
/// through). Returns the bytes written; `progress` receives them as they go.
///
/// A tensor larger than a group would be a group of its own: its chunks decoded in parallel,
/// then hashed by one thread while the others wait. Streamed, its hash follows the decoded
/// windows on a thread of its own. With the command's groups (4 MiB a worker, 8 MiB on two
/// cores) this reaches all-MiniLM-L6-v2's bf16 word embeddings (23.4 MB): streaming them made
/// the bf16 export 6% faster with the default codec and 11% with none (`tests/benches/ab.py
/// 15`, `docs/benchmarks.md`, "Peers").
pub(crate) fn stream_tensors(
    store: &dyn Store,
    tensors: &[ManifestTensor],
    w: &mut dyn Write,
    group_bytes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let streamed = |t: &ManifestTensor| {
        let n = manifest_nbytes(t);
        n >= crate::load::STREAM_BYTES as u64 || n > group_bytes as u64
    };
    // The end of the run of small tensors starting at `i`.
    let run_end = |i: usize| {
        tensors[i..]
            .iter()
            .position(streamed)
            .map_or(tensors.len(), |k| i + k)
    };
    let mut n = 0u64;
    let mut i = 0;
    // The first group of the run of small tensors at `i`, loaded while the tensor before it
    // streamed: the pool has work while the stream's last window is hashed and written.
    let mut first: Option<Result<Vec<WeightTensor>>> = None;
    while i < tensors.len() {
        let t = &tensors[i];
        if streamed(t) {
            let next_first = (i + 1 < tensors.len() && !streamed(&tensors[i + 1]))
                .then(|| {
                    let run = &tensors[i + 1..run_end(i + 1)];
                    tensor_groups(run, group_bytes)
                        .first()
                        .map(|r| &run[r.clone()])
                })
                .flatten();
            let mut pre = None;
            let mut got = Ok(0);
            rayon::in_place_scope(|s| {
                // Queued at the stream's first write, once its first window is decoded and the
                // next one queued: the stream's own work goes first.
                let pre = &mut pre;
                let mut pw = Progressing {
                    inner: w,
                    progress,
                    on_first_write: next_first.map(|group| {
                        Box::new(move || s.spawn(move |_| *pre = Some(load_group(store, group))))
                            as Box<dyn FnOnce() + '_>
                    }),
                };
                got = crate::load::load_streamed(
                    store,
                    &t.key,
                    Some((t.dtype, t.shape.as_slice())),
                    &mut pw,
                )
                .with_context(|| format!("tensor {:?}", t.name));
            });
            let got = got?;
            if got != manifest_nbytes(t) {
                bail!("tensor {:?}: {got} bytes, the manifest says more", t.name);
            }
            n += got;
            first = pre;
            i += 1;
            continue;
        }
        let j = run_end(i);
        for_each_tensor_from(store, &tensors[i..j], group_bytes, first.take(), |_, wt| {
            write_pieces(w, wt.data())?;
            n += wt.nbytes() as u64;
            progress(wt.nbytes() as u64);
            // Written out: its buffer is the next tensor's to decode into.
            coral_core::pool::recycle_bytes(wt.into_parts().1);
            Ok(())
        })?;
        i = j;
    }
    Ok(n)
}

/// A writer that reports the bytes going through.
struct Progressing<'a, 'p> {
    inner: &'a mut dyn Write,
    progress: &'p (dyn Fn(u64) + Sync),
    /// Called once, before the first bytes are written.
    on_first_write: Option<Box<dyn FnOnce() + 'a>>,
}

impl Write for Progressing<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = self.on_first_write.take() {
            f();
        }
        let k = self.inner.write(&buf[..buf.len().min(WRITE_PIECE)])?;
        (self.progress)(k as u64);
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Checks that `offsets` lay `tensors` out back to back from 0, each as long as its shape says.
pub(crate) fn check_offsets(tensors: &[ManifestTensor], offsets: &[[u64; 2]]) -> Result<()> {
    if tensors.len() != offsets.len() {
        bail!("{} offsets for {} tensors", offsets.len(), tensors.len());
    }
    let mut pos = 0u64;
    for (t, &[b, e]) in tensors.iter().zip(offsets) {
        if b != pos || e.checked_sub(b) != t.nbytes() {
            bail!("tensor {:?}: data does not fit offsets [{b}, {e}]", t.name);
        }
        pos = e;
    }
    Ok(())
}

/// Output goes to the file at most this many bytes per `write`: on Linux one write of tens of
/// megabytes into the page cache costs several times the system time of the same bytes in
/// pieces of a megabyte (measured: `dd bs=64M` 2.5 s of system time for 1.1 GB, `bs=1M` 0.4 s).
const WRITE_PIECE: usize = 1 << 20;

/// Writes `data` in pieces of [`WRITE_PIECE`] bytes.
pub(crate) fn write_pieces(w: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    for piece in data.chunks(WRITE_PIECE) {
        w.write_all(piece)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    /// Bytes through [`WriteBack`] land as written, across several write-back windows and
    /// after seeks back and forth.
    #[test]
    fn write_back_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 3 * WRITE_BACK_WINDOW as usize + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let n = write_in_place(&path, |w| {
            w.write_all(&[0u8; 8])?;
            write_pieces(w, &data[8..])?;
            w.seek(SeekFrom::Start(0))?;
            w.write_all(&data[..8])?;
            w.seek(SeekFrom::End(0))?;
            Ok(len as u64)
        })
        .unwrap();
        assert_eq!(n, len as u64);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), len);
        assert!(back == data, "the file differs from what was written");
    }
}

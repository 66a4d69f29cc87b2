//! Model folders in: a checkpoint directory (a Hugging Face `save_pretrained` folder, say)
//! walked in path order, its `.safetensors` files read as tensors and every other file kept as
//! a blob, cut into content-defined chunks.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coral_core::{check_link_target, ModelFormat};

use crate::error::{bail, Context, ModelError, Result};
use crate::source::SourceFile;

/// Blob chunks: content-defined (FastCDC), so that inserting or changing bytes in a large file
/// moves only the chunk boundaries near the edit, and the other chunks are found in the store.
/// A file smaller than the minimum is one chunk.
pub const BLOB_CHUNK_MIN: u32 = 256 << 10;
/// The average chunk size aimed at.
pub const BLOB_CHUNK_AVG: u32 = 1 << 20;
/// The largest chunk.
pub const BLOB_CHUNK_MAX: u32 = 4 << 20;

/// What one entry of a folder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A symbolic link to a path inside the folder (its target as read).
    Symlink(String),
    /// A `.safetensors` file: its tensors become weights.
    Safetensors,
    /// Any other regular file, kept byte for byte.
    Blob,
}

/// One entry of a [`SourceFolder`].
#[derive(Debug, Clone)]
pub struct FolderEntry {
    /// The path relative to the folder, `/`-separated.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (0 for a directory or link).
    pub size: u64,
    /// What it is.
    pub kind: EntryKind,
}

/// A model folder, walked: every entry below it in path order (a directory before what it
/// holds, names sorted bytewise), checked before anything is stored.
///
/// Refused with one line: a symbolic link that points outside the folder (or to an absolute
/// path), a device, FIFO or socket, and a name that is not UTF-8.
///
/// ```
/// use coral_models::{EntryKind, SourceFolder};
///
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("config.json"), b"{}")?;
/// std::fs::create_dir(dir.path().join("tokenizer"))?;
/// std::fs::write(dir.path().join("tokenizer/vocab.txt"), b"a\nb\n")?;
/// let folder = SourceFolder::open(dir.path())?;
/// let paths: Vec<&str> = folder.entries().iter().map(|e| e.path.as_str()).collect();
/// assert_eq!(paths, ["config.json", "tokenizer", "tokenizer/vocab.txt"]);
/// assert_eq!(folder.entries()[1].kind, EntryKind::Dir);
/// assert_eq!(folder.total_bytes(), 6);
///
/// std::os::unix::fs::symlink("/etc/passwd", dir.path().join("escape"))?;
/// let err = SourceFolder::open(dir.path()).unwrap_err();
/// assert!(err.to_string().contains("points outside the folder"), "{err}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SourceFolder {
    root: PathBuf,
    entries: Vec<FolderEntry>,
    total: u64,
}

impl SourceFolder {
    /// Walks and checks a folder.
    pub fn open(dir: &Path) -> Result<SourceFolder> {
        let meta = std::fs::metadata(dir).with_context(|| format!("opening {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        let mut folder = SourceFolder {
            root: dir.to_path_buf(),
            entries: Vec::new(),
            total: 0,
        };
        folder.walk(dir, "")?;
        Ok(folder)
    }

    fn walk(&mut self, dir: &Path, prefix: &str) -> Result<()> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                bail!(
                    "{} has a name that is not UTF-8; coral keeps folder paths as UTF-8",
                    entry.path().display()
                );
            };
            names.push(name.to_owned());
        }
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & 0o7777;
            if ft.is_symlink() {
                let target = std::fs::read_link(&path)
                    .with_context(|| format!("reading link {}", path.display()))?;
                let Some(target) = target.to_str() else {
                    bail!("link {} has a target that is not UTF-8", path.display());
                };
                check_link_target(&rel, target)
                    .map_err(|e| ModelError::Invalid(format!("{}: {e}", self.root.display())))?;
                self.entries.push(FolderEntry {
                    path: rel,
                    mode: 0o777,
                    size: 0,
                    kind: EntryKind::Symlink(target.to_owned()),
                });
            } else if ft.is_dir() {
                self.entries.push(FolderEntry {
                    path: rel.clone(),
                    mode,
                    size: 0,
                    kind: EntryKind::Dir,
                });
                self.walk(&path, &rel)?;
            } else if ft.is_file() {
                let kind = match path.extension().and_then(|e| e.to_str()) {
                    Some(e) if ModelFormat::from_extension(e) == Some(ModelFormat::Safetensors) => {
                        EntryKind::Safetensors
                    }
                    _ => EntryKind::Blob,
                };
                self.total = self.total.saturating_add(meta.len());
                self.entries.push(FolderEntry {
                    path: rel,
                    mode,
                    size: meta.len(),
                    kind,
                });
            } else {
                let what = if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else if ft.is_block_device() || ft.is_char_device() {
                    "a device"
                } else {
                    "not a regular file"
                };
                bail!(
                    "{} is {what}; coral stores regular files, folders and links inside the folder",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every entry, in path order.
    pub fn entries(&self) -> &[FolderEntry] {
        &self.entries
    }

    /// The sum of the regular files' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Opens and parses a `.safetensors` entry (strictly, as a top-level file).
    pub fn open_safetensors(&self, e: &FolderEntry) -> Result<SourceFile> {
        let path = self.root.join(&e.path);
        let src = SourceFile::open(&path)?;
        if src.format() != ModelFormat::Safetensors {
            bail!(
                "{} is named .safetensors but is a {} file",
                path.display(),
                src.format()
            );
        }
        if src.file_size() != e.size {
            bail!("{} changed while being added", path.display());
        }
        Ok(src)
    }

    /// Maps a blob entry (`None` when empty).
    pub(crate) fn map_blob(&self, e: &FolderEntry) -> Result<Option<Arc<memmap2::Mmap>>> {
        let path = self.root.join(&e.path);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len != e.size {
            bail!("{} changed while being added", path.display());
        }
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a read-only private map; a file changed meanwhile is caught by the chunk
        // hashes (the stored chunk is what was read, hashed once).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Some(Arc::new(map)))
    }
}

/// The content-defined chunks of a blob, in order: ranges that cover `data` exactly.
pub fn chunk_ranges(data: &[u8]) -> Vec<Range<usize>> {
    if data.len() <= BLOB_CHUNK_MIN as usize {
        let mut one = Vec::new();
        if !data.is_empty() {
            one.push(0..data.len());
        }
        return one;
    }
    fastcdc::v2020::FastCDC::new(data, BLOB_CHUNK_MIN, BLOB_CHUNK_AVG, BLOB_CHUNK_MAX)
        .map(|c| c.offset..c.offset + c.length)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that are not all alike (FastCDC needs variety to cut).
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn chunks_cover_the_data_and_survive_an_edit() {
        assert!(chunk_ranges(&[]).is_empty());
        assert_eq!(chunk_ranges(&[1, 2, 3]), vec![0..3]);
        let data = noise(12 << 20, 7);
        let a = chunk_ranges(&data);
        assert!(a.len() > 4, "{}", a.len());
        let mut pos = 0;
        for r in &a {
            assert_eq!(r.start, pos);
            assert!(r.len() <= BLOB_CHUNK_MAX as usize);
            pos = r.end;
        }
        assert_eq!(pos, data.len());
        // Insert bytes in the middle: most chunks are found again.
        let mut edited = data.clone();
        edited.splice(6 << 20..6 << 20, noise(1000, 9));
        let b = chunk_ranges(&edited);
        let set: std::collections::HashSet<&[u8]> = a.iter().map(|r| &data[r.clone()]).collect();
        let shared = b
            .iter()
            .filter(|r| set.contains(&edited[(*r).clone()]))
            .count();
        assert!(
            shared + 3 >= a.len(),
            "{shared} of {} chunks shared",
            a.len()
        );
    }

    #[test]
    fn fifos_and_escaping_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = SourceFolder::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a FIFO") && !e.contains('\n'), "{e}");
        std::fs::remove_file(&fifo).unwrap();

        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("../../outside", dir.path().join("sub/l")).unwrap();
        let e = SourceFolder::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("points outside the folder"), "{e}");
        std::fs::remove_file(dir.path().join("sub/l")).unwrap();

        // A link inside, even dangling, is kept as a link; a file given as a folder is refused.
        std::os::unix::fs::symlink("../x.bin", dir.path().join("sub/l")).unwrap();
        std::fs::write(dir.path().join("x.bin"), b"x").unwrap();
        let f = SourceFolder::open(dir.path()).unwrap();
        let kinds: Vec<_> = f.entries().iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Dir,
                EntryKind::Symlink("../x.bin".into()),
                EntryKind::Blob
            ]
        );
        let e = SourceFolder::open(&dir.path().join("x.bin")).unwrap_err();
        assert!(e.to_string().contains("is not a folder"), "{e}");
    }
}

/// A model to add, opened: a file, or a folder.
#[derive(Debug)]
pub enum Source {
    /// A model file.
    File(SourceFile),
    /// A model folder.
    Folder(SourceFolder),
}

impl Source {
    /// Opens `path`: a folder when it is one (following a link to it), else a model file.
    pub fn open(path: &Path) -> Result<Source> {
        if path.is_dir() {
            Ok(Source::Folder(SourceFolder::open(path)?))
        } else {
            Ok(Source::File(SourceFile::open(path)?))
        }
    }
}

impl<'a> From<&'a Source> for crate::add::SourceRef<'a> {
    fn from(s: &'a Source) -> Self {
        match s {
            Source::File(f) => crate::add::SourceRef::File(f),
            Source::Folder(f) => crate::add::SourceRef::Folder(f),
        }
    }
}

//! Model manifests: the tensor names of a model in order, their keys, and what is needed to
//! rebuild the original file byte for byte.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::hash::ContentHash;

/// A validated model name: 1 to 128 characters from `[A-Za-z0-9._-]`, not starting with `.` or
/// `-`. Safe to use in a file name, an HDF5 path or an object key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    /// Validates a name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(ModelName(name))
        } else {
            Err(CoreError::InvalidModelName(
                name.chars().take(140).collect(),
            ))
        }
    }

    /// Validates the name of a model about to be stored: as [`ModelName::new`], and not 64 hex
    /// digits (of either case), which read as a weight's SHA-256 key: such a model would shadow
    /// the weight or delta with that key wherever a command takes a model name or a hash (`coral
    /// show`). [`ModelName::new`] still accepts such names, so that a store written before this
    /// rule keeps reading (its models can be exported and removed).
    pub fn for_new_model(name: impl Into<String>) -> Result<Self> {
        let name = ModelName::new(name)?;
        if name.0.len() == 64 && name.0.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CoreError::HashLikeModelName(name.0));
        }
        Ok(name)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ModelName {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        ModelName::new(s)
    }
}

impl TryFrom<String> for ModelName {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self> {
        ModelName::new(s)
    }
}

impl From<ModelName> for String {
    fn from(n: ModelName) -> String {
        n.0
    }
}

/// One tensor of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestTensor {
    /// The tensor's name in the model file.
    pub name: String,
    /// Its key in the store (a full weight or a delta).
    pub key: ContentHash,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// For safetensors: the `[begin, end)` byte offsets of the data in the file's data section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_offsets: Option<[u64; 2]>,
}

impl ManifestTensor {
    /// Bytes of data its dtype and shape make; `None` when that overflows (a damaged manifest).
    pub fn nbytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
    }
}

/// The file format a model came in, and goes back out in: stored as `"safetensors"`, `"npy"`,
/// `"npz"` or `"folder"` (a manifest naming another does not parse: an older Coral refuses a
/// newer format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A safetensors file, given back byte for byte.
    Safetensors,
    /// One NumPy `.npy` array.
    Npy,
    /// A NumPy `.npz` archive of arrays.
    Npz,
    /// A folder (a Hugging Face `save_pretrained` checkpoint, say): its `.safetensors` files'
    /// tensors as weights, every other file as blob chunks, listed in
    /// [`ModelManifest::files`].
    Folder,
}

impl ModelFormat {
    /// The name as stored: "safetensors", "npy" or "npz".
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Safetensors => "safetensors",
            ModelFormat::Npy => "npy",
            ModelFormat::Npz => "npz",
            ModelFormat::Folder => "folder",
        }
    }

    /// The format a file extension names (any case), if any.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "safetensors" => Some(ModelFormat::Safetensors),
            "npy" => Some(ModelFormat::Npy),
            "npz" => Some(ModelFormat::Npz),
            _ => None,
        }
    }
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model as a store keeps it beside its weights (see `docs/format.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Manifest format version (1).
    pub version: u32,
    /// The model's name.
    pub name: ModelName,
    /// The source format.
    pub format: ModelFormat,
    /// Tensors in file order.
    pub tensors: Vec<ManifestTensor>,
    /// For safetensors: the header bytes exactly as they were in the file (JSON text including
    /// any trailing padding spaces), so export gives back the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safetensors_header: Option<String>,
    /// Total size of the original file in bytes.
    pub file_size: u64,
    /// The model this one was stored against (its deltas' references), when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ModelName>,
    /// Seconds since the Unix epoch when the model was added.
    #[serde(default)]
    pub created_unix: u64,
    /// For a folder model: every entry of the tree, in path order (absent otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ManifestFile>,
}

/// One entry of a folder model: a path relative to the folder, its permission bits and what
/// it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// The path relative to the folder, `/`-separated, each component a plain name (see
    /// [`check_relative_path`]).
    pub path: String,
    /// Permission bits (`mode & 0o7777`), restored on export.
    pub mode: u32,
    /// What the entry holds.
    #[serde(flatten)]
    pub content: FileContent,
}

/// What a folder entry holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FileContent {
    /// A directory (listed so that empty ones come back too).
    Dir,
    /// A symbolic link to a path inside the folder, recreated as a link.
    Symlink {
        /// The link's target as it was read (relative, resolving inside the folder).
        target: String,
    },
    /// A safetensors file: its header as it was, and its tensors, which are
    /// `ModelManifest::tensors[tensors[0]..tensors[1]]`.
    Safetensors {
        /// The file's size in bytes.
        size: u64,
        /// The header bytes exactly as in the file (JSON with any padding).
        header: String,
        /// The `[begin, end)` range of its tensors in [`ModelManifest::tensors`].
        tensors: [usize; 2],
    },
    /// Any other file: its bytes as content-addressed chunks (each stored as a 1-D `uint8`
    /// weight), concatenated in order.
    Blob {
        /// The file's size in bytes (the sum of the chunks' lengths).
        size: u64,
        /// The chunks in order.
        chunks: Vec<BlobChunk>,
    },
}

/// One chunk of a blob: a 1-D `uint8` weight of `len` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunk {
    /// The chunk's key: the hash of a `uint8` weight of shape `[len]` holding its bytes.
    pub key: ContentHash,
    /// Its length in bytes.
    pub len: u64,
}

impl ManifestFile {
    /// The entry's size in bytes (0 for a directory or link).
    pub fn size(&self) -> u64 {
        match &self.content {
            FileContent::Safetensors { size, .. } | FileContent::Blob { size, .. } => *size,
            FileContent::Dir | FileContent::Symlink { .. } => 0,
        }
    }

    /// The kind as stored: "dir", "symlink", "safetensors" or "blob".
    pub fn kind(&self) -> &'static str {
        match &self.content {
            FileContent::Dir => "dir",
            FileContent::Symlink { .. } => "symlink",
            FileContent::Safetensors { .. } => "safetensors",
            FileContent::Blob { .. } => "blob",
        }
    }
}

/// Checks that `path` is a safe relative path inside a folder: not empty, `/`-separated, no
/// empty, `.` or `..` component, no NUL or backslash, at most 4096 bytes. A path from a
/// manifest that fails this is refused before anything is written.
pub fn check_relative_path(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.len() > 4096
        || path.contains(['\0', '\\'])
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CoreError::Manifest(format!(
            "unsafe path {:?} in a folder model",
            path.chars().take(200).collect::<String>()
        )));
    }
    Ok(())
}

/// Checks that a symbolic link at `path` (relative to the folder) pointing to `target`
/// resolves inside the folder, lexically: relative, and its `..` never climbing above the
/// folder.
pub fn check_link_target(path: &str, target: &str) -> Result<()> {
    let outside = || {
        CoreError::Manifest(format!(
            "symlink {path:?} points outside the folder (to {:?})",
            target.chars().take(200).collect::<String>()
        ))
    };
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return Err(outside());
    }
    // The link's own folder, then each component of the target.
    let mut depth: usize = path.split('/').count().saturating_sub(1);
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or_else(outside)?,
            _ => depth += 1,
        }
    }
    Ok(())
}

impl ModelManifest {
    /// Every key the model needs, in tensor order, then its blobs' chunks (may repeat).
    pub fn keys(&self) -> impl Iterator<Item = &ContentHash> {
        self.tensors
            .iter()
            .map(|t| &t.key)
            .chain(self.blob_chunks().map(|(_, c)| &c.key))
    }

    /// Every blob chunk of a folder model, with its file, in order.
    pub fn blob_chunks(&self) -> impl Iterator<Item = (&ManifestFile, &BlobChunk)> {
        self.files.iter().flat_map(|f| {
            let chunks: &[BlobChunk] = match &f.content {
                FileContent::Blob { chunks, .. } => chunks,
                _ => &[],
            };
            chunks.iter().map(move |c| (f, c))
        })
    }

    /// The tensors of a folder model's safetensors file `f` (empty for other entries, and for
    /// a range outside the tensors, which [`check_files`](Self::check_files) refuses).
    pub fn file_tensors(&self, f: &ManifestFile) -> &[ManifestTensor] {
        match &f.content {
            FileContent::Safetensors {
                tensors: [a, b], ..
            } => self.tensors.get(*a..*b).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Checks a folder model's entries: safe unique paths, each below a listed directory, links
    /// inside the folder, blob sizes that add up, and safetensors files whose tensor ranges
    /// cover [`tensors`](Self::tensors) in order, exactly once. A model of another format
    /// must have no entries.
    pub fn check_files(&self) -> Result<()> {
        let err = |m: String| Err(CoreError::Manifest(m));
        if self.format != ModelFormat::Folder {
            if !self.files.is_empty() {
                return err(format!("a {} model with folder entries", self.format));
            }
            return Ok(());
        }
        let mut dirs = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
        let mut next_tensor = 0usize;
        let mut total = 0u64;
        for f in &self.files {
            check_relative_path(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return err(format!("path {:?} listed twice", f.path));
            }
            if let Some((parent, _)) = f.path.rsplit_once('/') {
                if !dirs.contains(parent) {
                    return err(format!("{:?} comes before its folder", f.path));
                }
            }
            match &f.content {
                FileContent::Dir => {
                    dirs.insert(f.path.as_str());
                }
                FileContent::Symlink { target } => check_link_target(&f.path, target)?,
                FileContent::Safetensors {
                    tensors: [a, b], ..
                } => {
                    if *a != next_tensor || b < a || *b > self.tensors.len() {
                        return err(format!(
                            "{:?}: tensors [{a}, {b}) out of order or range",
                            f.path
                        ));
                    }
                    next_tensor = *b;
                }
                FileContent::Blob { size, chunks } => {
                    let sum = chunks
                        .iter()
                        .try_fold(0u64, |a, c| a.checked_add(c.len))
                        .filter(|s| s == size);
                    if sum.is_none() {
                        return err(format!("{:?}: chunks do not add up to {size}", f.path));
                    }
                }
            }
            total = total.saturating_add(f.size());
        }
        if next_tensor != self.tensors.len() {
            return err(format!(
                "{} tensors, but the files hold {next_tensor}",
                self.tensors.len()
            ));
        }
        if total != self.file_size {
            return err(format!(
                "files add up to {total} bytes, the manifest says {}",
                self.file_size
            ));
        }
        Ok(())
    }

    /// The manifest as JSON bytes.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| CoreError::Manifest(e.to_string()))
    }

    /// Parses a manifest from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| CoreError::Manifest(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_validated() {
        for good in ["minilm", "all-MiniLM-L6-v2", "ckpt_0001.v2"] {
            assert!(ModelName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(ModelName::new(bad).is_err(), "{bad:?}");
            assert!(ModelName::for_new_model(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_new_model_may_not_be_named_like_a_content_hash() {
        let key = ContentHash::sha256(DType::U8, &[1], b"w").to_hex();
        assert_eq!(key.len(), 64);
        for hashlike in [key.clone(), key.to_uppercase(), "0".repeat(64)] {
            let e = ModelName::for_new_model(hashlike.as_str()).unwrap_err();
            assert!(matches!(e, CoreError::HashLikeModelName(_)), "{e}");
            let msg = e.to_string();
            assert!(
                !msg.contains('\n') && msg.contains("64 hex digits"),
                "{msg}"
            );
            // Names written before the rule still read.
            assert!(ModelName::new(hashlike.as_str()).is_ok());
        }
        // One character more or less, or one that is not a hex digit, is a name like any other.
        for fine in [
            "a".repeat(63),
            "a".repeat(65),
            format!("{}g", &key[..63]),
            "deadbeef".to_owned(),
            "2024010112000000".to_owned(),
        ] {
            assert!(ModelName::for_new_model(fine.as_str()).is_ok(), "{fine}");
        }
    }
}

#[cfg(test)]
mod folder_tests {
    use super::*;

    #[test]
    fn relative_paths_are_checked() {
        for good in ["a", "config.json", "sub/dir/x.bin", ".hidden", "a..b"] {
            assert!(check_relative_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/",
            "./a",
            "a/../b",
            "..",
            "a\\b",
            "a\0",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn links_must_stay_inside() {
        for (path, target) in [
            ("a", "b"),
            ("sub/a", "../b"),
            ("sub/a", "./x/../y"),
            ("x/y/z", "../../w"),
        ] {
            assert!(
                check_link_target(path, target).is_ok(),
                "{path} -> {target}"
            );
        }
        for (path, target) in [
            ("a", "../b"),
            ("a", "/etc"),
            ("sub/a", "../../b"),
            ("a", ""),
            ("x/a", "y/../../../b"),
        ] {
            let e = check_link_target(path, target).unwrap_err().to_string();
            assert!(e.contains("points outside the folder"), "{e}");
        }
    }

    fn blob(path: &str, lens: &[u64]) -> ManifestFile {
        let key = ContentHash::sha256(DType::U8, &[1], b"x");
        ManifestFile {
            path: path.into(),
            mode: 0o644,
            content: FileContent::Blob {
                size: lens.iter().sum(),
                chunks: lens.iter().map(|&len| BlobChunk { key, len }).collect(),
            },
        }
    }

    fn folder(files: Vec<ManifestFile>, tensors: usize) -> ModelManifest {
        let key = ContentHash::sha256(DType::U8, &[1], b"t");
        ModelManifest {
            version: 1,
            name: ModelName::new("f").unwrap(),
            format: ModelFormat::Folder,
            tensors: (0..tensors)
                .map(|i| ManifestTensor {
                    name: format!("t{i}"),
                    key,
                    dtype: DType::U8,
                    shape: vec![1],
                    data_offsets: Some([i as u64, i as u64 + 1]),
                })
                .collect(),
            safetensors_header: None,
            file_size: files.iter().map(|f| f.size()).sum(),
            parent: None,
            created_unix: 0,
            files,
        }
    }

    fn st(path: &str, range: [usize; 2]) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            mode: 0o644,
            content: FileContent::Safetensors {
                size: 10,
                header: "{}".into(),
                tensors: range,
            },
        }
    }

    #[test]
    fn folder_entries_are_checked() {
        let dir = ManifestFile {
            path: "sub".into(),
            mode: 0o755,
            content: FileContent::Dir,
        };
        let good = folder(
            vec![
                blob("a.json", &[3, 4]),
                dir.clone(),
                st("sub/m1.safetensors", [0, 2]),
                st("sub/m2.safetensors", [2, 3]),
            ],
            3,
        );
        good.check_files().unwrap();
        assert_eq!(good.keys().count(), 5);
        assert_eq!(good.file_tensors(&good.files[3]).len(), 1);
        // JSON round trip, with the kind tag.
        let json = String::from_utf8(good.to_json().unwrap()).unwrap();
        assert!(json.contains(r#""kind":"safetensors""#), "{json}");
        assert_eq!(ModelManifest::from_json(json.as_bytes()).unwrap(), good);

        let bad = [
            folder(vec![blob("a", &[1]), blob("a", &[1])], 0),
            folder(vec![blob("sub/a", &[1])], 0),
            folder(vec![blob("../a", &[1])], 0),
            folder(vec![st("a", [0, 1]), st("b", [0, 1])], 1),
            folder(vec![st("a", [0, 1])], 2),
            folder(vec![st("a", [0, 3])], 2),
            folder(
                vec![ManifestFile {
                    path: "l".into(),
                    mode: 0o777,
                    content: FileContent::Symlink {
                        target: "../../x".into(),
                    },
                }],
                0,
            ),
        ];
        for m in bad {
            assert!(m.check_files().is_err(), "{:?}", m.files);
        }
        let mut sizes = folder(vec![blob("a", &[1, 2])], 0);
        if let FileContent::Blob { size, .. } = &mut sizes.files[0].content {
            *size = 4;
        }
        assert!(sizes.check_files().is_err());
        let mut total = good.clone();
        total.file_size += 1;
        assert!(total.check_files().is_err());
    }
}

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

/// The file format a model came in, and goes back out in: stored as `"safetensors"`, `"npy"` or
/// `"npz"` (a manifest naming another does not parse: an older Coral refuses a newer format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A safetensors file, given back byte for byte.
    Safetensors,
    /// One NumPy `.npy` array.
    Npy,
    /// A NumPy `.npz` archive of arrays.
    Npz,
}

impl ModelFormat {
    /// The name as stored: "safetensors", "npy" or "npz".
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Safetensors => "safetensors",
            ModelFormat::Npy => "npy",
            ModelFormat::Npz => "npz",
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
}

impl ModelManifest {
    /// Every key the model needs, in tensor order (may repeat).
    pub fn keys(&self) -> impl Iterator<Item = &ContentHash> {
        self.tensors.iter().map(|t| &t.key)
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

//! # coral-models
//!
//! Models over any Coral [`Store`](coral_store_api::Store): what the `coral` command does, as a
//! library, so that a Rust program (and the Python package) adds a model file in a few lines.
//!
//! - [`SourceFile`]: a model file in (safetensors byte for byte, `.npy`, `.npz`),
//!   memory-mapped; the formats themselves are `coral-formats`';
//! - [`add`]: its tensors stored one by one, each hashed once ([`coral_core::HashedWeight`]):
//!   what the store has is reused, changed tensors are delta-coded against a reference model,
//!   the manifest goes last; [`export`]: the model back out, verified, renamed into place;
//! - [`diff`], [`verify`], [`repair`] and [`gc`], with reports that serialize to JSON;
//! - [`ModelError`]: typed errors with their context; progress comes through callbacks that
//!   receive bytes done.
//!
//! ```
//! use coral_core::{DType, ModelName};
//! use coral_formats::safetensors::build_header;
//! use coral_models::{add, export, AddOptions, SourceFile};
//! use coral_store_api::MemoryStore;
//!
//! // A small safetensors file: two f32 tensors.
//! let (mut file, _) = build_header(&[
//!     ("w".to_string(), DType::F32, vec![2, 2]),
//!     ("b".to_string(), DType::F32, vec![2]),
//! ])?;
//! for x in [0.5f32, 1.0, 1.5, 2.0, 0.25, 0.75] {
//!     file.extend_from_slice(&x.to_le_bytes());
//! }
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("model.safetensors");
//! std::fs::write(&path, &file)?;
//!
//! // Add it to a store (any: HDF5, S3, memory), then export it back, byte for byte.
//! let store = MemoryStore::new();
//! let name = ModelName::new("base")?;
//! let report = add(&store, &SourceFile::open(&path)?, &AddOptions::new(name.clone()), &|_| {})?;
//! assert_eq!((report.tensors, report.new), (2, 2));
//! let out = dir.path().join("back.safetensors");
//! export(&store, &name, &out, 64 << 20, &|_| {})?;
//! assert_eq!(std::fs::read(&out)?, file);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod add;
mod diff;
mod error;
mod export;
mod folder;
mod gc;
mod groups;
mod keys;
mod load;
mod source;
mod verify;

#[cfg(test)]
mod tests;

/// The README's Rust blocks, run as doc tests so that the tour stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use add::{
    add, choose_reference, default_model_name, AddOptions, AddReport, FileReport, Reference,
    SourceRef,
};
pub use diff::{diff, relative_change, ChangedTensor, DiffReport, FilesDiff};
pub use error::{Context, ModelError, Result};
pub use export::{
    clean_stale_tmp, export, export_with, for_each_tensor, for_each_tensor_in, pid_alive,
    ExportOptions,
};
pub use folder::{
    chunk_ranges, EntryKind, FolderEntry, Source, SourceFolder, BLOB_CHUNK_AVG, BLOB_CHUNK_MAX,
    BLOB_CHUNK_MIN,
};
pub use gc::{gc, gc_with, needed_keys, worth_compacting, GcOptions, GcReport, DEFAULT_GRACE};
pub use keys::{key_kinds, keys_with_prefix, MIN_PREFIX_DIGITS};
pub use load::load_resolved;
pub use source::{check_manifest, mapped_bytes, write_model, SourceFile, SourceTensor};
pub use verify::{repair, verify, Failure, RepairReport, VerifyReport};

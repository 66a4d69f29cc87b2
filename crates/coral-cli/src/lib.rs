//! # coral-cli
//!
//! The `coral` command's workings, on any [`coral_store_api::Store`]: model files in and out
//! (safetensors byte for byte, `.npy`, `.npz`), stored tensor by tensor with deduplication and
//! deltas against a reference model, and the checks and clean-ups around them (diff, verify, gc).
//! The binary (`src/main.rs`) is a thin layer of argument parsing and printing over this.
//!
//! The file formats themselves (safetensors headers, `.npy`, `.npz`, recognising other files)
//! are the `coral-formats` crate's.
//!
//! ```
//! use coral_formats::safetensors;
//! use coral_core::DType;
//!
//! // A two-tensor safetensors file, parsed strictly.
//! let (mut file, offsets) = safetensors::build_header(&[
//!     ("w".to_string(), DType::F32, vec![2]),
//!     ("b".to_string(), DType::U8, vec![3]),
//! ])?;
//! file.extend_from_slice(&[0u8; 11]);
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("m.safetensors");
//! std::fs::write(&path, &file)?;
//! let src = coral_cli::source::SourceFile::open(&path)?;
//! assert_eq!(src.tensors().len(), 2);
//! assert_eq!(offsets, vec![[0, 8], [8, 11]]);
//!
//! // A PyTorch checkpoint is named as such.
//! let pt = dir.path().join("model.bin");
//! std::fs::write(&pt, b"\x80\x04\x95\x00\x00")?;
//! let err = coral_cli::source::SourceFile::open(&pt).unwrap_err();
//! assert!(err.to_string().contains("is a PyTorch pickle checkpoint"));
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod guard;
pub mod ops;
pub mod source;
pub mod store;

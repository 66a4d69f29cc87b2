//! # coral-cli
//!
//! The `coral` command's workings, on any [`coral_store_api::Store`]: model files in and out
//! (safetensors byte for byte, `.npy`, `.npz`), stored tensor by tensor with deduplication and
//! deltas against a reference model, and the checks and clean-ups around them (diff, verify, gc).
//! The binary (`src/main.rs`) is a thin layer of argument parsing and printing over this.
//!
//! ```
//! use coral_cli::safetensors;
//! use coral_core::DType;
//!
//! // A two-tensor safetensors file, parsed strictly.
//! let (mut file, offsets) = safetensors::build_header(&[
//!     ("w".to_string(), DType::F32, vec![2]),
//!     ("b".to_string(), DType::U8, vec![3]),
//! ])?;
//! file.extend_from_slice(&[0u8; 11]);
//! let header = safetensors::parse(&file)?;
//! assert_eq!(header.tensors.len(), 2);
//! assert_eq!(offsets, vec![[0, 8], [8, 11]]);
//!
//! // Lies are refused with one line.
//! file.truncate(file.len() - 1);
//! let err = safetensors::parse(&file).unwrap_err();
//! assert!(err.to_string().contains("run past the end"));
//! # Ok::<(), safetensors::SafetensorsError>(())
//! ```

#![warn(missing_docs)]

pub mod guard;
pub mod npy;
pub mod npz;
pub mod ops;
pub mod safetensors;
pub mod source;
pub mod store;

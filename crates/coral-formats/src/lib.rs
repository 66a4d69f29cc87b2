//! # coral-formats
//!
//! The model file formats Coral reads and writes, in one place, shared by the `coral` command
//! (model files in and out) and by coral-s3 (whose weight objects are `.npz` files):
//!
//! - [`safetensors`]: strict header parsing (checked by the `safetensors` crate too, plus what it
//!   lets through: names given twice) and header writing;
//! - [`npy`]: NumPy `.npy` headers, read and written, and dtype ↔ `descr`, with one stated policy
//!   for the dtypes NumPy lacks (bfloat16, float8; see [`npy::NonNumpy`]);
//! - [`npz`]: `.npz` archives read and written with the `zip` crate, ZIP64 included, and the
//!   hand-written deterministic archives coral-s3 stores ([`npz::compact`]);
//! - [`detect`]: what a file is from its magic bytes, so that a PyTorch checkpoint or a GGUF file
//!   is named as such when it is refused.
//!
//! Every reader takes hostile bytes: sizes read from a file are checked before use, and a bad
//! file gives an error of one line naming the problem, never a panic.
//!
//! ```
//! use coral_core::DType;
//! use coral_formats::{detect, npy, npz, safetensors};
//!
//! // A safetensors header for two tensors, then their data, parsed back.
//! let (mut file, offsets) = safetensors::build_header(&[
//!     ("w".to_string(), DType::F32, vec![2]),
//!     ("b".to_string(), DType::U8, vec![3]),
//! ])?;
//! file.extend_from_slice(&[0u8; 11]);
//! let header = safetensors::parse(&file)?;
//! assert_eq!(header.tensors.len(), 2);
//! assert_eq!(offsets, vec![[0, 8], [8, 11]]);
//! assert_eq!(detect::detect(&file), detect::FileKind::Safetensors);
//!
//! // Lies are refused with one line.
//! file.truncate(file.len() - 1);
//! let err = safetensors::parse(&file).unwrap_err();
//! assert!(err.to_string().contains("run past the end"));
//!
//! // An .npz with one array, written and read back.
//! let mut member = npy::header_bytes(DType::I32, &[2], npy::NonNumpy::Refuse)?;
//! member.extend([1i32, 2].iter().flat_map(|v| v.to_le_bytes()));
//! let mut out = std::io::Cursor::new(Vec::new());
//! let mut w = npz::Writer::new(&mut out);
//! w.add("x.npy", &member)?;
//! w.finish()?;
//! let members = npz::read(out.get_ref())?;
//! assert_eq!(members[0].0, "x.npy");
//! let h = npy::parse(&members[0].1)?;
//! assert_eq!((h.dtype, h.shape), (DType::I32, vec![2]));
//!
//! // bfloat16 has no NumPy dtype: refused unless the caller asks for its raw bits.
//! assert!(npy::header_bytes(DType::BF16, &[2], npy::NonNumpy::Refuse).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod detect;
pub mod npy;
pub mod npz;
pub mod safetensors;

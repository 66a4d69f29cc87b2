//! # coral-core
//!
//! The pieces every part of Coral shares, with no I/O of its own:
//!
//! - [`DType`]: every dtype safetensors knows, with NumPy-style names both ways;
//! - [`WeightMetadata`] and [`WeightTensor`]: a weight and what is known of it, its bytes shared
//!   without copying, with conversions to and from `ndarray`;
//! - [`ContentHash`]: the validated key of every store (SHA-256, plus the Python Coral's xxh3-64);
//!   [`ContentHasher`] computes one as data arrives, for loads that stream a weight;
//! - [`codec`]: none, gzip, lz4 and zstd, optionally after HDF5's byte-plane shuffle;
//! - [`delta`]: weights stored as differences from similar weights;
//! - [`manifest`]: models as lists of keys, enough to rebuild the original file;
//! - [`pool`]: buffers of consumed weights, for the next decode to write into;
//! - [`prefetch`]: asking for memory ahead of a pass that reads it in order.
//!
//! ```
//! use coral_core::{codec::CodecSpec, ContentHash, WeightTensor};
//!
//! let w = WeightTensor::from_vec("layer.weight", vec![2, 3], vec![0.5f32; 6])?;
//! let key = w.compute_hash();
//! assert_eq!(key.to_hex().len(), 64);
//! assert_eq!(ContentHash::parse(&key.to_hex())?, key);
//! w.verify(&key)?;
//!
//! let packed = CodecSpec::default().compress(w.data(), w.dtype().size())?;
//! let back = CodecSpec::default().decompress(&packed, 4, w.nbytes())?;
//! assert_eq!(&back[..], &w.data()[..]);
//! # Ok::<(), coral_core::CoreError>(())
//! ```

#![warn(missing_docs)]

pub mod codec;
pub mod delta;
pub mod dtype;
pub mod error;
pub mod hash;
pub mod manifest;
pub mod pool;
pub mod prefetch;
pub mod tensor;

pub use codec::{Codec, CodecSpec};
pub use delta::{encode_best_lossless, Delta, DeltaConfig, DeltaEncoder, DeltaRefusal, DeltaType};
pub use dtype::{DType, Element};
pub use error::{one_line, CoreError, Result};
pub use hash::{ContentHash, ContentHasher, HashAlgorithm};
pub use manifest::{
    check_link_target, check_relative_path, BlobChunk, FileContent, ManifestFile, ManifestTensor,
    ModelFormat, ModelManifest, ModelName,
};
pub use tensor::{HashedWeight, JsonMap, Release, WeightMetadata, WeightTensor, RELEASE_WINDOW};

//! Deltas: a weight stored as the difference from a similar reference weight.
//!
//! This module holds the data types every store persists ([`Delta`], [`DeltaType`]) and the
//! encoder that builds and applies them ([`DeltaEncoder`], configured by [`DeltaConfig`]).
//! [`encode_best_lossless`] picks the smallest lossless strategy by itself and returns `None` when
//! no delta is smaller than the weight compressed with the store's best codec.
//!
//! The nine strategies carry the Python Coral's names. Five are lossless, bit for bit, for every
//! value of every dtype they accept (NaN payloads, infinities, -0.0, subnormals): differences are
//! taken on the integer bit patterns (wrapping subtraction or XOR), never in floating point. Four
//! are lossy and document their error bound (see [`DeltaType`]). The payload layout of each
//! strategy and every metadata key are defined in `docs/format.md` (section "deltas").
//!
//! ```
//! use coral_core::delta::{encode_best_lossless, DeltaConfig, DeltaEncoder, DeltaType};
//! use coral_core::WeightTensor;
//!
//! let base: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.37).sin()).collect();
//! let tuned: Vec<f32> = base.iter().enumerate()
//!     .map(|(i, v)| if i % 64 == 0 { v + 1e-3 } else { *v })
//!     .collect();
//! let reference = WeightTensor::from_vec("w", vec![64, 64], base)?;
//! let target = WeightTensor::from_vec("w", vec![64, 64], tuned)?;
//! let (ref_key, target_key) = (reference.compute_hash(), target.compute_hash());
//!
//! // The best lossless delta, if one pays.
//! let delta = encode_best_lossless(&target, &reference, &ref_key)?.expect("a delta pays");
//! assert!(delta.delta_type.is_lossless());
//! let encoder = DeltaEncoder::new(DeltaConfig::default());
//! let back = encoder.decode_delta(&delta, &reference, &target_key)?;
//! assert_eq!(back, target.clone().with_metadata(back.metadata().clone())?);
//! assert_eq!(back.data(), target.data());
//!
//! // A chosen strategy.
//! let encoder = DeltaEncoder::new(DeltaConfig {
//!     delta_type: DeltaType::XorFloat32,
//!     ..DeltaConfig::default()
//! });
//! encoder.can_encode_as_delta(&target, &reference).expect("same shape and dtype");
//! let delta = encoder.encode_delta(&target, &reference, &ref_key)?;
//! assert_eq!(encoder.decode_delta(&delta, &reference, &target_key)?.data(), target.data());
//! # Ok::<(), coral_core::CoreError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::hash::ContentHash;
use crate::tensor::JsonMap;

mod encoder;
mod legacy;
mod lossless;
mod lossy;
mod payload;

pub use encoder::{encode_best_lossless, DeltaConfig, DeltaEncoder, DeltaRefusal};

/// The nine delta strategies of the Python Coral.
///
/// In what follows `t` is the target element, `r` the reference element, `⊖`/`⊕` wrapping
/// subtraction/addition of their bit patterns read as unsigned little-endian integers of the
/// element's width, and `^` XOR of the bit patterns.
///
/// | strategy | dtypes | exact? | error bound |
/// |---|---|---|---|
/// | `float32_raw` | all | yes | 0 (bit for bit) |
/// | `compressed` | all | yes | 0 |
/// | `xor_float32` | float32 | yes | 0 |
/// | `xor_bfloat16` | bfloat16, float16 | yes | 0 |
/// | `exponent_mantissa` | every float dtype | yes | 0 |
/// | `int8_quantized` | f16, bf16, f32, f64; finite values | no | `scale/2` + half an ulp of the result |
/// | `int16_quantized` | same | no | `scale/2` + half an ulp of the result |
/// | `sparse` | f16, bf16, f32, f64 | no | `sparse_threshold` (elements beyond it are exact) |
/// | `per_axis_scaled` | f16, bf16, f32, f64; finite values | no | `scale_row/2` + half an ulp of the result |
///
/// For the quantized strategies `scale = (max(d) - min(d)) / (2^bits - 1)` where `d = t - r`
/// computed in f64 (per row of the first axis for `per_axis_scaled`); the bound also allows the
/// f64 rounding of that arithmetic (relative 2^-52), and results are clamped to the dtype's finite
/// range, which only brings them closer to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaType {
    /// Lossless: the raw element-wise difference `t ⊖ r`, exact, uncompressed.
    Float32Raw,
    /// Lossless: the difference `t ⊖ r`, zigzag-encoded, byte-plane shuffled and compressed.
    Compressed,
    /// Lossless: XOR of the float32 bit patterns, shuffled and compressed.
    XorFloat32,
    /// Lossless: XOR of the 16-bit float (bfloat16, float16) bit patterns, shuffled and
    /// compressed.
    XorBfloat16,
    /// Lossless: the XOR split into an exponent plane and a sign-and-mantissa plane, each
    /// compressed separately.
    ExponentMantissa,
    /// Lossy: the difference quantized to 8 bits with one scale and offset.
    /// Error at most `scale/2` plus half an ulp of the result.
    Int8Quantized,
    /// Lossy: the difference quantized to 16 bits with one scale and offset.
    /// Error at most `scale/2` plus half an ulp of the result.
    Int16Quantized,
    /// Lossy: differences with `|t - r| <= sparse_threshold` are dropped (the reference value is
    /// kept), the other elements are stored exactly. Error at most `sparse_threshold`.
    Sparse,
    /// Lossy: the difference quantized to `quantization_bits` with one scale and offset per row
    /// of the first axis. Error at most that row's `scale/2` plus half an ulp of the result.
    PerAxisScaled,
}

impl DeltaType {
    /// Every strategy.
    pub const ALL: [DeltaType; 9] = [
        DeltaType::Float32Raw,
        DeltaType::Compressed,
        DeltaType::XorFloat32,
        DeltaType::XorBfloat16,
        DeltaType::ExponentMantissa,
        DeltaType::Int8Quantized,
        DeltaType::Int16Quantized,
        DeltaType::Sparse,
        DeltaType::PerAxisScaled,
    ];

    /// The Python Coral's name ("float32_raw", "xor_bfloat16", ...).
    pub const fn name(self) -> &'static str {
        match self {
            DeltaType::Float32Raw => "float32_raw",
            DeltaType::Compressed => "compressed",
            DeltaType::XorFloat32 => "xor_float32",
            DeltaType::XorBfloat16 => "xor_bfloat16",
            DeltaType::ExponentMantissa => "exponent_mantissa",
            DeltaType::Int8Quantized => "int8_quantized",
            DeltaType::Int16Quantized => "int16_quantized",
            DeltaType::Sparse => "sparse",
            DeltaType::PerAxisScaled => "per_axis_scaled",
        }
    }

    /// True when decoding gives back the weight bit for bit.
    pub const fn is_lossless(self) -> bool {
        matches!(
            self,
            DeltaType::Float32Raw
                | DeltaType::Compressed
                | DeltaType::XorFloat32
                | DeltaType::XorBfloat16
                | DeltaType::ExponentMantissa
        )
    }
}

impl DeltaType {
    /// True when the strategy can encode weights of `dtype`.
    pub const fn accepts(self, dtype: DType) -> bool {
        match self {
            DeltaType::Float32Raw | DeltaType::Compressed => true,
            DeltaType::XorFloat32 => matches!(dtype, DType::F32),
            DeltaType::XorBfloat16 => matches!(dtype, DType::BF16 | DType::F16),
            DeltaType::ExponentMantissa => dtype.is_float(),
            DeltaType::Int8Quantized
            | DeltaType::Int16Quantized
            | DeltaType::Sparse
            | DeltaType::PerAxisScaled => {
                matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
            }
        }
    }

    /// The lossless strategies.
    pub const LOSSLESS: [DeltaType; 5] = [
        DeltaType::Float32Raw,
        DeltaType::Compressed,
        DeltaType::XorFloat32,
        DeltaType::XorBfloat16,
        DeltaType::ExponentMantissa,
    ];
}

impl fmt::Display for DeltaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeltaType {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        DeltaType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| CoreError::Delta(format!("unknown delta type {s:?}")))
    }
}

/// An encoded delta: enough, with its reference weight, to rebuild the target weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The strategy.
    pub delta_type: DeltaType,
    /// The encoded payload (layout depends on `delta_type`; see `docs/format.md`).
    pub data: bytes::Bytes,
    /// Strategy parameters (scales, thresholds, codec) as JSON.
    pub metadata: JsonMap,
    /// Shape of the target weight.
    pub original_shape: Vec<usize>,
    /// Dtype of the target weight.
    pub original_dtype: DType,
    /// Key of the reference weight.
    pub reference_hash: ContentHash,
    /// Target bytes divided by payload bytes (the target's size when the payload is empty).
    pub compression_ratio: f64,
}

impl Delta {
    /// Bytes the payload takes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
}

//! Deltas: a weight stored as the difference from a similar reference weight.
//!
//! This module holds the data types every store persists ([`Delta`], [`DeltaType`]); the encoder
//! that builds and applies them lives beside them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::hash::ContentHash;
use crate::tensor::JsonMap;

/// The nine delta strategies of the Python Coral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaType {
    /// Lossless: the raw element-wise difference, exact.
    Float32Raw,
    /// Lossless: the raw difference, compressed.
    Compressed,
    /// Lossless: XOR of the float32 bit patterns, compressed.
    XorFloat32,
    /// Lossless: XOR of the bfloat16 bit patterns, compressed.
    XorBfloat16,
    /// Lossless: exponent and mantissa planes of the XOR, compressed separately.
    ExponentMantissa,
    /// Lossy: the difference quantized to 8 bits.
    Int8Quantized,
    /// Lossy: the difference quantized to 16 bits.
    Int16Quantized,
    /// Lossy: only differences above a threshold are kept.
    Sparse,
    /// Lossy: per-axis scaled quantized difference.
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
    /// Target bytes divided by payload bytes.
    pub compression_ratio: f64,
}

impl Delta {
    /// Bytes the payload takes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
}

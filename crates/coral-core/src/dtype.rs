//! Element types: every dtype safetensors knows, with NumPy-style names both ways.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The element type of a tensor. Data is always little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DType {
    /// Boolean, one byte (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 double precision.
    F64,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits (OCP "fn" variant).
    F8E4M3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits.
    F8E5M2,
}

impl DType {
    /// Every dtype, in a fixed order.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The NumPy-style name ("float32", "bfloat16", "float8_e4m3fn", ...). This is the name used
    /// in hashes, HDF5 attributes and JSON metadata.
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
        }
    }

    /// The safetensors name ("F32", "BF16", "F8_E4M3", ...).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::U16 => "U16",
            DType::U32 => "U32",
            DType::U64 => "U64",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a NumPy-style name (also accepting common aliases such as "float", "half",
    /// "float8_e4m3") or a safetensors name. An unknown name is an error.
    pub fn from_name(name: &str) -> Result<DType> {
        let dt = match name {
            "bool" | "bool_" | "BOOL" => DType::Bool,
            "uint8" | "u8" | "U8" => DType::U8,
            "uint16" | "u16" | "U16" => DType::U16,
            "uint32" | "u32" | "U32" => DType::U32,
            "uint64" | "u64" | "U64" => DType::U64,
            "int8" | "i8" | "I8" => DType::I8,
            "int16" | "i16" | "I16" => DType::I16,
            "int32" | "i32" | "I32" => DType::I32,
            "int64" | "i64" | "I64" => DType::I64,
            "float16" | "half" | "f16" | "F16" => DType::F16,
            "bfloat16" | "bf16" | "BF16" => DType::BF16,
            "float32" | "float" | "f32" | "F32" => DType::F32,
            "float64" | "double" | "f64" | "F64" => DType::F64,
            "float8_e4m3fn" | "float8_e4m3" | "f8_e4m3" | "F8_E4M3" => DType::F8E4M3,
            "float8_e5m2" | "f8_e5m2" | "F8_E5M2" => DType::F8E5M2,
            other => return Err(CoreError::UnknownDType(other.to_owned())),
        };
        Ok(dt)
    }

    /// True for the floating-point dtypes.
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        DType::from_name(s)
    }
}

impl From<DType> for String {
    fn from(d: DType) -> String {
        d.name().to_owned()
    }
}

impl TryFrom<String> for DType {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self> {
        DType::from_name(&s)
    }
}

/// A Rust element type that maps to one [`DType`], for conversions to and from `ndarray`.
pub trait Element: Copy + Send + Sync + 'static {
    /// The dtype of this element type.
    const DTYPE: DType;
    /// Appends the little-endian bytes of `values` to `out`.
    fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>);
    /// Decodes one element from `size_of::<Self>()` little-endian bytes (missing bytes read as
    /// zero, extra bytes are ignored: never a panic).
    fn from_le_slice(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>) {
                out.reserve(values.len() * std::mem::size_of::<Self>());
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            fn from_le_slice(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                for (d, s) in a.iter_mut().zip(bytes) {
                    *d = *s;
                }
                <$t>::from_le_bytes(a)
            }
        }
    };
}

element!(u8, DType::U8);
element!(u16, DType::U16);
element!(u32, DType::U32);
element!(u64, DType::U64);
element!(i8, DType::I8);
element!(i16, DType::I16);
element!(i32, DType::I32);
element!(i64, DType::I64);
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(half::f16, DType::F16);
element!(half::bf16, DType::BF16);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn extend_le_bytes(values: &[Self], out: &mut Vec<u8>) {
        out.extend(values.iter().map(|&b| u8::from(b)));
    }
    fn from_le_slice(bytes: &[u8]) -> Self {
        bytes.first().is_some_and(|&b| b != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()).unwrap(), d);
            assert_eq!(DType::from_name(d.safetensors_name()).unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DType>(&json).unwrap(), d);
        }
    }

    #[test]
    fn from_le_slice_never_panics() {
        assert_eq!(u32::from_le_slice(&[1, 2, 3, 4]), 0x0403_0201);
        assert_eq!(u32::from_le_slice(&[1]), 1);
        assert_eq!(u16::from_le_slice(&[1, 2, 3]), 0x0201);
        assert!(!bool::from_le_slice(&[]));
        assert!(bool::from_le_slice(&[2]));
        assert_eq!(f32::from_le_slice(&[]), 0.0);
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert!(matches!(
            DType::from_name("complex64"),
            Err(CoreError::UnknownDType(_))
        ));
        assert!(DType::from_name("").is_err());
    }
}

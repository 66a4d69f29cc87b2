//! NumPy `.npy` files: parsing (little-endian, C order) and writing as `numpy.save` does.

use coral_core::DType;

/// Why a file is not an `.npy` file Coral can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NpyError {
    /// Not the `\x93NUMPY` magic.
    #[error("not a .npy file (bad magic)")]
    BadMagic,
    /// The file ends inside the header.
    #[error("truncated .npy header")]
    Truncated,
    /// A format version other than 1, 2 or 3.
    #[error("unsupported .npy version {0}.{1}")]
    Version(u8, u8),
    /// The header dictionary does not parse.
    #[error("bad .npy header: {0}")]
    BadHeader(String),
    /// A dtype Coral does not handle (big-endian, structured, object...).
    #[error("unsupported .npy dtype {0:?}")]
    DType(String),
    /// Fortran order.
    #[error("Fortran-ordered .npy arrays are not supported")]
    Fortran,
    /// Data length disagrees with shape and dtype.
    #[error("data is {actual} bytes but shape {shape:?} of {dtype} needs {expected}")]
    Size {
        /// Shape.
        shape: Vec<usize>,
        /// Dtype name.
        dtype: &'static str,
        /// Bytes needed (`u64::MAX` on overflow).
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// A dtype `.npy` cannot express.
    #[error("{0} cannot be written as .npy")]
    Unwritable(&'static str),
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Offset of the data in the file.
    pub data_start: usize,
}

const MAGIC: &[u8] = b"\x93NUMPY";

fn descr_to_dtype(descr: &str) -> Option<DType> {
    Some(match descr {
        "|b1" => DType::Bool,
        "|u1" | "<u1" => DType::U8,
        "|i1" | "<i1" => DType::I8,
        "<u2" => DType::U16,
        "<u4" => DType::U32,
        "<u8" => DType::U64,
        "<i2" => DType::I16,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        "<f2" => DType::F16,
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        _ => return None,
    })
}

fn dtype_to_descr(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::Bool => "|b1",
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::F16 => "<f2",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::BF16 | DType::F8E4M3 | DType::F8E5M2 => return None,
    })
}

/// The value after `'key':` in a header dictionary.
fn field<'a>(dict: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let pat = format!("'{key}':");
    let at = dict
        .find(&pat)
        .ok_or_else(|| NpyError::BadHeader(format!("no {key:?}")))?;
    Ok(dict[at + pat.len()..].trim_start())
}

/// Parses the header of a whole `.npy` file and checks the data length.
pub fn parse(file: &[u8]) -> Result<NpyHeader, NpyError> {
    if !file.starts_with(MAGIC) {
        return Err(NpyError::BadMagic);
    }
    let (major, minor) = match (file.get(6), file.get(7)) {
        (Some(&a), Some(&b)) => (a, b),
        _ => return Err(NpyError::Truncated),
    };
    let (hlen, start) = match major {
        1 => {
            let b = file.get(8..10).ok_or(NpyError::Truncated)?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10usize)
        }
        2 | 3 => {
            let b = file.get(8..12).ok_or(NpyError::Truncated)?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        _ => return Err(NpyError::Version(major, minor)),
    };
    let end = start.checked_add(hlen).ok_or(NpyError::Truncated)?;
    let dict = file.get(start..end).ok_or(NpyError::Truncated)?;
    let dict = std::str::from_utf8(dict).map_err(|_| NpyError::BadHeader("not UTF-8".into()))?;
    let descr = field(dict, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| NpyError::BadHeader("descr is not a string".into()))?;
    let dtype = descr_to_dtype(descr).ok_or_else(|| NpyError::DType(descr.to_owned()))?;
    let fortran = field(dict, "fortran_order")?;
    if fortran.starts_with("True") {
        return Err(NpyError::Fortran);
    } else if !fortran.starts_with("False") {
        return Err(NpyError::BadHeader("fortran_order is not a boolean".into()));
    }
    let shape_s = field(dict, "shape")?;
    let inner = shape_s
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| NpyError::BadHeader("shape is not a tuple".into()))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| NpyError::BadHeader(format!("bad shape ({inner})")))?;
    let expected = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let actual = (file.len() - end) as u64;
    if expected != actual {
        return Err(NpyError::Size {
            shape,
            dtype: dtype.name(),
            expected,
            actual,
        });
    }
    Ok(NpyHeader {
        dtype,
        shape,
        data_start: end,
    })
}

/// The bytes `numpy.save` writes before the data of a C-ordered array (format 1.0, header padded
/// with spaces and a newline to a multiple of 64 bytes).
pub fn header_bytes(dtype: DType, shape: &[usize]) -> Result<Vec<u8>, NpyError> {
    let descr = dtype_to_descr(dtype).ok_or(NpyError::Unwritable(dtype.name()))?;
    let shape_s = match shape {
        [] => "()".to_owned(),
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    let total = 10 + dict.len() + 1;
    let pad = (64 - total % 64) % 64;
    dict.extend(std::iter::repeat_n(' ', pad));
    dict.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    let len = u16::try_from(dict.len()).map_err(|_| NpyError::BadHeader("too long".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numpy_header_layout() {
        let h = header_bytes(DType::F32, &[3, 4]).unwrap();
        assert_eq!(h.len() % 64, 0);
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"));
        assert!(text.ends_with(" \n"));
        assert!(header_bytes(DType::BF16, &[1]).is_err());
    }

    #[test]
    fn refuses_bad_files() {
        assert_eq!(parse(b"PK\x03\x04"), Err(NpyError::BadMagic));
        assert_eq!(parse(b"\x93NUMPY\x01"), Err(NpyError::Truncated));
        let mut f = header_bytes(DType::F32, &[2]).unwrap();
        f.extend([0u8; 7]);
        assert!(matches!(parse(&f), Err(NpyError::Size { .. })));
        let bad =
            b"\x93NUMPY\x01\x00\x30\x00{'descr': '>f4', 'fortran_order': False, 'shape': (), }\n";
        assert!(matches!(
            parse(bad),
            Err(NpyError::DType(_)) | Err(NpyError::Truncated)
        ));
    }

    proptest! {
        #[test]
        fn round_trip(shape in proptest::collection::vec(0usize..4, 0..4), i in 0usize..15) {
            let dtype = DType::ALL[i];
            if let Ok(mut f) = header_bytes(dtype, &shape) {
                let n: usize = shape.iter().product::<usize>() * dtype.size();
                f.extend(std::iter::repeat_n(1u8, n));
                let h = parse(&f).unwrap();
                prop_assert_eq!(h.dtype, dtype);
                prop_assert_eq!(h.shape, shape);
                prop_assert_eq!(f.len() - h.data_start, n);
            }
        }

        #[test]
        fn mutated_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), cut in any::<prop::sample::Index>()) {
            let mut f = header_bytes(DType::F32, &[2, 3]).unwrap();
            f.extend([0u8; 24]);
            for (i, b) in flips { let i = i.index(f.len()); f[i] = b; }
            f.truncate(cut.index(f.len() + 1));
            let _ = parse(&f);
        }
    }
}

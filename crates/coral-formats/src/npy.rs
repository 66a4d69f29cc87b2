//! NumPy `.npy`: the one codec Coral has for its headers, read and written, and the mapping
//! between Coral's dtypes and NumPy's type strings (`descr`).
//!
//! Reading takes format versions 1.0, 2.0 and 3.0, C order, and little-endian or byte-sized
//! dtypes. Anything else is refused with one line saying what it is: a big-endian array (`>f4`,
//! which `arr.astype('<f4')` converts), Fortran order, a structured or object dtype.
//!
//! Writing gives `numpy.save`'s bytes: format 1.0 (2.0 only for a header over 64 KiB, as NumPy
//! does), the dictionary `{'descr': D, 'fortran_order': False, 'shape': S, }` padded with spaces
//! and a final `\n` so that the data starts at a multiple of 64 bytes.
//!
//! # bfloat16 and float8
//!
//! NumPy has no `bfloat16`, `float8_e4m3fn` or `float8_e5m2`. The header writer does not guess:
//! the caller says, with [`NonNumpy`], what to do with them.
//!
//! - [`NonNumpy::Refuse`] (the `coral` command's export to `.npy` and `.npz`): such a dtype is an
//!   error, [`NpyError::Unwritable`], saying that NumPy has no such dtype. Writing the bit
//!   patterns there would hand the user a file whose type is silently wrong (`<u2` integers where
//!   they had bfloat16 weights), and a later `coral add` of it would store `uint16`.
//! - [`NonNumpy::RawBits`] (coral-s3's weight objects): the bit patterns are written as the
//!   unsigned integer of the same size, `bfloat16` as `<u2` and both float8 as `|u1`. This is only
//!   right where the real dtype is kept beside the data: coral-s3 keeps it in the weight's
//!   metadata object, and `docs/format.md` tells readers to `view` the array as
//!   `ml_dtypes.bfloat16`. These bytes are those coral-s3 has always written.
//!
//! Reading never produces bfloat16 or float8: `<u2` reads as `uint16`.

use coral_core::DType;

/// What the header writer does with a dtype NumPy lacks (bfloat16, float8). See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonNumpy {
    /// Refuse it ([`NpyError::Unwritable`]).
    Refuse,
    /// Write its bit patterns as the unsigned integer of its size (`<u2`, `|u1`); the caller keeps
    /// the real dtype elsewhere.
    RawBits,
}

/// Why a file is not an `.npy` file Coral can read, or a header cannot be written.
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
    /// A big-endian dtype.
    #[error("big-endian .npy dtype {0:?} is not supported (convert it with arr.astype('<{rest}'))", rest = .0.get(1..).unwrap_or(""))]
    BigEndian(String),
    /// A dtype Coral does not handle (structured, object, complex, strings...).
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
    /// A dtype NumPy has no type for, with [`NonNumpy::Refuse`].
    #[error("{0} cannot be written as .npy: NumPy has no such dtype (export to .safetensors)")]
    Unwritable(&'static str),
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: DType,
    /// Shape (`[]` for a 0-d array).
    pub shape: Vec<usize>,
    /// Offset of the data in the file.
    pub data_start: usize,
}

impl NpyHeader {
    /// Bytes of data that shape and dtype call for (`None` on overflow).
    pub fn nbytes(&self) -> Option<u64> {
        nbytes(self.dtype, &self.shape)
    }
}

/// The magic at the start of every `.npy` file.
pub const MAGIC: &[u8] = b"\x93NUMPY";

fn nbytes(dtype: DType, shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

/// The dtype of a NumPy type string, or why it is not one Coral reads.
pub fn dtype_of_descr(descr: &str) -> Result<DType, NpyError> {
    let refuse = || NpyError::DType(descr.to_owned());
    let mut chars = descr.chars();
    let order = chars.next().ok_or_else(refuse)?;
    let code = chars.as_str();
    let dtype = match code {
        "b1" => DType::Bool,
        "u1" => DType::U8,
        "i1" => DType::I8,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "f2" => DType::F16,
        "f4" => DType::F32,
        "f8" => DType::F64,
        _ => return Err(refuse()),
    };
    match order {
        '<' => Ok(dtype),
        // Byte order means nothing for one-byte types: NumPy writes `|`.
        '|' | '>' if dtype.size() == 1 => Ok(dtype),
        '>' => Err(NpyError::BigEndian(descr.to_owned())),
        _ => Err(refuse()),
    }
}

/// NumPy's type string for a dtype, as [`NonNumpy`] says for the dtypes NumPy lacks.
pub fn descr(dtype: DType, non_numpy: NonNumpy) -> Result<&'static str, NpyError> {
    Ok(match dtype {
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
        DType::BF16 | DType::F8E4M3 | DType::F8E5M2 => match non_numpy {
            NonNumpy::Refuse => return Err(NpyError::Unwritable(dtype.name())),
            NonNumpy::RawBits if dtype.size() == 2 => "<u2",
            NonNumpy::RawBits => "|u1",
        },
    })
}

/// Python's repr of a shape tuple: `()`, `(3,)`, `(2, 3)`.
pub fn shape_repr(shape: &[usize]) -> String {
    match shape {
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
    }
}

/// The bytes `numpy.save` writes before the data of a C-ordered array (format 1.0, or 2.0 for a
/// header too long for 1.0's 16-bit length; padded with spaces and a newline to a multiple of
/// 64 bytes).
pub fn header_bytes(
    dtype: DType,
    shape: &[usize],
    non_numpy: NonNumpy,
) -> Result<Vec<u8>, NpyError> {
    let descr = descr(dtype, non_numpy)?;
    let mut dict = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}",
        shape_repr(shape)
    );
    // Version 1.0 has a 2-byte header length after the 8 bytes of magic and version; 2.0 a
    // 4-byte one.
    let v1 = 10 + dict.len() + 1;
    let pad = |prefix: usize| (64 - (prefix + dict.len() + 1) % 64) % 64;
    let (version, prefix) = if v1 + pad(10) <= 10 + usize::from(u16::MAX) {
        (1u8, 10)
    } else {
        (2u8, 12)
    };
    let p = pad(prefix);
    dict.extend(std::iter::repeat_n(' ', p));
    dict.push('\n');
    let mut out = Vec::with_capacity(prefix + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        let len = u16::try_from(dict.len()).map_err(|_| NpyError::BadHeader("too long".into()))?;
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        let len = u32::try_from(dict.len()).map_err(|_| NpyError::BadHeader("too long".into()))?;
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    Ok(out)
}

/// Parses the header of a whole `.npy` file and checks that the data that follows is exactly
/// what shape and dtype call for.
pub fn parse(file: &[u8]) -> Result<NpyHeader, NpyError> {
    let h = parse_header(file)?;
    let expected = h.nbytes().unwrap_or(u64::MAX);
    let actual = file.len().saturating_sub(h.data_start) as u64;
    if expected != actual {
        return Err(NpyError::Size {
            shape: h.shape,
            dtype: h.dtype.name(),
            expected,
            actual,
        });
    }
    Ok(h)
}

/// Parses the header at the start of `bytes` (which may hold only the start of a file).
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader, NpyError> {
    if !bytes.starts_with(MAGIC) {
        return Err(if MAGIC.starts_with(bytes) {
            NpyError::Truncated
        } else {
            NpyError::BadMagic
        });
    }
    let (major, minor) = match (bytes.get(6), bytes.get(7)) {
        (Some(&a), Some(&b)) => (a, b),
        _ => return Err(NpyError::Truncated),
    };
    let (hlen, start) = match major {
        1 => match bytes.get(8..10) {
            Some(&[a, b]) => (usize::from(u16::from_le_bytes([a, b])), 10usize),
            _ => return Err(NpyError::Truncated),
        },
        2 | 3 => match bytes.get(8..12) {
            Some(&[a, b, c, d]) => {
                let n = u32::from_le_bytes([a, b, c, d]);
                (usize::try_from(n).map_err(|_| NpyError::Truncated)?, 12)
            }
            _ => return Err(NpyError::Truncated),
        },
        _ => return Err(NpyError::Version(major, minor)),
    };
    let end = start.checked_add(hlen).ok_or(NpyError::Truncated)?;
    let dict = bytes.get(start..end).ok_or(NpyError::Truncated)?;
    // Version 1 and 2 headers are latin-1 (in practice ASCII), version 3 UTF-8.
    let dict = std::str::from_utf8(dict).map_err(|_| NpyError::BadHeader("not UTF-8".into()))?;
    let fields = parse_dict(dict)?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (key, value) in fields {
        let slot = match key.as_str() {
            "descr" => &mut descr,
            "fortran_order" => &mut fortran,
            "shape" => &mut shape,
            other => return Err(NpyError::BadHeader(format!("unexpected key {other:?}"))),
        };
        if slot.replace(value).is_some() {
            return Err(NpyError::BadHeader(format!("key {key:?} given twice")));
        }
    }
    let descr = match descr {
        Some(Value::Str(s)) => s,
        Some(Value::Seq(_)) => {
            return Err(NpyError::DType(
                "a structured dtype (a list of fields)".into(),
            ))
        }
        Some(_) => return Err(NpyError::BadHeader("descr is not a string".into())),
        None => return Err(NpyError::BadHeader("no \"descr\"".into())),
    };
    let dtype = dtype_of_descr(&descr)?;
    match fortran {
        Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(NpyError::Fortran),
        Some(_) => return Err(NpyError::BadHeader("fortran_order is not a boolean".into())),
        None => return Err(NpyError::BadHeader("no \"fortran_order\"".into())),
    }
    let shape = match shape {
        Some(Value::Seq(dims)) => dims
            .into_iter()
            .map(|d| match d {
                Value::Int(n) => Ok(n),
                _ => Err(NpyError::BadHeader("shape holds a non-integer".into())),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(NpyError::BadHeader("shape is not a tuple".into())),
        None => return Err(NpyError::BadHeader("no \"shape\"".into())),
    };
    Ok(NpyHeader {
        dtype,
        shape,
        data_start: end,
    })
}

/// A value of the header's Python literal.
#[derive(Debug, PartialEq)]
enum Value {
    Str(String),
    Bool(bool),
    Int(usize),
    Seq(Vec<Value>),
}

/// Parses the header's Python dict literal (`{'key': value, ...}` with strings, booleans,
/// non-negative integers and tuples or lists of them), then only whitespace.
fn parse_dict(text: &str) -> Result<Vec<(String, Value)>, NpyError> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        depth: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let mut out = Vec::new();
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = match p.value()? {
            Value::Str(k) => k,
            _ => return Err(NpyError::BadHeader("a key is not a string".into())),
        };
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value = p.value()?;
        out.push((key, value));
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(NpyError::BadHeader(
            "text after the header dictionary".into(),
        ));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), NpyError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(NpyError::BadHeader(format!(
                "expected {:?} at byte {}",
                char::from(c),
                self.i
            )))
        }
    }

    fn value(&mut self) -> Result<Value, NpyError> {
        match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while let Some(&c) = self.s.get(self.i) {
                    if c == q {
                        let v = std::str::from_utf8(&self.s[start..self.i])
                            .map_err(|_| NpyError::BadHeader("not UTF-8".into()))?;
                        self.i += 1;
                        return Ok(Value::Str(v.to_owned()));
                    }
                    if c == b'\\' {
                        return Err(NpyError::BadHeader("escapes in a string".into()));
                    }
                    self.i += 1;
                }
                Err(NpyError::BadHeader("unterminated string".into()))
            }
            Some(&open @ (b'(' | b'[')) => {
                let close = if open == b'(' { b')' } else { b']' };
                self.depth += 1;
                if self.depth > 8 {
                    return Err(NpyError::BadHeader("nested too deeply".into()));
                }
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.eat(close) {
                        break;
                    }
                    items.push(self.value()?);
                    self.ws();
                    if !self.eat(b',') {
                        self.ws();
                        self.expect(close)?;
                        break;
                    }
                }
                self.depth -= 1;
                Ok(Value::Seq(items))
            }
            Some(b'0'..=b'9') => {
                let start = self.i;
                while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
                    self.i += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.i])
                    .map_err(|_| NpyError::BadHeader("bad integer".into()))?;
                let n = digits
                    .parse::<usize>()
                    .map_err(|_| NpyError::BadHeader(format!("integer {digits} is too large")))?;
                // Python 2's long suffix, which old NumPy wrote.
                self.eat(b'L');
                Ok(Value::Int(n))
            }
            _ => {
                let rest = &self.s[self.i..];
                for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
                    if rest.starts_with(word) {
                        self.i += word.len();
                        return Ok(Value::Bool(v));
                    }
                }
                Err(NpyError::BadHeader(format!(
                    "unexpected text at byte {}",
                    self.i
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with_dict(dict: &str) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&[1, 0]);
        f.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        f.extend_from_slice(dict.as_bytes());
        f
    }

    #[test]
    fn numpy_header_layout() {
        let h = header_bytes(DType::F32, &[3, 4], NonNumpy::Refuse).unwrap();
        assert_eq!(h.len() % 64, 0);
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"));
        assert!(text.ends_with(" \n"));
        for shape in [vec![], vec![3], vec![2, 3], vec![1000, 1000, 7]] {
            let h = header_bytes(DType::F32, &shape, NonNumpy::Refuse).unwrap();
            assert_eq!(h.len() % 64, 0);
            assert_eq!(h.last(), Some(&b'\n'));
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize + 10, h.len());
        }
    }

    #[test]
    fn non_numpy_dtypes_follow_the_policy() {
        for dt in [DType::BF16, DType::F8E4M3, DType::F8E5M2] {
            let err = header_bytes(dt, &[1], NonNumpy::Refuse).unwrap_err();
            assert_eq!(err, NpyError::Unwritable(dt.name()));
            assert!(err.to_string().contains("NumPy has no such dtype"), "{err}");
        }
        let h = header_bytes(DType::BF16, &[2], NonNumpy::RawBits).unwrap();
        assert!(String::from_utf8_lossy(&h).contains("'<u2'"));
        assert_eq!(
            h,
            header_bytes(DType::U16, &[2], NonNumpy::Refuse).unwrap(),
            "bfloat16's raw bits are uint16's header"
        );
        let h = header_bytes(DType::F8E5M2, &[2], NonNumpy::RawBits).unwrap();
        assert!(String::from_utf8_lossy(&h).contains("'|u1'"));
    }

    /// The bytes coral-s3 has always written for a weight's `weight.npy` header.
    #[test]
    fn raw_bits_headers_are_the_stored_ones() {
        let h = header_bytes(DType::BF16, &[2, 3], NonNumpy::RawBits).unwrap();
        let mut want =
            b"\x93NUMPY\x01\x00\x76\x00{'descr': '<u2', 'fortran_order': False, 'shape': (2, 3), }"
                .to_vec();
        want.resize(127, b' ');
        want.push(b'\n');
        assert_eq!(h, want);
        let h = header_bytes(DType::F32, &[], NonNumpy::RawBits).unwrap();
        assert!(h.starts_with(
            b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, 'shape': (), }"
        ));
    }

    #[test]
    fn long_headers_use_version_2() {
        let shape = vec![1usize; 30_000];
        let h = header_bytes(DType::U8, &shape, NonNumpy::Refuse).unwrap();
        assert_eq!(&h[6..8], &[2, 0]);
        assert_eq!(h.len() % 64, 0);
        let mut f = h.clone();
        f.push(9);
        let p = parse(&f).unwrap();
        assert_eq!(p.shape, shape);
        assert_eq!(p.data_start, h.len());
    }

    #[test]
    fn refuses_bad_files() {
        assert_eq!(parse(b"PK\x03\x04"), Err(NpyError::BadMagic));
        assert_eq!(parse(b"\x93NUMPY\x01"), Err(NpyError::Truncated));
        assert_eq!(parse(b"\x93NU"), Err(NpyError::Truncated));
        let mut f = header_bytes(DType::F32, &[2], NonNumpy::Refuse).unwrap();
        f.extend([0u8; 7]);
        assert!(matches!(parse(&f), Err(NpyError::Size { .. })));
        let bad =
            b"\x93NUMPY\x01\x00\x30\x00{'descr': '>f4', 'fortran_order': False, 'shape': (), }\n";
        assert!(parse(bad).is_err());
        let cases = [
            ("{'descr': '>f4', 'fortran_order': False, 'shape': (), }", "big-endian"),
            ("{'descr': '<c8', 'fortran_order': False, 'shape': (), }", "unsupported .npy dtype"),
            ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (), }", "structured"),
            ("{'descr': '<f4', 'fortran_order': True, 'shape': (), }", "Fortran"),
            ("{'descr': '<f4', 'fortran_order': 0, 'shape': (), }", "boolean"),
            ("{'descr': '<f4', 'shape': (), }", "fortran_order"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,), }", "expected ')'"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", "unexpected text"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }", "too large"),
            ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (), }", "twice"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (), 'x': 1}", "unexpected key"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': ()} junk", "after the header"),
            ("{'descr': '<f4, 'fortran_order': False, 'shape': ()}", "expected"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': ((((((((((1,),),),),),),),),),)}", "deeply"),
        ];
        for (dict, want) in cases {
            let err = parse(&with_dict(dict)).unwrap_err().to_string();
            assert!(err.contains(want), "{dict}: {want:?} not in {err:?}");
            assert!(!err.contains('\n'));
        }
        assert_eq!(
            parse(&with_dict(
                "{'descr': '>f4', 'fortran_order': False, 'shape': (), }"
            ))
            .unwrap_err()
            .to_string(),
            "big-endian .npy dtype \">f4\" is not supported (convert it with arr.astype('<f4'))"
        );
    }

    #[test]
    fn reads_what_old_numpy_wrote() {
        // Python 2 longs, double quotes, a list shape, '>' on a byte type, no trailing comma.
        let f = with_dict("{\"descr\": \">u1\", \"fortran_order\": False, \"shape\": [2L, 1L]}\n");
        let mut file = f.clone();
        file.extend([1, 2]);
        let h = parse(&file).unwrap();
        assert_eq!(
            (h.dtype, h.shape, h.data_start),
            (DType::U8, vec![2, 1], f.len())
        );
    }

    proptest! {
        #[test]
        fn round_trip(shape in proptest::collection::vec(0usize..4, 0..4), i in 0usize..15, raw in any::<bool>()) {
            let dtype = DType::ALL[i];
            let policy = if raw { NonNumpy::RawBits } else { NonNumpy::Refuse };
            match header_bytes(dtype, &shape, policy) {
                Ok(mut f) => {
                    prop_assert_eq!(f.len() % 64, 0);
                    let n: usize = shape.iter().product::<usize>() * dtype.size();
                    f.extend(std::iter::repeat_n(1u8, n));
                    let h = parse(&f).unwrap();
                    let read_as = match dtype {
                        DType::BF16 => DType::U16,
                        DType::F8E4M3 | DType::F8E5M2 => DType::U8,
                        d => d,
                    };
                    prop_assert_eq!(h.dtype, read_as);
                    prop_assert_eq!(h.shape, shape);
                    prop_assert_eq!(f.len() - h.data_start, n);
                }
                Err(e) => {
                    prop_assert!(!raw);
                    prop_assert_eq!(e, NpyError::Unwritable(dtype.name()));
                }
            }
        }

        #[test]
        fn big_shapes_round_trip(shape in proptest::collection::vec(0usize..=usize::MAX, 0..6)) {
            let f = header_bytes(DType::F64, &shape, NonNumpy::Refuse).unwrap();
            let h = parse_header(&f).unwrap();
            prop_assert_eq!(h.shape, shape);
            prop_assert_eq!(h.data_start, f.len());
        }

        #[test]
        fn mutated_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), cut in any::<prop::sample::Index>()) {
            let mut f = header_bytes(DType::F32, &[2, 3], NonNumpy::Refuse).unwrap();
            f.extend([0u8; 24]);
            for (i, b) in flips { let i = i.index(f.len()); f[i] = b; }
            f.truncate(cut.index(f.len() + 1));
            let _ = parse(&f);
        }
    }
}

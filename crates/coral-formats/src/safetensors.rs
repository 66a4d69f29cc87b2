//! Safetensors headers: a strict parser that keeps what byte-for-byte export needs, and a writer.
//!
//! The format: an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON (an object
//! mapping tensor names to `{"dtype", "shape", "data_offsets"}`, plus an optional
//! `"__metadata__"` object of strings; writers may pad it with trailing spaces), then the data
//! section. Offsets are relative to the data section.
//!
//! Hostile input is refused with one clear error: a header length beyond the file, a header that
//! is not a JSON object, duplicate names, unknown dtypes, offsets outside the data, overlapping
//! or leaving gaps, a shape whose element count times the dtype size is not the byte length.
//!
//! Two readers look at every header. Coral's own pass comes first, because it is the one that can
//! say what is wrong in one line naming the tensor, and because it refuses what the reference
//! reader lets through: a name given twice (`serde_json` keeps the last one silently, so the file
//! would hold bytes no tensor owns), unknown fields in an entry, a header not starting with `{`.
//! Then the `safetensors` crate, the reference implementation, parses the same header
//! ([`::safetensors::SafeTensors::read_metadata`] on a whole file, with its offsets validation
//! and its check that the tensors cover the buffer exactly) and must accept it and read the same
//! tensors: a file Coral stores is one the ecosystem reads.

use std::fmt;

use coral_core::DType;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Largest header accepted (the `safetensors` crate's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Why a file is not a valid safetensors file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafetensorsError {
    /// Fewer than 8 bytes.
    #[error("file is {0} bytes, too short for a safetensors header length")]
    TooShort(u64),
    /// The header length points beyond the file.
    #[error("header length {header_len} runs beyond the file ({file_len} bytes): not a safetensors file, or truncated")]
    HeaderBeyondFile {
        /// Declared header length.
        header_len: u64,
        /// File length.
        file_len: u64,
    },
    /// The header length exceeds [`MAX_HEADER_LEN`].
    #[error("header length {0} exceeds the {MAX_HEADER_LEN}-byte limit")]
    HeaderTooLarge(u64),
    /// The header is not UTF-8.
    #[error("header is not UTF-8")]
    NotUtf8,
    /// The header is not the JSON the format calls for.
    #[error("header is not valid safetensors JSON: {0}")]
    BadJson(String),
    /// A tensor's dtype is not one safetensors defines.
    #[error("tensor {name:?}: unknown dtype {dtype:?}")]
    UnknownDType {
        /// Tensor name.
        name: String,
        /// The dtype given.
        dtype: String,
    },
    /// Shape times dtype size overflows or disagrees with the offsets.
    #[error("tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes but its offsets span {actual}")]
    SizeMismatch {
        /// Tensor name.
        name: String,
        /// Shape.
        shape: Vec<usize>,
        /// Dtype name.
        dtype: &'static str,
        /// Bytes that shape and dtype call for (`u64::MAX` on overflow).
        expected: u64,
        /// Bytes the offsets span.
        actual: u64,
    },
    /// Offsets that are reversed.
    #[error("tensor {name:?}: data_offsets [{begin}, {end}] are reversed")]
    ReversedOffsets {
        /// Tensor name.
        name: String,
        /// Begin.
        begin: u64,
        /// End.
        end: u64,
    },
    /// Offsets that do not tile the data section.
    #[error("tensor {name:?}: data_offsets [{begin}, {end}] {problem} (data section is {data_len} bytes)")]
    BadLayout {
        /// Tensor name.
        name: String,
        /// Begin.
        begin: u64,
        /// End.
        end: u64,
        /// "overlap the previous tensor", "leave a gap", "run past the end".
        problem: &'static str,
        /// Size of the data section.
        data_len: u64,
    },
    /// Data after the last tensor.
    #[error("{0} bytes of data after the last tensor belong to no tensor")]
    TrailingData(u64),
    /// The reference reader (the `safetensors` crate) refuses the file or reads it differently.
    #[error("the safetensors reference reader {0}")]
    Reference(String),
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// `[begin, end)` within the data section.
    pub begin: u64,
    /// End offset (exclusive).
    pub end: u64,
}

impl TensorEntry {
    /// Bytes of data.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.begin)
    }

    /// True for a tensor with no data.
    pub fn is_empty(&self) -> bool {
        self.begin == self.end
    }
}

/// A parsed, validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header bytes exactly as in the file (JSON plus any padding).
    pub text: String,
    /// Tensors sorted by data offset (ties, which only zero-length tensors can have, by name).
    pub tensors: Vec<TensorEntry>,
    /// Where the data section starts in the file (`8 + N`).
    pub data_start: u64,
    /// Size of the data section.
    pub data_len: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The header object as an ordered list, refusing duplicate keys.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut out: Vec<(String, serde_json::Value)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate name {k:?}")));
                    }
                    out.push((k, v));
                }
                Ok(RawHeader(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn dtype_from_safetensors(name: &str) -> Option<DType> {
    DType::ALL
        .into_iter()
        .find(|d| d.safetensors_name() == name)
}

/// Reads the header length from the first 8 bytes and checks it against the file length.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, SafetensorsError> {
    let Some(first) = prefix.get(..8) else {
        return Err(SafetensorsError::TooShort(file_len));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(first);
    let n = u64::from_le_bytes(b);
    if n > file_len.saturating_sub(8) {
        return Err(SafetensorsError::HeaderBeyondFile {
            header_len: n,
            file_len,
        });
    }
    if n > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge(n));
    }
    Ok(n)
}

/// Parses and validates a whole file held in memory (or memory-mapped).
pub fn parse(file: &[u8]) -> Result<Header, SafetensorsError> {
    let file_len = file.len() as u64;
    let n = header_len(file, file_len)?;
    // n <= file_len - 8, so this range is inside the file.
    let end = 8 + n as usize;
    let header_bytes = file.get(8..end).ok_or(SafetensorsError::HeaderBeyondFile {
        header_len: n,
        file_len,
    })?;
    let header = strict(header_bytes, file_len - 8 - n)?;
    let (_, reference) = ::safetensors::SafeTensors::read_metadata(file)
        .map_err(|e| SafetensorsError::Reference(format!("refuses the file: {}", describe(&e))))?;
    agree(&reference, &header.tensors)?;
    Ok(header)
}

/// The reference reader's error in words (its `Display` is its `Debug`).
fn describe(e: &::safetensors::SafeTensorError) -> String {
    use ::safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeader => "header is not UTF-8".to_owned(),
        E::InvalidHeaderStart => "header does not start with '{'".to_owned(),
        E::InvalidHeaderDeserialization => "header is not the JSON it expects".to_owned(),
        E::HeaderTooLarge => "header is too large".to_owned(),
        E::HeaderTooSmall => "file is too short".to_owned(),
        E::InvalidHeaderLength => "header length runs beyond the file".to_owned(),
        E::InvalidOffset(name) => format!("offsets of tensor {name:?} are invalid"),
        E::TensorInvalidInfo => "a tensor's shape and dtype disagree with its offsets".to_owned(),
        E::MetadataIncompleteBuffer => "tensors do not cover the data section".to_owned(),
        E::ValidationOverflow => "a tensor's size overflows".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Checks that the reference reader's tensors are exactly `tensors`.
fn agree(
    reference: &::safetensors::tensor::Metadata,
    tensors: &[TensorEntry],
) -> Result<(), SafetensorsError> {
    let theirs = reference.tensors();
    let differ = |what: String| SafetensorsError::Reference(format!("reads {what} differently"));
    if theirs.len() != tensors.len() {
        return Err(differ(format!(
            "the tensor count ({} against {})",
            theirs.len(),
            tensors.len()
        )));
    }
    for t in tensors {
        let Some(info) = theirs.get(&t.name) else {
            return Err(differ(format!("the names (no {:?})", t.name)));
        };
        let dtype = format!("{:?}", info.dtype);
        let (b, e) = info.data_offsets;
        if dtype != t.dtype.safetensors_name()
            || info.shape != t.shape
            || b as u64 != t.begin
            || e as u64 != t.end
        {
            return Err(differ(format!("tensor {:?}", t.name)));
        }
    }
    Ok(())
}

/// Parses and validates header bytes, given the size of the data section that follows them.
///
/// Without the data at hand the reference reader only parses the header (its offsets check needs
/// the whole file): Coral's own pass checks the layout against `data_len`.
pub fn parse_header(header_bytes: &[u8], data_len: u64) -> Result<Header, SafetensorsError> {
    let header = strict(header_bytes, data_len)?;
    let reference: ::safetensors::tensor::Metadata = serde_json::from_str(&header.text)
        .map_err(|e| SafetensorsError::Reference(format!("refuses the header: {e}")))?;
    agree(&reference, &header.tensors)?;
    Ok(header)
}

/// Coral's own pass over the header: every check, each refusal in one line naming the problem.
fn strict(header_bytes: &[u8], data_len: u64) -> Result<Header, SafetensorsError> {
    let text = std::str::from_utf8(header_bytes).map_err(|_| SafetensorsError::NotUtf8)?;
    if !text.starts_with('{') {
        return Err(SafetensorsError::BadJson(
            "the header does not start with '{'".to_owned(),
        ));
    }
    let raw: RawHeader =
        serde_json::from_str(text).map_err(|e| SafetensorsError::BadJson(e.to_string()))?;
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if name == "__metadata__" {
            let _: std::collections::BTreeMap<String, String> = serde_json::from_value(value)
                .map_err(|e| SafetensorsError::BadJson(format!("__metadata__: {e}")))?;
            continue;
        }
        let entry: RawEntry = serde_json::from_value(value)
            .map_err(|e| SafetensorsError::BadJson(format!("tensor {name:?}: {e}")))?;
        let dtype =
            dtype_from_safetensors(&entry.dtype).ok_or_else(|| SafetensorsError::UnknownDType {
                name: name.clone(),
                dtype: entry.dtype.clone(),
            })?;
        let [begin, end] = entry.data_offsets;
        if end < begin {
            return Err(SafetensorsError::ReversedOffsets { name, begin, end });
        }
        let expected = entry
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if expected != end - begin {
            return Err(SafetensorsError::SizeMismatch {
                name,
                shape: entry.shape,
                dtype: dtype.safetensors_name(),
                expected,
                actual: end - begin,
            });
        }
        tensors.push(TensorEntry {
            name,
            dtype,
            shape: entry.shape,
            begin,
            end,
        });
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut pos = 0u64;
    for t in &tensors {
        let problem = if t.end > data_len {
            Some("run past the end of the data")
        } else if t.begin < pos {
            Some("overlap the previous tensor")
        } else if t.begin > pos {
            Some("leave a gap after the previous tensor")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(SafetensorsError::BadLayout {
                name: t.name.clone(),
                begin: t.begin,
                end: t.end,
                problem,
                data_len,
            });
        }
        pos = t.end;
    }
    if pos != data_len {
        return Err(SafetensorsError::TrailingData(data_len - pos));
    }
    Ok(Header {
        text: text.to_owned(),
        tensors,
        data_start: 8 + header_bytes.len() as u64,
        data_len,
    })
}

/// Builds a safetensors file's header bytes for tensors laid out in the given order (used for
/// models that came from another format, and in tests). Returns the 8-byte prefix plus header.
pub fn build_header(
    tensors: &[(String, DType, Vec<usize>)],
) -> Result<(Vec<u8>, Vec<[u64; 2]>), SafetensorsError> {
    let mut map = serde_json::Map::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut pos = 0u64;
    for (name, dtype, shape) in tensors {
        let overflow = || SafetensorsError::SizeMismatch {
            name: name.clone(),
            shape: shape.clone(),
            dtype: dtype.safetensors_name(),
            expected: u64::MAX,
            actual: 0,
        };
        let len = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(overflow)?;
        let end = pos.checked_add(len).ok_or_else(overflow)?;
        if map.contains_key(name) {
            return Err(SafetensorsError::BadJson(format!(
                "duplicate name {name:?}"
            )));
        }
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.safetensors_name(),
                "shape": shape,
                "data_offsets": [pos, end],
            }),
        );
        offsets.push([pos, end]);
        pos = end;
    }
    let mut text = serde_json::Value::Object(map).to_string().into_bytes();
    // Pad to a multiple of 8 as the reference writer does.
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    Ok((out, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn sample() -> Vec<u8> {
        let (mut f, _) = build_header(&[
            ("b".into(), DType::F32, vec![2, 2]),
            ("a".into(), DType::I8, vec![3]),
            ("e".into(), DType::F16, vec![0]),
        ])
        .unwrap();
        f.extend((0..19u8).collect::<Vec<_>>());
        f
    }

    #[test]
    fn parses_a_valid_file() {
        let f = sample();
        let h = parse(&f).unwrap();
        assert_eq!(h.data_len, 19);
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "e"]);
        assert_eq!(h.tensors[1].begin, 16);
        assert_eq!(h.text.len() % 8, 0);
        assert_eq!(h.data_start as usize + 19, f.len());
    }

    #[test]
    fn keeps_metadata_and_padding() {
        let hdr = r#"{"__metadata__":{"format":"pt"},"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}   "#;
        let h = parse(&file(hdr, &[1, 2])).unwrap();
        assert_eq!(h.text, hdr);
        assert_eq!(h.tensors.len(), 1);
    }

    #[test]
    fn refuses_hostile_headers() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "too short"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(), "beyond the file"),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    &[0; 4],
                ),
                "run past the end",
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
                    &[0; 6],
                ),
                "overlap",
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "gap",
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 8],
                ),
                "after the last tensor",
            ),
            (
                file(
                    r#"{"x":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "unknown dtype",
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "needs 12 bytes",
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                    &[0; 4],
                ),
                "reversed",
            ),
            (
                file(
                    r#"{"x":{"dtype":"F32","shape":[4611686018427387904, 8],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "needs 18446744073709551615",
            ),
            (
                file(
                    r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                    &[0; 2],
                ),
                "duplicate",
            ),
            (file(r#"[1,2]"#, &[]), "does not start"),
            (file("{\"x\":1}", &[]), "tensor \"x\""),
            (file(r#"{"__metadata__":{"a":1}}"#, &[]), "__metadata__"),
            (file("{\"x\"", &[]), "not valid"),
        ];
        for (bytes, want) in cases {
            let err = parse(&bytes).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
            assert!(!err.contains('\n'), "{err}");
        }
        let mut nonutf8 = file("{\"\u{e9}\":1}", &[]);
        nonutf8[10] = 0xff;
        assert_eq!(parse(&nonutf8), Err(SafetensorsError::NotUtf8));
    }

    #[test]
    fn agrees_with_the_safetensors_crate() {
        let f = sample();
        let st = safetensors::SafeTensors::deserialize(&f).unwrap();
        let h = parse(&f).unwrap();
        for t in &h.tensors {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.shape(), &t.shape[..]);
            let s = (h.data_start + t.begin) as usize;
            assert_eq!(v.data(), &f[s..s + t.len() as usize]);
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_headers_never_panic(header in ".{0,200}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&file(&header, &data));
        }

        #[test]
        fn mutated_files_never_panic_and_accepted_ones_are_consistent(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut f = sample();
            for (i, b) in flips {
                let i = i.index(f.len());
                f[i] = b;
            }
            if truncate {
                f.truncate(cut.index(f.len()));
            }
            if let Ok(h) = parse(&f) {
                let mut pos = 0;
                for t in &h.tensors {
                    prop_assert_eq!(t.begin, pos);
                    pos = t.end;
                }
                prop_assert_eq!(pos, h.data_len);
                prop_assert_eq!(h.data_start + h.data_len, f.len() as u64);
            }
        }

        #[test]
        fn built_headers_round_trip(shapes in proptest::collection::vec(proptest::collection::vec(0usize..5, 0..3), 0..6)) {
            let tensors: Vec<_> = shapes.into_iter().enumerate()
                .map(|(i, s)| (format!("t{i}"), DType::ALL[i % DType::ALL.len()], s)).collect();
            let (mut f, offsets) = build_header(&tensors).unwrap();
            let total = offsets.last().map_or(0, |o| o[1]);
            f.extend(std::iter::repeat_n(7u8, total as usize));
            let h = parse(&f).unwrap();
            prop_assert_eq!(h.tensors.len(), tensors.len());
            prop_assert_eq!(h.data_len, total);
        }
    }
}

//! Coral's lossless float codec: one chunk of bf16, f16 or f32 weights in, one frame out, and
//! back bit for bit (NaN payloads, signed zeros, subnormals and all).
//!
//! Each value is split into its fields, and each field gets the model that suits it:
//! - the **exponent**, rANS-coded with a table chosen by a mean of the exponents before it in
//!   its row (moved once per group of eight values) and in its column (a tensor's rows and
//!   columns differ in scale);
//! - the **sign**, coded with a running estimate per column (a matrix's columns lean to one
//!   sign), or kept as a bitmap when that would not pay, or left out when every sign is 0;
//! - the **top seven mantissa bits**, coded with a table per exponent bucket (within a binade
//!   the weights' density is not flat), either a full table or, where it costs less, a binned
//!   one that gives a frequency to each eighth of the binade (the density changes smoothly,
//!   and eight frequencies cost a tenth of 128);
//! - for f32 and f16 the **low mantissa bits**, per block of 128 values: a block whose low
//!   bits are all zero (weights kept at lower precision) says so once and codes none of them;
//!   the rest are coded bytewise, or kept raw when coding would not pay.
//!
//! The eight values of a group are coded on eight interleaved rANS states (lanes), each value's
//! fields on its own, so a decoder can work on the eight side by side (frame version 4). Where
//! the CPU has AVX2, both directions do for bf16 and f32: one 32-bit lane per value, the same
//! frames as the value-by-value steps (which the tests check them against).
//!
//! Columns need the row length, which [`encode_rows`] takes (a tensor's dimensions after the
//! first); [`encode`] knows none and codes rows of one value.
//!
//! The frame is described in `docs/format.md` ("The Coral float codec") precisely enough to
//! decode it without this crate; HDF5 reads it as filter [`FILTER_ID`] (the `coral-h5plugin`
//! crate is the plugin h5py loads).
//!
//! ```
//! use coral_float_codec::{decode, encode_rows, Kind};
//! // 64 rows of 64 values.
//! let values: Vec<u8> = (0..4096u32)
//!     .flat_map(|i| ((i as f32 * 0.37).sin() * 0.05).to_le_bytes())
//!     .collect();
//! let mut frame = Vec::new();
//! encode_rows(Kind::F32, &values, 64, &mut frame).unwrap();
//! assert!(frame.len() < values.len());
//! let mut back = Vec::new();
//! decode(&frame, &mut back).unwrap();
//! assert_eq!(back, values);
//! ```

mod avx2;
mod bits;
mod float;
mod rans;

/// The HDF5 filter id of this codec. HDF5 keeps ids 256-511 for filters that are not
/// registered with The HDF Group; no registered filter can take this one.
pub const FILTER_ID: u16 = 307;

/// The filter's name as HDF5 reports it.
pub const FILTER_NAME: &str = "coral-float";

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"CF";
/// The frame format version [`encode`] writes. [`decode`] reads this one and versions 1 to 3.
pub const VERSION: u8 = 4;
/// Bytes of the frame header.
pub const HEADER_BYTES: usize = 24;

/// What the bytes are: the codec models floats, and keeps anything else as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Opaque bytes: stored.
    Bytes,
    /// bfloat16, little-endian.
    Bf16,
    /// IEEE half, little-endian.
    F16,
    /// IEEE single, little-endian.
    F32,
}

impl Kind {
    /// The code in the frame header and in the HDF5 filter's `cd_values[1]`.
    pub const fn code(self) -> u8 {
        match self {
            Kind::Bytes => 0,
            Kind::Bf16 => 1,
            Kind::F16 => 2,
            Kind::F32 => 3,
        }
    }

    /// The kind of a header code.
    pub const fn from_code(c: u8) -> Option<Kind> {
        match c {
            0 => Some(Kind::Bytes),
            1 => Some(Kind::Bf16),
            2 => Some(Kind::F16),
            3 => Some(Kind::F32),
            _ => None,
        }
    }

    /// Bytes per value.
    pub const fn size(self) -> usize {
        match self {
            Kind::Bytes => 1,
            Kind::Bf16 | Kind::F16 => 2,
            Kind::F32 => 4,
        }
    }
}

/// A frame that cannot be decoded, or an input that cannot be coded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The frame is damaged or not one of ours.
    #[error("corrupt coral-float frame: {0}")]
    Corrupt(String),
    /// The frame's size does not match what the caller expects.
    #[error("coral-float frame decodes to {got} bytes, expected {expected}")]
    Size { got: u64, expected: u64 },
    /// Memory for the output could not be had.
    #[error("cannot allocate {0} bytes")]
    Alloc(u64),
}

impl CodecError {
    pub(crate) fn corrupt(s: impl Into<String>) -> Self {
        CodecError::Corrupt(s.into())
    }
}

/// The largest size [`decode`] allocates for: HDF5's largest chunk (4 GiB).
pub const MAX_DECODED: u64 = 1 << 32;

/// Frame modes.
const MODE_STORED: u8 = 0;
const MODE_FLOAT: u8 = 1;

/// Codes `data` as values of `kind` into `out` (cleared first), with no row structure known
/// ([`encode_rows`] with rows of one value).
pub fn encode(kind: Kind, data: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode_rows(kind, data, 1, out)
}

/// Codes `data`, rows of `row_values` values of `kind` each (a tensor's trailing dimensions:
/// the codec models columns as well as rows), into `out` (cleared first). Input too small or
/// too random to gain is stored, so a frame is never more than [`HEADER_BYTES`] larger than its
/// input. Rows of 0 or of more than 2^20 values are coded as rows of one.
pub fn encode_rows(
    kind: Kind,
    data: &[u8],
    row_values: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    out.clear();
    let values = data.len() / kind.size();
    // The float body's lengths are u32: inputs above 4 GiB (no HDF5 chunk is) are stored.
    if kind != Kind::Bytes && values >= float::MIN_VALUES && data.len() <= u32::MAX as usize {
        header(out, MODE_FLOAT, kind, data);
        let cols = if (1..=float::MAX_COLS).contains(&row_values) {
            row_values.min(values)
        } else {
            1
        };
        float::encode(kind, data, cols, out);
        if out.len() < HEADER_BYTES + data.len() {
            return Ok(());
        }
        out.clear();
    }
    out.try_reserve(HEADER_BYTES + data.len())
        .map_err(|_| CodecError::Alloc((HEADER_BYTES + data.len()) as u64))?;
    header(out, MODE_STORED, kind, data);
    out.extend_from_slice(data);
    Ok(())
}

fn header(out: &mut Vec<u8>, mode: u8, kind: Kind, data: &[u8]) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(mode);
    out.push(kind.code());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(data).to_le_bytes());
}

/// The frame's check of its decoded bytes: XXH3-64 with seed 0.
fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// The decoded size a frame declares (checked against the frame's header only).
pub fn decoded_len(frame: &[u8]) -> Result<u64, CodecError> {
    Ok(parse_header(frame)?.3)
}

/// A frame header's version, mode, kind, decoded size and checksum.
fn parse_header(frame: &[u8]) -> Result<(u8, u8, Kind, u64, u64), CodecError> {
    let h = frame.get(..HEADER_BYTES).ok_or_else(|| {
        CodecError::corrupt(format!("{} bytes, shorter than a header", frame.len()))
    })?;
    if h[..2] != MAGIC {
        return Err(CodecError::corrupt("bad magic"));
    }
    if !(1..=VERSION).contains(&h[2]) {
        return Err(CodecError::corrupt(format!("unknown version {}", h[2])));
    }
    let kind = Kind::from_code(h[4])
        .ok_or_else(|| CodecError::corrupt(format!("unknown kind {}", h[4])))?;
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(w)
    };
    Ok((h[2], h[3], kind, word(8), word(16)))
}

/// Decodes a frame into `out` (cleared first).
pub fn decode(frame: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    let n = decoded_len(frame)?;
    if n > MAX_DECODED {
        // A constant chunk codes to a few dozen bytes whatever its size, so the size cannot be
        // bounded by the frame's; it is bounded by HDF5's largest chunk instead. Callers that
        // know the size use [`decode_into`].
        return Err(CodecError::corrupt(format!(
            "declares {n} bytes, above {MAX_DECODED}"
        )));
    }
    let n = usize::try_from(n).map_err(|_| CodecError::Alloc(n))?;
    out.clear();
    out.try_reserve(n)
        .map_err(|_| CodecError::Alloc(n as u64))?;
    out.resize(n, 0);
    decode_into(frame, out)
}

/// Decodes a frame into `dst`, which must be exactly the frame's decoded size.
pub fn decode_into(frame: &[u8], dst: &mut [u8]) -> Result<(), CodecError> {
    let (version, mode, kind, n, check) = parse_header(frame)?;
    if n != dst.len() as u64 {
        return Err(CodecError::Size {
            got: n,
            expected: dst.len() as u64,
        });
    }
    let body = &frame[HEADER_BYTES..];
    match mode {
        MODE_STORED => {
            if body.len() != dst.len() {
                return Err(CodecError::corrupt(format!(
                    "stored frame holds {} bytes, declares {}",
                    body.len(),
                    dst.len()
                )));
            }
            dst.copy_from_slice(body);
        }
        MODE_FLOAT if kind != Kind::Bytes => float::decode(kind, version, body, dst)?,
        m => {
            return Err(CodecError::corrupt(format!(
                "unknown mode {m} for kind {kind:?}"
            )))
        }
    }
    if checksum(dst) != check {
        return Err(CodecError::corrupt(
            "the decoded bytes fail the frame's checksum",
        ));
    }
    Ok(())
}

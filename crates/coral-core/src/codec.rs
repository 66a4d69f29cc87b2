//! Codecs: none, gzip (zlib stream, levels 1-9), lz4 (frame format) and zstd, each optionally
//! after a byte-plane transform ("shuffle") for multi-byte dtypes.
//!
//! The shuffle is byte-for-byte HDF5's shuffle filter: for `n = len / size` elements, plane `j`
//! holds byte `j` of every element in order; the `len % size` trailing bytes are copied as they
//! are. So a chunk shuffled here and deflated is what HDF5 (and h5py) read with the shuffle and
//! deflate filters.
//!
//! ```
//! use coral_core::codec::{Codec, CodecSpec};
//! let spec = CodecSpec::new(Codec::Zstd { level: 3 }, true);
//! let data: Vec<u8> = (0..4000u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
//! let packed = spec.compress(&data, 4).unwrap();
//! assert!(packed.len() < data.len());
//! assert_eq!(spec.decompress(&packed, 4, data.len()).unwrap(), data);
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// A compression algorithm with its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "lowercase")]
pub enum Codec {
    /// Stored as is.
    None,
    /// Deflate in a zlib stream (RFC 1950), as HDF5's deflate filter and h5py's "gzip" write it.
    Gzip {
        /// 1 (fastest) to 9 (smallest).
        level: u32,
    },
    /// LZ4 frame format.
    Lz4,
    /// Zstandard frame.
    Zstd {
        /// zstd's level: 1 to 22, or negative for the fast levels (down to -7).
        level: i32,
    },
}

impl Codec {
    /// The codec's name: "none", "gzip", "lz4", "zstd".
    pub const fn name(&self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip { .. } => "gzip",
            Codec::Lz4 => "lz4",
            Codec::Zstd { .. } => "zstd",
        }
    }

    /// The level, for codecs that have one.
    pub const fn level(&self) -> Option<i32> {
        match self {
            Codec::Gzip { level } => Some(*level as i32),
            Codec::Zstd { level } => Some(*level),
            Codec::None | Codec::Lz4 => None,
        }
    }

    /// Builds a codec from a name and an optional level (the codec's default when `None`),
    /// refusing unknown names and levels out of range.
    pub fn from_name(name: &str, level: Option<i32>) -> Result<Codec> {
        let codec = match name.to_ascii_lowercase().as_str() {
            "none" | "" => Codec::None,
            "gzip" | "deflate" | "zlib" => Codec::Gzip {
                level: level.unwrap_or(4).try_into().unwrap_or(0),
            },
            "lz4" => Codec::Lz4,
            "zstd" | "zstandard" => Codec::Zstd {
                level: level.unwrap_or(3),
            },
            other => return Err(CoreError::InvalidCodec(format!("unknown codec {other:?}"))),
        };
        if level.is_some() && codec.level().is_none() {
            return Err(CoreError::InvalidCodec(format!(
                "{} takes no level",
                codec.name()
            )));
        }
        codec.validate()?;
        Ok(codec)
    }

    /// Checks the level.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Codec::Gzip { level } if !(1..=9).contains(&level) => Err(CoreError::InvalidCodec(
                format!("gzip level must be 1-9, got {level}"),
            )),
            Codec::Zstd { level } if !(-7..=22).contains(&level) || level == 0 => Err(
                CoreError::InvalidCodec(format!("zstd level must be 1-22 or -7..-1, got {level}")),
            ),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level() {
            Some(l) => write!(f, "{}-{l}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

impl FromStr for Codec {
    type Err = CoreError;
    /// Parses "none", "lz4", "gzip", "gzip-6", "zstd", "zstd-19", "zstd--3".
    fn from_str(s: &str) -> Result<Codec> {
        match s.split_once('-') {
            Some((name, level)) => {
                let level: i32 = level
                    .parse()
                    .map_err(|_| CoreError::InvalidCodec(format!("bad level in {s:?}")))?;
                Codec::from_name(name, Some(level))
            }
            None => Codec::from_name(s, None),
        }
    }
}

/// A codec plus whether the byte-plane shuffle runs before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CodecSpec {
    /// The compression algorithm.
    pub codec: Codec,
    /// Split elements into byte planes before compressing (no effect for 1-byte elements).
    pub shuffle: bool,
}

impl Default for CodecSpec {
    /// zstd level 3 with shuffle: the fastest good setting for float weights.
    fn default() -> Self {
        CodecSpec {
            codec: Codec::Zstd { level: 3 },
            shuffle: true,
        }
    }
}

impl CodecSpec {
    /// A codec spec.
    pub const fn new(codec: Codec, shuffle: bool) -> Self {
        CodecSpec { codec, shuffle }
    }

    /// Stored as is.
    pub const NONE: CodecSpec = CodecSpec::new(Codec::None, false);

    /// Compresses `data` whose elements are `element_size` bytes wide.
    pub fn compress(&self, data: &[u8], element_size: usize) -> Result<Vec<u8>> {
        self.codec.validate()?;
        if self.shuffle && element_size > 1 && self.codec != Codec::None {
            let shuffled = shuffle(data, element_size);
            compress_raw(self.codec, &shuffled)
        } else if self.shuffle && element_size > 1 {
            Ok(shuffle(data, element_size))
        } else {
            compress_raw(self.codec, data)
        }
    }

    /// Decompresses to exactly `expected_len` bytes; anything else (corrupt, truncated, too long)
    /// is an error, never a panic.
    pub fn decompress(
        &self,
        data: &[u8],
        element_size: usize,
        expected_len: usize,
    ) -> Result<Vec<u8>> {
        let raw = decompress_raw(self.codec, data, expected_len)?;
        if self.shuffle && element_size > 1 {
            Ok(unshuffle(&raw, element_size))
        } else {
            Ok(raw)
        }
    }
}

fn corrupt(codec: Codec, reason: impl fmt::Display) -> CoreError {
    CoreError::Corrupt {
        codec: codec.name().to_owned(),
        reason: reason.to_string(),
    }
}

/// Compresses with `codec` alone (no shuffle).
pub fn compress_raw(codec: Codec, data: &[u8]) -> Result<Vec<u8>> {
    codec.validate()?;
    match codec {
        Codec::None => Ok(data.to_vec()),
        Codec::Gzip { level } => {
            let mut enc = flate2::write::ZlibEncoder::new(
                Vec::with_capacity(data.len() / 2 + 64),
                flate2::Compression::new(level),
            );
            enc.write_all(data).map_err(|e| corrupt(codec, e))?;
            enc.finish().map_err(|e| corrupt(codec, e))
        }
        Codec::Lz4 => {
            let mut enc =
                lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(data.len() / 2 + 64));
            enc.write_all(data).map_err(|e| corrupt(codec, e))?;
            enc.finish().map_err(|e| corrupt(codec, e))
        }
        Codec::Zstd { level } => zstd::bulk::compress(data, level).map_err(|e| corrupt(codec, e)),
    }
}

/// Decompresses with `codec` alone to exactly `expected_len` bytes.
pub fn decompress_raw(codec: Codec, data: &[u8], expected_len: usize) -> Result<Vec<u8>> {
    let out = match codec {
        Codec::None => data.to_vec(),
        Codec::Gzip { .. } => {
            read_bounded(codec, flate2::read::ZlibDecoder::new(data), expected_len)?
        }
        Codec::Lz4 => read_bounded(
            codec,
            lz4_flex::frame::FrameDecoder::new(data),
            expected_len,
        )?,
        Codec::Zstd { .. } => {
            let mut out = alloc(codec, expected_len)?;
            let mut dec = zstd::bulk::Decompressor::new().map_err(|e| corrupt(codec, e))?;
            // The bulk API refuses a frame larger than the buffer's capacity: overlong input is
            // an error, not a reallocation.
            dec.decompress_to_buffer(data, &mut out)
                .map_err(|e| corrupt(codec, e))?;
            out
        }
    };
    if out.len() != expected_len {
        return Err(corrupt(
            codec,
            format!("decoded {} bytes, expected {expected_len}", out.len()),
        ));
    }
    Ok(out)
}

/// An empty buffer with room for `len` bytes; an allocation failure is an error, not an abort.
fn alloc(codec: Codec, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|e| corrupt(codec, format!("cannot allocate {len} bytes: {e}")))?;
    Ok(out)
}

fn read_bounded<R: Read>(codec: Codec, reader: R, expected_len: usize) -> Result<Vec<u8>> {
    let mut out = alloc(codec, expected_len)?;
    reader
        .take(expected_len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(codec, e))?;
    Ok(out)
}

/// HDF5's shuffle: byte planes, trailing bytes copied.
pub fn shuffle(data: &[u8], element_size: usize) -> Vec<u8> {
    if element_size <= 1 {
        return data.to_vec();
    }
    let n = data.len() / element_size;
    let mut out = vec![0u8; data.len()];
    for (j, plane) in out[..n * element_size]
        .chunks_exact_mut(n.max(1))
        .enumerate()
        .take(element_size)
    {
        if n == 0 {
            break;
        }
        for (i, b) in plane.iter_mut().enumerate() {
            *b = data[i * element_size + j];
        }
    }
    out[n * element_size..].copy_from_slice(&data[n * element_size..]);
    out
}

/// Inverse of [`shuffle`].
pub fn unshuffle(data: &[u8], element_size: usize) -> Vec<u8> {
    if element_size <= 1 {
        return data.to_vec();
    }
    let n = data.len() / element_size;
    let mut out = vec![0u8; data.len()];
    if n > 0 {
        for (j, plane) in data[..n * element_size].chunks_exact(n).enumerate() {
            for (i, &b) in plane.iter().enumerate() {
                out[i * element_size + j] = b;
            }
        }
    }
    out[n * element_size..].copy_from_slice(&data[n * element_size..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_hdf5s() {
        let data: Vec<u8> = (0u8..11).collect();
        assert_eq!(shuffle(&data, 4), vec![0, 4, 1, 5, 2, 6, 3, 7, 8, 9, 10]);
        assert_eq!(unshuffle(&shuffle(&data, 4), 4), data);
        assert_eq!(shuffle(&[1, 2, 3], 4), vec![1, 2, 3]);
    }

    #[test]
    fn levels_are_checked() {
        assert!(Codec::from_name("gzip", Some(0)).is_err());
        assert!(Codec::from_name("gzip", Some(10)).is_err());
        assert!(Codec::from_name("zstd", Some(23)).is_err());
        assert!(Codec::from_name("lz4", Some(1)).is_err());
        assert!(Codec::from_name("brotli", None).is_err());
        assert_eq!(
            "zstd-19".parse::<Codec>().unwrap(),
            Codec::Zstd { level: 19 }
        );
        assert_eq!(
            "zstd--3".parse::<Codec>().unwrap(),
            Codec::Zstd { level: -3 }
        );
        assert_eq!("gzip".parse::<Codec>().unwrap(), Codec::Gzip { level: 4 });
    }
}

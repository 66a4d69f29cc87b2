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
    /// Coral's float codec (`coral-float-codec`): one frame; floats modelled field by field,
    /// anything else stored. It takes no shuffle.
    Coral,
}

impl Codec {
    /// The codec's name: "none", "gzip", "lz4", "zstd".
    pub const fn name(&self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip { .. } => "gzip",
            Codec::Lz4 => "lz4",
            Codec::Zstd { .. } => "zstd",
            Codec::Coral => "coral",
        }
    }

    /// The level, for codecs that have one.
    pub const fn level(&self) -> Option<i32> {
        match self {
            Codec::Gzip { level } => Some(*level as i32),
            Codec::Zstd { level } => Some(*level),
            Codec::None | Codec::Lz4 | Codec::Coral => None,
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
            "coral" => Codec::Coral,
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
        if self.codec == Codec::Coral {
            // Without a dtype, the width decides: 4 bytes as f32, 2 as bf16 (lossless for any
            // bits; `compress_dtype` models f16 as f16).
            let kind = match element_size {
                4 => coral_float_codec::Kind::F32,
                2 => coral_float_codec::Kind::Bf16,
                _ => coral_float_codec::Kind::Bytes,
            };
            return coral_encode(kind, data, 1);
        }
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
        if self.shuffle && element_size > 1 && self.codec != Codec::Coral {
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

/// Codes `data` with Coral's float codec as values of `kind`, in rows of `row_values` (a
/// tensor's dimensions after the first; 1 when unknown).
pub fn coral_encode(
    kind: coral_float_codec::Kind,
    data: &[u8],
    row_values: usize,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    coral_float_codec::encode_rows(kind, data, row_values, &mut out)
        .map_err(|e| corrupt(Codec::Coral, e))?;
    Ok(out)
}

/// The float codec's kind for a dtype (opaque bytes for the dtypes it does not model).
pub fn coral_kind(dtype: crate::DType) -> coral_float_codec::Kind {
    match dtype {
        crate::DType::F32 => coral_float_codec::Kind::F32,
        crate::DType::BF16 => coral_float_codec::Kind::Bf16,
        crate::DType::F16 => coral_float_codec::Kind::F16,
        _ => coral_float_codec::Kind::Bytes,
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
            // The frame carries a checksum of the content, so corruption is found on decode.
            let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
            let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(
                info,
                Vec::with_capacity(data.len() / 2 + 64),
            );
            enc.write_all(data).map_err(|e| corrupt(codec, e))?;
            enc.finish().map_err(|e| corrupt(codec, e))
        }
        Codec::Zstd { level } => {
            // The frame carries its content size and a checksum (XXH64) of the content.
            let mut enc = zstd::bulk::Compressor::new(level).map_err(|e| corrupt(codec, e))?;
            enc.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .map_err(|e| corrupt(codec, e))?;
            enc.compress(data).map_err(|e| corrupt(codec, e))
        }
        Codec::Coral => coral_encode(coral_float_codec::Kind::Bytes, data, 1),
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
        Codec::Coral => {
            // A frame of another size is refused before anything is decoded.
            let mut out = alloc(codec, expected_len)?;
            out.resize(expected_len, 0);
            coral_float_codec::decode_into(data, &mut out).map_err(|e| corrupt(codec, e))?;
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
        .take((expected_len as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| corrupt(codec, e))?;
    Ok(out)
}

/// HDF5's shuffle: byte planes, trailing bytes copied.
///
/// Element sizes 2, 4 and 8 take a fast path (SSSE3 on x86-64 when the CPU has it, otherwise
/// 16-element blocks); see the `shuffle` rows of `docs/benchmarks.md`.
pub fn shuffle(data: &[u8], element_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    apply(data, element_size, &mut out, Direction::Shuffle);
    out
}

/// Inverse of [`shuffle`].
pub fn unshuffle(data: &[u8], element_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    apply(data, element_size, &mut out, Direction::Unshuffle);
    out
}

/// [`shuffle`] into a buffer of the same length as `data` (a shorter or longer one is refused
/// with [`CoreError::InvalidCodec`]).
pub fn shuffle_into(data: &[u8], element_size: usize, out: &mut [u8]) -> Result<()> {
    transform(data, element_size, out, Direction::Shuffle)
}

/// [`unshuffle`] into a buffer of the same length as `data`.
pub fn unshuffle_into(data: &[u8], element_size: usize, out: &mut [u8]) -> Result<()> {
    transform(data, element_size, out, Direction::Unshuffle)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Shuffle,
    Unshuffle,
}

fn transform(data: &[u8], es: usize, out: &mut [u8], dir: Direction) -> Result<()> {
    if out.len() != data.len() {
        return Err(CoreError::InvalidCodec(format!(
            "shuffle buffer of {} bytes for {} bytes of data",
            out.len(),
            data.len()
        )));
    }
    apply(data, es, out, dir);
    Ok(())
}

/// `out.len() == data.len()`.
fn apply(data: &[u8], es: usize, out: &mut [u8], dir: Direction) {
    if es <= 1 || data.len() < es {
        out.copy_from_slice(data);
        return;
    }
    let n = data.len() / es;
    let body = n * es;
    let (src, src_tail) = data.split_at(body);
    let (dst, dst_tail) = out.split_at_mut(body);
    dst_tail.copy_from_slice(src_tail);
    match (es, dir) {
        (2, Direction::Shuffle) => planes::shuffle::<2>(src, dst),
        (4, Direction::Shuffle) => planes::shuffle::<4>(src, dst),
        (8, Direction::Shuffle) => planes::shuffle::<8>(src, dst),
        (2, Direction::Unshuffle) => planes::unshuffle::<2>(src, dst),
        (4, Direction::Unshuffle) => planes::unshuffle::<4>(src, dst),
        (8, Direction::Unshuffle) => planes::unshuffle::<8>(src, dst),
        (_, Direction::Shuffle) => planes::shuffle_any(src, dst, es),
        (_, Direction::Unshuffle) => planes::unshuffle_any(src, dst, es),
    }
}

/// The byte-plane transposes on whole elements (`src.len() == dst.len()`, a multiple of the
/// element size).
mod planes {
    /// Elements per block of the portable path.
    const B: usize = 16;

    pub(super) fn shuffle<const N: usize>(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / N;
        let done = simd::shuffle(N, src, dst);
        let mut tmp = [[0u8; B]; N];
        let mut i = done;
        while i + B <= n {
            for (k, e) in src[i * N..(i + B) * N].chunks_exact(N).enumerate() {
                for (j, &b) in e.iter().enumerate() {
                    tmp[j][k] = b;
                }
            }
            for (j, t) in tmp.iter().enumerate() {
                dst[j * n + i..j * n + i + B].copy_from_slice(t);
            }
            i += B;
        }
        for (k, e) in src[i * N..].chunks_exact(N).enumerate() {
            for (j, &b) in e.iter().enumerate() {
                dst[j * n + i + k] = b;
            }
        }
    }

    pub(super) fn unshuffle<const N: usize>(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / N;
        let done = simd::unshuffle(N, src, dst);
        let mut tmp = [[0u8; B]; N];
        let mut i = done;
        while i + B <= n {
            for (j, t) in tmp.iter_mut().enumerate() {
                t.copy_from_slice(&src[j * n + i..j * n + i + B]);
            }
            for (k, e) in dst[i * N..(i + B) * N].chunks_exact_mut(N).enumerate() {
                for (j, b) in e.iter_mut().enumerate() {
                    *b = tmp[j][k];
                }
            }
            i += B;
        }
        for (k, e) in dst[i * N..].chunks_exact_mut(N).enumerate() {
            for (j, b) in e.iter_mut().enumerate() {
                *b = src[j * n + i + k];
            }
        }
    }

    pub(super) fn shuffle_any(src: &[u8], dst: &mut [u8], es: usize) {
        let n = src.len() / es;
        for (j, plane) in dst.chunks_exact_mut(n).enumerate() {
            for (b, e) in plane.iter_mut().zip(src.chunks_exact(es)) {
                *b = e[j];
            }
        }
    }

    pub(super) fn unshuffle_any(src: &[u8], dst: &mut [u8], es: usize) {
        let n = src.len() / es;
        for (j, plane) in src.chunks_exact(n).enumerate() {
            for (&b, e) in plane.iter().zip(dst.chunks_exact_mut(es)) {
                e[j] = b;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod simd {
        //! SSSE3/SSE2 transposes of 16 elements at a time, for element sizes 2 and 4. Each
        //! returns how many leading elements it did (0 when the CPU lacks SSSE3 or the size is
        //! another); the caller does the rest.
        use std::arch::x86_64::{
            __m128i, _mm_loadu_si128, _mm_setr_epi8, _mm_shuffle_epi8, _mm_storeu_si128,
            _mm_unpackhi_epi16, _mm_unpackhi_epi32, _mm_unpackhi_epi64, _mm_unpackhi_epi8,
            _mm_unpacklo_epi16, _mm_unpacklo_epi32, _mm_unpacklo_epi64, _mm_unpacklo_epi8,
        };

        /// How far ahead of the transpose its source is asked for, in bytes (`prefetch`): the
        /// transposes run at 8-10 GB/s, far faster than memory comes in unasked.
        const AHEAD: usize = crate::prefetch::AHEAD;

        /// Loads 16 bytes from the start of `s` (`None` when shorter).
        fn load(s: &[u8]) -> Option<__m128i> {
            let s: &[u8; 16] = s.first_chunk()?;
            // SAFETY: `s` is 16 readable bytes; the load is unaligned.
            Some(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
        }

        /// Stores 16 bytes at the start of `d` (nothing when shorter; callers never pass one).
        fn store(d: &mut [u8], v: __m128i) {
            if let Some(d) = d.first_chunk_mut::<16>() {
                // SAFETY: `d` is 16 writable bytes; the store is unaligned.
                unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), v) }
            }
        }

        pub(in super::super) fn shuffle(es: usize, src: &[u8], dst: &mut [u8]) -> usize {
            if !std::arch::is_x86_feature_detected!("ssse3") {
                return 0;
            }
            match es {
                // SAFETY: the CPU has SSSE3 (checked above).
                2 => unsafe { shuffle2(src, dst) },
                // SAFETY: as above.
                4 => unsafe { shuffle4(src, dst) },
                _ => 0,
            }
        }

        pub(in super::super) fn unshuffle(es: usize, src: &[u8], dst: &mut [u8]) -> usize {
            match es {
                // SAFETY: SSE2 is part of x86-64.
                2 => unsafe { unshuffle2(src, dst) },
                // SAFETY: as above.
                4 => unsafe { unshuffle4(src, dst) },
                _ => 0,
            }
        }

        #[target_feature(enable = "ssse3")]
        unsafe fn shuffle2(src: &[u8], dst: &mut [u8]) -> usize {
            let n = src.len() / 2;
            let mask = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            let (p0, p1) = dst.split_at_mut(n);
            let mut done = 0;
            for ((s, d0), d1) in src
                .chunks_exact(32)
                .zip(p0.chunks_exact_mut(16))
                .zip(p1.chunks_exact_mut(16))
            {
                let (Some(a), Some(b)) = (load(s), load(&s[16..])) else {
                    break;
                };
                crate::prefetch::line(src, done * 2 + AHEAD);
                // Each r holds 8 elements: their byte 0s, then their byte 1s.
                let r0 = _mm_shuffle_epi8(a, mask);
                let r1 = _mm_shuffle_epi8(b, mask);
                store(d0, _mm_unpacklo_epi64(r0, r1));
                store(d1, _mm_unpackhi_epi64(r0, r1));
                done += 16;
            }
            done
        }

        #[target_feature(enable = "ssse3")]
        unsafe fn shuffle4(src: &[u8], dst: &mut [u8]) -> usize {
            let n = src.len() / 4;
            let mask = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            let (p0, rest) = dst.split_at_mut(n);
            let (p1, rest) = rest.split_at_mut(n);
            let (p2, p3) = rest.split_at_mut(n);
            let mut done = 0;
            for ((((s, d0), d1), d2), d3) in src
                .chunks_exact(64)
                .zip(p0.chunks_exact_mut(16))
                .zip(p1.chunks_exact_mut(16))
                .zip(p2.chunks_exact_mut(16))
                .zip(p3.chunks_exact_mut(16))
            {
                let (Some(a), Some(b), Some(c), Some(d)) =
                    (load(s), load(&s[16..]), load(&s[32..]), load(&s[48..]))
                else {
                    break;
                };
                crate::prefetch::line(src, done * 4 + AHEAD);
                // Each r holds 4 elements as 4 lanes of 4 bytes: byte 0s, 1s, 2s, 3s.
                let r0 = _mm_shuffle_epi8(a, mask);
                let r1 = _mm_shuffle_epi8(b, mask);
                let r2 = _mm_shuffle_epi8(c, mask);
                let r3 = _mm_shuffle_epi8(d, mask);
                // Transpose the 4x4 matrix of lanes.
                let t0 = _mm_unpacklo_epi32(r0, r1);
                let t1 = _mm_unpackhi_epi32(r0, r1);
                let t2 = _mm_unpacklo_epi32(r2, r3);
                let t3 = _mm_unpackhi_epi32(r2, r3);
                store(d0, _mm_unpacklo_epi64(t0, t2));
                store(d1, _mm_unpackhi_epi64(t0, t2));
                store(d2, _mm_unpacklo_epi64(t1, t3));
                store(d3, _mm_unpackhi_epi64(t1, t3));
                done += 16;
            }
            done
        }

        #[target_feature(enable = "sse2")]
        unsafe fn unshuffle2(src: &[u8], dst: &mut [u8]) -> usize {
            let n = src.len() / 2;
            let (p0, p1) = src.split_at(n);
            let mut done = 0;
            for ((d, s0), s1) in dst
                .chunks_exact_mut(32)
                .zip(p0.chunks_exact(16))
                .zip(p1.chunks_exact(16))
            {
                let (Some(a), Some(c)) = (load(s0), load(s1)) else {
                    break;
                };
                if done % 64 == 0 {
                    crate::prefetch::line(p0, done + AHEAD / 2);
                    crate::prefetch::line(p1, done + AHEAD / 2);
                }
                store(d, _mm_unpacklo_epi8(a, c));
                store(&mut d[16..], _mm_unpackhi_epi8(a, c));
                done += 16;
            }
            done
        }

        #[target_feature(enable = "sse2")]
        unsafe fn unshuffle4(src: &[u8], dst: &mut [u8]) -> usize {
            let n = src.len() / 4;
            let (p0, rest) = src.split_at(n);
            let (p1, rest) = rest.split_at(n);
            let (p2, p3) = rest.split_at(n);
            let mut done = 0;
            for ((((d, s0), s1), s2), s3) in dst
                .chunks_exact_mut(64)
                .zip(p0.chunks_exact(16))
                .zip(p1.chunks_exact(16))
                .zip(p2.chunks_exact(16))
                .zip(p3.chunks_exact(16))
            {
                let (Some(a0), Some(a1), Some(a2), Some(a3)) =
                    (load(s0), load(s1), load(s2), load(s3))
                else {
                    break;
                };
                if done % 64 == 0 {
                    for p in [p0, p1, p2, p3] {
                        crate::prefetch::line(p, done + AHEAD / 4);
                    }
                }
                // Byte pairs (0,1) and (2,3) of elements 0-7 (lo) and 8-15 (hi).
                let lo01 = _mm_unpacklo_epi8(a0, a1);
                let hi01 = _mm_unpackhi_epi8(a0, a1);
                let lo23 = _mm_unpacklo_epi8(a2, a3);
                let hi23 = _mm_unpackhi_epi8(a2, a3);
                store(d, _mm_unpacklo_epi16(lo01, lo23));
                store(&mut d[16..], _mm_unpackhi_epi16(lo01, lo23));
                store(&mut d[32..], _mm_unpacklo_epi16(hi01, hi23));
                store(&mut d[48..], _mm_unpackhi_epi16(hi01, hi23));
                done += 16;
            }
            done
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    mod simd {
        pub(in super::super) fn shuffle(_: usize, _: &[u8], _: &mut [u8]) -> usize {
            0
        }
        pub(in super::super) fn unshuffle(_: usize, _: &[u8], _: &mut [u8]) -> usize {
            0
        }
    }
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

//! Chunk encoding and decoding exactly as HDF5's filters do it, without HDF5: so chunks are
//! compressed on many threads and moved with direct chunk I/O, and still read by h5py through
//! the normal filter pipeline.
//!
//! - shuffle (id 2): HDF5's byte planes (`coral_core::codec::shuffle`);
//! - deflate (id 1): a zlib stream (RFC 1950) at the level in `cd_values[0]`;
//! - LZF (id 32000): a raw LZF block (h5py's filter); when it would not be smaller the chunk is
//!   stored unfiltered with the filter's bit set in the chunk's filter mask, as HDF5 does for an
//!   optional filter that fails;
//! - Zstandard (id 32015): one zstd frame with its content size, level in `cd_values[0]`.

use std::io::{Read, Write};

use crate::h5::{FilterInfo, FILTER_DEFLATE, FILTER_LZF, FILTER_SHUFFLE, FILTER_ZSTD};

/// A chunk-level failure (corrupt or unsupported data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub String);

fn err(s: impl Into<String>) -> ChunkError {
    ChunkError(s.into())
}

/// True when every filter of `pipeline` is one this module implements.
pub fn supported(pipeline: &[FilterInfo]) -> bool {
    pipeline.iter().all(|f| {
        matches!(
            f.id,
            FILTER_SHUFFLE | FILTER_DEFLATE | FILTER_LZF | FILTER_ZSTD
        )
    })
}

/// Encodes one full chunk through `pipeline`; returns the bytes and the filter mask (bit `i` set
/// when filter `i` was skipped).
pub fn encode(
    pipeline: &[FilterInfo],
    element_size: usize,
    data: &[u8],
) -> Result<(Vec<u8>, u32), ChunkError> {
    let mut mask = 0u32;
    let mut cur: Option<Vec<u8>> = None;
    for (i, f) in pipeline.iter().enumerate() {
        let input: &[u8] = cur.as_deref().unwrap_or(data);
        let next = match f.id {
            FILTER_SHUFFLE => {
                if element_size > 1 {
                    Some(coral_core::codec::shuffle(input, element_size))
                } else {
                    None
                }
            }
            FILTER_DEFLATE => {
                let level = f.cd.first().copied().unwrap_or(4).clamp(0, 9);
                let mut enc = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(input.len() / 2 + 64),
                    flate2::Compression::new(level),
                );
                enc.write_all(input)
                    .map_err(|e| err(format!("deflate: {e}")))?;
                Some(enc.finish().map_err(|e| err(format!("deflate: {e}")))?)
            }
            FILTER_ZSTD => {
                let level = f.cd.first().map(|&l| l as i32).unwrap_or(3);
                Some(zstd::bulk::compress(input, level).map_err(|e| err(format!("zstd: {e}")))?)
            }
            FILTER_LZF => match lzf_compress(input) {
                Some(v) => Some(v),
                None => {
                    mask |= 1 << i;
                    None
                }
            },
            other => return Err(err(format!("unsupported filter {other}"))),
        };
        if let Some(n) = next {
            cur = Some(n);
        }
    }
    Ok((cur.unwrap_or_else(|| data.to_vec()), mask))
}

/// Decodes one chunk read with its filter `mask` to exactly `chunk_bytes` bytes.
pub fn decode(
    pipeline: &[FilterInfo],
    element_size: usize,
    mask: u32,
    data: Vec<u8>,
    chunk_bytes: usize,
) -> Result<Vec<u8>, ChunkError> {
    let mut cur = data;
    for (i, f) in pipeline.iter().enumerate().rev() {
        if i < 32 && mask & (1 << i) != 0 {
            continue;
        }
        cur = match f.id {
            FILTER_SHUFFLE => {
                if element_size > 1 {
                    coral_core::codec::unshuffle(&cur, element_size)
                } else {
                    cur
                }
            }
            FILTER_DEFLATE => {
                let mut out = Vec::new();
                out.try_reserve_exact(chunk_bytes)
                    .map_err(|e| err(format!("cannot allocate {chunk_bytes} bytes: {e}")))?;
                flate2::read::ZlibDecoder::new(&cur[..])
                    .take(chunk_bytes as u64 + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| err(format!("corrupt deflate data: {e}")))?;
                out
            }
            FILTER_ZSTD => zstd_decompress(&cur, chunk_bytes)?,
            FILTER_LZF => lzf_decompress(&cur, chunk_bytes)?,
            other => return Err(err(format!("unsupported filter {other}"))),
        };
    }
    if cur.len() != chunk_bytes {
        return Err(err(format!(
            "chunk decoded to {} bytes, expected {chunk_bytes}",
            cur.len()
        )));
    }
    Ok(cur)
}

fn zstd_decompress(data: &[u8], chunk_bytes: usize) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    out.try_reserve_exact(chunk_bytes)
        .map_err(|e| err(format!("cannot allocate {chunk_bytes} bytes: {e}")))?;
    let mut dec = zstd::stream::read::Decoder::new(data)
        .map_err(|e| err(format!("corrupt zstd data: {e}")))?
        .single_frame();
    (&mut dec)
        .take(chunk_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| err(format!("corrupt zstd data: {e}")))?;
    Ok(out)
}

/// LZF-compresses `data`; `None` when the result would not be smaller (h5py's filter then
/// fails and the chunk is stored as is).
fn lzf_compress(data: &[u8]) -> Option<Vec<u8>> {
    if data.is_empty() || data.len() > u32::MAX as usize {
        return None;
    }
    let mut out = vec![0u8; data.len()];
    // SAFETY: input and output buffers are valid for the lengths given.
    let n = unsafe {
        lzf_sys::lzf_compress(
            data.as_ptr() as *const _,
            data.len() as _,
            out.as_mut_ptr() as *mut _,
            out.len() as _,
        )
    };
    if n == 0 || n as usize >= data.len() {
        return None;
    }
    out.truncate(n as usize);
    Some(out)
}

fn lzf_decompress(data: &[u8], chunk_bytes: usize) -> Result<Vec<u8>, ChunkError> {
    if chunk_bytes > u32::MAX as usize || data.len() > u32::MAX as usize {
        return Err(err("lzf chunk too large"));
    }
    let mut out = vec![0u8; chunk_bytes];
    if chunk_bytes == 0 {
        return Ok(out);
    }
    // SAFETY: liblzf bounds-checks its input and output against the lengths given.
    let n = unsafe {
        lzf_sys::lzf_decompress(
            data.as_ptr() as *const _,
            data.len() as _,
            out.as_mut_ptr() as *mut _,
            out.len() as _,
        )
    };
    if n as usize != chunk_bytes {
        return Err(err(format!(
            "corrupt lzf data: decoded {n} bytes, expected {chunk_bytes}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pipelines() -> Vec<Vec<FilterInfo>> {
        let f = |id, cd: Vec<u32>| FilterInfo { id, cd };
        vec![
            vec![],
            vec![f(FILTER_DEFLATE, vec![4])],
            vec![f(FILTER_SHUFFLE, vec![4]), f(FILTER_DEFLATE, vec![1])],
            vec![f(FILTER_SHUFFLE, vec![4]), f(FILTER_ZSTD, vec![3])],
            vec![f(FILTER_LZF, vec![4, 0, 0])],
            vec![f(FILTER_SHUFFLE, vec![4]), f(FILTER_LZF, vec![4, 0, 0])],
        ]
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), zeros in 0usize..3000) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            for p in pipelines() {
                let (enc, mask) = encode(&p, 4, &data).unwrap();
                let dec = decode(&p, 4, mask, enc, data.len()).unwrap();
                prop_assert_eq!(&dec, &data);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000), len in 0usize..4000) {
            for p in pipelines() {
                let _ = decode(&p, 4, 0, data.clone(), len);
            }
        }
    }

    #[test]
    fn lzf_incompressible_sets_the_mask() {
        let p = vec![FilterInfo {
            id: FILTER_LZF,
            cd: vec![],
        }];
        let data: Vec<u8> = (0..64u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let (enc, mask) = encode(&p, 1, &data).unwrap();
        assert_eq!(mask, 1);
        assert_eq!(enc, data);
        assert_eq!(decode(&p, 1, mask, enc, data.len()).unwrap(), data);
    }
}

//! Chunk encoding and decoding exactly as HDF5's filters do it, without HDF5: so chunks are
//! compressed on many threads and moved with direct chunk I/O, and still read by h5py through
//! the normal filter pipeline.
//!
//! - shuffle (id 2): HDF5's byte planes (`coral_core::codec::shuffle`);
//! - deflate (id 1): a zlib stream (RFC 1950) at the level in `cd_values[0]`;
//! - LZF (id 32000): a raw LZF block (h5py's filter); when it would not be smaller the chunk is
//!   stored unfiltered with the filter's bit set in the chunk's filter mask, as HDF5 does for an
//!   optional filter that fails;
//! - Zstandard (id 32015): one zstd frame with its content size, level in `cd_values[0]`;
//! - Coral's float codec (id 307, `coral-float-codec`): one frame, the kind in `cd_values[1]`.

use crate::h5::{
    FilterInfo, FILTER_CORAL, FILTER_DEFLATE, FILTER_LZF, FILTER_SHUFFLE, FILTER_ZSTD,
};

/// A chunk-level failure (corrupt or unsupported data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub String);

fn err(s: impl Into<String>) -> ChunkError {
    ChunkError(s.into())
}

/// Room for `n` more bytes in `v` ([`crate::mem::reserve`]), or an error.
pub(crate) fn room(v: &mut Vec<u8>, n: usize) -> Result<(), ChunkError> {
    crate::mem::reserve(v, n).map_err(|e| err(format!("cannot allocate {n} bytes: {e}")))
}

/// True when every filter of `pipeline` is one this module implements.
pub fn supported(pipeline: &[FilterInfo]) -> bool {
    pipeline.iter().all(|f| {
        matches!(
            f.id,
            FILTER_SHUFFLE | FILTER_DEFLATE | FILTER_LZF | FILTER_ZSTD | FILTER_CORAL
        )
    })
}

/// Encodes one full chunk through `pipeline`; returns the bytes and the filter mask (bit `i` set
/// when filter `i` was skipped). (The writers use [`encode_into`]; this is for tests and the
/// `testing` feature's hooks.)
#[cfg(any(test, feature = "testing"))]
pub fn encode(
    pipeline: &[FilterInfo],
    element_size: usize,
    data: &[u8],
) -> Result<(Vec<u8>, u32), ChunkError> {
    let mut out = Vec::new();
    let mask = encode_into(pipeline, element_size, data, &mut out)?;
    Ok((out, mask))
}

/// [`encode`] into `out` (cleared first, its allocation reused): the common pipelines (zstd or
/// deflate, after shuffle or not) shuffle into a per-thread scratch buffer and compress straight
/// into `out`, so a writer that recycles its buffers allocates nothing per chunk.
pub fn encode_into(
    pipeline: &[FilterInfo],
    element_size: usize,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<u32, ChunkError> {
    thread_local! {
        static SHUFFLED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if let [f] = pipeline {
        if f.id == FILTER_CORAL {
            coral_encode(&f.cd, data, out)?;
            return Ok(0);
        }
    }
    let shuffle_first = matches!(pipeline.first(), Some(f) if f.id == FILTER_SHUFFLE);
    let codec = &pipeline[usize::from(shuffle_first)..];
    let (id, cd0) = match codec {
        [f] if f.id == FILTER_ZSTD || f.id == FILTER_DEFLATE => (f.id, f.cd.first().copied()),
        _ => {
            let (bytes, mask) = encode_generic(pipeline, element_size, data)?;
            *out = bytes;
            return Ok(mask);
        }
    };
    let shuffled = shuffle_first && element_size > 1;
    let planes = if shuffled { element_size } else { 1 };
    out.clear();
    SHUFFLED.with(|cell| {
        let mut buf = cell.borrow_mut();
        let input: &[u8] = if shuffled {
            // The buffer only grows: no zeroing per chunk.
            if buf.len() < data.len() {
                let more = data.len() - buf.len();
                room(&mut buf, more)?;
                buf.resize(data.len(), 0);
            }
            let dst = &mut buf[..data.len()];
            coral_core::codec::shuffle_into(data, element_size, dst)
                .map_err(|e| err(e.to_string()))?;
            dst
        } else {
            data
        };
        if id == FILTER_ZSTD {
            zstd_planes_into(input, planes, cd0.map(|l| l as i32).unwrap_or(3), out)
        } else {
            zlib_planes_into(input, planes, cd0.unwrap_or(4).clamp(1, 9), out)
        }
    })?;
    Ok(0)
}

/// [`encode`] filter by filter, each into a new buffer (LZF, and any other order of filters).
fn encode_generic(
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
                    Some(shuffle(input, element_size))
                } else {
                    None
                }
            }
            FILTER_DEFLATE => {
                let level = f.cd.first().copied().unwrap_or(4).clamp(1, 9);
                // After shuffle the input is `element_size` byte planes.
                let shuffled = i > 0 && pipeline[i - 1].id == FILTER_SHUFFLE && element_size > 1;
                let planes = if shuffled { element_size } else { 1 };
                Some(zlib_planes(input, planes, level)?)
            }
            FILTER_ZSTD => {
                let level = f.cd.first().map(|&l| l as i32).unwrap_or(3);
                let shuffled = i > 0 && pipeline[i - 1].id == FILTER_SHUFFLE && element_size > 1;
                let planes = if shuffled { element_size } else { 1 };
                Some(zstd_planes(input, planes, level)?)
            }
            FILTER_CORAL => {
                let mut out = Vec::new();
                coral_encode(&f.cd, input, &mut out)?;
                Some(out)
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

/// Codes `data` with Coral's float codec as the kind `cd` names (opaque bytes otherwise), in
/// rows of the length `cd` names.
fn coral_encode(cd: &[u32], data: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
    coral_h5plugin::encode_chunk(cd, data, out).map_err(|e| err(e.to_string()))
}

/// Decodes a Coral float codec frame of exactly `chunk_bytes` bytes (a frame of another size
/// is refused by the codec before it decodes anything).
fn coral_decode(data: &[u8], chunk_bytes: usize) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    room(&mut out, chunk_bytes)?;
    out.resize(chunk_bytes, 0);
    coral_float_codec::decode_into(data, &mut out).map_err(|e| err(e.to_string()))?;
    Ok(out)
}

/// HDF5's shuffle (`coral_core::codec::shuffle`, vectorised there).
pub fn shuffle(data: &[u8], es: usize) -> Vec<u8> {
    coral_core::codec::shuffle(data, es)
}

/// Inverse of [`shuffle`].
pub fn unshuffle(data: &[u8], es: usize) -> Vec<u8> {
    coral_core::codec::unshuffle(data, es)
}

/// Order-0 entropy of `data` in bits per byte, estimated from at most 32 Ki bytes: 32 runs of
/// 1 KiB evenly spread (whole cache lines, read in order, rather than a byte from every line).
/// The estimate of a uniform plane is then within 0.006 bits of 8; the decision it feeds, above
/// or below a threshold, only changes how a plane is coded, never what it decodes to.
fn entropy(data: &[u8]) -> f64 {
    const RUNS: usize = 32;
    const RUN: usize = 1024;
    let mut h = [0u64; 256];
    let mut n = 0u64;
    let mut count = |run: &[u8]| {
        for &b in run {
            h[b as usize] += 1;
        }
        n += run.len() as u64;
    };
    if data.len() <= RUNS * RUN {
        count(data);
    } else {
        let stride = data.len() / RUNS;
        for r in 0..RUNS {
            count(&data[r * stride..r * stride + RUN]);
        }
    }
    let n = n as f64;
    h.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let q = c as f64 / n;
            -q * q.log2()
        })
        .sum()
}

/// Above this order-0 entropy (bits per byte) a plane is kept in stored blocks: Huffman coding
/// could save under 2% of it, and deflate's match search is what makes gzip slow.
const STORE_ABOVE_BITS: f64 = 7.85;

/// Adler-32 (RFC 1950), zlib-rs's (vectorised).
fn adler32(data: &[u8]) -> u32 {
    zlib_rs::adler32::adler32(1, data)
}

/// One zlib stream (RFC 1950) for `data` split into `planes` equal planes (the trailing bytes
/// join the last): each plane in its own deflate blocks, or, when its bytes are close to random
/// (order-0 entropy above [`STORE_ABOVE_BITS`], and deflating its first [`MATCH_SAMPLE`] bytes
/// saves under a tenth), in stored blocks. Any zlib decoder (HDF5's deflate filter) reads it.
///
/// A deflated plane is coded with one of three zlib strategies at `level`, whichever makes the
/// plane's first [`STRATEGY_SAMPLE`] bytes smallest (the whole plane, when it is not much
/// larger):
/// - Huffman only (`Z_HUFFMAN_ONLY`) and run-length (`Z_RLE`: matches at distance 1 only), which
///   suit the byte planes of float weights: their bytes repeat in short runs (an exponent
///   plane) or hardly at all (mantissa planes), so the default strategy's match search costs
///   time and finds matches that cost more bits than the literals they replace. On
///   all-MiniLM-L6-v2 (fp32) the exponent plane comes out 20% smaller than with level 4's
///   default strategy, and is coded about 4 times faster;
/// - zlib's default, whose longer matches pay on structured data (token ids, position indices,
///   masks).
fn zlib_planes(data: &[u8], planes: usize, level: u32) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    zlib_planes_into(data, planes, level, &mut out)?;
    Ok(out)
}

/// How much of a plane [`zlib_planes`] tries the strategies on.
const STRATEGY_SAMPLE: usize = 16 << 10;

/// How much of a plane whose byte histogram looks random [`zlib_planes`] deflates to see whether
/// it is (matches make uniform bytes compressible: the low byte of position indices).
const MATCH_SAMPLE: usize = 4 << 10;

/// The three deflate strategies of [`zlib_planes`], one compressor each, and two scratch buffers
/// for the trials: one per thread and level (see [`with_deflaters`]).
struct Deflaters {
    level: u32,
    /// Huffman only, RLE, default: the order in which a tie is won (fastest first).
    by_strategy: [zlib_rs::Deflate; 3],
    trial: Vec<u8>,
    best: Vec<u8>,
}

impl Deflaters {
    fn new(level: u32) -> Self {
        let config = |strategy| zlib_rs::DeflateConfig {
            level: level as i32,
            window_bits: -15, // raw deflate: the zlib header and Adler-32 are written here
            strategy,
            ..zlib_rs::DeflateConfig::default()
        };
        let new = |strategy| zlib_rs::Deflate::new_with_config(config(strategy));
        Deflaters {
            level,
            by_strategy: [
                new(zlib_rs::Strategy::HuffmanOnly),
                new(zlib_rs::Strategy::Rle),
                new(zlib_rs::Strategy::Default),
            ],
            trial: Vec::new(),
            best: Vec::new(),
        }
    }

    /// True when deflating the first [`MATCH_SAMPLE`] bytes of a plane that order-0 statistics
    /// call random saves a tenth of them: its bytes repeat in strings, and it is deflated after
    /// all.
    fn matches_pay(&mut self, plane: &[u8]) -> Result<bool, ChunkError> {
        let sample = &plane[..plane.len().min(MATCH_SAMPLE)];
        self.trial.clear();
        deflate_sync(&mut self.by_strategy[2], sample, &mut self.trial)?;
        Ok(self.trial.len() * 10 < sample.len() * 9)
    }

    /// Appends `plane` to `out` in the strategy that codes its first [`STRATEGY_SAMPLE`] bytes
    /// smallest (the whole plane when it is at most twice that, whose winning trial is then
    /// the output itself).
    fn deflate_plane(&mut self, plane: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
        let whole = plane.len() <= 2 * STRATEGY_SAMPLE;
        let sample = if whole {
            plane
        } else {
            &plane[..STRATEGY_SAMPLE]
        };
        let mut winner = None;
        for (i, d) in self.by_strategy.iter_mut().enumerate() {
            self.trial.clear();
            deflate_sync(d, sample, &mut self.trial)?;
            if winner.is_none() || self.trial.len() < self.best.len() {
                std::mem::swap(&mut self.trial, &mut self.best);
                winner = Some(i);
            }
        }
        let Some(i) = winner else {
            return Err(err("deflate: no strategy"));
        };
        if whole {
            out.extend_from_slice(&self.best);
            return Ok(());
        }
        deflate_sync(&mut self.by_strategy[i], plane, out)
    }
}

/// Runs `f` on this thread's [`Deflaters`] for `level` (made, or remade for another level,
/// on first use): their compressors and buffers are reused from chunk to chunk.
fn with_deflaters<R>(
    level: u32,
    f: impl FnOnce(&mut Deflaters) -> Result<R, ChunkError>,
) -> Result<R, ChunkError> {
    thread_local! {
        static DEFLATE: std::cell::RefCell<Option<Deflaters>> =
            const { std::cell::RefCell::new(None) };
    }
    DEFLATE.with(|cell| {
        let mut guard = cell.borrow_mut();
        if !matches!(&*guard, Some(d) if d.level == level) {
            *guard = Some(Deflaters::new(level));
        }
        match guard.as_mut() {
            Some(d) => f(d),
            None => Err(err("deflate: no compressor")),
        }
    })
}

/// Appends `input` to `out` as raw deflate blocks ended by a sync flush (byte-aligned, no final
/// block), from a fresh stream. zlib writes into `out`'s spare capacity directly: nothing is
/// zeroed first.
fn deflate_sync(
    d: &mut zlib_rs::Deflate,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    d.reset();
    let mut consumed = 0usize;
    loop {
        let left = input.len() - consumed;
        // Stored blocks cost 5 bytes per 64 KiB at worst; the sync flush a few more.
        room(out, left + (left >> 10) + 1024)?;
        let spare = out.spare_capacity_mut();
        let room_now = spare.len();
        let (in0, out0) = (d.total_in(), d.total_out());
        let r = d.compress_uninit(&input[consumed..], spare, zlib_rs::DeflateFlush::SyncFlush);
        let produced = usize::try_from(d.total_out() - out0).unwrap_or(usize::MAX);
        consumed += usize::try_from(d.total_in() - in0).unwrap_or(usize::MAX);
        if produced > room_now || consumed > input.len() {
            return Err(err("deflate: the compressor wrote past its output"));
        }
        // SAFETY: zlib-rs initialised the first `produced` bytes of the spare capacity it was
        // given (its `total_out` counts them), and `produced` is within that capacity.
        unsafe { out.set_len(out.len() + produced) };
        r.map_err(|e| err(format!("deflate: {e:?}")))?;
        if consumed == input.len() && produced < room_now {
            return Ok(());
        }
    }
}

/// [`zlib_planes`] appended to `out`.
fn zlib_planes_into(
    data: &[u8],
    planes: usize,
    level: u32,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let planes = planes.max(1);
    room(out, data.len() + data.len() / 65535 * 5 + 64)?;
    out.extend_from_slice(&[0x78, 0x5e]);
    let n = data.len() / planes;
    let mut start = 0;
    for j in 0..planes {
        let end = if j + 1 == planes {
            data.len()
        } else {
            start + n
        };
        let plane = &data[start..end];
        start = end;
        if plane.is_empty() {
            continue;
        }
        if entropy(plane) > STORE_ABOVE_BITS && !with_deflaters(level, |d| d.matches_pay(plane))? {
            for block in plane.chunks(65535) {
                let len = block.len() as u16;
                out.push(0); // BFINAL 0, BTYPE 00 (stored), padded to the byte
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&(!len).to_le_bytes());
                out.extend_from_slice(block);
            }
        } else {
            with_deflaters(level, |d| d.deflate_plane(plane, out))?;
        }
    }
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]); // final, empty stored block
    out.extend_from_slice(&adler32(data).to_be_bytes());
    Ok(())
}

/// Largest block of a zstd frame (RFC 8878 `Block_Maximum_Size`).
const ZSTD_MAX_BLOCK: usize = 128 * 1024;

/// Above this order-0 entropy (bits per byte) a zstd plane goes into raw blocks: Huffman coding
/// would save under 0.6% of it. (A uniform plane measures about 7.997 on the 64 Ki sample.)
const ZSTD_RAW_ABOVE_BITS: f64 = 7.95;

/// The acceleration of the byte-plane encoder: zstd's fast strategy at level `-ACCEL` tries a
/// match only every `ACCEL`-th position or so, which on byte planes of weights finds almost none.
const PLANE_ACCEL: i32 = 1000;

/// Compresses `data` as one zstd frame (content size in the header, no checksum) into `out`
/// (cleared first) with a per-thread context: `literal_mode` is the byte-plane encoder (fastest
/// match search, literals always Huffman-coded), otherwise zstd's own parameters for `level`.
fn zstd_compress_into(
    data: &[u8],
    level: i32,
    literal_mode: bool,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    use zstd::zstd_safe::{CParameter, ParamSwitch};
    thread_local! {
        static CCTX: std::cell::RefCell<Option<(i32, bool, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let zerr = |e: std::io::Error| err(format!("zstd: {e}"));
    CCTX.with(|cell| {
        let mut guard = cell.borrow_mut();
        let fresh = !matches!(&*guard, Some((l, m, _)) if *l == level && *m == literal_mode);
        if fresh {
            let mut c = zstd::bulk::Compressor::new(level).map_err(zerr)?;
            if literal_mode {
                c.set_parameter(CParameter::CompressionLevel(-PLANE_ACCEL))
                    .map_err(zerr)?;
                c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Enable))
                    .map_err(zerr)?;
            }
            *guard = Some((level, literal_mode, c));
        }
        let Some((_, _, c)) = guard.as_mut() else {
            return Err(err("zstd: no compression context"));
        };
        out.clear();
        room(out, zstd::zstd_safe::compress_bound(data.len()))?;
        c.compress_to_buffer(data, out).map_err(zerr)?;
        Ok(())
    })
}

/// One standard zstd frame (RFC 8878) for `data` split into `planes` equal byte planes (the
/// output of the shuffle filter), written to `out` (cleared first).
///
/// The planes are compressed by the *byte-plane encoder*: zstd's fastest match search with every
/// literal block Huffman-coded. A byte plane of weights has almost no repeated strings, so the
/// matches zstd's normal levels find there are short and cost more than the literals they
/// replace: on all-MiniLM-L6-v2 the fp32 store saves 17.6% with this encoder where zstd-1 saved
/// 16.6%, and compresses faster (`docs/benchmarks.md`). At `level` 2 and above zstd's own parameters for the level are tried too and
/// the smaller frame kept, so higher levels never do worse.
///
/// Leading planes that are close to random go into raw blocks (a copy, where zstd would spend
/// its time finding nothing), followed by the blocks of the frame made from the remaining planes.
/// Raw blocks change no decoder state (repeat offsets, entropy tables), and match offsets in the
/// compressed blocks are relative to the current position, so the frame decodes with any zstd
/// decoder (HDF5's filter 32015, `hdf5plugin`, the zstd CLI) to `data`.
fn zstd_planes_into(
    data: &[u8],
    planes: usize,
    level: i32,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    thread_local! {
        static TAIL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let n = data.len() / planes.max(1);
    if planes <= 1 || n < ZSTD_MAX_BLOCK / 4 {
        return zstd_compress_into(data, level, false, out);
    }
    let encode = |d: &[u8], out: &mut Vec<u8>| -> Result<(), ChunkError> {
        zstd_compress_into(d, level, true, out)?;
        if level >= 2 {
            let mut own = Vec::new();
            zstd_compress_into(d, level, false, &mut own)?;
            if own.len() < out.len() {
                *out = own;
            }
        }
        Ok(())
    };
    let raw_planes = (0..planes)
        .take_while(|&j| entropy(&data[j * n..(j + 1) * n]) > ZSTD_RAW_ABOVE_BITS)
        .count();
    if raw_planes == 0 || raw_planes == planes && data.len() == planes * n {
        // Nothing random to skip, or nothing left to compress.
        return encode(data, out);
    }
    let (raw, rest) = data.split_at(raw_planes * n);
    TAIL.with(|cell| {
        let mut tail = cell.borrow_mut();
        encode(rest, &mut tail)?;
        let tail_blocks = zstd_frame_blocks(&tail)?;
        out.clear();
        room(
            out,
            raw.len() + raw.len() / ZSTD_MAX_BLOCK * 3 + tail_blocks.len() + 32,
        )?;
        out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
        // Frame header descriptor: 8-byte content size, single segment (window = content
        // size), no checksum, no dictionary.
        out.push(0b1110_0000);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        for block in raw.chunks(ZSTD_MAX_BLOCK) {
            let header = (block.len() as u32) << 3; // raw block (type 0), not last
            out.extend_from_slice(&header.to_le_bytes()[..3]);
            out.extend_from_slice(block);
        }
        out.extend_from_slice(tail_blocks);
        Ok(())
    })
}

/// [`zstd_planes_into`] into a new buffer.
fn zstd_planes(data: &[u8], planes: usize, level: i32) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    zstd_planes_into(data, planes, level, &mut out)?;
    Ok(out)
}

/// The blocks of a single zstd frame (everything between its header and its checksum), with the
/// last block's flag kept.
fn zstd_frame_blocks(frame: &[u8]) -> Result<&[u8], ChunkError> {
    let bad = || err("zstd: unexpected frame layout from the compressor");
    let fhd = *frame.get(4).ok_or_else(bad)?;
    let single_segment = fhd & 0x20 != 0;
    let dict_len = [0usize, 1, 2, 4][(fhd & 3) as usize];
    let fcs_len = match fhd >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let start = 5 + usize::from(!single_segment) + dict_len + fcs_len;
    let mut pos = start;
    loop {
        let h = frame.get(pos..pos + 3).ok_or_else(bad)?;
        let h = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
        let size = match (h >> 1) & 3 {
            1 => 1, // RLE: one byte
            3 => return Err(bad()),
            _ => (h >> 3) as usize,
        };
        pos += 3 + size;
        if pos > frame.len() {
            return Err(bad());
        }
        if h & 1 == 1 {
            return Ok(&frame[start..pos]);
        }
    }
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
                    unshuffle(&cur, element_size)
                } else {
                    cur
                }
            }
            FILTER_DEFLATE => inflate(&cur, chunk_bytes)?,
            FILTER_ZSTD => zstd_decompress(&cur, chunk_bytes)?,
            FILTER_LZF => lzf_decompress(&cur, chunk_bytes)?,
            FILTER_CORAL => coral_decode(&cur, chunk_bytes)?,
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

/// Decodes one chunk straight into `dst` (the chunk's place in the tensor; shorter than
/// `chunk_bytes` for the last, padded chunk). For the common pipelines (zstd, deflate or none,
/// after shuffle or not) the chunk is decompressed into a per-thread scratch buffer and
/// unshuffled into `dst`: no allocation per chunk and one copy fewer than [`decode`]. Anything
/// else goes through [`decode`].
pub fn decode_into(
    pipeline: &[FilterInfo],
    element_size: usize,
    mask: u32,
    data: &[u8],
    chunk_bytes: usize,
    dst: &mut [u8],
) -> Result<(), ChunkError> {
    struct Scratch {
        buf: Vec<u8>,
        /// The whole unshuffled chunk, when only its start is wanted (the last, padded chunk).
        whole: Vec<u8>,
        zstd: Option<zstd::bulk::Decompressor<'static>>,
        inflate: Option<flate2::Decompress>,
    }
    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> = const {
            std::cell::RefCell::new(Scratch { buf: Vec::new(), whole: Vec::new(), zstd: None, inflate: None })
        };
    }
    if let [f] = pipeline {
        if f.id == FILTER_CORAL && mask == 0 && dst.len() == chunk_bytes {
            // Straight into the tensor: no scratch, no copy.
            return coral_float_codec::decode_into(data, dst).map_err(|e| err(e.to_string()));
        }
    }
    let shuffle_first = matches!(pipeline.first(), Some(f) if f.id == FILTER_SHUFFLE);
    let shuffled = shuffle_first && element_size > 1 && mask & 1 == 0;
    let codec = &pipeline[usize::from(shuffle_first)..];
    let fast = dst.len() <= chunk_bytes
        && mask == 0
        && match codec {
            [] => true,
            [f] => f.id == FILTER_ZSTD || f.id == FILTER_DEFLATE,
            _ => false,
        };
    if !fast {
        let dec = decode(pipeline, element_size, mask, data.to_vec(), chunk_bytes)?;
        let n = dst.len();
        dst.copy_from_slice(dec.get(..n).ok_or_else(|| err("chunk decoded too short"))?);
        return Ok(());
    }
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Scratch {
            buf,
            whole,
            zstd,
            inflate,
        } = &mut *guard;
        let plain: &[u8] = match codec.first().map(|f| f.id) {
            None => data,
            Some(FILTER_DEFLATE) => {
                let d = inflate.get_or_insert_with(|| flate2::Decompress::new(true));
                d.reset(true);
                inflate_with(d, data, chunk_bytes, buf)?;
                buf
            }
            _ => {
                check_zstd_frame_size(data, chunk_bytes)?;
                if zstd.is_none() {
                    *zstd = Some(
                        zstd::bulk::Decompressor::new().map_err(|e| err(format!("zstd: {e}")))?,
                    );
                }
                let Some(d) = zstd.as_mut() else {
                    return Err(err("zstd: no decompression context"));
                };
                buf.clear();
                room(buf, chunk_bytes)?;
                d.decompress_to_buffer(data, buf)
                    .map_err(|e| err(format!("corrupt zstd data: {e}")))?;
                buf
            }
        };
        if plain.len() != chunk_bytes {
            return Err(err(format!(
                "chunk decoded to {} bytes, expected {chunk_bytes}",
                plain.len()
            )));
        }
        let n = dst.len();
        if !shuffled {
            dst.copy_from_slice(&plain[..n]);
        } else if n == chunk_bytes {
            coral_core::codec::unshuffle_into(plain, element_size, dst)
                .map_err(|e| err(e.to_string()))?;
        } else {
            if whole.len() < chunk_bytes {
                let more = chunk_bytes - whole.len();
                room(whole, more)?;
                whole.resize(chunk_bytes, 0);
            }
            let w = &mut whole[..chunk_bytes];
            coral_core::codec::unshuffle_into(plain, element_size, w)
                .map_err(|e| err(e.to_string()))?;
            dst.copy_from_slice(&w[..n]);
        }
        Ok(())
    })
}

/// A chunk's zstd frame must declare exactly the chunk's size (checked before allocating).
fn check_zstd_frame_size(data: &[u8], chunk_bytes: usize) -> Result<(), ChunkError> {
    match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n == chunk_bytes as u64 => Ok(()),
        Ok(Some(n)) => Err(err(format!(
            "corrupt zstd data: frame of {n} bytes, expected {chunk_bytes}"
        ))),
        _ => Err(err("corrupt zstd data: no frame content size")),
    }
}

fn zstd_decompress(data: &[u8], chunk_bytes: usize) -> Result<Vec<u8>, ChunkError> {
    check_zstd_frame_size(data, chunk_bytes)?;
    let out = zstd::bulk::decompress(data, chunk_bytes)
        .map_err(|e| err(format!("corrupt zstd data: {e}")))?;
    Ok(out)
}

/// Inflates a zlib stream to at most `chunk_bytes` bytes (more is an error).
fn inflate(data: &[u8], chunk_bytes: usize) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    inflate_with(
        &mut flate2::Decompress::new(true),
        data,
        chunk_bytes,
        &mut out,
    )?;
    Ok(out)
}

/// Inflates a zlib stream into `out` (cleared first) with the fresh or reset inflater `d`, to
/// exactly what the stream holds; more than `chunk_bytes` bytes is an error. The inflater writes
/// only into `out`'s spare capacity (at least `chunk_bytes + 1`), so a stream that claims more
/// stops there.
fn inflate_with(
    d: &mut flate2::Decompress,
    data: &[u8],
    chunk_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    out.clear();
    room(out, chunk_bytes + 1)?;
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let input = data
            .get(before_in as usize..)
            .ok_or_else(|| err("corrupt deflate data"))?;
        let st = d
            .decompress_vec(input, out, flate2::FlushDecompress::Finish)
            .map_err(|e| err(format!("corrupt deflate data: {e}")))?;
        if out.len() > chunk_bytes {
            return Err(err("corrupt deflate data: too long"));
        }
        match st {
            flate2::Status::StreamEnd => return Ok(()),
            _ if d.total_in() == before_in && d.total_out() == before_out => {
                return Err(err("corrupt deflate data: truncated"))
            }
            _ if out.len() == out.capacity() => return Err(err("corrupt deflate data: too long")),
            _ => {}
        }
    }
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

/// LZF decompression (liblzf's format), bounds-checked in Rust: liblzf's own decoder is not
/// safe on corrupt input.
fn lzf_decompress(data: &[u8], chunk_bytes: usize) -> Result<Vec<u8>, ChunkError> {
    let bad = || err("corrupt lzf data");
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(chunk_bytes)
        .map_err(|e| err(format!("cannot allocate {chunk_bytes} bytes: {e}")))?;
    let mut ip = 0usize;
    while ip < data.len() {
        let ctrl = data[ip] as usize;
        ip += 1;
        if ctrl < 32 {
            let len = ctrl + 1;
            let lit = data.get(ip..ip + len).ok_or_else(bad)?;
            if out.len() + len > chunk_bytes {
                return Err(bad());
            }
            out.extend_from_slice(lit);
            ip += len;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += *data.get(ip).ok_or_else(bad)? as usize;
                ip += 1;
            }
            let back = ((ctrl & 0x1f) << 8) + 1 + *data.get(ip).ok_or_else(bad)? as usize;
            ip += 1;
            len += 2;
            let start = out.len().checked_sub(back).ok_or_else(bad)?;
            if out.len() + len > chunk_bytes {
                return Err(bad());
            }
            for k in 0..len {
                let b = out[start + k];
                out.push(b);
            }
        }
    }
    if out.len() != chunk_bytes {
        return Err(err(format!(
            "corrupt lzf data: decoded {} bytes, expected {chunk_bytes}",
            out.len()
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
        fn decode_into_is_decode(data in proptest::collection::vec(any::<u8>(), 0..5000), zeros in 0usize..3000, cut in 0usize..8) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            for p in pipelines() {
                let (enc, mask) = encode(&p, 4, &data).unwrap();
                let n = data.len().saturating_sub(cut);
                let mut dst = vec![7u8; n];
                decode_into(&p, 4, mask, &enc, data.len(), &mut dst).unwrap();
                prop_assert_eq!(&dst[..], &data[..n]);
            }
        }

        #[test]
        fn decode_into_refuses_a_chunk_of_another_size(data in proptest::collection::vec(any::<u8>(), 8..5000), zeros in 0usize..3000, delta in 1usize..64) {
            let mut data = data;
            data.extend(std::iter::repeat_n(0u8, zeros));
            data.truncate(data.len() / 4 * 4);
            for p in pipelines() {
                if p.is_empty() {
                    continue;
                }
                let (enc, mask) = encode(&p, 4, &data).unwrap();
                for len in [data.len() - delta.min(data.len()), data.len() + delta] {
                    let mut dst = vec![0u8; len];
                    prop_assert!(decode_into(&p, 4, mask, &enc, len, &mut dst).is_err(), "pipeline {:?}, {} as {}", p, data.len(), len);
                }
            }
        }

        #[test]
        fn decode_into_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000), len in 0usize..4000) {
            for p in pipelines() {
                let mut dst = vec![0u8; len];
                let _ = decode_into(&p, 4, 0, &data, len, &mut dst);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000), len in 0usize..4000) {
            for p in pipelines() {
                let _ = decode(&p, 4, 0, data.clone(), len);
            }
        }
    }

    /// Float-like data: random low bytes (mantissa), a narrow range of high bytes (exponent).
    fn weights(n: usize, seed: u64, es: usize, extra: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n * es + extra);
        for _ in 0..n {
            for j in 0..es {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = if j + 1 == es {
                    0x3c + (x % 3) as u8
                } else {
                    x as u8
                };
                out.push(b);
            }
        }
        out.extend((0..extra).map(|i| i as u8));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn zstd_planes_is_a_standard_frame(
            n in 40_000usize..200_000, es in prop::sample::select(vec![2usize, 4, 8]),
            extra in 0usize..8, level in prop::sample::select(vec![-1i32, 1, 3]), seed: u64,
        ) {
            let data = shuffle(&weights(n, seed, es, extra), es);
            let enc = zstd_planes(&data, es, level).unwrap();
            // Magic, descriptor, 8-byte content size, then the first block: a raw one.
            prop_assert_eq!(enc[4], 0b1110_0000);
            prop_assert_eq!((enc[13] >> 1) & 3, 0);
            // Any zstd decoder reads it: the zstd library itself, and our chunk decoder.
            prop_assert_eq!(zstd::bulk::decompress(&enc, data.len()).unwrap(), data.clone());
            prop_assert_eq!(zstd_decompress(&enc, data.len()).unwrap(), data.clone());
            // The random planes were not compressed: the frame is about as large as they are,
            // and no larger than what zstd alone makes (plus a few headers).
            let plain = zstd::bulk::compress(&data, level).unwrap();
            prop_assert!(enc.len() <= plain.len() + plain.len() / 100 + 64,
                "planes {} vs plain {}", enc.len(), plain.len());
        }
    }

    /// Float32 weights drawn from a normal distribution (Box-Muller over xorshift).
    fn normal_f32(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut out = Vec::with_capacity(n * 4);
        for _ in 0..n {
            let (u, v) = (next().max(1e-12), next());
            let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            out.extend_from_slice(&((z * 0.05) as f32).to_le_bytes());
        }
        out
    }

    #[test]
    fn plane_encoder_beats_zstd_level_1_on_weights() {
        let data = shuffle(&normal_f32(1 << 20, 7), 4);
        let ours = zstd_planes(&data, 4, 1).unwrap();
        let zstd1 = zstd::bulk::compress(&data, 1).unwrap();
        assert!(
            ours.len() < zstd1.len(),
            "plane encoder {} bytes, zstd-1 {}",
            ours.len(),
            zstd1.len()
        );
        assert_eq!(zstd::bulk::decompress(&ours, data.len()).unwrap(), data);
    }

    /// What any zlib decoder (flate2's, with its own Adler-32 check) makes of a stream.
    fn inflate(enc: &[u8], n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 1);
        let mut d = flate2::Decompress::new(true);
        let st = d
            .decompress_vec(enc, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(st, flate2::Status::StreamEnd);
        out
    }

    /// Plain zlib (the default strategy) at `level`, as h5py's deflate filter writes.
    fn plain_zlib(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn rle_planes_beat_plain_zlib_on_weights() {
        let data = shuffle(&normal_f32(1 << 20, 11), 4);
        for level in [1, 4, 9] {
            let ours = zlib_planes(&data, 4, level).unwrap();
            let plain = plain_zlib(&data, level);
            assert!(
                ours.len() < plain.len(),
                "level {level}: planes {} bytes, plain zlib {}",
                ours.len(),
                plain.len()
            );
            assert_eq!(inflate(&ours, data.len()), data);
        }
    }

    #[test]
    fn structured_planes_keep_the_default_strategys_matches() {
        // Position indices as int64: every plane repeats with period 256 or is constant, where
        // the default strategy's long matches beat run-length coding by far.
        let data: Vec<u8> = (0..200_000u64).flat_map(|i| i.to_le_bytes()).collect();
        let shuffled = shuffle(&data, 8);
        let ours = zlib_planes(&shuffled, 8, 4).unwrap();
        let plain = plain_zlib(&shuffled, 4);
        assert!(
            ours.len() <= plain.len() + plain.len() / 50 + 64,
            "planes {} bytes, plain zlib {}",
            ours.len(),
            plain.len()
        );
        assert_eq!(inflate(&ours, shuffled.len()), shuffled);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn zlib_planes_is_a_standard_stream(
            n in 0usize..120_000, es in prop::sample::select(vec![1usize, 2, 4, 8]),
            extra in 0usize..8, level in 1u32..=9, seed: u64, runs: bool,
        ) {
            let data = if runs {
                // Long runs and repeats: where RLE and the default strategy differ most.
                (0..n * es + extra).map(|i| ((i / 97) % 5) as u8).collect()
            } else {
                shuffle(&weights(n, seed, es, extra), es)
            };
            let enc = zlib_planes(&data, es, level).unwrap();
            prop_assert_eq!(inflate(&enc, data.len()), data.clone());
            let mut dst = vec![0u8; data.len()];
            let p = [FilterInfo { id: FILTER_DEFLATE, cd: vec![level] }];
            decode_into(&p, es, 0, &enc, data.len(), &mut dst).unwrap();
            prop_assert_eq!(dst, data);
        }
    }

    #[test]
    fn higher_levels_keep_zstds_own_frame_when_it_is_smaller() {
        // Few distinct values: long repeated strings in every plane, where matches win.
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| ((i % 977) as f32 * 0.25).to_le_bytes())
            .collect();
        let data = shuffle(&data, 4);
        let lit = zstd_planes(&data, 4, 1).unwrap();
        for level in [3, 9] {
            let ours = zstd_planes(&data, 4, level).unwrap();
            let own = zstd::bulk::compress(&data, level).unwrap();
            assert!(
                ours.len() <= own.len(),
                "level {level}: {} > {}",
                ours.len(),
                own.len()
            );
            assert!(
                ours.len() <= lit.len(),
                "level {level}: {} > {}",
                ours.len(),
                lit.len()
            );
            assert_eq!(zstd::bulk::decompress(&ours, data.len()).unwrap(), data);
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

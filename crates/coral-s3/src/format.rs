//! Object bodies: how weights, their metadata and deltas are laid out in objects.
//!
//! `docs/format.md` (section "s3") describes the same thing for readers without Coral:
//!
//! - a weight's data object (`weights/{hash}.npz`) is either a real NumPy `.npz` (a ZIP archive
//!   with one member `weight.npy`, stored or deflated: `numpy.load` reads it) when the store's
//!   compression is `none` or `gzip`, or the raw codec frame (zstd or lz4) of the byte-shuffled
//!   little-endian data when it is `zstd` or `lz4`;
//! - its metadata object (`metadata/{hash}.json`) is JSON: the weight's metadata plus a
//!   description of the data object (encoding, codec, size, ETag), and is written last, as the
//!   commit marker;
//! - a delta object (`deltas/{hash}.npz`) is a ZIP archive with two stored members, `delta.json`
//!   and `payload.bin`.

use std::io::{Read, Write};

use bytes::Bytes;
use coral_core::{
    codec::CodecSpec, hash::python_shape_repr, Codec, ContentHash, DType, Delta, DeltaType,
    JsonMap, WeightMetadata,
};
use serde::{Deserialize, Serialize};

/// Version tag of weight metadata objects.
pub const WEIGHT_FORMAT: &str = "coral.s3.weight.v1";
/// Version tag of delta objects.
pub const DELTA_FORMAT: &str = "coral.s3.delta.v1";
/// The member of a weight `.npz`.
pub const WEIGHT_MEMBER: &str = "weight.npy";

/// Why a body does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn ferr(m: impl Into<String>) -> FormatError {
    FormatError(m.into())
}

/// How a weight's data object is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// A NumPy `.npz`: ZIP with one member `weight.npy` (method 0 stored or 8 deflate).
    Npz,
    /// The codec's frame of the data, byte-shuffled first when `shuffle` is set.
    Raw,
}

/// The description of a data object kept in the metadata object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataObject {
    /// The data object's key, relative to the store's prefix ("weights/{hash}.npz").
    pub key: String,
    /// `npz` or `raw`.
    pub encoding: Encoding,
    /// The codec ("none", "gzip-6", "zstd-3", "lz4").
    pub codec: String,
    /// Raw encoding only: byte-plane shuffle before the codec.
    pub shuffle: bool,
    /// Bytes of the data object: a load checks them (a weight counts as present only when its
    /// data object is the one committed).
    pub size: u64,
    /// The ETag the server gave the data object, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    /// Bytes of the tensor data (shape × dtype size).
    pub nbytes: u64,
}

/// The metadata object: the weight's metadata and its data object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightRecord {
    /// [`WEIGHT_FORMAT`].
    pub format: String,
    /// The key (hex) the weight is stored under.
    pub key: ContentHash,
    /// "sha256" or "xxh3-64".
    pub hash_algorithm: String,
    /// The weight's metadata.
    pub metadata: WeightMetadata,
    /// The data object.
    pub data: DataObject,
}

impl WeightRecord {
    /// Parses and checks a metadata object read under `key`.
    pub fn from_json(bytes: &[u8], key: &ContentHash) -> Result<Self, FormatError> {
        let r: WeightRecord =
            serde_json::from_slice(bytes).map_err(|e| ferr(format!("metadata JSON: {e}")))?;
        if r.format != WEIGHT_FORMAT {
            return Err(ferr(format!("unknown format {:?}", r.format)));
        }
        if r.key != *key {
            return Err(ferr(format!("metadata names key {}, not {key}", r.key)));
        }
        let nbytes = r
            .metadata
            .checked_nbytes()
            .map_err(|e| ferr(e.to_string()))?;
        if nbytes as u64 != r.data.nbytes {
            return Err(ferr(format!(
                "data.nbytes {} disagrees with shape {:?} of {}",
                r.data.nbytes, r.metadata.shape, r.metadata.dtype
            )));
        }
        Ok(r)
    }
}

/// NumPy's `descr` for a dtype; dtypes NumPy lacks (bfloat16, float8) are stored as their bit
/// patterns (`<u2`, `|u1`), the real dtype being in the metadata object.
pub fn numpy_descr(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool => "|b1",
        DType::U8 | DType::F8E4M3 | DType::F8E5M2 => "|u1",
        DType::U16 | DType::BF16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::F16 => "<f2",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
    }
}

/// The `.npy` (version 1.0) header for a C-ordered array: magic, version, header length, the
/// Python dict padded with spaces to a multiple of 64 bytes, ending in a newline.
pub fn npy_header(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        numpy_descr(dtype),
        python_shape_repr(shape)
    );
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let hlen = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(10 + hlen);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(hlen as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    out
}

/// A ZIP member to write.
struct Member<'a> {
    name: &'a str,
    deflate: bool,
    crc: u32,
    uncompressed: u64,
    body: Vec<u8>,
}

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const END_SIG: u32 = 0x0605_4b50;
/// 1980-01-01 00:00 in MS-DOS format: members carry no time, so equal content gives equal bytes.
const DOS_DATE: u16 = (1 << 5) | 1;

fn zip(members: &[Member<'_>]) -> Result<Vec<u8>, FormatError> {
    let total: usize = members
        .iter()
        .map(|m| m.body.len() + 30 + 46 + 2 * m.name.len())
        .sum();
    let mut out = Vec::with_capacity(total + 22);
    let mut central = Vec::new();
    let big = |n: u64| n >= u64::from(u32::MAX);
    for m in members {
        if big(m.uncompressed) || big(m.body.len() as u64) || big(out.len() as u64) {
            return Err(ferr("member too large for a ZIP without ZIP64"));
        }
        let offset = out.len() as u32;
        let method: u16 = if m.deflate { 8 } else { 0 };
        let common = |buf: &mut Vec<u8>| {
            buf.extend_from_slice(&20u16.to_le_bytes()); // version needed
            buf.extend_from_slice(&0u16.to_le_bytes()); // flags
            buf.extend_from_slice(&method.to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes()); // time
            buf.extend_from_slice(&DOS_DATE.to_le_bytes());
            buf.extend_from_slice(&m.crc.to_le_bytes());
            buf.extend_from_slice(&(m.body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(m.uncompressed as u32).to_le_bytes());
            buf.extend_from_slice(&(m.name.len() as u16).to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes()); // extra length
        };
        out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(m.name.as_bytes());
        out.extend_from_slice(&m.body);

        central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend_from_slice(&0u16.to_le_bytes()); // comment length
        central.extend_from_slice(&0u16.to_le_bytes()); // disk number
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(m.name.as_bytes());
    }
    let cd_offset = out.len() as u64;
    if big(cd_offset + central.len() as u64) {
        return Err(ferr("archive too large for a ZIP without ZIP64"));
    }
    out.extend_from_slice(&central);
    out.extend_from_slice(&END_SIG.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&(cd_offset as u32).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    Ok(out)
}

/// A member read back: its name, method, CRC, sizes and compressed bytes.
struct ReadMember<'a> {
    name: &'a [u8],
    deflate: bool,
    crc: u32,
    uncompressed: usize,
    body: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, FormatError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| ferr("truncated ZIP header"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, FormatError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| ferr("truncated ZIP header"))
}

/// Reads the local headers of an archive as Coral writes it (sizes in the local headers, no data
/// descriptors), in order, until the central directory.
fn unzip(b: &[u8]) -> Result<Vec<ReadMember<'_>>, FormatError> {
    // Coral writes no archive comment: the end record is the last 22 bytes.
    let end = b
        .len()
        .checked_sub(22)
        .ok_or_else(|| ferr("too short for a ZIP archive"))?;
    if u32_at(b, end)? != END_SIG {
        return Err(ferr("no ZIP end record: the archive is truncated"));
    }
    let mut at = 0usize;
    let mut out = Vec::new();
    loop {
        let sig = u32_at(b, at)?;
        if sig == CENTRAL_SIG || sig == END_SIG {
            return Ok(out);
        }
        if sig != LOCAL_SIG {
            return Err(ferr(format!("no ZIP header at byte {at}")));
        }
        let flags = u16_at(b, at + 6)?;
        if flags & 0x0009 != 0 {
            return Err(ferr(
                "encrypted members or data descriptors are not supported",
            ));
        }
        let method = u16_at(b, at + 8)?;
        let crc = u32_at(b, at + 14)?;
        let csize = u32_at(b, at + 18)? as usize;
        let usize_ = u32_at(b, at + 22)? as usize;
        let nlen = usize::from(u16_at(b, at + 26)?);
        let xlen = usize::from(u16_at(b, at + 28)?);
        let name_start = at + 30;
        let data_start = name_start + nlen + xlen;
        let data_end = data_start
            .checked_add(csize)
            .ok_or_else(|| ferr("member size overflows"))?;
        let name = b
            .get(name_start..name_start + nlen)
            .ok_or_else(|| ferr("truncated member name"))?;
        let body = b
            .get(data_start..data_end)
            .ok_or_else(|| ferr("truncated member data"))?;
        let deflate = match method {
            0 => false,
            8 => true,
            m => return Err(ferr(format!("unsupported ZIP method {m}"))),
        };
        out.push(ReadMember {
            name,
            deflate,
            crc,
            uncompressed: usize_,
            body,
        });
        at = data_end;
    }
}

fn inflate_member(m: &ReadMember<'_>, expected: usize) -> Result<Vec<u8>, FormatError> {
    if m.uncompressed != expected {
        return Err(ferr(format!(
            "member holds {} bytes, expected {expected}",
            m.uncompressed
        )));
    }
    let data = if m.deflate {
        let mut out = Vec::new();
        out.try_reserve_exact(expected)
            .map_err(|_| ferr("cannot allocate"))?;
        flate2::read::DeflateDecoder::new(m.body)
            .take(expected as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| ferr(format!("deflate: {e}")))?;
        out
    } else {
        m.body.to_vec()
    };
    if data.len() != expected {
        return Err(ferr(format!(
            "member inflates to {} bytes, expected {expected}",
            data.len()
        )));
    }
    let mut crc = flate2::Crc::new();
    crc.update(&data);
    if crc.sum() != m.crc {
        return Err(ferr("member CRC-32 mismatch"));
    }
    Ok(data)
}

/// Input above this is deflated in independent pieces on several threads, as `pigz` does: each
/// piece but the last ends with a sync flush (an empty stored block), so the pieces concatenate
/// into one valid deflate stream.
const DEFLATE_PIECE: usize = 4 << 20;

/// Deflated pieces with their index.
type Pieces = Vec<(usize, Vec<u8>)>;

fn deflate_parallel(header: &[u8], data: &[u8], level: u32) -> Result<Vec<u8>, FormatError> {
    // The first piece is the (small) header and the start of the data; the rest are slices of
    // the data itself, never copied.
    let split = DEFLATE_PIECE.saturating_sub(header.len()).min(data.len());
    let (head, rest) = data.split_at(split);
    let mut first = Vec::new();
    first
        .try_reserve_exact(header.len() + head.len())
        .map_err(|_| ferr("cannot allocate"))?;
    first.extend_from_slice(header);
    first.extend_from_slice(head);
    let pieces: Vec<&[u8]> = std::iter::once(first.as_slice())
        .chain(rest.chunks(DEFLATE_PIECE))
        .collect();
    let last = pieces.len().saturating_sub(1);
    let deflate = |i: usize, piece: &[u8]| -> Result<Vec<u8>, FormatError> {
        let mut enc = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(piece.len()),
            flate2::Compression::new(level),
        );
        let e = |e: std::io::Error| ferr(format!("deflate: {e}"));
        enc.write_all(piece).map_err(e)?;
        if i == last {
            enc.finish().map_err(e)
        } else {
            enc.flush().map_err(e)?;
            Ok(std::mem::take(enc.get_mut()))
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(pieces.len())
        .max(1);
    if threads == 1 {
        let mut out = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            out.extend_from_slice(&deflate(i, p)?);
        }
        return Ok(out);
    }
    let results: Vec<Result<Pieces, FormatError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let pieces = &pieces;
                let deflate = &deflate;
                s.spawn(move || {
                    pieces
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % threads == t)
                        .map(|(i, p)| deflate(i, p).map(|b| (i, b)))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ferr("a deflate thread panicked")))
            })
            .collect()
    });
    let mut done: Vec<(usize, Vec<u8>)> = Vec::with_capacity(pieces.len());
    for r in results {
        done.extend(r?);
    }
    done.sort_by_key(|(i, _)| *i);
    let mut out = Vec::new();
    out.try_reserve_exact(done.iter().map(|(_, b)| b.len()).sum())
        .map_err(|_| ferr("cannot allocate"))?;
    for (_, b) in done {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

fn stored(name: &str, body: Vec<u8>) -> Member<'_> {
    let mut crc = flate2::Crc::new();
    crc.update(&body);
    Member {
        name,
        deflate: false,
        crc: crc.sum(),
        uncompressed: body.len() as u64,
        body,
    }
}

/// Encodes a weight's data as its data object with `codec`; returns the body and how it is
/// encoded.
pub fn encode_weight(
    meta: &WeightMetadata,
    data: &[u8],
    codec: Codec,
) -> Result<(Vec<u8>, Encoding, bool), FormatError> {
    match codec {
        Codec::None | Codec::Gzip { .. } if data.len() < (u32::MAX as usize) - 4096 => {
            let header = npy_header(meta.dtype, &meta.shape);
            let mut crc = flate2::Crc::new();
            crc.update(&header);
            crc.update(data);
            let uncompressed = (header.len() + data.len()) as u64;
            let (deflate, body) = match codec {
                Codec::Gzip { level } => (true, deflate_parallel(&header, data, level.min(9))?),
                _ => {
                    let mut b = header;
                    b.extend_from_slice(data);
                    (false, b)
                }
            };
            let body = zip(&[Member {
                name: WEIGHT_MEMBER,
                deflate,
                crc: crc.sum(),
                uncompressed,
                body,
            }])?;
            Ok((body, Encoding::Npz, false))
        }
        codec => {
            let spec = CodecSpec::new(codec, true);
            let body = spec
                .compress(data, meta.dtype.size())
                .map_err(|e| ferr(e.to_string()))?;
            Ok((body, Encoding::Raw, true))
        }
    }
}

/// Decodes a data object described by `record` back to the tensor's little-endian bytes.
pub fn decode_weight(record: &WeightRecord, body: &[u8]) -> Result<Vec<u8>, FormatError> {
    if body.len() as u64 != record.data.size {
        return Err(ferr(format!(
            "data object holds {} bytes, the committed one {}",
            body.len(),
            record.data.size
        )));
    }
    let meta = &record.metadata;
    let nbytes = usize::try_from(record.data.nbytes).map_err(|_| ferr("nbytes too large"))?;
    match record.data.encoding {
        Encoding::Npz => {
            let members = unzip(body)?;
            let m = members
                .iter()
                .find(|m| m.name == WEIGHT_MEMBER.as_bytes())
                .ok_or_else(|| ferr("no weight.npy member"))?;
            let header = npy_header(meta.dtype, &meta.shape);
            let mut all = inflate_member(m, header.len() + nbytes)?;
            if all.get(..header.len()) != Some(&header[..]) {
                return Err(ferr("npy header disagrees with the metadata"));
            }
            all.drain(..header.len());
            Ok(all)
        }
        Encoding::Raw => {
            let codec: Codec = record
                .data
                .codec
                .parse()
                .map_err(|e| ferr(format!("codec: {e}")))?;
            CodecSpec::new(codec, record.data.shuffle)
                .decompress(body, meta.dtype.size(), nbytes)
                .map_err(|e| ferr(e.to_string()))
        }
    }
}

/// The `delta.json` member of a delta object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaRecord {
    /// [`DELTA_FORMAT`].
    pub format: String,
    /// The key of the weight the delta encodes.
    pub key: ContentHash,
    /// The strategy.
    pub delta_type: DeltaType,
    /// The reference weight's key.
    pub reference_hash: ContentHash,
    /// Target shape.
    pub original_shape: Vec<usize>,
    /// Target dtype.
    pub original_dtype: DType,
    /// Target bytes / payload bytes.
    pub compression_ratio: f64,
    /// Strategy parameters.
    pub metadata: JsonMap,
    /// Bytes of `payload.bin`.
    pub payload_size: u64,
}

/// Encodes a delta object.
pub fn encode_delta(delta: &Delta, key: &ContentHash) -> Result<Vec<u8>, FormatError> {
    let rec = DeltaRecord {
        format: DELTA_FORMAT.to_owned(),
        key: *key,
        delta_type: delta.delta_type,
        reference_hash: delta.reference_hash,
        original_shape: delta.original_shape.clone(),
        original_dtype: delta.original_dtype,
        compression_ratio: delta.compression_ratio,
        metadata: delta.metadata.clone(),
        payload_size: delta.data.len() as u64,
    };
    let json = serde_json::to_vec(&rec).map_err(|e| ferr(e.to_string()))?;
    zip(&[
        stored("delta.json", json),
        stored("payload.bin", delta.data.to_vec()),
    ])
}

/// Decodes a delta object read under `key`.
pub fn decode_delta(body: &[u8], key: &ContentHash) -> Result<Delta, FormatError> {
    let members = unzip(body)?;
    let find = |n: &str| {
        members
            .iter()
            .find(|m| m.name == n.as_bytes())
            .ok_or_else(|| ferr(format!("no {n} member")))
    };
    let j = find("delta.json")?;
    let json = inflate_member(j, j.uncompressed)?;
    let rec: DeltaRecord =
        serde_json::from_slice(&json).map_err(|e| ferr(format!("delta.json: {e}")))?;
    if rec.format != DELTA_FORMAT {
        return Err(ferr(format!("unknown format {:?}", rec.format)));
    }
    if rec.key != *key {
        return Err(ferr(format!("delta names key {}, not {key}", rec.key)));
    }
    let p = find("payload.bin")?;
    let size = usize::try_from(rec.payload_size).map_err(|_| ferr("payload too large"))?;
    let payload = inflate_member(p, size)?;
    Ok(Delta {
        delta_type: rec.delta_type,
        data: Bytes::from(payload),
        metadata: rec.metadata,
        original_shape: rec.original_shape,
        original_dtype: rec.original_dtype,
        reference_hash: rec.reference_hash,
        compression_ratio: rec.compression_ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(
        meta: &WeightMetadata,
        body: &[u8],
        enc: Encoding,
        codec: Codec,
        shuffle: bool,
    ) -> WeightRecord {
        let key = ContentHash::Sha256([7; 32]);
        WeightRecord {
            format: WEIGHT_FORMAT.to_owned(),
            key,
            hash_algorithm: "sha256".to_owned(),
            metadata: meta.clone(),
            data: DataObject {
                key: "weights/x.npz".to_owned(),
                encoding: enc,
                codec: codec.to_string(),
                shuffle,
                size: body.len() as u64,
                e_tag: None,
                nbytes: meta.checked_nbytes().unwrap() as u64,
            },
        }
    }

    #[test]
    fn parallel_deflate_is_one_valid_stream() {
        let n = DEFLATE_PIECE * 2 + 12345;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (i / 7919) as u8).collect();
        let meta = WeightMetadata::new("w", vec![n], DType::U8);
        let codec = Codec::Gzip { level: 1 };
        let (body, enc, sh) = encode_weight(&meta, &data, codec).unwrap();
        let rec = record(&meta, &body, enc, codec, sh);
        assert!(decode_weight(&rec, &body).unwrap() == data);
        // Any inflater reads it as one stream.
        let mut out = Vec::new();
        let members = unzip(&body).unwrap();
        flate2::read::DeflateDecoder::new(members[0].body)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(&out[npy_header(DType::U8, &[n]).len()..], &data[..]);
    }

    #[test]
    fn npy_header_is_aligned() {
        for shape in [vec![], vec![3], vec![2, 3], vec![1000, 1000, 7]] {
            let h = npy_header(DType::F32, &shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(h.last(), Some(&b'\n'));
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize + 10, h.len());
        }
    }

    #[test]
    fn corrupt_bodies_are_errors() {
        let meta = WeightMetadata::new("w", vec![16], DType::F32);
        let data = vec![1u8; 64];
        let (body, enc, sh) = encode_weight(&meta, &data, Codec::Gzip { level: 6 }).unwrap();
        let rec = record(&meta, &body, enc, Codec::Gzip { level: 6 }, sh);
        assert_eq!(decode_weight(&rec, &body).unwrap(), data);
        for cut in [0, 10, 40, body.len() - 1] {
            let mut short = rec.clone();
            short.data.size = cut as u64;
            assert!(decode_weight(&short, &body[..cut]).is_err());
        }
        let mut flipped = body.clone();
        flipped[45] ^= 0xff;
        assert!(decode_weight(&rec, &flipped).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn weight_bodies_round_trip(
            dt in 0usize..DType::ALL.len(),
            n in 0usize..300,
            codec in prop::sample::select(vec!["none", "gzip-1", "gzip-6", "zstd-3", "lz4"]),
            seed in any::<u64>(),
        ) {
            let dtype = DType::ALL[dt];
            let mut x = seed;
            let data: Vec<u8> = (0..n * dtype.size()).map(|_| { x = x.wrapping_mul(6364136223846793005).wrapping_add(1); (x >> 56) as u8 }).collect();
            let meta = WeightMetadata::new("w", vec![n], dtype);
            let codec: Codec = codec.parse().unwrap();
            let (body, enc, sh) = encode_weight(&meta, &data, codec).unwrap();
            let rec = record(&meta, &body, enc, codec, sh);
            prop_assert_eq!(decode_weight(&rec, &body).unwrap(), data);
        }

        #[test]
        fn hostile_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..400), npz in any::<bool>()) {
            let meta = WeightMetadata::new("w", vec![8], DType::F32);
            let codec = if npz { Codec::Gzip { level: 6 } } else { Codec::Zstd { level: 3 } };
            let enc = if npz { Encoding::Npz } else { Encoding::Raw };
            let rec = record(&meta, &body, enc, codec, !npz);
            let _ = decode_weight(&rec, &body);
            let _ = decode_delta(&body, &ContentHash::Sha256([1; 32]));
        }

        #[test]
        fn delta_bodies_round_trip(payload in prop::collection::vec(any::<u8>(), 0..500), ratio in 0.0f64..100.0) {
            let key = ContentHash::Sha256([3; 32]);
            let mut m = JsonMap::new();
            m.insert("scale".into(), serde_json::json!(0.5));
            let d = Delta {
                delta_type: DeltaType::Compressed,
                data: Bytes::from(payload),
                metadata: m,
                original_shape: vec![2, 5],
                original_dtype: DType::F32,
                reference_hash: ContentHash::Sha256([9; 32]),
                compression_ratio: ratio,
            };
            let body = encode_delta(&d, &key).unwrap();
            prop_assert_eq!(decode_delta(&body, &key).unwrap(), d);
            prop_assert!(decode_delta(&body, &ContentHash::Sha256([4; 32])).is_err());
        }
    }
}

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
//!
//! The `.npy` headers and the archives come from `coral-formats`: headers with
//! [`NonNumpy::RawBits`] (bfloat16 and float8 as their bit patterns, the real dtype being in the
//! metadata object), archives written by [`compact`] (the exact bytes coral-s3 has always
//! written) and read with the `zip` crate.

use bytes::Bytes;
use coral_core::{
    codec::CodecSpec, Codec, ContentHash, DType, Delta, DeltaType, JsonMap, WeightMetadata,
};
use coral_formats::npy::{self, NonNumpy};
use coral_formats::npz::{self, compact};
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

/// The `.npy` (version 1.0) header of a weight's `weight.npy`: bfloat16 and float8 as their bit
/// patterns (`<u2`, `|u1`).
fn npy_header(dtype: DType, shape: &[usize]) -> Result<Vec<u8>, FormatError> {
    npy::header_bytes(dtype, shape, NonNumpy::RawBits).map_err(|e| ferr(e.to_string()))
}

fn zip_err(e: npz::NpzError) -> FormatError {
    ferr(e.to_string())
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
            let header = npy_header(meta.dtype, &meta.shape)?;
            let crc = compact::crc32(&[&header, data]);
            let uncompressed = (header.len() + data.len()) as u64;
            let (deflate, body) = match codec {
                Codec::Gzip { level } => (
                    true,
                    compact::deflate_parallel(&header, data, level.min(9)).map_err(zip_err)?,
                ),
                _ => {
                    let mut b = header;
                    b.extend_from_slice(data);
                    (false, b)
                }
            };
            let body = compact::write(&[compact::Member {
                name: WEIGHT_MEMBER,
                deflate,
                crc,
                uncompressed,
                body,
            }])
            .map_err(zip_err)?;
            Ok((body, Encoding::Npz, false))
        }
        Codec::Coral => {
            // Rows as the tensor has them: the codec models its columns too.
            let row_values = meta.shape.iter().skip(1).product::<usize>();
            let body = coral_core::codec::coral_encode(
                coral_core::codec::coral_kind(meta.dtype),
                data,
                row_values,
            )
            .map_err(|e| ferr(e.to_string()))?;
            Ok((body, Encoding::Raw, false))
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
            let header = npy_header(meta.dtype, &meta.shape)?;
            let expected = (header.len() as u64)
                .checked_add(nbytes as u64)
                .ok_or_else(|| ferr("nbytes too large"))?;
            let mut all = npz::read_member(body, WEIGHT_MEMBER, Some(expected)).map_err(zip_err)?;
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
    compact::write(&[
        compact::Member::stored("delta.json", json),
        compact::Member::stored("payload.bin", delta.data.to_vec()),
    ])
    .map_err(zip_err)
}

/// Decodes a delta object read under `key`.
pub fn decode_delta(body: &[u8], key: &ContentHash) -> Result<Delta, FormatError> {
    let json = npz::read_member(body, "delta.json", None).map_err(zip_err)?;
    let rec: DeltaRecord =
        serde_json::from_slice(&json).map_err(|e| ferr(format!("delta.json: {e}")))?;
    if rec.format != DELTA_FORMAT {
        return Err(ferr(format!("unknown format {:?}", rec.format)));
    }
    if rec.key != *key {
        return Err(ferr(format!("delta names key {}, not {key}", rec.key)));
    }
    let payload = npz::read_member(body, "payload.bin", Some(rec.payload_size)).map_err(zip_err)?;
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
        let n = compact::DEFLATE_PIECE * 2 + 12345;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (i / 7919) as u8).collect();
        let meta = WeightMetadata::new("w", vec![n], DType::U8);
        let codec = Codec::Gzip { level: 1 };
        let (body, enc, sh) = encode_weight(&meta, &data, codec).unwrap();
        let rec = record(&meta, &body, enc, codec, sh);
        assert!(decode_weight(&rec, &body).unwrap() == data);
        // The zip crate reads it as one stream, as any inflater does.
        let members = npz::read(&body).unwrap();
        assert_eq!(members[0].0, WEIGHT_MEMBER);
        let header = npy_header(DType::U8, &[n]).unwrap();
        assert_eq!(&members[0].1[header.len()..], &data[..]);
    }

    #[test]
    fn npy_header_is_aligned() {
        for shape in [vec![], vec![3], vec![2, 3], vec![1000, 1000, 7]] {
            let h = npy_header(DType::F32, &shape).unwrap();
            assert_eq!(h.len() % 64, 0);
            assert_eq!(h.last(), Some(&b'\n'));
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize + 10, h.len());
        }
    }

    /// A stored weight object of bfloat16 data, byte for byte as coral-s3 wrote it before its
    /// npy and zip code moved to coral-formats (docs/format.md, "Data object"): stores written
    /// then must keep reading, and a weight written now must be the same object.
    #[test]
    fn weight_objects_keep_their_bytes() {
        let meta = WeightMetadata::new("w", vec![2, 3], DType::BF16);
        let data: Vec<u8> = (0..12u8).collect();
        let (body, enc, _) = encode_weight(&meta, &data, Codec::None).unwrap();
        assert_eq!(enc, Encoding::Npz);
        let mut npy =
            b"\x93NUMPY\x01\x00\x76\x00{'descr': '<u2', 'fortran_order': False, 'shape': (2, 3), }"
                .to_vec();
        npy.resize(127, b' ');
        npy.push(b'\n');
        npy.extend_from_slice(&data);
        let mut crc = flate2::Crc::new();
        crc.update(&npy);
        let crc = crc.sum().to_le_bytes();
        let size = (npy.len() as u32).to_le_bytes();
        let mut want = b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00".to_vec();
        want.extend_from_slice(&crc);
        want.extend_from_slice(&size);
        want.extend_from_slice(&size);
        want.extend_from_slice(b"\x0a\x00\x00\x00weight.npy");
        want.extend_from_slice(&npy);
        let cd = want.len() as u32;
        want.extend_from_slice(b"PK\x01\x02\x14\x00\x14\x00\x00\x00\x00\x00\x00\x00\x21\x00");
        want.extend_from_slice(&crc);
        want.extend_from_slice(&size);
        want.extend_from_slice(&size);
        want.extend_from_slice(b"\x0a\x00");
        want.extend_from_slice(&[0; 16]);
        want.extend_from_slice(b"weight.npy");
        want.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00\x01\x00\x01\x00\x38\x00\x00\x00");
        want.extend_from_slice(&cd.to_le_bytes());
        want.extend_from_slice(&[0, 0]);
        assert_eq!(body, want);
        let rec = record(&meta, &body, enc, Codec::None, false);
        assert_eq!(decode_weight(&rec, &body).unwrap(), data);
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
            codec in prop::sample::select(vec!["none", "gzip-1", "gzip-6", "zstd-3", "lz4", "coral"]),
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

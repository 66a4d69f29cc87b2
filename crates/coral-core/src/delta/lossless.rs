//! The five lossless strategies. All of them work on bit patterns only, so decoding gives back
//! every bit of every value (NaN payloads, infinities, -0.0, subnormals).

use crate::codec::CodecSpec;
use crate::delta::payload::{
    add_unzigzag, bytes_for, codec_from_meta, codec_to_meta, err, float_layout, join_exponent, mul,
    pack, split_exponent, split_sections, sub_zigzag, two_sections, unpack, wrapping_add,
    wrapping_sub, xor,
};
use crate::delta::DeltaType;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::JsonMap;

/// Encodes `t` against `r` (same length, whole elements of `dtype`) with a lossless strategy.
/// Adds the strategy's keys to `meta`.
pub(crate) fn encode(
    name: &str,
    kind: DeltaType,
    dtype: DType,
    t: &[u8],
    r: &[u8],
    spec: CodecSpec,
    meta: &mut JsonMap,
) -> Result<Vec<u8>> {
    let w = dtype.size();
    match kind {
        DeltaType::Float32Raw => Ok(wrapping_sub(t, r, w)),
        DeltaType::Compressed => {
            codec_to_meta(spec, meta);
            pack(name, spec, &sub_zigzag(t, r, w), w)
        }
        DeltaType::XorFloat32 | DeltaType::XorBfloat16 => {
            codec_to_meta(spec, meta);
            pack(name, spec, &xor(t, r), w)
        }
        DeltaType::ExponentMantissa => {
            let (e, m) = float_layout(dtype)
                .ok_or_else(|| err(name, format!("{kind} does not accept {dtype}")))?;
            codec_to_meta(spec, meta);
            let (ex, rest) = split_exponent(&xor(t, r), w, e, m);
            let a = pack(name, spec, &ex, bytes_for(e))?;
            let b = pack(name, spec, &rest, bytes_for(m + 1))?;
            Ok(two_sections(&a, &b))
        }
        _ => Err(err(name, format!("{kind} is not lossless"))),
    }
}

/// Decodes a lossless payload against the reference bytes `r`; returns the target bytes.
pub(crate) fn decode(
    name: &str,
    kind: DeltaType,
    dtype: DType,
    data: &[u8],
    r: &[u8],
    meta: &JsonMap,
) -> Result<Vec<u8>> {
    let w = dtype.size();
    let nbytes = r.len();
    match kind {
        DeltaType::Float32Raw => {
            if data.len() != nbytes {
                return Err(err(
                    name,
                    format!("{kind} payload has {} bytes, expected {nbytes}", data.len()),
                ));
            }
            Ok(wrapping_add(data, r, w))
        }
        DeltaType::Compressed => {
            let spec = codec_from_meta(name, meta)?;
            let z = unpack(name, spec, data, w, nbytes)?;
            Ok(add_unzigzag(&z, r, w))
        }
        DeltaType::XorFloat32 | DeltaType::XorBfloat16 => {
            let spec = codec_from_meta(name, meta)?;
            let x = unpack(name, spec, data, w, nbytes)?;
            Ok(xor(&x, r))
        }
        DeltaType::ExponentMantissa => {
            let (e, m) = float_layout(dtype)
                .ok_or_else(|| err(name, format!("{kind} does not accept {dtype}")))?;
            let spec = codec_from_meta(name, meta)?;
            let n = nbytes / w.max(1);
            let (a, b) = split_sections(name, data)?;
            let (ew, rw) = (bytes_for(e), bytes_for(m + 1));
            let ex = unpack(name, spec, a, ew, mul(name, n, ew)?)?;
            let rest = unpack(name, spec, b, rw, mul(name, n, rw)?)?;
            let x = join_exponent(&ex, &rest, w, e, m);
            Ok(xor(&x, r))
        }
        _ => Err(err(name, format!("{kind} is not lossless"))),
    }
}

//! Helpers shared by the strategies: element-wise bit-pattern arithmetic, payload sections,
//! metadata access and float conversions. Nothing here panics on malformed input.

use serde_json::Value;

use crate::codec::{Codec, CodecSpec};
use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::tensor::JsonMap;

/// A delta error with the tensor name it concerns.
pub(crate) fn err(name: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Delta(format!("tensor {name:?}: {msg}"))
}

/// Reads an unsigned little-endian integer of `bytes.len()` (1..=8) bytes.
#[inline]
pub(crate) fn load_le(bytes: &[u8]) -> u64 {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(8) {
        v |= u64::from(b) << (8 * i);
    }
    v
}

/// Appends the `width` low bytes of `v`, little-endian.
#[cfg(test)]
fn store_le(v: u64, width: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&v.to_le_bytes()[..width.min(8)]);
}

/// Mask of the `width * 8` low bits.
#[inline]
fn mask(width: usize) -> u64 {
    if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    }
}

macro_rules! map2 {
    ($a:expr, $b:expr, $w:expr, |$x:ident: $t:ty, $y:ident| $body:expr) => {{
        let mut out = Vec::with_capacity($a.len());
        for (ca, cb) in $a.chunks_exact($w).zip($b.chunks_exact($w)) {
            let mut xa = [0u8; std::mem::size_of::<$t>()];
            let mut xb = [0u8; std::mem::size_of::<$t>()];
            xa.copy_from_slice(ca);
            xb.copy_from_slice(cb);
            let $x = <$t>::from_le_bytes(xa);
            let $y = <$t>::from_le_bytes(xb);
            out.extend_from_slice(&($body).to_le_bytes());
        }
        out
    }};
}

macro_rules! by_width {
    ($a:expr, $b:expr, $w:expr, |$x:ident, $y:ident| $body:expr) => {
        match $w {
            1 => map2!($a, $b, 1, |$x: u8, $y| $body),
            2 => map2!($a, $b, 2, |$x: u16, $y| $body),
            4 => map2!($a, $b, 4, |$x: u32, $y| $body),
            _ => map2!($a, $b, 8, |$x: u64, $y| $body),
        }
    };
}

/// Zigzag of a wrapping difference, for widths 1, 2, 4, 8 (`t ⊖ r`, then `(s << 1) ^ (s >> w-1)`
/// with `s` read as signed).
pub(crate) fn sub_zigzag(t: &[u8], r: &[u8], width: usize) -> Vec<u8> {
    macro_rules! zz {
        ($u:ty, $i:ty) => {
            |x: $u, y: $u| -> $u {
                let s = x.wrapping_sub(y) as $i;
                ((s << 1) ^ (s >> (<$i>::BITS - 1))) as $u
            }
        };
    }
    match width {
        1 => map2!(t, r, 1, |x: u8, y| zz!(u8, i8)(x, y)),
        2 => map2!(t, r, 2, |x: u16, y| zz!(u16, i16)(x, y)),
        4 => map2!(t, r, 4, |x: u32, y| zz!(u32, i32)(x, y)),
        _ => map2!(t, r, 8, |x: u64, y| zz!(u64, i64)(x, y)),
    }
}

/// Inverse of [`sub_zigzag`]: `r ⊕ unzigzag(z)`.
pub(crate) fn add_unzigzag(z: &[u8], r: &[u8], width: usize) -> Vec<u8> {
    by_width!(z, r, width, |x, y| y
        .wrapping_add((x >> 1) ^ (x & 1).wrapping_neg()))
}

/// `t ⊖ r`, element-wise.
pub(crate) fn wrapping_sub(t: &[u8], r: &[u8], width: usize) -> Vec<u8> {
    by_width!(t, r, width, |x, y| x.wrapping_sub(y))
}

/// `d ⊕ r`, element-wise.
pub(crate) fn wrapping_add(d: &[u8], r: &[u8], width: usize) -> Vec<u8> {
    by_width!(d, r, width, |x, y| x.wrapping_add(y))
}

/// Byte-wise XOR (the same for every element width).
pub(crate) fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// Exponent and mantissa widths of a float dtype.
pub(crate) fn float_layout(dtype: DType) -> Option<(u32, u32)> {
    match dtype {
        DType::F16 => Some((5, 10)),
        DType::BF16 => Some((8, 7)),
        DType::F32 => Some((8, 23)),
        DType::F64 => Some((11, 52)),
        DType::F8E4M3 => Some((4, 3)),
        DType::F8E5M2 => Some((5, 2)),
        _ => None,
    }
}

/// Bytes needed for `bits` bits.
pub(crate) const fn bytes_for(bits: u32) -> usize {
    bits.div_ceil(8) as usize
}

/// Splits each element into (exponent, sign-and-mantissa) planes, little-endian.
pub(crate) fn split_exponent(data: &[u8], width: usize, e: u32, m: u32) -> (Vec<u8>, Vec<u8>) {
    let (ew, rw) = (bytes_for(e), bytes_for(m + 1));
    let n = data.len() / width.max(1);
    let mut ex = vec![0u8; n * ew];
    let mut rest = vec![0u8; n * rw];
    match (width, e, m) {
        // Fast paths for the common dtypes; the generic loop below gives the same bytes.
        (4, 8, 23) => {
            for ((c, xe), xr) in data
                .chunks_exact(4)
                .zip(ex.iter_mut())
                .zip(rest.chunks_exact_mut(3))
            {
                let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                *xe = (x >> 23) as u8;
                let r = ((x >> 31) << 23) | (x & 0x7f_ffff);
                xr.copy_from_slice(&r.to_le_bytes()[..3]);
            }
        }
        (2, 8, 7) => {
            for ((c, xe), xr) in data.chunks_exact(2).zip(ex.iter_mut()).zip(rest.iter_mut()) {
                let x = u16::from_le_bytes([c[0], c[1]]);
                *xe = (x >> 7) as u8;
                *xr = (((x >> 15) << 7) | (x & 0x7f)) as u8;
            }
        }
        _ => {
            let emask = (1u64 << e) - 1;
            let mmask = (1u64 << m) - 1;
            for ((c, xe), xr) in data
                .chunks_exact(width.max(1))
                .zip(ex.chunks_exact_mut(ew.max(1)))
                .zip(rest.chunks_exact_mut(rw.max(1)))
            {
                let x = load_le(c) & mask(width);
                xe.copy_from_slice(&((x >> m) & emask).to_le_bytes()[..ew]);
                let r = (((x >> (e + m)) & 1) << m) | (x & mmask);
                xr.copy_from_slice(&r.to_le_bytes()[..rw]);
            }
        }
    }
    (ex, rest)
}

/// Inverse of [`split_exponent`]. The planes must hold the same number of elements.
pub(crate) fn join_exponent(ex: &[u8], rest: &[u8], width: usize, e: u32, m: u32) -> Vec<u8> {
    let (ew, rw) = (bytes_for(e), bytes_for(m + 1));
    let n = (ex.len() / ew.max(1)).min(rest.len() / rw.max(1));
    let mut out = vec![0u8; n * width];
    match (width, e, m) {
        (4, 8, 23) => {
            for ((o, &xe), xr) in out
                .chunks_exact_mut(4)
                .zip(ex.iter())
                .zip(rest.chunks_exact(3))
            {
                let r = u32::from_le_bytes([xr[0], xr[1], xr[2], 0]);
                let x = ((r >> 23) << 31) | (u32::from(xe) << 23) | (r & 0x7f_ffff);
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        (2, 8, 7) => {
            for ((o, &xe), &xr) in out.chunks_exact_mut(2).zip(ex.iter()).zip(rest.iter()) {
                let r = u16::from(xr);
                let x = ((r >> 7) << 15) | (u16::from(xe) << 7) | (r & 0x7f);
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        _ => {
            let emask = (1u64 << e) - 1;
            let mmask = (1u64 << m) - 1;
            for ((o, ce), cr) in out
                .chunks_exact_mut(width.max(1))
                .zip(ex.chunks_exact(ew.max(1)))
                .zip(rest.chunks_exact(rw.max(1)))
            {
                let ev = load_le(ce) & emask;
                let rv = load_le(cr);
                let sign = (rv >> m) & 1;
                let x = (sign << (e + m)) | (ev << m) | (rv & mmask);
                o.copy_from_slice(&x.to_le_bytes()[..width.min(8)]);
            }
        }
    }
    out
}

/// Payload of two sections: `u64 LE len(a) ‖ a ‖ b`.
pub(crate) fn two_sections(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + a.len() + b.len());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}

/// Splits a two-section payload; a length that runs past the end is an error.
pub(crate) fn split_sections<'a>(name: &str, data: &'a [u8]) -> Result<(&'a [u8], &'a [u8])> {
    let head = data
        .get(..8)
        .ok_or_else(|| err(name, "payload shorter than its 8-byte section header"))?;
    let len = load_le(head);
    let body = data.get(8..).unwrap_or_default();
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= body.len())
        .ok_or_else(|| {
            err(
                name,
                format!(
                    "first section of {len} bytes runs past the payload's {} bytes",
                    body.len()
                ),
            )
        })?;
    Ok(body.split_at(len))
}

/// The codec recorded under "codec" and "shuffle".
pub(crate) fn codec_from_meta(name: &str, meta: &JsonMap) -> Result<CodecSpec> {
    let codec: Codec = get_str(name, meta, "codec")?
        .parse()
        .map_err(|e| err(name, format!("metadata \"codec\": {e}")))?;
    let shuffle = match meta.get("shuffle") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err(name, "metadata \"shuffle\" is not a boolean")),
        None => false,
    };
    Ok(CodecSpec::new(codec, shuffle))
}

/// Records `spec` under "codec" and "shuffle".
pub(crate) fn codec_to_meta(spec: CodecSpec, meta: &mut JsonMap) {
    meta.insert("codec".into(), Value::String(spec.codec.to_string()));
    meta.insert("shuffle".into(), Value::Bool(spec.shuffle));
}

/// A string field.
pub(crate) fn get_str<'a>(name: &str, meta: &'a JsonMap, key: &str) -> Result<&'a str> {
    meta.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| err(name, format!("metadata {key:?} is missing or not a string")))
}

/// A finite number field.
pub(crate) fn get_f64(name: &str, meta: &JsonMap, key: &str) -> Result<f64> {
    meta.get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            err(
                name,
                format!("metadata {key:?} is missing or not a finite number"),
            )
        })
}

/// A non-negative integer field.
pub(crate) fn get_u64(name: &str, meta: &JsonMap, key: &str) -> Result<u64> {
    meta.get(key).and_then(Value::as_u64).ok_or_else(|| {
        err(
            name,
            format!("metadata {key:?} is missing or not a non-negative integer"),
        )
    })
}

/// `a * b`, or an error when it overflows.
pub(crate) fn mul(name: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| err(name, format!("size {a} x {b} overflows")))
}

/// Element value as f64 (f16, bf16, f32, f64 only; others read as 0).
#[inline]
pub(crate) fn to_f64(dtype: DType, c: &[u8]) -> f64 {
    let x = load_le(c);
    match dtype {
        DType::F16 => half::f16::from_bits(x as u16).to_f64(),
        DType::BF16 => half::bf16::from_bits(x as u16).to_f64(),
        DType::F32 => f64::from(f32::from_bits(x as u32)),
        DType::F64 => f64::from_bits(x),
        _ => 0.0,
    }
}

/// Largest finite value of a float dtype (f16, bf16, f32, f64).
pub(crate) fn finite_max(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        DType::F32 => f64::from(f32::MAX),
        _ => f64::MAX,
    }
}

/// Rounds `v` to `dtype` (to nearest, ties to even) and appends its bytes.
#[inline]
pub(crate) fn push_f64(dtype: DType, v: f64, out: &mut Vec<u8>) {
    match dtype {
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        _ => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Compresses with `spec` (element width `width`), as one section.
pub(crate) fn pack(name: &str, spec: CodecSpec, data: &[u8], width: usize) -> Result<Vec<u8>> {
    spec.compress(data, width)
        .map_err(|e| err(name, format!("compressing: {e}")))
}

/// Decompresses one section to exactly `len` bytes.
pub(crate) fn unpack(
    name: &str,
    spec: CodecSpec,
    data: &[u8],
    width: usize,
    len: usize,
) -> Result<Vec<u8>> {
    spec.decompress(data, width, len)
        .map_err(|e| err(name, format!("payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips_every_width() {
        for w in [1usize, 2, 4, 8] {
            let t: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
            let r: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(91) ^ 0xa5).collect();
            let z = sub_zigzag(&t, &r, w);
            assert_eq!(add_unzigzag(&z, &r, w), t, "width {w}");
            assert_eq!(wrapping_add(&wrapping_sub(&t, &r, w), &r, w), t);
        }
        // Small differences give small codes: -1 -> 1, +1 -> 2.
        assert_eq!(sub_zigzag(&[4, 0], &[5, 0], 2), vec![1, 0]);
        assert_eq!(sub_zigzag(&[6, 0], &[5, 0], 2), vec![2, 0]);
    }

    #[test]
    fn exponent_split_round_trips() {
        for (dt, w) in [
            (DType::F16, 2),
            (DType::BF16, 2),
            (DType::F32, 4),
            (DType::F64, 8),
            (DType::F8E4M3, 1),
        ] {
            let (e, m) = float_layout(dt).unwrap();
            let data: Vec<u8> = (0..(16 * w) as u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
                .collect();
            let (ex, rest) = split_exponent(&data, w, e, m);
            assert_eq!(join_exponent(&ex, &rest, w, e, m), data, "{dt}");
        }
        // The fast paths give the bytes the definition gives.
        let data: Vec<u8> = (0..4000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
            .collect();
        let (ex, rest) = split_exponent(&data, 4, 8, 23);
        let mut generic_ex = Vec::new();
        let mut generic_rest = Vec::new();
        for c in data.chunks_exact(4) {
            let x = load_le(c);
            store_le((x >> 23) & 0xff, 1, &mut generic_ex);
            store_le(
                (((x >> 31) & 1) << 23) | (x & 0x7f_ffff),
                3,
                &mut generic_rest,
            );
        }
        assert_eq!((ex, rest), (generic_ex, generic_rest));
        let (ex, rest) = split_exponent(&data, 2, 8, 7);
        let (mut ge, mut gr) = (Vec::new(), Vec::new());
        for c in data.chunks_exact(2) {
            let x = load_le(c);
            store_le((x >> 7) & 0xff, 1, &mut ge);
            store_le((((x >> 15) & 1) << 7) | (x & 0x7f), 1, &mut gr);
        }
        assert_eq!((ex, rest), (ge, gr));
        // f32 1.0 = 0x3f800000: exponent 127, sign 0, mantissa 0.
        let (ex, rest) = split_exponent(&1.0f32.to_le_bytes(), 4, 8, 23);
        assert_eq!(ex, vec![127]);
        assert_eq!(rest, vec![0, 0, 0]);
    }

    #[test]
    fn sections_refuse_bad_lengths() {
        let p = two_sections(b"abc", b"de");
        assert_eq!(split_sections("w", &p).unwrap(), (&b"abc"[..], &b"de"[..]));
        assert!(split_sections("w", &p[..5]).is_err());
        let mut bad = p.clone();
        bad[0] = 200;
        assert!(split_sections("w", &bad).is_err());
        bad[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(split_sections("w", &bad).is_err());
    }
}

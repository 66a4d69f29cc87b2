//! The four lossy strategies: quantized differences (one scale, or one per row) and sparse
//! differences. They accept float16, bfloat16, float32 and float64.

use serde_json::Value;

use crate::codec::CodecSpec;
use crate::delta::payload::{
    codec_from_meta, codec_to_meta, err, finite_max, get_f64, get_u64, load_le, mul, pack,
    push_f64, split_sections, to_f64, two_sections, unpack,
};
use crate::delta::DeltaType;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::JsonMap;

/// Differences `t - r` in f64; `None` when one is not finite.
pub(crate) fn finite_diffs(dtype: DType, t: &[u8], r: &[u8]) -> Option<Vec<f64>> {
    let w = dtype.size();
    let mut out = Vec::with_capacity(t.len() / w.max(1));
    for (a, b) in t.chunks_exact(w).zip(r.chunks_exact(w)) {
        let d = to_f64(dtype, a) - to_f64(dtype, b);
        if !d.is_finite() {
            return None;
        }
        out.push(d);
    }
    Some(out)
}

/// True when `sparse` keeps an element whose difference is `d`: `|d| > threshold`, NaN and
/// infinite differences included.
pub(crate) fn kept(d: f64, threshold: f64) -> bool {
    d.is_nan() || d.abs() > threshold
}

/// Rows of the first axis for `per_axis_scaled`: `shape[0]` for two or more dimensions, else 1.
pub(crate) fn rows_of(shape: &[usize]) -> usize {
    match shape {
        [rows, _, ..] => *rows,
        _ => 1,
    }
}

/// Scale and offset for `ds` at `bits`, or `None` when the range overflows.
fn scale_offset(ds: &[f64], bits: u32) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &d in ds {
        lo = lo.min(d);
        hi = hi.max(d);
    }
    if ds.is_empty() {
        return Some((0.0, 0.0));
    }
    let range = hi - lo;
    if !range.is_finite() {
        return None;
    }
    if range == 0.0 {
        return Some((0.0, lo));
    }
    let levels = f64::from((1u32 << bits) - 1);
    let mut scale = (range / levels).max(f64::from_bits(1));
    // Round the scale up until it covers the range, so no code is clamped by more than scale/2.
    for _ in 0..8 {
        if scale * levels >= range {
            break;
        }
        scale = f64::from_bits(scale.to_bits() + 1);
    }
    Some((scale, lo))
}

/// Appends the codes of `ds` as signed little-endian integers of `bits / 8` bytes.
fn quantize_into(ds: &[f64], scale: f64, offset: f64, bits: u32, out: &mut Vec<u8>) {
    let levels = f64::from((1u32 << bits) - 1);
    let half = 1i64 << (bits - 1);
    for &d in ds {
        // Non-negative, so adding 0.5 and truncating rounds to nearest (ties up); `as`
        // saturates.
        let u = if scale > 0.0 {
            (((d - offset) / scale + 0.5) as i64).min(levels as i64)
        } else {
            0
        };
        let q = u - half;
        if bits == 8 {
            out.push(q as i8 as u8);
        } else {
            out.extend_from_slice(&(q as i16).to_le_bytes());
        }
    }
}

/// Rebuilds `r + d'` for the codes of one row, clamped to the dtype's finite range.
#[allow(clippy::too_many_arguments)]
fn dequantize_into(
    dtype: DType,
    codes: &[u8],
    r: &[u8],
    scale: f64,
    offset: f64,
    bits: u32,
    out: &mut Vec<u8>,
) {
    let w = dtype.size();
    let cw = (bits / 8) as usize;
    let half = 1i64 << (bits - 1);
    let max = finite_max(dtype);
    for (c, rv) in codes.chunks_exact(cw).zip(r.chunks_exact(w)) {
        let raw = load_le(c);
        let q = if bits == 8 {
            i64::from(raw as u8 as i8)
        } else {
            i64::from(raw as u16 as i16)
        };
        let d = offset + ((q + half) as f64) * scale;
        let y = (to_f64(dtype, rv) + d).clamp(-max, max);
        push_f64(dtype, y, out);
    }
}

fn bits_of(name: &str, kind: DeltaType, meta: &JsonMap) -> Result<u32> {
    let bits = get_u64(name, meta, "bits")?;
    let expected = match kind {
        DeltaType::Int8Quantized => Some(8),
        DeltaType::Int16Quantized => Some(16),
        _ => None,
    };
    match (bits, expected) {
        (8 | 16, None) => Ok(bits as u32),
        (b, Some(e)) if b == e => Ok(e as u32),
        _ => Err(err(
            name,
            format!("metadata \"bits\" {bits} is not valid for {kind}"),
        )),
    }
}

/// Encodes with a lossy strategy; `Ok(None)` when a difference (or a range of differences) is
/// not finite.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode(
    name: &str,
    kind: DeltaType,
    dtype: DType,
    shape: &[usize],
    t: &[u8],
    r: &[u8],
    spec: CodecSpec,
    quantization_bits: u32,
    sparse_threshold: f64,
    meta: &mut JsonMap,
) -> Result<Option<Vec<u8>>> {
    let w = dtype.size();
    match kind {
        DeltaType::Int8Quantized | DeltaType::Int16Quantized => {
            let bits = if kind == DeltaType::Int8Quantized {
                8
            } else {
                16
            };
            let Some(ds) = finite_diffs(dtype, t, r) else {
                return Ok(None);
            };
            let Some((scale, offset)) = scale_offset(&ds, bits) else {
                return Ok(None);
            };
            let mut codes = Vec::with_capacity(ds.len() * (bits / 8) as usize);
            quantize_into(&ds, scale, offset, bits, &mut codes);
            meta.insert("scale".into(), Value::from(scale));
            meta.insert("offset".into(), Value::from(offset));
            meta.insert("bits".into(), Value::from(bits));
            codec_to_meta(spec, meta);
            Ok(Some(pack(name, spec, &codes, (bits / 8) as usize)?))
        }
        DeltaType::PerAxisScaled => {
            let bits = quantization_bits;
            if bits != 8 && bits != 16 {
                return Err(err(
                    name,
                    format!("quantization_bits must be 8 or 16, got {bits}"),
                ));
            }
            let Some(ds) = finite_diffs(dtype, t, r) else {
                return Ok(None);
            };
            let rows = rows_of(shape);
            let row_len = ds.len().checked_div(rows).unwrap_or(0);
            let mut params = Vec::with_capacity(rows * 16);
            let mut codes = Vec::with_capacity(ds.len() * (bits / 8) as usize);
            if row_len > 0 {
                for row in ds.chunks_exact(row_len) {
                    let Some((scale, offset)) = scale_offset(row, bits) else {
                        return Ok(None);
                    };
                    params.extend_from_slice(&scale.to_le_bytes());
                    params.extend_from_slice(&offset.to_le_bytes());
                    quantize_into(row, scale, offset, bits, &mut codes);
                }
            } else {
                for _ in 0..rows {
                    params.extend_from_slice(&[0u8; 16]);
                }
            }
            meta.insert("bits".into(), Value::from(bits));
            meta.insert("axis".into(), Value::from(0));
            meta.insert("rows".into(), Value::from(rows));
            codec_to_meta(spec, meta);
            let a = pack(name, spec, &params, 8)?;
            let b = pack(name, spec, &codes, (bits / 8) as usize)?;
            Ok(Some(two_sections(&a, &b)))
        }
        DeltaType::Sparse => {
            let mut gaps = Vec::new();
            let mut values = Vec::new();
            let mut prev = 0usize;
            let mut count = 0usize;
            for (i, (a, b)) in t.chunks_exact(w).zip(r.chunks_exact(w)).enumerate() {
                let d = to_f64(dtype, a) - to_f64(dtype, b);
                // NaN and infinite differences are kept too.
                if kept(d, sparse_threshold) {
                    gaps.extend_from_slice(&((i - prev) as u64).to_le_bytes());
                    values.extend_from_slice(a);
                    prev = i;
                    count += 1;
                }
            }
            meta.insert("sparse_threshold".into(), Value::from(sparse_threshold));
            meta.insert("num_nonzero".into(), Value::from(count));
            codec_to_meta(spec, meta);
            let a = pack(name, spec, &gaps, 8)?;
            let b = pack(name, spec, &values, w)?;
            Ok(Some(two_sections(&a, &b)))
        }
        _ => Err(err(name, format!("{kind} is not lossy"))),
    }
}

/// Decodes a lossy payload against the reference bytes `r`.
pub(crate) fn decode(
    name: &str,
    kind: DeltaType,
    dtype: DType,
    shape: &[usize],
    data: &[u8],
    r: &[u8],
    meta: &JsonMap,
) -> Result<Vec<u8>> {
    let w = dtype.size();
    let n = r.len() / w.max(1);
    let spec = codec_from_meta(name, meta)?;
    match kind {
        DeltaType::Int8Quantized | DeltaType::Int16Quantized => {
            let bits = bits_of(name, kind, meta)?;
            let scale = get_f64(name, meta, "scale")?;
            let offset = get_f64(name, meta, "offset")?;
            if scale < 0.0 {
                return Err(err(name, format!("metadata \"scale\" {scale} is negative")));
            }
            let cw = (bits / 8) as usize;
            let codes = unpack(name, spec, data, cw, mul(name, n, cw)?)?;
            let mut out = Vec::with_capacity(r.len());
            dequantize_into(dtype, &codes, r, scale, offset, bits, &mut out);
            Ok(out)
        }
        DeltaType::PerAxisScaled => {
            let bits = bits_of(name, kind, meta)?;
            let rows = rows_of(shape);
            let meta_rows = get_u64(name, meta, "rows")?;
            if usize::try_from(meta_rows).ok() != Some(rows) {
                return Err(err(
                    name,
                    format!("metadata \"rows\" {meta_rows} does not match the shape's {rows}"),
                ));
            }
            match meta.get("axis").and_then(Value::as_u64) {
                Some(0) => {}
                _ => return Err(err(name, "metadata \"axis\" must be 0")),
            }
            let cw = (bits / 8) as usize;
            let (a, b) = split_sections(name, data)?;
            let params = unpack(name, spec, a, 8, mul(name, rows, 16)?)?;
            let codes = unpack(name, spec, b, cw, mul(name, n, cw)?)?;
            let mut out = Vec::with_capacity(r.len());
            let row_len = n.checked_div(rows).unwrap_or(0);
            if row_len > 0 {
                let rows_iter = params
                    .chunks_exact(16)
                    .zip(codes.chunks_exact(row_len * cw))
                    .zip(r.chunks_exact(row_len * w));
                for ((p, c), rr) in rows_iter {
                    let scale = f64::from_bits(load_le(&p[..8]));
                    let offset = f64::from_bits(load_le(&p[8..]));
                    if !(scale >= 0.0 && scale.is_finite() && offset.is_finite()) {
                        return Err(err(name, "a row's scale or offset is not valid"));
                    }
                    dequantize_into(dtype, c, rr, scale, offset, bits, &mut out);
                }
            }
            Ok(out)
        }
        DeltaType::Sparse => {
            let count = get_u64(name, meta, "num_nonzero")?;
            let count = usize::try_from(count)
                .ok()
                .filter(|&c| c <= n)
                .ok_or_else(|| {
                    err(
                        name,
                        format!("metadata \"num_nonzero\" {count} exceeds the {n} elements"),
                    )
                })?;
            let (a, b) = split_sections(name, data)?;
            let gaps = unpack(name, spec, a, 8, mul(name, count, 8)?)?;
            let values = unpack(name, spec, b, w, mul(name, count, w)?)?;
            let mut out = r.to_vec();
            let mut idx = 0usize;
            for (k, (g, v)) in gaps.chunks_exact(8).zip(values.chunks_exact(w)).enumerate() {
                let gap = usize::try_from(load_le(g)).unwrap_or(usize::MAX);
                if k > 0 && gap == 0 {
                    return Err(err(name, "sparse indices are not strictly increasing"));
                }
                idx = idx
                    .checked_add(gap)
                    .filter(|&i| i < n)
                    .ok_or_else(|| err(name, "sparse index out of range"))?;
                let start = idx * w;
                let slot = out
                    .get_mut(start..start + w)
                    .ok_or_else(|| err(name, "sparse index out of range"))?;
                slot.copy_from_slice(v);
            }
            Ok(out)
        }
        _ => Err(err(name, format!("{kind} is not lossy"))),
    }
}

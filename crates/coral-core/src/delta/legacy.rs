//! Deltas written by the Python Coral (coral-ml 1.0): recognised by the absence of the `target`
//! metadata key that Coral always writes, and decoded with the Python decoder's NumPy semantics,
//! so that Python stores keep working. Their payload is the NumPy array `data` as raw
//! little-endian bytes: float32 differences (`float32_raw`), a zlib stream of them
//! (`compressed`), int8/int16 codes with `scale`/`offset` (`*_quantized`), or float32
//! `(index, value)` pairs (`sparse`). The result is `reference + delta` in NumPy's type promotion
//! (float16 and float32 in float32, float64 in float64), cast back to the dtype. These strategies
//! are not exact in general; the hash check after decoding says whether the result is the target.

use crate::codec::{Codec, CodecSpec};
use crate::delta::payload::{err, get_f64, load_le};
use crate::delta::DeltaType;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::JsonMap;

/// True for the strategies coral-ml 1.0 has.
pub(crate) const fn is_python_type(kind: DeltaType) -> bool {
    matches!(
        kind,
        DeltaType::Float32Raw
            | DeltaType::Compressed
            | DeltaType::Int8Quantized
            | DeltaType::Int16Quantized
            | DeltaType::Sparse
    )
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_bits(load_le(c) as u32))
}

/// Decodes a Python Coral delta against the reference bytes `r`.
pub(crate) fn decode(
    name: &str,
    kind: DeltaType,
    dtype: DType,
    data: &[u8],
    r: &[u8],
    meta: &JsonMap,
) -> Result<Vec<u8>> {
    if !matches!(dtype, DType::F16 | DType::F32 | DType::F64) {
        return Err(err(
            name,
            format!("a Python Coral delta of {dtype} is not supported"),
        ));
    }
    let w = dtype.size();
    let n = r.len() / w;
    let expect = |len: usize| {
        if data.len() == len {
            Ok(())
        } else {
            Err(err(
                name,
                format!(
                    "Python {kind} payload has {} bytes, expected {len}",
                    data.len()
                ),
            ))
        }
    };
    let delta: Vec<f32> = match kind {
        DeltaType::Float32Raw => {
            expect(n * 4)?;
            f32s(data).collect()
        }
        DeltaType::Compressed => {
            let raw = CodecSpec::new(Codec::Gzip { level: 6 }, false)
                .decompress(data, 1, n * 4)
                .map_err(|e| err(name, format!("Python compressed payload: {e}")))?;
            f32s(&raw).collect()
        }
        DeltaType::Int8Quantized | DeltaType::Int16Quantized => {
            // NumPy: codes.astype(float32) * scale + offset, in float32.
            let scale = get_f64(name, meta, "scale")? as f32;
            let offset = get_f64(name, meta, "offset")? as f32;
            if kind == DeltaType::Int8Quantized {
                expect(n)?;
                data.iter()
                    .map(|&b| f32::from(b as i8) * scale + offset)
                    .collect()
            } else {
                expect(n * 2)?;
                data.chunks_exact(2)
                    .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) * scale + offset)
                    .collect()
            }
        }
        DeltaType::Sparse => {
            if data.len() % 8 != 0 {
                return Err(err(
                    name,
                    format!(
                        "Python sparse payload of {} bytes is not (index, value) pairs",
                        data.len()
                    ),
                ));
            }
            let mut d = vec![0f32; n];
            let vals: Vec<f32> = f32s(data).collect();
            for pair in vals.chunks_exact(2) {
                let (idx, v) = (pair[0], pair[1]);
                // NumPy's astype(int64) truncates toward zero.
                let i = idx.trunc();
                let slot = (i.is_finite() && i >= 0.0 && (i as f64) < n as f64)
                    .then(|| d.get_mut(i as usize))
                    .flatten()
                    .ok_or_else(|| err(name, format!("Python sparse index {idx} out of range")))?;
                *slot = v;
            }
            d
        }
        _ => {
            return Err(err(
                name,
                format!("{kind} delta without \"target\" metadata: not a Python Coral delta"),
            ))
        }
    };
    let mut out = Vec::with_capacity(r.len());
    for (c, d) in r.chunks_exact(w).zip(delta) {
        match dtype {
            DType::F16 => {
                let x = half::f16::from_bits(load_le(c) as u16).to_f32() + d;
                out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
            DType::F32 => {
                let x = f32::from_bits(load_le(c) as u32) + d;
                out.extend_from_slice(&x.to_le_bytes());
            }
            _ => {
                let x = f64::from_bits(load_le(c)) + f64::from(d);
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    Ok(out)
}

//! Lossless strategies give back every bit, for every dtype they accept and every bit pattern.

use coral_core::delta::{DeltaConfig, DeltaEncoder, DeltaType};
use coral_core::{DType, WeightTensor};
use proptest::prelude::*;

fn encoder() -> DeltaEncoder {
    DeltaEncoder::new(DeltaConfig {
        min_weight_size: 0,
        ..DeltaConfig::default()
    })
}

/// Encodes with `kind` (size checks off), decodes strictly, and checks every bit.
fn round_trip(kind: DeltaType, dtype: DType, t: Vec<u8>, r: Vec<u8>) {
    let n = t.len() / dtype.size();
    let target = WeightTensor::from_bytes("layer.weight", vec![n], dtype, t).unwrap();
    let reference = WeightTensor::from_bytes("ref", vec![n], dtype, r).unwrap();
    let (rk, tk) = (reference.compute_hash(), target.compute_hash());
    let enc = encoder();
    let delta = enc
        .encode_delta_unchecked(kind, &target, &reference, &rk)
        .unwrap()
        .unwrap();
    assert_eq!(delta.delta_type, kind);
    let back = enc.decode_delta(&delta, &reference, &tk).unwrap();
    assert_eq!(back.data(), target.data(), "{kind} {dtype}");
    assert_eq!(back.name(), "layer.weight");
}

fn accepted(kind: DeltaType) -> Vec<DType> {
    DType::ALL
        .into_iter()
        .filter(|d| kind.accepts(*d))
        .collect()
}

/// A target and a reference: unrelated bit patterns, or a reference with a few elements changed
/// (small and large changes alike).
fn pair(width: usize) -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (0usize..64).prop_flat_map(move |n| {
        let bytes = proptest::collection::vec(any::<u8>(), n * width);
        prop_oneof![
            (bytes.clone(), bytes.clone()),
            (
                bytes,
                proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..16)
            )
                .prop_map(move |(t, edits)| {
                    let mut r = t.clone();
                    for (i, v, mode) in edits {
                        if r.is_empty() {
                            break;
                        }
                        let i = i % r.len();
                        match mode {
                            0 => r[i] = v,
                            1 => r[i] ^= 1,
                            _ => r[i] = r[i].wrapping_add(1),
                        }
                    }
                    (t, r)
                }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_lossless_strategy_every_dtype(kind_i in 0usize..5, dt_i in 0usize..15, seed in any::<u64>()) {
        let kind = DeltaType::LOSSLESS[kind_i];
        let dts = accepted(kind);
        let dtype = dts[dt_i % dts.len()];
        // Deterministic bytes from the seed, some elements equal, some not.
        let w = dtype.size();
        let n = (seed % 50) as usize + 1;
        let mut s = seed;
        let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) as u8 };
        let t: Vec<u8> = (0..n * w).map(|_| next()).collect();
        let r: Vec<u8> = t.iter().enumerate().map(|(i, &b)| if (i / w) % 3 == 0 { b } else { next() }).collect();
        round_trip(kind, dtype, t, r);
    }

    #[test]
    fn float32_raw_bits((t, r) in pair(4), dt in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32, DType::U8])) {
        let w = dt.size();
        let n = t.len() / 4 * 4 / w;
        round_trip(DeltaType::Float32Raw, dt, t[..n * w].to_vec(), r[..n * w].to_vec());
    }

    #[test]
    fn compressed_bits_f32((t, r) in pair(4)) { round_trip(DeltaType::Compressed, DType::F32, t, r); }
    #[test]
    fn compressed_bits_bf16((t, r) in pair(2)) { round_trip(DeltaType::Compressed, DType::BF16, t, r); }
    #[test]
    fn compressed_bits_f16((t, r) in pair(2)) { round_trip(DeltaType::Compressed, DType::F16, t, r); }
    #[test]
    fn compressed_bits_f64((t, r) in pair(8)) { round_trip(DeltaType::Compressed, DType::F64, t, r); }
    #[test]
    fn xor_float32_bits((t, r) in pair(4)) { round_trip(DeltaType::XorFloat32, DType::F32, t, r); }
    #[test]
    fn xor_bfloat16_bits((t, r) in pair(2)) { round_trip(DeltaType::XorBfloat16, DType::BF16, t, r); }
    #[test]
    fn xor_bfloat16_f16_bits((t, r) in pair(2)) { round_trip(DeltaType::XorBfloat16, DType::F16, t, r); }
    #[test]
    fn exponent_mantissa_f32((t, r) in pair(4)) { round_trip(DeltaType::ExponentMantissa, DType::F32, t, r); }
    #[test]
    fn exponent_mantissa_bf16((t, r) in pair(2)) { round_trip(DeltaType::ExponentMantissa, DType::BF16, t, r); }
    #[test]
    fn exponent_mantissa_f16((t, r) in pair(2)) { round_trip(DeltaType::ExponentMantissa, DType::F16, t, r); }
    #[test]
    fn exponent_mantissa_f64((t, r) in pair(8)) { round_trip(DeltaType::ExponentMantissa, DType::F64, t, r); }
    #[test]
    fn exponent_mantissa_f8((t, r) in pair(1), e5 in any::<bool>()) {
        round_trip(DeltaType::ExponentMantissa, if e5 { DType::F8E5M2 } else { DType::F8E4M3 }, t, r);
    }
}

/// Special values against each other, in every direction, for every float dtype.
#[test]
fn special_values_are_exact() {
    let f32s = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fc0_1234),  // quiet NaN with payload
        f32::from_bits(0xff80_0001),  // signalling NaN, negative
        f32::from_bits(1),            // smallest subnormal
        -f32::from_bits(0x007f_ffff), // largest subnormal, negative
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        1.0,
        1.0 + f32::EPSILON,
    ];
    let f64s: Vec<f64> = f32s
        .iter()
        .map(|&v| f64::from(v))
        .chain([
            f64::from_bits(0x7ff0_0000_dead_beef),
            f64::from_bits(1),
            f64::MAX,
        ])
        .collect();
    let mut cases: Vec<(DType, Vec<u8>)> = vec![
        (
            DType::F32,
            f32s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            DType::F64,
            f64s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ];
    let halfs: Vec<u16> = vec![
        0, 0x8000, 0x7c00, 0xfc00, 0x7e01, 0xfd55, 1, 0x83ff, 0x7bff, 0x3c00,
    ];
    cases.push((
        DType::F16,
        halfs.iter().flat_map(|v| v.to_le_bytes()).collect(),
    ));
    let bhalfs: Vec<u16> = vec![
        0, 0x8000, 0x7f80, 0xff80, 0x7fc1, 0xff81, 1, 0x807f, 0x7f7f, 0x3f80,
    ];
    cases.push((
        DType::BF16,
        bhalfs.iter().flat_map(|v| v.to_le_bytes()).collect(),
    ));
    for (dtype, vals) in cases {
        let w = dtype.size();
        let n = vals.len() / w;
        // Every ordered pair of values, as target and reference.
        let mut t = Vec::new();
        let mut r = Vec::new();
        for i in 0..n {
            for j in 0..n {
                t.extend_from_slice(&vals[i * w..(i + 1) * w]);
                r.extend_from_slice(&vals[j * w..(j + 1) * w]);
            }
        }
        for kind in DeltaType::LOSSLESS {
            if kind.accepts(dtype) {
                round_trip(kind, dtype, t.clone(), r.clone());
            }
        }
    }
}

#[test]
fn acceptance_is_as_documented() {
    assert!(DeltaType::XorFloat32.accepts(DType::F32));
    assert!(!DeltaType::XorFloat32.accepts(DType::BF16));
    assert!(DeltaType::XorBfloat16.accepts(DType::BF16));
    assert!(DeltaType::XorBfloat16.accepts(DType::F16));
    assert!(!DeltaType::XorBfloat16.accepts(DType::F32));
    assert!(DeltaType::ExponentMantissa.accepts(DType::F64));
    assert!(!DeltaType::ExponentMantissa.accepts(DType::I32));
    for d in DType::ALL {
        assert!(DeltaType::Compressed.accepts(d));
        assert!(DeltaType::Float32Raw.accepts(d));
    }
}

//! Lossy strategies keep their documented error bounds, for arbitrary finite values.

use coral_core::delta::{DeltaConfig, DeltaEncoder, DeltaRefusal, DeltaType};
use coral_core::{DType, WeightTensor};
use proptest::prelude::*;

fn val(dtype: DType, c: &[u8]) -> f64 {
    match dtype {
        DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
        DType::F32 => f64::from(f32::from_le_bytes(c.try_into().unwrap())),
        _ => f64::from_le_bytes(c.try_into().unwrap()),
    }
}

/// The largest gap between `x` and its neighbours in `dtype` (an ulp around `x`).
fn ulp(dtype: DType, x: f64) -> f64 {
    let a = x.abs();
    let gaps = |lo: f64, hi: f64| (hi - a).max(a - lo);
    match dtype {
        DType::F16 => {
            let b = half::f16::from_f64(a).to_bits();
            let lo = half::f16::from_bits(b.saturating_sub(1)).to_f64();
            let hi = half::f16::from_bits((b + 1).min(0x7bff)).to_f64();
            gaps(lo, hi)
        }
        DType::BF16 => {
            let b = half::bf16::from_f64(a).to_bits();
            let lo = half::bf16::from_bits(b.saturating_sub(1)).to_f64();
            let hi = half::bf16::from_bits((b + 1).min(0x7f7f)).to_f64();
            gaps(lo, hi)
        }
        DType::F32 => {
            let b = (a as f32).to_bits();
            let lo = f64::from(f32::from_bits(b.saturating_sub(1)));
            let hi = f64::from(f32::from_bits((b + 1).min(0x7f7f_ffff)));
            gaps(lo, hi)
        }
        _ => {
            let b = a.to_bits();
            let lo = f64::from_bits(b.saturating_sub(1));
            let hi = f64::from_bits((b + 1).min(0x7fef_ffff_ffff_ffff));
            gaps(lo, hi)
        }
    }
}

/// Finite values of `dtype` from arbitrary bit patterns, as little-endian bytes.
fn finite_bytes(dtype: DType, n: usize) -> impl Strategy<Value = Vec<u8>> {
    let w = dtype.size();
    proptest::collection::vec(any::<u64>(), n).prop_map(move |v| {
        let mut out = Vec::new();
        for x in v {
            let bytes = x.to_le_bytes();
            let mut c = bytes[..w].to_vec();
            if !val(dtype, &c).is_finite() {
                // Clear the top exponent bit: finite, keeps the rest of the pattern.
                c[w - 1] &= 0xbf;
            }
            out.extend_from_slice(&c);
        }
        out
    })
}

/// Targets near the reference (a small relative update) or anywhere.
fn pair(dtype: DType) -> impl Strategy<Value = (usize, Vec<u8>, Vec<u8>)> {
    (1usize..6, 1usize..12).prop_flat_map(move |(rows, cols)| {
        let n = rows * cols;
        (
            Just(rows),
            finite_bytes(dtype, n),
            finite_bytes(dtype, n),
            proptest::collection::vec(-1e-3f64..1e-3, n),
            any::<bool>(),
        )
            .prop_map(move |(rows, r, far, eps, near)| {
                let w = dtype.size();
                let t = if near {
                    let mut t = Vec::new();
                    for (c, e) in r.chunks(w).zip(&eps) {
                        let v = val(dtype, c) * (1.0 + e);
                        match dtype {
                            DType::F16 => {
                                t.extend_from_slice(&half::f16::from_f64(v).to_le_bytes())
                            }
                            DType::BF16 => {
                                t.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes())
                            }
                            DType::F32 => t.extend_from_slice(&(v as f32).to_le_bytes()),
                            _ => t.extend_from_slice(&v.to_le_bytes()),
                        }
                    }
                    t
                } else {
                    far
                };
                (rows, t, r)
            })
    })
}

const DTYPES: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::F64];

/// Target, reference and decoded values, and the decoded bytes.
type Decoded = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<u8>);

fn encode(
    kind: DeltaType,
    bits: u32,
    threshold: f64,
    dtype: DType,
    rows: usize,
    t: &[u8],
    r: &[u8],
) -> Option<Decoded> {
    let n = t.len() / dtype.size();
    let shape = vec![rows, n / rows];
    let target = WeightTensor::from_bytes("t", shape.clone(), dtype, t.to_vec()).unwrap();
    let reference = WeightTensor::from_bytes("r", shape, dtype, r.to_vec()).unwrap();
    let enc = DeltaEncoder::new(DeltaConfig {
        delta_type: kind,
        quantization_bits: bits,
        sparse_threshold: threshold,
        min_weight_size: 0,
        strict_reconstruction: false,
        ..DeltaConfig::default()
    });
    let rk = reference.compute_hash();
    let delta = match enc
        .encode_delta_unchecked(kind, &target, &reference, &rk)
        .unwrap()
    {
        Ok(d) => d,
        Err(DeltaRefusal::NonFinite { .. }) => return None,
        Err(e) => panic!("{e}"),
    };
    let back = enc
        .decode_delta(&delta, &reference, &target.compute_hash())
        .unwrap();
    let w = dtype.size();
    let tv = t.chunks(w).map(|c| val(dtype, c)).collect();
    let rv = r.chunks(w).map(|c| val(dtype, c)).collect();
    let bv = back.data().chunks(w).map(|c| val(dtype, c)).collect();
    Some((tv, rv, bv, back.data().to_vec()))
}

/// Checks `|b - t| <= scale/2 + ulp(b)/2 + f64 slack` over groups of `group` elements, with the
/// scale computed independently from the data.
fn check_quantized(dtype: DType, bits: u32, group: usize, t: &[f64], r: &[f64], b: &[f64]) {
    let levels = f64::from((1u32 << bits) - 1);
    for ((tg, rg), bg) in t.chunks(group).zip(r.chunks(group)).zip(b.chunks(group)) {
        let ds: Vec<f64> = tg.iter().zip(rg).map(|(x, y)| x - y).collect();
        let lo = ds.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = ds.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let range = hi - lo;
        let scale = range / levels;
        for i in 0..tg.len() {
            let err = (bg[i] - tg[i]).abs();
            let slack = 1e-14 * (tg[i].abs() + rg[i].abs() + lo.abs() + range) + 1e-300;
            let bound = scale / 2.0 + ulp(dtype, bg[i]) / 2.0 + slack;
            assert!(
                err <= bound,
                "{dtype} {bits} bits: target {} ref {} got {} err {err} > bound {bound} (scale {scale})",
                tg[i], rg[i], bg[i]
            );
        }
    }
}

/// The values of little-endian `bytes` of `dtype`.
fn values(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    bytes.chunks(dtype.size()).map(|c| val(dtype, c)).collect()
}

/// Whether a quantized strategy must encode the pair, worked out independently of the encoder:
/// every difference `t - r` is finite in f64, and so is the range of the differences over each
/// group of `group` elements (the whole tensor, or a row for per-axis scaling). Only F64 values
/// can break this (F16, BF16 and F32 differences are far from f64's limits); the encoder then
/// refuses with `NonFinite`, and in no other case.
fn must_encode(t: &[f64], r: &[f64], group: usize) -> bool {
    let ds: Vec<f64> = t.iter().zip(r).map(|(a, b)| a - b).collect();
    ds.iter().all(|d| d.is_finite())
        && ds.chunks(group.max(1)).all(|g| {
            let lo = g.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = g.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            (hi - lo).is_finite()
        })
}

/// Encodes with a quantized strategy and checks the outcome: encoded exactly when
/// [`must_encode`] says so (always, below F64), and within the error bound when encoded.
/// Returns whether it encoded.
fn check_quantized_case(
    kind: DeltaType,
    bits: u32,
    dtype: DType,
    rows: usize,
    t: &[u8],
    r: &[u8],
) -> bool {
    let (tv, rv) = (values(dtype, t), values(dtype, r));
    let group = if kind == DeltaType::PerAxisScaled {
        tv.len() / rows
    } else {
        tv.len()
    };
    let must = must_encode(&tv, &rv, group);
    assert!(
        must || dtype == DType::F64,
        "{dtype}: a difference overflowed"
    );
    match encode(kind, bits, 0.0, dtype, rows, t, r) {
        Some((tv2, rv2, bv, _)) => {
            assert!(must, "{kind} {dtype}: encoded differences that overflow");
            assert_eq!((&tv2, &rv2), (&tv, &rv));
            check_quantized(dtype, bits, group, &tv, &rv, &bv);
            true
        }
        None => {
            assert!(!must, "{kind} {dtype}: refused a pair it must encode");
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn int8_bound(p in (0usize..4).prop_flat_map(|i| pair(DTYPES[i]).prop_map(move |x| (i, x)))) {
        let (i, (rows, t, r)) = p;
        check_quantized_case(DeltaType::Int8Quantized, 8, DTYPES[i], rows, &t, &r);
    }

    #[test]
    fn int16_bound(p in (0usize..4).prop_flat_map(|i| pair(DTYPES[i]).prop_map(move |x| (i, x)))) {
        let (i, (rows, t, r)) = p;
        check_quantized_case(DeltaType::Int16Quantized, 16, DTYPES[i], rows, &t, &r);
    }

    #[test]
    fn per_axis_bound(p in (0usize..4).prop_flat_map(|i| pair(DTYPES[i]).prop_map(move |x| (i, x))), sixteen in any::<bool>()) {
        let (i, (rows, t, r)) = p;
        let bits = if sixteen { 16 } else { 8 };
        check_quantized_case(DeltaType::PerAxisScaled, bits, DTYPES[i], rows, &t, &r);
    }

    #[test]
    fn sparse_bound(p in (0usize..4).prop_flat_map(|i| pair(DTYPES[i]).prop_map(move |x| (i, x))), thr in prop_oneof![Just(0.0), 1e-6f64..1.0, Just(1e30)]) {
        let (i, (rows, t, r)) = p;
        let dtype = DTYPES[i];
        let w = dtype.size();
        // Sparse deltas take any pair (non-finite differences are kept exactly).
        let (tv, rv, _bv, back) = encode(DeltaType::Sparse, 8, thr, dtype, rows, &t, &r)
            .expect("sparse deltas take any pair");
        for k in 0..tv.len() {
            let got = &back[k * w..(k + 1) * w];
            if got != &t[k * w..(k + 1) * w] {
                prop_assert_eq!(got, &r[k * w..(k + 1) * w]);
                prop_assert!((tv[k] - rv[k]).abs() <= thr, "dropped {} vs {} at threshold {}", tv[k], rv[k], thr);
            }
        }
    }
}

/// The property tests above would prove little if the generator's F64 pairs (the only ones a
/// quantized strategy may refuse) were mostly refused: most of them encode, for every
/// quantized strategy, and each that does keeps its bound.
#[test]
fn most_generated_f64_pairs_encode() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = pair(DType::F64);
    let cases = 200;
    let mut encoded = [0usize; 4];
    for _ in 0..cases {
        let (rows, t, r) = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree.current(),
            Err(e) => panic!("generating a pair: {e}"),
        };
        for (n, (kind, bits)) in encoded.iter_mut().zip([
            (DeltaType::Int8Quantized, 8),
            (DeltaType::Int16Quantized, 16),
            (DeltaType::PerAxisScaled, 8),
            (DeltaType::PerAxisScaled, 16),
        ]) {
            if check_quantized_case(kind, bits, DType::F64, rows, &t, &r) {
                *n += 1;
            }
        }
    }
    eprintln!("F64 pairs encoded, of {cases}: {encoded:?} (int8, int16, per-axis 8, 16)");
    for n in encoded {
        assert!(
            n * 10 >= cases * 8,
            "only {n} of {cases} F64 pairs encoded: {encoded:?}"
        );
    }
}

#[test]
fn sparse_keeps_non_finite_exactly() {
    let t = [f32::NAN, f32::INFINITY, 1.0, -0.0, 5.0];
    let r = [1.0f32, 1.0, f32::NEG_INFINITY, 0.0, 5.0 + 1e-7];
    let tb: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
    let rb: Vec<u8> = r.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (_, _, _, back) = encode(DeltaType::Sparse, 8, 1e-6, DType::F32, 1, &tb, &rb).unwrap();
    assert_eq!(&back[..12], &tb[..12]);
    // -0.0 vs 0.0 and 5.0 vs 5.0000001 are within the threshold: the reference is kept.
    assert_eq!(&back[12..], &rb[12..]);
}

#[test]
fn quantized_refuse_non_finite() {
    let t = [f32::NAN, 1.0];
    let r = [1.0f32, 1.0];
    let tb: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
    let rb: Vec<u8> = r.iter().flat_map(|v| v.to_le_bytes()).collect();
    for kind in [
        DeltaType::Int8Quantized,
        DeltaType::Int16Quantized,
        DeltaType::PerAxisScaled,
    ] {
        assert!(
            encode(kind, 8, 0.0, DType::F32, 1, &tb, &rb).is_none(),
            "{kind}"
        );
    }
    // A range that overflows f64 is refused too.
    let tb: Vec<u8> = [f64::MAX, -f64::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let rb: Vec<u8> = [0.0f64, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(encode(DeltaType::Int8Quantized, 8, 0.0, DType::F64, 1, &tb, &rb).is_none());
}

#[test]
fn constant_delta_is_exact() {
    let r: Vec<f32> = (0..300).map(|i| i as f32 * 0.25).collect();
    let t: Vec<f32> = r.iter().map(|v| v + 0.5).collect();
    let tb: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
    let rb: Vec<u8> = r.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (_, _, _, back) =
        encode(DeltaType::Int8Quantized, 8, 0.0, DType::F32, 1, &tb, &rb).unwrap();
    assert_eq!(back, tb);
}

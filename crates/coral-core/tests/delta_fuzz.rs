//! "Fuzzing" the decoder with proptest: mutated, truncated and random payloads and metadata, wrong
//! shapes and types. Decoding must return an error or a weight, never panic; a lossless delta that
//! decodes under strict reconstruction is the target, bit for bit.

use bytes::Bytes;
use coral_core::delta::{Delta, DeltaConfig, DeltaEncoder, DeltaType};
use coral_core::{ContentHash, DType, JsonMap, WeightTensor};
use proptest::prelude::*;
use serde_json::Value;

struct Case {
    delta: Delta,
    reference: WeightTensor,
    target: WeightTensor,
    key: ContentHash,
}

static CASES: std::sync::OnceLock<Vec<Case>> = std::sync::OnceLock::new();

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let n = 96usize;
        let r: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37).sin()).collect();
        let t: Vec<f64> = r
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 5 == 0 { v * 1.01 } else { *v })
            .collect();
        let enc = |v: &[f64]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| match dtype {
                    DType::F32 => (*x as f32).to_le_bytes().to_vec(),
                    DType::BF16 => half::bf16::from_f64(*x).to_le_bytes().to_vec(),
                    DType::F16 => half::f16::from_f64(*x).to_le_bytes().to_vec(),
                    _ => x.to_le_bytes().to_vec(),
                })
                .collect()
        };
        let reference = WeightTensor::from_bytes("r", vec![8, 12], dtype, enc(&r)).unwrap();
        let target = WeightTensor::from_bytes("t", vec![8, 12], dtype, enc(&t)).unwrap();
        let rk = reference.compute_hash();
        for kind in DeltaType::ALL {
            if !kind.accepts(dtype) {
                continue;
            }
            let encoder = DeltaEncoder::new(DeltaConfig {
                min_weight_size: 0,
                quantization_bits: 16,
                ..DeltaConfig::default()
            });
            let delta = encoder
                .encode_delta_unchecked(kind, &target, &reference, &rk)
                .unwrap()
                .unwrap();
            out.push(Case {
                delta,
                reference: reference.clone(),
                target: target.clone(),
                key: target.compute_hash(),
            });
        }
    }
    out
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("zstd-3"),
            Just("gzip-9"),
            Just("lz4"),
            Just("none"),
            Just("brotli"),
            Just("zstd-99"),
            Just("")
        ]
        .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(Value::Object(JsonMap::new())),
        Just(Value::Array(vec![Value::from(1)])),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Extend(Vec<u8>),
    Replace(Vec<u8>),
    Meta(String, Value),
    DropMeta(usize),
    Type(usize),
    Shape(Vec<usize>),
    DType(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let keys = prop_oneof![
        Just("codec"),
        Just("shuffle"),
        Just("scale"),
        Just("offset"),
        Just("bits"),
        Just("rows"),
        Just("axis"),
        Just("num_nonzero"),
        Just("sparse_threshold"),
        Just("target"),
    ]
    .prop_map(String::from);
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        proptest::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Extend),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(Mutation::Replace),
        (keys, json_value()).prop_map(|(k, v)| Mutation::Meta(k, v)),
        any::<usize>().prop_map(Mutation::DropMeta),
        (0usize..9).prop_map(Mutation::Type),
        proptest::collection::vec(0usize..200, 0..4).prop_map(Mutation::Shape),
        (0usize..15).prop_map(Mutation::DType),
    ]
}

fn apply(delta: &mut Delta, m: &Mutation) {
    let mut data = delta.data.to_vec();
    match m {
        Mutation::Truncate(i) => data.truncate(i % (data.len() + 1)),
        Mutation::Flip(i, x) => {
            if !data.is_empty() {
                let k = i % data.len();
                data[k] ^= x;
            }
        }
        Mutation::Extend(e) => data.extend_from_slice(e),
        Mutation::Replace(r) => data = r.clone(),
        Mutation::Meta(k, v) => {
            delta.metadata.insert(k.clone(), v.clone());
        }
        Mutation::DropMeta(i) => {
            if !delta.metadata.is_empty() {
                let k = delta
                    .metadata
                    .keys()
                    .nth(i % delta.metadata.len())
                    .unwrap()
                    .clone();
                delta.metadata.remove(&k);
            }
        }
        Mutation::Type(i) => delta.delta_type = DeltaType::ALL[*i],
        Mutation::Shape(s) => delta.original_shape = s.clone(),
        Mutation::DType(i) => delta.original_dtype = DType::ALL[*i],
    }
    delta.data = Bytes::from(data);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_deltas_never_panic(case_i in any::<usize>(), muts in proptest::collection::vec(mutation(), 1..4), strict in any::<bool>()) {
        let cases = CASES.get_or_init(cases);
        let case = &cases[case_i % cases.len()];
        let mut delta = case.delta.clone();
        for m in &muts {
            apply(&mut delta, m);
        }
        let enc = DeltaEncoder::new(DeltaConfig { strict_reconstruction: strict, ..DeltaConfig::default() });
        if let Ok(w) = enc.decode_delta(&delta, &case.reference, &case.key) {
            prop_assert_eq!(w.nbytes(), case.reference.nbytes());
            if strict {
                // Strict decoding only returns what matches the key.
                prop_assert_eq!(w.data(), case.target.data());
            }
        }
    }

    #[test]
    fn random_deltas_never_panic(kind in 0usize..9, data in proptest::collection::vec(any::<u8>(), 0..1024),
                                 meta in proptest::collection::vec((prop_oneof![Just("codec".to_string()), Just("bits".to_string()), Just("rows".to_string()), Just("axis".to_string()), Just("num_nonzero".to_string()), Just("scale".to_string()), Just("offset".to_string()), Just("shuffle".to_string()), ".{0,6}"], json_value()), 0..8),
                                 dt in 0usize..15, shape in proptest::collection::vec(0usize..40, 0..3)) {
        let dtype = DType::ALL[dt];
        let n: usize = shape.iter().product();
        let reference = WeightTensor::from_bytes("r", shape.clone(), dtype, vec![7u8; n * dtype.size()]).unwrap();
        let delta = Delta {
            delta_type: DeltaType::ALL[kind],
            data: Bytes::from(data),
            metadata: meta.into_iter().collect(),
            original_shape: shape,
            original_dtype: dtype,
            reference_hash: reference.compute_hash(),
            compression_ratio: 1.0,
        };
        let key = reference.compute_hash();
        let _ = DeltaEncoder::default().decode_delta(&delta, &reference, &key);
    }
}

#[test]
fn specific_malformations_are_errors() {
    for case in cases() {
        let enc = DeltaEncoder::default();
        // Untouched: decodes (lossless ones strictly).
        if case.delta.delta_type.is_lossless() {
            let back = enc
                .decode_delta(&case.delta, &case.reference, &case.key)
                .unwrap();
            assert_eq!(back.data(), case.target.data());
        }
        // Truncated by one byte, and emptied.
        let mut d = case.delta.clone();
        d.data = d.data.slice(..d.data.len() - 1);
        assert!(
            enc.decode_delta(&d, &case.reference, &case.key).is_err(),
            "{}",
            d.delta_type
        );
        d.data = Bytes::new();
        assert!(enc.decode_delta(&d, &case.reference, &case.key).is_err());
        // Metadata of the wrong type.
        if case.delta.metadata.contains_key("codec") {
            let mut d = case.delta.clone();
            d.metadata.insert("codec".into(), Value::from(3));
            assert!(enc.decode_delta(&d, &case.reference, &case.key).is_err());
        }
        let mut d = case.delta.clone();
        d.metadata
            .insert("target".into(), Value::from("not an object"));
        assert!(enc.decode_delta(&d, &case.reference, &case.key).is_err());
    }
}

//! Deltas written by the Python Coral (coral-ml 1.0) decode to exactly what the Python decoder
//! rebuilds. Needs `CORAL_TEST_PYTHON` (the venv's python with coral-ml); skipped without it,
//! unless `CORAL_TEST_REQUIRE=1`.

use coral_core::delta::{Delta, DeltaConfig, DeltaEncoder, DeltaType};
use coral_core::{CoreError, DType, JsonMap, WeightTensor};

fn python() -> Option<String> {
    match std::env::var("CORAL_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            assert!(
                std::env::var("CORAL_TEST_REQUIRE").as_deref() != Ok("1"),
                "CORAL_TEST_PYTHON is not set and CORAL_TEST_REQUIRE=1"
            );
            eprintln!("skipped: CORAL_TEST_PYTHON is not set");
            None
        }
    }
}

#[test]
fn python_deltas_decode_as_python_does() {
    let Some(py) = python() else { return };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/python_deltas.py");
    let out = std::process::Command::new(py).arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(cases.len() >= 12, "only {} cases", cases.len());
    let strict = DeltaEncoder::new(DeltaConfig::default());
    for c in &cases {
        let kind: DeltaType = c["delta_type"].as_str().unwrap().parse().unwrap();
        let dtype = DType::from_name(c["dtype"].as_str().unwrap()).unwrap();
        let shape: Vec<usize> = serde_json::from_value(c["shape"].clone()).unwrap();
        let hex = |k: &str| hex::decode(c[k].as_str().unwrap()).unwrap();
        let reference =
            WeightTensor::from_bytes("r", shape.clone(), dtype, hex("reference")).unwrap();
        let expected = WeightTensor::from_bytes("r", shape.clone(), dtype, hex("decoded")).unwrap();
        let metadata: JsonMap = serde_json::from_value(c["metadata"].clone()).unwrap();
        let delta = Delta {
            delta_type: kind,
            data: hex("data").into(),
            metadata,
            original_shape: shape,
            original_dtype: dtype,
            reference_hash: reference.compute_hash(),
            compression_ratio: 0.0,
        };
        // The Python result's key: a strict decode succeeds only when every bit agrees.
        let back = strict
            .decode_delta(&delta, &reference, &expected.compute_hash())
            .unwrap_or_else(|e| panic!("{kind} {dtype}: {e}"));
        assert_eq!(back.data(), expected.data(), "{kind} {dtype}");
        // Python deltas carry no target metadata: the reference's is used.
        assert_eq!(back.name(), "r");
        // Truncated: an error, not a panic.
        let mut bad = delta.clone();
        bad.data = bad.data.slice(..bad.data.len().saturating_sub(3));
        assert!(strict
            .decode_delta(&bad, &reference, &expected.compute_hash())
            .is_err());
    }
}

#[test]
fn python_style_deltas_are_checked() {
    // A hand-made Python float32_raw delta: float32 differences, no metadata.
    let r = WeightTensor::from_vec("r", vec![4], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let t = WeightTensor::from_vec("t", vec![4], vec![1.5f32, 2.0, 2.0, 4.25]).unwrap();
    let d: Vec<u8> = [0.5f32, 0.0, -1.0, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let delta = Delta {
        delta_type: DeltaType::Float32Raw,
        data: d.into(),
        metadata: JsonMap::new(),
        original_shape: vec![4],
        original_dtype: DType::F32,
        reference_hash: r.compute_hash(),
        compression_ratio: 0.0,
    };
    let enc = DeltaEncoder::default();
    let back = enc.decode_delta(&delta, &r, &t.compute_hash()).unwrap();
    assert_eq!(back.data(), t.data());
    // Against the wrong key: an integrity error.
    assert!(matches!(
        enc.decode_delta(&delta, &r, &r.compute_hash()),
        Err(CoreError::Integrity { .. })
    ));
    // A sparse index out of range is an error.
    let pairs: Vec<u8> = [9.0f32, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut sparse = delta.clone();
    sparse.delta_type = DeltaType::Sparse;
    sparse.data = pairs.into();
    assert!(enc.decode_delta(&sparse, &r, &t.compute_hash()).is_err());
    // A type the Python Coral does not have needs Coral's metadata.
    let mut xor = delta;
    xor.delta_type = DeltaType::XorFloat32;
    assert!(enc.decode_delta(&xor, &r, &t.compute_hash()).is_err());
}

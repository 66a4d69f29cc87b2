//! The encoder's contract: refusals with reasons, target metadata, hash checks, the automatic
//! lossless choice.

use coral_core::delta::{encode_best_lossless, DeltaConfig, DeltaEncoder, DeltaRefusal, DeltaType};
use coral_core::{CoreError, DType, WeightMetadata, WeightTensor};

fn tensor(name: &str, values: Vec<f32>) -> WeightTensor {
    let n = values.len();
    WeightTensor::from_vec(name, vec![n / 16, 16], values).unwrap()
}

fn base(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.731).sin() * 0.05).collect()
}

fn tuned(v: &[f32]) -> Vec<f32> {
    v.iter()
        .enumerate()
        .map(|(i, x)| if i % 7 == 0 { x + 1e-4 } else { *x })
        .collect()
}

#[test]
fn refusals_carry_reasons() {
    let enc = DeltaEncoder::new(DeltaConfig::default());
    let a = tensor("a", base(1024));
    let b = WeightTensor::from_vec("b", vec![1024], base(1024)).unwrap();
    assert!(matches!(
        enc.can_encode_as_delta(&a, &b),
        Err(DeltaRefusal::ShapeMismatch { .. })
    ));
    let c = WeightTensor::from_bytes("c", vec![64, 16], DType::I32, vec![0u8; 4096]).unwrap();
    let why = enc.can_encode_as_delta(&a, &c).unwrap_err();
    assert!(matches!(why, DeltaRefusal::DTypeMismatch { .. }));
    assert!(why.to_string().contains("int32"), "{why}");

    let small = tensor("s", base(64));
    let why = enc.can_encode_as_delta(&small, &small).unwrap_err();
    assert_eq!(
        why,
        DeltaRefusal::TooSmall {
            nbytes: 256,
            min_weight_size: 512
        }
    );
    let err = enc
        .encode_delta(&small, &small, &small.compute_hash())
        .unwrap_err();
    assert!(err.to_string().contains("min_weight_size"), "{err}");

    // float32_raw is never smaller than the weight compressed: refused by size.
    let raw = DeltaEncoder::new(DeltaConfig {
        delta_type: DeltaType::Float32Raw,
        ..DeltaConfig::default()
    });
    let t = tensor("t", tuned(&base(1024)));
    let r = tensor("r", base(1024));
    let rk = r.compute_hash();
    raw.can_encode_as_delta(&t, &r).unwrap();
    let why = raw.try_encode_delta(&t, &r, &rk).unwrap().unwrap_err();
    assert!(matches!(why, DeltaRefusal::NotSmaller { .. }), "{why}");
    // Unless the ratio allows it.
    let lax = DeltaEncoder::new(DeltaConfig {
        delta_type: DeltaType::Float32Raw,
        max_delta_ratio: f64::INFINITY,
        min_compression_ratio: f64::NEG_INFINITY,
        ..DeltaConfig::default()
    });
    let d = lax.encode_delta(&t, &r, &rk).unwrap();
    assert_eq!(d.nbytes(), t.nbytes());

    // A saving below min_compression_ratio is refused.
    let greedy = DeltaEncoder::new(DeltaConfig {
        min_compression_ratio: 0.999,
        ..DeltaConfig::default()
    });
    let why = greedy.try_encode_delta(&t, &r, &rk).unwrap().unwrap_err();
    assert!(matches!(why, DeltaRefusal::TooLittleSaving { .. }), "{why}");

    // A strategy that does not take the dtype.
    let xb = DeltaEncoder::new(DeltaConfig {
        delta_type: DeltaType::XorBfloat16,
        ..DeltaConfig::default()
    });
    assert!(matches!(
        xb.can_encode_as_delta(&t, &r),
        Err(DeltaRefusal::UnsupportedDType { .. })
    ));

    // Quantized strategies refuse non-finite differences up front.
    let mut nan = base(1024);
    nan[3] = f32::NAN;
    let q = DeltaEncoder::new(DeltaConfig {
        delta_type: DeltaType::Int8Quantized,
        ..DeltaConfig::default()
    });
    assert!(matches!(
        q.can_encode_as_delta(&tensor("n", nan), &r),
        Err(DeltaRefusal::NonFinite { .. })
    ));
}

#[test]
fn bad_config_is_an_error() {
    let t = tensor("t", tuned(&base(1024)));
    let r = tensor("r", base(1024));
    for cfg in [
        DeltaConfig {
            compression_level: 99,
            ..DeltaConfig::default()
        },
        DeltaConfig {
            quantization_bits: 4,
            ..DeltaConfig::default()
        },
        DeltaConfig {
            sparse_threshold: -1.0,
            ..DeltaConfig::default()
        },
        DeltaConfig {
            max_delta_ratio: f64::NAN,
            ..DeltaConfig::default()
        },
    ] {
        assert!(cfg.validate().is_err());
        assert!(DeltaEncoder::new(cfg)
            .encode_delta(&t, &r, &r.compute_hash())
            .is_err());
    }
}

#[test]
fn decoded_weight_has_the_targets_metadata() {
    let mut md = WeightMetadata::new("encoder.layer.3.weight", vec![64, 16], DType::F32);
    md.layer_type = Some("Linear".into());
    md.model_name = Some("tuned-model".into());
    md.compression_info
        .insert("note".into(), serde_json::Value::from("x"));
    let values = tuned(&base(1024));
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let t = WeightTensor::new(md.clone(), bytes).unwrap();
    let mut r = tensor("reference.weight", base(1024));
    let mut rmd = r.metadata().clone();
    rmd.model_name = Some("base-model".into());
    r = r.with_metadata(rmd).unwrap();
    let (rk, tk) = (r.compute_hash(), t.compute_hash());
    for kind in DeltaType::ALL.into_iter().filter(|k| k.accepts(DType::F32)) {
        let enc = DeltaEncoder::new(DeltaConfig {
            delta_type: kind,
            strict_reconstruction: !matches!(
                kind,
                DeltaType::Int8Quantized | DeltaType::Int16Quantized | DeltaType::PerAxisScaled
            ),
            sparse_threshold: 0.0,
            ..DeltaConfig::default()
        });
        let d = enc
            .encode_delta_unchecked(kind, &t, &r, &rk)
            .unwrap()
            .unwrap();
        assert_eq!(d.reference_hash, rk);
        assert_eq!(d.original_shape, vec![64, 16]);
        assert_eq!(d.original_dtype, DType::F32);
        assert!(d.compression_ratio > 0.0);
        let back = enc.decode_delta(&d, &r, &tk).unwrap();
        assert_eq!(back.name(), "encoder.layer.3.weight", "{kind}");
        assert_eq!(back.metadata().layer_type.as_deref(), Some("Linear"));
        assert_eq!(back.metadata().model_name.as_deref(), Some("tuned-model"));
        assert_eq!(back.metadata().compression_info, md.compression_info);
        assert_eq!(back.metadata().hash, Some(tk));
        if kind.is_lossless() || kind == DeltaType::Sparse {
            assert_eq!(back.data(), t.data(), "{kind}");
        }
    }
}

#[test]
fn reconstruction_is_checked_against_the_key() {
    let t = tensor("t", tuned(&base(1024)));
    let r = tensor("r", base(1024));
    let rk = r.compute_hash();
    let wrong = r.compute_hash();
    let strict = DeltaEncoder::default();
    let d = strict.encode_delta(&t, &r, &rk).unwrap();
    assert!(matches!(
        strict.decode_delta(&d, &r, &wrong),
        Err(CoreError::Integrity { .. })
    ));
    let lax = DeltaEncoder::new(DeltaConfig {
        strict_reconstruction: false,
        ..DeltaConfig::default()
    });
    let back = lax.decode_delta(&d, &r, &wrong).unwrap();
    assert_eq!(back.data(), t.data());

    // A lossy delta does not match the target's key: strict decoding says so.
    let q = DeltaEncoder::new(DeltaConfig {
        delta_type: DeltaType::Int8Quantized,
        ..DeltaConfig::default()
    });
    let d = q.encode_delta(&t, &r, &rk).unwrap();
    assert!(matches!(
        q.decode_delta(&d, &r, &t.compute_hash()),
        Err(CoreError::Integrity { .. })
    ));

    // A reference of another shape is an error.
    let other = WeightTensor::from_vec("o", vec![1024], base(1024)).unwrap();
    let d = strict.encode_delta(&t, &r, &rk).unwrap();
    assert!(strict.decode_delta(&d, &other, &t.compute_hash()).is_err());
}

#[test]
fn best_lossless_picks_the_smallest_and_pays() {
    let r = tensor("r", base(4096));
    let t = tensor("t", tuned(&base(4096)));
    let rk = r.compute_hash();
    let best = encode_best_lossless(&t, &r, &rk).unwrap().unwrap();
    assert!(best.delta_type.is_lossless());
    let full = coral_core::CodecSpec::default()
        .compress(t.data(), 4)
        .unwrap()
        .len();
    assert!(best.nbytes() < full, "{} vs {full}", best.nbytes());
    let enc = DeltaEncoder::new(DeltaConfig {
        min_weight_size: 0,
        ..DeltaConfig::default()
    });
    for kind in DeltaType::LOSSLESS {
        if let Ok(d) = enc.encode_delta_unchecked(kind, &t, &r, &rk).unwrap() {
            assert!(best.nbytes() <= d.nbytes(), "{kind} is smaller");
        }
    }
    assert_eq!(
        DeltaEncoder::default()
            .decode_delta(&best, &r, &t.compute_hash())
            .unwrap()
            .data(),
        t.data()
    );

    // Identical tensors need no delta (deduplication).
    assert!(encode_best_lossless(&r, &r, &rk).unwrap().is_none());
    // Shapes that differ, and tiny weights, get none either.
    let flat = WeightTensor::from_vec("f", vec![4096], base(4096)).unwrap();
    assert!(encode_best_lossless(&flat, &r, &rk).unwrap().is_none());
    let tiny = tensor("s", base(32));
    assert!(
        encode_best_lossless(&tiny, &tensor("s2", tuned(&base(32))), &rk)
            .unwrap()
            .is_none()
    );
    // A very compressible target against an unrelated reference: no delta pays.
    let zeros = tensor("z", vec![0.0; 4096]);
    let noise: Vec<f32> = (0..4096u32)
        .map(|i| f32::from_bits(i.wrapping_mul(2654435761) >> 2))
        .collect();
    let noise = tensor("n", noise);
    assert!(encode_best_lossless(&zeros, &noise, &noise.compute_hash())
        .unwrap()
        .is_none());
}

#[test]
fn bf16_small_update_prefers_a_compact_delta() {
    let r: Vec<half::bf16> = base(8192)
        .iter()
        .map(|v| half::bf16::from_f32(*v))
        .collect();
    let t: Vec<half::bf16> = r
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if i % 3 == 0 {
                half::bf16::from_bits(v.to_bits().wrapping_add(1))
            } else {
                *v
            }
        })
        .collect();
    let r = WeightTensor::from_vec("r", vec![512, 16], r).unwrap();
    let t = WeightTensor::from_vec("t", vec![512, 16], t).unwrap();
    let best = encode_best_lossless(&t, &r, &r.compute_hash())
        .unwrap()
        .unwrap();
    let full = coral_core::CodecSpec::default()
        .compress(t.data(), 2)
        .unwrap()
        .len();
    assert!(best.nbytes() * 5 < full * 2, "{} vs {full}", best.nbytes());
}

#[test]
fn estimates_are_sane() {
    let t = tensor("t", tuned(&base(1024)));
    let r = tensor("r", base(1024));
    for kind in DeltaType::ALL {
        let enc = DeltaEncoder::new(DeltaConfig {
            delta_type: kind,
            ..DeltaConfig::default()
        });
        let est = enc.estimate_delta_size(&t, &r);
        match kind {
            DeltaType::Float32Raw => assert_eq!(est, 4096),
            DeltaType::Int8Quantized => assert_eq!(est, 1024),
            DeltaType::Int16Quantized => assert_eq!(est, 2048),
            DeltaType::XorBfloat16 => assert_eq!(est, 4096, "refused: full size"),
            _ => assert!(est < 4096, "{kind}: {est}"),
        }
    }
    let other = WeightTensor::from_vec("o", vec![1024], base(1024)).unwrap();
    assert_eq!(
        DeltaEncoder::default().estimate_delta_size(&t, &other),
        4096
    );
}

#[test]
fn config_uses_the_seeds_keys() {
    let v = serde_json::to_value(DeltaConfig::default()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "delta_type",
        "sparse_threshold",
        "quantization_bits",
        "compression_level",
        "max_delta_ratio",
        "min_compression_ratio",
        "min_weight_size",
        "strict_reconstruction",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert_eq!(v["delta_type"], "compressed");
    let back: DeltaConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back, DeltaConfig::default());
    assert!(serde_json::from_str::<DeltaConfig>(r#"{"delta_type": "bogus"}"#).is_err());
}

//! [`DeltaEncoder`]: builds, checks and applies deltas.

use rayon::prelude::*;
use serde_json::Value;

use crate::codec::{Codec, CodecSpec};
use crate::delta::payload::err;
use crate::delta::{legacy, lossless, lossy, Delta, DeltaType};
use crate::dtype::DType;
use crate::error::{CoreError, Result};
use crate::hash::ContentHash;
use crate::tensor::{JsonMap, WeightMetadata, WeightTensor};

/// The metadata key holding the target weight's own metadata.
pub const TARGET_KEY: &str = "target";

/// How deltas are built: the seed's `DeltaConfig`.
///
/// Serializes with the seed's `to_dict()` keys (`delta_type` as its name, e.g. `"compressed"`);
/// missing keys take their defaults.
///
/// ```
/// use coral_core::delta::{DeltaConfig, DeltaType};
/// let c: DeltaConfig = serde_json::from_str(r#"{"delta_type": "xor_bfloat16", "min_weight_size": 1024}"#)?;
/// assert_eq!(c.delta_type, DeltaType::XorBfloat16);
/// assert_eq!(c.min_weight_size, 1024);
/// assert_eq!(c.compression_level, DeltaConfig::default().compression_level);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DeltaConfig {
    /// The strategy [`DeltaEncoder::encode_delta`] uses. Default: `compressed` (the seed's
    /// default, `float32_raw`, is never smaller than the weight compressed, so the size check
    /// would refuse it every time).
    pub delta_type: DeltaType,
    /// `sparse`: differences with `|t - r|` at most this are dropped. Default 1e-6.
    pub sparse_threshold: f64,
    /// `per_axis_scaled`: 8 or 16. Default 8.
    pub quantization_bits: u32,
    /// zstd level of the compressed strategies, 1-22 or -7..-1. Default 3 (the store's codec;
    /// the seed's 6 was a zlib level).
    pub compression_level: i32,
    /// Refuse a delta whose payload is at least this fraction of the weight compressed with
    /// [`CodecSpec::default`]. Default 1.0: a delta must be smaller than the weight compressed.
    /// `f64::INFINITY` turns the check off.
    pub max_delta_ratio: f64,
    /// Refuse a delta that saves less than this fraction of the weight compressed with
    /// [`CodecSpec::default`] (`1 - delta / compressed`). Default 0.0.
    pub min_compression_ratio: f64,
    /// Weights with fewer data bytes than this are not delta-encoded. Default 512.
    pub min_weight_size: usize,
    /// When decoding, a result that does not match the target's hash is an error
    /// ([`CoreError::Integrity`]); when off, a logged warning. Default on. A lossy delta does
    /// not rebuild its target exactly, so decoding one needs this off.
    pub strict_reconstruction: bool,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        DeltaConfig {
            delta_type: DeltaType::Compressed,
            sparse_threshold: 1e-6,
            quantization_bits: 8,
            compression_level: 3,
            max_delta_ratio: 1.0,
            min_compression_ratio: 0.0,
            min_weight_size: 512,
            strict_reconstruction: true,
        }
    }
}

impl DeltaConfig {
    /// Checks the fields: a valid zstd level, 8 or 16 bits, a non-negative threshold.
    pub fn validate(&self) -> Result<()> {
        Codec::Zstd {
            level: self.compression_level,
        }
        .validate()
        .map_err(|e| CoreError::Delta(format!("compression_level: {e}")))?;
        if self.quantization_bits != 8 && self.quantization_bits != 16 {
            return Err(CoreError::Delta(format!(
                "quantization_bits must be 8 or 16, got {}",
                self.quantization_bits
            )));
        }
        if self.sparse_threshold.is_nan() || self.sparse_threshold < 0.0 {
            return Err(CoreError::Delta(format!(
                "sparse_threshold must be >= 0, got {}",
                self.sparse_threshold
            )));
        }
        if self.max_delta_ratio.is_nan() || self.min_compression_ratio.is_nan() {
            return Err(CoreError::Delta(
                "max_delta_ratio and min_compression_ratio must be numbers".into(),
            ));
        }
        Ok(())
    }

    /// The codec of the compressed strategies: zstd at `compression_level`, with shuffle.
    pub fn codec_spec(&self) -> CodecSpec {
        CodecSpec::new(
            Codec::Zstd {
                level: self.compression_level,
            },
            true,
        )
    }
}

/// Why a pair of weights is not delta-encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaRefusal {
    /// Shapes differ.
    #[error("target shape {target:?} differs from the reference's {reference:?}")]
    ShapeMismatch {
        /// Target shape.
        target: Vec<usize>,
        /// Reference shape.
        reference: Vec<usize>,
    },
    /// Dtypes differ.
    #[error("target dtype {target} differs from the reference's {reference}")]
    DTypeMismatch {
        /// Target dtype.
        target: DType,
        /// Reference dtype.
        reference: DType,
    },
    /// The weight is under `min_weight_size`.
    #[error("weight of {nbytes} bytes is under min_weight_size {min_weight_size}")]
    TooSmall {
        /// The weight's data bytes.
        nbytes: usize,
        /// The configured minimum.
        min_weight_size: usize,
    },
    /// The strategy does not accept the dtype.
    #[error("{delta_type} does not accept {dtype}")]
    UnsupportedDType {
        /// The strategy.
        delta_type: DeltaType,
        /// The dtype.
        dtype: DType,
    },
    /// A lossy quantized strategy met a non-finite difference (NaN, infinity, or a range that
    /// overflows), for which no error bound can hold.
    #[error("{delta_type} needs finite differences (and ranges of differences)")]
    NonFinite {
        /// The strategy.
        delta_type: DeltaType,
    },
    /// The delta is not smaller than `max_delta_ratio` times the weight compressed.
    #[error("delta of {delta_bytes} bytes is not under {max_delta_ratio} x the {compressed_bytes} bytes of the weight compressed")]
    NotSmaller {
        /// Payload bytes.
        delta_bytes: usize,
        /// The weight compressed with `CodecSpec::default()`.
        compressed_bytes: usize,
        /// The configured ratio.
        max_delta_ratio: f64,
    },
    /// The delta saves less than `min_compression_ratio`.
    #[error("delta saves {saving:.4} of the weight compressed, under min_compression_ratio {min_compression_ratio}")]
    TooLittleSaving {
        /// `1 - delta / compressed`.
        saving: f64,
        /// The configured minimum.
        min_compression_ratio: f64,
    },
}

/// Builds and applies deltas (the seed's `DeltaEncoder`).
#[derive(Debug, Clone, Default)]
pub struct DeltaEncoder {
    config: DeltaConfig,
}

impl DeltaEncoder {
    /// An encoder with `config`.
    pub fn new(config: DeltaConfig) -> Self {
        DeltaEncoder { config }
    }

    /// The configuration.
    pub fn config(&self) -> &DeltaConfig {
        &self.config
    }

    /// The cheap checks, without encoding: same shape and dtype, at least `min_weight_size`
    /// bytes, a dtype the configured strategy accepts, and (quantized strategies) finite
    /// differences. Returns the reason when the pair is refused. The size check against the
    /// weight compressed needs the encoded delta, so [`encode_delta`](Self::encode_delta) makes it.
    pub fn can_encode_as_delta(
        &self,
        target: &WeightTensor,
        reference: &WeightTensor,
    ) -> std::result::Result<(), DeltaRefusal> {
        self.check_pair(self.config.delta_type, target, reference)?;
        let kind = self.config.delta_type;
        if matches!(
            kind,
            DeltaType::Int8Quantized | DeltaType::Int16Quantized | DeltaType::PerAxisScaled
        ) && lossy::finite_diffs(target.dtype(), target.data(), reference.data()).is_none()
        {
            return Err(DeltaRefusal::NonFinite { delta_type: kind });
        }
        Ok(())
    }

    fn check_pair(
        &self,
        kind: DeltaType,
        target: &WeightTensor,
        reference: &WeightTensor,
    ) -> std::result::Result<(), DeltaRefusal> {
        if target.shape() != reference.shape() {
            return Err(DeltaRefusal::ShapeMismatch {
                target: target.shape().to_vec(),
                reference: reference.shape().to_vec(),
            });
        }
        if target.dtype() != reference.dtype() {
            return Err(DeltaRefusal::DTypeMismatch {
                target: target.dtype(),
                reference: reference.dtype(),
            });
        }
        if target.nbytes() < self.config.min_weight_size {
            return Err(DeltaRefusal::TooSmall {
                nbytes: target.nbytes(),
                min_weight_size: self.config.min_weight_size,
            });
        }
        if !kind.accepts(target.dtype()) {
            return Err(DeltaRefusal::UnsupportedDType {
                delta_type: kind,
                dtype: target.dtype(),
            });
        }
        Ok(())
    }

    /// Encodes `target` against `reference` with the configured strategy, refusing (as
    /// [`CoreError::Delta`], with the reason) what [`try_encode_delta`](Self::try_encode_delta)
    /// refuses.
    pub fn encode_delta(
        &self,
        target: &WeightTensor,
        reference: &WeightTensor,
        reference_key: &ContentHash,
    ) -> Result<Delta> {
        self.try_encode_delta(target, reference, reference_key)?
            .map_err(|why| {
                err(
                    target.name(),
                    format!("{} delta refused: {why}", self.config.delta_type),
                )
            })
    }

    /// Encodes with the configured strategy. The outer error is a failure (bad configuration,
    /// codec error); the inner one a refusal: the checks of
    /// [`can_encode_as_delta`](Self::can_encode_as_delta), then a payload not under
    /// `max_delta_ratio` times the weight compressed with [`CodecSpec::default`], or saving less
    /// than `min_compression_ratio` of it.
    pub fn try_encode_delta(
        &self,
        target: &WeightTensor,
        reference: &WeightTensor,
        reference_key: &ContentHash,
    ) -> Result<std::result::Result<Delta, DeltaRefusal>> {
        self.config.validate()?;
        if let Err(why) = self.check_pair(self.config.delta_type, target, reference) {
            return Ok(Err(why));
        }
        let delta = match self.encode_with(
            self.config.delta_type,
            self.config.codec_spec(),
            target,
            reference,
            reference_key,
        )? {
            Ok(d) => d,
            Err(why) => return Ok(Err(why)),
        };
        let (max_ratio, min_saving) = (
            self.config.max_delta_ratio,
            self.config.min_compression_ratio,
        );
        if max_ratio == f64::INFINITY && min_saving == f64::NEG_INFINITY {
            return Ok(Ok(delta));
        }
        let compressed = compressed_size(target)?;
        Ok(size_check(delta.nbytes(), compressed, max_ratio, min_saving).map(|()| delta))
    }

    /// Encodes with `delta_type`, skipping the size checks (shape, dtype and the strategy's own
    /// conditions still apply). For forced strategies and measurements.
    pub fn encode_delta_unchecked(
        &self,
        delta_type: DeltaType,
        target: &WeightTensor,
        reference: &WeightTensor,
        reference_key: &ContentHash,
    ) -> Result<std::result::Result<Delta, DeltaRefusal>> {
        self.config.validate()?;
        let unbounded = DeltaEncoder::new(DeltaConfig {
            min_weight_size: 0,
            ..self.config.clone()
        });
        if let Err(why) = unbounded.check_pair(delta_type, target, reference) {
            return Ok(Err(why));
        }
        self.encode_with(
            delta_type,
            self.config.codec_spec(),
            target,
            reference,
            reference_key,
        )
    }

    /// Encodes with `kind`; the pair is already checked for shape, dtype and acceptance.
    fn encode_with(
        &self,
        kind: DeltaType,
        spec: CodecSpec,
        target: &WeightTensor,
        reference: &WeightTensor,
        reference_key: &ContentHash,
    ) -> Result<std::result::Result<Delta, DeltaRefusal>> {
        let name = target.name();
        let dtype = target.dtype();
        let mut meta = JsonMap::new();
        let (t, r) = (&target.data()[..], &reference.data()[..]);
        let data = if kind.is_lossless() {
            lossless::encode(name, kind, dtype, t, r, spec, &mut meta)?
        } else {
            match lossy::encode(
                name,
                kind,
                dtype,
                target.shape(),
                t,
                r,
                spec,
                self.config.quantization_bits,
                self.config.sparse_threshold,
                &mut meta,
            )? {
                Some(d) => d,
                None => return Ok(Err(DeltaRefusal::NonFinite { delta_type: kind })),
            }
        };
        meta.insert(
            TARGET_KEY.into(),
            Value::Object(target_meta(target.metadata())),
        );
        let compression_ratio = if data.is_empty() {
            target.nbytes() as f64
        } else {
            target.nbytes() as f64 / data.len() as f64
        };
        Ok(Ok(Delta {
            delta_type: kind,
            data: data.into(),
            metadata: meta,
            original_shape: target.shape().to_vec(),
            original_dtype: dtype,
            reference_hash: *reference_key,
            compression_ratio,
        }))
    }

    /// Rebuilds the target from `delta` and its `reference`, and checks it against `target_key`
    /// (an error when `strict_reconstruction`, a logged warning otherwise). The result carries the
    /// target's name, layer type, model name and compression info recorded in the delta, and
    /// `target_key` as its hash.
    ///
    /// A malformed delta (unknown strategy parameters, wrong payload length, truncated or corrupt
    /// payload, bad metadata, a reference of another shape or dtype) is an error, never a panic.
    ///
    /// A delta without the `target` metadata key was written by the Python Coral (coral-ml 1.0)
    /// and is decoded with that decoder's semantics (see `docs/format.md`), so Python stores keep
    /// working; the hash check says whether the (float-arithmetic) result is the target.
    pub fn decode_delta(
        &self,
        delta: &Delta,
        reference: &WeightTensor,
        target_key: &ContentHash,
    ) -> Result<WeightTensor> {
        let mut meta = match delta.metadata.get(TARGET_KEY) {
            Some(v) => parse_target_meta(reference.name(), v)?,
            None => reference.metadata().clone(),
        };
        let name = meta.name.clone();
        if delta.original_shape != reference.shape() || delta.original_dtype != reference.dtype() {
            return Err(err(
                &name,
                format!(
                    "delta is for {} {:?}, the reference is {} {:?}",
                    delta.original_dtype,
                    delta.original_shape,
                    reference.dtype(),
                    reference.shape()
                ),
            ));
        }
        let kind = delta.delta_type;
        let dtype = delta.original_dtype;
        if !kind.accepts(dtype) {
            return Err(err(&name, format!("{kind} does not accept {dtype}")));
        }
        let r = &reference.data()[..];
        let python = !delta.metadata.contains_key(TARGET_KEY) && legacy::is_python_type(kind);
        let data = if python {
            legacy::decode(&name, kind, dtype, &delta.data, r, &delta.metadata)?
        } else if kind.is_lossless() {
            lossless::decode(&name, kind, dtype, &delta.data, r, &delta.metadata)?
        } else {
            lossy::decode(
                &name,
                kind,
                dtype,
                &delta.original_shape,
                &delta.data,
                r,
                &delta.metadata,
            )?
        };
        meta.shape = delta.original_shape.clone();
        meta.dtype = dtype;
        meta.hash = None;
        let rebuilt = WeightTensor::new(meta, data)?;
        match rebuilt.verify(target_key) {
            Ok(()) => {}
            Err(e) if self.config.strict_reconstruction => return Err(e),
            Err(e) => tracing::warn!(
                tensor = %name,
                delta_type = %kind,
                "delta reconstruction does not match its key: {e}"
            ),
        }
        let mut md = rebuilt.metadata().clone();
        md.hash = Some(*target_key);
        rebuilt.with_metadata(md)
    }

    /// Estimated payload bytes of the configured strategy, without compressing: exact for
    /// `float32_raw`; for the compressed strategies the number of non-zero bytes of the stream
    /// they compress (zero bytes cost almost nothing to zstd after the shuffle), which is an
    /// estimate only; the uncompressed code bytes for the quantized ones; 8 + element size per
    /// kept element for `sparse`. A pair that cannot be encoded estimates as the full weight.
    pub fn estimate_delta_size(&self, target: &WeightTensor, reference: &WeightTensor) -> usize {
        let kind = self.config.delta_type;
        if self.check_pair(kind, target, reference).is_err() {
            return target.nbytes();
        }
        let (t, r) = (&target.data()[..], &reference.data()[..]);
        let w = target.dtype().size();
        let n = target.size();
        let nonzero = |v: &[u8]| v.iter().filter(|&&b| b != 0).count();
        match kind {
            DeltaType::Float32Raw => target.nbytes(),
            DeltaType::Compressed => nonzero(&crate::delta::payload::sub_zigzag(t, r, w)),
            DeltaType::XorFloat32 | DeltaType::XorBfloat16 | DeltaType::ExponentMantissa => {
                t.iter().zip(r).filter(|(a, b)| a != b).count()
            }
            DeltaType::Int8Quantized => n,
            DeltaType::Int16Quantized => 2 * n,
            DeltaType::PerAxisScaled => {
                lossy::rows_of(target.shape()) * 16
                    + n * (self.config.quantization_bits as usize / 8)
            }
            DeltaType::Sparse => {
                let thr = self.config.sparse_threshold;
                let kept = t
                    .chunks_exact(w)
                    .zip(r.chunks_exact(w))
                    .filter(|(a, b)| {
                        let d = crate::delta::payload::to_f64(target.dtype(), a)
                            - crate::delta::payload::to_f64(target.dtype(), b);
                        super::lossy::kept(d, thr)
                    })
                    .count();
                kept * (8 + w)
            }
        }
    }

    /// The smallest lossless delta among the strategies that accept the dtype, or `None` when
    /// the pair is refused (shape, dtype, `min_weight_size`), when the tensors are identical
    /// (deduplication stores those for free) or when no delta is smaller than the weight
    /// compressed with [`CodecSpec::default`] (and within `max_delta_ratio` /
    /// `min_compression_ratio`).
    pub fn encode_best_lossless(
        &self,
        target: &WeightTensor,
        reference: &WeightTensor,
        reference_key: &ContentHash,
    ) -> Result<Option<Delta>> {
        self.config.validate()?;
        if self
            .check_pair(DeltaType::Float32Raw, target, reference)
            .is_err()
            || target.data() == reference.data()
        {
            return Ok(None);
        }
        let dtype = target.dtype();
        let zstd = self.config.codec_spec();
        let mut candidates: Vec<(DeltaType, CodecSpec)> = DeltaType::LOSSLESS
            .into_iter()
            .filter(|k| k.accepts(dtype))
            .map(|k| (k, zstd))
            .collect();
        if matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            // The difference in ulps through the float codec: a fine-tune's ±1-ulp steps are
            // small integers there, each coded in well under a byte.
            candidates.push((DeltaType::Compressed, CodecSpec::new(Codec::Coral, false)));
        }
        let (compressed, deltas) = rayon::join(
            || compressed_size(target),
            || {
                candidates
                    .par_iter()
                    .map(|&(k, spec)| self.encode_with(k, spec, target, reference, reference_key))
                    .collect::<Result<Vec<_>>>()
            },
        );
        let compressed = compressed?;
        let best = deltas?
            .into_iter()
            .filter_map(std::result::Result::ok)
            .min_by_key(Delta::nbytes);
        Ok(best.filter(|d| {
            size_check(
                d.nbytes(),
                compressed,
                self.config.max_delta_ratio,
                self.config.min_compression_ratio,
            )
            .is_ok()
        }))
    }
}

/// [`DeltaEncoder::encode_best_lossless`] with the default configuration: the smallest lossless
/// delta, or `None` when the pair is refused, identical, or no delta is smaller than the weight
/// compressed with [`CodecSpec::default`] (zstd-3 with shuffle).
pub fn encode_best_lossless(
    target: &WeightTensor,
    reference: &WeightTensor,
    reference_key: &ContentHash,
) -> Result<Option<Delta>> {
    DeltaEncoder::default().encode_best_lossless(target, reference, reference_key)
}

/// Bytes of `w` compressed with the store's best codec, [`CodecSpec::default`].
fn compressed_size(w: &WeightTensor) -> Result<usize> {
    Ok(CodecSpec::default()
        .compress(w.data(), w.dtype().size())
        .map_err(|e| err(w.name(), format!("compressing: {e}")))?
        .len())
}

fn size_check(
    delta: usize,
    compressed: usize,
    max_ratio: f64,
    min_saving: f64,
) -> std::result::Result<(), DeltaRefusal> {
    let (d, c) = (delta as f64, compressed as f64);
    let ratio = if compressed == 0 {
        if delta == 0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        d / c
    };
    if ratio.is_nan() || ratio >= max_ratio {
        return Err(DeltaRefusal::NotSmaller {
            delta_bytes: delta,
            compressed_bytes: compressed,
            max_delta_ratio: max_ratio,
        });
    }
    let saving = 1.0 - ratio;
    if saving < min_saving {
        return Err(DeltaRefusal::TooLittleSaving {
            saving,
            min_compression_ratio: min_saving,
        });
    }
    Ok(())
}

/// The target's free-form metadata, as recorded under [`TARGET_KEY`].
fn target_meta(m: &WeightMetadata) -> JsonMap {
    let mut out = JsonMap::new();
    out.insert("name".into(), Value::String(m.name.clone()));
    if let Some(l) = &m.layer_type {
        out.insert("layer_type".into(), Value::String(l.clone()));
    }
    if let Some(l) = &m.model_name {
        out.insert("model_name".into(), Value::String(l.clone()));
    }
    out.insert(
        "compression_info".into(),
        Value::Object(m.compression_info.clone()),
    );
    out
}

fn parse_target_meta(fallback: &str, v: &Value) -> Result<WeightMetadata> {
    let bad = |what: &str| err(fallback, format!("metadata \"target\": {what}"));
    let obj = v.as_object().ok_or_else(|| bad("not an object"))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("\"name\" missing or not a string"))?;
    let opt = |key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(&format!("{key:?} is not a string"))),
        }
    };
    let compression_info = match obj.get("compression_info") {
        None | Some(Value::Null) => JsonMap::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("\"compression_info\" is not an object")),
    };
    let mut md = WeightMetadata::new(name, Vec::new(), DType::U8);
    md.layer_type = opt("layer_type")?;
    md.model_name = opt("model_name")?;
    md.compression_info = compression_info;
    Ok(md)
}

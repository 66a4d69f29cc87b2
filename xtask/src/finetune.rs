//! A fine-tune of a safetensors model, made on the spot.
//!
//! One float tensor in ten (in name order: the 1st, 11th, 21st, ...) gets a small dense update,
//! `w * (1 + 1e-3 * noise)` with `noise` uniform in [-1, 1) from a fixed-seed SplitMix64 (for
//! bfloat16, whose 8-bit mantissa would round that away, `1e-2`); every
//! other tensor, and the header's `__metadata__`, is kept bit for bit. That is what a light
//! fine-tune looks like to a store: most tensors repeat exactly, a few differ slightly.
//!
//! This file is shared: xtask's demo uses it, and `coral-tests` includes it (`#[path]`) so the
//! end-to-end tests make the same fine-tune. It depends only on `anyhow`, `safetensors` and
//! `half`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// One tensor in this many is changed.
pub const CHANGE_EVERY: usize = 10;
/// The relative size of the update.
pub const SCALE: f64 = 1e-3;
/// The relative size of the update for bfloat16 (a step of 1e-3 is below its half-ulp).
pub const SCALE_BF16: f64 = 1e-2;
/// The seed the demo and the tests use.
pub const DEFAULT_SEED: u64 = 0x00C0_FFEE;

/// What a fine-tune changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinetuneReport {
    /// Tensors in the model.
    pub tensors: usize,
    /// Names of the tensors that were changed, in name order.
    pub changed: Vec<String>,
    /// Bytes of tensor data in the model.
    pub bytes_total: u64,
    /// Bytes of tensor data in the changed tensors.
    pub bytes_changed: u64,
}

/// SplitMix64: a small, fixed, well-mixed generator; the same seed gives the same fine-tune on
/// every machine.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn next_signed_unit(&mut self) -> f64 {
        // 53 random bits make a double in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit * 2.0 - 1.0
    }
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// `w * (1 + SCALE * noise)` over little-endian elements of a float dtype.
fn perturb(dtype: Dtype, data: &[u8], rng: &mut SplitMix64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    let scale = if dtype == Dtype::BF16 {
        SCALE_BF16
    } else {
        SCALE
    };
    let mut factor = || 1.0 + scale * rng.next_signed_unit();
    match dtype {
        Dtype::F32 => {
            for c in data.chunks_exact(4) {
                let w = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                out.extend_from_slice(&((f64::from(w) * factor()) as f32).to_le_bytes());
            }
        }
        Dtype::F64 => {
            for c in data.chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                let w = f64::from_le_bytes(b);
                out.extend_from_slice(&(w * factor()).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for c in data.chunks_exact(2) {
                let w = half::f16::from_le_bytes([c[0], c[1]]);
                let v = half::f16::from_f64(w.to_f64() * factor());
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for c in data.chunks_exact(2) {
                let w = half::bf16::from_le_bytes([c[0], c[1]]);
                let v = half::bf16::from_f64(w.to_f64() * factor());
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        other => bail!("cannot perturb a {other:?} tensor"),
    }
    if out.len() != data.len() {
        bail!(
            "tensor data of {} bytes is not a whole number of {dtype:?} elements",
            data.len()
        );
    }
    Ok(out)
}

/// Makes the fine-tune of a safetensors file held in memory; returns the new file's bytes.
pub fn make_finetune_bytes(input: &[u8], seed: u64) -> Result<(Vec<u8>, FinetuneReport)> {
    let st = SafeTensors::deserialize(input).context("reading the safetensors file")?;
    let (_, header) =
        SafeTensors::read_metadata(input).context("reading the safetensors header")?;
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let mut rng = SplitMix64::new(seed);
    let mut changed_data: HashMap<String, Vec<u8>> = HashMap::new();
    let mut changed = Vec::new();
    let mut bytes_total = 0u64;
    let mut bytes_changed = 0u64;
    let mut float_index = 0usize;
    for (name, view) in &tensors {
        let len = view.data().len() as u64;
        bytes_total += len;
        if !is_float(view.dtype()) {
            continue;
        }
        if float_index % CHANGE_EVERY == 0 {
            let data = perturb(view.dtype(), view.data(), &mut rng)
                .with_context(|| format!("changing tensor {name}"))?;
            changed_data.insert(name.clone(), data);
            changed.push(name.clone());
            bytes_changed += len;
        }
        float_index += 1;
    }

    let mut views: Vec<(String, TensorView<'_>)> = Vec::with_capacity(tensors.len());
    for (name, view) in &tensors {
        let data: &[u8] = match changed_data.get(name) {
            Some(d) => d,
            None => view.data(),
        };
        let v = TensorView::new(view.dtype(), view.shape().to_vec(), data)
            .with_context(|| format!("rebuilding tensor {name}"))?;
        views.push((name.clone(), v));
    }
    let bytes = safetensors::serialize(views, header.metadata())
        .context("writing the fine-tuned safetensors file")?;
    let report = FinetuneReport {
        tensors: tensors.len(),
        changed,
        bytes_total,
        bytes_changed,
    };
    Ok((bytes, report))
}

/// Reads `input`, writes its fine-tune to `output`, and says what changed.
pub fn make_finetune(input: &Path, output: &Path, seed: u64) -> Result<FinetuneReport> {
    let data = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let (bytes, report) = make_finetune_bytes(&data, seed)
        .with_context(|| format!("fine-tuning {}", input.display()))?;
    std::fs::write(output, bytes).with_context(|| format!("writing {}", output.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_model() -> Vec<u8> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for i in 0..23 {
            let vals: Vec<u8> = (0..16)
                .flat_map(|j| (1.0f32 + i as f32 + j as f32 * 0.25).to_le_bytes())
                .collect();
            owned.push((format!("layer.{i:02}.weight"), Dtype::F32, vec![4, 4], vals));
        }
        owned.push(("ids".into(), Dtype::I64, vec![3], vec![7u8; 24]));
        let bf: Vec<u8> = (0..8)
            .flat_map(|j| half::bf16::from_f32(0.5 + j as f32).to_le_bytes())
            .collect();
        owned.push(("a.bf16".into(), Dtype::BF16, vec![8], bf));
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize(views, &meta).unwrap()
    }

    #[test]
    fn a_tenth_changes_slightly_and_the_rest_is_identical() {
        let input = sample_model();
        let (out, report) = make_finetune_bytes(&input, DEFAULT_SEED).unwrap();
        let a = SafeTensors::deserialize(&input).unwrap();
        let b = SafeTensors::deserialize(&out).unwrap();
        assert_eq!(report.tensors, 25);
        // 24 float tensors in name order: the 1st, 11th and 21st change.
        assert_eq!(report.changed.len(), 3);
        assert_eq!(report.changed[0], "a.bf16");
        let mut names: Vec<String> = a.names().into_iter().cloned().collect();
        names.sort();
        let mut names_b: Vec<String> = b.names().into_iter().cloned().collect();
        names_b.sort();
        assert_eq!(names, names_b);
        for name in &names {
            let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!(x.dtype(), y.dtype());
            assert_eq!(x.shape(), y.shape());
            if report.changed.contains(name) {
                assert_ne!(x.data(), y.data(), "{name} should change");
                if x.dtype() == Dtype::F32 {
                    for (p, q) in x.data().chunks_exact(4).zip(y.data().chunks_exact(4)) {
                        let p = f32::from_le_bytes(p.try_into().unwrap());
                        let q = f32::from_le_bytes(q.try_into().unwrap());
                        assert!(((q - p) / p).abs() <= 1.01e-3, "{name}: {p} -> {q}");
                    }
                }
            } else {
                assert_eq!(x.data(), y.data(), "{name} should be identical");
            }
        }
        let (_, ha) = SafeTensors::read_metadata(&input).unwrap();
        let (_, hb) = SafeTensors::read_metadata(&out).unwrap();
        assert_eq!(ha.metadata(), hb.metadata());
        assert_eq!(report.bytes_changed, 8 * 2 + 2 * 64);
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_seed_does_not() {
        let input = sample_model();
        let (one, _) = make_finetune_bytes(&input, 1).unwrap();
        let (again, _) = make_finetune_bytes(&input, 1).unwrap();
        let (other, _) = make_finetune_bytes(&input, 2).unwrap();
        assert_eq!(one, again);
        assert_ne!(one, other);
    }

    #[test]
    fn noise_stays_in_its_interval() {
        let mut rng = SplitMix64::new(42);
        let xs: Vec<f64> = (0..10_000).map(|_| rng.next_signed_unit()).collect();
        assert!(xs.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(make_finetune_bytes(b"not a safetensors file", 1).is_err());
        assert!(make_finetune_bytes(&[], 1).is_err());
        let mut truncated = sample_model();
        truncated.truncate(truncated.len() / 2);
        assert!(make_finetune_bytes(&truncated, 1).is_err());
    }
}

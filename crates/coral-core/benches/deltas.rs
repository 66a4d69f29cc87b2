//! Delta benchmarks on the real model and on fine-tunes of it made here.
//!
//! Run with `cargo xtask bench`, or directly:
//!
//! ```text
//! CORAL_TEST_MODEL=$PWD/target/model-cache/all-MiniLM-L6-v2/model.safetensors \
//!     cargo bench -p coral-core --bench deltas
//! ```
//!
//! Scenarios (fixed-seed RNG, so every run builds the same weights):
//!
//! - a dense small update of every element, as an optimizer step makes:
//!   `t = w + lr * N(0, 1) * |w|` on the fp32 weights `w`, kept in fp32, or with both `w` and `t`
//!   converted to bf16 with `half` (round to nearest even), as a bf16 checkpoint of a model
//!   trained with fp32 master weights is;
//! - a partial fine-tune: only the last two encoder layers and the pooler change (same update),
//!   the other tensors are identical.
//!
//! For every strategy: payload bytes summed over all tensors against the full weights compressed
//! with the store's best codec (`CodecSpec::default()`, zstd-3 with shuffle), encode and decode
//! throughput (median of several runs over the whole model, one thread; decoding includes the
//! SHA-256 check of the result), and the largest absolute error of the lossy strategies. For
//! `encode_best_lossless`: what a store keeps when it takes the delta when one is returned, the
//! full compressed weight when none is, and nothing for identical tensors (deduplication).
//!
//! Prints markdown for `docs/benchmarks.md`. Without `CORAL_TEST_MODEL` it prints a note and
//! exits (a failure when `CORAL_TEST_REQUIRE=1`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use coral_core::codec::CodecSpec;
use coral_core::delta::{encode_best_lossless, DeltaConfig, DeltaEncoder, DeltaType};
use coral_core::{ContentHash, DType, WeightTensor};

const RUNS: usize = 3;
const MB: f64 = 1e6;

/// splitmix64, with Box-Muller normals.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

struct Pair {
    target: WeightTensor,
    reference: WeightTensor,
    ref_key: ContentHash,
    target_key: ContentHash,
    full_compressed: usize,
}

struct Scenario {
    title: String,
    pairs: Vec<Pair>,
}

fn load_model(path: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).expect("listed tensor");
        if view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name, view.shape().to_vec(), values));
    }
    out
}

fn to_tensor(name: &str, shape: &[usize], dtype: DType, values: &[f32]) -> WeightTensor {
    match dtype {
        DType::BF16 => WeightTensor::from_vec(
            name,
            shape.to_vec(),
            values.iter().map(|v| half::bf16::from_f32(*v)).collect(),
        ),
        _ => WeightTensor::from_vec(name, shape.to_vec(), values.to_vec()),
    }
    .expect("valid tensor")
}

/// One fine-tune of the model: `changed(name)` says which tensors get the update.
fn scenario(
    model: &[(String, Vec<usize>, Vec<f32>)],
    dtype: DType,
    lr: f64,
    seed: u64,
    changed: impl Fn(&str) -> bool,
    title: String,
) -> Scenario {
    let mut rng = Rng(seed);
    let mut pairs = Vec::new();
    for (name, shape, values) in model {
        // The update is taken on the fp32 weights (as with fp32 master weights); both sides are
        // then converted to the scenario's dtype (bf16: round to nearest even).
        let reference = to_tensor(name, shape, dtype, values);
        let tuned: Vec<f32> = if changed(name) {
            values
                .iter()
                .map(|&w| (f64::from(w) + lr * rng.normal() * f64::from(w.abs())) as f32)
                .collect()
        } else {
            values.clone()
        };
        let target = to_tensor(name, shape, dtype, &tuned);
        let full_compressed = CodecSpec::default()
            .compress(target.data(), dtype.size())
            .expect("compress")
            .len();
        pairs.push(Pair {
            ref_key: reference.compute_hash(),
            target_key: target.compute_hash(),
            target,
            reference,
            full_compressed,
        });
    }
    Scenario { title, pairs }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn value(dtype: DType, c: &[u8]) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
        _ => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    }
}

struct Row {
    label: String,
    lossless: bool,
    stored: usize,
    encode: Duration,
    decode: Duration,
    max_err: f64,
    note: String,
}

fn run_strategy(s: &Scenario, kind: DeltaType) -> Option<Row> {
    let dtype = s.pairs.first()?.target.dtype();
    if !kind.accepts(dtype) {
        return None;
    }
    let enc = DeltaEncoder::new(DeltaConfig {
        delta_type: kind,
        min_weight_size: 0,
        strict_reconstruction: kind.is_lossless(),
        ..DeltaConfig::default()
    });
    let mut enc_times = Vec::new();
    let mut deltas = Vec::new();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        deltas = s
            .pairs
            .iter()
            .map(|p| {
                enc.encode_delta_unchecked(kind, &p.target, &p.reference, &p.ref_key)
                    .expect("encode")
                    .expect("not refused")
            })
            .collect();
        enc_times.push(t0.elapsed());
    }
    let mut dec_times = Vec::new();
    let mut max_err = 0f64;
    for run in 0..RUNS {
        let t0 = Instant::now();
        for (p, d) in s.pairs.iter().zip(&deltas) {
            let back = enc
                .decode_delta(d, &p.reference, &p.target_key)
                .expect("decode");
            if run == 0 {
                if kind.is_lossless() {
                    assert_eq!(back.data(), p.target.data(), "{kind} is not exact");
                } else {
                    let w = dtype.size();
                    for (a, b) in back
                        .data()
                        .chunks_exact(w)
                        .zip(p.target.data().chunks_exact(w))
                    {
                        max_err = max_err.max((value(dtype, a) - value(dtype, b)).abs());
                    }
                }
            }
            black_box(back);
        }
        dec_times.push(t0.elapsed());
    }
    Some(Row {
        label: format!("`{kind}`"),
        lossless: kind.is_lossless(),
        stored: deltas.iter().map(|d| d.nbytes()).sum(),
        encode: median(enc_times),
        decode: median(dec_times),
        max_err,
        note: String::new(),
    })
}

fn run_auto(s: &Scenario) -> (Row, Vec<(usize, usize)>) {
    let mut enc_times = Vec::new();
    let mut chosen = Vec::new();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        chosen = s
            .pairs
            .iter()
            .map(|p| encode_best_lossless(&p.target, &p.reference, &p.ref_key).expect("encode"))
            .collect();
        enc_times.push(t0.elapsed());
    }
    let dec = DeltaEncoder::default();
    let mut dec_times = Vec::new();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        for (p, d) in s.pairs.iter().zip(&chosen) {
            if let Some(d) = d {
                let back = dec
                    .decode_delta(d, &p.reference, &p.target_key)
                    .expect("decode");
                assert_eq!(back.data(), p.target.data());
                black_box(back);
            }
        }
        dec_times.push(t0.elapsed());
    }
    let (mut stored, mut as_delta, mut as_full, mut identical) = (0usize, 0, 0, 0);
    let mut per_tensor = Vec::new();
    let mut kinds = std::collections::BTreeMap::new();
    for (p, d) in s.pairs.iter().zip(&chosen) {
        let cost = match d {
            Some(d) => {
                as_delta += 1;
                *kinds.entry(d.delta_type.name()).or_insert(0usize) += 1;
                assert!(d.nbytes() < p.full_compressed);
                d.nbytes()
            }
            None if p.target.data() == p.reference.data() => {
                identical += 1;
                0
            }
            None => {
                as_full += 1;
                p.full_compressed
            }
        };
        per_tensor.push((cost, p.full_compressed));
        stored += cost;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    let row = Row {
        label: "**`encode_best_lossless`** (stored: delta, or full weight, or nothing)".into(),
        lossless: true,
        stored,
        encode: median(enc_times),
        decode: median(dec_times),
        max_err: 0.0,
        note: format!(
            "{as_delta} deltas ({}), {as_full} full, {identical} identical",
            kinds.join(", ")
        ),
    };
    (row, per_tensor)
}

fn main() {
    let Ok(path) = std::env::var("CORAL_TEST_MODEL") else {
        if std::env::var("CORAL_TEST_REQUIRE").as_deref() == Ok("1") {
            panic!("CORAL_TEST_MODEL is not set and CORAL_TEST_REQUIRE=1");
        }
        println!("deltas bench skipped: CORAL_TEST_MODEL is not set");
        return;
    };
    let model = load_model(&path);
    let total: usize = model.iter().map(|(_, _, v)| v.len() * 4).sum();
    println!(
        "### Deltas: {} fp32 tensors, {:.1} MB, from `{}`\n",
        model.len(),
        total as f64 / MB,
        std::path::Path::new(&path)
            .file_name()
            .map_or(path.clone(), |f| f.to_string_lossy().into_owned())
    );
    let partial =
        |n: &str| n.contains("layer.4.") || n.contains("layer.5.") || n.contains("pooler");
    let scenarios = vec![
        scenario(
            &model,
            DType::F32,
            1e-3,
            1,
            |_| true,
            "fp32, dense update lr=1e-3".into(),
        ),
        scenario(
            &model,
            DType::BF16,
            1e-3,
            2,
            |_| true,
            "bf16, dense update lr=1e-3".into(),
        ),
        scenario(
            &model,
            DType::BF16,
            1e-4,
            3,
            |_| true,
            "bf16, dense update lr=1e-4".into(),
        ),
        scenario(
            &model,
            DType::BF16,
            1e-2,
            5,
            |_| true,
            "bf16, dense update lr=1e-2 (stress: ten times the largest step)".into(),
        ),
        scenario(
            &model,
            DType::F32,
            1e-3,
            4,
            partial,
            "fp32, partial fine-tune (layers 4-5 and pooler change, lr=1e-3)".into(),
        ),
    ];
    let mut summary = Vec::new();
    for s in &scenarios {
        let nbytes: usize = s.pairs.iter().map(|p| p.target.nbytes()).sum();
        let full: usize = s.pairs.iter().map(|p| p.full_compressed).sum();
        let changed = s
            .pairs
            .iter()
            .filter(|p| p.target.data() != p.reference.data())
            .count();
        println!(
            "#### {}\n\n{} tensors ({} changed), {:.2} MB raw; full weights compressed (zstd-3 + shuffle): {:.2} MB ({:.1}% of raw)\n",
            s.title,
            s.pairs.len(),
            changed,
            nbytes as f64 / MB,
            full as f64 / MB,
            100.0 * full as f64 / nbytes as f64
        );
        println!("| strategy | lossless | stored MB | vs full compressed | encode MB/s | decode MB/s | max abs error | notes |");
        println!("|---|---|---:|---:|---:|---:|---:|---|");
        let mut rows: Vec<Row> = DeltaType::ALL
            .into_iter()
            .filter_map(|k| run_strategy(s, k))
            .collect();
        let (auto, per_tensor) = run_auto(s);
        rows.push(auto);
        for r in &rows {
            println!(
                "| {} | {} | {:.3} | {:.1}% | {:.0} | {:.0} | {} | {} |",
                r.label,
                if r.lossless { "yes" } else { "no" },
                r.stored as f64 / MB,
                100.0 * r.stored as f64 / full as f64,
                nbytes as f64 / MB / r.encode.as_secs_f64(),
                nbytes as f64 / MB / r.decode.as_secs_f64(),
                if r.lossless {
                    "0 (bit-exact)".to_string()
                } else {
                    format!("{:.3e}", r.max_err)
                },
                r.note
            );
        }
        println!();
        let auto = rows.last().expect("auto row");
        let never_larger = per_tensor.iter().all(|(c, f)| c <= f);
        let unchanged_cost: usize = s
            .pairs
            .iter()
            .zip(&per_tensor)
            .filter(|(p, _)| p.target.data() == p.reference.data())
            .map(|(_, (c, _))| *c)
            .sum();
        summary.push(format!(
            "| {} | {:.1}% | {} | {} B |",
            s.title,
            100.0 * auto.stored as f64 / full as f64,
            if never_larger { "yes" } else { "**no**" },
            unchanged_cost
        ));
    }
    println!("#### Targets (automatic lossless choice)\n");
    println!("| scenario | stored vs full compressed | never larger than full, per tensor | unchanged tensors cost |");
    println!("|---|---:|---|---:|");
    for line in summary {
        println!("{line}");
    }
}

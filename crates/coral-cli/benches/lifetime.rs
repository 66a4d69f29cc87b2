//! A store's lifetime: training-step checkpoints of the real model (all-MiniLM-L6-v2, fp32)
//! kept in rotation, the last two of 20 (`coral add` step k, `coral rm` step k-2, `coral gc`),
//! with the file's size after each step against a new store holding the same two models; once
//! with `gc`'s automatic compaction (a quarter of the file free), once with `--no-compact`
//! (free space only reused). Each step changes a tenth of the float tensors (a different tenth
//! each step, from a fixed seed) by `w·(1 + 1e-3·u)`, on top of the step before.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p coral-cli --bench lifetime` with
//! `CORAL_TEST_MODEL` set; `CORAL_LIFETIME_STEPS` changes the 20). Prints a markdown table.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use coral_store_api::testenv;

const CORAL: &str = env!("CARGO_BIN_EXE_coral");

fn coral(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(CORAL);
    c.env_remove("CORAL_STORE")
        .arg("--store")
        .arg(store)
        .arg("-q")
        .args(args);
    c
}

fn run(mut c: Command) {
    let out = c.output().expect("coral runs");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// One training step on `model` in place: a tenth of the float32 tensors, chosen by `step`.
fn train_step(model: &mut [u8], step: u64) {
    let h = coral_formats::safetensors::parse(model).expect("model parses");
    let mut floats: Vec<_> = h
        .tensors
        .iter()
        .filter(|t| t.dtype == coral_core::DType::F32)
        .map(|t| (t.name.clone(), h.data_start + t.begin, h.data_start + t.end))
        .collect();
    floats.sort();
    let mut rng = Rng(step * 0x1000_0001);
    let n = (floats.len() / 10).max(1);
    for _ in 0..n {
        let i = (rng.next() % floats.len() as u64) as usize;
        let (_, s, e) = floats.swap_remove(i);
        for c in model[s as usize..e as usize].chunks_exact_mut(4) {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            c.copy_from_slice(&((v as f64 * (1.0 + 1e-3 * rng.unit())) as f32).to_le_bytes());
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(model) = testenv::model_path() else {
        eprintln!("lifetime bench: CORAL_TEST_MODEL is not set (run `cargo xtask bench`)");
        return;
    };
    let steps: u64 = std::env::var("CORAL_LIFETIME_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = std::fs::read(&model).expect("model");
    let mut files = Vec::new();
    for k in 1..=steps {
        train_step(&mut bytes, k);
        let p = dir.path().join(format!("step{k}.safetensors"));
        std::fs::write(&p, &bytes).expect("write checkpoint");
        files.push(p);
    }
    let auto = dir.path().join("auto.h5");
    let reuse = dir.path().join("reuse.h5");
    println!(
        "| step | rotated store, gc compacts | rotated store, `gc --no-compact` | a new store with the same 2 models | ratio (compacting) | ratio (reuse only) | gc (compacting) s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut worst = (0.0f64, 0.0f64);
    for k in 1..=steps as usize {
        let f = files[k - 1].to_str().expect("utf-8 path");
        let name = format!("s{k}");
        let mut gc_secs = 0.0;
        for (store, extra) in [(&auto, None), (&reuse, Some("--no-compact"))] {
            run(coral(store, &["add", f, "--name", &name]));
            if k > 2 {
                run(coral(store, &["rm", &format!("s{}", k - 2)]));
                let mut args = vec!["gc"];
                args.extend(extra);
                let t = Instant::now();
                run(coral(store, &args));
                if extra.is_none() {
                    gc_secs = t.elapsed().as_secs_f64();
                }
            }
        }
        let fresh = dir.path().join(format!("fresh{k}.h5"));
        for j in k.saturating_sub(1).max(1)..=k {
            let g = files[j - 1].to_str().expect("utf-8 path");
            run(coral(&fresh, &["add", g, "--name", &format!("s{j}")]));
        }
        let (a, r, n) = (size(&auto), size(&reuse), size(&fresh));
        let (ra, rr) = (a as f64 / n as f64, r as f64 / n as f64);
        if k > 2 {
            worst = (worst.0.max(ra), worst.1.max(rr));
        }
        println!(
            "| {k} | {:.1} MB | {:.1} MB | {:.1} MB | {ra:.3}x | {rr:.3}x | {gc_secs:.2} |",
            a as f64 / 1e6,
            r as f64 / 1e6,
            n as f64 / 1e6
        );
        let _ = std::fs::remove_file(&fresh);
    }
    println!();
    println!(
        "Worst ratio after step 2: {:.3}x with gc's compaction, {:.3}x with reuse only.",
        worst.0, worst.1
    );
}

//! HDF5Store against coral-ml 1.0.0's HDF5Store, side by side, on the real model (fp32 and its
//! bf16 conversion). Prints a markdown table.
//!
//! Each measurement runs in a fresh process (this binary re-run with `--child`, or the venv's
//! Python), so the peak resident memory (VmHWM / ru_maxrss) is that of one operation. Ingest =
//! `store_batch` (hash, compress, write, flush) into a new file; load = `load_batch` of every key
//! (read, decompress, verify) from the file just written. Medians of `CORAL_BENCH_RUNS` (3) runs.
//!
//! Needs CORAL_TEST_MODEL and CORAL_TEST_PYTHON (`cargo xtask bench` sets them).

#[path = "../tests/common/model.rs"]
mod model;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use coral_core::ContentHash;
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::WeightStore;

fn vm_hwm_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak resident size to the current one (Linux `clear_refs` 5), so the peak that
/// follows is that of the operation, not of loading the model file.
fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn opts(config: &str) -> HDF5StoreOptions {
    match config {
        "gzip4" => HDF5StoreOptions::new()
            .compression(Compression::Gzip)
            .level(4),
        "zstd1" => HDF5StoreOptions::new()
            .compression(Compression::Zstd)
            .level(1),
        // The same without the commit's syncs: what durability costs on this disk.
        "zstd1-nosync" => HDF5StoreOptions::new()
            .compression(Compression::Zstd)
            .level(1)
            .durable(false),
        other => panic!("unknown config {other}"),
    }
}

/// Child: one operation, prints `seconds nbytes baseline_kb peak_kb`.
fn child(args: &[String]) {
    let (op, config, dtype, file, model) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
    match op.as_str() {
        "ingest" => {
            let weights = model::load_model(Path::new(model), dtype == "bf16");
            let nbytes: usize = weights.iter().map(|(_, w)| w.nbytes()).sum();
            // Into a new file: removing the previous run's is not part of the measurement.
            let _ = std::fs::remove_file(file);
            reset_hwm();
            let base = vm_hwm_kb();
            let t = Instant::now();
            let mut store = HDF5Store::open(file, opts(config).mode(Mode::Truncate)).unwrap();
            let keys = store.store_batch(&weights).unwrap();
            store.close().unwrap();
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(keys.len(), weights.len());
            println!("{dt} {nbytes} {base} {}", vm_hwm_kb());
        }
        "load" => {
            reset_hwm();
            let base = vm_hwm_kb();
            let store = HDF5Store::open(file, opts(config).mode(Mode::Read)).unwrap();
            let keys: Vec<ContentHash> = store.list_weights().unwrap();
            let t = Instant::now();
            let loaded = store.load_batch(&keys).unwrap();
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(loaded.len(), keys.len());
            let nbytes: usize = loaded.values().map(|w| w.nbytes()).sum();
            println!("{dt} {nbytes} {base} {}", vm_hwm_kb());
        }
        "hash" => {
            // What verifying a load costs at the least: SHA-256 of every tensor, largest first,
            // on every core (rayon), with nothing read or decoded.
            use rayon::prelude::*;
            let mut weights = model::load_model(Path::new(model), dtype == "bf16");
            weights.sort_by_key(|(_, w)| std::cmp::Reverse(w.nbytes()));
            let nbytes: usize = weights.iter().map(|(_, w)| w.nbytes()).sum();
            let t = Instant::now();
            let keys: Vec<ContentHash> = weights
                .par_iter()
                .with_max_len(1)
                .map(|(_, w)| w.compute_hash())
                .collect();
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(keys.len(), weights.len());
            println!("{dt} {nbytes} 0 0");
        }
        other => panic!("unknown op {other}"),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    seconds: f64,
    nbytes: f64,
    extra_mb: f64,
}

fn parse_ours(out: &str) -> Run {
    let v: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(v.len(), 4, "child output {out:?}");
    Run {
        seconds: v[0],
        nbytes: v[1],
        extra_mb: (v[3] - v[2]) / 1024.0,
    }
}

fn run_ours(op: &str, config: &str, dtype: &str, file: &Path, model: &Path) -> Run {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--child", op, config, dtype])
        .arg(file)
        .arg(model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_ours(&String::from_utf8_lossy(&out.stdout))
}

fn run_py(python: &Path, args: &[&str]) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/coral_ml_helper.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Run {
        seconds: v["seconds"].as_f64().unwrap(),
        nbytes: v["nbytes"].as_f64().unwrap(),
        extra_mb: (v["peak_kb"].as_f64().unwrap() - v["baseline_kb"].as_f64().unwrap()) / 1024.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    label: String,
    ingest_mbs: f64,
    load_mbs: f64,
    size: u64,
    saved: f64,
    ingest_mem: f64,
    load_mem: f64,
}

fn measure(
    runs: usize,
    mut f_ingest: impl FnMut() -> (Run, u64),
    mut f_load: impl FnMut() -> Run,
) -> (f64, f64, u64, f64, f64, f64) {
    let mut ti = Vec::new();
    let mut tl = Vec::new();
    let mut mi = Vec::new();
    let mut ml = Vec::new();
    let mut size = 0;
    let mut nbytes = 0.0;
    for _ in 0..runs {
        let (r, s) = f_ingest();
        ti.push(r.nbytes / r.seconds / 1e6);
        mi.push(r.extra_mb);
        size = s;
        nbytes = r.nbytes;
        let l = f_load();
        tl.push(l.nbytes / l.seconds / 1e6);
        ml.push(l.extra_mb);
    }
    (
        median(ti),
        median(tl),
        size,
        1.0 - size as f64 / nbytes,
        median(mi),
        median(ml),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1..]);
        return;
    }
    let (Ok(model), Ok(python)) = (
        std::env::var("CORAL_TEST_MODEL"),
        std::env::var("CORAL_TEST_PYTHON"),
    ) else {
        eprintln!("hdf5 bench: CORAL_TEST_MODEL and CORAL_TEST_PYTHON are needed (run `cargo xtask bench`); skipping");
        return;
    };
    let model = PathBuf::from(model);
    let python = PathBuf::from(python);
    let runs: usize = std::env::var("CORAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<(String, Vec<Row>)> = Vec::new();
    let mut floors: Vec<(String, f64, f64)> = Vec::new();
    for dtype in ["fp32", "bf16"] {
        let mut group = Vec::new();
        let pyfile = dir.path().join(format!("py-{dtype}.h5"));
        let pf = pyfile.to_str().unwrap().to_owned();
        let py = measure(
            runs,
            || {
                let r = run_py(
                    &python,
                    &["ingest", model.to_str().unwrap(), dtype, &pf, "gzip"],
                );
                (r, std::fs::metadata(&pyfile).unwrap().len())
            },
            || run_py(&python, &["load", &pf]),
        );
        group.push(Row {
            label: "coral-ml 1.0.0, gzip-4 (its default)".into(),
            ingest_mbs: py.0,
            load_mbs: py.1,
            size: py.2,
            saved: py.3,
            ingest_mem: py.4,
            load_mem: py.5,
        });
        for (config, label) in [
            ("gzip4", "coral-hdf5, gzip-4 + shuffle (default)"),
            ("zstd1", "coral-hdf5, zstd-1 + shuffle"),
            (
                "zstd1-nosync",
                "coral-hdf5, zstd-1 + shuffle, `durable(false)` (no syncs)",
            ),
        ] {
            let file = dir.path().join(format!("{config}-{dtype}.h5"));
            let r = measure(
                runs,
                || {
                    let r = run_ours("ingest", config, dtype, &file, &model);
                    (r, std::fs::metadata(&file).unwrap().len())
                },
                || run_ours("load", config, dtype, &file, &model),
            );
            group.push(Row {
                label: label.into(),
                ingest_mbs: r.0,
                load_mbs: r.1,
                size: r.2,
                saved: r.3,
                ingest_mem: r.4,
                load_mem: r.5,
            });
        }
        let hash: Vec<f64> = (0..runs)
            .map(|_| {
                let r = run_ours("hash", "zstd1", dtype, Path::new("-"), &model);
                r.nbytes / r.seconds / 1e6
            })
            .collect();
        floors.push((dtype.to_owned(), median(hash), group[0].load_mbs));
        rows.push((dtype.to_owned(), group));
    }
    println!("| model | store | ingest MB/s | ×coral-ml | load MB/s | ×coral-ml | file MB | saved | ingest peak extra MiB | load peak extra MiB |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (dtype, group) in &rows {
        let base = &group[0];
        for r in group {
            println!(
                "| all-MiniLM-L6-v2 {dtype} | {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1}% | {:.0} | {:.0} |",
                r.label,
                r.ingest_mbs,
                r.ingest_mbs / base.ingest_mbs,
                r.load_mbs,
                r.load_mbs / base.load_mbs,
                r.size as f64 / 1e6,
                r.saved * 100.0,
                r.ingest_mem,
                r.load_mem
            );
        }
    }
    println!();
    println!("Verification alone (SHA-256 of every tensor on every core, nothing read or decoded), the ceiling of any verified load here:");
    println!();
    for (dtype, mbs, base) in &floors {
        println!(
            "- {dtype}: {mbs:.0} MB/s, {:.1}× coral-ml's load",
            mbs / base
        );
    }
}

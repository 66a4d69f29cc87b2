//! `coral add` and `coral export` of the real model (all-MiniLM-L6-v2, fp32): wall time and peak
//! memory of the child process, side by side with coral-ml's `HDF5Store` on the same model in
//! the same run; and the bytes stored for the model plus a fine-tune (a tenth of the float
//! tensors changed by a small dense update) against storing both whole.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p coral-cli --bench cli` with
//! `CORAL_TEST_MODEL` and `CORAL_TEST_PYTHON` set). Prints a markdown table.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{measure, median};
use coral_store_api::testenv;

const CORAL: &str = env!("CARGO_BIN_EXE_coral");

fn coral(store: &Path, args: &[&str]) -> Command {
    coral_bin(Path::new(CORAL), store, args)
}

fn coral_bin(bin: &Path, store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.env_remove("CORAL_STORE")
        .arg("--store")
        .arg(store)
        .arg("-q")
        .args(args);
    c
}

fn python(py: &Path, args: &[&str]) -> Command {
    let mut c = common::coral_ml(py);
    c.args(args);
    c
}

fn stored_bytes(store: &Path) -> u64 {
    let out = Command::new(CORAL)
        .env_remove("CORAL_STORE")
        .arg("--store")
        .arg(store)
        .args(["info", "--json"])
        .output()
        .expect("coral info");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["compressed_bytes"].as_u64().unwrap_or(0)
        + v["deltas"]["total_delta_bytes"].as_u64().unwrap_or(0)
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

/// The fine-tune: every tenth float32 tensor (in name order) multiplied by 1 + 1e-3·u, u uniform
/// in [-1, 1) from a fixed generator; same header, so same layout.
fn finetune(model: &[u8]) -> Vec<u8> {
    let h = coral_formats::safetensors::parse(model).expect("model parses");
    let mut out = model.to_vec();
    let mut names: Vec<_> = h
        .tensors
        .iter()
        .filter(|t| t.dtype == coral_core::DType::F32)
        .collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    let mut state = 0x00C0_FFEEu64;
    for t in names.iter().step_by(10) {
        let s = (h.data_start + t.begin) as usize;
        let e = (h.data_start + t.end) as usize;
        for c in out[s..e].chunks_exact_mut(4) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            c.copy_from_slice(&((v as f64 * (1.0 + 1e-3 * u)) as f32).to_le_bytes());
        }
    }
    out
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run when benched.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(model) = testenv::model_path() else {
        return;
    };
    let python_exe = testenv::python();
    let runs: usize = std::env::var("CORAL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let model_bytes = std::fs::read(&model).expect("model");
    let size = model_bytes.len() as u64;

    let (mut add_t, mut add_m, mut exp_t, mut exp_m) = (vec![], vec![], vec![], vec![]);
    let mut store = PathBuf::new();
    for i in 0..runs {
        store = dir.path().join(format!("coral-{i}.h5"));
        let (t, m, _) = measure(&mut coral(
            &store,
            &["add", model.to_str().unwrap(), "--name", "m"],
        ));
        add_t.push(t);
        add_m.push(m as f64);
        let out = dir.path().join(format!("out-{i}.safetensors"));
        let (t, m, _) = measure(&mut coral(&store, &["export", "m", out.to_str().unwrap()]));
        exp_t.push(t);
        exp_m.push(m as f64);
        assert!(
            std::fs::read(&out).expect("export") == model_bytes,
            "export differs"
        );
        let _ = std::fs::remove_file(&out);
    }
    let coral_stored = stored_bytes(&store);
    let before = before_and_after(&model, &model_bytes, dir.path(), runs);

    let (mut py_add_t, mut py_add_m, mut py_exp_t, mut py_exp_m) = (vec![], vec![], vec![], vec![]);
    let mut py_size = 0;
    if let Some(py) = &python_exe {
        for i in 0..runs {
            let s = dir.path().join(format!("coralml-{i}.h5"));
            let ss = s.to_str().unwrap();
            let (_, m, out) = measure(&mut python(py, &["add", model.to_str().unwrap(), ss]));
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python json");
            py_add_t.push(v["seconds"].as_f64().unwrap_or(f64::NAN));
            py_add_m.push(m as f64);
            py_size = std::fs::metadata(&s).map(|m| m.len()).unwrap_or(0);
            let o = dir.path().join(format!("coralml-out-{i}.safetensors"));
            let (_, m, out) = measure(&mut python(
                py,
                &["export", model.to_str().unwrap(), ss, o.to_str().unwrap()],
            ));
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python json");
            py_exp_t.push(v["seconds"].as_f64().unwrap_or(f64::NAN));
            py_exp_m.push(m as f64);
            assert!(
                std::fs::read(&o).expect("export") == model_bytes,
                "coral-ml export differs"
            );
        }
    }

    // Model plus fine-tune.
    let ft_bytes = finetune(&model_bytes);
    let ft = dir.path().join("ft.safetensors");
    std::fs::write(&ft, &ft_bytes).expect("write ft");
    let both_raw = size * 2;
    let with_ref = dir.path().join("ref.h5");
    let whole = dir.path().join("whole.h5");
    let solo = dir.path().join("solo.h5");
    let run = |s: &Path, args: &[&str]| {
        let st = coral(s, args).status().expect("coral");
        assert!(st.success(), "{args:?}");
    };
    run(&with_ref, &["add", model.to_str().unwrap(), "--name", "m"]);
    run(
        &with_ref,
        &[
            "add",
            ft.to_str().unwrap(),
            "--name",
            "ft",
            "--reference",
            "m",
        ],
    );
    run(&whole, &["add", model.to_str().unwrap(), "--name", "m"]);
    run(
        &whole,
        &[
            "add",
            ft.to_str().unwrap(),
            "--name",
            "ft",
            "--reference",
            "none",
        ],
    );
    run(&solo, &["add", ft.to_str().unwrap(), "--name", "ft"]);
    let (ref_b, whole_b) = (stored_bytes(&with_ref), stored_bytes(&whole));
    let both_whole = coral_stored + stored_bytes(&solo);

    println!("| `coral` on all-MiniLM-L6-v2 ({}) | coral (Rust, HDF5) | coral-ml 1.0.0 HDF5Store | ratio |", mb(size));
    println!("|---|---|---|---|");
    let row = |what: &str, a: &[f64], b: &[f64], fmt: &dyn Fn(f64) -> String| {
        let (ma, mb_) = (
            median(a.to_vec()),
            if b.is_empty() {
                f64::NAN
            } else {
                median(b.to_vec())
            },
        );
        println!(
            "| {what} | {} | {} | {:.2}× |",
            fmt(ma),
            if b.is_empty() { "n/a".into() } else { fmt(mb_) },
            mb_ / ma
        );
    };
    let secs = |s: f64| format!("{s:.3} s");
    let mem = |m: f64| mb(m as u64);
    row("add: wall time (median)", &add_t, &py_add_t, &secs);
    row("add: peak RSS", &add_m, &py_add_m, &mem);
    row("export: wall time (median)", &exp_t, &py_exp_t, &secs);
    row("export: peak RSS", &exp_m, &py_exp_m, &mem);
    println!(
        "| bytes stored for the model | {} | {} (file) | {:.2}× |",
        mb(coral_stored),
        if py_size > 0 {
            mb(py_size)
        } else {
            "n/a".into()
        },
        py_size as f64 / coral_stored as f64
    );
    println!();
    println!("| model + fine-tune (a tenth of the fp32 tensors changed, ×(1+1e-3·u)) | bytes | of both whole |");
    println!("|---|---|---|");
    println!("| the two files | {} | |", mb(both_raw));
    println!(
        "| stored whole, each in its own store | {} | 100% |",
        mb(both_whole)
    );
    println!(
        "| one store, no reference (unchanged tensors deduplicated) | {} | {:.1}% |",
        mb(whole_b),
        100.0 * whole_b as f64 / both_whole as f64
    );
    println!(
        "| one store, `--reference` (changed tensors as deltas) | {} | {:.1}% |",
        mb(ref_b),
        100.0 * ref_b as f64 / both_whole as f64
    );
    let (named, auto) = reference_choice(&model, &ft, dir.path(), runs);
    println!();
    println!(
        "| `coral add` of the fine-tune into a store of {CHOICE_MODELS} models | wall s (median) | fine-tune stored |"
    );
    println!("|---|---|---|");
    println!("| `--reference m` | {:.3} | {} |", named.0, mb(named.2));
    println!(
        "| no `--reference`: chosen automatically (chose {}) | {:.3} ({:+.1}%) | {} |",
        auto.1,
        auto.0,
        100.0 * (auto.0 / named.0 - 1.0),
        mb(auto.2)
    );
    if let Some(table) = before {
        println!();
        println!("{table}");
    }
    println!();
    println!(
        "{runs} runs each, medians; coral times are the whole process, spawn to exit, coral-ml's are timed inside Python (interpreter start excluded); peak RSS is the highest sum of `VmHWM` over coral and its child process (the crash guard runs the command in a child), sampled every millisecond (coral-ml's includes the Python interpreter and NumPy)."
    );
}

/// Models in the store the reference is chosen from: the model and aliases of it (the same
/// tensors under other names: manifests only), so that choosing reads that many manifests.
const CHOICE_MODELS: usize = 25;

/// The cost of choosing the reference: the fine-tune added into copies of a store holding the
/// model under [`CHOICE_MODELS`] names, with `--reference m` and without (chosen), interleaved
/// run by run. Returns the medians (seconds), the model chosen and the bytes stored.
type Choice = (f64, String, u64);

fn reference_choice(model: &Path, ft: &Path, dir: &Path, runs: usize) -> (Choice, Choice) {
    let base = dir.join("choice-base.h5");
    for i in 0..CHOICE_MODELS {
        let name = if i == 0 {
            "m".to_string()
        } else {
            format!("alias-{i:02}")
        };
        let st = coral(
            &base,
            &[
                "add",
                model.to_str().unwrap(),
                "--name",
                &name,
                "--reference",
                "none",
            ],
        )
        .status()
        .expect("coral");
        assert!(st.success());
    }
    let (mut named, mut auto) = (Vec::new(), Vec::new());
    let mut chose = [String::new(), String::new()];
    let mut stored = [0u64; 2];
    for _ in 0..runs.max(5) {
        for with_name in [true, false] {
            let store = dir.join("choice.h5");
            std::fs::copy(&base, &store).expect("copy store");
            let mut args = vec!["--json", "add", ft.to_str().unwrap(), "--name", "ft"];
            if with_name {
                args.extend(["--reference", "m"]);
            }
            let (t, _, out) = measure(&mut coral(&store, &args));
            let r: serde_json::Value = serde_json::from_str(&out).expect("add --json");
            let k = usize::from(!with_name);
            if with_name {
                named.push(t);
            } else {
                auto.push(t);
                assert_eq!(r["reference_auto"], true, "{r}");
            }
            chose[k] = r["reference"].as_str().unwrap_or("").to_string();
            stored[k] = r["bytes_stored"].as_u64().unwrap_or(0);
            std::fs::remove_file(&store).expect("remove store");
        }
    }
    std::fs::remove_file(&base).expect("remove store");
    let [c0, c1] = chose;
    (
        (median(named), c0, stored[0]),
        (median(auto), c1, stored[1]),
    )
}

/// With `CORAL_BENCH_BEFORE` set to another build of `coral` (an earlier commit's), `add` and
/// `export` of the model by both, interleaved run by run (before, after, before, ...) so that
/// both see the same machine; a markdown table of medians.
fn before_and_after(model: &Path, model_bytes: &[u8], dir: &Path, runs: usize) -> Option<String> {
    let before = PathBuf::from(std::env::var_os("CORAL_BENCH_BEFORE")?);
    let after = PathBuf::from(CORAL);
    let runs = runs.max(5);
    let mut t: [[Vec<f64>; 2]; 2] = Default::default();
    for i in 0..runs {
        for (b, bin) in [&before, &after].into_iter().enumerate() {
            let store = dir.join(format!("ba-{b}-{i}.h5"));
            let (s, _, _) = measure(&mut coral_bin(
                bin,
                &store,
                &["add", model.to_str()?, "--name", "m"],
            ));
            t[0][b].push(s);
            let out = dir.join(format!("ba-{b}-{i}.safetensors"));
            let (s, _, _) = measure(&mut coral_bin(bin, &store, &["export", "m", out.to_str()?]));
            t[1][b].push(s);
            assert!(
                std::fs::read(&out).ok()? == model_bytes,
                "export by {} differs",
                bin.display()
            );
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(&store);
        }
    }
    let mut table = format!(
        "| all-MiniLM-L6-v2 (fp32), medians of {runs}, interleaved | before ({}) | after (this build) | before / after |\n|---|---|---|---|\n",
        before.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    );
    for (what, [b, a]) in [("`coral add`", &t[0]), ("`coral export`", &t[1])] {
        let (mb_, ma) = (median(b.clone()), median(a.clone()));
        table.push_str(&format!(
            "| {what} | {mb_:.3} s | {ma:.3} s | {:.2}× |\n",
            mb_ / ma
        ));
    }
    Some(table)
}

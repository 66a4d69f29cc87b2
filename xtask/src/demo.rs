//! `cargo xtask demo`: the README's main job, a real user's day with the real model.
//!
//! In a fresh folder `target/demo`, with the local store `target/demo/coral.h5`:
//! 1. `coral add` all-MiniLM-L6-v2 as `minilm`;
//! 2. `coral export` it and check the file is byte-identical to the input;
//! 3. make a fine-tune on the spot (one tensor in ten slightly changed, see [`crate::finetune`])
//!    and `coral add` it as `minilm-ft` with `minilm` as its reference;
//! 4. `coral verify`, then `coral info`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::finetune;
use crate::setup::{self, Paths};

/// Builds the `coral` binary (release unless `debug`) with the given cargo arguments and returns
/// its path, read from cargo's own report of what it built.
pub fn build_coral(paths: &Paths, release: bool, extra: &[&str]) -> Result<PathBuf> {
    let mut cmd = setup::cargo();
    cmd.current_dir(&paths.root)
        .arg("build")
        .args([
            "--message-format=json-render-diagnostics",
            "-p",
            "coral-cli",
            "--bin",
            "coral",
        ])
        .args(extra)
        .stdout(Stdio::piped());
    if release {
        cmd.arg("--release");
    }
    eprintln!("$ {}", setup::show(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", setup::show(&cmd)))?;
    // Read cargo's JSON on a thread while waiting in a way a signal can interrupt.
    let mut stdout = child
        .stdout
        .take()
        .context("cargo's stdout was not piped")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).map(|_| buf)
    });
    let status = setup::wait_interruptible(&mut child)?;
    let stdout = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the thread reading cargo's output panicked"))?
        .context("reading cargo's output")?;
    if !status.success() {
        bail!("building the coral binary failed ({status})");
    }
    let text = String::from_utf8_lossy(&stdout);
    let mut found = None;
    for line in text.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "coral" {
            if let Some(exe) = msg["executable"].as_str() {
                found = Some(PathBuf::from(exe));
            }
        }
    }
    found.context("cargo built no `coral` executable")
}

/// Shows a path relative to the workspace root when it is under it.
fn rel(paths: &Paths, p: &Path) -> PathBuf {
    p.strip_prefix(&paths.root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}

/// One `coral` invocation of the demo, run from the workspace root.
struct Coral<'a> {
    bin: &'a Path,
    store: &'a Path,
    paths: &'a Paths,
}

impl Coral<'_> {
    fn run(&self, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new(self.bin);
        cmd.current_dir(&self.paths.root)
            .arg("--store")
            .arg(self.store)
            .args(args)
            .env_remove("CORAL_STORE")
            .stdin(Stdio::null());
        println!();
        println!(
            "$ coral --store {} {}",
            self.store.display(),
            args.join(" ")
        );
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", setup::show(&cmd)))?;
        let status = setup::wait_interruptible(&mut child)?;
        if !status.success() {
            bail!(
                "`coral {}` failed ({status}); the command was: {}",
                args.join(" "),
                setup::show(&cmd)
            );
        }
        Ok(())
    }
}

fn files_identical(a: &Path, b: &Path) -> Result<bool> {
    let x = fs::read(a).with_context(|| format!("reading {}", a.display()))?;
    let y = fs::read(b).with_context(|| format!("reading {}", b.display()))?;
    Ok(x == y)
}

/// Bytes in decimal megabytes, as `coral` prints them.
fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Runs the demo.
pub fn demo(paths: &Paths) -> Result<()> {
    setup::ensure_system_packages(&[setup::PKG_CONFIG, setup::LIBHDF5_DEV])?;
    let model = setup::ensure_model(paths)?;
    let bin = build_coral(paths, true, &[])?;

    let dir = paths.target.join("demo");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = rel(paths, &dir.join("coral.h5"));
    let model_rel = rel(paths, &model);
    let exported = dir.join("out.safetensors");
    let finetuned = dir.join("minilm-ft.safetensors");
    let coral = Coral {
        bin: &bin,
        store: &store,
        paths,
    };

    println!();
    println!(
        "Coral demo: the real all-MiniLM-L6-v2 ({}), a fine-tune of it, one local store.",
        mb(setup::MODEL_SIZE)
    );
    println!(
        "`coral` below is {}; commands run from {}",
        rel(paths, &bin).display(),
        paths.root.display()
    );

    // 1. In.
    coral.run(&["add", &model_rel.to_string_lossy(), "--name", "minilm"])?;

    // 2. Out, byte for byte.
    coral.run(&["export", "minilm", &rel(paths, &exported).to_string_lossy()])?;
    let sha_in = setup::sha256_file(&model)?;
    let sha_out = setup::sha256_file(&exported)?;
    if !files_identical(&model, &exported)? {
        bail!(
            "{} differs from {} (SHA-256 {sha_out} vs {sha_in})",
            exported.display(),
            model.display()
        );
    }
    println!(
        "identical: {} and {}, SHA-256 {sha_in}",
        model_rel.display(),
        rel(paths, &exported).display()
    );

    // 3. A fine-tune, made on the spot.
    println!();
    let report = finetune::make_finetune(&model, &finetuned, finetune::DEFAULT_SEED)?;
    println!(
        "fine-tune: {} of {} tensors changed by w*(1+1e-3*noise) ({} of {} of weights), the rest identical -> {}",
        report.changed.len(),
        report.tensors,
        mb(report.bytes_changed),
        mb(report.bytes_total),
        rel(paths, &finetuned).display()
    );
    coral.run(&[
        "add",
        &rel(paths, &finetuned).to_string_lossy(),
        "--name",
        "minilm-ft",
        "--reference",
        "minilm",
    ])?;

    // 4. Check everything, and see what it costs.
    coral.run(&["verify"])?;
    coral.run(&["info"])?;

    let store_abs = paths.root.join(&store);
    let stored = fs::metadata(&store_abs)
        .with_context(|| format!("reading {}", store_abs.display()))?
        .len();
    let whole = setup::MODEL_SIZE
        + fs::metadata(&finetuned)
            .with_context(|| format!("reading {}", finetuned.display()))?
            .len();
    println!();
    println!(
        "Two models as files: {}; the store holding both: {} ({:.1}% of the files).",
        mb(whole),
        mb(stored),
        100.0 * stored as f64 / whole as f64
    );
    println!("Demo done: the store is {}.", store.display());
    Ok(())
}

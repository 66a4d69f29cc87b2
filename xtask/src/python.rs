//! The Python package, `coral_rs` (crates/coral-py): its wheel, its pytest suite, and the check
//! that `pip install ./crates/coral-py` works in a fresh venv.
//!
//! - [`install_wheel`]: `pip wheel` (the PEP 517 build, with maturin from the test venv) into
//!   `target/wheels/`, then installed into the test venv;
//! - [`pytest`]: the suite in `crates/coral-py/tests`, run in the test venv with the test
//!   environment (model, S3 servers on loopback);
//! - [`fresh_install`]: a new venv at `target/py-fresh`, `pip install ./crates/coral-py` in it
//!   (pip fetches maturin and numpy itself, as on a user's machine), and one store and load.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup::{self, Paths};

fn crate_dir(paths: &Paths) -> PathBuf {
    paths.root.join("crates").join("coral-py")
}

/// `PATH` with the test venv's `bin` first: the maturin build backend runs `maturin` from it.
fn venv_path(paths: &Paths) -> std::ffi::OsString {
    let bin = paths.venv().join("bin");
    match std::env::var_os("PATH") {
        Some(p) => {
            let mut v = vec![bin];
            v.extend(std::env::split_paths(&p));
            std::env::join_paths(v).unwrap_or(p)
        }
        None => bin.into_os_string(),
    }
}

/// Builds the wheel into `target/wheels/` and installs it into the test venv; its path.
pub fn install_wheel(paths: &Paths) -> Result<PathBuf> {
    let wheels = paths.target.join("wheels");
    fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    // One coral_rs wheel in the folder: the one this build makes.
    for e in fs::read_dir(&wheels).with_context(|| format!("reading {}", wheels.display()))? {
        let p = e?.path();
        if is_our_wheel(&p) {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    setup::run(
        setup::pip(paths)
            .args(["wheel", "--no-deps", "--no-build-isolation", "-w"])
            .arg(&wheels)
            .arg(crate_dir(paths))
            .env("PATH", venv_path(paths)),
    )
    .context("building the coral_rs wheel")?;
    let mut built = Vec::new();
    for e in fs::read_dir(&wheels)? {
        let p = e?.path();
        if is_our_wheel(&p) {
            built.push(p);
        }
    }
    let [wheel] = built.as_slice() else {
        bail!(
            "expected one coral_rs wheel in {}, found {built:?}",
            wheels.display()
        );
    };
    setup::run(
        setup::pip(paths)
            .args(["install", "--no-deps", "--force-reinstall"])
            .arg(wheel),
    )
    .context("installing the coral_rs wheel into the test venv")?;
    Ok(wheel.clone())
}

fn is_our_wheel(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("coral_rs-") && n.ends_with(".whl"))
}

/// Runs the pytest suite with `env`; its exit code.
pub fn pytest(paths: &Paths, env: &[(String, String)], extra: &[String]) -> Result<i32> {
    let mut cmd = Command::new(paths.python());
    cmd.current_dir(&paths.root)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(crate_dir(paths).join("tests"))
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)));
    Ok(crate::exit_code(setup::run_status(&mut cmd)?))
}

/// `pip install ./crates/coral-py` in a new venv, then a store and a load through it.
pub fn fresh_install(paths: &Paths) -> Result<()> {
    let venv = paths.target.join("py-fresh");
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    setup::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    let python = venv.join("bin").join("python");
    setup::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "--disable-pip-version-check",
                "--no-input",
                "install",
            ])
            .arg(crate_dir(paths))
            .env("PIP_NO_INPUT", "1"),
    )
    .context("pip install ./crates/coral-py in a fresh venv")?;
    let dir = tempfile_dir(paths)?;
    let script = format!(
        "import numpy as np, coral_rs\n\
         from coral_rs.storage import HDF5Store\n\
         w = coral_rs.WeightTensor(np.arange(12, dtype=np.float32).reshape(3, 4))\n\
         with HDF5Store({path:?}) as s:\n    \
             k = s.store(w)\n    \
             assert (s.load(k).data == w.data).all()\n\
         print('fresh venv: coral_rs', coral_rs.__version__, 'stores and loads')\n",
        path = dir.join("fresh.h5").display().to_string()
    );
    let r = setup::run(Command::new(&python).arg("-c").arg(script));
    let _ = fs::remove_dir_all(&dir);
    r.context("using coral_rs from the fresh venv")
}

fn tempfile_dir(paths: &Paths) -> Result<PathBuf> {
    let dir = paths
        .target
        .join("tmp")
        .join(format!("py-fresh-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The whole Python part of `cargo xtask test`: wheel, suite, fresh install. Its exit code.
pub fn suite(paths: &Paths, env: &[(String, String)], extra: &[String]) -> Result<i32> {
    eprintln!("xtask: the Python package (crates/coral-py)");
    install_wheel(paths)?;
    let code = pytest(paths, env, extra)?;
    if code != 0 {
        eprintln!("xtask: the coral_rs pytest suite failed (exit status {code})");
        return Ok(code);
    }
    fresh_install(paths)?;
    Ok(0)
}

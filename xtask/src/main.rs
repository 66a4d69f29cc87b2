//! `cargo xtask`: Coral's developer tasks.
//!
//! - `cargo xtask demo`: the README's main job: the real model through the `coral` command, a
//!   fine-tune of it, `coral verify` and `coral info`, on a local store under `target/demo`.
//! - `cargo xtask test [ARGS...]`: installs what the tests need when it is missing, starts the
//!   S3-compatible test servers on loopback (moto, and a 3-node Garage cluster: see
//!   [`garage`]), runs
//!   `cargo test --workspace --all-features --no-fail-fast ARGS...`
//!   with the test environment set, stops the server; then, when no ARGS were given, runs
//!   `coral-hdf5`'s tests again on a second library, the HDF5 2.x that `hdf5-metno-src` builds
//!   from source (`cargo xtask test-hdf5-static [ARGS]` runs only those), and the Python
//!   package's: its wheel built into `target/wheels/` and installed in the venv, its pytest
//!   suite, and `pip install ./crates/coral-py` in a fresh venv (`cargo xtask test-python
//!   [PYTEST ARGS]` runs only those; see [`python`]); and exits with the tests' status.
//! - `cargo xtask ci`: `cargo fmt --check`, clippy with warnings denied, `cargo deny check`, then
//!   the same as `cargo xtask test`. `.ci/run` runs it.
//! - `cargo xtask bench [ARGS...]`: the same set-up and server, the Python package and the
//!   peers (lmzip, glyd) installed in the venv (for the `python` and `peers` benches), then `cargo bench --workspace ARGS...`, and the command
//!   line that reproduces it.
//! - `cargo xtask with-env -- COMMAND...`: the same set-up and server around any command, for
//!   example `cargo xtask with-env -- cargo test -p coral-s3`.

mod demo;
mod finetune;
mod garage;
mod python;
mod setup;

use std::process::ExitStatus;

use anyhow::{Context, Result};

use setup::{Paths, S3Server};

const USAGE: &str = "\
usage: cargo xtask <task> [ARGS...]

tasks:
  demo            the README's main job: the real model in and out of a local store, a
                  fine-tune of it, verify and info (in target/demo)
  test [ARGS]     set up, start the S3 test server, run `cargo test --workspace --all-features --no-fail-fast ARGS`
  test-hdf5-static [ARGS]
                  coral-hdf5's tests on the HDF5 2.x built from source (hdf5-metno-src);
                  `test` without ARGS runs them after the workspace's
  test-python [PYTEST ARGS]
                  the Python package: wheel into target/wheels, installed in the venv, its
                  pytest suite, and pip install ./crates/coral-py in a fresh venv; `test`
                  without ARGS runs it after the workspace's
  ci              fmt check, clippy -D warnings (on both libraries), cargo deny, then `test`
  bench [ARGS]    set up, start the S3 test server, run `cargo bench --workspace ARGS`
  with-env -- COMMAND...
                  set up, start the S3 test server, run COMMAND with the test environment
";

fn main() {
    setup::install_signal_handlers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            1
        }
    };
    // A signal that stopped us wins: the caller should see we were interrupted.
    std::process::exit(setup::interrupted_exit_code().unwrap_or(code));
}

fn dispatch(args: &[String]) -> Result<i32> {
    let paths = Paths::new()?;
    let (task, rest) = match args.split_first() {
        Some((t, rest)) => (t.as_str(), rest),
        None => {
            eprint!("{USAGE}");
            return Ok(2);
        }
    };
    match task {
        "demo" => {
            demo::demo(&paths)?;
            Ok(0)
        }
        "test" => test(&paths, rest),
        "test-hdf5-static" => test_static_hdf5(&paths, rest),
        "test-python" => test_python(&paths, rest),
        "ci" => ci(&paths, rest),
        "bench" => bench(&paths, rest),
        "with-env" => with_env(&paths, rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => {
            eprint!("xtask: unknown task `{other}`\n\n{USAGE}");
            Ok(2)
        }
    }
}

/// The exit code a status stands for (128 + signal when a signal ended it).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The S3 engines of a run: moto and the Garage cluster, stopped when dropped.
#[derive(Debug)]
struct Servers {
    moto: S3Server,
    garage: garage::Garage,
}

impl Servers {
    fn keep_log(&mut self) {
        self.moto.keep_log();
        self.garage.keep_logs();
    }
}

/// Everything the tests and benches need: system packages, the venv, the model, the servers.
fn prepare(paths: &Paths) -> Result<(Servers, Vec<(String, String)>)> {
    setup::ensure_system_packages(&[setup::PKG_CONFIG, setup::LIBHDF5_DEV, setup::RCLONE])?;
    setup::ensure_python_packages(paths)?;
    let model = setup::ensure_model(paths)?;
    let garage = garage::Garage::start(paths)?;
    let server = S3Server::start(paths)?;
    let mut env = setup::test_env(paths, &model, &server.endpoint());
    env.extend(garage.env());
    Ok((
        Servers {
            moto: server,
            garage,
        },
        env,
    ))
}

fn test(paths: &Paths, extra: &[String]) -> Result<i32> {
    let (mut server, mut env) = prepare(paths)?;
    // The end-to-end tests drive the real binary: build it first (cargo builds a package's
    // binaries for its own integration tests only) and say where it is.
    let bin = demo::build_coral(paths, false, &["--all-features"])?;
    env.push(("CORAL_BIN".into(), bin.display().to_string()));
    eprintln!("xtask: the test environment:");
    setup::print_env(&env);

    let mut cmd = setup::cargo();
    cmd.current_dir(&paths.root)
        // Every test binary runs even when one fails, so a run reports every failure.
        .args(["test", "--workspace", "--all-features", "--no-fail-fast"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let status = setup::run_status(&mut cmd)?;
    let mut code = exit_code(status);
    // The Python package, with the servers still up: on a filtered run only when asked
    // (`test-python`).
    if extra.is_empty() {
        let py = python::suite(paths, &env, &[])?;
        if code == 0 {
            code = py;
        }
    }
    if code != 0 {
        server.keep_log();
    }
    drop(server);
    // The second library: on a filtered run only when asked (`test-hdf5-static`).
    if extra.is_empty() {
        let second = test_static_hdf5_with(paths, &env, &[])?;
        if code == 0 {
            code = second;
        }
    }
    if code != 0 {
        eprintln!("xtask: tests failed (exit status {code})");
    }
    Ok(code)
}

/// `coral-hdf5`'s whole suite (the SIGKILL and power-cut runs, interop with h5py and coral-ml,
/// locking, damage) against the second library: the HDF5 2.x that `hdf5-metno-src` builds from
/// source, linked statically (`cfg(coral_hdf5_static)`, in `target/hdf5-static`).
fn test_static_hdf5_with(paths: &Paths, env: &[(String, String)], extra: &[String]) -> Result<i32> {
    eprintln!("xtask: coral-hdf5's tests on the HDF5 built from source (hdf5-metno-src)");
    let mut cmd = setup::cargo();
    cmd.current_dir(&paths.root)
        .args([
            "test",
            "-p",
            "coral-hdf5",
            "--features",
            "testing",
            "--no-fail-fast",
        ])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(setup::static_hdf5_env(paths)?);
    let code = exit_code(setup::run_status(&mut cmd)?);
    if code != 0 {
        eprintln!(
            "xtask: coral-hdf5's tests on the HDF5 built from source failed (exit status {code})"
        );
    }
    Ok(code)
}

fn test_static_hdf5(paths: &Paths, extra: &[String]) -> Result<i32> {
    let (server, env) = prepare(paths)?;
    drop(server);
    test_static_hdf5_with(paths, &env, extra)
}

fn test_python(paths: &Paths, extra: &[String]) -> Result<i32> {
    let (mut server, env) = prepare(paths)?;
    let code = python::suite(paths, &env, extra)?;
    if code != 0 {
        server.keep_log();
    }
    drop(server);
    Ok(code)
}

fn with_env(paths: &Paths, args: &[String]) -> Result<i32> {
    let args = match args.split_first() {
        Some((dash, rest)) if dash == "--" => rest,
        _ => args,
    };
    let Some((program, rest)) = args.split_first() else {
        eprint!("xtask: with-env needs a command\n\n{USAGE}");
        return Ok(2);
    };
    let (mut server, env) = prepare(paths)?;
    eprintln!("xtask: the test environment:");
    setup::print_env(&env);
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest).envs(env.iter().map(|(k, v)| (k, v)));
    let status = setup::run_status(&mut cmd)?;
    if !status.success() {
        server.keep_log();
    }
    drop(server);
    Ok(exit_code(status))
}

fn bench(paths: &Paths, extra: &[String]) -> Result<i32> {
    let (mut server, mut env) = prepare(paths)?;
    let bin = demo::build_coral(paths, true, &[])?;
    python::install_wheel(paths)?;
    setup::ensure_bench_packages(paths)?;
    env.push(("CORAL_BIN".into(), bin.display().to_string()));
    let mut cmd = setup::cargo();
    cmd.current_dir(&paths.root)
        .args(["bench", "--workspace"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let status = setup::run_status(&mut cmd)?;
    if !status.success() {
        server.keep_log();
    }
    drop(server);
    let words: Vec<String> = extra.iter().map(|a| setup::quote(a)).collect();
    let tail = if words.is_empty() {
        String::new()
    } else {
        format!(" {}", words.join(" "))
    };
    println!();
    println!(
        "Reproduce with `cargo xtask bench{tail}` from {}: it runs `cargo bench --workspace{tail}` \
         with the model, the venv and the S3 test server on loopback.",
        paths.root.display()
    );
    Ok(exit_code(status))
}

fn ci(paths: &Paths, extra: &[String]) -> Result<i32> {
    // Clippy builds every crate, and hdf5-metno-sys's build script needs libhdf5 and pkg-config:
    // on a fresh machine they must be there before the first step, not only before the tests.
    setup::ensure_system_packages(&[setup::PKG_CONFIG, setup::LIBHDF5_DEV])?;
    let steps: [(&str, &[&str]); 2] = [
        ("format", &["fmt", "--all", "--check"]),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (name, args) in steps {
        eprintln!("xtask ci: {name}");
        let status = setup::run_status(setup::cargo().current_dir(&paths.root).args(args))?;
        if !status.success() {
            eprintln!("xtask ci: {name} failed");
            return Ok(exit_code(status));
        }
    }

    eprintln!("xtask ci: clippy on the second HDF5 library");
    let status = setup::run_status(
        setup::cargo()
            .current_dir(&paths.root)
            .args([
                "clippy",
                "-p",
                "coral-hdf5",
                "--all-targets",
                "--features",
                "testing",
                "--",
                "-D",
                "warnings",
            ])
            .envs(setup::static_hdf5_env(paths)?),
    )?;
    if !status.success() {
        eprintln!("xtask ci: clippy on the second HDF5 library failed");
        return Ok(exit_code(status));
    }

    eprintln!("xtask ci: cargo deny");
    ensure_cargo_deny(paths)?;
    // The advisory database is fetched from the network, which CI cannot reach: deny.toml says
    // why only these three checks run.
    let status = setup::run_status(setup::cargo().current_dir(&paths.root).args([
        "deny",
        "--all-features",
        "check",
        "bans",
        "licenses",
        "sources",
    ]))?;
    if !status.success() {
        eprintln!("xtask ci: cargo deny failed");
        return Ok(exit_code(status));
    }

    eprintln!("xtask ci: tests");
    test(paths, extra)
}

fn ensure_cargo_deny(paths: &Paths) -> Result<()> {
    let present = setup::cargo()
        .args(["deny", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    setup::run(
        setup::cargo()
            .current_dir(&paths.root)
            .args(["install", "--locked", "cargo-deny"]),
    )
    .context("installing cargo-deny")
}

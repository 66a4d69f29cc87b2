//! What the benches that measure from Python share (`mod common;` in each): running their
//! script in the bench venv with the variables `cargo xtask bench` sets.

use std::path::Path;
use std::process::Command;

/// Runs `script` (relative to this package) with the venv's Python and, as arguments, the
/// values of the variables `vars` (each required: without one the bench says how to run it
/// and exits with 2), then exits with the script's failure, if any.
pub fn run_script(bench: &str, script: &str, vars: &[&str]) {
    let mut args = Vec::new();
    for v in ["CORAL_TEST_PYTHON"].iter().chain(vars) {
        match std::env::var(v) {
            Ok(x) => args.push(x),
            Err(_) => {
                eprintln!(
                    "{bench} bench: {v} is not set; run it with `cargo xtask bench --bench {bench}`"
                );
                std::process::exit(2);
            }
        }
    }
    let python = args.remove(0);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    match Command::new(&python).arg(&script).args(&args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("{bench} bench: {} failed ({s})", script.display());
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("{bench} bench: cannot run {python}: {e}");
            std::process::exit(1);
        }
    }
}

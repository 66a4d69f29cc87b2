//! `cargo xtask bench --bench python`: Coral from Python (`coral_rs`) against coral-ml 1.0.0's
//! `HDF5Store`, side by side in one run, on the real model: `store_batch` and `load_batch` at
//! gzip level 4. The measuring is in `crates/coral-py/bench/bench_store.py` (run in the test
//! venv, where xtask installed the wheel it built); `CORAL_BENCH_RUNS` sets the runs (5).

use std::process::Command;

fn main() {
    // `cargo bench` passes `--bench` and any filter: this bench has one case, and ignores them.
    let (Ok(python), Ok(model)) = (
        std::env::var("CORAL_TEST_PYTHON"),
        std::env::var("CORAL_TEST_MODEL"),
    ) else {
        eprintln!("python bench: CORAL_TEST_PYTHON and CORAL_TEST_MODEL are not set; run it with `cargo xtask bench --bench python`");
        std::process::exit(2);
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/coral-py/bench/bench_store.py");
    let status = Command::new(&python).arg(&script).arg(&model).status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("python bench: {} failed ({s})", script.display());
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("python bench: cannot run {python}: {e}");
            std::process::exit(1);
        }
    }
}

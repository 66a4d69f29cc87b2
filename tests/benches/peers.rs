//! `cargo xtask bench --bench peers`: Coral against the lossless weight compressors of PyPI
//! (lmzip, glyd), side by side in one run, on the real model in fp32 and bf16 and on two
//! fine-tunes. The measuring is in `tests/benches/peers.py`, run in the bench venv (xtask
//! installs the peers there) with the release `coral` xtask built; `CORAL_BENCH_RUNS` sets
//! the runs (3).

use std::process::Command;

fn main() {
    let (Ok(python), Ok(model), Ok(coral)) = (
        std::env::var("CORAL_TEST_PYTHON"),
        std::env::var("CORAL_TEST_MODEL"),
        std::env::var("CORAL_BIN"),
    ) else {
        eprintln!("peers bench: CORAL_TEST_PYTHON, CORAL_TEST_MODEL and CORAL_BIN are not set; run it with `cargo xtask bench --bench peers`");
        std::process::exit(2);
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.py");
    match Command::new(&python)
        .arg(&script)
        .arg(&model)
        .arg(&coral)
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("peers bench: {} failed ({s})", script.display());
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("peers bench: cannot run {python}: {e}");
            std::process::exit(1);
        }
    }
}

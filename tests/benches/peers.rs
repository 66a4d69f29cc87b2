//! `cargo xtask bench --bench peers`: Coral against the lossless weight compressors of PyPI
//! (lmzip, glyd), side by side in one run, on the real model in fp32 and bf16 and on two
//! fine-tunes. The measuring is in `tests/benches/peers.py`, run in the bench venv (xtask
//! installs the peers there) with the release `coral` xtask built; `CORAL_BENCH_RUNS` sets
//! the runs (5, taken round robin).

mod common;

fn main() {
    common::run_script(
        "peers",
        "benches/peers.py",
        &["CORAL_TEST_MODEL", "CORAL_BIN"],
    );
}

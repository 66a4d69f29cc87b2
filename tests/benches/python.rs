//! `cargo xtask bench --bench python`: Coral from Python (`coral_rs`) against coral-ml 1.0.0's
//! `HDF5Store`, side by side in one run, on the real model: `store_batch` and `load_batch` at
//! gzip level 4. The measuring is in `crates/coral-py/bench/bench_store.py` (run in the test
//! venv, where xtask installed the wheel it built); `CORAL_BENCH_RUNS` sets the runs (5).
//! `cargo bench`'s own arguments (`--bench`, a filter) are ignored: there is one case.

mod common;

fn main() {
    common::run_script(
        "python",
        "../crates/coral-py/bench/bench_store.py",
        &["CORAL_TEST_MODEL"],
    );
}

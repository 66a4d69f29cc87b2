//! Where the test environment is: the real model, the Python venv, the S3-compatible server.
//!
//! `cargo xtask test` (and `cargo xtask bench`) set these variables:
//!
//! | variable | what |
//! |---|---|
//! | `CORAL_TEST_MODEL` | path of all-MiniLM-L6-v2's `model.safetensors` (fp32) |
//! | `CORAL_TEST_PYTHON` | the venv's `python` (with h5py, hdf5plugin, coral-ml, moto) |
//! | `CORAL_TEST_S3_ENDPOINT` | `http://127.0.0.1:PORT` of the S3-compatible test server |
//! | `CORAL_TEST_REQUIRE` | `1`: a missing resource fails the test instead of skipping it |
//!
//! Under plain `cargo test` the variables are absent: tests that need them print why they skip.
//! Under `cargo xtask test` `CORAL_TEST_REQUIRE=1`, so a missing resource is a failure, never a
//! silent pass.

use std::path::PathBuf;

fn lookup(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("CORAL_TEST_REQUIRE").as_deref() == Ok("1") {
                panic!("{var} is not set but CORAL_TEST_REQUIRE=1: run the tests with `cargo xtask test`");
            }
            eprintln!("skipping: {var} is not set (run the tests with `cargo xtask test`)");
            None
        }
    }
}

/// The real model's `model.safetensors`, or `None` (with a note) outside `cargo xtask test`.
pub fn model_path() -> Option<PathBuf> {
    lookup("CORAL_TEST_MODEL").map(PathBuf::from)
}

/// The venv's Python, or `None` outside `cargo xtask test`.
pub fn python() -> Option<PathBuf> {
    lookup("CORAL_TEST_PYTHON").map(PathBuf::from)
}

/// The S3-compatible server's endpoint URL, or `None` outside `cargo xtask test`.
pub fn s3_endpoint() -> Option<String> {
    lookup("CORAL_TEST_S3_ENDPOINT")
}

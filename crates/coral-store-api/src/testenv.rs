//! Where the test environment is: the real model, the Python venv, the S3-compatible server.
//!
//! `cargo xtask test` (and `cargo xtask bench`) set these variables:
//!
//! | variable | what |
//! |---|---|
//! | `CORAL_TEST_MODEL` | path of all-MiniLM-L6-v2's `model.safetensors` (fp32) |
//! | `CORAL_TEST_PYTHON` | the venv's `python` (with h5py, hdf5plugin, coral-ml, moto) |
//! | `CORAL_TEST_S3_ENDPOINT` | `http://127.0.0.1:PORT` of the S3-compatible test server (moto) |
//! | `CORAL_TEST_GARAGE_ENDPOINT` | the S3 API of the first node of the Garage cluster |
//! | `CORAL_TEST_GARAGE_ENDPOINTS` | every node's S3 API, comma-separated |
//! | `CORAL_TEST_GARAGE_KEY`, `CORAL_TEST_GARAGE_SECRET`, `CORAL_TEST_GARAGE_REGION` | Garage's test key and region |
//! | `CORAL_TEST_GARAGE_BIN`, `CORAL_TEST_GARAGE_NODES` | the `garage` binary and the nodes' folders (config, `pid` file), for the tests that stop and restart a node |
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

/// An S3-compatible engine of the test environment, with what a client needs to reach it.
#[derive(Clone)]
pub struct S3Engine {
    /// "moto" or "garage".
    pub name: &'static str,
    /// The S3 endpoint the tests use.
    pub endpoint: String,
    /// Every endpoint of the engine (Garage: one per node).
    pub endpoints: Vec<String>,
    /// The region requests are signed for.
    pub region: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

impl std::fmt::Debug for S3Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Engine")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("endpoints", &self.endpoints)
            .field("region", &self.region)
            .field("access_key", &"<redacted>")
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

/// moto, the S3 mock (any credentials), or `None` (with a note) outside `cargo xtask test`.
pub fn moto() -> Option<S3Engine> {
    let endpoint = s3_endpoint()?;
    Some(S3Engine {
        name: "moto",
        endpoints: vec![endpoint.clone()],
        endpoint,
        region: "us-east-1".to_owned(),
        access_key: "coral-test".to_owned(),
        secret_key: "coral-test".to_owned(),
    })
}

/// The Garage cluster, or `None` (with a note) outside `cargo xtask test`.
pub fn garage() -> Option<S3Engine> {
    let endpoint = lookup("CORAL_TEST_GARAGE_ENDPOINT")?;
    let endpoints = lookup("CORAL_TEST_GARAGE_ENDPOINTS")?
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(S3Engine {
        name: "garage",
        endpoint,
        endpoints,
        region: lookup("CORAL_TEST_GARAGE_REGION")?,
        access_key: lookup("CORAL_TEST_GARAGE_KEY")?,
        secret_key: lookup("CORAL_TEST_GARAGE_SECRET")?,
    })
}

/// Every S3 engine of the environment: moto and Garage (those present).
pub fn s3_engines() -> Vec<S3Engine> {
    [moto(), garage()].into_iter().flatten().collect()
}

/// The Garage binary and the nodes' folders (each with `garage.toml` and a `pid` file).
pub fn garage_nodes() -> Option<(PathBuf, Vec<PathBuf>)> {
    let bin = lookup("CORAL_TEST_GARAGE_BIN")?;
    let nodes = lookup("CORAL_TEST_GARAGE_NODES")?
        .split(',')
        .map(PathBuf::from)
        .collect();
    Some((PathBuf::from(bin), nodes))
}

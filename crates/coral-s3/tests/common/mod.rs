//! Shared by the integration tests: a fresh bucket per test process, a fresh prefix per store.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
pub mod model;

use coral_s3::{S3Config, S3Store};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A bucket name no other test process uses.
pub fn unique_bucket(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("coral-{tag}-{}-{nanos}", std::process::id())
}

/// A config for the test server at `endpoint`, with a prefix no other store of this process uses.
pub fn config(endpoint: &str, bucket: &str) -> S3Config {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    S3Config::new(bucket)
        .with_endpoint(endpoint)
        .with_region("us-east-1")
        .with_credentials("testing-access-key", "testing-secret-key")
        .with_prefix(format!("run{n}/coral"))
        .with_retries(2, std::time::Duration::from_secs(10))
}

/// The engines of the test environment (moto and Garage).
pub fn engines() -> Vec<coral_store_api::testenv::S3Engine> {
    coral_store_api::testenv::s3_engines()
}

/// A config for `engine` (its endpoint, region and key), with a prefix no other store of this
/// process uses.
pub fn engine_config(engine: &coral_store_api::testenv::S3Engine, bucket: &str) -> S3Config {
    config(&engine.endpoint, bucket)
        .with_region(&engine.region)
        .with_credentials(&engine.access_key, &engine.secret_key)
}

/// Opens a store or panics with the error.
pub fn open(config: S3Config) -> S3Store {
    S3Store::new(config).expect("opening the S3 store")
}

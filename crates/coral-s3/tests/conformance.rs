//! The shared conformance suite against the S3-compatible test server
//! (`CORAL_TEST_S3_ENDPOINT`; `cargo xtask test` starts it).

mod common;

use coral_core::ContentHash;
use coral_s3::{S3Config, S3Store};
use coral_store_api::testenv;
use coral_store_api::testing::{self, flip_one_bit, Harness};

struct S3Harness {
    endpoint: String,
    bucket: String,
    compression: coral_core::Codec,
}

impl Harness for S3Harness {
    type Store = S3Store;

    fn open(&self, strict_integrity: bool) -> S3Store {
        common::open(
            common::config(&self.endpoint, &self.bucket)
                .with_compression(self.compression)
                .with_strict_integrity(strict_integrity),
        )
    }

    fn corrupt(&self, store: &S3Store, key: &ContentHash) {
        let mut data = store
            .raw_for_testing(key)
            .unwrap()
            .expect("corrupt: the key is not stored in full");
        assert!(flip_one_bit(&mut data));
        assert!(store.corrupt_for_testing(key, data).unwrap());
    }

    fn reopen(&self, store: S3Store) -> Option<S3Store> {
        let config: S3Config = store.config().clone();
        drop(store);
        Some(common::open(config))
    }
}

fn harness(compression: &str) -> Option<S3Harness> {
    let endpoint = testenv::s3_endpoint()?;
    Some(S3Harness {
        endpoint,
        bucket: common::unique_bucket("conf"),
        compression: compression.parse().unwrap(),
    })
}

#[test]
fn conformance_gzip_npz() {
    if let Some(h) = harness("gzip-6") {
        testing::run_all(&h);
    }
}

#[test]
fn conformance_zstd_raw() {
    if let Some(h) = harness("zstd-3") {
        testing::run_all(&h);
    }
}

#[test]
fn conformance_uncompressed() {
    if let Some(h) = harness("none") {
        testing::run_weights(&h);
    }
}

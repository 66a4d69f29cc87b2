//! The shared conformance suite against both S3 engines of the test environment: moto and the
//! 3-node Garage cluster (`cargo xtask test` starts both).

mod common;

use coral_core::ContentHash;
use coral_s3::{S3Config, S3Store};
use coral_store_api::testenv;
use coral_store_api::testing::{self, flip_one_bit, Harness};

struct S3Harness {
    engine: testenv::S3Engine,
    bucket: String,
    compression: coral_core::Codec,
}

impl Harness for S3Harness {
    type Store = S3Store;

    fn open(&self, strict_integrity: bool) -> S3Store {
        common::open(
            common::engine_config(&self.engine, &self.bucket)
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

fn harnesses(compression: &str) -> Vec<S3Harness> {
    common::engines()
        .into_iter()
        .map(|engine| S3Harness {
            bucket: common::unique_bucket(&format!("conf-{}", engine.name)),
            engine,
            compression: compression.parse().unwrap(),
        })
        .collect()
}

#[test]
fn conformance_gzip_npz() {
    for h in harnesses("gzip-6") {
        testing::run_all(&h);
    }
}

#[test]
fn conformance_zstd_raw() {
    for h in harnesses("zstd-3") {
        testing::run_all(&h);
    }
}

#[test]
fn conformance_coral_float_codec() {
    // The float codec as the S3 option: every dtype, damage, reopen, on both engines.
    for h in harnesses("coral") {
        testing::run_all(&h);
    }
}

#[test]
fn conformance_uncompressed() {
    for h in harnesses("none") {
        testing::run_weights(&h);
    }
}

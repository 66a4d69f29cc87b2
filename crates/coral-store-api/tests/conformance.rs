//! The conformance suite against `MemoryStore`, the reference backend.

use coral_store_api::testing::{self, MemoryHarness};

#[test]
fn memory_store_weights() {
    testing::run_weights(&MemoryHarness);
}

#[test]
fn memory_store_deltas() {
    testing::run_deltas(&MemoryHarness);
}

#[test]
fn memory_store_manifests() {
    testing::run_manifests(&MemoryHarness);
}

#[test]
fn memory_store_all() {
    testing::run_all(&MemoryHarness);
}

//! The conformance suite (feature `testing`): what every backend must do, checked with one call.
//!
//! A backend implements [`Harness`] (how to open a fresh empty store, how to corrupt one stored
//! weight) and calls [`run_all`] from one of its integration tests. [`run_weights`],
//! [`run_deltas`] and [`run_manifests`] run one section each (a backend that does not have
//! deltas yet can run the weight section alone), and every check is a public function of
//! [`weights`], [`deltas`] or [`manifests`] that can run on its own, e.g. as a separate `#[test]`.
//!
//! The runners run every check of a section even when one fails, then panic with the list of
//! checks that failed, each with its message.
//!
//! Beyond the trait documentation, the suite expects:
//! - loaded weights and `get_metadata` carry their key in `metadata.hash`;
//! - `compression_info` comes back with every entry it was stored with (a backend may add its own
//!   entries, never drop or change one);
//! - storing a key that exists keeps the first metadata;
//! - `storage_info` counts weights stored in full (`total_weights`, `total_bytes` uncompressed),
//!   its `compression_ratio` is `1 - compressed_bytes / total_bytes`, and its `deltas` agree with
//!   `get_delta_storage_info`;
//! - a weight kept as a delta (stored with `store_delta` under the target's own key) is listed
//!   by `list_weights` and found by `exists`, `load`, `load_batch` and `get_metadata`, rebuilt
//!   and verified (backends use [`crate::resolve`]); deleting a weight that deltas refer to is
//!   [`crate::StoreError::Referenced`] or leaves every dependent readable;
//! - `load_rows`, `load_byte_range` and `load_into` give exactly the part of what `load` gives
//!   (also for weights kept as deltas and legacy keys), rows with the weight's metadata but no
//!   hash; bad ranges are [`crate::StoreError::InvalidRange`]; `load_into` verifies as `load`
//!   does (the suite does not ask whether a slice of a corrupt weight is refused: a backend that
//!   reads only the chunks involved cannot tell);
//! - a delta whose reference is absent is refused by `store_delta` or loads as
//!   [`crate::StoreError::MissingReference`]; cycles and over-long chains are errors.
//!
//! ```
//! use coral_store_api::testing::{self, MemoryHarness};
//!
//! testing::run_all(&MemoryHarness);
//! ```

pub mod deltas;
pub mod manifests;
pub mod weights;

use std::panic::{catch_unwind, AssertUnwindSafe};

use coral_core::{ContentHash, DType, WeightTensor};

use crate::traits::{DeltaStore, ManifestStore, Store, WeightStore};
use crate::MemoryStore;

/// How the suite drives a backend.
pub trait Harness {
    /// The backend's store type.
    type Store: WeightStore;

    /// Opens a fresh, empty store (a new temporary file, a new bucket prefix, ...) with strict
    /// integrity checking on or off, and SHA-256 as the hash `store` uses.
    fn open(&self, strict_integrity: bool) -> Self::Store;

    /// Corrupts the stored data of `key` (a weight stored in full, with at least one data byte)
    /// behind the store's back, for example by flipping one bit of one element, so that the data
    /// still decodes but no longer hashes to `key`. The suite then expects
    /// [`crate::StoreError::Integrity`] from a strict store and the changed data from a lenient
    /// one.
    fn corrupt(&self, store: &Self::Store, key: &ContentHash);

    /// Closes `store` and opens the same location again, for the persistence checks; `None`
    /// (the default) when the backend keeps nothing across opens (like [`MemoryStore`]).
    fn reopen(&self, store: Self::Store) -> Option<Self::Store> {
        drop(store);
        None
    }
}

/// The harness of [`MemoryStore`], the reference backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryHarness;

impl Harness for MemoryHarness {
    type Store = MemoryStore;

    fn open(&self, strict_integrity: bool) -> MemoryStore {
        MemoryStore::new().with_strict_integrity(strict_integrity)
    }

    fn corrupt(&self, store: &MemoryStore, key: &ContentHash) {
        let mut data = store
            .raw_for_testing(key)
            .expect("corrupt: the key is not stored in full")
            .to_vec();
        flip_one_bit(&mut data);
        assert!(
            store.corrupt_for_testing(key, data),
            "corrupt: key vanished"
        );
    }
}

/// Flips the lowest bit of the first byte (a helper for [`Harness::corrupt`]). Returns false for
/// empty data.
pub fn flip_one_bit(data: &mut [u8]) -> bool {
    match data.first_mut() {
        Some(b) => {
            *b ^= 1;
            true
        }
        None => false,
    }
}

/// Runs every section: weights, deltas, manifests.
pub fn run_all<H>(h: &H)
where
    H: Harness,
    H::Store: Store,
{
    let mut failures = Vec::new();
    failures.extend(collect(h, weights::checks::<H>()));
    failures.extend(collect(h, deltas::checks::<H>()));
    failures.extend(collect(h, manifests::checks::<H>()));
    report(failures);
}

/// Runs the weight section (the [`WeightStore`] contract).
pub fn run_weights<H: Harness>(h: &H) {
    report(collect(h, weights::checks::<H>()));
}

/// Runs the delta section (the [`DeltaStore`] contract, and weights kept as deltas).
pub fn run_deltas<H>(h: &H)
where
    H: Harness,
    H::Store: DeltaStore,
{
    report(collect(h, deltas::checks::<H>()));
}

/// Runs the manifest section (the [`ManifestStore`] contract).
pub fn run_manifests<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    report(collect(h, manifests::checks::<H>()));
}

/// One named check.
pub type Check<H> = (&'static str, fn(&H));

fn collect<H: Harness>(h: &H, checks: Vec<Check<H>>) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, check) in checks {
        eprintln!("conformance: {name}");
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| check(h))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".to_owned());
            failures.push(format!("{name}: {msg}"));
        }
    }
    failures
}

fn report(failures: Vec<String>) {
    if !failures.is_empty() {
        panic!(
            "{} conformance check(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
}

/// A small deterministic generator (SplitMix64), so the suite needs no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// A tensor of `dtype` and `shape` whose bytes come from `seed`: random bit patterns (so every
/// NaN payload, -0.0, infinities and subnormals occur for floats), except bool, which holds 0s
/// and 1s.
pub fn sample_tensor(name: &str, dtype: DType, shape: &[usize], seed: u64) -> WeightTensor {
    let n: usize = shape.iter().product::<usize>() * dtype.size();
    let mut rng = Rng::new(seed ^ 0x636f_7261_6c00_0000);
    let mut data = rng.bytes(n);
    if dtype == DType::Bool {
        for b in &mut data {
            *b &= 1;
        }
    }
    WeightTensor::from_bytes(name, shape.to_vec(), dtype, data).expect("sample tensor")
}

/// Float tensors (f16, bf16, f32, f64) made only of awkward values: NaNs with payloads (quiet and
/// signalling, both signs), ±0.0, ±infinity, subnormals, the largest and smallest normals.
pub fn special_float_tensors() -> Vec<WeightTensor> {
    let f32_bits: [u32; 12] = [
        0x7fc0_0000,
        0x7fc0_0001,
        0xffc1_2345,
        0x7f80_0001,
        0xff80_0fff,
        0x8000_0000,
        0x0000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x0000_0001,
        0x807f_ffff,
        0x7f7f_ffff,
    ];
    let f64_bits: [u64; 10] = [
        0x7ff8_0000_0000_0000,
        0x7ff8_0000_0000_0001,
        0xfff4_0000_dead_beef,
        0x7ff0_0000_0000_0001,
        0x8000_0000_0000_0000,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0x0000_0000_0000_0001,
        0x800f_ffff_ffff_ffff,
        0x7fef_ffff_ffff_ffff,
    ];
    let h16_bits: [u16; 10] = [
        0x7e00, 0x7e01, 0xfd55, 0x7c01, 0x8000, 0x7c00, 0xfc00, 0x0001, 0x83ff, 0x7bff,
    ];
    let mut out = Vec::new();
    let bytes32: Vec<u8> = f32_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    out.push(WeightTensor::from_bytes("specials.f32", vec![3, 4], DType::F32, bytes32).unwrap());
    let bytes64: Vec<u8> = f64_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    out.push(WeightTensor::from_bytes("specials.f64", vec![10], DType::F64, bytes64).unwrap());
    let bytes16: Vec<u8> = h16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    out.push(
        WeightTensor::from_bytes("specials.f16", vec![2, 5], DType::F16, bytes16.clone()).unwrap(),
    );
    // The same bit patterns mean other awkward values in bfloat16 (0x7e01: a NaN with payload).
    out.push(WeightTensor::from_bytes("specials.bf16", vec![5, 2], DType::BF16, bytes16).unwrap());
    out
}

/// Asserts that `got` is `want` bit for bit: name, shape, dtype and data.
pub fn assert_same_tensor(got: &WeightTensor, want: &WeightTensor, what: &str) {
    assert_eq!(got.name(), want.name(), "{what}: name");
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert!(
        got.data()[..] == want.data()[..],
        "{what}: data differs ({} bytes vs {} bytes{})",
        got.nbytes(),
        want.nbytes(),
        first_difference(got.data(), want.data())
            .map(|i| format!(", first difference at byte {i}"))
            .unwrap_or_default()
    );
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spread() {
        let a = Rng::new(1).bytes(1000);
        assert_eq!(a, Rng::new(1).bytes(1000));
        assert_ne!(a, Rng::new(2).bytes(1000));
        let distinct: std::collections::BTreeSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200);
    }

    #[test]
    fn a_failing_check_is_reported_by_name() {
        fn bad(_: &MemoryHarness) {
            panic!("boom");
        }
        fn good(_: &MemoryHarness) {}
        let checks: Vec<Check<MemoryHarness>> = vec![("good", good), ("bad", bad)];
        let failures = collect(&MemoryHarness, checks);
        assert_eq!(failures, vec!["bad: boom".to_owned()]);
        let r = catch_unwind(|| report(failures));
        assert!(r.is_err());
    }
}

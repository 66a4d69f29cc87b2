//! coral-sync against MemoryStore, and against a store that fails on purpose.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use coral_core::{
    ContentHash, DType, Delta, DeltaType, HashedWeight, ModelManifest, ModelName, WeightMetadata,
};
use coral_store_api::testing::{
    assert_same_tensor,
    deltas::sample_delta,
    manifests::{populated_store, sample_manifest},
    sample_tensor,
};
use coral_store_api::{
    DeltaStorageInfo, DeltaStore, ManifestStore, MemoryStore, Result, StorageInfo, Store,
    StoreError, Stored, WeightStore,
};
use coral_sync::{both, pull, push, sync, Kind, SyncError, SyncOptions};
use proptest::prelude::*;

/// A MemoryStore that refuses to store the weights in `fail` (as a server that went away would).
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    fail: Mutex<BTreeSet<ContentHash>>,
    writes: AtomicUsize,
}

impl Flaky {
    fn failing(keys: impl IntoIterator<Item = ContentHash>) -> Self {
        Flaky {
            fail: Mutex::new(keys.into_iter().collect()),
            ..Flaky::default()
        }
    }
    fn heal(&self) {
        self.fail.lock().unwrap().clear();
    }
}

impl WeightStore for Flaky {
    fn store_hashed(&self, weight: &HashedWeight) -> Result<Stored> {
        let key = weight.key();
        if self.fail.lock().unwrap().contains(key) {
            return Err(StoreError::backend(
                format!("writing {key}"),
                "connection refused",
            ));
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.store_hashed(weight)
    }
    fn load_hashed(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        self.inner.load_hashed(key)
    }
    fn exists(&self, key: &ContentHash) -> Result<bool> {
        self.inner.exists(key)
    }
    fn delete(&self, key: &ContentHash) -> Result<bool> {
        self.inner.delete(key)
    }
    fn list_weights(&self) -> Result<Vec<ContentHash>> {
        self.inner.list_weights()
    }
    fn get_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>> {
        self.inner.get_metadata(key)
    }
    fn storage_info(&self) -> Result<StorageInfo> {
        self.inner.storage_info()
    }
    fn close(&mut self) -> Result<()> {
        self.inner.close()
    }
}

impl DeltaStore for Flaky {
    fn store_delta(&self, delta: &Delta, delta_hash: &ContentHash) -> Result<ContentHash> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if !self.inner.exists(&delta.reference_hash)? {
            panic!("a delta was stored before its reference");
        }
        self.inner.store_delta(delta, delta_hash)
    }
    fn load_delta(&self, k: &ContentHash) -> Result<Option<Delta>> {
        self.inner.load_delta(k)
    }
    fn delta_exists(&self, k: &ContentHash) -> Result<bool> {
        self.inner.delta_exists(k)
    }
    fn delete_delta(&self, k: &ContentHash) -> Result<bool> {
        self.inner.delete_delta(k)
    }
    fn list_deltas(&self) -> Result<Vec<ContentHash>> {
        self.inner.list_deltas()
    }
    fn get_delta_storage_info(&self) -> Result<DeltaStorageInfo> {
        self.inner.get_delta_storage_info()
    }
}

impl ManifestStore for Flaky {
    fn put_manifest(&self, m: &ModelManifest) -> Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        for k in m.keys() {
            assert!(
                self.inner.exists(k)?,
                "a manifest was stored before its weight {k}"
            );
        }
        self.inner.put_manifest(m)
    }
    fn get_manifest(&self, n: &ModelName) -> Result<Option<ModelManifest>> {
        self.inner.get_manifest(n)
    }
    fn list_manifests(&self) -> Result<Vec<ModelName>> {
        self.inner.list_manifests()
    }
    fn delete_manifest(&self, n: &ModelName) -> Result<bool> {
        self.inner.delete_manifest(n)
    }
}

/// A source with a model of `n` weights, a reference weight and a fine-tune kept as a delta,
/// and the manifest (`populated_store`).
fn populated(n: usize) -> (MemoryStore, ModelManifest, ContentHash, ContentHash) {
    populated_store(n, 1)
}

fn assert_same_store(a: &dyn Store, b: &dyn Store) {
    assert_eq!(a.list_weights().unwrap(), b.list_weights().unwrap());
    for k in a.list_weights().unwrap() {
        assert_same_tensor(
            &b.load(&k).unwrap().unwrap(),
            &a.load(&k).unwrap().unwrap(),
            "weight",
        );
    }
    assert_eq!(a.list_deltas().unwrap(), b.list_deltas().unwrap());
    for k in a.list_deltas().unwrap() {
        assert_eq!(a.load_delta(&k).unwrap(), b.load_delta(&k).unwrap());
    }
    assert_eq!(a.list_manifests().unwrap(), b.list_manifests().unwrap());
    for n in a.list_manifests().unwrap() {
        assert_eq!(a.get_manifest(&n).unwrap(), b.get_manifest(&n).unwrap());
    }
}

#[test]
fn moves_everything_once_and_nothing_twice() {
    let (src, m, _, dk) = populated(6);
    let dst = MemoryStore::new();
    let first = sync(&src, &dst, &SyncOptions::default()).unwrap();
    assert_eq!(first.weights.moved, 7);
    assert_eq!(first.deltas.moved, 1);
    assert_eq!(first.manifests.moved, 1);
    assert_eq!(first.skipped(), 0);
    let tensor_bytes: u64 = m
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64)
        .sum();
    let delta_payload = src.load_delta(&dk).unwrap().unwrap().nbytes() as u64;
    assert_eq!(
        first.weights.bytes
            + (m.tensors.last().unwrap().shape.iter().product::<usize>() * 4) as u64,
        tensor_bytes
    );
    assert_eq!(first.deltas.bytes, delta_payload);
    assert_eq!(first.manifests.bytes, m.to_json().unwrap().len() as u64);
    assert_same_store(&src, &dst);

    let second = sync(&src, &dst, &SyncOptions::default()).unwrap();
    assert_eq!(second.moved(), 0);
    assert_eq!(second.bytes(), 0);
    assert_eq!(
        (
            second.weights.skipped,
            second.deltas.skipped,
            second.manifests.skipped
        ),
        (7, 1, 1)
    );
}

#[test]
fn dry_run_writes_nothing_and_counts_the_same() {
    let (src, _, _, _) = populated(4);
    let dst = MemoryStore::new();
    let dry = sync(&src, &dst, &SyncOptions::default().with_dry_run(true)).unwrap();
    assert!(dry.dry_run);
    assert!(dst.list_weights().unwrap().is_empty());
    assert!(dst.list_deltas().unwrap().is_empty());
    assert!(dst.list_manifests().unwrap().is_empty());
    let real = sync(&src, &dst, &SyncOptions::default()).unwrap();
    assert_eq!(dry.weights, real.weights);
    assert_eq!(dry.deltas, real.deltas);
    assert_eq!(dry.manifests, real.manifests);
}

#[test]
fn progress_sees_every_entry() {
    let (src, _, _, _) = populated(5);
    let dst = MemoryStore::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let opts = SyncOptions::default()
        .with_concurrency(3)
        .with_progress(move |p| s2.lock().unwrap().push(p.clone()));
    let stats = sync(&src, &dst, &opts).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len() as u64, stats.moved());
    assert!(seen.iter().all(|p| p.total == 8));
    let mut done: Vec<u64> = seen.iter().map(|p| p.done).collect();
    done.sort();
    assert_eq!(done, (1..=8).collect::<Vec<_>>());
    let per_kind: HashMap<Kind, usize> = seen.iter().fold(HashMap::new(), |mut m, p| {
        *m.entry(p.kind).or_default() += 1;
        m
    });
    assert_eq!(per_kind[&Kind::Weight], 6);
    assert_eq!(per_kind[&Kind::Delta], 1);
    assert_eq!(per_kind[&Kind::Manifest], 1);
    assert_eq!(seen.iter().map(|p| p.bytes).sum::<u64>(), stats.bytes());
}

#[test]
fn interrupted_sync_keeps_destination_consistent_and_resumes() {
    let (src, m, reference, dk) = populated(6);
    // The delta's reference and one other weight fail to go up.
    let other = m.tensors[3].key;
    let dst = Flaky::failing([reference, other]);
    let err = sync(&src, &dst, &SyncOptions::default()).unwrap_err();
    let SyncError::Incomplete { stats, failures } = &err else {
        panic!("{err}");
    };
    assert_eq!(stats.weights.moved, 5);
    let failed: BTreeMap<Kind, Vec<String>> = failures.iter().fold(BTreeMap::new(), |mut m, f| {
        m.entry(f.kind).or_insert_with(Vec::new).push(f.key.clone());
        m
    });
    assert_eq!(failed[&Kind::Weight].len(), 2);
    assert_eq!(
        failed[&Kind::Delta],
        vec![dk.to_string()],
        "the delta waits for its reference"
    );
    assert_eq!(
        failed[&Kind::Manifest],
        vec!["model-a".to_owned()],
        "the manifest waits for its weights"
    );
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert!(!dst.delta_exists(&dk).unwrap());
    assert!(dst.list_manifests().unwrap().is_empty());

    dst.heal();
    let before = dst.writes.load(Ordering::Relaxed);
    let again = sync(&src, &dst, &SyncOptions::default()).unwrap();
    assert_eq!(again.weights.moved, 2, "only the missing weights");
    assert_eq!(again.weights.skipped, 5);
    assert_eq!(again.deltas.moved, 1);
    assert_eq!(again.manifests.moved, 1);
    assert_eq!(
        dst.writes.load(Ordering::Relaxed) - before,
        4,
        "nothing moved twice"
    );
    assert_same_store(&src, &dst);
}

#[test]
fn delta_whose_reference_is_nowhere_is_refused() {
    let src = MemoryStore::new();
    let r = sample_tensor("r", DType::F32, &[2, 2], 1);
    let rk = src.store(&r).unwrap();
    let t = sample_tensor("t", DType::F32, &[2, 2], 2);
    let tk = t.compute_hash();
    src.store_delta(&sample_delta(DeltaType::Sparse, &t, rk, 1), &tk)
        .unwrap();
    // The reference is then deleted from the source behind the delta's back is not possible
    // (Referenced); instead, sync into a destination that refuses the reference.
    let dst = Flaky::failing([rk]);
    let err = sync(&src, &dst, &SyncOptions::default()).unwrap_err();
    assert!(matches!(err, SyncError::Incomplete { .. }));
    assert!(!dst.delta_exists(&tk).unwrap());
}

#[test]
fn changed_manifest_is_replaced_and_directions_work() {
    let (a, _, _, _) = populated(3);
    let b = MemoryStore::new();
    push(&a, &b, &SyncOptions::default()).unwrap();
    // b gets a new model; a's model changes.
    let mb = sample_manifest(&b, "model-b", 2);
    b.put_manifest(&mb).unwrap();
    let mut ma = a
        .get_manifest(&ModelName::new("model-a").unwrap())
        .unwrap()
        .unwrap();
    ma.created_unix += 1;
    a.put_manifest(&ma).unwrap();
    let (pushed, pulled) = both(&a, &b, &SyncOptions::default()).unwrap();
    assert_eq!(pushed.manifests.moved, 1, "the changed manifest");
    assert_eq!(pushed.weights.moved, 0);
    assert_eq!(pulled.manifests.moved, 1, "model-b");
    assert_same_store(&a, &b);
    let p = pull(&a, &b, &SyncOptions::default()).unwrap();
    assert_eq!(p.moved(), 0);
}

#[test]
fn zero_concurrency_is_refused() {
    let a = MemoryStore::new();
    let err = sync(
        &a,
        &MemoryStore::new(),
        &SyncOptions::default().with_concurrency(0),
    )
    .unwrap_err();
    assert!(matches!(err, SyncError::InvalidOptions(_)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Whatever the two stores hold, `both` leaves them holding the union, and a second run
    /// moves nothing.
    #[test]
    fn both_gives_the_union(a_seeds in prop::collection::btree_set(0u64..40, 0..12),
                            b_seeds in prop::collection::btree_set(0u64..40, 0..12),
                            conc in 1usize..6) {
        let a = MemoryStore::new();
        let b = MemoryStore::new();
        for s in &a_seeds {
            a.store(&sample_tensor("w", DType::ALL[*s as usize % DType::ALL.len()], &[3, 2], *s)).unwrap();
        }
        for s in &b_seeds {
            b.store(&sample_tensor("w", DType::ALL[*s as usize % DType::ALL.len()], &[3, 2], *s)).unwrap();
        }
        let opts = SyncOptions::default().with_concurrency(conc);
        let (pushed, pulled) = both(&a, &b, &opts).unwrap();
        prop_assert_eq!(pushed.weights.moved as usize, a_seeds.difference(&b_seeds).count());
        prop_assert_eq!(pulled.weights.moved as usize, b_seeds.difference(&a_seeds).count());
        let union: BTreeSet<u64> = a_seeds.union(&b_seeds).copied().collect();
        prop_assert_eq!(a.list_weights().unwrap().len(), union.len());
        prop_assert_eq!(a.list_weights().unwrap(), b.list_weights().unwrap());
        let (p2, q2) = both(&a, &b, &opts).unwrap();
        prop_assert_eq!(p2.moved() + q2.moved(), 0);
    }
}

#[test]
fn failures_are_typed_so_a_caller_tells_damage_from_a_write_error() {
    use coral_sync::FailureCause;
    // A damaged weight in a strict source: a read failure carrying StoreError::Integrity.
    let strict = MemoryStore::new();
    let w = sample_tensor("w", DType::F32, &[16], 5);
    let key = strict.store(&w).unwrap();
    assert!(strict.corrupt_for_testing(&key, vec![0u8; 64]));
    let Err(SyncError::Incomplete { failures, .. }) =
        sync(&strict, &MemoryStore::new(), &SyncOptions::default())
    else {
        panic!("a damaged weight must not sync");
    };
    assert!(
        matches!(
            failures[0].cause.store_error(),
            Some(StoreError::Integrity { .. })
        ),
        "{:?}",
        failures[0]
    );
    // The same in a lenient source: refused by sync itself, with the hash the data has.
    let lenient = MemoryStore::new().with_strict_integrity(false);
    lenient.store(&w).unwrap();
    assert!(lenient.corrupt_for_testing(&key, vec![0u8; 64]));
    let Err(SyncError::Incomplete { failures, .. }) =
        sync(&lenient, &MemoryStore::new(), &SyncOptions::default())
    else {
        panic!("a damaged weight must not sync");
    };
    assert!(
        matches!(failures[0].cause, FailureCause::Integrity { actual } if actual != key),
        "{:?}",
        failures[0]
    );
    // A destination that refuses writes: a write failure, with the store's own error.
    let dst = Flaky::failing([key]);
    let src = MemoryStore::new();
    src.store(&w).unwrap();
    let Err(SyncError::Incomplete { failures, .. }) = sync(&src, &dst, &SyncOptions::default())
    else {
        panic!("a refused write must fail the sync");
    };
    assert!(
        matches!(failures[0].cause, FailureCause::Write(_)),
        "{:?}",
        failures[0]
    );
    assert!(
        failures[0].reason().starts_with("writing: "),
        "{}",
        failures[0].reason()
    );
}

//! Unit tests of the operations, on the memory store.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use std::time::Duration;

use coral_core::{ContentHash, DType, Delta, ModelManifest, ModelName, WeightTensor};
use coral_store_api::{LeaseKind, Store};

use crate::*;
use coral_formats::safetensors::build_header;
use coral_store_api::{
    DeltaStorageInfo, DeltaStore, ManifestStore, MemoryStore, StorageInfo, StoreError, WeightStore,
};
use proptest::prelude::*;

fn name(s: &str) -> ModelName {
    ModelName::new(s).unwrap()
}

/// A safetensors file of f32 tensors with the given values.
fn model_file(dir: &Path, file: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let list: Vec<_> = tensors
        .iter()
        .map(|(n, s, _)| (n.to_string(), DType::F32, s.clone()))
        .collect();
    let (mut bytes, _) = build_header(&list).unwrap();
    for (_, _, v) in tensors {
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    let p = dir.join(file);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn smooth(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.013 + seed).sin()).collect()
}

fn opts(n: &str, reference: Option<&str>) -> AddOptions {
    AddOptions {
        name: name(n),
        reference: reference.map_or(crate::Reference::None, |r| crate::Reference::Model(name(r))),
        group_bytes: 4096,
        cancel: None,
        wait: Duration::from_secs(10),
    }
}

fn export_bytes(store: &dyn Store, model: &str, dir: &Path, ext: &str) -> Vec<u8> {
    let out = dir.join(format!("{model}.out.{ext}"));
    export(store, &name(model), &out, 4096, &|_| {}).unwrap();
    std::fs::read(out).unwrap()
}

#[test]
fn add_export_dedup_delta_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let base = vec![
        ("a", vec![64, 16], smooth(1024, 0.0)),
        ("b", vec![1024], smooth(1024, 1.0)),
        ("c", vec![1024], smooth(1024, 1.0)), // same data as b
        ("d", vec![3], vec![1.0, 2.0, 3.0]),
    ];
    let p = model_file(dir.path(), "base.safetensors", &base);
    let src = SourceFile::open(&p).unwrap();
    let r = add(&store, &src, &opts("base", None), &|_| {}).unwrap();
    assert_eq!((r.new, r.reused, r.delta_coded), (3, 1, 0));
    assert_eq!(
        export_bytes(&store, "base", dir.path(), "safetensors"),
        std::fs::read(&p).unwrap()
    );

    // A fine-tune: "a" slightly changed everywhere, the rest the same.
    let mut ft = base.clone();
    ft[0].2 = ft[0]
        .2
        .iter()
        .enumerate()
        .map(|(i, v)| v + 1e-4 * ((i % 7) as f32 - 3.0))
        .collect();
    let q = model_file(dir.path(), "ft.safetensors", &ft);
    let r = add(
        &store,
        &SourceFile::open(&q).unwrap(),
        &opts("ft", Some("base")),
        &|_| {},
    )
    .unwrap();
    assert_eq!((r.new, r.reused, r.delta_coded), (0, 3, 1), "{r:?}");
    assert_eq!(store.list_deltas().unwrap().len(), 1);
    assert_eq!(
        export_bytes(&store, "ft", dir.path(), "safetensors"),
        std::fs::read(&q).unwrap()
    );

    let d = diff(&store, &name("base"), &name("ft")).unwrap();
    assert_eq!(d.equal, ["b", "c", "d"]);
    assert_eq!(d.changed.len(), 1);
    let rc = d.changed[0].relative_change.unwrap();
    assert!(rc > 0.0 && rc < 1e-2, "{rc}");

    assert!(verify(&store, &|_| {}).unwrap().failures.is_empty());
    // Removing base keeps what ft needs, the reference of its delta included.
    assert!(store.delete_manifest(&name("base")).unwrap());
    let g = gc(&store, false).unwrap();
    assert!(g.weights.is_empty() && g.deltas.is_empty(), "{g:?}");
    assert_eq!(
        export_bytes(&store, "ft", dir.path(), "safetensors"),
        std::fs::read(&q).unwrap()
    );
    assert!(store.delete_manifest(&name("ft")).unwrap());
    let listed = store.list_weights().unwrap();
    let g = gc(&store, true).unwrap();
    assert_eq!((g.weights.len(), g.deltas.len()), (3, 1));
    assert_eq!(
        store.list_weights().unwrap(),
        listed,
        "dry run deletes nothing"
    );
    gc(&store, false).unwrap();
    assert!(store.list_weights().unwrap().is_empty());
    assert!(store.list_deltas().unwrap().is_empty());
}

#[test]
fn add_refuses_existing_names_and_unknown_references() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let p = model_file(
        dir.path(),
        "m.safetensors",
        &[("x", vec![2], vec![1.0, 2.0])],
    );
    let src = SourceFile::open(&p).unwrap();
    add(&store, &src, &opts("m", None), &|_| {}).unwrap();
    let e = add(&store, &src, &opts("m", None), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = add(&store, &src, &opts("n", Some("nope")), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("not in the store"), "{e}");
    assert!(store.get_manifest(&name("n")).unwrap().is_none());
}

#[test]
fn a_cancelled_add_rolls_back() {
    static CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let p = model_file(
        dir.path(),
        "m.safetensors",
        &[
            ("a", vec![1024], smooth(1024, 0.0)),
            ("b", vec![1024], smooth(1024, 2.0)),
        ],
    );
    let o = AddOptions {
        cancel: Some(&CANCEL),
        ..opts("m", None)
    };
    // Cancelled after the first group is stored.
    let e = add(&store, &SourceFile::open(&p).unwrap(), &o, &|_| {
        CANCEL.store(true, std::sync::atomic::Ordering::Relaxed)
    })
    .unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert!(store.list_weights().unwrap().is_empty());
    assert!(store.list_manifests().unwrap().is_empty());
}

#[test]
fn stale_export_files_of_dead_processes_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let me = std::process::id();
    let stale = dir.path().join(format!("other.npz.coral-tmp-{dead}"));
    let mine = dir.path().join(format!("m.safetensors.coral-tmp-{me}"));
    let live = dir.path().join("m.safetensors.coral-tmp-1");
    let unrelated = dir.path().join("m.safetensors.coral-tmp-x");
    for p in [&stale, &mine, &live, &unrelated] {
        std::fs::write(p, b"partial").unwrap();
    }
    assert_eq!(clean_stale_tmp(&out), vec![stale.clone()]);
    assert!(!stale.exists());
    assert!(mine.exists() && live.exists() && unrelated.exists());
}

#[test]
fn verify_reports_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let p = model_file(
        dir.path(),
        "m.safetensors",
        &[("x", vec![2], vec![1.0, 2.0])],
    );
    add(
        &store,
        &SourceFile::open(&p).unwrap(),
        &opts("m", None),
        &|_| {},
    )
    .unwrap();
    let key = store.list_weights().unwrap()[0];
    let q = model_file(dir.path(), "n.safetensors", &[("y", vec![3], vec![4.0; 3])]);
    add(
        &store,
        &SourceFile::open(&q).unwrap(),
        &opts("n", None),
        &|_| {},
    )
    .unwrap();
    assert!(store.corrupt_for_testing(&key, vec![0; 8]));
    let r = verify(&store, &|_| {}).unwrap();
    // The damaged weight and the model that uses it; the other model is fine.
    let failed: Vec<(&str, &str)> = r.failures.iter().map(|f| (f.kind, f.id.as_str())).collect();
    let hex = key.to_hex();
    assert_eq!(
        failed,
        [("weight", hex.as_str()), ("manifest", "m")],
        "{r:?}"
    );
    assert!(r.failures[1].error.contains("failed verification"), "{r:?}");
    let out = dir.path().join("o.safetensors");
    assert!(export(&store, &name("m"), &out, 1 << 20, &|_| {}).is_err());
    assert!(!out.exists(), "a failed export leaves no file");
}

/// A store whose manifest writes fail for the model "fails" (add must then leave it as it
/// was, or on a shared store leave what it stored); optionally one that says many writers
/// share it, with the commit times the test gives and a log of its leases.
#[derive(Debug, Default)]
struct NoManifests {
    inner: MemoryStore,
    shared: bool,
    young: std::sync::Mutex<BTreeSet<ContentHash>>,
    leases: std::sync::Mutex<Vec<String>>,
}

impl NoManifests {
    fn shared() -> Self {
        NoManifests {
            shared: true,
            ..Default::default()
        }
    }
    fn log(&self) -> Vec<String> {
        self.leases.lock().unwrap().clone()
    }
}

impl WeightStore for NoManifests {
    fn store_hashed(
        &self,
        w: &coral_core::HashedWeight,
    ) -> coral_store_api::Result<coral_store_api::Stored> {
        self.inner.store_hashed(w)
    }
    fn load_hashed(
        &self,
        k: &ContentHash,
    ) -> coral_store_api::Result<Option<coral_core::HashedWeight>> {
        self.inner.load_hashed(k)
    }
    fn exists(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
        self.inner.exists(k)
    }
    fn delete(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
        self.inner.delete(k)
    }
    fn list_weights(&self) -> coral_store_api::Result<Vec<ContentHash>> {
        self.inner.list_weights()
    }
    fn get_metadata(
        &self,
        k: &ContentHash,
    ) -> coral_store_api::Result<Option<coral_core::WeightMetadata>> {
        self.inner.get_metadata(k)
    }
    fn storage_info(&self) -> coral_store_api::Result<StorageInfo> {
        self.inner.storage_info()
    }
    fn close(&mut self) -> coral_store_api::Result<()> {
        self.inner.close()
    }
    fn defer_commits(&self) -> coral_store_api::Result<()> {
        self.leases.lock().unwrap().push("defer commits".to_owned());
        Ok(())
    }
    fn commit_deferred(&self) -> coral_store_api::Result<()> {
        self.leases.lock().unwrap().push("commit".to_owned());
        Ok(())
    }
}

impl DeltaStore for NoManifests {
    fn store_delta(&self, d: &Delta, k: &ContentHash) -> coral_store_api::Result<ContentHash> {
        self.inner.store_delta(d, k)
    }
    fn load_delta(&self, k: &ContentHash) -> coral_store_api::Result<Option<Delta>> {
        self.inner.load_delta(k)
    }
    fn delta_exists(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
        self.inner.delta_exists(k)
    }
    fn delete_delta(&self, k: &ContentHash) -> coral_store_api::Result<bool> {
        self.inner.delete_delta(k)
    }
    fn list_deltas(&self) -> coral_store_api::Result<Vec<ContentHash>> {
        self.inner.list_deltas()
    }
    fn get_delta_storage_info(&self) -> coral_store_api::Result<DeltaStorageInfo> {
        self.inner.get_delta_storage_info()
    }
}

impl ManifestStore for NoManifests {
    fn put_manifest(&self, m: &ModelManifest) -> coral_store_api::Result<()> {
        if m.name.as_str() == "fails" {
            return Err(StoreError::ReadOnly {
                location: "test".into(),
            });
        }
        self.inner.put_manifest(m)
    }
    fn get_manifest(&self, n: &ModelName) -> coral_store_api::Result<Option<ModelManifest>> {
        self.inner.get_manifest(n)
    }
    fn list_manifests(&self) -> coral_store_api::Result<Vec<ModelName>> {
        self.inner.list_manifests()
    }
    fn delete_manifest(&self, n: &ModelName) -> coral_store_api::Result<bool> {
        self.inner.delete_manifest(n)
    }
    fn shares_writers(&self) -> bool {
        self.shared
    }
    fn acquire_lease(
        &self,
        kind: LeaseKind,
        op: &str,
        _wait: Duration,
    ) -> coral_store_api::Result<coral_store_api::Lease> {
        let id = format!("{kind}:{op}");
        self.leases.lock().unwrap().push(format!("take {id}"));
        Ok(coral_store_api::Lease::held(kind, id))
    }
    fn release_lease(&self, lease: coral_store_api::Lease) -> coral_store_api::Result<()> {
        if let Some(id) = lease.id() {
            self.leases.lock().unwrap().push(format!("give {id}"));
        }
        Ok(())
    }
    fn committed_within(&self, age: Duration) -> coral_store_api::Result<BTreeSet<ContentHash>> {
        Ok(if age.is_zero() {
            BTreeSet::new()
        } else {
            self.young.lock().unwrap().clone()
        })
    }
}

/// What an add does to [`NoManifests`]' log: a shared lease around one deferred commit.
const ADD_LOG: [&str; 4] = [
    "take shared:add",
    "defer commits",
    "commit",
    "give shared:add",
];

#[test]
fn a_failed_add_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = NoManifests::default();
    let base = vec![
        ("a", vec![1024], smooth(1024, 0.0)),
        ("b", vec![4], vec![1.0; 4]),
    ];
    let p = model_file(dir.path(), "base.safetensors", &base);
    add(
        &store,
        &SourceFile::open(&p).unwrap(),
        &opts("base", None),
        &|_| {},
    )
    .unwrap();
    let mut ft = base.clone();
    ft[0].2 = ft[0].2.iter().map(|v| v + 1e-4).collect();
    ft.push(("c", vec![8], smooth(8, 3.0)));
    let q = model_file(dir.path(), "ft.safetensors", &ft);
    let weights = store.list_weights().unwrap();
    let e = add(
        &store,
        &SourceFile::open(&q).unwrap(),
        &opts("fails", Some("base")),
        &|_| {},
    )
    .unwrap_err();
    assert!(e.one_line().contains("read-only"), "{}", e.one_line());
    // Each add (the one that worked and the one that failed) commits once, at its end.
    assert_eq!(store.log(), ADD_LOG.repeat(2));
    assert_eq!(store.list_weights().unwrap(), weights);
    assert!(store.list_deltas().unwrap().is_empty());
    assert_eq!(store.list_manifests().unwrap(), vec![name("base")]);
}

#[test]
fn a_failed_add_on_a_shared_store_leaves_what_it_stored_for_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = NoManifests::shared();
    let p = model_file(
        dir.path(),
        "m.safetensors",
        &[
            ("a", vec![1024], smooth(1024, 0.0)),
            ("b", vec![4], vec![1.0; 4]),
        ],
    );
    let e = add(
        &store,
        &SourceFile::open(&p).unwrap(),
        &opts("fails", None),
        &|_| {},
    )
    .unwrap_err();
    let msg = e.one_line();
    assert!(msg.contains("read-only"), "{msg}");
    assert!(
        msg.contains("the up to 2 weight(s) and 0 delta(s) it stored are left in the store"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    // Nothing deleted: another writer may already use them.
    assert_eq!(store.list_weights().unwrap().len(), 2);
    assert!(store.list_manifests().unwrap().is_empty());
    // The add held a shared lease, and gave it back; it committed once, after the failure
    // too, inside the lease.
    assert_eq!(store.log(), ADD_LOG);
    // gc keeps them while they are young, removes them after.
    *store.young.lock().unwrap() = store.list_weights().unwrap().into_iter().collect();
    let g = gc(&store, false).unwrap();
    assert_eq!((g.weights.len(), g.kept, g.grace_secs), (0, 2, Some(3600)));
    let g = gc_with(
        &store,
        &GcOptions {
            grace: Duration::ZERO,
            ..GcOptions::default()
        },
    )
    .unwrap();
    assert_eq!((g.weights.len(), g.kept, g.grace_secs), (2, 0, Some(0)));
    assert!(store.list_weights().unwrap().is_empty());
}

#[test]
fn gc_on_a_shared_store_takes_an_exclusive_lease_and_spares_young_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = NoManifests::shared();
    let base = vec![
        ("a", vec![64, 16], smooth(1024, 0.0)),
        ("b", vec![1024], smooth(1024, 1.0)),
    ];
    let p = model_file(dir.path(), "base.safetensors", &base);
    add(
        &store,
        &SourceFile::open(&p).unwrap(),
        &opts("base", None),
        &|_| {},
    )
    .unwrap();
    let mut ft = base.clone();
    ft[0].2 = ft[0]
        .2
        .iter()
        .enumerate()
        .map(|(i, v)| v + 1e-4 * ((i % 7) as f32 - 3.0))
        .collect();
    let q = model_file(dir.path(), "ft.safetensors", &ft);
    let r = add(
        &store,
        &SourceFile::open(&q).unwrap(),
        &opts("ft", Some("base")),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.delta_coded, 1);
    let delta = store.list_deltas().unwrap()[0];
    for m in ["base", "ft"] {
        assert!(store.delete_manifest(&name(m)).unwrap());
    }
    store.leases.lock().unwrap().clear();
    // A dry run takes no lease; the young delta is kept, and so is its reference.
    store.young.lock().unwrap().insert(delta);
    let g = gc(&store, true).unwrap();
    assert_eq!(
        (g.weights.len(), g.deltas.len(), g.kept),
        (1, 0, 2),
        "{g:?}"
    );
    assert!(store.log().is_empty(), "{:?}", store.log());
    let g = gc(&store, false).unwrap();
    assert_eq!(
        (g.weights.len(), g.deltas.len(), g.kept),
        (1, 0, 2),
        "{g:?}"
    );
    assert_eq!(store.log(), ["take exclusive:gc", "give exclusive:gc"]);
    assert_eq!(store.list_deltas().unwrap(), vec![delta]);
    // Once old, both go.
    store.young.lock().unwrap().clear();
    let g = gc(&store, false).unwrap();
    assert_eq!(
        (g.weights.len(), g.deltas.len(), g.kept),
        (1, 1, 0),
        "{g:?}"
    );
    assert!(store.list_weights().unwrap().is_empty());
}

#[test]
fn the_grace_period_does_not_apply_to_a_store_with_one_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = NoManifests::default();
    let p = model_file(
        dir.path(),
        "m.safetensors",
        &[("x", vec![2], vec![1.0, 2.0])],
    );
    add(
        &store,
        &SourceFile::open(&p).unwrap(),
        &opts("m", None),
        &|_| {},
    )
    .unwrap();
    store.delete_manifest(&name("m")).unwrap();
    *store.young.lock().unwrap() = store.list_weights().unwrap().into_iter().collect();
    let g = gc(&store, false).unwrap();
    assert_eq!((g.weights.len(), g.kept, g.grace_secs), (1, 0, None));
}

#[test]
fn gc_reports_the_bytes_of_the_weights_it_removes() {
    let store = MemoryStore::new();
    let a = WeightTensor::from_vec("a", vec![64, 16], smooth(1024, 0.0)).unwrap();
    let b = WeightTensor::from_vec("b", vec![3], vec![1.0f32, 2.0, 3.0]).unwrap();
    for w in [&a, &b] {
        store.store(w).unwrap();
    }
    // No manifest names them: both go, 4096 + 12 bytes (the memory store keeps them raw).
    let dry = gc(&store, true).unwrap();
    assert_eq!(dry.weights.len(), 2, "{dry:?}");
    assert_eq!(
        (dry.weight_bytes, dry.delta_bytes, dry.bytes),
        (4108, 0, 4108)
    );
    let g = gc(&store, false).unwrap();
    assert_eq!(
        (g.weight_bytes, g.delta_bytes, g.bytes),
        (4108, 0, 4108),
        "{g:?}"
    );
    assert!(store.list_weights().unwrap().is_empty());
    let again = gc(&store, false).unwrap();
    assert_eq!(again.bytes, 0, "{again:?}");
}

#[test]
fn npy_and_npz_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let mut npy =
        coral_formats::npy::header_bytes(DType::I32, &[2, 3], coral_formats::npy::NonNumpy::Refuse)
            .unwrap();
    npy.extend((0..6i32).flat_map(|i| i.to_le_bytes()));
    let p = dir.path().join("arr.npy");
    std::fs::write(&p, &npy).unwrap();
    add(
        &store,
        &SourceFile::open(&p).unwrap(),
        &opts("arr", None),
        &|_| {},
    )
    .unwrap();
    assert_eq!(export_bytes(&store, "arr", dir.path(), "npy"), npy);

    let mut z = std::io::Cursor::new(Vec::new());
    let mut w = coral_formats::npz::Writer::new(&mut z);
    w.add("arr.npy", &npy).unwrap();
    w.add("other.npy", &npy).unwrap();
    w.finish().unwrap();
    let z = z.into_inner();
    let zp = dir.path().join("both.npz");
    std::fs::write(&zp, &z).unwrap();
    let r = add(
        &store,
        &SourceFile::open(&zp).unwrap(),
        &opts("both", None),
        &|_| {},
    )
    .unwrap();
    assert_eq!((r.new, r.reused), (0, 2));
    assert_eq!(export_bytes(&store, "both", dir.path(), "npz"), z);
    // A safetensors model goes out as .npz and back.
    let st = model_file(
        dir.path(),
        "s.safetensors",
        &[("x", vec![2], vec![1.0, 2.0])],
    );
    add(
        &store,
        &SourceFile::open(&st).unwrap(),
        &opts("s", None),
        &|_| {},
    )
    .unwrap();
    let zb = export_bytes(&store, "s", dir.path(), "npz");
    let members = coral_formats::npz::read(&zb).unwrap();
    assert_eq!(members[0].0, "x.npy");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_safetensors_model_round_trips(
        tensors in proptest::collection::vec((0usize..15, proptest::collection::vec(0usize..6, 0..3)), 1..6),
        fill in any::<u8>(),
        group in 1usize..64,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<_> = tensors.iter().enumerate()
            .map(|(i, (d, s))| (format!("t{i}"), DType::ALL[*d], s.clone())).collect();
        let (mut bytes, offsets) = build_header(&list).unwrap();
        let total = offsets.last().map_or(0, |o| o[1]) as usize;
        bytes.extend((0..total).map(|i| (i as u8).wrapping_mul(fill)));
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let store = MemoryStore::new();
        let o = AddOptions { name: name("m"), reference: crate::Reference::None, group_bytes: group, cancel: None, wait: Duration::ZERO };
        let r = add(&store, &SourceFile::open(&p).unwrap(), &o, &|_| {}).unwrap();
        prop_assert_eq!(r.new + r.reused, list.len());
        let out = dir.path().join("o.safetensors");
        export(&store, &name("m"), &out, group, &|_| {}).unwrap();
        prop_assert_eq!(std::fs::read(out).unwrap(), bytes);
    }
}

/// Every file under `dir` (path → bytes, or the link's target, or a folder mark), with modes.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, (u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    fn walk(root: &Path, d: &Path, out: &mut std::collections::BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, (0, t.to_str().unwrap().as_bytes().to_vec()));
            } else if meta.is_dir() {
                out.insert(rel, (mode, b"<dir>".to_vec()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any folder of blobs (of sizes around the chunking's), nested folders, links and a
    /// safetensors shard comes back identical, modes included; the same folder again costs
    /// nothing.
    #[test]
    fn folders_round_trip(
        files in proptest::collection::vec(
            (0usize..3, 0usize..700_000, any::<u8>(), prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o444])),
            0..6,
        ),
        shard in any::<bool>(),
    ) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        for (i, (depth, size, seed, mode)) in files.iter().enumerate() {
            let sub = ["", "a/", "a/b/"][*depth];
            let p = src.join(format!("{sub}f{i}.bin"));
            let mut x = u64::from(*seed) | 1;
            let bytes: Vec<u8> = (0..*size).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        std::os::unix::fs::symlink("../f0.bin", src.join("a/link")).unwrap();
        if shard {
            model_file(&src.join("a"), "model.safetensors", &[("w", vec![3, 5], smooth(15, 0.5))]);
        }
        std::fs::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o555)).unwrap();
        let store = MemoryStore::new();
        let folder = SourceFolder::open(&src).unwrap();
        let r = add(&store, &folder, &opts("f", None), &|_| {}).unwrap();
        prop_assert_eq!(r.tensors, usize::from(shard));
        let out = dir.path().join("out");
        export(&store, &name("f"), &out, 4096, &|_| {}).unwrap();
        prop_assert_eq!(tree(&src), tree(&out));
        let again = add(&store, &folder, &opts("g", None), &|_| {}).unwrap();
        prop_assert_eq!(again.bytes_stored, 0);
        crate::verify::verify(&store, &|_| {}).map(|v| assert!(v.failures.is_empty(), "{:?}", v.failures)).unwrap();
        // Read-only folders are restored, and still cleaned up by the test.
        std::fs::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(out.join("a/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A damaged blob chunk fails the export with one line naming the file, and leaves no folder.
#[test]
fn a_damaged_blob_fails_the_folder_export_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("config.json"), b"{\"a\": 1}").unwrap();
    std::fs::write(src.join("z.bin"), vec![7u8; 1000]).unwrap();
    let store = MemoryStore::new();
    add(
        &store,
        &SourceFolder::open(&src).unwrap(),
        &opts("f", None),
        &|_| {},
    )
    .unwrap();
    let m = store.get_manifest(&name("f")).unwrap().unwrap();
    let (_, chunk) = m.blob_chunks().last().unwrap();
    // Other bytes under the chunk's key.
    assert!(store.corrupt_for_testing(&chunk.key, vec![8u8; 1000]));
    let out = dir.path().join("out");
    let e = export(&store, &name("f"), &out, 4096, &|_| {}).unwrap_err();
    let line = e.one_line();
    assert!(line.contains("z.bin") && !line.contains('\n'), "{line}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let v = crate::verify::verify(&store, &|_| {}).unwrap();
    assert!(
        v.failures
            .iter()
            .any(|f| f.kind == "manifest" && f.error.contains("z.bin chunk 0")),
        "{:?}",
        v.failures
    );
}

/// Tensors with no counterpart in the reference go to the store unhashed: a repeat within the
/// file, a tensor another model stored, and new ones are told apart by the store; tensors the
/// reference has are hashed first and delta-coded. Every model exports as it was added, on
/// the memory store and on HDF5.
#[test]
fn unhashed_and_planned_tensors_count_and_export_alike() {
    let dir = tempfile::tempdir().unwrap();
    let hdf5 = coral_hdf5::HDF5Store::open(
        dir.path().join("s.h5"),
        coral_hdf5::HDF5StoreOptions::new().chunk_bytes(4096),
    )
    .unwrap();
    let memory = MemoryStore::new();
    let stores: [&dyn Store; 2] = [&memory, &hdf5];
    for store in stores {
        let base = vec![
            ("a", vec![2048], smooth(2048, 0.0)),
            ("b", vec![16, 8], smooth(128, 1.0)),
            ("tied", vec![2048], smooth(2048, 0.0)),
        ];
        let add_as = |file: &Path, model: &str, reference: Option<&str>| {
            add(
                store,
                &SourceFile::open(file).unwrap(),
                &opts(model, reference),
                &|_| {},
            )
            .unwrap()
        };
        let p = model_file(dir.path(), "base.safetensors", &base);
        let r = add_as(&p, "base", None);
        // "tied" repeats "a": stored once.
        assert_eq!((r.new, r.reused, r.delta_coded), (2, 1, 0), "{r:?}");
        assert!(r.bytes_stored > 0);
        // The same file again with no reference: every tensor is found in the store.
        let r = add_as(&p, "again", None);
        assert_eq!((r.new, r.reused, r.bytes_stored), (0, 3, 0), "{r:?}");
        // A fine-tune against base: "a" changed (a delta), "b" is the same, "c" is new.
        let mut ft = base.clone();
        ft[0].2 = ft[0].2.iter().map(|v| v + 1e-4).collect();
        ft.push(("c", vec![300], smooth(300, 5.0)));
        let q = model_file(dir.path(), "ft.safetensors", &ft);
        let r = add_as(&q, "ft", Some("base"));
        assert_eq!(
            (r.tensors, r.new + r.reused + r.delta_coded),
            (4, 4),
            "{r:?}"
        );
        assert_eq!((r.reused, r.delta_coded), (2, 1), "{r:?}");
        for (model, file) in [("base", &p), ("again", &p), ("ft", &q)] {
            let got = export_bytes(store, model, dir.path(), "safetensors");
            assert!(
                got == std::fs::read(file).unwrap(),
                "{model} exports as added"
            );
        }
    }
}

/// Tensors of [`crate::load::STREAM_BYTES`] or more are streamed, as are those larger than a
/// group (`c`: 8,000 bytes, over `export_bytes`'s 4,096), and the first group of the small ones
/// after each loads while it streams (queued at its first write): a model that mixes them,
/// starting and ending with a streamed one, two of them back to back, comes back byte for
/// byte.
#[test]
fn streamed_and_grouped_tensors_export_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let big = crate::load::STREAM_BYTES / 4 + 1024;
    let tensors = vec![
        ("a", vec![big], smooth(big, 0.0)),
        ("b", vec![300], smooth(300, 1.0)),
        ("c", vec![20, 100], smooth(2000, 2.0)),
        ("d", vec![3], smooth(3, 2.5)),
        ("e", vec![big], smooth(big, 3.0)),
        ("f", vec![big], smooth(big, 3.5)),
        ("g", vec![5], smooth(5, 4.0)),
        ("h", vec![big], smooth(big, 5.0)),
    ];
    let p = model_file(dir.path(), "mixed.safetensors", &tensors);
    let src = SourceFile::open(&p).unwrap();
    add(&store, &src, &opts("mixed", None), &|_| {}).unwrap();
    assert!(
        export_bytes(&store, "mixed", dir.path(), "safetensors") == std::fs::read(&p).unwrap(),
        "the export differs from the file added"
    );
}

/// Resident kibibytes of this process's mapping that holds `addr` (`/proc/self/smaps`).
#[cfg(target_os = "linux")]
fn rss_kib(addr: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                return kb.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
    }
    None
}

#[test]
#[cfg(target_os = "linux")]
fn the_last_groups_pages_are_released_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1 << 20;
    let p = model_file(
        dir.path(),
        "m.safetensors",
        &[("a", vec![n], smooth(n, 0.1))],
    );
    let src = SourceFile::open(&p).unwrap();
    let w = src.weight(&src.tensors()[0], &name("m")).unwrap();
    let data = w.data();
    let addr = data.as_ptr() as usize;
    let touched: u64 = data.iter().step_by(4096).map(|&b| u64::from(b)).sum();
    std::hint::black_box(touched);
    let before = rss_kib(addr).unwrap();
    assert!(before >= 4000, "{before} KiB resident after reading 4 MiB");
    src.release_in_background(src.tensors());
    // The thread drops them soon; the header's page may stay.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = rss_kib(addr).unwrap();
        if now <= 8 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now} KiB still resident"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The pages are read again from the file when touched.
    assert_eq!(
        &data[..8],
        &smooth(2, 0.1)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>()[..]
    );
}

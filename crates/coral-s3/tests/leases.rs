//! Many writers on one prefix: leases (shared against exclusive, stale and dead holders, the
//! one-line message, a lost lease), commit times for gc's grace period, and abandoned
//! multipart uploads. Against every engine of the test environment (moto and Garage).

mod common;

use std::time::{Duration, Instant};

use coral_core::{DType, ManifestTensor, ModelManifest, ModelName};
use coral_s3::{S3Config, S3Store};
use coral_store_api::testenv::S3Engine;
use coral_store_api::testing::sample_tensor;
use coral_store_api::{LeaseKind, ManifestStore, StoreError, WeightStore};

use LeaseKind::{Exclusive, Shared};

fn shared_config(e: &S3Engine, tag: &str) -> S3Config {
    common::engine_config(e, &common::unique_bucket(tag))
}

fn locks(store: &S3Store) -> Vec<String> {
    let mut v = store.list_raw_for_testing("locks").unwrap();
    v.sort();
    v
}

/// The listing of `locks/` once it shows `n` objects (or after 3 s): Garage's listings show a
/// deleted object for a moment now and then.
fn settled(store: &S3Store, n: usize) -> Vec<String> {
    let t = Instant::now();
    loop {
        let v = locks(store);
        if v.len() == n || t.elapsed() > Duration::from_secs(3) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_busy(e: &StoreError, wants: &[&str]) {
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Locked { .. }), "{e:?}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    for w in wants {
        assert!(msg.contains(w), "{w:?} missing from: {msg}");
    }
}

#[test]
fn shared_and_exclusive_leases_exclude_each_other() {
    for e in common::engines() {
        let c = shared_config(&e, "lease");
        let (a, b, gc) = (
            common::open(c.clone()),
            common::open(c.clone()),
            common::open(c),
        );
        // Writers never exclude each other.
        let s1 = a.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        let s2 = b.acquire_lease(Shared, "sync", Duration::ZERO).unwrap();
        assert!(s1.is_held() && s2.is_held());
        let seen = settled(&a, 2);
        assert_eq!(seen.len(), 2, "{seen:?}");

        // gc waits for them, then gives up with one line naming a holder.
        let t = Instant::now();
        let err = gc
            .acquire_lease(Exclusive, "gc", Duration::from_secs(1))
            .unwrap_err();
        assert!(t.elapsed() >= Duration::from_secs(1));
        let pid = format!("pid {}", std::process::id());
        assert_busy(
            &err,
            &[
                "is busy",
                "holds a shared lease",
                "host ",
                &pid,
                "since 20",
                "and 1 other lease(s)",
                "`coral gc` gave up after waiting 1 s",
            ],
        );
        let seen = settled(&a, 2);
        assert_eq!(seen.len(), 2, "gc took its lease back: {seen:?}");
        a.release_lease(s1).unwrap();
        b.release_lease(s2).unwrap();
        let seen = settled(&a, 0);
        assert!(seen.is_empty(), "{seen:?}");

        // gc's lease keeps writers and other collectors out.
        let x = gc.acquire_lease(Exclusive, "gc", Duration::ZERO).unwrap();
        let err = a
            .acquire_lease(Shared, "add", Duration::from_millis(500))
            .unwrap_err();
        assert_busy(
            &err,
            &[
                "`coral gc` holds an exclusive lease",
                &pid,
                "`coral add` gave up",
            ],
        );
        let err = b
            .acquire_lease(Exclusive, "gc", Duration::from_millis(300))
            .unwrap_err();
        assert_busy(&err, &["`coral gc` holds an exclusive lease"]);
        let seen = settled(&a, 1);
        assert_eq!(seen.len(), 1, "{seen:?}");

        // A writer that waits gets in once gc is done.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(700));
                gc.release_lease(x).unwrap();
            });
            let t = Instant::now();
            let l = a
                .acquire_lease(Shared, "add", Duration::from_secs(20))
                .unwrap();
            assert!(
                t.elapsed() >= Duration::from_millis(600),
                "{:?}",
                t.elapsed()
            );
            a.release_lease(l).unwrap();
        });
        let seen = settled(&a, 0);
        assert!(seen.is_empty(), "{seen:?}");
    }
}

#[test]
fn a_waiting_gc_lets_no_new_writer_in() {
    for e in common::engines() {
        let c = shared_config(&e, "leasewait");
        let (a, b, gc) = (
            common::open(c.clone()),
            common::open(c.clone()),
            common::open(c),
        );
        let writer = a.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        std::thread::scope(|s| {
            let waiting_gc = s.spawn(|| {
                let t = Instant::now();
                let l = gc
                    .acquire_lease(Exclusive, "gc", Duration::from_secs(30))
                    .unwrap();
                (t.elapsed(), l)
            });
            // gc is waiting for the writer with its lease up: a new writer must wait too.
            std::thread::sleep(Duration::from_millis(800));
            let err = b
                .acquire_lease(Shared, "add", Duration::from_millis(300))
                .unwrap_err();
            assert_busy(&err, &["`coral gc` holds an exclusive lease"]);
            std::thread::sleep(Duration::from_millis(200));
            a.release_lease(writer).unwrap();
            let (waited, l) = waiting_gc.join().unwrap();
            assert!(waited >= Duration::from_millis(900), "{waited:?}");
            gc.release_lease(l).unwrap();
        });
        // And with gc done, the new writer gets in at once.
        let l = b.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        b.release_lease(l).unwrap();
        let seen = settled(&a, 0);
        assert!(seen.is_empty(), "{seen:?}");
    }
}

/// A lease object as another process would have written it.
fn planted(kind: &str, token: &str, stale_after_secs: u64, extra: serde_json::Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "format": "coral.s3.lease.v1",
        "kind": kind,
        "id": format!("{kind}-{token}"),
        "operation": if kind == "exclusive" { "gc" } else { "add" },
        "host": "elsewhere",
        "pid": 4242,
        "started_unix": 1_796_170_000,
        "refreshed_unix": 1_796_170_000,
        "stale_after_secs": stale_after_secs,
    });
    if let (Some(m), Some(x)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(x.clone());
    }
    serde_json::to_vec(&v).unwrap()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[test]
fn stale_and_dead_leases_are_ignored_and_gc_removes_them() {
    for e in common::engines() {
        let store = common::open(shared_config(&e, "stale"));
        // A live lease of another machine blocks, and is named.
        store
            .put_raw_for_testing(
                "locks/exclusive-00000000000000aa.json",
                planted("exclusive", "00000000000000aa", 3600, serde_json::json!({})),
            )
            .unwrap();
        let err = store
            .acquire_lease(Shared, "add", Duration::from_millis(300))
            .unwrap_err();
        assert_busy(
            &err,
            &[
                "`coral gc` holds an exclusive lease (host elsewhere, pid 4242, since 2026-12-02 00:06:40 UTC",
            ],
        );
        store
            .delete_raw_for_testing("locks/exclusive-00000000000000aa.json")
            .unwrap();

        // Leases not refreshed for their stale period (1 s here) are ignored...
        store
            .put_raw_for_testing(
                "locks/exclusive-00000000000000bb.json",
                planted("exclusive", "00000000000000bb", 1, serde_json::json!({})),
            )
            .unwrap();
        store
            .put_raw_for_testing(
                "locks/shared-00000000000000cc.json",
                planted("shared", "00000000000000cc", 1, serde_json::json!({})),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let l = store.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        store.release_lease(l).unwrap();
        // ... by writers, which leave them; gc removes them.
        let seen = settled(&store, 2);
        assert_eq!(seen.len(), 2, "{seen:?}");
        let l = store
            .acquire_lease(Exclusive, "gc", Duration::ZERO)
            .unwrap();
        let seen = settled(&store, 1);
        assert_eq!(seen.len(), 1, "{seen:?}");
        store.release_lease(l).unwrap();
        let seen = settled(&store, 0);
        assert!(seen.is_empty(), "{seen:?}");

        // A holder that was a process of this machine and is gone: ignored at once.
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let here = serde_json::json!({
            "host": "this-machine",
            "pid": dead,
            "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": std::fs::read_link("/proc/self/ns/pid").unwrap().to_string_lossy(),
            "proc_start": 1,
        });
        store
            .put_raw_for_testing(
                "locks/exclusive-00000000000000dd.json",
                planted("exclusive", "00000000000000dd", 3600, here),
            )
            .unwrap();
        let l = store
            .acquire_lease(Exclusive, "gc", Duration::ZERO)
            .unwrap();
        store.release_lease(l).unwrap();
        let seen = settled(&store, 0);
        assert!(seen.is_empty(), "{seen:?}");

        // Objects in locks/ that are no lease are not in anyone's way.
        store
            .put_raw_for_testing("locks/README", b"not a lease".to_vec())
            .unwrap();
        let l = store
            .acquire_lease(Exclusive, "gc", Duration::ZERO)
            .unwrap();
        store.release_lease(l).unwrap();
    }
}

fn manifest(name: &str, key: coral_core::ContentHash) -> ModelManifest {
    ModelManifest {
        version: 1,
        name: ModelName::new(name).unwrap(),
        format: coral_core::ModelFormat::Npy,
        tensors: vec![ManifestTensor {
            name: "w".into(),
            key,
            dtype: DType::F32,
            shape: vec![8],
            data_offsets: None,
        }],
        safetensors_header: None,
        file_size: 160,
        parent: None,
        created_unix: 0,
        files: Vec::new(),
    }
}

#[test]
fn a_lost_lease_writes_no_manifest_and_deletes_nothing() {
    for e in common::engines() {
        let c = shared_config(&e, "lost").with_lease_stale_after(Duration::from_secs(3));
        let (a, other) = (common::open(c.clone()), common::open(c));
        let w = sample_tensor("w", DType::F32, &[8], 1);
        let k = a.store(&w).unwrap();
        let l = a.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        // Refreshed in the background (every 200 ms here): its object keeps being rewritten.
        std::thread::sleep(Duration::from_millis(700));
        a.put_manifest(&manifest("kept", k)).unwrap();
        // Another process removes it (as gc does with a lease it judges stale). A refresh
        // already past its HEAD puts it back once: removed again until a refresh finds it gone.
        let mine = settled(&other, 1);
        assert_eq!(mine.len(), 1, "{mine:?}");
        for _ in 0..10 {
            other.delete_raw_for_testing(&mine[0]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        let err = a.put_manifest(&manifest("late", k)).unwrap_err();
        assert_busy(&err, &["was lost", "nothing more is written or deleted"]);
        assert!(a.delete(&k).is_err());
        assert!(a
            .get_manifest(&ModelName::new("late").unwrap())
            .unwrap()
            .is_none());
        assert!(a.exists(&k).unwrap());
        // The refresh stopped: it did not bring the object back.
        let seen = settled(&other, 0);
        assert!(seen.is_empty(), "{seen:?}");
        a.release_lease(l).unwrap();
        // A new lease works again.
        let l = a.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        a.put_manifest(&manifest("again", k)).unwrap();
        a.release_lease(l).unwrap();
    }
}

#[test]
fn under_a_lease_a_manifest_names_only_stored_keys() {
    for e in common::engines() {
        let store = common::open(shared_config(&e, "present"));
        let w = sample_tensor("w", DType::F32, &[8], 3);
        let k = store.store(&w).unwrap();
        let absent = sample_tensor("x", DType::F32, &[8], 4).compute_hash();
        let l = store.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
        store.put_manifest(&manifest("ok", k)).unwrap();
        let err = store
            .put_manifest(&manifest("dangling", absent))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("names 1 key(s) the store does not hold") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(store
            .get_manifest(&ModelName::new("dangling").unwrap())
            .unwrap()
            .is_none());
        store.release_lease(l).unwrap();
    }
}

#[test]
fn closing_a_store_gives_its_leases_back() {
    for e in common::engines() {
        let c = shared_config(&e, "close");
        let watcher = common::open(c.clone());
        {
            let mut a = common::open(c.clone());
            let _l = a.acquire_lease(Shared, "add", Duration::ZERO).unwrap();
            assert_eq!(settled(&watcher, 1).len(), 1);
            a.close().unwrap();
        }
        let seen = settled(&watcher, 0);
        assert!(seen.is_empty(), "{seen:?}");
        {
            let a = common::open(c);
            let _l = a.acquire_lease(Exclusive, "gc", Duration::ZERO).unwrap();
            // Dropped without closing.
        }
        let seen = settled(&watcher, 0);
        assert!(seen.is_empty(), "{seen:?}");
    }
}

#[test]
fn commit_times_give_what_is_younger_than_a_grace_period() {
    for e in common::engines() {
        let store = common::open(shared_config(&e, "young"));
        assert!(store.shares_writers());
        let w = sample_tensor("w", DType::F32, &[16], 2);
        let k = store.store(&w).unwrap();
        let young = store.committed_within(Duration::from_secs(3600)).unwrap();
        assert!(young.contains(&k), "{young:?}");
        assert!(store.committed_within(Duration::ZERO).unwrap().is_empty());
        std::thread::sleep(Duration::from_millis(3200));
        // 1 s of grace, and the second of margin for services that stamp to the second.
        assert!(store
            .committed_within(Duration::from_secs(1))
            .unwrap()
            .is_empty());
    }
}

/// Starts a multipart upload of `key` (under the bucket) with object_store's own call, sends
/// one part, and drops it without completing or aborting it: what a killed writer leaves.
fn abandon_upload(e: &S3Engine, bucket: &str, key: &str) {
    use object_store::aws::AmazonS3Builder;
    use object_store::{ObjectStore, PutPayload};
    let s3 = AmazonS3Builder::new()
        .with_endpoint(&e.endpoint)
        .with_bucket_name(bucket)
        .with_region(&e.region)
        .with_access_key_id(&e.access_key)
        .with_secret_access_key(&e.secret_key)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut upload = s3
            .put_multipart(&object_store::path::Path::from(key))
            .await
            .unwrap();
        upload
            .put_part(PutPayload::from(vec![7u8; 1024]))
            .await
            .unwrap();
        drop(upload);
    });
}

#[test]
fn abandoned_multipart_uploads_are_aborted_after_the_grace_period() {
    use coral_store_api::ManifestStore as _;
    for e in common::engines() {
        let c = shared_config(&e, "multipart");
        let store = common::open(c.clone());
        let other = common::open(
            c.clone()
                .with_prefix(format!("{}-other", c.prefix.trim_end_matches('/'))),
        );
        let prefix = store.config().prefix.clone();
        abandon_upload(&e, &c.bucket, &format!("{prefix}weights/abandoned.npz"));
        abandon_upload(
            &e,
            &c.bucket,
            &format!("{}weights/theirs.npz", other.config().prefix),
        );
        let young = store
            .remove_leftovers(Duration::from_secs(3600), true)
            .unwrap();
        // moto reports every upload as started on 2010-11-10, so only Garage keeps it.
        let expect_young = if e.name == "moto" { 1 } else { 0 };
        assert_eq!(young.uploads, expect_young, "{}: {young:?}", e.name);
        let dry = store.remove_leftovers(Duration::ZERO, true).unwrap();
        assert_eq!(dry.uploads, 1, "{}: {dry:?}", e.name);
        let done = store.remove_leftovers(Duration::ZERO, false).unwrap();
        assert_eq!(done.uploads, 1, "{}: {done:?}", e.name);
        assert_eq!(
            store
                .remove_leftovers(Duration::ZERO, true)
                .unwrap()
                .uploads,
            0,
            "{}",
            e.name
        );
        // Another prefix's upload is not ours to abort.
        assert_eq!(
            other
                .remove_leftovers(Duration::ZERO, true)
                .unwrap()
                .uploads,
            1,
            "{}",
            e.name
        );
        assert_eq!(
            other
                .remove_leftovers(Duration::ZERO, false)
                .unwrap()
                .uploads,
            1
        );
    }
}

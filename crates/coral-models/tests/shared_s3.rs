//! `add` and `gc` on an S3 store that many writers share, through the library (the end-to-end
//! race of separate processes is `tests/tests/team.rs`): a failed add leaves what it stored
//! for gc, gc's grace period keeps it until it is old, and gc aborts abandoned multipart
//! uploads. Against every engine of the test environment (moto and Garage).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coral_core::{DType, ModelName};
use coral_models::{self as ops, AddOptions, GcOptions, SourceFile};
use coral_s3::{S3Config, S3Store};
use coral_store_api::testenv::{self, S3Engine};
use coral_store_api::{ManifestStore, WeightStore};

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("coral-cli-{tag}-{}-{nanos}", std::process::id())
}

fn config(e: &S3Engine, bucket: &str) -> S3Config {
    S3Config::new(bucket)
        .with_endpoint(&e.endpoint)
        .with_region(&e.region)
        .with_credentials(&e.access_key, &e.secret_key)
        .with_prefix("shared")
        .with_retries(2, Duration::from_secs(10))
}

/// A safetensors model of `n` f32 tensors of 1024 values each.
fn model(dir: &Path, n: usize, seed: usize) -> PathBuf {
    let list: Vec<(String, DType, Vec<usize>)> = (0..n)
        .map(|i| (format!("t{i}"), DType::F32, vec![1024]))
        .collect();
    let (mut bytes, _) = coral_formats::safetensors::build_header(&list).unwrap();
    for i in 0..n {
        for j in 0..1024 {
            let v = (((seed * 131 + i) * 1024 + j) as f32 * 0.001).sin();
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    let p = dir.join(format!("m{seed}.safetensors"));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gc(store: &S3Store, grace: Duration) -> ops::GcReport {
    ops::gc_with(
        store,
        &GcOptions {
            grace,
            ..GcOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn a_failed_add_leaves_what_it_stored_until_gc_finds_it_old() {
    static CANCEL: AtomicBool = AtomicBool::new(false);
    let dir = tempfile::tempdir().unwrap();
    for e in testenv::s3_engines() {
        let store = S3Store::new(config(&e, &unique("rollback"))).unwrap();
        let kept = model(dir.path(), 2, 1);
        let opts = |name: &str, cancel| AddOptions {
            name: ModelName::new(name).unwrap(),
            reference: coral_models::Reference::None,
            // A tensor stored unhashed counts for an eighth of its bytes: each 4 KB tensor is
            // a group of its own.
            group_bytes: 512,
            cancel,
            wait: Duration::from_secs(10),
        };
        ops::add(
            &store,
            &SourceFile::open(&kept).unwrap(),
            &opts("kept", None),
            &|_| {},
        )
        .unwrap();
        let before = store.list_weights().unwrap();
        // Interrupted once its first group (one tensor of 4 KB) is stored.
        CANCEL.store(false, Ordering::Relaxed);
        let p = model(dir.path(), 3, 2);
        let err = ops::add(
            &store,
            &SourceFile::open(&p).unwrap(),
            &opts("cut", Some(&CANCEL)),
            &|_| CANCEL.store(true, Ordering::Relaxed),
        )
        .unwrap_err();
        let msg = err.one_line();
        assert!(msg.contains("interrupted; nothing was added"), "{msg}");
        assert!(
            msg.contains("the up to 1 weight(s) and 0 delta(s) it stored are left in the store"),
            "{msg}"
        );
        // Nothing deleted, no manifest, the lease given back.
        let after = store.list_weights().unwrap();
        assert_eq!(after.len(), before.len() + 1, "{}", e.name);
        assert!(store
            .get_manifest(&ModelName::new("cut").unwrap())
            .unwrap()
            .is_none());
        // (Garage's listings may show a deleted object for a moment.)
        let t = std::time::Instant::now();
        while !store.list_raw_for_testing("locks").unwrap().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "the lease is still there"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Young: kept (and counted). Old enough: removed. The other model is untouched.
        let g = gc(&store, Duration::from_secs(3600));
        assert_eq!(
            (g.weights.len(), g.kept, g.grace_secs),
            (0, 1, Some(3600)),
            "{g:?}"
        );
        let g = gc(&store, Duration::ZERO);
        assert_eq!((g.weights.len(), g.kept), (1, 0), "{g:?}");
        assert_eq!(store.list_weights().unwrap(), before);
        let out = dir.path().join("kept.out.safetensors");
        ops::export(
            &store,
            &ModelName::new("kept").unwrap(),
            &out,
            1 << 20,
            &|_| {},
        )
        .unwrap();
        assert_eq!(std::fs::read(out).unwrap(), std::fs::read(&kept).unwrap());
    }
}

#[test]
fn gc_aborts_multipart_uploads_older_than_the_grace_period() {
    use object_store::aws::AmazonS3Builder;
    use object_store::{ObjectStore, PutPayload};
    for e in testenv::s3_engines() {
        let bucket = unique("multipart");
        let store = S3Store::new(config(&e, &bucket)).unwrap();
        let s3 = AmazonS3Builder::new()
            .with_endpoint(&e.endpoint)
            .with_bucket_name(&bucket)
            .with_region(&e.region)
            .with_access_key_id(&e.access_key)
            .with_secret_access_key(&e.secret_key)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .unwrap();
        // What a writer killed during a large upload leaves: started, one part, never ended.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let key = object_store::path::Path::from("shared/weights/big.npz");
            let mut upload = s3.put_multipart(&key).await.unwrap();
            upload
                .put_part(PutPayload::from(vec![1u8; 4096]))
                .await
                .unwrap();
            drop(upload);
        });
        // Garage dates it truly: a grace period keeps it. (moto dates every upload 2010.)
        if e.name != "moto" {
            assert_eq!(gc(&store, Duration::from_secs(3600)).uploads_aborted, 0);
        }
        let dry = ops::gc_with(
            &store,
            &GcOptions {
                dry_run: true,
                grace: Duration::ZERO,
                ..GcOptions::default()
            },
        )
        .unwrap();
        assert_eq!(dry.uploads_aborted, 1, "{}: {dry:?}", e.name);
        let g = gc(&store, Duration::ZERO);
        assert_eq!(g.uploads_aborted, 1, "{}: {g:?}", e.name);
        assert_eq!(gc(&store, Duration::ZERO).uploads_aborted, 0, "{}", e.name);
    }
}

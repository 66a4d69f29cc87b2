//! S3Store beyond the conformance suite, against both test engines (moto and Garage):
//! bucket creation, multipart uploads, leftovers of interrupted uploads, credentials kept out of
//! every message, calls from many threads and from inside an async runtime, and objects NumPy
//! reads without Coral.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coral_core::{Codec, DType, WeightTensor};
use coral_s3::{S3Config, S3Store};
use coral_store_api::testenv::{self, S3Engine};
use coral_store_api::testing::sample_tensor;
use coral_store_api::WeightStore;

const ACCESS: &str = "AKIACORALTESTLEAKCHECK";
const SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYLEAKCHECKKEY";

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A config whose credentials the test looks for in every output: made-up ones on moto (which
/// takes any), the real test key on Garage (which checks them).
fn secret_config(e: &S3Engine, endpoint: &str, bucket: &str) -> (S3Config, [String; 2]) {
    let (access, secret) = if e.name == "moto" {
        (ACCESS.to_owned(), SECRET.to_owned())
    } else {
        (e.access_key.clone(), e.secret_key.clone())
    };
    let mut c = common::engine_config(e, bucket).with_credentials(&access, &secret);
    c.endpoint_url = Some(endpoint.to_owned());
    (c, [access, secret])
}

#[test]
fn creates_a_missing_bucket_and_reopens_it() {
    for e in common::engines() {
        let bucket = common::unique_bucket("create");
        let cfg = common::engine_config(&e, &bucket);
        let store = common::open(cfg.clone());
        let w = sample_tensor("w", DType::F32, &[3, 3], 1);
        let k = store.store(&w).unwrap();
        drop(store);
        let again = common::open(cfg);
        assert_eq!(again.load(&k).unwrap().unwrap().data(), w.data());
    }
}

#[test]
fn credentials_never_show_in_debug_errors_or_logs() {
    for e in common::engines() {
        let ep = e.endpoint.clone();
        let logs = Buf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let secrets = tracing::subscriber::with_default(subscriber, || {
            let (config, secrets) = secret_config(&e, &ep, &common::unique_bucket("leak"));
            let store = common::open(config);
            let w = sample_tensor("w", DType::F32, &[64, 64], 2);
            let k = store.store(&w).unwrap();
            store.load(&k).unwrap();
            let mut shown = format!("{store:?} {store:#?} {:?}", store.config());
            // An unreachable endpoint: the error names the place, not the credentials.
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = closed.local_addr().unwrap().port();
            drop(closed);
            let err = S3Store::new(
                secret_config(
                    &e,
                    &format!("http://127.0.0.1:{port}"),
                    "unreachable-bucket",
                )
                .0
                .with_retries(0, Duration::from_secs(1)),
            )
            .unwrap_err();
            let mut chain = format!("{err} {err:?}");
            let mut src = std::error::Error::source(&err);
            while let Some(s) = src {
                chain.push_str(&format!(" {s} {s:?}"));
                src = s.source();
            }
            assert!(chain.contains("unreachable-bucket"), "{chain}");
            shown.push_str(&chain);
            for secret in &secrets {
                assert!(
                    !shown.contains(secret.as_str()),
                    "leaked in Debug/errors: {shown}"
                );
            }
            secrets
        });
        let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert!(!logs.is_empty(), "the subscriber saw nothing");
        for secret in &secrets {
            assert!(
                !logs.contains(secret.as_str()),
                "{}: leaked in logs",
                e.name
            );
        }
    }
}

#[test]
fn plain_http_only_for_an_http_endpoint() {
    // An https endpoint never falls back to http: the TLS handshake with a plain-http server
    // fails, it does not silently speak http.
    for e in common::engines() {
        let ep = e.endpoint.clone();
        let https = ep.replacen("http://", "https://", 1);
        let err = S3Store::new(
            common::config(&https, &common::unique_bucket("tls"))
                .with_retries(0, Duration::from_secs(2)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bucket"), "{err}");
    }
}

#[test]
fn big_weights_go_up_in_parts_and_come_back_bit_for_bit() {
    for e in common::engines() {
        for codec in ["none", "zstd-3"] {
            let store = common::open(
                common::engine_config(&e, &common::unique_bucket("multipart"))
                    .with_chunk_size(5 * 1024 * 1024)
                    .with_compression(codec.parse::<Codec>().unwrap()),
            );
            // 12 MiB of incompressible data: three parts.
            let w = sample_tensor("big", DType::U8, &[12 * 1024 * 1024], 3);
            let k = store.store(&w).unwrap();
            let back = store.load(&k).unwrap().unwrap();
            assert!(back.data() == w.data(), "{codec}: data differs");
            assert_eq!(back.name(), "big");
            let info = store.storage_info().unwrap();
            assert_eq!(info.total_weights, 1);
            assert_eq!(info.total_bytes, 12 * 1024 * 1024);
        }
    }
}

#[test]
fn leftovers_of_an_interrupted_upload_never_count_and_are_cleaned() {
    for e in common::engines() {
        let store = common::open(common::engine_config(&e, &common::unique_bucket("orphans")));
        let w = sample_tensor("w", DType::F32, &[16, 16], 4);
        let k = w.compute_hash();
        // What an upload interrupted after its data object leaves: no metadata object.
        store
            .put_raw_for_testing(&format!("weights/{k}.npz"), vec![1, 2, 3])
            .unwrap();
        store
            .put_raw_for_testing("weights/not-a-key.npz", vec![0])
            .unwrap();
        assert!(!store.exists(&k).unwrap());
        assert!(store.load(&k).unwrap().is_none());
        assert!(store.list_weights().unwrap().is_empty());
        assert!(store.get_metadata(&k).unwrap().is_none());
        // Young leftovers may belong to a write in progress: kept.
        assert!(store
            .remove_orphans(Duration::from_secs(3600))
            .unwrap()
            .data_objects
            .is_empty());
        let report = store.remove_orphans(Duration::ZERO).unwrap();
        assert_eq!(report.data_objects.len(), 1, "{report:?}");
        // Storing it for real afterwards works and verifies.
        assert_eq!(store.store(&w).unwrap(), k);
        assert_eq!(store.load(&k).unwrap().unwrap().data(), w.data());
        assert!(store
            .remove_orphans(Duration::ZERO)
            .unwrap()
            .data_objects
            .is_empty());
    }
}

#[test]
fn a_data_object_that_is_not_the_committed_one_is_an_error() {
    for e in common::engines() {
        let store = common::open(common::engine_config(&e, &common::unique_bucket("swap")));
        let w = sample_tensor("w", DType::F32, &[8, 8], 5);
        let k = store.store(&w).unwrap();
        store
            .put_raw_for_testing(
                &format!("weights/{k}.npz"),
                b"not the committed object".to_vec(),
            )
            .unwrap();
        let err = store.load(&k).unwrap_err();
        assert!(err.to_string().contains(&k.to_hex()), "{err}");
    }
}

#[test]
fn safe_from_many_threads_and_from_inside_an_async_runtime() {
    for e in common::engines() {
        let store = Arc::new(common::open(common::engine_config(
            &e,
            &common::unique_bucket("threads"),
        )));
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let store = store.clone();
                s.spawn(move || {
                    for i in 0..5u64 {
                        let w = sample_tensor("w", DType::BF16, &[32, 8], t * 100 + i);
                        let k = store.store(&w).unwrap();
                        assert_eq!(store.load(&k).unwrap().unwrap().data(), w.data());
                    }
                });
            }
        });
        assert_eq!(store.list_weights().unwrap().len(), 30);
        // From inside someone else's runtime (even a current-thread one): no panic, no deadlock.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s2 = store.clone();
        let n = rt.block_on(async move { s2.list_weights().unwrap().len() });
        assert_eq!(n, 30);
        let s3 = Arc::try_unwrap(store).unwrap();
        rt.block_on(async move { drop(s3) });
    }
}

#[test]
fn weight_objects_are_npz_files_numpy_reads() {
    for e in common::engines() {
        let ep = e.endpoint.clone();
        let Some(python) = testenv::python() else {
            return;
        };
        let bucket = common::unique_bucket("numpy");
        let cfg = common::engine_config(&e, &bucket);
        let prefix = cfg.clone().validated().unwrap().prefix;
        let store = common::open(cfg);
        let w = WeightTensor::from_vec("w", vec![2, 3], vec![1.5f32, -2.0, 0.0, 3.25, 1e-8, 7.0])
            .unwrap();
        let k = store.store(&w).unwrap();
        let (key, secret, region) = (&e.access_key, &e.secret_key, &e.region);
        let script = format!(
            r#"
import io, json, boto3, numpy as np
s3 = boto3.client("s3", endpoint_url="{ep}", aws_access_key_id="{key}", aws_secret_access_key="{secret}", region_name="{region}")
meta = json.loads(s3.get_object(Bucket="{bucket}", Key="{prefix}metadata/{k}.json")["Body"].read())
assert meta["data"]["encoding"] == "npz", meta
body = s3.get_object(Bucket="{bucket}", Key="{prefix}" + meta["data"]["key"])["Body"].read()
assert len(body) == meta["data"]["size"]
a = np.load(io.BytesIO(body))["weight"]
assert a.dtype == np.float32 and a.shape == (2, 3), (a.dtype, a.shape)
assert a.tolist() == [[1.5, -2.0, 0.0], [3.25, np.float32(1e-8).item(), 7.0]], a.tolist()
print("ok")
"#
        );
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "numpy could not read the object: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

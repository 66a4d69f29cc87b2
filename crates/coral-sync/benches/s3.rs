//! S3Store against each S3 engine of the environment (moto, and the 3-node Garage cluster),
//! side by side with rclone on the same engine, in one run.
//!
//! Needs `CORAL_TEST_S3_ENDPOINT` and `CORAL_TEST_MODEL` (`cargo xtask bench` sets them) and
//! `rclone` on the PATH. Prints a markdown table (medians of `CORAL_BENCH_RUNS`, default 3).
//!
//! Rows:
//! - `store_batch` / `load_batch` of the real model (fp32, and cut to bf16) with the store's
//!   default gzip (real `.npz` objects) and with zstd-3 + shuffle, against `rclone copyto` up and
//!   down of the same model as one safetensors file;
//! - `sync_from_local` when nothing changed;
//! - `sync_from_local` of a fine-tune in which a tenth of the tensors changed (stored in full, and
//!   kept as lossless deltas), with the bytes moved against the whole file rclone moves.

#[path = "../../coral-s3/tests/common/model.rs"]
mod model;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use coral_core::delta::encode_best_lossless;
use coral_core::{Codec, ContentHash, DType, WeightTensor};
use coral_s3::{S3Config, S3Store};
use coral_store_api::{DeltaStore, MemoryStore, WeightStore};
use coral_sync::SyncExt;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed().as_secs_f64(), r)
}

/// The model's tensors sorted by name; with `bf16`, float32 tensors cut to bfloat16.
fn load_model(path: &Path, bf16: bool) -> Vec<(String, WeightTensor)> {
    let mut out = model::load_model(path, bf16);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_safetensors(weights: &[(String, WeightTensor)], path: &Path) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = weights
        .iter()
        .map(|(n, w)| {
            let dt = match w.dtype() {
                DType::BF16 => safetensors::Dtype::BF16,
                DType::I64 => safetensors::Dtype::I64,
                _ => safetensors::Dtype::F32,
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dt, w.shape().to_vec(), w.data())
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).expect("writing safetensors");
}

/// A fine-tune: every element of the chosen tensors nudged in its low mantissa bits.
fn tune(w: &WeightTensor) -> WeightTensor {
    let data: Vec<u8> = match w.dtype() {
        DType::F32 => w
            .data()
            .chunks_exact(4)
            .flat_map(|c| {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                (x + x * (1.0 / 4096.0)).to_le_bytes()
            })
            .collect(),
        _ => {
            let mut d = w.data().to_vec();
            for b in d.iter_mut().step_by(2) {
                *b ^= 1;
            }
            d
        }
    };
    WeightTensor::from_bytes(w.name(), w.shape().to_vec(), w.dtype(), data).expect("tuned")
}

struct Bench {
    engine: coral_store_api::testenv::S3Engine,
    bucket: String,
    counter: std::cell::Cell<usize>,
}

impl Bench {
    fn store(&self, codec: Codec) -> S3Store {
        let n = self.counter.get();
        self.counter.set(n + 1);
        S3Store::new(
            S3Config::new(&self.bucket)
                .with_endpoint(&self.engine.endpoint)
                .with_region(&self.engine.region)
                .with_credentials(&self.engine.access_key, &self.engine.secret_key)
                .with_prefix(format!("bench{n}/coral"))
                .with_compression(codec),
        )
        .expect("opening the store")
    }

    fn rclone(&self, args: &[&str]) -> f64 {
        let (t, out) = time(|| {
            Command::new("rclone")
                .args(args)
                .env("RCLONE_CONFIG_CORALBENCH_TYPE", "s3")
                .env("RCLONE_CONFIG_CORALBENCH_PROVIDER", "Other")
                .env("RCLONE_CONFIG_CORALBENCH_ENDPOINT", &self.engine.endpoint)
                .env(
                    "RCLONE_CONFIG_CORALBENCH_ACCESS_KEY_ID",
                    &self.engine.access_key,
                )
                .env(
                    "RCLONE_CONFIG_CORALBENCH_SECRET_ACCESS_KEY",
                    &self.engine.secret_key,
                )
                .env("RCLONE_CONFIG_CORALBENCH_REGION", &self.engine.region)
                .env("RCLONE_CONFIG_CORALBENCH_FORCE_PATH_STYLE", "true")
                .env_remove("AWS_CA_BUNDLE")
                // Transfer every time: rclone skips a file whose size and time match, which
                // made every run after the first a no-op.
                .arg("--ignore-times")
                .arg("-q")
                .output()
                .expect("running rclone (Debian package `rclone`)")
        });
        assert!(
            out.status.success(),
            "rclone {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Ok(model) = std::env::var("CORAL_TEST_MODEL") else {
        eprintln!("s3 bench: CORAL_TEST_MODEL is not set (run `cargo xtask bench`); skipping");
        return;
    };
    let engines = coral_store_api::testenv::s3_engines();
    if engines.is_empty() {
        eprintln!("s3 bench: no S3 engine in the environment (run `cargo xtask bench`); skipping");
        return;
    }
    let runs: usize = std::env::var("CORAL_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    for engine in engines {
        bench_engine(engine, &model, runs);
    }
}

fn bench_engine(engine: coral_store_api::testenv::S3Engine, model: &str, runs: usize) {
    let name = engine.name;
    let bench = Bench {
        engine,
        bucket: format!("coral-bench-{}-{name}", std::process::id()),
        counter: std::cell::Cell::new(0),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = PathBuf::from(model);
    let mut rows: Vec<String> = Vec::new();
    let gzip: Codec = S3Config::new("x").compression;
    let zstd: Codec = "zstd-3".parse().expect("codec");

    for bf16 in [false, true] {
        let label = if bf16 { "bf16" } else { "fp32" };
        let weights = load_model(&model, bf16);
        let nbytes: u64 = weights.iter().map(|(_, w)| w.nbytes() as u64).sum();
        let file = tmp.path().join(format!("model-{label}.safetensors"));
        if bf16 {
            write_safetensors(&weights, &file);
        } else {
            std::fs::copy(&model, &file).expect("copying the model");
        }
        let file_size = std::fs::metadata(&file).expect("model file").len();
        let file_s = file.to_string_lossy().into_owned();
        let remote = format!(
            "coralbench:{}/rclone/model-{label}.safetensors",
            bench.bucket
        );
        let down = tmp.path().join("down.safetensors");
        let down_s = down.to_string_lossy().into_owned();

        // rclone, the baseline, in the same run.
        let _ = bench.store(gzip); // makes sure the bucket exists
        let up: Vec<f64> = (0..runs)
            .map(|_| bench.rclone(&["copyto", &file_s, &remote]))
            .collect();
        let dn: Vec<f64> = (0..runs)
            .map(|_| {
                let _ = std::fs::remove_file(&down);
                bench.rclone(&["copyto", &remote, &down_s])
            })
            .collect();
        assert_eq!(std::fs::read(&down).ok(), std::fs::read(&file).ok());
        let (rc_up, rc_dn) = (median(up), median(dn));
        rows.push(format!(
            "| {label} | rclone copyto (one safetensors file) | {:.2} | {:.0} MB/s | {:.2} | {:.0} MB/s | {:.1} MB | 1.00 / 1.00 |",
            rc_up, mb(file_size) / rc_up, rc_dn, mb(file_size) / rc_dn, mb(file_size)
        ));

        for (codec, cname) in [(gzip, "gzip-1, .npz (default)"), (zstd, "zstd-3 + shuffle")] {
            let mut st = Vec::new();
            let mut ld = Vec::new();
            let mut stored = 0;
            for _ in 0..runs {
                let store = bench.store(codec);
                let (t, keys) = time(|| store.store_batch(&weights).expect("store_batch"));
                st.push(t);
                let keys: Vec<ContentHash> = keys.values().copied().collect();
                let (t, back) = time(|| store.load_batch(&keys).expect("load_batch"));
                ld.push(t);
                assert_eq!(back.len(), {
                    let mut k = keys.clone();
                    k.sort();
                    k.dedup();
                    k.len()
                });
                stored = store.storage_info().expect("info").file_size;
            }
            let (s, l) = (median(st), median(ld));
            rows.push(format!(
                "| {label} | S3Store {cname}: store_batch / load_batch | {s:.2} | {:.0} MB/s | {l:.2} | {:.0} MB/s | {:.1} MB | {:.2} / {:.2} |",
                mb(nbytes) / s, mb(nbytes) / l, mb(stored), s / rc_up, l / rc_dn
            ));
        }

        // The whole model synced to a new prefix, and back into a new local store: what the
        // issue compares with rclone.
        {
            let local = MemoryStore::new();
            local.store_batch(&weights).expect("local");
            let mut up = Vec::new();
            let mut down = Vec::new();
            for _ in 0..runs {
                let remote_store = bench.store(zstd);
                let (t, s) = time(|| remote_store.sync_from_local(&local).expect("sync up"));
                assert_eq!(s.uploaded, weights.len() as u64);
                up.push(t);
                let back = MemoryStore::new();
                let (t, s) = time(|| remote_store.sync_to_local(&back).expect("sync down"));
                assert_eq!(s.downloaded, weights.len() as u64);
                down.push(t);
            }
            let (u, d) = (median(up), median(down));
            rows.push(format!(
                "| {label} | sync_from_local / sync_to_local, the whole model to a new prefix (zstd-3) | {u:.2} | {:.0} MB/s | {d:.2} | {:.0} MB/s | | {:.2} / {:.2} |",
                mb(nbytes) / u, mb(nbytes) / d, u / rc_up, d / rc_dn
            ));
        }

        // Sync in which nothing changed.
        let local = MemoryStore::new();
        local.store_batch(&weights).expect("local");
        let remote_store = bench.store(zstd);
        remote_store.sync_from_local(&local).expect("first sync");
        let mut times = Vec::new();
        let mut moved = (0, 0);
        for _ in 0..runs {
            let (t, s) = time(|| remote_store.sync_from_local(&local).expect("sync"));
            times.push(t);
            moved = (s.uploaded, s.bytes_transferred);
        }
        let t = median(times);
        rows.push(format!(
            "| {label} | sync_from_local, nothing changed ({} tensors) | {t:.3} | {} objects, {} bytes moved | | | | target < 0.2 s: {} |",
            weights.len(), moved.0, moved.1, if t < 0.2 && moved.1 == 0 { "met" } else { "NOT met" }
        ));

        // A fine-tune in which a tenth of the tensors changed.
        let changed: Vec<usize> = (0..weights.len()).filter(|i| i % 10 == 3).collect();
        let tuned: HashMap<usize, WeightTensor> =
            changed.iter().map(|&i| (i, tune(&weights[i].1))).collect();
        for as_delta in [false, true] {
            let remote_store = bench.store(zstd);
            remote_store.sync_from_local(&local).expect("base sync");
            let before = remote_store.storage_info().expect("info").file_size;
            let ft = MemoryStore::new();
            ft.store_batch(&weights).expect("ft base");
            let mut as_deltas = 0;
            for (&i, t) in &tuned {
                let (_, base) = &weights[i];
                let tk = t.compute_hash();
                let delta = if as_delta {
                    let rk = base.compute_hash();
                    encode_best_lossless(t, base, &rk).expect("delta")
                } else {
                    None
                };
                match delta {
                    Some(d) if d.nbytes() < t.nbytes() => {
                        ft.store_delta(&d, &tk).expect("store delta");
                        as_deltas += 1;
                    }
                    _ => {
                        ft.store(t).expect("store tuned");
                    }
                }
            }
            let (t, s) = time(|| remote_store.sync_from_local(&ft).expect("fine-tune sync"));
            let after = remote_store.storage_info().expect("info").file_size;
            let uploaded = after.saturating_sub(before);
            let changed_bytes: u64 = tuned.values().map(|w| w.nbytes() as u64).sum();
            let how = if as_delta {
                format!("{as_deltas} of {} as lossless deltas", tuned.len())
            } else {
                "stored in full".to_owned()
            };
            rows.push(format!(
                "| {label} | sync_from_local, fine-tune: {} of {} tensors changed ({:.1}% of the bytes), {how} | {t:.3} | {} objects; {:.3} MB moved, {:.3} MB uploaded | | | | uploaded = {:.2}% of the file rclone moves (target <= 15%) |",
                tuned.len(), weights.len(), 100.0 * changed_bytes as f64 / nbytes as f64,
                s.uploaded, mb(s.bytes_transferred), mb(uploaded),
                100.0 * uploaded as f64 / file_size as f64
            ));
        }
    }

    let server = if name == "moto" {
        "local moto server".to_owned()
    } else {
        "Garage 2.5, 3 nodes on loopback, replication 3".to_owned()
    };
    println!("### S3Store against rclone, {server} (medians of {runs} runs)\n");
    println!("| model | operation | up / sync s | up rate | down s | down rate | stored | time vs rclone (up / down) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
}

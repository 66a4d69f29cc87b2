//! SIGKILL in the middle of `HDF5Store::compact`: whenever the process dies, the path holds one
//! valid store with every committed weight, delta and manifest, and a half-written
//! `<store>.compact-tmp` is never taken for the store (the next open for writing removes it).
//!
//! The parent builds a store (weights, deltas, manifests, with deletes so there is space to
//! reclaim); a child process (this test binary, re-run with `CORAL_HDF5_COMPACT_CRASH` set)
//! opens it and loops: compact, print `compacted`, store one more weight, print its key. The
//! parent kills it at a random moment, checks the file, and starts the next child on the same
//! file. `CORAL_HDF5_COMPACT_CRASH_RUNS` sets the number of kills (default 20);
//! `CORAL_HDF5_COMPACT_CRASH_SECS` bounds the time (default 60 s).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coral_core::{ContentHash, DType, ModelManifest, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testing::deltas::{lossless_delta, tuned_pair};
use coral_store_api::testing::manifests::sample_manifest;
use coral_store_api::testing::sample_tensor;
use coral_store_api::{DeltaStore, ManifestStore, WeightStore};

fn options() -> HDF5StoreOptions {
    HDF5StoreOptions::new()
        .compression(Compression::Zstd)
        .chunk_bytes(16 << 10)
}

/// The weight the child stores after its `i`-th compaction.
fn extra(i: u64) -> WeightTensor {
    sample_tensor(&format!("extra.{i}"), DType::F32, &[48, 64], 10_000 + i)
}

/// Child side: compacts and stores forever. Run only by `sigkill_during_compact`.
#[test]
#[ignore = "the child process of sigkill_during_compact"]
fn child_compactor() {
    let Ok(path) = std::env::var("CORAL_HDF5_COMPACT_CRASH") else {
        eprintln!("child_compactor runs only as sigkill_during_compact's child");
        return;
    };
    let start: u64 = std::env::var("CORAL_HDF5_COMPACT_CRASH_START")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let store = HDF5Store::open(&path, options()).unwrap();
    let mut out = std::io::stdout();
    writeln!(out, "open").unwrap();
    out.flush().unwrap();
    for i in start.. {
        store.compact().unwrap();
        writeln!(out, "compacted").unwrap();
        out.flush().unwrap();
        let k = store.store(&extra(i)).unwrap();
        writeln!(out, "committed {i} {}", k.to_hex()).unwrap();
        out.flush().unwrap();
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The store the children compact: returns its weights (key: name) and manifests.
fn build(path: &Path) -> (BTreeMap<ContentHash, String>, Vec<ModelManifest>) {
    let store = HDF5Store::open(path, options()).unwrap();
    let batch: Vec<(String, WeightTensor)> = (0..160u64)
        .map(|i| {
            let name = format!("w.{i}");
            let dtype = if i % 3 == 0 { DType::BF16 } else { DType::F32 };
            let rows = 16 + (i as usize * 29) % 112;
            (name.clone(), sample_tensor(&name, dtype, &[rows, 64], i))
        })
        .collect();
    let keys = store.store_batch(&batch).unwrap();
    let mut weights: BTreeMap<ContentHash, String> = BTreeMap::new();
    for (i, (name, _)) in batch.iter().enumerate() {
        if i % 4 == 1 {
            store.delete(&keys[name]).unwrap();
        } else {
            weights.insert(keys[name], name.clone());
        }
    }
    for s in 0..4u64 {
        let (reference, tuned) = tuned_pair(&format!("emb{s}"), s);
        let rk = store.store(&reference).unwrap();
        let dk = tuned.compute_hash();
        store
            .store_delta(&lossless_delta(&tuned, &reference, rk), &dk)
            .unwrap();
        weights.insert(rk, reference.name().to_owned());
        weights.insert(dk, tuned.name().to_owned());
    }
    let mut manifests = Vec::new();
    for (name, n) in [("model-a", 6), ("model-b", 4)] {
        let m = sample_manifest(&store, name, n);
        store.put_manifest(&m).unwrap();
        for t in &m.tensors {
            // model-b's tensors have model-a's data: the first name stored is the weight's.
            weights.entry(t.key).or_insert_with(|| t.name.clone());
        }
        manifests.push(m);
    }
    (weights, manifests)
}

/// Everything committed is in the store at `path`, verified; `maybe` (a weight whose store may
/// have returned just before the kill) may be there too; nothing else.
fn check(
    store: &HDF5Store,
    weights: &BTreeMap<ContentHash, String>,
    maybe: Option<ContentHash>,
    manifests: &[ModelManifest],
) -> Vec<String> {
    let mut failures = Vec::new();
    let keys: Vec<ContentHash> = weights.keys().copied().collect();
    match store.load_batch(&keys) {
        Err(e) => failures.push(format!("load_batch: {e}")),
        Ok(loaded) => {
            for (k, name) in weights {
                match loaded.get(k) {
                    None => failures.push(format!("{name} ({k}) lost")),
                    Some(w) if w.name() != name => {
                        failures.push(format!("{k}: name {} instead of {name}", w.name()))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    match store.list_weights() {
        Err(e) => failures.push(format!("list_weights: {e}")),
        Ok(listed) => {
            for k in &listed {
                if !weights.contains_key(k) && Some(*k) != maybe {
                    failures.push(format!("{k} listed but never stored"));
                }
            }
            if listed.len() < weights.len() {
                failures.push(format!("{} listed of {}", listed.len(), weights.len()));
            }
        }
    }
    for m in manifests {
        match store.get_manifest(&m.name) {
            Ok(Some(got)) if &got == m => {}
            other => failures.push(format!("manifest {}: {other:?}", m.name)),
        }
    }
    failures
}

#[test]
fn sigkill_during_compact() {
    let runs: usize = std::env::var("CORAL_HDF5_COMPACT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let secs: u64 = std::env::var("CORAL_HDF5_COMPACT_CRASH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compact.h5");
    let tmp = dir.path().join("compact.h5.compact-tmp");
    let (mut weights, manifests) = build(&path);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let t0 = Instant::now();
    let (mut done, mut compactions, mut left_tmp) = (0usize, 0usize, 0usize);
    let mut next = 0u64;
    let mut failures: Vec<String> = Vec::new();
    while done < runs && t0.elapsed() < Duration::from_secs(secs) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_compactor",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CORAL_HDF5_COMPACT_CRASH", &path)
            .env("CORAL_HDF5_COMPACT_CRASH_START", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("child did not open the store");
            if line.trim_end().ends_with("open") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.next() % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in rx.try_iter() {
            if line.contains("compacted") {
                compactions += 1;
            }
            let Some(at) = line.find("committed ") else {
                continue;
            };
            let mut parts = line[at..].split_whitespace().skip(1);
            let i: u64 = parts.next().unwrap().parse().unwrap();
            let k = ContentHash::parse(parts.next().unwrap()).unwrap();
            weights.insert(k, extra(i).name().to_owned());
            next = i + 1;
        }
        done += 1;
        // The weight the killed child may have stored without printing it.
        let maybe = extra(next).compute_hash();
        if tmp.exists() {
            left_tmp += 1;
        }
        // Readers open the store at the path (never the tmp) and find everything.
        match HDF5Store::open(&path, options().mode(Mode::Read)) {
            Err(e) => failures.push(format!("kill {done}: the store does not open: {e}")),
            Ok(store) => failures.extend(
                check(&store, &weights, Some(maybe), &manifests)
                    .into_iter()
                    .map(|f| format!("kill {done}, read-only: {f}")),
            ),
        }
        // A writer removes the stale tmp and finds the same.
        match HDF5Store::open(&path, options()) {
            Err(e) => failures.push(format!("kill {done}: the store does not open: {e}")),
            Ok(store) => {
                if tmp.exists() {
                    failures.push(format!("kill {done}: the stale tmp survived open"));
                }
                failures.extend(
                    check(&store, &weights, Some(maybe), &manifests)
                        .into_iter()
                        .map(|f| format!("kill {done}: {f}")),
                );
                // Keep what the child may have stored: a later child stores it again (no-op).
                if store.exists(&maybe).unwrap_or(false) {
                    weights.insert(maybe, extra(next).name().to_owned());
                }
            }
        }
        if !failures.is_empty() {
            break;
        }
    }
    eprintln!(
        "sigkill_during_compact: {done} kills, {compactions} compactions completed, {left_tmp} kills left a .compact-tmp, {} weights checked after the last, {} failures, {:.0} s",
        weights.len(),
        failures.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(done >= 10, "only {done} kills in the time allowed");
    assert!(
        compactions > 0,
        "no compaction completed: the kills came too early"
    );
    assert!(left_tmp > 0, "no kill landed inside a compaction");
}

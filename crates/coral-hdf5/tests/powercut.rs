//! Power cuts, simulated (in the manner of ALICE and CrashMonkey): every change the file driver
//! makes to the disk is recorded while a writer stores batches (each acknowledged by a mark
//! once `store_batch` returned); then, many times, the disk is rebuilt as a power cut could
//! have left it, and the store is opened.
//!
//! A cut falls after a random sync, somewhere before the next one. Of the changes made before
//! it, those a later sync (of the same file, or of the folder for creations and removals)
//! made durable are kept; every other one is kept or lost at random, independently, as a disk
//! with a volatile cache may do. The rebuilt store must open, and every weight of every batch
//! acknowledged before the cut must be listed and load verified.
//!
//! `CORAL_HDF5_POWERCUT_CUTS` sets the number of cuts (default 500).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use coral_core::{ContentHash, DType, WeightTensor};
use coral_hdf5::testing::{self, DiskOp};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
use coral_store_api::testing::sample_tensor;
use coral_store_api::WeightStore;

fn batch(b: u64) -> Vec<(String, WeightTensor)> {
    (0..3u64)
        .map(|i| {
            let name = format!("b{b}.t{i}");
            let dtype = if i == 2 { DType::BF16 } else { DType::F32 };
            let t = sample_tensor(
                &name,
                dtype,
                &[24 + (b * 5 + i) as usize % 40, 64],
                b * 7 + i,
            );
            (name, t)
        })
        .collect()
}

fn options() -> HDF5StoreOptions {
    HDF5StoreOptions::new()
        .compression(Compression::Zstd)
        .chunk_bytes(8 << 10)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The files of one folder, by name: `None` for a file that does not exist.
type Disk = HashMap<String, Option<Vec<u8>>>;

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Which file or folder an operation is about, and which sync makes it durable.
fn covered_by(op: &DiskOp, sync: &DiskOp) -> bool {
    match (op, sync) {
        (DiskOp::Write { path, .. } | DiskOp::SetLen { path, .. }, DiskOp::Sync { path: s }) => {
            name(path) == name(s)
        }
        (DiskOp::Create { .. } | DiskOp::Remove { .. }, DiskOp::SyncDir { .. }) => true,
        _ => false,
    }
}

fn apply(disk: &mut Disk, op: &DiskOp) {
    match op {
        DiskOp::Write { path, off, data } => {
            if let Some(Some(f)) = disk.get_mut(&name(path)) {
                let end = *off as usize + data.len();
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[*off as usize..end].copy_from_slice(data);
            }
        }
        DiskOp::SetLen { path, len } => {
            if let Some(Some(f)) = disk.get_mut(&name(path)) {
                f.resize(*len as usize, 0);
            }
        }
        DiskOp::Create { path } => {
            disk.insert(name(path), Some(Vec::new()));
        }
        DiskOp::Remove { path } => {
            disk.insert(name(path), None);
        }
        DiskOp::Sync { .. } | DiskOp::SyncDir { .. } | DiskOp::Mark(_) => {}
    }
}

#[test]
fn acknowledged_batches_survive_simulated_power_cuts() {
    let cuts: usize = std::env::var("CORAL_HDF5_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.h5");
    // A store with one batch, closed: the disk before the recording.
    let mut acked: Vec<(usize, Vec<(ContentHash, String)>)> = Vec::new();
    let first: Vec<(ContentHash, String)> = {
        let store = HDF5Store::open(&path, options()).unwrap();
        let keys = store.store_batch(&batch(0)).unwrap();
        keys.into_iter().map(|(n, k)| (k, n)).collect()
    };
    let mut before: Disk = HashMap::new();
    before.insert(name(&path), Some(std::fs::read(&path).unwrap()));

    // The recorded writer: batches, each acknowledged, then a delete, then more batches.
    testing::start();
    let mut log_marks: BTreeMap<String, Vec<(ContentHash, String)>> = BTreeMap::new();
    {
        let store = HDF5Store::open(&path, options()).unwrap();
        for b in 1..=6u64 {
            let keys = store.store_batch(&batch(b)).unwrap();
            let tag = format!("batch {b}");
            log_marks.insert(tag.clone(), keys.into_iter().map(|(n, k)| (k, n)).collect());
            testing::mark(tag);
            if b == 3 {
                // A delete commits too (and frees space that later batches reuse).
                let (k, _) = log_marks["batch 2"][0].clone();
                assert!(store.delete(&k).unwrap());
                log_marks.get_mut("batch 2").unwrap().remove(0);
                testing::mark("deleted");
            }
        }
    }
    let log = testing::stop();
    let syncs: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, DiskOp::Sync { .. } | DiskOp::SyncDir { .. }))
        .map(|(i, _)| i)
        .collect();
    assert!(syncs.len() > 10, "only {} syncs recorded", syncs.len());
    eprintln!(
        "recorded {} disk operations, {} syncs",
        log.len(),
        syncs.len()
    );

    let mut rng = Rng(0x5eed_c0de_1234_5678);
    let mut failures: Vec<String> = Vec::new();
    let mut checked = 0usize;
    let sim = tempfile::tempdir().unwrap();
    for cut in 0..cuts {
        // The cut: after sync `s`, before the next sync is done.
        let si = rng.below(syncs.len());
        let start = syncs[si] + 1;
        let end = syncs.get(si + 1).copied().unwrap_or(log.len());
        let at = start + rng.below(end - start + 1);
        // What survives.
        let mut disk = before.clone();
        for (i, op) in log[..at].iter().enumerate() {
            let durable = log[i + 1..at].iter().any(|s| covered_by(op, s));
            if durable || rng.next() % 2 == 0 {
                apply(&mut disk, op);
            }
        }
        // Acknowledged before the cut: the first batch, and every batch marked before it.
        acked.clear();
        acked.push((0, first.clone()));
        let mut deleted = false;
        for (i, op) in log[..at].iter().enumerate() {
            match op {
                DiskOp::Mark(m) if m == "deleted" => deleted = true,
                DiskOp::Mark(m) => acked.push((i, log_marks[m].clone())),
                _ => {}
            }
        }
        let p = sim.path().join(format!("cut{cut}"));
        std::fs::create_dir_all(&p).unwrap();
        for (n, content) in &disk {
            if let Some(c) = content {
                std::fs::write(p.join(n), c).unwrap();
            }
        }
        let store_path: PathBuf = p.join(name(&path));
        let store = match HDF5Store::open(&store_path, options()) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("cut {cut} (op {at}): the store does not open: {e}"));
                continue;
            }
        };
        let listed = store.list_weights().unwrap_or_default();
        for (_, batch_keys) in &acked {
            for (k, n) in batch_keys {
                if !listed.contains(k) {
                    failures.push(format!("cut {cut} (op {at}): {n} ({k}) lost"));
                    continue;
                }
                match store.load(k) {
                    Ok(Some(w)) if w.name() == n => checked += 1,
                    Ok(other) => failures.push(format!(
                        "cut {cut} (op {at}): {n} loaded as {:?}",
                        other.map(|w| w.name().to_owned())
                    )),
                    Err(e) => failures.push(format!("cut {cut} (op {at}): {n}: {e}")),
                }
            }
        }
        let _ = deleted;
        drop(store);
        std::fs::remove_dir_all(&p).unwrap();
        if failures.len() > 20 {
            break;
        }
    }
    eprintln!(
        "{cuts} simulated power cuts over {} syncs: {checked} acknowledged weights loaded verified, {} failures",
        syncs.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

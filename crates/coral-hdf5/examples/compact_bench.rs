//! Times `HDF5Store::compact` against `cp` of the same file.
//!
//! For each size (MB of live float32 weights, normally distributed with a fixed seed, zstd, the
//! CLI's settings), builds a store holding those weights plus half as many again that are then
//! deleted (as `coral gc` leaves a store), and times, median of 3 in the same run: `cp` of the
//! store file, `cp` followed by an fsync of the copy, and `compact` of a fresh copy of the store
//! (compact syncs the new file and the directory). Page cache warm for all three; every dirty
//! page is written back (`sync`) before each timed step.
//!
//! ```text
//! cargo run --release -p coral-hdf5 --example compact_bench -- [DIR] [MB...]
//! ```
//! (default: a temporary directory, sizes 100 200 400).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use coral_core::WeightTensor;
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
use coral_store_api::WeightStore;

type Error = Box<dyn std::error::Error>;

/// Normally distributed float32 values (sd 0.02), from `seed`.
fn normal(name: &str, shape: &[usize], seed: u64) -> Result<WeightTensor, Error> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        let (u, v) = (next(), next());
        let r = (-2.0 * u.ln()).sqrt() * 0.02;
        let t = 2.0 * std::f64::consts::PI * v;
        values.push((r * t.cos()) as f32);
        if values.len() < n {
            values.push((r * t.sin()) as f32);
        }
    }
    Ok(WeightTensor::from_vec(name, shape.to_vec(), values)?)
}

/// Shapes of a transformer layer (hidden 768): about 28 MB of float32.
const LAYER: [&[usize]; 8] = [
    &[768, 768],
    &[768, 768],
    &[768, 768],
    &[768, 768],
    &[3072, 768],
    &[768, 3072],
    &[768],
    &[3072],
];

fn options() -> HDF5StoreOptions {
    HDF5StoreOptions::new().compression(Compression::Zstd)
}

/// Builds the store: `mb` MB of live weights, and half as much again, stored and deleted.
fn build(path: &Path, mb: usize) -> Result<(), Error> {
    let store = HDF5Store::open(path, options())?;
    let (mut live, mut seed) = (0usize, 0u64);
    let mut garbage = Vec::new();
    let mut layer = 0;
    while live < mb << 20 {
        let mut batch = Vec::new();
        for (i, shape) in LAYER.iter().enumerate() {
            seed += 1;
            let w = normal(&format!("layer.{layer}.{i}"), shape, seed)?;
            live += w.nbytes();
            batch.push((w.name().to_owned(), w));
        }
        // Every second layer, a fine-tune's layer that is later collected.
        if layer % 2 == 0 {
            for (i, shape) in LAYER.iter().enumerate() {
                seed += 1;
                let w = normal(&format!("gone.{layer}.{i}"), shape, seed)?;
                batch.push((w.name().to_owned(), w));
            }
        }
        let keys = store.store_batch(&batch)?;
        garbage.extend(
            keys.iter()
                .filter(|(n, _)| n.starts_with("gone."))
                .map(|(_, k)| *k),
        );
        layer += 1;
    }
    for k in &garbage {
        store.delete(k)?;
    }
    Ok(())
}

/// Writes every dirty page back (`sync`), so that no timed fsync pays for earlier writes.
fn settle() -> Result<(), Error> {
    if !Command::new("sync").status()?.success() {
        return Err("sync failed".into());
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let tmp = tempfile::tempdir()?;
    let dir = match args.next() {
        Some(d) => std::path::PathBuf::from(d),
        None => tmp.path().to_path_buf(),
    };
    let mut sizes: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        sizes = vec![100, 200, 400];
    }
    std::fs::create_dir_all(&dir)?;
    println!("| live weights | file before | file after | cp | cp + fsync | compact | compact vs cp of the file before |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for mb in sizes {
        let orig = dir.join(format!("bench-{mb}.h5"));
        let work = dir.join(format!("bench-{mb}-work.h5"));
        let copy = dir.join(format!("bench-{mb}-cp.h5"));
        let _ = std::fs::remove_file(&orig);
        build(&orig, mb)?;
        let before = std::fs::metadata(&orig)?.len();
        let (mut cp, mut cp_sync, mut compact) = (Vec::new(), Vec::new(), Vec::new());
        let mut after = 0;
        for _ in 0..3 {
            let _ = std::fs::remove_file(&copy);
            settle()?;
            let t = Instant::now();
            let status = Command::new("cp").arg(&orig).arg(&copy).status()?;
            cp.push(t.elapsed());
            if !status.success() {
                return Err("cp failed".into());
            }
            let _ = std::fs::remove_file(&copy);
            settle()?;
            let t = Instant::now();
            let status = Command::new("cp").arg(&orig).arg(&copy).status()?;
            std::fs::File::open(&copy)?.sync_all()?;
            cp_sync.push(t.elapsed());
            if !status.success() {
                return Err("cp failed".into());
            }
            std::fs::copy(&orig, &work)?;
            let store = HDF5Store::open(&work, options())?;
            settle()?;
            let t = Instant::now();
            let r = store.compact()?;
            compact.push(t.elapsed());
            after = r.bytes_after;
            drop(store);
        }
        let (cp, cp_sync, compact) = (median(cp), median(cp_sync), median(compact));
        println!(
            "| {mb} MB | {:.1} MB | {:.1} MB | {:.3} s ({:.0} MB/s) | {:.3} s ({:.0} MB/s) | {:.3} s ({:.0} MB/s written, {:.0} MB/s of the file before) | {:.2}× cp's time |",
            before as f64 / 1e6,
            after as f64 / 1e6,
            cp.as_secs_f64(),
            mbps(before, cp),
            cp_sync.as_secs_f64(),
            mbps(before, cp_sync),
            compact.as_secs_f64(),
            mbps(after, compact),
            mbps(before, compact),
            compact.as_secs_f64() / cp.as_secs_f64(),
        );
        for p in [&orig, &work, &copy] {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

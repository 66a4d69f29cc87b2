//! Readers while a writer writes, from other processes: a reader opens, lists and loads the last
//! committed state whatever the writer is doing; a second writer waits, and is told who holds
//! the store; a commit waits for the readers open at that moment, and says who they are when
//! they stay too long.
//!
//! The writer is this test binary run again with `CORAL_LOCK_STORE` set: the `#[ignore]`d
//! `child_writer` below, which only does something when run that way.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coral_core::{ContentHash, DType, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testing::sample_tensor;
use coral_store_api::{StoreError, WeightStore};

fn batch(b: u64) -> Vec<(String, WeightTensor)> {
    (0..4u64)
        .map(|i| {
            let name = format!("b{b}.t{i}");
            let t = sample_tensor(&name, DType::F32, &[64 + i as usize, 128], b * 10 + i);
            (name, t)
        })
        .collect()
}

fn options() -> HDF5StoreOptions {
    HDF5StoreOptions::new()
        .compression(Compression::Zstd)
        .chunk_bytes(16 << 10)
}

/// The writer: opens the store, says "open", then stores batches until `CORAL_LOCK_SECS` have
/// passed, saying "committed B" after each, or "failed: ERROR" and stops.
#[test]
#[ignore = "run by the tests below in a child process"]
fn child_writer() {
    let Ok(path) = std::env::var("CORAL_LOCK_STORE") else {
        return;
    };
    let secs: f64 = std::env::var("CORAL_LOCK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let wait_ms: u64 = std::env::var("CORAL_LOCK_WAIT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut out = std::io::stdout();
    let store = match HDF5Store::open(&path, options().wait(Duration::from_millis(wait_ms))) {
        Ok(s) => s,
        Err(e) => {
            // Opening for writing commits too, and so waits for readers.
            writeln!(out, "open failed: {e}").unwrap();
            return;
        }
    };
    writeln!(out, "open").unwrap();
    out.flush().unwrap();
    let t0 = Instant::now();
    let mut b = 1000;
    while t0.elapsed().as_secs_f64() < secs {
        match store.store_batch(&batch(b)) {
            Ok(_) => writeln!(out, "committed {b}").unwrap(),
            Err(e) => {
                writeln!(out, "failed: {e}").unwrap();
                out.flush().unwrap();
                return;
            }
        }
        out.flush().unwrap();
        b += 1;
    }
}

/// Starts the writer on `path` and waits until it has the store open; its lines come on the
/// channel.
fn start_writer(path: &Path, secs: f64, wait_ms: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CORAL_LOCK_STORE", path)
        .env("CORAL_LOCK_SECS", secs.to_string())
        .env("CORAL_LOCK_WAIT_MS", wait_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the writer did not open the store");
        };
        if line.trim_end().ends_with("open") || line.contains("open failed:") {
            let (tx2, rx2) = mpsc::channel();
            let _ = tx2.send(line);
            std::thread::spawn(move || {
                for l in rx.iter() {
                    if tx2.send(l).is_err() {
                        break;
                    }
                }
            });
            return (child, rx2);
        }
    }
}

/// A store holding batch 0, closed.
fn base_store(path: &Path) -> Vec<ContentHash> {
    let store = HDF5Store::open(path, options()).unwrap();
    let keys = store.store_batch(&batch(0)).unwrap();
    keys.into_values().collect()
}

#[test]
fn readers_read_the_committed_state_while_a_writer_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.h5");
    let base = base_store(&path);
    let (mut child, rx) = start_writer(&path, 4.0, 10_000);
    assert!(rx.recv().unwrap().ends_with("open"));

    // A second writer waits, then is told who holds the store.
    let t = Instant::now();
    match HDF5Store::open(&path, options().wait(Duration::from_millis(300))) {
        Err(StoreError::Locked { reason, .. }) => {
            assert!(
                reason.contains(&format!("writer (pid {})", child.id())),
                "{reason}"
            );
        }
        Err(e) => panic!("second writer: {e}"),
        Ok(_) => panic!("a second writer opened the store"),
    }
    assert!(t.elapsed() >= Duration::from_millis(300));

    // Readers open, list and load, again and again, while the writer commits.
    let mut reads = 0;
    let mut seen_max = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let r = HDF5Store::open(&path, options().mode(Mode::Read))
            .unwrap_or_else(|e| panic!("reader {reads}: {e}"));
        let listed = r.list_weights().unwrap();
        for k in &base {
            assert!(listed.contains(k), "reader {reads}: {k} not listed");
        }
        let got = r.load_batch(&listed).unwrap();
        assert_eq!(got.len(), listed.len(), "reader {reads}");
        seen_max = seen_max.max(listed.len());
        reads += 1;
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(
        !lines.iter().any(|l| l.contains("failed:")),
        "the writer failed: {lines:?}"
    );
    let commits = lines.iter().filter(|l| l.contains("committed ")).count();
    eprintln!("{reads} reads while the writer made {commits} commits");
    assert!(reads >= 5, "only {reads} reads");
    assert!(commits >= 2, "only {commits} commits");
    assert!(
        seen_max > base.len(),
        "the readers never saw a commit of the writer"
    );
}

#[test]
fn a_commit_waits_for_readers_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.h5");
    base_store(&path);
    // A reader holds the store open longer than the writer waits to commit.
    let reader = HDF5Store::open(&path, options().mode(Mode::Read)).unwrap();
    let (mut child, rx) = start_writer(&path, 2.0, 300);
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        line.contains("failed:") && line.contains(&format!("reader (pid {})", std::process::id())),
        "{line}"
    );
    child.wait().unwrap();
    drop(reader);
    // Nothing of the failed commit is visible, and the store is writable again.
    let store = HDF5Store::open(&path, options()).unwrap();
    assert_eq!(store.list_weights().unwrap().len(), 4);
    store.store_batch(&batch(7)).unwrap();
    assert_eq!(store.list_weights().unwrap().len(), 8);
}

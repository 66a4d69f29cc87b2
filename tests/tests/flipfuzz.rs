//! "No byte can crash Coral": single bits flipped anywhere in a store file (data chunks, object
//! headers, B-tree nodes, local and global heaps, the superblock, and the length fields inside
//! them), then `coral verify`, `coral export`, `coral ls` and `coral repair` on the damaged copy,
//! and a writer (`coral rm`) on a writable copy. None may die by a signal, hang, panic, leave a
//! temporary file behind, or export bytes other than the model's; a store that `repair` wrote
//! must verify.
//!
//! Each case flips one bit of a fresh copy: half uniformly over the file, a quarter uniformly
//! over everything outside the datasets' raw data (HDF5 metadata), a quarter in the headers and
//! length fields of the structures found in the file (see [`fields`]).
//!
//! `CORAL_FLIP_CASES` (default 200) sets the number of flips; the seed is random and printed,
//! `CORAL_FLIP_SEED` replays it and `CORAL_FLIP_CASE=I` runs only its case I. The store is
//! rebuilt on every run and its layout may differ by a few bytes (the writer's parallel
//! pipeline), so a failed case keeps the pristine store and its damaged copy, and
//! `CORAL_FLIP_STORE=PATH` runs the cases on that pristine store, byte for byte. The long run:
//! `CORAL_FLIP_CASES=2000 cargo test -p coral-tests --test flipfuzz -- --nocapture`.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coral_core::ModelName;
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_models::{self as ops, AddOptions, SourceFile};
use coral_tests::{coral_bin, run_ok, stdout_json};
use sha2::Digest;

/// A command that runs longer than this is a hang.
const TIMEOUT: Duration = Duration::from_secs(20);

/// xorshift64*: small, seedable, good enough to spread positions.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A safetensors file: `n` float32 tensors of smooth values (phase `salt`; a fifth of the
/// values of every third tensor nudged when `tweak` is set, for a fine-tune), a bf16 tensor,
/// an int64 one.
fn model(n: usize, tweak: bool, salt: usize) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "note": "flip fuzz"}),
    );
    let mut data = Vec::new();
    for i in 0..n {
        let begin = data.len();
        for j in 0..48 * 16 {
            let mut v = ((i * 7919 + j + salt) as f32 * 0.001).sin() * 0.05;
            if tweak && i % 3 == 0 && j % 5 == 0 {
                v += 1e-4;
            }
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            format!("layer.{i:02}.weight"),
            serde_json::json!({"dtype": "F32", "shape": [48, 16], "data_offsets": [begin, data.len()]}),
        );
    }
    let begin = data.len();
    data.extend((0..256u16).flat_map(|i| (0x3c00u16 ^ (i * 37)).to_le_bytes()));
    header.insert(
        "embed.bf16".into(),
        serde_json::json!({"dtype": "BF16", "shape": [16, 16], "data_offsets": [begin, data.len()]}),
    );
    let begin = data.len();
    data.extend((0..7i64).flat_map(|i| i.to_le_bytes()));
    header.insert(
        "position_ids".into(),
        serde_json::json!({"dtype": "I64", "shape": [7], "data_offsets": [begin, data.len()]}),
    );
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    out
}

/// The undamaged store and what the cases need to know about it.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Vec<u8>,
    /// Model name and its original file bytes.
    models: Vec<(String, Vec<u8>)>,
    /// Model name and the keys of its tensors.
    keys: BTreeMap<String, Vec<String>>,
    /// Byte ranges outside every dataset's raw data (HDF5 metadata).
    metadata: Vec<(u64, u64)>,
    /// Bytes of structure headers and their length and address fields (see [`fields`]).
    fields: Vec<u64>,
}

fn coral(store: &Path) -> Command {
    let mut c = Command::new(coral_bin());
    c.env_remove("CORAL_STORE").arg("--store").arg(store);
    c
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.h5");
    let mut models = Vec::new();
    for (name, bytes) in [
        ("base", model(9, false, 0)),
        ("ft", model(9, true, 0)),
        ("other", model(4, false, 500)),
    ] {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        models.push((name.to_owned(), bytes));
    }
    let file = |n: &str| dir.path().join(format!("{n}.safetensors"));
    if let Some(kept) = std::env::var_os("CORAL_FLIP_STORE") {
        // A pristine store a failed run kept: its exact bytes, so the seed hits the same bytes.
        std::fs::copy(&kept, &store).unwrap();
    } else {
        build_store(&store, &file);
    }
    let mut keys = BTreeMap::new();
    for (name, _) in &models {
        let m = stdout_json(&run_ok(coral(&store).args(["--json", "show", name])));
        let k: Vec<String> = m["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["key"].as_str().unwrap().to_owned())
            .collect();
        keys.insert(name.clone(), k);
    }
    let extents = HDF5Store::open(&store, HDF5StoreOptions::new().mode(Mode::Read))
        .unwrap()
        .raw_data_extents()
        .unwrap();
    let bytes = std::fs::read(&store).unwrap();
    let len = bytes.len() as u64;
    let mut metadata = Vec::new();
    let mut at = 0u64;
    for &(o, n) in &extents {
        if o > at {
            metadata.push((at, o - at));
        }
        at = at.max(o + n);
    }
    if at < len {
        metadata.push((at, len - at));
    }
    let fields = fields(&bytes);
    let data: u64 = extents.iter().map(|e| e.1).sum();
    eprintln!(
        "flipfuzz: store {len} bytes (sha256 {}): {} raw data extents ({data} bytes), {} metadata ranges, {} header/length-field bytes",
        hex::encode(&sha2::Sha256::digest(&bytes)[..8]),
        extents.len(),
        metadata.len(),
        fields.len()
    );
    assert!(!extents.is_empty() && !metadata.is_empty() && !fields.is_empty());
    Fixture {
        _dir: dir,
        store: bytes,
        models,
        keys,
        metadata,
        fields,
    }
}

/// Adds the three models to a new store at `store`: `base`, `ft` delta-coded against it, and
/// `other` with gzip (the coral command writes zstd) through the same add.
fn build_store(store: &Path, file: &dyn Fn(&str) -> PathBuf) {
    let add = |args: &[&str]| stdout_json(&run_ok(coral(store).arg("--json").args(args)));
    add(&["add", file("base").to_str().unwrap(), "--name", "base"]);
    let ft = add(&[
        "add",
        file("ft").to_str().unwrap(),
        "--name",
        "ft",
        "--reference",
        "base",
    ]);
    assert!(ft["delta_coded"].as_u64().unwrap() > 0, "{ft}");
    // The third model's weights with gzip (the coral command writes zstd), through the same add.
    {
        let s = HDF5Store::open(
            store,
            HDF5StoreOptions::new()
                .compression(Compression::Gzip)
                .mode(Mode::Append),
        )
        .unwrap();
        let src = SourceFile::open(&file("other")).unwrap();
        let opts = AddOptions {
            name: ModelName::new("other").unwrap(),
            reference: coral_models::Reference::None,
            group_bytes: 1 << 20,
            cancel: None,
            wait: std::time::Duration::from_secs(10),
        };
        let r = ops::add(&s, &src, &opts, &|_| ()).unwrap();
        assert!(r.new > 0, "{r:?}");
    }
}

/// The bytes of HDF5 structures' headers, where their sizes, lengths, counts and addresses are:
/// the superblock; the first 40 bytes of every v1 B-tree node (`TREE`), local heap (`HEAP`),
/// symbol-table node (`SNOD`) and global heap collection (`GCOL`); and every global heap
/// object's 16-byte header (index, reference count, length), walked as HDF5 does.
fn fields(file: &[u8]) -> Vec<u64> {
    let mut out: Vec<u64> = (0..96.min(file.len() as u64)).collect();
    for sig in [b"TREE", b"HEAP", b"SNOD", b"GCOL"] {
        let mut i = 0;
        while let Some(p) = file[i..].windows(4).position(|w| w == sig) {
            let at = i + p;
            out.extend((at as u64..(at as u64 + 40)).filter(|&b| b < file.len() as u64));
            if sig == b"GCOL" && at + 16 <= file.len() {
                let size = u64::from_le_bytes(file[at + 8..at + 16].try_into().unwrap()) as usize;
                let end = (at + size).min(file.len());
                let mut obj = at + 16;
                while obj + 16 <= end {
                    out.extend(obj as u64..obj as u64 + 16);
                    let idx = u16::from_le_bytes([file[obj], file[obj + 1]]);
                    let len = u64::from_le_bytes(file[obj + 8..obj + 16].try_into().unwrap());
                    if idx == 0 || len > (end - obj) as u64 {
                        break;
                    }
                    obj += 16 + (len as usize).div_ceil(8) * 8;
                }
            }
            i = at + 4;
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// How one command ended.
#[derive(Debug)]
enum End {
    Exit(i32),
    Signal(i32),
    Hang,
}

struct Ran {
    end: End,
    stderr: String,
}

fn run(mut c: Command, dir: &Path, tag: &str) -> Ran {
    let out = dir.join(format!("{tag}.out"));
    let err = dir.join(format!("{tag}.err"));
    let mut child = c
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        // Its own process group, so a hang is killed with whatever it started.
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let end = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break match (s.code(), s.signal()) {
                (Some(c), _) => End::Exit(c),
                (None, Some(sig)) => End::Signal(sig),
                (None, None) => End::Exit(-1),
            };
        }
        if start.elapsed() > TIMEOUT {
            // SAFETY: killing the process group the child leads.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
            break End::Hang;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    Ran { end, stderr }
}

#[derive(Debug, Default)]
struct Counts {
    cases: usize,
    clean: usize,
    detected: usize,
    /// Commands that the guard's child process reported as a libhdf5 crash.
    contained_crash: usize,
    crash: usize,
    hang: usize,
    panic: usize,
    wrong_bytes: usize,
    leftover: usize,
    /// Export failed though verify said the store is fine.
    verify_missed: usize,
    /// A model whose weight or delta failed verification, itself not reported.
    model_missed: usize,
    /// Verify found damage and reported it item by item (its JSON report lists failures).
    verify_per_item: usize,
    /// Verify failed as a whole (the store did not open, or could not be listed).
    verify_whole: usize,
    /// Export failed.
    export_failed: usize,
    /// Ls failed.
    ls_failed: usize,
    /// Repair exited 0 but the store it wrote does not verify.
    repair_bad: usize,
    /// Repair failed (the store did not open, or a write failed).
    repair_failed: usize,
    /// Repair lost something (its report lists losses).
    repair_lost: usize,
    /// A writer (`rm`) on the damaged store failed.
    rm_failed: usize,
    by_region: BTreeMap<&'static str, (usize, usize)>,
}

fn flip_case(fx: &Fixture, seed: u64, case: usize, work: &Path, counts: &Mutex<Counts>) {
    let mut rng = Rng::new(seed ^ (case as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
    let len = fx.store.len() as u64;
    let (region, pos) = match case % 4 {
        0 | 1 => ("uniform", rng.below(len)),
        2 => {
            let total: u64 = fx.metadata.iter().map(|m| m.1).sum();
            let mut k = rng.below(total);
            let mut pos = 0;
            for &(o, n) in &fx.metadata {
                if k < n {
                    pos = o + k;
                    break;
                }
                k -= n;
            }
            ("metadata", pos)
        }
        _ => (
            "fields",
            fx.fields[rng.below(fx.fields.len() as u64) as usize],
        ),
    };
    let bit = rng.below(8) as u8;
    let dir = work.join(format!("case-{case}"));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("store.h5");
    let mut bytes = fx.store.clone();
    bytes[pos as usize] ^= 1 << bit;
    std::fs::write(&copy, &bytes).unwrap();
    let mut perm = std::fs::metadata(&copy).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&copy, perm).unwrap();
    let (model, original) = &fx.models[case % fx.models.len()];
    let out = dir.join("out.safetensors");

    let verify = run(
        {
            let mut c = coral(&copy);
            c.args(["--json", "verify"]);
            c
        },
        &dir,
        "verify",
    );
    let export = run(
        {
            let mut c = coral(&copy);
            c.arg("export").arg(model).arg(&out);
            c
        },
        &dir,
        "export",
    );
    let ls = run(
        {
            let mut c = coral(&copy);
            c.arg("ls");
            c
        },
        &dir,
        "ls",
    );
    let repaired = dir.join("repaired.h5");
    let repair = run(
        {
            let mut c = coral(&copy);
            c.args(["--json", "repair"]).arg(&repaired);
            c
        },
        &dir,
        "repair",
    );
    // What repair wrote verifies, whatever it found.
    let repaired_verify = matches!(repair.end, End::Exit(0)).then(|| {
        run(
            {
                let mut c = coral(&repaired);
                c.arg("verify");
                c
            },
            &dir,
            "verify-repaired",
        )
    });
    // A writer on the damaged store (a writable copy): libhdf5 reads what it opens too.
    let writable = dir.join("writable.h5");
    std::fs::write(&writable, &bytes).unwrap();
    let rm = run(
        {
            let mut c = coral(&writable);
            c.arg("rm").arg(model);
            c
        },
        &dir,
        "rm",
    );
    let mut bad: Vec<String> = Vec::new();
    let mut c = counts.lock().unwrap();
    c.cases += 1;
    let mut failed = false;
    let mut contained = false;
    if let Some(v) = &repaired_verify {
        if !matches!(v.end, End::Exit(0)) {
            c.repair_bad += 1;
            bad.push(format!(
                "repair exited 0 but its store does not verify: {}",
                v.stderr.trim()
            ));
        }
    }
    for (name, r) in [
        ("verify", &verify),
        ("export", &export),
        ("ls", &ls),
        ("repair", &repair),
        ("rm", &rm),
    ] {
        match r.end {
            End::Exit(0) => {}
            // Detection is counted for the reading commands only.
            End::Exit(_) => failed |= !matches!(name, "repair" | "rm"),
            End::Signal(s) => {
                c.crash += 1;
                bad.push(format!("{name} died by signal {s}"));
            }
            End::Hang => {
                c.hang += 1;
                bad.push(format!("{name} hung (killed after {TIMEOUT:?})"));
            }
        }
        if r.stderr.contains("internal error") || r.stderr.contains("panicked") {
            c.panic += 1;
            bad.push(format!("{name} panicked: {}", r.stderr.trim()));
        }
        if r.stderr.contains("crashed libhdf5") {
            c.contained_crash += 1;
            contained = true;
            eprintln!(
                "flipfuzz: case {case} (byte {pos} bit {bit}, {region}): {name}: {}",
                r.stderr.trim()
            );
        }
    }
    if matches!(export.end, End::Exit(0)) {
        let got = std::fs::read(&out).unwrap_or_default();
        if &got != original {
            c.wrong_bytes += 1;
            bad.push(format!(
                "export of {model} exited 0 with other bytes ({} vs {})",
                got.len(),
                original.len()
            ));
        }
    } else if matches!(verify.end, End::Exit(0)) {
        // Counted, not a failure: libhdf5 opens some damaged object headers or not depending
        // on what its metadata cache already holds, so one command may read what another
        // cannot (docs/reliability.md). The export failed, it wrote nothing wrong.
        c.verify_missed += 1;
        eprintln!(
            "flipfuzz: case {case} (byte {pos} bit {bit}, {region}): verify passed but export of {model} failed: {}",
            export.stderr.lines().last().unwrap_or("").trim()
        );
    }
    // Every model that needs a weight or delta that failed is reported too (when verify
    // got as far as checking every model).
    let report: serde_json::Value = std::fs::read(dir.join("verify.out"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    match (&verify.end, report["failures"].as_array()) {
        (End::Exit(0), _) => {}
        (_, Some(f)) if !f.is_empty() => c.verify_per_item += 1,
        _ => c.verify_whole += 1,
    }
    c.export_failed += usize::from(!matches!(export.end, End::Exit(0)));
    c.ls_failed += usize::from(!matches!(ls.end, End::Exit(0)));
    c.repair_failed += usize::from(!matches!(repair.end, End::Exit(0)));
    c.rm_failed += usize::from(!matches!(rm.end, End::Exit(0)));
    let repair_report: serde_json::Value = std::fs::read(dir.join("repair.out"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    c.repair_lost += usize::from(
        repair_report["lost"]
            .as_array()
            .is_some_and(|l| !l.is_empty()),
    );
    if report["manifests"].as_u64() == Some(fx.keys.len() as u64) {
        let failures = report["failures"].as_array().cloned().unwrap_or_default();
        let failed = |kind: &[&str], id: &str| {
            failures
                .iter()
                .any(|f| kind.contains(&f["kind"].as_str().unwrap_or("")) && f["id"] == id)
        };
        for (m, keys) in &fx.keys {
            if keys.iter().any(|k| failed(&["weight", "delta"], k)) && !failed(&["manifest"], m) {
                c.model_missed += 1;
                bad.push(format!("a weight of {m} failed verification, {m} did not"));
            }
        }
    }
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".coral-tmp-"))
        .collect();
    if !leftovers.is_empty() {
        c.leftover += 1;
        bad.push(format!("temporary files left: {leftovers:?}"));
    }
    if failed {
        c.detected += 1;
    } else {
        c.clean += 1;
    }
    let r = c.by_region.entry(region).or_default();
    r.0 += 1;
    r.1 += usize::from(failed);
    drop(c);
    if bad.is_empty() && !contained {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        // Kept for a look (a contained crash is no failure, but worth one).
        std::fs::write(dir.join("pristine.h5"), &fx.store).unwrap();
    }
    if !bad.is_empty() {
        eprintln!(
            "flipfuzz: FAILED case {case} of seed {seed} (byte {pos} bit {bit}, {region}, model {model}): {}\n  replay: CORAL_FLIP_SEED={seed} CORAL_FLIP_CASE={case} CORAL_FLIP_STORE={}/pristine.h5 (the damaged copy is beside it)\n  verify: {}\n  export: {}\n  ls: {}",
            bad.join("; "),
            dir.display(),
            verify.stderr.trim(),
            export.stderr.trim(),
            ls.stderr.trim()
        );
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn single_bit_flips_never_crash_hang_or_export_wrong_bytes() {
    let fx = fixture();
    // The undamaged store verifies and exports every model byte for byte: the cases measure
    // what the flips do, not a broken fixture.
    let work = tempfile::tempdir().unwrap();
    let pristine = work.path().join("pristine.h5");
    std::fs::write(&pristine, &fx.store).unwrap();
    run_ok(coral(&pristine).arg("verify"));
    for (name, bytes) in &fx.models {
        let out = work.path().join(format!("{name}.safetensors"));
        run_ok(coral(&pristine).arg("export").arg(name).arg(&out));
        assert_eq!(&std::fs::read(&out).unwrap(), bytes, "{name}");
    }

    let seed = env_u64("CORAL_FLIP_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let cases = env_u64("CORAL_FLIP_CASES").unwrap_or(200) as usize;
    let only = env_u64("CORAL_FLIP_CASE").map(|c| c as usize);
    eprintln!("flipfuzz: seed {seed} (replay with CORAL_FLIP_SEED={seed}), {cases} cases");
    let counts = Mutex::new(Counts::default());
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let todo: Vec<usize> = match only {
        Some(c) => vec![c],
        None => (0..cases).collect(),
    };
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&case) = todo.get(i) else { break };
                flip_case(&fx, seed, case, work.path(), &counts);
            });
        }
    });
    let c = counts.into_inner().unwrap();
    eprintln!(
        "flipfuzz: seed {seed}: {} cases in {:.0?}: {} clean, {} detected damage; {} crashes, {} hangs, {} panics, {} wrong exports, {} leftover temporary files; {} libhdf5 crashes contained by the child process; {} exports failed where verify passed; {} models not failed with their weights; verify reported damage item by item in {} cases and failed as a whole in {}; export failed in {}, ls in {}; repair failed in {}, lost something in {}, wrote a store that does not verify in {}; a writer (rm) failed in {}; by region (cases, detected): {:?}",
        c.cases,
        started.elapsed(),
        c.clean,
        c.detected,
        c.crash,
        c.hang,
        c.panic,
        c.wrong_bytes,
        c.leftover,
        c.contained_crash,
        c.verify_missed,
        c.model_missed,
        c.verify_per_item,
        c.verify_whole,
        c.export_failed,
        c.ls_failed,
        c.repair_failed,
        c.repair_lost,
        c.repair_bad,
        c.rm_failed,
        c.by_region
    );
    assert_eq!(c.cases, todo.len());
    let failed = (
        c.crash,
        c.hang,
        c.panic,
        c.wrong_bytes,
        c.leftover,
        c.model_missed,
        c.repair_bad,
    );
    if failed != (0, 0, 0, 0, 0, 0, 0) || c.contained_crash > 0 {
        let kept = work.keep();
        eprintln!(
            "flipfuzz: the failed cases' files are in {}",
            kept.display()
        );
    }
    assert_eq!(
        failed,
        (0, 0, 0, 0, 0, 0, 0),
        "seed {seed}: crashes, hangs, panics, wrong exports, leftovers, models not failed with \
         their weights, repaired stores that do not verify (see the cases above)"
    );
}

/// An export killed before its end leaves `OUT.coral-tmp-PID`; the next export to that folder
/// removes it (and leaves the file of a live export alone).
#[test]
fn the_next_export_removes_what_a_killed_export_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.h5");
    let src = dir.path().join("m.safetensors");
    let bytes = model(3, false, 0);
    std::fs::write(&src, &bytes).unwrap();
    run_ok(coral(&store).arg("add").arg(&src));
    let out = dir.path().join("out.safetensors");
    // A real export, killed (with its child) as soon as its temporary file exists.
    let mut killed = None;
    for _ in 0..20 {
        let mut child = coral(&store)
            .arg("export")
            .arg("m")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let tmp = loop {
            let tmp = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains(".coral-tmp-"));
            if tmp.is_some() || start.elapsed() > Duration::from_secs(10) {
                break tmp;
            }
            if child.try_wait().unwrap().is_some() {
                break None;
            }
        };
        // SAFETY: killing the process group the child leads.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.wait();
        if let Some(t) = tmp.filter(|t| t.exists()) {
            // The process that wrote it (the child doing the work) is gone, or about to be.
            let pid: u32 = t
                .to_string_lossy()
                .rsplit('-')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap();
            let start = Instant::now();
            while ops::pid_alive(pid) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(!ops::pid_alive(pid), "the killed export {pid} lives on");
            killed = Some(t);
            break;
        }
        let _ = std::fs::remove_file(&out);
    }
    eprintln!(
        "flipfuzz: {}",
        match &killed {
            Some(t) => format!("killed an export that had written {}", t.display()),
            None => "every export ended before it could be killed: a dead one's file is made up"
                .to_owned(),
        }
    );
    // Where the export was always too quick to catch, leave the file a dead one would.
    let stale = killed.unwrap_or_else(|| {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        let p = dir.path().join(format!("out.safetensors.coral-tmp-{pid}"));
        std::fs::write(&p, b"partial").unwrap();
        p
    });
    let live = dir
        .path()
        .join(format!("other.npz.coral-tmp-{}", std::process::id()));
    std::fs::write(&live, b"in progress").unwrap();
    run_ok(coral(&store).arg("export").arg("m").arg(&out));
    assert!(
        !stale.exists(),
        "{} survived the next export",
        stale.display()
    );
    assert!(live.exists(), "a live export's file was removed");
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

/// `coral ls` on a store with one damaged manifest lists the other models, the damaged one with
/// its error, and fails with one line; the other model still exports.
#[test]
fn ls_lists_what_still_reads() {
    use coral_store_api::ManifestStore;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.h5");
    for (name, salt) in [("a", 0), ("b", 900)] {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, model(2, false, salt)).unwrap();
        run_ok(coral(&store).arg("add").arg(&p));
    }
    let len = HDF5Store::open(&store, HDF5StoreOptions::new().mode(Mode::Read))
        .unwrap()
        .get_manifest(&ModelName::new("a").unwrap())
        .unwrap()
        .unwrap()
        .to_json()
        .unwrap()
        .len() as u64;
    // Manifest a's dataspace message, rank 1 (version 1, or version 2 as files with persistent
    // free space have it): its size + 2^45.
    let mut bytes = std::fs::read(&store).unwrap();
    let v1 = bytes
        .windows(16)
        .position(|w| w[..2] == [1, 1] && w[3..8] == [0; 5] && w[8..] == len.to_le_bytes())
        .map(|at| at + 8);
    let v2 = || {
        bytes
            .windows(12)
            .position(|w| w[..2] == [2, 1] && w[3] == 1 && w[4..] == len.to_le_bytes())
            .map(|at| at + 4)
    };
    let at = v1.or_else(v2).unwrap();
    bytes[at + 5] ^= 0x20;
    std::fs::write(&store, &bytes).unwrap();
    let out = coral(&store).args(["--json", "ls"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["models"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    assert_eq!(rows[0]["name"], "a");
    // Coral's own size check, or (object headers of version 2 carry checksums) HDF5's.
    let why = rows[0]["error"].as_str().unwrap();
    assert!(
        why.contains("manifest dataset") || why.contains("checksum"),
        "{v}"
    );
    assert_eq!(
        (rows[1]["name"].as_str(), rows[1]["tensors"].as_u64()),
        (Some("b"), Some(4))
    );
    // With --json the error is one JSON object on stderr.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let e: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("could not read 1 of the entries"),
        "{err}"
    );
    assert_eq!(e["exit_code"], 1, "{err}");
    let exported = dir.path().join("b.out.safetensors");
    run_ok(coral(&store).arg("export").arg("b").arg(&exported));
    assert_eq!(std::fs::read(&exported).unwrap(), model(2, false, 900));
}

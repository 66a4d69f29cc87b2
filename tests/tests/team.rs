//! A team on one bucket: `coral gc --grace 0` in a loop beside a stream of `coral add` (with
//! deltas and shared tensors) and `coral rm`, on the same S3 prefix, as separate processes of
//! the real binary, against every engine of the test environment (moto and Garage). Every
//! model whose add exited 0 and that the stream did not remove must, at the end, verify and
//! export byte for byte. With the grace period at 0 only the leases protect; the grace period's
//! own effect, and what a killed writer leaves, are checked after the race.
//!
//! `CORAL_TEAM_ROUNDS` sets the number of adds (50 by default); the summary line of each engine
//! (`--nocapture`) has the counts `docs/reliability.md` quotes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coral_tests::{
    coral, create_bucket_on, run_ok, sha256_file, stdout_json, testenv, unique_name,
    with_engine_env,
};
use serde_json::Value;

/// Tensors shared between models (each model takes two), so adds deduplicate against weights
/// that the models which used them may just have given up, and gc may be about to delete.
const POOL: usize = 5;
/// Models kept alive: after each add, the model this many adds older is removed.
const KEEP: usize = 2;
/// Every third model is added against the one before it (its `drift` tensor as a delta).
const DELTA_EVERY: usize = 3;

fn rounds() -> usize {
    std::env::var("CORAL_TEAM_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(50)
}

/// A safetensors file of f32 tensors (and one i64), in the given order.
fn safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let begin = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let begin = data.len();
    data.extend((0..5i64).flat_map(|i| i.to_le_bytes()));
    header.insert(
        "position_ids".into(),
        serde_json::json!({"dtype": "I64", "shape": [5], "data_offsets": [begin, data.len()]}),
    );
    let mut text = Value::Object(header).to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    out
}

fn wave(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|j| ((seed * 7919 + j) as f32 * 0.0013).sin() * 0.05)
        .collect()
}

/// Model `i`: two tensors of the shared pool, one of its own, and `drift`, which differs from
/// model `i - 1`'s in a tenth of its elements (a delta when added against it).
fn model(i: usize) -> Vec<u8> {
    let base = wave(2048, 999);
    let drift: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(j, v)| if j % 10 == i % 10 { v * 1.001 } else { *v })
        .collect();
    safetensors(&[
        ("shared.a".into(), vec![32, 32], wave(1024, 100 + i % POOL)),
        (
            "shared.b".into(),
            vec![32, 32],
            wave(1024, 100 + (i + 3) % POOL),
        ),
        ("own".into(), vec![64, 32], wave(2048, 1000 + i)),
        ("drift".into(), vec![64, 32], drift),
    ])
}

struct Team<'a> {
    engine: &'a testenv::S3Engine,
    store: String,
}

impl Team<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = coral();
        with_engine_env(&mut c, self.engine);
        c.arg("--store").arg(&self.store).args(args);
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        c.output()
            .unwrap_or_else(|e| panic!("cannot run coral {args:?}: {e}"))
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let mut c = self.cmd(args);
        c.arg("--json");
        stdout_json(&run_ok(&mut c))
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// What the add stream did.
#[derive(Debug, Default)]
struct Stream {
    acked: Vec<usize>,
    removed: Vec<usize>,
    failed: Vec<(usize, String)>,
    delta_coded: u64,
    reused: u64,
    /// Acknowledged models checked (exported and compared) before their `rm`, or at the end.
    checked: usize,
    /// Those that did not export, or exported other bytes.
    lost: Vec<String>,
    /// Seconds each add took (waiting for gc included).
    add_secs: Vec<f64>,
}

/// Exports model `i` and compares it with its file; `Err` says what is wrong.
fn check(team: &Team, dir: &Path, files: &[PathBuf], i: usize) -> Result<(), String> {
    let out = dir.join(format!("out-{i:03}.safetensors"));
    let e = team.output(&["export", &format!("m{i:03}"), out.to_str().unwrap()]);
    if !e.status.success() {
        return Err(format!("m{i:03}: {}", stderr(&e)));
    }
    let same = sha256_file(&out).ok() == Some(sha256_file(&files[i]).unwrap());
    let _ = std::fs::remove_file(&out);
    if same {
        Ok(())
    } else {
        Err(format!("m{i:03}: exported other bytes"))
    }
}

/// What the gc loop did.
#[derive(Debug, Default)]
struct Collector {
    runs: usize,
    ok: usize,
    failed: Vec<String>,
    weights: usize,
    deltas: usize,
}

fn add_stream(team: &Team, dir: &Path, files: &[PathBuf]) -> Stream {
    let mut s = Stream::default();
    let mut alive: Vec<usize> = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let name = format!("m{i:03}");
        let mut args = vec![
            "--json".to_owned(),
            "--wait".to_owned(),
            "120".to_owned(),
            "add".to_owned(),
            file.to_string_lossy().into_owned(),
            "--name".to_owned(),
            name,
        ];
        // Every DELTA_EVERY-th add delta-codes against the one before, the others none.
        if i % DELTA_EVERY == 1 && alive.last() == Some(&(i - 1)) {
            args.extend(["--reference".to_owned(), format!("m{:03}", i - 1)]);
        } else {
            args.extend(["--reference".to_owned(), "none".to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        let out = team.output(&args);
        s.add_secs.push(t.elapsed().as_secs_f64());
        if out.status.success() {
            let r = stdout_json(&out);
            s.delta_coded += r["delta_coded"].as_u64().unwrap_or(0);
            s.reused += r["reused"].as_u64().unwrap_or(0);
            s.acked.push(i);
            alive.push(i);
        } else {
            s.failed.push((i, stderr(&out)));
        }
        // Keep the last KEEP models: the older ones give their weights up to gc, once checked
        // (gc runs all the while).
        while alive.len() > KEEP {
            let old = alive.remove(0);
            s.checked += 1;
            if let Err(e) = check(team, dir, files, old) {
                s.lost.push(e);
            }
            let out = team.output(&["rm", &format!("m{old:03}")]);
            assert!(out.status.success(), "rm m{old:03}: {}", stderr(&out));
            s.removed.push(old);
        }
    }
    s
}

fn gc_loop(team: &Team, done: &AtomicBool) -> Collector {
    let mut c = Collector::default();
    while !done.load(Ordering::Relaxed) {
        let out = team.output(&["--json", "--wait", "120", "gc", "--grace", "0"]);
        c.runs += 1;
        if out.status.success() {
            let r = stdout_json(&out);
            c.ok += 1;
            c.weights += r["weights"].as_array().map_or(0, Vec::len);
            c.deltas += r["deltas"].as_array().map_or(0, Vec::len);
            assert_eq!(r["grace_secs"], 0, "{r}");
        } else {
            c.failed.push(stderr(&out));
        }
    }
    c
}

fn race(engine: &testenv::S3Engine) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let bucket = unique_name("coral-team");
    create_bucket_on(engine, &bucket).unwrap();
    let team = Team {
        engine,
        store: format!("s3://{bucket}/team"),
    };
    let n = rounds();
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("m{i:03}.safetensors"));
            std::fs::write(&p, model(i)).unwrap();
            p
        })
        .collect();

    let done = AtomicBool::new(false);
    let (mut stream, collector) = std::thread::scope(|s| {
        let gc = s.spawn(|| gc_loop(&team, &done));
        let stream = add_stream(&team, dir.path(), &files);
        done.store(true, Ordering::Relaxed);
        (stream, gc.join().unwrap())
    });

    // Every acknowledged model that was not removed is there, verifies, and exports the same
    // bytes.
    let verify = team.output(&["verify"]);
    let alive: Vec<usize> = stream
        .acked
        .iter()
        .copied()
        .filter(|i| !stream.removed.contains(i))
        .collect();
    for &i in &alive {
        stream.checked += 1;
        if let Err(e) = check(&team, dir.path(), &files, i) {
            stream.lost.push(e);
        }
    }
    let lost = std::mem::take(&mut stream.lost);
    let adds = &stream.add_secs;
    let mean = adds.iter().sum::<f64>() / adds.len().max(1) as f64;
    let slowest = adds.iter().copied().fold(0.0, f64::max);
    println!(
        "team on {}: {n} rounds (adds), {} models acknowledged, {} checked byte for byte ({} before \
         their rm, {} at the end), {} adds failed, {} delta-coded and {} reused tensors; \
         gc --grace 0: {} runs, {} ok, {} failed, removed {} weights and {} deltas; \
         lost or wrong: {}; an add took {mean:.2} s on average, {slowest:.2} s at most; {:.1} s",
        engine.name,
        stream.acked.len(),
        stream.checked,
        stream.removed.len(),
        alive.len(),
        stream.failed.len(),
        stream.delta_coded,
        stream.reused,
        collector.runs,
        collector.ok,
        collector.failed.len(),
        collector.weights,
        collector.deltas,
        lost.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(lost.is_empty(), "{}: lost {lost:#?}", engine.name);
    assert_eq!(stream.checked, stream.acked.len());
    assert!(
        verify.status.success(),
        "{}: verify failed: {}\n{}",
        engine.name,
        String::from_utf8_lossy(&verify.stdout),
        stderr(&verify)
    );
    // The race happened: adds went through, gc ran beside them and removed what rm gave up,
    // tensors were reused and delta-coded.
    assert!(
        stream.failed.is_empty(),
        "{}: adds failed: {:?}",
        engine.name,
        stream.failed
    );
    assert!(
        collector.failed.is_empty(),
        "{}: gc failed: {:?}",
        engine.name,
        collector.failed
    );
    assert!(collector.ok >= 2, "{}: {collector:?}", engine.name);
    assert!(collector.weights > 0, "{}: {collector:?}", engine.name);
    assert!(stream.delta_coded > 0 && stream.reused > 0, "{stream:?}");

    grace_keeps_young_entries(&team, dir.path());
    a_killed_writer_leaves_nothing_in_the_way(&team, dir.path());
}

/// The grace period alone: a model added and removed at once leaves young weights that
/// `coral gc` (default grace, 1 hour) keeps and reports as kept; with `--grace 0` they go.
fn grace_keeps_young_entries(team: &Team, dir: &Path) {
    let file = dir.join("young.safetensors");
    std::fs::write(&file, model(10_000)).unwrap();
    let r = team.ok_json(&[
        "add",
        file.to_str().unwrap(),
        "--name",
        "young",
        "--reference",
        "none",
    ]);
    let new = r["new"].as_u64().unwrap() as usize;
    assert!(new >= 2, "{r}");
    run_ok(&mut team.cmd(&["rm", "young"]));
    let dry = team.ok_json(&["gc", "--dry-run"]);
    assert_eq!(dry["grace_secs"], 3600, "{dry}");
    let g = team.ok_json(&["gc"]);
    assert_eq!(g["weights"].as_array().unwrap().len(), 0, "{g}");
    assert!(g["kept"].as_u64().unwrap() as usize >= new, "{g}");
    let human = team.output(&["gc", "--grace", "30m"]);
    assert!(human.status.success(), "{}", stderr(&human));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("younger than the grace period (30m)"),
        "{text}"
    );
    let g = team.ok_json(&["gc", "--grace", "0"]);
    assert!(g["weights"].as_array().unwrap().len() >= new, "{g}");
    assert_eq!(g["kept"], 0, "{g}");
}

/// A writer killed in the middle of an add leaves its lease, maybe weights without a manifest,
/// maybe an unfinished multipart upload. A gc on the same machine sees the holder is gone
/// (no waiting), keeps what it left for the grace period and removes it with `--grace 0`.
fn a_killed_writer_leaves_nothing_in_the_way(team: &Team, dir: &Path) {
    // Large enough that the add is still at work when it is killed (multipart uploads too).
    let big: Vec<(String, Vec<usize>, Vec<f32>)> = (0..8)
        .map(|i| {
            let rows = if i % 4 == 0 { 3072 } else { 1024 };
            (
                format!("big.{i}"),
                vec![rows, 1024],
                wave(rows * 1024, 5000 + i),
            )
        })
        .collect();
    let file = dir.join("big.safetensors");
    std::fs::write(&file, safetensors(&big)).unwrap();
    let mut add = team.cmd(&["add", file.to_str().unwrap(), "--name", "killed"]);
    let mut child = add
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let status = child.wait().unwrap();
    let t = Instant::now();
    let g = team.ok_json(&["--wait", "5", "gc"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "gc waited for a dead writer"
    );
    if status.success() {
        // It finished first: nothing was left; the model is there.
        run_ok(&mut team.cmd(&["rm", "killed"]));
    } else {
        assert_eq!(g["weights"].as_array().unwrap().len(), 0, "{g}");
    }
    let g = team.ok_json(&["gc", "--grace", "0"]);
    assert_eq!(g["kept"], 0, "{g}");
    let again = team.ok_json(&["gc", "--grace", "0"]);
    assert_eq!(again["weights"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["uploads_aborted"], 0, "{again}");
    assert_eq!(again["leftovers_removed"], 0, "{again}");
    let v = team.output(&["verify"]);
    assert!(v.status.success(), "{}", stderr(&v));
}

#[test]
fn gc_in_a_loop_beside_a_stream_of_adds_loses_nothing() {
    // The engines are separate servers: their races run side by side.
    let engines = testenv::s3_engines();
    std::thread::scope(|s| {
        let runs: Vec<_> = engines
            .iter()
            .map(|e| (e.name, s.spawn(move || race(e))))
            .collect();
        let failed: Vec<&str> = runs
            .into_iter()
            .filter_map(|(name, h)| h.join().is_err().then_some(name))
            .collect();
        assert!(failed.is_empty(), "the race failed on {failed:?}");
    });
}

//! Faults on a real distributed engine: the 3-node Garage cluster of the test environment
//! (replication factor 3, so a write needs 2 nodes).
//!
//! One test, in a binary of its own: it kills and restarts nodes, which no other test may see
//! (cargo runs test binaries one after another). A restarted node's pid goes into its `pid` file,
//! so `cargo xtask test` stops it with the rest.
//!
//! - A node SIGKILLed in the middle of `coral sync` to the cluster: the sync completes on the
//!   remaining quorum or fails with one line; a re-run moves only what is missing.
//! - All nodes down: one line naming the endpoint; after they come back, nothing half-visible
//!   (every listed weight verifies), and a re-run completes.
//! - The killed node restarted: everything verifies through every node's endpoint, and the
//!   model exports byte for byte.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use coral_tests::{
    coral, run_fail, run_ok, sha256_file, stdout_json, testenv, unique_name, with_engine_env,
};

fn node_pid(dir: &Path) -> i32 {
    std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn kill_node(dir: &Path) {
    let pid = node_pid(dir);
    // SAFETY: kill(2) on a Garage node of the test cluster.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let start = Instant::now();
    // SAFETY: probing only.
    while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(10) {
        // SAFETY: reaps it when it is this process's child (a node restarted here).
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn s3_port(dir: &Path) -> u16 {
    let cfg = std::fs::read_to_string(dir.join("garage.toml")).unwrap();
    let s3 = cfg.split("[s3_api]").nth(1).unwrap();
    let line = s3.lines().find(|l| l.starts_with("api_bind_addr")).unwrap();
    line.trim_end_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn restart_node(bin: &Path, dir: &Path) {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("garage.log"))
        .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("garage.toml"))
        .arg("server")
        .env("RUST_LOG", "garage=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(dir.join("pid"), child.id().to_string()).unwrap();
    std::mem::forget(child);
    let port = s3_port(dir);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the restarted node did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `coral sync SRC DST --json` against `engine`, spawned.
fn sync(engine: &testenv::S3Engine, src: &str, dst: &str) -> Command {
    let mut c = coral();
    with_engine_env(&mut c, engine);
    c.args(["sync", src, dst, "--json"]);
    c
}

/// With `--json` (as [`sync`] runs it), a failure is one JSON object on stderr: its message.
fn one_line_json_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    let e: serde_json::Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("not a JSON object ({e}): {err:?}"));
    assert_eq!(
        e["exit_code"].as_i64(),
        out.status.code().map(i64::from),
        "{err:?}"
    );
    e["error"].as_str().unwrap_or_default().to_owned()
}

fn one_line_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(!err.contains("panicked"), "{err:?}");
    lines[0].to_owned()
}

fn moved(v: &serde_json::Value) -> u64 {
    ["weights", "deltas", "manifests"]
        .iter()
        .map(|k| v[k]["moved"].as_u64().unwrap())
        .sum()
}

/// Waits until a read through `engine` succeeds (the cluster has its quorum again).
fn wait_readable(engine: &testenv::S3Engine, store: &str) {
    let start = Instant::now();
    loop {
        let mut c = coral();
        with_engine_env(&mut c, engine);
        c.args(["--store", store, "ls"]);
        if c.output().unwrap().status.success() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the cluster did not come back"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn node_failures_during_sync() {
    let (Some(engine), Some((bin, nodes)), Some(model)) = (
        testenv::garage(),
        testenv::garage_nodes(),
        testenv::model_path(),
    ) else {
        return;
    };
    assert_eq!(nodes.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("a.h5");
    run_ok(coral().arg("--store").arg(&local).args([
        "add",
        model.to_str().unwrap(),
        "--name",
        "base",
    ]));
    let bucket = unique_name("coral-garage");
    let remote = format!("s3://{bucket}/models");
    let local_s = local.to_str().unwrap();

    // 1. Node 3 killed in the middle of a sync through node 1.
    let child = sync(&engine, local_s, &remote)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    kill_node(&nodes[2]);
    let first = child.wait_with_output().unwrap();
    assert!(first.status.code().is_some(), "sync died by a signal");
    let first_moved = if first.status.success() {
        moved(&serde_json::from_slice(&first.stdout).unwrap())
    } else {
        eprintln!(
            "garage: the sync with a node down failed: {}",
            one_line_json_error(&first)
        );
        0
    };
    let second = stdout_json(&run_ok(&mut sync(&engine, local_s, &remote)));
    let total = 104 + 1;
    if first.status.success() {
        assert_eq!(
            first_moved,
            total,
            "{}",
            String::from_utf8_lossy(&first.stdout)
        );
        assert_eq!(moved(&second), 0, "the re-run moved again: {second}");
    } else {
        // Only what the first run did not finish.
        assert!(moved(&second) <= total, "{second}");
        let skipped: u64 = ["weights", "deltas", "manifests"]
            .iter()
            .map(|k| second[k]["skipped"].as_u64().unwrap())
            .sum();
        assert_eq!(moved(&second) + skipped, total, "{second}");
    }
    eprintln!(
        "garage: node 3 killed mid-sync: the sync {} ({} moved), the re-run moved {}",
        if first.status.success() {
            "completed"
        } else {
            "failed"
        },
        first_moved,
        moved(&second)
    );

    // 2. Every node down: one line naming the endpoint.
    kill_node(&nodes[0]);
    kill_node(&nodes[1]);
    let mut ls = coral();
    with_engine_env(&mut ls, &engine);
    ls.args(["--store", &remote, "ls"]);
    let line = one_line_error(&run_fail(&mut ls));
    assert!(line.contains(&engine.endpoint), "{line}");

    // 3. All back: nothing half-visible, everything verifies through every node.
    for n in &nodes {
        restart_node(&bin, n);
    }
    wait_readable(&engine, &remote);
    let out_file = dir.path().join("out.safetensors");
    for endpoint in &engine.endpoints {
        let e = testenv::S3Engine {
            endpoint: endpoint.clone(),
            ..engine.clone()
        };
        wait_readable(&e, &remote);
        let mut v = coral();
        with_engine_env(&mut v, &e);
        v.args(["--store", &remote, "verify", "--json"]);
        let report = stdout_json(&run_ok(&mut v));
        assert!(
            report["failures"].as_array().unwrap().is_empty(),
            "{endpoint}: {report}"
        );
        assert_eq!(report["weights"], 104, "{endpoint}: {report}");
        let mut x = coral();
        with_engine_env(&mut x, &e);
        x.args(["--store", &remote, "export", "base"])
            .arg(&out_file);
        run_ok(&mut x);
        assert_eq!(
            sha256_file(&out_file).unwrap(),
            sha256_file(&model).unwrap(),
            "{endpoint}"
        );
    }
}

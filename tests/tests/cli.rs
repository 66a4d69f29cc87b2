//! End-to-end tests of the `coral` command: the real binary on real files and stores.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coral_tests::{
    coral, create_bucket_on, finetune, run_fail, run_ok, sha256_file, stdout_json, stdout_text,
    testenv, unique_name, with_engine_env, with_s3_env,
};
use serde_json::Value;

/// `coral --store STORE ARGS...`
fn cmd(store: &Path, args: &[&str]) -> Command {
    let mut c = coral();
    c.arg("--store").arg(store).args(args);
    c
}

fn ok_json(store: &Path, args: &[&str]) -> Value {
    let mut c = cmd(store, args);
    c.arg("--json");
    stdout_json(&run_ok(&mut c))
}

/// A failure must be one line on stderr, starting with "error:", never a panic; exit status 1.
fn assert_one_line_error(out: &Output, want: &str) {
    assert_one_line_error_with(out, want, 1);
}

/// [`assert_one_line_error`] with another exit status.
fn assert_one_line_error_with(out: &Output, want: &str, code: i32) {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err:?}"
    );
    assert!(
        lines[0].to_lowercase().contains(&want.to_lowercase()),
        "{want:?} not in {err:?}"
    );
    assert_eq!(out.status.code(), Some(code), "{err}");
}

/// `n thing` or `n things`, as the command writes counts.
fn plural(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// A safetensors file of F32 tensors with the given values (each of shape `[len]`).
fn f32_model(tensors: &[(&str, &[f32])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, values) in tensors {
        let begin = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [begin, data.len()]}),
        );
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    out
}

/// A synthetic safetensors model: `n` float tensors of smooth values, an int tensor, metadata.
fn synthetic_model(n: usize, width: usize) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "note": "synthetic"}),
    );
    let mut data = Vec::new();
    for i in 0..n {
        let begin = data.len();
        for j in 0..width * 16 {
            let v = ((i * 7919 + j) as f32 * 0.001).sin() * 0.05;
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            format!("layer.{i:02}.weight"),
            serde_json::json!({"dtype": "F32", "shape": [width, 16], "data_offsets": [begin, data.len()]}),
        );
    }
    let begin = data.len();
    data.extend((0..5i64).flat_map(|i| i.to_le_bytes()));
    header.insert(
        "position_ids".into(),
        serde_json::json!({"dtype": "I64", "shape": [5], "data_offsets": [begin, data.len()]}),
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

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

fn export_identical(store: &Path, model: &str, original: &Path, out: &Path) {
    run_ok(&mut cmd(store, &["export", model, out.to_str().unwrap()]));
    assert_eq!(
        sha256_file(out).unwrap(),
        sha256_file(original).unwrap(),
        "export of {model} differs from {}",
        original.display()
    );
}

/// The user's day on one model and its fine-tune: add, export, fine-tune with deltas, inspect,
/// verify, remove, collect garbage.
fn day(base: &Path, fx: &Fixture) {
    let store = fx.path("coral.h5");
    let bytes = std::fs::read(base).unwrap();
    let (ft_bytes, ft) = finetune::make_finetune_bytes(&bytes, finetune::DEFAULT_SEED).unwrap();
    assert!(!ft.changed.is_empty());
    let ft_path = fx.write("ft.safetensors", &ft_bytes);

    let a = ok_json(&store, &["add", base.to_str().unwrap(), "--name", "base"]);
    assert_eq!(
        a["tensors"],
        a["new"].as_u64().unwrap() + a["reused"].as_u64().unwrap()
    );
    assert_eq!(a["delta_coded"], 0);
    assert_eq!(a["bytes_in"], bytes.len() as u64);
    let base_stored = a["bytes_stored"].as_u64().unwrap();
    assert!(base_stored > 0 && base_stored <= bytes.len() as u64, "{a}");
    export_identical(&store, "base", base, &fx.path("base.out.safetensors"));

    let f = ok_json(
        &store,
        &[
            "add",
            ft_path.to_str().unwrap(),
            "--name",
            "ft",
            "--reference",
            "base",
        ],
    );
    assert_eq!(f["delta_coded"], ft.changed.len() as u64, "{f}");
    assert_eq!(f["new"], 0, "{f}");
    let ft_stored = f["bytes_stored"].as_u64().unwrap();
    export_identical(&store, "ft", &ft_path, &fx.path("ft.out.safetensors"));

    // The same fine-tune stored whole, in a store of its own, costs more than as deltas.
    let whole = fx.path("whole.h5");
    let w = ok_json(&whole, &["add", ft_path.to_str().unwrap(), "--name", "ft"]);
    let ft_whole = w["bytes_stored"].as_u64().unwrap();
    assert!(
        base_stored + ft_stored < base_stored + ft_whole,
        "deltas saved nothing: {ft_stored} vs {ft_whole}"
    );
    assert!(ft_stored * 4 < ft_whole, "{ft_stored} vs {ft_whole}");

    // Inspection.
    let ls = ok_json(&store, &["ls"]);
    let names: Vec<&str> = ls["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "ft"]);
    let deltas = ok_json(&store, &["ls", "--deltas"]);
    assert_eq!(deltas["deltas"].as_array().unwrap().len(), ft.changed.len());
    let weights = ok_json(&store, &["ls", "--weights"]);
    let nweights = weights["weights"].as_array().unwrap().len();
    assert!(nweights > 0);
    let show = ok_json(&store, &["show", "ft"]);
    assert_eq!(show["parent"], "base");
    assert_eq!(show["stored_as"]["delta"], ft.changed.len() as u64);
    assert!(show["safetensors_header"].is_string());
    let some_delta = deltas["deltas"][0]["key"].as_str().unwrap();
    let d = ok_json(&store, &["show", some_delta]);
    assert_eq!(d["kind"], "delta");
    let some_weight = weights["weights"][0]["key"].as_str().unwrap();
    assert_eq!(ok_json(&store, &["show", some_weight])["kind"], "weight");
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", "base"])));
    assert!(text.contains("format   safetensors"), "{text}");
    // How the tensors are stored, in words: "(104 weights)", "(93 weights, 11 deltas)".
    let ntensors = show["tensors"].as_array().unwrap().len();
    let stored = &show["stored_as"];
    let (w, d) = (
        stored["weight"].as_u64().unwrap(),
        stored["delta"].as_u64().unwrap(),
    );
    assert_eq!(w + d, ntensors as u64, "{show}");
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", "ft"])));
    let want = format!(
        "tensors  {ntensors} ({}, {})",
        plural(w, "weight"),
        plural(d, "delta")
    );
    assert!(text.contains(&want), "{want:?} not in {text}");
    assert!(!text.contains('{'), "{text}");
    assert!(text.contains("parent   base\n"), "{text}");

    let info = ok_json(&store, &["info"]);
    assert_eq!(info["models"], 2);
    assert_eq!(info["deltas"]["total_deltas"], ft.changed.len() as u64);
    assert_eq!(info["total_weights"], nweights as u64);

    let diff = ok_json(&store, &["diff", "base", "ft"]);
    let changed = diff["changed"].as_array().unwrap();
    let mut changed_names: Vec<&str> = changed
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    changed_names.sort();
    let mut want: Vec<&str> = ft.changed.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(changed_names, want);
    for c in changed {
        let rc = c["relative_change"].as_f64().unwrap();
        assert!(rc > 0.0 && rc < 0.01, "{c}");
    }
    assert!(diff["added"].as_array().unwrap().is_empty());
    assert!(diff["removed"].as_array().unwrap().is_empty());

    let v = ok_json(&store, &["verify"]);
    assert!(v["failures"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["manifests"], 2);
    let text = stdout_text(&run_ok(&mut cmd(&store, &["verify"])));
    assert!(text.contains("all ok"), "{text}");

    // Removing the base keeps what the fine-tune needs (its deltas' references), and the
    // listing says the base is gone.
    let text = stdout_text(&run_ok(&mut cmd(&store, &["ls"])));
    assert!(text.contains("\tfrom base\n"), "{text}");
    run_ok(&mut cmd(&store, &["rm", "base"]));
    let text = stdout_text(&run_ok(&mut cmd(&store, &["ls"])));
    assert!(text.contains("\tfrom base (removed)\n"), "{text}");
    assert_eq!(
        ok_json(&store, &["ls"])["models"][0]["parent_in_store"],
        false
    );
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", "ft"])));
    assert!(text.contains("parent   base (removed)\n"), "{text}");
    let g = ok_json(&store, &["gc", "--dry-run"]);
    assert!(g["deltas"].as_array().unwrap().is_empty(), "{g}");
    ok_json(&store, &["gc"]);
    export_identical(&store, "ft", &ft_path, &fx.path("ft.again.safetensors"));
    assert!(ok_json(&store, &["verify"])["failures"]
        .as_array()
        .unwrap()
        .is_empty());
    run_ok(&mut cmd(&store, &["rm", "ft"]));
    // gc counts the bytes of the weights it frees as well as the deltas' (estimated in a dry
    // run): here everything the store holds.
    let held = ok_json(&store, &["info"]);
    let dry = ok_json(&store, &["gc", "--dry-run"]);
    let g = ok_json(&store, &["gc"]);
    assert_eq!(g["deltas"].as_array().unwrap().len(), ft.changed.len());
    for r in [&dry, &g] {
        let (wb, db) = (
            r["weight_bytes"].as_u64().unwrap(),
            r["delta_bytes"].as_u64().unwrap(),
        );
        assert_eq!(r["bytes"], wb + db, "{r}");
        assert_eq!(db, held["deltas"]["total_delta_bytes"], "{r} {held}");
        let stored = held["compressed_bytes"].as_u64().unwrap();
        assert!(stored > 0 && wb.abs_diff(stored) <= 1, "{r} {held}");
    }
    let text = stdout_text(&run_ok(&mut cmd(&store, &["gc", "--dry-run"])));
    assert!(
        text.starts_with("would remove 0 weights and 0 deltas (0 B"),
        "{text}"
    );
    let info = ok_json(&store, &["info"]);
    assert_eq!(info["total_weights"], 0, "{info}");
    assert_eq!(info["deltas"]["total_deltas"], 0, "{info}");
    assert_eq!(info["models"], 0);
}

#[test]
fn a_day_with_a_synthetic_model() {
    let fx = Fixture::new();
    let base = fx.write("model.safetensors", &synthetic_model(20, 256));
    day(&base, &fx);
}

#[test]
fn a_day_with_the_real_model() {
    let Some(model) = testenv::model_path() else {
        return;
    };
    let fx = Fixture::new();
    day(&model, &fx);
}

/// `--compression coral`: the real model in fp32 goes in through the float codec, smaller than
/// with the default codec, and comes back byte for byte, verified; an unknown codec is one line
/// and creates nothing.
#[test]
fn the_float_codec_takes_the_real_model() {
    let Some(model) = testenv::model_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (zstd, coral_store) = (dir.path().join("zstd.h5"), dir.path().join("coral.h5"));
    run_ok(&mut cmd(
        &zstd,
        &["add", model.to_str().unwrap(), "--name", "m"],
    ));
    run_ok(
        cmd(
            &coral_store,
            &["add", model.to_str().unwrap(), "--name", "m"],
        )
        .args(["--compression", "coral"]),
    );
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&coral_store) < size(&zstd),
        "coral {} >= zstd {}",
        size(&coral_store),
        size(&zstd)
    );
    export_identical(
        &coral_store,
        "m",
        &model,
        &dir.path().join("back.safetensors"),
    );
    run_ok(&mut cmd(&coral_store, &["verify"]));
    let bad = dir.path().join("bad.h5");
    let out = run_fail(
        cmd(&bad, &["add", model.to_str().unwrap(), "--name", "m"])
            .args(["--compression", "brotli"]),
    );
    assert_one_line_error(&out, "unknown compression");
    assert!(!bad.exists());
}

#[test]
fn reused_tensors_cost_nothing() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let m = fx.write("m.safetensors", &synthetic_model(4, 64));
    let a = ok_json(&store, &["add", m.to_str().unwrap(), "--name", "a"]);
    assert_eq!(a["new"], 5);
    let b = ok_json(&store, &["add", m.to_str().unwrap(), "--name", "b"]);
    assert_eq!(
        (b["new"].as_u64(), b["reused"].as_u64()),
        (Some(0), Some(5))
    );
    assert_eq!(b["bytes_stored"], 0);
    // Same name again is refused.
    let out = run_fail(&mut cmd(
        &store,
        &["add", m.to_str().unwrap(), "--name", "a"],
    ));
    assert_one_line_error(&out, "already exists");
    // Human output names the counts.
    let c = stdout_text(&run_ok(&mut cmd(
        &store,
        &["add", m.to_str().unwrap(), "--name", "c"],
    )));
    assert!(c.contains("0 new, 5 reused, 0 delta-coded"), "{c}");
    // Default name: the file stem.
    let d = ok_json(&store, &["add", m.to_str().unwrap()]);
    assert_eq!(d["name"], "m");
}

#[test]
fn hostile_files_fail_with_one_line_and_leave_the_store_alone() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let good = synthetic_model(3, 8);
    let g = fx.write("good.safetensors", &good);
    ok_json(&store, &["add", g.to_str().unwrap(), "--name", "good"]);
    let before = sha256_file(&store).unwrap();
    let listing = ok_json(&store, &["ls", "--weights"]);

    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap().to_owned();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    cases.push((
        "truncated",
        good[..good.len() - 7].to_vec(),
        "run past the end",
    ));
    cases.push(("cut-header", good[..8 + n / 2].to_vec(), "beyond the file"));
    let mut lying_len = good.clone();
    lying_len[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    cases.push(("lying-length", lying_len, "beyond the file"));
    let mut short_len = good.clone();
    short_len[..8].copy_from_slice(&((n - 3) as u64).to_le_bytes());
    cases.push(("short-length", short_len, "not a valid safetensors file"));
    // Offsets that overlap: the second tensor starts 4 bytes early (same header length).
    let lie = header.replacen("[512,1024]", "[508,1020]", 1);
    assert_ne!(lie, header);
    let mut overlap = (lie.len() as u64).to_le_bytes().to_vec();
    overlap.extend_from_slice(lie.as_bytes());
    overlap.extend_from_slice(&good[8 + n..]);
    cases.push(("overlap", overlap, "data_offsets"));
    let bad_dtype = header.replacen("\"I64\"", "\"Q64\"", 1);
    let mut dt = (bad_dtype.len() as u64).to_le_bytes().to_vec();
    dt.extend_from_slice(bad_dtype.as_bytes());
    dt.extend_from_slice(&good[8 + n..]);
    cases.push(("dtype", dt, "unknown dtype"));
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec();
    png.extend([0u8; 200]);
    cases.push(("png", png, "not a valid safetensors file"));
    cases.push(("empty", Vec::new(), "too short"));
    cases.push((
        "text",
        b"hello, I am not a model at all".to_vec(),
        "beyond the file",
    ));
    for (what, bytes, want) in cases {
        let p = fx.write(&format!("{what}.safetensors"), &bytes);
        let out = run_fail(&mut cmd(
            &store,
            &["add", p.to_str().unwrap(), "--name", what],
        ));
        assert_one_line_error(&out, want);
        assert_eq!(
            sha256_file(&store).unwrap(),
            before,
            "{what} changed the store"
        );
    }
    let p = fx.write("png.npy", b"\x89PNG\r\n\x1a\n");
    assert_one_line_error(
        &run_fail(&mut cmd(
            &store,
            &["add", p.to_str().unwrap(), "--name", "x"],
        )),
        "not a .npy file",
    );
    assert_one_line_error(
        &run_fail(&mut cmd(
            &store,
            &["add", fx.path("missing.safetensors").to_str().unwrap()],
        )),
        "opening",
    );
    assert_one_line_error(
        &run_fail(&mut cmd(
            &store,
            &["add", fx.dir.path().to_str().unwrap(), "--name", "d"],
        )),
        // A folder of these files: its first broken shard is named.
        "is not a valid safetensors file",
    );
    assert_eq!(ok_json(&store, &["ls", "--weights"]), listing);
    assert_eq!(sha256_file(&store).unwrap(), before);
}

#[test]
fn other_failures_are_one_clear_line() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let m = fx.write("m.safetensors", &synthetic_model(2, 8));
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    let out = fx.path("o.safetensors");
    for (args, want) in [
        (
            vec!["export", "nope", out.to_str().unwrap()],
            "not in the store",
        ),
        (vec!["show", "nope"], "neither a model"),
        (vec!["show", &"ab".repeat(32)], "no weight or delta"),
        (vec!["diff", "m", "nope"], "not in the store"),
        (vec!["rm", "nope"], "not in the store"),
        (
            vec!["add", m.to_str().unwrap(), "--name", "../evil"],
            "invalid model name",
        ),
        (
            vec![
                "add",
                m.to_str().unwrap(),
                "--name",
                "x",
                "--reference",
                "nope",
            ],
            "not in the store",
        ),
        (
            vec!["export", "m", "/nonexistent-dir/o.safetensors"],
            "creating",
        ),
    ] {
        assert_one_line_error(&run_fail(&mut cmd(&store, &args)), want);
    }
    assert!(!out.exists());
    assert_one_line_error(
        &run_fail(&mut cmd(&fx.path("absent.h5"), &["ls"])),
        "no store at",
    );
    assert!(
        !fx.path("absent.h5").exists(),
        "a read command created a store"
    );
    assert_one_line_error(
        &run_fail(&mut cmd(Path::new("ftp://x/y"), &["ls"])),
        "only paths",
    );
    let not_a_store = fx.write("junk.h5", b"this is not HDF5");
    assert_one_line_error(&run_fail(&mut cmd(&not_a_store, &["ls"])), "junk.h5");
    // Bad arguments: one line naming what is wrong and the usage, exit code 2.
    let out = run_fail(coral().args(["add"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: the following required arguments were not provided: <FILE>")
            && err.contains("usage: coral add ")
            && err.contains("see coral add --help"),
        "{err}"
    );
    let out = run_fail(coral().args(["add", "m.safetensors", "--nmae", "x"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("'--nmae'") && err.contains("'--name'"),
        "{err}"
    );
    let out = run_fail(coral().args(["--wait", "soon", "ls"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--wait takes a number of seconds"),
        "{out:?}"
    );
}

/// A closed stdout (`coral show m | head -1`) ends any command quietly: status 141 (128 +
/// SIGPIPE, as a shell reports a command a closed pipe killed), nothing on stderr; the help
/// exits 0. Both the guarded child (a local store) and the process that relays it stay quiet.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    use std::os::fd::FromRawFd;
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let m = fx.write("m.safetensors", &synthetic_model(30, 64));
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    let closed_stdout = || {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe(2) fills the two descriptors; the read end is closed at once, so every
        // write to the other fails with EPIPE; the write end is owned by the returned value.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            libc::close(fds[0]);
            std::process::Stdio::from(std::os::fd::OwnedFd::from_raw_fd(fds[1]))
        }
    };
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["show", "m"], 141),
        (vec!["ls"], 141),
        (vec!["ls", "--weights"], 141),
        (vec!["--json", "ls", "--deltas"], 141),
        (vec!["info"], 141),
        (vec!["verify"], 141),
        (vec!["diff", "m", "m"], 141),
        (vec!["--json", "show", "m"], 141),
        (vec!["--help"], 0),
        (vec!["ls", "--help"], 0),
    ];
    for (args, code) in cases {
        let mut c = cmd(&store, &args);
        c.stdout(closed_stdout());
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// With `--json`, an error is one JSON object on stderr (stdout stays empty or holds the
/// result), with the exit status of the text form.
#[test]
fn json_errors_are_one_json_object_on_stderr() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let m = fx.write("m.safetensors", &synthetic_model(2, 8));
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    let json_error = |args: &[&str], code: i32| -> Value {
        let mut c = cmd(&store, args);
        c.arg("--json");
        let out = run_fail(&mut c);
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"))
    };
    let e = json_error(&["show", "nope"], 1);
    assert!(
        e["error"].as_str().unwrap().contains("neither a model"),
        "{e}"
    );
    assert!(!e["causes"].as_array().unwrap().is_empty(), "{e}");
    assert_eq!(e["exit_code"], 1);
    let e = json_error(&["add", m.to_str().unwrap(), "--name", "m"], 1);
    assert!(
        e["error"].as_str().unwrap().contains("already exists"),
        "{e}"
    );
    let e = json_error(&["export", "nope", fx.path("o.npz").to_str().unwrap()], 1);
    assert!(
        e["error"].as_str().unwrap().contains("not in the store"),
        "{e}"
    );
    // An S3 store runs without the child process: the same form.
    let mut c = coral();
    with_s3_env(&mut c, "http://127.0.0.1:9");
    c.args(["--store", "s3://nowhere/x", "--json", "ls"]);
    let out = run_fail(&mut c);
    assert!(out.stdout.is_empty(), "{out:?}");
    let e: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["exit_code"], 1, "{e}");
    // A usage error too, with the usage.
    let e = json_error(&["add"], 2);
    assert!(e["error"].as_str().unwrap().contains("<FILE>"), "{e}");
    assert!(e["usage"].as_str().unwrap().starts_with("coral add"), "{e}");
}

/// `--store` is global, but sync takes its stores as SRC and DST: it is not in `sync --help`,
/// and giving it is refused (exit 2) rather than ignored. `$CORAL_STORE` does not get in the way.
#[test]
fn sync_refuses_store() {
    let fx = Fixture::new();
    let help = stdout_text(&run_ok(coral().args(["sync", "--help"])));
    assert!(!help.contains("--store"), "{help}");
    assert!(stdout_text(&run_ok(coral().args(["ls", "--help"]))).contains("--store"));
    let (a, b) = (fx.path("a.h5"), fx.path("b.h5"));
    let m = fx.write("m.safetensors", &synthetic_model(2, 8));
    ok_json(&a, &["add", m.to_str().unwrap(), "--name", "m"]);
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    for args in [
        vec!["sync", a, b, "--store", "x.h5"],
        vec!["--store", "x.h5", "sync", a, b],
        vec!["sync", "--store=x.h5", a, b],
    ] {
        let out = run_fail(coral().args(&args));
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("--store does not apply to sync"), "{err}");
    }
    assert!(!fx.path("x.h5").exists() && !fx.path("b.h5").exists());
    let mut c = coral();
    c.env("CORAL_STORE", fx.path("x.h5"))
        .args(["sync", a, b, "--json"]);
    assert_eq!(stdout_json(&run_ok(&mut c))["manifests"]["moved"], 1);
}

/// Counts read as English: "1 tensor", "1 manifest", "2 tensors".
#[test]
fn counts_of_one_are_singular() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let one = fx.write("one.safetensors", &f32_model(&[("w", &[1.0, 2.0])]));
    let text = stdout_text(&run_ok(&mut cmd(&store, &["add", one.to_str().unwrap()])));
    assert!(
        text.starts_with("added one (safetensors, 1 tensor): 1 new,"),
        "{text}"
    );
    let text = stdout_text(&run_ok(&mut cmd(&store, &["ls"])));
    assert!(text.contains("\t1 tensor\t"), "{text}");
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", "one"])));
    assert!(text.contains("tensors  1 (1 weight)\n"), "{text}");
    let text = stdout_text(&run_ok(&mut cmd(&store, &["verify"])));
    assert_eq!(text, "checked 1 weight, 0 deltas, 1 manifest: all ok\n");
    let two = fx.write(
        "two.safetensors",
        &f32_model(&[("a", &[3.0]), ("b", &[3.0]), ("c", &[4.0])]),
    );
    let text = stdout_text(&run_ok(&mut cmd(&store, &["add", two.to_str().unwrap()])));
    assert!(
        text.starts_with("added two (safetensors, 3 tensors): 2 new, 1 reused,"),
        "{text}"
    );
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", "two"])));
    assert!(
        text.contains("tensors  3 (2 distinct: 2 weights)\n"),
        "{text}"
    );
    run_ok(&mut cmd(&store, &["rm", "one"]));
    let text = stdout_text(&run_ok(&mut cmd(&store, &["gc"])));
    assert!(
        text.starts_with("removed 1 weight and 0 deltas ("),
        "{text}"
    );
    let repaired = fx.path("r.h5");
    let text = stdout_text(&run_ok(&mut cmd(
        &store,
        &["repair", repaired.to_str().unwrap()],
    )));
    assert!(
        text.contains("copied 2 weights, 0 deltas, 1 manifest to "),
        "{text}"
    );
}

/// `coral show` takes a unique prefix of at least 8 hex digits, git-style; an ambiguous one is
/// one line with the count, a shorter one a clear error.
#[test]
fn show_takes_unique_hash_prefixes() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    // The keys of [10171.0] and [20380.0] (F32, shape [1]) share their first 8 hex digits,
    // a5a218ec (found by search).
    let m = fx.write(
        "m.safetensors",
        &f32_model(&[("x", &[10171.0]), ("y", &[20380.0]), ("z", &[1.5, 2.5])]),
    );
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    let keys: Vec<String> = ok_json(&store, &["show", "m"])["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["key"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        keys[0].starts_with("a5a218ec") && keys[1].starts_with("a5a218ec"),
        "{keys:?}"
    );
    assert_ne!(keys[0][..9], keys[1][..9]);
    assert_one_line_error(
        &run_fail(&mut cmd(&store, &["show", "a5a218ec"])),
        "hash prefix a5a218ec is ambiguous: 2 weights and deltas start with it",
    );
    for k in &keys {
        for prefix in [&k[..9], &k[..12], &k.to_uppercase()[..10], k.as_str()] {
            let v = ok_json(&store, &["show", prefix]);
            assert_eq!(
                (v["kind"].as_str(), v["key"].as_str()),
                (Some("weight"), Some(k.as_str()))
            );
        }
    }
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", &keys[2][..8]])));
    assert!(
        text.starts_with(&format!("weight {}: z float32 [2], 8 B raw", keys[2])),
        "{text}"
    );
    // The stored form: bytes as stored and the codec (the command's default, zstd).
    assert!(text.contains(" stored") && text.contains("zstd-"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&stdout_text(&run_ok(&mut cmd(
        &store,
        &["--json", "show", &keys[2]],
    ))))
    .unwrap();
    assert!(v["stored_bytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(
        v["codec"].as_str().is_some_and(|c| c.starts_with("zstd-")),
        "{v}"
    );
    assert_one_line_error(
        &run_fail(&mut cmd(&store, &["show", &keys[2][..7]])),
        "too short for a hash prefix: give at least 8 hex digits",
    );
    let absent = if keys.iter().any(|k| k.starts_with("00000000")) {
        "ffffffff"
    } else {
        "00000000"
    };
    assert_one_line_error(
        &run_fail(&mut cmd(&store, &["show", absent])),
        "no model, weight or delta matches",
    );
    // A model name comes before a prefix.
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "a5a218ec"]);
    assert_eq!(ok_json(&store, &["show", "a5a218ec"])["name"], "a5a218ec");
}

/// A new model may not be named like a content hash (64 hex digits): it would shadow the
/// weight with that key. One line, naming the rule; the default name (the file's) too.
#[test]
fn model_names_that_read_as_hashes_are_refused() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let m = fx.write("m.safetensors", &synthetic_model(2, 8));
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    let key = ok_json(&store, &["show", "m"])["tensors"][0]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in [key.clone(), key.to_uppercase(), "7".repeat(64)] {
        assert_one_line_error(
            &run_fail(&mut cmd(
                &store,
                &["add", m.to_str().unwrap(), "--name", &name],
            )),
            "64 hex digits read as a weight's content hash",
        );
    }
    let hashlike = fx.write(&format!("{key}.safetensors"), &synthetic_model(2, 8));
    assert_one_line_error(
        &run_fail(&mut cmd(&store, &["add", hashlike.to_str().unwrap()])),
        "give one with --name",
    );
    assert_eq!(
        ok_json(&store, &["ls"])["models"].as_array().unwrap().len(),
        1
    );
    assert_eq!(ok_json(&store, &["show", &key])["kind"], "weight");
}

#[test]
fn a_read_only_store_is_refused_and_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let m = fx.write("m.safetensors", &synthetic_model(2, 8));
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o444)).unwrap();
    let before = sha256_file(&store).unwrap();
    let n = fx.write("n.safetensors", &synthetic_model(3, 8));
    assert_one_line_error(
        &run_fail(&mut cmd(
            &store,
            &["add", n.to_str().unwrap(), "--name", "n"],
        )),
        "read-only",
    );
    assert_one_line_error(&run_fail(&mut cmd(&store, &["rm", "m"])), "read-only");
    assert_one_line_error(&run_fail(&mut cmd(&store, &["gc"])), "read-only");
    assert_one_line_error(&run_fail(&mut cmd(&store, &["compact"])), "read-only");
    // Reading still works.
    assert_eq!(
        ok_json(&store, &["ls"])["models"].as_array().unwrap().len(),
        1
    );
    export_identical(&store, "m", &m, &fx.path("o.safetensors"));
    assert!(ok_json(&store, &["verify"])["failures"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(sha256_file(&store).unwrap(), before);
}

#[test]
fn npy_and_npz_go_in_and_out() {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    // numpy.save's layout for a float32 (2, 3) array.
    let mut dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".to_owned();
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((dict.len() as u16).to_le_bytes());
    npy.extend(dict.as_bytes());
    npy.extend((0..6).flat_map(|i| (i as f32 * 0.5).to_le_bytes()));
    let p = fx.write("arr.npy", &npy);
    let a = ok_json(&store, &["add", p.to_str().unwrap()]);
    assert_eq!(a["format"], "npy");
    let out = fx.path("arr.out.npy");
    run_ok(&mut cmd(&store, &["export", "arr", out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), npy);
    // A safetensors model exported as .npz and added back holds the same tensors.
    let m = fx.write("m.safetensors", &synthetic_model(3, 8));
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "m"]);
    let z = fx.path("m.npz");
    run_ok(&mut cmd(&store, &["export", "m", z.to_str().unwrap()]));
    let back = ok_json(&store, &["add", z.to_str().unwrap(), "--name", "m-npz"]);
    assert_eq!(
        (back["new"].as_u64(), back["reused"].as_u64()),
        (Some(0), Some(4))
    );
    let d = ok_json(&store, &["diff", "m", "m-npz"]);
    assert_eq!(d["equal"].as_array().unwrap().len(), 4, "{d}");
    // Back to safetensors from the npz model: same bytes as the original data.
    let s = fx.path("m2.safetensors");
    run_ok(&mut cmd(&store, &["export", "m-npz", s.to_str().unwrap()]));
    let d2 = ok_json(&store, &["add", s.to_str().unwrap(), "--name", "m2"]);
    assert_eq!(d2["new"], 0);
}

#[test]
fn sync_to_s3_and_back_into_a_second_store() {
    for engine in testenv::s3_engines() {
        sync_round_trip(&engine);
    }
}

fn sync_round_trip(engine: &testenv::S3Engine) {
    let fx = Fixture::new();
    let base = match testenv::model_path() {
        Some(m) => m,
        None => fx.write("model.safetensors", &synthetic_model(20, 256)),
    };
    let (ft_bytes, ft) = finetune::make_finetune_bytes(&std::fs::read(&base).unwrap(), 7).unwrap();
    let ft_path = fx.write("ft.safetensors", &ft_bytes);
    let a = fx.path("a.h5");
    ok_json(&a, &["add", base.to_str().unwrap(), "--name", "base"]);
    let f = ok_json(
        &a,
        &[
            "add",
            ft_path.to_str().unwrap(),
            "--name",
            "ft",
            "--reference",
            "base",
        ],
    );
    assert_eq!(f["delta_coded"], ft.changed.len() as u64);

    let bucket = unique_name("coral-cli");
    create_bucket_on(engine, &bucket).unwrap();
    let remote = format!("s3://{bucket}/models");
    let sync = |src: &str, dst: &str, extra: &[&str]| -> Value {
        let mut c = coral();
        with_engine_env(&mut c, engine);
        c.args(["sync", src, dst, "--json"]).args(extra);
        stdout_json(&run_ok(&mut c))
    };
    let a_s = a.to_str().unwrap();
    let dry = sync(a_s, &remote, &["--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    let up = sync(a_s, &remote, &[]);
    assert_eq!(up["manifests"]["moved"], 2, "{up}");
    assert_eq!(up["deltas"]["moved"], ft.changed.len() as u64, "{up}");
    assert_eq!(
        up["weights"]["moved"], dry["weights"]["moved"],
        "{up} vs {dry}"
    );
    let again = sync(a_s, &remote, &[]);
    assert_eq!(
        again["weights"]["moved"].as_u64().unwrap()
            + again["deltas"]["moved"].as_u64().unwrap()
            + again["manifests"]["moved"].as_u64().unwrap(),
        0,
        "{again}"
    );
    // The remote store through the command itself.
    let mut ls = coral();
    with_engine_env(&mut ls, engine);
    ls.args(["--store", &remote, "ls", "--json"]);
    assert_eq!(
        stdout_json(&run_ok(&mut ls))["models"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let b = fx.path("b.h5");
    let down = sync(&remote, b.to_str().unwrap(), &[]);
    assert_eq!(down["manifests"]["moved"], 2, "{down}");
    export_identical(&b, "base", &base, &fx.path("b-base.safetensors"));
    export_identical(&b, "ft", &ft_path, &fx.path("b-ft.safetensors"));
    assert!(ok_json(&b, &["verify"])["failures"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        ok_json(&b, &["info"])["deltas"]["total_deltas"],
        ft.changed.len() as u64
    );
}

#[test]
fn an_unreachable_endpoint_is_one_line() {
    let mut c = coral();
    with_s3_env(&mut c, "http://127.0.0.1:9");
    c.args(["--store", "s3://nowhere/x", "ls"]);
    let out = run_fail(&mut c);
    assert_one_line_error(&out, "");
}

#[test]
fn an_interrupted_add_leaves_the_store_as_it_was() {
    // Ctrl-C (SIGINT) exits 130, SIGTERM (a service manager) 143: 128 + the signal.
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        interrupted_add(signal, code);
    }
}

fn interrupted_add(signal: &str, code: i32) {
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let small = fx.write("small.safetensors", &synthetic_model(2, 8));
    ok_json(&store, &["add", small.to_str().unwrap(), "--name", "small"]);
    let weights = ok_json(&store, &["ls", "--weights"]);
    // 150 tensors of 1 MiB: long enough to be interrupted half-way.
    let big = fx.write("big.safetensors", &synthetic_model(150, 16384));
    let child = cmd(&store, &["add", big.to_str().unwrap(), "--name", "big"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_one_line_error_with(&out, "interrupted", code);
    assert_eq!(ok_json(&store, &["ls", "--weights"]), weights);
    assert_eq!(
        ok_json(&store, &["ls"])["models"].as_array().unwrap().len(),
        1
    );
    assert!(ok_json(&store, &["verify"])["failures"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn readers_are_not_refused_while_a_writer_holds_the_store() {
    let fx = Fixture::new();
    let store = fx.path("coral.h5");
    let model = fx.write("m.safetensors", &synthetic_model(4, 64));
    run_ok(&mut cmd(
        &store,
        &["add", model.to_str().unwrap(), "--name", "m"],
    ));
    // This process holds the store for writing, as a long `coral add` would.
    let writer = coral_hdf5::HDF5Store::open(&store, coral_hdf5::HDF5StoreOptions::new()).unwrap();
    let ls = stdout_text(&run_ok(&mut cmd(&store, &["ls"])));
    assert!(ls.contains('m'), "{ls}");
    run_ok(&mut cmd(&store, &["show", "m"]));
    run_ok(&mut cmd(&store, &["verify"]));
    export_identical(&store, "m", &model, &fx.path("out.safetensors"));
    // A second writer waits, then says who holds the store, in one line.
    let t = std::time::Instant::now();
    let out = run_fail(&mut cmd(
        &store,
        &[
            "--wait",
            "0.5",
            "add",
            model.to_str().unwrap(),
            "--name",
            "m2",
        ],
    ));
    assert!(t.elapsed() >= std::time::Duration::from_millis(500));
    assert_one_line_error(&out, &format!("writer (pid {})", std::process::id()));
    drop(writer);
    run_ok(&mut cmd(
        &store,
        &["add", model.to_str().unwrap(), "--name", "m2"],
    ));
    let ls = stdout_text(&run_ok(&mut cmd(&store, &["ls"])));
    assert!(ls.contains("m2"), "{ls}");
}

/// A small file system of its own for the store (a tmpfs, mounted by root; CI runs as root).
/// `None` when this user cannot mount.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        let mnt = dir.join("small");
        std::fs::create_dir_all(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "root could not mount a tmpfs");
        Some(SmallFs(mnt))
    }
    fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_and_a_read_only_file_system_are_one_line_and_lose_nothing() {
    let fx = Fixture::new();
    let Some(fs) = SmallFs::mount(fx.dir.path(), "160k") else {
        return;
    };
    let store = fs.0.join("coral.h5");
    let small = fx.write("small.safetensors", &synthetic_model(2, 16));
    let big = fx.write("big.safetensors", &synthetic_model(40, 256));
    run_ok(&mut cmd(
        &store,
        &["add", small.to_str().unwrap(), "--name", "small"],
    ));
    // The disk fills in the middle of an add: one line that says so, and nothing half-added.
    let out = run_fail(&mut cmd(
        &store,
        &["add", big.to_str().unwrap(), "--name", "big"],
    ));
    assert_one_line_error(&out, "No space left on device");
    assert!(String::from_utf8_lossy(&out.stderr).contains(store.to_str().unwrap()));
    let ls = ok_json(&store, &["ls", "--weights"]);
    assert_eq!(ls["weights"].as_array().map(|a| a.len()), Some(3), "{ls}");
    let info = ok_json(&store, &["info"]);
    assert_eq!(info["total_weights"], 3, "{info}");
    assert_eq!(info["models"], 1, "{info}");
    run_ok(&mut cmd(&store, &["verify"]));
    export_identical(&store, "small", &small, &fx.path("out.safetensors"));
    // Once there is room, the store takes the model with no manual step.
    fs.remount("size=4m");
    run_ok(&mut cmd(
        &store,
        &["add", big.to_str().unwrap(), "--name", "big"],
    ));
    export_identical(&store, "big", &big, &fx.path("big-out.safetensors"));
    // A read-only file system: writes are refused in one line, reads still work.
    fs.remount("ro");
    let out = run_fail(&mut cmd(&store, &["rm", "big"]));
    assert_one_line_error(&out, "Read-only file system");
    run_ok(&mut cmd(&store, &["ls"]));
    export_identical(&store, "big", &big, &fx.path("big-out2.safetensors"));
}

/// The space of removed models comes back with `coral compact`: add a model, its fine-tune (as
/// deltas) and another model, remove that one, collect its weights, compact; the file shrinks,
/// both remaining models export byte for byte and verify.
#[test]
fn compact_gives_back_the_space_of_removed_models() {
    let fx = Fixture::new();
    let store = fx.path("c.h5");
    let base_bytes = synthetic_model(12, 512);
    let base = fx.write("base.safetensors", &base_bytes);
    let (ft_bytes, ft) =
        finetune::make_finetune_bytes(&base_bytes, finetune::DEFAULT_SEED).unwrap();
    let ft_path = fx.write("ft.safetensors", &ft_bytes);
    let other = fx.write("other.safetensors", &synthetic_model(20, 700));
    ok_json(&store, &["add", base.to_str().unwrap(), "--name", "base"]);
    let f = ok_json(
        &store,
        &[
            "add",
            ft_path.to_str().unwrap(),
            "--name",
            "ft",
            "--reference",
            "base",
        ],
    );
    assert_eq!(f["delta_coded"], ft.changed.len() as u64, "{f}");
    ok_json(&store, &["add", other.to_str().unwrap(), "--name", "other"]);
    let with_other = std::fs::metadata(&store).unwrap().len();
    run_ok(&mut cmd(&store, &["rm", "other"]));
    let g = ok_json(&store, &["gc"]);
    assert!(!g["weights"].as_array().unwrap().is_empty(), "{g}");
    // HDF5 gives back space freed at the end of the file when it closes (most of `other`'s
    // here, in 1.10's formats); compaction gives back the rest, wherever it lies.
    let before = std::fs::metadata(&store).unwrap().len();

    let c = ok_json(&store, &["compact"]);
    let after = std::fs::metadata(&store).unwrap().len();
    assert_eq!(c["bytes_before"], before, "{c}");
    assert_eq!(c["bytes_after"], after, "{c}");
    assert_eq!(c["reclaimed"], before - after, "{c}");
    assert!(after < before, "compact gave back nothing: {c}");
    assert!(
        after * 2 < with_other,
        "{after} bytes left of {with_other}: {c}"
    );
    assert_eq!(c["deltas"], ft.changed.len() as u64, "{c}");
    assert_eq!(c["manifests"], 2, "{c}");
    assert!(c["skipped"].as_array().unwrap().is_empty(), "{c}");
    assert!(!fx.path("c.h5.compact-tmp").exists());

    export_identical(&store, "base", &base, &fx.path("base.out.safetensors"));
    export_identical(&store, "ft", &ft_path, &fx.path("ft.out.safetensors"));
    let v = ok_json(&store, &["verify"]);
    assert!(v["failures"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["manifests"], 2, "{v}");

    // The text output is one line; a second compaction finds nothing to give back.
    let text = stdout_text(&run_ok(&mut cmd(&store, &["compact"])));
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(
        text.starts_with(&format!("compacted {}: ", store.display()))
            && text.contains("(0 B reclaimed) in "),
        "{text}"
    );
    assert_eq!(std::fs::metadata(&store).unwrap().len(), after);

    // Not for S3 stores, nor a missing store (which is not created).
    assert_one_line_error(
        &run_fail(&mut cmd(Path::new("s3://bucket/prefix"), &["compact"])),
        "compact applies to HDF5 stores",
    );
    assert_one_line_error(
        &run_fail(&mut cmd(&fx.path("absent.h5"), &["compact"])),
        "no store at",
    );
    assert!(!fx.path("absent.h5").exists());
}

/// Keeping the last two of nine checkpoints (`rm` and `gc` after each add): freed space is
/// reused, and `gc` compacts once a quarter of the file is free, so the store ends within 1.25x
/// of a new store holding the same two models, with no explicit step.
#[test]
fn a_rotation_of_checkpoints_stays_near_the_size_of_a_new_store() {
    let fx = Fixture::new();
    let store = fx.path("rot.h5");
    let base = synthetic_model(30, 512);
    let steps: Vec<PathBuf> = (1..=9u64)
        .map(|k| {
            let (bytes, _) = finetune::make_finetune_bytes(&base, 1000 + k).unwrap();
            fx.write(&format!("step{k}.safetensors"), &bytes)
        })
        .collect();
    for (i, step) in steps.iter().enumerate() {
        let name = format!("s{}", i + 1);
        // Each checkpoint whole (a delta would keep the removed one's weights alive).
        run_ok(&mut cmd(
            &store,
            &[
                "add",
                step.to_str().unwrap(),
                "--name",
                &name,
                "--reference",
                "none",
            ],
        ));
        if i >= 2 {
            run_ok(&mut cmd(&store, &["rm", &format!("s{}", i - 1)]));
            let gc = ok_json(&store, &["gc"]);
            assert!(gc["bytes"].as_u64().unwrap_or(0) > 0, "{gc}");
        }
    }
    let fresh = fx.path("fresh.h5");
    for k in [8, 9] {
        let p = steps[k - 1].to_str().unwrap();
        let name = format!("s{k}");
        run_ok(&mut cmd(
            &fresh,
            &["add", p, "--name", &name, "--reference", "none"],
        ));
    }
    let (a, b) = (
        std::fs::metadata(&store).unwrap().len(),
        std::fs::metadata(&fresh).unwrap().len(),
    );
    let ratio = a as f64 / b as f64;
    eprintln!("rotation: {a} B, a new store: {b} B, {ratio:.3}x");
    assert!(ratio <= 1.25, "the rotated store is {ratio:.3}x a new one");
    for k in [8, 9] {
        export_identical(
            &store,
            &format!("s{k}"),
            &steps[k - 1],
            &fx.path(&format!("out{k}.safetensors")),
        );
    }
    let info = ok_json(&store, &["info"]);
    let free = info["reclaimable_bytes"].as_u64().unwrap();
    assert!(free < a, "{info}");
    run_ok(&mut cmd(&store, &["verify"]));
}

/// The same model added to two new stores gives the same file, byte for byte, once the time the
/// manifest records is fixed (`SOURCE_DATE_EPOCH`).
#[test]
fn the_same_model_gives_the_same_store_file() {
    let fx = Fixture::new();
    let model = fx.write("m.safetensors", &synthetic_model(24, 512));
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let store = fx.path(&format!("s{i}.h5"));
            let mut c = cmd(&store, &["add", model.to_str().unwrap(), "--name", "m"]);
            c.env("SOURCE_DATE_EPOCH", "1764000000");
            run_ok(&mut c);
            std::fs::read(&store).unwrap()
        })
        .collect();
    assert!(
        files[1] == files[0] && files[2] == files[0],
        "the files differ"
    );
}

/// `coral repair OUT` on a store with one damaged weight: everything that verifies is copied
/// into OUT (which verifies clean and exports byte for byte), and the weight and the models
/// that need it are listed as lost, with the reason.
#[test]
fn repair_copies_what_verifies_and_lists_what_was_lost() {
    let Some(python) = testenv::python() else {
        return;
    };
    let fx = Fixture::new();
    let store = fx.path("s.h5");
    let base_bytes = synthetic_model(12, 512);
    let base = fx.write("base.safetensors", &base_bytes);
    let (ft_bytes, _) = finetune::make_finetune_bytes(&base_bytes, finetune::DEFAULT_SEED).unwrap();
    let ft = fx.write("ft.safetensors", &ft_bytes);
    let other = fx.write("other.safetensors", &synthetic_model(20, 700));
    ok_json(&store, &["add", base.to_str().unwrap(), "--name", "base"]);
    let f = ok_json(
        &store,
        &[
            "add",
            ft.to_str().unwrap(),
            "--name",
            "ft",
            "--reference",
            "base",
        ],
    );
    assert!(f["delta_coded"].as_u64().unwrap() > 0, "{f}");
    ok_json(&store, &["add", other.to_str().unwrap(), "--name", "other"]);

    // Damage one byte inside the stored data of base's first tensor (found with h5py).
    let shown = ok_json(&store, &["show", "base"]);
    let key = shown["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "layer.00.weight")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let script = format!(
        "import h5py\nf = h5py.File({:?}, 'r')\ni = f['weights'][{key:?}].id.get_chunk_info(0)\nprint(i.byte_offset, i.size)\n",
        store.to_str().unwrap()
    );
    let out = run_ok(Command::new(&python).args(["-c", &script]));
    let text = stdout_text(&out);
    let mut it = text.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    let (offset, size) = (it.next().unwrap(), it.next().unwrap());
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[(offset + size / 2) as usize] ^= 0x10;
    std::fs::write(&store, &bytes).unwrap();

    let damaged = stdout_json(&run_fail(&mut cmd(&store, &["verify", "--json"])));
    assert!(damaged.to_string().contains(&key), "{damaged}");

    let out = fx.path("repaired.h5");
    let r = ok_json(&store, &["repair", out.to_str().unwrap()]);
    let lost = r["lost"].as_array().unwrap();
    let lost_ids: Vec<&str> = lost.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert!(lost_ids.contains(&key.as_str()), "{r}");
    assert!(lost_ids.contains(&"base"), "{r}");
    assert!(lost_ids.contains(&"ft"), "{r}");
    assert!(!lost_ids.contains(&"other"), "{r}");
    let base_lost = lost.iter().find(|l| l["id"] == "base").unwrap();
    assert!(
        base_lost["error"]
            .as_str()
            .unwrap()
            .contains(&format!("\"layer.00.weight\": {key} was lost")),
        "{r}"
    );
    assert_eq!(r["manifests"], 1, "{r}");
    // Everything else made it: the whole store but the lost weight (and deltas that need it).
    let copied = r["weights"].as_u64().unwrap() + r["deltas"].as_u64().unwrap();
    let lost_objects = lost.iter().filter(|l| l["kind"] != "manifest").count() as u64;
    assert_eq!(
        copied + lost_objects,
        damaged["weights"].as_u64().unwrap() + damaged["deltas"].as_u64().unwrap(),
        "{r} {damaged}"
    );

    let v = ok_json(&out, &["verify"]);
    assert!(v["failures"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["manifests"], 1, "{v}");
    export_identical(&out, "other", &other, &fx.path("other.out.safetensors"));
    // The text form lists each loss on a line of its own, then the totals.
    let text = stdout_text(&run_ok(&mut cmd(
        &store,
        &["repair", fx.path("again.h5").to_str().unwrap()],
    )));
    assert!(text.contains(&format!("LOST weight {key}: ")), "{text}");
    assert!(
        text.trim_end().ends_with(&format!("{} lost", lost.len())),
        "{text}"
    );

    // A new store only: not the store itself, not a file that exists.
    assert_one_line_error(
        &run_fail(&mut cmd(&store, &["repair", store.to_str().unwrap()])),
        "is the store itself",
    );
    assert_one_line_error(
        &run_fail(&mut cmd(&store, &["repair", out.to_str().unwrap()])),
        "exists",
    );
}

/// Reading a bucket that does not exist says so in one line and creates nothing; the first
/// write creates it (the seed's auto-creation).
#[test]
fn reads_never_create_the_bucket() {
    for engine in testenv::s3_engines() {
        reads_never_create_on(&engine);
    }
}

fn reads_never_create_on(engine: &testenv::S3Engine) {
    let bucket = unique_name("coral-missing");
    let store = format!("s3://{bucket}/coral");
    for args in [
        &["ls"][..],
        &["info"],
        &["verify"],
        &["show", "m"],
        &["export", "m", "/nonexistent/out.safetensors"],
    ] {
        let mut c = coral();
        with_engine_env(&mut c, engine);
        c.args(["--store", &store]).args(args);
        assert_one_line_error(&run_fail(&mut c), "does not exist");
    }
    // Still not there: a sync from it fails the same way, and creates nothing either.
    let fx = Fixture::new();
    let mut c = coral();
    with_engine_env(&mut c, engine);
    c.args(["sync", &store, fx.path("d.h5").to_str().unwrap()]);
    assert_one_line_error(&run_fail(&mut c), "does not exist");
    // A write creates it.
    let model = fx.write("m.safetensors", &synthetic_model(2, 8));
    let mut c = coral();
    with_engine_env(&mut c, engine);
    c.args([
        "--store",
        &store,
        "add",
        model.to_str().unwrap(),
        "--name",
        "m",
    ]);
    run_ok(&mut c);
    let mut c = coral();
    with_engine_env(&mut c, engine);
    c.args(["--store", &store, "ls"]);
    assert!(stdout_text(&run_ok(&mut c)).contains('m'));
}

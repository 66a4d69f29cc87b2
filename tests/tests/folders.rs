//! End-to-end tests of model folders: a generated Hugging Face style checkpoint (3 shards, an
//! index, config, tokenizer files, a nested folder, a binary blob, a link, an empty folder) and
//! its dense bf16 fine-tune, through the real `coral` binary, on HDF5 and through S3.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coral_tests::{
    coral, create_bucket_on, run_fail, run_ok, stdout_json, stdout_text, testenv, unique_name,
    with_engine_env,
};
use serde_json::Value;

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

fn one_line_error(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
    assert!(!err.contains("panicked"), "{err:?}");
}

/// xorshift64*: a fixed-seed generator for reproducible weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// N(0, 1) by Box–Muller.
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// The tensors of a small Llama-like model, by shard: (name, shape).
fn layout() -> Vec<Vec<(String, Vec<usize>)>> {
    let (vocab, hidden, inter, layers) = (512usize, 128usize, 344usize, 6usize);
    let mut shards = vec![vec![(
        "model.embed_tokens.weight".to_string(),
        vec![vocab, hidden],
    )]];
    for l in 0..layers {
        if shards.len() < 1 + l * 2 / layers {
            shards.push(Vec::new());
        }
        let shard = shards.last_mut().unwrap();
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden / 2, hidden]),
            ("self_attn.v_proj.weight", vec![hidden / 2, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("input_layernorm.weight", vec![hidden]),
        ] {
            shard.push((format!("{p}.{n}"), s));
        }
    }
    shards.push(vec![
        ("model.norm.weight".to_string(), vec![hidden]),
        ("lm_head.weight".to_string(), vec![vocab, hidden]),
    ]);
    shards
}

fn bf16(x: f32) -> [u8; 2] {
    half::bf16::from_f32(x).to_le_bytes()
}

/// A bf16 tensor: name, shape, values.
type Bf16Tensor = (String, Vec<usize>, Vec<[u8; 2]>);

/// A safetensors file of bf16 tensors.
fn safetensors(tensors: &[Bf16Tensor]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, shape, v) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + v.len() * 2]}),
        );
        off += v.len() * 2;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while (text.len() + 8) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    for (_, _, v) in tensors {
        for b in v {
            out.extend_from_slice(b);
        }
    }
    out
}

/// Writes a checkpoint folder. With `finetune`, every weight w becomes w + 1e-3·N(0,1)·|w|
/// before the bf16 rounding (a dense step: about one element in seven moves by an ulp), and
/// the training state blob changes in a few bytes. Returns the tensors by name, as bf16 bytes.
fn write_checkpoint(dir: &Path, finetune: bool) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng(0x5EED_C0DE);
    let mut step = Rng(0xF1E7_07E5);
    let shards = layout();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut all = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let mut tensors = Vec::new();
        for (name, shape) in shard {
            let count: usize = shape.iter().product();
            let norm = shape.len() == 1;
            let v: Vec<[u8; 2]> = (0..count)
                .map(|_| {
                    let mut w = if norm {
                        1.0 + 0.05 * rng.normal()
                    } else {
                        0.02 * rng.normal()
                    };
                    let noise = step.normal();
                    if finetune {
                        w += 1e-3 * noise * w.abs();
                    }
                    bf16(w as f32)
                })
                .collect();
            all.push((name.clone(), v.iter().flatten().copied().collect()));
            weight_map.insert(name.clone(), Value::String(file.clone()));
            tensors.push((name.clone(), shape.clone(), v));
        }
        std::fs::write(dir.join(&file), safetensors(&tensors)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        br#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_hidden_layers": 6}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        br#"{"bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .unwrap();
    // A tokenizer of some size, and a nested folder.
    let vocab: String = (0..20_000).map(|i| format!("tok{i}\n")).collect();
    std::fs::write(
        dir.join("tokenizer.json"),
        format!("{{\"vocab\": {vocab:?}}}"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("tokenizer/extra")).unwrap();
    std::fs::write(dir.join("tokenizer/vocab.txt"), &vocab).unwrap();
    std::fs::write(dir.join("tokenizer/extra/merges.txt"), b"a b\nab c\n").unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::os::unix::fs::symlink("tokenizer/vocab.txt", dir.join("vocab-link.txt")).unwrap();
    // A binary blob of 8 MB (chunked), changed in a few bytes by the fine-tune.
    let mut blob_rng = Rng(0xB10B);
    let mut blob: Vec<u8> = (0..8_000_000).map(|_| blob_rng.next() as u8).collect();
    if finetune {
        blob[4_000_000..4_000_016].copy_from_slice(b"step 1000 state!");
    }
    std::fs::write(dir.join("training_args.bin"), &blob).unwrap();
    let run = dir.join("run.sh");
    std::fs::write(&run, b"#!/bin/sh\necho train\n").unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("README.md"), b"# A checkpoint\n").unwrap();
    all
}

/// `diff -r` finds nothing, and the modes of files agree.
fn assert_same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diff -r {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();
    for rel in ["run.sh", "config.json", "tokenizer", "empty"] {
        assert_eq!(mode(&a.join(rel)), mode(&b.join(rel)), "{rel}");
    }
    assert_eq!(
        std::fs::read_link(b.join("vocab-link.txt")).unwrap(),
        PathBuf::from("tokenizer/vocab.txt")
    );
}

#[test]
fn a_checkpoint_folder_and_its_finetune_go_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = (
        dir.path().join("checkpoint-0"),
        dir.path().join("checkpoint-1000"),
    );
    let base_tensors = write_checkpoint(&base, false);
    let ft_tensors = write_checkpoint(&ft, true);
    let store = dir.path().join("store.h5");

    let b = ok_json(&store, &["add", base.to_str().unwrap()]);
    assert_eq!(b["name"], "checkpoint-0", "{b}");
    assert_eq!(b["format"], "folder");
    assert_eq!(b["tensors"], 51);
    assert_eq!(b["delta_coded"], 0);
    assert_eq!(b["reference"], Value::Null);
    // Per-file figures.
    let files = b["files"].as_array().unwrap();
    let blob = files
        .iter()
        .find(|f| f["path"] == "training_args.bin")
        .unwrap();
    assert_eq!(blob["kind"], "blob");
    assert!(blob["parts"].as_u64().unwrap() >= 2, "{blob}");
    assert_eq!(
        files.iter().filter(|f| f["kind"] == "safetensors").count(),
        3
    );

    // The fine-tune, without --reference: the base is chosen, and says so.
    let out = run_ok(&mut cmd(
        &store,
        &["add", ft.to_str().unwrap(), "--name", "ft"],
    ));
    let text = stdout_text(&out);
    assert!(
        text.contains("delta-coded against checkpoint-0, chosen automatically"),
        "{text}"
    );
    let show = ok_json(&store, &["show", "ft"]);
    assert_eq!(show["parent"], "checkpoint-0");
    let info_ft = ok_json(&store, &["info"]);
    let ls = ok_json(&store, &["ls"]);
    assert_eq!(ls["models"].as_array().unwrap().len(), 2, "{ls}");
    assert_eq!(ls["models"][1]["files"], 13, "{ls}");
    drop(info_ft);

    // What the fine-tune cost against what the base cost: a dense bf16 step is at most 20%.
    let again = tempfile::tempdir().unwrap();
    let s2 = again.path().join("s.h5");
    let b2 = ok_json(&s2, &["add", base.to_str().unwrap()]);
    let f2 = ok_json(&s2, &["add", ft.to_str().unwrap(), "--name", "ft"]);
    let (base_cost, ft_cost) = (
        b2["bytes_stored"].as_u64().unwrap(),
        f2["bytes_stored"].as_u64().unwrap(),
    );
    assert!(f2["delta_coded"].as_u64().unwrap() >= 40, "{f2}");
    assert_eq!(f2["reference_auto"], true);
    assert!(
        ft_cost * 5 <= base_cost,
        "the fine-tune cost {ft_cost} B, the base {base_cost} B: {f2}"
    );
    // The dense step alone, the shards' cost: at most a fifth too.
    let shards_cost = |r: &Value| -> u64 {
        r["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["kind"] == "safetensors")
            .map(|f| f["bytes_stored"].as_u64().unwrap())
            .sum()
    };
    let (bs, fs) = (shards_cost(&b2), shards_cost(&f2));
    eprintln!(
        "stored: base {base_cost} B ({bs} B of shards), fine-tune {ft_cost} B ({fs} B of shards)"
    );
    assert!(
        fs * 5 <= bs,
        "the fine-tune's shards cost {fs} B, the base's {bs} B"
    );
    // Unchanged files are reused whole; the changed blob costs only its changed chunk(s).
    let ffiles = f2["files"].as_array().unwrap();
    let by = |p: &str| ffiles.iter().find(|f| f["path"] == p).unwrap().clone();
    assert_eq!(by("config.json")["bytes_stored"], 0);
    assert_eq!(by("tokenizer.json")["bytes_stored"], 0);
    let tb = by("training_args.bin");
    assert_eq!(
        tb["reused"].as_u64().unwrap() + 1,
        tb["parts"].as_u64().unwrap(),
        "{tb}"
    );
    assert!(tb["bytes_stored"].as_u64().unwrap() < 4_500_000, "{tb}");

    // Both come back byte for byte, modes and links included.
    for (model, orig) in [("checkpoint-0", &base), ("ft", &ft)] {
        let out = dir.path().join(format!("out-{model}"));
        let r = ok_json(&store, &["export", model, out.to_str().unwrap()]);
        assert_same_tree(orig, &out);
        // --json lists every entry with its size.
        let files = r["files"].as_array().unwrap();
        assert_eq!(files.len(), 16, "{r}");
        let blob = files
            .iter()
            .find(|f| f["path"] == "training_args.bin")
            .unwrap();
        assert_eq!(blob["bytes"], 8_000_000, "{r}");
        assert_eq!(r["bytes"], b["bytes_in"], "{r}");
    }
    // An export into a folder that is not empty needs --force; an empty one is fine.
    let busy = dir.path().join("out-ft");
    let e = run_fail(&mut cmd(&store, &["export", "ft", busy.to_str().unwrap()]));
    one_line_error(&e, "is not empty; use --force");
    std::fs::write(busy.join("stray.txt"), b"x").unwrap();
    run_ok(&mut cmd(
        &store,
        &["export", "checkpoint-0", busy.to_str().unwrap(), "--force"],
    ));
    assert_same_tree(&base, &busy);
    let empty = dir.path().join("empty-out");
    std::fs::create_dir(&empty).unwrap();
    run_ok(&mut cmd(&store, &["export", "ft", empty.to_str().unwrap()]));
    assert_same_tree(&ft, &empty);
    // No temporary folder is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("coral-tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // One tensor out: exactly the original's bytes.
    let name = "model.layers.3.mlp.up_proj.weight";
    let one = dir.path().join("one.safetensors");
    let r = ok_json(
        &store,
        &["export", "ft", one.to_str().unwrap(), "--tensor", name],
    );
    assert_eq!(r["tensors"][0], name);
    let bytes = std::fs::read(&one).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), 1);
    let want = &ft_tensors.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(st.tensor(name).unwrap().data(), want.as_slice());
    assert_eq!(st.tensor(name).unwrap().shape(), [344, 128]);
    // Two tensors; a missing one and a bf16 .npy are refused in one line.
    let two = dir.path().join("two.safetensors");
    run_ok(&mut cmd(
        &store,
        &[
            "export",
            "checkpoint-0",
            two.to_str().unwrap(),
            "--tensor",
            "model.norm.weight",
            "--tensor",
            "model.embed_tokens.weight",
        ],
    ));
    let bytes = std::fs::read(&two).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let emb = &base_tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1;
    assert_eq!(
        st.tensor("model.embed_tokens.weight").unwrap().data(),
        emb.as_slice()
    );
    let e = run_fail(&mut cmd(
        &store,
        &["export", "ft", one.to_str().unwrap(), "--tensor", "nope"],
    ));
    one_line_error(&e, "has no tensor \"nope\"");
    let e = run_fail(&mut cmd(
        &store,
        &[
            "export",
            "ft",
            dir.path().join("x.npy").to_str().unwrap(),
            "--tensor",
            name,
        ],
    ));
    one_line_error(&e, "bfloat16");
    // A folder model does not go into one file.
    let e = run_fail(&mut cmd(
        &store,
        &[
            "export",
            "ft",
            dir.path().join("x.safetensors").to_str().unwrap(),
        ],
    ));
    one_line_error(&e, "is a folder");

    // show, diff, verify understand folders.
    let text = stdout_text(&run_ok(&mut cmd(&store, &["show", "ft"])));
    assert!(text.contains("files    13"), "{text}");
    assert!(text.contains("  tokenizer/extra/merges.txt"), "{text}");
    assert!(
        text.contains("  vocab-link.txt -> tokenizer/vocab.txt"),
        "{text}"
    );
    let d = ok_json(&store, &["diff", "checkpoint-0", "ft"]);
    let fd = &d["files"];
    let changed: Vec<&str> = fd["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        changed,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "training_args.bin"
        ],
        "{d}"
    );
    assert!(fd["equal"].as_array().unwrap().len() >= 10, "{d}");
    assert_eq!(d["changed"].as_array().unwrap().len(), 51);
    let v = ok_json(&store, &["verify"]);
    assert!(v["failures"].as_array().unwrap().is_empty(), "{v}");

    // rm and gc take the blobs with them.
    run_ok(&mut cmd(&store, &["rm", "ft"]));
    run_ok(&mut cmd(&store, &["rm", "checkpoint-0"]));
    run_ok(&mut cmd(&store, &["gc", "--grace", "0s"]));
    let info = ok_json(&store, &["info"]);
    assert_eq!(info["total_weights"], 0, "{info}");
}

#[test]
fn folders_with_what_coral_cannot_keep_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.h5");
    let f = dir.path().join("ckpt");
    std::fs::create_dir_all(f.join("sub")).unwrap();
    std::fs::write(f.join("config.json"), b"{}").unwrap();
    std::os::unix::fs::symlink("../../../etc/passwd", f.join("sub/escape")).unwrap();
    let e = run_fail(&mut cmd(&store, &["add", f.to_str().unwrap()]));
    one_line_error(&e, "points outside the folder");
    std::fs::remove_file(f.join("sub/escape")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", f.join("abs")).unwrap();
    let e = run_fail(&mut cmd(&store, &["add", f.to_str().unwrap()]));
    one_line_error(&e, "points outside the folder");
    std::fs::remove_file(f.join("abs")).unwrap();
    let fifo = std::ffi::CString::new(f.join("pipe").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let e = run_fail(&mut cmd(&store, &["add", f.to_str().unwrap()]));
    one_line_error(&e, "is a FIFO");
    std::fs::remove_file(f.join("pipe")).unwrap();
    // A broken shard is named.
    std::fs::write(
        f.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{",
    )
    .unwrap();
    let e = run_fail(&mut cmd(&store, &["add", f.to_str().unwrap()]));
    one_line_error(&e, "model.safetensors");
    std::fs::remove_file(f.join("model.safetensors")).unwrap();
    // Nothing was stored by the failures.
    assert!(
        !store.exists()
            || ok_json(&store, &["ls"])["models"]
                .as_array()
                .unwrap()
                .is_empty()
    );

    // A PyTorch pickle is a blob inside a folder, and refused, by name, at the top level.
    let pickle = f.join("pytorch_model.bin");
    std::fs::write(
        &pickle,
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}q\x00.",
    )
    .unwrap();
    let e = run_fail(&mut cmd(&store, &["add", pickle.to_str().unwrap()]));
    one_line_error(&e, "PyTorch pickle");
    let r = ok_json(&store, &["add", f.to_str().unwrap(), "--name", "pt"]);
    assert_eq!(r["tensors"], 0);
    let out = dir.path().join("out");
    run_ok(&mut cmd(&store, &["export", "pt", out.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(out.join("pytorch_model.bin")).unwrap(),
        std::fs::read(&pickle).unwrap()
    );
}

#[test]
fn folder_models_sync_to_s3_and_back() {
    for engine in testenv::s3_engines() {
        let dir = tempfile::tempdir().unwrap();
        let (base, ft) = (dir.path().join("base"), dir.path().join("ft"));
        write_checkpoint(&base, false);
        write_checkpoint(&ft, true);
        let a = dir.path().join("a.h5");
        ok_json(&a, &["add", base.to_str().unwrap()]);
        ok_json(&a, &["add", ft.to_str().unwrap()]);
        let bucket = unique_name("coral-folders");
        create_bucket_on(&engine, &bucket).unwrap();
        let remote = format!("s3://{bucket}/m");
        let sync = |src: &str, dst: &str| -> Value {
            let mut c = coral();
            with_engine_env(&mut c, &engine);
            c.args(["sync", src, dst, "--json"]);
            stdout_json(&run_ok(&mut c))
        };
        let up = sync(a.to_str().unwrap(), &remote);
        assert_eq!(up["manifests"]["moved"], 2, "{up}");
        // Straight from S3, and back into a second local store.
        let mut c = coral();
        with_engine_env(&mut c, &engine);
        let from_s3 = dir.path().join("from-s3");
        c.args([
            "--store",
            &remote,
            "export",
            "ft",
            from_s3.to_str().unwrap(),
        ]);
        run_ok(&mut c);
        assert_same_tree(&ft, &from_s3);
        let b = dir.path().join("b.h5");
        let down = sync(&remote, b.to_str().unwrap());
        assert_eq!(down["manifests"]["moved"], 2, "{down}");
        let out = dir.path().join("from-b");
        run_ok(&mut cmd(&b, &["export", "base", out.to_str().unwrap()]));
        assert_same_tree(&base, &out);
        let v = ok_json(&b, &["verify"]);
        assert!(v["failures"].as_array().unwrap().is_empty(), "{v}");
    }
}

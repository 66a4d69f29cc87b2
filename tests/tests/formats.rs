//! End-to-end tests of the `coral` command on model files of every kind: the formats it does
//! not read are named in one line, the NumPy files it reads include ZIP64 archives.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coral_tests::{coral, run_fail, run_ok, sha256_file, stdout_json};
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

/// A failure must be one line on stderr, starting with "error:", never a panic.
fn assert_one_line_error(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err:?}"
    );
    assert!(lines[0].contains(want), "{want:?} not in {err:?}");
    assert_eq!(out.status.code(), Some(1), "{err}");
}

/// The NumPy-written fixtures of coral-formats.
fn fixture(name: &str) -> PathBuf {
    coral_tests::workspace_root()
        .join("crates/coral-formats/tests/data")
        .join(name)
}

/// A one-tensor safetensors file.
fn small_model(dtype: coral_core::DType) -> Vec<u8> {
    let (mut f, offsets) =
        coral_formats::safetensors::build_header(&[("w".into(), dtype, vec![2, 2])]).unwrap();
    f.extend((0..offsets[0][1]).map(|i| i as u8));
    f
}

#[test]
fn model_files_coral_does_not_read_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.h5");
    let good = dir.path().join("good.safetensors");
    std::fs::write(&good, small_model(coral_core::DType::F32)).unwrap();
    ok_json(&store, &["add", good.to_str().unwrap(), "--name", "good"]);
    let before = sha256_file(&store).unwrap();

    // torch.save of a dict before PyTorch 1.6: a pickle, protocol 2 (with the legacy magic
    // number), or any later protocol.
    let pickle4 =
        b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x06weight\x94K\x01s.".to_vec();
    let pickle2 = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.".to_vec();
    let mut gguf = b"GGUF\x03\x00\x00\x00".to_vec();
    gguf.extend([0u8; 16]);
    // torch.save since 1.6: a ZIP archive around archive/data.pkl.
    let torch_zip = {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = coral_formats::npz::Writer::new(&mut out);
        w.add("archive/data.pkl", &pickle2).unwrap();
        w.add("archive/data/0", &[0u8; 16]).unwrap();
        w.add("archive/version", b"3\n").unwrap();
        w.finish().unwrap();
        out.into_inner()
    };
    let mut hdf5 = b"\x89HDF\r\n\x1a\n".to_vec();
    hdf5.extend([0u8; 64]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "model.bin",
            pickle4,
            "model.bin is a PyTorch pickle checkpoint (Python pickle protocol 4); coral reads .safetensors, .npy and .npz",
        ),
        ("old.pt", pickle2, "old.pt is a PyTorch pickle checkpoint"),
        // The extension says safetensors; the content says otherwise.
        (
            "pytorch_model.safetensors",
            torch_zip,
            "pytorch_model.safetensors is a PyTorch zip checkpoint; coral reads",
        ),
        (
            "llama.gguf",
            gguf,
            "llama.gguf is a GGUF file (llama.cpp, version 3); coral reads .safetensors, .npy and .npz",
        ),
        ("weights.h5", hdf5, "weights.h5 is an HDF5 file"),
    ];
    for (file, bytes, want) in cases {
        let p = dir.path().join(file);
        std::fs::write(&p, bytes).unwrap();
        let out = run_fail(&mut cmd(
            &store,
            &["add", p.to_str().unwrap(), "--name", "x"],
        ));
        assert_one_line_error(&out, want);
        assert_eq!(
            sha256_file(&store).unwrap(),
            before,
            "{file} changed the store"
        );
    }
    // Without any magic it is still parsed as safetensors, with that parser's message.
    let p = dir.path().join("noise.bin");
    std::fs::write(&p, b"hello, I am not a model at all").unwrap();
    assert_one_line_error(
        &run_fail(&mut cmd(
            &store,
            &["add", p.to_str().unwrap(), "--name", "x"],
        )),
        "noise.bin is not a valid safetensors file: header length",
    );
    assert_eq!(sha256_file(&store).unwrap(), before);
}

#[test]
fn numpy_files_go_in_by_their_content_zip64_included() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.h5");
    // np.savez with ZIP64 extra fields in the central directory and a ZIP64 end record, and
    // np.savez_compressed: both hold the same six arrays.
    let a = ok_json(
        &store,
        &[
            "add",
            fixture("zip64.npz").to_str().unwrap(),
            "--name",
            "z64",
        ],
    );
    assert_eq!(
        (a["format"].as_str(), a["tensors"].as_u64()),
        (Some("npz"), Some(6))
    );
    let b = ok_json(
        &store,
        &[
            "add",
            fixture("savez_compressed.npz").to_str().unwrap(),
            "--name",
            "deflated",
        ],
    );
    assert_eq!(
        (b["new"].as_u64(), b["reused"].as_u64()),
        (Some(0), Some(6)),
        "{b}"
    );
    // An .npy under another extension is read as what it is.
    let bin = dir.path().join("array.bin");
    std::fs::copy(fixture("f4_2x3.npy"), &bin).unwrap();
    let c = ok_json(&store, &["add", bin.to_str().unwrap(), "--name", "arr"]);
    assert_eq!(c["format"], "npy");
    let out = dir.path().join("arr.npy");
    run_ok(&mut cmd(&store, &["export", "arr", out.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(fixture("f4_2x3.npy")).unwrap()
    );
    // A big-endian array is refused with what to do about it.
    assert_one_line_error(
        &run_fail(&mut cmd(
            &store,
            &["add", fixture("big_endian_f4.npy").to_str().unwrap()],
        )),
        "big-endian .npy dtype \">f4\" is not supported (convert it with arr.astype('<f4'))",
    );
}

#[test]
fn bfloat16_is_not_exported_to_numpy_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.h5");
    let m = dir.path().join("bf.safetensors");
    std::fs::write(&m, small_model(coral_core::DType::BF16)).unwrap();
    ok_json(&store, &["add", m.to_str().unwrap(), "--name", "bf"]);
    for ext in ["npy", "npz"] {
        let out = dir.path().join(format!("bf.{ext}"));
        assert_one_line_error(
            &run_fail(&mut cmd(&store, &["export", "bf", out.to_str().unwrap()])),
            "tensor \"w\": bfloat16 cannot be written as .npy: NumPy has no such dtype (export to .safetensors)",
        );
        assert!(!out.exists(), "a refused export left {}", out.display());
    }
    let out = dir.path().join("bf.out.safetensors");
    run_ok(&mut cmd(&store, &["export", "bf", out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&m).unwrap());
}

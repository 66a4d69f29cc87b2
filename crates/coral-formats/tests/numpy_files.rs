//! Files NumPy wrote (committed fixtures, `tests/data/gen.py`), read by this crate; files this
//! crate writes, read by NumPy (when `CORAL_TEST_PYTHON` is set); and random mutations of all
//! of them, which must never panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use coral_core::DType;
use coral_formats::detect::{detect, FileKind};
use coral_formats::npy::{self, NonNumpy, NpyError};
use coral_formats::{npz, safetensors};
use coral_store_api::testenv;

fn data(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The bytes of gen.py's `arr(dtype, shape)`: `arange` made boolean, halved less one, or modulo
/// 100, little-endian.
fn expected(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = Vec::new();
    for i in 0..n {
        let f = i as f64 * 0.5 - 1.0;
        let k = (i % 100) as u64;
        match dtype {
            DType::Bool => out.push(u8::from(i % 3 == 1)),
            DType::F16 => out.extend(half::f16::from_f64(f).to_le_bytes()),
            DType::F32 => out.extend((f as f32).to_le_bytes()),
            DType::F64 => out.extend(f.to_le_bytes()),
            DType::U8 | DType::I8 => out.push(k as u8),
            DType::U16 | DType::I16 => out.extend((k as u16).to_le_bytes()),
            DType::U32 | DType::I32 => out.extend((k as u32).to_le_bytes()),
            DType::U64 | DType::I64 => out.extend(k.to_le_bytes()),
            other => panic!("no fixture of {other}"),
        }
    }
    out
}

/// The `.npy` fixtures: file stem, dtype, shape.
fn npy_fixtures() -> Vec<(&'static str, DType, Vec<usize>)> {
    vec![
        ("f4_2x3", DType::F32, vec![2, 3]),
        ("f8_4", DType::F64, vec![4]),
        ("f2_3", DType::F16, vec![3]),
        ("i8_5", DType::I64, vec![5]),
        ("i4_2x2", DType::I32, vec![2, 2]),
        ("i2_3", DType::I16, vec![3]),
        ("i1_4", DType::I8, vec![4]),
        ("u8_2", DType::U64, vec![2]),
        ("u4_3", DType::U32, vec![3]),
        ("u2_3", DType::U16, vec![3]),
        ("u1_5", DType::U8, vec![5]),
        ("b1_4", DType::Bool, vec![4]),
        ("scalar_f8", DType::F64, vec![]),
        ("empty_f4", DType::F32, vec![0]),
        ("empty_i4_2x0", DType::I32, vec![2, 0]),
        ("f4_1x2x3x1", DType::F32, vec![1, 2, 3, 1]),
    ]
}

/// The members of the `.npz` fixtures, in the order NumPy wrote them.
const NPZ_MEMBERS: [&str; 6] = ["f4_2x3", "i8_5", "scalar_f8", "empty_f4", "b1_4", "u2_3"];

const NPZ_FIXTURES: [&str; 4] = [
    "savez.npz",
    "savez_compressed.npz",
    "zip64.npz",
    "zip64_deflated.npz",
];

#[test]
fn reads_every_npy_numpy_wrote() {
    for (stem, dtype, shape) in npy_fixtures() {
        let f = data(&format!("{stem}.npy"));
        let h = npy::parse(&f).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!((h.dtype, &h.shape), (dtype, &shape), "{stem}");
        assert_eq!(&f[h.data_start..], &expected(dtype, &shape)[..], "{stem}");
        assert_eq!(h.data_start % 64, 0, "{stem}: NumPy aligns the data");
        assert_eq!(detect(&f), FileKind::Npy);
    }
}

#[test]
fn refuses_what_numpy_wrote_that_coral_cannot_hold() {
    for (file, want) in [
        ("big_endian_f4.npy", "big-endian .npy dtype \">f4\""),
        ("fortran_f4.npy", "Fortran-ordered"),
        ("complex_c8.npy", "unsupported .npy dtype \"<c8\""),
        ("structured.npy", "structured dtype"),
    ] {
        let err = npy::parse(&data(file)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(want), "{file}: {want:?} not in {text:?}");
        assert!(!text.contains('\n'));
    }
    assert!(matches!(
        npy::parse(&data("big_endian_f4.npy")),
        Err(NpyError::BigEndian(_))
    ));
}

#[test]
fn reads_every_npz_numpy_wrote_zip64_included() {
    let fixtures: Vec<_> = npy_fixtures()
        .into_iter()
        .filter(|(s, _, _)| NPZ_MEMBERS.contains(s))
        .collect();
    for file in NPZ_FIXTURES {
        let z = data(file);
        assert_eq!(detect(&z), FileKind::Zip, "{file}");
        let members = npz::read(&z).unwrap_or_else(|e| panic!("{file}: {e}"));
        let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> = NPZ_MEMBERS.iter().map(|m| format!("{m}.npy")).collect();
        assert_eq!(names, want, "{file}");
        for ((name, bytes), stem) in members.iter().zip(NPZ_MEMBERS) {
            let (_, dtype, shape) = fixtures.iter().find(|(s, _, _)| *s == stem).unwrap();
            let h = npy::parse(bytes).unwrap_or_else(|e| panic!("{file} {name}: {e}"));
            assert_eq!((h.dtype, &h.shape), (*dtype, shape), "{file} {name}");
            assert_eq!(&bytes[h.data_start..], &expected(*dtype, shape)[..]);
            // The same member by name, its size known.
            let one = npz::read_member(&z, name, Some(bytes.len() as u64)).unwrap();
            assert_eq!(&one, bytes);
        }
    }
    // The ZIP64 fixtures really are: a ZIP64 end record and ZIP64 extra fields.
    for file in ["zip64.npz", "zip64_deflated.npz"] {
        let z = data(file);
        assert!(z.windows(4).any(|w| w == b"PK\x06\x06"), "{file}");
    }
    assert!(npz::read(&data("empty.npz")).unwrap().is_empty());
    assert_eq!(detect(&data("empty.npz")), FileKind::Zip);
}

/// xorshift64*: the fuzz test's mutations, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn a_safetensors_file() -> Vec<u8> {
    let (mut f, offsets) = safetensors::build_header(&[
        ("w".into(), DType::F32, vec![2, 3]),
        ("b".into(), DType::BF16, vec![3]),
        ("n".into(), DType::I64, vec![]),
    ])
    .unwrap();
    let end = offsets.last().map_or(0, |o| o[1]);
    f.extend((0..end).map(|i| i as u8));
    f
}

/// Every reader on `bytes`: each gives a value or an error, never a panic.
fn read_all_ways(bytes: &[u8]) {
    let _ = npy::parse(bytes);
    let _ = npy::parse_header(bytes);
    if let Ok(members) = npz::read(bytes) {
        for (_, m) in members {
            let _ = npy::parse(&m);
        }
    }
    let _ = npz::names(bytes);
    let _ = npz::read_member(bytes, "f4_2x3.npy", None);
    let _ = safetensors::parse(bytes);
    let _ = detect(bytes).describe();
}

#[test]
fn random_mutations_of_valid_files_never_panic() {
    let mut files: Vec<(String, Vec<u8>)> = npy_fixtures()
        .into_iter()
        .map(|(s, _, _)| (format!("{s}.npy"), data(&format!("{s}.npy"))))
        .collect();
    for f in NPZ_FIXTURES {
        files.push((f.to_owned(), data(f)));
    }
    files.push(("st".into(), a_safetensors_file()));
    let rounds: usize = std::env::var("CORAL_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut accepted = 0usize;
    for (name, original) in &files {
        for _ in 0..rounds {
            let mut f = original.clone();
            match rng.below(4) {
                // Flip a few bytes anywhere.
                0 | 1 => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(f.len());
                        f[i] = rng.next() as u8;
                    }
                }
                // Cut it short.
                2 => f.truncate(rng.below(f.len())),
                // Overwrite a 4- or 8-byte field with an extreme value (sizes, offsets).
                _ => {
                    let at = rng.below(f.len().saturating_sub(8));
                    let v: u64 = [0, 1, u64::MAX, u64::from(u32::MAX), 1 << 40][rng.below(5)];
                    let w = if rng.below(2) == 0 { 4 } else { 8 };
                    let end = (at + w).min(f.len());
                    f[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
            }
            read_all_ways(&f);
            if npy::parse(&f).is_ok() || npz::read(&f).is_ok() || safetensors::parse(&f).is_ok() {
                accepted += 1;
            }
        }
        let _ = name;
    }
    // Most mutations hit data bytes and headers alike; some must still be read, so the test is
    // not only exercising the first check.
    assert!(accepted > 0);
}

/// Runs `code` in the test environment's Python with `dir` as its argument; returns stdout.
fn python(py: &Path, code: &str, dir: &Path) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(code)
        .arg(dir)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `.npy` file of `expected(dtype, shape)`.
fn npy_file(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let mut f = npy::header_bytes(dtype, shape, NonNumpy::Refuse).unwrap();
    f.extend(expected(dtype, shape));
    f
}

#[test]
fn numpy_reads_what_this_crate_writes() {
    let Some(py) = testenv::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let arrays = npy_fixtures();
    for (stem, dtype, shape) in &arrays {
        std::fs::write(
            dir.path().join(format!("{stem}.npy")),
            npy_file(*dtype, shape),
        )
        .unwrap();
    }
    let write_npz = |path: PathBuf, zip64: bool| {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = npz::Writer::new(&mut out).force_zip64(zip64);
        for (stem, dtype, shape) in &arrays {
            w.add(&format!("{stem}.npy"), &npy_file(*dtype, shape))
                .unwrap();
        }
        let n = w.finish().unwrap();
        assert_eq!(n as usize, out.get_ref().len());
        std::fs::write(path, out.into_inner()).unwrap();
    };
    write_npz(dir.path().join("all.npz"), false);
    write_npz(dir.path().join("all_zip64.npz"), true);
    // coral-s3's weight object: bfloat16 as its raw bits, deflated in parallel pieces.
    let bits: Vec<u8> = (0..6u16).flat_map(|i| (0x3f80 + i).to_le_bytes()).collect();
    let header = npy::header_bytes(DType::BF16, &[2, 3], NonNumpy::RawBits).unwrap();
    let body = npz::compact::deflate_parallel(&header, &bits, 6).unwrap();
    let weight = npz::compact::write(&[npz::compact::Member {
        name: "weight.npy",
        deflate: true,
        crc: npz::compact::crc32(&[&header, &bits]),
        uncompressed: (header.len() + bits.len()) as u64,
        body,
    }])
    .unwrap();
    std::fs::write(dir.path().join("weight.npz"), weight).unwrap();

    let code = r#"
import json, os, sys, zipfile
import numpy as np
d = sys.argv[1]
out = {}
for f in sorted(os.listdir(d)):
    p = os.path.join(d, f)
    if f.endswith(".npy"):
        a = np.load(p)
        out[f] = [a.dtype.str, list(a.shape), a.tobytes().hex()]
    else:
        with np.load(p) as z:
            out[f] = {k: [z[k].dtype.str, list(z[k].shape), z[k].tobytes().hex()] for k in z.files}
        with zipfile.ZipFile(p) as z:
            # ZIP64 extra field (header id 1) in the central directory entries.
            out[f + ":zip64"] = [i.filename for i in z.infolist() if i.extra[:2] == b"\x01\x00"]
print(json.dumps(out))
"#;
    let got: serde_json::Value = serde_json::from_str(&python(&py, code, dir.path())).unwrap();
    let descr = |dt: DType| npy::descr(dt, NonNumpy::Refuse).unwrap();
    for (stem, dtype, shape) in &arrays {
        let want = serde_json::json!([descr(*dtype), shape, hex(&expected(*dtype, shape))]);
        assert_eq!(got[format!("{stem}.npy")], want, "{stem}.npy");
        for npz_file in ["all.npz", "all_zip64.npz"] {
            assert_eq!(got[npz_file][*stem], want, "{npz_file} {stem}");
        }
    }
    let all_members = got["all_zip64.npz:zip64"].as_array().unwrap().len();
    assert_eq!(
        all_members,
        arrays.len(),
        "every forced member has a ZIP64 field"
    );
    assert_eq!(got["all.npz:zip64"], serde_json::json!([]));
    assert_eq!(
        got["weight.npz"]["weight"],
        serde_json::json!(["<u2", [2, 3], hex(&bits)])
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

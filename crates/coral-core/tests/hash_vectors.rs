//! The content hash against `docs/format.md` (its test vectors) and against the Python Coral
//! (`coral-ml` 1.0, through `CORAL_TEST_PYTHON`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use coral_core::{ContentHash, DType, HashAlgorithm, WeightTensor};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// One row of the table in the `hash` section of docs/format.md.
#[derive(Debug)]
struct Vector {
    label: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
    sha256: String,
    xxh3: Option<String>,
}

fn format_md() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/format.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn code(cell: &str) -> &str {
    let cell = cell.trim();
    cell.strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .unwrap_or_else(|| panic!("cell {cell:?} is not `code`"))
}

fn parse_vectors(doc: &str) -> Vec<Vector> {
    let start = doc.find("<!-- BEGIN hash -->").expect("BEGIN hash");
    let end = doc.find("<!-- END hash -->").expect("END hash");
    let section = &doc[start..end];
    let table = section
        .split("### Test vectors")
        .nth(1)
        .expect("a Test vectors heading in the hash section");
    let mut out = Vec::new();
    for line in table.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        if cells.len() != 6 || !cells[1].trim().starts_with('`') {
            continue; // header or separator
        }
        let shape = code(cells[2]);
        let shape: Vec<usize> = shape
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let data = match code(cells[3]) {
            "-" => Vec::new(),
            h => hex::decode(h).unwrap(),
        };
        let xxh3 = match code(cells[5]) {
            "-" => None,
            h => Some(h.to_owned()),
        };
        out.push(Vector {
            label: cells[0].trim().to_owned(),
            dtype: DType::from_name(code(cells[1])).unwrap(),
            shape,
            data,
            sha256: code(cells[4]).to_owned(),
            xxh3,
        });
    }
    out
}

#[test]
fn format_md_vectors_match_content_hash() {
    let vectors = parse_vectors(&format_md());
    assert!(vectors.len() >= 6, "only {} vectors parsed", vectors.len());
    assert!(vectors.iter().any(|v| v.shape.is_empty()), "a scalar");
    assert!(
        vectors.iter().any(|v| v.shape.contains(&0)),
        "an empty tensor"
    );
    assert!(vectors.iter().filter(|v| v.xxh3.is_some()).count() >= 5);
    for v in &vectors {
        let w = WeightTensor::from_bytes(&v.label, v.shape.clone(), v.dtype, v.data.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", v.label));
        let sha = ContentHash::parse(&v.sha256).unwrap();
        assert_eq!(w.compute_hash(), sha, "{}: SHA-256", v.label);
        assert_eq!(ContentHash::sha256(v.dtype, &v.shape, &v.data), sha);
        w.verify(&sha).unwrap();
        if let Some(x) = &v.xxh3 {
            let x = ContentHash::parse(x).unwrap();
            assert_eq!(x.algorithm(), HashAlgorithm::Xxh3Legacy);
            assert_eq!(
                w.compute_hash_with(HashAlgorithm::Xxh3Legacy),
                x,
                "{}: xxh3-64",
                v.label
            );
            w.verify(&x).unwrap();
        }
    }
}

#[test]
fn the_parser_sees_a_wrong_vector() {
    // A table whose key is off by one character must fail the check above.
    let doc = format_md().replacen(
        "| `float32` | `[]` | `0000c03f` | `0",
        "| `float32` | `[]` | `0000c03f` | `1",
        1,
    );
    let v = parse_vectors(&doc);
    let scalar = v.iter().find(|v| v.shape.is_empty()).unwrap();
    assert_ne!(
        ContentHash::sha256(scalar.dtype, &scalar.shape, &scalar.data).to_hex(),
        scalar.sha256
    );
}

fn python() -> Option<PathBuf> {
    match std::env::var("CORAL_TEST_PYTHON") {
        Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => {
            if std::env::var("CORAL_TEST_REQUIRE").as_deref() == Ok("1") {
                panic!("CORAL_TEST_PYTHON is not set but CORAL_TEST_REQUIRE=1");
            }
            eprintln!(
                "skipping: CORAL_TEST_PYTHON is not set (run the tests with `cargo xtask test`)"
            );
            None
        }
    }
}

const PY: &str = r#"
import hashlib, json, struct, sys
import numpy as np
from coral.core.weight_tensor import WeightTensor
out = []
for t in json.load(sys.stdin):
    dt = np.dtype(t["dtype"]).newbyteorder("<")
    a = np.frombuffer(bytes.fromhex(t["data"]), dtype=dt).reshape(t["shape"])
    h = hashlib.sha256(b"coral.weight.v1\0" + t["dtype"].encode() + b"\0")
    h.update(struct.pack("<Q", len(t["shape"])))
    for d in t["shape"]:
        h.update(struct.pack("<Q", d))
    h.update(bytes.fromhex(t["data"]))
    out.append([WeightTensor(data=a.astype(np.dtype(t["dtype"]))).compute_hash(), h.hexdigest()])
json.dump(out, sys.stdout)
"#;

#[test]
fn python_coral_agrees_on_random_tensors() {
    let Some(py) = python() else { return };
    // Every dtype NumPy has, in shapes from scalar to 3-d, empty included.
    let dtypes = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::F32,
        DType::F64,
    ];
    let shapes: [&[usize]; 6] = [&[], &[1], &[7], &[3, 4], &[2, 0, 3], &[2, 3, 5]];
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut tensors = Vec::new();
    for dtype in dtypes {
        for shape in shapes {
            let n = shape.iter().product::<usize>() * dtype.size();
            let mut data = proptest::collection::vec(any::<u8>(), n)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            if dtype == DType::Bool {
                data.iter_mut().for_each(|b| *b &= 1);
            }
            tensors.push(WeightTensor::from_bytes("t", shape.to_vec(), dtype, data).unwrap());
        }
    }
    let input: Vec<serde_json::Value> = tensors
        .iter()
        .map(|w| {
            serde_json::json!({"dtype": w.dtype().name(), "shape": w.shape(), "data": hex::encode(w.data())})
        })
        .collect();
    let mut child = Command::new(&py)
        .args(["-c", PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", py.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&input).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed");
    let keys: Vec<(String, String)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys.len(), tensors.len());
    for (w, (xxh3, sha)) in tensors.iter().zip(keys) {
        let what = format!("{} {:?}", w.dtype(), w.shape());
        assert_eq!(
            w.compute_hash_with(HashAlgorithm::Xxh3Legacy).to_hex(),
            xxh3,
            "{what}: xxh3"
        );
        assert_eq!(w.compute_hash().to_hex(), sha, "{what}: sha256");
    }
}

//! Interoperability with the tools people already have, through the venv's Python
//! (CORAL_TEST_PYTHON: h5py, hdf5plugin, coral-ml 1.0.0) and the real model (CORAL_TEST_MODEL):
//!
//! - h5py reads every dataset we write, every dtype and codec, with the same bytes and attributes;
//! - a store written by coral-ml opens here, lists, and every weight loads verified (xxh3-64),
//!   whole, in rows, in byte ranges and streamed;
//! - a store written here in the Python-compatible mode opens in coral-ml, and every weight loads
//!   there and re-hashes to its key.

#[path = "common/model.rs"]
mod model;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use coral_core::{ContentHash, DType, HashAlgorithm, WeightTensor};
use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testenv;
use coral_store_api::testing::{self, sample_tensor, special_float_tensors};
use coral_store_api::WeightStore;
use serde_json::Value;

fn helper(python: &Path, args: &[&str]) -> Value {
    helper_with(python, args, &[])
}

fn helper_with(python: &Path, args: &[&str], env: &[(&str, &Path)]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/coral_ml_helper.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An optional string attribute as the Python helpers print it: `null` when unset.
fn optional(v: &Option<String>) -> Value {
    v.clone().map_or(Value::Null, Value::from)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A folder holding only the float codec's HDF5 plugin (`libcoral_h5plugin.so`, which cargo
/// builds beside this test as a dependency of coral-hdf5), for `HDF5_PLUGIN_PATH`.
fn plugin_dir(tmp: &Path) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let name = format!(
        "{}coral_h5plugin{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let so = [deps.join(&name), deps.parent().unwrap().join(&name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not built beside {}", deps.display()));
    let dir = tmp.join("hdf5-plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&so, dir.join(&name)).unwrap();
    dir
}

/// The float codec (filter 307): h5py, with only `HDF5_PLUGIN_PATH` pointing at our plugin,
/// reads every dataset bit for bit: every dtype (floats through the codec, the rest through
/// zstd), special values, many chunks, and the real model in fp32 and bf16.
#[test]
fn h5py_reads_the_float_codec_through_the_plugin() {
    let Some(python) = testenv::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(dir.path());
    let mut tensors: Vec<WeightTensor> = DType::ALL
        .iter()
        .enumerate()
        .flat_map(|(i, &d)| {
            [
                sample_tensor(&format!("t.{d}"), d, &[300, 17], i as u64),
                sample_tensor(&format!("s.{d}"), d, &[], 100 + i as u64),
                sample_tensor(&format!("o.{d}"), d, &[3], 300 + i as u64),
            ]
        })
        .collect();
    tensors.extend(special_float_tensors());
    if let Some(model_path) = testenv::model_path() {
        for bf16 in [false, true] {
            tensors.extend(
                model::load_model(&model_path, bf16)
                    .into_iter()
                    .take(12)
                    .map(|(_, t)| t),
            );
        }
    }
    let path = dir.path().join("coral-codec.h5");
    let keys: BTreeMap<ContentHash, WeightTensor> = {
        let store = HDF5Store::open(
            &path,
            HDF5StoreOptions::new()
                .compression(Compression::Coral)
                .chunk_bytes(8192),
        )
        .unwrap();
        tensors
            .iter()
            .map(|t| (store.store(t).unwrap(), t.clone()))
            .collect()
    };
    let dump = helper_with(
        &python,
        &["dump", path.to_str().unwrap()],
        &[("HDF5_PLUGIN_PATH", &plugins)],
    );
    let mut through_codec = 0;
    for (key, t) in &keys {
        let d = &dump[format!("weights/{}", key.to_hex())];
        assert!(d.is_object(), "{} missing in h5py", t.name());
        assert_eq!(
            d["sha256"],
            sha256_hex(t.data()),
            "h5py read other bytes for {}",
            t.name()
        );
        if d["filters"]
            .as_array()
            .is_some_and(|f| f.iter().any(|id| id == "307"))
        {
            through_codec += 1;
            // `[version, kind, values in a row]`: the codec models the rows' columns.
            let row: usize = t.shape().iter().skip(1).product();
            let params = &d["filter_params"]["307"];
            assert_eq!(
                params[0],
                u64::from(coral_float_codec::VERSION),
                "{}: {params}",
                t.name()
            );
            assert_eq!(params[2], row as u64, "{}: {params}", t.name());
        }
    }
    assert!(
        through_codec >= 6,
        "only {through_codec} datasets used filter 307"
    );
}

#[test]
fn h5py_reads_every_dataset_we_write() {
    let Some(python) = testenv::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: Vec<WeightTensor> = DType::ALL
        .iter()
        .enumerate()
        .flat_map(|(i, &d)| {
            [
                sample_tensor(&format!("t.{d}"), d, &[37, 9], i as u64),
                sample_tensor(&format!("s.{d}"), d, &[], 100 + i as u64),
                sample_tensor(&format!("e.{d}"), d, &[0, 4], 200 + i as u64),
            ]
        })
        .collect();
    tensors.extend(special_float_tensors());
    let mut meta_w = sample_tensor("with.meta", DType::F32, &[3, 3], 999);
    let mut m = meta_w.metadata().clone();
    m.layer_type = Some("Linear".into());
    m.model_name = Some("tiny".into());
    m.compression_info
        .insert("note".into(), serde_json::json!({"a": [1, 2]}));
    meta_w = meta_w.with_metadata(m).unwrap();
    tensors.push(meta_w);
    for (c, shuffle) in [
        (Compression::Gzip, true),
        (Compression::Gzip, false),
        (Compression::Lzf, true),
        (Compression::Zstd, true),
        (Compression::None, false),
    ] {
        let path = dir.path().join(format!("{c}-{shuffle}.h5"));
        let keys: BTreeMap<ContentHash, WeightTensor> = {
            let store = HDF5Store::open(
                &path,
                HDF5StoreOptions::new()
                    .compression(c)
                    .shuffle(shuffle)
                    .chunk_bytes(4096),
            )
            .unwrap();
            tensors
                .iter()
                .map(|t| (store.store(t).unwrap(), t.clone()))
                .collect()
        };
        let dump = helper(&python, &["dump", path.to_str().unwrap()]);
        for (key, t) in &keys {
            let d = &dump[format!("weights/{}", key.to_hex())];
            assert!(d.is_object(), "{c}: {} missing in h5py", t.name());
            let a = &d["attrs"];
            assert_eq!(a["name"], t.name(), "{c} name");
            assert_eq!(a["dtype"], t.dtype().name(), "{c} dtype");
            assert_eq!(a["hash"], key.to_hex(), "{c} hash");
            let shape: Vec<u64> = t.shape().iter().map(|&x| x as u64).collect();
            assert_eq!(
                a["shape"],
                serde_json::json!(shape),
                "{c} shape attr of {}",
                t.name()
            );
            assert_eq!(
                d["shape"],
                serde_json::json!(shape),
                "{c} dataset shape of {}",
                t.name()
            );
            // The optional attributes are there when set, and absent (coral-ml reads them
            // with `.get()`) when not.
            assert_eq!(
                a["layer_type"],
                optional(&t.metadata().layer_type),
                "{c} layer_type"
            );
            assert_eq!(
                a["model_name"],
                optional(&t.metadata().model_name),
                "{c} model_name"
            );
            let info = &t.metadata().compression_info;
            if info.is_empty() {
                assert_eq!(a["compression_info"], Value::Null, "{c} compression_info");
            } else {
                let ci: Value =
                    serde_json::from_str(a["compression_info"].as_str().unwrap()).unwrap();
                assert_eq!(ci, Value::Object(info.clone()));
            }
            let want = sha256_hex(t.data());
            assert_eq!(
                d["sha256"],
                want,
                "{c}: h5py read other bytes for {}",
                t.name()
            );
        }
    }
}

#[test]
fn store_written_by_coral_ml_opens_here() {
    let (Some(python), Some(model_path)) = (testenv::python(), testenv::model_path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coral-ml.h5");
    let keys = helper(
        &python,
        &[
            "write",
            model_path.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
    let keys: BTreeMap<String, ContentHash> = keys
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, k)| (n.clone(), ContentHash::parse(k.as_str().unwrap()).unwrap()))
        .collect();
    let model = model::load_model(&model_path, false);
    assert_eq!(keys.len(), model.len());
    let store = HDF5Store::open(
        &path,
        HDF5StoreOptions::python_compatible()
            .mode(Mode::Read)
            .strict_integrity(true),
    )
    .unwrap();
    let mut listed = store.list_weights().unwrap();
    listed.sort();
    let mut want: Vec<ContentHash> = keys.values().copied().collect();
    want.sort();
    want.dedup();
    assert_eq!(listed, want);
    let all = store.load_batch(&want).unwrap();
    assert_eq!(all.len(), want.len());
    for (name, t) in &model {
        let k = keys[name];
        assert_eq!(k.algorithm(), HashAlgorithm::Xxh3Legacy);
        let w = &all[&k];
        assert_eq!(w.data(), t.data(), "{name}");
        assert_eq!(w.shape(), t.shape(), "{name}");
        w.verify(&k).unwrap();
        let meta = store.get_metadata(&k).unwrap().unwrap();
        assert_eq!(meta.dtype, t.dtype());
        assert_eq!(meta.name, *name);
    }
    // Partial and streamed loads of h5py's datasets (chunked on every axis: not Coral's layout,
    // read whole), for a few 1-d and 2-d weights.
    let mut rng = testing::Rng::new(13);
    let mut picked = (0, 0);
    for (name, t) in &model {
        let slot = if t.shape().len() == 1 {
            &mut picked.0
        } else {
            &mut picked.1
        };
        if *slot >= 3 {
            continue;
        }
        *slot += 1;
        let w = all[&keys[name]].clone();
        testing::weights::check_slices(&store, &keys[name], &w, &mut rng, 2);
    }
    let info = store.storage_info().unwrap();
    assert_eq!(info.total_weights as usize, want.len());
    assert!(
        info.compression_ratio > 0.0 && info.compression_ratio < 0.2,
        "{info:?}"
    );
}

#[test]
fn python_compatible_store_opens_in_coral_ml() {
    let (Some(python), Some(model_path)) = (testenv::python(), testenv::model_path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.h5");
    let model = model::load_model(&model_path, false);
    let keys = {
        let store = HDF5Store::open(&path, HDF5StoreOptions::python_compatible()).unwrap();
        store.store_batch(&model).unwrap()
    };
    let v = helper(&python, &["verify", path.to_str().unwrap()]);
    let v = v.as_object().unwrap();
    for (name, t) in &model {
        let k = keys[name].to_hex();
        let e = &v[&k];
        assert_eq!(
            e["ok"], true,
            "{name}: coral-ml's hash differs from the key"
        );
        assert_eq!(e["name"], name.as_str());
        assert_eq!(e["dtype"], t.dtype().name());
        let shape: Vec<u64> = t.shape().iter().map(|&x| x as u64).collect();
        assert_eq!(e["shape"], serde_json::json!(shape));
        // The optional attributes Coral leaves out when empty read as coral-ml's own empties.
        assert_eq!(
            e["layer_type"],
            optional(&t.metadata().layer_type),
            "{name}"
        );
        assert_eq!(
            e["model_name"],
            optional(&t.metadata().model_name),
            "{name}"
        );
        assert_eq!(
            e["compression_info"],
            Value::Object(t.metadata().compression_info.clone()),
            "{name}"
        );
        assert_eq!(e["hash"], k.as_str(), "{name}");
    }
    assert_eq!(
        v.len(),
        keys.values()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
}

/// Large float weights under zstd + shuffle take the plane-split path (random mantissa planes in
/// raw blocks, the rest compressed, one standard frame per chunk): h5py with hdf5plugin's zstd
/// filter reads them back bit for bit.
#[test]
fn h5py_reads_plane_split_zstd_chunks() {
    let Some(python) = testenv::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zstd-planes.h5");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let f32s: Vec<f32> = (0..600_000).map(|_| (next() * 0.2) as f32).collect();
    let f64s: Vec<f64> = (0..200_000).map(|_| next() * 0.2).collect();
    let bf16s: Vec<half::bf16> = (0..500_001)
        .map(|_| half::bf16::from_f64(next() * 0.2))
        .collect();
    let tensors = [
        WeightTensor::from_vec("big.f32", vec![600, 1000], f32s).unwrap(),
        WeightTensor::from_vec("big.f64", vec![200_000], f64s).unwrap(),
        WeightTensor::from_vec("big.bf16", vec![500_001], bf16s).unwrap(),
    ];
    let keys: Vec<(ContentHash, &WeightTensor)> = {
        let store = HDF5Store::open(
            &path,
            HDF5StoreOptions::new().compression(Compression::Zstd),
        )
        .unwrap();
        tensors
            .iter()
            .map(|t| (store.store(t).unwrap(), t))
            .collect()
    };
    let dump = helper(&python, &["dump", path.to_str().unwrap()]);
    for (key, t) in keys {
        let d = &dump[format!("weights/{}", key.to_hex())];
        assert_eq!(
            d["sha256"],
            sha256_hex(t.data()),
            "h5py read other bytes for {}",
            t.name()
        );
    }
    // And the file is smaller than the data: the exponent planes were compressed.
    let raw: usize = tensors.iter().map(|t| t.nbytes()).sum();
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        size < raw * 95 / 100,
        "file {size} bytes for {raw} bytes of weights"
    );
}

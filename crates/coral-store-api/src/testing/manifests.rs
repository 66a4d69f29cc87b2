//! The manifest section: the [`ManifestStore`] contract.

use coral_core::{ContentHash, DType, ManifestTensor, ModelManifest, ModelName};

use super::{sample_tensor, Check, Harness};
use crate::traits::{ManifestStore, WeightStore};

/// Every check of the section, by name.
pub fn checks<H>() -> Vec<Check<H>>
where
    H: Harness,
    H::Store: ManifestStore,
{
    vec![
        ("manifests::put_get_round_trip", put_get_round_trip::<H>),
        ("manifests::missing", missing::<H>),
        ("manifests::list_sorted", list_sorted::<H>),
        ("manifests::replace", replace::<H>),
        ("manifests::delete_keeps_weights", delete_keeps_weights::<H>),
        ("manifests::persistence", persistence::<H>),
    ]
}

/// A [`crate::MemoryStore`] holding a model of `n` weights stored in full plus a reference
/// weight and a fine-tune of it kept as a delta (`seed` picks their values), and the manifest
/// of all `n + 2` tensors. Returns the store, the manifest, the reference's key and the fine-tune's
/// (delta) key: a source for sync tests.
pub fn populated_store(
    n: usize,
    seed: u64,
) -> (crate::MemoryStore, ModelManifest, ContentHash, ContentHash) {
    use super::deltas::{lossless_delta, tuned_pair};
    use crate::traits::DeltaStore;
    let s = crate::MemoryStore::new();
    let mut m = sample_manifest(&s, "model-a", n);
    let (reference, tuned) = tuned_pair("emb", seed);
    let rk = s.store(&reference).unwrap();
    let dk = tuned.compute_hash();
    s.store_delta(&lossless_delta(&tuned, &reference, rk), &dk)
        .unwrap();
    for (w, k) in [(&reference, rk), (&tuned, dk)] {
        m.tensors.push(ManifestTensor {
            name: w.name().to_owned(),
            key: k,
            dtype: w.dtype(),
            shape: w.shape().to_vec(),
            data_offsets: None,
        });
    }
    s.put_manifest(&m).unwrap();
    (s, m, rk, dk)
}

/// A manifest of `n` tensors whose weights are stored in `store`, with every optional field set.
pub fn sample_manifest<S: ManifestStore + ?Sized>(
    store: &S,
    name: &str,
    n: usize,
) -> ModelManifest {
    let mut tensors = Vec::new();
    let mut offset = 0u64;
    for i in 0..n {
        let dtype = if i % 2 == 0 { DType::F32 } else { DType::BF16 };
        let w = sample_tensor(
            &format!("{name}.layer.{i}.weight"),
            dtype,
            &[4, i + 1],
            i as u64,
        );
        let key = store.store(&w).unwrap();
        let end = offset + w.nbytes() as u64;
        tensors.push(ManifestTensor {
            name: w.name().to_owned(),
            key,
            dtype,
            shape: w.shape().to_vec(),
            data_offsets: Some([offset, end]),
        });
        offset = end;
    }
    ModelManifest {
        version: 1,
        name: ModelName::new(name).unwrap(),
        format: coral_core::ModelFormat::Safetensors,
        tensors,
        safetensors_header: Some("{\"__metadata__\":{\"format\":\"pt\"}}    ".to_owned()),
        file_size: offset + 64,
        parent: Some(ModelName::new("base-model").unwrap()),
        created_unix: 1_764_000_000,
        files: Vec::new(),
    }
}

/// A manifest comes back equal, every field included.
pub fn put_get_round_trip<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    let store = h.open(true);
    let m = sample_manifest(&store, "all-MiniLM-L6-v2", 5);
    store.put_manifest(&m).unwrap();
    assert_eq!(store.get_manifest(&m.name).unwrap().as_ref(), Some(&m));
    // A minimal one: no optional fields, no tensors.
    let bare = ModelManifest {
        version: 1,
        name: ModelName::new("empty_model.v1").unwrap(),
        format: coral_core::ModelFormat::Npz,
        tensors: Vec::new(),
        safetensors_header: None,
        file_size: 0,
        parent: None,
        created_unix: 0,
        files: Vec::new(),
    };
    store.put_manifest(&bare).unwrap();
    assert_eq!(store.get_manifest(&bare.name).unwrap(), Some(bare));
    // A folder model: every kind of entry, blob chunks that are weights of the store.
    let mut folder = sample_manifest(&store, "folder-model", 2);
    let chunk = |i: u8| {
        let w = coral_core::WeightTensor::from_vec("c", vec![3], vec![i, i, i]).unwrap();
        coral_core::BlobChunk {
            key: store.store(&w).unwrap(),
            len: 3,
        }
    };
    let header = folder.safetensors_header.take().unwrap();
    let st_size = folder.file_size;
    folder.format = coral_core::ModelFormat::Folder;
    folder.files = vec![
        coral_core::ManifestFile {
            path: "config.json".into(),
            mode: 0o644,
            content: coral_core::FileContent::Blob {
                size: 6,
                chunks: vec![chunk(1), chunk(2)],
            },
        },
        coral_core::ManifestFile {
            path: "sub".into(),
            mode: 0o755,
            content: coral_core::FileContent::Dir,
        },
        coral_core::ManifestFile {
            path: "sub/link".into(),
            mode: 0o777,
            content: coral_core::FileContent::Symlink {
                target: "../config.json".into(),
            },
        },
        coral_core::ManifestFile {
            path: "sub/model.safetensors".into(),
            mode: 0o600,
            content: coral_core::FileContent::Safetensors {
                size: st_size,
                header,
                tensors: [0, 2],
            },
        },
    ];
    folder.file_size = st_size + 6;
    folder.check_files().unwrap();
    store.put_manifest(&folder).unwrap();
    let mut keys: std::collections::BTreeSet<_> = m.keys().copied().collect();
    keys.extend(folder.keys().copied());
    assert_eq!(store.get_manifest(&folder.name).unwrap(), Some(folder));
    // Manifests are not weights: the store holds the tensors and blob chunks, nothing more.
    assert_eq!(
        store.list_weights().unwrap(),
        keys.into_iter().collect::<Vec<_>>()
    );
}

/// An absent manifest gives `None` / `false`.
pub fn missing<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    let store = h.open(true);
    let name = ModelName::new("nobody").unwrap();
    assert!(store.get_manifest(&name).unwrap().is_none());
    assert!(!store.delete_manifest(&name).unwrap());
    assert!(store.list_manifests().unwrap().is_empty());
}

/// `list_manifests` gives every name once, sorted.
pub fn list_sorted<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    let store = h.open(true);
    let names = ["zeta", "Alpha", "beta-2", "beta_1", "a.b", "0model"];
    for n in names {
        store.put_manifest(&sample_manifest(&store, n, 1)).unwrap();
    }
    store
        .put_manifest(&sample_manifest(&store, "zeta", 2))
        .unwrap();
    let mut want: Vec<ModelName> = names.iter().map(|n| ModelName::new(*n).unwrap()).collect();
    want.sort();
    assert_eq!(store.list_manifests().unwrap(), want);
}

/// Putting a manifest under an existing name replaces it.
pub fn replace<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    let store = h.open(true);
    let first = sample_manifest(&store, "model", 2);
    store.put_manifest(&first).unwrap();
    let mut second = sample_manifest(&store, "model", 4);
    second.parent = None;
    second.created_unix += 60;
    store.put_manifest(&second).unwrap();
    assert_eq!(store.get_manifest(&second.name).unwrap(), Some(second));
    assert_eq!(store.list_manifests().unwrap().len(), 1);
}

/// Deleting a manifest removes it alone: its weights stay, other manifests stay.
pub fn delete_keeps_weights<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    let store = h.open(true);
    let a = sample_manifest(&store, "model-a", 3);
    let b = sample_manifest(&store, "model-b", 1);
    store.put_manifest(&a).unwrap();
    store.put_manifest(&b).unwrap();
    assert!(store.delete_manifest(&a.name).unwrap());
    assert!(!store.delete_manifest(&a.name).unwrap(), "delete again");
    assert!(store.get_manifest(&a.name).unwrap().is_none());
    assert_eq!(store.list_manifests().unwrap(), vec![b.name.clone()]);
    for key in a.keys() {
        assert!(
            store.exists(key).unwrap(),
            "weight {key} of the deleted manifest"
        );
    }
    assert_eq!(store.get_manifest(&b.name).unwrap(), Some(b));
}

/// Manifests survive closing and opening the store again.
pub fn persistence<H>(h: &H)
where
    H: Harness,
    H::Store: ManifestStore,
{
    let store = h.open(true);
    let a = sample_manifest(&store, "persisted", 3);
    store.put_manifest(&a).unwrap();
    let Some(store) = h.reopen(store) else {
        return;
    };
    assert_eq!(store.get_manifest(&a.name).unwrap(), Some(a.clone()));
    assert_eq!(store.list_manifests().unwrap(), vec![a.name]);
}

//! Damaged metadata, read from a store opened read-only: lengths in the global heap (where HDF5
//! keeps variable-length string attributes; libhdf5 crashed with SIGSEGV in `H5HG_read` or
//! looped forever on them), sizes in dataspaces, and bytes of a manifest. The weight or
//! manifest whose metadata is damaged fails (and those HDF5's walk of a damaged heap collection
//! can no longer reach); the others load.

use std::path::Path;

use coral_core::{ContentHash, DType, WeightTensor};
use coral_hdf5::{HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testing::sample_tensor;
use coral_store_api::{StoreError, WeightStore};

/// Options writing the layout of stores made before persistent free space (version 1 object
/// headers, no checksums): the structures these tests damage byte by byte. (Newer files carry
/// checksums, which HDF5 checks; `tests/tests/flipfuzz.rs` flips bits in those.)
fn legacy() -> HDF5StoreOptions {
    HDF5StoreOptions::new().persistent_free_space(false)
}

/// A store of `n` weights (stored one by one, so their strings lie in the heap in that order).
fn store(path: &Path, n: usize) -> Vec<(ContentHash, WeightTensor)> {
    let s = HDF5Store::open(path, legacy()).unwrap();
    (0..n)
        .map(|i| {
            let t = sample_tensor(&format!("layer.{i}"), DType::F32, &[8, 4], i as u64);
            (s.store(&t).unwrap(), t)
        })
        .collect()
}

/// The file offset of the global heap object whose bytes are `content`, and of its collection
/// (each commit reopens the file, and HDF5 may start a new collection in each session).
fn heap_object(file: &[u8], content: &[u8]) -> (usize, usize) {
    let collections = file
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"GCOL")
        .map(|(i, _)| i);
    for coll in collections {
        let size = u64::from_le_bytes(file[coll + 8..coll + 16].try_into().unwrap()) as usize;
        let end = (coll + size).min(file.len());
        let mut p = coll + 16;
        while p + 16 <= end {
            let idx = u16::from_le_bytes([file[p], file[p + 1]]);
            let len = u64::from_le_bytes(file[p + 8..p + 16].try_into().unwrap()) as usize;
            if idx == 0 || p + 16 + len > end {
                break;
            }
            if &file[p + 16..p + 16 + len] == content {
                return (p, coll);
            }
            p += 16 + len.div_ceil(8) * 8;
        }
    }
    panic!("{content:?} is in no global heap collection");
}

fn open_read(path: &Path) -> HDF5Store {
    HDF5Store::open(
        path,
        HDF5StoreOptions::new()
            .mode(Mode::Read)
            .strict_integrity(true),
    )
    .unwrap()
}

fn assert_damaged(e: StoreError, key: &ContentHash, want: &str) {
    let s = e.to_string();
    assert!(s.contains(&key.to_hex()) || s.contains(want), "{s}");
    assert!(s.contains(want), "{want:?} not in {s}");
}

#[test]
fn a_flipped_heap_object_length_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = store(&path, 4);
    let mut bytes = std::fs::read(&path).unwrap();
    // The `dtype` string of weight 2 ("float32", 7 bytes, the object after its name) becomes
    // 7 + 2^40 bytes long.
    let (name_obj, _) = heap_object(&bytes, b"layer.2");
    let obj = name_obj + 16 + 8;
    assert_eq!(&bytes[obj + 16..obj + 23], b"float32");
    bytes[obj + 8 + 5] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    assert_eq!(s.list_weights().unwrap().len(), 4);
    // Weights 0 and 1 come before the damage in the heap: they load as before.
    for (k, t) in &ws[..2] {
        assert_eq!(s.load(k).unwrap().unwrap().data(), t.data());
    }
    // Weight 2's dtype is damaged: an error naming the attribute and what is wrong.
    let e = s.load(&ws[2].0).unwrap_err();
    assert_damaged(e, &ws[2].0, "attribute dtype");
    // Weight 3's strings lie past the damaged length, out of HDF5's reach, when they share the
    // collection (reported then), or in a collection of their own (they load as before).
    match s.load(&ws[3].0) {
        Ok(Some(w)) => assert_eq!(w.data(), ws[3].1.data()),
        Ok(None) => panic!("weight 3 vanished"),
        Err(_) => {}
    }
}

#[test]
fn a_flipped_string_length_in_an_object_header_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = store(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    // The attribute `name` of weight 1 points at its heap object with (length 7, collection
    // address, index): make the length 7 + 64 (HDF5 would copy 71 bytes into a 7-byte buffer).
    let (obj, coll) = heap_object(&bytes, b"layer.1");
    let idx = u16::from_le_bytes([bytes[obj], bytes[obj + 1]]) as u32;
    let mut desc = 7u32.to_le_bytes().to_vec();
    desc.extend((coll as u64).to_le_bytes());
    desc.extend(idx.to_le_bytes());
    let at = bytes
        .windows(desc.len())
        .position(|w| w == desc.as_slice())
        .expect("the attribute's heap reference");
    bytes[at] ^= 64;
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    let e = s.load(&ws[1].0).unwrap_err();
    assert_damaged(e, &ws[1].0, "attribute name");
    for i in [0, 2] {
        assert_eq!(s.load(&ws[i].0).unwrap().unwrap().data(), ws[i].1.data());
    }
}

#[test]
fn a_zero_length_free_space_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = store(&path, 2);
    let mut bytes = std::fs::read(&path).unwrap();
    // The free-space object at the end of the collection: length 0 made HDF5 loop forever.
    let (_, coll) = heap_object(&bytes, b"layer.0");
    let size = u64::from_le_bytes(bytes[coll + 8..coll + 16].try_into().unwrap()) as usize;
    let mut p = coll + 16;
    loop {
        let idx = u16::from_le_bytes([bytes[p], bytes[p + 1]]);
        let len = u64::from_le_bytes(bytes[p + 8..p + 16].try_into().unwrap()) as usize;
        if idx == 0 {
            bytes[p + 8..p + 16].copy_from_slice(&0u64.to_le_bytes());
            break;
        }
        p += 16 + len.div_ceil(8) * 8;
        assert!(p < coll + size);
    }
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    // The objects before the free space still read; a lookup that reaches it fails.
    for (k, t) in &ws {
        assert_eq!(s.load(k).unwrap().unwrap().data(), t.data());
    }
}

/// A manifest's size comes from its dataset's dataspace alone: a flipped high bit there asked
/// for terabytes (the allocation aborted the process). Now that manifest fails, the other reads.
#[test]
fn a_flipped_manifest_size_fails_that_manifest_only() {
    use coral_store_api::testing::manifests::sample_manifest;
    use coral_store_api::ManifestStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let (a, b) = {
        let s = HDF5Store::open(&path, legacy()).unwrap();
        let a = sample_manifest(&s, "a", 3);
        let b = sample_manifest(&s, "b", 5);
        s.put_manifest(&a).unwrap();
        s.put_manifest(&b).unwrap();
        (a, b)
    };
    let mut bytes = std::fs::read(&path).unwrap();
    // Manifest a's dataspace message (version 1, rank 1, then its one dimension).
    let len = a.to_json().unwrap().len() as u64;
    let at = bytes
        .windows(16)
        .position(|w| w[..2] == [1, 1] && w[3..8] == [0; 5] && w[8..] == len.to_le_bytes())
        .expect("manifest a's dataspace");
    bytes[at + 8 + 5] ^= 0x20; // + 2^45 bytes
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    let names: Vec<String> = s
        .list_manifests()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(s.get_manifest(&b.name).unwrap().unwrap(), b);
    let e = s.get_manifest(&a.name).unwrap_err().to_string();
    if coral_hdf5::hdf5_version().1 == 10 {
        assert!(e.contains("manifest dataset of shape"), "{e}");
    } else {
        // HDF5 1.14 and 2.x check a dimension against its maximum themselves.
        assert!(
            e.contains("opening dataset a") && e.contains("maxdim"),
            "{e}"
        );
    }
}

/// A flipped high bit in a dataset's dimension overflowed the element count read from the
/// file (a panic in debug builds): the weight fails with the mismatch, the others load.
#[test]
fn a_flipped_dimension_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = store(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    // The weights' dataspace messages (version 1, rank 2, max dims present): dims 8 and 4.
    let mut dims = vec![1u8, 2, 1, 0, 0, 0, 0, 0];
    dims.extend(8u64.to_le_bytes());
    dims.extend(4u64.to_le_bytes());
    let at: Vec<usize> = bytes
        .windows(dims.len())
        .enumerate()
        .filter(|(_, w)| *w == dims.as_slice())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 3, "one dataspace per weight");
    bytes[at[1] + 16 + 7] ^= 0x40; // the second dimension + 2^62
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    let results: Vec<bool> = ws.iter().map(|(k, _)| s.load(k).is_ok()).collect();
    // Whatever loads is the weight stored (loads are verified).
    for (k, t) in &ws {
        if let Ok(w) = s.load(k) {
            assert_eq!(w.unwrap().data(), t.data());
        }
    }
    if coral_hdf5::hdf5_version().1 != 10 {
        // HDF5 1.14 and 2.x do not read this dimension on the way Coral loads a weight (the
        // chunk index is read from the layout), so the damage does not show.
        assert!(
            results.iter().filter(|ok| !**ok).count() <= 1,
            "{results:?}"
        );
        return;
    }
    assert_eq!(results.iter().filter(|ok| !**ok).count(), 1, "{results:?}");
    let bad = results.iter().position(|ok| !ok).unwrap();
    let e = s.load(&ws[bad].0).unwrap_err().to_string();
    assert!(e.contains("does not match the shape attribute"), "{e}");
}

/// A manifest's bytes carry no checksum in their zstd frame (nor uncompressed): a flipped bit
/// gave another manifest that parsed ("nafetensors"), and an export of other bytes. Its `hash`
/// attribute catches it.
#[test]
fn a_flipped_bit_in_a_manifest_is_caught_by_its_hash() {
    use coral_hdf5::Compression;
    use coral_store_api::testing::manifests::sample_manifest;
    use coral_store_api::ManifestStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let (a, b) = {
        let s = HDF5Store::open(&path, legacy().compression(Compression::None)).unwrap();
        let a = sample_manifest(&s, "a", 3);
        let b = sample_manifest(&s, "b", 2);
        s.put_manifest(&a).unwrap();
        s.put_manifest(&b).unwrap();
        (a, b)
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let json = a.to_json().unwrap();
    let at = bytes
        .windows(json.len())
        .position(|w| w == json.as_slice())
        .expect("manifest a's bytes");
    let f = at + json.windows(11).position(|w| w == b"safetensors").unwrap();
    bytes[f] ^= 0x1d; // "safetensors" -> "nafetensors"
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    let e = s.get_manifest(&a.name).unwrap_err().to_string();
    assert!(e.contains("its hash attribute says"), "{e}");
    assert_eq!(s.get_manifest(&b.name).unwrap().unwrap(), b);
}

/// A flipped bit in a link name of `models/` (in its group's local heap) that makes it no model
/// name is reported, not skipped: skipped, the model vanished from `coral verify` unnoticed.
#[test]
fn a_damaged_model_name_is_reported() {
    use coral_store_api::testing::manifests::sample_manifest;
    use coral_store_api::ManifestStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    {
        let s = HDF5Store::open(&path, legacy()).unwrap();
        for n in ["model-a", "model-b"] {
            let m = sample_manifest(&s, n, 2);
            s.put_manifest(&m).unwrap();
        }
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"model-a\0")
        .expect("the link name in the local heap");
    bytes[at] ^= 0x40; // "model-a" -> "-odel-a", which no model name starts with
    std::fs::write(&path, &bytes).unwrap();
    let e = open_read(&path).list_manifests().unwrap_err().to_string();
    assert!(
        e.contains("-odel-a") && e.contains("not a model name"),
        "{e}"
    );
}

/// A flipped bit that makes a chunk dimension larger than its fixed-size dimension (which HDF5
/// never creates) sent the dataset through `H5Dread`, which copied whole chunks of that size out
/// of the smaller ones zstd decoded: SIGSEGV. Now that weight fails, the others load.
#[test]
fn a_chunk_larger_than_its_dataset_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = store(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    // Layout messages (version 3, chunked, rank 2 + 1): address, then chunk dims 8, 4 and the
    // element size 4.
    let mut tail = 8u32.to_le_bytes().to_vec();
    tail.extend(4u32.to_le_bytes());
    tail.extend(4u32.to_le_bytes());
    let at: Vec<usize> = bytes
        .windows(23)
        .enumerate()
        .filter(|(_, w)| w[..3] == [3, 2, 3] && w[11..] == tail[..])
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 3, "one layout message per weight");
    bytes[at[2] + 15 + 1] ^= 0x04; // chunk dims [8, 4] -> [8, 1028]
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    let results: Vec<bool> = ws.iter().map(|(k, _)| s.load(k).is_ok()).collect();
    assert_eq!(results.iter().filter(|ok| !**ok).count(), 1, "{results:?}");
    let bad = results.iter().position(|ok| !ok).unwrap();
    let e = s.load(&ws[bad].0).unwrap_err().to_string();
    assert!(
        e.contains("chunks of [8, 1028] for a dataset of [8, 4]"),
        "{e}"
    );
}

/// An attribute message whose part sizes run past it (a flipped bit in the dataspace size of
/// `shape`) made libhdf5 copy past the message in `H5Aexists`: SIGSEGV. The object header is
/// checked first: that weight fails, the others load.
#[test]
fn an_attribute_message_that_lies_about_its_sizes_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = store(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    // Attribute messages (version 1) named "shape": name size 6, then the type and space sizes.
    let at: Vec<usize> = bytes
        .windows(16)
        .enumerate()
        .filter(|(_, w)| w[0] == 1 && w[2..4] == [6, 0] && &w[8..14] == b"shape\0")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 3, "one shape attribute per weight");
    bytes[at[1] + 7] ^= 0x80; // the dataspace size + 32768
    std::fs::write(&path, &bytes).unwrap();
    let s = open_read(&path);
    let results: Vec<bool> = ws.iter().map(|(k, _)| s.load(k).is_ok()).collect();
    assert_eq!(results, [true, false, true]);
    let e = s.load(&ws[1].0).unwrap_err().to_string();
    assert!(
        e.contains(&ws[1].0.to_hex()) && e.contains("an attribute message of"),
        "{e}"
    );
    assert_eq!(
        s.list_weights().unwrap().len(),
        3,
        "a damaged weight is still listed"
    );
}

/// A layout message whose version byte flipped (3 to 2) reads its chunk dimensions from other
/// bytes, one of them 0, and libhdf5 divided by it while opening the 1-D dataset (a delta's, in
/// the fuzz test): SIGFPE in `H5Dopen2`. The header is walked before the open: that weight
/// fails, the others load.
#[test]
fn a_layout_with_a_zero_chunk_dimension_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = three_vectors(&path, legacy());
    let mut bytes = std::fs::read(&path).unwrap();
    // Layout messages (version 3, chunked, rank 1 + 1): address, chunk dim 32, element size 4.
    let mut tail = 32u32.to_le_bytes().to_vec();
    tail.extend(4u32.to_le_bytes());
    let at: Vec<usize> = bytes
        .windows(19)
        .enumerate()
        .filter(|(_, w)| w[..3] == [3, 2, 2] && w[11..] == tail[..])
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 3, "one layout message per weight");
    bytes[at[1]] ^= 1; // version 3 -> 2
    std::fs::write(&path, &bytes).unwrap();
    only_the_second_fails(&path, &ws, "damaged object header");
}

/// The same in a store of HDF5 1.10's formats (a version 4 layout message, in a checksummed
/// object header): that weight fails, naming its key, and the others load. (HDF5's checksum
/// stops it; Coral's own check of version 4 layouts, for a header whose checksum was made to
/// match, is a unit test in `src/vlen.rs`.)
#[test]
fn a_version_4_layout_with_a_zero_chunk_dimension_fails_that_weight_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let ws = three_vectors(&path, HDF5StoreOptions::new());
    let mut bytes = std::fs::read(&path).unwrap();
    // Layout messages (version 4, chunked, flags, rank 1 + 1, 1-byte dimensions): chunk dim
    // 32, element size 4.
    let at: Vec<usize> = bytes
        .windows(7)
        .enumerate()
        .filter(|(_, w)| w[..2] == [4, 2] && w[3..] == [2, 1, 32, 4])
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 3, "one layout message per weight");
    bytes[at[1] + 5] = 0;
    std::fs::write(&path, &bytes).unwrap();
    only_the_second_fails(&path, &ws, "checksum");
}

/// Three weights of 32 float32 values (one chunk each), stored one by one.
fn three_vectors(path: &Path, opts: HDF5StoreOptions) -> Vec<(ContentHash, WeightTensor)> {
    let s = HDF5Store::open(path, opts).unwrap();
    (0..3)
        .map(|i| {
            let t = sample_tensor(&format!("v.{i}"), DType::F32, &[32], i as u64);
            (s.store(&t).unwrap(), t)
        })
        .collect()
}

/// The second of `ws` fails to load, naming its key and `why`; the others load.
fn only_the_second_fails(path: &Path, ws: &[(ContentHash, WeightTensor)], why: &str) {
    let s = open_read(path);
    let results: Vec<bool> = ws.iter().map(|(k, _)| s.load(k).is_ok()).collect();
    assert_eq!(results, [true, false, true]);
    let e = s.load(&ws[1].0).unwrap_err().to_string();
    assert!(e.contains(&ws[1].0.to_hex()) && e.contains(why), "{e}");
}

//! Which HDF5 object formats a store is written in (`docs/format.md`, "HDF5 store"):
//! - a new store has a version 2 superblock (never 3: its "open for writing" flag, left by a
//!   writer that dies, would make every later open fail) and its objects in HDF5 1.10's
//!   formats: one version 1 B-tree (`TREE`), symbol-table node (`SNOD`) and local heap
//!   (`HEAP`), the root group's (made with the file), and no other; links in a fractal heap
//!   (`FRHP`) once a group has more than 8, and a fixed array (`FAHD`) indexing a weight of
//!   many chunks;
//! - a store with the earliest formats and a version 2 superblock (as earlier Coral versions
//!   made them) takes new weights in the new formats beside its old groups, and reads all;
//! - `persistent_free_space(false)` keeps the earliest formats and a version 1 superblock (0
//!   with HDF5's default B-tree widths).
//!
//! One test: the old store is made through the `hdf5` crate, which must not run beside Coral's
//! calls into the same library.

use coral_core::DType;
use coral_hdf5::{HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testing::sample_tensor;
use coral_store_api::WeightStore;

fn count(bytes: &[u8], sig: &[u8; 4]) -> usize {
    bytes.windows(4).filter(|w| w == sig).count()
}

fn has(bytes: &[u8], sig: &[u8; 4]) -> bool {
    count(bytes, sig) > 0
}

/// Stores 20 one-chunk weights and one of many chunks; returns the file's bytes once closed,
/// after checking that every weight loads from a new open.
fn fill(path: &std::path::Path, opts: HDF5StoreOptions) -> Vec<u8> {
    let mut weights: Vec<_> = (0..20u64)
        .map(|i| sample_tensor(&format!("w{i}"), DType::F32, &[8, 16], i))
        .collect();
    weights.push(sample_tensor("big", DType::F32, &[256, 64], 99));
    let keys: Vec<_> = {
        let s = HDF5Store::open(path, opts.clone().chunk_bytes(4096)).unwrap();
        weights.iter().map(|w| s.store(w).unwrap()).collect()
    };
    let s = HDF5Store::open(path, opts.mode(Mode::Read)).unwrap();
    for (k, w) in keys.iter().zip(&weights) {
        assert_eq!(s.load(k).unwrap().unwrap().data(), w.data(), "{}", w.name());
    }
    drop(s);
    std::fs::read(path).unwrap()
}

#[test]
fn stores_are_written_in_the_formats_their_superblock_allows() {
    let dir = tempfile::tempdir().unwrap();
    let name = |sig: &[u8; 4]| String::from_utf8_lossy(sig).into_owned();

    let new = fill(&dir.path().join("new.h5"), HDF5StoreOptions::new());
    assert_eq!(new[8], 2, "superblock version of a new store");
    for sig in [b"TREE", b"SNOD", b"HEAP"] {
        assert_eq!(count(&new, sig), 1, "{} in a new store", name(sig));
    }
    for sig in [b"FRHP", b"FAHD", b"OHDR"] {
        assert!(has(&new, sig), "a new store lacks {}", name(sig));
    }

    let old_layout = fill(
        &dir.path().join("v0.h5"),
        HDF5StoreOptions::new().persistent_free_space(false),
    );
    // Version 1: the version 0 superblock with the chunk-index B-tree K Coral sets.
    assert_eq!(old_layout[8], 1);
    // A B-tree per group and per weight, a name heap per group, symbol-table nodes in the
    // groups that have links (the root and `weights/`).
    assert!(count(&old_layout, b"TREE") > 21);
    assert!(count(&old_layout, b"HEAP") >= 5);
    assert!(count(&old_layout, b"SNOD") >= 2);
    assert!(!has(&old_layout, b"FRHP"));

    // A store as earlier Coral versions made it: persistent free space (a version 2
    // superblock), every object in the earliest formats.
    let earlier = dir.path().join("earlier.h5");
    {
        use hdf5::file::{FileSpaceStrategy, LibraryVersion};
        let f = hdf5::File::with_options()
            .with_fcpl(|p| {
                p.file_space_strategy(FileSpaceStrategy::FreeSpaceManager {
                    paged: false,
                    persist: true,
                    threshold: 1,
                })
            })
            .with_fapl(|p| p.libver_bounds(LibraryVersion::Earliest, LibraryVersion::V110))
            .create(&earlier)
            .unwrap();
        for g in ["weights", "metadata", "deltas", "models"] {
            f.create_group(g).unwrap();
        }
    }
    let before = std::fs::read(&earlier).unwrap();
    assert_eq!(before[8], 2);
    assert!(has(&before, b"SNOD") && !has(&before, b"FRHP"));
    let after = fill(&earlier, HDF5StoreOptions::new().mode(Mode::Append));
    assert_eq!(after[8], 2, "the superblock stays version 2");
    // The groups keep their symbol tables; the new weight of many chunks has a fixed array.
    assert!(has(&after, b"SNOD") && has(&after, b"FAHD"));
}

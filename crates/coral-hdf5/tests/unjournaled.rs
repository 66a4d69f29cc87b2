//! On a library whose file-driver layout Coral does not know, a store is never written without
//! the journal behind the user's back: a writable open is refused, naming the library and the
//! way out, unless `allow_unjournaled` says so. The linked library here has the driver, so the
//! test switches it off (`coral_hdf5::testing::without_journal`, feature `testing`); one test
//! in this binary, as the switch is process-wide.

use coral_core::DType;
use coral_hdf5::{HDF5Store, HDF5StoreOptions, Mode};
use coral_store_api::testing::sample_tensor;
use coral_store_api::{StoreError, WeightStore};

#[test]
fn without_the_journal_driver_writing_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.h5");
    let w = sample_tensor("a", DType::F32, &[16, 8], 1);
    let key = {
        let s = HDF5Store::open(&path, HDF5StoreOptions::new()).unwrap();
        s.store(&w).unwrap()
    };
    let bytes = std::fs::read(&path).unwrap();

    assert!(coral_hdf5::journaled());
    coral_hdf5::testing::without_journal(true);
    assert!(!coral_hdf5::journaled());
    let (maj, min, rel) = coral_hdf5::hdf5_version();
    for mode in [Mode::Append, Mode::ReadWrite, Mode::Truncate] {
        let e = HDF5Store::open(&path, HDF5StoreOptions::new().mode(mode)).unwrap_err();
        assert!(matches!(e, StoreError::InvalidConfig(_)), "{mode:?}: {e:?}");
        let msg = e.to_string();
        for part in [
            path.display().to_string(),
            format!("{maj}.{min}.{rel}"),
            "would not survive a crash".to_owned(),
            "allow_unjournaled".to_owned(),
        ] {
            assert!(msg.contains(&part), "{mode:?}: {part:?} in {msg}");
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{mode:?} touched the file"
        );
    }
    // A new store is refused too, and nothing is created.
    let new = dir.path().join("new.h5");
    for mode in [Mode::Append, Mode::CreateNew] {
        assert!(HDF5Store::open(&new, HDF5StoreOptions::new().mode(mode)).is_err());
        assert!(!new.exists(), "{mode:?}");
    }
    // Reading needs no journal.
    {
        let s = HDF5Store::open(&path, HDF5StoreOptions::new().mode(Mode::Read)).unwrap();
        assert_eq!(s.load(&key).unwrap().unwrap().data(), w.data());
    }
    // Allowed explicitly: writes go to the file directly (no journal is ever made).
    let w2 = sample_tensor("b", DType::F32, &[16, 8], 2);
    let key2 = {
        let s = HDF5Store::open(&path, HDF5StoreOptions::new().allow_unjournaled(true)).unwrap();
        let k = s.store(&w2).unwrap();
        assert!(!dir.path().join("s.h5.journal").exists());
        k
    };
    coral_hdf5::testing::without_journal(false);
    let s = HDF5Store::open(&path, HDF5StoreOptions::new()).unwrap();
    assert_eq!(s.load(&key).unwrap().unwrap().data(), w.data());
    assert_eq!(s.load(&key2).unwrap().unwrap().data(), w2.data());
}

//! # coral-hdf5
//!
//! Coral's local store: one HDF5 file holding weights by content hash ([`HDF5Store`]), in the
//! seed's layout (`weights/`, `metadata/`, `deltas/`, plus `models/` for manifests), readable by
//! h5py and the Python Coral (`coral-ml` 1.0), and fast: chunks are compressed and decompressed
//! on all cores and moved with HDF5's direct chunk I/O, while each dataset declares the standard
//! filter pipeline (shuffle, then deflate, LZF or zstd) so any HDF5 reader decodes it.
//! `docs/format.md` describes the file precisely. Files are written through a small HDF5 file
//! driver that keeps a rollback journal (`<store>.h5.journal`) of the bytes each flush rewrites
//! in place, so a process killed mid-write leaves the store as its last completed call left it
//! (`docs/reliability.md`), on HDF5 1.10.8+, 1.14 and 2.x alike ([`journaled`]). Space freed by
//! deletes is tracked in the file and reused by later writes; [`HDF5Store::compact`] rewrites
//! the file without it, crash-safely (a rename is the commit). One tensor can be read in part,
//! decoding only the chunks involved (`load_rows`, `load_byte_range`; unverified, as
//! [`coral_store_api::slice`] explains), or streamed to a writer a window of chunks at a time
//! (`load_into`, memory bounded by two windows, verified at the end).
//!
//! ```
//! use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions};
//! use coral_store_api::WeightStore;
//! use coral_core::WeightTensor;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("weights.h5");
//! let store = HDF5Store::open(&path, HDF5StoreOptions::new().compression(Compression::Zstd))?;
//! let w = WeightTensor::from_vec("layer.weight", vec![2, 3], vec![0.5f32, 1.0, 1.5, 2.0, 2.5, 3.0])?;
//! let key = store.store(&w)?;
//! let back = store.load(&key)?.expect("stored");
//! assert_eq!(back.data(), w.data());
//! assert_eq!(store.storage_info()?.total_weights, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod chunk;
mod compact;
mod deltas;
// Test support (feature `testing`): where the raw data lies, for fault injection.
#[cfg(feature = "testing")]
mod extents;
mod h5;
mod ingest;
mod journal;
mod mem;
mod options;
mod store;
mod vlen;

pub use compact::CompactReport;

/// The version of the HDF5 library Coral is linked to: `(major, minor, release)`.
pub fn hdf5_version() -> (u32, u32, u32) {
    h5::locked(journal::lib_version)
}

/// True when writes go through Coral's journal driver on this library (HDF5 1.10.8 and later
/// 1.10 releases, 1.14 and 2.x): a killed process or a power cut leaves the store as its last
/// commit left it. Without it, a writable open is refused unless
/// [`HDF5StoreOptions::allow_unjournaled`] says otherwise.
pub fn journaled() -> bool {
    h5::locked(|| journal::driver().is_some())
}
pub use options::{Compression, HDF5StoreOptions, Mode};

/// Test support (feature `testing`): the record of every change the file driver makes to the
/// disk, for simulating power cuts (`tests/powercut.rs`), and what reads did
/// ([`HDF5Store::take_read_stats_for_testing`], `tests/slices.rs`).
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::journal::record::{mark, start, stop, without_journal, DiskOp};
    pub use crate::store::ReadStats;
}
pub use store::{HDF5Store, DELTAS, METADATA, MODELS, WEIGHTS};

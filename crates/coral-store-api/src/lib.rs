//! # coral-store-api
//!
//! The contract every Coral store keeps, whatever holds the bytes:
//!
//! - [`WeightStore`]: the seed's interface (store, load, exists, delete, list, metadata, batches,
//!   storage info, close), blocking and `Send + Sync`, in the style of `object_store`: a backend
//!   implements the few methods that touch its bytes ([`WeightStore::store_hashed`],
//!   [`WeightStore::load_hashed`], ...) and the rest is provided; a
//!   [`coral_core::HashedWeight`] carries the proof that data was hashed, so nothing hashes it
//!   twice;
//!   one tensor can also be read in part or streamed: [`WeightStore::load_rows`] (rows along the
//!   first axis), [`WeightStore::load_byte_range`] (data bytes) and [`WeightStore::load_into`]
//!   (the whole data written to an [`std::io::Write`] as it is decoded, verified at the end); see
//!   [`slice`](mod@slice) for what is verified and what is not;
//! - [`DeltaStore`]: the seed's delta methods;
//! - [`StoreError`]: typed errors with context, among them [`StoreError::Integrity`];
//! - [`lease`]: how several writers share one store (shared and exclusive leases, provided by
//!   [`ManifestStore`] with defaults for single-writer stores);
//! - [`MemoryStore`]: the in-memory reference backend, for users' tests too;
//! - [`resolve`]: rebuilding weights kept as deltas, shared by every backend;
//! - `testing` (feature `testing`): the conformance suite every backend runs with one call.
//!
//! ```
//! use coral_store_api::{MemoryStore, WeightStore};
//! use coral_core::WeightTensor;
//!
//! let store = MemoryStore::new();
//! let w = WeightTensor::from_vec("w", vec![3], vec![1.0f32, 2.0, 3.0])?;
//! let key = store.store(&w)?;
//! assert_eq!(store.store(&w)?, key); // storing again is a no-op
//! let back = store.load(&key)?.expect("present");
//! assert_eq!(back.data(), w.data());
//! # Ok::<(), coral_store_api::StoreError>(())
//! ```

#![warn(missing_docs)]

mod error;
mod info;
pub mod lease;
mod memory;
pub mod resolve;
pub mod slice;
#[cfg(feature = "testing")]
pub mod testenv;
#[cfg(feature = "testing")]
pub mod testing;
mod traits;

pub use error::{RangeUnit, Result, StoreError};
pub use info::{DeltaStorageInfo, StorageInfo};
pub use lease::{Lease, LeaseKind, Leftovers};
pub use memory::MemoryStore;
pub use traits::{hash_against, DeltaStore, ManifestStore, Store, Stored, StoredForm, WeightStore};

pub use coral_core;

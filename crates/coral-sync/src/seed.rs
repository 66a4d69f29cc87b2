//! The seed's `s3_store.sync_from_local(local)` / `sync_to_local(local)`, spelled the same way
//! for every store through [`SyncExt`].
//!
//! These used to be inherent methods of `coral_s3::S3Store`, which made the S3 crate depend on
//! this one: a backend talking back up to the layer above it. Now the backend knows nothing of
//! sync, and any [`Store`] (S3, HDF5, memory, yours) gets the methods by importing the trait.
//!
//! ```
//! use coral_core::WeightTensor;
//! use coral_store_api::{MemoryStore, WeightStore};
//! use coral_sync::SyncExt;
//!
//! let local = MemoryStore::new();
//! let remote = MemoryStore::new();
//! local.store(&WeightTensor::from_vec("x", vec![2], vec![1.0f32, 2.0])?)?;
//! let up = remote.sync_from_local(&local)?;
//! assert_eq!((up.uploaded, up.skipped), (1, 0));
//! let back = MemoryStore::new();
//! assert_eq!(remote.sync_to_local(&back)?.downloaded, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::Duration;

use coral_store_api::{Lease, LeaseKind, Store, StoreError};

use crate::{nothing_to_move, sync, SyncError, SyncOptions, SyncStats};

/// How long `sync_from_local` waits for a garbage collector's exclusive lease to go.
pub const SYNC_LEASE_WAIT: Duration = Duration::from_secs(60);

/// The seed's sync methods, for every [`Store`]: `self` is the remote side.
pub trait SyncExt: Store {
    /// Uploads what `local` has and this store lacks (weights, deltas with their references,
    /// manifests): the seed's `sync_from_local`.
    fn sync_from_local(&self, local: &dyn Store) -> Result<UploadStats, SyncError> {
        self.sync_from_local_with(local, &SyncOptions::default())
    }

    /// [`SyncExt::sync_from_local`] with options (dry run, progress, concurrency). On a store
    /// that several writers share it holds a shared lease throughout: weights go up before the
    /// manifests that name them, and a garbage collector must wait for those.
    fn sync_from_local_with(
        &self,
        local: &dyn Store,
        options: &SyncOptions,
    ) -> Result<UploadStats, SyncError> {
        // On a store that several writers share, a lease costs a few quorum writes (S3 on
        // Garage: about 0.1 s). Listings and manifests say first whether anything needs to
        // move; a sync with nothing to do stops there, without a lease.
        if !options.dry_run && self.shares_writers() {
            if let Some(stats) = nothing_to_move(local, self.as_store())? {
                return Ok(UploadStats {
                    uploaded: 0,
                    skipped: stats.skipped(),
                    bytes_transferred: 0,
                    details: stats,
                });
            }
        }
        let lease = if options.dry_run {
            Lease::none(LeaseKind::Shared)
        } else {
            self.acquire_lease(LeaseKind::Shared, "sync", SYNC_LEASE_WAIT)
                .map_err(|e| lease_error("taking a lease for the sync", e))?
        };
        let stats = sync(local, self.as_store(), options);
        let released = self.release_lease(lease);
        let stats = stats?;
        released.map_err(|e| lease_error("releasing the sync's lease", e))?;
        Ok(UploadStats {
            uploaded: stats.moved(),
            skipped: stats.skipped(),
            bytes_transferred: stats.bytes(),
            details: stats,
        })
    }

    /// Downloads what this store has and `local` lacks: the seed's `sync_to_local`.
    fn sync_to_local(&self, local: &dyn Store) -> Result<DownloadStats, SyncError> {
        self.sync_to_local_with(local, &SyncOptions::default())
    }

    /// [`SyncExt::sync_to_local`] with options.
    fn sync_to_local_with(
        &self,
        local: &dyn Store,
        options: &SyncOptions,
    ) -> Result<DownloadStats, SyncError> {
        let stats = sync(self.as_store(), local, options)?;
        Ok(DownloadStats {
            downloaded: stats.moved(),
            skipped: stats.skipped(),
            bytes_transferred: stats.bytes(),
            details: stats,
        })
    }

    /// This store as a trait object.
    fn as_store(&self) -> &dyn Store;
}

impl<T: Store> SyncExt for T {
    fn as_store(&self) -> &dyn Store {
        self
    }
}

impl SyncExt for dyn Store + '_ {
    fn as_store(&self) -> &dyn Store {
        self
    }
}

fn lease_error(what: &str, e: StoreError) -> SyncError {
    SyncError::Store {
        what: what.to_owned(),
        source: Box::new(e),
    }
}

/// The seed's `sync_from_local` statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadStats {
    /// Objects uploaded (weights, deltas, manifests).
    pub uploaded: u64,
    /// Objects the store already had.
    pub skipped: u64,
    /// Bytes moved (tensor data, delta payloads, manifest JSON).
    pub bytes_transferred: u64,
    /// The same per kind.
    pub details: SyncStats,
}

/// The seed's `sync_to_local` statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadStats {
    /// Objects downloaded (weights, deltas, manifests).
    pub downloaded: u64,
    /// Objects the local store already had.
    pub skipped: u64,
    /// Bytes moved (tensor data, delta payloads, manifest JSON).
    pub bytes_transferred: u64,
    /// The same per kind.
    pub details: SyncStats,
}

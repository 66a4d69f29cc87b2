//! # coral-s3
//!
//! Coral's object-storage store, [`S3Store`], for AWS S3 and S3-compatible services (MinIO,
//! Ceph, Garage, R2, DigitalOcean Spaces), built on `object_store` behind the blocking
//! [`WeightStore`](coral_store_api::WeightStore), [`DeltaStore`](coral_store_api::DeltaStore) and
//! [`ManifestStore`](coral_store_api::ManifestStore) traits.
//!
//! - [`S3Config`]: the seed's settings (bucket, prefix `coral/`, region, endpoint, credentials,
//!   concurrency 10, compression gzip, 8 MiB multipart parts, strict integrity);
//! - keys `{prefix}weights/{hash}.npz`, `{prefix}metadata/{hash}.json`, `{prefix}deltas/{hash}.npz`
//!   and `{prefix}models/{name}.json`, built only from validated hashes and model names; the
//!   bodies are described in `docs/format.md` (a gzip store's weights are real NumPy `.npz`);
//! - never half a weight: the data object goes up first and the metadata object, written last,
//!   commits it; a batch that fails part way says what was stored and what was not
//!   ([`BatchError`]); [`S3Store::remove_orphans`] cleans what interrupted uploads left;
//! - the seed's `s3_store.sync_from_local(local)` / `sync_to_local(local)` come from
//!   `coral_sync::SyncExt`, which every store implements: this crate knows nothing of sync;
//! - safe for many writers on one prefix: shared and exclusive leases under `{prefix}locks/`
//!   ([`coral_store_api::lease`]), the commit times a garbage collector's grace period needs,
//!   and the removal of what unfinished writes left, abandoned multipart uploads included
//!   (the provided methods of [`ManifestStore`](coral_store_api::ManifestStore), overridden).
//!
//! ```
//! use coral_s3::{S3Config, S3Store};
//! use coral_store_api::WeightStore;
//! use coral_core::WeightTensor;
//!
//! // An S3-compatible endpoint (MinIO, moto, ...); this example runs under `cargo xtask test`.
//! let Ok(endpoint) = std::env::var("CORAL_TEST_S3_ENDPOINT") else { return Ok(()) };
//! let config = S3Config::new("coral-doc-example")
//!     .with_endpoint(endpoint)
//!     .with_region("us-east-1")
//!     .with_credentials("minioadmin", "minioadmin");
//! let store = S3Store::new(config)?; // creates the bucket when missing
//! let w = WeightTensor::from_vec("w", vec![3], vec![1.0f32, 2.0, 3.0])?;
//! let key = store.store(&w)?;
//! assert_eq!(store.load(&key)?.expect("present").data(), w.data());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod bucket;
mod clock;
pub mod config;
pub mod format;
mod lease;
mod signed;
mod store;
mod uploads;

pub use config::S3Config;
pub use store::{BatchError, FailedItem, OrphanReport, S3Store};

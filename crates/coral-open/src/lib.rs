//! # coral-open
//!
//! Opening a store from its address, as the `coral` command and the Python package take it: a
//! path (an HDF5 file) or `s3://bucket/prefix`, with the endpoint and credentials of
//! [`S3Options`]. Readers never create anything (no file, no bucket); writers do. The backends
//! are features (`hdf5`, `s3`, both on by default), so this is the one crate that knows them
//! all; everything above it works on `&dyn Store`.
//!
//! ```
//! use coral_open::{open, Address, Mode, S3Options};
//! use coral_store_api::WeightStore;
//!
//! let dir = tempfile::tempdir()?;
//! let addr = Address::parse(dir.path().join("coral.h5").to_str().unwrap())?;
//! // A reader finds nothing there and says so; a writer creates the store.
//! assert!(open(&addr, &S3Options::default(), Mode::Read, std::time::Duration::ZERO).is_err());
//! let store = open(&addr, &S3Options::default(), Mode::Write, std::time::Duration::ZERO)?;
//! assert!(store.list_weights()?.is_empty());
//! assert!(matches!(Address::parse("s3://models/coral/")?, Address::S3 { .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

use std::path::PathBuf;

use coral_store_api::{Store, StoreError};

/// Why a store did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The address or options are not usable, or nothing is there to read.
    #[error("{0}")]
    Invalid(String),
    /// The backend refused: the [`StoreError`] says why.
    #[error("{what}")]
    Store {
        /// What was being done ("opening store s3://models/coral/").
        what: String,
        /// Why it failed.
        #[source]
        source: Box<StoreError>,
    },
}

/// The result of this crate's functions.
pub type Result<T, E = OpenError> = std::result::Result<T, E>;

macro_rules! bail {
    ($($t:tt)*) => {
        return Err(OpenError::Invalid(format!($($t)*)))
    };
}

#[cfg(any(feature = "hdf5", feature = "s3"))]
fn store_err(what: String) -> impl FnOnce(StoreError) -> OpenError {
    move |source| OpenError::Store {
        what,
        source: Box::new(source),
    }
}

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A local HDF5 file.
    File(PathBuf),
    /// A bucket and key prefix on an S3-compatible service.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix (may be empty).
        prefix: String,
    },
}

impl Address {
    /// Parses `s3://bucket[/prefix]` or a path.
    pub fn parse(s: &str) -> Result<Address> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("store address {s:?} names no bucket (expected s3://bucket/prefix)");
            }
            return Ok(Address::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if s.contains("://") {
            bail!("store address {s:?}: only paths and s3:// URLs are supported");
        }
        if s.is_empty() {
            bail!("empty store address");
        }
        Ok(Address::File(PathBuf::from(s)))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::File(p) => write!(f, "{}", p.display()),
            Address::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Endpoint and credentials for `s3://` stores (each falls back to the standard AWS variable).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `--endpoint-url` / `AWS_ENDPOINT_URL`.
    pub endpoint_url: Option<String>,
    /// `--access-key` / `AWS_ACCESS_KEY_ID`.
    pub access_key: Option<String>,
    /// `--secret-key` / `AWS_SECRET_ACCESS_KEY`.
    pub secret_key: Option<String>,
    /// `--region` / `AWS_REGION`.
    pub region: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Whether the command writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads only; a missing local store is an error.
    Read,
    /// Writes; a missing local store is created.
    Write,
}

/// Opens the store at `addr`. A local store held by another writer is waited for up to `wait`
/// (readers are never kept out; `docs/format.md`, "Locking").
pub fn open(
    addr: &Address,
    s3: &S3Options,
    mode: Mode,
    wait: std::time::Duration,
) -> Result<Box<dyn Store>> {
    match addr {
        Address::File(path) => open_file(path, mode, wait),
        Address::S3 { bucket, prefix } => open_s3(bucket, prefix, s3, mode),
    }
}

#[cfg(feature = "hdf5")]
fn open_file(
    path: &std::path::Path,
    mode: Mode,
    wait: std::time::Duration,
) -> Result<Box<dyn Store>> {
    if mode == Mode::Read && !path.exists() {
        bail!(
            "no store at {} (add a model first, or name one with --store or $CORAL_STORE)",
            path.display()
        );
    }
    if mode == Mode::Write {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().readonly() {
                bail!("store {} is read-only", path.display());
            }
        }
    }
    use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode as H5Mode};
    // New weights' codec: zstd's byte-plane encoder (the fastest), or $CORAL_COMPRESSION
    // (`coral` for the float codec, the most compact; gzip, lzf, none).
    let compression = match std::env::var("CORAL_COMPRESSION") {
        Ok(c) if !c.is_empty() => match c.parse::<Compression>() {
            Ok(c) => c,
            Err(e) => bail!("CORAL_COMPRESSION: {e}"),
        },
        _ => Compression::Zstd,
    };
    let opts = HDF5StoreOptions::new()
        .compression(compression)
        .wait(wait)
        .allow_unjournaled(std::env::var_os("CORAL_ALLOW_UNJOURNALED").is_some_and(|v| v == "1"))
        .mode(match mode {
            Mode::Read => H5Mode::Read,
            Mode::Write => H5Mode::Append,
        });
    let store = HDF5Store::open(path, opts)
        .map_err(store_err(format!("opening store {}", path.display())))?;
    Ok(Box::new(store))
}

#[cfg(not(feature = "hdf5"))]
fn open_file(
    path: &std::path::Path,
    _mode: Mode,
    _wait: std::time::Duration,
) -> Result<Box<dyn Store>> {
    bail!(
        "cannot open {}: this coral was built without the hdf5 feature",
        path.display()
    )
}

/// What `coral compact` did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CompactSummary {
    /// The store's path.
    pub store: String,
    /// File size before.
    pub bytes_before: u64,
    /// File size after.
    pub bytes_after: u64,
    /// Bytes given back.
    pub reclaimed: u64,
    /// Weights copied.
    pub weights: usize,
    /// Deltas copied.
    pub deltas: usize,
    /// Manifests copied.
    pub manifests: usize,
    /// Entries of `metadata/` copied.
    pub metadata: usize,
    /// Links left behind (`group/name: reason`).
    pub skipped: Vec<String>,
    /// Seconds taken.
    pub seconds: f64,
}

/// Compacts the HDF5 store at `addr` (see `HDF5Store::compact`); S3 stores are refused.
pub fn compact(addr: &Address, wait: std::time::Duration) -> Result<CompactSummary> {
    match addr {
        Address::File(path) => compact_file(path, wait),
        Address::S3 { .. } => bail!("compact applies to HDF5 stores, not to {addr}"),
    }
}

#[cfg(feature = "hdf5")]
fn compact_file(path: &std::path::Path, wait: std::time::Duration) -> Result<CompactSummary> {
    use coral_hdf5::{HDF5Store, HDF5StoreOptions, Mode as H5Mode};
    if !path.exists() {
        bail!("no store at {}", path.display());
    }
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().readonly()) {
        bail!("store {} is read-only", path.display());
    }
    let mut store = HDF5Store::open(
        path,
        HDF5StoreOptions::new().mode(H5Mode::ReadWrite).wait(wait),
    )
    .map_err(store_err(format!("opening store {}", path.display())))?;
    let r = store
        .compact()
        .map_err(store_err(format!("compacting {}", path.display())))?;
    coral_store_api::WeightStore::close(&mut store)
        .map_err(store_err("closing the store".to_owned()))?;
    Ok(CompactSummary {
        store: path.display().to_string(),
        bytes_before: r.bytes_before,
        bytes_after: r.bytes_after,
        reclaimed: r.reclaimed(),
        weights: r.weights,
        deltas: r.deltas,
        manifests: r.manifests,
        metadata: r.metadata,
        skipped: r.skipped,
        seconds: r.elapsed.as_secs_f64(),
    })
}

#[cfg(not(feature = "hdf5"))]
fn compact_file(path: &std::path::Path, _wait: std::time::Duration) -> Result<CompactSummary> {
    bail!(
        "cannot compact {}: this coral was built without the hdf5 feature",
        path.display()
    )
}

#[cfg(feature = "s3")]
fn open_s3(bucket: &str, prefix: &str, o: &S3Options, mode: Mode) -> Result<Box<dyn Store>> {
    // Only a writer creates a missing bucket.
    let mut c = coral_s3::S3Config::new(bucket)
        .with_prefix(prefix)
        .with_create_bucket(mode == Mode::Write);
    if let Some(e) = &o.endpoint_url {
        c = c.with_endpoint(e);
    }
    if let Some(r) = &o.region {
        c = c.with_region(r);
    }
    match (&o.access_key, &o.secret_key) {
        (Some(a), Some(s)) => c = c.with_credentials(a, s),
        (None, None) => {}
        _ => bail!("give both --access-key and --secret-key (or neither)"),
    }
    let store = coral_s3::S3Store::new(c)
        .map_err(store_err(format!("opening store s3://{bucket}/{prefix}")))?;
    Ok(Box::new(store))
}

#[cfg(not(feature = "s3"))]
fn open_s3(bucket: &str, _prefix: &str, _o: &S3Options, _mode: Mode) -> Result<Box<dyn Store>> {
    bail!("cannot open s3://{bucket}: this coral was built without the s3 feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("s3://b/p/q").unwrap(),
            Address::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            Address::parse("s3://b").unwrap(),
            Address::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert!(Address::parse("s3:///x").is_err());
        assert!(Address::parse("http://x").is_err());
        assert_eq!(
            Address::parse("a/b.h5").unwrap(),
            Address::File("a/b.h5".into())
        );
        let o = S3Options {
            secret_key: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}

//! Errors of every store.

use coral_core::{ContentHash, CoreError};
use thiserror::Error;

/// Boxed source error of a backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a store operation can fail with. Every variant names what it was about (the store's
/// location, the key, the weight's name).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Loaded data does not hash to its key.
    #[error("integrity check failed for weight {name:?}: expected hash {expected}, got {actual}")]
    Integrity {
        /// The weight's name.
        name: String,
        /// The key it is stored under.
        expected: ContentHash,
        /// The hash of the data actually read.
        actual: ContentHash,
    },
    /// A key given to `store_with_key` that is not the data's hash.
    #[error("key {key} is not the hash of weight {name:?} (its hash is {actual})")]
    KeyMismatch {
        /// The weight's name.
        name: String,
        /// The key given.
        key: ContentHash,
        /// The data's hash under the key's algorithm.
        actual: ContentHash,
    },
    /// A write to a store opened read-only.
    #[error("store {location} is read-only")]
    ReadOnly {
        /// The store's path or URL.
        location: String,
    },
    /// An option that is not valid; nothing was touched.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The store was closed.
    #[error("store {location} is closed")]
    Closed {
        /// The store's path or URL.
        location: String,
    },
    /// The location exists but is not a Coral store (or not readable as one).
    #[error("{location} is not a Coral store: {reason}")]
    NotAStore {
        /// The path or URL.
        location: String,
        /// Why.
        reason: String,
    },
    /// Another process holds the store (a writer, or readers a commit waited for).
    #[error("store {location} is busy: {reason}")]
    Locked {
        /// The path.
        location: String,
        /// What the lock said.
        reason: String,
    },
    /// A stored object that cannot be decoded.
    #[error("corrupt entry {key} in {location}: {reason}")]
    Corrupt {
        /// The store's path or URL.
        location: String,
        /// The entry's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A weight that deltas still refer to.
    #[error("weight {key} is the reference of {dependents} stored delta(s); delete them first")]
    Referenced {
        /// The weight's key.
        key: ContentHash,
        /// How many deltas refer to it.
        dependents: usize,
    },
    /// A delta whose reference weight is missing.
    #[error("delta {key}: reference weight {reference} is missing")]
    MissingReference {
        /// The delta's key.
        key: ContentHash,
        /// The reference it needs.
        reference: ContentHash,
    },
    /// A part of a weight asked for (rows along its first axis, or data bytes) that it does not
    /// have: past its end, reversed, or rows of a 0-d weight.
    #[error("weight {key}: cannot read {unit} {start}..{end}: {reason}")]
    InvalidRange {
        /// The weight's key.
        key: ContentHash,
        /// Rows or bytes.
        unit: RangeUnit,
        /// The range's start, as asked.
        start: u64,
        /// The range's end (exclusive), as asked.
        end: u64,
        /// What is wrong ("the weight has 5 rows").
        reason: String,
    },
    /// An error from coral-core (codec, delta, tensor), with the key or name it concerns.
    #[error("{context}: {source}")]
    Core {
        /// What was being done ("loading weight 3f2a...").
        context: String,
        /// The cause.
        #[source]
        source: CoreError,
    },
    /// An I/O or backend failure.
    #[error("{context}: {source}")]
    Backend {
        /// What was being done, and where.
        context: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

/// What a range in [`StoreError::InvalidRange`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeUnit {
    /// Rows along the first axis ([`crate::WeightStore::load_rows`]).
    Rows,
    /// Data bytes ([`crate::WeightStore::load_byte_range`]).
    Bytes,
}

impl std::fmt::Display for RangeUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RangeUnit::Rows => "rows",
            RangeUnit::Bytes => "bytes",
        })
    }
}

impl StoreError {
    /// Wraps a backend error with context.
    pub fn backend(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Wraps a core error with context.
    pub fn core(context: impl Into<String>, source: CoreError) -> Self {
        StoreError::Core {
            context: context.into(),
            source,
        }
    }
}

impl From<CoreError> for StoreError {
    fn from(source: CoreError) -> Self {
        StoreError::Core {
            context: "coral-core".to_owned(),
            source,
        }
    }
}

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

//! [`ModelError`]: what can go wrong adding, exporting and checking models, typed, with context.

use coral_core::{CoreError, ModelName};
use coral_formats::npy::NpyError;
use coral_formats::npz::NpzError;
use coral_formats::safetensors::SafetensorsError;
use coral_store_api::StoreError;

/// The result of this crate's operations.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Why a model operation failed. The `Display` of each variant is one phrase; the causes follow
/// through [`std::error::Error::source`], so `coral` prints them as one line
/// ("storing weights: writing chunk 0 of KEY /path: No space left on device").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A store call failed: the [`StoreError`] says which key, path or bucket.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Tensors, manifests or deltas refused something.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A safetensors file (or header) does not parse.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// A `.npy` file or member does not parse, or an array cannot be written as one.
    #[error(transparent)]
    Npy(#[from] NpyError),
    /// A `.npz` archive does not parse or cannot be written.
    #[error(transparent)]
    Npz(#[from] NpzError),
    /// Reading or writing a file failed (the context names the file).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// No model of that name in the store.
    #[error("model {0} is not in the store")]
    NotFound(ModelName),
    /// A model of that name is in the store already.
    #[error("model {0} already exists (remove it first with `coral rm {0}`)")]
    Exists(ModelName),
    /// The operation's cancel flag was raised (Ctrl-C); nothing was changed.
    #[error("interrupted; nothing was added")]
    Interrupted,
    /// Stored data contradict themselves (a weight under the wrong key, a manifest naming a
    /// tensor the store lacks, ...).
    #[error("{0}")]
    Inconsistent(String),
    /// Something the caller asked for cannot be done (a wrong output type, a shape mismatch).
    #[error("{0}")]
    Invalid(String),
    /// What was being done when `source` happened.
    #[error("{what}")]
    Context {
        /// What was being done ("storing delta of \"layer.0\"").
        what: String,
        /// What went wrong.
        #[source]
        source: Box<ModelError>,
    },
}

impl ModelError {
    /// The innermost error of a chain of [`ModelError::Context`]s: what actually went wrong.
    pub fn root(&self) -> &ModelError {
        match self {
            ModelError::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// The error and its causes in one line ("storing weights: writing chunk 0 of KEY: No
    /// space left on device"), each cause once.
    pub fn one_line(&self) -> String {
        coral_core::one_line(self)
    }

    /// The store error at the root, if any (for example, to tell
    /// [`StoreError::Integrity`] from a timeout).
    pub fn store_error(&self) -> Option<&StoreError> {
        match self.root() {
            ModelError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Adds what was being done to an error, as `anyhow::Context` does, keeping the error typed.
pub trait Context<T> {
    /// Wraps the error in [`ModelError::Context`] with `what`.
    fn context(self, what: impl Into<String>) -> Result<T>;
    /// The same, with the text made only on error.
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<ModelError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| ModelError::Context {
            what: what.into(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| ModelError::Context {
            what: what().into(),
            source: Box::new(e.into()),
        })
    }
}

/// Returns early with [`ModelError::Invalid`].
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::ModelError::Invalid(format!($($t)*)))
    };
}

/// Returns early with [`ModelError::Inconsistent`].
macro_rules! inconsistent {
    ($($t:tt)*) => {
        return Err($crate::ModelError::Inconsistent(format!($($t)*)))
    };
}

pub(crate) use {bail, inconsistent};

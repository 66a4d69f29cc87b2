//! The error type of `coral-core`.

use thiserror::Error;

/// Everything that can go wrong in `coral-core`: bad names, shapes that do not match their data,
/// malformed keys, corrupt compressed input, deltas that cannot be built or applied.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A dtype name that Coral does not know.
    #[error("unknown dtype {0:?}")]
    UnknownDType(String),
    /// A tensor whose data length disagrees with its shape and dtype.
    #[error("tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes, got {actual}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// The declared shape.
        shape: Vec<usize>,
        /// The declared dtype name.
        dtype: String,
        /// Bytes that shape and dtype call for.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A shape whose element count overflows.
    #[error("tensor {name:?}: shape {shape:?} is too large")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// The shape.
        shape: Vec<usize>,
    },
    /// The element type asked for does not match the tensor's dtype.
    #[error("tensor {name:?} has dtype {actual}, not {requested}")]
    DTypeMismatch {
        /// Tensor name.
        name: String,
        /// The dtype the caller asked for.
        requested: String,
        /// The tensor's dtype.
        actual: String,
    },
    /// A string that is not a content hash.
    #[error("invalid content hash {0:?}: expected 64 (SHA-256) or 16 (legacy xxh3-64) lowercase hex characters")]
    InvalidHash(String),
    /// A codec name or level that is not valid.
    #[error("invalid codec: {0}")]
    InvalidCodec(String),
    /// Compressed input that does not decode.
    #[error("corrupt {codec} data: {reason}")]
    Corrupt {
        /// The codec that failed.
        codec: String,
        /// What went wrong.
        reason: String,
    },
    /// A delta that cannot be encoded, decoded or verified.
    #[error("delta: {0}")]
    Delta(String),
    /// A model name that is not valid.
    #[error("invalid model name {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    InvalidModelName(String),
    /// A new model's name that reads as a content hash (64 hex digits).
    #[error("invalid model name {0:?}: 64 hex digits read as a weight's content hash; use another name (any character that is not a hex digit will do)")]
    HashLikeModelName(String),
    /// A manifest that does not parse.
    #[error("manifest: {0}")]
    Manifest(String),
    /// Decoded data does not match the hash it must have.
    #[error("integrity check failed for {name:?}: expected {expected}, got {actual}")]
    Integrity {
        /// Tensor name.
        name: String,
        /// The hash the data should have.
        expected: String,
        /// The hash it has.
        actual: String,
    },
}

/// Result with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// An error and its causes on one line, each once, as every Coral front end shows them ("adding
/// model.safetensors: writing chunk 0 of KEY: No space left on device"): library errors often
/// quote their source in their own message already, so a cause whose text is there is left out;
/// line breaks become spaces.
///
/// ```
/// #[derive(Debug)]
/// struct Writing(std::io::Error);
/// impl std::fmt::Display for Writing {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str("writing x")
///     }
/// }
/// impl std::error::Error for Writing {
///     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
///         Some(&self.0)
///     }
/// }
/// let e = Writing(std::io::Error::other("disk full"));
/// assert_eq!(coral_core::one_line(&e), "writing x: disk full");
/// ```
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = String::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let text = c.to_string().replace('\n', " ");
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
        cur = c.source();
    }
    msg
}

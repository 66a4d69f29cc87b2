//! Rust errors as Python exceptions: `IntegrityError` (a `ValueError`) for data that does not
//! match its key, `OSError` for I/O and backend failures, `ValueError` for everything the caller
//! can fix by passing something else. The message is the whole chain of causes, so it names the
//! path, key or tensor the Rust error named.

use std::error::Error;

use coral_store_api::StoreError;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(
    _native,
    IntegrityError,
    PyValueError,
    "Data read back does not hash to its key: the store holds damaged bytes."
);

/// Which Python exception a store error is.
enum Kind {
    Integrity,
    Os,
    Value,
}

fn store_kind(e: &StoreError) -> Kind {
    match e {
        StoreError::Integrity { .. } => Kind::Integrity,
        StoreError::Backend { .. }
        | StoreError::Locked { .. }
        | StoreError::NotAStore { .. }
        | StoreError::ReadOnly { .. }
        | StoreError::Corrupt { .. } => Kind::Os,
        _ => Kind::Value,
    }
}

/// The exception for any error: the first [`StoreError`] or `std::io::Error` in its chain
/// decides; otherwise `ValueError`.
pub fn to_py(e: &(dyn Error + 'static)) -> PyErr {
    let msg = coral_core::one_line(e);
    let mut kind = Kind::Value;
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(c) = cur {
        // A boxed cause (`source: Box<E>`) is a link of type `Box<E>`.
        let store = c
            .downcast_ref::<StoreError>()
            .or_else(|| c.downcast_ref::<Box<StoreError>>().map(|b| &**b));
        let model = c.downcast_ref::<coral_models::ModelError>().or_else(|| {
            c.downcast_ref::<Box<coral_models::ModelError>>()
                .map(|b| &**b)
        });
        if let Some(s) = store {
            kind = store_kind(s);
            break;
        }
        // ModelError's Io and Store variants are transparent: their cause is not a link of
        // the chain, so look inside.
        if let Some(m) = model {
            match m {
                coral_models::ModelError::Context { .. } => {}
                coral_models::ModelError::Io(_) => {
                    kind = Kind::Os;
                    break;
                }
                coral_models::ModelError::Store(s) => {
                    kind = store_kind(s);
                    break;
                }
                _ => break,
            }
        }
        if c.downcast_ref::<std::io::Error>().is_some() {
            kind = Kind::Os;
            break;
        }
        cur = c.source();
    }
    match kind {
        Kind::Integrity => IntegrityError::new_err(msg),
        Kind::Os => PyOSError::new_err(msg),
        Kind::Value => PyValueError::new_err(msg),
    }
}

/// [`to_py`] for a [`StoreError`].
pub fn store(e: StoreError) -> PyErr {
    to_py(&e)
}

/// A `ValueError` with `msg`.
pub fn value(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

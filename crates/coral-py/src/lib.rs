//! # coral-py
//!
//! Coral from Python: the extension module `coral_rs._native`, under the Python package
//! `coral_rs` (in `python/coral_rs`), which gives the seed's storage API with its names:
//! `coral_rs.storage.{WeightStore, HDF5Store, S3Config, S3Store}`, `coral_rs.WeightTensor`
//! and `WeightMetadata`, and the model-level `add`, `export` and `list_models`.
//!
//! The split: Python holds the API (classes users subclass, dataclasses, numpy dtypes,
//! `ml_dtypes`, coral-ml objects taken by duck typing), Rust holds every byte (hashing,
//! compression, I/O, verification) with the GIL released. Arrays cross without copies both
//! ways (see [`buffer`]).
//!
//! Built with maturin (PyO3, abi3 for CPython 3.9 and later): `pip install ./crates/coral-py`,
//! or `cargo xtask test`, which builds the wheel into `target/wheels/`, installs it in the test
//! venv and runs the pytest suite in `crates/coral-py/tests`. Its tests are that suite: a Rust
//! test binary would have to link libpython, which an extension module never does. The example
//! (the README's "From Python" has it at more length, and `test_readme.py` runs it):
//!
//! ```python
//! import numpy as np
//! from coral_rs import WeightTensor, WeightMetadata
//! from coral_rs.storage import HDF5Store
//!
//! with HDF5Store("weights.h5") as store:
//!     w = WeightTensor(np.arange(6, dtype=np.float32).reshape(2, 3),
//!                      WeightMetadata(name="layer.weight", shape=(2, 3), dtype=np.float32))
//!     key = store.store(w)
//!     assert (store.load(key).data == w.data).all()
//! ```

pub mod buffer;
pub mod errors;
pub mod models;
pub mod store;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::PyStore>()?;
    m.add_class::<buffer::Buffer>()?;
    m.add_function(wrap_pyfunction!(store::hash_array, m)?)?;
    m.add_function(wrap_pyfunction!(store::encode_delta, m)?)?;
    m.add_function(wrap_pyfunction!(models::add_model, m)?)?;
    m.add_function(wrap_pyfunction!(models::export_model, m)?)?;
    m.add_function(wrap_pyfunction!(models::list_models, m)?)?;
    m.add(
        "IntegrityError",
        m.py().get_type::<errors::IntegrityError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let (a, b, c) = coral_hdf5::hdf5_version();
    m.add("HDF5_VERSION", format!("{a}.{b}.{c}"))?;
    Ok(())
}

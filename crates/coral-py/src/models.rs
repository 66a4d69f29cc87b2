//! Model-level functions: add a model file or folder, export it back, list models. The same
//! library calls as `coral add`, `coral export` and `coral list`.

use std::path::PathBuf;

use coral_core::ModelName;
use coral_models::{AddOptions, Reference, Source, SourceRef};
use pyo3::prelude::*;

use crate::errors;
use crate::store::PyStore;

fn name(s: &str) -> PyResult<ModelName> {
    ModelName::new(s).map_err(|e| errors::to_py(&e))
}

/// Adds the model at `path` (a `.safetensors`, `.npy` or `.npz` file, or a folder) as `name`
/// (by default the file's stem or the folder's name). `reference`: None picks the closest model
/// in the store automatically, "none" stores changed tensors whole, a model's name delta-codes
/// against it. Gives the report as JSON.
#[pyfunction]
#[pyo3(signature = (store, path, name=None, reference=None))]
pub fn add_model(
    py: Python<'_>,
    store: PyRef<'_, PyStore>,
    path: PathBuf,
    name: Option<String>,
    reference: Option<String>,
) -> PyResult<String> {
    let given = match name {
        Some(n) => n,
        None => coral_models::default_model_name(&path).ok_or_else(|| {
            errors::value(format!(
                "{}: no model name in the path; give one with name=",
                path.display()
            ))
        })?,
    };
    let model = ModelName::for_new_model(given).map_err(|e| errors::to_py(&e))?;
    let reference = match reference.as_deref() {
        None => Reference::Auto,
        Some("none") => Reference::None,
        Some(r) => Reference::Model(self::name(r)?),
    };
    let mut opts = AddOptions::new(model);
    opts.reference = reference;
    let store: &PyStore = &store;
    let report = py.detach(|| {
        let src = Source::open(&path).map_err(|e| errors::to_py(&e))?;
        store.with(|s| {
            coral_models::add(s, SourceRef::from(&src), &opts, &|_| {})
                .map_err(|e| errors::to_py(&e))
        })
    })?;
    serde_json::to_string(&report).map_err(|e| errors::value(e.to_string()))
}

/// Writes the model `name` back to `out`, byte for byte, every tensor verified; `tensors` picks
/// some tensors only, `force` replaces a non-empty folder. Gives the bytes written.
#[pyfunction]
#[pyo3(signature = (store, name, out, force=false, tensors=Vec::new()))]
pub fn export_model(
    py: Python<'_>,
    store: PyRef<'_, PyStore>,
    name: &str,
    out: PathBuf,
    force: bool,
    tensors: Vec<String>,
) -> PyResult<u64> {
    let model = self::name(name)?;
    let mut opts = coral_models::ExportOptions::new(256 << 20);
    opts.force = force;
    opts.tensors = tensors;
    let store: &PyStore = &store;
    py.detach(|| {
        store.with(|s| {
            coral_models::export_with(s, &model, &out, &opts, &|_| {})
                .map_err(|e| errors::to_py(&e))
        })
    })
}

/// Every model's name, sorted.
#[pyfunction]
pub fn list_models(py: Python<'_>, store: PyRef<'_, PyStore>) -> PyResult<Vec<String>> {
    let store: &PyStore = &store;
    let names = store.detached(py, |s| s.list_manifests())?;
    Ok(names.into_iter().map(String::from).collect())
}

//! `_Store`: one Coral store (HDF5 file or S3 prefix) behind the Python classes of
//! `coral_rs.storage`. Every method that reads, hashes, compresses or writes releases the GIL
//! (`Python::detach`), so Python threads using one store, or several, run in parallel.

use std::path::PathBuf;
use std::sync::RwLock;

use coral_core::{
    ContentHash, DType, Delta, DeltaType, HashAlgorithm, HashedWeight, JsonMap, WeightMetadata,
    WeightTensor,
};
use coral_store_api::{hash_against, Store, StoreError};
use coral_sync::SyncExt;
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::buffer::{borrowed, Buffer};
use crate::errors;

/// A weight as the Python side passes it: name, dtype name, shape, the C-contiguous array, its
/// data address and byte length, layer type, model name, compression info (JSON), the key to
/// store it under (or None) and whether to key it as coral-ml does (xxh3-64) when none is given.
pub type ItemIn<'py> = (
    String,
    String,
    Vec<usize>,
    Bound<'py, PyAny>,
    usize,
    usize,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
    bool,
);

/// Metadata as it goes back to Python: name, shape, dtype name, layer type, model name,
/// compression info (JSON) and the key.
pub type MetaOut = (
    String,
    Vec<usize>,
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

/// A delta as it goes to and from Python: type name, payload, metadata (JSON), shape of the
/// weight it encodes, its dtype name, the reference's key and the compression ratio.
pub type DeltaOut = (String, Buffer, String, Vec<usize>, String, String, f64);

/// A weight parsed from Python, with the key it is to be stored under (if given) and the
/// algorithm to key it with otherwise.
pub struct Incoming {
    weight: WeightTensor,
    key: Option<ContentHash>,
    algorithm: HashAlgorithm,
}

fn json_map(name: &str, json: &str) -> PyResult<JsonMap> {
    if json.is_empty() {
        return Ok(JsonMap::new());
    }
    serde_json::from_str(json).map_err(|e| {
        errors::value(format!(
            "weight {name:?}: compression_info is not a JSON object: {e}"
        ))
    })
}

fn dtype(name: &str, dtype: &str) -> PyResult<DType> {
    DType::from_name(dtype).map_err(|_| {
        errors::value(format!(
            "weight {name:?}: dtype {dtype} is not supported (Coral stores bool, \
             int8-64, uint8-64, float16, bfloat16, float32, float64, float8_e4m3fn and \
             float8_e5m2)"
        ))
    })
}

/// A key given by the caller, parsed; a string that is not a key is a `ValueError` naming it.
pub fn parse_key(key: &str) -> PyResult<ContentHash> {
    ContentHash::parse(key).map_err(|e| {
        errors::value(format!(
            "{key:?} is not a Coral key (64 hex digits of SHA-256, or 16 of coral-ml's xxh3-64): {e}"
        ))
    })
}

/// Parses one weight from Python (with the GIL: it reads the array's interface).
pub fn incoming(item: ItemIn<'_>) -> PyResult<Incoming> {
    let (name, dt, shape, array, ptr, len, layer_type, model_name, info, key, legacy) = item;
    let dt = dtype(&name, &dt)?;
    let compression_info = json_map(&name, &info)?;
    let data = borrowed(&array, ptr, len)?;
    let mut meta = WeightMetadata::new(name.clone(), shape, dt);
    meta.layer_type = layer_type.filter(|s| !s.is_empty());
    meta.model_name = model_name.filter(|s| !s.is_empty());
    meta.compression_info = compression_info;
    let weight = WeightTensor::new(meta, data).map_err(|e| errors::to_py(&e))?;
    let key = key.as_deref().map(parse_key).transpose()?;
    Ok(Incoming {
        weight,
        key,
        algorithm: if legacy {
            HashAlgorithm::Xxh3Legacy
        } else {
            HashAlgorithm::Sha256
        },
    })
}

/// Hashes weights (on every core, without the GIL), checking given keys.
fn hash_all(items: Vec<Incoming>) -> Result<Vec<HashedWeight>, StoreError> {
    items
        .into_par_iter()
        .map(|i| match i.key {
            Some(k) => hash_against(&i.weight, &k),
            None => Ok(HashedWeight::with_algorithm(i.weight, i.algorithm)),
        })
        .collect()
}

/// Metadata for Python.
pub fn meta_out(m: &WeightMetadata, key: Option<&ContentHash>) -> MetaOut {
    (
        m.name.clone(),
        m.shape.clone(),
        m.dtype.name().to_owned(),
        m.layer_type.clone(),
        m.model_name.clone(),
        serde_json::Value::Object(m.compression_info.clone()).to_string(),
        key.or(m.hash.as_ref()).map(ContentHash::to_hex),
    )
}

/// A delta for Python.
pub fn delta_out(d: Delta) -> DeltaOut {
    (
        d.delta_type.name().to_owned(),
        Buffer::new(d.data),
        serde_json::Value::Object(d.metadata).to_string(),
        d.original_shape,
        d.original_dtype.name().to_owned(),
        d.reference_hash.to_hex(),
        d.compression_ratio,
    )
}

/// One Coral store, open until `close` (or until it is dropped).
#[pyclass(name = "_Store", module = "coral_rs._native", frozen)]
pub struct PyStore {
    inner: RwLock<Option<Box<dyn Store>>>,
    location: String,
    backend: &'static str,
}

impl std::fmt::Debug for PyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyStore")
            .field("backend", &self.backend)
            .field("location", &self.location)
            .finish()
    }
}

impl PyStore {
    fn new(store: Box<dyn Store>, location: String, backend: &'static str) -> Self {
        PyStore {
            inner: RwLock::new(Some(store)),
            location,
            backend,
        }
    }

    /// Runs `f` on the open store; a closed store is a `ValueError`, as a closed file's is.
    pub fn with<R>(&self, f: impl FnOnce(&dyn Store) -> Result<R, PyErr>) -> PyResult<R> {
        let guard = self
            .inner
            .read()
            .map_err(|_| errors::value("internal: a store lock was poisoned"))?;
        match guard.as_deref() {
            Some(s) => f(s),
            None => Err(errors::store(StoreError::Closed {
                location: self.location.clone(),
            })),
        }
    }

    /// [`PyStore::with`] without the GIL.
    pub fn detached<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&dyn Store) -> Result<R, StoreError> + Send,
    ) -> PyResult<R> {
        py.detach(|| self.with(|s| f(s).map_err(errors::store)))
    }
}

fn lookup(key: &str) -> Option<ContentHash> {
    ContentHash::parse(key).ok()
}

impl PyStore {
    /// `f` on the key `key` names, without the GIL; for a string that is no key, what an absent
    /// key gives (`None`, `false`), as the seed's `Optional` says: never an exception.
    fn keyed<R: Send + Default>(
        &self,
        py: Python<'_>,
        key: &str,
        f: impl FnOnce(&dyn Store, &ContentHash) -> Result<R, StoreError> + Send,
    ) -> PyResult<R> {
        match lookup(key) {
            Some(k) => self.detached(py, move |s| f(s, &k)),
            None => Ok(R::default()),
        }
    }

    /// The keys `f` lists, as hex.
    fn hex_keys(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&dyn Store) -> Result<Vec<ContentHash>, StoreError> + Send,
    ) -> PyResult<Vec<String>> {
        Ok(self
            .detached(py, f)?
            .iter()
            .map(ContentHash::to_hex)
            .collect())
    }

    /// `f` on this store and `local` (both open), without the GIL: the seed's syncs.
    fn with_local<R: Send>(
        &self,
        py: Python<'_>,
        local: &PyStore,
        f: impl FnOnce(&dyn Store, &dyn Store) -> Result<R, PyErr> + Send,
    ) -> PyResult<R> {
        py.detach(|| self.with(|remote| local.with(|l| f(remote, l))))
    }
}

#[pymethods]
impl PyStore {
    /// Opens (or creates, by mode) an HDF5 store: the seed's `HDF5Store` arguments.
    #[staticmethod]
    #[pyo3(signature = (filepath, compression, compression_opts, mode))]
    fn open_hdf5(
        py: Python<'_>,
        filepath: PathBuf,
        compression: Option<String>,
        compression_opts: Option<i32>,
        mode: &str,
    ) -> PyResult<Self> {
        use coral_hdf5::{Compression, HDF5Store, HDF5StoreOptions, Mode};
        let compression: Compression = match compression.as_deref() {
            None => Compression::None,
            Some(c) => c.parse().map_err(errors::store)?,
        };
        let mode: Mode = mode.parse().map_err(errors::store)?;
        let mut opts = HDF5StoreOptions::new().compression(compression).mode(mode);
        if let (Some(level), Compression::Gzip | Compression::Zstd) =
            (compression_opts, compression)
        {
            opts = opts.level(level);
        }
        let location = filepath.display().to_string();
        let store = py
            .detach(|| HDF5Store::open(&filepath, opts))
            .map_err(errors::store)?;
        Ok(PyStore::new(Box::new(store), location, "hdf5"))
    }

    /// Opens an S3 store: the seed's `S3Config` fields.
    #[staticmethod]
    #[pyo3(signature = (bucket, prefix, region, endpoint_url, access_key, secret_key, max_concurrency, compression, chunk_size))]
    #[allow(clippy::too_many_arguments)]
    fn open_s3(
        py: Python<'_>,
        bucket: String,
        prefix: String,
        region: Option<String>,
        endpoint_url: Option<String>,
        access_key: Option<String>,
        secret_key: Option<String>,
        max_concurrency: usize,
        compression: Option<String>,
        chunk_size: usize,
    ) -> PyResult<Self> {
        let codec: coral_core::Codec = compression
            .as_deref()
            .unwrap_or("none")
            .parse()
            .map_err(|e: coral_core::CoreError| errors::to_py(&e))?;
        let mut config = coral_s3::S3Config::new(bucket)
            .with_prefix(prefix)
            .with_max_concurrency(max_concurrency)
            .with_compression(codec)
            .with_chunk_size(chunk_size);
        if let Some(r) = region {
            config = config.with_region(r);
        }
        if let Some(e) = endpoint_url {
            config = config.with_endpoint(e);
        }
        match (access_key, secret_key) {
            (Some(a), Some(s)) => config = config.with_credentials(a, s),
            (None, None) => {}
            _ => {
                return Err(errors::value(
                    "S3Config: give both access_key and secret_key, or neither",
                ))
            }
        }
        let location = config.location();
        let store = py
            .detach(|| coral_s3::S3Store::new(config))
            .map_err(errors::store)?;
        Ok(PyStore::new(Box::new(store), location, "s3"))
    }

    /// "hdf5" or "s3".
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// The path or URL.
    #[getter]
    fn location(&self) -> String {
        self.location.clone()
    }

    /// True once closed.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.read().map(|g| g.is_none()).unwrap_or(true)
    }

    /// Stores weights; gives (key, new) for each, in order (`new` is not known, and true, when
    /// the HDF5 store keyed the batch itself). Zero-copy: Rust reads the arrays'
    /// memory. Hashing runs on every core and the store compresses on every core, without
    /// the GIL.
    fn store_batch(&self, py: Python<'_>, items: Vec<ItemIn<'_>>) -> PyResult<Vec<(String, bool)>> {
        let items = items
            .into_iter()
            .map(incoming)
            .collect::<PyResult<Vec<_>>>()?;
        // The HDF5 store hashes inside its pipeline, overlapped with compression and writes,
        // when it is left to key the weights itself (SHA-256, no key given): the common case.
        let algorithm = self.with(|s| Ok(s.hash_algorithm()))?;
        let pipelined = self.backend == "hdf5"
            && items
                .iter()
                .all(|i| i.key.is_none() && i.algorithm == algorithm);
        if pipelined {
            let named: Vec<(String, WeightTensor)> = items
                .into_iter()
                .enumerate()
                .map(|(n, i)| (format!("{n:020}"), i.weight))
                .collect();
            let keys = self.detached(py, move |s| s.store_batch(&named))?;
            // Named by position, zero-padded: the map's order is the batch's.
            return Ok(keys.into_values().map(|k| (k.to_hex(), true)).collect());
        }
        let stored = self.detached(py, move |s| {
            let hashed = hash_all(items)?;
            s.store_hashed_batch(&hashed)
        })?;
        Ok(stored
            .into_iter()
            .map(|s| (s.key.to_hex(), s.new))
            .collect())
    }

    /// Loads and verifies weights: for each key, in order, its metadata and bytes, or None
    /// when absent (or not a key at all).
    fn load_batch(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
    ) -> PyResult<Vec<Option<(MetaOut, Buffer)>>> {
        let parsed: Vec<Option<ContentHash>> = keys.iter().map(|k| lookup(k)).collect();
        let wanted: Vec<ContentHash> = parsed.iter().flatten().copied().collect();
        let mut loaded = self.detached(py, move |s| s.load_hashed_batch(&wanted))?;
        Ok(parsed
            .into_iter()
            .map(|k| {
                let k = k?;
                let w = loaded.remove(&k)?;
                let (w, _) = w.into_parts();
                let (meta, data) = w.into_parts();
                Some((meta_out(&meta, Some(&k)), Buffer::new(data)))
            })
            .collect())
    }

    /// The metadata without the data; None when absent.
    fn get_metadata(&self, py: Python<'_>, key: &str) -> PyResult<Option<MetaOut>> {
        self.keyed(py, key, |s, k| {
            Ok(s.get_metadata(k)?.map(|m| meta_out(&m, Some(k))))
        })
    }

    /// True when the key is present (in full or as a delta).
    fn exists(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        self.keyed(py, key, |s, k| s.exists(k))
    }

    /// Deletes a weight; False when absent.
    fn delete(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        self.keyed(py, key, |s, k| s.delete(k))
    }

    /// Every key, sorted.
    fn list_weights(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.hex_keys(py, |s| s.list_weights())
    }

    /// The store's figures, as JSON.
    fn storage_info(&self, py: Python<'_>) -> PyResult<String> {
        let info = self.detached(py, |s| s.storage_info())?;
        serde_json::to_string(&info).map_err(|e| errors::value(e.to_string()))
    }

    /// Stores a delta under the key of the weight it encodes.
    #[pyo3(signature = (delta_type, data, ptr, len, metadata, original_shape, original_dtype, reference_hash, compression_ratio, delta_hash))]
    #[allow(clippy::too_many_arguments)]
    fn store_delta(
        &self,
        py: Python<'_>,
        delta_type: &str,
        data: Bound<'_, PyAny>,
        ptr: usize,
        len: usize,
        metadata: &str,
        original_shape: Vec<usize>,
        original_dtype: &str,
        reference_hash: &str,
        compression_ratio: f64,
        delta_hash: &str,
    ) -> PyResult<String> {
        let delta = Delta {
            delta_type: delta_type
                .parse::<DeltaType>()
                .map_err(|e| errors::to_py(&e))?,
            data: borrowed(&data, ptr, len)?,
            metadata: json_map("delta", metadata)?,
            original_dtype: dtype("delta", original_dtype)?,
            original_shape,
            reference_hash: parse_key(reference_hash)?,
            compression_ratio,
        };
        let key = parse_key(delta_hash)?;
        let k = self.detached(py, move |s| s.store_delta(&delta, &key))?;
        Ok(k.to_hex())
    }

    /// Loads a delta; None when absent.
    fn load_delta(&self, py: Python<'_>, key: &str) -> PyResult<Option<DeltaOut>> {
        Ok(self.keyed(py, key, |s, k| s.load_delta(k))?.map(delta_out))
    }

    /// True when a delta is stored under the key.
    fn delta_exists(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        self.keyed(py, key, |s, k| s.delta_exists(k))
    }

    /// Deletes a delta; False when absent.
    fn delete_delta(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        self.keyed(py, key, |s, k| s.delete_delta(k))
    }

    /// Every delta key, sorted.
    fn list_deltas(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.hex_keys(py, |s| s.list_deltas())
    }

    /// Delta figures, as JSON.
    fn delta_storage_info(&self, py: Python<'_>) -> PyResult<String> {
        let info = self.detached(py, |s| s.get_delta_storage_info())?;
        serde_json::to_string(&info).map_err(|e| errors::value(e.to_string()))
    }

    /// Uploads what `local` has and this store lacks; the seed's stats as JSON.
    fn sync_from_local(&self, py: Python<'_>, local: PyRef<'_, PyStore>) -> PyResult<String> {
        let stats = self.with_local(py, &local, |remote, l| {
            remote.sync_from_local(l).map_err(|e| errors::to_py(&e))
        })?;
        Ok(serde_json::json!({
            "uploaded": stats.uploaded,
            "skipped": stats.skipped,
            "bytes_transferred": stats.bytes_transferred,
            "details": stats.details,
        })
        .to_string())
    }

    /// Downloads what this store has and `local` lacks; the seed's stats as JSON.
    fn sync_to_local(&self, py: Python<'_>, local: PyRef<'_, PyStore>) -> PyResult<String> {
        let stats = self.with_local(py, &local, |remote, l| {
            remote.sync_to_local(l).map_err(|e| errors::to_py(&e))
        })?;
        Ok(serde_json::json!({
            "downloaded": stats.downloaded,
            "skipped": stats.skipped,
            "bytes_transferred": stats.bytes_transferred,
            "details": stats.details,
        })
        .to_string())
    }

    /// Flushes and closes; later calls raise `ValueError`. Closing twice is a no-op.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut guard = self
                .inner
                .write()
                .map_err(|_| errors::value("internal: a store lock was poisoned"))?;
            match guard.take() {
                Some(mut s) => s.close().map_err(errors::store),
                None => Ok(()),
            }
        })
    }

    fn __repr__(&self) -> String {
        format!("<coral_rs store {} {}>", self.backend, self.location)
    }
}

/// Coral's key of a weight passed as [`ItemIn`]: SHA-256, or coral-ml's xxh3-64 when its
/// last field is true (its key field is ignored).
#[pyfunction]
pub fn hash_array(py: Python<'_>, item: ItemIn<'_>) -> PyResult<String> {
    let i = incoming(item)?;
    Ok(py
        .detach(|| i.weight.compute_hash_with(i.algorithm))
        .to_hex())
}

/// Encodes `target` as a delta against `reference` (whose key is `reference_hash`): with the
/// named strategy (used even when it does not pay; a pair it cannot encode, such as another
/// shape, is a `ValueError`), or, with none, the smallest lossless one (None when no delta is
/// smaller than the weight compressed).
#[pyfunction]
#[pyo3(signature = (target, reference, reference_hash, delta_type=None))]
pub fn encode_delta(
    py: Python<'_>,
    target: ItemIn<'_>,
    reference: ItemIn<'_>,
    reference_hash: &str,
    delta_type: Option<&str>,
) -> PyResult<Option<DeltaOut>> {
    let t = incoming(target)?.weight;
    let r = incoming(reference)?.weight;
    let rk = parse_key(reference_hash)?;
    let kind = delta_type
        .map(|d| d.parse::<DeltaType>().map_err(|e| errors::to_py(&e)))
        .transpose()?;
    let d = py
        .detach(|| match kind {
            None => coral_core::encode_best_lossless(&t, &r, &rk).map(Ok),
            // A strategy the caller chose is used even when it does not pay.
            Some(delta_type) => coral_core::DeltaEncoder::new(coral_core::DeltaConfig::default())
                .encode_delta_unchecked(delta_type, &t, &r, &rk)
                .map(|d| d.map(Some)),
        })
        .map_err(|e| errors::to_py(&e))?
        .map_err(|why| {
            errors::value(format!(
                "weight {:?}: cannot encode as a {} delta: {why}",
                t.name(),
                delta_type.unwrap_or_default()
            ))
        })?;
    Ok(d.map(delta_out))
}

//! Deltas (`deltas/`, the Python store's layout) and model manifests (`models/`).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use coral_core::{
    ContentHash, DType, Delta, DeltaType, HashedWeight, JsonMap, ModelManifest, ModelName,
    WeightMetadata,
};
use coral_store_api::{
    resolve, DeltaStorageInfo, DeltaStore, ManifestStore, Result, StoreError, WeightStore,
};
use hdf5_sys::h5i::hid_t;

use crate::h5::{self, H5Error};
use crate::store::{HDF5Store, Inner, RawRead};

/// The attribute of a manifest dataset holding the content hash of its bytes.
const MANIFEST_HASH: &str = "hash";

/// The largest manifest read (its JSON; a model of a million tensors needs about 250 MB).
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// The attribute written last on a delta (the Python store's last one): its commit marker.
const DELTA_COMMIT: &str = "metadata";

fn corrupt(store: &HDF5Store, key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: store.path.display().to_string(),
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl HDF5Store {
    fn deltas_group<'a>(&self, inner: &'a Inner) -> Option<&'a h5::Hid> {
        inner.deltas.as_ref()
    }

    /// True when `deltas/<key>` exists and is committed.
    pub(crate) fn delta_present(&self, inner: &Inner, key: &str) -> Result<bool> {
        let Some(g) = self.deltas_group(inner) else {
            return Ok(false);
        };
        self.committed(g.id(), key, DELTA_COMMIT)
    }

    /// Reads a delta's attributes and its stored payload (decoded by the caller, outside the
    /// lock: decoding runs on rayon, which must never wait for work while holding the store).
    fn read_delta(&self, dset: hid_t, key: &str) -> Result<(Delta, RawRead, usize)> {
        let (delta, dtype, shape) = self.read_delta_header(dset, key)?;
        let raw = self.read_raw(dset, key, dtype, &shape, false)?;
        Ok((delta, raw, dtype.size()))
    }

    /// A delta's attributes (its `data` left empty), and its payload's element type and shape,
    /// without reading the payload.
    fn read_delta_header(&self, dset: hid_t, key: &str) -> Result<(Delta, DType, Vec<usize>)> {
        if let Some(raw) = self.raw() {
            raw.check_header(dset)
                .map_err(|why| corrupt(self, key, format!("object header: {why}")))?;
        }
        let e = |e| self.err(e);
        let s = |name: &str| -> Result<String> {
            h5::read_str_attr(dset, name, self.raw())
                .map_err(|err| corrupt(self, key, err.to_string()))?
                .ok_or_else(|| corrupt(self, key, format!("delta without attribute {name}")))
        };
        let delta_type: DeltaType = s("delta_type")?
            .parse()
            .map_err(|err: coral_core::CoreError| corrupt(self, key, err.to_string()))?;
        let original_dtype = DType::from_name(&s("original_dtype")?)
            .map_err(|err| corrupt(self, key, err.to_string()))?;
        let reference_hash = ContentHash::parse(&s("reference_hash")?)
            .map_err(|err| corrupt(self, key, err.to_string()))?;
        let original_shape = h5::read_i64s_attr(dset, "original_shape")
            .map_err(e)?
            .ok_or_else(|| corrupt(self, key, "delta without original_shape"))?
            .into_iter()
            .map(|d| usize::try_from(d).map_err(|_| corrupt(self, key, "negative dimension")))
            .collect::<Result<Vec<_>>>()?;
        let compression_ratio = h5::read_f64_attr(dset, "compression_ratio")
            .map_err(e)?
            .unwrap_or(0.0);
        let metadata: JsonMap = match h5::read_str_attr(dset, "metadata", self.raw())
            .map_err(|err| corrupt(self, key, err.to_string()))?
            .as_deref()
        {
            None | Some("") => JsonMap::new(),
            Some(m) => match serde_json::from_str(m) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(corrupt(self, key, "delta metadata is not a JSON object")),
            },
        };
        // The payload: whatever element type it was written with, as its little-endian bytes.
        let ftype = h5::dataset_type(dset).map_err(e)?;
        // SAFETY: valid type id.
        let es = unsafe { hdf5_sys::h5t::H5Tget_size(ftype.id()) };
        let space = h5::dataset_space(dset).map_err(e)?;
        let dims = h5::space_dims(space.id()).map_err(e)?;
        // Dims read from the file: checked (the payload's byte count is, by `read_raw` and
        // `delta_header`).
        let shape = dims
            .iter()
            .map(|&d| {
                usize::try_from(d)
                    .map_err(|_| corrupt(self, key, format!("delta payload dimension {d}")))
            })
            .collect::<Result<Vec<usize>>>()?;
        let dtype = match es {
            1 => DType::U8,
            2 => DType::U16,
            4 => DType::U32,
            8 => DType::U64,
            other => {
                return Err(corrupt(
                    self,
                    key,
                    format!("delta payload element size {other}"),
                ))
            }
        };
        let delta = Delta {
            delta_type,
            data: Bytes::new(),
            metadata,
            original_shape,
            original_dtype,
            reference_hash,
            compression_ratio,
        };
        Ok((delta, dtype, shape))
    }

    /// The delta stored under `key` without its payload, with the payload's length and its
    /// bytes as stored; `Ok(None)` when absent.
    pub(crate) fn delta_header(&self, key: &ContentHash) -> Result<Option<(Delta, u64, u64)>> {
        let hex = key.to_hex();
        self.with(|inner| {
            if !self.delta_present(inner, &hex)? {
                return Ok(None);
            }
            let g = self
                .deltas_group(inner)
                .ok_or_else(|| corrupt(self, &hex, "no deltas group"))?;
            let d = self.open_dataset(g.id(), &hex).map_err(|e| self.err(e))?;
            let (delta, dtype, shape) = self.read_delta_header(d.id(), &hex)?;
            let len = shape
                .iter()
                .try_fold(dtype.size() as u64, |a, &x| a.checked_mul(x as u64))
                .ok_or_else(|| corrupt(self, &hex, "delta payload size overflows"))?;
            // SAFETY: valid dataset id.
            let stored = unsafe { hdf5_sys::h5d::H5Dget_storage_size(d.id()) };
            Ok(Some((delta, len, stored)))
        })
    }

    fn delta_attrs(delta: &Delta, obj: hid_t) -> std::result::Result<(), H5Error> {
        h5::write_str_attr(obj, "delta_type", delta.delta_type.name())?;
        let shape: Vec<i64> = delta.original_shape.iter().map(|&d| d as i64).collect();
        h5::write_i64s_attr(obj, "original_shape", &shape)?;
        h5::write_str_attr(obj, "original_dtype", delta.original_dtype.name())?;
        h5::write_str_attr(obj, "reference_hash", &delta.reference_hash.to_hex())?;
        h5::write_f64_attr(obj, "compression_ratio", delta.compression_ratio)?;
        let m = serde_json::Value::Object(delta.metadata.clone()).to_string();
        h5::write_str_attr(obj, DELTA_COMMIT, &m)
    }

    /// Every committed delta key.
    pub(crate) fn list_delta_keys(&self) -> Result<Vec<ContentHash>> {
        self.with(|inner| {
            let Some(g) = self.deltas_group(inner) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for name in h5::link_names(g.id()).map_err(|e| self.err(e))? {
                let Ok(k) = ContentHash::parse(&name) else {
                    continue;
                };
                if self.delta_present(inner, &name)? {
                    out.push(k);
                }
            }
            out.sort();
            Ok(out)
        })
    }

    /// How many stored deltas name `key` as their reference.
    pub(crate) fn dependents_of(&self, key: &ContentHash) -> Result<usize> {
        let hex = key.to_hex();
        self.with(|inner| {
            let Some(g) = self.deltas_group(inner) else {
                return Ok(0);
            };
            let mut n = 0;
            for name in h5::link_names(g.id()).map_err(|e| self.err(e))? {
                let Ok(d) = h5::open_dataset(g.id(), &name) else {
                    continue; // an interrupted write
                };
                if name != hex
                    && h5::read_str_attr(d.id(), "reference_hash", self.raw())
                        .map_err(|e| self.err(e))?
                        .as_deref()
                        == Some(hex.as_str())
                {
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// The metadata of a weight kept as a delta: from the delta's `metadata` JSON (`name`,
    /// `layer_type`, `model_name` when present) and its original shape and dtype.
    pub(crate) fn delta_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>> {
        // The chain must lead to a weight stored in full (Coral's one walk, payloads unread).
        let chain = resolve::delta_chain(&Headers(self), key)?;
        Ok(chain.and_then(|c| {
            c.into_iter()
                .next()
                .map(|(_, d)| metadata_of_delta(&d, key))
        }))
    }

    /// Rebuilds weights kept as deltas through the shared resolution
    /// (`coral_store_api::resolve`): reference chains followed, each step verified.
    pub(crate) fn load_via_deltas(
        &self,
        keys: &[ContentHash],
    ) -> Result<HashMap<ContentHash, HashedWeight>> {
        let mut out = HashMap::new();
        for key in keys {
            if let Some(w) = resolve::resolve(self, key, self.opts.strict_integrity)? {
                out.insert(*key, w);
            }
        }
        Ok(out)
    }
}

impl resolve::DeltaSource for HDF5Store {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn has_full_weight(&self, key: &ContentHash) -> Result<bool> {
        self.with(|inner| self.weight_present(inner, &key.to_hex()))
    }

    fn full_weight(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        Ok(self.load_full(std::slice::from_ref(key))?.remove(key))
    }

    fn raw_delta(&self, key: &ContentHash) -> Result<Option<Delta>> {
        self.load_delta(key)
    }
}

/// The store seen through its deltas' headers: walking a chain reads no payload.
struct Headers<'a>(&'a HDF5Store);

impl resolve::DeltaSource for Headers<'_> {
    fn location(&self) -> String {
        self.0.path.display().to_string()
    }

    fn full_weight(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        self.0.full_weight(key)
    }

    fn has_full_weight(&self, key: &ContentHash) -> Result<bool> {
        resolve::DeltaSource::has_full_weight(self.0, key)
    }

    fn raw_delta(&self, key: &ContentHash) -> Result<Option<Delta>> {
        Ok(self.0.delta_header(key)?.map(|(d, _, _)| d))
    }
}

fn metadata_of_delta(d: &Delta, key: &ContentHash) -> WeightMetadata {
    // Coral's deltas record the target's metadata under "target"; the Python Coral's do not.
    let target = d.metadata.get("target").and_then(|v| v.as_object());
    let s = |k: &str| {
        target
            .and_then(|t| t.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let mut m = WeightMetadata::new(
        s("name").unwrap_or_else(|| key.to_hex()),
        d.original_shape.clone(),
        d.original_dtype,
    );
    m.layer_type = s("layer_type");
    m.model_name = s("model_name");
    if let Some(ci) = target
        .and_then(|t| t.get("compression_info"))
        .and_then(|v| v.as_object())
    {
        m.compression_info = ci.clone();
    }
    m.hash = Some(*key);
    m
}

impl DeltaStore for HDF5Store {
    fn store_delta(&self, delta: &Delta, delta_hash: &ContentHash) -> Result<ContentHash> {
        let keys = self.store_delta_batch(std::slice::from_ref(&(delta.clone(), *delta_hash)))?;
        Ok(keys.first().copied().unwrap_or(*delta_hash))
    }

    /// One commit for the whole batch: every commit closes the file, and each close leaves
    /// the unused tails of HDF5's allocation blocks behind (about 4 KiB), which one commit per
    /// delta of a fine-tune turned into a fifth of what its deltas cost.
    fn store_delta_batch(&self, deltas: &[(Delta, ContentHash)]) -> Result<Vec<ContentHash>> {
        let encoded = deltas
            .iter()
            .map(|(delta, hash)| {
                let key = hash.to_hex();
                let enc = self.encode(
                    key.clone(),
                    DType::U8,
                    &[delta.data.len()],
                    &delta.data,
                    None,
                )?;
                Ok((key, enc, delta))
            })
            .collect::<Result<Vec<_>>>()?;
        if encoded.is_empty() {
            return Ok(Vec::new());
        }
        self.with_write(|inner| {
            let g = self
                .deltas_group(inner)
                .ok_or_else(|| StoreError::ReadOnly {
                    location: self.path.display().to_string(),
                })?;
            for (key, enc, delta) in &encoded {
                if self.delta_present(inner, key)? {
                    continue;
                }
                if h5::link_exists(g.id(), key).map_err(|e| self.err(e))? {
                    // An uncommitted leftover of an interrupted write.
                    self.unlink(g.id(), key)?;
                }
                self.write_dataset(inner, g.id(), enc, &|obj| Self::delta_attrs(delta, obj))?;
            }
            self.flush(inner)
        })?;
        Ok(deltas.iter().map(|(_, k)| *k).collect())
    }

    fn load_delta(&self, delta_hash: &ContentHash) -> Result<Option<Delta>> {
        let key = delta_hash.to_hex();
        self.with(|inner| {
            if !self.delta_present(inner, &key)? {
                return Ok(None);
            }
            let g = self
                .deltas_group(inner)
                .ok_or_else(|| corrupt(self, &key, "no deltas group"))?;
            let d = self.open_dataset(g.id(), &key).map_err(|e| self.err(e))?;
            self.read_delta(d.id(), &key).map(Some)
        })?
        .map(|(mut delta, raw, es)| {
            let data = raw
                .decode(es, None)
                .map_err(|r| corrupt(self, &key, format!("delta payload: {r}")))?;
            delta.data = Bytes::from(data);
            Ok(delta)
        })
        .transpose()
    }

    fn delta_exists(&self, delta_hash: &ContentHash) -> Result<bool> {
        self.with(|inner| self.delta_present(inner, &delta_hash.to_hex()))
    }

    fn delete_delta(&self, delta_hash: &ContentHash) -> Result<bool> {
        let dependents = self.dependents_of(delta_hash)?;
        if dependents > 0 {
            return Err(StoreError::Referenced {
                key: *delta_hash,
                dependents,
            });
        }
        let key = delta_hash.to_hex();
        self.with_write(|inner| {
            let Some(g) = self.deltas_group(inner) else {
                return Ok(false);
            };
            if !h5::link_exists(g.id(), &key).map_err(|e| self.err(e))? {
                return Ok(false);
            }
            self.unlink(g.id(), &key)?;
            self.flush(inner)?;
            Ok(true)
        })
    }

    fn list_deltas(&self) -> Result<Vec<ContentHash>> {
        self.list_delta_keys()
    }

    /// From the deltas' attributes and extents: no payload is read.
    fn get_delta_storage_info(&self) -> Result<DeltaStorageInfo> {
        let mut info = DeltaStorageInfo::default();
        for k in self.list_delta_keys()? {
            let Some((d, len, _)) = self.delta_header(&k)? else {
                continue;
            };
            info.add(&d);
            info.total_delta_bytes = info.total_delta_bytes.saturating_add(len);
        }
        Ok(info)
    }
}

impl ManifestStore for HDF5Store {
    fn put_manifest(&self, manifest: &ModelManifest) -> Result<()> {
        let json = manifest
            .to_json()
            .map_err(|e| StoreError::core(format!("manifest {}", manifest.name), e))?;
        let name = manifest.name.as_str().to_owned();
        // The content hash of the bytes (as a 1-D uint8 weight's): zstd frames carry no
        // checksum, so a flipped bit could otherwise decode to another manifest that parses.
        let hash = ContentHash::sha256(DType::U8, &[json.len()], &json);
        let enc = self.encode(
            name.clone(),
            DType::U8,
            &[json.len()],
            &Bytes::from(json),
            None,
        )?;
        self.with_write(|inner| {
            let g = inner.models.as_ref().ok_or_else(|| StoreError::ReadOnly {
                location: self.path.display().to_string(),
            })?;
            // Write the new one under a temporary name, then swap the links.
            let tmp = format!("{name}.tmp");
            if h5::link_exists(g.id(), &tmp).map_err(|e| self.err(e))? {
                self.unlink(g.id(), &tmp)?;
            }
            let mut enc = enc;
            enc.key = tmp.clone();
            self.write_dataset(inner, g.id(), &enc, &|obj| {
                h5::write_str_attr(obj, "format", "coral.manifest.v1+json")?;
                // Bytes, not a string: strings live in the global heap, where damage to one
                // makes those after it unreadable.
                h5::write_u8s_attr(obj, MANIFEST_HASH, hash.as_bytes())
            })?;
            if h5::link_exists(g.id(), &name).map_err(|e| self.err(e))? {
                self.unlink(g.id(), &name)?;
            }
            move_link(g.id(), &tmp, &name).map_err(|e| self.err(e))?;
            self.flush(inner)
        })
    }

    fn get_manifest(&self, name: &ModelName) -> Result<Option<ModelManifest>> {
        let n = name.as_str();
        let bytes = self.with(|inner| {
            let Some(g) = inner.models.as_ref() else {
                return Ok(None);
            };
            if !h5::link_exists(g.id(), n).map_err(|e| self.err(e))? {
                return Ok(None);
            }
            let d = self.open_dataset(g.id(), n).map_err(|e| self.err(e))?;
            if let Some(raw) = self.raw() {
                raw.check_header(d.id())
                    .map_err(|why| corrupt(self, n, format!("object header: {why}")))?;
            }
            let space = h5::dataset_space(d.id()).map_err(|e| self.err(e))?;
            let dims = h5::space_dims(space.id()).map_err(|e| self.err(e))?;
            // The size comes from the file alone (no attribute to check it against).
            match dims.as_slice() {
                [len] if *len <= MAX_MANIFEST_BYTES => {}
                _ => {
                    return Err(corrupt(
                        self,
                        n,
                        format!(
                        "manifest dataset of shape {dims:?} (at most {MAX_MANIFEST_BYTES} bytes)"
                    ),
                    ))
                }
            }
            // At most MAX_MANIFEST_BYTES (checked above): it fits.
            let shape: Vec<usize> = dims.iter().map(|&x| x as usize).collect();
            let hash = h5::read_i64s_attr(d.id(), MANIFEST_HASH)
                .map_err(|err| corrupt(self, n, err.to_string()))?
                .map(|v| {
                    v.iter()
                        .map(|&x| u8::try_from(x).ok())
                        .collect::<Option<Vec<u8>>>()
                        .ok_or_else(|| corrupt(self, n, "manifest hash holds values above 255"))
                })
                .transpose()?;
            let raw = self.read_raw(d.id(), n, DType::U8, &shape, false)?;
            Ok(Some((raw, hash)))
        })?;
        let Some((raw, hash)) = bytes else {
            return Ok(None);
        };
        let data = raw
            .decode(1, None)
            .map_err(|r| corrupt(self, n, format!("manifest: {r}")))?;
        // Manifests written before the hash existed have none: they are taken as they read.
        if let Some(want) = hash {
            let got = ContentHash::sha256(DType::U8, &[data.len()], &data);
            if got.as_bytes() != want.as_slice() {
                let want: String = want.iter().map(|b| format!("{b:02x}")).collect();
                return Err(corrupt(
                    self,
                    n,
                    format!("manifest: its bytes hash to {got}, its {MANIFEST_HASH} attribute says {want}"),
                ));
            }
        }
        ModelManifest::from_json(&data)
            .map(Some)
            .map_err(|e| corrupt(self, n, e.to_string()))
    }

    fn list_manifests(&self) -> Result<Vec<ModelName>> {
        self.with(|inner| {
            let Some(g) = inner.models.as_ref() else {
                return Ok(Vec::new());
            };
            // Coral only writes valid names (and `.tmp` leftovers): any other name is a damaged
            // link, reported rather than skipped (a skipped one would hide the model from
            // `coral verify`).
            let mut out: Vec<ModelName> = h5::link_names(g.id())
                .map_err(|e| self.err(e))?
                .into_iter()
                .filter(|n| !n.ends_with(".tmp"))
                .map(|n| {
                    ModelName::new(&n).map_err(|err| {
                        corrupt(
                            self,
                            &n,
                            format!("models/ holds an entry whose name is not a model name: {err}"),
                        )
                    })
                })
                .collect::<Result<_>>()?;
            out.sort();
            Ok(out)
        })
    }

    fn delete_manifest(&self, name: &ModelName) -> Result<bool> {
        self.with_write(|inner| {
            let Some(g) = inner.models.as_ref() else {
                return Ok(false);
            };
            if !h5::link_exists(g.id(), name.as_str()).map_err(|e| self.err(e))? {
                return Ok(false);
            }
            self.unlink(g.id(), name.as_str())?;
            self.flush(inner)?;
            Ok(true)
        })
    }
}

fn move_link(group: hid_t, from: &str, to: &str) -> std::result::Result<(), H5Error> {
    let a = h5::cstr(from)?;
    let b = h5::cstr(to)?;
    // SAFETY: valid group id and C strings.
    h5::check(
        unsafe {
            hdf5_sys::h5l::H5Lmove(
                group,
                a.as_ptr(),
                group,
                b.as_ptr(),
                hdf5_sys::h5p::H5P_DEFAULT,
                hdf5_sys::h5p::H5P_DEFAULT,
            )
        },
        || format!("renaming {from} to {to}"),
    )
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<HDF5Store>();
    let _: Option<BTreeMap<String, ContentHash>> = None;
    let _: fn(&HDF5Store) -> Result<Vec<ContentHash>> = |s| s.list_weights();
}

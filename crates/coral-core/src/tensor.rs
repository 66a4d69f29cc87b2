//! Weight tensors and their metadata.

use bytes::Bytes;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::dtype::{DType, Element};
use crate::error::{CoreError, Result};
use crate::hash::{ContentHash, HashAlgorithm};

/// A JSON object, as stored in `compression_info`.
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// What Coral knows about a weight besides its bytes (the seed's `WeightMetadata`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightMetadata {
    /// The weight's name in its model ("encoder.layer.0.attention.self.query.weight").
    pub name: String,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Kind of layer, when known ("Linear", "LayerNorm", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_type: Option<String>,
    /// Model the weight came from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// How the weight is or was compressed: free-form JSON.
    #[serde(default)]
    pub compression_info: JsonMap,
    /// The content hash, once computed or known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<ContentHash>,
}

impl WeightMetadata {
    /// Metadata with a name, shape and dtype, and nothing else.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, dtype: DType) -> Self {
        WeightMetadata {
            name: name.into(),
            shape,
            dtype,
            layer_type: None,
            model_name: None,
            compression_info: JsonMap::new(),
            hash: None,
        }
    }

    /// Number of elements (1 for a scalar), or an error when it overflows.
    pub fn checked_size(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| CoreError::ShapeOverflow {
                name: self.name.clone(),
                shape: self.shape.clone(),
            })
    }

    /// Bytes that the data must have, or an error when it overflows.
    pub fn checked_nbytes(&self) -> Result<usize> {
        self.checked_size()?
            .checked_mul(self.dtype.size())
            .ok_or_else(|| CoreError::ShapeOverflow {
                name: self.name.clone(),
                shape: self.shape.clone(),
            })
    }
}

/// A weight: metadata plus little-endian data bytes. Cloning shares the bytes (no copy).
///
/// ```
/// use coral_core::{DType, WeightTensor};
/// let w = WeightTensor::from_vec("w", vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
/// assert_eq!(w.size(), 4);
/// assert_eq!(w.nbytes(), 16);
/// assert_eq!(w.dtype(), DType::F32);
/// let a = w.to_array::<f32>().unwrap();
/// assert_eq!(a[[1, 0]], 3.0);
/// ```
#[derive(Debug, Clone)]
pub struct WeightTensor {
    metadata: WeightMetadata,
    data: Bytes,
    release: Option<Release>,
}

/// Metadata and data: a release hint is not part of the value.
impl PartialEq for WeightTensor {
    fn eq(&self, other: &Self) -> bool {
        self.metadata == other.metadata && self.data == other.data
    }
}

/// A hint a weight's owner gives with data it can drop once consumed (memory-mapped file pages,
/// which count in the process's resident memory until dropped): called with byte ranges of the
/// data that a consumer has read and will not read again. Not part of the weight's value: two
/// weights compare equal whatever their hints.
#[derive(Clone)]
pub struct Release(std::sync::Arc<dyn Fn(std::ops::Range<usize>) + Send + Sync>);

impl Release {
    /// A hint calling `f`.
    pub fn new(f: impl Fn(std::ops::Range<usize>) + Send + Sync + 'static) -> Self {
        Release(std::sync::Arc::new(f))
    }

    /// Says that bytes `range` of the data are consumed.
    pub fn call(&self, range: std::ops::Range<usize>) {
        (self.0)(range)
    }
}

impl std::fmt::Debug for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Release")
    }
}

/// Data at least this large is hashed a window at a time when it carries a [`Release`] hint,
/// each window released once hashed.
pub const RELEASE_WINDOW: usize = 8 << 20;

impl WeightTensor {
    /// Builds a tensor; refuses data whose length disagrees with shape × dtype size.
    pub fn new(metadata: WeightMetadata, data: impl Into<Bytes>) -> Result<Self> {
        let data = data.into();
        let expected = metadata.checked_nbytes()?;
        if expected != data.len() {
            return Err(CoreError::ShapeMismatch {
                name: metadata.name.clone(),
                shape: metadata.shape.clone(),
                dtype: metadata.dtype.name().to_owned(),
                expected,
                actual: data.len(),
            });
        }
        Ok(WeightTensor {
            metadata,
            data,
            release: None,
        })
    }

    /// Attaches a [`Release`] hint: consumers that read the data once, in order (hashing, a
    /// store's compression), call it with the ranges they are done with.
    pub fn with_release(mut self, release: Release) -> Self {
        self.release = Some(release);
        self
    }

    /// The release hint, if any.
    pub fn release_hint(&self) -> Option<&Release> {
        self.release.as_ref()
    }

    /// Tells the data's owner that bytes `range` of the data are consumed (no-op without a
    /// hint).
    pub fn release(&self, range: std::ops::Range<usize>) {
        if let Some(r) = &self.release {
            r.call(range);
        }
    }

    /// Builds a tensor from raw little-endian bytes.
    pub fn from_bytes(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: DType,
        data: impl Into<Bytes>,
    ) -> Result<Self> {
        WeightTensor::new(WeightMetadata::new(name, shape, dtype), data)
    }

    /// Builds a tensor from typed values in row-major order.
    pub fn from_vec<T: Element>(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: Vec<T>,
    ) -> Result<Self> {
        let mut bytes = Vec::with_capacity(values.len() * T::DTYPE.size());
        T::extend_le_bytes(&values, &mut bytes);
        WeightTensor::from_bytes(name, shape, T::DTYPE, bytes)
    }

    /// Builds a tensor from an `ndarray` array (any layout; stored row-major).
    pub fn from_array<T: Element>(
        name: impl Into<String>,
        array: ArrayViewD<'_, T>,
    ) -> Result<Self> {
        let shape = array.shape().to_vec();
        let mut bytes = Vec::with_capacity(array.len() * T::DTYPE.size());
        match array.as_slice() {
            Some(s) => T::extend_le_bytes(s, &mut bytes),
            None => {
                let v: Vec<T> = array.iter().copied().collect();
                T::extend_le_bytes(&v, &mut bytes);
            }
        }
        WeightTensor::from_bytes(name, shape, T::DTYPE, bytes)
    }

    /// The data as an `ndarray` array of `T`; `T` must match the dtype.
    pub fn to_array<T: Element>(&self) -> Result<ArrayD<T>> {
        if T::DTYPE != self.metadata.dtype {
            return Err(CoreError::DTypeMismatch {
                name: self.metadata.name.clone(),
                requested: T::DTYPE.name().to_owned(),
                actual: self.metadata.dtype.name().to_owned(),
            });
        }
        let n = T::DTYPE.size();
        let values: Vec<T> = self.data.chunks_exact(n).map(T::from_le_slice).collect();
        ArrayD::from_shape_vec(IxDyn(&self.metadata.shape), values).map_err(|_| {
            CoreError::ShapeOverflow {
                name: self.metadata.name.clone(),
                shape: self.metadata.shape.clone(),
            }
        })
    }

    /// The metadata.
    pub fn metadata(&self) -> &WeightMetadata {
        &self.metadata
    }

    /// The metadata, mutably (shape and dtype cannot change: they are tied to the data).
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.metadata.name = name.into();
    }

    /// Replaces the free-form parts of the metadata (name, layer type, model, compression info,
    /// hash), keeping shape and dtype.
    pub fn with_metadata(mut self, mut metadata: WeightMetadata) -> Result<Self> {
        if metadata.shape != self.metadata.shape || metadata.dtype != self.metadata.dtype {
            return WeightTensor::new(metadata, self.data);
        }
        std::mem::swap(&mut self.metadata, &mut metadata);
        Ok(self)
    }

    /// The little-endian data bytes, shared.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Splits into metadata and data.
    pub fn into_parts(self) -> (WeightMetadata, Bytes) {
        (self.metadata, self.data)
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.metadata.shape
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.metadata.dtype
    }

    /// Number of elements.
    pub fn size(&self) -> usize {
        self.data.len() / self.metadata.dtype.size()
    }

    /// Number of data bytes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    /// Computes the content hash with `algorithm` (does not store it in the metadata). Data
    /// with a [`Release`] hint is hashed [`RELEASE_WINDOW`] bytes at a time, each window released
    /// once hashed, so that hashing a memory-mapped tensor holds one window resident.
    pub fn compute_hash_with(&self, algorithm: HashAlgorithm) -> ContentHash {
        if self.release.is_none() || self.data.len() < 2 * RELEASE_WINDOW {
            return ContentHash::compute(
                algorithm,
                self.metadata.dtype,
                &self.metadata.shape,
                &self.data,
            );
        }
        let mut h = crate::ContentHasher::new(algorithm, self.metadata.dtype, &self.metadata.shape);
        let mut start = 0;
        while start < self.data.len() {
            let end = (start + RELEASE_WINDOW).min(self.data.len());
            h.update(&self.data[start..end]);
            self.release(start..end);
            start = end;
        }
        h.finish()
    }

    /// Computes Coral's SHA-256 content hash.
    pub fn compute_hash(&self) -> ContentHash {
        self.compute_hash_with(HashAlgorithm::Sha256)
    }

    /// Checks the data against `expected`, using `expected`'s algorithm. Returns the actual hash
    /// in the error when they differ.
    pub fn verify(&self, expected: &ContentHash) -> Result<()> {
        let actual = self.compute_hash_with(expected.algorithm());
        if actual == *expected {
            Ok(())
        } else {
            Err(CoreError::Integrity {
                name: self.metadata.name.clone(),
                expected: expected.to_hex(),
                actual: actual.to_hex(),
            })
        }
    }
}

/// A weight with the hash of its data: proof that the data was hashed, so nothing after has to
/// hash it again.
///
/// Every constructor hashes, and nothing hands out the weight mutably except its name (which
/// the hash does not cover), so [`HashedWeight::key`] is always the hash of
/// [`HashedWeight::weight`] under the key's algorithm. Stores take it
/// (`WeightStore::store_hashed`) and skip their own hashing; `coral add` hashes each tensor
/// once, to look it up, and stores it through the same value.
///
/// ```
/// use coral_core::{HashAlgorithm, HashedWeight, WeightTensor};
///
/// let w = WeightTensor::from_vec("w", vec![2], vec![1.0f32, 2.0])?;
/// let key = w.compute_hash();
/// let hashed = HashedWeight::new(w);
/// assert_eq!(*hashed.key(), key);
/// // A given key is checked, once.
/// let again = HashedWeight::check(hashed.into_weight(), &key)?;
/// assert_eq!(again.key().algorithm(), HashAlgorithm::Sha256);
/// # Ok::<(), coral_core::CoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct HashedWeight {
    weight: WeightTensor,
    key: ContentHash,
}

impl HashedWeight {
    /// Hashes `weight` with SHA-256.
    pub fn new(weight: WeightTensor) -> Self {
        Self::with_algorithm(weight, HashAlgorithm::Sha256)
    }

    /// Hashes `weight` with `algorithm`.
    pub fn with_algorithm(weight: WeightTensor, algorithm: HashAlgorithm) -> Self {
        let key = weight.compute_hash_with(algorithm);
        Self { weight, key }
    }

    /// Hashes `weight` with `expected`'s algorithm and checks it against `expected`:
    /// [`CoreError::Integrity`] (with both hashes) when they differ.
    pub fn check(weight: WeightTensor, expected: &ContentHash) -> Result<Self> {
        let hashed = Self::with_algorithm(weight, expected.algorithm());
        if hashed.key == *expected {
            Ok(hashed)
        } else {
            Err(CoreError::Integrity {
                name: hashed.weight.metadata.name.clone(),
                expected: expected.to_hex(),
                actual: hashed.key.to_hex(),
            })
        }
    }

    /// The hash of the data.
    pub fn key(&self) -> &ContentHash {
        &self.key
    }

    /// The weight.
    pub fn weight(&self) -> &WeightTensor {
        &self.weight
    }

    /// Renames the weight (the name is not hashed).
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.weight.set_name(name);
    }

    /// The weight, giving up the proof.
    pub fn into_weight(self) -> WeightTensor {
        self.weight
    }

    /// The weight and its key.
    pub fn into_parts(self) -> (WeightTensor, ContentHash) {
        (self.weight, self.key)
    }
}

impl std::ops::Deref for HashedWeight {
    type Target = WeightTensor;

    fn deref(&self) -> &WeightTensor {
        &self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_weight_keeps_its_key_and_check_refuses_another() {
        let w = WeightTensor::from_vec("w", vec![3], vec![1.0f32, 2.0, 3.0]).unwrap();
        let mut h = HashedWeight::new(w.clone());
        assert_eq!(*h.key(), w.compute_hash());
        h.set_name("renamed");
        assert_eq!(*h.key(), w.compute_hash());
        let legacy = HashedWeight::with_algorithm(w.clone(), HashAlgorithm::Xxh3Legacy);
        assert_eq!(
            *legacy.key(),
            w.compute_hash_with(HashAlgorithm::Xxh3Legacy)
        );
        let other = WeightTensor::from_vec("o", vec![3], vec![1.0f32, 2.0, 4.0]).unwrap();
        let e = HashedWeight::check(other, h.key()).unwrap_err();
        assert!(matches!(e, CoreError::Integrity { .. }), "{e}");
        assert!(HashedWeight::check(w, legacy.key()).is_ok());
    }

    #[test]
    fn refuses_wrong_length() {
        let err = WeightTensor::from_bytes("w", vec![2, 3], DType::F32, vec![0u8; 23]).unwrap_err();
        assert!(err.to_string().contains("needs 24 bytes, got 23"), "{err}");
        assert!(WeightTensor::from_bytes("w", vec![usize::MAX, 2], DType::F32, vec![]).is_err());
    }

    #[test]
    fn scalar_and_empty() {
        let s = WeightTensor::from_bytes("s", vec![], DType::F64, vec![0u8; 8]).unwrap();
        assert_eq!(s.size(), 1);
        let e = WeightTensor::from_bytes("e", vec![0, 5], DType::F32, Vec::new()).unwrap();
        assert_eq!(e.size(), 0);
        assert_eq!(e.to_array::<f32>().unwrap().shape(), &[0, 5]);
    }

    #[test]
    fn array_round_trip() {
        let a = ndarray::Array::from_shape_vec((2, 3), vec![1i64, -2, 3, 4, 5, -6])
            .unwrap()
            .into_dyn();
        let w = WeightTensor::from_array("a", a.view()).unwrap();
        assert_eq!(w.to_array::<i64>().unwrap(), a);
        assert!(w.to_array::<f64>().is_err());
        let t = a.t();
        let wt = WeightTensor::from_array("t", t.view().into_dyn()).unwrap();
        assert_eq!(wt.shape(), &[3, 2]);
        assert_eq!(wt.to_array::<i64>().unwrap(), t.to_owned().into_dyn());
    }
}

#[cfg(test)]
mod release_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_release_hint_sees_every_window_and_changes_no_hash() {
        let n = 2 * RELEASE_WINDOW + 12_345;
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let plain = WeightTensor::from_bytes("w", vec![n], DType::U8, data).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hinted = plain
            .clone()
            .with_release(Release::new(move |r| s.lock().unwrap().push(r)));
        assert!(hinted == plain, "the hint is not part of the value");
        for alg in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
            seen.lock().unwrap().clear();
            assert_eq!(hinted.compute_hash_with(alg), plain.compute_hash_with(alg));
            let ranges = seen.lock().unwrap().clone();
            assert_eq!(ranges.len(), 3);
            let mut pos = 0;
            for r in ranges {
                assert_eq!(r.start, pos);
                pos = r.end;
            }
            assert_eq!(pos, n);
        }
        // Small data is hashed at once, without calls.
        seen.lock().unwrap().clear();
        let s = seen.clone();
        let small = WeightTensor::from_vec("s", vec![3], vec![1.0f32, 2.0, 3.0])
            .unwrap()
            .with_release(Release::new(move |r| s.lock().unwrap().push(r)));
        let _ = small.compute_hash();
        assert!(seen.lock().unwrap().is_empty());
    }
}

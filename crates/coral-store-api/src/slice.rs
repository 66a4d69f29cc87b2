//! Parts of one weight: rows along its first axis, ranges of its data bytes, and its data written
//! to an [`std::io::Write`] as it is read. The checks every backend makes of such a request, and
//! the provided implementations of [`WeightStore::load_rows`],
//! [`WeightStore::load_byte_range`] and [`WeightStore::load_into`] (the whole weight loaded and
//! verified, then cut), which a backend that overrides them calls for what it cannot do better
//! (a weight kept as a delta, a dataset in a foreign layout).
//!
//! What is verified: a slice is not. A weight's key is the hash of all of its data; there are no
//! hashes of its parts, so rows or bytes read alone cannot be checked against it, and a backend
//! that reads only the chunks involved (the HDF5 store) hands them over unverified. The stored
//! codec's own framing (a zstd frame's size, a zlib stream's checksum) is still checked. A
//! streamed load ([`WeightStore::load_into`]) reads everything and is verified, at its end.
//!
//! ```
//! use coral_store_api::{MemoryStore, RangeUnit, StoreError, WeightStore};
//! use coral_core::WeightTensor;
//!
//! let store = MemoryStore::new();
//! let w = WeightTensor::from_vec("w", vec![3, 2], vec![1u16, 2, 3, 4, 5, 6])?;
//! let key = store.store(&w)?;
//! let rows = store.load_rows(&key, 1..3)?.expect("present");
//! assert_eq!(rows.shape(), &[2, 2]);
//! assert_eq!(&rows.data()[..], &w.data()[4..]);
//! let bytes = store.load_byte_range(&key, 2..5)?.expect("present");
//! assert_eq!(&bytes[..], &w.data()[2..5]);
//! assert!(matches!(
//!     store.load_rows(&key, 2..4),
//!     Err(StoreError::InvalidRange { unit: RangeUnit::Rows, start: 2, end: 4, .. })
//! ));
//! let mut out = Vec::new();
//! let (meta, hash) = store.load_into(&key, &mut out)?.expect("present");
//! assert_eq!((meta.shape, hash), (vec![3, 2], key));
//! assert_eq!(&out[..], &w.data()[..]);
//! # Ok::<(), StoreError>(())
//! ```

use std::ops::Range;

use bytes::Bytes;
use coral_core::{ContentHash, WeightMetadata, WeightTensor};

use crate::error::{RangeUnit, Result, StoreError};
use crate::traits::WeightStore;

fn invalid(key: &ContentHash, unit: RangeUnit, start: u64, end: u64, reason: String) -> StoreError {
    StoreError::InvalidRange {
        key: *key,
        unit,
        start,
        end,
        reason,
    }
}

/// Bytes of one row of a weight with this metadata (the product of every dimension after the
/// first, times the element size); [`StoreError::InvalidRange`] for a 0-d weight, which has no
/// rows, and when the product overflows. `rows` is only for the error.
pub fn row_bytes(key: &ContentHash, meta: &WeightMetadata, rows: &Range<usize>) -> Result<usize> {
    let bad = |reason: String| {
        invalid(
            key,
            RangeUnit::Rows,
            rows.start as u64,
            rows.end as u64,
            reason,
        )
    };
    let Some((_, rest)) = meta.shape.split_first() else {
        return Err(bad(format!(
            "weight {:?} is 0-d (a scalar): it has no rows",
            meta.name
        )));
    };
    rest.iter()
        .try_fold(meta.dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("a row of shape {:?} overflows", meta.shape)))
}

/// Checks `rows` against a weight with this metadata and gives the data bytes they cover:
/// [`StoreError::InvalidRange`] for a 0-d weight, a reversed range or one past the first
/// dimension. An empty range (`a..a`, `a` at most the first dimension) is valid.
pub fn rows_to_bytes(
    key: &ContentHash,
    meta: &WeightMetadata,
    rows: &Range<usize>,
) -> Result<Range<usize>> {
    let row = row_bytes(key, meta, rows)?;
    let bad = |reason: String| {
        invalid(
            key,
            RangeUnit::Rows,
            rows.start as u64,
            rows.end as u64,
            reason,
        )
    };
    let n = meta.shape.first().copied().unwrap_or(0);
    if rows.start > rows.end {
        return Err(bad("the range is reversed".to_owned()));
    }
    if rows.end > n {
        return Err(bad(format!("weight {:?} has {n} rows", meta.name)));
    }
    match (rows.start.checked_mul(row), rows.end.checked_mul(row)) {
        (Some(a), Some(b)) => Ok(a..b),
        _ => Err(bad(format!("the rows of shape {:?} overflow", meta.shape))),
    }
}

/// Checks `range` against a weight of `nbytes` data bytes (weight `name`):
/// [`StoreError::InvalidRange`] for a reversed range or one past the end. An empty range
/// (`a..a`, `a` at most `nbytes`) is valid.
pub fn check_byte_range(
    key: &ContentHash,
    name: &str,
    nbytes: u64,
    range: &Range<u64>,
) -> Result<()> {
    let bad = |reason: String| invalid(key, RangeUnit::Bytes, range.start, range.end, reason);
    if range.start > range.end {
        return Err(bad("the range is reversed".to_owned()));
    }
    if range.end > nbytes {
        return Err(bad(format!("weight {name:?} has {nbytes} data bytes")));
    }
    Ok(())
}

/// The metadata of rows of a weight: the weight's own (name, dtype, layer type, model,
/// compression info), with `n_rows` as the first dimension and no hash (the rows' data does
/// not hash to the weight's key).
pub fn rows_metadata(meta: &WeightMetadata, n_rows: usize) -> WeightMetadata {
    let mut out = meta.clone();
    if let Some(d) = out.shape.first_mut() {
        *d = n_rows;
    }
    out.hash = None;
    out
}

/// Rows `rows` of a whole weight stored under `key`, checked as [`rows_to_bytes`] does; the
/// data is shared, not copied.
pub fn slice_rows(
    weight: &WeightTensor,
    key: &ContentHash,
    rows: Range<usize>,
) -> Result<WeightTensor> {
    let bytes = rows_to_bytes(key, weight.metadata(), &rows)?;
    let meta = rows_metadata(weight.metadata(), rows.len());
    let data = weight.data().slice(bytes);
    WeightTensor::new(meta, data).map_err(|e| {
        StoreError::core(
            format!("rows {}..{} of weight {key}", rows.start, rows.end),
            e,
        )
    })
}

/// The error of a sink that failed while `key`'s data was written to it.
pub fn sink_error(key: &ContentHash, e: std::io::Error) -> StoreError {
    StoreError::backend(format!("writing the data of weight {key}"), e)
}

/// [`WeightStore::load_rows`] through [`WeightStore::load`]: the whole weight, verified, then
/// cut (sharing its bytes).
pub fn load_rows_whole<S: WeightStore + ?Sized>(
    store: &S,
    key: &ContentHash,
    rows: Range<usize>,
) -> Result<Option<WeightTensor>> {
    match store.load(key)? {
        Some(w) => slice_rows(&w, key, rows).map(Some),
        None => Ok(None),
    }
}

/// [`WeightStore::load_byte_range`] through [`WeightStore::load`]: the whole weight, verified,
/// then cut (sharing its bytes).
pub fn load_byte_range_whole<S: WeightStore + ?Sized>(
    store: &S,
    key: &ContentHash,
    range: Range<u64>,
) -> Result<Option<Bytes>> {
    let Some(w) = store.load(key)? else {
        return Ok(None);
    };
    check_byte_range(key, w.name(), w.nbytes() as u64, &range)?;
    // Within nbytes, a usize: the conversions hold.
    let (a, b) = (range.start as usize, range.end as usize);
    Ok(Some(w.data().slice(a..b)))
}

/// [`WeightStore::load_into`] through [`WeightStore::load_hashed`]: the whole weight, verified
/// (with the store's strictness), then written; nothing is written when it does not verify in a
/// strict store.
pub fn load_into_whole<S: WeightStore + ?Sized>(
    store: &S,
    key: &ContentHash,
    sink: &mut dyn std::io::Write,
) -> Result<Option<(WeightMetadata, ContentHash)>> {
    let Some(hashed) = store.load_hashed(key)? else {
        return Ok(None);
    };
    let (weight, actual) = hashed.into_parts();
    let (meta, data) = weight.into_parts();
    sink.write_all(&data).map_err(|e| sink_error(key, e))?;
    Ok(Some((meta, actual)))
}

#[cfg(test)]
mod tests {
    use coral_core::DType;

    use super::*;

    fn key() -> ContentHash {
        ContentHash::Sha256([7; 32])
    }

    #[test]
    fn rows_are_checked() {
        let m = WeightMetadata::new("w", vec![4, 3], DType::F32);
        assert_eq!(rows_to_bytes(&key(), &m, &(1..3)).unwrap(), 12..36);
        assert_eq!(rows_to_bytes(&key(), &m, &(4..4)).unwrap(), 48..48);
        for bad in [0..5, 5..5, Range { start: 3, end: 2 }] {
            let e = rows_to_bytes(&key(), &m, &bad).unwrap_err();
            match &e {
                StoreError::InvalidRange {
                    key: k,
                    unit,
                    start,
                    end,
                    ..
                } => {
                    assert_eq!((*k, *unit), (key(), RangeUnit::Rows));
                    assert_eq!((*start, *end), (bad.start as u64, bad.end as u64));
                }
                other => panic!("{other:?}"),
            }
            assert!(e.to_string().contains(&key().to_hex()), "{e}");
        }
        let scalar = WeightMetadata::new("s", vec![], DType::F64);
        let e = rows_to_bytes(&key(), &scalar, &(0..0)).unwrap_err();
        assert!(e.to_string().contains("0-d"), "{e}");
        let huge = WeightMetadata::new("h", vec![2, usize::MAX, 2], DType::F32);
        assert!(rows_to_bytes(&key(), &huge, &(0..1)).is_err());
        let wide = WeightMetadata::new("h", vec![usize::MAX, 2], DType::F32);
        assert!(rows_to_bytes(&key(), &wide, &(0..usize::MAX)).is_err());
    }

    #[test]
    fn byte_ranges_are_checked() {
        check_byte_range(&key(), "w", 10, &(0..10)).unwrap();
        check_byte_range(&key(), "w", 10, &(10..10)).unwrap();
        check_byte_range(&key(), "w", 0, &(0..0)).unwrap();
        for bad in [0..11, 11..11, Range { start: 5, end: 4 }] {
            let e = check_byte_range(&key(), "w", 10, &bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    StoreError::InvalidRange {
                        unit: RangeUnit::Bytes,
                        ..
                    }
                ),
                "{e}"
            );
        }
        let e = check_byte_range(&key(), "w", 10, &(4..12)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "weight {}: cannot read bytes 4..12: weight \"w\" has 10 data bytes",
                key()
            )
        );
    }

    #[test]
    fn slices_keep_the_metadata_but_the_hash() {
        let mut w = WeightTensor::from_vec("w", vec![3, 2], vec![1u8, 2, 3, 4, 5, 6]).unwrap();
        let mut meta = w.metadata().clone();
        meta.layer_type = Some("Linear".to_owned());
        meta.hash = Some(key());
        w = w.with_metadata(meta).unwrap();
        let s = slice_rows(&w, &key(), 1..2).unwrap();
        assert_eq!(s.shape(), &[1, 2]);
        assert_eq!(&s.data()[..], &[3, 4]);
        assert_eq!(s.metadata().layer_type.as_deref(), Some("Linear"));
        assert_eq!(s.metadata().hash, None);
        let e = slice_rows(&w, &key(), 0..4).unwrap_err();
        assert!(e.to_string().contains("has 3 rows"), "{e}");
    }
}

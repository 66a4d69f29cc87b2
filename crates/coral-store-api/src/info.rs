//! Storage statistics.

use serde::{Deserialize, Serialize};

/// The seed's `get_storage_info()` figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageInfo {
    /// Backend name ("memory", "hdf5", "s3").
    pub backend: String,
    /// The store's path or URL (the seed's `filepath`).
    pub location: String,
    /// Bytes the store takes where it lives (file size, object bytes).
    pub file_size: u64,
    /// Of `file_size`, the bytes that hold nothing live: free space inside a local file, which
    /// later writes reuse and a compaction gives back (0 where the backend has none).
    #[serde(default)]
    pub reclaimable_bytes: u64,
    /// Number of weights stored in full.
    pub total_weights: u64,
    /// Uncompressed bytes of those weights.
    pub total_bytes: u64,
    /// Their bytes as stored.
    pub compressed_bytes: u64,
    /// `1 - compressed_bytes / total_bytes` (0 when empty): the fraction saved, as the seed's
    /// `compression_ratio` reads.
    pub compression_ratio: f64,
    /// The codec new weights are written with ("zstd-3+shuffle").
    pub compression: String,
    /// Delta figures.
    pub deltas: DeltaStorageInfo,
}

/// The seed's `get_delta_storage_info()` figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeltaStorageInfo {
    /// Number of deltas.
    pub total_deltas: u64,
    /// Bytes of their payloads as stored.
    pub total_delta_bytes: u64,
    /// Bytes of the weights they stand for.
    pub total_original_bytes: u64,
    /// Count per delta type.
    pub by_type: std::collections::BTreeMap<String, u64>,
}

impl StorageInfo {
    /// The fraction saved for given totals (0 when empty).
    pub fn saved_fraction(total_bytes: u64, compressed_bytes: u64) -> f64 {
        if total_bytes == 0 {
            0.0
        } else {
            1.0 - compressed_bytes as f64 / total_bytes as f64
        }
    }
}

impl DeltaStorageInfo {
    /// Counts one delta. Sizes come from stored fields, so the original size saturates
    /// rather than overflows (a figure, not an allocation).
    pub fn add(&mut self, d: &coral_core::Delta) {
        self.total_deltas += 1;
        self.total_delta_bytes = self.total_delta_bytes.saturating_add(d.nbytes() as u64);
        let bytes = d
            .original_shape
            .iter()
            .fold(d.original_dtype.size() as u64, |a, &x| {
                a.saturating_mul(x as u64)
            });
        self.total_original_bytes = self.total_original_bytes.saturating_add(bytes);
        *self
            .by_type
            .entry(d.delta_type.name().to_owned())
            .or_insert(0) += 1;
    }
}

//! The options of [`crate::HDF5Store::open`]: the seed's (compression, level, mode, strict
//! integrity) plus shuffle, zstd, the hash algorithm and the chunk size.

use std::fmt;
use std::str::FromStr;

use coral_core::HashAlgorithm;
use coral_store_api::StoreError;

/// The compression new datasets are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// No filter.
    None,
    /// HDF5's deflate filter (h5py's "gzip"), levels 1-9.
    Gzip,
    /// h5py's LZF filter (id 32000), no level.
    Lzf,
    /// Zstandard (registered filter id 32015; h5py reads it with `hdf5plugin`), levels 1-22.
    Zstd,
    /// Coral's float codec (filter id 307, `coral-float-codec`) for bf16, f16 and f32; other
    /// dtypes get zstd (level 1, after shuffle). h5py reads it with the `coral-h5plugin`
    /// plugin on `HDF5_PLUGIN_PATH`. No level.
    Coral,
}

impl Compression {
    /// The seed's name: "none", "gzip", "lzf", "zstd".
    pub const fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lzf => "lzf",
            Compression::Zstd => "zstd",
            Compression::Coral => "coral",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Compression::None),
            "gzip" | "deflate" => Ok(Compression::Gzip),
            "lzf" => Ok(Compression::Lzf),
            "zstd" | "zstandard" => Ok(Compression::Zstd),
            "coral" => Ok(Compression::Coral),
            other => Err(StoreError::InvalidConfig(format!(
                "unknown compression {other:?} (use coral, gzip, lzf, zstd or none)"
            ))),
        }
    }
}

/// How the file is opened: h5py's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `r`: read only; the file must exist and be a Coral store.
    Read,
    /// `r+`: read and write; the file must exist and be a Coral store.
    ReadWrite,
    /// `w`: create, truncating any existing file.
    Truncate,
    /// `w-` or `x`: create; fail if the file exists.
    CreateNew,
    /// `a`: read and write if it exists, create otherwise (the seed's default).
    Append,
}

impl Mode {
    /// h5py's spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Read => "r",
            Mode::ReadWrite => "r+",
            Mode::Truncate => "w",
            Mode::CreateNew => "w-",
            Mode::Append => "a",
        }
    }

    /// True for every mode but `r`.
    pub const fn writable(self) -> bool {
        !matches!(self, Mode::Read)
    }
}

impl FromStr for Mode {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "r" => Ok(Mode::Read),
            "r+" => Ok(Mode::ReadWrite),
            "w" => Ok(Mode::Truncate),
            "w-" | "x" => Ok(Mode::CreateNew),
            "a" => Ok(Mode::Append),
            other => Err(StoreError::InvalidConfig(format!(
                "unknown mode {other:?} (use r, r+, w, w-, x or a)"
            ))),
        }
    }
}

/// Options of [`crate::HDF5Store::open`], builder style. The defaults are the seed's: gzip level
/// 4, mode `a`, strict integrity; plus shuffle on and SHA-256 keys.
///
/// ```
/// use coral_hdf5::{Compression, HDF5StoreOptions, Mode};
/// let o = HDF5StoreOptions::new().compression(Compression::Zstd).level(3).mode(Mode::Append);
/// assert!(o.validate().is_ok());
/// assert!(HDF5StoreOptions::new().level(12).validate().is_err()); // gzip is 1-9
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HDF5StoreOptions {
    pub(crate) compression: Compression,
    pub(crate) level: Option<i32>,
    pub(crate) mode: Mode,
    pub(crate) strict_integrity: bool,
    pub(crate) shuffle: bool,
    pub(crate) hash_algorithm: HashAlgorithm,
    pub(crate) chunk_bytes: usize,
    pub(crate) wait: std::time::Duration,
    pub(crate) durable: bool,
    pub(crate) allow_unjournaled: bool,
    pub(crate) persistent_free_space: bool,
}

impl Default for HDF5StoreOptions {
    fn default() -> Self {
        HDF5StoreOptions {
            compression: Compression::Gzip,
            level: None,
            mode: Mode::Append,
            strict_integrity: true,
            shuffle: true,
            hash_algorithm: HashAlgorithm::Sha256,
            chunk_bytes: 4 << 20,
            wait: std::time::Duration::from_secs(10),
            durable: true,
            allow_unjournaled: false,
            persistent_free_space: true,
        }
    }
}

impl HDF5StoreOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The Python Coral's settings: xxh3-64 keys, gzip level 4, and shuffle, so coral-ml 1.0
    /// opens the store and finds every weight under the key it computes itself.
    pub fn python_compatible() -> Self {
        HDF5StoreOptions {
            hash_algorithm: HashAlgorithm::Xxh3Legacy,
            ..Self::default()
        }
    }

    /// Sets the compression.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    /// Sets the level (gzip 1-9, zstd 1-22 or -7..-1; none and lzf take none). Unset: gzip 4
    /// (the seed's), zstd 1 (on shuffled float weights zstd 1 is both faster and smaller than
    /// zstd 3: its literals are entropy-coded per block, while 3's lazy match search spends time
    /// and bits on matches in near-random mantissa bytes).
    pub fn level(mut self, level: i32) -> Self {
        self.level = Some(level);
        self
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Strict integrity (default): a weight that does not match its key is an error on load;
    /// otherwise a logged warning and the data.
    pub fn strict_integrity(mut self, strict: bool) -> Self {
        self.strict_integrity = strict;
        self
    }

    /// The shuffle filter before the codec (default on; no effect on 1-byte dtypes or without
    /// compression).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The hash algorithm of `store` and `store_batch` keys (SHA-256 by default; xxh3-64 for the
    /// Python Coral's keys).
    pub fn hash_algorithm(mut self, a: HashAlgorithm) -> Self {
        self.hash_algorithm = a;
        self
    }

    /// Target uncompressed bytes per chunk (default 4 MiB: larger chunks compress float weights better, about 0.4 points of the file on all-MiniLM-L6-v2; 4 KiB to 256 MiB).
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes;
        self
    }

    /// The effective level of the codec.
    pub fn effective_level(&self) -> Option<i32> {
        match self.compression {
            Compression::Gzip => Some(self.level.unwrap_or(4)),
            Compression::Zstd => Some(self.level.unwrap_or(1)),
            Compression::None | Compression::Lzf | Compression::Coral => None,
        }
    }

    /// How long an open waits for another writer to close the store, and a commit for the
    /// readers that have it open (default 10 s; zero fails at once). `docs/format.md`,
    /// "Locking", describes the locks.
    pub fn wait(mut self, wait: std::time::Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Durable commits (default on): every write that returned survives a power cut or a
    /// kernel crash, at the cost of a few `fsync`s per commit (the journal driver's doc gives
    /// the order). Off, a commit survives the death of the process but not of the machine.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Writes even where Coral's crash-safe file driver cannot be used (a linked HDF5 other than
    /// a 1.10 release from 1.10.8 on): such a store can be left unreadable by a crash. Off by
    /// default: opening for writing is then refused with [`StoreError::InvalidConfig`] rather
    /// than silently losing crash safety. (`coral`: `CORAL_ALLOW_UNJOURNALED=1`.)
    pub fn allow_unjournaled(mut self, allow: bool) -> Self {
        self.allow_unjournaled = allow;
        self
    }

    /// Files this store creates (and compacts into) record their free space, so later writes
    /// reuse the space deletes free (default on). That takes HDF5's 1.10 file-space records
    /// (a version 2 superblock and version 2 object headers, with checksums), which HDF5
    /// 1.10.1 and later read; off, the files are in the 1.8-compatible layout older stores
    /// have, and freed space is reused only until the file closes. Existing files keep theirs.
    pub fn persistent_free_space(mut self, on: bool) -> Self {
        self.persistent_free_space = on;
        self
    }

    /// The mode.
    pub fn get_mode(&self) -> Mode {
        self.mode
    }

    /// Refuses invalid combinations with [`StoreError::InvalidConfig`].
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |s: String| Err(StoreError::InvalidConfig(s));
        match (self.compression, self.level) {
            (Compression::Gzip, Some(l)) if !(1..=9).contains(&l) => {
                return bad(format!("gzip level must be 1-9, got {l}"))
            }
            (Compression::Zstd, Some(l)) if !(-7..=22).contains(&l) || l == 0 => {
                return bad(format!("zstd level must be 1-22 or -7..-1, got {l}"))
            }
            (Compression::None | Compression::Lzf | Compression::Coral, Some(l)) => {
                return bad(format!("{} takes no level (got {l})", self.compression))
            }
            _ => {}
        }
        if !(4096..=256 << 20).contains(&self.chunk_bytes) {
            return bad(format!(
                "chunk_bytes must be 4 KiB to 256 MiB, got {}",
                self.chunk_bytes
            ));
        }
        Ok(())
    }

    /// How new weights are compressed, as `storage_info` reports it ("gzip-4+shuffle").
    pub fn describe(&self) -> String {
        let mut s = match self.effective_level() {
            Some(l) => format!("{}-{l}", self.compression),
            None => self.compression.to_string(),
        };
        if self.shuffle && !matches!(self.compression, Compression::None | Compression::Coral) {
            s.push_str("+shuffle");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        for m in ["r", "r+", "w", "w-", "x", "a"] {
            assert!(m.parse::<Mode>().is_ok());
        }
        assert!("rw".parse::<Mode>().is_err());
        assert!("brotli".parse::<Compression>().is_err());
        assert!(HDF5StoreOptions::new().level(0).validate().is_err());
        assert!(HDF5StoreOptions::new()
            .compression(Compression::Lzf)
            .level(3)
            .validate()
            .is_err());
        assert!(HDF5StoreOptions::new()
            .compression(Compression::Zstd)
            .level(19)
            .validate()
            .is_ok());
        assert!(HDF5StoreOptions::new().chunk_bytes(10).validate().is_err());
        assert_eq!(HDF5StoreOptions::new().describe(), "gzip-4+shuffle");
        let coral = HDF5StoreOptions::new().compression("coral".parse().unwrap());
        assert_eq!(coral.describe(), "coral");
        assert!(coral.clone().level(3).validate().is_err());
        assert!(coral.validate().is_ok());
    }
}

//! Content hashes: the keys of every store.
//!
//! A [`ContentHash`] is a validated value, never a bare string: its parser accepts only 64
//! lowercase hex characters (SHA-256, Coral's own) or 16 lowercase hex characters (the Python
//! Coral's xxh3-64), so a key can never carry a path separator, a dot or anything else into a file
//! name or an object key. `docs/format.md` defines both hashes with test vectors.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dtype::DType;
use crate::error::{CoreError, Result};

/// The domain tag at the start of every SHA-256 content hash (see `docs/format.md`).
pub const SHA256_DOMAIN_TAG: &[u8] = b"coral.weight.v1\0";

/// Which definition a hash follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum HashAlgorithm {
    /// Coral's key: SHA-256 over a canonical encoding of dtype, shape and bytes.
    #[default]
    Sha256,
    /// The Python Coral's key (`coral-ml` 1.0): xxh3-64 over `str(shape)`, the NumPy dtype name and
    /// the bytes. Kept so stores written by the Python Coral keep verifying.
    Xxh3Legacy,
}

impl HashAlgorithm {
    /// The name used in configuration and metadata: `"sha256"` or `"xxh3-64"`.
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Xxh3Legacy => "xxh3-64",
        }
    }
}

/// A validated content hash: SHA-256 (32 bytes) or legacy xxh3-64 (8 bytes).
///
/// Ordering is by algorithm, then bytes, which is also the order of the hex strings within each
/// algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentHash {
    /// SHA-256 digest.
    Sha256([u8; 32]),
    /// xxh3-64 digest, big-endian as Python's `hexdigest()` prints it.
    Xxh3([u8; 8]),
}

impl ContentHash {
    /// Parses a key. Accepts exactly 64 or 16 lowercase hex characters; anything else is
    /// [`CoreError::InvalidHash`].
    pub fn parse(s: &str) -> Result<ContentHash> {
        let bad = || CoreError::InvalidHash(s.chars().take(80).collect());
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        match s.len() {
            64 => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
                Ok(ContentHash::Sha256(out))
            }
            16 => {
                let mut out = [0u8; 8];
                hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
                Ok(ContentHash::Xxh3(out))
            }
            _ => Err(bad()),
        }
    }

    /// The algorithm this hash follows.
    pub const fn algorithm(&self) -> HashAlgorithm {
        match self {
            ContentHash::Sha256(_) => HashAlgorithm::Sha256,
            ContentHash::Xxh3(_) => HashAlgorithm::Xxh3Legacy,
        }
    }

    /// The lowercase hex form (64 or 16 characters).
    pub fn to_hex(&self) -> String {
        match self {
            ContentHash::Sha256(b) => hex::encode(b),
            ContentHash::Xxh3(b) => hex::encode(b),
        }
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            ContentHash::Sha256(b) => b,
            ContentHash::Xxh3(b) => b,
        }
    }

    /// Hashes a tensor's dtype, shape and little-endian bytes with `algorithm`.
    pub fn compute(algorithm: HashAlgorithm, dtype: DType, shape: &[usize], data: &[u8]) -> Self {
        match algorithm {
            HashAlgorithm::Sha256 => ContentHash::sha256(dtype, shape, data),
            HashAlgorithm::Xxh3Legacy => ContentHash::xxh3_legacy(dtype, shape, data),
        }
    }

    /// Coral's SHA-256 key: SHA-256 of
    /// `"coral.weight.v1\0" || dtype name || "\0" || ndim as u64 LE || each dim as u64 LE || data`.
    pub fn sha256(dtype: DType, shape: &[usize], data: &[u8]) -> Self {
        let mut h = ContentHasher::new(HashAlgorithm::Sha256, dtype, shape);
        h.update(data);
        h.finish()
    }

    /// The Python Coral's key: xxh3-64 (seed 0) of `str(shape)` as Python prints a tuple of ints
    /// (`()`, `(3,)`, `(2, 3)`), then the NumPy dtype name, then the bytes.
    pub fn xxh3_legacy(dtype: DType, shape: &[usize], data: &[u8]) -> Self {
        let mut h = ContentHasher::new(HashAlgorithm::Xxh3Legacy, dtype, shape);
        h.update(data);
        h.finish()
    }

    /// True when `data` with this dtype and shape hashes to `self` under `self`'s algorithm.
    pub fn matches(&self, dtype: DType, shape: &[usize], data: &[u8]) -> bool {
        ContentHash::compute(self.algorithm(), dtype, shape, data) == *self
    }
}

/// A content hash computed as the data arrives: the same key as [`ContentHash::compute`] over
/// the concatenation of every [`update`](Self::update), however the data is split. For reading
/// a weight chunk by chunk (a store's streamed load) without holding it whole.
///
/// ```
/// use coral_core::hash::ContentHasher;
/// use coral_core::{ContentHash, DType, HashAlgorithm};
///
/// let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
/// for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
///     let mut h = ContentHasher::new(algorithm, DType::U16, &[2, 2]);
///     h.update(&data[..3]);
///     h.update(&data[3..]);
///     assert_eq!(h.finish(), ContentHash::compute(algorithm, DType::U16, &[2, 2], &data));
/// }
/// ```
#[derive(Clone)]
pub struct ContentHasher {
    state: HasherState,
    bytes: u64,
}

#[derive(Clone)]
enum HasherState {
    Sha256(Sha256),
    // Boxed: the xxh3 state is several hundred bytes.
    Xxh3(Box<xxhash_rust::xxh3::Xxh3>),
}

impl ContentHasher {
    /// Starts the hash of a tensor of `dtype` and `shape` with `algorithm`: the canonical
    /// header is hashed here, the data through [`update`](Self::update).
    pub fn new(algorithm: HashAlgorithm, dtype: DType, shape: &[usize]) -> Self {
        let state = match algorithm {
            HashAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                h.update(SHA256_DOMAIN_TAG);
                h.update(dtype.name().as_bytes());
                h.update([0u8]);
                h.update((shape.len() as u64).to_le_bytes());
                for &d in shape {
                    h.update((d as u64).to_le_bytes());
                }
                HasherState::Sha256(h)
            }
            HashAlgorithm::Xxh3Legacy => {
                let mut h = Box::new(xxhash_rust::xxh3::Xxh3::new());
                h.update(python_shape_repr(shape).as_bytes());
                h.update(dtype.name().as_bytes());
                HasherState::Xxh3(h)
            }
        };
        ContentHasher { state, bytes: 0 }
    }

    /// The algorithm this hasher follows.
    pub fn algorithm(&self) -> HashAlgorithm {
        match self.state {
            HasherState::Sha256(_) => HashAlgorithm::Sha256,
            HasherState::Xxh3(_) => HashAlgorithm::Xxh3Legacy,
        }
    }

    /// Hashes the next data bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.state {
            // Both read faster than memory comes in unasked (`prefetch`): SHA-256 at 1.7 GB/s,
            // xxh3 at over 10.
            HasherState::Sha256(h) => crate::prefetch::in_pieces(data, |piece| h.update(piece)),
            HasherState::Xxh3(h) => crate::prefetch::in_pieces(data, |piece| h.update(piece)),
        }
        self.bytes = self.bytes.saturating_add(data.len() as u64);
    }

    /// Data bytes hashed so far.
    pub fn bytes_hashed(&self) -> u64 {
        self.bytes
    }

    /// The key of the header and every byte given to [`update`](Self::update).
    pub fn finish(self) -> ContentHash {
        match self.state {
            HasherState::Sha256(h) => ContentHash::Sha256(h.finalize().into()),
            HasherState::Xxh3(h) => ContentHash::Xxh3(h.digest().to_be_bytes()),
        }
    }
}

impl fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContentHasher")
            .field("algorithm", &self.algorithm())
            .field("bytes_hashed", &self.bytes)
            .finish()
    }
}

/// `str(tuple(shape))` as Python prints it.
pub fn python_shape_repr(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_owned(),
        [d] => format!("({d},)"),
        dims => {
            let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

impl FromStr for ContentHash {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        ContentHash::parse(s)
    }
}

impl Serialize for ContentHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ContentHash::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_hex_keys() {
        let k = "a".repeat(64);
        assert_eq!(ContentHash::parse(&k).unwrap().to_hex(), k);
        assert!(ContentHash::parse(&"0".repeat(16)).is_ok());
        for bad in [
            "",
            "../etc/passwd",
            &"A".repeat(64),
            &"g".repeat(64),
            &"a".repeat(63),
            &"a".repeat(65),
            &"a".repeat(32),
            "0123456789abcdef/",
            "0123456789abcde.",
        ] {
            assert!(ContentHash::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn python_shape_repr_matches_python() {
        assert_eq!(python_shape_repr(&[]), "()");
        assert_eq!(python_shape_repr(&[3]), "(3,)");
        assert_eq!(python_shape_repr(&[2, 3]), "(2, 3)");
        assert_eq!(python_shape_repr(&[0, 1, 2]), "(0, 1, 2)");
    }

    #[test]
    fn a_hasher_without_data_is_the_hash_of_empty_data() {
        for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
            let h = ContentHasher::new(algorithm, DType::F32, &[0, 3]);
            assert_eq!(h.algorithm(), algorithm);
            assert_eq!(
                h.finish(),
                ContentHash::compute(algorithm, DType::F32, &[0, 3], &[])
            );
        }
    }

    /// The key from the whole message at once, built by hand (no shared code with the hasher).
    fn one_shot(
        algorithm: HashAlgorithm,
        dtype: DType,
        shape: &[usize],
        data: &[u8],
    ) -> ContentHash {
        let mut msg = Vec::new();
        match algorithm {
            HashAlgorithm::Sha256 => {
                msg.extend_from_slice(b"coral.weight.v1\0");
                msg.extend_from_slice(dtype.name().as_bytes());
                msg.push(0);
                msg.extend_from_slice(&(shape.len() as u64).to_le_bytes());
                for &d in shape {
                    msg.extend_from_slice(&(d as u64).to_le_bytes());
                }
                msg.extend_from_slice(data);
                ContentHash::Sha256(Sha256::digest(&msg).into())
            }
            HashAlgorithm::Xxh3Legacy => {
                msg.extend_from_slice(python_shape_repr(shape).as_bytes());
                msg.extend_from_slice(dtype.name().as_bytes());
                msg.extend_from_slice(data);
                ContentHash::Xxh3(xxhash_rust::xxh3::xxh3_64(&msg).to_be_bytes())
            }
        }
    }

    proptest::proptest! {
        /// Any split of the data, for either algorithm, gives the key of the whole message
        /// hashed at once (and so does `ContentHash::compute`).
        #[test]
        fn incremental_equals_one_shot(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..12),
            shape in proptest::collection::vec(0usize..5000, 0..4),
            dtype in proptest::sample::select(DType::ALL.to_vec()),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            for algorithm in [HashAlgorithm::Sha256, HashAlgorithm::Xxh3Legacy] {
                let mut h = ContentHasher::new(algorithm, dtype, &shape);
                for w in cuts.windows(2) {
                    h.update(&data[w[0]..w[1]]);
                }
                proptest::prop_assert_eq!(h.bytes_hashed(), data.len() as u64);
                let want = one_shot(algorithm, dtype, &shape, &data);
                proptest::prop_assert_eq!(ContentHash::compute(algorithm, dtype, &shape, &data), want);
                proptest::prop_assert_eq!(h.finish(), want);
            }
        }
    }
}

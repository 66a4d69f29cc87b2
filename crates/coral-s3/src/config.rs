//! `S3Config`: where the store lives and how it writes.

use std::fmt;

use coral_core::Codec;
use coral_store_api::StoreError;

/// The seed's `S3Config`: bucket, key prefix, endpoint, credentials and transfer settings.
///
/// Credentials never show in `Debug` output, in logs or in error messages:
///
/// ```
/// use coral_s3::S3Config;
/// let c = S3Config::new("models").with_credentials("AKIDEXAMPLE", "s3cr3t");
/// let shown = format!("{c:?}");
/// assert!(!shown.contains("AKIDEXAMPLE") && !shown.contains("s3cr3t"));
/// assert_eq!(c.prefix, "coral/");
/// ```
#[derive(Clone, PartialEq)]
pub struct S3Config {
    /// The bucket; created when it does not exist and `create_bucket` is set.
    pub bucket: String,
    /// Key prefix of every object ("coral/" by default); normalised to end in "/" (or empty).
    pub prefix: String,
    /// AWS region; `AWS_REGION`/`AWS_DEFAULT_REGION` or "us-east-1" when `None`.
    pub region: Option<String>,
    /// Endpoint of an S3-compatible service (MinIO, Ceph, R2, ...): `https://host:port` or, for a
    /// local service, `http://...` (plain http is allowed only when given here as `http://`).
    pub endpoint_url: Option<String>,
    /// Access key id; with `secret_key`, replaces the standard AWS environment and credential
    /// chain.
    pub access_key: Option<String>,
    /// Secret access key.
    pub secret_key: Option<String>,
    /// Concurrent requests of a batch (10).
    pub max_concurrency: usize,
    /// How weight objects are compressed: the seed's default, gzip (level 1: on float weights
    /// levels 1 to 9 differ by under 1% in size while level 1 deflates about 1.6 times faster;
    /// `zstd-3` is faster and smaller still, see `docs/benchmarks.md`).
    pub compression: Codec,
    /// Objects above this size go up as multipart uploads of parts of this size (8 MiB; S3
    /// wants at least 5 MiB per part).
    pub chunk_size: usize,
    /// A load whose data does not match its key fails (true) or logs a warning (false).
    pub strict_integrity: bool,
    /// Retries of a failed request (transient errors: connection failures, 5xx, throttling).
    pub max_retries: usize,
    /// Upper bound of the time spent retrying one request.
    pub retry_timeout: std::time::Duration,
    /// Create the bucket when it does not exist (true: the seed's behaviour). A reader sets it
    /// to false, so that a mistyped name is an error rather than a new, empty bucket.
    pub create_bucket: bool,
    /// How long a lease of this store's (see [`coral_store_api::lease`]) stays valid without a
    /// refresh: its holder refreshes it every fifteenth of this, and another process ignores
    /// it, and a garbage collector removes it, once it is this old (30 minutes). Written into
    /// each lease object, so a lease is judged by its holder's setting.
    pub lease_stale_after: std::time::Duration,
}

/// The smallest part S3 accepts in a multipart upload (except the last).
pub const MIN_CHUNK_SIZE: usize = 5 * 1024 * 1024;

impl S3Config {
    /// The seed's defaults for `bucket`.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            prefix: "coral/".to_owned(),
            region: None,
            endpoint_url: None,
            access_key: None,
            secret_key: None,
            max_concurrency: 10,
            compression: Codec::Gzip { level: 1 },
            chunk_size: 8 * 1024 * 1024,
            strict_integrity: true,
            max_retries: 5,
            retry_timeout: std::time::Duration::from_secs(60),
            create_bucket: true,
            lease_stale_after: coral_store_api::lease::DEFAULT_LEASE_STALE_AFTER,
        }
    }

    /// Sets how long a lease stays valid without a refresh (30 minutes by default).
    pub fn with_lease_stale_after(mut self, stale_after: std::time::Duration) -> Self {
        self.lease_stale_after = stale_after;
        self
    }

    /// Whether opening creates a missing bucket (true by default).
    pub fn with_create_bucket(mut self, create: bool) -> Self {
        self.create_bucket = create;
        self
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the endpoint of an S3-compatible service.
    pub fn with_endpoint(mut self, endpoint_url: impl Into<String>) -> Self {
        self.endpoint_url = Some(endpoint_url.into());
        self
    }

    /// Sets explicit credentials.
    pub fn with_credentials(
        mut self,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Self {
        self.access_key = Some(access_key.into());
        self.secret_key = Some(secret_key.into());
        self
    }

    /// Sets the batch concurrency.
    pub fn with_max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n;
        self
    }

    /// Sets the compression of weight objects.
    pub fn with_compression(mut self, codec: Codec) -> Self {
        self.compression = codec;
        self
    }

    /// Sets the multipart threshold and part size.
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    /// Sets strict integrity checking.
    pub fn with_strict_integrity(mut self, strict: bool) -> Self {
        self.strict_integrity = strict;
        self
    }

    /// Sets the retry policy of single requests.
    pub fn with_retries(mut self, max_retries: usize, retry_timeout: std::time::Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_timeout = retry_timeout;
        self
    }

    /// The region in effect.
    pub fn effective_region(&self) -> String {
        self.region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                std::env::var("AWS_DEFAULT_REGION")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "us-east-1".to_owned())
    }

    /// `s3://bucket/prefix`, the store's location in messages (no endpoint credentials).
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// Checks every field and normalises the prefix (trailing "/", no leading "/"). Nothing is
    /// contacted.
    pub fn validated(mut self) -> Result<Self, StoreError> {
        let bad = |m: String| Err(StoreError::InvalidConfig(m));
        if !valid_bucket(&self.bucket) {
            return bad(format!(
                "bucket name {:?}: 3 to 63 characters from a-z, 0-9, '.', '-', starting and \
                 ending with a letter or digit",
                self.bucket
            ));
        }
        self.prefix = normalise_prefix(&self.prefix)?;
        if let Some(ep) = &self.endpoint_url {
            let ep = ep.trim_end_matches('/');
            if !(ep.starts_with("http://") || ep.starts_with("https://")) || ep.contains('@') {
                return bad(format!(
                    "endpoint_url {ep:?} must be an http:// or https:// URL without user info"
                ));
            }
            self.endpoint_url = Some(ep.to_owned());
        }
        if self.access_key.is_some() != self.secret_key.is_some() {
            return bad("access_key and secret_key must be given together".to_owned());
        }
        if self.max_concurrency == 0 {
            return bad("max_concurrency must be at least 1".to_owned());
        }
        if self.chunk_size < MIN_CHUNK_SIZE {
            return bad(format!(
                "chunk_size {} is below S3's minimum part size of {MIN_CHUNK_SIZE} bytes",
                self.chunk_size
            ));
        }
        if self.lease_stale_after < std::time::Duration::from_secs(1) {
            return bad(format!(
                "lease_stale_after {:?} is below one second",
                self.lease_stale_after
            ));
        }
        self.compression
            .validate()
            .map_err(|e| StoreError::InvalidConfig(format!("compression: {e}")))?;
        Ok(self)
    }

    /// True when the endpoint is plain http (the only case where http is allowed).
    pub fn allows_http(&self) -> bool {
        self.endpoint_url
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
    }
}

fn valid_bucket(b: &str) -> bool {
    let ok_len = (3..=63).contains(&b.len());
    let ok_chars = b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    let ok_ends = b.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric());
    ok_len && ok_chars && ok_ends && !b.contains("..")
}

/// Normalises a key prefix: no leading "/", exactly one trailing "/" (or empty), no empty, "."
/// or ".." segment, printable ASCII without backslashes.
pub fn normalise_prefix(prefix: &str) -> Result<String, StoreError> {
    let trimmed = prefix.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for seg in trimmed.split('/') {
        let ok = !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|c| c.is_ascii_graphic() && c != b'\\' && c != b'*' && c != b'?');
        if !ok {
            return Err(StoreError::InvalidConfig(format!(
                "prefix {prefix:?}: segment {seg:?} is empty, '.', '..' or has characters other \
                 than printable ASCII"
            )));
        }
    }
    Ok(format!("{trimmed}/"))
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("access_key", &redacted(&self.access_key))
            .field("secret_key", &redacted(&self.secret_key))
            .field("max_concurrency", &self.max_concurrency)
            .field("compression", &self.compression)
            .field("chunk_size", &self.chunk_size)
            .field("strict_integrity", &self.strict_integrity)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("create_bucket", &self.create_bucket)
            .field("lease_stale_after", &self.lease_stale_after)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = S3Config::new("bucket");
        assert_eq!(c.prefix, "coral/");
        assert_eq!(c.max_concurrency, 10);
        assert_eq!(c.chunk_size, 8 * 1024 * 1024);
        assert_eq!(c.compression.name(), "gzip");
        assert!(c.strict_integrity);
        assert!(c.region.is_none() && c.endpoint_url.is_none());
    }

    #[test]
    fn debug_hides_credentials() {
        let c = S3Config::new("bucket").with_credentials("AKIAXXXXSECRETID", "verysecretvalue");
        let d = format!("{c:?} {c:#?}");
        assert!(!d.contains("AKIAXXXXSECRETID"), "{d}");
        assert!(!d.contains("verysecretvalue"), "{d}");
        assert!(d.contains("<redacted>"));
    }

    #[test]
    fn prefixes_are_normalised_and_checked() {
        assert_eq!(normalise_prefix("coral").unwrap(), "coral/");
        assert_eq!(normalise_prefix("/a/b//").unwrap(), "a/b/");
        assert_eq!(normalise_prefix("").unwrap(), "");
        for bad in ["a/../b", "..", "a//b", "./x", "a b", "a\\b", "é"] {
            assert!(normalise_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn validation() {
        assert!(S3Config::new("ok-bucket").validated().is_ok());
        assert!(S3Config::new("Bad_Bucket").validated().is_err());
        assert!(S3Config::new("ab").validated().is_err());
        assert!(S3Config::new("b1b")
            .with_endpoint("ftp://x")
            .validated()
            .is_err());
        assert!(S3Config::new("b1b")
            .with_max_concurrency(0)
            .validated()
            .is_err());
        assert!(S3Config::new("b1b")
            .with_chunk_size(1024)
            .validated()
            .is_err());
        assert!(S3Config::new("b1b")
            .with_lease_stale_after(std::time::Duration::from_millis(10))
            .validated()
            .is_err());
        let mut half = S3Config::new("b1b");
        half.access_key = Some("a".into());
        assert!(half.validated().is_err());
        let c = S3Config::new("b1b")
            .with_endpoint("http://127.0.0.1:9000/")
            .validated()
            .unwrap();
        assert!(c.allows_http());
        assert_eq!(c.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(!S3Config::new("b1b")
            .with_endpoint("https://x")
            .allows_http());
        assert!(!S3Config::new("b1b").allows_http());
    }
}

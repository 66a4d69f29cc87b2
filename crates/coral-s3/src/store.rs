//! `S3Store`: the blocking store traits over object_store, on a runtime the store owns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::ClientOptions;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, PutPayload, RetryConfig, WriteMultipart};

use coral_core::{
    ContentHash, Delta, HashedWeight, ModelManifest, ModelName, WeightMetadata, WeightTensor,
};
use coral_store_api::resolve::{self, DeltaSource};
use coral_store_api::{
    DeltaStorageInfo, DeltaStore, Lease, LeaseKind, Leftovers, ManifestStore, Result, StorageInfo,
    StoreError, Stored, StoredForm, WeightStore,
};

use crate::bucket::{ensure_bucket, BucketState};
use crate::config::S3Config;
use crate::format::{
    decode_delta, decode_weight, encode_delta, encode_weight, DataObject, FormatError,
    WeightRecord, WEIGHT_FORMAT,
};

/// One item of a batch that failed, or was not attempted because an earlier one failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedItem {
    /// The weight's name in the batch.
    pub name: String,
    /// Its key.
    pub key: ContentHash,
    /// Why (the error's message, or "not attempted").
    pub reason: String,
}

/// The source of the error of a batch that stored only part of its weights: what is now in the
/// store and what is not. Reach it with `std::error::Error::source` and `downcast_ref`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} weight(s) stored, {} not stored (first: {})", stored.len(), failed.len(), first_failure(failed))]
pub struct BatchError {
    /// (name, key) of every weight that is stored (now or before).
    pub stored: Vec<(String, ContentHash)>,
    /// Every weight that is not stored.
    pub failed: Vec<FailedItem>,
}

fn first_failure(failed: &[FailedItem]) -> String {
    failed
        .first()
        .map(|f| format!("{} {}: {}", f.name, f.key, f.reason))
        .unwrap_or_default()
}

/// Batches of at least this many distinct weights list the committed keys once rather than
/// checking each weight with a HEAD request.
const LIST_THRESHOLD: usize = 32;

/// What [`S3Store::remove_orphans`] found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrphanReport {
    /// Data objects without a metadata object (interrupted uploads), removed.
    pub data_objects: Vec<String>,
    /// Reference markers of deltas that do not exist, removed.
    pub reference_markers: Vec<String>,
}

pub(crate) struct Inner {
    pub(crate) s3: AmazonS3,
    pub(crate) config: S3Config,
    pub(crate) location: String,
    /// The region requests are signed for.
    pub(crate) region: String,
    /// The HTTP client's options (for the requests object_store has no call for).
    pub(crate) client_options: ClientOptions,
    /// The service's clock minus ours, in ms, as the last lease write showed (0 when within
    /// the service's timestamp precision).
    pub(crate) clock_offset_ms: AtomicI64,
    /// The leases this store holds.
    pub(crate) leases: crate::lease::HeldLeases,
    /// The committed weights of the last listing of `metadata/`, and when it was taken: a
    /// store of a key it did not hold skips the HEAD request that would ask again (see
    /// [`LISTING_HINT`]).
    listed: std::sync::Mutex<Option<(std::time::Instant, BTreeSet<ContentHash>)>>,
    /// Keys this store committed itself while holding a lease, since no lease was given back:
    /// a garbage collector cannot have removed them, so `check_present` does not ask again.
    pub(crate) committed_under_lease: std::sync::Mutex<BTreeSet<ContentHash>>,
}

/// How long a listing of `metadata/` stands in for the HEAD request of a store. Writing a
/// weight that another writer committed in between is harmless (the same content under the
/// same key, its objects written again); the HEAD only saves that upload.
const LISTING_HINT: Duration = Duration::from_secs(60);

/// Weights, deltas and manifests in an S3 bucket (or any S3-compatible service), under a key
/// prefix, with the seed's layout (`weights/`, `metadata/`, `deltas/`, plus `models/`, `refs/`
/// and the leases of `locks/`; see `docs/format.md`).
///
/// Many processes on many machines may write one prefix at once: the store overrides the
/// lease methods of [`ManifestStore`] (shared leases for writers, an exclusive one for a
/// garbage collector, refreshed in the background and given back when the store closes), and
/// refuses to write a manifest or to delete once a lease it holds is lost.
///
/// The store owns a small tokio runtime: its blocking methods are safe to call from any number
/// of threads, from rayon workers, and even from inside another async runtime (the work is then
/// handed to the store's runtime instead of blocking on it).
pub struct S3Store {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.inner.location)
            .field("config", &self.inner.config)
            .field("open", &self.rt.is_some())
            .finish()
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Inner {
    pub(crate) fn path(&self, rel: &str) -> Result<Path> {
        let full = format!("{}{rel}", self.config.prefix);
        Path::parse(&full)
            .map_err(|e| StoreError::InvalidConfig(format!("object key {full:?}: {e}")))
    }

    fn weight_rel(key: &ContentHash) -> String {
        format!("weights/{key}.npz")
    }
    fn meta_rel(key: &ContentHash) -> String {
        format!("metadata/{key}.json")
    }
    fn delta_rel(key: &ContentHash) -> String {
        format!("deltas/{key}.npz")
    }
    fn model_rel(name: &ModelName) -> String {
        format!("models/{}.json", name.as_str())
    }
    fn ref_rel(reference: &ContentHash, delta: &ContentHash) -> String {
        format!("refs/{reference}/{delta}.ref")
    }

    fn err(
        &self,
        what: String,
        e: impl Into<coral_store_api::coral_core::error::CoreError>,
    ) -> StoreError {
        StoreError::core(format!("{what} in {}", self.location), e.into())
    }

    fn backend(&self, what: impl fmt::Display, e: object_store::Error) -> StoreError {
        StoreError::backend(format!("{what} in {}", self.location), e)
    }

    fn corrupt(&self, key: impl fmt::Display, e: FormatError) -> StoreError {
        StoreError::Corrupt {
            location: self.location.clone(),
            key: key.to_string(),
            reason: e.0,
        }
    }

    pub(crate) async fn get_opt(&self, rel: &str) -> Result<Option<Bytes>> {
        let path = self.path(rel)?;
        match self.s3.get(&path).await {
            Ok(r) => match r.bytes().await {
                Ok(b) => Ok(Some(b)),
                Err(e) => Err(self.backend(format_args!("reading {rel}"), e)),
            },
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(self.backend(format_args!("reading {rel}"), e)),
        }
    }

    pub(crate) async fn head_exists(&self, rel: &str) -> Result<bool> {
        let path = self.path(rel)?;
        match self.s3.head(&path).await {
            Ok(_) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(self.backend(format_args!("checking {rel}"), e)),
        }
    }

    pub(crate) async fn delete_rel(&self, rel: &str) -> Result<()> {
        let path = self.path(rel)?;
        match self.s3.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(self.backend(format_args!("deleting {rel}"), e)),
        }
    }

    /// Puts one object; above `chunk_size` as a multipart upload, aborted on failure.
    pub(crate) async fn put_rel(&self, rel: &str, body: Bytes) -> Result<Option<String>> {
        let path = self.path(rel)?;
        let ctx = || format!("writing {rel} ({} bytes)", body.len());
        if body.len() <= self.config.chunk_size {
            let r = self
                .s3
                .put(&path, PutPayload::from(body.clone()))
                .await
                .map_err(|e| self.backend(ctx(), e))?;
            return Ok(r.e_tag);
        }
        let upload = self
            .s3
            .put_multipart(&path)
            .await
            .map_err(|e| self.backend(ctx(), e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, self.config.chunk_size);
        let mut rest = body.clone();
        while !rest.is_empty() {
            if let Err(e) = w.wait_for_capacity(self.config.max_concurrency).await {
                let _ = w.abort().await;
                return Err(self.backend(ctx(), e));
            }
            let n = rest.len().min(self.config.chunk_size);
            w.put(rest.split_to(n));
        }
        match w.finish().await {
            Ok(r) => Ok(r.e_tag),
            Err(e) => Err(self.backend(ctx(), e)),
        }
    }

    async fn record(&self, key: &ContentHash) -> Result<Option<WeightRecord>> {
        let rel = Self::meta_rel(key);
        match self.get_opt(&rel).await? {
            None => Ok(None),
            Some(b) => WeightRecord::from_json(&b, key)
                .map(Some)
                .map_err(|e| self.corrupt(&rel, e)),
        }
    }

    /// Stores a weight whose key is checked: data object first, metadata object last (the
    /// commit). A no-op when the metadata object exists.
    async fn put_weight(
        self: Arc<Self>,
        weight: WeightTensor,
        key: ContentHash,
    ) -> Result<Option<u64>> {
        self.put_weight_checked(weight, key, true).await
    }

    /// [`Self::put_weight`]; `check` false when the caller already knows the key is absent.
    /// Returns the data object's size when it wrote the weight, `None` when it was present.
    async fn put_weight_checked(
        self: Arc<Self>,
        weight: WeightTensor,
        key: ContentHash,
        check: bool,
    ) -> Result<Option<u64>> {
        let meta_rel = Self::meta_rel(&key);
        let listed_absent = self.listed_absent(&key);
        if check && !listed_absent && self.head_exists(&meta_rel).await? {
            return Ok(None);
        }
        let codec = self.config.compression;
        let w2 = weight.clone();
        let encoded =
            tokio::task::spawn_blocking(move || encode_weight(w2.metadata(), w2.data(), codec))
                .await
                .map_err(|e| StoreError::backend(format!("encoding weight {key}"), e))?
                .map_err(|e| StoreError::backend(format!("encoding weight {key}"), e))?;
        let (body, encoding, shuffle) = encoded;
        let data_rel = Self::weight_rel(&key);
        let size = body.len() as u64;
        let e_tag = self.put_rel(&data_rel, Bytes::from(body)).await?;
        let mut metadata = weight.metadata().clone();
        metadata.hash = Some(key);
        let record = WeightRecord {
            format: WEIGHT_FORMAT.to_owned(),
            key,
            hash_algorithm: key.algorithm().name().to_owned(),
            metadata,
            data: DataObject {
                key: data_rel,
                encoding,
                codec: codec.to_string(),
                shuffle,
                size,
                e_tag,
                nbytes: weight.nbytes() as u64,
            },
        };
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| StoreError::backend(format!("encoding metadata of {key}"), e))?;
        self.put_rel(&meta_rel, Bytes::from(json)).await?;
        self.note_committed(&key);
        Ok(Some(size))
    }

    async fn get_weight(self: Arc<Self>, key: ContentHash) -> Result<Option<HashedWeight>> {
        let Some(record) = self.record(&key).await? else {
            return Ok(None);
        };
        let data_rel = Self::weight_rel(&key);
        let Some(body) = self.get_opt(&data_rel).await? else {
            return Err(StoreError::Corrupt {
                location: self.location.clone(),
                key: data_rel,
                reason: "the metadata object is committed but the data object is missing".into(),
            });
        };
        let strict = self.config.strict_integrity;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let data = decode_weight(&record, &body).map_err(|e| this.corrupt(&data_rel, e))?;
            let mut meta = record.metadata;
            meta.hash = Some(key);
            let w = WeightTensor::new(meta, data)
                .map_err(|e| this.err(format!("loading weight {key}"), e))?;
            resolve::verified(w, &key, strict).map(Some)
        })
        .await
        .map_err(|e| StoreError::backend(format!("decoding weight {key}"), e))?
    }

    pub(crate) async fn list_rel(&self, dir: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let path = self.path(dir)?;
        self.s3
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| self.backend(format_args!("listing {dir}"), e))
    }

    /// Keys of objects `{dir}/{hash}{ext}`; other names are ignored.
    async fn list_keys(&self, dir: &str, ext: &str) -> Result<Vec<ContentHash>> {
        let started = std::time::Instant::now();
        let objects = self.list_rel(dir).await?;
        let mut keys: Vec<ContentHash> = objects
            .iter()
            .filter_map(|o| o.location.filename())
            .filter_map(|f| f.strip_suffix(ext))
            .filter_map(|h| ContentHash::parse(h).ok())
            .collect();
        keys.sort();
        keys.dedup();
        if dir == "metadata" {
            let set: BTreeSet<ContentHash> = keys.iter().copied().collect();
            *self.listed.lock().unwrap_or_else(|e| e.into_inner()) = Some((started, set));
        }
        Ok(keys)
    }

    /// Notes that `key` is committed now (a later store of it asks again).
    fn note_committed(&self, key: &ContentHash) {
        if self.holds_leases() {
            self.committed_under_lease
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(*key);
        }
        if let Some((_, keys)) = self
            .listed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            keys.insert(*key);
        }
    }

    /// True when a listing of `metadata/` begun less than [`LISTING_HINT`] ago did not hold
    /// `key` (and no store of this process committed it since).
    fn listed_absent(&self, key: &ContentHash) -> bool {
        let g = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .is_some_and(|(at, keys)| at.elapsed() < LISTING_HINT && !keys.contains(key))
    }

    async fn dependents(&self, key: &ContentHash) -> Result<usize> {
        let markers = self.list_rel(&format!("refs/{key}")).await?;
        let mut n = 0;
        for m in markers {
            let Some(d) = m
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".ref"))
                .and_then(|h| ContentHash::parse(h).ok())
            else {
                continue;
            };
            if self.head_exists(&Self::delta_rel(&d)).await? {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The sum of `sizes`, saturating: for figures of statistics from sizes an object or a listing
/// reports, which a damaged or hostile record could make overflow.
fn saturating_sum(sizes: impl Iterator<Item = u64>) -> u64 {
    sizes.fold(0, u64::saturating_add)
}

/// What uploading one weight of a batch gave: its data object's size when it wrote the weight
/// (`None` when it was present), or why it was not stored.
type Upload = std::result::Result<Option<u64>, String>;

/// The batch's distinct weights, by key (the first copy of each).
fn unique_weights(
    hashed: &[(String, WeightTensor, ContentHash)],
) -> BTreeMap<ContentHash, WeightTensor> {
    let mut unique: BTreeMap<ContentHash, WeightTensor> = BTreeMap::new();
    for (_, w, k) in hashed {
        unique.entry(*k).or_insert_with(|| w.clone());
    }
    unique
}

/// What a batch stored, item by item in batch order, from the uploads' `results`; a
/// [`BatchError`] (inside the error) when any item is not stored.
fn batch_outcome(
    location: &str,
    hashed: Vec<(String, WeightTensor, ContentHash)>,
    results: &HashMap<ContentHash, Upload>,
) -> Result<Vec<Stored>> {
    let total = hashed.len();
    let mut out = Vec::with_capacity(total);
    let mut stored = Vec::new();
    let mut failed = Vec::new();
    let mut reported: BTreeSet<ContentHash> = BTreeSet::new();
    for (name, _, k) in hashed {
        match results.get(&k) {
            Some(Ok(size)) => {
                stored.push((name.clone(), k));
                // A duplicate in the batch was written by its first copy.
                let first = reported.insert(k);
                let size = size.filter(|_| first);
                out.push(Stored {
                    key: k,
                    new: size.is_some(),
                    stored_bytes: size.unwrap_or(0),
                });
            }
            Some(Err(reason)) => failed.push(FailedItem {
                name,
                key: k,
                reason: reason.clone(),
            }),
            None => failed.push(FailedItem {
                name,
                key: k,
                reason: "not attempted".to_owned(),
            }),
        }
    }
    if failed.is_empty() {
        return Ok(out);
    }
    // Real failures first, then what was not attempted.
    failed.sort_by_key(|f| f.reason.starts_with("not attempted"));
    Err(StoreError::backend(
        format!(
            "storing a batch to {location}: {} of {total} weight(s) stored, {} not stored",
            stored.len(),
            failed.len()
        ),
        BatchError { stored, failed },
    ))
}

impl Inner {
    /// The committed keys, listed once, for a batch of `distinct` weights when it is big enough
    /// ([`LIST_THRESHOLD`]) that a listing beats a HEAD request per weight; `None` otherwise.
    async fn committed_if_big(&self, distinct: usize) -> Result<Option<BTreeSet<ContentHash>>> {
        if distinct < LIST_THRESHOLD {
            return Ok(None);
        }
        Ok(Some(
            self.list_keys("metadata", ".json")
                .await?
                .into_iter()
                .collect(),
        ))
    }

    /// Uploads the batch's distinct weights, [`S3Config::max_concurrency`] at a time; once one
    /// fails, those not yet started are not attempted. `known`: the committed keys, when
    /// listed.
    async fn upload_all(
        self: &Arc<Self>,
        unique: BTreeMap<ContentHash, WeightTensor>,
        known: Option<BTreeSet<ContentHash>>,
    ) -> HashMap<ContentHash, Upload> {
        let failed = Arc::new(AtomicBool::new(false));
        futures::stream::iter(unique)
            .map(|(k, w)| {
                let listed = known.as_ref().map(|p| p.contains(&k));
                self.clone().upload_one(k, w, listed, failed.clone())
            })
            .buffer_unordered(self.config.max_concurrency)
            .collect()
            .await
    }

    /// Uploads one weight of a batch unless an earlier upload `failed` (which it sets when it
    /// fails itself). `listed`: whether a listing showed the key committed (`None`: not
    /// listed).
    async fn upload_one(
        self: Arc<Self>,
        k: ContentHash,
        w: WeightTensor,
        listed: Option<bool>,
        failed: Arc<AtomicBool>,
    ) -> (ContentHash, Upload) {
        if failed.load(Ordering::Relaxed) {
            return (k, Err("not attempted: an earlier upload failed".to_owned()));
        }
        let r = match listed {
            // A listing can still show an object deleted a moment ago (Garage does, now and
            // then): presence is confirmed with a HEAD, or a garbage collector's last delete
            // could go unseen.
            Some(true) | None => self.put_weight(w, k).await,
            Some(false) => self.put_weight_checked(w, k, false).await,
        };
        if let Err(e) = &r {
            failed.store(true, Ordering::Relaxed);
            tracing::warn!(key = %k, error = %e, "upload failed");
        }
        (k, r.map_err(|e| e.to_string()))
    }
}

impl Inner {
    /// Fails unless every key `m` names is stored (its metadata or delta object answers a
    /// HEAD). A writer under a lease checks this before its manifest goes up: a listing may
    /// still show a weight a garbage collector deleted a moment before the lease was taken.
    async fn check_present(self: &Arc<Self>, m: &ModelManifest) -> Result<()> {
        let mut keys: BTreeSet<ContentHash> = m.keys().copied().collect();
        {
            let ours = self
                .committed_under_lease
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            keys.retain(|k| !ours.contains(k));
        }
        let missing: Vec<ContentHash> = futures::stream::iter(keys)
            .map(|k| {
                let inner = self.clone();
                async move {
                    let there = inner.head_exists(&Self::meta_rel(&k)).await?
                        || inner.head_exists(&Self::delta_rel(&k)).await?;
                    Ok::<_, StoreError>((!there).then_some(k))
                }
            })
            .buffer_unordered(self.config.max_concurrency)
            .try_filter_map(|k| async move { Ok(k) })
            .try_collect()
            .await?;
        match missing.first() {
            None => Ok(()),
            Some(k) => Err(StoreError::backend(
                format!("writing manifest {} in {}", m.name, self.location),
                format!(
                    "it names {} key(s) the store does not hold (first: {k}); the manifest is not \
                     written",
                    missing.len()
                ),
            )),
        }
    }

    /// Data objects without a metadata object and reference markers of missing deltas, last
    /// modified at or before `cutoff_ms` (the service's clock); deleted unless `dry_run`.
    pub(crate) async fn orphans(&self, cutoff_ms: i64, dry_run: bool) -> Result<OrphanReport> {
        let committed: BTreeSet<ContentHash> = self
            .list_keys("metadata", ".json")
            .await?
            .into_iter()
            .collect();
        let deltas: BTreeSet<ContentHash> = self
            .list_keys("deltas", ".npz")
            .await?
            .into_iter()
            .collect();
        let mut report = OrphanReport::default();
        for o in self.list_rel("weights").await? {
            let key = o
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".npz"))
                .and_then(|h| ContentHash::parse(h).ok());
            if let Some(k) = key {
                if !committed.contains(&k) && o.last_modified.timestamp_millis() <= cutoff_ms {
                    if !dry_run {
                        self.delete_rel(&Self::weight_rel(&k)).await?;
                    }
                    report.data_objects.push(o.location.to_string());
                }
            }
        }
        for o in self.list_rel("refs").await? {
            let d = o
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".ref"))
                .and_then(|h| ContentHash::parse(h).ok());
            if let Some(d) = d {
                if !deltas.contains(&d) && o.last_modified.timestamp_millis() <= cutoff_ms {
                    if !dry_run {
                        self.s3
                            .delete(&o.location)
                            .await
                            .map_err(|e| self.backend("deleting a reference marker", e))?;
                    }
                    report.reference_markers.push(o.location.to_string());
                }
            }
        }
        Ok(report)
    }
}

impl S3Store {
    /// Opens the store described by `config`: validates it, builds the client (plain http only
    /// for an `http://` endpoint), and creates the bucket when it does not exist.
    pub fn new(config: S3Config) -> Result<Self> {
        let config = config.validated()?;
        let location = config.location();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coral-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::backend(format!("starting the I/O runtime for {location}"), e)
            })?;
        let region = config.effective_region();
        let options = ClientOptions::new()
            .with_allow_http(config.allows_http())
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120));
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: config.max_retries,
            retry_timeout: config.retry_timeout,
        };
        let mut builder = match (&config.access_key, &config.secret_key) {
            (Some(k), Some(s)) => AmazonS3Builder::new()
                .with_access_key_id(k)
                .with_secret_access_key(s),
            _ => AmazonS3Builder::from_env(),
        };
        builder = builder
            .with_bucket_name(&config.bucket)
            .with_region(&region)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options.clone())
            .with_retry(retry);
        if let Some(ep) = &config.endpoint_url {
            builder = builder.with_endpoint(ep);
        }
        let s3 = builder
            .build()
            .map_err(|e| StoreError::InvalidConfig(format!("{location}: {e}")))?;
        let inner = Arc::new(Inner {
            s3,
            config,
            location,
            region: region.clone(),
            client_options: options.clone(),
            clock_offset_ms: AtomicI64::new(0),
            leases: Default::default(),
            listed: std::sync::Mutex::new(None),
            committed_under_lease: std::sync::Mutex::new(BTreeSet::new()),
        });
        let state = {
            let inner = inner.clone();
            run_on(&rt, &inner.location.clone(), async move {
                ensure_bucket(&inner.s3, &inner.config, &region, &options).await
            })?
        };
        if state == BucketState::Created {
            tracing::debug!(location = %inner.location, "bucket was missing and is created");
        }
        Ok(S3Store {
            inner,
            rt: Some(rt),
        })
    }
    /// The configuration in effect (credentials redacted in its `Debug`).
    pub fn config(&self) -> &S3Config {
        &self.inner.config
    }

    /// `s3://bucket/prefix`.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// Runs a future to completion on the store's runtime, from any thread: `block_on` when the
    /// caller is outside any runtime, otherwise the future is spawned on the store's runtime and
    /// the caller waits for its result on a channel (never `block_on` inside a runtime).
    fn run<T, F>(&self, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let rt = self.rt.as_ref().ok_or_else(|| StoreError::Closed {
            location: self.inner.location.clone(),
        })?;
        run_on(rt, &self.inner.location, fut)
    }

    fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    /// Removes the leftovers of interrupted writes older than `older_than` (younger ones may
    /// belong to a write in progress): data objects that no metadata object commits, and
    /// reference markers of deltas that do not exist. (`coral gc` does this, and aborts
    /// abandoned multipart uploads, through [`ManifestStore::remove_leftovers`].)
    pub fn remove_orphans(&self, older_than: Duration) -> Result<OrphanReport> {
        let inner = self.inner();
        self.run(async move {
            let older = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
            let cutoff = inner.server_now_ms().saturating_sub(older);
            inner.orphans(cutoff, false).await
        })
    }

    /// Replaces the stored data of a weight with `data` (same length), re-encoding it and
    /// updating the metadata object so it still decodes: a test hook that simulates corruption
    /// behind the store's back. Returns false when the key is absent.
    #[doc(hidden)]
    pub fn corrupt_for_testing(&self, key: &ContentHash, data: Vec<u8>) -> Result<bool> {
        let inner = self.inner();
        let key = *key;
        self.run(async move {
            let Some(mut record) = inner.record(&key).await? else {
                return Ok(false);
            };
            let (body, encoding, shuffle) =
                encode_weight(&record.metadata, &data, inner.config.compression)
                    .map_err(|e| StoreError::backend("corrupt_for_testing", e))?;
            record.data.size = body.len() as u64;
            record.data.encoding = encoding;
            record.data.shuffle = shuffle;
            record.data.codec = inner.config.compression.to_string();
            record.data.e_tag = inner
                .put_rel(&Inner::weight_rel(&key), Bytes::from(body))
                .await?;
            let json = serde_json::to_vec(&record)
                .map_err(|e| StoreError::backend("corrupt_for_testing", e))?;
            inner
                .put_rel(&Inner::meta_rel(&key), Bytes::from(json))
                .await?;
            Ok(true)
        })
    }

    /// The raw stored data of a weight (decoded, not verified): for tests.
    #[doc(hidden)]
    pub fn raw_for_testing(&self, key: &ContentHash) -> Result<Option<Vec<u8>>> {
        let inner = self.inner();
        let key = *key;
        self.run(async move {
            let Some(record) = inner.record(&key).await? else {
                return Ok(None);
            };
            let rel = Inner::weight_rel(&key);
            let body = inner.get_opt(&rel).await?.unwrap_or_default();
            decode_weight(&record, &body)
                .map(Some)
                .map_err(|e| inner.corrupt(&rel, e))
        })
    }

    /// Writes an object under the store's prefix as is: for tests that plant leftovers.
    #[doc(hidden)]
    pub fn put_raw_for_testing(&self, rel: &str, body: Vec<u8>) -> Result<()> {
        let inner = self.inner();
        let rel = rel.to_owned();
        self.run(async move { inner.put_rel(&rel, Bytes::from(body)).await.map(|_| ()) })
    }

    /// Deletes an object under the store's prefix as is: for tests that play another process.
    #[doc(hidden)]
    pub fn delete_raw_for_testing(&self, rel: &str) -> Result<()> {
        let inner = self.inner();
        let rel = rel.to_owned();
        self.run(async move { inner.delete_rel(&rel).await })
    }

    /// The relative keys of the objects under `dir` of the store's prefix: for tests.
    #[doc(hidden)]
    pub fn list_raw_for_testing(&self, dir: &str) -> Result<Vec<String>> {
        let inner = self.inner();
        let dir = dir.to_owned();
        self.run(async move {
            let prefix = inner.config.prefix.clone();
            Ok(inner
                .list_rel(&dir)
                .await?
                .into_iter()
                .map(|o| {
                    let full = o.location.to_string();
                    full.strip_prefix(&prefix).unwrap_or(&full).to_owned()
                })
                .collect())
        })
    }
}

/// Runs `fut` on `rt` from any thread: `block_on` outside any runtime; inside one, the future is
/// spawned on `rt` and the caller waits on a channel.
fn run_on<T, F>(rt: &tokio::runtime::Runtime, location: &str, fut: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(fut);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().unwrap_or_else(|_| {
        Err(StoreError::backend(
            format!("running a request on {location}"),
            "the I/O task ended without a result",
        ))
    })
}

/// How long closing a store waits for its leases to be given back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Gives back the leases `inner` still holds, on `rt`, for at most [`RELEASE_TIMEOUT`].
fn release_on_close(rt: &tokio::runtime::Runtime, inner: &Arc<Inner>) -> Result<()> {
    if !inner.holds_leases() {
        return Ok(());
    }
    let i = inner.clone();
    run_on(rt, &inner.location, async move {
        match tokio::time::timeout(RELEASE_TIMEOUT, i.release_all_leases()).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::backend(
                format!("releasing the leases of {}", i.location),
                "timed out",
            )),
        }
    })
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            if let Err(e) = release_on_close(&rt, &self.inner) {
                tracing::warn!(error = %e, "a lease is left behind (it goes stale)");
            }
            rt.shutdown_background();
        }
    }
}

impl WeightStore for S3Store {
    fn store_hashed(&self, weight: &HashedWeight) -> Result<Stored> {
        let inner = self.inner();
        let (w, key) = (weight.weight().clone(), *weight.key());
        let size = self.run(async move { inner.put_weight(w, key).await })?;
        Ok(Stored {
            key,
            new: size.is_some(),
            stored_bytes: size.unwrap_or(0),
        })
    }

    fn load_hashed(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        match self.full_weight(key)? {
            Some(w) => Ok(Some(w)),
            None => resolve::resolve(self, key, self.inner.config.strict_integrity),
        }
    }

    fn exists(&self, key: &ContentHash) -> Result<bool> {
        let inner = self.inner();
        let k = *key;
        self.run(async move {
            Ok(inner.head_exists(&Inner::meta_rel(&k)).await?
                || inner.head_exists(&Inner::delta_rel(&k)).await?)
        })
    }

    fn delete(&self, key: &ContentHash) -> Result<bool> {
        let inner = self.inner();
        let k = *key;
        let full = {
            let inner = inner.clone();
            self.run(async move { inner.head_exists(&Inner::meta_rel(&k)).await })?
        };
        let delta = self.delta_exists(&k)?;
        if !full && !delta {
            return Ok(false);
        }
        self.run(async move {
            inner.check_leases().await?;
            let dependents = inner.dependents(&k).await?;
            if dependents > 0 {
                return Err(StoreError::Referenced { key: k, dependents });
            }
            if full {
                // Uncommit first: from here the weight is absent even if the data delete fails.
                inner.delete_rel(&Inner::meta_rel(&k)).await?;
                inner.delete_rel(&Inner::weight_rel(&k)).await?;
            }
            Ok(())
        })?;
        if delta {
            self.delete_delta(&k)?;
        }
        Ok(true)
    }

    /// Every key, stored in full or as a delta, sorted.
    fn list_weights(&self) -> Result<Vec<ContentHash>> {
        let inner = self.inner();
        self.run(async move {
            let mut keys = inner.list_keys("metadata", ".json").await?;
            keys.extend(inner.list_keys("deltas", ".npz").await?);
            keys.sort();
            keys.dedup();
            Ok(keys)
        })
    }

    fn get_metadata(&self, key: &ContentHash) -> Result<Option<WeightMetadata>> {
        let inner = self.inner();
        let k = *key;
        let full = self.run(async move {
            Ok(inner.record(&k).await?.map(|r| {
                let mut m = r.metadata;
                m.hash = Some(k);
                m
            }))
        })?;
        match full {
            Some(m) => Ok(Some(m)),
            None => Ok(
                resolve::resolve(self, &k, self.inner.config.strict_integrity)?
                    .map(|w| w.metadata().clone()),
            ),
        }
    }

    /// Hashes on the blocking pool, four at a time, then sends the batch as
    /// [`WeightStore::store_hashed_batch`] does.
    fn store_unhashed_batch(&self, weights: &[WeightTensor]) -> Result<Vec<Stored>> {
        let items: Vec<WeightTensor> = weights.to_vec();
        let algorithm = self.hash_algorithm();
        let hashed: Vec<HashedWeight> = self.run(async move {
            futures::stream::iter(items)
                .map(|w| {
                    tokio::task::spawn_blocking(move || HashedWeight::with_algorithm(w, algorithm))
                })
                .buffered(4)
                .try_collect()
                .await
                .map_err(|e| StoreError::backend("hashing a batch", e))
        })?;
        self.store_hashed_batch(&hashed)
    }

    /// Sends the batch's new weights concurrently (duplicates once); a big batch lists what is
    /// committed instead of asking per weight. On a failure, the error's [`BatchError`] says
    /// what was stored and what was not.
    fn store_hashed_batch(&self, weights: &[HashedWeight]) -> Result<Vec<Stored>> {
        let inner = self.inner();
        let hashed: Vec<(String, WeightTensor, ContentHash)> = weights
            .iter()
            .map(|w| (w.name().to_owned(), w.weight().clone(), *w.key()))
            .collect();
        self.run(async move {
            let unique = unique_weights(&hashed);
            let known = inner.committed_if_big(unique.len()).await?;
            let results = inner.upload_all(unique, known).await;
            batch_outcome(&inner.location, hashed, &results)
        })
    }

    fn load_hashed_batch(
        &self,
        keys: &[ContentHash],
    ) -> Result<HashMap<ContentHash, HashedWeight>> {
        let inner = self.inner();
        let unique: BTreeSet<ContentHash> = keys.iter().copied().collect();
        self.run(async move {
            let conc = inner.config.max_concurrency;
            let loaded: Vec<(ContentHash, Option<HashedWeight>)> = futures::stream::iter(unique)
                .map(|k| {
                    let inner = inner.clone();
                    async move { inner.get_weight(k).await.map(|w| (k, w)) }
                })
                .buffer_unordered(conc)
                .try_collect()
                .await?;
            Ok(loaded)
        })
        .and_then(|loaded| {
            let mut out = HashMap::with_capacity(loaded.len());
            for (k, w) in loaded {
                let w = match w {
                    Some(w) => Some(w),
                    None => resolve::resolve(self, &k, self.inner.config.strict_integrity)?,
                };
                if let Some(w) = w {
                    out.insert(k, w);
                }
            }
            Ok(out)
        })
    }

    fn stored_form(&self, key: &ContentHash) -> Result<Option<StoredForm>> {
        let inner = self.inner();
        let k = *key;
        let record = self.run(async move { inner.record(&k).await })?;
        if let Some(r) = record {
            let codec = if r.data.shuffle {
                format!("{}+shuffle", r.data.codec)
            } else {
                r.data.codec.clone()
            };
            return Ok(Some(StoredForm {
                codec: Some(codec),
                delta: None,
                stored_bytes: Some(r.data.size),
            }));
        }
        let Some(d) = self.load_delta(key)? else {
            return Ok(None);
        };
        let inner = self.inner();
        let size = self.run(async move {
            let path = inner.path(&Inner::delta_rel(&k))?;
            Ok(inner.s3.head(&path).await.ok().map(|m| m.size))
        })?;
        Ok(Some(StoredForm {
            codec: None,
            delta: Some((d.delta_type.name().to_owned(), d.reference_hash)),
            stored_bytes: size,
        }))
    }

    fn storage_info(&self) -> Result<StorageInfo> {
        let inner = self.inner();
        let delta_info = self.get_delta_storage_info()?;
        self.run(async move {
            let keys = inner.list_keys("metadata", ".json").await?;
            // Figures for statistics, summed from sizes the objects report: saturating.
            let file_size = saturating_sum(inner.list_rel("").await?.iter().map(|o| o.size));
            let conc = inner.config.max_concurrency;
            let records: Vec<Option<WeightRecord>> = futures::stream::iter(keys)
                .map(|k| {
                    let inner = inner.clone();
                    async move { inner.record(&k).await }
                })
                .buffer_unordered(conc)
                .try_collect()
                .await?;
            let records: Vec<WeightRecord> = records.into_iter().flatten().collect();
            let total_bytes = saturating_sum(records.iter().map(|r| r.data.nbytes));
            let compressed_bytes = saturating_sum(records.iter().map(|r| r.data.size));
            Ok(StorageInfo {
                backend: "s3".to_owned(),
                location: inner.location.clone(),
                file_size,
                reclaimable_bytes: 0,
                total_weights: records.len() as u64,
                total_bytes,
                compressed_bytes,
                compression_ratio: StorageInfo::saved_fraction(total_bytes, compressed_bytes),
                compression: inner.config.compression.to_string(),
                deltas: delta_info,
            })
        })
    }

    fn close(&mut self) -> Result<()> {
        if let Some(rt) = self.rt.take() {
            let released = release_on_close(&rt, &self.inner);
            rt.shutdown_background();
            released?;
        }
        Ok(())
    }
}

impl DeltaSource for S3Store {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn full_weight(&self, key: &ContentHash) -> Result<Option<HashedWeight>> {
        let inner = self.inner();
        let k = *key;
        self.run(async move { inner.get_weight(k).await })
    }

    fn has_full_weight(&self, key: &ContentHash) -> Result<bool> {
        let inner = self.inner();
        let k = *key;
        self.run(async move { inner.head_exists(&Inner::meta_rel(&k)).await })
    }

    fn raw_delta(&self, key: &ContentHash) -> Result<Option<Delta>> {
        self.load_delta(key)
    }
}

impl DeltaStore for S3Store {
    fn store_delta(&self, delta: &Delta, delta_hash: &ContentHash) -> Result<ContentHash> {
        let inner = self.inner();
        let (d, k) = (delta.clone(), *delta_hash);
        self.run(async move {
            let rel = Inner::delta_rel(&k);
            if inner.head_exists(&rel).await? {
                return Ok(k);
            }
            if !inner
                .head_exists(&Inner::meta_rel(&d.reference_hash))
                .await?
                && !inner
                    .head_exists(&Inner::delta_rel(&d.reference_hash))
                    .await?
            {
                return Err(StoreError::MissingReference {
                    key: k,
                    reference: d.reference_hash,
                });
            }
            let body = encode_delta(&d, &k)
                .map_err(|e| StoreError::backend(format!("encoding delta {k}"), e))?;
            // The marker first, so a reference is never deletable while its delta exists.
            inner
                .put_rel(&Inner::ref_rel(&d.reference_hash, &k), Bytes::new())
                .await?;
            inner.put_rel(&rel, Bytes::from(body)).await?;
            inner.note_committed(&k);
            Ok(k)
        })
    }

    fn load_delta(&self, delta_hash: &ContentHash) -> Result<Option<Delta>> {
        let inner = self.inner();
        let k = *delta_hash;
        self.run(async move {
            let rel = Inner::delta_rel(&k);
            match inner.get_opt(&rel).await? {
                None => Ok(None),
                Some(b) => decode_delta(&b, &k)
                    .map(Some)
                    .map_err(|e| inner.corrupt(&rel, e)),
            }
        })
    }

    fn delta_exists(&self, delta_hash: &ContentHash) -> Result<bool> {
        let inner = self.inner();
        let k = *delta_hash;
        self.run(async move { inner.head_exists(&Inner::delta_rel(&k)).await })
    }

    fn delete_delta(&self, delta_hash: &ContentHash) -> Result<bool> {
        let inner = self.inner();
        let k = *delta_hash;
        self.run(async move {
            let rel = Inner::delta_rel(&k);
            let Some(b) = inner.get_opt(&rel).await? else {
                return Ok(false);
            };
            inner.check_leases().await?;
            let reference = decode_delta(&b, &k).ok().map(|d| d.reference_hash);
            inner.delete_rel(&rel).await?;
            if let Some(r) = reference {
                inner.delete_rel(&Inner::ref_rel(&r, &k)).await?;
            }
            Ok(true)
        })
    }

    fn list_deltas(&self) -> Result<Vec<ContentHash>> {
        let inner = self.inner();
        self.run(async move { inner.list_keys("deltas", ".npz").await })
    }

    fn get_delta_storage_info(&self) -> Result<DeltaStorageInfo> {
        let inner = self.inner();
        self.run(async move {
            let keys = inner.list_keys("deltas", ".npz").await?;
            let mut info = DeltaStorageInfo::default();
            for k in keys {
                let rel = Inner::delta_rel(&k);
                let Some(b) = inner.get_opt(&rel).await? else {
                    continue;
                };
                let d = decode_delta(&b, &k).map_err(|e| inner.corrupt(&rel, e))?;
                // Figures for statistics: the shape comes from the object, so its byte count
                // saturates rather than overflowing (`DeltaStorageInfo::add`, as for HDF5).
                info.add(&d);
            }
            Ok(info)
        })
    }
}

impl ManifestStore for S3Store {
    fn put_manifest(&self, manifest: &ModelManifest) -> Result<()> {
        let inner = self.inner();
        let m = manifest.clone();
        self.run(async move {
            // A manifest names weights a garbage collector spares only while our lease holds.
            inner.check_leases().await?;
            if inner.holds_leases() {
                inner.check_present(&m).await?;
            }
            let json = m
                .to_json()
                .map_err(|e| inner.err(format!("encoding manifest {}", m.name), e))?;
            inner
                .put_rel(&Inner::model_rel(&m.name), Bytes::from(json))
                .await?;
            Ok(())
        })
    }

    fn get_manifest(&self, name: &ModelName) -> Result<Option<ModelManifest>> {
        let inner = self.inner();
        let n = name.clone();
        self.run(async move {
            let rel = Inner::model_rel(&n);
            match inner.get_opt(&rel).await? {
                None => Ok(None),
                Some(b) => {
                    ModelManifest::from_json(&b)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt {
                            location: inner.location.clone(),
                            key: rel,
                            reason: e.to_string(),
                        })
                }
            }
        })
    }

    fn list_manifests(&self) -> Result<Vec<ModelName>> {
        let inner = self.inner();
        self.run(async move {
            let mut names: Vec<ModelName> = inner
                .list_rel("models")
                .await?
                .iter()
                .filter_map(|o| o.location.filename())
                .filter_map(|f| f.strip_suffix(".json"))
                .filter_map(|n| ModelName::new(n).ok())
                .collect();
            names.sort();
            names.dedup();
            Ok(names)
        })
    }

    fn delete_manifest(&self, name: &ModelName) -> Result<bool> {
        let inner = self.inner();
        let n = name.clone();
        self.run(async move {
            let rel = Inner::model_rel(&n);
            if !inner.head_exists(&rel).await? {
                return Ok(false);
            }
            inner.delete_rel(&rel).await?;
            Ok(true)
        })
    }

    /// True: any number of processes, on any number of machines, may write one prefix.
    fn shares_writers(&self) -> bool {
        true
    }

    /// A lease object under `{prefix}locks/`, refreshed in the background until released (see
    /// `docs/format.md`, "Leases").
    fn acquire_lease(&self, kind: LeaseKind, operation: &str, wait: Duration) -> Result<Lease> {
        let inner = self.inner();
        let op = operation.to_owned();
        self.run(async move { inner.acquire_lease(kind, &op, wait).await })
    }

    fn release_lease(&self, lease: Lease) -> Result<()> {
        let Some(id) = lease.id().map(str::to_owned) else {
            return Ok(());
        };
        let inner = self.inner();
        self.run(async move { inner.release_lease(&id).await })
    }

    /// From the listings of `metadata/` and `deltas/` (their objects' times, by the service's
    /// clock, to the second).
    fn committed_within(&self, age: Duration) -> Result<BTreeSet<ContentHash>> {
        let inner = self.inner();
        self.run(async move { inner.committed_within(age).await })
    }

    /// Data objects without a metadata object, markers of missing deltas, and multipart uploads
    /// under the prefix started at least `older_than` ago (by the service's clock; an upload
    /// whose start the service does not give is left alone).
    fn remove_leftovers(&self, older_than: Duration, dry_run: bool) -> Result<Leftovers> {
        let inner = self.inner();
        self.run(async move { inner.remove_leftovers(older_than, dry_run).await })
    }
}

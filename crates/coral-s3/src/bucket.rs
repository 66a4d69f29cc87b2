//! Creating the bucket when it does not exist (when the config allows it; otherwise a missing
//! bucket is `StoreError::NotAStore`): object_store has no create-bucket call, so this
//! sends one signed request (HEAD, then PUT when missing) with object_store's own SigV4 signer
//! (`AwsAuthorizer`) and HTTP client.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AwsAuthorizer, AwsCredential};
use object_store::client::{
    ClientOptions, HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector,
};

use coral_store_api::StoreError;

use crate::config::S3Config;

/// The bucket's URL, path style, as object_store addresses it.
pub(crate) fn bucket_url(config: &S3Config, region: &str) -> String {
    match &config.endpoint_url {
        Some(ep) => format!("{}/{}", ep.trim_end_matches('/'), config.bucket),
        None => format!("https://s3.{region}.amazonaws.com/{}", config.bucket),
    }
}

/// What `ensure_bucket` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BucketState {
    Existed,
    Created,
}

/// Makes sure the bucket exists, creating it when the server says it does not and
/// `config.create_bucket` allows it.
pub(crate) async fn ensure_bucket(
    s3: &AmazonS3,
    config: &S3Config,
    region: &str,
    options: &ClientOptions,
) -> Result<BucketState, StoreError> {
    let location = config.location();
    // The endpoint, so that a server that does not answer is named (`https://s3.REGION...`
    // when none is configured).
    let endpoint = bucket_url(config, region);
    let endpoint = endpoint
        .strip_suffix(&format!("/{}", config.bucket))
        .unwrap_or(&endpoint)
        .to_owned();
    let ctx = |what: &str| {
        format!(
            "{what} bucket {:?} at {endpoint} ({location})",
            config.bucket
        )
    };
    let credential: Arc<AwsCredential> = match (&config.access_key, &config.secret_key) {
        (Some(k), Some(s)) => Arc::new(AwsCredential {
            key_id: k.clone(),
            secret_key: s.clone(),
            token: None,
        }),
        _ => s3
            .credentials()
            .get_credential()
            .await
            .map_err(|e| StoreError::backend(ctx("getting credentials for"), e))?,
    };
    let client = ReqwestConnector::default()
        .connect(options)
        .map_err(|e| StoreError::backend(ctx("HTTP client for"), e))?;
    let url = bucket_url(config, region);
    let authorizer = AwsAuthorizer::new(&credential, "s3", region);

    let request =
        |method: http::Method, body: HttpRequestBody| -> Result<HttpRequest, StoreError> {
            let mut req = http::Request::builder()
                .method(method)
                .uri(url.as_str())
                .body(body)
                .map_err(|e| StoreError::InvalidConfig(format!("bucket URL {url:?}: {e}")))?;
            authorizer.authorize(&mut req, None);
            Ok(req)
        };

    let head = client
        .execute(request(http::Method::HEAD, HttpRequestBody::empty())?)
        .await
        .map_err(|e| StoreError::backend(ctx("checking"), e))?;
    match head.status().as_u16() {
        200..=299 => return Ok(BucketState::Existed),
        404 if !config.create_bucket => {
            return Err(StoreError::NotAStore {
                location: location.clone(),
                reason: format!(
                    "bucket {:?} does not exist (a reading command never creates it)",
                    config.bucket
                ),
            })
        }
        404 => {}
        s => {
            return Err(StoreError::backend(
                ctx("checking"),
                format!("the server answered HTTP {s}"),
            ))
        }
    }
    let body = if region == "us-east-1" {
        HttpRequestBody::empty()
    } else {
        HttpRequestBody::from(format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        ))
    };
    let put = client
        .execute(request(http::Method::PUT, body)?)
        .await
        .map_err(|e| StoreError::backend(ctx("creating"), e))?;
    match put.status().as_u16() {
        200..=299 => {
            tracing::info!(bucket = %config.bucket, "created bucket");
            Ok(BucketState::Created)
        }
        // BucketAlreadyOwnedByYou: someone created it in between.
        409 => Ok(BucketState::Existed),
        s => Err(StoreError::backend(
            ctx("creating"),
            format!("the server answered HTTP {s}"),
        )),
    }
}

//! Creating the bucket when it does not exist (when the config allows it; otherwise a missing
//! bucket is `StoreError::NotAStore`): object_store has no create-bucket call, so this
//! sends one signed request (HEAD, then PUT when missing) with object_store's own SigV4 signer
//! (`AwsAuthorizer`) and HTTP client.

use object_store::aws::AmazonS3;
use object_store::client::{ClientOptions, HttpRequestBody};

use coral_store_api::StoreError;

use crate::config::S3Config;
use crate::signed::{bucket_url, Signed};

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
    let bucket = format!("bucket {:?} at {endpoint} ({location})", config.bucket);
    let signed = Signed::new(s3, config, region, options, &bucket).await?;
    let url = signed.url.clone();

    let head = signed
        .send(
            http::Method::HEAD,
            &url,
            HttpRequestBody::empty(),
            &ctx("checking"),
        )
        .await?;
    match head.status {
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
    let put = signed
        .send(http::Method::PUT, &url, body, &ctx("creating"))
        .await?;
    match put.status {
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

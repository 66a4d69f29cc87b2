//! Requests object_store has no call for (creating a bucket, listing and aborting multipart
//! uploads), signed with object_store's own SigV4 signer (`AwsAuthorizer`) and sent with its
//! HTTP client, so they carry the same credentials, region and client options as every other
//! request of the store.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AwsAuthorizer, AwsCredential};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector,
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

/// Percent-encodes everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - _ . ~`):
/// SigV4's canonical form of a query value, and of a key's path segment.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An object key as a URL path: each `/`-separated segment encoded.
pub(crate) fn encode_key(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// What a signed request got back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// A client for signed requests to one bucket.
pub(crate) struct Signed {
    client: HttpClient,
    credential: Arc<AwsCredential>,
    region: String,
    /// `bucket_url`.
    pub url: String,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("url", &self.url)
            .field("region", &self.region)
            .field("credential", &"<redacted>")
            .finish()
    }
}

impl Signed {
    /// The credentials of `config` (or of the store's provider: the environment, a profile, an
    /// instance role) and an HTTP client with the store's options. `what` names the bucket or
    /// the job in errors.
    pub(crate) async fn new(
        s3: &AmazonS3,
        config: &S3Config,
        region: &str,
        options: &ClientOptions,
        what: &str,
    ) -> Result<Self, StoreError> {
        let credential: Arc<AwsCredential> =
            match (&config.access_key, &config.secret_key) {
                (Some(k), Some(s)) => Arc::new(AwsCredential {
                    key_id: k.clone(),
                    secret_key: s.clone(),
                    token: None,
                }),
                _ => s3.credentials().get_credential().await.map_err(|e| {
                    StoreError::backend(format!("getting credentials for {what}"), e)
                })?,
            };
        let client = ReqwestConnector::default()
            .connect(options)
            .map_err(|e| StoreError::backend(format!("HTTP client for {what}"), e))?;
        Ok(Signed {
            client,
            credential,
            region: region.to_owned(),
            url: bucket_url(config, region),
        })
    }

    /// Sends one signed request to `url` and reads the whole answer. `what` names it in errors.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        url: &str,
        body: HttpRequestBody,
        what: &str,
    ) -> Result<Answer, StoreError> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(url)
            .body(body)
            .map_err(|e| StoreError::InvalidConfig(format!("{what}: URL {url:?}: {e}")))?;
        // The signer parses the URI again; a URI http accepts is one it accepts.
        AwsAuthorizer::new(&self.credential, "s3", &self.region).authorize(&mut req, None);
        let answer = self
            .client
            .execute(req)
            .await
            .map_err(|e| StoreError::backend(what.to_owned(), e))?;
        let status = answer.status().as_u16();
        let body = answer
            .into_body()
            .bytes()
            .await
            .map_err(|e| StoreError::backend(format!("{what}: reading the answer"), e))?;
        Ok(Answer { status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(encode("a b&c/=é"), "a%20b%26c%2F%3D%C3%A9");
        assert_eq!(encode_key("p/q r/x.npz"), "p/q%20r/x.npz");
        assert_eq!(encode(""), "");
    }
}

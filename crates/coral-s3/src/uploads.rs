//! Multipart uploads that were started and never completed nor aborted: a writer killed in the
//! middle of a large object leaves one, and the service keeps its parts (and bills them) until
//! someone aborts it. object_store cannot list them, so these are signed requests of our own:
//! `ListMultipartUploads` (`GET /{bucket}?uploads&prefix=...`) and `AbortMultipartUpload`
//! (`DELETE /{bucket}/{key}?uploadId=...`).

use object_store::client::HttpRequestBody;
use serde::Deserialize;

use coral_store_api::StoreError;

use crate::clock::parse_rfc3339_ms;
use crate::signed::{encode, encode_key, Signed};

/// One upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingUpload {
    /// The object's full key (prefix included).
    pub key: String,
    /// The service's id of the upload.
    pub upload_id: String,
    /// When it was started (Unix milliseconds, the service's clock), if the answer said.
    pub initiated_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListXml {
    #[serde(default)]
    is_truncated: Option<String>,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadXml>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadXml {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    upload_id: Option<String>,
    #[serde(default)]
    initiated: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorXml {
    #[serde(default)]
    code: Option<String>,
}

/// One page of a `ListMultipartUploads` answer: the uploads, and the markers of the next page
/// when the answer is truncated.
/// The uploads of a page, and the key and upload-id markers of the next page.
type Page = (Vec<PendingUpload>, Option<(String, String)>);

fn parse_page(body: &[u8]) -> Result<Page, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the answer is not UTF-8: {e}"))?;
    let page: ListXml = quick_xml::de::from_str(text)
        .map_err(|e| format!("the answer is not a ListMultipartUploadsResult: {e}"))?;
    let mut uploads = Vec::with_capacity(page.uploads.len());
    for u in page.uploads {
        match (u.key, u.upload_id) {
            (Some(key), Some(upload_id)) if !key.is_empty() && !upload_id.is_empty() => uploads
                .push(PendingUpload {
                    initiated_ms: u.initiated.as_deref().and_then(parse_rfc3339_ms),
                    key,
                    upload_id,
                }),
            _ => return Err("an Upload without Key or UploadId".to_owned()),
        }
    }
    let truncated = page
        .is_truncated
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("true"));
    let next = if truncated {
        match (page.next_key_marker, page.next_upload_id_marker) {
            (Some(k), Some(u)) if !k.is_empty() => Some((k, u)),
            _ => return Err("a truncated answer without NextKeyMarker".to_owned()),
        }
    } else {
        None
    };
    Ok((uploads, next))
}

/// The service's error code in an error answer (`<Error><Code>...`), or the HTTP status.
fn refusal(status: u16, body: &[u8]) -> String {
    let code = std::str::from_utf8(body)
        .ok()
        .and_then(|t| quick_xml::de::from_str::<ErrorXml>(t).ok())
        .and_then(|e| e.code)
        .filter(|c| !c.is_empty() && c.len() < 100);
    match code {
        Some(c) => format!("the server answered HTTP {status} ({c})"),
        None => format!("the server answered HTTP {status}"),
    }
}

/// Most pages read in one listing (1000 uploads each).
const MAX_PAGES: usize = 10_000;

/// Every multipart upload in progress whose key starts with `prefix`.
pub(crate) async fn list(
    signed: &Signed,
    prefix: &str,
    location: &str,
) -> Result<Vec<PendingUpload>, StoreError> {
    let what = format!("listing the unfinished multipart uploads of {location}");
    let mut out = Vec::new();
    let mut marker: Option<(String, String)> = None;
    for _ in 0..MAX_PAGES {
        let mut url = format!("{}?uploads&prefix={}", signed.url, encode(prefix));
        if let Some((k, u)) = &marker {
            url.push_str(&format!("&key-marker={}", encode(k)));
            if !u.is_empty() {
                url.push_str(&format!("&upload-id-marker={}", encode(u)));
            }
        }
        let answer = signed
            .send(http::Method::GET, &url, HttpRequestBody::empty(), &what)
            .await?;
        if !(200..300).contains(&answer.status) {
            return Err(StoreError::backend(
                what,
                refusal(answer.status, &answer.body),
            ));
        }
        let (uploads, next) = parse_page(&answer.body).map_err(|e| StoreError::Corrupt {
            location: location.to_owned(),
            key: "?uploads".to_owned(),
            reason: e,
        })?;
        // A service that ignores the prefix parameter lists other uploads too.
        out.extend(uploads.into_iter().filter(|u| u.key.starts_with(prefix)));
        match next {
            Some(n) if Some(&n) != marker.as_ref() => marker = Some(n),
            _ => return Ok(out),
        }
    }
    Ok(out)
}

/// Aborts one upload; `Ok(false)` when the service no longer knows it.
pub(crate) async fn abort(
    signed: &Signed,
    upload: &PendingUpload,
    location: &str,
) -> Result<bool, StoreError> {
    let what = format!(
        "aborting the multipart upload of {} in {location}",
        upload.key
    );
    let url = format!(
        "{}/{}?uploadId={}",
        signed.url,
        encode_key(&upload.key),
        encode(&upload.upload_id)
    );
    let answer = signed
        .send(http::Method::DELETE, &url, HttpRequestBody::empty(), &what)
        .await?;
    match answer.status {
        200..=299 => Ok(true),
        404 => Ok(false),
        s => Err(StoreError::backend(what, refusal(s, &answer.body))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_parse() {
        // moto's answer, as it is.
        let moto = br#"<?xml version="1.0" encoding="utf-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>tbucket</Bucket><KeyMarker/><UploadIdMarker/><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated><Upload><UploadId>DrJZk1s</UploadId><Key>a/b c&amp;.npz</Key><Initiated>2010-11-10T20:48:33.000Z</Initiated><StorageClass>STANDARD</StorageClass><Owner><DisplayName>webfile</DisplayName><ID>75aa</ID></Owner><Initiator><ID>arn</ID><DisplayName>u</DisplayName></Initiator></Upload><Upload><Key>a/x</Key><UploadId>2</UploadId></Upload></ListMultipartUploadsResult>"#;
        let (ups, next) = parse_page(moto).unwrap();
        assert_eq!(next, None);
        assert_eq!(
            ups,
            vec![
                PendingUpload {
                    key: "a/b c&.npz".into(),
                    upload_id: "DrJZk1s".into(),
                    initiated_ms: Some(1_289_422_113_000)
                },
                PendingUpload {
                    key: "a/x".into(),
                    upload_id: "2".into(),
                    initiated_ms: None
                }
            ]
        );
        let empty = br#"<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>"#;
        assert_eq!(parse_page(empty).unwrap(), (vec![], None));
        let truncated = br#"<ListMultipartUploadsResult><IsTruncated>true</IsTruncated><NextKeyMarker>k</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker><Upload><Key>k</Key><UploadId>u</UploadId><Initiated>nonsense</Initiated></Upload></ListMultipartUploadsResult>"#;
        let (ups, next) = parse_page(truncated).unwrap();
        assert_eq!(next, Some(("k".into(), "u".into())));
        assert_eq!(ups[0].initiated_ms, None);
        // Hostile or broken answers are errors, never panics.
        for bad in [
            &b"\xff\xfe"[..],
            b"",
            b"<a>",
            b"not xml at all",
            b"<R><Upload><Key>k</Key></Upload></R>",
            b"<R><IsTruncated>true</IsTruncated></R>",
            b"<R><Upload><Key>&bogus;</Key><UploadId>u</UploadId></Upload></R>",
        ] {
            assert!(
                parse_page(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            refusal(403, b"<Error><Code>AccessDenied</Code></Error>"),
            "the server answered HTTP 403 (AccessDenied)"
        );
        assert_eq!(refusal(500, b"\x00"), "the server answered HTTP 500");
    }
}

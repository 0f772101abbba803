//! Only gRPC calls reach the services: a request with another method or content type
//! (what a web page can make a browser send without a CORS preflight) gets an HTTP
//! error and stores nothing, on tonic's services and on ByteStream alike.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::WriteRequest;
use common::grpc::*;
use common::Server;
use tonic::transport::Channel;

struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
    /// grpc-status, from the headers (trailers-only) or the trailers.
    grpc_status: Option<String>,
}

/// Sends one request on the server's HTTP/2 connection exactly as given.
async fn raw_request(
    ch: &Channel,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    use http_body_util::BodyExt;
    use tonic::codegen::Service;
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("te", "trailers");
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .unwrap();
    let mut ch = ch.clone();
    let resp = bounded(async {
        futures::future::poll_fn(|cx| ch.poll_ready(cx))
            .await
            .unwrap();
        ch.call(req).await.unwrap()
    })
    .await;
    let (parts, body) = resp.into_parts();
    let collected = bounded(body.collect()).await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let grpc_status = parts
        .headers
        .get("grpc-status")
        .or_else(|| trailers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes().to_vec(),
        grpc_status,
    }
}

/// A gRPC message with its 5-byte prefix.
fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

const BATCH_UPDATE: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";
const WRITE: &str = "/google.bytestream.ByteStream/Write";

fn batch_update_body(blob: &[u8]) -> Vec<u8> {
    framed(&encode(&reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest(blob)),
            data: blob.to_vec(),
            ..Default::default()
        }],
        ..Default::default()
    }))
}

fn write_body(blob: &[u8]) -> Vec<u8> {
    framed(&encode(&WriteRequest {
        resource_name: upload_name("", &digest(blob)),
        write_offset: 0,
        finish_write: true,
        data: blob.to_vec(),
    }))
}

async fn assert_absent(ch: &Channel, repo: &std::path::Path, blob: &[u8], what: &str) {
    let d = digest(blob);
    let missing = find_missing(ch, std::slice::from_ref(&d)).await.unwrap();
    assert_eq!(missing, vec![d.clone()], "{what}: the blob was stored");
    assert!(!blob_path(repo, &d.hash).exists(), "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_are_not_grpc_calls_are_refused_before_any_service() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &["--enable-push"]);
    let ch = server.channel().await;
    let blob = pseudo_random(7001, 2000);

    // The content types a browser sends without a preflight, and other protocols that
    // share a prefix with gRPC's.
    let not_grpc = [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/grpc-web+proto"),
        Some("application/grpc+json"),
        None,
    ];
    for (path, body) in [
        (BATCH_UPDATE, batch_update_body(&blob)),
        (WRITE, write_body(&blob)),
    ] {
        for ct in not_grpc {
            let what = format!("POST {path} with content-type {ct:?}");
            let a = raw_request(&ch, "POST", path, ct, body.clone()).await;
            assert_eq!(a.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "{what}");
            assert_eq!(a.grpc_status, None, "{what}: a service answered");
            assert!(
                String::from_utf8_lossy(&a.body).contains("application/grpc"),
                "{what}"
            );
            assert_absent(&ch, repo.path(), &blob, &what).await;
        }
        for method in ["GET", "PUT", "HEAD", "OPTIONS"] {
            let what = format!("{method} {path}");
            let a = raw_request(&ch, method, path, Some("application/grpc"), body.clone()).await;
            assert_eq!(a.status, http::StatusCode::METHOD_NOT_ALLOWED, "{what}");
            assert_eq!(a.headers["allow"], "POST", "{what}");
            assert_eq!(a.grpc_status, None, "{what}: a service answered");
            assert_absent(&ch, repo.path(), &blob, &what).await;
        }
    }
    assert_eq!(tmp_entries(repo.path()), Vec::<std::path::PathBuf>::new());

    // gRPC's own content types get through, to both kinds of service.
    let other = pseudo_random(7002, 3000);
    for (path, body, blob) in [
        (BATCH_UPDATE, batch_update_body(&blob), &blob),
        (WRITE, write_body(&other), &other),
    ] {
        for ct in ["application/grpc", "application/grpc+proto"] {
            let a = raw_request(&ch, "POST", path, Some(ct), body.clone()).await;
            assert_eq!(a.status, http::StatusCode::OK, "{path} {ct}");
            assert_eq!(a.grpc_status.as_deref(), Some("0"), "{path} {ct}");
        }
        let d = digest(blob);
        assert!(find_missing(&ch, std::slice::from_ref(&d))
            .await
            .unwrap()
            .is_empty());
        assert!(std::fs::read(blob_path(repo.path(), &d.hash)).unwrap() == *blob);
    }
}

//! Quota, LRU eviction, the free-space reserve and the asset closure rule, against the
//! real binary on real files.
mod common;

use bazel_remote_apis::build::bazel::remote::asset::v1 as ra;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::{byte_stream_client::ByteStreamClient, WriteRequest};
use common::Server;
use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

fn blob(seed: u64, size: usize) -> (reapi::Digest, Vec<u8>) {
    let data = common::grpc::pseudo_random(seed, size);
    (common::grpc::digest(&data), data)
}

async fn upload(
    cas: &mut ContentAddressableStorageClient<Channel>,
    b: &(reapi::Digest, Vec<u8>),
) -> i32 {
    let resp = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(b.0.clone()),
                data: b.1.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    resp.responses[0].status.as_ref().map_or(0, |s| s.code)
}

/// Reads a blob back: `Some(bytes)` or `None` when NOT_FOUND. Refreshes its LRU stamp.
async fn read(
    cas: &mut ContentAddressableStorageClient<Channel>,
    d: &reapi::Digest,
) -> Option<Vec<u8>> {
    let resp = cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![d.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = &resp.responses[0];
    match r.status.as_ref().map_or(0, |s| s.code) {
        0 => Some(r.data.clone()),
        5 => None,
        other => panic!("unexpected status {other} reading {}", d.hash),
    }
}

fn on_disk(repo: &Path, d: &reapi::Digest) -> bool {
    repo.join("cas/objects")
        .join(&d.hash[..2])
        .join(&d.hash[2..])
        .exists()
}

/// File timestamps are coarse (a kernel tick); keep steps of an LRU story apart.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn quota_args<'a>(quota: &'a str, low: &'a str) -> Vec<&'a str> {
    vec![
        "--enable-push",
        "--quota",
        quota,
        "--quota-low",
        low,
        "--reserve",
        "0",
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_takes_the_least_recently_used_first() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &quota_args("350000", "250000"));
    let mut cas = ContentAddressableStorageClient::new(server.channel().await);
    let (a, b, c, d) = (
        blob(1, 100_000),
        blob(2, 100_000),
        blob(3, 100_000),
        blob(4, 100_000),
    );
    assert_eq!(upload(&mut cas, &a).await, 0);
    tick().await;
    assert_eq!(upload(&mut cas, &b).await, 0);
    tick().await;
    assert_eq!(read(&mut cas, &a.0).await.as_deref(), Some(a.1.as_slice()));
    tick().await;
    assert_eq!(upload(&mut cas, &c).await, 0);
    tick().await;
    // 400 kB would pass the 350 kB quota: B, the least recently used, must go.
    assert_eq!(upload(&mut cas, &d).await, 0);
    assert!(!on_disk(repo.path(), &b.0), "B should have been evicted");
    for kept in [&a, &c, &d] {
        assert!(
            on_disk(repo.path(), &kept.0),
            "{} should have survived",
            kept.0.hash
        );
    }
    assert_eq!(read(&mut cas, &b.0).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_larger_than_the_quota_is_refused_without_evicting() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &quota_args("200000", "100000"));
    let channel = server.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let small = blob(10, 50_000);
    assert_eq!(upload(&mut cas, &small).await, 0);
    let big = blob(11, 250_000);
    assert_eq!(upload(&mut cas, &big).await, Code::ResourceExhausted as i32);

    let mut bs = ByteStreamClient::new(channel);
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        big.0.hash,
        big.0.size_bytes
    );
    let req = WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: true,
        data: big.1.clone(),
    };
    let err = bs
        .write(futures::stream::iter(vec![req]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("quota"), "{}", err.message());
    assert!(!on_disk(repo.path(), &big.0));
    assert!(
        on_disk(repo.path(), &small.0),
        "refusing must not evict anything"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asset_hit_keeps_its_whole_closure() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &quota_args("450000", "330000"));
    let channel = server.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut push = ra::push_client::PushClient::new(channel.clone());
    let mut fetch = ra::fetch_client::FetchClient::new(channel);

    let (x1, x2) = (blob(21, 100_000), blob(22, 100_000));
    let artifact = (
        common::grpc::digest(b"artifact proto"),
        b"artifact proto".to_vec(),
    );
    for b in [&x1, &x2, &artifact] {
        assert_eq!(upload(&mut cas, b).await, 0);
    }
    push.push_blob(ra::PushBlobRequest {
        uris: vec!["urn:test:artifact".into()],
        blob_digest: Some(artifact.0.clone()),
        references_blobs: vec![x1.0.clone(), x2.0.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    tick().await;
    let y = blob(23, 100_000);
    assert_eq!(upload(&mut cas, &y).await, 0);
    tick().await;
    // Pulling the artifact refreshes everything it references, not just its own blob.
    fetch
        .fetch_blob(ra::FetchBlobRequest {
            uris: vec!["urn:test:artifact".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    tick().await;
    let (z, w) = (blob(24, 100_000), blob(25, 100_000));
    assert_eq!(upload(&mut cas, &z).await, 0);
    tick().await;
    assert_eq!(upload(&mut cas, &w).await, 0);

    assert!(!on_disk(repo.path(), &y.0), "Y was least recently used");
    for kept in [&x1, &x2, &artifact, &z, &w] {
        assert!(
            on_disk(repo.path(), &kept.0),
            "{} should have survived",
            kept.0.hash
        );
    }
    let hit = fetch
        .fetch_blob(ra::FetchBlobRequest {
            uris: vec!["urn:test:artifact".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.blob_digest, Some(artifact.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asset_whose_content_was_evicted_is_not_found() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &quota_args("250000", "100000"));
    let channel = server.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut push = ra::push_client::PushClient::new(channel.clone());
    let mut fetch = ra::fetch_client::FetchClient::new(channel);
    let old = blob(31, 100_000);
    assert_eq!(upload(&mut cas, &old).await, 0);
    push.push_blob(ra::PushBlobRequest {
        uris: vec!["urn:test:old".into()],
        blob_digest: Some(old.0.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    tick().await;
    for seed in 32..35 {
        assert_eq!(upload(&mut cas, &blob(seed, 100_000)).await, 0);
        tick().await;
    }
    assert!(!on_disk(repo.path(), &old.0));
    let err = fetch
        .fetch_blob(ra::FetchBlobRequest {
            uris: vec!["urn:test:old".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// BuildStream pushes an artifact's asset even after its blob uploads were refused for
/// space. Right after such a refusal an incomplete asset push is that failed upload, not
/// a split set-up's index entry (ADR 0007), and is refused.
#[tokio::test(flavor = "multi_thread")]
async fn after_refusing_space_incomplete_asset_pushes_are_refused() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &quota_args("150000", "100000"));
    let channel = server.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut push = ra::push_client::PushClient::new(channel.clone());
    let big = blob(41, 200_000);
    let artifact = blob(42, 1000);
    let request = ra::PushBlobRequest {
        uris: vec!["urn:test:big".into()],
        blob_digest: Some(artifact.0.clone()),
        references_blobs: vec![big.0.clone()],
        ..Default::default()
    };
    // Nothing refused yet: an index entry for content stored elsewhere.
    push.push_blob(request.clone()).await.unwrap();
    assert_ne!(upload(&mut cas, &big).await, 0);
    let err = push
        .push_blob(ra::PushBlobRequest {
            uris: vec!["urn:test:big2".into()],
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

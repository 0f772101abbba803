//! google.bytestream.ByteStream against the real binary: the resource-name forms
//! buildbox-casd uses, chunked transfers of large blobs, every way a Write stream can be
//! wrong, and the store surviving concurrent uploads and directories deleted under it.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::{QueryWriteStatusRequest, WriteRequest};
use common::grpc::*;
use common::Server;
use std::path::Path;
use tonic::transport::Channel;
use tonic::{Code, Status};

fn push_server(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let repo = tempfile::tempdir().unwrap();
    let mut args = vec!["--enable-push"];
    args.extend_from_slice(extra);
    let server = Server::start(repo.path(), &args);
    (repo, server)
}

/// Asserts that a blob is absent both to clients and on disk, and that the failed upload
/// left no temporary file behind.
async fn assert_not_stored(ch: &Channel, repo: &Path, data: &[u8]) {
    let d = digest(data);
    let missing = find_missing(ch, std::slice::from_ref(&d)).await.unwrap();
    assert_eq!(missing, vec![d.clone()]);
    assert!(!blob_path(repo, &d.hash).exists());
    // The temporary file goes when the failed upload is dropped, which the server may do
    // just after answering.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !tmp_entries(repo).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(tmp_entries(repo), Vec::<std::path::PathBuf>::new());
}

async fn assert_stored(ch: &Channel, repo: &Path, data: &[u8]) {
    let d = digest(data);
    assert!(find_missing(ch, std::slice::from_ref(&d))
        .await
        .unwrap()
        .is_empty());
    assert!(std::fs::read(blob_path(repo, &d.hash)).unwrap() == data);
    assert!(read(ch, &read_name("", &d), 0, 0).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn write_accepts_every_resource_name_form() {
    let (repo, server) = push_server(&["--instance-name", "foo"]);
    let ch = server.channel().await;
    let blobs: Vec<Vec<u8>> = (0..5)
        .map(|i| pseudo_random(100 + i, 1000 + i as usize))
        .collect();
    let d: Vec<_> = blobs.iter().map(|b| digest(b)).collect();
    let uuid = uuid::Uuid::new_v4();
    let names = [
        upload_name("", &d[0]),
        upload_name("foo", &d[1]),
        format!(
            "uploads/{uuid}/blobs/{}/{}/build/tool/metadata",
            d[2].hash, d[2].size_bytes
        ),
        // buildbox-casd's own form, without an upload id.
        format!("uploads/blobs/{}/{}", d[3].hash, d[3].size_bytes),
        format!("foo/uploads/blobs/{}/{}", d[4].hash, d[4].size_bytes),
    ];
    for (name, blob) in names.iter().zip(&blobs) {
        let r = write(&ch, name, blob, 300).await;
        assert_eq!(r.unwrap().committed_size, blob.len() as i64, "{name}");
    }
    for (blob, d) in blobs.iter().zip(&d) {
        assert_stored(&ch, repo.path(), blob).await;
        // Instance names all share one store.
        assert!(read(&ch, &read_name("foo", d), 0, 0).await.unwrap() == *blob);
    }
    let extra = pseudo_random(110, 10);
    let r = write(&ch, &upload_name("bar", &digest(&extra)), &extra, 1024).await;
    assert_code(r, Code::InvalidArgument);
    let r = read(&ch, &read_name("bar", &d[0]), 0, 0).await;
    assert_code(r, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_round_trip_in_chunks() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = pseudo_random(200, 8 * 1024 * 1024 + 12345);
    let d = digest(&blob);
    let msgs = write_requests(&upload_name("", &d), &blob, CASD_CHUNK);
    assert_eq!(msgs.len(), 5);
    let r = write_msgs(&ch, msgs).await.unwrap();
    assert_eq!(r.committed_size, d.size_bytes);
    assert!(std::fs::read(blob_path(repo.path(), &d.hash)).unwrap() == blob);

    let name = read_name("", &d);
    let chunks = read_chunks(&ch, &name, 0, 0).await.unwrap();
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());
    for c in &chunks {
        assert!(
            !c.is_empty() && c.len() <= 2 << 20,
            "chunk of {} bytes",
            c.len()
        );
    }
    assert!(chunks.concat() == blob);

    let (off, lim) = (3 * 1024 * 1024 + 7, 1024 * 1024 + 5);
    let part = read(&ch, &name, off as i64, lim as i64).await.unwrap();
    assert!(part == blob[off..off + lim]);
    let tail = read(&ch, &name, off as i64, 0).await.unwrap();
    assert!(tail == blob[off..]);
    let beyond = read(&ch, &name, blob.len() as i64 - 10, 1000)
        .await
        .unwrap();
    assert!(beyond == blob[blob.len() - 10..]);
    let head = read(&ch, &name, 0, 1).await.unwrap();
    assert_eq!(head, blob[..1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn write_with_wrong_content_stores_nothing() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let claimed = pseudo_random(300, 3 << 20);
    let d = digest(&claimed);
    let name = upload_name("", &d);

    // Same size, different bytes: the hash check at the end must catch it.
    let mut other = claimed.clone();
    other[1 << 20] ^= 1;
    assert_code(
        write(&ch, &name, &other, CASD_CHUNK).await,
        Code::InvalidArgument,
    );
    assert_not_stored(&ch, repo.path(), &claimed).await;
    assert_not_stored(&ch, repo.path(), &other).await;

    // Too few bytes, then finish_write.
    let short = &claimed[..claimed.len() - 1];
    let r = write(&ch, &upload_name("", &d), short, CASD_CHUNK).await;
    assert_code(r, Code::InvalidArgument);
    assert_not_stored(&ch, repo.path(), &claimed).await;

    // More bytes than the name declares, in one message and across messages.
    let mut long = claimed.clone();
    long.push(0);
    let r = write(&ch, &upload_name("", &d), &long, CASD_CHUNK).await;
    assert_code(r, Code::InvalidArgument);
    let r = write(&ch, &upload_name("", &d), &long, long.len()).await;
    assert_code(r, Code::InvalidArgument);
    assert_not_stored(&ch, repo.path(), &claimed).await;

    // An empty blob is still checked against its name.
    let zero = reapi::Digest {
        hash: d.hash.clone(),
        size_bytes: 0,
    };
    let r = write(&ch, &upload_name("", &zero), b"", 1).await;
    assert_code(r, Code::InvalidArgument);

    // The blob can still be uploaded properly afterwards.
    let r = write(&ch, &upload_name("", &d), &claimed, CASD_CHUNK).await;
    assert_eq!(r.unwrap().committed_size, d.size_bytes);
    assert_stored(&ch, repo.path(), &claimed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn write_protocol_violations_are_failed_precondition() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = pseudo_random(400, 3000);
    let d = digest(&blob);
    let name = upload_name("", &d);

    // A gap in the offsets.
    let mut msgs = write_requests(&name, &blob, 1000);
    msgs[1].write_offset += 1;
    assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
    // The same chunk sent twice.
    let mut msgs = write_requests(&name, &blob, 1000);
    msgs[1].write_offset = 0;
    assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
    // A first message that does not start at 0.
    let mut msgs = write_requests(&name, &blob, 1000);
    msgs[0].write_offset = 5;
    assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
    assert_not_stored(&ch, repo.path(), &blob).await;

    // Another resource name in the middle of the stream.
    let mut msgs = write_requests(&name, &blob, 1000);
    msgs[1].resource_name = upload_name("", &d);
    assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
    assert_not_stored(&ch, repo.path(), &blob).await;

    // The stream ends with every byte sent but no finish_write: nothing may be committed.
    let mut msgs = write_requests(&name, &blob, 1000);
    msgs.last_mut().unwrap().finish_write = false;
    assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
    assert_not_stored(&ch, repo.path(), &blob).await;

    // A stream with no message at all.
    assert!(write_msgs(&ch, vec![]).await.is_err());

    // Every byte sent, then a rewind that resends them: to the start (write_offset 0 is
    // not even on the wire) or to the middle.
    for rewind_to in [0, 1000] {
        let mut msgs = write_requests(&name, &blob, 1000);
        msgs.last_mut().unwrap().finish_write = false;
        let mut again = write_requests(&name, &blob, 1000);
        again.retain(|m| m.write_offset >= rewind_to);
        msgs.extend(again);
        let s = assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
        assert!(s.message().contains("write_offset"), "{s:?}");
        assert_not_stored(&ch, repo.path(), &blob).await;
    }

    // Anything after the message with finish_write: more data, or an empty request.
    for extra in [
        WriteRequest {
            write_offset: 3000,
            data: vec![1],
            ..Default::default()
        },
        WriteRequest::default(),
    ] {
        let mut msgs = write_requests(&name, &blob, 1000);
        msgs.push(extra);
        let s = assert_code(write_msgs(&ch, msgs).await, Code::FailedPrecondition);
        assert!(s.message().contains("finish_write"), "{s:?}");
        assert_not_stored(&ch, repo.path(), &blob).await;
    }

    // Repeating the same name on every message is allowed.
    let mut msgs = write_requests(&name, &blob, 1000);
    for m in &mut msgs {
        m.resource_name = name.clone();
    }
    assert_eq!(write_msgs(&ch, msgs).await.unwrap().committed_size, 3000);
    assert_stored(&ch, repo.path(), &blob).await;

    // A client that keeps its side open after finish_write, waiting for the answer,
    // gets it within a bounded time, and the blob is stored.
    let other = pseudo_random(401, 3000);
    let (tx, call) = open_write(&ch);
    for m in write_requests(&upload_name("", &digest(&other)), &other, 1000) {
        tx.send(m).await.unwrap();
    }
    let started = std::time::Instant::now();
    let r = bounded(call).await.unwrap().unwrap().into_inner();
    assert_eq!(r.committed_size, 3000);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    drop(tx);
    assert_stored(&ch, repo.path(), &other).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_resource_names_are_invalid_argument() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let data = b"hello".to_vec();
    let d = digest(&data);
    let (h, u) = (&d.hash, uuid::Uuid::new_v4());
    let bad_writes = [
        String::new(),
        "uploads/x/blobs/../../etc/passwd/5".into(),
        "../../../../etc/passwd".into(),
        format!("uploads/{u}/blobs/../{}/5", &h[3..]),
        format!("blobs/{h}/5"),
        format!("{h}/5"),
        format!("uploads/{u}/blobs/{h}"),
        format!("uploads/{u}/blobs/{h}/"),
        format!("uploads/{u}/blobs/{h}/five"),
        format!("uploads/{u}/blobs/{h}/-5"),
        format!("uploads/{u}/blobs/{h}/+5"),
        format!("uploads/{u}/blobs/{}/5", h.to_uppercase()),
        format!("uploads/{u}/blobs/{}/5", &h[1..]),
        format!("uploads/{u}/blobs/{h}0/5"),
        format!("uploads//blobs/{h}/5"),
        format!("uploads/{u}/{h}/5"),
        format!("uploads/{u}/compressed-blobs/zstd/{h}/5"),
        format!("uploads/{u}/compressed-blobs/deflate/{h}/5"),
        format!("../uploads/{u}/blobs/{h}/5"),
        // Not the empty instance's name: an empty segment.
        format!("/uploads/{u}/blobs/{h}/5"),
        format!("//uploads/{u}/blobs/{h}/5"),
    ];
    for name in &bad_writes {
        let msgs = vec![WriteRequest {
            resource_name: name.clone(),
            write_offset: 0,
            finish_write: true,
            data: data.clone(),
        }];
        let r = write_msgs(&ch, msgs).await;
        assert_eq!(
            r.as_ref().map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "write {name:?}: {r:?}"
        );
    }
    let bad_reads = [
        String::new(),
        "blobs/../../etc/passwd/5".into(),
        format!("blobs/{h}"),
        format!("blobs/{h}/5/extra"),
        format!("blobs/{h}/x"),
        format!("blobs/{}/5", h.to_uppercase()),
        format!("{h}/5"),
        format!("uploads/{u}/blobs/{h}/5"),
        format!("compressed-blobs/zstd/{h}/5"),
        format!("/blobs/{h}/5"),
        format!("//blobs/{h}/5"),
    ];
    for name in &bad_reads {
        let r = read(&ch, name, 0, 0).await;
        assert_eq!(
            r.as_ref().map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "read {name:?}"
        );
    }
    assert_not_stored(&ch, repo.path(), &data).await;
    let stored = walk_files(&repo.path().join("cas/objects"));
    // Only the empty blob, which every repository holds.
    assert_eq!(stored, [blob_path(repo.path(), EMPTY_SHA256)]);
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn re_upload_of_a_stored_blob() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = pseudo_random(500, 2 << 20);
    let d = digest(&blob);
    for _ in 0..2 {
        let r = write(&ch, &upload_name("", &d), &blob, 1 << 20).await;
        assert_eq!(r.unwrap().committed_size, d.size_bytes);
    }
    let small = pseudo_random(501, 10);
    assert_eq!(batch_update(&ch, &[&small]).await.unwrap(), vec![Code::Ok]);
    let r = write(&ch, &upload_name("", &digest(&small)), &small, 4).await;
    assert_eq!(r.unwrap().committed_size, 10);
    assert_eq!(batch_update(&ch, &[&small]).await.unwrap(), vec![Code::Ok]);
    // A re-upload is verified like any other: bad bytes fail and leave the copy intact.
    let mut bad = blob.clone();
    bad[7] ^= 0xff;
    let r = write(&ch, &upload_name("", &d), &bad, 1 << 20).await;
    assert_code(r, Code::InvalidArgument);
    assert_stored(&ch, repo.path(), &blob).await;
    assert_stored(&ch, repo.path(), &small).await;
    // The empty blob needs no storage but may be uploaded all the same.
    let r = write(&ch, &upload_name("", &digest(b"")), b"", 1).await;
    assert_eq!(r.unwrap().committed_size, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_concurrent_uploads_all_succeed() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = std::sync::Arc::new(pseudo_random(600, 5 << 20));
    let d = digest(&blob);
    // Half with their own upload ids, half under casd's shared id-less name.
    let casd_name = format!("uploads/blobs/{}/{}", d.hash, d.size_bytes);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (ch, blob) = (ch.clone(), blob.clone());
            let name = if i % 2 == 0 {
                upload_name("", &d)
            } else {
                casd_name.clone()
            };
            // Small chunks so that the uploads interleave on the server.
            tokio::spawn(async move { write(&ch, &name, &blob, 256 << 10).await })
        })
        .collect();
    for t in tasks {
        let r = bounded(t).await.unwrap();
        assert_eq!(r.unwrap().committed_size, d.size_bytes);
    }
    assert_stored(&ch, repo.path(), &blob).await;
    assert_eq!(tmp_entries(repo.path()), Vec::<std::path::PathBuf>::new());
}

/// Some blob whose hash falls in the given shard directory.
fn blob_in_shard(shard: &str, seed: u64) -> Vec<u8> {
    (seed..)
        .map(|s| pseudo_random(s, 64))
        .find(|b| sha256_hex(b).starts_with(shard))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_survive_directories_removed_under_the_server() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let objects = repo.path().join("cas/objects");
    let first = pseudo_random(700, 100);
    upload(&ch, &[&first]).await;
    let shard = sha256_hex(&first)[..2].to_owned();

    // Just the shard directory, as an operator cleaning up by hand might.
    std::fs::remove_dir_all(objects.join(&shard)).unwrap();
    let same_shard = blob_in_shard(&shard, 10_000);
    let d = digest(&same_shard);
    let r = write(&ch, &upload_name("", &d), &same_shard, 16).await;
    assert_eq!(r.unwrap().committed_size, 64);
    assert_stored(&ch, repo.path(), &same_shard).await;
    assert_eq!(find_missing(&ch, &[digest(&first)]).await.unwrap().len(), 1);

    // The whole object directory (BuildStream's test_pull_missing_blob does this).
    std::fs::remove_dir_all(&objects).unwrap();
    let big = pseudo_random(701, 3 << 20);
    let small = pseudo_random(702, 1000);
    let r = write(&ch, &upload_name("", &digest(&big)), &big, CASD_CHUNK).await;
    assert_eq!(r.unwrap().committed_size, big.len() as i64);
    assert_eq!(batch_update(&ch, &[&small]).await.unwrap(), vec![Code::Ok]);
    assert_stored(&ch, repo.path(), &big).await;
    assert_stored(&ch, repo.path(), &small).await;
    // Blobs lost with the directory are reported missing and can be uploaded again.
    let lost = find_missing(&ch, &[digest(&first), digest(&same_shard)])
        .await
        .unwrap();
    assert_eq!(lost.len(), 2);
    upload(&ch, &[&first, &same_shard]).await;
    assert_stored(&ch, repo.path(), &first).await;

    // The staging directory too.
    std::fs::remove_dir_all(repo.path().join("cas/tmp")).unwrap();
    let after = pseudo_random(703, 2 << 20);
    let r = write(&ch, &upload_name("", &digest(&after)), &after, CASD_CHUNK).await;
    assert_eq!(r.unwrap().committed_size, after.len() as i64);
    assert_stored(&ch, repo.path(), &after).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_ranges_and_errors() {
    let (_repo, server) = push_server(&["--instance-name", "foo"]);
    let ch = server.channel().await;
    let blob = pseudo_random(800, 1000);
    let d = digest(&blob);
    upload(&ch, &[&blob]).await;
    let name = read_name("", &d);

    assert!(read(&ch, &name, 0, 0).await.unwrap() == blob);
    assert!(read(&ch, &read_name("foo", &d), 0, 0).await.unwrap() == blob);
    assert!(read(&ch, &name, 10, 20).await.unwrap() == blob[10..30]);
    assert!(read(&ch, &name, 999, 0).await.unwrap() == blob[999..]);
    // Reading from the very end is an empty read, not an error.
    assert!(read(&ch, &name, 1000, 0).await.unwrap().is_empty());
    assert!(read(&ch, &name, 1000, 5).await.unwrap().is_empty());
    assert_code(read(&ch, &name, 1001, 0).await, Code::OutOfRange);
    assert_code(read(&ch, &name, i64::MAX, 0).await, Code::OutOfRange);
    assert_code(read(&ch, &name, -1, 0).await, Code::OutOfRange);
    assert_code(read(&ch, &name, 0, -1).await, Code::OutOfRange);

    let absent = digest(b"absent");
    assert_code(
        read(&ch, &read_name("", &absent), 0, 0).await,
        Code::NotFound,
    );
    assert_code(
        read(&ch, &read_name("nope", &d), 0, 0).await,
        Code::InvalidArgument,
    );
    assert_code(
        read(&ch, "blobs/nothex/5", 0, 0).await,
        Code::InvalidArgument,
    );
    // The empty blob is always there.
    assert!(read(&ch, &read_name("", &digest(b"")), 0, 0)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn query_write_status() {
    let (_repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = pseudo_random(900, 3 << 20);
    let d = digest(&blob);
    let name = upload_name("", &d);
    let qws = |name: String| {
        let mut client = bytestream(&ch);
        async move {
            bounded(client.query_write_status(QueryWriteStatusRequest {
                resource_name: name,
            }))
            .await
            .map(|r| r.into_inner())
        }
    };
    assert_code(qws(name.clone()).await, Code::NotFound);
    assert_code(qws("garbage".into()).await, Code::InvalidArgument);

    // While an upload is under way its progress is visible under its name.
    let (tx, upload) = open_write(&ch);
    let mut msgs = write_requests(&name, &blob, 1 << 20).into_iter();
    tx.send(msgs.next().unwrap()).await.unwrap();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        if let Ok(s) = qws(name.clone()).await {
            if s.committed_size == 1 << 20 {
                assert!(!s.complete);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "progress never showed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let r = bounded(upload).await.unwrap().unwrap().into_inner();
    assert_eq!(r.committed_size, d.size_bytes);

    let s = qws(name).await.unwrap();
    assert!(s.complete);
    assert_eq!(s.committed_size, d.size_bytes);
    // Any upload name for a stored blob reports it complete.
    let s = qws(upload_name("", &d)).await.unwrap();
    assert!(s.complete);
    assert_eq!(s.committed_size, d.size_bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_upload_leaves_nothing_behind() {
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = pseudo_random(1000, 3 << 20);
    let d = digest(&blob);
    let name = upload_name("", &d);
    let (tx, upload) = open_write(&ch);
    tx.send(write_requests(&name, &blob, 1 << 20).remove(0))
        .await
        .unwrap();
    let query = |name: String| {
        let mut client = bytestream(&ch);
        async move {
            bounded(client.query_write_status(QueryWriteStatusRequest {
                resource_name: name,
            }))
            .await
            .map(|r| r.into_inner().committed_size)
        }
    };
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while query(name.clone()).await.ok() != Some(1 << 20) {
        assert!(std::time::Instant::now() < deadline, "upload never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(uploads_open(server.pid(), repo.path()), 1);
    // The client goes away without ending its stream (the call is cancelled).
    upload.abort();
    let _ = upload.await;
    drop(tx);
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while uploads_open(server.pid(), repo.path()) != 0 || query(name.clone()).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned upload was never cleaned up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_code(query(name.clone()).await, Code::NotFound);
    assert_not_stored(&ch, repo.path(), &blob).await;
    // The same upload can be made afresh.
    let r = write(&ch, &upload_name("", &d), &blob, CASD_CHUNK).await;
    assert_eq!(r.unwrap().committed_size, d.size_bytes);
}

/// Reads a whole blob and returns how many bytes arrived and how the stream ended.
async fn read_counting(ch: &Channel, d: &reapi::Digest) -> (usize, Result<(), Status>) {
    let mut stream = match bounded(bytestream(ch).read(
        bazel_remote_apis::google::bytestream::ReadRequest {
            resource_name: read_name("", d),
            read_offset: 0,
            read_limit: 0,
        },
    ))
    .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return (0, Err(e)),
    };
    let mut got = 0;
    loop {
        match bounded(stream.message()).await {
            Ok(Some(r)) => got += r.data.len(),
            Ok(None) => return (got, Ok(())),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Flips one byte of a stored object in place (as damage on disk would).
fn damage_in_place(path: &Path, at: u64) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    drop(f);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_large_blob_is_never_served_whole() {
    let repo = tempfile::tempdir().unwrap();
    // Large enough for the separate verification thread and direct writes.
    let blob = pseudo_random(1100, (6 << 20) + 123);
    let d = digest(&blob);
    let path = blob_path(repo.path(), &d.hash);
    {
        let server = Server::start(repo.path(), &["--enable-push"]);
        let ch = server.channel().await;
        upload(&ch, &[&blob]).await;
        assert!(read(&ch, &read_name("", &d), 0, 0).await.unwrap() == blob);
    }
    // Damage found by a new process (as after a power loss): the last chunk is withheld,
    // the object quarantined, and the blob reported missing so it gets uploaded again.
    damage_in_place(&path, 3 << 20);
    let server = Server::start(repo.path(), &["--enable-push"]);
    let ch = server.channel().await;
    let (got, end) = read_counting(&ch, &d).await;
    assert_eq!(end.unwrap_err().code(), Code::DataLoss);
    assert!(
        got < blob.len(),
        "all {got} bytes of a damaged blob were sent"
    );
    assert!(!path.exists());
    assert_eq!(
        find_missing(&ch, std::slice::from_ref(&d))
            .await
            .unwrap()
            .len(),
        1
    );
    upload(&ch, &[&blob]).await;
    let (got, end) = read_counting(&ch, &d).await;
    end.unwrap();
    assert_eq!(got, blob.len());
    // A damaged copy put in place of a checked object (another inode) is checked again.
    let copy = repo.path().join("copy");
    std::fs::copy(&path, &copy).unwrap();
    damage_in_place(&copy, 100);
    std::fs::rename(&copy, &path).unwrap();
    let (got, end) = read_counting(&ch, &d).await;
    assert_eq!(end.unwrap_err().code(), Code::DataLoss);
    assert!(got < blob.len());
}

/// Uploads share a bounded buffer budget (16 MiB); many at once, next to clients that
/// stall half-way, must all complete rather than wait on each other.
#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_uploads_beside_stalled_ones_all_complete() {
    let (repo, server) = push_server(&[]);
    // Stalled uploads: a first chunk, then nothing until the end of the test.
    let mut stalled = Vec::new();
    for i in 0..8 {
        let ch = server.channel().await;
        let blob = pseudo_random(1300 + i, 6 << 20);
        let name = upload_name("", &digest(&blob));
        let (tx, call) = open_write(&ch);
        tx.send(write_requests(&name, &blob, CASD_CHUNK).remove(0))
            .await
            .unwrap();
        stalled.push((tx, call));
    }
    // Busy uploads: together far more than the budget, each several chunks.
    let blobs: Vec<Vec<u8>> = (0..24).map(|i| pseudo_random(1400 + i, 5 << 20)).collect();
    let mut uploads = Vec::new();
    for b in &blobs {
        let ch = server.channel().await;
        let b = b.clone();
        uploads.push(tokio::spawn(async move {
            write(&ch, &upload_name("", &digest(&b)), &b, CASD_CHUNK).await
        }));
    }
    for (u, b) in uploads.into_iter().zip(&blobs) {
        let r = u.await.unwrap().unwrap();
        assert_eq!(r.committed_size, b.len() as i64);
    }
    let ch = server.channel().await;
    for b in &blobs {
        assert_stored(&ch, repo.path(), b).await;
    }
    for (tx, call) in stalled {
        drop(tx);
        assert!(bounded(call).await.unwrap().is_err());
    }
}

/// Clients that keep trickling a byte at a time must not keep upload memory from the
/// others: each holds a shared buffer at most briefly, so busy uploads complete while
/// more trickling clients than there are buffers carry on, and then they complete too.
#[tokio::test(flavor = "multi_thread")]
async fn trickling_clients_do_not_starve_busy_uploads() {
    let (repo, server) = push_server(&[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tricklers = Vec::new();
    for i in 0..20 {
        let ch = server.channel().await;
        let blob = pseudo_random(1500 + i, 100_000);
        let name = upload_name("", &digest(&blob));
        let stop = stop.clone();
        tricklers.push(tokio::spawn(async move {
            let (tx, call) = open_write(&ch);
            let mut off = 0usize;
            // One byte every 10 ms (bounded: the blob's size less the last message).
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && off < blob.len() - 1 {
                let msg = WriteRequest {
                    resource_name: if off == 0 {
                        name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: off as i64,
                    finish_write: false,
                    data: blob[off..off + 1].to_vec(),
                };
                tx.send(msg).await.unwrap();
                off += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let last = WriteRequest {
                resource_name: String::new(),
                write_offset: off as i64,
                finish_write: true,
                data: blob[off..].to_vec(),
            };
            tx.send(last).await.unwrap();
            let r = bounded(call).await.unwrap().unwrap().into_inner();
            assert_eq!(r.committed_size, blob.len() as i64);
            blob
        }));
    }
    // Let every trickling client take hold of a buffer first.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(1600 + i, 8 << 20)).collect();
    let ch = server.channel().await;
    for b in &blobs {
        let r = bounded(write(&ch, &upload_name("", &digest(b)), b, CASD_CHUNK)).await;
        assert_eq!(r.unwrap().committed_size, b.len() as i64);
        assert_stored(&ch, repo.path(), b).await;
    }
    assert!(
        tricklers.iter().all(|t| !t.is_finished()),
        "the trickling clients were still sending while the busy uploads completed"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tricklers {
        let blob = bounded(t).await.unwrap();
        assert_stored(&ch, repo.path(), &blob).await;
    }
}

/// A gRPC message with its 5-byte prefix (`flag` 1: compressed).
fn frame(flag: u8, msg: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A ByteStream call made by hand on the server's HTTP/2 connection, its body sent
/// exactly as given. Returns the status code and message, and the response's data.
async fn raw_call(
    ch: &Channel,
    method: &str,
    body: Vec<u8>,
    encoding: Option<&str>,
) -> (Code, String, Vec<u8>) {
    raw_call_path(
        ch,
        &format!("/google.bytestream.ByteStream/{method}"),
        body,
        encoding,
    )
    .await
}

/// [`raw_call`] to any service's method (`path` is `/package.Service/Method`).
async fn raw_call_path(
    ch: &Channel,
    path: &str,
    body: Vec<u8>,
    encoding: Option<&str>,
) -> (Code, String, Vec<u8>) {
    use http_body_util::BodyExt;
    use tonic::codegen::Service;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(e) = encoding {
        req = req.header("grpc-encoding", e);
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
    let data = collected.to_bytes().to_vec();
    // A status alone comes in the headers ("trailers-only"), else in the trailers.
    let status = if parts.headers.contains_key("grpc-status") {
        parts.headers
    } else {
        trailers
    };
    let code = status["grpc-status"]
        .to_str()
        .unwrap()
        .parse::<i32>()
        .unwrap();
    let message = status
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    (Code::from(code), message, data)
}

/// grpc-message is percent-encoded on the wire.
fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The server decodes Write bodies itself as they arrive: any valid encoding is taken
/// (fields in any order, unknown fields), anything else gets a precise status, and the
/// server carries on.
#[tokio::test(flavor = "multi_thread")]
async fn hand_made_write_and_read_bodies() {
    use prost::Message;
    let (repo, server) = push_server(&[]);
    let ch = server.channel().await;
    let blob = pseudo_random(1400, 300_000);
    let d = digest(&blob);
    let name = upload_name("", &d);

    // Data first, an unknown field, then finish_write, write_offset and the name.
    let mut msg = Vec::new();
    prost::encoding::bytes::encode(10, &blob, &mut msg);
    prost::encoding::uint64::encode(7, &12345, &mut msg);
    prost::encoding::bool::encode(3, &true, &mut msg);
    prost::encoding::int64::encode(2, &0, &mut msg);
    prost::encoding::string::encode(1, &name, &mut msg);
    let (code, message, data) = raw_call(&ch, "Write", frame(0, &msg), None).await;
    assert_eq!(code, Code::Ok, "{message}");
    let resp = bazel_remote_apis::google::bytestream::WriteResponse::decode(&data[5..]).unwrap();
    assert_eq!(resp.committed_size, blob.len() as i64);
    assert_stored(&ch, repo.path(), &blob).await;

    // Read by hand too: messages whose data, put together, is the blob.
    let req = bazel_remote_apis::google::bytestream::ReadRequest {
        resource_name: read_name("", &d),
        ..Default::default()
    };
    let (code, message, data) = raw_call(&ch, "Read", frame(0, &encode(&req)), None).await;
    assert_eq!(code, Code::Ok, "{message}");
    let (mut rest, mut got) = (&data[..], Vec::new());
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let m =
            bazel_remote_apis::google::bytestream::ReadResponse::decode(&rest[5..5 + len]).unwrap();
        got.extend_from_slice(&m.data);
        rest = &rest[5 + len..];
    }
    assert!(got == blob);

    let other = pseudo_random(1401, 5000);
    let other_name = upload_name("", &digest(&other));
    let good = WriteRequest {
        resource_name: other_name.clone(),
        write_offset: 0,
        finish_write: true,
        data: other.clone(),
    };
    // What, the body, its grpc-encoding, the expected code and words of the message.
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, Code, &'a str);
    let cases: Vec<Case> = vec![
        (
            "garbage",
            frame(0, &[0xff; 40]),
            None,
            Code::Internal,
            "failed to decode",
        ),
        // gRPC's compression specification: a compressed flag without an encoding
        // MUST be INTERNAL; an encoding we do not take is UNIMPLEMENTED.
        (
            "compressed flag",
            frame(1, &encode(&good)),
            None,
            Code::Internal,
            "compressed flag",
        ),
        (
            "compressed flag, identity",
            frame(1, &encode(&good)),
            Some("identity"),
            Code::Internal,
            "compressed flag",
        ),
        (
            "unknown flag",
            frame(2, &encode(&good)),
            None,
            Code::Internal,
            "flag",
        ),
        (
            "gzip",
            frame(0, &encode(&good)),
            Some("gzip"),
            Code::Unimplemented,
            "compressed",
        ),
        (
            "cut short",
            frame(0, &encode(&good))[..100].to_vec(),
            None,
            Code::Internal,
            "ended in the middle",
        ),
        (
            "data twice",
            frame(0, &[encode(&good), vec![0x52, 1, 0]].concat()),
            None,
            Code::InvalidArgument,
            "twice",
        ),
        (
            "no message",
            vec![],
            None,
            Code::InvalidArgument,
            "no request",
        ),
        (
            "a message after finish_write",
            [frame(0, &encode(&good)), frame(0, &[])].concat(),
            None,
            Code::FailedPrecondition,
            "finish_write",
        ),
        (
            "a byte after finish_write",
            [frame(0, &encode(&good)), vec![0]].concat(),
            None,
            Code::FailedPrecondition,
            "finish_write",
        ),
    ];
    for (what, body, encoding, code, words) in cases {
        let (got, message, _) = raw_call(&ch, "Write", body, encoding).await;
        assert_eq!(got, code, "{what}: {message}");
        assert!(message.contains(words), "{what}: {message}");
        assert_not_stored(&ch, repo.path(), &other).await;
    }
    let (got, message, _) = raw_call(&ch, "Read", frame(0, &[0xff; 9]), None).await;
    assert_eq!(got, Code::Internal, "{message}");
    let req = encode(&bazel_remote_apis::google::bytestream::ReadRequest {
        resource_name: read_name("", &d),
        ..Default::default()
    });
    let qws = encode(&QueryWriteStatusRequest {
        resource_name: name.clone(),
    });
    // The unary methods: what, method, body, grpc-encoding, code, words of the message.
    type UnaryCase<'a> = (&'a str, &'a str, Vec<u8>, Option<&'a str>, Code, &'a str);
    let unary_cases: Vec<UnaryCase> = vec![
        (
            "twice",
            "Read",
            [frame(0, &req), frame(0, &req)].concat(),
            None,
            Code::InvalidArgument,
            "exactly one",
        ),
        (
            "no message",
            "Read",
            vec![],
            None,
            Code::InvalidArgument,
            "no ReadRequest",
        ),
        (
            "cut in the prefix",
            "Read",
            frame(0, &req)[..3].to_vec(),
            None,
            Code::Internal,
            "ended in the middle",
        ),
        (
            "cut in the message",
            "Read",
            frame(0, &req)[..20].to_vec(),
            None,
            Code::Internal,
            "ended in the middle",
        ),
        (
            "cut in the message",
            "QueryWriteStatus",
            frame(0, &qws)[..20].to_vec(),
            None,
            Code::Internal,
            "ended in the middle",
        ),
        (
            "compressed flag",
            "Read",
            frame(1, &req),
            None,
            Code::Internal,
            "compressed flag",
        ),
        (
            "compressed flag",
            "QueryWriteStatus",
            frame(1, &qws),
            None,
            Code::Internal,
            "compressed flag",
        ),
        (
            "gzip",
            "QueryWriteStatus",
            frame(0, &qws),
            Some("gzip"),
            Code::Unimplemented,
            "compressed",
        ),
    ];
    for (what, method, body, encoding, code, words) in unary_cases {
        let (got, message, _) = raw_call(&ch, method, body, encoding).await;
        assert_eq!(got, code, "{method} {what}: {message}");
        assert!(message.contains(words), "{method} {what}: {message}");
    }
    // The same codes as tonic's generated services give.
    let cas_path = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    let find = encode(&reapi::FindMissingBlobsRequest::default());
    let (got, message, _) = raw_call_path(&ch, cas_path, frame(1, &find), None).await;
    assert_eq!(got, Code::Internal, "{message}");
    let (got, message, _) = raw_call_path(&ch, cas_path, frame(0, &find)[..3].to_vec(), None).await;
    assert_eq!(got, Code::Internal, "{message}");
    let (got, message, _) = raw_call_path(&ch, cas_path, frame(0, &find), Some("gzip")).await;
    assert_eq!(got, Code::Unimplemented, "{message}");
    let (got, message, _) = raw_call(&ch, "Delete", frame(0, &req), None).await;
    assert_eq!(got, Code::Unimplemented, "{message}");

    // And the server is as good as before.
    write(&ch, &other_name, &other, CASD_CHUNK).await.unwrap();
    assert_stored(&ch, repo.path(), &other).await;
}

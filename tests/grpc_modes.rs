//! Server modes and process behaviour: read-only (no --enable-push), --index-only,
//! instance names, persistence across a SIGKILL, clean SIGTERM, hostile bytes on the
//! port, and the command line (including the historical form without a subcommand).
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::QueryWriteStatusRequest;
use common::asset::*;
use common::grpc::*;
use common::{Server, BIN};
use reapi::capabilities_client::CapabilitiesClient;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Content a test stores, and checks for later.
struct Content {
    small: Vec<u8>,
    big: Vec<u8>,
    file: Vec<u8>,
    dir: Vec<u8>,
}

impl Content {
    fn new(seed: u64) -> Self {
        let file = pseudo_random(seed + 2, 700);
        let dir = encode(&reapi::Directory {
            files: vec![file_node("file", &digest(&file))],
            ..Default::default()
        });
        Content {
            small: pseudo_random(seed, 1000),
            big: pseudo_random(seed + 1, 3 << 20),
            file,
            dir,
        }
    }

    fn digests(&self) -> Vec<reapi::Digest> {
        [&self.small, &self.big, &self.file, &self.dir]
            .iter()
            .map(|b| digest(b))
            .collect()
    }

    async fn push(&self, ch: &Channel) {
        upload(ch, &[&self.small, &self.big, &self.file, &self.dir]).await;
        let mut req = push_blob_req(&["urn:artifact"], &digest(&self.small));
        req.references_blobs = vec![digest(&self.big)];
        req.references_directories = vec![digest(&self.dir)];
        push_blob(ch, req).await.unwrap();
        push_dir(ch, push_dir_req(&["urn:source"], &digest(&self.dir)))
            .await
            .unwrap();
    }

    /// Everything a pulling client reads is there and intact.
    async fn check_served(&self, ch: &Channel) {
        assert!(find_missing(ch, &self.digests()).await.unwrap().is_empty());
        let resp = bounded(cas(ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest(&self.small), digest(&self.file)],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
        assert_eq!(resp.responses[0].data, self.small);
        assert_eq!(resp.responses[1].data, self.file);
        let big = read(ch, &read_name("", &digest(&self.big)), 0, 0)
            .await
            .unwrap();
        assert!(big == self.big);
        let tree = bounded(async {
            let mut s = cas(ch)
                .get_tree(reapi::GetTreeRequest {
                    root_digest: Some(digest(&self.dir)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(p) = s.message().await? {
                n += p.directories.len();
            }
            Ok::<_, Status>(n)
        })
        .await
        .unwrap();
        assert_eq!(tree, 1);
        let r = fetch_blob(ch, &["urn:artifact"], &[]).await.unwrap();
        assert_eq!(r.blob_digest, Some(digest(&self.small)));
        let r = fetch_dir(ch, &["urn:source"], &[]).await.unwrap();
        assert_eq!(r.root_directory_digest, Some(digest(&self.dir)));
    }
}

async fn capabilities(ch: &Channel, instance: &str) -> Result<reapi::ServerCapabilities, Status> {
    bounded(
        CapabilitiesClient::new(ch.clone()).get_capabilities(reapi::GetCapabilitiesRequest {
            instance_name: instance.into(),
        }),
    )
    .await
    .map(|r| r.into_inner())
}

async fn qws(ch: &Channel, name: &str) -> Result<(i64, bool), Status> {
    bounded(bytestream(ch).query_write_status(QueryWriteStatusRequest {
        resource_name: name.into(),
    }))
    .await
    .map(|r| {
        let r = r.into_inner();
        (r.committed_size, r.complete)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn without_enable_push_the_server_is_read_only() {
    let repo = tempfile::tempdir().unwrap();
    let content = Content::new(1);
    {
        let mut writer = Server::start(repo.path(), &["--enable-push"]);
        content.push(&writer.channel().await).await;
        assert!(writer.signal_and_wait(libc::SIGTERM).success());
    }
    let server = Server::start(repo.path(), &[]);
    let ch = server.channel().await;

    // bst configured with push: true must see that this remote cannot take pushes.
    let d = digest(&content.small);
    assert_code(
        push_blob(&ch, push_blob_req(&["urn:new"], &d)).await,
        Code::Unimplemented,
    );
    assert_code(
        push_dir(&ch, push_dir_req(&["urn:new"], &d)).await,
        Code::Unimplemented,
    );
    assert_code(
        push_blob(&ch, push_blob_req(&[], &d)).await,
        Code::Unimplemented,
    );

    let new = pseudo_random(9, 500);
    assert_code(batch_update(&ch, &[&new]).await, Code::PermissionDenied);
    let r = write(&ch, &upload_name("", &digest(&new)), &new, 100).await;
    assert_code(r, Code::PermissionDenied);
    let big_new = pseudo_random(10, 3 << 20);
    let r = write(
        &ch,
        &upload_name("", &digest(&big_new)),
        &big_new,
        CASD_CHUNK,
    )
    .await;
    assert_code(r, Code::PermissionDenied);
    for b in [&new, &big_new] {
        assert!(!blob_path(repo.path(), &sha256_hex(b)).exists());
        assert_eq!(find_missing(&ch, &[digest(b)]).await.unwrap().len(), 1);
    }

    // Everything a pull needs still works, including bst's startup probe.
    content.check_served(&ch).await;
    assert_code(fetch_blob(&ch, &[], &[]).await, Code::InvalidArgument);
    assert!(capabilities(&ch, "")
        .await
        .unwrap()
        .cache_capabilities
        .is_some());
    let name = upload_name("", &digest(&content.big));
    assert_eq!(qws(&ch, &name).await.unwrap(), (3 << 20, true));
}

#[tokio::test(flavor = "multi_thread")]
async fn index_only_serves_just_the_asset_index() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &["--index-only", "--enable-push"]);
    let ch = server.channel().await;
    let caps = capabilities(&ch, "").await.unwrap();
    assert_eq!(
        caps.cache_capabilities.unwrap().digest_functions,
        vec![reapi::digest_function::Value::Sha256 as i32]
    );

    let blob = pseudo_random(20, 100);
    let d = digest(&blob);
    assert_code(
        find_missing(&ch, std::slice::from_ref(&d)).await,
        Code::Unimplemented,
    );
    assert_code(batch_update(&ch, &[&blob]).await, Code::Unimplemented);
    let r = bounded(cas(&ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        digests: vec![d.clone()],
        ..Default::default()
    }))
    .await;
    assert_code(r, Code::Unimplemented);
    let r = bounded(cas(&ch).get_tree(reapi::GetTreeRequest {
        root_digest: Some(d.clone()),
        ..Default::default()
    }))
    .await;
    assert_code(r.map(|_| ()), Code::Unimplemented);
    assert_code(
        write(&ch, &upload_name("", &d), &blob, 50).await,
        Code::Unimplemented,
    );
    assert_code(
        read(&ch, &read_name("", &d), 0, 0).await,
        Code::Unimplemented,
    );
    assert_code(qws(&ch, &upload_name("", &d)).await, Code::Unimplemented);

    // Storage lives on another server, so references cannot be checked here.
    let never_uploaded = digest(b"stored elsewhere");
    let tree = digest(b"a directory stored elsewhere");
    let mut req = push_blob_req(&["urn:artifact"], &never_uploaded);
    req.references_blobs = vec![digest(b"meta stored elsewhere")];
    req.references_directories = vec![tree.clone()];
    push_blob(&ch, req).await.unwrap();
    push_dir(&ch, push_dir_req(&["urn:source"], &tree))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();
    assert_eq!(r.blob_digest, Some(never_uploaded));
    let r = fetch_dir(&ch, &["urn:source"], &[]).await.unwrap();
    assert_eq!(r.root_directory_digest, Some(tree));
    assert_code(fetch_blob(&ch, &[], &[]).await, Code::InvalidArgument);
    assert_code(
        push_blob(&ch, push_blob_req(&[], &d)).await,
        Code::InvalidArgument,
    );
    assert_code(fetch_blob(&ch, &["urn:other"], &[]).await, Code::NotFound);

    // An index-only server without --enable-push has Fetch but no Push.
    let repo2 = tempfile::tempdir().unwrap();
    let ro = Server::start(repo2.path(), &["--index-only"]);
    let ch2 = ro.channel().await;
    assert_code(
        push_blob(&ch2, push_blob_req(&["urn:x"], &d)).await,
        Code::Unimplemented,
    );
    assert_code(fetch_blob(&ch2, &["urn:x"], &[]).await, Code::NotFound);
    assert_code(batch_update(&ch2, &[&blob]).await, Code::Unimplemented);
}

/// Runs every RPC with the given instance name and returns the codes.
async fn codes_for_instance(ch: &Channel, instance: &str, seed: u64) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let blob = pseudo_random(seed, 300);
    let big = pseudo_random(seed + 1, 2 << 20);
    let d = digest(&blob);
    let dir = encode(&reapi::Directory {
        files: vec![file_node("f", &d)],
        ..Default::default()
    });
    let dd = digest(&dir);
    let mut out = vec![];
    let r = bounded(
        cas(ch).batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: [&blob, &dir]
                .iter()
                .map(|b| reapi::batch_update_blobs_request::Request {
                    digest: Some(digest(b)),
                    data: b.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    )
    .await;
    out.push(("BatchUpdateBlobs", code(r.map(|_| ()))));
    let r = bounded(cas(ch).find_missing_blobs(reapi::FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: vec![d.clone()],
        ..Default::default()
    }))
    .await;
    out.push(("FindMissingBlobs", code(r.map(|_| ()))));
    let r = bounded(cas(ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        instance_name: instance.into(),
        digests: vec![d.clone()],
        ..Default::default()
    }))
    .await;
    out.push(("BatchReadBlobs", code(r.map(|_| ()))));
    let r = bounded(cas(ch).get_tree(reapi::GetTreeRequest {
        instance_name: instance.into(),
        root_digest: Some(dd.clone()),
        ..Default::default()
    }))
    .await;
    out.push(("GetTree", code(r.map(|_| ()))));
    let r = write(ch, &upload_name(instance, &digest(&big)), &big, CASD_CHUNK).await;
    out.push(("Write", code(r.map(|_| ()))));
    let r = read(ch, &read_name(instance, &d), 0, 0).await;
    out.push(("Read", code(r.map(|_| ()))));
    let r = qws(ch, &upload_name(instance, &d)).await;
    out.push(("QueryWriteStatus", code(r.map(|_| ()))));
    let mut req = push_blob_req(&["urn:i"], &d);
    req.instance_name = instance.into();
    out.push(("PushBlob", code(push_blob(ch, req).await)));
    let mut req = push_dir_req(&["urn:i"], &dd);
    req.instance_name = instance.into();
    out.push(("PushDirectory", code(push_dir(ch, req).await)));
    let r = fetch_blob_req(
        ch,
        bazel_remote_apis::build::bazel::remote::asset::v1::FetchBlobRequest {
            instance_name: instance.into(),
            uris: uris(&["urn:i"]),
            ..Default::default()
        },
    )
    .await;
    out.push(("FetchBlob", code(r.map(|_| ()))));
    let r = fetch_dir_req(
        ch,
        bazel_remote_apis::build::bazel::remote::asset::v1::FetchDirectoryRequest {
            instance_name: instance.into(),
            uris: uris(&["urn:i"]),
            ..Default::default()
        },
    )
    .await;
    out.push(("FetchDirectory", code(r.map(|_| ()))));
    out.push((
        "GetCapabilities",
        code(capabilities(ch, instance).await.map(|_| ())),
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_names() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(
        repo.path(),
        &[
            "--enable-push",
            "--instance-name",
            "foo",
            "--instance-name",
            "a/b",
        ],
    );
    let ch = server.channel().await;
    for (i, instance) in ["", "foo", "a/b"].into_iter().enumerate() {
        for (rpc, code) in codes_for_instance(&ch, instance, 100 * i as u64).await {
            assert_eq!(code, Code::Ok, "{rpc} with instance {instance:?}");
        }
    }
    for instance in ["bar", "fo", "foo/", "a", "FOO"] {
        for (rpc, code) in codes_for_instance(&ch, instance, 1000).await {
            // casd's Capabilities answers whatever the instance, so the client learns
            // the limits before its first real call is refused.
            let want = if rpc == "GetCapabilities" {
                Code::Ok
            } else {
                Code::InvalidArgument
            };
            assert_eq!(code, want, "{rpc} with instance {instance:?}");
        }
    }
    // What one instance name stored, every other name sees: they share one store.
    let blob = pseudo_random(100, 300);
    let r = read(&ch, &read_name("a/b", &digest(&blob)), 0, 0)
        .await
        .unwrap();
    assert_eq!(r, blob);

    let repo2 = tempfile::tempdir().unwrap();
    let plain = Server::start(repo2.path(), &["--enable-push"]);
    let ch2 = plain.channel().await;
    for (rpc, code) in codes_for_instance(&ch2, "foo", 2000).await {
        let want = if rpc == "GetCapabilities" {
            Code::Ok
        } else {
            Code::InvalidArgument
        };
        assert_eq!(
            code, want,
            "{rpc} with instance \"foo\" on a server without it"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn everything_survives_sigkill_and_restart() {
    let repo = tempfile::tempdir().unwrap();
    let content = Content::new(200);
    let partial = pseudo_random(210, 3 << 20);
    let partial_name = upload_name("", &digest(&partial));
    {
        let mut first = Server::start(repo.path(), &["--enable-push"]);
        let ch = first.channel().await;
        content.push(&ch).await;
        // An upload cut off by the kill: its temporary file must not become a blob,
        // nor linger after the restart.
        let (tx, upload) = open_write(&ch);
        let first_chunk = write_requests(&partial_name, &partial, 1 << 20).remove(0);
        tx.send(first_chunk).await.unwrap();
        let deadline = Instant::now() + common::TIMEOUT;
        while qws(&ch, &partial_name).await.ok() != Some((1 << 20, false)) {
            assert!(Instant::now() < deadline, "the upload never got going");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(uploads_open(first.pid(), repo.path()), 1);
        let status = first.signal_and_wait(libc::SIGKILL);
        assert!(!status.success());
        drop(tx);
        assert!(bounded(upload).await.unwrap().is_err());
    }
    let second = Server::start(repo.path(), &["--enable-push"]);
    let ch = second.channel().await;
    content.check_served(&ch).await;
    assert_eq!(
        find_missing(&ch, &[digest(&partial)]).await.unwrap(),
        vec![digest(&partial)]
    );
    assert_eq!(tmp_entries(repo.path()), Vec::<std::path::PathBuf>::new());
    // And it keeps taking uploads.
    upload(&ch, &[&partial]).await;
    assert!(find_missing(&ch, &[digest(&partial)])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_zero_promptly() {
    let repo = tempfile::tempdir().unwrap();
    let mut server = Server::start(repo.path(), &["--enable-push"]);
    // A connected client that has made calls and keeps its connection open, as casd does.
    let ch = server.channel().await;
    upload(&ch, &[b"before the signal"]).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| server.signal_and_wait(libc::SIGTERM));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} to stop",
        started.elapsed()
    );
    drop(ch);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_does_not_wait_forever_for_a_stalled_upload() {
    let repo = tempfile::tempdir().unwrap();
    let mut server = Server::start(repo.path(), &["--enable-push"]);
    let ch = server.channel().await;
    let blob = pseudo_random(300, 2 << 20);
    let name = upload_name("", &digest(&blob));
    let (tx, upload) = open_write(&ch);
    tx.send(write_requests(&name, &blob, 1 << 20).remove(0))
        .await
        .unwrap();
    let deadline = Instant::now() + common::TIMEOUT;
    while qws(&ch, &name).await.ok() != Some((1 << 20, false)) {
        assert!(Instant::now() < deadline, "the upload never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client stalls: the server may give it a grace period, but not forever.
    let status = tokio::task::block_in_place(|| server.signal_and_wait(libc::SIGTERM));
    assert_eq!(status.code(), Some(0), "{status}");
    drop(tx);
    assert!(bounded(upload).await.unwrap().is_err());
    assert!(!blob_path(repo.path(), &sha256_hex(&blob)).exists());
}

fn send_raw(port: u16, bytes: &[u8]) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        panic!("cannot connect to the server");
    };
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The server may hang up at any point; all that matters is what happens next.
    let _ = s.write_all(bytes);
    let mut sink = [0u8; 4096];
    let _ = s.read(&mut sink);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_port_does_not_kill_the_server() {
    let repo = tempfile::tempdir().unwrap();
    let mut server = Server::start(repo.path(), &["--enable-push"]);
    let port = server.port;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let frames_of = |tail: &[u8]| [preface.as_slice(), tail].concat();
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tokio::task::block_in_place(|| {
        send_raw(port, &pseudo_random(1, 64 << 10));
        send_raw(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        send_raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        send_raw(port, &frames_of(&[0xff; 100]));
        // A frame header announcing 16 MiB of payload that never comes.
        send_raw(
            port,
            &frames_of(&[0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 1]),
        );
        // A proper empty SETTINGS frame, then a HEADERS frame whose HPACK block is
        // nonsense.
        let settings = [0, 0, 0, 0x04, 0, 0, 0, 0, 0];
        let headers = [0, 0, 4, 0x01, 0x05, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        send_raw(port, &frames_of(&[&settings[..], &headers[..]].concat()));
        send_raw(port, b"");
    });
    assert!(server.is_running(), "the server died");
    let ch = server.channel().await;
    assert!(capabilities(&ch, "").await.is_ok());
    let blob = pseudo_random(2, 5000);
    upload(&ch, &[&blob]).await;
    assert_eq!(
        read(&ch, &read_name("", &digest(&blob)), 0, 0)
            .await
            .unwrap(),
        blob
    );
    drop(silent);
    assert!(server.is_running());
}

fn run_cli(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = common::wait_bounded(&mut child, common::TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{args:?} did not exit");
    });
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn historical_command_line_without_subcommand() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start_historical(repo.path(), &["--enable-push"]);
    let ch = server.channel().await;
    assert!(capabilities(&ch, "").await.is_ok());
    let blob = pseudo_random(3, 100);
    upload(&ch, &[&blob]).await;
    push_blob(&ch, push_blob_req(&["urn:x"], &digest(&blob)))
        .await
        .unwrap();
    assert!(blob_path(repo.path(), &sha256_hex(&blob)).exists());
    // A second, pull-only instance on the same repository, as the old documentation
    // deployed it.
    let pull = Server::start_historical(repo.path(), &[]);
    let r = fetch_blob(&pull.channel().await, &["urn:x"], &[])
        .await
        .unwrap();
    assert_eq!(r.blob_digest, Some(digest(&blob)));
}

#[test]
fn command_line_errors_are_usage_errors() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path().to_str().unwrap();
    for args in [vec![r], vec!["serve", r], vec!["--enable-push", r]] {
        let (status, stderr) = run_cli(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--port"), "{args:?}: {stderr}");
    }
    for args in [
        vec!["--port", "0", "--no-such-option", r],
        vec!["serve", "--port", "0", "--bogus", r],
    ] {
        let (status, stderr) = run_cli(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--no-such-option") || stderr.contains("--bogus"),
            "{stderr}"
        );
    }
    let (status, stderr) = run_cli(&["--port", "not-a-number", r]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    // Without a repository there is nothing to serve.
    let (status, stderr) = run_cli(&["--port", "0"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(is_empty_dir(repo.path()));
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

/// An instance name that resource names cannot carry (a REAPI keyword as a segment, an
/// empty segment) would pass start-up and then fail every ByteStream call: it is a
/// usage error instead, before anything is created.
#[test]
fn instance_names_resource_names_cannot_carry_are_refused_at_start() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path().join("repo");
    let r = r.to_str().unwrap();
    for name in [
        "blobs",
        "uploads",
        "compressed-blobs",
        "actionResults",
        "ci/blobs",
        "uploads/main",
        "/ci",
        "ci/",
        "a//b",
    ] {
        for args in [
            vec!["serve", "--port", "0", "--instance-name", name, r],
            vec![
                "--port",
                "0",
                "--instance-name",
                "ok",
                "--instance-name",
                name,
                r,
            ],
        ] {
            let (status, stderr) = run_cli(&args);
            assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains("--instance-name"), "{args:?}: {stderr}");
            assert!(
                stderr.contains("reserve") || stderr.contains("'/'"),
                "{args:?}: {stderr}"
            );
        }
    }
    assert!(!repo.path().join("repo").exists());
}

//! Remote Asset Fetch and Push against the real binary: the lookup rules buildbox-casd
//! showed (first URI wins, exact qualifier sets, separate blob and directory namespaces,
//! last push wins, expiry), reference checks against the CAS, and casd's on-disk keys.
mod common;

use bazel_remote_apis::build::bazel::remote::asset::v1 as ra;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::protobuf::{Any, Timestamp};
use common::asset::*;
use common::grpc::*;
use common::Server;
use prost::Message;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;
use tonic::Code;

fn push_server() -> (tempfile::TempDir, Server) {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &["--enable-push"]);
    (repo, server)
}

/// Stores small blobs and returns their digests.
async fn stored(ch: &Channel, seeds: &[u64]) -> Vec<reapi::Digest> {
    let blobs: Vec<Vec<u8>> = seeds.iter().map(|s| pseudo_random(*s, 100)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    upload(ch, &refs).await;
    blobs.iter().map(|b| digest(b)).collect()
}

fn asset_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(shards) = std::fs::read_dir(repo.join("assets/objects")) {
        for shard in shards.flatten() {
            if let Ok(rd) = std::fs::read_dir(shard.path()) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_uris_are_invalid_argument() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[1]).await.remove(0);
    // BuildStream probes every remote with exactly these requests and accepts nothing
    // but INVALID_ARGUMENT as proof that the service exists.
    assert_code(fetch_blob(&ch, &[], &[]).await, Code::InvalidArgument);
    assert_code(fetch_dir(&ch, &[], &[]).await, Code::InvalidArgument);
    assert_code(
        push_blob(&ch, push_blob_req(&[], &d)).await,
        Code::InvalidArgument,
    );
    assert_code(
        push_dir(&ch, push_dir_req(&[], &d)).await,
        Code::InvalidArgument,
    );
    let r = push_blob(&ch, ra::PushBlobRequest::default()).await;
    assert_code(r, Code::InvalidArgument);
    // An empty string among the URIs is no better.
    assert_code(
        fetch_blob(&ch, &["urn:a", ""], &[]).await,
        Code::InvalidArgument,
    );
    let r = push_blob(&ch, push_blob_req(&["", "urn:a"], &d)).await;
    assert_code(r, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_assets_are_grpc_not_found() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    assert_code(fetch_blob(&ch, &["urn:nothing"], &[]).await, Code::NotFound);
    assert_code(fetch_dir(&ch, &["urn:nothing"], &[]).await, Code::NotFound);
    assert_code(
        fetch_blob(&ch, &["urn:a", "urn:b", "urn:c"], &[("k", "v")]).await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn first_resolving_uri_wins() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[10, 11]).await;
    push_blob(&ch, push_blob_req(&["urn:known"], &d[0]))
        .await
        .unwrap();
    push_blob(&ch, push_blob_req(&["urn:later"], &d[1]))
        .await
        .unwrap();

    let r = fetch_blob(&ch, &["urn:unknown", "urn:known"], &[])
        .await
        .unwrap();
    assert_eq!(r.uri, "urn:known");
    assert_eq!(r.blob_digest.as_ref(), Some(&d[0]));
    assert!(r.qualifiers.is_empty());
    assert!(r.expires_at.is_none());
    // An inline status would be read as a failure by some clients; OK means OK.
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0));

    let r = fetch_blob(&ch, &["urn:unknown", "urn:later", "urn:known"], &[]).await;
    let r = r.unwrap();
    assert_eq!(
        (r.uri.as_str(), r.blob_digest.as_ref()),
        ("urn:later", Some(&d[1]))
    );
    let r = fetch_blob(&ch, &["urn:known", "urn:later"], &[])
        .await
        .unwrap();
    assert_eq!(
        (r.uri.as_str(), r.blob_digest.as_ref()),
        ("urn:known", Some(&d[0]))
    );

    // The same for directories.
    let dir = encode(&reapi::Directory {
        files: vec![file_node("f", &d[0])],
        ..Default::default()
    });
    upload(&ch, &[&dir]).await;
    push_dir(&ch, push_dir_req(&["urn:dir"], &digest(&dir)))
        .await
        .unwrap();
    let r = fetch_dir(&ch, &["urn:unknown", "urn:dir"], &[])
        .await
        .unwrap();
    assert_eq!(r.uri, "urn:dir");
    assert_eq!(r.root_directory_digest, Some(digest(&dir)));
}

#[tokio::test(flavor = "multi_thread")]
async fn qualifiers_must_match_as_a_set() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[20, 21]).await;
    let mut req = push_blob_req(&["urn:q"], &d[0]);
    req.qualifiers = quals(&[("b", "2"), ("a", "1")]);
    push_blob(&ch, req).await.unwrap();

    for order in [[("a", "1"), ("b", "2")], [("b", "2"), ("a", "1")]] {
        let r = fetch_blob(&ch, &["urn:q"], &order).await.unwrap();
        assert_eq!(r.blob_digest.as_ref(), Some(&d[0]));
        // Echoed in canonical order whatever order they were pushed or asked in.
        assert_eq!(r.qualifiers, quals(&[("a", "1"), ("b", "2")]));
    }
    for miss in [
        &[][..],
        &[("a", "1")][..],
        &[("a", "1"), ("b", "3")][..],
        &[("a", "1"), ("b", "2"), ("c", "3")][..],
        &[("A", "1"), ("b", "2")][..],
    ] {
        assert_code(fetch_blob(&ch, &["urn:q"], miss).await, Code::NotFound);
    }

    // Pushed without qualifiers: only a fetch without qualifiers finds it.
    push_blob(&ch, push_blob_req(&["urn:plain"], &d[1]))
        .await
        .unwrap();
    assert_code(
        fetch_blob(&ch, &["urn:plain"], &[("a", "b")]).await,
        Code::NotFound,
    );
    let r = fetch_blob(&ch, &["urn:plain"], &[]).await.unwrap();
    assert_eq!(r.blob_digest.as_ref(), Some(&d[1]));
    assert!(r.qualifiers.is_empty());

    // A qualifier with an empty value is still a qualifier.
    let mut req = push_blob_req(&["urn:empty-value"], &d[1]);
    req.qualifiers = quals(&[("resource_type", "")]);
    push_blob(&ch, req).await.unwrap();
    assert_code(
        fetch_blob(&ch, &["urn:empty-value"], &[]).await,
        Code::NotFound,
    );
    let r = fetch_blob(&ch, &["urn:empty-value"], &[("resource_type", "")]).await;
    assert_eq!(r.unwrap().qualifiers, quals(&[("resource_type", "")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_qualifier_names_are_invalid_argument() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[30]).await.remove(0);
    for dup in [[("a", "1"), ("a", "2")], [("a", "1"), ("a", "1")]] {
        assert_code(
            fetch_blob(&ch, &["urn:d"], &dup).await,
            Code::InvalidArgument,
        );
        assert_code(
            fetch_dir(&ch, &["urn:d"], &dup).await,
            Code::InvalidArgument,
        );
        let mut req = push_blob_req(&["urn:d"], &d);
        req.qualifiers = quals(&dup);
        assert_code(push_blob(&ch, req).await, Code::InvalidArgument);
        let mut req = push_dir_req(&["urn:d"], &d);
        req.qualifiers = quals(&dup);
        assert_code(push_dir(&ch, req).await, Code::InvalidArgument);
    }
    assert_code(
        fetch_blob(&ch, &["urn:d"], &[("a", "1")]).await,
        Code::NotFound,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_and_directory_namespaces_are_separate() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[40]).await.remove(0);
    let dir = encode(&reapi::Directory {
        files: vec![file_node("f", &d)],
        ..Default::default()
    });
    upload(&ch, &[&dir]).await;
    let dir = digest(&dir);

    push_blob(&ch, push_blob_req(&["urn:blob-only"], &d))
        .await
        .unwrap();
    assert_code(
        fetch_dir(&ch, &["urn:blob-only"], &[]).await,
        Code::NotFound,
    );
    push_dir(&ch, push_dir_req(&["urn:dir-only"], &dir))
        .await
        .unwrap();
    assert_code(
        fetch_blob(&ch, &["urn:dir-only"], &[]).await,
        Code::NotFound,
    );

    // One URI may name a blob and a directory at once, independently.
    push_blob(&ch, push_blob_req(&["urn:both"], &d))
        .await
        .unwrap();
    push_dir(&ch, push_dir_req(&["urn:both"], &dir))
        .await
        .unwrap();
    let b = fetch_blob(&ch, &["urn:both"], &[]).await.unwrap();
    let t = fetch_dir(&ch, &["urn:both"], &[]).await.unwrap();
    assert_eq!(b.blob_digest, Some(d));
    assert_eq!(t.root_directory_digest, Some(dir));
}

#[tokio::test(flavor = "multi_thread")]
async fn last_push_wins_and_each_uri_is_its_own_entry() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[50, 51, 52]).await;
    push_blob(&ch, push_blob_req(&["urn:one", "urn:two"], &d[0]))
        .await
        .unwrap();
    assert_eq!(asset_files(repo.path()).len(), 2);
    for u in ["urn:one", "urn:two"] {
        let r = fetch_blob(&ch, &[u], &[]).await.unwrap();
        assert_eq!((r.uri.as_str(), r.blob_digest.as_ref()), (u, Some(&d[0])));
    }
    push_blob(&ch, push_blob_req(&["urn:one"], &d[1]))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &["urn:one"], &[]).await.unwrap();
    assert_eq!(r.blob_digest.as_ref(), Some(&d[1]));
    let r = fetch_blob(&ch, &["urn:two"], &[]).await.unwrap();
    assert_eq!(r.blob_digest.as_ref(), Some(&d[0]));
    push_blob(&ch, push_blob_req(&["urn:two"], &d[2]))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &["urn:two"], &[]).await.unwrap();
    assert_eq!(r.blob_digest.as_ref(), Some(&d[2]));
    // Overwrites replace entries rather than adding files.
    assert_eq!(asset_files(repo.path()).len(), 2);
    assert!(std::fs::read_dir(repo.path().join("assets/tmp"))
        .map(|rd| rd.count() == 0)
        .unwrap_or(true));
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn expire_at_is_honoured() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[60, 61]).await;
    let past = Timestamp {
        seconds: now_secs() - 3600,
        nanos: 0,
    };
    let future = Timestamp {
        seconds: now_secs() + 3600,
        nanos: 123_000_000,
    };
    let mut req = push_blob_req(&["urn:expired"], &d[0]);
    req.expire_at = Some(past);
    push_blob(&ch, req).await.unwrap();
    assert_code(fetch_blob(&ch, &["urn:expired"], &[]).await, Code::NotFound);

    let mut req = push_blob_req(&["urn:fresh"], &d[1]);
    req.expire_at = Some(future);
    push_blob(&ch, req).await.unwrap();
    let r = fetch_blob(&ch, &["urn:fresh"], &[]).await.unwrap();
    assert_eq!(r.expires_at, Some(future));
    // An expired entry does not stop the next URI from answering.
    let r = fetch_blob(&ch, &["urn:expired", "urn:fresh"], &[])
        .await
        .unwrap();
    assert_eq!(r.uri, "urn:fresh");

    let dir = encode(&reapi::Directory {
        files: vec![file_node("f", &d[0])],
        ..Default::default()
    });
    upload(&ch, &[&dir]).await;
    let mut req = push_dir_req(&["urn:dir-expired"], &digest(&dir));
    req.expire_at = Some(past);
    push_dir(&ch, req).await.unwrap();
    assert_code(
        fetch_dir(&ch, &["urn:dir-expired"], &[]).await,
        Code::NotFound,
    );
    let mut req = push_dir_req(&["urn:dir-fresh"], &digest(&dir));
    req.expire_at = Some(future);
    push_dir(&ch, req).await.unwrap();
    let r = fetch_dir(&ch, &["urn:dir-fresh"], &[]).await.unwrap();
    assert_eq!(r.expires_at, Some(future));

    // A new push without expiry revives the URI.
    push_blob(&ch, push_blob_req(&["urn:expired"], &d[0]))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &["urn:expired"], &[]).await.unwrap();
    assert!(r.expires_at.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_with_bad_digests_are_invalid_argument() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[70]).await.remove(0);
    let mut req = push_blob_req(&["urn:x"], &d);
    req.blob_digest = None;
    assert_code(push_blob(&ch, req).await, Code::InvalidArgument);
    let mut req = push_dir_req(&["urn:x"], &d);
    req.root_directory_digest = None;
    assert_code(push_dir(&ch, req).await, Code::InvalidArgument);
    let bad = reapi::Digest {
        hash: "not-a-hash".into(),
        size_bytes: 1,
    };
    assert_code(
        push_blob(&ch, push_blob_req(&["urn:x"], &bad)).await,
        Code::InvalidArgument,
    );
    let mut req = push_blob_req(&["urn:x"], &d);
    req.references_blobs = vec![bad.clone()];
    assert_code(push_blob(&ch, req).await, Code::InvalidArgument);
    let mut req = push_blob_req(&["urn:x"], &d);
    req.references_directories = vec![reapi::Digest {
        size_bytes: -1,
        ..d.clone()
    }];
    assert_code(push_blob(&ch, req).await, Code::InvalidArgument);
    let mut req = push_blob_req(&["urn:x"], &d);
    req.digest_function = reapi::digest_function::Value::Sha1 as i32;
    assert_code(push_blob(&ch, req).await, Code::InvalidArgument);
    let r = fetch_blob_req(
        &ch,
        ra::FetchBlobRequest {
            uris: uris(&["urn:x"]),
            digest_function: reapi::digest_function::Value::Md5 as i32,
            ..Default::default()
        },
    )
    .await;
    assert_code(r, Code::InvalidArgument);
    assert!(asset_files(repo.path()).is_empty());
}

/// root/{f1, sub/{f2}}: the encoded bytes of each piece.
struct Tree {
    f1: Vec<u8>,
    f2: Vec<u8>,
    sub: Vec<u8>,
    root: Vec<u8>,
}

fn tree(seed: u64) -> Tree {
    let f1 = pseudo_random(seed, 500);
    let f2 = pseudo_random(seed + 1, 600);
    let sub = encode(&reapi::Directory {
        files: vec![file_node("f2", &digest(&f2))],
        ..Default::default()
    });
    let root = encode(&reapi::Directory {
        files: vec![file_node("f1", &digest(&f1))],
        directories: vec![dir_node("sub", &digest(&sub))],
        ..Default::default()
    });
    Tree { f1, f2, sub, root }
}

/// An asset whose own blob (or root directory) was uploaded here must have all of its
/// closure here: anything missing is an incomplete upload (ADR 0007).
#[tokio::test(flavor = "multi_thread")]
async fn pushes_of_content_stored_here_but_incomplete_are_failed_precondition() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let t = tree(80);
    let artifact = pseudo_random(90, 300);
    let meta = pseudo_random(91, 30);
    let (root, art, meta_d) = (digest(&t.root), digest(&artifact), digest(&meta));

    let blob_push = || {
        let mut r = push_blob_req(&["urn:artifact"], &art);
        r.references_blobs = vec![meta_d.clone()];
        r.references_directories = vec![root.clone()];
        r
    };
    // Until the very end the directory tree is incomplete too, so both pushes fail.
    let check_refused = || {
        let ch = ch.clone();
        let (blob_req, dir_req) = (blob_push(), push_dir_req(&["urn:source"], &root));
        async move {
            let s = assert_code(push_blob(&ch, blob_req).await, Code::FailedPrecondition);
            assert!(s.message().contains("is not stored"), "{}", s.message());
            assert_code(push_dir(&ch, dir_req).await, Code::FailedPrecondition);
            assert_code(
                fetch_blob(&ch, &["urn:artifact"], &[]).await,
                Code::NotFound,
            );
            assert_code(fetch_dir(&ch, &["urn:source"], &[]).await, Code::NotFound);
        }
    };
    // The artifact blob and the tree's root, but nothing they reference.
    upload(&ch, &[&artifact, &t.root]).await;
    check_refused().await;
    // The referenced blob, and a file of the root.
    upload(&ch, &[&meta, &t.f1]).await;
    check_refused().await;
    // The whole directory structure, but one file in a subdirectory is missing.
    upload(&ch, &[&t.sub]).await;
    check_refused().await;
    assert!(asset_files(repo.path()).is_empty());
    upload(&ch, &[&t.f2]).await;
    push_blob(&ch, blob_push()).await.unwrap();
    push_dir(&ch, push_dir_req(&["urn:source"], &root))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();
    assert_eq!(r.blob_digest, Some(art.clone()));

    // Only the referenced blob missing.
    let other = digest(b"referenced but never uploaded");
    let mut r = push_blob_req(&["urn:artifact2"], &art);
    r.references_blobs = vec![meta_d.clone(), other.clone()];
    assert_code(push_blob(&ch, r).await, Code::FailedPrecondition);
    // A referenced directory that is not a Directory at all.
    let mut r = push_blob_req(&["urn:artifact2"], &art);
    r.references_directories = vec![meta_d.clone()];
    assert!(push_blob(&ch, r).await.is_err());
    // A directory asset whose references are incomplete.
    let mut r = push_dir_req(&["urn:source2"], &root);
    r.references_blobs = vec![other];
    assert_code(push_dir(&ch, r).await, Code::FailedPrecondition);
    assert_code(fetch_dir(&ch, &["urn:source2"], &[]).await, Code::NotFound);
}

/// A push none of whose content is here is the index of a split set-up (BuildStream's
/// `type: index` remote): recorded and served unchecked, kept by `gc`; refused with
/// `--require-asset-content` (ADR 0007).
#[tokio::test(flavor = "multi_thread")]
async fn pushes_of_content_stored_elsewhere_are_index_entries() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let t = tree(85);
    let artifact = pseudo_random(95, 300);
    let (root, art) = (digest(&t.root), digest(&artifact));
    let blob_push = |uri: &str| {
        let mut r = push_blob_req(&[uri], &art);
        r.references_directories = vec![root.clone()];
        r
    };
    push_blob(&ch, blob_push("urn:artifact")).await.unwrap();
    push_dir(&ch, push_dir_req(&["urn:source"], &root))
        .await
        .unwrap();
    let r = fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();
    assert_eq!(r.blob_digest, Some(art.clone()));
    let r = fetch_dir(&ch, &["urn:source"], &[]).await.unwrap();
    assert_eq!(r.root_directory_digest, Some(root.clone()));
    // Nothing was stored in the CAS on the way.
    let both = [art.clone(), root.clone()];
    assert_eq!(find_missing(&ch, &both).await.unwrap(), both);

    // `gc` cannot judge content stored elsewhere, so it keeps the entries.
    drop(server);
    let gc = std::process::Command::new(common::BIN)
        .arg("gc")
        .arg(repo.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&gc.stdout);
    assert!(
        gc.status.success() && out.contains("removed 0 dangling"),
        "{out}"
    );
    assert_eq!(asset_files(repo.path()).len(), 2);
    let server = Server::start(repo.path(), &["--enable-push"]);
    let ch = server.channel().await;
    fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();

    // Pushed again with its content here, the entry is checked like any other.
    upload(&ch, &[&t.f1, &t.f2, &t.sub, &t.root, &artifact]).await;
    push_blob(&ch, blob_push("urn:artifact")).await.unwrap();
    std::fs::remove_file(blob_path(repo.path(), &sha256_hex(&t.f2))).unwrap();
    assert_code(
        fetch_blob(&ch, &["urn:artifact"], &[]).await,
        Code::NotFound,
    );
    drop(server);

    // A server that must never be such an index refuses them.
    let strict = tempfile::tempdir().unwrap();
    let server = Server::start(strict.path(), &["--enable-push", "--require-asset-content"]);
    let ch = server.channel().await;
    let s = assert_code(
        push_blob(&ch, blob_push("urn:artifact")).await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains(&art.hash), "{}", s.message());
    assert_code(
        push_dir(&ch, push_dir_req(&["urn:source"], &root)).await,
        Code::FailedPrecondition,
    );
    assert_code(
        fetch_blob(&ch, &["urn:artifact"], &[]).await,
        Code::NotFound,
    );
    assert!(asset_files(strict.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_is_not_found_once_referenced_content_is_gone() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let t = tree(100);
    let artifact = pseudo_random(110, 300);
    let meta = pseudo_random(111, 30);
    upload(&ch, &[&t.f1, &t.f2, &t.sub, &t.root, &artifact, &meta]).await;
    let mut req = push_blob_req(&["urn:artifact"], &digest(&artifact));
    req.references_blobs = vec![digest(&meta)];
    req.references_directories = vec![digest(&t.root)];
    push_blob(&ch, req).await.unwrap();
    push_dir(&ch, push_dir_req(&["urn:source"], &digest(&t.root)))
        .await
        .unwrap();
    fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();
    fetch_dir(&ch, &["urn:source"], &[]).await.unwrap();

    // Each piece of the closure in turn: take it away, expect NOT_FOUND (never another
    // code, which BuildStream would report as an error), put it back, expect a hit.
    for (what, data) in [
        ("deep file", &t.f2),
        ("subdirectory", &t.sub),
        ("root directory", &t.root),
        ("referenced blob", &meta),
        ("artifact blob", &artifact),
    ] {
        let path = blob_path(repo.path(), &sha256_hex(data));
        std::fs::remove_file(&path).unwrap();
        let r = fetch_blob(&ch, &["urn:artifact"], &[]).await;
        assert_eq!(
            r.map_err(|s| s.code()).err(),
            Some(Code::NotFound),
            "{what}"
        );
        let in_tree = !matches!(what, "referenced blob" | "artifact blob");
        if in_tree {
            assert_code(fetch_dir(&ch, &["urn:source"], &[]).await, Code::NotFound);
        } else {
            fetch_dir(&ch, &["urn:source"], &[]).await.unwrap();
        }
        upload(&ch, &[data]).await;
        let r = fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();
        assert_eq!(r.blob_digest, Some(digest(&artifact)), "{what}");
        fetch_dir(&ch, &["urn:source"], &[]).await.unwrap();
    }
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn length_delimited(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// buildbox-casd's asset key, written out from the wire format rather than through
/// prost so that it checks the server's encoding instead of repeating it: the SHA-256
/// of `Any{1: type_url, 2: Fetch<kind>Request{4: uri, 5: Qualifier{1: name, 2: value}
/// for each qualifier in sorted order}}`, with empty fields left out as proto3 does.
fn casd_key(kind: &str, uri: &str, qualifiers: &[(&str, &str)]) -> String {
    let mut q = qualifiers.to_vec();
    q.sort();
    let mut request = Vec::new();
    length_delimited(4, uri.as_bytes(), &mut request);
    for (name, value) in q {
        let mut qualifier = Vec::new();
        if !name.is_empty() {
            length_delimited(1, name.as_bytes(), &mut qualifier);
        }
        if !value.is_empty() {
            length_delimited(2, value.as_bytes(), &mut qualifier);
        }
        length_delimited(5, &qualifier, &mut request);
    }
    let type_url = format!("type.googleapis.com/build.bazel.remote.asset.v1.Fetch{kind}Request");
    let mut any = Vec::new();
    length_delimited(1, type_url.as_bytes(), &mut any);
    length_delimited(2, &request, &mut any);
    sha256_hex(&any)
}

fn asset_path(repo: &Path, key: &str) -> PathBuf {
    repo.join("assets/objects").join(&key[..2]).join(&key[2..])
}

#[tokio::test(flavor = "multi_thread")]
async fn asset_entries_use_casd_keys_and_format() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[120]).await.remove(0);
    let dir = encode(&reapi::Directory {
        files: vec![file_node("f", &d)],
        ..Default::default()
    });
    upload(&ch, &[&dir]).await;
    let dir = digest(&dir);

    // A URI long enough that its length takes two varint bytes.
    let artifact = format!(
        "urn:fdc:buildstream.build:2020:artifact:test/big/{}{}",
        "a".repeat(64),
        "/x".repeat(20)
    );
    assert!(artifact.len() > 127);
    push_blob(&ch, push_blob_req(&[&artifact], &d))
        .await
        .unwrap();
    let mut req = push_blob_req(&["urn:qualified"], &d);
    req.qualifiers = quals(&[
        ("vcs.commit", "abc"),
        ("resource_type", "application/x-tar"),
    ]);
    push_blob(&ch, req).await.unwrap();
    let source = "urn:fdc:buildstream.build:2020:source:tar/6ac745";
    push_dir(&ch, push_dir_req(&[source], &dir)).await.unwrap();

    let expected = [
        (
            casd_key("Blob", &artifact, &[]),
            "FetchBlobResponse",
            artifact.as_str(),
        ),
        (
            casd_key(
                "Blob",
                "urn:qualified",
                &[
                    ("resource_type", "application/x-tar"),
                    ("vcs.commit", "abc"),
                ],
            ),
            "FetchBlobResponse",
            "urn:qualified",
        ),
        (
            casd_key("Directory", source, &[]),
            "FetchDirectoryResponse",
            source,
        ),
    ];
    let mut paths: Vec<PathBuf> = expected
        .iter()
        .map(|(k, _, _)| asset_path(repo.path(), k))
        .collect();
    paths.sort();
    assert_eq!(asset_files(repo.path()), paths);

    for (key, type_name, uri) in &expected {
        let path = asset_path(repo.path(), key);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        // casd reads the entry as a plain Any holding the Fetch response.
        let any = Any::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        assert_eq!(
            any.type_url,
            format!("type.googleapis.com/build.bazel.remote.asset.v1.{type_name}")
        );
        if *type_name == "FetchBlobResponse" {
            let r = ra::FetchBlobResponse::decode(any.value.as_slice()).unwrap();
            assert_eq!(r.uri, *uri);
            assert_eq!(r.blob_digest, Some(d.clone()));
        } else {
            let r = ra::FetchDirectoryResponse::decode(any.value.as_slice()).unwrap();
            assert_eq!(r.uri, *uri);
            assert_eq!(r.root_directory_digest, Some(dir.clone()));
        }
    }
    let r = ra::FetchBlobResponse::decode(
        Any::decode(
            std::fs::read(asset_path(repo.path(), &expected[1].0))
                .unwrap()
                .as_slice(),
        )
        .unwrap()
        .value
        .as_slice(),
    )
    .unwrap();
    assert_eq!(
        r.qualifiers,
        quals(&[
            ("resource_type", "application/x-tar"),
            ("vcs.commit", "abc")
        ])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_written_by_casd_are_served() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let d = stored(&ch, &[130]).await.remove(0);
    // An entry as casd writes it: a plain Any, none of our extra fields.
    let uri = "urn:fdc:buildstream.build:2020:artifact:proj/elem/0123";
    let response = ra::FetchBlobResponse {
        uri: uri.into(),
        blob_digest: Some(d.clone()),
        ..Default::default()
    };
    let any = Any {
        type_url: "type.googleapis.com/build.bazel.remote.asset.v1.FetchBlobResponse".into(),
        value: response.encode_to_vec(),
    };
    let path = asset_path(repo.path(), &casd_key("Blob", uri, &[]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, any.encode_to_vec()).unwrap();
    let r = fetch_blob(&ch, &[uri], &[]).await.unwrap();
    assert_eq!(r.uri, uri);
    assert_eq!(r.blob_digest, Some(d));
    // A damaged entry is a miss, not an error.
    std::fs::write(&path, b"\xff\xff\xff not a protobuf").unwrap();
    assert_code(fetch_blob(&ch, &[uri], &[]).await, Code::NotFound);
    std::fs::write(&path, b"").unwrap();
    assert_code(fetch_blob(&ch, &[uri], &[]).await, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_trees_behind_an_entry_are_not_found() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    // casd pushes without checking anything, so a repository it wrote can hold entries
    // whose "directory" is some other blob. BuildStream must see a miss, not an error.
    let not_a_dir = b"\xff\xff\xff\xff certainly not a Directory message".to_vec();
    upload(&ch, &[&not_a_dir]).await;
    let d = digest(&not_a_dir);
    let uri = "urn:fdc:buildstream.build:2020:source:tar/broken";
    let response = ra::FetchDirectoryResponse {
        uri: uri.into(),
        root_directory_digest: Some(d.clone()),
        ..Default::default()
    };
    let any = Any {
        type_url: "type.googleapis.com/build.bazel.remote.asset.v1.FetchDirectoryResponse".into(),
        value: response.encode_to_vec(),
    };
    let path = asset_path(repo.path(), &casd_key("Directory", uri, &[]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, any.encode_to_vec()).unwrap();
    assert_code(fetch_dir(&ch, &[uri], &[]).await, Code::NotFound);

    // The same for a directory naming a child by an invalid digest.
    let bad_child = encode(&reapi::Directory {
        files: vec![file_node(
            "f",
            &reapi::Digest {
                hash: "zz".into(),
                size_bytes: 1,
            },
        )],
        ..Default::default()
    });
    upload(&ch, &[&bad_child]).await;
    let uri2 = "urn:fdc:buildstream.build:2020:source:tar/bad-child";
    let any = Any {
        type_url: "type.googleapis.com/build.bazel.remote.asset.v1.FetchDirectoryResponse".into(),
        value: ra::FetchDirectoryResponse {
            uri: uri2.into(),
            root_directory_digest: Some(digest(&bad_child)),
            ..Default::default()
        }
        .encode_to_vec(),
    };
    let path = asset_path(repo.path(), &casd_key("Directory", uri2, &[]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, any.encode_to_vec()).unwrap();
    assert_code(fetch_dir(&ch, &[uri2], &[]).await, Code::NotFound);
    // A good entry after a broken one still answers.
    let good = encode(&reapi::Directory::default());
    upload(&ch, &[&good]).await;
    push_dir(&ch, push_dir_req(&["urn:good"], &digest(&good)))
        .await
        .unwrap();
    let r = fetch_dir(&ch, &[uri, uri2, "urn:good"], &[]).await.unwrap();
    assert_eq!(r.uri, "urn:good");
}

fn age_of(path: &Path) -> std::time::Duration {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    std::time::SystemTime::now()
        .duration_since(mtime)
        .unwrap_or_default()
}

fn make_old(path: &Path) {
    let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    std::fs::File::open(path)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_refreshes_the_entry_and_its_closure() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let t = tree(140);
    let artifact = pseudo_random(150, 300);
    let meta = pseudo_random(151, 30);
    upload(&ch, &[&t.f1, &t.f2, &t.sub, &t.root, &artifact, &meta]).await;
    let mut req = push_blob_req(&["urn:artifact"], &digest(&artifact));
    req.references_blobs = vec![digest(&meta)];
    req.references_directories = vec![digest(&t.root)];
    push_blob(&ch, req).await.unwrap();
    let entry = asset_path(repo.path(), &casd_key("Blob", "urn:artifact", &[]));
    let closure: Vec<PathBuf> = [&t.f1, &t.f2, &t.sub, &t.root, &artifact, &meta]
        .iter()
        .map(|b| blob_path(repo.path(), &sha256_hex(b)))
        .collect();
    make_old(&entry);
    for p in &closure {
        make_old(p);
    }
    // A pulled artifact must outlive ones nobody asked for (BuildStream's
    // test_recently_pulled_artifact_does_not_expire), so the hit refreshes it all.
    fetch_blob(&ch, &["urn:artifact"], &[]).await.unwrap();
    let recent = std::time::Duration::from_secs(60);
    assert!(age_of(&entry) < recent, "asset entry");
    for p in &closure {
        assert!(age_of(p) < recent, "{}", p.display());
    }
}

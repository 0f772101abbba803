//! REAPI Capabilities and ContentAddressableStorage against the real binary: success
//! and error cases of every RPC BuildStream (through buildbox-casd) relies on, plus the
//! casd on-disk layout the server has to keep.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use common::grpc::*;
use common::Server;
use prost::Message;
use reapi::capabilities_client::CapabilitiesClient;
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use tonic::transport::Channel;
use tonic::Code;

fn push_server() -> (tempfile::TempDir, Server) {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &["--enable-push"]);
    (repo, server)
}

async fn max_batch(ch: &Channel) -> i64 {
    bounded(
        CapabilitiesClient::new(ch.clone())
            .get_capabilities(reapi::GetCapabilitiesRequest::default()),
    )
    .await
    .unwrap()
    .into_inner()
    .cache_capabilities
    .unwrap()
    .max_batch_total_size_bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_values_for_any_instance() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let mut client = CapabilitiesClient::new(ch);
    // casd asks with whatever instance name bst is configured for, before anything
    // else; refusing here would hide the real configuration error behind a vague one.
    for instance in ["", "foo", "some/nested/name"] {
        let caps = bounded(client.get_capabilities(reapi::GetCapabilitiesRequest {
            instance_name: instance.into(),
        }))
        .await
        .unwrap()
        .into_inner();
        let cache = caps.cache_capabilities.expect("cache capabilities");
        assert_eq!(
            cache.digest_functions,
            vec![reapi::digest_function::Value::Sha256 as i32]
        );
        assert!(cache.supported_compressors.is_empty(), "{instance}");
        assert!(cache.supported_batch_update_compressors.is_empty());
        assert!(
            !cache
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled
        );
        assert!(cache.max_batch_total_size_bytes >= 1 << 20);
        // Room for casd's batches within a 4 MiB gRPC message.
        assert!(cache.max_batch_total_size_bytes <= 4 << 20);
        assert_eq!(
            cache.symlink_absolute_path_strategy,
            reapi::symlink_absolute_path_strategy::Value::Allowed as i32
        );
        assert!(caps.execution_capabilities.is_none());
        let low = caps.low_api_version.unwrap();
        let high = caps.high_api_version.unwrap();
        assert_eq!((low.major, low.minor), (2, 0));
        assert_eq!(high.major, 2);
        assert!(caps.deprecated_api_version.is_some());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn find_missing_blobs_reports_the_missing_subset() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let (a, b) = (pseudo_random(1, 100), pseudo_random(2, 3000));
    upload(&ch, &[&a, &b]).await;
    let c = digest(b"never uploaded");
    let d = digest(&pseudo_random(3, 10));
    let empty = digest(b"");
    assert_eq!(empty.hash, EMPTY_SHA256);
    let missing = find_missing(
        &ch,
        &[digest(&a), c.clone(), digest(&b), empty.clone(), d.clone()],
    )
    .await
    .unwrap();
    assert_eq!(missing, vec![c.clone(), d]);
    // The empty blob is present on a brand-new server without ever being uploaded.
    assert!(find_missing(&ch, &[empty]).await.unwrap().is_empty());
    assert!(find_missing(&ch, &[]).await.unwrap().is_empty());
    // A present hash with the wrong size is a different blob.
    let wrong_size = reapi::Digest {
        size_bytes: 101,
        ..digest(&a)
    };
    let missing = find_missing(&ch, std::slice::from_ref(&wrong_size)).await;
    assert_eq!(missing.unwrap(), vec![wrong_size]);
}

#[tokio::test(flavor = "multi_thread")]
async fn find_missing_blobs_rejects_bad_requests() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let good = digest(b"x");
    for bad in [
        reapi::Digest {
            hash: "abc".into(),
            size_bytes: 1,
        },
        reapi::Digest {
            hash: good.hash.to_uppercase(),
            size_bytes: 1,
        },
        reapi::Digest {
            hash: good.hash.clone(),
            size_bytes: -1,
        },
        reapi::Digest {
            hash: format!("../../{}", &good.hash[6..]),
            size_bytes: 1,
        },
    ] {
        let r = find_missing(&ch, &[good.clone(), bad.clone()]).await;
        assert_code(r, Code::InvalidArgument);
    }
    let mut client = cas(&ch);
    let req = |instance: &str, f: reapi::digest_function::Value| reapi::FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: vec![good.clone()],
        digest_function: f as i32,
    };
    use reapi::digest_function::Value;
    let r = bounded(client.find_missing_blobs(req("unknown-instance", Value::Unknown))).await;
    assert_code(r, Code::InvalidArgument);
    for f in [Value::Sha1, Value::Md5, Value::Sha512, Value::Blake3] {
        let r = bounded(client.find_missing_blobs(req("", f))).await;
        assert_code(r, Code::InvalidArgument);
    }
    // Naming SHA-256 explicitly is the same as leaving it to the server.
    let r = bounded(client.find_missing_blobs(req("", Value::Sha256))).await;
    assert_eq!(r.unwrap().into_inner().missing_blob_digests, vec![good]);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_update_blobs_statuses_per_blob() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let good = pseudo_random(10, 4096);
    let hash_mismatch_data = pseudo_random(11, 64);
    let hash_mismatch_digest = digest(&pseudo_random(12, 64));
    let size_mismatch_data = pseudo_random(13, 64);
    let size_mismatch_digest = reapi::Digest {
        size_bytes: 63,
        ..digest(&size_mismatch_data)
    };
    let bad_digest = reapi::Digest {
        hash: "not-a-hash".into(),
        size_bytes: 3,
    };
    let entry = |d: reapi::Digest, data: &[u8]| reapi::batch_update_blobs_request::Request {
        digest: Some(d),
        data: data.to_vec(),
        ..Default::default()
    };
    let requests = vec![
        entry(digest(&good), &good),
        entry(hash_mismatch_digest.clone(), &hash_mismatch_data),
        entry(size_mismatch_digest.clone(), &size_mismatch_data),
        entry(bad_digest.clone(), b"abc"),
        entry(digest(b""), b""),
    ];
    let resp = bounded(cas(&ch).batch_update_blobs(reapi::BatchUpdateBlobsRequest {
        requests: requests.clone(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    let codes: Vec<Code> = resp.responses.iter().map(|r| rpc_code(&r.status)).collect();
    assert_eq!(
        codes,
        vec![
            Code::Ok,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::Ok
        ]
    );
    // Each response names the digest it answers for.
    let echoed: Vec<_> = resp.responses.iter().map(|r| r.digest.clone()).collect();
    let sent: Vec<_> = requests.iter().map(|r| r.digest.clone()).collect();
    assert_eq!(echoed, sent);
    for r in &resp.responses[1..4] {
        assert!(!r.status.as_ref().unwrap().message.is_empty());
    }

    // The good blob is stored in casd's layout, read-only like casd's objects.
    let path = blob_path(repo.path(), &digest(&good).hash);
    assert_eq!(std::fs::read(&path).unwrap(), good);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o444, "{}", path.display());
    // Nothing of the rejected blobs reached the store, under either hash.
    for h in [
        &hash_mismatch_digest.hash,
        &sha256_hex(&hash_mismatch_data),
        &size_mismatch_digest.hash,
    ] {
        assert!(!blob_path(repo.path(), h).exists(), "{h} was stored");
    }
    assert_eq!(tmp_entries(repo.path()), Vec::<std::path::PathBuf>::new());
    let missing = find_missing(
        &ch,
        &[
            digest(&good),
            hash_mismatch_digest.clone(),
            size_mismatch_digest.clone(),
            digest(&hash_mismatch_data),
        ],
    )
    .await
    .unwrap();
    assert_eq!(missing.len(), 3);
    assert!(!missing.contains(&digest(&good)));
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_update_blobs_over_the_limit_fails_whole_rpc() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let limit = max_batch(&ch).await as usize;
    let a = pseudo_random(20, limit / 2 + 1);
    let b = pseudo_random(21, limit / 2 + 1);
    let r = batch_update(&ch, &[&a, &b]).await;
    assert_code(r, Code::InvalidArgument);
    assert!(!blob_path(repo.path(), &digest(&a).hash).exists());
    assert!(!blob_path(repo.path(), &digest(&b).hash).exists());
    assert_eq!(
        find_missing(&ch, &[digest(&a), digest(&b)])
            .await
            .unwrap()
            .len(),
        2
    );
    // Exactly the advertised limit is allowed.
    let exact = pseudo_random(22, limit);
    assert_eq!(batch_update(&ch, &[&exact]).await.unwrap(), vec![Code::Ok]);
    assert!(find_missing(&ch, &[digest(&exact)])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_update_blobs_rejects_unknown_instance_and_compressor() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let data = b"instance check".to_vec();
    let r = bounded(cas(&ch).batch_update_blobs(reapi::BatchUpdateBlobsRequest {
        instance_name: "nope".into(),
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest(&data)),
            data: data.clone(),
            ..Default::default()
        }],
        ..Default::default()
    }))
    .await;
    assert_code(r, Code::InvalidArgument);
    // No compressors are advertised, so zstd-compressed payloads cannot be accepted.
    let resp = bounded(cas(&ch).batch_update_blobs(reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(digest(&data)),
            data: data.clone(),
            compressor: reapi::compressor::Value::Zstd as i32,
        }],
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(rpc_code(&resp.responses[0].status), Code::InvalidArgument);
    assert_eq!(find_missing(&ch, &[digest(&data)]).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_read_blobs_hits_misses_and_limits() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let a = pseudo_random(30, 5000);
    let b = pseudo_random(31, 1);
    upload(&ch, &[&a, &b]).await;
    let missing = digest(b"not stored");
    let bad = reapi::Digest {
        hash: "xyz".into(),
        size_bytes: 1,
    };
    let asked = vec![
        digest(&a),
        missing.clone(),
        digest(b""),
        bad.clone(),
        digest(&b),
    ];
    let resp = bounded(cas(&ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        digests: asked.clone(),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(resp.responses.len(), 5);
    let got: Vec<_> = resp
        .responses
        .iter()
        .map(|r| r.digest.clone().unwrap())
        .collect();
    assert_eq!(got, asked);
    let codes: Vec<Code> = resp.responses.iter().map(|r| rpc_code(&r.status)).collect();
    assert_eq!(
        codes,
        vec![
            Code::Ok,
            Code::NotFound,
            Code::Ok,
            Code::InvalidArgument,
            Code::Ok
        ]
    );
    assert_eq!(resp.responses[0].data, a);
    assert!(resp.responses[1].data.is_empty());
    assert!(resp.responses[2].data.is_empty());
    assert_eq!(resp.responses[4].data, b);
    // Uncompressed, as nothing else was asked for.
    assert_eq!(
        resp.responses[0].compressor,
        reapi::compressor::Value::Identity as i32
    );

    let limit = max_batch(&ch).await;
    let over = vec![
        reapi::Digest {
            size_bytes: limit / 2 + 1,
            ..digest(b"big one")
        },
        reapi::Digest {
            size_bytes: limit / 2 + 1,
            ..digest(b"big two")
        },
    ];
    let r = bounded(cas(&ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        digests: over,
        ..Default::default()
    }))
    .await;
    assert_code(r, Code::InvalidArgument);

    let r = bounded(cas(&ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        instance_name: "nope".into(),
        digests: vec![digest(&a)],
        ..Default::default()
    }))
    .await;
    assert_code(r, Code::InvalidArgument);
}

/// The shape of tree BuildStream artifacts have: several directories sharing identical
/// subdirectories, several levels deep.
struct SharedTree {
    root: reapi::Digest,
    /// Every distinct Directory, encoded, by hash.
    dirs: Vec<(reapi::Digest, Vec<u8>)>,
    files: Vec<Vec<u8>>,
}

fn shared_tree(seed: u64) -> SharedTree {
    let files: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(seed + i, 200)).collect();
    let mut dirs = Vec::new();
    let mut add = |d: reapi::Directory| {
        let bytes = encode(&d);
        let dg = digest(&bytes);
        dirs.push((dg.clone(), bytes));
        dg
    };
    let leaf = add(reapi::Directory {
        files: vec![file_node("leaf.txt", &digest(&files[0]))],
        ..Default::default()
    });
    let shared = add(reapi::Directory {
        files: vec![file_node("shared.txt", &digest(&files[1]))],
        directories: vec![dir_node("leaf", &leaf)],
        ..Default::default()
    });
    let a = add(reapi::Directory {
        files: vec![file_node("a.txt", &digest(&files[2]))],
        directories: vec![dir_node("s1", &shared)],
        ..Default::default()
    });
    let b = add(reapi::Directory {
        directories: vec![dir_node("l", &leaf), dir_node("s2", &shared)],
        ..Default::default()
    });
    let root = add(reapi::Directory {
        directories: vec![
            dir_node("a", &a),
            dir_node("b", &b),
            dir_node("s3", &shared),
        ],
        ..Default::default()
    });
    SharedTree { root, dirs, files }
}

async fn upload_tree(ch: &Channel, t: &SharedTree) {
    let mut all: Vec<&[u8]> = t.dirs.iter().map(|(_, b)| b.as_slice()).collect();
    all.extend(t.files.iter().map(Vec::as_slice));
    let codes = batch_update(ch, &all).await.unwrap();
    assert!(codes.iter().all(|c| *c == Code::Ok), "{codes:?}");
}

async fn get_tree(
    ch: &Channel,
    root: &reapi::Digest,
    page_size: i32,
    page_token: &str,
) -> Result<Vec<reapi::GetTreeResponse>, tonic::Status> {
    bounded(async {
        let mut stream = cas(ch)
            .get_tree(reapi::GetTreeRequest {
                root_digest: Some(root.clone()),
                page_size,
                page_token: page_token.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut pages = Vec::new();
        while let Some(p) = stream.message().await? {
            pages.push(p);
        }
        Ok(pages)
    })
    .await
}

fn hashes(dirs: &[reapi::Directory]) -> Vec<String> {
    dirs.iter()
        .map(|d| sha256_hex(&d.encode_to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn get_tree_lists_each_directory_once() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let tree = shared_tree(40);
    upload_tree(&ch, &tree).await;
    let expected: HashSet<String> = tree.dirs.iter().map(|(d, _)| d.hash.clone()).collect();
    assert_eq!(expected.len(), 5);

    let pages = get_tree(&ch, &tree.root, 0, "").await.unwrap();
    let all: Vec<reapi::Directory> = pages.iter().flat_map(|p| p.directories.clone()).collect();
    let got = hashes(&all);
    assert_eq!(got.len(), 5, "duplicates or omissions: {got:?}");
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), expected);
    assert_eq!(got[0], tree.root.hash, "the root comes first");
    assert!(pages.last().unwrap().next_page_token.is_empty());

    // Paging by hand: each call answers one page; the tokens carry on where it stopped.
    for page_size in [1, 2, 3, 4, 5, 100] {
        let mut token = String::new();
        let mut seen = Vec::new();
        let mut calls = 0;
        loop {
            calls += 1;
            assert!(calls <= 10, "paging does not terminate");
            let pages = get_tree(&ch, &tree.root, page_size, &token).await.unwrap();
            assert_eq!(pages.len(), 1, "one response per paged call");
            let page = &pages[0];
            assert!(page.directories.len() <= page_size as usize);
            assert!(!page.directories.is_empty());
            seen.extend(hashes(&page.directories));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token.clone();
        }
        assert_eq!(seen.len(), 5, "page_size {page_size}: {seen:?}");
        assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
        assert_eq!(calls, 5usize.div_ceil(page_size as usize));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn get_tree_without_page_size_streams_a_large_tree() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    // More directories than fit one default page, so the server has to stream.
    let children: Vec<Vec<u8>> = (0..1500)
        .map(|i| {
            encode(&reapi::Directory {
                files: vec![file_node(&format!("f{i}"), &digest(b""))],
                ..Default::default()
            })
        })
        .collect();
    let root = encode(&reapi::Directory {
        directories: children
            .iter()
            .enumerate()
            .map(|(i, c)| dir_node(&format!("d{i:04}"), &digest(c)))
            .collect(),
        ..Default::default()
    });
    let mut all: Vec<&[u8]> = children.iter().map(Vec::as_slice).collect();
    all.push(&root);
    let codes = batch_update(&ch, &all).await.unwrap();
    assert!(codes.iter().all(|c| *c == Code::Ok));

    let pages = get_tree(&ch, &digest(&root), 0, "").await.unwrap();
    let got: Vec<String> = pages.iter().flat_map(|p| hashes(&p.directories)).collect();
    assert_eq!(got.len(), 1501);
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), 1501);
    assert!(pages.last().unwrap().next_page_token.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn get_tree_errors() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let tree = shared_tree(50);
    upload_tree(&ch, &tree).await;

    let absent = digest(&encode(&reapi::Directory {
        files: vec![file_node("nothing", &digest(b"nothing"))],
        ..Default::default()
    }));
    assert_code(get_tree(&ch, &absent, 0, "").await, Code::NotFound);
    assert_code(get_tree(&ch, &absent, 2, "").await, Code::NotFound);
    for token in ["garbage", "-1", "1.5", "0x10"] {
        assert_code(
            get_tree(&ch, &tree.root, 2, token).await,
            Code::InvalidArgument,
        );
    }
    assert_code(
        get_tree(&ch, &tree.root, -1, "").await,
        Code::InvalidArgument,
    );
    let bad_root = reapi::Digest {
        hash: "nope".into(),
        size_bytes: 1,
    };
    assert_code(get_tree(&ch, &bad_root, 0, "").await, Code::InvalidArgument);
    let r = bounded(cas(&ch).get_tree(reapi::GetTreeRequest {
        instance_name: "nope".into(),
        root_digest: Some(tree.root.clone()),
        ..Default::default()
    }))
    .await;
    assert_code(r, Code::InvalidArgument);

    // REAPI lets GetTree leave out subtrees that are not stored: without the shared
    // subdirectory the listing loses only it; its leaf is still reachable through `b`.
    let shared = &tree.dirs[1].0;
    std::fs::remove_file(blob_path(repo.path(), &shared.hash)).unwrap();
    let pages = get_tree(&ch, &tree.root, 0, "").await.unwrap();
    let got: HashSet<String> = pages.iter().flat_map(|p| hashes(&p.directories)).collect();
    let expected: HashSet<String> = [
        &tree.root,
        &tree.dirs[2].0,
        &tree.dirs[3].0,
        &tree.dirs[0].0,
    ]
    .iter()
    .map(|d| d.hash.clone())
    .collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn asking_with_a_wrong_size_does_not_destroy_a_stored_blob() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let a = pseudo_random(60, 100);
    upload(&ch, &[&a]).await;
    let wrong = reapi::Digest {
        size_bytes: 101,
        ..digest(&a)
    };
    // Any read-only client can send these; none of them may cost the cache a blob.
    let missing = find_missing(&ch, std::slice::from_ref(&wrong)).await;
    assert_eq!(missing.unwrap(), vec![wrong.clone()]);
    let r = read(&ch, &read_name("", &wrong), 0, 0).await;
    assert_code(r, Code::NotFound);
    let resp = bounded(cas(&ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        digests: vec![wrong.clone()],
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(rpc_code(&resp.responses[0].status), Code::NotFound);
    // Nor may a failed upload that names the stored hash with another size.
    let codes = bounded(cas(&ch).batch_update_blobs(reapi::BatchUpdateBlobsRequest {
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: Some(wrong.clone()),
            data: a.clone(),
            ..Default::default()
        }],
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(rpc_code(&codes.responses[0].status), Code::InvalidArgument);
    let r = write(&ch, &upload_name("", &wrong), &a, 1 << 20).await;
    assert_code(r, Code::InvalidArgument);
    assert!(find_missing(&ch, &[digest(&a)]).await.unwrap().is_empty());
    assert_eq!(
        std::fs::read(blob_path(repo.path(), &digest(&a).hash)).unwrap(),
        a
    );
}

fn age_of(path: &std::path::Path) -> std::time::Duration {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    std::time::SystemTime::now()
        .duration_since(mtime)
        .unwrap_or_default()
}

/// Makes a file look unused for years, as the LRU sees it.
fn make_old(path: &std::path::Path) {
    let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    std::fs::File::open(path)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    assert!(age_of(path) > std::time::Duration::from_secs(3600));
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_refresh_lru_stamps() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let blob = pseudo_random(80, 1000);
    upload(&ch, &[&blob]).await;
    let d = digest(&blob);
    let path = blob_path(repo.path(), &d.hash);
    let recent = std::time::Duration::from_secs(60);

    // casd's LRU eviction goes by mtime; BuildStream relies on each of these keeping a
    // blob alive (FindMissingBlobs before a push, reads during a pull, re-uploads).
    make_old(&path);
    find_missing(&ch, std::slice::from_ref(&d)).await.unwrap();
    assert!(age_of(&path) < recent, "FindMissingBlobs");

    make_old(&path);
    let resp = bounded(cas(&ch).batch_read_blobs(reapi::BatchReadBlobsRequest {
        digests: vec![d.clone()],
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(resp.into_inner().responses[0].data, blob);
    assert!(age_of(&path) < recent, "BatchReadBlobs");

    make_old(&path);
    assert!(read(&ch, &read_name("", &d), 0, 0).await.unwrap() == blob);
    assert!(age_of(&path) < recent, "ByteStream.Read");

    make_old(&path);
    assert_eq!(batch_update(&ch, &[&blob]).await.unwrap(), vec![Code::Ok]);
    assert!(age_of(&path) < recent, "BatchUpdateBlobs of a stored blob");

    make_old(&path);
    let r = write(&ch, &upload_name("", &d), &blob, 100).await;
    assert_eq!(r.unwrap().committed_size, 1000);
    assert!(age_of(&path) < recent, "ByteStream.Write of a stored blob");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_tree_includes_empty_directories_never_uploaded() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    // Empty directories encode to the empty blob, which casd never uploads: it is
    // always present.
    let empty = digest(&encode(&reapi::Directory::default()));
    assert_eq!(empty.hash, EMPTY_SHA256);
    let x = encode(&reapi::Directory {
        files: vec![file_node("empty-file", &digest(b""))],
        directories: vec![dir_node("e", &empty)],
        ..Default::default()
    });
    let root = encode(&reapi::Directory {
        directories: vec![
            dir_node("e1", &empty),
            dir_node("e2", &empty),
            dir_node("x", &digest(&x)),
        ],
        ..Default::default()
    });
    assert_eq!(
        batch_update(&ch, &[&x, &root]).await.unwrap(),
        vec![Code::Ok; 2]
    );
    let pages = get_tree(&ch, &digest(&root), 0, "").await.unwrap();
    let got: Vec<String> = pages.iter().flat_map(|p| hashes(&p.directories)).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    let got: HashSet<String> = got.into_iter().collect();
    let want: HashSet<String> = [digest(&root).hash, digest(&x).hash, empty.hash.clone()].into();
    assert_eq!(got, want);
    // The empty directory is a tree of its own.
    let pages = get_tree(&ch, &empty, 0, "").await.unwrap();
    assert_eq!(hashes(&pages[0].directories), vec![empty.hash]);
}

#[tokio::test(flavor = "multi_thread")]
async fn find_missing_blobs_with_as_many_digests_as_bst_sends() {
    let (_repo, server) = push_server();
    let ch = server.channel().await;
    let stored = pseudo_random(70, 10);
    upload(&ch, &[&stored]).await;
    // bst hands casd up to 13107 digests per call; a large request must not hit a limit.
    let mut asked: Vec<_> = (0..20_000u32).map(|i| digest(&i.to_le_bytes())).collect();
    asked.push(digest(&stored));
    let missing = find_missing(&ch, &asked).await.unwrap();
    assert_eq!(missing.len(), 20_000);
    assert!(!missing.contains(&digest(&stored)));
}

/// FindMissingBlobs answers from memory for settled shards; removing an object by hand
/// must still be seen at once.
#[tokio::test(flavor = "multi_thread")]
async fn find_missing_sees_an_object_removed_by_hand() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &["--enable-push"]);
    let ch = server.channel().await;
    let blobs: Vec<Vec<u8>> = (0..20).map(|i| pseudo_random(1200 + i, 100)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    upload(&ch, &refs).await;
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| digest(b)).collect();
    // Make every shard directory look long settled, as on a cache nobody is pushing to.
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    for d in &digests {
        let shard = blob_path(repo.path(), &d.hash).parent().unwrap().to_owned();
        std::fs::File::open(&shard)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    }
    for _ in 0..2 {
        assert!(find_missing(&ch, &digests).await.unwrap().is_empty());
    }
    std::fs::remove_file(blob_path(repo.path(), &digests[7].hash)).unwrap();
    assert_eq!(
        find_missing(&ch, &digests).await.unwrap(),
        vec![digests[7].clone()]
    );
    // And a whole shard directory removed.
    let shard = blob_path(repo.path(), &digests[3].hash)
        .parent()
        .unwrap()
        .to_owned();
    std::fs::remove_dir_all(&shard).unwrap();
    let missing = find_missing(&ch, &digests).await.unwrap();
    assert!(missing.contains(&digests[3]) && missing.contains(&digests[7]));
    assert!(digests
        .iter()
        .filter(|d| d.hash[..2] != digests[3].hash[..2] && d.hash != digests[7].hash)
        .all(|d| !missing.contains(d)));
}

/// buildbox-casd serving a repository in place, and BuildStream's test-suite, read
/// `cas/objects` directly: the empty blob must be a file there, whatever happens to it.
#[tokio::test(flavor = "multi_thread")]
async fn the_empty_blob_is_a_file_in_every_repository() {
    let (repo, server) = push_server();
    let ch = server.channel().await;
    let path = blob_path(repo.path(), EMPTY_SHA256);
    let is_empty_file = || std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0);
    assert!(
        is_empty_file(),
        "not created when the repository was opened"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o222,
        0,
        "objects are read-only"
    );

    // Removed under the running server with nobody asking for it: back shortly.
    std::fs::remove_dir_all(repo.path().join("cas/objects")).unwrap();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !is_empty_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "the empty blob was not recreated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Asked for: back at once.
    std::fs::remove_file(&path).unwrap();
    assert!(find_missing(&ch, &[digest(b"")]).await.unwrap().is_empty());
    assert!(is_empty_file());

    // Eviction of everything else keeps it; verify puts it back.
    // Over gc's smallest accepted quota (64 KiB), so that `--quota 64K` evicts.
    let old = pseudo_random(40, 100_000);
    upload(&ch, &[&old]).await;
    drop(server);
    let admin = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .arg(repo.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    admin(&["gc", "--quota", "64K", "--quota-low", "0"]);
    assert!(!blob_path(repo.path(), &sha256_hex(&old)).exists());
    assert!(is_empty_file(), "gc evicted the empty blob");
    let stats = admin(&["stats"]);
    assert!(stats.contains("objects: 1\n"), "{stats}");
    assert!(stats.contains("bytes: 0\n"), "{stats}");
    std::fs::remove_file(&path).unwrap();
    admin(&["verify"]);
    assert!(is_empty_file(), "verify did not restore the empty blob");
}

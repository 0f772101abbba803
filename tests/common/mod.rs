//! Shared support for integration tests: runs the real `bst-artifact-server` binary on
//! a loopback port the OS picks, and connects tonic clients to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bst-artifact-server");

/// Upper bound for anything a test waits for.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A running server process, killed (SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub repo: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Server {
    /// Starts `bst-artifact-server serve --bind 127.0.0.1 --port 0 <extra args> REPO`, logging
    /// at the default level to a file (see [`Server::log`]).
    pub fn start(repo: &Path, extra: &[&str]) -> Server {
        Self::start_with(repo, extra, |_| {})
    }

    /// Like [`Server::start`], letting the caller adjust the command (environment etc.).
    pub fn start_with(repo: &Path, extra: &[&str], adjust: impl FnOnce(&mut Command)) -> Server {
        let scratch = tempfile::tempdir().unwrap();
        let port_file = scratch.path().join("port");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            // The default log level (info): what an operator sees is what tests see.
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .arg("--port-file")
            .arg(&port_file)
            .args(extra)
            .arg(repo)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(scratch.path()));
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("starting bst-artifact-server");
        let port = wait_for_port_file(&port_file, &mut child);
        Server {
            child,
            port,
            repo: repo.to_owned(),
            _scratch: scratch,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        connect(&self.url()).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server has logged so far (at `--log-level info` unless the test chose).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._scratch.path().join("server.log")).unwrap_or_default()
    }

    /// Sends a signal and waits (bounded) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
        wait_bounded(&mut self.child, TIMEOUT).expect("server did not exit in time")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The server's log is kept out of passing tests' output, and shown for failures.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self._scratch.path().join("server.log"));
            eprintln!(
                "--- server log ({}) ---\n{}",
                self.url(),
                log.unwrap_or_default()
            );
        }
    }
}

fn log_file(dir: &Path) -> std::fs::File {
    std::fs::File::create(dir.join("server.log")).expect("creating the server log")
}

/// The containers.conf the podman tests use (written by tests/scripts/setup-podman.sh):
/// $CONTAINERS_CONF, or the repository's own under target/, never the machine's.
/// (tests/container.rs, which does not use this module, has the same rule.)
pub fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/podman/containers.conf")
        })
}

pub fn wait_for_port_file(port_file: &Path, child: &mut Child) -> u16 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(port_file) {
            if let Ok(p) = s.trim().parse() {
                return p;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "server did not start in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn connect(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .connect()
        .await
        .expect("connecting to the server")
}

/// Raises tonic's client message limits to match the server's.
#[macro_export]
macro_rules! big {
    ($client:expr) => {
        $client
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    };
}

/// Helpers for the gRPC protocol tests (CAS, ByteStream, Remote Asset): digests, the casd
/// on-disk layout, and bounded client calls.
pub mod grpc {
    use super::TIMEOUT;
    use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
    use bazel_remote_apis::google::bytestream::{
        byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest, WriteResponse,
    };
    use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    use sha2::{Digest as _, Sha256};
    use std::path::{Path, PathBuf};
    use tonic::transport::Channel;
    use tonic::{Code, Status};

    pub const EMPTY_SHA256: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// The ByteStream write chunk buildbox-casd was observed to use.
    pub const CASD_CHUNK: usize = 2 << 20;

    /// Fails the test instead of hanging when the server stops answering.
    pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(TIMEOUT, f)
            .await
            .expect("the server did not answer in time")
    }

    pub fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    pub fn digest(data: &[u8]) -> reapi::Digest {
        reapi::Digest {
            hash: sha256_hex(data),
            size_bytes: data.len() as i64,
        }
    }

    /// Deterministic bytes that differ per seed, so every test's blobs are its own.
    pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Where buildbox-casd (and so this server) keeps a blob: `REPO/cas/objects/<2>/<62>`.
    pub fn blob_path(repo: &Path, hash: &str) -> PathBuf {
        repo.join("cas/objects").join(&hash[..2]).join(&hash[2..])
    }

    /// Upload files the process `pid` has open under `REPO/cas`: named ones in
    /// `cas/tmp`, or anonymous ones (`O_TMPFILE`, shown by /proc as `.../#<inode> (deleted)`).
    pub fn uploads_open(pid: u32, repo: &Path) -> usize {
        let cas = repo.join("cas");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
        fds.flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|t| t.starts_with(&cas))
            .filter(|t| {
                t.starts_with(cas.join("tmp")) || t.to_string_lossy().ends_with(" (deleted)")
            })
            .count()
    }

    /// Files left in `REPO/cas/tmp` (none when the directory is absent).
    pub fn tmp_entries(repo: &Path) -> Vec<PathBuf> {
        match std::fs::read_dir(repo.join("cas/tmp")) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn prefix(instance: &str) -> String {
        if instance.is_empty() {
            String::new()
        } else {
            format!("{instance}/")
        }
    }

    pub fn upload_name(instance: &str, d: &reapi::Digest) -> String {
        format!(
            "{}uploads/{}/blobs/{}/{}",
            prefix(instance),
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        )
    }

    pub fn read_name(instance: &str, d: &reapi::Digest) -> String {
        format!("{}blobs/{}/{}", prefix(instance), d.hash, d.size_bytes)
    }

    /// A well-behaved client's Write stream: the name only on the first message, offsets
    /// counting up, `finish_write` on the last.
    pub fn write_requests(name: &str, data: &[u8], chunk: usize) -> Vec<WriteRequest> {
        let mut out: Vec<WriteRequest> = data
            .chunks(chunk)
            .scan(0usize, |offset, c| {
                let r = WriteRequest {
                    resource_name: if *offset == 0 {
                        name.to_owned()
                    } else {
                        String::new()
                    },
                    write_offset: *offset as i64,
                    finish_write: false,
                    data: c.to_vec(),
                };
                *offset += c.len();
                Some(r)
            })
            .collect();
        if out.is_empty() {
            out.push(WriteRequest {
                resource_name: name.to_owned(),
                ..Default::default()
            });
        }
        out.last_mut().unwrap().finish_write = true;
        out
    }

    pub fn bytestream(ch: &Channel) -> ByteStreamClient<Channel> {
        crate::big!(ByteStreamClient::new(ch.clone()))
    }

    pub fn cas(ch: &Channel) -> ContentAddressableStorageClient<Channel> {
        crate::big!(ContentAddressableStorageClient::new(ch.clone()))
    }

    /// A Write call whose messages the test sends one by one, when it chooses.
    pub fn open_write(
        ch: &Channel,
    ) -> (
        tokio::sync::mpsc::Sender<WriteRequest>,
        tokio::task::JoinHandle<Result<tonic::Response<WriteResponse>, Status>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let mut client = bytestream(ch);
        let call = tokio::spawn(async move {
            client
                .write(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        (tx, call)
    }

    pub async fn write_msgs(
        ch: &Channel,
        msgs: Vec<WriteRequest>,
    ) -> Result<WriteResponse, Status> {
        bounded(bytestream(ch).write(tokio_stream::iter(msgs)))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn write(
        ch: &Channel,
        name: &str,
        data: &[u8],
        chunk: usize,
    ) -> Result<WriteResponse, Status> {
        write_msgs(ch, write_requests(name, data, chunk)).await
    }

    /// Reads a resource, returning the chunks as they arrived.
    pub async fn read_chunks(
        ch: &Channel,
        name: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<Vec<u8>>, Status> {
        bounded(async {
            let mut stream = bytestream(ch)
                .read(ReadRequest {
                    resource_name: name.to_owned(),
                    read_offset: offset,
                    read_limit: limit,
                })
                .await?
                .into_inner();
            let mut chunks = Vec::new();
            while let Some(r) = stream.message().await? {
                chunks.push(r.data);
            }
            Ok(chunks)
        })
        .await
    }

    pub async fn read(
        ch: &Channel,
        name: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<u8>, Status> {
        read_chunks(ch, name, offset, limit)
            .await
            .map(|c| c.concat())
    }

    /// BatchUpdateBlobs of the given blobs; returns the per-blob status codes.
    pub async fn batch_update(ch: &Channel, blobs: &[&[u8]]) -> Result<Vec<Code>, Status> {
        let requests = blobs
            .iter()
            .map(|b| reapi::batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: b.to_vec(),
                ..Default::default()
            })
            .collect();
        let resp = bounded(cas(ch).batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        }))
        .await?
        .into_inner();
        Ok(resp.responses.iter().map(|r| rpc_code(&r.status)).collect())
    }

    /// Stores blobs through whichever path fits their size, asserting success.
    pub async fn upload(ch: &Channel, blobs: &[&[u8]]) {
        for b in blobs {
            if b.len() > 1 << 20 {
                let d = digest(b);
                let r = write(ch, &upload_name("", &d), b, CASD_CHUNK)
                    .await
                    .unwrap();
                assert_eq!(r.committed_size, d.size_bytes);
            } else {
                let codes = batch_update(ch, &[b]).await.unwrap();
                assert_eq!(codes, vec![Code::Ok]);
            }
        }
    }

    pub async fn find_missing(
        ch: &Channel,
        digests: &[reapi::Digest],
    ) -> Result<Vec<reapi::Digest>, Status> {
        bounded(cas(ch).find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: digests.to_vec(),
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner().missing_blob_digests)
    }

    pub fn rpc_code(s: &Option<bazel_remote_apis::google::rpc::Status>) -> Code {
        Code::from_i32(s.as_ref().map_or(0, |s| s.code))
    }

    pub fn file_node(name: &str, d: &reapi::Digest) -> reapi::FileNode {
        reapi::FileNode {
            name: name.to_owned(),
            digest: Some(d.clone()),
            ..Default::default()
        }
    }

    pub fn dir_node(name: &str, d: &reapi::Digest) -> reapi::DirectoryNode {
        reapi::DirectoryNode {
            name: name.to_owned(),
            digest: Some(d.clone()),
        }
    }

    pub fn encode<M: prost::Message>(m: &M) -> Vec<u8> {
        m.encode_to_vec()
    }

    /// Asserts an RPC failed with `code`, showing the message otherwise.
    #[track_caller]
    pub fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code) -> Status {
        match r {
            Ok(v) => panic!("expected {code:?}, got success: {v:?}"),
            Err(s) => {
                assert_eq!(s.code(), code, "unexpected status: {s:?}");
                s
            }
        }
    }
}

impl Server {
    /// Starts the binary in the historical form, without a subcommand:
    /// `bst-artifact-server --bind 127.0.0.1 --port 0 --port-file F <extra> REPO`.
    pub fn start_historical(repo: &Path, extra: &[&str]) -> Server {
        let scratch = tempfile::tempdir().unwrap();
        let port_file = scratch.path().join("port");
        let mut child = Command::new(BIN)
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .arg("--port-file")
            .arg(&port_file)
            .args(extra)
            .arg(repo)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(scratch.path()))
            .spawn()
            .expect("starting bst-artifact-server");
        let port = wait_for_port_file(&port_file, &mut child);
        Server {
            child,
            port,
            repo: repo.to_owned(),
            _scratch: scratch,
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Remote Asset client helpers for the gRPC protocol tests.
pub mod asset {
    use super::grpc::bounded;
    use bazel_remote_apis::build::bazel::remote::asset::v1 as ra;
    use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
    use ra::fetch_client::FetchClient;
    use ra::push_client::PushClient;
    use tonic::transport::Channel;
    use tonic::Status;

    pub fn quals(q: &[(&str, &str)]) -> Vec<ra::Qualifier> {
        q.iter()
            .map(|(n, v)| ra::Qualifier {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect()
    }

    pub fn uris(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| (*s).to_owned()).collect()
    }

    pub async fn fetch_blob(
        ch: &Channel,
        u: &[&str],
        q: &[(&str, &str)],
    ) -> Result<ra::FetchBlobResponse, Status> {
        fetch_blob_req(
            ch,
            ra::FetchBlobRequest {
                uris: uris(u),
                qualifiers: quals(q),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn fetch_blob_req(
        ch: &Channel,
        r: ra::FetchBlobRequest,
    ) -> Result<ra::FetchBlobResponse, Status> {
        bounded(FetchClient::new(ch.clone()).fetch_blob(r))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn fetch_dir(
        ch: &Channel,
        u: &[&str],
        q: &[(&str, &str)],
    ) -> Result<ra::FetchDirectoryResponse, Status> {
        fetch_dir_req(
            ch,
            ra::FetchDirectoryRequest {
                uris: uris(u),
                qualifiers: quals(q),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn fetch_dir_req(
        ch: &Channel,
        r: ra::FetchDirectoryRequest,
    ) -> Result<ra::FetchDirectoryResponse, Status> {
        bounded(FetchClient::new(ch.clone()).fetch_directory(r))
            .await
            .map(|r| r.into_inner())
    }

    /// A PushBlob with no qualifiers, references or expiry, as BuildStream sends them.
    pub fn push_blob_req(u: &[&str], d: &reapi::Digest) -> ra::PushBlobRequest {
        ra::PushBlobRequest {
            uris: uris(u),
            blob_digest: Some(d.clone()),
            ..Default::default()
        }
    }

    pub fn push_dir_req(u: &[&str], d: &reapi::Digest) -> ra::PushDirectoryRequest {
        ra::PushDirectoryRequest {
            uris: uris(u),
            root_directory_digest: Some(d.clone()),
            ..Default::default()
        }
    }

    pub async fn push_blob(ch: &Channel, r: ra::PushBlobRequest) -> Result<(), Status> {
        bounded(PushClient::new(ch.clone()).push_blob(r))
            .await
            .map(|_| ())
    }

    pub async fn push_dir(ch: &Channel, r: ra::PushDirectoryRequest) -> Result<(), Status> {
        bounded(PushClient::new(ch.clone()).push_directory(r))
            .await
            .map(|_| ())
    }
}

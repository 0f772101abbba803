//! Clients that try to starve everyone else: thousands of ByteStream streams opened and
//! never read or never finished, streams left idle, and a process out of file
//! descriptors. Everything listens on 127.0.0.1; the well-behaved client connects from
//! 127.0.0.2 (still loopback) because the server bounds work per client address.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::{ReadRequest, WriteRequest};
use common::grpc::{bounded, digest, pseudo_random, read, read_name, upload, upload_name};
use common::{Server, TIMEOUT};
use prost::Message;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const MIB: usize = 1 << 20;

async fn channel_from(port: u16, from: &str) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .local_address(Some(from.parse::<IpAddr>().unwrap()))
        .connect_timeout(TIMEOUT)
        .connect()
        .await
        .expect("connecting")
}

/// A connection with HTTP/2's default 64 KiB windows (tonic's client asks for larger
/// ones): a Read stalls right after its first message.
async fn small_window_channel(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect_timeout(TIMEOUT)
        .connect()
        .await
        .expect("connecting")
}

fn frame(msg: &impl Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

type Frames = futures::stream::BoxStream<
    'static,
    Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
>;

/// Starts a ByteStream call whose request body is `first` and then nothing, for as long
/// as `hold` is not dropped; its response (if any) is kept unread until then.
fn stalled_call(
    ch: &Channel,
    method: &str,
    first: bytes::Bytes,
    end_body: bool,
    hold: &tokio::sync::watch::Receiver<()>,
) -> tokio::task::JoinHandle<Option<http::response::Parts>> {
    use tonic::codegen::Service;
    let mut hold_body = hold.clone();
    let mut hold_response = hold.clone();
    let data = futures::stream::once(async move { Ok(http_body::Frame::data(first)) });
    let body: Frames = if end_body {
        Box::pin(data)
    } else {
        // The body never ends while the test holds it open.
        Box::pin(futures::StreamExt::chain(
            data,
            futures::stream::once(async move {
                let _ = hold_body.changed().await;
                Ok(http_body::Frame::data(bytes::Bytes::new()))
            }),
        ))
    };
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("/google.bytestream.ByteStream/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            body,
        )))
        .unwrap();
    let mut ch = ch.clone();
    tokio::spawn(async move {
        let call = async {
            futures::future::poll_fn(|cx| ch.poll_ready(cx))
                .await
                .ok()?;
            ch.call(req).await.ok()
        };
        let response = tokio::select! {
            r = call => r,
            _ = hold_response.changed() => None,
        }?;
        // Never read: hold the response (and so its stream) until told to let go.
        let (parts, body) = response.into_parts();
        let _ = hold_response.changed().await;
        drop(body);
        Some(parts)
    })
}

/// Resident and peak resident size of a process, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_streams_do_not_starve_other_clients() {
    const STALLED: usize = 2_000;
    const PER_CONNECTION: usize = 200;
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &["--enable-push"]);
    let pid = server.pid();
    let good = channel_from(server.port, "127.0.0.2").await;
    let big = pseudo_random(1, 8 * MIB);
    let big_digest = digest(&big);
    upload(&good, &[&big]).await;

    let (release, hold) = tokio::sync::watch::channel(());
    let mut hostile = Vec::new();
    let mut calls = Vec::new();
    // Reads of an 8 MiB blob whose responses are never read.
    let read_req = frame(&ReadRequest {
        resource_name: read_name("", &big_digest),
        read_offset: 0,
        read_limit: 0,
    });
    for _ in 0..STALLED / PER_CONNECTION {
        let ch = channel_from(server.port, "127.0.0.1").await;
        for _ in 0..PER_CONNECTION {
            calls.push(stalled_call(&ch, "Read", read_req.clone(), true, &hold));
        }
        hostile.push(ch);
    }
    // Writes of 8 MiB blobs that send their first 64 KiB and then nothing.
    for i in 0..STALLED / PER_CONNECTION {
        let ch = channel_from(server.port, "127.0.0.1").await;
        for j in 0..PER_CONNECTION {
            // The digest of data never sent: only its first 64 KiB go out.
            let seed = ((i * PER_CONNECTION + j) as u64).to_le_bytes();
            let never_sent = reapi::Digest {
                hash: common::grpc::sha256_hex(&seed),
                size_bytes: 8 * MIB as i64,
            };
            let first = frame(&WriteRequest {
                resource_name: upload_name("", &never_sent),
                write_offset: 0,
                finish_write: false,
                data: vec![j as u8; 64 << 10],
            });
            calls.push(stalled_call(&ch, "Write", first, false, &hold));
        }
        hostile.push(ch);
    }
    // Let the stalls settle in.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Meanwhile, a well-behaved client gets each answer within a second.
    let small = pseudo_random(2, 1000);
    let fresh = pseudo_random(3, 2 * MIB);
    for round in 0..3 {
        let started = Instant::now();
        let missing = common::grpc::find_missing(&good, &[big_digest.clone(), digest(&small)])
            .await
            .unwrap();
        assert_eq!(missing, vec![digest(&small)]);
        let find_missing = started.elapsed();

        let started = Instant::now();
        let got = read(&good, &read_name("", &big_digest), 0, 0)
            .await
            .unwrap();
        assert!(got == big, "read back the wrong data");
        let reading = started.elapsed();

        let started = Instant::now();
        let mut data = fresh.clone();
        data.extend_from_slice(&(round as u64).to_le_bytes());
        let d = digest(&data);
        common::grpc::write(&good, &upload_name("", &d), &data, 1 << 20)
            .await
            .unwrap();
        let writing = started.elapsed();
        eprintln!(
            "round {round}: FindMissing {find_missing:?}, Read 8 MiB {reading:?}, Write 2 MiB {writing:?}"
        );
        for (what, took) in [
            ("FindMissing", find_missing),
            ("Read", reading),
            ("Write", writing),
        ] {
            assert!(
                took < Duration::from_secs(1),
                "{what} took {took:?} beside {STALLED} stalled reads and {STALLED} stalled writes"
            );
        }
    }
    let (now, peak) = rss(pid);
    eprintln!(
        "server RSS with the stalls: {} MB (peak {} MB)",
        now >> 20,
        peak >> 20
    );
    assert!(peak < 300 << 20, "peak RSS {} MB", peak >> 20);

    // The stalls end: memory goes back.
    release.send(()).unwrap();
    drop(hostile);
    for call in calls {
        let _ = bounded(call).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (now, _) = rss(pid);
        if now < 100 << 20 {
            eprintln!("server RSS after the stalls: {} MB", now >> 20);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS still {} MB 30 s after the stalls ended",
            now >> 20
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Still serving.
    assert_eq!(
        read(&good, &read_name("", &big_digest), 0, 0)
            .await
            .unwrap()
            .len(),
        big.len()
    );
}

/// A stream that makes no progress for the idle timeout is abandoned: a Write that
/// stopped sending ends with DEADLINE_EXCEEDED, and a Read whose client stopped reading
/// gives its client slot back (here the only one, so the next request shows it).
#[tokio::test(flavor = "multi_thread")]
async fn idle_streams_time_out() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(
        repo.path(),
        &[
            "--enable-push",
            "--stream-idle-timeout",
            "1",
            "--max-client-requests",
            "1",
        ],
    );
    let ch = channel_from(server.port, "127.0.0.1").await;
    let big = pseudo_random(7, 8 * MIB);
    upload(&ch, &[&big]).await;
    let (release, hold) = tokio::sync::watch::channel(());

    // A Write that sends 64 KiB and then nothing.
    let data = pseudo_random(8, 4 * MIB);
    let (tx, call) = common::grpc::open_write(&ch);
    tx.send(WriteRequest {
        resource_name: upload_name("", &digest(&data)),
        write_offset: 0,
        finish_write: false,
        data: data[..64 << 10].to_vec(),
    })
    .await
    .unwrap();
    let started = Instant::now();
    let status = bounded(call).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);

    // A Read never read holds the client's only slot until it is abandoned, also when
    // it stalls after a whole message (the next one already read ahead).
    let small = small_window_channel(server.port).await;
    let stalled = stalled_call(
        &small,
        "Read",
        frame(&ReadRequest {
            resource_name: read_name("", &digest(&big)),
            read_offset: 0,
            read_limit: 0,
        }),
        true,
        &hold,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    common::grpc::find_missing(&ch, &[digest(&big)])
        .await
        .unwrap();
    let waited = started.elapsed();
    eprintln!("FindMissing waited {waited:?} for the stalled read's slot");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
        "the slot was not held and then released: {waited:?}"
    );
    release.send(()).unwrap();
    let _ = bounded(stalled).await;
}

/// Out of file descriptors, the plaintext accept loop backs off instead of spinning,
/// says so once, and recovers. The server also raises its soft limit to the hard one.
#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_does_not_spin() {
    let repo = tempfile::tempdir().unwrap();
    // Soft limit 64, hard limit 96: the server raises the soft limit to 96.
    let server = Server::start_with(repo.path(), &["--enable-push"], |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit between fork and exec, on the child's own limits.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 96,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let pid = server.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(open_files[3], "96", "soft limit not raised: {open_files:?}");

    // Hold more connections than the server has descriptors for.
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connecting"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticks = cpu(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    eprintln!("server CPU over 3 s out of descriptors: {ticks} ticks at {hz} Hz");
    assert!(
        ticks * 10 < 3 * hz,
        "the accept loop used {ticks} ticks in 3 s (over 10% of a core)"
    );
    let log = server.log();
    assert_eq!(
        log.matches("cannot accept connections").count(),
        1,
        "the failure is logged once:\n{log}"
    );

    // Descriptors come back: the server accepts again.
    drop(held);
    let ch = channel_from(server.port, "127.0.0.1").await;
    bounded(common::grpc::find_missing(&ch, &[])).await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !server.log().contains("accepting connections again") {
        assert!(Instant::now() < deadline, "recovery not logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! What the server tells an operator at the default log level: its effective settings at
//! start, each eviction pass, a TLS client knocking on a plain port, and a normal stop
//! at the ordinary level. (Refused TLS handshakes with the peer's address: tests/tls.rs.)
mod common;

use common::grpc::{digest, pseudo_random, upload};
use common::Server;
use std::io::Write as _;
use std::time::{Duration, Instant};

/// The lines of `log` that contain `needle`, waiting (bounded) for one to appear.
fn wait_for_line(server: &Server, needle: &str) -> String {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        if let Some(line) = server.log().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "never logged {needle:?}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn the_start_up_line_says_the_effective_settings() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(
        repo.path(),
        &[
            "--enable-push",
            "--quota",
            "3M",
            "--quota-low",
            "1M",
            "--reserve",
            "2M",
        ],
    );
    let line = wait_for_line(&server, "serving ");
    assert!(line.contains(" INFO "), "{line}");
    for expected in [
        repo.path().to_str().unwrap(),
        &format!("127.0.0.1:{}", server.port),
        "plain gRPC (no TLS)",
        "uploads enabled",
        "quota 3145728 bytes (3 MiB), evicting down to 1048576 bytes (1 MiB)",
        "keeping 2097152 bytes (2 MiB) of disk free",
    ] {
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    // Uploads on loopback only: no warning about an open push port.
    assert!(!server.log().contains("anyone who can connect"));

    let server = Server::start(repo.path(), &["--index-only"]);
    let line = wait_for_line(&server, "serving ");
    assert!(
        line.contains("read-only") && line.contains("index only"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_eviction_pass_is_logged() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(
        repo.path(),
        &[
            "--enable-push",
            "--quota",
            "350000",
            "--quota-low",
            "250000",
            "--reserve",
            "0",
        ],
    );
    let ch = server.channel().await;
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(60 + i, 100_000)).collect();
    for b in &blobs {
        upload(&ch, &[b]).await;
    }
    let line = wait_for_line(&server, "least recently used objects");
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains("evicted ") && line.contains(" bytes stored now"),
        "{line}"
    );
    assert!(common::grpc::find_missing(&ch, &[digest(&blobs[3])])
        .await
        .unwrap()
        .is_empty());
}

#[test]
fn a_tls_client_on_a_plain_port_is_named() {
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &[]);
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let local = tcp.local_addr().unwrap();
    // The start of a TLS 1.2/1.3 ClientHello record, as any https:// client sends first.
    tcp.write_all(&[22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3])
        .unwrap();
    let line = wait_for_line(&server, "sent a TLS ClientHello to this plain-gRPC port");
    assert!(line.contains(&local.to_string()), "{line}");
    assert!(line.contains("http://"), "{line}");
}

#[test]
fn a_normal_stop_is_logged_at_the_ordinary_level() {
    let repo = tempfile::tempdir().unwrap();
    let mut server = Server::start(repo.path(), &[]);
    wait_for_line(&server, "serving ");
    assert!(server.signal_and_wait(libc::SIGTERM).success());
    let line = wait_for_line(&server, "SIGTERM: stopping");
    assert!(line.contains(" INFO "), "{line}");
    let log = server.log();
    assert!(
        !log.contains(" WARN ") && !log.contains(" ERROR "),
        "a normal start and stop warned:\n{log}"
    );
}

//! sd_notify integration, checked against a notification socket of our own (what systemd
//! does for a `Type=notify` service): READY=1 only once clients can connect, STATUS= lines,
//! WATCHDOG=1 at half the requested period, STOPPING=1 on SIGTERM, and no effect at all
//! without NOTIFY_SOCKET.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use common::{Server, BIN, TIMEOUT};
use reapi::capabilities_client::CapabilitiesClient;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

/// A path-bound datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// The next datagram, or `None` once `limit` has passed without one.
    async fn recv(&self, limit: Duration) -> Option<(Instant, String)> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(limit, self.sock.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some((
            Instant::now(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ))
    }

    /// Receives until a datagram has the line `line`; returns everything received so far.
    async fn recv_until_line(&self, line: &str) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((_, msg)) = self.recv(left).await else {
                panic!("no {line:?} within {TIMEOUT:?}; received {seen:?}");
            };
            let done = has_line(&msg, line);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// Removes anything the test runner's own environment could pass on to the server.
fn clean_env(cmd: &mut Command) {
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_once_clients_can_connect_then_stopping_on_sigterm() {
    let notify = NotifySocket::bind();
    let repo = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let port_file = scratch.path().join("port");
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd);
    cmd.args(["serve", "--bind", "127.0.0.1", "--port", "0", "--port-file"])
        .arg(&port_file)
        .arg(repo.path())
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = KillOnDrop(cmd.spawn().unwrap());

    let before_ready = notify.recv_until_line("READY=1").await;
    // At the moment READY=1 arrives the port must already take connections and answer.
    let port = read_port(&port_file).expect("READY=1 came before the port file was written");
    let url = format!("http://127.0.0.1:{port}");
    let caps = CapabilitiesClient::new(common::connect(&url).await)
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await;
    assert!(caps.is_ok(), "not serving after READY=1: {caps:?}");

    let ready = before_ready.last().unwrap();
    assert!(
        has_line(ready, &format!("STATUS=serving on 127.0.0.1:{port}")),
        "READY=1 without a serving status: {ready:?}"
    );
    assert!(
        before_ready[..before_ready.len() - 1]
            .iter()
            .any(|m| m.starts_with("STATUS=opening repository")),
        "no start-up status before READY=1: {before_ready:?}"
    );
    assert_eq!(
        before_ready
            .iter()
            .filter(|m| has_line(m, "READY=1"))
            .count(),
        1
    );

    unsafe_kill(child.0.id(), libc::SIGTERM);
    let after = notify.recv_until_line("STOPPING=1").await;
    let stopping = after.last().unwrap();
    assert!(
        stopping.lines().any(|l| l.starts_with("STATUS=SIGTERM")),
        "{stopping:?}"
    );
    let status = common::wait_bounded(&mut child.0, TIMEOUT).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_is_announced_as_a_reload() {
    let notify = NotifySocket::bind();
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start_with(repo.path(), &[], |cmd| {
        clean_env(cmd);
        cmd.env("NOTIFY_SOCKET", &notify.path);
    });
    notify.recv_until_line("READY=1").await;
    unsafe_kill(server.child.id(), libc::SIGHUP);
    let seen = notify.recv_until_line("READY=1").await;
    let reloading = seen
        .iter()
        .find(|m| has_line(m, "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {seen:?}"));
    // systemd pairs RELOADING=1 with the reload request by this CLOCK_MONOTONIC stamp.
    let stamp = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC with RELOADING=1: {reloading:?}"));
    assert!(stamp.parse::<u64>().is_ok_and(|us| us > 0), "{stamp:?}");
    let ready = seen.last().unwrap();
    assert!(
        has_line(
            ready,
            &format!("STATUS=serving on 127.0.0.1:{}", server.port)
        ),
        "{ready:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pings_at_half_the_period() {
    let notify = NotifySocket::bind();
    let repo = tempfile::tempdir().unwrap();
    let _server = Server::start_with(repo.path(), &[], |cmd| {
        clean_env(cmd);
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "1000000");
    });
    notify.recv_until_line("READY=1").await;

    let window = Duration::from_millis(2600);
    let start = Instant::now();
    let mut pings = Vec::new();
    while let Some((at, msg)) = notify.recv(window.saturating_sub(start.elapsed())).await {
        if has_line(&msg, "WATCHDOG=1") {
            pings.push(at);
        }
    }
    // 500 ms apart: about five in the window. The bounds leave room for a loaded machine;
    // the median gap shows the period, the smallest that pings do not come in bursts.
    assert!(
        (3..=8).contains(&pings.len()),
        "{} pings in {window:?}",
        pings.len()
    );
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        median >= Duration::from_millis(350) && median <= Duration::from_millis(750),
        "median ping gap {median:?} (expected about 500 ms): {gaps:?}"
    );
    assert!(
        gaps[0] >= Duration::from_millis(200),
        "ping burst: {gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_meant_for_another_process_is_ignored() {
    let notify = NotifySocket::bind();
    let repo = tempfile::tempdir().unwrap();
    let _server = Server::start_with(repo.path(), &[], |cmd| {
        clean_env(cmd);
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "200000")
            .env("WATCHDOG_PID", "1");
    });
    notify.recv_until_line("READY=1").await;
    let deadline = Instant::now() + Duration::from_millis(800);
    while let Some((_, msg)) = notify
        .recv(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        assert!(
            !has_line(&msg, "WATCHDOG=1"),
            "pinged a watchdog that WATCHDOG_PID gave to another process"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_notify_socket_nothing_changes() {
    let repo = tempfile::tempdir().unwrap();
    // A watchdog request alone (no socket to answer on) must not matter either.
    let mut server = Server::start_with(repo.path(), &[], |cmd| {
        clean_env(cmd);
        cmd.env("WATCHDOG_USEC", "100000");
    });
    let caps = CapabilitiesClient::new(server.channel().await)
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await;
    assert!(caps.is_ok(), "{caps:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = server.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_notify_socket_is_not_fatal() {
    let repo = tempfile::tempdir().unwrap();
    let gone = tempfile::tempdir().unwrap();
    let missing = gone.path().join("nobody-listens.sock");
    let log_path = gone.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = Server::start_with(repo.path(), &[], |cmd| {
        clean_env(cmd);
        cmd.env("NOTIFY_SOCKET", &missing)
            .env("WATCHDOG_USEC", "100000")
            .stderr(log);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let caps = CapabilitiesClient::new(server.channel().await)
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await;
    assert!(caps.is_ok(), "{caps:?}");
    let status = server.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status}");
    // Reported, but once: not at every watchdog ping.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(
        log.matches("could not notify the service manager").count(),
        1,
        "{log}"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_port(port_file: &Path) -> Option<u16> {
    std::fs::read_to_string(port_file).ok()?.trim().parse().ok()
}

fn unsafe_kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

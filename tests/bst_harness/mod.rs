//! Harness for end-to-end tests that drive the real BuildStream 2 client (`bst`).
//!
//! Include it from a test crate with `mod bst_harness;` (or
//! `#[path = "bst_harness/mod.rs"] mod bst_harness;`). It does not depend on
//! `tests/common`; pair it with `common::Server` for the server side, using
//! [`Project::server_log`] to keep the server's log out of the test output.
//!
//! * [`find_bst`] locates `bst` (`BST_BIN`, else `<repo>/target/bst-venv/bin/bst`, which
//!   `tests/run-all.sh` creates). When it or a sandbox runner is missing the test is
//!   skipped with a loud message, except under `CI=true`, where that is a failure.
//! * [`Project`] is a throw-away BuildStream project whose elements use `tar` sources
//!   fetched through a `file://` alias, so that hiding the upstream directory proves a
//!   client got its data from a cache server and not from upstream.
//! * [`Client`] is one user configuration with its own cache, source and log
//!   directories, so two clients never share a local cache.
//! * [`BstRun`] is the captured outcome of one bounded `bst` invocation, with assertions.
#![allow(dead_code)]

use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The BuildStream release these tests are written against (what `tests/run-all.sh`
/// installs).
pub const BST_VERSION: &str = "2.8.1";

/// Longest a single `bst` invocation may take before it (and its process group,
/// buildbox-casd included) is killed.
pub const BST_TIMEOUT: Duration = Duration::from_secs(300);

/// Size of the incompressible file in the main tarball: above the 1 MiB batch limit and
/// the 2 MiB ByteStream chunk, so transfers go through ByteStream Write/Read in chunks.
pub const BIG_FILE_SIZE: usize = 3 * 1024 * 1024 + 12345;

// ---------------------------------------------------------------------------------------
// Locating bst
// ---------------------------------------------------------------------------------------

/// A usable `bst` executable.
#[derive(Clone, Debug)]
pub struct Bst {
    pub bin: PathBuf,
    pub version: String,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when running in CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(name))))
        .unwrap_or(false)
}

fn locate_bst() -> Result<Bst, String> {
    let bin = match std::env::var_os("BST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join("target/bst-venv/bin/bst"),
    };
    if !is_executable(&bin) {
        return Err(format!("no bst executable at {}", bin.display()));
    }
    // bst refuses to start without a working sandbox runner: Debian's bubblewrap for the
    // bundled buildbox-run, or a stand-in buildbox-run on PATH.
    if !on_path("bwrap") && !on_path("buildbox-run") {
        return Err(
            "neither bwrap (Debian package bubblewrap) nor buildbox-run is on PATH; \
                    bst would fail with \"Error instantiating platform\""
                .into(),
        );
    }
    let out = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if version != BST_VERSION {
        let _ = writeln!(
            std::io::stderr(),
            "note: {} is BuildStream {version}; these tests are written for {BST_VERSION}",
            bin.display()
        );
    }
    Ok(Bst { bin, version })
}

/// Finds `bst`, or decides the test is skipped. Use as
/// `let Some(bst) = bst_harness::find_bst() else { return };`.
///
/// Under `CI=true` a missing prerequisite panics: CI must run these tests.
pub fn find_bst() -> Option<Bst> {
    static FOUND: OnceLock<Result<Bst, String>> = OnceLock::new();
    match FOUND.get_or_init(locate_bst) {
        Ok(bst) => Some(bst.clone()),
        Err(why) if in_ci() => panic!(
            "BuildStream end-to-end prerequisites missing under CI=true: {why}. \
             Run the suite through tests/run-all.sh, which installs them."
        ),
        Err(why) => {
            // Written straight to stderr, past libtest's output capture, so a skip is
            // visible even when the test "passes".
            let _ = writeln!(
                std::io::stderr(),
                "\n\
                 ************************************************************************\n\
                 * SKIPPING BuildStream end-to-end test: {why}\n\
                 * Run tests/run-all.sh (installs bubblewrap and target/bst-venv with\n\
                 * buildstream=={BST_VERSION}), or set BST_BIN=/path/to/bst.\n\
                 ************************************************************************"
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// Project
// ---------------------------------------------------------------------------------------

/// One tarball the project fetches through the `upstream:` alias.
#[derive(Clone, Debug)]
pub struct Tarball {
    /// File name in the upstream directory, e.g. `pkg.tar.gz`.
    pub name: String,
    /// Directory holding the tree that was packed (what a checkout must reproduce).
    pub tree: PathBuf,
    /// sha256 of the tarball (the tar source's `ref`).
    pub sha256: String,
}

/// A throw-away BuildStream project plus scratch space for its clients and servers.
///
/// Elements (all `import`/`stack`/`compose`: none needs a sandbox):
/// * `base.bst`: import of `pkg.tar.gz`, a tree with a regular file, an executable, a
///   symlink, a dangling-free relative symlink into a nested directory, nested
///   directories and a large incompressible file ([`BIG_FILE_SIZE`]);
/// * `extra.bst`: import of `other.tar.gz` into `extra/`;
/// * `combo.bst`: import of `pkg.tar.gz` (the very same source as `base.bst`) plus
///   `third.tar.gz` into `third/`, for per-source cache hits;
/// * `stack.bst`: stack of `base.bst` and `extra.bst`;
/// * `compose.bst`: compose of `base.bst` and `extra.bst`.
pub struct Project {
    tmp: Option<tempfile::TempDir>,
    /// Scratch root: everything of this project lives below it.
    pub root: PathBuf,
    /// The project directory (holds project.conf).
    pub dir: PathBuf,
    /// The directory the `upstream:` alias points at.
    pub upstream: PathBuf,
    hidden: PathBuf,
    pub pkg: Tarball,
    pub other: Tarball,
    pub third: Tarball,
    /// sha256 of the large file inside `pkg.tar.gz`.
    pub big_sha256: String,
    /// Expected checkout of `compose.bst` (pkg tree plus `extra/`).
    pub expected_compose: PathBuf,
    /// Expected checkout of `combo.bst` (pkg tree plus `third/`).
    pub expected_combo: PathBuf,
}

/// Deterministic, incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes the main package tree into `dir`; returns the sha256 of its large file.
fn write_pkg_tree(dir: &Path, tag: &str) -> String {
    write_file(
        &dir.join("README.txt"),
        format!("test tree for {tag}\n").as_bytes(),
        0o644,
    );
    write_file(
        &dir.join("bin/hello.sh"),
        format!("#!/bin/sh\necho hello from {tag}\n").as_bytes(),
        0o755,
    );
    write_file(
        &dir.join("share/doc/deep/nested.txt"),
        b"nested file\n",
        0o644,
    );
    write_file(&dir.join("share/empty.txt"), b"", 0o644);
    symlink("README.txt", dir.join("link-to-readme")).unwrap();
    symlink("../../README.txt", dir.join("share/doc/up-link")).unwrap();
    symlink("bin", dir.join("link-to-dir")).unwrap();
    let seed = u64::from_le_bytes(Sha256::digest(tag.as_bytes())[..8].try_into().unwrap());
    let big = noise(seed, BIG_FILE_SIZE);
    write_file(&dir.join("data/big.bin"), &big, 0o644);
    sha256_hex(&big)
}

fn make_tarball(upstream: &Path, name: &str, tree_parent: &Path, top: &str) -> Tarball {
    let tarball = upstream.join(name);
    let status = Command::new("tar")
        .arg("-C")
        .arg(tree_parent)
        .arg("-czf")
        .arg(&tarball)
        .arg(top)
        .status()
        .expect("running tar");
    assert!(status.success(), "tar failed for {name}");
    Tarball {
        name: name.to_owned(),
        tree: tree_parent.join(top),
        sha256: sha256_hex(&fs::read(&tarball).unwrap()),
    }
}

/// Copies a tree (files, modes, symlinks) from `from` into `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
            fs::set_permissions(&dst, meta.permissions()).unwrap();
        }
    }
}

fn tar_source(url: &str, sha: &str, directory: Option<&str>) -> String {
    let mut s = format!("- kind: tar\n  url: upstream:{url}\n  ref: {sha}\n");
    if let Some(d) = directory {
        writeln!(s, "  directory: {d}").unwrap();
    }
    s
}

impl Project {
    /// Creates the project. `tag` names it (letters, digits, `-`, `_`) and seeds the
    /// content, so different tests produce different artifacts.
    pub fn new(tag: &str) -> Project {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("bst-e2e-{tag}-"))
            .tempdir()
            .unwrap();
        let root = tmp.path().to_owned();
        let dir = root.join("project");
        let upstream = root.join("upstream");
        let hidden = root.join("upstream-hidden");
        let inputs = root.join("inputs");
        for d in [&dir.join("elements"), &upstream, &hidden, &inputs] {
            fs::create_dir_all(d).unwrap();
        }

        let big_sha256 = write_pkg_tree(&inputs.join("pkg"), tag);
        write_file(
            &inputs.join("other/other.txt"),
            format!("other tarball of {tag}\n").as_bytes(),
            0o644,
        );
        write_file(&inputs.join("other/tool"), b"#!/bin/sh\nexit 0\n", 0o755);
        write_file(
            &inputs.join("third/third.txt"),
            format!("third tarball of {tag}\n").as_bytes(),
            0o600,
        );
        let pkg = make_tarball(&upstream, "pkg.tar.gz", &inputs, "pkg");
        let other = make_tarball(&upstream, "other.tar.gz", &inputs, "other");
        let third = make_tarball(&upstream, "third.tar.gz", &inputs, "third");

        let expected_compose = root.join("expected/compose");
        copy_tree(&pkg.tree, &expected_compose);
        copy_tree(&other.tree, &expected_compose.join("extra"));
        let expected_combo = root.join("expected/combo");
        copy_tree(&pkg.tree, &expected_combo);
        copy_tree(&third.tree, &expected_combo.join("third"));

        let name = format!("e2e-{tag}");
        fs::write(
            dir.join("project.conf"),
            format!(
                "name: {name}\nmin-version: 2.0\nelement-path: elements\n\
                 aliases:\n  upstream: file://{}/\n",
                upstream.display()
            ),
        )
        .unwrap();
        let el = |file: &str, body: String| fs::write(dir.join("elements").join(file), body);
        el(
            "base.bst",
            format!(
                "kind: import\nsources:\n{}",
                tar_source("pkg.tar.gz", &pkg.sha256, None)
            ),
        )
        .unwrap();
        el(
            "extra.bst",
            format!(
                "kind: import\nsources:\n{}",
                tar_source("other.tar.gz", &other.sha256, Some("extra"))
            ),
        )
        .unwrap();
        el(
            "combo.bst",
            format!(
                "kind: import\nsources:\n{}{}",
                tar_source("pkg.tar.gz", &pkg.sha256, None),
                tar_source("third.tar.gz", &third.sha256, Some("third"))
            ),
        )
        .unwrap();
        el(
            "stack.bst",
            "kind: stack\ndepends:\n- base.bst\n- extra.bst\n".into(),
        )
        .unwrap();
        el(
            "compose.bst",
            "kind: compose\nbuild-depends:\n- base.bst\n- extra.bst\n".into(),
        )
        .unwrap();

        Project {
            tmp: Some(tmp),
            root,
            dir,
            upstream,
            hidden,
            pkg,
            other,
            third,
            big_sha256,
            expected_compose,
            expected_combo,
        }
    }

    /// Moves one upstream tarball out of reach of the `upstream:` alias.
    pub fn hide_upstream_file(&self, name: &str) {
        fs::rename(self.upstream.join(name), self.hidden.join(name)).unwrap();
    }

    /// Undoes [`Project::hide_upstream_file`].
    pub fn restore_upstream_file(&self, name: &str) {
        fs::rename(self.hidden.join(name), self.upstream.join(name)).unwrap();
    }

    /// Hides every upstream tarball: from now on only caches can provide the data.
    pub fn hide_upstream(&self) {
        for t in [&self.pkg, &self.other, &self.third] {
            if self.upstream.join(&t.name).exists() {
                self.hide_upstream_file(&t.name);
            }
        }
    }

    /// Puts every hidden tarball back.
    pub fn restore_upstream(&self) {
        for t in [&self.pkg, &self.other, &self.third] {
            if self.hidden.join(&t.name).exists() {
                self.restore_upstream_file(&t.name);
            }
        }
    }

    /// A fresh directory below the project's scratch root.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.root.join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// Path of a server's log file (printed if the test fails).
    pub fn server_log_path(&self, name: &str) -> PathBuf {
        self.scratch("server-logs").join(format!("{name}.log"))
    }

    /// For `common::Server::start_with`: sends the server's stdout and stderr to
    /// `server-logs/<name>.log`, which is printed if the test fails.
    pub fn server_log(&self, name: &str) -> impl FnOnce(&mut Command) {
        let path = self.server_log_path(name);
        move |cmd: &mut Command| {
            let f = fs::File::create(&path).unwrap();
            cmd.stdout(f.try_clone().unwrap()).stderr(f);
        }
    }

    /// A client with its own local cache and the given remotes.
    pub fn client(&self, name: &str, artifacts: &[Remote], source_caches: &[Remote]) -> Client {
        Client::new(self, name, artifacts, source_caches, "")
    }

    /// Like [`Project::client`], appending `extra_yaml` to the user configuration.
    pub fn client_with(
        &self,
        name: &str,
        artifacts: &[Remote],
        source_caches: &[Remote],
        extra_yaml: &str,
    ) -> Client {
        Client::new(self, name, artifacts, source_caches, extra_yaml)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = self.root.join("server-logs");
        if let Ok(entries) = fs::read_dir(&logs) {
            for e in entries.flatten() {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("----- server log {} (last lines) -----", e.path().display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        if std::env::var_os("BST_E2E_KEEP").is_some() {
            if let Some(tmp) = self.tmp.take() {
                eprintln!("BST_E2E_KEEP: kept {}", tmp.keep().display());
            }
        } else {
            eprintln!(
                "(set BST_E2E_KEEP=1 to keep {} for inspection)",
                self.root.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// User configuration
// ---------------------------------------------------------------------------------------

/// The `type:` of a cache server entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteType {
    All,
    Index,
    Storage,
}

/// One entry of `artifacts: servers:` or `source-caches: servers:`.
#[derive(Clone, Debug)]
pub struct Remote {
    pub url: String,
    pub push: bool,
    pub kind: RemoteType,
    pub instance_name: Option<String>,
    /// `auth:` keys (`server-cert`, `client-cert`, `client-key`, `access-token`, ...).
    pub auth: Vec<(String, String)>,
}

impl Remote {
    /// A pull-only remote of type `all`.
    pub fn new(url: impl Into<String>) -> Remote {
        Remote {
            url: url.into(),
            push: false,
            kind: RemoteType::All,
            instance_name: None,
            auth: Vec::new(),
        }
    }
    pub fn push(mut self, push: bool) -> Remote {
        self.push = push;
        self
    }
    pub fn kind(mut self, kind: RemoteType) -> Remote {
        self.kind = kind;
        self
    }
    pub fn instance_name(mut self, name: &str) -> Remote {
        self.instance_name = Some(name.to_owned());
        self
    }
    pub fn auth(mut self, key: &str, value: impl AsRef<Path>) -> Remote {
        self.auth
            .push((key.to_owned(), value.as_ref().display().to_string()));
        self
    }

    fn yaml(&self) -> String {
        let mut s = format!("  - url: {}\n    push: {}\n", self.url, self.push);
        let kind = match self.kind {
            RemoteType::All => "all",
            RemoteType::Index => "index",
            RemoteType::Storage => "storage",
        };
        writeln!(s, "    type: {kind}").unwrap();
        if let Some(i) = &self.instance_name {
            writeln!(s, "    instance-name: {i}").unwrap();
        }
        if !self.auth.is_empty() {
            s.push_str("    auth:\n");
            for (k, v) in &self.auth {
                writeln!(s, "      {k}: {v}").unwrap();
            }
        }
        s
    }
}

/// Renders a `buildstream.conf` section (`artifacts` or `source-caches`).
pub fn servers_yaml(section: &str, remotes: &[Remote]) -> String {
    if remotes.is_empty() {
        return String::new();
    }
    let mut s = format!("{section}:\n  servers:\n");
    for r in remotes {
        s.push_str(&r.yaml());
    }
    s
}

/// One BuildStream user: a user configuration with private cache/source/log
/// directories (so its local cache starts empty and is never shared).
pub struct Client {
    pub name: String,
    pub root: PathBuf,
    pub config: PathBuf,
    pub cachedir: PathBuf,
    pub sourcedir: PathBuf,
    pub logdir: PathBuf,
    project_dir: PathBuf,
    runs: AtomicUsize,
}

impl Client {
    fn new(
        project: &Project,
        name: &str,
        artifacts: &[Remote],
        source_caches: &[Remote],
        extra_yaml: &str,
    ) -> Client {
        let root = project.root.join("clients").join(name);
        assert!(!root.exists(), "client {name} already exists");
        let (cachedir, sourcedir, logdir) =
            (root.join("cache"), root.join("sources"), root.join("logs"));
        for d in [&cachedir, &sourcedir, &logdir, &root.join("xdg")] {
            fs::create_dir_all(d).unwrap();
        }
        let config = root.join("buildstream.conf");
        // bst keeps 5% of the disk free by default, and its casd then cleans up in a
        // loop (and the client hangs) on a machine whose disk is over 95% full, such
        // as a shared one with a few build trees on it: the tests need only a little.
        let mut yaml = format!(
            "cachedir: {}\nsourcedir: {}\nlogdir: {}\ncache:\n  reserved-disk-space: 256M\n",
            cachedir.display(),
            sourcedir.display(),
            logdir.display()
        );
        yaml.push_str(&servers_yaml("artifacts", artifacts));
        yaml.push_str(&servers_yaml("source-caches", source_caches));
        yaml.push_str(extra_yaml);
        fs::write(&config, yaml).unwrap();
        Client {
            name: name.to_owned(),
            root,
            config,
            cachedir,
            sourcedir,
            logdir,
            project_dir: project.dir.clone(),
            runs: AtomicUsize::new(0),
        }
    }

    /// The user configuration this client runs with.
    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.config).unwrap()
    }

    /// Runs `bst <args>` in the project, bounded by [`BST_TIMEOUT`].
    pub fn run(&self, bst: &Bst, args: &[&str]) -> BstRun {
        self.run_with_timeout(bst, args, BST_TIMEOUT)
    }

    /// Runs `bst <args>`; after `limit` the whole process group is killed and the test
    /// fails.
    pub fn run_with_timeout(&self, bst: &Bst, args: &[&str], limit: Duration) -> BstRun {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let out_path = self.root.join(format!("run-{n:02}.out"));
        let out = fs::File::create(&out_path).unwrap();
        let xdg = self.root.join("xdg");
        let mut cmd = Command::new(&bst.bin);
        cmd.args(["--no-colors", "--no-interactive", "--error-lines", "80"])
            .arg("--config")
            .arg(&self.config)
            .arg("--directory")
            .arg(&self.project_dir)
            .args(args)
            .current_dir(&self.project_dir)
            .env("XDG_CACHE_HOME", xdg.join("cache"))
            .env("XDG_CONFIG_HOME", xdg.join("config"))
            .env("XDG_DATA_HOME", xdg.join("data"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Own process group, so a timeout kills buildbox-casd too.
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bst.bin.display()));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() >= limit {
                // SAFETY: kill(2) on the process group of a child we spawned.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                panic!(
                    "bst {} (client {}) timed out after {limit:?}; output so far:\n{}",
                    args.join(" "),
                    self.name,
                    fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        let output = String::from_utf8_lossy(&fs::read(&out_path).unwrap()).into_owned();
        if output.contains("Error instantiating platform") {
            panic!(
                "bst could not start its sandbox (install bubblewrap, e.g. via \
                 tests/run-all.sh):\n{output}"
            );
        }
        BstRun {
            description: format!("bst {} (client {})", args.join(" "), self.name),
            status,
            output,
            elapsed: started.elapsed(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outcome of a bst run
// ---------------------------------------------------------------------------------------

/// Counts from a "Pipeline Summary" line such as `Pull Queue: processed 2, skipped 0,
/// failed 0`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub processed: u32,
    pub skipped: u32,
    pub failed: u32,
}

/// Text that means a remote was unusable or misbehaved.
pub const REMOTE_TROUBLE: &[&str] = &[
    "Failed to initialize remote",
    "Remote initialisation failed",
    "does not implement",
    "Failed to push",
    "Failed to pull",
    "Failed to upload blob",
    "does not have blob",
    "Error fetching",
    "AssetCacheError",
    "CASRemoteError",
];

/// The captured result of one `bst` invocation.
pub struct BstRun {
    pub description: String,
    pub status: ExitStatus,
    /// stdout and stderr, interleaved as written.
    pub output: String,
    pub elapsed: Duration,
}

impl BstRun {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "{}: {why}\nexit status: {}\n----- output -----\n{}\n------------------",
            self.description, self.status, self.output
        )
    }

    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        if !self.success() {
            self.fail("expected success");
        }
        self
    }

    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        if self.success() {
            self.fail("expected a non-zero exit status");
        }
        self
    }

    #[track_caller]
    pub fn assert_contains(&self, needle: &str) -> &Self {
        if !self.output.contains(needle) {
            self.fail(&format!("expected the output to contain {needle:?}"));
        }
        self
    }

    #[track_caller]
    pub fn assert_not_contains(&self, needle: &str) -> &Self {
        if self.output.contains(needle) {
            self.fail(&format!("expected the output not to contain {needle:?}"));
        }
        self
    }

    /// Lines containing "WARNING" or any of [`REMOTE_TROUBLE`].
    pub fn remote_trouble(&self) -> Vec<&str> {
        self.output
            .lines()
            .filter(|l| l.contains("WARNING") || REMOTE_TROUBLE.iter().any(|p| l.contains(p)))
            .collect()
    }

    /// Asserts that every configured remote initialised and no transfer failed: bst
    /// reports such problems only as warnings and still exits 0.
    #[track_caller]
    pub fn assert_remotes_ok(&self) -> &Self {
        let bad = self.remote_trouble();
        if !bad.is_empty() {
            self.fail(&format!("remote problems reported:\n{}", bad.join("\n")));
        }
        self
    }

    /// The counts of `<name> Queue` in the pipeline summary (`Pull`, `Fetch`, `Build`,
    /// `Push`, `Src-push`), if that queue ran.
    pub fn queue(&self, name: &str) -> Option<QueueStats> {
        let prefix = format!("{name} Queue:");
        let line = self
            .output
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with(&prefix))?;
        let mut stats = QueueStats::default();
        for part in line[prefix.len()..].split(',') {
            let mut words = part.split_whitespace();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let n: u32 = n.parse().ok()?;
            match what {
                "processed" => stats.processed = n,
                "skipped" => stats.skipped = n,
                "failed" => stats.failed = n,
                _ => {}
            }
        }
        Some(stats)
    }

    /// Asserts the summary of queue `name` (see [`BstRun::queue`]).
    #[track_caller]
    pub fn assert_queue(&self, name: &str, processed: u32, skipped: u32, failed: u32) -> &Self {
        let want = QueueStats {
            processed,
            skipped,
            failed,
        };
        match self.queue(name) {
            Some(got) if got == want => self,
            got => self.fail(&format!("{name} Queue: expected {want:?}, got {got:?}")),
        }
    }

    /// Asserts that queue `name` either did not run or processed nothing.
    #[track_caller]
    pub fn assert_queue_idle(&self, name: &str) -> &Self {
        match self.queue(name) {
            Some(q) if q.processed != 0 || q.failed != 0 => {
                self.fail(&format!("{name} Queue was expected to do nothing: {q:?}"))
            }
            _ => self,
        }
    }

    /// Number of output lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.output.lines().filter(|l| l.contains(needle)).count()
    }
}

// ---------------------------------------------------------------------------------------
// Inspecting trees and server repositories
// ---------------------------------------------------------------------------------------

/// Number of regular files below `dir` (0 if it does not exist).
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

/// Hash of the empty blob, a file in every server repository.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Number of CAS objects in a server repository (casd layout `cas/objects/xx/...`),
/// not counting the empty blob that every repository holds from the start.
pub fn cas_object_count(repo: &Path) -> usize {
    count_files(&repo.join("cas/objects")) - usize::from(repo_has_blob(repo, EMPTY_SHA256))
}

/// Number of Remote Asset entries in a server repository (`assets/objects/xx/...`).
pub fn asset_count(repo: &Path) -> usize {
    count_files(&repo.join("assets/objects"))
}

/// Whether the repository holds the blob with this sha256.
pub fn repo_has_blob(repo: &Path, sha256: &str) -> bool {
    repo.join("cas/objects")
        .join(&sha256[..2])
        .join(&sha256[2..])
        .is_file()
}

/// Whether any regular file below `dir` has this sha256 (e.g. a downloaded tarball).
pub fn tree_has_file_with_sha256(dir: &Path, sha256: &str) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| match e.file_type() {
        Ok(t) if t.is_dir() => tree_has_file_with_sha256(&e.path(), sha256),
        Ok(t) if t.is_file() => fs::read(e.path())
            .map(|d| sha256_hex(&d) == sha256)
            .unwrap_or(false),
        _ => false,
    })
}

/// What a checkout must preserve of one path.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { sha256: String, executable: bool },
    Symlink(PathBuf),
}

/// Describes every path below `dir` (relative path -> [`Entry`]).
pub fn describe_tree(dir: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap().to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, Entry::Symlink(fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(base, &path, out);
            } else {
                out.insert(
                    rel,
                    Entry::File {
                        sha256: sha256_hex(&fs::read(&path).unwrap()),
                        executable: meta.permissions().mode() & 0o100 != 0,
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that `actual` has exactly the paths of `expected`, with identical file
/// contents, executable bits, and symlink targets.
#[track_caller]
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let (want, got) = (describe_tree(expected), describe_tree(actual));
    if want == got {
        return;
    }
    let mut diff = String::new();
    for (p, w) in &want {
        match got.get(p) {
            None => writeln!(diff, "missing: {} ({w:?})", p.display()).unwrap(),
            Some(g) if g != w => {
                writeln!(diff, "differs: {}: want {w:?}, got {g:?}", p.display()).unwrap()
            }
            _ => {}
        }
    }
    for (p, g) in &got {
        if !want.contains_key(p) {
            writeln!(diff, "unexpected: {} ({g:?})", p.display()).unwrap();
        }
    }
    panic!(
        "checkout {} differs from {}:\n{diff}",
        actual.display(),
        expected.display()
    );
}

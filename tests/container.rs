//! The container image, built from `Containerfile` exactly as docs/container.md says for
//! an offline machine: a static release binary, then `podman build --target prebuilt
//! --pull=never`. The test then uses nothing but the image:
//!
//! * certificates are made by the image's own subcommands, on a named volume;
//! * a push instance (TLS, client certificates required) and a pull-only instance (TLS)
//!   share one data volume, each published on a loopback port podman picks;
//! * the real `bst` pushes through the one and pulls into a fresh cache through the other;
//! * the image's HEALTHCHECK answers (configured per container with `-e`);
//! * `podman stop` takes well under two seconds (the binary handles SIGTERM as PID 1);
//! * the data outlives the containers: a new container with the image's default command
//!   serves it to another fresh client.
//!
//! Needs root, podman (installed and configured by tests/scripts/setup-podman.sh when
//! missing) and bst (tests/run-all.sh). Without them the test is skipped loudly, or fails
//! under CI=true.
#[path = "bst_harness/mod.rs"]
mod bst_harness;

use bst_harness::{assert_same_tree, find_bst, in_ci, repo_has_blob, Bst, Client, Project, Remote};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Repository of the test images; each run tags its own (`:test-PID`) and removes it, so
/// concurrent runs on one machine never use or delete each other's image.
const IMAGE_REPO: &str = "localhost/bst-artifact-server";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// As docs/container.md says: static (the image has no libc) and without the line tables
/// the release profile keeps (a quarter of the size; symbol names stay for backtraces).
const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static -C strip=debuginfo";
/// What .dockerignore lets through besides the default Cargo output path: where a binary
/// built into a CARGO_TARGET_DIR outside the repository is copied (one directory per run).
const STAGING_DIR: &str = "target/container-prebuilt";
/// Longest `podman stop` may take: the server drains and exits on SIGTERM at once, while
/// a PID 1 that ignored the signal would be killed only after podman's 10 s grace period.
const STOP_LIMIT: Duration = Duration::from_secs(2);
/// The image's size budget (docs/container.md records the measured size). Forgetting
/// `strip=debuginfo` alone would blow it: the line tables quadruple the binary.
const SIZE_LIMIT: u64 = 15_000_000;
/// Longest the static release build may take (a cold build on a 2-core CI machine takes a
/// few minutes; later runs only relink).
const BUILD_LIMIT: Duration = Duration::from_secs(40 * 60);
const PODMAN_LIMIT: Duration = Duration::from_secs(120);
const READY_LIMIT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The tests' own containers.conf (tests/scripts/setup-podman.sh writes it; the machine's
/// configuration under /etc is never changed).
fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/podman/containers.conf"))
}

/// Runs a command under timeout(1), so a hung podman fails the test instead of stalling it.
fn run_bounded(limit: Duration, program: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["--kill-after=5", &limit.as_secs().to_string(), program])
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn podman_output(args: &[&str]) -> Output {
    run_bounded(PODMAN_LIMIT, "podman", args)
}

/// Runs podman, asserting success; returns its trimmed stdout.
#[track_caller]
fn podman(args: &[&str]) -> String {
    let out = podman_output(args);
    assert!(
        out.status.success(),
        "podman {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Skips (loudly) or, under CI, fails.
fn skip(why: &str) {
    if in_ci() {
        panic!("container test prerequisites missing under CI=true: {why}");
    }
    // Straight to stderr, past libtest's output capture, so the skip shows even though
    // the test "passes".
    let _ = writeln!(
        std::io::stderr(),
        "\n************************************************************************\n\
         * SKIPPING container test: {why}\n\
         ************************************************************************"
    );
}

/// Root, plus podman made ready by tests/scripts/setup-podman.sh (which installs and
/// configures it when missing, and does nothing otherwise).
fn podman_ready() -> bool {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        skip("needs root (podman builds and runs the image as root here)");
        return false;
    }
    let script = repo_root().join("tests/scripts/setup-podman.sh");
    let out = run_bounded(
        Duration::from_secs(600),
        "bash",
        &[script.to_str().unwrap()],
    );
    if !out.status.success() {
        skip(&format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            text(&out)
        ));
        return false;
    }
    true
}

/// Builds the statically linked release binary the way docs/container.md says, into the
/// Cargo target directory in use (CARGO_TARGET_DIR or <repo>/target), and returns it.
fn build_static_binary() -> PathBuf {
    let root = repo_root();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    };
    let log = target_dir.join("container-static-build.log");
    std::fs::create_dir_all(&target_dir).unwrap();
    let log_file = std::fs::File::create(&log).unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // An explicit --target keeps these artifacts (built with other RUSTFLAGS) apart from
    // the ordinary ones: neither build invalidates the other, so a second run only checks.
    let mut child = Command::new(cargo)
        .args(["build", "--release", "--target", TRIPLE])
        .args(["--bin", "bst-artifact-server"])
        .env("RUSTFLAGS", STATIC_RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("starting cargo build");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > BUILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "static build took longer than {BUILD_LIMIT:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "static build failed:\n{output}");
    eprintln!("static release build: {:?}", started.elapsed());
    let bin = target_dir.join(TRIPLE).join("release/bst-artifact-server");
    assert!(
        !has_program_interpreter(&bin),
        "{} is dynamically linked: it cannot run in a FROM scratch image",
        bin.display()
    );
    bin
}

/// Whether an ELF64 little-endian executable asks for a dynamic loader (PT_INTERP).
fn has_program_interpreter(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF", "{} is not ELF", path.display());
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// Builds the image `image` from the repository's own context with the `prebuilt` stage,
/// never pulling, checks its configuration and returns its size in bytes.
fn build_image(image: &str, binary: &Path) -> u64 {
    let root = repo_root();
    // The binary must be inside the build context: the default Cargo path as documented,
    // or a copy under the one other path .dockerignore lets through.
    let staging = root.join(STAGING_DIR).join(std::process::id().to_string());
    let in_context = match binary.strip_prefix(&root) {
        Ok(rel) => rel.to_owned(),
        Err(_) => {
            std::fs::create_dir_all(&staging).unwrap();
            std::fs::copy(binary, staging.join("bst-artifact-server")).unwrap();
            staging
                .join("bst-artifact-server")
                .strip_prefix(&root)
                .unwrap()
                .to_owned()
        }
    };
    let started = Instant::now();
    let version_arg = format!("VERSION={}", env!("CARGO_PKG_VERSION"));
    let prebuilt_arg = format!("PREBUILT={}", in_context.display());
    podman(&[
        "build",
        "--pull=never",
        "--format",
        "docker",
        "--target",
        "prebuilt",
        "--build-arg",
        &version_arg,
        "--build-arg",
        &prebuilt_arg,
        "--tag",
        image,
        "--file",
        root.join("Containerfile").to_str().unwrap(),
        root.to_str().unwrap(),
    ]);
    eprintln!("podman build --target prebuilt: {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&staging);
    // The parent too, once no other run stages a binary there.
    let _ = std::fs::remove_dir(root.join(STAGING_DIR));

    let inspect = |template: &str| podman(&["image", "inspect", "--format", template, image]);
    let size: u64 = inspect("{{.Size}}").parse().unwrap();
    assert_eq!(inspect("{{.Config.User}}"), "10001:10001");
    assert_eq!(
        inspect("{{json .Config.Entrypoint}}"),
        r#"["/bst-artifact-server"]"#
    );
    assert_eq!(
        inspect("{{json .Config.Cmd}}"),
        r#"["serve","--port","11001","/data"]"#
    );
    let exposed = inspect("{{json .Config.ExposedPorts}}");
    assert!(
        exposed.contains("11001/tcp") && exposed.contains("11002/tcp"),
        "{exposed}"
    );
    let volumes = inspect("{{json .Config.Volumes}}");
    assert!(
        volumes.contains("/data") && volumes.contains("/certs"),
        "{volumes}"
    );
    let health = inspect("{{json .HealthCheck.Test}}");
    assert!(
        health.contains(r#""/bst-artifact-server","healthcheck""#),
        "HEALTHCHECK missing or wrong (was the image built with --format docker?): {health}"
    );
    for (label, want) in [
        ("title", "bst-artifact-server"),
        ("licenses", "Apache-2.0"),
        ("version", env!("CARGO_PKG_VERSION")),
    ] {
        let got = inspect(&format!(
            r#"{{{{index .Labels "org.opencontainers.image.{label}"}}}}"#
        ));
        assert_eq!(got, want, "label org.opencontainers.image.{label}");
    }
    size
}

/// Runs a one-off command in a throw-away container of `image`.
#[track_caller]
fn run_image(image: &str, mounts: &[&str], args: &[&str]) -> String {
    // No health check for one-off commands: there is no server to check.
    let mut all = vec![
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        "--no-healthcheck",
    ];
    for m in mounts {
        all.extend(["-v", m]);
    }
    all.push(image);
    all.extend_from_slice(args);
    podman(&all)
}

/// The image, containers and volumes of this test run, removed when dropped (after
/// printing the containers' logs if the test is failing).
struct Resources {
    image: String,
    prefix: String,
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Resources {
    fn new() -> Resources {
        Resources {
            image: format!("{IMAGE_REPO}:test-{}", std::process::id()),
            prefix: format!("bst-ct-{}", std::process::id()),
            containers: Vec::new(),
            volumes: Vec::new(),
        }
    }

    /// Creates a named volume and returns (name, its directory on the host).
    fn volume(&mut self, what: &str) -> (String, PathBuf) {
        let name = format!("{}-{what}", self.prefix);
        let _ = podman_output(&["volume", "rm", "-f", &name]);
        podman(&["volume", "create", &name]);
        self.volumes.push(name.clone());
        let dir = podman(&["volume", "inspect", "--format", "{{.Mountpoint}}", &name]);
        (name, PathBuf::from(dir))
    }

    /// Starts a detached container (`podman run -d ... IMAGE args`), publishing
    /// `container_port` on a loopback port podman picks; waits until its HEALTHCHECK
    /// passes and returns the published host port.
    ///
    /// With `notify`, runs it as systemd would with `--sdnotify=container` and asserts
    /// that the server's READY=1 reaches the notify socket podman was given.
    fn start(
        &mut self,
        what: &str,
        options: &[&str],
        container_port: u16,
        args: &[&str],
        notify: bool,
    ) -> u16 {
        let name = format!("{}-{what}", self.prefix);
        let _ = podman_output(&["rm", "-f", &name]);
        let publish = format!("127.0.0.1::{container_port}");
        let mut all = vec!["run", "-d", "--pull=never", "--name", &name, "-p", &publish];
        if notify {
            all.push("--sdnotify=container");
        }
        all.extend_from_slice(options);
        all.push(&self.image);
        all.extend_from_slice(args);
        self.containers.push(name.clone());
        if notify {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut cmd = Command::new("timeout");
            cmd.env("CONTAINERS_CONF", containers_conf());
            cmd.args([
                "--kill-after=5",
                &PODMAN_LIMIT.as_secs().to_string(),
                "podman",
            ])
            .args(&all)
            .env("NOTIFY_SOCKET", &path)
            .stdin(Stdio::null());
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "podman run: {}", text(&out));
            let started = Instant::now();
            let mut seen = String::new();
            while !seen.lines().any(|l| l == "READY=1") {
                assert!(
                    started.elapsed() < READY_LIMIT,
                    "no READY=1 on the notify socket; got {seen:?}"
                );
                let mut buf = [0u8; 4096];
                if let Ok(n) = socket.recv(&mut buf) {
                    seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                    seen.push('\n');
                }
            }
        } else {
            podman(&all);
        }

        let mapping = podman(&["port", &name, &format!("{container_port}/tcp")]);
        let port: u16 = mapping
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected `podman port` output {mapping:?}"));

        let started = Instant::now();
        loop {
            let check = podman_output(&["healthcheck", "run", &name]);
            if check.status.success() {
                break;
            }
            let state = podman(&["inspect", "--format", "{{.State.Status}}", &name]);
            assert!(
                state == "running" && started.elapsed() < READY_LIMIT,
                "container {name} did not become healthy (state {state}; last check: {})\n\
                 logs:\n{}",
                text(&check),
                podman(&["logs", &name])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{name}: healthy after {:?}", started.elapsed());
        port
    }

    /// `podman stop`s a container, asserting it stops quickly and cleanly.
    fn stop(&self, what: &str) -> Duration {
        let name = format!("{}-{what}", self.prefix);
        let started = Instant::now();
        podman(&["stop", "--time", "10", &name]);
        let took = started.elapsed();
        let code = podman(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
        assert_eq!(
            code,
            "0",
            "{name} exited with status {code} on SIGTERM; logs:\n{}",
            podman(&["logs", &name])
        );
        assert!(
            took < STOP_LIMIT,
            "podman stop {name} took {took:?}: SIGTERM as PID 1 is not handled promptly"
        );
        eprintln!("{name}: podman stop took {took:?}");
        took
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        for c in &self.containers {
            if std::thread::panicking() {
                let logs = podman_output(&["logs", "--tail", "60", c]);
                eprintln!("----- podman logs {c} -----\n{}", text(&logs));
            }
            // -v: also the anonymous volume podman made for an unmounted VOLUME path.
            let _ = podman_output(&["rm", "-f", "-v", "--time", "0", c]);
        }
        for v in &self.volumes {
            let _ = podman_output(&["volume", "rm", "-f", v]);
        }
        // Deletes this run's image; buildah's cached layers of the shared stages stay, so
        // the next run's build is as quick.
        let _ = podman_output(&["rmi", &self.image]);
    }
}

/// `bst artifact checkout` of `element`, compared with the expected tree.
#[track_caller]
fn checkout_and_compare(
    bst: &Bst,
    project: &Project,
    client: &Client,
    element: &str,
    expected: &Path,
) {
    let dir = project.root.join(format!("checkout-{}", client.name));
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

/// `bst artifact pull` of everything into a client whose cache is empty.
#[track_caller]
fn pull_everything(bst: &Bst, client: &Client) {
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
        .assert_remotes_ok()
        .assert_queue("Pull", 4, 0, 0);
}

#[test]
fn image_serves_bst_over_tls_and_keeps_data_on_its_volume() {
    let test_started = Instant::now();
    if !podman_ready() {
        return;
    }
    let Some(bst) = find_bst() else { return };

    let mut res = Resources::new();
    let image = res.image.clone();
    let binary = build_static_binary();
    let size = build_image(&image, &binary);
    eprintln!("image {image}: {size} bytes ({:.1} MB)", size as f64 / 1e6);
    assert!(
        size < SIZE_LIMIT,
        "image is {size} bytes, more than {SIZE_LIMIT}"
    );

    let project = Project::new("container");
    let (data, data_dir) = res.volume("data");
    let (certs, certs_dir) = res.volume("certs");
    let client_dir = project.scratch("client-certs");

    // Certificates, made by the image itself. The certs volume is a new named volume
    // mounted without :U: the image's /certs (owned by the server's user) makes it
    // writable. The host directory for the client's key needs :U.
    let certs_rw = format!("{certs}:/certs");
    let client_rw = format!("{}:/client:U", client_dir.display());
    let client_ro = format!("{}:/client:ro", client_dir.display());
    run_image(
        &image,
        &[&certs_rw],
        &[
            "gen-server-cert",
            "--cn",
            "localhost",
            "--san",
            "127.0.0.1",
            "--dir",
            "/certs",
        ],
    );
    run_image(
        &image,
        &[&client_rw],
        &["gen-client-cert", "--cn", "pusher", "--dir", "/client"],
    );
    // add-client's default bundle, certs/authorized.crt, is /certs/authorized.crt because
    // the image's working directory is /.
    run_image(
        &image,
        &[&certs_rw, &client_ro],
        &["add-client", "/client/client.crt"],
    );
    // The push instance's HEALTHCHECK needs a client certificate of its own.
    run_image(
        &image,
        &[&certs_rw],
        &[
            "gen-client-cert",
            "--cn",
            "healthcheck",
            "--dir",
            "/certs/healthcheck",
        ],
    );
    run_image(
        &image,
        &[&certs_rw],
        &["add-client", "/certs/healthcheck/client.crt"],
    );
    let clients = run_image(&image, &[&certs_rw], &["list-clients"]);
    assert!(
        clients.contains("pusher") && clients.contains("healthcheck"),
        "list-clients: {clients}"
    );
    for f in ["server.key", "server.crt", "authorized.crt"] {
        assert!(
            certs_dir.join(f).is_file(),
            "{f} missing from the certs volume"
        );
    }

    // Push and pull-only instances on one data volume.
    let data_rw = format!("{data}:/data");
    let certs_ro = format!("{certs}:/certs:ro");
    let tls = [
        "--server-key",
        "/certs/server.key",
        "--server-cert",
        "/certs/server.crt",
    ];
    let mut push_args = vec!["serve", "--port", "11002", "--enable-push"];
    push_args.extend(tls);
    push_args.extend(["--client-certs", "/certs/authorized.crt", "/data"]);
    let push_port = res.start(
        "push",
        &[
            "-v",
            &data_rw,
            "-v",
            &certs_ro,
            "-e",
            "BST_HEALTHCHECK_ADDR=127.0.0.1:11002",
            "-e",
            "BST_HEALTHCHECK_TLS_CA=/certs/server.crt",
            "-e",
            "BST_HEALTHCHECK_TLS_CLIENT_CERT=/certs/healthcheck/client.crt",
            "-e",
            "BST_HEALTHCHECK_TLS_CLIENT_KEY=/certs/healthcheck/client.key",
        ],
        11002,
        &push_args,
        false,
    );
    let mut pull_args = vec!["serve", "--port", "11001"];
    pull_args.extend(tls);
    pull_args.push("/data");
    let pull_port = res.start(
        "pull",
        &[
            "-v",
            &data_rw,
            "-v",
            &certs_ro,
            "-e",
            "BST_HEALTHCHECK_TLS_CA=/certs/server.crt",
        ],
        11001,
        &pull_args,
        false,
    );

    // The real bst: build and push through the push instance with a client certificate.
    let server_crt = certs_dir.join("server.crt");
    let pusher = project.client(
        "pusher",
        &[Remote::new(format!("https://localhost:{push_port}"))
            .push(true)
            .auth("server-cert", &server_crt)
            .auth("client-cert", client_dir.join("client.crt"))
            .auth("client-key", client_dir.join("client.key"))],
        &[],
    );
    pusher
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 4, 0, 0);
    assert!(
        repo_has_blob(&data_dir, &project.big_sha256),
        "the large input file did not reach the data volume"
    );

    // From now on only the cache can provide the data: pull into a fresh local cache
    // through the pull-only instance, which needs no client certificate.
    project.hide_upstream();
    let puller = project.client(
        "puller",
        &[Remote::new(format!("https://localhost:{pull_port}")).auth("server-cert", &server_crt)],
        &[],
    );
    pull_everything(&bst, &puller);
    checkout_and_compare(
        &bst,
        &project,
        &puller,
        "compose.bst",
        &project.expected_compose,
    );

    let stop_push = res.stop("push");
    let stop_pull = res.stop("pull");

    // The data outlives the containers: a new container with the image's default
    // command (plain gRPC, pull-only, port 11001) serves it to another fresh client. It
    // runs as under systemd (docs/container.md), reporting readiness through podman.
    let again_port = res.start("again", &["-v", &data_rw], 11001, &[], true);
    let again = project.client(
        "again",
        &[Remote::new(format!("http://localhost:{again_port}"))],
        &[],
    );
    pull_everything(&bst, &again);
    let stop_again = res.stop("again");

    // Past libtest's capture, so every run's log records the figures.
    let _ = writeln!(
        std::io::stderr(),
        "container test: image {size} bytes; podman stop {stop_push:?} / {stop_pull:?} / \
         {stop_again:?}; total {:?}",
        test_started.elapsed()
    );
}

/// The image's default version label follows Cargo.toml (builds that pass no VERSION
/// build argument label the image with it).
#[test]
fn containerfile_version_matches_the_crate() {
    let containerfile = std::fs::read_to_string(repo_root().join("Containerfile")).unwrap();
    let version = containerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG VERSION="))
        .expect("Containerfile has no `ARG VERSION=` default");
    assert_eq!(
        version.trim_matches('"'),
        env!("CARGO_PKG_VERSION"),
        "update ARG VERSION in Containerfile"
    );
}

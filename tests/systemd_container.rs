//! The generated units under a real systemd (PID 1 in a podman container): installed with
//! `install-units` as the documentation says, both instances start (Type=notify), answer over
//! TLS, log to journald with their fields, survive reload and restart, are restarted by the
//! watchdog when hung, and the real `bst` pushes through one and pulls through the other.
//!
//! Needs root, podman (with runc) and, to build the base image once, debootstrap. Without
//! them the test is skipped loudly, or fails under CI=true.
#[path = "bst_harness/mod.rs"]
mod bst_harness;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PULL: &str = "bst-artifact-server-pull.service";
const PUSH: &str = "bst-artifact-server-push.service";
const IN_BIN: &str = "/usr/local/bin/bst-artifact-server";
const CERTS: &str = "/etc/bst-artifact-server";
const CLIENT: &str = "/root/client";

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn prerequisites_met() -> bool {
    let mut missing = Vec::new();
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        missing.push("root");
    }
    for tool in ["podman", "runc", "debootstrap"] {
        if !have(tool) {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "systemd container test needs {} (apt-get install podman buildah runc slirp4netns uidmap debootstrap)",
        missing.join(", ")
    );
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
    false
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command with a time limit (via timeout(1)), capturing its output.
fn run(limit: Duration, program: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .arg(program)
        .args(args)
        .env("CONTAINERS_CONF", common::containers_conf())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A booted systemd container, removed when dropped.
struct Container {
    name: String,
}

impl Container {
    fn boot(image: &str) -> Container {
        let name = format!("bst-systemd-test-{}", std::process::id());
        let _ = run(Duration::from_secs(30), "podman", &["rm", "-f", &name]);
        // Host networking: the units bind 127.0.0.1 (install-units --bind), so the host's
        // bst reaches them on its own loopback, and nothing listens beyond it.
        let out = run(
            Duration::from_secs(60),
            "podman",
            &[
                "run",
                "-d",
                "--pull=never",
                "--name",
                &name,
                "--systemd=always",
                "--cap-add",
                "SYS_ADMIN",
                "--network",
                "host",
                image,
                "/lib/systemd/systemd",
            ],
        );
        assert!(out.status.success(), "podman run: {}", text(&out));
        let c = Container { name };
        let started = Instant::now();
        // Right after `podman run` systemd may not be listening yet: ask until it answers.
        let state = loop {
            let boot = c.exec(&["timeout", "60", "systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&boot.stdout).trim().to_owned();
            if !state.is_empty() || started.elapsed() > Duration::from_secs(60) {
                break state;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            state == "running" || state == "degraded",
            "systemd did not boot: {state:?}\n{}",
            c.sh("systemctl --failed --no-pager; journalctl -b --no-pager | tail -50")
        );
        eprintln!("systemd booted in {:?} ({state})", started.elapsed());
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        run(Duration::from_secs(120), "podman", &all)
    }

    /// Runs a shell script inside, returning its combined output (failure is the caller's
    /// business: diagnostics use this too).
    fn sh(&self, script: &str) -> String {
        text(&self.exec(&["sh", "-c", script]))
    }

    /// Runs a shell script inside and panics, with the services' state, if it fails.
    fn sh_ok(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-ec", script]);
        if !out.status.success() {
            panic!(
                "in container: {script}\n{}\n--- diagnostics ---\n{}",
                text(&out),
                self.diagnostics()
            );
        }
        text(&out)
    }

    fn diagnostics(&self) -> String {
        self.sh(&format!(
            "systemctl status --no-pager {PULL} {PUSH}; journalctl --no-pager -n 80 -u {PULL} -u {PUSH}"
        ))
    }

    fn show(&self, unit: &str, property: &str) -> String {
        self.sh_ok(&format!("systemctl show -P {property} {unit}"))
            .trim()
            .to_owned()
    }

    fn copy_out(&self, from: &str, to: &Path) {
        let out = run(
            Duration::from_secs(60),
            "podman",
            &["cp", &format!("{}:{from}", self.name), to.to_str().unwrap()],
        );
        assert!(out.status.success(), "podman cp: {}", text(&out));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::env::var_os("BST_KEEP_CONTAINER").is_some() {
            eprintln!("keeping container {}", self.name);
            return;
        }
        let _ = run(
            Duration::from_secs(60),
            "podman",
            &["rm", "-f", "-t", "0", &self.name],
        );
    }
}

fn build_base_image() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/build-base-image.sh");
    let started = Instant::now();
    let out = run(Duration::from_secs(900), script.to_str().unwrap(), &[]);
    assert!(out.status.success(), "build-base-image.sh: {}", text(&out));
    eprintln!("base image ready in {:?}", started.elapsed());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Host-side TLS material copied out of the container, for clients on the host.
struct ClientFiles {
    dir: tempfile::TempDir,
}

impl ClientFiles {
    fn server_crt(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }
    fn client_crt(&self) -> PathBuf {
        self.dir.path().join("client.crt")
    }
    fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
}

fn healthcheck(port: u16, files: &ClientFiles, with_client_cert: bool) -> Output {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["healthcheck", "--addr", &format!("localhost:{port}")])
        .arg("--tls-ca")
        .arg(files.server_crt())
        .args(["--timeout", "10"]);
    if with_client_cert {
        cmd.arg("--tls-client-cert")
            .arg(files.client_crt())
            .arg("--tls-client-key")
            .arg(files.client_key());
    }
    cmd.output().unwrap()
}

fn assert_both_healthy(c: &Container, pull: u16, push: u16, files: &ClientFiles, when: &str) {
    for unit in [PULL, PUSH] {
        assert_eq!(
            c.show(unit, "ActiveState"),
            "active",
            "{unit} {when}\n{}",
            c.diagnostics()
        );
    }
    let out = healthcheck(pull, files, false);
    assert!(
        out.status.success(),
        "pull instance {when}: {}\n{}",
        text(&out),
        c.diagnostics()
    );
    let out = healthcheck(push, files, true);
    assert!(
        out.status.success(),
        "push instance {when}: {}\n{}",
        text(&out),
        c.diagnostics()
    );
}

#[test]
fn units_run_under_real_systemd() {
    if !prerequisites_met() {
        return;
    }
    let t0 = Instant::now();
    let image = build_base_image();
    let c = Container::boot(&image);
    let (pull, push) = (free_loopback_port(), free_loopback_port());
    assert_ne!(pull, push);

    let bin = std::fs::canonicalize(common::BIN).unwrap();
    let out = run(
        Duration::from_secs(120),
        "podman",
        &["cp", bin.to_str().unwrap(), &format!("{}:{IN_BIN}", c.name)],
    );
    assert!(out.status.success(), "podman cp: {}", text(&out));

    // The administrator's side, as docs/systemd.md describes it.
    let install = c.sh_ok(&format!(
        r#"
useradd --system --no-create-home --shell /usr/sbin/nologin artifacts
{IN_BIN} gen-server-cert --cn localhost --san localhost --san 127.0.0.1 --dir {CERTS}
{IN_BIN} gen-client-cert --cn systemd-test-client --dir {CLIENT}
{IN_BIN} add-client {CLIENT}/client.crt --authorized {CERTS}/authorized.crt
install -d -o artifacts -g artifacts -m 0750 /var/lib/bst-artifacts
chgrp artifacts {CERTS}/server.key && chmod 0640 {CERTS}/server.key
{IN_BIN} install-units --repo /var/lib/bst-artifacts --certs-dir {CERTS} --bind 127.0.0.1 --pull-port {pull} --push-port {push}
systemctl daemon-reload
systemctl enable --now {PULL} {PUSH}
"#
    ));
    assert!(install.contains("systemctl enable --now"), "{install}");
    let files = ClientFiles {
        dir: tempfile::tempdir().unwrap(),
    };
    c.copy_out(&format!("{CERTS}/server.crt"), &files.server_crt());
    c.copy_out(&format!("{CLIENT}/client.crt"), &files.client_crt());
    c.copy_out(&format!("{CLIENT}/client.key"), &files.client_key());

    assert_both_healthy(&c, pull, push, &files, "after enable --now");
    for unit in [PULL, PUSH] {
        assert_eq!(c.show(unit, "Type"), "notify");
        assert_eq!(c.show(unit, "UnitFileState"), "enabled");
        assert_eq!(c.show(unit, "User"), "artifacts");
        let status = c.show(unit, "StatusText");
        assert!(
            status.starts_with("serving on 127.0.0.1:"),
            "{unit}: {status:?}"
        );
    }
    // The push instance insists on a client certificate.
    let out = healthcheck(push, &files, false);
    assert!(
        !out.status.success(),
        "push instance answered without a client certificate"
    );

    // Under systemd the logs go to journald natively, fields included.
    let journal = c.sh_ok(&format!("journalctl -u {PULL} -o json --no-pager"));
    let serving = journal
        .lines()
        .find(|l| l.contains(r#""MESSAGE":"serving "#))
        .unwrap_or_else(|| panic!("no 'serving' entry in the journal:\n{journal}"));
    assert!(serving.contains(r#""_TRANSPORT":"journal""#), "{serving}");
    assert!(
        serving.contains(&format!(r#""BST_ADDRESS":"127.0.0.1:{pull}""#)),
        "{serving}"
    );

    // Reload (SIGHUP: TLS material re-read, RELOADING=1 then READY=1) and restart.
    let pids = |c: &Container| [c.show(PULL, "MainPID"), c.show(PUSH, "MainPID")];
    let before = pids(&c);
    c.sh_ok(&format!("systemctl reload {PULL} {PUSH}"));
    assert_eq!(pids(&c), before, "reload replaced a process");
    assert_both_healthy(&c, pull, push, &files, "after reload");
    c.sh_ok(&format!("systemctl restart {PULL} {PUSH}"));
    let after = pids(&c);
    assert!(
        after[0] != before[0] && after[1] != before[1],
        "restart kept {before:?}"
    );
    assert_both_healthy(&c, pull, push, &files, "after restart");
    eprintln!(
        "units installed, reloaded and restarted at {:?}",
        t0.elapsed()
    );

    // The watchdog: with a 2 s period the pings keep the service alive; a frozen process
    // is killed and restarted by Restart=on-failure.
    c.sh_ok(&format!(
        r#"
mkdir -p /etc/systemd/system/{PULL}.d
printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=1s\nRestartSec=1s\n' >/etc/systemd/system/{PULL}.d/test-watchdog.conf
systemctl daemon-reload
systemctl restart {PULL}
"#
    ));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.show(PULL, "NRestarts"), "0", "{}", c.diagnostics());
    assert_eq!(c.show(PULL, "ActiveState"), "active");
    let frozen = c.show(PULL, "MainPID");
    c.sh_ok(&format!("systemctl kill -s SIGSTOP {PULL}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let restarted = c.show(PULL, "NRestarts") != "0"
            && c.show(PULL, "ActiveState") == "active"
            && c.show(PULL, "MainPID") != frozen;
        if restarted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog did not restart a frozen server\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let journal = c.sh(&format!("journalctl -u {PULL} --no-pager"));
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert_both_healthy(&c, pull, push, &files, "after the watchdog restart");
    eprintln!("watchdog checked at {:?}", t0.elapsed());

    bst_push_and_pull(&c, pull, push, &files);
    eprintln!("total {:?}", t0.elapsed());
}

/// The acceptance check: the real client pushes through the push unit (client certificate)
/// and a fresh client pulls everything back through the pull unit with upstream gone.
fn bst_push_and_pull(c: &Container, pull: u16, push: u16, files: &ClientFiles) {
    use bst_harness::{find_bst, Project, Remote};
    let Some(bst) = find_bst() else {
        return;
    };
    let project = Project::new("systemd-units");
    let pusher = Remote::new(format!("https://localhost:{push}"))
        .push(true)
        .auth("server-cert", files.server_crt())
        .auth("client-cert", files.client_crt())
        .auth("client-key", files.client_key());
    let builder = project.client("builder", &[pusher], &[]);
    builder
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_remotes_ok()
        .assert_queue("Push", 4, 0, 0);
    let stored: usize = c
        .sh_ok("find /var/lib/bst-artifacts -type f | wc -l")
        .trim()
        .parse()
        .unwrap();
    assert!(
        stored > 10,
        "only {stored} files in the service's repository"
    );

    project.hide_upstream();
    let puller =
        Remote::new(format!("https://localhost:{pull}")).auth("server-cert", files.server_crt());
    let fresh = project.client("puller", &[puller], &[]);
    fresh
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
    fresh
        .run(&bst, &["build", "compose.bst", "stack.bst"])
        .assert_success()
        .assert_queue_idle("Fetch")
        .assert_queue_idle("Build");
    eprintln!(
        "bst {}: pushed through {PUSH}, pulled through {PULL} ({stored} files stored)",
        bst.version
    );
}

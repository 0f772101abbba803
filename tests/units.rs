//! `install-units` writes units that systemd accepts without a single complaint, scores well
//! in `systemd-analyze security`, and never writes anything when it refuses.
mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

/// `systemd-analyze security --offline=yes` exposure measured for the generated units
/// (systemd 252, Debian 12). A change to the sandbox that raises it must be deliberate.
const MAX_EXPOSURE: f64 = 1.2;

struct Fixture {
    // Not under /tmp or /var/tmp: the units refuse paths there (PrivateTmp=yes).
    dir: tempfile::TempDir,
    /// `--binary` to pass: the server copied out of a build tree that is under a
    /// temporary directory, None when the build tree itself is acceptable.
    binary: Option<PathBuf>,
}

fn under_temporary_dir(path: &std::path::Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    ["/tmp", "/var/tmp"].iter().any(|t| path.starts_with(t))
}

/// Where fixtures go: the target directory, unless the checkout (or CARGO_TARGET_DIR) is
/// under a temporary directory; then a directory of the suite's own elsewhere.
fn fixture_base() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if !under_temporary_dir(&target) {
        return target;
    }
    let candidates = [
        PathBuf::from("/var/lib/bst-artifact-server-tests"),
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/bst-artifact-server-tests"),
    ];
    for dir in candidates {
        if std::fs::create_dir_all(&dir).is_ok() && !under_temporary_dir(&dir) {
            return dir;
        }
    }
    panic!("no directory outside /tmp and /var/tmp for the unit fixtures");
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir_in(fixture_base()).unwrap();
        let binary = under_temporary_dir(std::path::Path::new(common::BIN)).then(|| {
            let copy = dir.path().join("bst-artifact-server");
            std::fs::copy(common::BIN, &copy).unwrap();
            copy
        });
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        for f in ["server.key", "server.crt", "authorized.crt"] {
            std::fs::write(certs.join(f), "placeholder\n").unwrap();
        }
        std::fs::create_dir(dir.path().join("units")).unwrap();
        Fixture { dir, binary }
    }

    /// The binary the units run: what `install-units` picks by default (itself), or the
    /// copy passed with `--binary`.
    fn expected_binary(&self) -> PathBuf {
        std::fs::canonicalize(self.binary.as_deref().unwrap_or(common::BIN.as_ref())).unwrap()
    }

    /// `install-units` with the fixture's certificates and target directory.
    fn command(&self, repo: &str, with_binary: bool) -> Command {
        let mut cmd = Command::new(common::BIN);
        // The default user does not exist on a test machine: the permission checks have
        // a test of their own.
        cmd.arg("install-units")
            .args(["--repo", repo])
            .arg("--no-permission-check");
        if let Some(b) = self.binary.as_ref().filter(|_| with_binary) {
            cmd.arg("--binary").arg(b);
        }
        cmd.arg("--certs-dir")
            .arg(self.certs())
            .arg("--target-dir")
            .arg(self.units());
        cmd
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn units(&self) -> PathBuf {
        self.dir.path().join("units")
    }

    fn install(&self, extra: &[&str]) -> Output {
        let mut cmd = self.command("/srv/bst-artifacts", !extra.contains(&"--binary"));
        cmd.args(extra).output().unwrap()
    }

    fn unit(&self, name: &str) -> String {
        std::fs::read_to_string(self.units().join(name)).unwrap()
    }

    fn unit_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.units())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

const PULL: &str = "bst-artifact-server-pull.service";
const PUSH: &str = "bst-artifact-server-push.service";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `None` (after a loud message) when the tool is missing outside CI; panics in CI.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("systemd-analyze");
    }
    let msg = "systemd-analyze is not installed (apt-get install systemd)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
    None
}

#[test]
fn installs_both_units_with_expected_commands() {
    let fx = Fixture::new();
    let out = fx.install(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fx.unit_files(), vec![PULL, PUSH]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("systemctl daemon-reload"), "{stdout}");
    assert!(
        stdout.contains(&format!("systemctl enable --now {PULL} {PUSH}")),
        "{stdout}"
    );

    let bin = fx.expected_binary();
    let certs = fx.certs().canonicalize().unwrap();
    let pull = fx.unit(PULL);
    let push = fx.unit(PUSH);
    let exec = |port: u16, extra: &str| {
        format!(
            "ExecStart={} serve --port {port} --server-key {c}/server.key --server-cert {c}/server.crt {extra}--log-level info /srv/bst-artifacts\n",
            bin.display(),
            c = certs.display()
        )
    };
    assert!(pull.contains(&exec(11001, "")), "{pull}");
    let push_extra = format!(
        "--client-certs {}/authorized.crt --enable-push ",
        certs.display()
    );
    assert!(push.contains(&exec(11002, &push_extra)), "{push}");
    for unit in [&pull, &push] {
        for line in [
            "Type=notify",
            "Restart=on-failure",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "After=network-online.target",
            "Wants=network-online.target",
            "User=artifacts",
            "ReadWritePaths=/srv/bst-artifacts",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        ] {
            assert!(unit.contains(line), "missing {line:?} in\n{unit}");
        }
        assert!(unit.contains("\nWatchdogSec="), "{unit}");
        for placeholder in [
            "@BINARY@",
            "@REPO@",
            "@PORT@",
            "@USER@",
            "@CERTS_DIR@",
            "@BIND@",
        ] {
            assert!(!unit.contains(placeholder), "{placeholder} left in\n{unit}");
        }
    }
    assert!(!pull.contains("--enable-push") && !pull.contains("--client-certs"));
}

#[test]
fn options_change_ports_user_and_binary() {
    let fx = Fixture::new();
    let out = fx.install(&[
        "--pull-port",
        "21001",
        "--push-port",
        "21002",
        "--user",
        "cache",
        "--binary",
        "/bin/true",
        "--bind",
        "127.0.0.1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pull = fx.unit(PULL);
    let real_true = std::fs::canonicalize("/bin/true").unwrap();
    assert!(
        pull.contains(&format!(
            "ExecStart={} serve --port 21001 --bind 127.0.0.1 --server-key ",
            real_true.display()
        )),
        "{pull}"
    );
    assert!(pull.contains("User=cache\n"));
    assert!(fx.unit(PUSH).contains(" --port 21002 "));
}

#[test]
fn units_pass_systemd_analyze_verify_silently() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let fx = Fixture::new();
    assert!(fx.install(&[]).status.success());
    for name in [PULL, PUSH] {
        let out = Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(fx.units().join(name))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "systemd-analyze verify {name}: {}\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn security_exposure_is_at_most_the_measured_score() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let fx = Fixture::new();
    assert!(fx.install(&[]).status.success());
    for name in [PULL, PUSH] {
        let out = Command::new(analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(fx.units().join(name))
            .output()
            .unwrap();
        let report = text(&out.stdout) + &text(&out.stderr);
        let score = exposure(&report)
            .unwrap_or_else(|| panic!("no exposure level for {name} in\n{report}"));
        eprintln!("{name}: systemd-analyze security exposure {score}");
        assert!(
            score <= MAX_EXPOSURE,
            "{name}: exposure {score} > {MAX_EXPOSURE}\n{report}"
        );
    }
}

/// Reads "Overall exposure level for X.service: 1.1 OK".
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    line.rsplit_once(": ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn refuses_to_overwrite_without_force() {
    let fx = Fixture::new();
    assert!(fx.install(&[]).status.success());
    // Hand edits must survive a second, unforced run.
    std::fs::write(fx.units().join(PUSH), "# edited\n").unwrap();
    let out = fx.install(&["--pull-port", "12001"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("already exist") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fx.unit(PUSH), "# edited\n");
    assert!(
        fx.unit(PULL).contains("--port 11001 "),
        "pull unit was rewritten"
    );

    let out = fx.install(&["--force", "--pull-port", "12001"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fx.unit(PULL).contains("--port 12001 "));
    assert!(fx.unit(PUSH).contains("Type=notify"));
    assert_eq!(fx.unit_files(), vec![PULL, PUSH], "temporary files left");
}

#[test]
fn missing_certificates_are_reported_before_writing() {
    let fx = Fixture::new();
    let missing_dir = fx.dir.path().join("no-such-certs");
    let out = Command::new(common::BIN)
        .args(["install-units", "--repo", "/srv/r", "--certs-dir"])
        .arg(&missing_dir)
        .arg("--target-dir")
        .arg(fx.units())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("certificate directory"), "{err}");
    assert!(fx.unit_files().is_empty(), "wrote {:?}", fx.unit_files());

    std::fs::remove_file(fx.certs().join("server.key")).unwrap();
    std::fs::remove_file(fx.certs().join("server.crt")).unwrap();
    let out = fx.install(&[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("server.key") && err.contains("server.crt"),
        "{err}"
    );
    assert!(fx.unit_files().is_empty(), "wrote {:?}", fx.unit_files());
}

#[test]
fn other_bad_arguments_write_nothing() {
    let fx = Fixture::new();
    for (args, expect) in [
        (&["--pull-port", "11002"][..], "different ports"),
        (&["--user", "bad user"][..], "not a valid user name"),
        (&["--binary", "/no/such/binary"][..], "server binary"),
    ] {
        let out = fx.install(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = text(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(fx.unit_files().is_empty());
    }
    let out = fx.command("/tmp/repo", true).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("PrivateTmp"));
    assert!(fx.unit_files().is_empty());
}

#[test]
fn paths_under_home_keep_home_readable() {
    let fx = Fixture::new();
    let out = fx
        .command("/home/artifacts/artifacts", true)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pull = fx.unit(PULL);
    assert!(pull.contains("ProtectHome=read-only\n"), "{pull}");
    assert!(pull.contains("ReadWritePaths=/home/artifacts/artifacts\n"));
}

/// Before writing anything, install-units checks that the service user exists, can run
/// the binary and read the certificates, and says what to fix.
#[test]
fn the_service_user_must_be_able_to_run_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let binary = fx.dir.path().join("server-binary");
    std::fs::copy(common::BIN, &binary).unwrap();
    let install = |user: &str| {
        Command::new(common::BIN)
            .arg("install-units")
            .args(["--repo", "/srv/bst-artifacts", "--user", user, "--binary"])
            .arg(&binary)
            .arg("--certs-dir")
            .arg(fx.certs())
            .arg("--target-dir")
            .arg(fx.units())
            .output()
            .unwrap()
    };
    let out = install("no-such-user-here");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("useradd --system"),
        "{}",
        text(&out.stderr)
    );
    assert!(fx.unit_files().is_empty());

    // `nobody` cannot enter the fixture directory (0700), so neither the binary nor the
    // certificates are reachable.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = install("nobody");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(err.contains("nothing was written"), "{err}");
    assert!(
        err.contains("nobody cannot enter") && err.contains("install -m 0755"),
        "{err}"
    );
    assert!(fx.unit_files().is_empty());

    // Reachable, but the key is the owner's only.
    let mut dir = fx.dir.path().to_owned();
    while dir != std::path::Path::new("/") {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o111)).unwrap();
        dir.pop();
    }
    let key = fx.certs().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = install("nobody");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nobody cannot read the server key"), "{err}");
    assert!(
        err.contains("chgrp nobody") && err.contains("chmod 0640"),
        "{err}"
    );
    assert!(!err.contains("server binary"), "{err}");
    assert!(fx.unit_files().is_empty());

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = install("nobody");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fx.unit_files(), vec![PULL, PUSH]);
}

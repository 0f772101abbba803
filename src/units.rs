//! `install-units`: writes the two systemd units of the recommended deployment (a public
//! pull-only instance and an authenticated push instance sharing one repository) from the
//! templates in the repository's `systemd/` directory.

use anyhow::{bail, Context};
use clap::Args;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

pub const PULL_UNIT: &str = "bst-artifact-server-pull.service";
pub const PUSH_UNIT: &str = "bst-artifact-server-push.service";

const PULL_TEMPLATE: &str = include_str!("../systemd/bst-artifact-server-pull.service.in");
const PUSH_TEMPLATE: &str = include_str!("../systemd/bst-artifact-server-push.service.in");

/// Files the units reference in the certificate directory.
pub const SERVER_KEY: &str = "server.key";
pub const SERVER_CERT: &str = "server.crt";
pub const CLIENT_CERTS: &str = "authorized.crt";

#[derive(Args, Debug, Clone)]
pub struct InstallUnitsArgs {
    /// Repository directory both instances serve (the only path the services may write).
    #[arg(long, value_name = "PATH")]
    pub repo: PathBuf,

    /// Directory holding server.key, server.crt and authorized.crt (the client certificates
    /// allowed to push).
    #[arg(long, value_name = "DIR")]
    pub certs_dir: PathBuf,

    /// Port of the public, pull-only instance.
    #[arg(long, default_value_t = 11001)]
    pub pull_port: u16,

    /// Port of the instance that accepts uploads from authorized clients.
    #[arg(long, default_value_t = 11002)]
    pub push_port: u16,

    /// Address both instances listen on [default: all interfaces, IPv6 and IPv4].
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::IpAddr>,

    /// User the services run as; it must own the repository.
    #[arg(long, default_value = "artifacts")]
    pub user: String,

    /// Where the unit files are written.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    pub target_dir: PathBuf,

    /// Server binary the units run [default: this program's canonical path].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// Replace unit files that already exist.
    #[arg(long)]
    pub force: bool,

    /// Write the units without checking that --user exists and can run the binary and
    /// read the certificates (for units made for another machine or image).
    #[arg(long)]
    pub no_permission_check: bool,
}

/// A unit file ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: &'static str,
    pub contents: String,
}

/// Checks the arguments and renders both units. Nothing is written.
pub fn render(args: &InstallUnitsArgs) -> anyhow::Result<Vec<Unit>> {
    if args.pull_port == args.push_port {
        bail!(
            "--pull-port and --push-port are both {}; the two instances need different ports",
            args.pull_port
        );
    }
    if args.pull_port == 0 || args.push_port == 0 {
        bail!("a unit needs a fixed port; 0 is not allowed");
    }
    check_user_name(&args.user)?;

    let certs_dir = std::fs::canonicalize(&args.certs_dir).with_context(|| {
        format!(
            "certificate directory {} is not accessible",
            args.certs_dir.display()
        )
    })?;
    if !certs_dir.is_dir() {
        bail!(
            "certificate directory {} is not a directory",
            certs_dir.display()
        );
    }
    let missing: Vec<&str> = [SERVER_KEY, SERVER_CERT, CLIENT_CERTS]
        .into_iter()
        .filter(|f| !certs_dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "certificate directory {} lacks {} (the units need {SERVER_KEY}, {SERVER_CERT} and {CLIENT_CERTS})",
            certs_dir.display(),
            missing.join(", ")
        );
    }

    let binary = match &args.binary {
        Some(b) => std::fs::canonicalize(b)
            .with_context(|| format!("server binary {} is not accessible", b.display()))?,
        None => std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .context("finding the path of this program (pass --binary)")?,
    };
    if !binary.is_file() {
        bail!("server binary {} is not a file", binary.display());
    }

    // The repository may not exist yet; the administrator creates it for the user.
    let repo = std::path::absolute(&args.repo)
        .with_context(|| format!("resolving repository path {}", args.repo.display()))?;
    let repo = std::fs::canonicalize(&repo).unwrap_or(repo);

    for (what, path) in [
        ("repository", &repo),
        ("certificate directory", &certs_dir),
        ("server binary", &binary),
    ] {
        if ["/tmp", "/var/tmp"].iter().any(|t| path.starts_with(t)) {
            bail!(
                "{what} {} is under a temporary directory, which the units replace with a private one (PrivateTmp=yes)",
                path.display()
            );
        }
    }

    if !args.no_permission_check {
        check_service_user(&args.user, &binary, &certs_dir, &repo)?;
    }

    let protect_home = if [&repo, &certs_dir, &binary].iter().any(|p| under_home(p)) {
        // ProtectHome=yes would hide these paths; read-only keeps the rest of /home
        // unwritable while ReadWritePaths= still opens the repository.
        "read-only"
    } else {
        "yes"
    };

    // Empty or "--bind ADDR " so that the default keeps the server's IPv4 fallback.
    let bind = args
        .bind
        .map(|a| format!("--bind {a} "))
        .unwrap_or_default();
    let fill = |template: &str, port: u16| -> anyhow::Result<String> {
        let text = template
            .replace("@BINARY@", &unit_path(&binary, true)?)
            .replace("@CERTS_DIR@", &unit_path(&certs_dir, true)?)
            .replace("@REPO@", &unit_path(&repo, true)?)
            .replace("@PORT@", &port.to_string())
            .replace("@BIND@", &bind)
            .replace("@USER@", &args.user)
            .replace("@PROTECT_HOME@", protect_home);
        // ReadWritePaths= takes no $ substitution, so `$$` there would be taken literally.
        let text = text.replace(
            &format!("ReadWritePaths={}", unit_path(&repo, true)?),
            &format!("ReadWritePaths={}", unit_path(&repo, false)?),
        );
        Ok(text)
    };
    Ok(vec![
        Unit {
            name: PULL_UNIT,
            contents: fill(PULL_TEMPLATE, args.pull_port)?,
        },
        Unit {
            name: PUSH_UNIT,
            contents: fill(PUSH_TEMPLATE, args.push_port)?,
        },
    ])
}

/// `install-units`: validates everything, refuses to replace existing units unless forced,
/// writes both units atomically and prints what to do next.
pub fn run(args: &InstallUnitsArgs) -> anyhow::Result<()> {
    let units = render(args)?;
    let target = &args.target_dir;
    if !target.is_dir() {
        bail!("target directory {} does not exist", target.display());
    }
    if !args.force {
        let existing: Vec<String> = units
            .iter()
            .map(|u| target.join(u.name))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "{} already exist{}; pass --force to replace",
                existing.join(" and "),
                if existing.len() == 1 { "s" } else { "" }
            );
        }
    }
    for unit in &units {
        let path = target.join(unit.name);
        write_atomically(&path, unit.contents.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    print!("{}", next_steps(args, &units));
    Ok(())
}

fn next_steps(args: &InstallUnitsArgs, units: &[Unit]) -> String {
    let user = &args.user;
    let repo = std::path::absolute(&args.repo).unwrap_or_else(|_| args.repo.clone());
    let certs = std::fs::canonicalize(&args.certs_dir).unwrap_or_else(|_| args.certs_dir.clone());
    let names: Vec<&str> = units.iter().map(|u| u.name).collect();
    let mut s = String::from("\nNext steps (as root):\n");
    if !user_exists(user) {
        let _ = writeln!(
            s,
            "  useradd --system --no-create-home --shell /usr/sbin/nologin {user}"
        );
    }
    if !repo.is_dir() {
        let _ = writeln!(
            s,
            "  install -d -o {user} -g {user} -m 0750 {}",
            repo.display()
        );
    }
    if args.no_permission_check {
        let _ = writeln!(
            s,
            "  # the services read the key as {user}:\n  chgrp {user} {key} && chmod 0640 {key}",
            key = certs.join(SERVER_KEY).display()
        );
    }
    if args.target_dir == Path::new("/etc/systemd/system") {
        let _ = writeln!(s, "  systemctl daemon-reload");
    } else {
        let _ = writeln!(
            s,
            "  # {} is not /etc/systemd/system: link or copy the units where systemd looks\n  systemctl daemon-reload",
            args.target_dir.display()
        );
    }
    let _ = writeln!(s, "  systemctl enable --now {}", names.join(" "));
    let _ = writeln!(s, "  systemctl status {}", names.join(" "));
    let _ = writeln!(
        s,
        "After renewing certificates: systemctl reload {}",
        names.join(" ")
    );
    s
}

fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renders a path for a unit file. Specifiers (`%`) are escaped everywhere; in command lines
/// (`exec`) `$` is escaped too. Characters that would need quoting are refused rather than
/// quoted, because the same path also appears in directives with their own quoting rules.
fn unit_path(path: &Path, exec: bool) -> anyhow::Result<String> {
    let Some(s) = path.to_str() else {
        bail!("path {} is not valid UTF-8", path.display());
    };
    if !path.is_absolute() {
        bail!("path {s} is not absolute");
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        bail!("path {s:?} contains {c:?}, which systemd unit files cannot carry unquoted");
    }
    let s = s.replace('%', "%%");
    Ok(if exec { s.replace('$', "$$") } else { s })
}

fn check_user_name(user: &str) -> anyhow::Result<()> {
    let valid = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        bail!("--user {user:?} is not a valid user name");
    }
    Ok(())
}

/// Whether `user` may do `want` (4 read, 2 write, 1 execute/search) on `meta`, by its mode
/// bits (ACLs are not consulted).
fn permits(meta: &std::fs::Metadata, ids: &crate::sys::UserIds, want: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    let bits = if meta.uid() == ids.uid {
        mode >> 6
    } else if ids.groups.contains(&meta.gid()) {
        mode >> 3
    } else {
        mode
    } & 7;
    bits & want == want
}

/// The first directory on the way to `path` that `ids` may not enter, if any.
fn blocked_dir(path: &Path, ids: &crate::sys::UserIds) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    ancestors.into_iter().find_map(|dir| {
        let meta = std::fs::metadata(dir).ok()?;
        (!permits(&meta, ids, 1)).then(|| dir.to_owned())
    })
}

/// Refuses, before anything is written, units whose user could not start the server:
/// no such user, a binary it cannot run, certificates it cannot read, a repository it
/// cannot write. Each problem comes with the command that fixes it.
fn check_service_user(user: &str, binary: &Path, certs: &Path, repo: &Path) -> anyhow::Result<()> {
    let Some(ids) = crate::sys::lookup_user(user) else {
        bail!(
            "the service user {user} does not exist; create it first:\n  useradd --system \
             --no-create-home --shell /usr/sbin/nologin {user}\n(or pass --user NAME; \
             --no-permission-check writes units for another machine)"
        );
    };
    if ids.uid == 0 {
        return Ok(());
    }
    let mut problems = Vec::new();
    let mut check = |path: &Path, want: u32, what: &str, fix: String| {
        if let Some(dir) = blocked_dir(path, &ids) {
            problems.push(format!(
                "{user} cannot enter {} on the way to {what} {}: {fix}",
                dir.display(),
                path.display()
            ));
        } else if let Ok(meta) = std::fs::metadata(path) {
            if !permits(&meta, &ids, want) {
                let verb = match want {
                    1 => "run",
                    4 => "read",
                    _ => "write to",
                };
                problems.push(format!(
                    "{user} cannot {verb} {what} {}: {fix}",
                    path.display()
                ));
            }
        }
    };
    check(
        binary,
        1,
        "the server binary",
        format!(
            "install it where every user can run it, e.g. `install -m 0755 {} \
             /usr/local/bin/bst-artifact-server` and pass --binary /usr/local/bin/bst-artifact-server",
            binary.display()
        ),
    );
    let key = certs.join(SERVER_KEY);
    check(
        &key,
        4,
        "the server key",
        format!("`chgrp {user} {k} && chmod 0640 {k}`", k = key.display()),
    );
    for name in [SERVER_CERT, CLIENT_CERTS] {
        let file = certs.join(name);
        check(
            &file,
            4,
            "the certificate file",
            format!("`chmod 0644 {}`", file.display()),
        );
    }
    // The repository and, in an existing one (e.g. the seed's), its top directories: a
    // server writes in all of them.
    for dir in [repo.to_owned(), repo.join("cas"), repo.join("assets")] {
        if dir.exists() {
            check(
                &dir,
                2 | 1,
                "the repository",
                format!("`chown -R {user}: {}`", repo.display()),
            );
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "the units would fail to start as {user}; nothing was written:\n  {}",
        problems.join("\n  ")
    )
}

fn under_home(path: &Path) -> bool {
    ["/home", "/root", "/run/user"]
        .iter()
        .any(|h| path.starts_with(h))
}

fn user_exists(user: &str) -> bool {
    crate::sys::user_exists(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(template: &str) -> Vec<&str> {
        template
            .lines()
            .skip_while(|l| !l.starts_with("# Sandboxing"))
            .collect()
    }

    #[test]
    fn templates_share_the_sandbox() {
        assert!(!sandbox(PULL_TEMPLATE).is_empty());
        assert_eq!(sandbox(PULL_TEMPLATE), sandbox(PUSH_TEMPLATE));
    }

    #[test]
    fn only_the_push_unit_pushes() {
        assert!(!PULL_TEMPLATE.contains("--enable-push"));
        assert!(!PULL_TEMPLATE.contains("--client-certs"));
        assert!(PUSH_TEMPLATE.contains("--enable-push"));
        assert!(PUSH_TEMPLATE.contains("--client-certs @CERTS_DIR@/authorized.crt"));
    }

    #[test]
    fn unit_paths_are_escaped_or_refused() {
        assert_eq!(unit_path(Path::new("/a/b"), true).unwrap(), "/a/b");
        assert_eq!(unit_path(Path::new("/a%b$c"), true).unwrap(), "/a%%b$$c");
        assert_eq!(unit_path(Path::new("/a%b$c"), false).unwrap(), "/a%%b$c");
        assert!(unit_path(Path::new("/a b"), true).is_err());
        assert!(unit_path(Path::new("rel"), true).is_err());
    }

    #[test]
    fn user_names() {
        assert!(check_user_name("artifacts").is_ok());
        assert!(check_user_name("bst-cache_1").is_ok());
        assert!(check_user_name("").is_err());
        assert!(check_user_name("a b").is_err());
        assert!(check_user_name("-x").is_err());
    }
}

//! The certificate subcommands, run as the real binary: gen-server-cert, gen-client-cert,
//! add-client, list-clients and remove-client, including their failure modes (nothing
//! half-written, one-line errors, non-zero exit).

use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use x509_parser::prelude::*;

const BIN: &str = env!("CARGO_BIN_EXE_bst-artifact-server");

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cwd: &Path, args: &[&str]) -> Out {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("running bst-artifact-server");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(cwd: &Path, args: &[&str]) -> String {
    let o = run(cwd, args);
    assert!(o.ok, "{args:?} failed: {}", o.stderr);
    o.stdout
}

/// Runs a command that must fail with a single-line error mentioning `needle`.
fn fails(cwd: &Path, args: &[&str], needle: &str) {
    let o = run(cwd, args);
    assert!(!o.ok, "{args:?} succeeded: {}", o.stdout);
    assert_eq!(
        o.stderr.trim_end().lines().count(),
        1,
        "{args:?}: error is not one line: {}",
        o.stderr
    );
    assert!(
        o.stderr.starts_with("bst-artifact-server: error: "),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        o.stderr
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn der_of(pem_path: &Path) -> Vec<u8> {
    let data = std::fs::read(pem_path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&data).unwrap();
    assert_eq!(pem.label, "CERTIFICATE");
    pem.contents
}

fn sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn with_cert<R>(path: &Path, f: impl FnOnce(&X509Certificate<'_>) -> R) -> R {
    let der = der_of(path);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    f(&cert)
}

/// A certificate made directly with rcgen, valid from `from` to `to` days from now.
fn rcgen_cert(dir: &Path, name: &str, cn: &str, from: i64, to: i64) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let now = ::time::OffsetDateTime::now_utc();
    params.not_before = now + ::time::Duration::days(from);
    params.not_after = now + ::time::Duration::days(to);
    let cert = params.self_signed(&key).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, cert.pem()).unwrap();
    path
}

/// The openssl command of the historical documentation, verbatim apart from paths
/// (RSA 4096, self-signed, so CA:TRUE).
fn openssl_client_cert(dir: &Path, cn: &str) -> PathBuf {
    let crt = dir.join(format!("{cn}-openssl.crt"));
    let key = dir.join(format!("{cn}-openssl.key"));
    let status = Command::new("openssl")
        .args(["req", "-new", "-newkey", "rsa:4096", "-x509", "-sha256"])
        .args(["-days", "3650", "-nodes", "-batch", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-out")
        .arg(&crt)
        .arg("-keyout")
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success());
    crt
}

#[test]
fn gen_server_cert_names_modes_and_overwrite_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let out = ok(
        cwd,
        &[
            "gen-server-cert",
            "--cn",
            "cache.example.com",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--san",
            "::1",
            "--days",
            "30",
        ],
    );
    let dir = cwd.join("certs");
    let (key, crt) = (dir.join("server.key"), dir.join("server.crt"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&crt), 0o644);
    assert_eq!(listing(&dir), ["server.crt", "server.key"]);
    let fp = sha256(&der_of(&crt));
    assert!(out.contains(&fp), "{out}");
    assert!(
        out.contains("DNS:localhost") && out.contains("IP:127.0.0.1"),
        "{out}"
    );

    with_cert(&crt, |c| {
        assert_eq!(c.subject().to_string(), "CN=cache.example.com");
        assert_eq!(c.issuer(), c.subject(), "self-signed");
        let sans = &c
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        let shown: Vec<String> = sans.iter().map(|n| format!("{n}")).collect();
        assert!(
            shown.iter().any(|s| s.contains("cache.example.com")),
            "{shown:?}"
        );
        assert!(shown.iter().any(|s| s.contains("localhost")), "{shown:?}");
        let ips: Vec<&[u8]> = sans
            .iter()
            .filter_map(|n| match n {
                GeneralName::IPAddress(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        assert!(ips.contains(&&[127u8, 0, 0, 1][..]), "{ips:?}");
        assert!(ips.iter().any(|ip| ip.len() == 16), "{ips:?}");
        assert!(!c.basic_constraints().unwrap().unwrap().value.ca);
        assert!(c.extended_key_usage().unwrap().unwrap().value.server_auth);
        let days =
            (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86_400;
        assert!((30..=31).contains(&days), "{days}");
    });

    // No silent overwrite, and nothing changed by the refused attempt.
    let before = (std::fs::read(&key).unwrap(), std::fs::read(&crt).unwrap());
    fails(cwd, &["gen-server-cert", "--cn", "other"], "already exists");
    assert_eq!(before.0, std::fs::read(&key).unwrap());
    assert_eq!(before.1, std::fs::read(&crt).unwrap());
    assert_eq!(listing(&dir), ["server.crt", "server.key"]);

    ok(cwd, &["gen-server-cert", "--cn", "other", "--force"]);
    assert_ne!(before.0, std::fs::read(&key).unwrap());
    assert_eq!(mode(&key), 0o600);
    assert_eq!(listing(&dir), ["server.crt", "server.key"]);
    with_cert(&crt, |c| assert_eq!(c.subject().to_string(), "CN=other"));
}

#[test]
fn gen_server_cert_bad_input_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    fails(
        cwd,
        &[
            "gen-server-cert",
            "--cn",
            "ok.example",
            "--san",
            "not a name",
        ],
        "neither a valid host name nor an IP address",
    );
    assert!(!cwd.join("certs").exists());
    // A regular file where the directory should be.
    std::fs::write(cwd.join("blocker"), "x").unwrap();
    fails(
        cwd,
        &["gen-server-cert", "--cn", "h", "--dir", "blocker/sub"],
        "creating directory blocker/sub",
    );
    // Only one of the pair exists: still refused, and the lone file is untouched.
    std::fs::create_dir(cwd.join("half")).unwrap();
    std::fs::write(cwd.join("half/server.crt"), "mine").unwrap();
    fails(
        cwd,
        &["gen-server-cert", "--cn", "h", "--dir", "half"],
        "half/server.crt already exists",
    );
    assert_eq!(listing(&cwd.join("half")), ["server.crt"]);
    assert_eq!(
        std::fs::read_to_string(cwd.join("half/server.crt")).unwrap(),
        "mine"
    );
    // Days out of range is a usage error from the argument parser.
    let o = run(cwd, &["gen-server-cert", "--cn", "h", "--days", "0"]);
    assert!(!o.ok);
}

#[test]
fn gen_client_cert_is_a_self_signed_client_leaf() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let out = ok(
        cwd,
        &[
            "gen-client-cert",
            "--cn",
            "alice",
            "--dir",
            "alice",
            "--days",
            "7",
        ],
    );
    let (key, crt) = (cwd.join("alice/client.key"), cwd.join("alice/client.crt"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&crt), 0o644);
    assert!(out.contains("add-client"), "{out}");
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    with_cert(&crt, |c| {
        assert_eq!(c.subject().to_string(), "CN=alice");
        assert_eq!(c.issuer(), c.subject());
        assert!(c.extended_key_usage().unwrap().unwrap().value.client_auth);
        assert!(!c.basic_constraints().unwrap().unwrap().value.ca);
        let days =
            (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86_400;
        assert!((7..=8).contains(&days), "{days}");
    });
    fails(
        cwd,
        &["gen-client-cert", "--cn", "alice", "--dir", "alice"],
        "already exists",
    );
    ok(
        cwd,
        &[
            "gen-client-cert",
            "--cn",
            "alice2",
            "--dir",
            "alice",
            "--force",
        ],
    );
    with_cert(&crt, |c| assert_eq!(c.subject().to_string(), "CN=alice2"));
}

#[test]
fn add_list_remove_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    ok(cwd, &["gen-client-cert", "--cn", "alice", "--dir", "alice"]);
    ok(cwd, &["gen-client-cert", "--cn", "bob", "--dir", "bob"]);
    let alice_fp = sha256(&der_of(&cwd.join("alice/client.crt")));
    let bob_fp = sha256(&der_of(&cwd.join("bob/client.crt")));

    // An existing bundle, written by hand the historical way, with text around it.
    let openssl = openssl_client_cert(cwd, "client");
    let openssl_fp = sha256(&der_of(&openssl));
    std::fs::create_dir(cwd.join("certs")).unwrap();
    let authorized = cwd.join("certs/authorized.crt");
    let mut original = b"Some notes the admin wrote\n".to_vec();
    original.extend(std::fs::read(&openssl).unwrap());
    original.extend(b"(no trailing newline)");
    std::fs::write(&authorized, &original).unwrap();
    std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o640)).unwrap();

    let out = ok(cwd, &["add-client", "alice/client.crt"]);
    assert!(out.contains("CN=alice") && out.contains(&alice_fp), "{out}");
    let after = std::fs::read(&authorized).unwrap();
    assert!(
        after.starts_with(&original),
        "existing bytes must be kept as they were"
    );
    assert_eq!(mode(&authorized), 0o640, "permissions kept");
    assert_eq!(
        listing(&cwd.join("certs")),
        ["authorized.crt"],
        "no temporary files left"
    );

    // Duplicate: refused, file unchanged.
    fails(
        cwd,
        &["add-client", "alice/client.crt"],
        "already authorized",
    );
    assert_eq!(after, std::fs::read(&authorized).unwrap());
    // The openssl one is already present too (it was in the hand-made file).
    fails(cwd, &["add-client", openssl.to_str().unwrap()], &openssl_fp);

    ok(cwd, &["add-client", "bob/client.crt"]);
    let list = ok(cwd, &["list-clients"]);
    for needle in [
        &alice_fp,
        &bob_fp,
        &openssl_fp,
        "CN=alice",
        "CN=bob",
        "CN=client",
    ] {
        assert!(list.contains(needle), "{list} lacks {needle}");
    }
    assert_eq!(list.lines().count(), 4, "{list}");

    // Remove by subject (bare CN), by openssl-style fingerprint, by prefix.
    let before_bob = std::fs::read(&authorized).unwrap();
    let out = ok(cwd, &["remove-client", "bob"]);
    assert!(out.contains(&bob_fp), "{out}");
    assert_ne!(before_bob, after);
    assert_eq!(
        std::fs::read(&authorized).unwrap(),
        after,
        "removing the last entry restores the file as it was before adding it"
    );
    let colons: Vec<String> = alice_fp
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    ok(cwd, &["remove-client", &colons.join(":")]);
    // Only the newline add-client put after the admin's unterminated last line remains.
    let mut expected = original.clone();
    expected.push(b'\n');
    assert_eq!(std::fs::read(&authorized).unwrap(), expected);
    ok(cwd, &["remove-client", &openssl_fp[..12]]);
    let rest = String::from_utf8(std::fs::read(&authorized).unwrap()).unwrap();
    assert_eq!(rest, "Some notes the admin wrote\n(no trailing newline)\n");
    assert!(ok(cwd, &["list-clients"]).contains("no authorized clients"));
    assert_eq!(mode(&authorized), 0o640);
    fails(cwd, &["remove-client", "alice"], "no authorized client");
}

#[test]
fn remove_client_ambiguous_subject() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let a = rcgen_cert(cwd, "a.crt", "client", -1, 30);
    let b = rcgen_cert(cwd, "b.crt", "client", -1, 30);
    let c = rcgen_cert(cwd, "c.crt", "other", -1, 30);
    for p in [&a, &b, &c] {
        ok(cwd, &["add-client", "--create", p.to_str().unwrap()]);
    }
    let authorized = cwd.join("certs/authorized.crt");
    let before = std::fs::read(&authorized).unwrap();
    fails(
        cwd,
        &["remove-client", "CN=client"],
        "matches 2 different certificates",
    );
    assert_eq!(before, std::fs::read(&authorized).unwrap());
    ok(cwd, &["remove-client", "CN=client", "--all"]);
    let list = ok(cwd, &["list-clients"]);
    assert!(
        list.contains("CN=other") && !list.contains("CN=client"),
        "{list}"
    );
}

#[test]
fn add_client_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    ok(cwd, &["gen-client-cert", "--cn", "alice"]);
    // A key passed as the certificate.
    fails(
        cwd,
        &["add-client", "certs/client.key"],
        "holds a private key",
    );
    // A file holding both is refused too: keys must not travel to the server.
    let both = [
        std::fs::read(cwd.join("certs/client.crt")).unwrap(),
        std::fs::read(cwd.join("certs/client.key")).unwrap(),
    ]
    .concat();
    std::fs::write(cwd.join("both.pem"), both).unwrap();
    fails(cwd, &["add-client", "both.pem"], "holds a private key");
    // Expired, and not yet valid.
    let expired = rcgen_cert(cwd, "expired.crt", "old", -30, -1);
    fails(
        cwd,
        &["add-client", expired.to_str().unwrap()],
        "expired on",
    );
    let future = rcgen_cert(cwd, "future.crt", "future", 2, 30);
    fails(
        cwd,
        &["add-client", future.to_str().unwrap()],
        "not valid before",
    );
    // Not a certificate at all, a missing file, a truncated PEM, a CSR.
    std::fs::write(cwd.join("junk.txt"), "hello\n").unwrap();
    fails(cwd, &["add-client", "junk.txt"], "holds no PEM certificate");
    fails(cwd, &["add-client", "missing.crt"], "reading missing.crt");
    let crt = std::fs::read_to_string(cwd.join("certs/client.crt")).unwrap();
    std::fs::write(cwd.join("half.crt"), &crt[..crt.len() / 2]).unwrap();
    fails(cwd, &["add-client", "half.crt"], "not terminated");
    let csr = rcgen::CertificateParams::new(vec!["x".to_string()])
        .unwrap()
        .serialize_request(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
        .unwrap();
    std::fs::write(cwd.join("req.csr"), csr).unwrap();
    fails(cwd, &["add-client", "req.csr"], "CERTIFICATE REQUEST");
    // None of that created or touched the bundle.
    assert!(!cwd.join("certs/authorized.crt").exists());
    assert_eq!(listing(&cwd.join("certs")), ["client.crt", "client.key"]);

    // DER input is accepted and stored as PEM.
    std::fs::write(
        cwd.join("client.der"),
        der_of(&cwd.join("certs/client.crt")),
    )
    .unwrap();
    ok(cwd, &["add-client", "client.der"]);
    let stored = std::fs::read_to_string(cwd.join("certs/authorized.crt")).unwrap();
    assert!(stored.contains("-----BEGIN CERTIFICATE-----"), "{stored}");
    assert_eq!(mode(&cwd.join("certs/authorized.crt")), 0o644);

    // A broken bundle is never modified: fix it first.
    let authorized = cwd.join("certs/authorized.crt");
    std::fs::write(&authorized, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let other = rcgen_cert(cwd, "other.crt", "other", -1, 30);
    fails(
        cwd,
        &["add-client", other.to_str().unwrap()],
        "is not a valid certificate bundle",
    );
    fails(
        cwd,
        &["remove-client", "alice"],
        "is not a valid certificate bundle",
    );
    fails(cwd, &["list-clients"], "is not a valid certificate bundle");
    assert_eq!(
        std::fs::read_to_string(&authorized).unwrap(),
        "-----BEGIN CERTIFICATE-----\nAAAA\n"
    );
    fails(
        cwd,
        &["list-clients", "--authorized", "nowhere/authorized.crt"],
        "reading nowhere/authorized.crt",
    );
}

#[test]
fn add_client_accepts_the_historical_openssl_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let crt = openssl_client_cert(cwd, "client");
    with_cert(&crt, |c| {
        assert!(
            c.basic_constraints().unwrap().unwrap().value.ca,
            "openssl req -x509 makes CA:TRUE certificates (the case webpki refuses)"
        );
    });
    let out = ok(
        cwd,
        &[
            "add-client",
            crt.to_str().unwrap(),
            "--authorized",
            "srv/authorized.crt",
            "--create",
        ],
    );
    assert!(
        out.contains("CN=client") && out.contains("RSA 4096"),
        "{out}"
    );
    let list = ok(cwd, &["list-clients", "--authorized", "srv/authorized.crt"]);
    assert!(list.contains(&sha256(&der_of(&crt))), "{list}");
}

#[test]
fn subject_cannot_forge_lines_in_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let evil = rcgen_cert(
        cwd,
        "evil.crt",
        "x\n-----BEGIN CERTIFICATE-----\nAAAA",
        -1,
        30,
    );
    ok(cwd, &["add-client", "--create", evil.to_str().unwrap()]);
    let list = ok(cwd, &["list-clients"]);
    assert_eq!(list.lines().count(), 2, "{list}");
    let stored = std::fs::read_to_string(cwd.join("certs/authorized.crt")).unwrap();
    let begins = stored
        .lines()
        .filter(|l| l.starts_with("-----BEGIN"))
        .count();
    assert_eq!(begins, 1, "{stored}");
}

/// Run where there is no bundle and no certs/ directory, add-client writes nothing and
/// says how to point it at the server's bundle; with --create it starts one and says
/// which file it wrote, without claiming that any server will read it.
#[test]
fn add_client_creates_a_bundle_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let crt = rcgen_cert(cwd, "alice.crt", "alice", -1, 30);
    let o = run(cwd, &["add-client", crt.to_str().unwrap()]);
    assert!(!o.ok, "{}", o.stdout);
    assert!(
        o.stderr.contains("certs/authorized.crt does not exist")
            && o.stderr.contains("--authorized")
            && o.stderr.contains("--create"),
        "{}",
        o.stderr
    );
    assert!(!cwd.join("certs").exists(), "created the directory anyway");

    let out = ok(cwd, &["add-client", "--create", crt.to_str().unwrap()]);
    let bundle = cwd.canonicalize().unwrap().join("certs/authorized.crt");
    assert!(
        out.contains(&format!("created the bundle {}", bundle.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "A server started with --client-certs {}",
            bundle.display()
        )),
        "{out}"
    );
    assert!(!out.contains("A running server applies"), "{out}");

    // An existing directory is intent enough.
    std::fs::create_dir(cwd.join("srv")).unwrap();
    let bob = rcgen_cert(cwd, "bob.crt", "bob", -1, 30);
    ok(
        cwd,
        &[
            "add-client",
            bob.to_str().unwrap(),
            "--authorized",
            "srv/authorized.crt",
        ],
    );
}

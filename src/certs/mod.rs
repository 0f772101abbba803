//! Certificate tooling: `gen-server-cert`, `gen-client-cert`, `add-client`,
//! `list-clients` and `remove-client`. They replace the openssl commands and the
//! `cat client.crt >> authorized.crt` step of the historical documentation with
//! commands that validate their input and never leave a half-written file behind.
//!
//! Keys are ECDSA P-256 (what rcgen generates with the ring backend; every TLS stack
//! BuildStream's buildbox-casd may use supports it). Certificates are self-signed and
//! marked `CA:FALSE` with the matching extended key usage, so that strict verifiers
//! (rustls/webpki) accept them where openssl's `req -x509` output (`CA:TRUE`) is refused.

pub mod files;
pub mod pem;

use anyhow::{bail, Context};
use clap::Args;
use files::NewFile;
use pem::{format_time, CertInfo, Validity};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Default certificate directory of every subcommand (relative to the working directory).
pub const DEFAULT_DIR: &str = "certs";
/// Default authorized-clients bundle: next to the server's own files, as in the
/// historical documentation (`--client-certs certs/authorized.crt`).
pub const DEFAULT_AUTHORIZED: &str = "certs/authorized.crt";

/// Validity period limits, in days.
const MAX_DAYS: i64 = 36_500;

/// Mode of a new `authorized.crt`: public certificates, read by the server's user.
const AUTHORIZED_MODE: u32 = 0o644;

#[derive(Args, Debug, Clone)]
pub struct GenServerCertArgs {
    /// Host name clients use to reach the server: the certificate's CN and first
    /// subjectAltName. An IP address becomes an IP subjectAltName.
    #[arg(long, value_name = "HOST")]
    pub cn: String,

    /// A further host name or IP address the server is reached by (repeatable),
    /// e.g. `--san localhost --san 127.0.0.1`.
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    pub sans: Vec<String>,

    /// Validity period in days.
    #[arg(long, default_value_t = 3650, value_parser = parse_days)]
    pub days: i64,

    /// Directory to write server.key (mode 0600) and server.crt into; created if missing.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,

    /// Replace existing server.key and server.crt.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct GenClientCertArgs {
    /// Name of the client (the certificate's CN), shown by list-clients and in the
    /// server's log.
    #[arg(long, value_name = "NAME")]
    pub cn: String,

    /// Validity period in days.
    #[arg(long, default_value_t = 3650, value_parser = parse_days)]
    pub days: i64,

    /// Directory to write client.key (mode 0600) and client.crt into; created if missing.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,

    /// Replace existing client.key and client.crt.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct AddClientArgs {
    /// The client's certificate (PEM or DER), e.g. a client.crt from gen-client-cert or
    /// openssl. Never the private key.
    #[arg(value_name = "CLIENT_CRT")]
    pub cert: PathBuf,

    /// The bundle of authorized client certificates the server reads (--client-certs).
    /// A missing bundle is created only if its directory exists or with --create.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUTHORIZED)]
    pub authorized: PathBuf,

    /// Start a new bundle (and its directory) if --authorized does not exist yet.
    #[arg(long)]
    pub create: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ListClientsArgs {
    /// The bundle of authorized client certificates (--client-certs).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUTHORIZED)]
    pub authorized: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct RemoveClientArgs {
    /// SHA-256 fingerprint (as list-clients prints it, or openssl's colon form; a prefix
    /// of at least 8 digits will do) or subject (`CN=alice`, or just `alice`).
    #[arg(value_name = "FINGERPRINT|SUBJECT")]
    pub client: String,

    /// The bundle of authorized client certificates (--client-certs).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_AUTHORIZED)]
    pub authorized: PathBuf,

    /// Remove every certificate that matches, when several different ones do.
    #[arg(long)]
    pub all: bool,
}

fn parse_days(s: &str) -> Result<i64, String> {
    let days: i64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of days"))?;
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(format!("must be between 1 and {MAX_DAYS}"));
    }
    Ok(days)
}

/// What a generated certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

/// A subjectAltName from the command line: an IP address or a DNS name.
fn san_of(name: &str) -> anyhow::Result<rcgen::SanType> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(rcgen::SanType::IpAddress(ip));
    }
    // Check the name the way TLS clients will (a wildcard label is allowed in front).
    let checked = name.strip_prefix("*.").unwrap_or(name);
    if rustls_pki_types::DnsName::try_from(checked).is_err() {
        bail!("{name:?} is neither a valid host name nor an IP address");
    }
    let ia5 = name
        .to_string()
        .try_into()
        .with_context(|| format!("{name:?} is not a valid host name"))?;
    Ok(rcgen::SanType::DnsName(ia5))
}

fn san_display(san: &rcgen::SanType) -> String {
    match san {
        rcgen::SanType::IpAddress(ip) => format!("IP:{ip}"),
        rcgen::SanType::DnsName(n) => format!("DNS:{}", n.as_str()),
        other => format!("{other:?}"),
    }
}

/// Generates a key pair and a self-signed certificate; returns (key PEM, cert PEM).
fn generate(
    cn: &str,
    sans: Vec<rcgen::SanType>,
    days: i64,
    role: Role,
) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating a private key")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.subject_alt_names = sans;
    // CA:FALSE explicitly: these are leaf certificates, and saying so keeps strict
    // verifiers from treating the self-signed certificate as an issuer.
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Server => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        Role::Client => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    }];
    let now = time::OffsetDateTime::now_utc();
    // Back-dated an hour so that a machine whose clock is a little behind the one that
    // generated the certificate does not see it as "not yet valid".
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    // A positive, non-zero 127-bit serial (RFC 5280 wants positive integers).
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;
    Ok((key.serialize_pem(), cert.pem()))
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating directory {}", dir.display()))
}

/// Writes `<dir>/<stem>.key` (0600) and `<dir>/<stem>.crt` (0644) together.
fn write_pair(
    dir: &Path,
    stem: &str,
    key_pem: &str,
    cert_pem: &str,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    create_dir(dir)?;
    let key_path = dir.join(format!("{stem}.key"));
    let cert_path = dir.join(format!("{stem}.crt"));
    files::create_files(
        &[
            NewFile {
                path: key_path.clone(),
                contents: key_pem.as_bytes().to_vec(),
                mode: 0o600,
            },
            NewFile {
                path: cert_path.clone(),
                contents: cert_pem.as_bytes().to_vec(),
                mode: 0o644,
            },
        ],
        force,
    )?;
    Ok((key_path, cert_path))
}

fn info_of_pem(cert_pem: &str) -> anyhow::Result<CertInfo> {
    let blocks = pem::blocks(cert_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    let block = blocks.first().context("no certificate generated")?;
    CertInfo::from_der(&block.der).map_err(anyhow::Error::msg)
}

pub fn gen_server_cert(args: &GenServerCertArgs) -> anyhow::Result<()> {
    let mut names: Vec<&str> = vec![args.cn.as_str()];
    for s in &args.sans {
        if !names.contains(&s.as_str()) {
            names.push(s);
        }
    }
    let sans = names
        .iter()
        .map(|n| san_of(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shown: Vec<String> = sans.iter().map(san_display).collect();
    let (key_pem, cert_pem) = generate(&args.cn, sans, args.days, Role::Server)?;
    let info = info_of_pem(&cert_pem)?;
    let (key_path, cert_path) = write_pair(&args.dir, "server", &key_pem, &cert_pem, args.force)?;
    println!(
        "wrote {} (private key, mode 0600) and {}",
        key_path.display(),
        cert_path.display()
    );
    println!("  subject:     {}", info.subject_display());
    println!("  names:       {}", shown.join(", "));
    println!("  key:         {}", info.key);
    println!("  valid until: {}", format_time(info.not_after));
    println!("  sha256:      {}", info.sha256);
    println!(
        "Serve with --server-key {} --server-cert {}; give {} to clients (BuildStream: auth: server-cert).",
        key_path.display(),
        cert_path.display(),
        cert_path.display()
    );
    Ok(())
}

pub fn gen_client_cert(args: &GenClientCertArgs) -> anyhow::Result<()> {
    if args.cn.trim().is_empty() || args.cn.chars().any(char::is_control) {
        bail!("--cn must be a non-empty name without control characters");
    }
    let (key_pem, cert_pem) = generate(&args.cn, Vec::new(), args.days, Role::Client)?;
    let info = info_of_pem(&cert_pem)?;
    let (key_path, cert_path) = write_pair(&args.dir, "client", &key_pem, &cert_pem, args.force)?;
    println!(
        "wrote {} (private key, mode 0600) and {}",
        key_path.display(),
        cert_path.display()
    );
    println!("  subject:     {}", info.subject_display());
    println!("  valid until: {}", format_time(info.not_after));
    println!("  sha256:      {}", info.sha256);
    println!(
        "Authorize it on the server with: bst-artifact-server add-client {} (copy only the .crt, never the .key).",
        cert_path.display()
    );
    Ok(())
}

/// Reads the certificates of a file given to add-client: PEM (one or more certificates)
/// or a single DER certificate. Anything holding a private key is refused.
fn read_client_certs(path: &Path) -> anyhow::Result<Vec<CertInfo>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let blocks = pem::blocks(&data).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if blocks.is_empty() {
        // Not PEM: a DER certificate is accepted as such; anything else is an error.
        return match CertInfo::from_der(&data) {
            Ok(info) => Ok(vec![info]),
            Err(_) => bail!("{} holds no PEM certificate", path.display()),
        };
    }
    if let Some(b) = blocks.iter().find(|b| pem::is_private_key_label(&b.label)) {
        bail!(
            "{} holds a private key ({}), not a certificate: pass the .crt file, and never copy a private key to the server",
            path.display(),
            b.label
        );
    }
    let mut out = Vec::new();
    for b in blocks {
        if b.label != "CERTIFICATE" {
            bail!("{} holds a {}, not a CERTIFICATE", path.display(), b.label);
        }
        let info =
            CertInfo::from_der(&b.der).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if !out.iter().any(|o: &CertInfo| o.sha256 == info.sha256) {
            out.push(info);
        }
    }
    Ok(out)
}

/// Reads and parses an authorized bundle; a missing file is an empty bundle when
/// `missing_ok`.
fn read_authorized(
    path: &Path,
    missing_ok: bool,
) -> anyhow::Result<(Vec<u8>, Vec<pem::BundleEntry>)> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let entries = pem::parse_bundle(&data).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid certificate bundle: {e}; fix or remove that entry first",
            path.display()
        )
    })?;
    Ok((data, entries))
}

/// What to tell the operator about a changed bundle: only what holds for any server that
/// reads it; whether one does is not ours to know.
fn reload_hint(bundle: &Path) -> String {
    let shown = std::path::absolute(bundle).unwrap_or_else(|_| bundle.to_owned());
    format!(
        "A server started with --client-certs {} applies this to new connections within its \
         --tls-watch-interval (2 s by default), or at once on SIGHUP.",
        shown.display()
    )
}

pub fn add_client(args: &AddClientArgs) -> anyhow::Result<()> {
    let new = read_client_certs(&args.cert)?;
    let now = pem::now_unix();
    for c in &new {
        match c.validity_at(now) {
            Validity::Valid => {}
            Validity::Expired => bail!(
                "{}: certificate {} expired on {}",
                args.cert.display(),
                c.subject_display(),
                format_time(c.not_after)
            ),
            Validity::NotYetValid => bail!(
                "{}: certificate {} is not valid before {} (check the clocks)",
                args.cert.display(),
                c.subject_display(),
                format_time(c.not_before)
            ),
        }
    }
    let dir = files::dir_of(&args.authorized);
    let creating = !args.authorized.exists();
    if creating && !args.create && !dir.is_dir() {
        bail!(
            "{} does not exist, nor does its directory {}: run add-client where the server's \
             certificate directory is, name the server's bundle with --authorized FILE (as \
             given to --client-certs), or pass --create to start a new bundle",
            args.authorized.display(),
            dir.display()
        );
    }
    create_dir(dir)?;
    let _lock = files::lock_dir(dir)?;
    let (mut data, existing) = read_authorized(&args.authorized, true)?;
    for c in &new {
        if existing.iter().any(|e| e.info.sha256 == c.sha256) {
            bail!(
                "{} (sha256 {}) is already authorized in {}",
                c.subject_display(),
                c.sha256,
                args.authorized.display()
            );
        }
    }
    // Append after the existing bytes, which stay exactly as they were.
    if !data.is_empty() && !data.ends_with(b"\n") {
        data.push(b'\n');
    }
    let today = format_time(now);
    for c in &new {
        // The comment is for people reading the file; the subject was made printable,
        // so it cannot smuggle in lines of its own.
        data.extend_from_slice(
            format!(
                "# {}\n# sha256 {} added {}\n",
                c.subject_display(),
                c.sha256,
                today
            )
            .as_bytes(),
        );
        data.extend_from_slice(pem::encode("CERTIFICATE", &c.der).as_bytes());
    }
    files::replace_file(&args.authorized, &data, AUTHORIZED_MODE)?;
    let written = std::path::absolute(&args.authorized).unwrap_or_else(|_| args.authorized.clone());
    if creating {
        println!("created the bundle {}", written.display());
    }
    for c in &new {
        println!(
            "authorized {} in {}\n  sha256:      {}\n  key:         {}\n  valid until: {}",
            c.subject_display(),
            written.display(),
            c.sha256,
            c.key,
            format_time(c.not_after)
        );
    }
    println!("{}", reload_hint(&args.authorized));
    Ok(())
}

pub fn list_clients(args: &ListClientsArgs) -> anyhow::Result<()> {
    let (_, entries) = read_authorized(&args.authorized, false)?;
    if entries.is_empty() {
        println!("no authorized clients in {}", args.authorized.display());
        return Ok(());
    }
    let now = pem::now_unix();
    println!("{:<64}  {:<28}  SUBJECT", "SHA-256", "VALID UNTIL");
    for e in &entries {
        let note = match e.info.validity_at(now) {
            Validity::Valid => "",
            Validity::Expired => " (expired)",
            Validity::NotYetValid => " (not yet valid)",
        };
        println!(
            "{:<64}  {:<28}  {}",
            e.info.sha256,
            format!("{}{note}", format_time(e.info.not_after)),
            e.info.subject_display()
        );
    }
    Ok(())
}

pub fn remove_client(args: &RemoveClientArgs) -> anyhow::Result<()> {
    let wanted = args.client.trim();
    if wanted.is_empty() {
        bail!("give a fingerprint or a subject");
    }
    let fingerprint = pem::normalize_fingerprint(wanted).filter(|f| f.len() >= 8);
    let dir = files::dir_of(&args.authorized);
    let _lock = files::lock_dir(dir)?;
    let (data, entries) = read_authorized(&args.authorized, false)?;
    let matches: Vec<&pem::BundleEntry> = entries
        .iter()
        .filter(|e| {
            fingerprint
                .as_deref()
                .is_some_and(|f| e.info.sha256.starts_with(f))
                || e.info.subject == wanted
                || e.info.subject == format!("CN={wanted}")
        })
        .collect();
    if matches.is_empty() {
        bail!(
            "no authorized client in {} matches {wanted:?} (see list-clients)",
            args.authorized.display()
        );
    }
    let mut distinct: Vec<&str> = matches.iter().map(|e| e.info.sha256.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() > 1 && !args.all {
        let list: Vec<String> = matches
            .iter()
            .map(|e| format!("{} {}", e.info.sha256, e.info.subject_display()))
            .collect();
        bail!(
            "{wanted:?} matches {} different certificates ({}); give a fingerprint, or --all to remove them all",
            distinct.len(),
            list.join("; ")
        );
    }
    // Keep every other byte of the file, including comments and entries we did not touch.
    let mut out = Vec::with_capacity(data.len());
    let mut pos = 0;
    for e in &matches {
        out.extend_from_slice(&data[pos..e.span.start]);
        pos = e.span.end;
    }
    out.extend_from_slice(&data[pos..]);
    files::replace_file(&args.authorized, &out, AUTHORIZED_MODE)?;
    for e in &matches {
        println!(
            "removed {} (sha256 {}) from {}",
            e.info.subject_display(),
            e.info.sha256,
            args.authorized.display()
        );
    }
    println!("{}", reload_hint(&args.authorized));
    Ok(())
}

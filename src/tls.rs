//! TLS for `serve`: `--server-key`/`--server-cert` enable it, `--client-certs` also
//! requires every client to present one of the listed certificates (mutual TLS).
//!
//! * Client certificates are *pinned*: a presented certificate is accepted when it is
//!   byte-identical to an entry of the bundle, or has the same public key as one, and
//!   both are within their validity period. There is no chain building, so the
//!   self-signed `CA:TRUE` certificates of the historical openssl procedure work (webpki
//!   refuses them as end entities). See docs/adr/0002-client-certificate-verification.md.
//! * Connections are accepted here, not by tonic: each TLS handshake runs in its own task
//!   under a timeout, so a slow or broken client cannot hold up anyone else's accept, and
//!   established streams are handed to tonic through [`incoming`]. When too many
//!   connections are waiting to handshake, the oldest is closed, never the newcomer.
//! * The configuration lives behind a lock holding an `Arc<ServerConfig>` that every new
//!   connection reads, so [`Reloader`] can swap in new keys or a new list of clients
//!   (on SIGHUP or when the files change) without touching established connections.

use crate::certs::pem::{self, CertInfo, Validity};
use anyhow::{bail, Context};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpConnectInfo;
use tracing::Instrument;

/// A client has this long to complete the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections waiting to complete their handshake at once; beyond this the oldest is
/// closed (see [`PendingHandshakes`]), so a flood of idle connections can neither exhaust
/// file descriptors nor keep a real client out.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The TLS files named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub client_certs: Option<PathBuf>,
}

impl TlsPaths {
    /// Applies the historical rules for combining the options: key and certificate only
    /// together, client certificates only with TLS. `Ok(None)` means plaintext.
    pub fn from_options(
        key: Option<&Path>,
        cert: Option<&Path>,
        client_certs: Option<&Path>,
    ) -> anyhow::Result<Option<TlsPaths>> {
        match (key, cert) {
            (Some(key), Some(cert)) => Ok(Some(TlsPaths {
                key: key.to_owned(),
                cert: cert.to_owned(),
                client_certs: client_certs.map(Path::to_owned),
            })),
            (None, None) if client_certs.is_some() => {
                bail!("--client-certs can only be used with --server-key")
            }
            (None, None) => Ok(None),
            _ => bail!("--server-key and --server-cert are both required for TLS"),
        }
    }

    fn files(&self) -> Vec<&Path> {
        let mut v = vec![self.key.as_path(), self.cert.as_path()];
        v.extend(self.client_certs.as_deref());
        v
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The pinned-certificate client verifier (see the module documentation).
#[derive(Debug)]
pub struct AuthorizedClients {
    entries: Vec<CertInfo>,
    provider: Arc<CryptoProvider>,
}

impl AuthorizedClients {
    pub fn new(entries: Vec<CertInfo>) -> AuthorizedClients {
        AuthorizedClients {
            entries,
            provider: provider(),
        }
    }

    /// Parses a `--client-certs` bundle.
    pub fn from_pem(data: &[u8]) -> Result<AuthorizedClients, String> {
        let entries = pem::parse_bundle(data)?;
        Ok(Self::new(entries.into_iter().map(|e| e.info).collect()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The authorization decision, separate from rustls for testing: `Ok` with the
    /// matching entry, or the reason for refusing.
    pub fn check(&self, presented: &[u8], now: i64) -> Result<&CertInfo, CertificateError> {
        let cert = match CertInfo::from_der(presented) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    sha256 = %pem::fingerprint(presented),
                    "refused a malformed client certificate: {e}"
                );
                return Err(CertificateError::BadEncoding);
            }
        };
        // Same bytes, or else the same key: a client that renewed its self-signed
        // certificate with the key it already had stays authorized, while the listed
        // entry's own validity still bounds how long (it is checked below).
        let entry = self
            .entries
            .iter()
            .find(|e| e.der == cert.der)
            .or_else(|| self.entries.iter().find(|e| e.spki == cert.spki));
        let Some(entry) = entry else {
            tracing::warn!(
                subject = %cert.subject_display(),
                sha256 = %cert.sha256,
                "refused a client certificate that is not in --client-certs"
            );
            return Err(CertificateError::ApplicationVerificationFailure);
        };
        for (which, c) in [("presented", &cert), ("authorized", entry)] {
            let refused = match c.validity_at(now) {
                Validity::Valid => continue,
                Validity::Expired => CertificateError::Expired,
                Validity::NotYetValid => CertificateError::NotValidYet,
            };
            tracing::warn!(
                subject = %c.subject_display(),
                sha256 = %c.sha256,
                not_before = %pem::format_time(c.not_before),
                not_after = %pem::format_time(c.not_after),
                "refused a client certificate: the {which} certificate is outside its validity period"
            );
            return Err(refused);
        }
        tracing::debug!(
            subject = %cert.subject_display(),
            sha256 = %cert.sha256,
            "client certificate accepted"
        );
        Ok(entry)
    }
}

impl ClientCertVerifier for AuthorizedClients {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA names are sent: they would tell any unauthenticated peer who may push, and
    /// clients configured with one certificate present it regardless.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        self.check(end_entity, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(rustls::Error::InvalidCertificate)
    }

    // Possession of the key is still proven by the handshake signature, checked with the
    // presented certificate's key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let data = read(path, "server key")?;
    let blocks =
        pem::blocks(&data).map_err(|e| anyhow::anyhow!("server key {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for b in blocks {
        let key = match b.label.as_str() {
            "PRIVATE KEY" => PrivateKeyDer::Pkcs8(b.der.into()),
            "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(b.der.into()),
            "EC PRIVATE KEY" => PrivateKeyDer::Sec1(b.der.into()),
            "ENCRYPTED PRIVATE KEY" => bail!(
                "server key {} is encrypted; store it unencrypted (openssl pkey -in KEY -out KEY.plain) and protect it with file permissions",
                path.display()
            ),
            _ => continue,
        };
        keys.push(key);
    }
    match keys.len() {
        1 => Ok(keys.pop().expect("one key")),
        0 if data.windows(17).any(|w| w == b"BEGIN CERTIFICATE") => bail!(
            "server key {} holds a certificate, not a private key (are --server-key and --server-cert swapped?)",
            path.display()
        ),
        0 => bail!("server key {} holds no PEM private key", path.display()),
        n => bail!(
            "server key {} holds {n} private keys; give it exactly one",
            path.display()
        ),
    }
}

fn load_cert_chain(path: &Path) -> anyhow::Result<(Vec<CertificateDer<'static>>, CertInfo)> {
    let data = read(path, "server certificate")?;
    let blocks = pem::blocks(&data)
        .map_err(|e| anyhow::anyhow!("server certificate {}: {e}", path.display()))?;
    let chain: Vec<CertificateDer<'static>> = blocks
        .iter()
        .filter(|b| b.label == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.der.clone()))
        .collect();
    let Some(leaf) = chain.first() else {
        if blocks.iter().any(|b| pem::is_private_key_label(&b.label)) {
            bail!(
                "server certificate {} holds a private key, not a certificate (are --server-key and --server-cert swapped?)",
                path.display()
            );
        }
        bail!(
            "server certificate {} holds no PEM certificate",
            path.display()
        );
    };
    let info = CertInfo::from_der(leaf)
        .map_err(|e| anyhow::anyhow!("server certificate {}: {e}", path.display()))?;
    Ok((chain, info))
}

/// Warnings about a server certificate that loads but that clients will likely refuse.
fn check_server_cert(info: &CertInfo, path: &Path) {
    match info.validity_now() {
        Validity::Valid if info.not_after - pem::now_unix() < 30 * 86_400 => tracing::warn!(
            cert = %path.display(),
            "server certificate expires on {}", pem::format_time(info.not_after)
        ),
        Validity::Valid => {}
        Validity::Expired => tracing::warn!(
            cert = %path.display(),
            "server certificate expired on {}; clients will refuse it", pem::format_time(info.not_after)
        ),
        Validity::NotYetValid => tracing::warn!(
            cert = %path.display(),
            "server certificate is not valid before {}; clients will refuse it", pem::format_time(info.not_before)
        ),
    }
    use x509_parser::prelude::FromDer;
    let has_san = x509_parser::certificate::X509Certificate::from_der(&info.der)
        .ok()
        .and_then(|(_, c)| c.subject_alternative_name().ok().flatten().map(|_| ()))
        .is_some();
    if !has_san {
        tracing::warn!(
            cert = %path.display(),
            "server certificate has no subjectAltName; gRPC clients such as BuildStream's will refuse it (make one with gen-server-cert --cn HOST)"
        );
    }
}

/// Builds a rustls configuration from the files. Pure apart from reading them and
/// logging warnings; returns the configuration and a one-line summary of it.
pub fn load_config(paths: &TlsPaths) -> anyhow::Result<(Arc<ServerConfig>, String)> {
    let key = load_key(&paths.key)?;
    let (chain, leaf) = load_cert_chain(&paths.cert)?;
    check_server_cert(&leaf, &paths.cert);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("selecting TLS versions")?;
    let (builder, clients) = match &paths.client_certs {
        Some(path) => {
            let data = read(path, "client certificates")?;
            let clients = AuthorizedClients::from_pem(&data)
                .map_err(|e| anyhow::anyhow!("client certificates {}: {e}", path.display()))?;
            if clients.is_empty() {
                tracing::warn!(
                    file = %path.display(),
                    "no authorized client certificates: every client will be refused"
                );
            }
            let n = clients.len();
            (
                builder.with_client_cert_verifier(Arc::new(clients)),
                Some(n),
            )
        }
        None => (builder.with_no_client_auth(), None),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "server key {} does not fit server certificate {}",
            paths.key.display(),
            paths.cert.display()
        )
    })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    if clients.is_some() {
        // A resumed session skips client-certificate verification, so with resumption a
        // client removed from the list could reconnect on its old session. Handshakes
        // are rare (gRPC keeps connections open), so always do the full one.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    let summary = match clients {
        Some(n) => format!(
            "TLS as {} (sha256 {}), client certificates required: {n} authorized",
            leaf.subject_display(),
            leaf.sha256
        ),
        None => format!(
            "TLS as {} (sha256 {}), no client certificates",
            leaf.subject_display(),
            leaf.sha256
        ),
    };
    Ok((Arc::new(config), summary))
}

/// What a file looked like when last loaded; any difference means it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    // metadata() follows symlinks, so swapping a symlink's target is seen as a change.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// The current TLS configuration and the means to replace it.
pub struct Reloader {
    paths: TlsPaths,
    current: RwLock<Arc<ServerConfig>>,
    /// File stamps as of the last load attempt, successful or not: a broken file is
    /// reported once, not at every poll, and retried when it changes again.
    seen: Mutex<Vec<Option<Stamp>>>,
}

impl Reloader {
    /// Loads the configuration for the first time; any problem is fatal here.
    pub fn load(paths: TlsPaths) -> anyhow::Result<Arc<Reloader>> {
        let seen = paths.files().iter().map(|p| stamp(p)).collect();
        let (config, summary) = load_config(&paths)?;
        tracing::info!("{summary}");
        Ok(Arc::new(Reloader {
            paths,
            current: RwLock::new(config),
            seen: Mutex::new(seen),
        }))
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads every file. On success new connections use the new configuration and the
    /// summary is returned; on failure the previous configuration stays in force.
    pub fn reload(&self) -> anyhow::Result<String> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Stamped before reading, so a change made while we read is seen next time.
        *seen = self.paths.files().iter().map(|p| stamp(p)).collect();
        let (config, summary) = load_config(&self.paths)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(summary)
    }

    /// Reloads if any file changed since the last attempt.
    pub fn reload_if_changed(&self) -> Option<anyhow::Result<String>> {
        let now: Vec<Option<Stamp>> = self.paths.files().iter().map(|p| stamp(p)).collect();
        let changed = *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != now;
        changed.then(|| self.reload())
    }
}

fn log_reload(result: &anyhow::Result<String>, trigger: &str) {
    match result {
        Ok(summary) => tracing::info!(trigger, "TLS configuration reloaded: {summary}"),
        Err(e) => tracing::error!(
            trigger,
            "TLS reload failed, keeping the previous configuration: {e:#}"
        ),
    }
}

/// Installs the SIGHUP handler (now, so that a SIGHUP never kills the server) and starts
/// the task that reloads on SIGHUP and, every `watch_every`, when the files changed.
/// Without TLS a SIGHUP is acknowledged and otherwise ignored. `ready_status` is the
/// status line re-announced to systemd once a SIGHUP reload is done.
pub fn spawn_reload_triggers(
    reloader: Option<Arc<Reloader>>,
    watch_every: Option<Duration>,
    ready_status: String,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let watch_every = watch_every.filter(|d| !d.is_zero() && reloader.is_some());
    Ok(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(watch_every.unwrap_or(Duration::from_secs(3600)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // The single place reloads are announced to the service manager.
                    crate::systemd::notify_reloading("reloading TLS configuration");
                    let status = match &reloader {
                        Some(r) => {
                            let result = r.reload();
                            log_reload(&result, "SIGHUP");
                            match result {
                                Ok(_) => ready_status.clone(),
                                Err(e) => format!("{ready_status}; TLS reload failed, previous configuration kept: {e:#}"),
                            }
                        }
                        None => {
                            tracing::info!("SIGHUP: nothing to reload (TLS is not enabled)");
                            ready_status.clone()
                        }
                    };
                    crate::systemd::notify_ready(&status);
                }
                _ = ticks.tick(), if watch_every.is_some() => {
                    if let Some(r) = &reloader {
                        if let Some(result) = r.reload_if_changed() {
                            log_reload(&result, "file change");
                        }
                    }
                }
            }
        }
    }))
}

/// An established TLS connection, as tonic sees it: it reports the same connection
/// information as a plaintext one, so `Request::remote_addr()` works alike.
pub type TlsConnection = crate::accept::Connection<tokio_rustls::server::TlsStream<TcpStream>>;

/// Why a connection did not become a TLS connection.
enum Refused {
    /// Closed before sending anything (port probes, health checks of the TCP port).
    Silent,
    /// Spoke plaintext HTTP (an `http://` URL pointed at this port).
    Plaintext,
    Tls(std::io::Error),
}

async fn handshake(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Refused> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err(Refused::Silent),
        Ok(_) => {}
        Err(e) => return Err(Refused::Tls(e)),
    }
    // Every TLS connection starts with a handshake record (content type 22). An ASCII
    // letter is an HTTP/2 preface ("PRI * HTTP/2.0") or an HTTP/1 request line.
    if first[0] != 22 && first[0].is_ascii_alphabetic() {
        return Err(Refused::Plaintext);
    }
    tokio_rustls::TlsAcceptor::from(config)
        .accept(tcp)
        .await
        .map_err(Refused::Tls)
}

/// Accepts TCP connections on `listener`, runs each TLS handshake in its own task, and
/// yields the established connections for tonic's `serve_with_incoming_shutdown`. Stops
/// accepting (closing the listener) when `stop` resolves or tonic drops the stream.
pub fn incoming(
    listener: TcpListener,
    reloader: Arc<Reloader>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = Result<TlsConnection, std::convert::Infallible>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<TlsConnection>(64);
    tokio::spawn(accept_loop(listener, reloader, tx, stop));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

async fn accept_loop(
    listener: TcpListener,
    reloader: Arc<Reloader>,
    tx: tokio::sync::mpsc::Sender<TlsConnection>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let pending = Arc::new(PendingHandshakes::default());
    let mut acceptor = crate::accept::Acceptor::new(listener);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = &mut stop => return,
            _ = tx.closed() => return,
        };
        let (seq, mut evicted) = pending.add();
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let config = reloader.current();
        let tx = tx.clone();
        let pending = pending.clone();
        let span = tracing::info_span!("tls", %peer);
        tokio::spawn(
            async move {
                let started = std::time::Instant::now();
                let result = tokio::select! {
                    result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, config)) => Some(result),
                    _ = &mut evicted => None,
                };
                pending.remove(seq);
                let Some(result) = result else {
                    tracing::debug!("closed: the oldest of {MAX_PENDING_HANDSHAKES} pending handshakes, to make room for a new connection");
                    return;
                };
                match result {
                    Ok(Ok(stream)) => {
                        tracing::debug!(elapsed = ?started.elapsed(), "TLS handshake complete");
                        // Fails only when the server is stopping; the connection is
                        // then simply closed.
                        let _ = tx.send(TlsConnection::new(stream, info, false)).await;
                    }
                    Ok(Err(Refused::Silent)) => {
                        tracing::debug!("connection closed before the TLS handshake");
                    }
                    Ok(Err(Refused::Plaintext)) => tracing::warn!(
                        "plaintext client {peer} on a TLS port (its URL should be https://); connection closed"
                    ),
                    Ok(Err(Refused::Tls(e))) => {
                        let hint = if e.to_string().contains("received fatal alert") {
                            " (the client refused the server certificate: check the client's server-cert and that the certificate names the host the client connects to)"
                        } else {
                            ""
                        };
                        tracing::warn!("TLS handshake with {peer} failed: {e}{hint}");
                    }
                    Err(_) => tracing::warn!(
                        "TLS handshake with {peer} not completed within {HANDSHAKE_TIMEOUT:?}; connection closed"
                    ),
                }
            }
            .instrument(span),
        );
    }
}

/// Connections accepted but not yet through their handshake. When there are too many,
/// the one that has waited longest is closed to make room: a client that speaks at once
/// (every real one) is through in milliseconds, so a flood of silent or stalled
/// connections only ever pushes out its own oldest members, never a newcomer.
#[derive(Default)]
struct PendingHandshakes {
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    waiting: std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
    /// Connections closed to make room since the last warning, and when that was.
    evicted: u64,
    warned: Option<std::time::Instant>,
}

/// At most one warning about closed pending connections per this interval.
const EVICTION_WARNING_EVERY: Duration = Duration::from_secs(10);

impl PendingHandshakes {
    /// Registers a new connection; the receiver fires if it is closed to make room.
    fn add(&self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while p.waiting.len() >= MAX_PENDING_HANDSHAKES {
            if let Some((_, oldest)) = p.waiting.pop_first() {
                let _ = oldest.send(());
                p.evicted += 1;
            }
        }
        if p.evicted > 0
            && p.warned
                .is_none_or(|t| t.elapsed() >= EVICTION_WARNING_EVERY)
        {
            tracing::warn!(
                "{} connection(s) closed before completing a TLS handshake, to make room: \
                 more than {MAX_PENDING_HANDSHAKES} connections were waiting to handshake \
                 (a flood of idle connections?)",
                p.evicted
            );
            p.evicted = 0;
            p.warned = Some(std::time::Instant::now());
        }
        let seq = p.next;
        p.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        p.waiting.insert(seq, tx);
        (seq, rx)
    }

    fn remove(&self, seq: u64) {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        p.waiting.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, key: &rcgen::KeyPair, days: (i64, i64)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        params.self_signed(key).unwrap().der().to_vec()
    }

    fn clients(certs: &[&[u8]]) -> AuthorizedClients {
        AuthorizedClients::new(
            certs
                .iter()
                .map(|d| CertInfo::from_der(d).unwrap())
                .collect(),
        )
    }

    #[test]
    fn options_follow_the_historical_rules() {
        let p = |s: &'static str| Some(Path::new(s));
        assert_eq!(TlsPaths::from_options(None, None, None).unwrap(), None);
        assert!(TlsPaths::from_options(p("k"), p("c"), p("a"))
            .unwrap()
            .is_some());
        for (k, c) in [(p("k"), None), (None, p("c"))] {
            let e = TlsPaths::from_options(k, c, None).unwrap_err().to_string();
            assert_eq!(
                e,
                "--server-key and --server-cert are both required for TLS"
            );
        }
        let e = TlsPaths::from_options(None, None, p("a"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--client-certs can only be used with --server-key");
    }

    #[test]
    fn pinning_decisions() {
        let now = pem::now_unix();
        let alice_key = rcgen::KeyPair::generate().unwrap();
        let alice = cert("alice", &alice_key, (-1, 30));
        let alice_renewed = cert("alice", &alice_key, (-1, 60));
        let bob = cert("bob", &rcgen::KeyPair::generate().unwrap(), (-1, 30));
        let expired_key = rcgen::KeyPair::generate().unwrap();
        let expired = cert("old", &expired_key, (-60, -1));
        let future = cert("future", &rcgen::KeyPair::generate().unwrap(), (5, 30));
        let list = clients(&[&alice, &expired, &future]);

        assert_eq!(list.check(&alice, now).unwrap().subject, "CN=alice");
        // Same key, different certificate: accepted.
        assert_eq!(list.check(&alice_renewed, now).unwrap().der, alice);
        assert_eq!(
            list.check(&bob, now).unwrap_err(),
            CertificateError::ApplicationVerificationFailure
        );
        assert_eq!(
            list.check(&expired, now).unwrap_err(),
            CertificateError::Expired
        );
        assert_eq!(
            list.check(&future, now).unwrap_err(),
            CertificateError::NotValidYet
        );
        // A fresh certificate for the key of an expired entry does not revive it.
        let revived = cert("old", &expired_key, (-1, 30));
        assert_eq!(
            list.check(&revived, now).unwrap_err(),
            CertificateError::Expired
        );
        assert_eq!(
            list.check(b"\x30\x03\x02\x01\x00", now).unwrap_err(),
            CertificateError::BadEncoding
        );
        // Time passes: the entry expires while the server runs.
        assert_eq!(
            list.check(&alice, now + 31 * 86_400).unwrap_err(),
            CertificateError::Expired
        );
    }

    #[test]
    fn reloader_keeps_last_good_config() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let server = params.self_signed(&key).unwrap();
        let paths = TlsPaths {
            key: dir.path().join("server.key"),
            cert: dir.path().join("server.crt"),
            client_certs: Some(dir.path().join("authorized.crt")),
        };
        std::fs::write(&paths.key, key.serialize_pem()).unwrap();
        std::fs::write(&paths.cert, server.pem()).unwrap();
        std::fs::write(paths.client_certs.as_ref().unwrap(), "").unwrap();
        let r = Reloader::load(paths.clone()).unwrap();
        let first = r.current();
        assert!(r.reload_if_changed().is_none());

        std::fs::write(
            paths.client_certs.as_ref().unwrap(),
            "-----BEGIN CERTIFICATE-----\n",
        )
        .unwrap();
        let err = r.reload_if_changed().unwrap().unwrap_err().to_string();
        assert!(err.contains("not terminated"), "{err}");
        assert!(Arc::ptr_eq(&first, &r.current()));
        // Reported once, not at every poll.
        assert!(r.reload_if_changed().is_none());

        std::fs::write(paths.client_certs.as_ref().unwrap(), server.pem()).unwrap();
        let summary = r.reload_if_changed().unwrap().unwrap();
        assert!(summary.contains("1 authorized"), "{summary}");
        assert!(!Arc::ptr_eq(&first, &r.current()));

        // Swapped key and certificate: a clear error.
        let swapped = TlsPaths {
            key: paths.cert.clone(),
            cert: paths.key.clone(),
            client_certs: None,
        };
        let err = format!("{:#}", load_config(&swapped).unwrap_err());
        assert!(err.contains("swapped"), "{err}");
    }
}

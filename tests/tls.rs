//! TLS and mutual TLS against the real binary: certificates from our own tools and from
//! the historical openssl commands, refusals (unlisted, expired, no certificate,
//! plaintext), option errors, slow handshakes, and hot reload of the client list and of
//! the server's own key and certificate, by file watch and by SIGHUP.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use common::{Server, BIN, TIMEOUT};
use reapi::capabilities_client::CapabilitiesClient;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

fn tool(cwd: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct KeyPair {
    cert: PathBuf,
    key: PathBuf,
}

/// A server certificate and two client certificates made with our own subcommands;
/// only alice is in `authorized.crt` at first.
struct Pki {
    dir: tempfile::TempDir,
    server: KeyPair,
    authorized: PathBuf,
    alice: KeyPair,
    bob: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        tool(
            d,
            &[
                "gen-server-cert",
                "--cn",
                "localhost",
                "--san",
                "127.0.0.1",
                "--san",
                "::1",
                "--dir",
                "srv",
            ],
        );
        for who in ["alice", "bob"] {
            tool(d, &["gen-client-cert", "--cn", who, "--dir", who]);
        }
        tool(
            d,
            &[
                "add-client",
                "alice/client.crt",
                "--authorized",
                "srv/authorized.crt",
            ],
        );
        let pair = |dir: &str, stem: &str| KeyPair {
            cert: d.join(dir).join(format!("{stem}.crt")),
            key: d.join(dir).join(format!("{stem}.key")),
        };
        Pki {
            server: pair("srv", "server"),
            authorized: d.join("srv/authorized.crt"),
            alice: pair("alice", "client"),
            bob: pair("bob", "client"),
            dir,
        }
    }

    fn tool(&self, args: &[&str]) -> String {
        tool(self.dir.path(), args)
    }

    fn authorize(&self, who: &KeyPair) {
        self.tool(&[
            "add-client",
            who.cert.to_str().unwrap(),
            "--authorized",
            self.authorized.to_str().unwrap(),
        ]);
    }

    fn revoke(&self, cn: &str) {
        self.tool(&[
            "remove-client",
            cn,
            "--authorized",
            self.authorized.to_str().unwrap(),
        ]);
    }

    fn tls_args(&self, client_certs: bool) -> Vec<String> {
        let mut v = vec![
            "--server-key".to_string(),
            self.server.key.display().to_string(),
            "--server-cert".to_string(),
            self.server.cert.display().to_string(),
        ];
        if client_certs {
            v.push("--client-certs".into());
            v.push(self.authorized.display().to_string());
        }
        v
    }
}

/// The historical documentation's openssl command (RSA 4096, self-signed, CA:TRUE),
/// plus `-addext subjectAltName=...` for a server certificate.
fn openssl_req(dir: &Path, stem: &str, subj: &str, san: Option<&str>) -> KeyPair {
    let pair = KeyPair {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-new", "-newkey", "rsa:4096", "-x509", "-sha256"])
        .args(["-days", "3650", "-nodes", "-batch", "-subj", subj]);
    if let Some(san) = san {
        cmd.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let status = cmd
        .arg("-out")
        .arg(&pair.cert)
        .arg("-keyout")
        .arg(&pair.key)
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success(), "openssl req failed");
    pair
}

// ---------------------------------------------------------------------------------------
// Server with a captured log
// ---------------------------------------------------------------------------------------

struct TlsServer {
    server: Server,
    log: Arc<Mutex<String>>,
}

impl TlsServer {
    fn start(repo: &Path, extra: &[String]) -> TlsServer {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut server = Server::start_with(repo, &extra, |c| {
            c.stderr(Stdio::piped());
        });
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = server.child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        TlsServer { server, log }
    }

    fn port(&self) -> u16 {
        self.server.port
    }

    fn count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    /// Waits (bounded) until `needle` has been logged more than `seen` times.
    fn wait_log(&self, needle: &str, seen: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while self.count(needle) <= seen {
            assert!(
                Instant::now() < deadline,
                "server never logged {needle:?}; log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn sighup(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.server.child.id() as i32, libc::SIGHUP);
        }
    }

    fn assert_running(&mut self) {
        assert!(
            self.server.is_running(),
            "server died; log:\n{}",
            self.log.lock().unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// Trusts exactly one server certificate, as a gRPC client given `server-cert` does with
/// a self-signed certificate. Used where webpki would refuse the certificate itself (the
/// openssl ones are CA:TRUE) or to check which certificate the server presents.
#[derive(Debug)]
struct PinnedServer {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn pem_key(path: &Path) -> PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path).unwrap()
}

/// A tonic connector doing TLS with a [`PinnedServer`] verifier.
#[derive(Clone)]
struct PinnedConnector {
    config: Arc<ClientConfig>,
    port: u16,
}

type Connecting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for PinnedConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let (config, port) = (self.config.clone(), self.port);
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let name = ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Connects with the server certificate pinned, optionally presenting a client
/// certificate, and asks for the capabilities. `Err` carries the failure.
async fn pinned_call(
    port: u16,
    server_cert: &Path,
    client: Option<&KeyPair>,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer {
            cert: pem_certs(server_cert).remove(0),
            provider,
        }));
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(pem_certs(&c.cert), pem_key(&c.key))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = PinnedConnector {
        config: Arc::new(config),
        port,
    };
    // http:// so tonic leaves TLS to the connector.
    let endpoint = Endpoint::from_shared(format!("http://localhost:{port}")).unwrap();
    let call = async {
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        capabilities(channel).await
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Connects with tonic's own TLS (rustls + webpki verification of the server
/// certificate, as the `healthcheck` subcommand does) and asks for the capabilities.
async fn tonic_channel(
    port: u16,
    server_cert: &Path,
    client: Option<&KeyPair>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(server_cert).unwrap()))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&c.cert).unwrap(),
            std::fs::read(&c.key).unwrap(),
        ));
    }
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e:?}"))?
        .connect_timeout(TIMEOUT);
    tokio::time::timeout(TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))
}

async fn tonic_call(port: u16, server_cert: &Path, client: Option<&KeyPair>) -> Result<(), String> {
    let channel = tonic_channel(port, server_cert, client).await?;
    capabilities(channel).await
}

async fn capabilities(channel: Channel) -> Result<(), String> {
    let reply = tokio::time::timeout(
        TIMEOUT,
        CapabilitiesClient::new(channel).get_capabilities(reapi::GetCapabilitiesRequest::default()),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|s| format!("rpc: {s:?}"))?;
    assert!(reply.into_inner().cache_capabilities.is_some());
    Ok(())
}

#[track_caller]
fn refused(r: Result<(), String>, what: &str) {
    assert!(
        r.is_err(),
        "{what}: expected a refusal, but the call succeeded"
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn own_certificates_pull_and_mutual_tls() {
    let pki = Pki::new();
    let repo = tempfile::tempdir().unwrap();

    // Pull-only port: TLS without client authentication.
    let mut pull = TlsServer::start(repo.path(), &pki.tls_args(false));
    tonic_call(pull.port(), &pki.server.cert, None)
        .await
        .unwrap();
    pinned_call(pull.port(), &pki.server.cert, None)
        .await
        .unwrap();
    // A client that has a certificate anyway is fine.
    tonic_call(pull.port(), &pki.server.cert, Some(&pki.bob))
        .await
        .unwrap();
    // A client trusting another certificate refuses the server (and the server says why).
    let seen = pull.count("client refused the server certificate");
    refused(
        pinned_call(pull.port(), &pki.alice.cert, None).await,
        "client pinned to the wrong server certificate",
    );
    pull.wait_log("client refused the server certificate", seen);
    pull.assert_running();

    // Push port on the same repository: client certificates required.
    let mut push = TlsServer::start(repo.path(), &pki.tls_args(true));
    tonic_call(push.port(), &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    pinned_call(push.port(), &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    refused(
        tonic_call(push.port(), &pki.server.cert, Some(&pki.bob)).await,
        "unlisted client certificate",
    );
    push.wait_log("not in --client-certs", 0);
    refused(
        tonic_call(push.port(), &pki.server.cert, None).await,
        "no client certificate",
    );
    refused(
        pinned_call(push.port(), &pki.server.cert, None).await,
        "no client certificate",
    );
    push.assert_running();
    // Still serving the authorized client after the refusals.
    tonic_call(push.port(), &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn historical_openssl_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The seed's exact commands (server one with the subjectAltName gRPC clients need).
    let server = openssl_req(
        d,
        "server",
        "/CN=localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
    );
    let client = openssl_req(d, "client", "/CN=client", None);
    let stranger = openssl_req(d, "stranger", "/CN=client", None);
    // The historical way of authorizing: cat client.crt >> authorized.crt.
    let authorized = d.join("authorized.crt");
    std::fs::write(&authorized, std::fs::read(&client.cert).unwrap()).unwrap();

    let repo = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--server-key",
        server.key.to_str().unwrap(),
        "--server-cert",
        server.cert.to_str().unwrap(),
        "--client-certs",
        authorized.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut s = TlsServer::start(repo.path(), &args);
    pinned_call(s.port(), &server.cert, Some(&client))
        .await
        .expect("CA:TRUE self-signed client certificate listed in authorized.crt");
    refused(
        pinned_call(s.port(), &server.cert, Some(&stranger)).await,
        "same subject, different key, not listed",
    );
    s.wait_log("not in --client-certs", 0);
    refused(
        pinned_call(s.port(), &server.cert, None).await,
        "no client certificate",
    );
    s.assert_running();

    // Our own client certificate works with an openssl server certificate and vice versa.
    let ours = Pki::new();
    let seen = s.count("TLS configuration reloaded");
    ours.tool(&[
        "add-client",
        ours.alice.cert.to_str().unwrap(),
        "--authorized",
        authorized.to_str().unwrap(),
    ]);
    s.wait_log("TLS configuration reloaded", seen);
    pinned_call(s.port(), &server.cert, Some(&ours.alice))
        .await
        .unwrap();
    pinned_call(s.port(), &server.cert, Some(&client))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_client_certificate_is_refused() {
    let pki = Pki::new();
    // Made directly (add-client refuses expired certificates) and appended by hand.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "old");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    let old = KeyPair {
        cert: pki.dir.path().join("old.crt"),
        key: pki.dir.path().join("old.key"),
    };
    std::fs::write(&old.cert, cert.pem()).unwrap();
    std::fs::write(&old.key, key.serialize_pem()).unwrap();
    let mut bundle = std::fs::read(&pki.authorized).unwrap();
    bundle.extend(cert.pem().as_bytes());
    std::fs::write(&pki.authorized, bundle).unwrap();

    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &pki.tls_args(true));
    refused(
        pinned_call(s.port(), &pki.server.cert, Some(&old)).await,
        "expired client certificate",
    );
    s.wait_log("outside its validity period", 0);
    pinned_call(s.port(), &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    s.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_stalled_clients_do_not_hurt_the_server() {
    let pki = Pki::new();
    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &pki.tls_args(true));
    let port = s.port();

    // A plaintext gRPC client on the TLS port fails, and the server logs why.
    let plain = async {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        capabilities(channel).await
    };
    refused(
        tokio::time::timeout(TIMEOUT, plain).await.unwrap(),
        "plaintext client",
    );
    s.wait_log("plaintext client 127.0.0.1:", 0);
    s.wait_log("on a TLS port (its URL should be https://)", 0);
    s.assert_running();

    // Connections that never finish (or never start) a handshake do not delay others.
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        if i % 2 == 0 {
            // Half a ClientHello record header, then silence.
            use tokio::io::AsyncWriteExt;
            tcp.write_all(&[22, 3, 1]).await.unwrap();
        }
        stalled.push(tcp);
    }
    let started = Instant::now();
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    eprintln!("mTLS connect + first RPC beside 20 stalled handshakes: {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "a stalled handshake held up another connection: {elapsed:?}"
    );
    // Connected-and-closed probes are not worth a warning.
    drop(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap(),
    );
    drop(stalled);
    s.assert_running();
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
}

/// Raises this process's soft limit on open files to its hard limit (the flood tests
/// hold thousands of sockets); returns the new limit.
fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// 5,000 connections that never send a byte (more than the server's 1,024 pending
/// handshakes) must not keep a real client out: the server closes the oldest silent
/// ones to make room, never the newcomer.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_silent_connections_does_not_lock_clients_out() {
    const FLOOD: usize = 5_000;
    let limit = raise_open_files_limit();
    assert!(
        limit > FLOOD as u64 + 500,
        "this test needs {} open files, the hard limit is {limit}",
        FLOOD + 500
    );
    let pki = Pki::new();
    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &pki.tls_args(true));
    let port = s.port();
    let mut silent = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        silent.push(
            tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(("127.0.0.1", port)))
                .await
                .expect("connecting in time")
                .expect("connecting"),
        );
    }
    // Let the server accept the whole flood before the real client comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .expect("a real client got through the flood");
    let elapsed = started.elapsed();
    eprintln!("mTLS connect + first RPC beside {FLOOD} silent connections: {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(1),
        "the flood delayed a real client: {elapsed:?}"
    );
    s.wait_log("closed before completing a TLS handshake, to make room", 0);
    drop(silent);
    s.assert_running();
}

/// Connect + full mutual-TLS handshake + one RPC, `runs` times after a warm-up; returns
/// the sorted durations.
async fn time_handshakes(port: u16, server_cert: &Path, client: &KeyPair) -> Vec<Duration> {
    pinned_call(port, server_cert, Some(client)).await.unwrap();
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        pinned_call(port, server_cert, Some(client)).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_times() {
    let pki = Pki::new();
    let repo = tempfile::tempdir().unwrap();
    let s = TlsServer::start(repo.path(), &pki.tls_args(true));
    let times = time_handshakes(s.port(), &pki.server.cert, &pki.alice).await;
    eprintln!(
        "mTLS, ECDSA P-256 (our certificates): connect + handshake + GetCapabilities over loopback, 20 runs: min {:?}, median {:?}, max {:?}",
        times[0], times[10], times[19]
    );
    assert!(times[10] < Duration::from_secs(1), "{times:?}");

    // The historical openssl certificates: RSA 4096 on both sides.
    let d = pki.dir.path();
    let server = openssl_req(d, "rsa-server", "/CN=localhost", Some("DNS:localhost"));
    let client = openssl_req(d, "rsa-client", "/CN=client", None);
    std::fs::write(
        d.join("rsa-authorized.crt"),
        std::fs::read(&client.cert).unwrap(),
    )
    .unwrap();
    let args: Vec<String> = [
        "--server-key",
        server.key.to_str().unwrap(),
        "--server-cert",
        server.cert.to_str().unwrap(),
        "--client-certs",
        d.join("rsa-authorized.crt").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let s = TlsServer::start(repo.path(), &args);
    let times = time_handshakes(s.port(), &server.cert, &client).await;
    eprintln!(
        "mTLS, RSA 4096 (openssl certificates): connect + handshake + GetCapabilities over loopback, 20 runs: min {:?}, median {:?}, max {:?}",
        times[0], times[10], times[19]
    );
    assert!(times[10] < Duration::from_secs(1), "{times:?}");
}

#[test]
fn option_errors_come_before_anything_starts() {
    let pki = Pki::new();
    let scratch = tempfile::tempdir().unwrap();
    let (key, cert, authorized) = (
        pki.server.key.to_str().unwrap(),
        pki.server.cert.to_str().unwrap(),
        pki.authorized.to_str().unwrap(),
    );
    let missing = scratch.path().join("missing.pem");
    let broken = scratch.path().join("broken.crt");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--server-key", key],
            "--server-key and --server-cert are both required for TLS",
        ),
        (
            vec!["--server-cert", cert],
            "--server-key and --server-cert are both required for TLS",
        ),
        (
            vec!["--client-certs", authorized],
            "--client-certs can only be used with --server-key",
        ),
        (vec!["--server-key", cert, "--server-cert", key], "swapped"),
        (
            vec![
                "--server-key",
                missing.to_str().unwrap(),
                "--server-cert",
                cert,
            ],
            "missing.pem",
        ),
        (
            vec![
                "--server-key",
                key,
                "--server-cert",
                cert,
                "--client-certs",
                broken.to_str().unwrap(),
            ],
            "not terminated",
        ),
        (
            vec![
                "--server-key",
                pki.alice.key.to_str().unwrap(),
                "--server-cert",
                cert,
            ],
            "does not fit",
        ),
    ];
    for (args, message) in cases {
        let repo = scratch.path().join("repo");
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(["serve", "--bind", "127.0.0.1", "--port", "0"])
            .args(&args)
            .arg(&repo)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.contains("error")).count(),
            1,
            "{args:?}: {stderr}"
        );
        assert!(
            !repo.exists(),
            "{args:?}: the repository was touched before the options were checked"
        );
        assert!(started.elapsed() < TIMEOUT);
    }
}

/// Reload through the file watch: revoking and re-authorizing a client with the tools,
/// against a running server, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn revocation_and_authorization_apply_without_restart() {
    let pki = Pki::new();
    pki.authorize(&pki.bob);
    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &pki.tls_args(true));
    let port = s.port();
    pinned_call(port, &pki.server.cert, Some(&pki.bob))
        .await
        .unwrap();
    // A connection bob holds open across the revocation.
    let bobs_channel = tonic_channel(port, &pki.server.cert, Some(&pki.bob))
        .await
        .unwrap();
    capabilities(bobs_channel.clone()).await.unwrap();

    let reloaded = "TLS configuration reloaded";
    let seen = s.count(reloaded);
    let revoked_at = Instant::now();
    pki.revoke("bob");
    s.wait_log(reloaded, seen);
    eprintln!(
        "revocation picked up by the file watch after {:?}",
        revoked_at.elapsed()
    );
    refused(
        pinned_call(port, &pki.server.cert, Some(&pki.bob)).await,
        "revoked client, new connection",
    );
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    // Established connections are not cut (documented: reloads apply to new ones).
    capabilities(bobs_channel).await.unwrap();

    let seen = s.count(reloaded);
    pki.authorize(&pki.bob);
    s.wait_log(reloaded, seen);
    pinned_call(port, &pki.server.cert, Some(&pki.bob))
        .await
        .unwrap();
    s.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_a_broken_file_keeps_the_last_good_set() {
    let pki = Pki::new();
    pki.authorize(&pki.bob);
    let repo = tempfile::tempdir().unwrap();
    let mut args = pki.tls_args(true);
    // No file watch: only SIGHUP can apply changes here.
    args.extend(["--tls-watch-interval".to_string(), "0".to_string()]);
    let mut s = TlsServer::start(repo.path(), &args);
    let port = s.port();
    // Also proves the SIGHUP handler is installed (it is, before serving starts).
    pinned_call(port, &pki.server.cert, Some(&pki.bob))
        .await
        .unwrap();

    pki.revoke("bob");
    tokio::time::sleep(Duration::from_millis(300)).await;
    pinned_call(port, &pki.server.cert, Some(&pki.bob))
        .await
        .expect("no watch, no SIGHUP yet: the old list still applies");
    let reloaded = "TLS configuration reloaded";
    let seen = s.count(reloaded);
    s.sighup();
    s.wait_log(reloaded, seen);
    refused(
        pinned_call(port, &pki.server.cert, Some(&pki.bob)).await,
        "revoked client after SIGHUP",
    );
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();

    // A broken bundle (say, a half-finished `cat >>`): reload fails, last good set stays.
    let good = std::fs::read(&pki.authorized).unwrap();
    let mut broken = good.clone();
    broken.extend(b"-----BEGIN CERTIFICATE-----\nMIIB\n");
    std::fs::write(&pki.authorized, &broken).unwrap();
    let failed = "TLS reload failed, keeping the previous configuration";
    let seen = s.count(failed);
    s.sighup();
    s.wait_log(failed, seen);
    assert!(s.log.lock().unwrap().contains("not terminated"));
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .expect("the last good list still applies");
    refused(
        pinned_call(port, &pki.server.cert, Some(&pki.bob)).await,
        "bob stays revoked",
    );
    // A deleted file is also a failed reload, not an empty list or a crash.
    std::fs::remove_file(&pki.authorized).unwrap();
    let seen = s.count(failed);
    s.sighup();
    s.wait_log(failed, seen);
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    s.assert_running();

    // Fixed: the next SIGHUP applies it.
    std::fs::write(&pki.authorized, &good).unwrap();
    pki.authorize(&pki.bob);
    let seen = s.count(reloaded);
    s.sighup();
    s.wait_log(reloaded, seen);
    pinned_call(port, &pki.server.cert, Some(&pki.bob))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_file_seen_by_the_watch_keeps_the_last_good_set() {
    let pki = Pki::new();
    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &pki.tls_args(true));
    let port = s.port();
    let good = std::fs::read(&pki.authorized).unwrap();
    let failed = "TLS reload failed, keeping the previous configuration";
    let seen = s.count(failed);
    std::fs::write(
        &pki.authorized,
        b"this is not PEM\n-----BEGIN CERTIFICATE-----\n",
    )
    .unwrap();
    s.wait_log(failed, seen);
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    // Reported once per change, not at every poll.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.count(failed), seen + 1, "{}", s.log.lock().unwrap());
    let reloaded = "TLS configuration reloaded";
    let seen = s.count(reloaded);
    std::fs::write(&pki.authorized, good).unwrap();
    s.wait_log(reloaded, seen);
    pinned_call(port, &pki.server.cert, Some(&pki.alice))
        .await
        .unwrap();
    s.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn server_certificate_renewal_applies_to_new_connections() {
    let pki = Pki::new();
    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &pki.tls_args(false));
    let port = s.port();
    let old = pki.dir.path().join("old-server.crt");
    std::fs::copy(&pki.server.cert, &old).unwrap();
    pinned_call(port, &old, None).await.unwrap();
    let open = tonic_channel(port, &old, None).await.unwrap();

    let reloaded = "TLS configuration reloaded";
    let seen = s.count(reloaded);
    pki.tool(&[
        "gen-server-cert",
        "--cn",
        "localhost",
        "--san",
        "127.0.0.1",
        "--dir",
        "srv",
        "--force",
    ]);
    s.wait_log(reloaded, seen);
    pinned_call(port, &pki.server.cert, None).await.unwrap();
    refused(
        pinned_call(port, &old, None).await,
        "new connections get the new certificate",
    );
    capabilities(open).await.unwrap();
    s.assert_running();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_without_tls_is_harmless() {
    let repo = tempfile::tempdir().unwrap();
    let mut s = TlsServer::start(repo.path(), &[]);
    let channel = common::connect(&s.server.url()).await;
    capabilities(channel.clone()).await.unwrap();
    s.sighup();
    s.wait_log("nothing to reload", 0);
    s.assert_running();
    capabilities(channel).await.unwrap();
}

/// SIGHUP is announced to the service manager (Type=notify-reload semantics): RELOADING=1
/// with a timestamp, then READY=1 once the new configuration is in force.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reload_is_announced_to_systemd() {
    use std::os::unix::net::UnixDatagram;
    let pki = Pki::new();
    let scratch = tempfile::tempdir().unwrap();
    let socket_path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let repo = tempfile::tempdir().unwrap();
    let tls_args = pki.tls_args(true);
    let args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let mut server = Server::start_with(repo.path(), &args, |c| {
        c.env("NOTIFY_SOCKET", &socket_path);
    });
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + TIMEOUT;
    let wait_for = |pred: &dyn Fn(&[String]) -> bool| loop {
        let mut buf = [0u8; 4096];
        if let Ok(n) = socket.recv(&mut buf) {
            messages
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if pred(&messages.lock().unwrap()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "notifications: {:?}",
            messages.lock().unwrap()
        );
    };
    wait_for(&|m| m.iter().any(|s| s.contains("READY=1")));
    let before = messages.lock().unwrap().len();
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGHUP);
    }
    wait_for(&|m| m[before..].iter().any(|s| s.contains("READY=1")));
    let after: Vec<String> = messages.lock().unwrap()[before..].to_vec();
    let reloading = after
        .iter()
        .position(|s| s.contains("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 in {after:?}"));
    let ready = after.iter().position(|s| s.contains("READY=1")).unwrap();
    assert!(reloading < ready, "{after:?}");
    assert!(after[reloading].contains("MONOTONIC_USEC="), "{after:?}");
    assert!(after[ready].contains("STATUS=serving on"), "{after:?}");
    assert!(server.is_running());
}

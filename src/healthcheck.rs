//! `healthcheck`: asks a running server for its capabilities and exits 0 when it answers,
//! 1 otherwise. Meant for container health checks and smoke tests of deployed units, where
//! no gRPC client is installed.
//!
//! Every connection option can also come from a `BST_HEALTHCHECK_*` variable, so that a
//! container image's fixed `HEALTHCHECK` command adapts to a container's port and TLS set-up
//! through `-e` (see docs/container.md).

use anyhow::Context;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use clap::Args;
use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Args, Debug, Clone)]
pub struct HealthcheckArgs {
    /// Server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", env = "BST_HEALTHCHECK_ADDR")]
    pub addr: String,

    /// Use TLS, trusting this CA (or self-signed server) certificate (PEM).
    #[arg(long, value_name = "FILE", env = "BST_HEALTHCHECK_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for servers that require one (with --tls-client-key).
    #[arg(
        long,
        value_name = "FILE",
        env = "BST_HEALTHCHECK_TLS_CLIENT_CERT",
        requires_all = ["tls_ca", "tls_client_key"]
    )]
    pub tls_client_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-client-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "BST_HEALTHCHECK_TLS_CLIENT_KEY",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,

    /// Name to verify the server certificate against [default: HOST].
    #[arg(
        long,
        value_name = "NAME",
        env = "BST_HEALTHCHECK_TLS_SERVER_NAME",
        requires = "tls_ca"
    )]
    pub tls_server_name: Option<String>,

    /// REAPI instance name to ask about.
    #[arg(long, default_value = "")]
    pub instance_name: String,

    /// Give up after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub timeout: f64,
}

/// Runs the check; `Ok` carries a one-line summary of the answer.
pub async fn check(args: &HealthcheckArgs) -> anyhow::Result<String> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    tokio::time::timeout(timeout, ask(args))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within {timeout:?}", args.addr))?
}

async fn ask(args: &HealthcheckArgs) -> anyhow::Result<String> {
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", args.addr);
    let mut endpoint =
        Endpoint::from_shared(url.clone()).with_context(|| format!("invalid address {url}"))?;
    if let Some(ca) = &args.tls_ca {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.tls_client_cert, &args.tls_client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &args.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {}", innermost(&e)))?;
    let caps = reapi::capabilities_client::CapabilitiesClient::new(channel)
        .get_capabilities(reapi::GetCapabilitiesRequest {
            instance_name: args.instance_name.clone(),
        })
        .await
        .map_err(|status| {
            let why = match status.source() {
                // A broken connection (TLS refused, plaintext answer...): its cause.
                Some(source) => innermost(source),
                None => status.message().to_owned(),
            };
            anyhow::anyhow!(
                "{url} did not answer GetCapabilities ({:?}): {why}",
                status.code()
            )
        })?
        .into_inner();
    let cache = caps.cache_capabilities.unwrap_or_default();
    let api = caps
        .high_api_version
        .map(|v| format!("{}.{}", v.major, v.minor))
        .unwrap_or_else(|| "?".into());
    Ok(format!(
        "{url} answers: REAPI up to {api}, {} digest function(s)",
        cache.digest_functions.len()
    ))
}

/// The root cause of a connection failure, which is the part that says what went wrong
/// ("Connection refused (os error 111)", "invalid peer certificate: UnknownIssuer"); the
/// wrappers around it only repeat "transport error".
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

//! `serve`: opens the repository, binds the listener, wires the services together and
//! runs until SIGTERM/SIGINT, then drains in-flight RPCs for a bounded time.

use crate::cli::ServeArgs;
use crate::client_limit::{ClientLimitLayer, ClientLimits};
use crate::service::asset::AssetService;
use crate::service::bytestream::{ByteStreamServer, ByteStreamService};
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;
use crate::service::{Instances, ServiceConfig, MAX_MESSAGE_BYTES};
use crate::storage::asset::AssetStore;
use crate::storage::cas::{CasStore, QuotaPolicy};
use anyhow::Context;
use bazel_remote_apis::build::bazel::remote::asset::v1::{
    fetch_server::FetchServer, push_server::PushServer,
};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    capabilities_server::CapabilitiesServer,
    content_addressable_storage_server::ContentAddressableStorageServer,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Server;

/// How long in-flight RPCs may run after a stop signal before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often committed uploads are flushed to stable storage (the power-loss window;
/// see docs/adr/0001-storage-engine.md).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// HTTP/2 receive window per stream: what a client may send ahead of what we have
/// consumed, held in buffers for every upload stream.
const STREAM_WINDOW: u32 = 512 << 10;

/// Largest HTTP/2 frame we accept: clients that honour it send an upload's data in a
/// few large frames instead of many 16 KiB ones.
const MAX_FRAME: u32 = 1 << 20;

/// HTTP/2 streams one connection may have open at once; a client that wants more waits
/// for its own streams to finish (its HTTP/2 library queues them).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// How often memory the allocator no longer uses is handed back to the system.
const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(5);

/// Applies our message size limits to a generated tonic server type.
macro_rules! limited {
    ($server:expr) => {
        $server
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // TLS options are checked and the TLS files loaded before anything is started, so a
    // mistake is reported at once and nothing is left half-started.
    let tls = match crate::tls::TlsPaths::from_options(
        args.server_key.as_deref(),
        args.server_cert.as_deref(),
        args.client_certs.as_deref(),
    )? {
        Some(paths) => Some(crate::tls::Reloader::load(paths)?),
        None => None,
    };
    let tls_watch = Duration::try_from_secs_f64(args.tls_watch_interval)
        .context("--tls-watch-interval must be a non-negative number of seconds")?;
    let stream_idle_timeout = Duration::try_from_secs_f64(args.stream_idle_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--stream-idle-timeout must be a positive number of seconds")?;
    match crate::sys::raise_open_files_limit() {
        Ok((before, after)) if before != after => {
            tracing::debug!("raised the open files limit from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("could not raise the open files limit: {e}"),
    }
    crate::cli::check_quota(args.quota, args.quota_low).map_err(anyhow::Error::msg)?;
    let repo = &args.repo;
    check_reserve(&args)?;
    // Before the repository is opened, so that a slow start-up is not mistaken for a hang.
    let _watchdog = crate::systemd::spawn_watchdog();
    crate::systemd::notify_status(&format!("opening repository {}", repo.display()));
    if repo.exists() && !repo.is_dir() {
        anyhow::bail!("repository {} is a file, not a directory", repo.display());
    }
    std::fs::create_dir_all(repo)
        .with_context(|| format!("creating repository directory {}", repo.display()))?;
    let config = ServiceConfig {
        instances: Instances::new(args.instance_names.clone()),
        allow_push: args.enable_push,
        stream_idle_timeout,
    };
    let assets = Arc::new(
        AssetStore::open(repo).with_context(|| format!("opening repository {}", repo.display()))?,
    );
    let cas = if args.index_only {
        None
    } else {
        let policy = quota_policy(&args);
        let store = Arc::new(
            CasStore::open_with(repo, policy)
                .with_context(|| format!("opening repository {}", repo.display()))?,
        );
        // For `gc`, which acts on the policy the cache runs with.
        if let Err(e) = crate::storage::policy::record(repo, &policy) {
            tracing::warn!(
                "could not record the quota policy in {} ({e}): `gc` will need --quota",
                repo.display()
            );
        }
        store.start_background(SYNC_INTERVAL);
        Some(store)
    };

    let listener = bind(args.bind, args.port)?;
    let local = listener.local_addr().context("reading the bound address")?;

    let asset = AssetService {
        assets,
        cas: cas.clone(),
        config: config.clone(),
        require_content: args.require_asset_content,
    };
    let limits = ClientLimits::new(args.max_client_requests, crate::client_limit::QUEUE_WAIT);
    let mut router = Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Outermost first: what is not a gRPC call is refused before it waits for a slot.
        .layer(crate::service::http_guard::GrpcOnlyLayer)
        .layer(ClientLimitLayer(limits.clone()))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some(MAX_FRAME))
        .add_service(limited!(CapabilitiesServer::new(CapabilitiesService {
            has_cas: cas.is_some(),
        })))
        .add_service(limited!(FetchServer::new(asset.clone())))
        .add_optional_service(args.enable_push.then(|| limited!(PushServer::new(asset))));
    if let Some(store) = cas {
        router = router
            .add_service(limited!(ContentAddressableStorageServer::new(CasService {
                store: store.clone(),
                config: config.clone(),
                tree_walks: Default::default(),
            })))
            // Not a generated server: ByteStream handles its own HTTP/2 bodies and limits.
            .add_service(ByteStreamServer::new(ByteStreamService::new(store, config)));
    }

    println!("bst-artifact-server listening on {local}");
    let policy = quota_policy(&args);
    tracing::info!(
        address = %local,
        repo = %repo.display(),
        push = args.enable_push,
        index_only = args.index_only,
        "{}",
        describe_settings(&args, local, &policy)
    );
    if let Some(warning) = open_push_warning(args.enable_push, args.client_certs.is_some(), local) {
        tracing::warn!("{warning}");
    }

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stop_signal = stop_signals().context("installing signal handlers")?;
    tokio::spawn(async move {
        let signal = stop_signal.await;
        tracing::info!(
            signal,
            "{signal}: stopping; no new connections, draining in-flight requests"
        );
        crate::systemd::notify_stopping(&format!("{signal}: draining in-flight requests"));
        let _ = stop_tx.send(true);
    });
    let ready_status = format!("serving on {local}");
    // SIGHUP reloads the TLS files (and must not kill a server without TLS either).
    let _reload =
        crate::tls::spawn_reload_triggers(tls.clone(), Some(tls_watch), ready_status.clone())
            .context("installing the SIGHUP handler")?;
    // Listener bound, storage open, stop and reload signals handled: clients may come.
    // The port file is the readiness signal for scripts, so it comes only now: a SIGTERM
    // sent as soon as it appears must be handled, not kill the process.
    if let Some(path) = &args.port_file {
        write_port_file(path, local.port())?;
    }
    crate::systemd::notify_ready(&ready_status);
    // Memory freed after a burst goes back to the system once the server has been idle
    // for a whole interval: under load (even between one client's short requests) the
    // allocator's free lists are what the next requests reuse, and handing them back would
    // only make those fault their pages in again.
    let idle_limits = limits.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RELEASE_MEMORY_EVERY);
        let mut last_started = u64::MAX;
        loop {
            every.tick().await;
            let started = idle_limits.requests_started();
            if started == last_started && idle_limits.active_clients() == 0 {
                // Off the executor: trimming a large heap takes a while.
                let _ = tokio::task::spawn_blocking(crate::sys::release_free_memory).await;
            }
            last_started = started;
        }
    });
    let mut stopped = stop_rx.clone();
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    type Serving = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    >;
    let server: Serving = match tls {
        None => Box::pin(
            router.serve_with_incoming_shutdown(crate::accept::plain_incoming(listener), shutdown),
        ),
        // We accept and do the handshakes ourselves (see crate::tls).
        Some(reloader) => {
            let mut accept_stop = stop_rx.clone();
            let incoming = crate::tls::incoming(listener, reloader, async move {
                let _ = accept_stop.wait_for(|s| *s).await;
            });
            Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    tokio::select! {
        result = server => result.context("serving gRPC")?,
        _ = async {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; exiting anyway");
        }
    }
    Ok(())
}

/// Uploads open to other machines with nobody authenticated: worth saying at every start.
fn open_push_warning(push: bool, client_auth: bool, local: SocketAddr) -> Option<String> {
    (push && !client_auth && !local.ip().is_loopback()).then(|| {
        format!(
            "uploads are enabled on {local}, which other machines can reach, and no client \
             authentication is configured: anyone who can connect can write to this cache. \
             Use --bind 127.0.0.1, or TLS with --client-certs (docs/securing.md)"
        )
    })
}

/// The start-up line: everything that decides what the server does, in one sentence.
fn describe_settings(args: &ServeArgs, local: SocketAddr, policy: &QuotaPolicy) -> String {
    let listen = if local.ip().is_unspecified() {
        format!("port {} on all interfaces", local.port())
    } else {
        local.to_string()
    };
    let transport = match (&args.server_key, &args.client_certs) {
        (None, _) => "plain gRPC (no TLS)".to_owned(),
        (Some(_), None) => "TLS".to_owned(),
        (Some(_), Some(clients)) => {
            format!("mutual TLS (clients authorised by {})", clients.display())
        }
    };
    let push = if args.enable_push {
        "uploads enabled"
    } else {
        "read-only"
    };
    let storage = if args.index_only {
        "index only (Remote Asset; no CAS)".to_owned()
    } else {
        let quota = match policy.quota {
            Some(q) => format!(
                "quota {}, evicting down to {}",
                crate::cli::format_size(q),
                crate::cli::format_size(policy.low_watermark)
            ),
            None => "no quota".to_owned(),
        };
        format!(
            "{quota}, keeping {} of disk free",
            crate::cli::format_size(policy.reserve)
        )
    };
    format!(
        "serving {} on {listen}: {transport}, {push}, {storage}",
        args.repo.display()
    )
}

/// A reserve the filesystem could never keep would refuse every upload: say so at start.
fn check_reserve(args: &ServeArgs) -> anyhow::Result<()> {
    let Some(reserve) = args.reserve else {
        return Ok(());
    };
    // The repository may not exist yet: its filesystem is its nearest existing ancestor's.
    let existing = args
        .repo
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("."));
    if let Some((total, _)) = crate::storage::cas::filesystem_space(existing) {
        anyhow::ensure!(
            reserve < total,
            "--reserve {} is not less than the whole filesystem that holds {} ({}): no upload \
             could ever be stored",
            crate::cli::format_size(reserve),
            args.repo.display(),
            crate::cli::format_size(total)
        );
    }
    Ok(())
}

/// Default free-space reserve: casd's 2 GB, or 5% of a smaller filesystem.
fn default_reserve(repo: &Path) -> u64 {
    const CAP: u64 = 2_000_000_000;
    crate::storage::cas::filesystem_space(repo).map_or(CAP, |(total, _)| CAP.min(total / 20))
}

fn quota_policy(args: &ServeArgs) -> QuotaPolicy {
    let quota = (args.quota > 0).then_some(args.quota);
    QuotaPolicy {
        quota,
        low_watermark: args
            .quota_low
            .unwrap_or(args.quota / 2)
            .min(quota.unwrap_or(u64::MAX)),
        reserve: args.reserve.unwrap_or_else(|| default_reserve(&args.repo)),
    }
}

fn bind(addr: Option<IpAddr>, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let try_bind = |ip: IpAddr| -> std::io::Result<tokio::net::TcpListener> {
        let std = std::net::TcpListener::bind(SocketAddr::new(ip, port))?;
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    };
    match addr {
        Some(ip) => {
            try_bind(ip).with_context(|| format!("listening on {}", SocketAddr::new(ip, port)))
        }
        // All interfaces, as historically: [::] is dual-stack on Linux; fall back to
        // IPv4 where IPv6 is disabled.
        None => try_bind(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
            .or_else(|_| try_bind(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
            .with_context(|| format!("listening on port {port} on all interfaces")),
    }
}

fn write_port_file(path: &Path, port: u16) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{port}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing port file {}", path.display()))
}

/// Installs the handlers now (so a signal that arrives early is not lost) and returns a
/// future that resolves with the name of the first stop signal.
fn stop_signals() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_uploads_are_warned_about() {
        let any: SocketAddr = "[::]:11002".parse().unwrap();
        let lan: SocketAddr = "192.0.2.7:11002".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:11002".parse().unwrap();
        let lo6: SocketAddr = "[::1]:11002".parse().unwrap();
        assert!(open_push_warning(true, false, any).is_some());
        assert!(open_push_warning(true, false, lan).is_some());
        assert!(open_push_warning(true, false, lo).is_none());
        assert!(open_push_warning(true, false, lo6).is_none());
        assert!(open_push_warning(true, true, any).is_none());
        assert!(open_push_warning(false, false, any).is_none());
    }
}

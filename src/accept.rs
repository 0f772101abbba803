//! Accepting TCP connections without spinning when the process runs out of file
//! descriptors (or the kernel of buffers): a failed `accept` is retried after a pause
//! that doubles up to a second, and logged once per episode, not once per failure.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

pub struct Acceptor {
    listener: TcpListener,
    /// Failures in a row, and when the first of them happened.
    failing: Option<(u64, Instant)>,
}

impl Acceptor {
    pub fn new(listener: TcpListener) -> Self {
        Acceptor {
            listener,
            failing: None,
        }
    }

    /// The next connection, waiting out resource shortages.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    if let Some((failures, since)) = self.failing.take() {
                        tracing::warn!(
                            "accepting connections again after {failures} failed attempts over {:.1?}",
                            since.elapsed()
                        );
                    }
                    return accepted;
                }
                // The connection went away while queued: nothing wrong with us.
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    let (failures, _) = self.failing.get_or_insert_with(|| {
                        let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                            " (the process is out of file descriptors: raise LimitNOFILE / ulimit -n)"
                        } else {
                            ""
                        };
                        tracing::error!(
                            "cannot accept connections: {e}{hint}; retrying with a pause of up to {LONGEST_PAUSE:?}"
                        );
                        (0, Instant::now())
                    });
                    *failures += 1;
                    let pause = FIRST_PAUSE
                        .saturating_mul(1 << (*failures - 1).min(16))
                        .min(LONGEST_PAUSE);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

fn is_per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EPROTO)
    )
}

/// Plaintext connections for tonic's `serve_with_incoming_shutdown`.
pub fn plain_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = Result<Connection<TcpStream>, std::convert::Infallible>> + Send + 'static
{
    futures::stream::unfold(Acceptor::new(listener), |mut acceptor| async move {
        let (tcp, peer) = acceptor.accept().await;
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        // A plain port recognises a TLS client by its first byte: an `https://` URL pointed
        // at it otherwise fails with nothing in the server's log.
        Some((Ok(Connection::new(tcp, info, true)), acceptor))
    })
}

/// An accepted connection (plain or TLS) as tonic sees it: the stream, and the TCP
/// addresses behind `Request::remote_addr()` and the per-client limits.
pub struct Connection<S> {
    stream: S,
    info: TcpConnectInfo,
    /// Look at the first byte read for a TLS ClientHello (plain ports only).
    sniff: bool,
}

impl<S> Connection<S> {
    pub fn new(stream: S, info: TcpConnectInfo, sniff_for_tls: bool) -> Self {
        Connection {
            stream,
            info,
            sniff: sniff_for_tls,
        }
    }
}

/// Every TLS connection starts with a handshake record (content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 22;

impl<S> Connected for Connection<S> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.sniff && buf.filled().len() > before {
            this.sniff = false;
            if buf.filled()[before] == TLS_HANDSHAKE_RECORD {
                tracing::warn!(
                    "{} sent a TLS ClientHello to this plain-gRPC port: the client uses \
                     https:// but this server has no TLS (use an http:// URL, or start the \
                     server with --server-key and --server-cert)",
                    this.info
                        .remote_addr
                        .map_or_else(|| "a client".to_owned(), |a| a.to_string())
                );
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

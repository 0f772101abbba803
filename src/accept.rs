//! Accepting TCP connections without spinning when the process runs out of file
//! descriptors (or the kernel of buffers): a failed `accept` is retried after a pause
//! that doubles up to a second, and logged once per episode, not once per failure.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

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
) -> impl futures::Stream<Item = Result<PlainConnection, std::convert::Infallible>> + Send + 'static
{
    futures::stream::unfold(Acceptor::new(listener), |mut acceptor| async move {
        let (tcp, peer) = acceptor.accept().await;
        let _ = tcp.set_nodelay(true);
        Some((
            Ok(PlainConnection {
                tcp,
                peer,
                first_read: true,
            }),
            acceptor,
        ))
    })
}

/// A plaintext connection that recognises a TLS client by its first byte: an `https://`
/// URL pointed at a plain port otherwise fails with nothing in the server's log.
pub struct PlainConnection {
    tcp: TcpStream,
    peer: SocketAddr,
    first_read: bool,
}

/// Every TLS connection starts with a handshake record (content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 22;

impl tonic::transport::server::Connected for PlainConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl tokio::io::AsyncRead for PlainConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if this.first_read && buf.filled().len() > before {
            this.first_read = false;
            if buf.filled()[before] == TLS_HANDSHAKE_RECORD {
                tracing::warn!(
                    "{} sent a TLS ClientHello to this plain-gRPC port: the client uses \
                     https:// but this server has no TLS (use an http:// URL, or start the \
                     server with --server-key and --server-cert)",
                    this.peer
                );
            }
        }
        result
    }
}

impl tokio::io::AsyncWrite for PlainConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

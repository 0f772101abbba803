//! Accepting TCP connections without spinning when the process runs out of file
//! descriptors (or the kernel of buffers): a failed `accept` is retried after a pause
//! that doubles up to a second, and logged once per episode, not once per failure.

use std::net::SocketAddr;
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
) -> impl futures::Stream<Item = Result<TcpStream, std::convert::Infallible>> + Send + 'static {
    futures::stream::unfold(Acceptor::new(listener), |mut acceptor| async move {
        let (tcp, _) = acceptor.accept().await;
        let _ = tcp.set_nodelay(true);
        Some((Ok(tcp), acceptor))
    })
}

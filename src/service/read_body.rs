//! The response body of a ByteStream Read: ReadResponse messages read from disk only
//! when the HTTP/2 layer asks for more, which it does only once the client's flow-control
//! window has room. A client that stops reading therefore costs one message at most, no
//! thread (each message is read by a short blocking task), and after the idle timeout
//! not even its file, buffers or its client slot.
//!
//! Messages start small and double up to [`READ_CHUNK`]: a stalled client (whose window,
//! 64 KiB by default, the first message fills) leaves a small message behind, while a
//! client that keeps reading soon gets full-size ones. Once the last piece of a message is
//! taken, the next message is read ahead, so that reading overlaps with sending.

use super::cas_status;
use super::grpc_http::{bytes_message_prefix, status_trailers, BodyFrame};
use crate::client_limit::ClientSlot;
use crate::storage::cas::{BlobReader, CasError, CasStore};
use bytes::Bytes;
use futures::task::AtomicWaker;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tonic::Status;

/// Bytes per ReadResponse once a stream is under way: within the 1-2 MiB that casd and
/// Bazel expect.
pub const READ_CHUNK: u64 = 1024 * 1024;

/// The first message's size (the default HTTP/2 stream window).
const FIRST_MESSAGE: u64 = 64 << 10;

/// Bytes per read from disk: a few such buffers, reused, stay in the CPU cache.
const READ_PIECE: u64 = 256 << 10;

/// `data` is field 10 of ReadResponse (google/bytestream/bytestream.proto).
const READ_RESPONSE_DATA: u32 = 10;

/// What the body, its read tasks and its idle watchdog share. The reader is always in
/// one of three places: `reader` (idle), a blocking read task, or `done` (a message read,
/// waiting for the body). The watchdog can take it from the first and the last.
struct Shared {
    reader: Mutex<Option<BlobReader>>,
    done: Mutex<Option<MessageRead>>,
    /// A read task is running (it holds the reader).
    in_flight: AtomicBool,
    /// Set by the watchdog: the stream is given up.
    abandoned: AtomicBool,
    /// Wakes the body when a read task finishes or the watchdog gives up.
    waker: AtomicWaker,
    /// When the client last took data, as milliseconds since `started`.
    progress_ms: AtomicU64,
    started: Instant,
    slot: Option<ClientSlot>,
}

impl Shared {
    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.progress_ms.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

enum State {
    Sending,
    /// All data sent (or a failure): the trailers go next.
    Ending(Status),
    Done,
}

type MessageRead = (BlobReader, Result<Option<Vec<Bytes>>, CasError>);

pub struct ReadBody {
    store: Arc<CasStore>,
    shared: Arc<Shared>,
    /// A read was started and its result not yet taken from `shared.done`.
    reading: bool,
    queue: VecDeque<Bytes>,
    next_message: u64,
    state: State,
    watchdog: JoinHandle<()>,
}

impl ReadBody {
    /// Streams what `reader` reads; a stream whose client takes nothing for
    /// `idle_timeout` is abandoned (its resources and `slot` are released).
    pub fn new(
        store: Arc<CasStore>,
        reader: BlobReader,
        idle_timeout: Duration,
        slot: Option<ClientSlot>,
    ) -> Self {
        let shared = Arc::new(Shared {
            reader: Mutex::new(Some(reader)),
            done: Mutex::new(None),
            in_flight: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            progress_ms: AtomicU64::new(0),
            started: Instant::now(),
            slot,
        });
        let watchdog = tokio::spawn(watch(Arc::downgrade(&shared), idle_timeout));
        ReadBody {
            store,
            shared,
            reading: false,
            queue: VecDeque::new(),
            next_message: FIRST_MESSAGE,
            state: State::Sending,
            watchdog,
        }
    }

    /// Starts reading the next message on a blocking task; false if the watchdog has
    /// abandoned the stream.
    fn start_reading(&mut self) -> bool {
        if self.shared.abandoned.load(Ordering::SeqCst) {
            return false;
        }
        let taken = self
            .shared
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut reader) = taken else {
            return false;
        };
        let size = reader.remaining().min(self.next_message) as usize;
        self.next_message = (self.next_message * 2).min(READ_CHUNK);
        let store = self.store.clone();
        let shared = self.shared.clone();
        shared.in_flight.store(true, Ordering::SeqCst);
        self.reading = true;
        // Detached: its result goes to `shared.done`, where the watchdog can reach it too.
        drop(tokio::task::spawn_blocking(move || {
            let pieces = read_message(&mut reader, &store, size);
            *shared.done.lock().unwrap_or_else(|e| e.into_inner()) = Some((reader, pieces));
            shared.in_flight.store(false, Ordering::SeqCst);
            shared.waker.wake();
        }));
        true
    }
}

/// Reads one message of `size` bytes as pieces; None at the end of the range (after the
/// whole-blob verification, which may fail instead).
fn read_message(
    reader: &mut BlobReader,
    store: &CasStore,
    size: usize,
) -> Result<Option<Vec<Bytes>>, CasError> {
    let mut left = size;
    let mut pieces = Vec::with_capacity(size.div_ceil(READ_PIECE as usize) + 1);
    loop {
        match reader.next_chunk(READ_PIECE.min(left as u64), store)? {
            Some(piece) => {
                left -= piece.len();
                pieces.push(piece);
                if left == 0 {
                    return Ok(Some(pieces));
                }
            }
            None => return Ok(None),
        }
    }
}

/// Abandons the stream once its client has taken nothing for `timeout`: the reader (file,
/// buffers, hashing thread), any message read ahead, and the client's slot are released;
/// the body ends with DEADLINE_EXCEEDED if the client ever asks for more.
async fn watch(shared: std::sync::Weak<Shared>, timeout: Duration) {
    let mut wait = timeout;
    loop {
        tokio::time::sleep(wait).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let idle = shared.idle_for();
        if idle < timeout {
            wait = timeout - idle;
            continue;
        }
        if shared.in_flight.load(Ordering::SeqCst) {
            // A message is being read from disk right now; look again shortly.
            wait = Duration::from_secs(1).min(timeout);
            continue;
        }
        shared.abandoned.store(true, Ordering::SeqCst);
        let reader = shared
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let read_ahead = shared.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        tracing::info!(idle = ?idle, "abandoned a ByteStream read whose client stopped reading");
        drop((reader, read_ahead));
        if let Some(slot) = &shared.slot {
            slot.release();
        }
        shared.waker.wake();
        return;
    }
}

fn abandoned() -> Status {
    Status::deadline_exceeded("the stream was abandoned: the client took no data for too long")
}

impl Drop for ReadBody {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(piece) = this.queue.pop_front() {
                this.shared.touch();
                // The client took a whole message: read the next one while this one is
                // on its way (a stalled client is left holding at most that one more).
                if this.queue.is_empty() && !this.reading && matches!(this.state, State::Sending) {
                    this.start_reading();
                }
                return Poll::Ready(Some(Ok(BodyFrame::data(piece))));
            }
            match std::mem::replace(&mut this.state, State::Done) {
                State::Done => return Poll::Ready(None),
                State::Ending(status) => {
                    return Poll::Ready(Some(Ok(BodyFrame::trailers(status_trailers(&status)))))
                }
                State::Sending => this.state = State::Sending,
            }
            if !this.reading && !this.start_reading() {
                this.state = State::Ending(abandoned());
                continue;
            }
            this.shared.waker.register(cx.waker());
            let finished = this
                .shared
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let Some((reader, result)) = finished else {
                if this.shared.abandoned.load(Ordering::SeqCst) {
                    this.reading = false;
                    this.state = State::Ending(abandoned());
                    continue;
                }
                return Poll::Pending;
            };
            this.reading = false;
            match result {
                Ok(Some(pieces)) => {
                    *this.shared.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader);
                    let size = pieces.iter().map(Bytes::len).sum();
                    // Each message goes out whole once read: a failed verification (which
                    // comes with the last piece) then ends the stream after whole
                    // messages only, as clients expect.
                    this.queue
                        .push_back(bytes_message_prefix(READ_RESPONSE_DATA, size));
                    this.queue.extend(pieces);
                }
                Ok(None) => this.state = State::Ending(Status::ok("")),
                Err(e) => this.state = State::Ending(cas_status(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

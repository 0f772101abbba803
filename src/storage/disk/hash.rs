//! SHA-256 of streamed data, inline for small blobs and on a thread of its own for large
//! ones.

use super::CasError;
use sha2::{Digest as _, Sha256};
use std::io;

/// Blobs from this size on are hashed on a thread of their own while they are written
/// (uploads) or sent (verified reads), so that one stream is not limited by hashing plus
/// I/O on one core.
pub const HASH_THREAD_MIN: u64 = 4 << 20;

/// Stack of the per-stream hashing threads: they only run SHA-256 over what they are
/// handed, and with one per stream the default 2 MiB would add up.
const HELPER_STACK: usize = 128 << 10;

/// Chunks queued for an upload's hashing thread: a little slack lets the writer run
/// ahead of a momentarily slower hasher, and bounds the memory held.
const HASH_QUEUE: usize = 1;

pub(crate) enum Hashing {
    Inline(Sha256),
    Thread {
        chunks: std::sync::mpsc::SyncSender<bytes::Bytes>,
        result: std::thread::JoinHandle<Sha256>,
    },
}

impl Hashing {
    /// Blobs of [`HASH_THREAD_MIN`] and more are hashed on a thread of their own.
    pub(crate) fn for_size(size: u64) -> Self {
        if size >= HASH_THREAD_MIN {
            Hashing::on_thread()
        } else {
            Hashing::Inline(Sha256::new())
        }
    }

    fn on_thread() -> Self {
        let (chunks, rx) = std::sync::mpsc::sync_channel(HASH_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("cas-hash".into())
            .stack_size(HELPER_STACK)
            .spawn(move || {
                let mut h = Sha256::new();
                for chunk in rx {
                    let chunk: bytes::Bytes = chunk;
                    h.update(&chunk);
                }
                h
            });
        match spawned {
            Ok(result) => Hashing::Thread { chunks, result },
            // Out of threads: hashing inline is slower, not wrong.
            Err(_) => Hashing::Inline(Sha256::new()),
        }
    }

    pub(crate) fn update(&mut self, data: bytes::Bytes) {
        match self {
            Hashing::Inline(h) => h.update(&data),
            Hashing::Thread { chunks, .. } => {
                // The thread only stops when the sender is dropped.
                let _ = chunks.send(data);
            }
        }
    }

    pub(crate) fn finish(self) -> Result<String, CasError> {
        let h = match self {
            Hashing::Inline(h) => h,
            Hashing::Thread { chunks, result } => {
                drop(chunks);
                result.join().map_err(|_| {
                    CasError::io("hashing a blob", io::Error::other("hash thread panicked"))
                })?
            }
        };
        Ok(hex::encode(h.finalize()))
    }
}

//! SHA-256 of streamed data, inline for small blobs and on a thread of its own for large
//! ones.

use super::CasError;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};
use std::path::Path;

/// Blobs from this size on are hashed on a thread of their own while they are written
/// (uploads) or sent (verified reads), so that one stream is not limited by hashing plus
/// I/O on one core.
pub(crate) const HASH_THREAD_MIN: u64 = 4 << 20;

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

/// Pieces in which [`file_sha256`] reads: large enough for few system calls, small
/// enough that checking a repository of large blobs holds little memory.
const FILE_PIECE: usize = 1 << 20;

/// The SHA-256 (hex) and length of the file at `path`, read in pieces.
pub(crate) fn file_sha256(path: &Path) -> io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; FILE_PIECE];
    let mut h = Sha256::new();
    let mut len = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok((hex::encode(h.finalize()), len)),
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hash_matches_the_hash_of_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // More than one piece, and not a whole number of them.
        let data: Vec<u8> = (0..FILE_PIECE * 2 + 7).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (hash, len) = file_sha256(&path).unwrap();
        assert_eq!(hash, hex::encode(Sha256::digest(&data)));
        assert_eq!(len, data.len() as u64);
    }
}

//! Reading stored blobs: whole small ones, and streamed ranges that verify a whole-blob
//! read as they go.

use super::existence::{key_of, Key};
use super::hash::Hashing;
use super::objects_dir::touch_file;
use super::verified::{file_id, FileId};
use super::{CasError, CasStore};
use crate::storage::digest::Digest;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

impl CasStore {
    /// Opens a present blob for reading, refreshing its LRU stamp; with the identity of
    /// the file opened (for [`VerifiedSet`]).
    pub(super) fn open_blob(&self, d: &Digest) -> Result<Option<(File, FileId)>, CasError> {
        match self.dir.open_read(d) {
            Ok(f) => {
                let meta = f
                    .metadata()
                    .map_err(|e| CasError::io(format!("reading metadata of {d}"), e))?;
                if meta.len() != d.size() || !meta.is_file() {
                    return Ok(None);
                }
                if self.refresh_lru {
                    touch_file(&f);
                }
                Ok(Some((f, file_id(&meta))))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CasError::io(format!("opening blob {d}"), e)),
        }
    }

    /// Reads a whole blob (callers bound the size), or `None` when absent.
    pub(crate) fn read_all(&self, d: &Digest) -> Result<Option<Vec<u8>>, CasError> {
        if d.is_empty_blob() {
            return Ok(Some(Vec::new()));
        }
        let Some((mut f, id)) = self.open_blob(d)? else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(d.size() as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| CasError::io(format!("reading blob {d}"), e))?;
        let key = key_of(d.hash());
        if buf.len() as u64 != d.size() {
            self.quarantine(d, "content does not match its digest");
            return Ok(None);
        }
        if !self.verified.contains(&key, id) {
            if Digest::of_bytes(&buf).hash() != d.hash() {
                self.quarantine(d, "content does not match its digest");
                return Ok(None);
            }
            self.verified.insert(key, id);
        }
        Ok(Some(buf))
    }

    /// Opens a streaming reader of `[offset, end)`. A read of the whole blob verifies its
    /// hash and fails with [`CasError::Corrupt`] at the end if it does not match, so a
    /// damaged object (e.g. after power loss) is never passed off as good.
    pub(crate) fn open_reader(
        &self,
        d: &Digest,
        offset: u64,
        end: u64,
    ) -> Result<Option<BlobReader>, CasError> {
        let opened = if d.is_empty_blob() {
            None
        } else {
            match self.open_blob(d)? {
                Some(opened) => Some(opened),
                None => return Ok(None),
            }
        };
        let mut remember = None;
        let verify = match &opened {
            Some((_, id)) if offset == 0 && end == d.size() => {
                let key = key_of(d.hash());
                if self.verified.contains(&key, *id) {
                    None
                } else {
                    remember = Some((key, *id));
                    Some(Hashing::for_size(d.size()))
                }
            }
            _ => None,
        };
        let file = opened.map(|(f, _)| f);
        Ok(Some(BlobReader {
            digest: d.clone(),
            file,
            pos: offset,
            end,
            verify,
            remember,
            buffers: ReadBuffers::default(),
        }))
    }
}

/// Streams a byte range of a stored blob; see [`CasStore::open_reader`].
pub(crate) struct BlobReader {
    digest: Digest,
    file: Option<File>,
    pos: u64,
    end: u64,
    /// How a whole-blob read checks the content against the digest: hashed as it is
    /// read, like an upload (on a thread of its own for large blobs, so that hashing does
    /// not slow the stream down; the pieces are reference-counted, so handing them over
    /// copies nothing). What is hashed is exactly what is sent. None for a partial read,
    /// which has nothing to compare with.
    verify: Option<Hashing>,
    /// Where to record a successful check of the object.
    remember: Option<(Key, FileId)>,
    buffers: ReadBuffers,
}

impl BlobReader {
    /// Bytes left to read.
    pub(crate) fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    /// The next chunk of at most `max` bytes, or `None` at the end of the range.
    /// A whole-blob read is verified before its last chunk is handed out, so a client
    /// never receives all of a damaged blob. `store` is needed only to quarantine the
    /// object if verification fails.
    pub(crate) fn next_chunk(
        &mut self,
        max: u64,
        store: &CasStore,
    ) -> Result<Option<bytes::Bytes>, CasError> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        if self.pos >= self.end {
            // Only an empty blob gets here unverified (a zero-length object claiming a
            // non-empty digest's content is damaged).
            self.check(store)?;
            return Ok(None);
        }
        let len = max.min(self.end - self.pos) as usize;
        let buf = self
            .buffers
            .read_at(file, len, self.pos)
            .map_err(|e| CasError::Corrupt {
                digest: self.digest.to_string(),
                reason: format!("reading at offset {}: {e}", self.pos),
            })?;
        if let Some(hashing) = &mut self.verify {
            hashing.update(buf.clone());
        }
        self.pos += len as u64;
        if self.pos == self.end {
            self.check(store)?;
        }
        Ok(Some(buf))
    }

    /// Completes a whole-blob verification (once; later calls pass).
    fn check(&mut self, store: &CasStore) -> Result<(), CasError> {
        let problem = match self.verify.take().map(Hashing::finish) {
            Some(Ok(actual)) if actual != self.digest.hash() => {
                Some(format!("content hashes to {actual}"))
            }
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        };
        match problem {
            None => {
                if let Some((key, id)) = self.remember.take() {
                    store.verified.insert(key, id);
                }
                Ok(())
            }
            Some(reason) => {
                store.quarantine(&self.digest, "content does not match its digest");
                Err(CasError::Corrupt {
                    digest: self.digest.to_string(),
                    reason,
                })
            }
        }
    }
}

/// Read buffers a stream reuses: handed out as `Bytes`, they come back when the last
/// clone is dropped (once sent). A stream that keeps reading into the same few buffers
/// keeps them in the CPU cache; a fresh buffer per chunk made the copy out of the page
/// cache twice as slow.
#[derive(Clone, Default)]
struct ReadBuffers(Arc<Mutex<Vec<Vec<u8>>>>);

/// Buffers a stream keeps for reuse (more may be out, sent or queued).
const READ_BUFFERS_KEPT: usize = 8;

struct ReadBuffer {
    buf: Vec<u8>,
    len: usize,
    home: ReadBuffers,
}

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        let mut kept = self.home.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < READ_BUFFERS_KEPT {
            kept.push(std::mem::take(&mut self.buf));
        }
    }
}

impl ReadBuffers {
    /// Reads exactly `len` bytes at `offset` into a reused buffer.
    fn read_at(&self, file: &File, len: usize, offset: u64) -> io::Result<bytes::Bytes> {
        let reused = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = reused.filter(|b| b.len() >= len).unwrap_or_default();
        if buf.len() < len {
            buf = vec![0u8; len];
        }
        file.read_exact_at(&mut buf[..len], offset)?;
        Ok(bytes::Bytes::from_owner(ReadBuffer {
            buf,
            len,
            home: self.clone(),
        }))
    }
}

//! The memory all uploads share: a fixed set of aligned buffers that incoming data is
//! copied into, once, and that go to the disk (with `O_DIRECT`) and to the hasher as
//! they are.
//!
//! The set is the upload memory budget. An upload that finds none free waits without
//! reading its stream, so HTTP/2 flow control holds its client back; memory for upload
//! data is therefore [`BUFFERS`] x [`BUFFER_SIZE`] however many clients upload at once.
//! Buffers are made on first use and then reused, so steady uploading touches no fresh
//! memory (fresh pages are what is slow on the VMs we measured).

use crate::storage::direct::AlignedBuf;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per buffer: a whole number of direct-I/O blocks, and large enough that each
/// buffer is one efficient write.
pub const BUFFER_SIZE: usize = 1 << 20;

/// Buffers in the set: 16 MiB of upload data in flight across all uploads.
pub const BUFFERS: usize = 16;

pub struct UploadBuffers {
    free: Mutex<Vec<AlignedBuf>>,
    permits: Arc<Semaphore>,
}

impl UploadBuffers {
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(UploadBuffers {
            free: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(count)),
        })
    }

    /// An empty buffer, once one is free; None if the machine is out of memory.
    pub async fn take(self: &Arc<Self>) -> Option<Filling> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let buf = match reused {
            Some(buf) => buf,
            None => AlignedBuf::new(BUFFER_SIZE)?,
        };
        Some(Filling {
            slot: Slot {
                buf: Some(buf),
                pool: self.clone(),
                _permit: permit,
            },
            len: 0,
            taken: std::time::Instant::now(),
        })
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// A buffer out of the set; it goes back when this is dropped.
struct Slot {
    buf: Option<AlignedBuf>,
    pool: Arc<UploadBuffers>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // Before the permit is released (fields drop after this), so that whoever
            // gets the permit finds the buffer.
            self.pool
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(buf);
        }
    }
}

/// A buffer being filled.
pub struct Filling {
    slot: Slot,
    len: usize,
    taken: std::time::Instant,
}

impl Filling {
    /// Copies as much of `data` as fits; returns how much that was.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let buf = self.slot.buf.as_mut().expect("a filling buffer is present");
        let n = data.len().min(buf.capacity() - self.len);
        buf.copy_in(self.len, &data[..n]);
        self.len += n;
        n
    }

    /// How long ago the buffer was taken from the set.
    pub fn age(&self) -> std::time::Duration {
        self.taken.elapsed()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BUFFER_SIZE
    }

    /// The bytes filled so far, as `Bytes` that give the buffer back to the set when the
    /// last clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(Filled {
            slot: self.slot,
            len: self.len,
        })
    }
}

struct Filled {
    slot: Slot,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        self.slot
            .buf
            .as_ref()
            .expect("a filled buffer is present")
            .prefix(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_come_back_and_are_reused() {
        let pool = UploadBuffers::new(2);
        let mut a = pool.take().await.unwrap();
        assert_eq!(a.push(&[7u8; 10]), 10);
        assert_eq!(a.push(&vec![1u8; BUFFER_SIZE]), BUFFER_SIZE - 10);
        assert!(a.is_full());
        let frozen = a.freeze();
        assert_eq!(frozen.len(), BUFFER_SIZE);
        assert_eq!(&frozen[..11], &[7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 1]);
        let addr = frozen.as_ptr() as usize;
        assert_eq!(addr % crate::storage::direct::ALIGN, 0);
        let _b = pool.take().await.unwrap();
        assert_eq!(pool.available(), 0);
        // A third waits until the frozen buffer's last clone is gone.
        let clone = frozen.clone();
        drop(frozen);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), pool.take());
        assert!(waiting.await.is_err());
        drop(clone);
        let mut c = pool.take().await.unwrap();
        assert!(c.is_empty());
        c.push(b"x");
        assert_eq!(c.freeze().as_ptr() as usize, addr, "the buffer is reused");
    }
}

//! A byte counter shared by every process serving one repository.
//!
//! The documented deployment runs a pull and a push server on the same REPO. For the
//! quota to mean anything, both must see one figure for "bytes stored", so the counter
//! lives in a memory-mapped file (`REPO/cas/usage`) and is updated with atomic
//! instructions, which are coherent across processes mapping the same page.
//!
//! The figure is an estimate that can drift (a SIGKILL between a rename and the counter
//! update); every full scan (at start-up, in the background, and in each eviction)
//! replaces it with the measured value.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct SharedCounter {
    ptr: *mut AtomicU64,
}

// SAFETY: the pointer targets a MAP_SHARED mapping that lives as long as the counter and
// is only ever accessed through atomic operations.
unsafe impl Send for SharedCounter {}
unsafe impl Sync for SharedCounter {}

const MAP_LEN: usize = 8;

impl SharedCounter {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)?;
        if file.metadata()?.len() < MAP_LEN as u64 {
            // Growing with zeros is idempotent, so a racing peer doing the same is fine.
            file.set_len(MAP_LEN as u64)?;
        }
        // SAFETY: mapping 8 bytes of a file we just ensured is at least 8 bytes long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // The mapping stays valid after the descriptor is closed.
        Ok(SharedCounter {
            ptr: ptr as *mut AtomicU64,
        })
    }

    fn get(&self) -> &AtomicU64 {
        // SAFETY: page-aligned, valid for the counter's lifetime (see `open`).
        unsafe { &*self.ptr }
    }

    pub fn load(&self) -> u64 {
        self.get().load(Ordering::Relaxed)
    }

    pub fn add(&self, n: u64) {
        self.get().fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts, saturating at zero (the estimate may have drifted low).
    pub fn sub(&self, n: u64) {
        let _ = self
            .get()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    pub fn store(&self, v: u64) {
        self.get().store(v, Ordering::Relaxed);
    }
}

impl Drop for SharedCounter {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, MAP_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("usage");
        let a = SharedCounter::open(&p).unwrap();
        let b = SharedCounter::open(&p).unwrap();
        a.add(10);
        b.add(5);
        assert_eq!(a.load(), 15);
        b.sub(20);
        assert_eq!(a.load(), 0);
        drop(a);
        b.store(7);
        assert_eq!(SharedCounter::open(&p).unwrap().load(), 7);
    }
}

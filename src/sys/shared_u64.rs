//! A `u64` in a file mapped into memory, shared with every process mapping the same file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;

const MAP_LEN: usize = 8;

/// The first 8 bytes of a file, mapped shared and used only through atomic operations
/// (which are coherent across processes mapping the same page).
pub(crate) struct SharedU64 {
    ptr: *mut AtomicU64,
}

// SAFETY: the pointer targets a MAP_SHARED mapping that lives as long as the value and is
// only ever accessed through atomic operations.
unsafe impl Send for SharedU64 {}
// SAFETY: as above.
unsafe impl Sync for SharedU64 {}

impl SharedU64 {
    /// Maps the first 8 bytes of `file`, growing it with zeros if it is shorter. The
    /// mapping stays valid after `file` is closed.
    pub(crate) fn map(file: &File) -> io::Result<Self> {
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
        Ok(SharedU64 {
            ptr: ptr as *mut AtomicU64,
        })
    }

    pub(crate) fn get(&self) -> &AtomicU64 {
        // SAFETY: page-aligned, valid for the value's lifetime (see `map`).
        unsafe { &*self.ptr }
    }
}

impl Drop for SharedU64 {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, MAP_LEN);
        }
    }
}

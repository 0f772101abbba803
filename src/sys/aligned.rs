//! A heap buffer with the address alignment direct I/O needs.

use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Alignment of direct writes: the largest logical block size in common use.
pub(crate) const ALIGN: usize = 4096;

/// A heap buffer of fixed capacity aligned to [`ALIGN`], so that it can be handed to
/// a direct write as it is.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is owned exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (`&self` methods never write).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, ALIGN).expect("valid layout")
    }

    /// `cap` zeroed bytes (rounded up to a multiple of [`ALIGN`]), or None if memory is
    /// short. Zeroed, so that every byte is initialised; these buffers are made once and
    /// reused, and fresh pages come zeroed from the kernel anyway.
    pub(crate) fn new(cap: usize) -> Option<Self> {
        let cap = cap.max(1).next_multiple_of(ALIGN);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(Self::layout(cap)) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, cap })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Copies `data` to `at` (`at + data.len() <= capacity`).
    pub(crate) fn copy_in(&mut self, at: usize, data: &[u8]) {
        assert!(
            at + data.len() <= self.cap,
            "copy past the end of an aligned buffer"
        );
        // SAFETY: in bounds (checked above); the regions cannot overlap (we own ours).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) };
    }

    /// The first `len` bytes.
    pub(crate) fn prefix(&self, len: usize) -> &[u8] {
        assert!(len <= self.cap, "read past the end of an aligned buffer");
        // SAFETY: in bounds and initialised (zeroed at allocation); the allocation lives
        // as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.ptr, Self::layout(self.cap)) };
    }
}

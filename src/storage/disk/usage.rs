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

use crate::sys::SharedU64;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) struct SharedCounter(SharedU64);

impl SharedCounter {
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)?;
        SharedU64::map(&file).map(SharedCounter)
    }

    fn get(&self) -> &AtomicU64 {
        self.0.get()
    }

    pub(crate) fn load(&self) -> u64 {
        self.get().load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: u64) {
        self.get().fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts, saturating at zero (the estimate may have drifted low).
    pub(crate) fn sub(&self, n: u64) {
        let _ = self
            .get()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    pub(crate) fn store(&self, v: u64) {
        self.get().store(v, Ordering::Relaxed);
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

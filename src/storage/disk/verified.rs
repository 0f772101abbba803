//! Remembers which objects this process has already checked against their digest (on a
//! read, or because it hashed them while receiving them), so that serving a popular blob
//! costs one SHA-256 pass per process lifetime instead of one per download.
//!
//! What whole-blob verification protects against is what a crash or power loss leaves
//! behind (ADR 0001); both end the process, and a new process starts with an empty set.
//! An object is remembered by its digest together with the inode that held the checked
//! content, so a replaced object (a new upload, a peer's re-upload after eviction, a
//! file copied in by hand) is checked again. Content changed in place under a running
//! server, behind the 0444 mode, is outside what this detects; `verify REPO` re-hashes
//! everything. See docs/adr/0004-find-missing-and-read-verification.md.

use super::existence::{Key, KeyHasher};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

/// Remembered objects (about 56 bytes each, so at most ~14 MiB); a full set starts over.
pub(crate) const CAPACITY: usize = 262_144;

/// The file that held checked content: (device, inode).
pub(crate) type FileId = (u64, u64);

pub(crate) fn file_id(m: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[derive(Default)]
pub(crate) struct VerifiedSet {
    objects: Mutex<HashMap<Key, FileId, BuildHasherDefault<KeyHasher>>>,
}

impl VerifiedSet {
    pub(crate) fn contains(&self, key: &Key, file: FileId) -> bool {
        self.lock().get(key) == Some(&file)
    }

    pub(crate) fn insert(&self, key: Key, file: FileId) {
        let mut objects = self.lock();
        if objects.len() >= CAPACITY {
            objects.clear();
        }
        objects.insert(key, file);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Key, FileId, BuildHasherDefault<KeyHasher>>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_object_and_its_file() {
        let set = VerifiedSet::default();
        let key = [9u8; 32];
        assert!(!set.contains(&key, (1, 2)));
        set.insert(key, (1, 2));
        assert!(set.contains(&key, (1, 2)));
        // The same digest in another file (replaced, re-uploaded) is checked again.
        assert!(!set.contains(&key, (1, 3)));
        assert!(!set.contains(&[8u8; 32], (1, 2)));
    }

    #[test]
    fn is_bounded() {
        let set = VerifiedSet::default();
        for i in 0..(CAPACITY as u32 + 5) {
            let mut key = [0u8; 32];
            key[1..5].copy_from_slice(&i.to_le_bytes());
            set.insert(key, (0, i as u64));
        }
        assert!(set.lock().len() <= CAPACITY);
    }
}

//! Remembers which blobs were recently found present, so that FindMissingBlobs over the
//! same digests (every client of a build asks about the same popular blobs) costs a
//! hash-table lookup instead of a `stat` and an `utimensat` per digest.
//!
//! The cache must never claim a blob that is gone. It does not need to be told about
//! removals: whoever removes an object (our eviction, another process sharing the
//! repository, `gc`, an operator's `rm`) changes the modification time of its shard
//! directory (`objects/<2 hex>`), and the cache answers for a shard only while that
//! directory is the very one, unmodified, it saw when the answers were recorded.
//! Directory timestamps come from a coarse clock, so a shard is trusted only when its
//! last change is at least [`SETTLE`] old: any later change then gets a later time.
//! See docs/adr/0004-find-missing-and-read-verification.md.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How old a shard directory's last change must be before answers about it are cached.
/// Far above the timestamp clock's granularity (a scheduler tick, 1-10 ms).
pub(crate) const SETTLE: Duration = Duration::from_secs(1);

/// How long a cached answer stands before the blob is looked at (and its LRU stamp
/// refreshed) again: the precision of LRU order for blobs kept alive only by queries.
pub(crate) const REVERIFY: Duration = Duration::from_secs(60);

/// Entries per shard; a full shard starts over. 256 shards of 2048 entries of about
/// 56 bytes bound the cache near 28 MiB.
pub(crate) const SHARD_CAPACITY: usize = 2048;

/// What identifies one state of a shard directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirStamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
}

impl DirStamp {
    /// The stamp of the directory at `path`, or `None` when it does not exist.
    pub(crate) fn of(path: &std::path::Path) -> Option<DirStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(DirStamp {
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }

    /// Whether the directory's last change is old enough (at `now`) that any later
    /// change is certain to give it a different stamp.
    fn settled(&self, now: SystemTime) -> bool {
        let now_ns = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.mtime_ns + (SETTLE.as_nanos() as i128) <= now_ns
    }
}

/// Key: the raw 32-byte SHA-256 of the blob.
pub(crate) type Key = [u8; 32];

/// Keys are SHA-256 hashes, already uniformly distributed: eight of their bytes are as
/// good a hash-table hash as any, at no cost. (Byte 0 selects the shard, so it is
/// skipped.)
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Length prefixes and other short writes carry nothing.
        if let Some(b) = bytes.get(1..9) {
            self.0 = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
    }
}

#[derive(Default)]
struct Shard {
    /// The directory state the entries were recorded under; `None`: nothing trusted.
    dir: Option<DirStamp>,
    /// Blob size and when it was last verified on disk.
    entries: HashMap<Key, (u64, SystemTime), BuildHasherDefault<KeyHasher>>,
}

pub(crate) struct ExistenceCache {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for ExistenceCache {
    fn default() -> Self {
        ExistenceCache {
            shards: (0..256).map(|_| Mutex::default()).collect(),
        }
    }
}

impl ExistenceCache {
    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[key[0] as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` of `size` bytes is known present, given the current state `dir` of
    /// its shard directory. A changed directory forgets everything recorded under the
    /// old state.
    pub(crate) fn is_present(
        &self,
        key: &Key,
        size: u64,
        dir: Option<DirStamp>,
        now: SystemTime,
    ) -> bool {
        let mut shard = self.shard(key);
        if shard.dir != dir || dir.is_none() {
            shard.dir = None;
            shard.entries.clear();
            return false;
        }
        match shard.entries.get(key) {
            Some(&(s, verified)) if s == size => {
                now.duration_since(verified).is_ok_and(|age| age < REVERIFY)
            }
            _ => false,
        }
    }

    /// Records that `key` of `size` bytes was found on disk at `now`, after `dir` was
    /// taken as the state of its shard directory.
    pub(crate) fn record(&self, key: &Key, size: u64, dir: Option<DirStamp>, now: SystemTime) {
        let Some(dir) = dir.filter(|d| d.settled(now)) else {
            return;
        };
        let mut shard = self.shard(key);
        if shard.dir != Some(dir) {
            shard.entries.clear();
            shard.dir = Some(dir);
        }
        if shard.entries.len() >= SHARD_CAPACITY {
            shard.entries.clear();
        }
        shard.entries.insert(*key, (size, now));
    }
}

/// The raw bytes of a validated hash (64 lowercase hex characters, as [`Digest::new`]
/// guarantees; anything else gives a meaningless key, never a panic).
///
/// [`Digest::new`]: super::digest::Digest::new
pub(crate) fn key_of(hash: &str) -> Key {
    fn nibble(c: u8) -> u8 {
        // '0'..='9' -> 0..=9, 'a'..='f' -> 10..=15
        (c & 0x0f) + 9 * (c >> 6)
    }
    let mut key = [0u8; 32];
    for (k, pair) in key.iter_mut().zip(hash.as_bytes().chunks_exact(2)) {
        *k = (nibble(pair[0]) << 4) | nibble(pair[1]);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled_stamp(dir: &std::path::Path) -> DirStamp {
        let old = SystemTime::now() - Duration::from_secs(10);
        std::fs::File::open(dir).unwrap().set_modified(old).unwrap();
        DirStamp::of(dir).unwrap()
    }

    #[test]
    fn answers_only_while_the_directory_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ExistenceCache::default();
        let key = [7u8; 32];
        let now = SystemTime::now();
        let stamp = settled_stamp(dir.path());
        assert!(!cache.is_present(&key, 5, Some(stamp), now));
        cache.record(&key, 5, Some(stamp), now);
        assert!(cache.is_present(&key, 5, Some(stamp), now));
        // Another size is another digest.
        assert!(!cache.is_present(&key, 6, Some(stamp), now));
        // Any change to the directory (a file removed or added) forgets the shard.
        std::fs::write(dir.path().join("x"), b"").unwrap();
        let changed = DirStamp::of(dir.path()).unwrap();
        assert_ne!(changed, stamp);
        assert!(!cache.is_present(&key, 5, Some(changed), now));
        assert!(!cache.is_present(&key, 5, Some(stamp), now));
    }

    #[test]
    fn a_recently_changed_directory_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), b"").unwrap();
        let cache = ExistenceCache::default();
        let key = [1u8; 32];
        let now = SystemTime::now();
        let fresh = DirStamp::of(dir.path()).unwrap();
        cache.record(&key, 1, Some(fresh), now);
        assert!(!cache.is_present(&key, 1, Some(fresh), now));
    }

    #[test]
    fn answers_expire_so_lru_stamps_get_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ExistenceCache::default();
        let key = [2u8; 32];
        let stamp = settled_stamp(dir.path());
        let then = SystemTime::now();
        cache.record(&key, 1, Some(stamp), then);
        assert!(cache.is_present(&key, 1, Some(stamp), then + REVERIFY / 2));
        assert!(!cache.is_present(&key, 1, Some(stamp), then + REVERIFY));
    }

    #[test]
    fn a_removed_directory_forgets_its_shard() {
        let cache = ExistenceCache::default();
        let dir = tempfile::tempdir().unwrap();
        let key = [3u8; 32];
        let now = SystemTime::now();
        let stamp = settled_stamp(dir.path());
        cache.record(&key, 1, Some(stamp), now);
        assert!(!cache.is_present(&key, 1, None, now));
        assert!(!cache.is_present(&key, 1, Some(stamp), now));
    }

    #[test]
    fn shards_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ExistenceCache::default();
        let stamp = settled_stamp(dir.path());
        let now = SystemTime::now();
        for i in 0..(SHARD_CAPACITY as u32 + 10) {
            let mut key = [0u8; 32];
            key[1..5].copy_from_slice(&i.to_le_bytes());
            cache.record(&key, 1, Some(stamp), now);
        }
        assert!(cache.shard(&[0u8; 32]).entries.len() <= SHARD_CAPACITY);
    }

    #[test]
    fn key_is_the_raw_hash() {
        let h = "0123456789abcdef".repeat(4);
        assert_eq!(key_of(&h).to_vec(), hex::decode(&h).unwrap());
    }
}

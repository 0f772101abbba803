//! Least-recently-used eviction over the object files, with memory that does not grow
//! with the number of objects.
//!
//! The LRU stamp is each object's mtime (as with buildbox-casd, so a peer or an older
//! server on the same repository keeps the same order). There is no in-memory index:
//! eviction makes two passes over the object files. The first builds a histogram of
//! bytes by mtime, which gives the cut-off time below which enough bytes lie; the second
//! deletes the objects older than the cut-off. Objects touched between the passes get a
//! newer mtime and survive, as LRU demands. Evicting down to a low watermark makes these
//! scans rare: one per (quota - low watermark) bytes written.

use super::layout::{is_object, is_shard};
use crate::storage::digest::EMPTY_SHA256;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Histogram buckets kept before they are merged pairwise (bounds memory to ~2 MiB).
const MAX_BUCKETS: usize = 1 << 16;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ScanSummary {
    pub(crate) objects: u64,
    pub(crate) bytes: u64,
    /// Oldest and newest LRU stamps (mtime, nanoseconds since the epoch).
    pub(crate) oldest: Option<i64>,
    pub(crate) newest: Option<i64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct EvictReport {
    /// Bytes stored when the eviction started (measured).
    pub(crate) scanned_bytes: u64,
    pub(crate) freed_bytes: u64,
    pub(crate) freed_objects: u64,
}

fn is_empty_blob(path: &Path) -> bool {
    super::layout::hash_of_path(path).as_deref() == Some(EMPTY_SHA256)
}

/// Calls `f(path, size, mtime_ns)` for every object file. Entries that vanish during
/// the walk (a peer evicting) are skipped.
pub(crate) fn for_each_object(objects: &Path, mut f: impl FnMut(PathBuf, u64, i64)) {
    let Ok(shards) = fs::read_dir(objects) else {
        return;
    };
    for shard in shards.flatten() {
        let name = shard.file_name();
        if !name.to_str().is_some_and(is_shard) {
            continue;
        }
        let Ok(entries) = fs::read_dir(shard.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_str().is_some_and(is_object) {
                continue;
            }
            if let Ok(m) = entry.metadata() {
                if m.is_file() {
                    f(
                        entry.path(),
                        m.len(),
                        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                    );
                }
            }
        }
    }
}

pub(crate) fn scan(objects: &Path) -> ScanSummary {
    let mut s = ScanSummary::default();
    for_each_object(objects, |_, size, mtime| {
        s.objects += 1;
        s.bytes += size;
        s.oldest = Some(s.oldest.map_or(mtime, |o| o.min(mtime)));
        s.newest = Some(s.newest.map_or(mtime, |n| n.max(mtime)));
    });
    s
}

/// Bytes per mtime bucket, with buckets that widen (by powers of two nanoseconds) when
/// there would be too many.
struct Histogram {
    shift: u32,
    buckets: BTreeMap<i64, u64>,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            shift: 0,
            buckets: BTreeMap::new(),
        }
    }

    fn bucket(&self, mtime: i64) -> i64 {
        mtime >> self.shift
    }

    fn add(&mut self, mtime: i64, size: u64) {
        *self.buckets.entry(self.bucket(mtime)).or_default() += size;
        if self.buckets.len() > MAX_BUCKETS {
            self.shift += 1;
            let old = std::mem::take(&mut self.buckets);
            for (b, bytes) in old {
                *self.buckets.entry(b >> 1).or_default() += bytes;
            }
        }
    }

    /// The smallest bucket such that all buckets up to and including it hold at least
    /// `bytes`, or the last bucket if the total is smaller.
    fn cutoff(&self, bytes: u64) -> Option<i64> {
        let mut acc = 0u64;
        let mut last = None;
        for (&b, &n) in &self.buckets {
            acc += n;
            last = Some(b);
            if acc >= bytes {
                break;
            }
        }
        last
    }
}

/// Deletes the least recently used objects until at least `to_free(total)` bytes are
/// freed, where `total` is the measured size of the store. The caller holds the
/// repository's eviction lock. With `dry_run` nothing is deleted and the report says
/// what would have been.
pub(crate) fn evict(
    objects: &Path,
    to_free: impl FnOnce(u64) -> u64,
    dry_run: bool,
) -> EvictReport {
    let mut hist = Histogram::new();
    let mut total = 0u64;
    for_each_object(objects, |_, size, mtime| {
        total += size;
        hist.add(mtime, size);
    });
    let mut report = EvictReport {
        scanned_bytes: total,
        ..Default::default()
    };
    let wanted = to_free(total);
    if wanted == 0 {
        return report;
    }
    let Some(cutoff) = hist.cutoff(wanted) else {
        return report;
    };
    let shift = hist.shift;
    for_each_object(objects, |path, size, mtime| {
        // It frees nothing, and readers of the files rely on it (see
        // CasStore::ensure_empty_blob).
        if (mtime >> shift) > cutoff || is_empty_blob(&path) {
            return;
        }
        if dry_run || fs::remove_file(&path).is_ok() {
            report.freed_bytes += size;
            report.freed_objects += 1;
        }
    });
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(objects: &Path, name_byte: u8, size: usize, mtime: i64) -> PathBuf {
        let hash = format!("{:02x}", name_byte).repeat(32);
        let dir = objects.join(&hash[..2]);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(&hash[2..]);
        fs::write(&p, vec![0u8; size]).unwrap();
        let f = fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime as u64))
            .unwrap();
        p
    }

    #[test]
    fn evicts_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let old = put(dir.path(), 1, 100, 1_000);
        let mid = put(dir.path(), 2, 100, 2_000);
        let new = put(dir.path(), 3, 100, 3_000);
        let s = scan(dir.path());
        let ns = |secs: i64| Some(secs * 1_000_000_000);
        assert_eq!(
            (s.objects, s.bytes, s.oldest, s.newest),
            (3, 300, ns(1000), ns(3000))
        );

        let dry = evict(dir.path(), |total| total - 200, true);
        assert_eq!((dry.freed_objects, dry.freed_bytes), (1, 100));
        assert!(old.exists());

        let r = evict(dir.path(), |total| total - 150, false);
        assert_eq!(r.scanned_bytes, 300);
        assert_eq!((r.freed_objects, r.freed_bytes), (2, 200));
        assert!(!old.exists() && !mid.exists() && new.exists());
    }

    #[test]
    fn never_evicts_the_empty_blob() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join(&EMPTY_SHA256[..2]);
        fs::create_dir_all(&shard).unwrap();
        let empty = shard.join(&EMPTY_SHA256[2..]);
        fs::write(&empty, b"").unwrap();
        let f = fs::File::options().write(true).open(&empty).unwrap();
        f.set_modified(std::time::UNIX_EPOCH).unwrap();
        let newer = put(dir.path(), 1, 100, 1_000);
        let r = evict(dir.path(), |total| total, false);
        assert_eq!((r.freed_objects, r.freed_bytes), (1, 100));
        assert!(empty.exists() && !newer.exists());
    }

    #[test]
    fn histogram_stays_bounded() {
        let mut h = Histogram::new();
        for t in 0..(MAX_BUCKETS as i64 * 3) {
            h.add(t * 7, 1);
        }
        assert!(h.buckets.len() <= MAX_BUCKETS);
        assert_eq!(h.buckets.values().sum::<u64>(), MAX_BUCKETS as u64 * 3);
        // Everything in buckets up to the cut-off covers the request.
        let c = h.cutoff(10).unwrap();
        let covered: u64 = h.buckets.range(..=c).map(|(_, n)| n).sum();
        assert!(covered >= 10);
    }

    #[test]
    fn ignores_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("zz")).unwrap();
        fs::write(dir.path().join("zz/not-an-object"), b"x").unwrap();
        fs::create_dir_all(dir.path().join("ab")).unwrap();
        fs::write(dir.path().join("ab/short"), b"x").unwrap();
        assert_eq!(scan(dir.path()).objects, 0);
    }
}

//! How much the store may hold, across every process serving one repository: the
//! policy, the shared usage counter and upload reservations, and eviction (one evictor
//! at a time) when a write would not fit. See docs/adr/0001-storage-engine.md.

use super::lru;
use super::usage::SharedCounter;
use super::{CasError, CasStore};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How much the store may hold. See docs/adr/0001-storage-engine.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QuotaPolicy {
    /// Upper bound on stored blob bytes; `None` for no bound.
    pub(crate) quota: Option<u64>,
    /// What eviction frees down to once the quota would be passed.
    pub(crate) low_watermark: u64,
    /// Free filesystem space to keep; below it, evict or refuse writes.
    pub(crate) reserve: u64,
}

impl QuotaPolicy {
    pub(crate) fn unlimited() -> Self {
        QuotaPolicy {
            quota: None,
            low_watermark: u64::MAX,
            reserve: 0,
        }
    }
}

impl CasStore {
    pub(super) fn note_space_refusal(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.space_refused_at
            .store(now.as_secs(), Ordering::Relaxed);
    }

    /// Whether this process refused an upload for lack of space within `window`.
    pub(crate) fn refused_space_within(&self, window: Duration) -> bool {
        let at = self.space_refused_at.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        at != 0 && now.saturating_sub(at) <= window.as_secs()
    }

    /// Measures the store and replaces the shared estimate with the measurement. Runs in
    /// the background at start-up so that listening never waits for it.
    pub(crate) fn rescan(&self) -> lru::ScanSummary {
        let committed_before = self.local_committed.load(Ordering::Relaxed);
        let summary = lru::scan(&self.objects);
        self.store_measured_usage(summary.bytes, committed_before);
        summary
    }

    /// Replaces the shared estimate with `stored` bytes measured by a scan that began
    /// when this process had committed `committed_before` bytes. Commits that raced
    /// with the scan are added back (possibly counting some twice: over-counting only
    /// makes eviction start a little early, under-counting would overshoot the quota).
    pub(super) fn store_measured_usage(&self, stored: u64, committed_before: u64) {
        let raced = self.local_committed.load(Ordering::Relaxed) - committed_before;
        self.usage
            .store(stored + raced + self.local_reserved.load(Ordering::Relaxed));
    }

    /// Ensures `size` more bytes fit under the quota and the free-space reserve,
    /// evicting least-recently-used objects if needed.
    /// Admits an upload of `size` bytes: checks for room and reserves it as one step
    /// (under the admission lock, so that concurrent uploads cannot all see the same room
    /// and together overshoot the quota or fill the disk), evicting outside that lock
    /// when there is none. Only admitted uploads are ever counted, so uploads that will be
    /// refused never make eviction free space on their behalf.
    pub(super) fn admit(&self, size: u64) -> Result<Reservation, CasError> {
        const ATTEMPTS: usize = 4;
        for _ in 0..ATTEMPTS {
            {
                let _admission = self.admission.lock().unwrap_or_else(|e| e.into_inner());
                if self.shortfall(size).is_none() {
                    return Ok(Reservation::new(self, size));
                }
            }
            // No room: make some (other uploads may take it before we come back; then we
            // try again, a bounded number of times).
            self.make_room(size)?;
        }
        Err(CasError::NoSpace {
            size,
            reason: self
                .shortfall(size)
                .unwrap_or_else(|| "other uploads took the room made for this one".to_owned()),
        })
    }

    pub(crate) fn make_room(&self, size: u64) -> Result<(), CasError> {
        const MAX_PASSES: usize = 5;
        let shortfall = || self.shortfall(size);
        if shortfall().is_none() {
            return Ok(());
        }
        self.check_fits(size)?;
        let _lock = self.lock_eviction()?;
        // Another thread or process may have made room while we waited.
        if shortfall().is_none() {
            return Ok(());
        }
        // Uploads admitted while this pass ran (their reservations are not in its sizing)
        // can leave it short: pass again (each pass sees every reservation made before it
        // sized its work) until there is room, or a pass frees nothing and no reservation
        // came after it.
        for _ in 0..MAX_PASSES {
            let started = std::time::Instant::now();
            let committed_before = self.local_committed.load(Ordering::Relaxed);
            let policy = self.policy;
            let mut sized_with = 0;
            let report = lru::evict(
                &self.objects,
                |stored| {
                    // Read after the scan, so that the pass sizes its work with the
                    // reservations of now rather than of before the scan.
                    // Commits that raced with the scan are counted as the usage estimate
                    // will count them (see store_measured_usage), so that the pass frees
                    // what the check after it asks for.
                    let raced = self.local_committed.load(Ordering::Relaxed) - committed_before;
                    let reserved = self.local_reserved.load(Ordering::Relaxed) + raced;
                    let unwritten = self.local_unwritten.load(Ordering::Relaxed);
                    let avail = free_space(&self.objects);
                    sized_with = reserved - raced;
                    // Evicting helps only if it can make enough room: when the uploads
                    // in progress and this one would not fit even in an empty cache,
                    // evicting everything would wipe the cache and still refuse them.
                    let for_quota = match policy.quota {
                        Some(q) if stored + reserved + size > q && reserved + size <= q => {
                            let target =
                                policy.low_watermark.min(q.saturating_sub(size + reserved));
                            stored.saturating_sub(target)
                        }
                        _ => 0,
                    };
                    let for_disk = match avail {
                        Some(a) => {
                            let need = (policy.reserve + size + unwritten).saturating_sub(a);
                            if need > stored {
                                0
                            } else {
                                need
                            }
                        }
                        None => 0,
                    };
                    for_quota.max(for_disk)
                },
                false,
            );
            self.store_measured_usage(report.scanned_bytes - report.freed_bytes, committed_before);
            let stored_after = report.scanned_bytes - report.freed_bytes;
            tracing::info!(
                freed_bytes = report.freed_bytes,
                freed_objects = report.freed_objects,
                stored_before = report.scanned_bytes,
                stored_after,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "evicted {} least recently used objects ({} bytes) in {} ms; {} bytes stored now",
                report.freed_objects,
                report.freed_bytes,
                started.elapsed().as_millis(),
                stored_after
            );
            let reserved_since = self.local_reserved.load(Ordering::Relaxed) > sized_with;
            if shortfall().is_none() || (report.freed_bytes == 0 && !reserved_since) {
                break;
            }
        }
        match shortfall() {
            None => Ok(()),
            Some(reason) => Err(CasError::NoSpace { size, reason }),
        }
    }

    /// Evicting cannot help a write the empty filesystem could not take: refuse it
    /// without emptying the cache first.
    pub(super) fn check_fits(&self, size: u64) -> Result<(), CasError> {
        if let Some((total, _)) = filesystem_space(&self.objects) {
            if size + self.policy.reserve > total {
                return Err(CasError::NoSpace {
                    size,
                    reason: format!(
                        "the filesystem holds {total} bytes in all and {} are kept in reserve",
                        self.policy.reserve
                    ),
                });
            }
        }
        Ok(())
    }

    /// One evictor at a time: a mutex within the process, `flock` across processes
    /// sharing the repository (held until the returned guard is dropped).
    fn lock_eviction(&self) -> Result<(std::sync::MutexGuard<'_, ()>, File), CasError> {
        let guard = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| CasError::io("opening the eviction lock", e))?;
        // Released when `lock` is closed.
        crate::sys::lock_exclusive(&lock)
            .map_err(|e| CasError::io("taking the eviction lock", e))?;
        Ok((guard, lock))
    }

    /// Evicts least recently used objects down to the low watermark (for `gc`).
    pub(crate) fn evict_to_low_watermark(
        &self,
        dry_run: bool,
    ) -> Result<lru::EvictReport, CasError> {
        let _lock = self.lock_eviction()?;
        let committed_before = self.local_committed.load(Ordering::Relaxed);
        let low = self.policy.low_watermark;
        let report = lru::evict(&self.objects, |stored| stored.saturating_sub(low), dry_run);
        if !dry_run {
            self.store_measured_usage(report.scanned_bytes - report.freed_bytes, committed_before);
        }
        Ok(report)
    }

    /// Why `size` more bytes would not fit, if they would not.
    pub(super) fn shortfall(&self, size: u64) -> Option<String> {
        if let Some(q) = self.policy.quota {
            let used = self.usage.load();
            if used + size > q {
                return Some(format!(
                    "the cache quota of {q} bytes is reached ({used} bytes stored or being uploaded)"
                ));
            }
        }
        // Uploads in progress will take the rest of their reservations: count them now,
        // or concurrent uploads each see the same free space and together run out of it.
        // (`--reserve 0` turns the disk check off: uploads then run until ENOSPC.)
        let unwritten = self.local_unwritten.load(Ordering::Relaxed);
        if self.policy.reserve > 0 {
            if let Some(avail) = free_space(&self.objects) {
                if avail < self.policy.reserve + size + unwritten {
                    return Some(format!(
                        "only {avail} bytes are free on the filesystem, {unwritten} are promised \
                         to uploads in progress and {} are kept in reserve",
                        self.policy.reserve
                    ));
                }
            }
        }
        None
    }
}

/// Bytes counted in the shared usage for an upload in progress. Dropping it gives them
/// back; [`Reservation::keep`] turns them into stored bytes.
pub(super) struct Reservation {
    usage: Arc<SharedCounter>,
    local: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    bytes: u64,
    /// This reservation's part of [`CasStore::local_unwritten`].
    unwritten_total: Arc<AtomicU64>,
    unwritten: u64,
}

impl Reservation {
    pub(super) fn new(store: &CasStore, bytes: u64) -> Self {
        store.usage.add(bytes);
        store.local_reserved.fetch_add(bytes, Ordering::Relaxed);
        store.local_unwritten.fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            usage: store.usage.clone(),
            local: store.local_reserved.clone(),
            committed: store.local_committed.clone(),
            bytes,
            unwritten_total: store.local_unwritten.clone(),
            unwritten: bytes,
        }
    }

    /// `n` more bytes are on disk (and show in the filesystem's free space).
    pub(super) fn written(&mut self, n: u64) {
        let n = n.min(self.unwritten);
        self.unwritten -= n;
        self.unwritten_total.fetch_sub(n, Ordering::Relaxed);
    }

    pub(super) fn keep(mut self) {
        self.committed.fetch_add(self.bytes, Ordering::Relaxed);
        self.local.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.usage.sub(self.bytes);
            self.local.fetch_sub(self.bytes, Ordering::Relaxed);
        }
        self.unwritten_total
            .fetch_sub(self.unwritten, Ordering::Relaxed);
    }
}

/// Size and free bytes (for unprivileged writers) of the filesystem holding `path`.
pub(crate) fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    crate::sys::filesystem_space(path)
}

fn free_space(path: &Path) -> Option<u64> {
    filesystem_space(path).map(|(_, free)| free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::digest::Digest;
    use sha2::Digest as _;

    fn blob(seed: u8, len: usize) -> (Digest, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let hash = hex::encode(sha2::Sha256::digest(&data));
        (Digest::new(&hash, len as i64).unwrap(), data)
    }

    /// Uploads in progress that leave no room for a new one even in an empty cache: the
    /// new one is refused and nothing is evicted for it.
    #[test]
    fn uploads_that_cannot_fit_do_not_wipe_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let policy = QuotaPolicy {
            quota: Some(1_000_000),
            low_watermark: 500_000,
            reserve: 0,
        };
        let cas = CasStore::open_with(dir.path(), policy).unwrap();
        let old: Vec<_> = (1..=3).map(|i| blob(i, 100_000)).collect();
        for (d, data) in &old {
            cas.put(d, data).unwrap();
        }
        // 700 kB in progress, then 400 kB more: 1.1 MB > 1 MB whatever is evicted.
        let (big, _) = blob(7, 700_000);
        let _in_progress = cas.begin_write(big).unwrap();
        let (more, _) = blob(8, 400_000);
        let err = cas.begin_write(more).err().expect("refused");
        assert!(err.is_out_of_space(), "{err}");
        for (d, _) in &old {
            assert!(
                cas.contains(d),
                "{d} was evicted for an upload that could not fit"
            );
        }
    }
}

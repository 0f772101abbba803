//! Content-addressable blob store on local disk, in buildbox-casd's layout
//! (`REPO/cas/objects/<2 hex>/<62 hex>`), so a repository written by the historical
//! casd-backed server is served in place.
//!
//! Invariants:
//! - A blob only ever appears under its final name complete and verified: uploads go to a
//!   private temporary file, are hashed as they stream, and are linked into place only
//!   when size and hash match. The temporary file is anonymous (`O_TMPFILE` in the
//!   blob's shard directory, then `linkat`), so a crash leaves nothing behind and the
//!   commit locks one directory only; where the filesystem lacks `O_TMPFILE` it is a
//!   named file in `REPO/cas/tmp`, renamed into place (docs/adr/0003).
//! - Identical concurrent uploads are harmless: each has its own temporary file and the
//!   first to commit wins; the others find a correct blob in place.
//! - Directories that disappear under a running server (an operator's `rm -rf`) are
//!   recreated on demand.
//!
//! The API is synchronous; async callers run it on the blocking pool.

use super::digest::Digest;
use super::direct::OutputFile;
use super::existence::{key_of, DirStamp, ExistenceCache};
use super::lru;
use super::objects_dir::{touch_file, ObjectsDir};
use super::usage::SharedCounter;
use super::verified::{file_id, FileId, VerifiedSet};
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("uploaded data has SHA-256 {actual}, but the digest says {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("uploaded data is {actual} bytes, but the digest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("upload overruns the digest size {expected} (got {actual} bytes so far)")]
    Overrun { expected: u64, actual: u64 },
    #[error("blob {digest} is {size} bytes, larger than the whole cache quota of {quota} bytes")]
    TooLarge {
        digest: String,
        size: u64,
        quota: u64,
    },
    #[error("no room for {size} more bytes: {reason}")]
    NoSpace { size: u64, reason: String },
    #[error("stored object {digest} failed verification ({reason}); it has been quarantined")]
    Corrupt { digest: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl CasError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        CasError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the disk (not the client) is the problem and the client may retry later.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            CasError::TooLarge { .. } | CasError::NoSpace { .. } => true,
            CasError::Io { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
            }
            _ => false,
        }
    }
}

/// How much the store may hold. See docs/adr/0001-storage-engine.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaPolicy {
    /// Upper bound on stored blob bytes; `None` for no bound.
    pub quota: Option<u64>,
    /// What eviction frees down to once the quota would be passed.
    pub low_watermark: u64,
    /// Free filesystem space to keep; below it, evict or refuse writes.
    pub reserve: u64,
}

impl QuotaPolicy {
    pub fn unlimited() -> Self {
        QuotaPolicy {
            quota: None,
            low_watermark: u64::MAX,
            reserve: 0,
        }
    }
}

pub struct CasStore {
    objects: PathBuf,
    /// `objects`, held open for lookups.
    dir: ObjectsDir,
    tmp: PathBuf,
    quarantine: PathBuf,
    lock_path: PathBuf,
    policy: QuotaPolicy,
    /// Bytes stored plus bytes reserved by uploads in progress, across processes.
    usage: Arc<SharedCounter>,
    /// This process's share of the reservations in `usage`.
    local_reserved: Arc<AtomicU64>,
    /// The part of this process's reservations not yet written to disk: space that the
    /// filesystem still shows as free but that uploads in progress will take.
    local_unwritten: Arc<AtomicU64>,
    /// Bytes this process has committed, ever: lets a measurement that raced with
    /// commits add them back rather than lose them.
    local_committed: Arc<AtomicU64>,
    evicting: Mutex<()>,
    /// Set by every commit; the background syncer flushes when it sees it.
    dirty: Arc<AtomicBool>,
    /// Whether reads refresh LRU stamps (off for offline inspection tools).
    refresh_lru: bool,
    /// Recent "present" answers of [`CasStore::find_missing`].
    existence: ExistenceCache,
    /// Whether uploads use anonymous temporary files (see the module notes).
    anonymous_temporaries: bool,
    /// Objects already checked against their digest by this process.
    verified: Arc<VerifiedSet>,
    /// When this process last refused an upload for lack of space (seconds since the
    /// epoch, 0 for never): the asset policy of docs/adr/0007 needs to know.
    space_refused_at: AtomicU64,
}

impl CasStore {
    /// Opens (creating if needed) the CAS under `repo` with no quota, and removes
    /// temporary files left behind by processes that no longer run.
    pub fn open(repo: &Path) -> Result<Self, CasError> {
        Self::open_with(repo, QuotaPolicy::unlimited())
    }

    pub fn open_with(repo: &Path, policy: QuotaPolicy) -> Result<Self, CasError> {
        let cas = repo.join("cas");
        let objects = cas.join("objects");
        let tmp = cas.join("tmp");
        for dir in [&objects, &tmp] {
            fs::create_dir_all(dir)
                .map_err(|e| CasError::io(format!("creating {}", dir.display()), e))?;
        }
        let usage_path = cas.join("usage");
        let usage = SharedCounter::open(&usage_path)
            .map_err(|e| CasError::io(format!("opening {}", usage_path.display()), e))?;
        let store = CasStore {
            quarantine: cas.join("quarantine"),
            lock_path: cas.join("evict.lock"),
            dir: ObjectsDir::open(&objects),
            objects,
            tmp,
            policy,
            usage: Arc::new(usage),
            local_reserved: Arc::new(AtomicU64::new(0)),
            local_unwritten: Arc::new(AtomicU64::new(0)),
            local_committed: Arc::new(AtomicU64::new(0)),
            evicting: Mutex::new(()),
            dirty: Arc::new(AtomicBool::new(false)),
            refresh_lru: true,
            existence: ExistenceCache::default(),
            anonymous_temporaries: false,
            verified: Arc::default(),
            space_refused_at: AtomicU64::new(0),
        };
        store.remove_stale_temporaries();
        store.ensure_empty_blob();
        let anonymous_temporaries = store.probe_anonymous_temporaries();
        tracing::debug!(anonymous_temporaries, "upload staging");
        Ok(CasStore {
            anonymous_temporaries,
            ..store
        })
    }

    fn note_space_refusal(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.space_refused_at
            .store(now.as_secs(), Ordering::Relaxed);
    }

    /// Whether this process refused an upload for lack of space within `window`.
    pub fn refused_space_within(&self, window: Duration) -> bool {
        let at = self.space_refused_at.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        at != 0 && now.saturating_sub(at) <= window.as_secs()
    }

    /// For tools that inspect the store: looking must not make objects look recently used.
    pub fn without_lru_refresh(mut self) -> Self {
        self.refresh_lru = false;
        self
    }

    pub fn objects_total(&self) -> lru::ScanSummary {
        lru::scan(&self.objects)
    }

    /// Every stored object, with its size (for verification tools).
    pub fn for_each_object(&self, mut f: impl FnMut(Digest, PathBuf)) {
        lru::for_each_object(&self.objects, |path, size, _| {
            let hash = path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|s| s.to_str())
                .zip(path.file_name().and_then(|n| n.to_str()))
                .map(|(shard, rest)| format!("{shard}{rest}"));
            if let Some(Ok(d)) = hash.map(|h| Digest::new(&h, size as i64)) {
                f(d, path);
            }
        });
    }

    pub fn policy(&self) -> QuotaPolicy {
        self.policy
    }

    /// The shared estimate of bytes stored (and reserved by uploads in progress).
    pub fn usage(&self) -> u64 {
        self.usage.load()
    }

    /// Measures the store and replaces the shared estimate with the measurement. Runs in
    /// the background at start-up so that listening never waits for it.
    pub fn rescan(&self) -> lru::ScanSummary {
        let committed_before = self.local_committed.load(Ordering::Relaxed);
        let summary = lru::scan(&self.objects);
        self.store_measured_usage(summary.bytes, committed_before);
        summary
    }

    /// Replaces the shared estimate with `stored` bytes measured by a scan that began
    /// when this process had committed `committed_before` bytes. Commits that raced
    /// with the scan are added back (possibly counting some twice: over-counting only
    /// makes eviction start a little early, under-counting would overshoot the quota).
    fn store_measured_usage(&self, stored: u64, committed_before: u64) {
        let raced = self.local_committed.load(Ordering::Relaxed) - committed_before;
        self.usage
            .store(stored + raced + self.local_reserved.load(Ordering::Relaxed));
    }

    /// Flushes everything written so far to stable storage if anything was committed
    /// since the last call. See the durability policy in the storage ADR.
    pub fn sync_if_dirty(&self) {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        match File::open(&self.objects) {
            // SAFETY: syncfs on a descriptor we own.
            Ok(dir) => unsafe {
                if libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) != 0 {
                    tracing::error!(error = %io::Error::last_os_error(), "syncfs failed");
                }
            },
            Err(e) => tracing::error!(error = %e, "opening the object directory to sync it"),
        }
    }

    /// Starts the background work of a serving process: the initial measurement (then
    /// an eviction if the store is already over quota) and the periodic flush.
    pub fn start_background(self: &Arc<Self>, sync_interval: Duration) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("cas-scan".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let s = me.rescan();
                tracing::info!(
                    objects = s.objects,
                    bytes = s.bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "measured the object store"
                );
                if let Err(e) = me.make_room(0) {
                    tracing::warn!(error = %e, "store is over its limits after the start-up scan");
                }
            })
            .ok();
        let me = self.clone();
        std::thread::Builder::new()
            .name("cas-sync".into())
            .spawn(move || loop {
                std::thread::sleep(sync_interval);
                // Puts the empty blob back soon after an operator's `rm -rf cas/objects`
                // even if no client asks for it (readers of the files never do).
                me.ensure_empty_blob();
                me.sync_if_dirty();
            })
            .ok();
    }

    /// Ensures `size` more bytes fit under the quota and the free-space reserve,
    /// evicting least-recently-used objects if needed.
    pub fn make_room(&self, size: u64) -> Result<(), CasError> {
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
        let started = std::time::Instant::now();
        let committed_before = self.local_committed.load(Ordering::Relaxed);
        let reserved = self.local_reserved.load(Ordering::Relaxed);
        let unwritten = self.local_unwritten.load(Ordering::Relaxed);
        let avail = free_space(&self.objects);
        let policy = self.policy;
        let report = lru::evict(
            &self.objects,
            |stored| {
                let for_quota = match policy.quota {
                    Some(q) if stored + reserved + size > q => {
                        let target = policy.low_watermark.min(q.saturating_sub(size + reserved));
                        stored.saturating_sub(target)
                    }
                    _ => 0,
                };
                let for_disk = match avail {
                    Some(a) => (policy.reserve + size + unwritten).saturating_sub(a),
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
        match shortfall() {
            None => Ok(()),
            Some(reason) => Err(CasError::NoSpace { size, reason }),
        }
    }

    /// Evicting cannot help a write the empty filesystem could not take: refuse it
    /// without emptying the cache first.
    fn check_fits(&self, size: u64) -> Result<(), CasError> {
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
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(CasError::io(
                "taking the eviction lock",
                io::Error::last_os_error(),
            ));
        }
        Ok((guard, lock))
    }

    /// Evicts least recently used objects down to the low watermark (for `gc`).
    pub fn evict_to_low_watermark(&self, dry_run: bool) -> Result<lru::EvictReport, CasError> {
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
    fn shortfall(&self, size: u64) -> Option<String> {
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

    /// Moves a damaged object aside so it is neither served nor counted, and a fresh
    /// upload can replace it.
    pub fn quarantine(&self, d: &Digest, reason: &str) {
        let from = self.path_of(d);
        let to = self.quarantine.join(format!(
            "{}-{}",
            d.hash(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        ));
        let size = fs::metadata(&from).map(|m| m.len()).unwrap_or(0);
        let moved = fs::create_dir_all(&self.quarantine).and_then(|_| fs::rename(&from, &to));
        match moved {
            Ok(()) => {
                self.usage.sub(size);
                tracing::error!(digest = %d, %reason, to = %to.display(), "quarantined a damaged object");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(digest = %d, %reason, error = %e, "could not quarantine a damaged object")
            }
        }
    }

    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    pub fn path_of(&self, d: &Digest) -> PathBuf {
        let h = d.hash();
        self.objects.join(&h[..2]).join(&h[2..])
    }

    /// Makes sure the empty blob is a file in `cas/objects` and says whether it is.
    ///
    /// REAPI lets a server answer "present" for the empty blob without storing it, but
    /// buildbox-casd serving a repository in place, and BuildStream's test-suite, read the
    /// object files directly: an artifact whose files are the empty directory (whose
    /// digest is the empty blob's) would look incomplete to them. So every repository
    /// holds it, created here whenever it is found missing (it costs no quota), and
    /// eviction never removes it.
    pub fn ensure_empty_blob(&self) -> bool {
        let d = Digest::empty();
        match self.dir.stat(&d) {
            Ok(st) if is_regular(&st) && st.st_size == 0 => return true,
            Ok(_) => self.quarantine(&d, "the empty blob's file is not an empty file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the empty blob's file");
                return false;
            }
        }
        let path = self.path_of(&d);
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&path)
        };
        let created = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => path
                .parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| create()),
            other => other,
        };
        match created {
            Ok(_) => {
                self.dirty.store(true, Ordering::Release);
                true
            }
            // A peer process or thread was quicker.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot create the empty blob's file");
                false
            }
        }
    }

    /// Whether the blob is present (with the right size); a hit refreshes its LRU stamp.
    pub fn contains(&self, d: &Digest) -> bool {
        if d.is_empty_blob() {
            return self.ensure_empty_blob();
        }
        match self.dir.stat(d) {
            Ok(st) if st.st_size as u64 == d.size() && is_regular(&st) => {
                if self.refresh_lru {
                    self.dir.touch(d);
                }
                true
            }
            // The size in a request comes from the client: a mismatch only says this
            // digest is absent, not that the stored object is damaged. A truncated object
            // (after a power loss) is replaced by the next upload of its digest.
            Ok(_) => false,
            Err(_) => false,
        }
    }

    /// The digests among `digests` that are absent (FindMissingBlobs), in request order.
    /// Present blobs get their LRU stamps refreshed, except those the existence cache
    /// vouches for (verified within [`super::existence::REVERIFY`]).
    pub fn find_missing(&self, digests: Vec<Digest>) -> Vec<Digest> {
        let now = std::time::SystemTime::now();
        // Each shard directory is looked at once per request, before any of its blobs.
        let mut stamps: Vec<Option<Option<DirStamp>>> = vec![None; 256];
        digests
            .into_iter()
            .filter(|d| {
                if d.is_empty_blob() {
                    return !self.ensure_empty_blob();
                }
                let key = key_of(d.hash());
                let stamp = *stamps[key[0] as usize]
                    .get_or_insert_with(|| DirStamp::of(&self.objects.join(&d.hash()[..2])));
                if self.existence.is_present(&key, d.size(), stamp, now) {
                    return false;
                }
                if self.contains(d) {
                    self.existence.record(&key, d.size(), stamp, now);
                    return false;
                }
                true
            })
            .collect()
    }

    /// Opens a present blob for reading, refreshing its LRU stamp; with the identity of
    /// the file opened (for [`VerifiedSet`]).
    fn open_blob(&self, d: &Digest) -> Result<Option<(File, FileId)>, CasError> {
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
    pub fn read_all(&self, d: &Digest) -> Result<Option<Vec<u8>>, CasError> {
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
    pub fn open_reader(
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

    /// Stores a complete blob held in memory, verifying it against its digest.
    pub fn put(&self, d: &Digest, data: &[u8]) -> Result<(), CasError> {
        let mut w = self.begin_write(d.clone())?;
        w.write(data)?;
        w.commit()
    }

    /// Starts a streaming upload. When the blob is already present the data is still
    /// verified but not written again.
    pub fn begin_write(&self, digest: Digest) -> Result<BlobWriter, CasError> {
        let final_path = self.path_of(&digest);
        let sink = if self.contains(&digest) {
            None
        } else {
            if let Some(q) = self.policy.quota {
                if digest.size() > q {
                    self.note_space_refusal();
                    return Err(CasError::TooLarge {
                        digest: digest.to_string(),
                        size: digest.size(),
                        quota: q,
                    });
                }
            }
            // Counted before looking for room, so that concurrent uploads cannot all see
            // the same room and together overshoot the quota or fill the disk; from now
            // on eviction knows about the space that is spoken for. (If there is no room,
            // dropping the reservation gives it back.)
            let reservation = Reservation::new(self, digest.size());
            if self.shortfall(0).is_some() {
                self.check_fits(digest.size())
                    .and_then(|()| self.make_room(0))
                    .map_err(|e| match e {
                        CasError::NoSpace { reason, .. } => CasError::NoSpace {
                            size: digest.size(),
                            reason,
                        },
                        other => other,
                    })
                    .inspect_err(|e| {
                        if e.is_out_of_space() {
                            self.note_space_refusal();
                        }
                    })?;
            }
            let (path, file) = if self.anonymous_temporaries {
                (None, self.create_anonymous(&final_path)?)
            } else {
                let (path, file) = self.create_temporary()?;
                (Some(path), file)
            };
            // Large uploads bypass the page cache (see super::direct).
            let file = if digest.size() >= HASH_THREAD_MIN {
                OutputFile::direct(file)
            } else {
                OutputFile::buffered(file)
            };
            Some(TempFile {
                path,
                file,
                reservation,
            })
        };
        let hasher = Hashing::for_size(digest.size());
        Ok(BlobWriter {
            digest,
            final_path,
            sink,
            hasher,
            verified: self.verified.clone(),
            written: 0,
            dirty: self.dirty.clone(),
        })
    }

    /// Whether this filesystem (and /proc) let us create anonymous files and link them.
    fn probe_anonymous_temporaries(&self) -> bool {
        let probe = self.tmp.join(format!(
            "{}-probe-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let works = open_anonymous(&self.tmp)
            .and_then(|f| link_anonymous(&f, &probe))
            .is_ok();
        let _ = fs::remove_file(&probe);
        works
    }

    /// An anonymous file in the directory of `final_path`, recreating it if it has gone.
    fn create_anonymous(&self, final_path: &Path) -> Result<File, CasError> {
        let dir = final_path.parent().unwrap_or(&self.objects);
        match open_anonymous(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir)
                    .map_err(|e| CasError::io(format!("creating {}", dir.display()), e))?;
                open_anonymous(dir)
            }
            other => other,
        }
        .map_err(|e| CasError::io(format!("creating an upload file in {}", dir.display()), e))
    }

    fn create_temporary(&self) -> Result<(PathBuf, File), CasError> {
        // The pid in the name lets a restart tell its own debris from a live peer's.
        let name = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let path = self.tmp.join(name);
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.tmp)
                    .map_err(|e| CasError::io(format!("creating {}", self.tmp.display()), e))?;
                open()
            }
            other => other,
        }
        .map_err(|e| {
            CasError::io(
                format!("creating temporary file in {}", self.tmp.display()),
                e,
            )
        })?;
        Ok((path, file))
    }

    fn remove_stale_temporaries(&self) {
        let Ok(entries) = fs::read_dir(&self.tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            let stale = match owner {
                Some(pid) => !process_alive(pid),
                None => true,
            };
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

struct TempFile {
    /// `None` for an anonymous file.
    path: Option<PathBuf>,
    file: OutputFile,
    reservation: Reservation,
}

/// Bytes counted in the shared usage for an upload in progress. Dropping it gives them
/// back; [`Reservation::keep`] turns them into stored bytes.
struct Reservation {
    usage: Arc<SharedCounter>,
    local: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    bytes: u64,
    /// This reservation's part of [`CasStore::local_unwritten`].
    unwritten_total: Arc<AtomicU64>,
    unwritten: u64,
}

impl Reservation {
    fn new(store: &CasStore, bytes: u64) -> Self {
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
    fn written(&mut self, n: u64) {
        let n = n.min(self.unwritten);
        self.unwritten -= n;
        self.unwritten_total.fetch_sub(n, Ordering::Relaxed);
    }

    fn keep(mut self) {
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

/// Streams a byte range of a stored blob; see [`CasStore::open_reader`].
pub struct BlobReader {
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
    remember: Option<(super::existence::Key, FileId)>,
    buffers: ReadBuffers,
}

impl BlobReader {
    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    /// The next chunk of at most `max` bytes, or `None` at the end of the range.
    /// A whole-blob read is verified before its last chunk is handed out, so a client
    /// never receives all of a damaged blob. `store` is needed only to quarantine the
    /// object if verification fails.
    pub fn next_chunk(
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

/// Blobs from this size on are hashed on a thread of their own while they are written
/// (uploads) or sent (verified reads), so that one stream is not limited by hashing plus
/// I/O on one core.
pub const HASH_THREAD_MIN: u64 = 4 << 20;

/// Stack of the per-stream hashing threads: they only run SHA-256 over what they are
/// handed, and with one per stream the default 2 MiB would add up.
const HELPER_STACK: usize = 128 << 10;

/// Chunks queued for an upload's hashing thread: a little slack lets the writer run
/// ahead of a momentarily slower hasher, and bounds the memory held.
const HASH_QUEUE: usize = 1;

enum Hashing {
    Inline(Sha256),
    Thread {
        chunks: std::sync::mpsc::SyncSender<bytes::Bytes>,
        result: std::thread::JoinHandle<Sha256>,
    },
}

impl Hashing {
    /// Blobs of [`HASH_THREAD_MIN`] and more are hashed on a thread of their own.
    fn for_size(size: u64) -> Self {
        if size >= HASH_THREAD_MIN {
            Hashing::on_thread()
        } else {
            Hashing::Inline(Sha256::new())
        }
    }

    fn on_thread() -> Self {
        let (chunks, rx) = std::sync::mpsc::sync_channel(HASH_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("cas-hash".into())
            .stack_size(HELPER_STACK)
            .spawn(move || {
                let mut h = Sha256::new();
                for chunk in rx {
                    let chunk: bytes::Bytes = chunk;
                    h.update(&chunk);
                }
                h
            });
        match spawned {
            Ok(result) => Hashing::Thread { chunks, result },
            // Out of threads: hashing inline is slower, not wrong.
            Err(_) => Hashing::Inline(Sha256::new()),
        }
    }

    fn update(&mut self, data: bytes::Bytes) {
        match self {
            Hashing::Inline(h) => h.update(&data),
            Hashing::Thread { chunks, .. } => {
                // The thread only stops when the sender is dropped.
                let _ = chunks.send(data);
            }
        }
    }

    fn finish(self) -> Result<String, CasError> {
        let h = match self {
            Hashing::Inline(h) => h,
            Hashing::Thread { chunks, result } => {
                drop(chunks);
                result.join().map_err(|_| {
                    CasError::io("hashing a blob", io::Error::other("hash thread panicked"))
                })?
            }
        };
        Ok(hex::encode(h.finalize()))
    }
}

/// An upload in progress. Dropping it without [`BlobWriter::commit`] discards the data.
pub struct BlobWriter {
    digest: Digest,
    final_path: PathBuf,
    sink: Option<TempFile>,
    hasher: Hashing,
    /// Where a committed upload is recorded as checked (it was hashed as written).
    verified: Arc<VerifiedSet>,
    written: u64,
    /// The store's "something to flush" flag.
    dirty: Arc<AtomicBool>,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<(), CasError> {
        self.check_room(data.len())?;
        match &mut self.hasher {
            Hashing::Inline(h) => h.update(data),
            thread => thread.update(bytes::Bytes::copy_from_slice(data)),
        }
        self.store(data)
    }

    /// [`BlobWriter::write`] without a copy for the hashing thread. The chunk is
    /// released once it has been both written and hashed (for large blobs, on another
    /// thread while this one writes), which is how an owner such as a buffer pool gets
    /// it back.
    pub fn write_bytes(&mut self, data: bytes::Bytes) -> Result<(), CasError> {
        self.check_room(data.len())?;
        self.hasher.update(data.clone());
        self.store(&data)
    }

    fn check_room(&self, len: usize) -> Result<(), CasError> {
        let after = self.written + len as u64;
        if after > self.digest.size() {
            return Err(CasError::Overrun {
                expected: self.digest.size(),
                actual: after,
            });
        }
        Ok(())
    }

    fn store(&mut self, data: &[u8]) -> Result<(), CasError> {
        if let Some(sink) = &mut self.sink {
            sink.file
                .write_all(data)
                .map_err(|e| CasError::io(format!("writing upload of {}", self.digest), e))?;
            sink.reservation.written(data.len() as u64);
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Verifies the data and makes the blob visible under its final name.
    pub fn commit(mut self) -> Result<(), CasError> {
        if self.written != self.digest.size() {
            return Err(CasError::SizeMismatch {
                expected: self.digest.size(),
                actual: self.written,
            });
        }
        let hasher = std::mem::replace(&mut self.hasher, Hashing::Inline(Sha256::new()));
        let actual = hasher.finish()?;
        if actual != self.digest.hash() {
            return Err(CasError::HashMismatch {
                expected: self.digest.hash().to_owned(),
                actual,
            });
        }
        let Some(sink) = self.sink.take() else {
            return Ok(());
        };
        let TempFile {
            path,
            file: mut out,
            reservation,
        } = sink;
        if let Err(e) = out.finish() {
            if let Some(path) = &path {
                let _ = fs::remove_file(path);
            }
            return Err(CasError::io(
                format!("writing upload of {}", self.digest),
                e,
            ));
        }
        let file = out.file();
        // The inode keeps its identity through the link or rename below.
        let id = file.metadata().ok().map(|m| file_id(&m));
        // Whether this upload's file became the stored blob.
        let stored = (|| {
            match &path {
                None => link_into_place(file, &self.final_path, self.digest.size()),
                Some(path) => {
                    file.set_permissions(fs::Permissions::from_mode(0o444))
                        .map_err(|e| CasError::io("setting blob permissions", e))?;
                    let existed = self.final_path.exists();
                    rename_into_place(path, &self.final_path).map(|()| !existed)
                }
            }
            .map_err(|e| CasError::io(format!("storing blob {}", self.digest), e))
        })();
        match stored {
            Err(_) => {
                if let Some(path) = &path {
                    let _ = fs::remove_file(path);
                }
            }
            Ok(true) => {
                reservation.keep();
                if let Some(id) = id {
                    self.verified.insert(key_of(self.digest.hash()), id);
                }
            }
            // A racing identical upload got there first: its bytes are already counted.
            Ok(false) => drop(reservation),
        }
        self.dirty.store(true, Ordering::Release);
        stored.map(|_| ())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(path) = self.sink.take().and_then(|sink| sink.path) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Size and free bytes (for unprivileged writers) of the filesystem holding `path`.
pub fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and an out-parameter of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_blocks as u64 * unit, st.f_bavail as u64 * unit))
}

fn free_space(path: &Path) -> Option<u64> {
    filesystem_space(path).map(|(_, free)| free)
}

/// Opens a new file with no name in `dir`, for [`link_anonymous`]. It is born with the
/// final read-only mode (the descriptor stays writable), which saves a `fchmod` per blob.
/// The process umask applies (0444 under the usual 022; a umask without read bits for
/// group and others leaves objects readable by the server's own user only).
fn open_anonymous(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o444)
        .open(dir)
}

/// Gives the anonymous `file` the name `to`; fails with `AlreadyExists` if it is taken.
fn link_anonymous(file: &File, to: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    // linkat(AT_EMPTY_PATH) would need CAP_DAC_READ_SEARCH; the /proc link does not.
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io::Error::other)?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Links the verified anonymous upload `file` of `size` bytes in as `to`. Returns false
/// when an intact object was already there (it is kept); an object of the wrong size
/// (truncated by a power loss) is replaced. Recreates `to`'s directory if it has gone.
fn link_into_place(file: &File, to: &Path, size: u64) -> io::Result<bool> {
    // Bounded: each retry needs a concurrent removal of the name or its directory.
    for _ in 0..3 {
        match link_anonymous(file, to) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::metadata(to) {
                Ok(m) if m.len() == size => return Ok(false),
                Ok(_) => match fs::remove_file(to) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = to.parent() {
                    fs::create_dir_all(parent)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    link_anonymous(file, to).map(|()| true)
}

/// Renames `from` to `to`, recreating `to`'s directory if it has gone.
pub(crate) fn rename_into_place(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && from.exists() => {
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(from, to)
        }
        other => other,
    }
}

/// Whether `st` describes a regular file (not a directory or other special file).
fn is_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, CasStore) {
        let dir = tempfile::tempdir().unwrap();
        let cas = CasStore::open(dir.path()).unwrap();
        (dir, cas)
    }

    #[test]
    fn put_then_read_back() {
        let (_d, cas) = store();
        let d = Digest::of_bytes(b"hello");
        assert!(!cas.contains(&d));
        cas.put(&d, b"hello").unwrap();
        assert!(cas.contains(&d));
        assert_eq!(cas.read_all(&d).unwrap().unwrap(), b"hello");
        let mode = fs::metadata(cas.path_of(&d)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
    }

    #[test]
    fn wrong_hash_stores_nothing() {
        let (_d, cas) = store();
        let d = Digest::of_bytes(b"hello");
        let err = cas.put(&d, b"hellO").unwrap_err();
        assert!(matches!(err, CasError::HashMismatch { .. }));
        assert!(!cas.contains(&d));
        assert_eq!(fs::read_dir(&cas.tmp).unwrap().count(), 0);
    }

    #[test]
    fn short_and_long_uploads_are_refused() {
        let (_d, cas) = store();
        let d = Digest::of_bytes(b"hello");
        assert!(matches!(
            cas.put(&d, b"hell").unwrap_err(),
            CasError::SizeMismatch { .. }
        ));
        assert!(matches!(
            cas.put(&d, b"hello!").unwrap_err(),
            CasError::Overrun { .. }
        ));
    }

    #[test]
    fn recreates_removed_directories() {
        let (_d, cas) = store();
        fs::remove_dir_all(cas.objects_dir()).unwrap();
        fs::remove_dir_all(&cas.tmp).unwrap();
        let d = Digest::of_bytes(b"again");
        cas.put(&d, b"again").unwrap();
        assert!(cas.contains(&d));
    }

    #[test]
    fn the_empty_blob_is_always_a_file() {
        let (_d, cas) = store();
        let empty = Digest::empty();
        let path = cas.path_of(&empty);
        let is_empty_file = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == 0);
        assert!(is_empty_file(&path), "created on open");

        fs::remove_dir_all(cas.objects_dir()).unwrap();
        assert!(cas.find_missing(vec![empty.clone()]).is_empty());
        assert!(is_empty_file(&path), "recreated when asked for");

        fs::remove_file(&path).unwrap();
        assert!(cas.contains(&empty));
        assert!(is_empty_file(&path));

        // Damaged (not empty): moved aside and replaced.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"x").unwrap();
        assert!(cas.ensure_empty_blob());
        assert!(is_empty_file(&path));

        fs::remove_file(&path).unwrap();
        cas.put(&empty, b"").unwrap();
        assert!(is_empty_file(&path), "an upload of it stores it");
    }

    #[test]
    fn removes_debris_of_dead_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("cas/tmp");
        fs::create_dir_all(&tmp).unwrap();
        // pid 0x7ffffffe is never a live process on Linux (pid_max is at most 2^22).
        fs::write(tmp.join("2147483646-dead"), b"x").unwrap();
        let mine = tmp.join(format!("{}-live", std::process::id()));
        fs::write(&mine, b"x").unwrap();
        let _cas = CasStore::open(dir.path()).unwrap();
        assert!(!tmp.join("2147483646-dead").exists());
        assert!(mine.exists());
    }

    #[test]
    fn wrong_sized_object_on_disk_is_not_served_and_is_replaced() {
        let (_d, cas) = store();
        let d = Digest::of_bytes(b"truncated?");
        let p = cas.path_of(&d);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"trunc").unwrap();
        assert!(!cas.contains(&d));
        assert!(cas.read_all(&d).unwrap().is_none());
        cas.put(&d, b"truncated?").unwrap();
        assert_eq!(cas.read_all(&d).unwrap().unwrap(), b"truncated?");
    }

    #[test]
    fn asking_with_a_wrong_size_leaves_the_blob_alone() {
        let (_d, cas) = store();
        let d = Digest::of_bytes(b"good");
        cas.put(&d, b"good").unwrap();
        let wrong = Digest::new(d.hash(), 3).unwrap();
        assert!(!cas.contains(&wrong));
        assert!(cas.read_all(&wrong).unwrap().is_none());
        assert!(cas.contains(&d));
    }

    #[test]
    fn content_that_fails_its_hash_is_quarantined() {
        let (dir, cas) = store();
        let d = Digest::of_bytes(b"original");
        let p = cas.path_of(&d);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"ORIGINAL").unwrap();
        assert!(cas.read_all(&d).unwrap().is_none());
        assert!(!p.exists());
        assert_eq!(
            fs::read_dir(dir.path().join("cas/quarantine"))
                .unwrap()
                .count(),
            1
        );
    }
}

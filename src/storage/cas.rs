//! Content-addressable blob store on local disk, in buildbox-casd's layout
//! (`REPO/cas/objects/<2 hex>/<62 hex>`), so a repository written by the historical
//! casd-backed server is served in place.
//!
//! Invariants:
//! - A blob only ever appears under its final name complete and verified: uploads go to a
//!   private temporary file in `REPO/cas/tmp`, are hashed as they stream, and are renamed
//!   into place only when size and hash match.
//! - Identical concurrent uploads are harmless: each has its own temporary file and the
//!   renames replace one correct file by another.
//! - Directories that disappear under a running server (an operator's `rm -rf`) are
//!   recreated on demand.
//!
//! The API is synchronous; async callers run it on the blocking pool.

use super::digest::Digest;
use super::lru;
use super::usage::SharedCounter;
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
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
    tmp: PathBuf,
    quarantine: PathBuf,
    lock_path: PathBuf,
    policy: QuotaPolicy,
    /// Bytes stored plus bytes reserved by uploads in progress, across processes.
    usage: Arc<SharedCounter>,
    /// This process's share of the reservations in `usage`.
    local_reserved: Arc<AtomicU64>,
    /// Bytes this process has committed, ever: lets a measurement that raced with
    /// commits add them back rather than lose them.
    local_committed: Arc<AtomicU64>,
    evicting: Mutex<()>,
    /// Set by every commit; the background syncer flushes when it sees it.
    dirty: Arc<AtomicBool>,
    /// Whether reads refresh LRU stamps (off for offline inspection tools).
    refresh_lru: bool,
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
            objects,
            tmp,
            policy,
            usage: Arc::new(usage),
            local_reserved: Arc::new(AtomicU64::new(0)),
            local_committed: Arc::new(AtomicU64::new(0)),
            evicting: Mutex::new(()),
            dirty: Arc::new(AtomicBool::new(false)),
            refresh_lru: true,
        };
        store.remove_stale_temporaries();
        Ok(store)
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
        // Evicting cannot help a write the empty filesystem could not take: refuse it
        // without emptying the cache first.
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
        let _lock = self.lock_eviction()?;
        // Another thread or process may have made room while we waited.
        if shortfall().is_none() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let committed_before = self.local_committed.load(Ordering::Relaxed);
        let reserved = self.local_reserved.load(Ordering::Relaxed);
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
                    Some(a) => (policy.reserve + size).saturating_sub(a),
                    None => 0,
                };
                for_quota.max(for_disk)
            },
            false,
        );
        self.store_measured_usage(report.scanned_bytes - report.freed_bytes, committed_before);
        tracing::info!(
            freed_bytes = report.freed_bytes,
            freed_objects = report.freed_objects,
            stored_before = report.scanned_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "evicted least recently used objects"
        );
        match shortfall() {
            None => Ok(()),
            Some(reason) => Err(CasError::NoSpace { size, reason }),
        }
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
        if self.policy.reserve > 0 {
            if let Some(avail) = free_space(&self.objects) {
                if avail < self.policy.reserve + size {
                    return Some(format!(
                        "only {avail} bytes are free on the filesystem and {} are kept in reserve",
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

    /// Whether the blob is present (with the right size); a hit refreshes its LRU stamp.
    pub fn contains(&self, d: &Digest) -> bool {
        if d.is_empty_blob() {
            return true;
        }
        let path = self.path_of(d);
        match fs::metadata(&path) {
            Ok(m) if m.len() == d.size() => {
                if self.refresh_lru {
                    touch(&path);
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

    /// Opens a present blob for reading, refreshing its LRU stamp.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<File>, CasError> {
        let path = self.path_of(d);
        match File::open(&path) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(|e| CasError::io(format!("reading metadata of {d}"), e))?
                    .len();
                if len != d.size() {
                    return Ok(None);
                }
                if self.refresh_lru {
                    touch(&path);
                }
                Ok(Some(f))
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
        let Some(mut f) = self.open_blob(d)? else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(d.size() as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| CasError::io(format!("reading blob {d}"), e))?;
        if buf.len() as u64 != d.size() || Digest::of_bytes(&buf).hash() != d.hash() {
            self.quarantine(d, "content does not match its digest");
            return Ok(None);
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
        let file = if d.is_empty_blob() {
            None
        } else {
            match self.open_blob(d)? {
                Some(f) => Some(f),
                None => return Ok(None),
            }
        };
        Ok(Some(BlobReader {
            digest: d.clone(),
            file,
            pos: offset,
            end,
            hasher: (offset == 0 && end == d.size()).then(Sha256::new),
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
        let sink = if digest.is_empty_blob() || self.contains(&digest) {
            None
        } else {
            if let Some(q) = self.policy.quota {
                if digest.size() > q {
                    return Err(CasError::TooLarge {
                        digest: digest.to_string(),
                        size: digest.size(),
                        quota: q,
                    });
                }
            }
            self.make_room(digest.size())?;
            // Counted from now on, so concurrent uploads cannot overshoot the quota
            // together and eviction knows about space that is spoken for.
            let reservation = Reservation::new(self, digest.size());
            let (path, file) = self.create_temporary()?;
            Some(TempFile {
                path,
                file,
                reservation,
            })
        };
        Ok(BlobWriter {
            digest,
            final_path,
            sink,
            hasher: Sha256::new(),
            written: 0,
            dirty: self.dirty.clone(),
        })
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
    path: PathBuf,
    file: File,
    reservation: Reservation,
}

/// Bytes counted in the shared usage for an upload in progress. Dropping it gives them
/// back; [`Reservation::keep`] turns them into stored bytes.
struct Reservation {
    usage: Arc<SharedCounter>,
    local: Arc<AtomicU64>,
    committed: Arc<AtomicU64>,
    bytes: u64,
}

impl Reservation {
    fn new(store: &CasStore, bytes: u64) -> Self {
        store.usage.add(bytes);
        store.local_reserved.fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            usage: store.usage.clone(),
            local: store.local_reserved.clone(),
            committed: store.local_committed.clone(),
            bytes,
        }
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
    }
}

/// Streams a byte range of a stored blob; see [`CasStore::open_reader`].
pub struct BlobReader {
    digest: Digest,
    file: Option<File>,
    pos: u64,
    end: u64,
    hasher: Option<Sha256>,
}

impl BlobReader {
    /// The next chunk of at most `max` bytes, or `None` at the end of the range.
    /// `store` is needed only to quarantine the object if verification fails.
    pub fn next_chunk(&mut self, max: u64, store: &CasStore) -> Result<Option<Vec<u8>>, CasError> {
        if self.pos >= self.end {
            if let Some(h) = self.hasher.take() {
                let actual = hex::encode(h.finalize());
                if actual != self.digest.hash() {
                    store.quarantine(&self.digest, "content does not match its digest");
                    return Err(CasError::Corrupt {
                        digest: self.digest.to_string(),
                        reason: format!("content hashes to {actual}"),
                    });
                }
            }
            return Ok(None);
        }
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let len = max.min(self.end - self.pos) as usize;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, self.pos)
            .map_err(|e| CasError::Corrupt {
                digest: self.digest.to_string(),
                reason: format!("reading at offset {}: {e}", self.pos),
            })?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf);
        }
        self.pos += len as u64;
        Ok(Some(buf))
    }
}

/// An upload in progress. Dropping it without [`BlobWriter::commit`] discards the data.
pub struct BlobWriter {
    digest: Digest,
    final_path: PathBuf,
    sink: Option<TempFile>,
    hasher: Sha256,
    written: u64,
    /// The store's "something to flush" flag.
    dirty: Arc<AtomicBool>,
}

impl BlobWriter {
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), CasError> {
        let after = self.written + data.len() as u64;
        if after > self.digest.size() {
            return Err(CasError::Overrun {
                expected: self.digest.size(),
                actual: after,
            });
        }
        self.hasher.update(data);
        if let Some(sink) = &mut self.sink {
            sink.file
                .write_all(data)
                .map_err(|e| CasError::io(format!("writing upload of {}", self.digest), e))?;
        }
        self.written = after;
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
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
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
            file,
            reservation,
        } = sink;
        let existed = self.final_path.exists();
        let result = (|| {
            file.set_permissions(fs::Permissions::from_mode(0o444))
                .map_err(|e| CasError::io("setting blob permissions", e))?;
            drop(file);
            rename_into_place(&path, &self.final_path)
                .map_err(|e| CasError::io(format!("storing blob {}", self.digest), e))
        })();
        match &result {
            Err(_) => {
                let _ = fs::remove_file(&path);
            }
            // A racing identical upload got there first: its bytes are already counted.
            Ok(()) if existed => drop(reservation),
            Ok(()) => reservation.keep(),
        }
        self.dirty.store(true, Ordering::Release);
        result
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            let _ = fs::remove_file(&sink.path);
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

/// Sets mtime (the LRU stamp, as casd uses it) to now. Failure is harmless: the blob is
/// still served, it only ages as if it had not been used.
pub(crate) fn touch(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `times` has the two entries
    // utimensat requires.
    unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0);
    }
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

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

pub(crate) mod direct;
mod error;
pub(crate) mod existence;
mod hash;
pub(crate) mod layout;
pub(crate) mod lru;
pub(crate) mod objects_dir;
mod quota;
mod read;
mod usage;
mod verified;
mod write;

pub(crate) use error::CasError;
pub(crate) use quota::{filesystem_space, QuotaPolicy};
pub(crate) use read::BlobReader;
pub(crate) use write::rename_into_place;
pub(crate) use write::BlobWriter;

use crate::storage::digest::Digest;
use existence::{key_of, DirStamp, ExistenceCache};
use layout::CasPaths;
use objects_dir::ObjectsDir;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use usage::SharedCounter;
use verified::VerifiedSet;

pub(crate) struct CasStore {
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
    /// Held while an upload checks for room and reserves it (never while evicting).
    admission: Mutex<()>,
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
    #[cfg(test)]
    pub(crate) fn open(repo: &Path) -> Result<Self, CasError> {
        Self::open_with(repo, QuotaPolicy::unlimited())
    }

    pub(crate) fn open_with(repo: &Path, policy: QuotaPolicy) -> Result<Self, CasError> {
        let CasPaths {
            objects,
            tmp,
            quarantine,
            evict_lock,
            usage: usage_path,
        } = CasPaths::of(repo);
        for dir in [&objects, &tmp] {
            fs::create_dir_all(dir)
                .map_err(|e| CasError::io(format!("creating {}", dir.display()), e))?;
        }
        let usage = SharedCounter::open(&usage_path)
            .map_err(|e| CasError::io(format!("opening {}", usage_path.display()), e))?;
        let store = CasStore {
            quarantine,
            lock_path: evict_lock,
            dir: ObjectsDir::open(&objects),
            objects,
            tmp,
            policy,
            usage: Arc::new(usage),
            local_reserved: Arc::new(AtomicU64::new(0)),
            local_unwritten: Arc::new(AtomicU64::new(0)),
            local_committed: Arc::new(AtomicU64::new(0)),
            evicting: Mutex::new(()),
            admission: Mutex::new(()),
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

    /// For tools that inspect the store: looking must not make objects look recently used.
    pub(crate) fn without_lru_refresh(mut self) -> Self {
        self.refresh_lru = false;
        self
    }

    pub(crate) fn objects_total(&self) -> lru::ScanSummary {
        lru::scan(&self.objects)
    }

    /// Every stored object, with its size (for verification tools).
    pub(crate) fn for_each_object(&self, mut f: impl FnMut(Digest, PathBuf)) {
        lru::for_each_object(&self.objects, |path, size, _| {
            let hash = layout::hash_of_path(&path);
            if let Some(Ok(d)) = hash.map(|h| Digest::new(&h, size as i64)) {
                f(d, path);
            }
        });
    }

    /// Whether the object file at `path` holds exactly the content `digest` names. Reads
    /// it in pieces, so checking a large blob does not hold it in memory.
    pub(crate) fn object_matches(&self, digest: &Digest, path: &Path) -> bool {
        hash::file_sha256(path)
            .is_ok_and(|(hash, len)| len == digest.size() && hash == digest.hash())
    }

    /// Flushes everything written so far to stable storage if anything was committed
    /// since the last call. See the durability policy in the storage ADR.
    pub(crate) fn sync_if_dirty(&self) {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        match File::open(&self.objects) {
            Ok(dir) => {
                if let Err(e) = crate::sys::sync_filesystem(&dir) {
                    tracing::error!(error = %e, "syncfs failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "opening the object directory to sync it"),
        }
    }

    /// Starts the background work of a serving process: the initial measurement (then
    /// an eviction if the store is already over quota) and the periodic flush.
    pub(crate) fn start_background(self: &Arc<Self>, sync_interval: Duration) {
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

    /// Moves a damaged object aside so it is neither served nor counted, and a fresh
    /// upload can replace it.
    pub(crate) fn quarantine(&self, d: &Digest, reason: &str) {
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

    #[cfg(test)]
    pub(crate) fn objects_dir(&self) -> &Path {
        &self.objects
    }

    pub(crate) fn path_of(&self, d: &Digest) -> PathBuf {
        layout::sharded_path(&self.objects, d.hash())
    }

    /// Makes sure the empty blob is a file in `cas/objects` and says whether it is.
    ///
    /// REAPI lets a server answer "present" for the empty blob without storing it, but
    /// buildbox-casd serving a repository in place, and BuildStream's test-suite, read the
    /// object files directly: an artifact whose files are the empty directory (whose
    /// digest is the empty blob's) would look incomplete to them. So every repository
    /// holds it, created here whenever it is found missing (it costs no quota), and
    /// eviction never removes it.
    pub(crate) fn ensure_empty_blob(&self) -> bool {
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
    pub(crate) fn contains(&self, d: &Digest) -> bool {
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
    /// vouches for (verified within [`existence::REVERIFY`]).
    pub(crate) fn find_missing(&self, digests: Vec<Digest>) -> Vec<Digest> {
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
                let stamp = *stamps[key[0] as usize].get_or_insert_with(|| {
                    DirStamp::of(&self.objects.join(layout::shard_of(d.hash())))
                });
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
}

/// Whether `st` describes a regular file (not a directory or other special file).
fn is_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

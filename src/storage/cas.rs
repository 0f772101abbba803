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
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("uploaded data has SHA-256 {actual}, but the digest says {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("uploaded data is {actual} bytes, but the digest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("upload overruns the digest size {expected} (got {actual} bytes so far)")]
    Overrun { expected: u64, actual: u64 },
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
        matches!(self, CasError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

pub struct CasStore {
    objects: PathBuf,
    tmp: PathBuf,
}

impl CasStore {
    /// Opens (creating if needed) the CAS under `repo` and removes temporary files left
    /// behind by processes that no longer run.
    pub fn open(repo: &Path) -> Result<Self, CasError> {
        let objects = repo.join("cas").join("objects");
        let tmp = repo.join("cas").join("tmp");
        for dir in [&objects, &tmp] {
            fs::create_dir_all(dir)
                .map_err(|e| CasError::io(format!("creating {}", dir.display()), e))?;
        }
        let store = CasStore { objects, tmp };
        store.remove_stale_temporaries();
        Ok(store)
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
                touch(&path);
                true
            }
            Ok(m) => {
                tracing::error!(
                    digest = %d,
                    actual_size = m.len(),
                    "stored object has the wrong size; treating it as missing"
                );
                false
            }
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
                    tracing::error!(digest = %d, actual_size = len, "stored object has the wrong size; not serving it");
                    return Ok(None);
                }
                touch(&path);
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
        if buf.len() as u64 != d.size() {
            return Ok(None);
        }
        Ok(Some(buf))
    }

    /// Reads up to `len` bytes at `offset` from an open blob.
    pub fn read_chunk(file: &mut File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok(buf)
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
            let (path, file) = self.create_temporary()?;
            Some(TempFile { path, file })
        };
        Ok(BlobWriter {
            digest,
            final_path,
            sink,
            hasher: Sha256::new(),
            written: 0,
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
}

/// An upload in progress. Dropping it without [`BlobWriter::commit`] discards the data.
pub struct BlobWriter {
    digest: Digest,
    final_path: PathBuf,
    sink: Option<TempFile>,
    hasher: Sha256,
    written: u64,
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
        let TempFile { path, file } = sink;
        let result = (|| {
            file.set_permissions(fs::Permissions::from_mode(0o444))
                .map_err(|e| CasError::io("setting blob permissions", e))?;
            drop(file);
            rename_into_place(&path, &self.final_path)
                .map_err(|e| CasError::io(format!("storing blob {}", self.digest), e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&path);
        }
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
    fn wrong_sized_object_on_disk_is_not_served() {
        let (_d, cas) = store();
        let d = Digest::of_bytes(b"truncated?");
        let p = cas.path_of(&d);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"trunc").unwrap();
        assert!(!cas.contains(&d));
        assert!(cas.read_all(&d).unwrap().is_none());
    }
}

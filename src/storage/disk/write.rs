//! Uploads: staging in a private temporary file while hashing, then linking (or
//! renaming) into place once size and hash match. See docs/adr/0003-upload-path.md.

use super::direct::OutputFile;
use super::existence::key_of;
use super::hash::{Hashing, HASH_THREAD_MIN};
use super::quota::Reservation;
use super::verified::{file_id, VerifiedSet};
use super::{CasError, CasStore};
use crate::storage::digest::Digest;
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

impl CasStore {
    /// Stores a complete blob held in memory, verifying it against its digest.
    pub(crate) fn put(&self, d: &Digest, data: &[u8]) -> Result<(), CasError> {
        let mut w = self.begin_write(d.clone())?;
        w.write(data)?;
        w.commit()
    }

    /// Starts a streaming upload. When the blob is already present the data is still
    /// verified but not written again.
    pub(crate) fn begin_write(&self, digest: Digest) -> Result<BlobWriter, CasError> {
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
            let reservation = self.admit(digest.size()).inspect_err(|e| {
                if e.is_out_of_space() {
                    self.note_space_refusal();
                }
            })?;
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
    pub(super) fn probe_anonymous_temporaries(&self) -> bool {
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

    pub(super) fn remove_stale_temporaries(&self) {
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
                Some(pid) => !crate::sys::process_alive(pid),
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

/// An upload in progress. Dropping it without [`BlobWriter::commit`] discards the data.
pub(crate) struct BlobWriter {
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
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), CasError> {
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
    pub(crate) fn write_bytes(&mut self, data: bytes::Bytes) -> Result<(), CasError> {
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
    pub(crate) fn commit(mut self) -> Result<(), CasError> {
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
    // linkat(AT_EMPTY_PATH) would need CAP_DAC_READ_SEARCH; the /proc link does not.
    let from = format!("/proc/self/fd/{}", file.as_raw_fd());
    crate::sys::link_following(Path::new(&from), to)
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

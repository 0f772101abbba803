//! Looks objects up relative to an open descriptor of `cas/objects`.
//!
//! Reaching `REPO/cas/objects/ab/cdef…` by its full path walks every component of the
//! repository's path on each `stat`, `open` and `utimensat`; a profile of a 5,000-file
//! `bst artifact pull` had a quarter of the server's CPU in path walks and in atime
//! updates. Relative to a held directory descriptor only the shard and the object name
//! are looked up, and reads open with `O_NOATIME`.
//!
//! The directory may be removed under a running server (`rm -rf cas/objects`, which the
//! BuildStream test-suite does) and recreated by the next upload. A held descriptor would
//! then keep pointing at the removed directory, so a lookup that finds nothing checks
//! whether the directory it used is still linked, and reopens it by path if not.

use super::layout;
use crate::storage::digest::Digest;
use crate::sys;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

pub(crate) struct ObjectsDir {
    path: PathBuf,
    /// `None` while the directory does not exist.
    fd: RwLock<Option<OwnedFd>>,
}

/// `ab/cdef…` and a NUL: the object's name relative to the objects directory.
struct RelName([u8; 66]);

impl RelName {
    fn of(d: &Digest) -> Self {
        RelName(layout::relative_name(d.hash()))
    }

    fn as_cstr(&self) -> &CStr {
        // The hash is validated hex (no NUL), and the buffer ends with one.
        CStr::from_bytes_with_nul(&self.0).expect("a hex name with one trailing NUL")
    }
}

impl ObjectsDir {
    pub(crate) fn open(path: &Path) -> Self {
        ObjectsDir {
            path: path.to_owned(),
            fd: RwLock::new(open_dir(path).ok()),
        }
    }

    /// `fstatat` of the object.
    pub(crate) fn stat(&self, d: &Digest) -> io::Result<libc::stat> {
        let name = RelName::of(d);
        self.at(|dir| sys::stat_at(dir, name.as_cstr()))
    }

    /// Opens the object for reading. `O_NOATIME` because a read that updates atime
    /// dirties the inode (the LRU stamp is mtime, set on purpose by [`touch_file`]);
    /// it is only allowed to the file's owner, so others fall back to a plain open.
    pub(crate) fn open_read(&self, d: &Digest) -> io::Result<File> {
        let name = RelName::of(d);
        self.at(|dir| {
            let flags = libc::O_RDONLY | libc::O_CLOEXEC;
            let open = |flags| sys::open_at(dir, name.as_cstr(), flags);
            match open(flags | libc::O_NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(flags),
                other => other,
            }
        })
    }

    /// Sets the object's mtime (its LRU stamp) to now; see [`touch_file`].
    pub(crate) fn touch(&self, d: &Digest) {
        let name = RelName::of(d);
        let _ = self.at(|dir| sys::touch_at(dir, name.as_cstr()));
    }

    /// Runs `op` on the directory descriptor; when it finds nothing because the
    /// directory it used was removed (or had not been created yet), runs it once more
    /// on the directory now at `path`.
    fn at<T>(&self, op: impl Fn(BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
        let stale = {
            let guard = self.fd.read().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(fd) => match op(fd.as_fd()) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound && is_unlinked(fd) => {
                        fd.as_raw_fd()
                    }
                    done => return done,
                },
                None => -1,
            }
        };
        {
            let mut guard = self.fd.write().unwrap_or_else(|e| e.into_inner());
            // Unless another thread reopened it meanwhile.
            if guard.as_ref().map_or(-1, |fd| fd.as_raw_fd()) == stale {
                *guard = open_dir(&self.path).ok();
            }
        }
        // A descriptor is only closed by replacing it under the write lock: use the
        // current one under the read lock.
        let guard = self.fd.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(fd) => op(fd.as_fd()),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

/// Sets mtime (the LRU stamp, as casd uses it) of an open file to now. Failure is
/// harmless: the blob is still served, it only ages as if it had not been used.
pub(crate) fn touch_file(f: &File) {
    let _ = sys::touch_file(f);
}

/// [`touch_file`] by path.
pub(crate) fn touch_path(path: &Path) {
    let _ = sys::touch_path(path);
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    sys::open_dir_path(path)
}

/// Whether the directory behind `fd` has been removed (or cannot be checked).
fn is_unlinked(fd: &OwnedFd) -> bool {
    sys::link_count(fd.as_fd()).map_or(true, |n| n == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn digest_of(data: &[u8]) -> Digest {
        Digest::of_bytes(data)
    }

    fn store(objects: &Path, d: &Digest, data: &[u8]) {
        let h = d.hash();
        std::fs::create_dir_all(objects.join(&h[..2])).unwrap();
        std::fs::write(objects.join(&h[..2]).join(&h[2..]), data).unwrap();
    }

    #[test]
    fn finds_objects_and_follows_a_recreated_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        std::fs::create_dir(&objects).unwrap();
        let dir = ObjectsDir::open(&objects);
        let a = digest_of(b"a");
        assert_eq!(dir.stat(&a).unwrap_err().kind(), io::ErrorKind::NotFound);
        store(&objects, &a, b"a");
        assert_eq!(dir.stat(&a).unwrap().st_size, 1);
        let mut s = String::new();
        io::Read::read_to_string(&mut dir.open_read(&a).unwrap(), &mut s).unwrap();
        assert_eq!(s, "a");

        // Removed under us: nothing is found, and nothing is invented.
        std::fs::remove_dir_all(&objects).unwrap();
        assert_eq!(
            dir.open_read(&a).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // Recreated by someone else: found through the new directory.
        let b = digest_of(b"bb");
        std::fs::create_dir(&objects).unwrap();
        store(&objects, &b, b"bb");
        assert_eq!(dir.stat(&b).unwrap().st_size, 2);
        assert_eq!(dir.open_read(&b).unwrap().metadata().unwrap().len(), 2);
    }

    /// A stored object `data` whose file is returned opened for writing times.
    fn stored(objects: &Path, data: &[u8]) -> (Digest, PathBuf, File) {
        let d = digest_of(data);
        store(objects, &d, data);
        let path = objects.join(&d.hash()[..2]).join(&d.hash()[2..]);
        let f = File::options().write(true).open(&path).unwrap();
        (d, path, f)
    }

    const OLD: u64 = 1_000_000;

    fn old() -> std::time::SystemTime {
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(OLD)
    }

    #[test]
    fn touch_moves_mtime_forward_and_leaves_atime() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        let (d, path, f) = stored(&objects, b"x");
        let times = std::fs::FileTimes::new().set_accessed(old());
        f.set_times(times.set_modified(old())).unwrap();
        let dir = ObjectsDir::open(&objects);
        dir.touch(&d);
        let m = std::fs::metadata(&path).unwrap();
        assert!(m.mtime() > OLD as i64, "mtime refreshed");
        assert_eq!(m.atime(), OLD as i64, "atime left alone");
        f.set_times(std::fs::FileTimes::new().set_modified(old()))
            .unwrap();
        touch_file(&dir.open_read(&d).unwrap());
        assert!(std::fs::metadata(&path).unwrap().mtime() > OLD as i64);
    }

    #[test]
    fn reads_leave_atime_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        let (d, path, f) = stored(&objects, b"y");
        // atime older than mtime: under relatime a plain read would update it.
        f.set_times(std::fs::FileTimes::new().set_accessed(old()))
            .unwrap();
        let dir = ObjectsDir::open(&objects);
        let mut s = String::new();
        io::Read::read_to_string(&mut dir.open_read(&d).unwrap(), &mut s).unwrap();
        assert_eq!(s, "y");
        assert_eq!(std::fs::metadata(&path).unwrap().atime(), OLD as i64);
    }
}

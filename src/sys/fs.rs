//! File and process system calls the standard library does not offer, as safe functions.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// mtime = now, atime untouched.
const TOUCH: [libc::timespec; 2] = [
    libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    },
    libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW,
    },
];

/// `flock(LOCK_EX)`: blocks until this descriptor holds the exclusive lock, which is
/// released when the file is closed.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor the borrow keeps open.
    check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) })
}

/// `syncfs`: flushes the whole filesystem holding `file`.
pub(crate) fn sync_filesystem(file: &File) -> io::Result<()> {
    // SAFETY: syncfs on a descriptor the borrow keeps open.
    check(unsafe { libc::syncfs(file.as_raw_fd()) })
}

/// Size and free bytes (for unprivileged writers) of the filesystem holding `path`.
pub(crate) fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    let c = c_path(path).ok()?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and an out-parameter of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_blocks as u64 * unit, st.f_bavail as u64 * unit))
}

/// `linkat` of `from` to `to`, following `from` if it is a symbolic link (such as
/// `/proc/self/fd/N`).
pub(crate) fn link_following(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: two valid NUL-terminated paths.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// Whether a process `pid` exists (whether or not we may signal it).
pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Turns `O_DIRECT` on or off for an open file.
pub(crate) fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor the borrow keeps open, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fstatat` of `name` relative to the directory `dir`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; zeroed is a valid value for it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory descriptor, a NUL-terminated name and an out-parameter
    // of the right type.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, 0) })?;
    Ok(st)
}

/// `openat` of `name` relative to the directory `dir`, with `flags`.
pub(crate) fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<File> {
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: openat just returned this descriptor and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Sets the mtime of `name` relative to the directory `dir` to now, leaving atime.
pub(crate) fn touch_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: a valid directory descriptor, a NUL-terminated name and the two timespecs
    // utimensat requires.
    check(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), TOUCH.as_ptr(), 0) })
}

/// Sets the mtime of an open file to now, leaving atime.
pub(crate) fn touch_file(f: &File) -> io::Result<()> {
    // SAFETY: a valid open descriptor and the two timespecs futimens requires.
    check(unsafe { libc::futimens(f.as_raw_fd(), TOUCH.as_ptr()) })
}

/// Sets the mtime of the file at `path` to now, leaving atime.
pub(crate) fn touch_path(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: a valid NUL-terminated path and the two timespecs utimensat requires.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), TOUCH.as_ptr(), 0) })
}

/// Opens `path` as an `O_PATH` directory descriptor (for `*at` lookups).
pub(crate) fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: open just returned this descriptor and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// The link count of whatever `fd` refers to (0 once a directory has been removed).
pub(crate) fn link_count(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: stat is plain old data; zeroed is a valid value for it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and an out-parameter of the right type.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_nlink as u64)
}

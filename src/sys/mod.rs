//! Every raw system call of the crate, behind safe functions: the one place where
//! `unsafe` is allowed (lib.rs denies it elsewhere). Each `unsafe` block says why it is
//! sound.

mod aligned;
mod fs;
mod shared_u64;

pub(crate) use aligned::{AlignedBuf, ALIGN};
pub(crate) use fs::*;
pub(crate) use shared_u64::SharedU64;

/// Raises the soft limit on open files to the hard limit, so that a busy server (every
/// connection, upload and read holds a descriptor) does not run out at the usual soft
/// limit of 1,024. Returns the limits (soft before, soft after), or the error.
pub(crate) fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((before, lim.rlim_cur))
    }
}

/// Gives memory the allocator holds but no longer uses back to the system. After a
/// burst of streams (many buffers freed at once) glibc keeps the freed pages in its
/// arenas; this returns them, so that the resident size follows the load down.
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether the system's user database knows a user `name`.
pub(crate) fn user_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: getpwnam with a valid NUL-terminated string; only the null-ness of the result
    // is used, before any other passwd call could overwrite its static buffer.
    unsafe { !libc::getpwnam(name.as_ptr()).is_null() }
}

/// A user's identity as the kernel checks file access: uid, primary and supplementary
/// groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserIds {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
}

/// Looks a user up in the system's user database (NSS); None if there is no such user.
pub(crate) fn lookup_user(name: &str) -> Option<UserIds> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: passwd is plain old data; getpwnam_r fills it, pointing into `buf`, which
    // outlives every use of it below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated name, buffers of the sizes given.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: as below; a first call that finds more groups than fit says how many.
    if unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) } < 0 {
        groups = vec![0 as libc::gid_t; count.max(256) as usize];
        count = groups.len() as libc::c_int;
    }
    // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many and
    // sets `count` to the number it found.
    let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    groups.truncate(if rc < 0 { 0 } else { count.max(0) as usize });
    if !groups.contains(&gid) {
        groups.push(gid);
    }
    Some(UserIds { uid, gid, groups })
}

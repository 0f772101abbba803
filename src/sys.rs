//! Process-wide system settings that need raw system calls.

/// Raises the soft limit on open files to the hard limit, so that a busy server (every
/// connection, upload and read holds a descriptor) does not run out at the usual soft
/// limit of 1,024. Returns the limits (soft before, soft after), or the error.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
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
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

//! Crash-safe file writes for the certificate tools: everything is written to a temporary
//! file in the destination directory, flushed, and only then put in place, so a reader
//! (including a server reloading `authorized.crt`) sees the old file or the new one,
//! never a mixture, and an error leaves nothing half-written behind.

use anyhow::{bail, Context};
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file to create.
pub struct NewFile {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    /// Exact permission bits (not filtered by the umask).
    pub mode: u32,
}

/// A temporary file that is removed unless it was put in place.
struct Temp {
    path: PathBuf,
    armed: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `contents` to a new temporary file next to `dest`, with exactly `mode`, and
/// flushes it to disk.
fn write_temp(dest: &Path, contents: &[u8], mode: u32) -> anyhow::Result<Temp> {
    let dir = parent_of(dest);
    let name = dest
        .file_name()
        .with_context(|| format!("{} is not a file name", dest.display()))?
        .to_string_lossy();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let path = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), &tag[..8]));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let temp = Temp { path, armed: true };
    // Explicitly, because the mode given to open() is filtered by the umask: a umask of
    // 077 must not make an authorized.crt unreadable to the server's own user.
    file.set_permissions(Permissions::from_mode(mode))
        .and_then(|_| file.write_all(contents))
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", temp.path.display()))?;
    Ok(temp)
}

fn sync_dir(dir: &Path) {
    // Makes the rename durable. Failure is not fatal: the data is already in place for
    // every reader, and some filesystems refuse fsync on directories.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Creates every file in `files` (all in existing directories), or none of them. Without
/// `replace`, an existing file is an error and is never touched, even if it appears while
/// we work (the final step is a hard link, which refuses to overwrite).
pub fn create_files(files: &[NewFile], replace: bool) -> anyhow::Result<()> {
    if !replace {
        for f in files {
            if exists(&f.path) {
                bail!(
                    "{} already exists (use --force to replace it)",
                    f.path.display()
                );
            }
        }
    }
    let mut temps = Vec::new();
    for f in files {
        temps.push(write_temp(&f.path, &f.contents, f.mode)?);
    }
    let mut placed: Vec<&Path> = Vec::new();
    for (f, temp) in files.iter().zip(temps.iter_mut()) {
        let result = if replace {
            std::fs::rename(&temp.path, &f.path)
                .with_context(|| format!("replacing {}", f.path.display()))
        } else {
            place_new(&temp.path, &f.path)
        };
        if let Err(e) = result {
            // Take back what this call created, so the set stays all-or-nothing. (With
            // `replace`, the previous versions are gone already; renames within one
            // directory practically cannot fail after the writes succeeded.)
            if !replace {
                for p in &placed {
                    let _ = std::fs::remove_file(p);
                }
            }
            return Err(e);
        }
        // A hard link leaves the temporary name behind (remove it on drop); a rename
        // consumed it.
        temp.armed = !replace;
        placed.push(&f.path);
    }
    drop(temps);
    for f in files {
        sync_dir(parent_of(&f.path));
    }
    Ok(())
}

/// Puts `temp` at `dest` unless `dest` exists.
fn place_new(temp: &Path, dest: &Path) -> anyhow::Result<()> {
    match std::fs::hard_link(temp, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} already exists (use --force to replace it)",
            dest.display()
        ),
        // Filesystems without hard links: check, then rename (a tiny race remains).
        Err(_) if !exists(dest) => {
            std::fs::rename(temp, dest).with_context(|| format!("creating {}", dest.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", dest.display())),
    }
}

/// Atomically replaces (or creates) `path` with `contents`. An existing file keeps its
/// permissions and, where we are allowed to set it, its owner; a symlink is followed and
/// its target replaced, so a linked configuration stays linked.
pub fn replace_file(path: &Path, contents: &[u8], default_mode: u32) -> anyhow::Result<()> {
    let target = match std::fs::canonicalize(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("resolving {}", path.display())),
    };
    let old = std::fs::metadata(&target).ok();
    let mode = old.as_ref().map_or(default_mode, |m| m.mode() & 0o7777);
    let mut temp = write_temp(&target, contents, mode)?;
    if let Some(m) = &old {
        // Keep the owner so a root-run tool does not leave the server's user unable to
        // read its own file. Only root may chown to another user; otherwise this fails
        // and the file simply belongs to whoever ran the tool.
        let _ = std::os::unix::fs::chown(&temp.path, Some(m.uid()), Some(m.gid()));
    }
    std::fs::rename(&temp.path, &target)
        .with_context(|| format!("replacing {}", target.display()))?;
    temp.armed = false;
    sync_dir(parent_of(&target));
    Ok(())
}

/// An exclusive advisory lock on a directory, released on drop. Serialises concurrent
/// read-modify-write runs of the tools on one `authorized.crt`: locking the file itself
/// would not work, since each run replaces it with a new inode.
pub struct DirLock {
    _file: File,
}

pub fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let file = File::open(dir).with_context(|| format!("opening directory {}", dir.display()))?;
    crate::sys::lock_exclusive(&file)
        .with_context(|| format!("locking directory {}", dir.display()))?;
    Ok(DirLock { _file: file })
}

/// The directory holding `path` (`.` for a bare file name).
pub fn dir_of(path: &Path) -> &Path {
    parent_of(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_refuses_to_overwrite_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&b, "old").unwrap();
        let files = [
            NewFile {
                path: a.clone(),
                contents: b"new a".to_vec(),
                mode: 0o600,
            },
            NewFile {
                path: b.clone(),
                contents: b"new b".to_vec(),
                mode: 0o644,
            },
        ];
        let err = create_files(&files, false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(!a.exists());
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        create_files(&files, true).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new b");
        let mode = std::fs::metadata(&a).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn replace_keeps_mode_and_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, "x").unwrap();
        std::fs::set_permissions(&real, Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        replace_file(&link, b"y", 0o644).unwrap();
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "y");
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o777, 0o640);
    }
}

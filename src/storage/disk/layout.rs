//! The one place that knows buildbox-casd's repository layout: where the object store's
//! files are, and the shard rule that names an object `<2 hex>/<62 hex>` after its hash.
//! The asset index uses the same rule for its entries (keyed by a SHA-256 too).

use std::path::{Path, PathBuf};

/// Hex digits of a hash that name its shard directory.
const SHARD_LEN: usize = 2;
/// Hex digits of a SHA-256.
const HASH_LEN: usize = 64;

/// The files of the object store under a repository.
#[derive(Clone, Debug)]
pub(crate) struct CasPaths {
    /// `REPO/cas/objects`: the shard directories.
    pub(crate) objects: PathBuf,
    /// `REPO/cas/tmp`: named upload temporaries (where anonymous ones are unavailable).
    pub(crate) tmp: PathBuf,
    /// `REPO/cas/quarantine`: damaged objects moved aside.
    pub(crate) quarantine: PathBuf,
    /// `REPO/cas/evict.lock`: one evictor across processes.
    pub(crate) evict_lock: PathBuf,
    /// `REPO/cas/usage`: the shared byte counter.
    pub(crate) usage: PathBuf,
}

impl CasPaths {
    pub(crate) fn of(repo: &Path) -> Self {
        let cas = repo.join("cas");
        CasPaths {
            objects: cas.join("objects"),
            tmp: cas.join("tmp"),
            quarantine: cas.join("quarantine"),
            evict_lock: cas.join("evict.lock"),
            usage: cas.join("usage"),
        }
    }
}

/// The shard directory name of a hex hash.
pub(crate) fn shard_of(hash: &str) -> &str {
    &hash[..SHARD_LEN]
}

/// `dir/<shard>/<rest>`: where the file named by `hash` lives under `dir`.
pub(crate) fn sharded_path(dir: &Path, hash: &str) -> PathBuf {
    dir.join(shard_of(hash)).join(&hash[SHARD_LEN..])
}

/// `<shard>/<rest>` and a NUL, for lookups relative to an open `objects` directory.
pub(crate) fn relative_name(hash: &str) -> [u8; HASH_LEN + 2] {
    let h = hash.as_bytes();
    let mut b = [0u8; HASH_LEN + 2];
    b[..SHARD_LEN].copy_from_slice(&h[..SHARD_LEN]);
    b[SHARD_LEN] = b'/';
    b[SHARD_LEN + 1..HASH_LEN + 1].copy_from_slice(&h[SHARD_LEN..HASH_LEN]);
    b
}

/// Whether `name` can be a shard directory.
pub(crate) fn is_shard(name: &str) -> bool {
    name.len() == SHARD_LEN && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` can be an object's file name within its shard.
pub(crate) fn is_object(name: &str) -> bool {
    name.len() == HASH_LEN - SHARD_LEN && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The hash an object file's path names (the inverse of [`sharded_path`]), if it does.
pub(crate) fn hash_of_path(path: &Path) -> Option<String> {
    let rest = path.file_name()?.to_str()?;
    let shard = path.parent()?.file_name()?.to_str()?;
    (is_shard(shard) && is_object(rest)).then(|| format!("{shard}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_parses_object_paths() {
        let hash = "ab".to_owned() + &"c".repeat(62);
        let p = sharded_path(Path::new("/r/cas/objects"), &hash);
        assert_eq!(p, Path::new("/r/cas/objects/ab").join("c".repeat(62)));
        assert_eq!(hash_of_path(&p).as_deref(), Some(hash.as_str()));
        assert_eq!(hash_of_path(Path::new("/r/cas/objects/ab/cd")), None);
        let rel = relative_name(&hash);
        assert_eq!(&rel[..3], b"ab/");
        assert_eq!(rel[65], 0);
    }
}

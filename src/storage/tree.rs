//! Walking `Directory` trees stored in the CAS: completeness checks for asset integrity
//! and the breadth-first listing behind GetTree.

use super::cas::{CasError, CasStore};
use super::digest::{Digest, DigestError};
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use prost::Message;
use std::collections::{HashSet, VecDeque};

/// Directory blobs larger than this are refused rather than decoded (a real Directory
/// with tens of thousands of entries is a few MiB).
const MAX_DIRECTORY_BLOB: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("blob {digest} is not a valid Directory message: {reason}")]
    NotADirectory { digest: Digest, reason: String },
    #[error("directory {parent} names an invalid digest: {source}")]
    BadChild {
        parent: Digest,
        #[source]
        source: DigestError,
    },
    #[error(transparent)]
    Cas(#[from] CasError),
}

/// Reads and decodes one Directory; `None` when the blob is absent.
pub fn read_directory(cas: &CasStore, d: &Digest) -> Result<Option<reapi::Directory>, TreeError> {
    if d.size() > MAX_DIRECTORY_BLOB {
        return Err(TreeError::NotADirectory {
            digest: d.clone(),
            reason: format!("{} bytes is larger than any Directory we accept", d.size()),
        });
    }
    let Some(bytes) = cas.read_all(d)? else {
        return Ok(None);
    };
    reapi::Directory::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| TreeError::NotADirectory {
            digest: d.clone(),
            reason: e.to_string(),
        })
}

fn children(
    parent: &Digest,
    dir: &reapi::Directory,
) -> Result<(Vec<Digest>, Vec<Digest>), TreeError> {
    let bad = |source| TreeError::BadChild {
        parent: parent.clone(),
        source,
    };
    let files = dir
        .files
        .iter()
        .map(|f| Digest::from_proto(f.digest.as_ref()).map_err(bad))
        .collect::<Result<_, _>>()?;
    let dirs = dir
        .directories
        .iter()
        .map(|n| Digest::from_proto(n.digest.as_ref()).map_err(bad))
        .collect::<Result<_, _>>()?;
    Ok((files, dirs))
}

/// Checks that `root` and everything below it is present, refreshing each object's LRU
/// stamp on the way. Returns the first missing digest, if any.
pub fn first_missing_in_tree(cas: &CasStore, root: &Digest) -> Result<Option<Digest>, TreeError> {
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut queue = VecDeque::from([root.clone()]);
    while let Some(d) = queue.pop_front() {
        if !seen_dirs.insert(d.clone()) {
            continue;
        }
        let Some(dir) = read_directory(cas, &d)? else {
            return Ok(Some(d));
        };
        let (files, dirs) = children(&d, &dir)?;
        for f in files {
            if seen_files.insert(f.clone()) && !cas.contains(&f) {
                return Ok(Some(f));
            }
        }
        queue.extend(dirs);
    }
    Ok(None)
}

/// One page of the breadth-first, de-duplicated listing of the tree under `root`,
/// skipping `skip` directories. Missing subtrees are left out, as REAPI allows.
/// Returns the page and whether more directories follow. `None` if the root is absent.
pub fn tree_page(
    cas: &CasStore,
    root: &Digest,
    skip: usize,
    max: usize,
) -> Result<Option<(Vec<reapi::Directory>, bool)>, TreeError> {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([root.clone()]);
    let mut index = 0usize;
    let mut page = Vec::new();
    while let Some(d) = queue.pop_front() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Some(dir) = read_directory(cas, &d)? else {
            if index == 0 {
                return Ok(None);
            }
            continue;
        };
        if page.len() == max {
            return Ok(Some((page, true)));
        }
        let (_, dirs) = children(&d, &dir)?;
        queue.extend(dirs);
        if index >= skip {
            page.push(dir);
        }
        index += 1;
    }
    Ok(Some((page, false)))
}

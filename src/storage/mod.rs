//! The storage layer: the blob store (CAS), the asset index and the rules that tie them
//! together (an asset is only as good as the content it references).

pub mod asset;
pub mod cas;
pub mod digest;
pub mod disk;
pub mod policy;
pub mod tree;

// The storage contract (issue 15, docs/adr/0009): proven by the conformance suite against
// both stores; the protocol adapters move onto it next, which is when its items get their
// first callers outside the tests.
#[allow(dead_code)]
pub mod blob_store;
#[cfg(test)]
mod conformance;
#[allow(dead_code)]
pub mod disk_store;
#[allow(dead_code)]
pub mod memory;
#[allow(dead_code)]
pub mod store_error;

pub(crate) use disk::direct;

use asset::{AssetEntry, AssetKind};
use cas::CasStore;
use digest::Digest;
use tree::TreeError;

/// Finds the first piece of an asset's closure that is absent: the blob (or directory
/// tree) itself, every referenced blob and every referenced directory tree. Every present
/// object on the way gets its LRU stamp refreshed, so a frequently fetched asset keeps its
/// whole closure alive.
pub fn first_missing_in_closure(
    cas: &CasStore,
    kind: AssetKind,
    digest: &Digest,
    references_blobs: &[Digest],
    references_directories: &[Digest],
) -> Result<Option<Digest>, TreeError> {
    match kind {
        AssetKind::Blob => {
            if !cas.contains(digest) {
                return Ok(Some(digest.clone()));
            }
        }
        AssetKind::Directory => {
            if let Some(missing) = tree::first_missing_in_tree(cas, digest)? {
                return Ok(Some(missing));
            }
        }
    }
    for b in references_blobs {
        if !cas.contains(b) {
            return Ok(Some(b.clone()));
        }
    }
    for d in references_directories {
        if let Some(missing) = tree::first_missing_in_tree(cas, d)? {
            return Ok(Some(missing));
        }
    }
    Ok(None)
}

/// [`first_missing_in_closure`] for a stored entry.
pub fn entry_missing_content(
    cas: &CasStore,
    kind: AssetKind,
    entry: &AssetEntry,
) -> Result<Option<Digest>, TreeError> {
    first_missing_in_closure(
        cas,
        kind,
        &entry.digest,
        &entry.references_blobs,
        &entry.references_directories,
    )
}

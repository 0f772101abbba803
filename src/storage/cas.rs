//! The blob store's public names at their historical path; the engine itself is in
//! [`super::disk`].

pub(crate) use super::disk::{
    filesystem_space, BlobReader, BlobWriter, CasError, CasStore, QuotaPolicy,
};

//! The content-addressed store as the protocol adapters see it: one small async interface
//! that every backend (the disk engine, memory, and later an object store) and every
//! decorator implements, so that `Arc<dyn BlobStore>` layers stack as Buildbarn's blob
//! access decorators do (docs/adr/0009-storage-interfaces.md).
//!
//! Five methods, two of them with defaults. Engine operations (eviction, gc, verify,
//! stats, quarantine) are not here: they stay inherent on the disk engine, used by the
//! admin tools and the server's composition only.

use super::digest::Digest;
use super::store_error::StoreError;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;

/// Half-open byte range of a blob, already clamped to its size by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    /// The whole of `digest`'s blob.
    pub fn whole(digest: &Digest) -> Self {
        ByteRange {
            start: 0,
            end: digest.size(),
        }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A blob being read: its pieces in order. A whole-blob read that fails verification ends
/// with `Err(StoreError::Corrupt)` in place of its last piece, so a client never receives
/// all of a damaged blob (ADR 0001/0004).
pub struct BlobRead {
    pub len: u64,
    pub pieces: BoxStream<'static, Result<Bytes, StoreError>>,
}

/// An upload in progress. Dropping it without [`BlobSink::commit`] discards everything.
#[tonic::async_trait]
pub trait BlobSink: Send {
    /// Appends `data`. The store may hold `data` until it is hashed and written; dropping
    /// the last clone is how a buffer pool gets its buffer back.
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError>;

    /// Checks size and SHA-256 and makes the blob visible. An identical upload that
    /// raced with this one and won is a success.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The content-addressed store. Present blobs that are looked at count as used (LRU).
#[tonic::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// For logs and metric labels: "disk", "memory".
    fn name(&self) -> &str;

    /// The absent digests, in request order. The empty blob is always present.
    async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, StoreError>;

    /// `None` when absent.
    async fn read(&self, digest: &Digest, range: ByteRange)
        -> Result<Option<BlobRead>, StoreError>;

    /// Starts an upload; quota and reservation happen here, so that a blob that cannot be
    /// stored is refused before its data is sent.
    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError>;

    /// A whole small blob (batch reads, Directory messages).
    async fn read_all(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        let Some(mut read) = self.read(digest, ByteRange::whole(digest)).await? else {
            return Ok(None);
        };
        let mut out = BytesMut::with_capacity(read.len as usize);
        while let Some(piece) = read.pieces.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(Some(out.freeze()))
    }

    /// A whole small blob (batch uploads).
    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        let mut sink = self.write(digest).await?;
        sink.write(data).await?;
        sink.commit().await
    }
}

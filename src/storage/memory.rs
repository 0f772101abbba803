//! A store in memory: for tests (the contract suite runs against it) and for small
//! throw-away caches. Blobs are verified on commit like on disk; nothing is evicted.

use super::blob_store::{BlobRead, BlobSink, BlobStore, ByteRange};
use super::digest::Digest;
use super::store_error::StoreError;
use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Default)]
pub struct MemoryStore {
    blobs: Arc<RwLock<HashMap<Digest, Bytes>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, digest: &Digest) -> Option<Bytes> {
        if digest.is_empty_blob() {
            return Some(Bytes::new());
        }
        self.blobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }
}

#[tonic::async_trait]
impl BlobStore for MemoryStore {
    fn name(&self) -> &str {
        "memory"
    }

    async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, StoreError> {
        Ok(digests
            .into_iter()
            .filter(|d| self.get(d).is_none())
            .collect())
    }

    async fn read(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<Option<BlobRead>, StoreError> {
        Ok(self.get(digest).map(|data| {
            let end = range.end.min(data.len() as u64) as usize;
            let start = (range.start as usize).min(end);
            let piece = data.slice(start..end);
            BlobRead {
                len: piece.len() as u64,
                pieces: Box::pin(futures::stream::iter(
                    (!piece.is_empty()).then_some(Ok(piece)),
                )),
            }
        }))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        Ok(Box::new(MemorySink {
            digest: digest.clone(),
            data: BytesMut::new(),
            blobs: self.blobs.clone(),
        }))
    }
}

struct MemorySink {
    digest: Digest,
    data: BytesMut,
    blobs: Arc<RwLock<HashMap<Digest, Bytes>>>,
}

#[tonic::async_trait]
impl BlobSink for MemorySink {
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        let after = self.data.len() as u64 + data.len() as u64;
        if after > self.digest.size() {
            return Err(StoreError::Mismatch(format!(
                "upload of {} overruns its size: {after} bytes received",
                self.digest
            )));
        }
        self.data.extend_from_slice(&data);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        if self.data.len() as u64 != self.digest.size() {
            return Err(StoreError::Mismatch(format!(
                "upload of {} ended after {} bytes",
                self.digest,
                self.data.len()
            )));
        }
        let actual = hex::encode(Sha256::digest(&self.data));
        if actual != self.digest.hash() {
            return Err(StoreError::Mismatch(format!(
                "uploaded data hashes to {actual}, not {}",
                self.digest.hash()
            )));
        }
        self.blobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.digest, self.data.freeze());
        Ok(())
    }
}

//! The disk engine ([`CasStore`]) behind the [`BlobStore`] interface. The engine's calls
//! block (file system), so each runs on a short blocking task here; the engine keeps its
//! own design (verified reads, reservations, direct I/O) and its inherent API for the
//! admin tools.

use super::blob_store::{BlobRead, BlobSink, BlobStore, ByteRange};
use super::cas::{BlobReader, BlobWriter, CasError, CasStore};
use super::digest::Digest;
use super::store_error::StoreError;
use bytes::Bytes;
use std::sync::Arc;

/// Bytes per piece of a streamed read.
const READ_PIECE: u64 = 256 << 10;

#[derive(Clone)]
pub struct DiskStore {
    engine: Arc<CasStore>,
}

impl DiskStore {
    pub fn new(engine: Arc<CasStore>) -> Self {
        DiskStore { engine }
    }

    /// The engine, for the operations that are not storage-neutral (eviction, stats).
    pub fn engine(&self) -> &Arc<CasStore> {
        &self.engine
    }
}

impl From<CasError> for StoreError {
    fn from(e: CasError) -> Self {
        let out_of_space = e.is_out_of_space();
        match e {
            CasError::HashMismatch { .. }
            | CasError::SizeMismatch { .. }
            | CasError::Overrun { .. } => StoreError::Mismatch(e.to_string()),
            CasError::TooLarge { .. } | CasError::NoSpace { .. } => {
                StoreError::NoSpace(e.to_string())
            }
            CasError::Corrupt { digest, reason } => StoreError::Corrupt { digest, reason },
            CasError::Io { .. } if out_of_space => {
                StoreError::NoSpace(format!("the server's storage is full: {e}"))
            }
            CasError::Io { context, source } => StoreError::Io { context, source },
        }
    }
}

/// Runs engine work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CasError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::io("storage task", std::io::Error::other(e.to_string())))?
        .map_err(StoreError::from)
}

#[tonic::async_trait]
impl BlobStore for DiskStore {
    fn name(&self) -> &str {
        "disk"
    }

    async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>, StoreError> {
        let engine = self.engine.clone();
        blocking(move || Ok(engine.find_missing(digests))).await
    }

    async fn read(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<Option<BlobRead>, StoreError> {
        let engine = self.engine.clone();
        let d = digest.clone();
        let reader = blocking(move || engine.open_reader(&d, range.start, range.end)).await?;
        Ok(reader.map(|reader| BlobRead {
            len: range.len(),
            pieces: Box::pin(pieces(self.engine.clone(), reader)),
        }))
    }

    async fn write(&self, digest: &Digest) -> Result<Box<dyn BlobSink>, StoreError> {
        let engine = self.engine.clone();
        let d = digest.clone();
        let writer = blocking(move || engine.begin_write(d)).await?;
        Ok(Box::new(DiskSink {
            writer: Some(writer),
        }))
    }

    async fn read_all(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        let engine = self.engine.clone();
        let d = digest.clone();
        Ok(blocking(move || engine.read_all(&d))
            .await?
            .map(Bytes::from))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<(), StoreError> {
        let engine = self.engine.clone();
        let d = digest.clone();
        blocking(move || engine.put(&d, &data)).await
    }
}

/// The reader's pieces, each read by a short blocking task when the consumer asks for it.
fn pieces(
    engine: Arc<CasStore>,
    reader: BlobReader,
) -> impl futures::Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    futures::stream::unfold(Some(reader), move |reader| {
        let engine = engine.clone();
        async move {
            let mut reader = reader?;
            let read = tokio::task::spawn_blocking(move || {
                let piece = reader.next_chunk(READ_PIECE, &engine);
                (reader, piece)
            })
            .await;
            match read {
                Ok((reader, Ok(Some(piece)))) => Some((Ok(piece), Some(reader))),
                Ok((_, Ok(None))) => None,
                Ok((_, Err(e))) => Some((Err(e.into()), None)),
                Err(e) => Some((
                    Err(StoreError::io(
                        "read task",
                        std::io::Error::other(e.to_string()),
                    )),
                    None,
                )),
            }
        }
    })
}

struct DiskSink {
    /// Out only while a blocking task has it.
    writer: Option<BlobWriter>,
}

#[tonic::async_trait]
impl BlobSink for DiskSink {
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| StoreError::io("upload", std::io::Error::other("a write failed")))?;
        self.writer = Some(
            blocking(move || {
                writer.write_bytes(data)?;
                Ok(writer)
            })
            .await?,
        );
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| StoreError::io("upload", std::io::Error::other("a write failed")))?;
        blocking(move || writer.commit()).await
    }
}

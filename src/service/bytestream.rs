//! google.bytestream.ByteStream over the CAS: streaming reads and writes of blobs of
//! any size with memory bounded by the chunk size.
//!
//! Status codes (see docs/protocol.md):
//! - malformed names, unknown instances, data that contradicts the digest in the name
//!   (wrong hash, too few or too many bytes): INVALID_ARGUMENT;
//! - a stream that breaks the write protocol (wrong `write_offset`, a changed
//!   `resource_name`, no `finish_write`): FAILED_PRECONDITION;
//! - `read_offset`/`read_limit` outside the blob: OUT_OF_RANGE.

use super::resource_name::{parse_read, parse_write};
use super::{blocking, cas_status, push_disabled, ServiceConfig};
use crate::storage::cas::{BlobWriter, CasStore};
use bazel_remote_apis::google::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status, Streaming};

/// Bytes per ReadResponse: within the 1-2 MiB that casd and Bazel expect.
pub const READ_CHUNK: u64 = 1024 * 1024;

pub struct ByteStreamService {
    pub store: Arc<CasStore>,
    pub config: ServiceConfig,
    /// Uploads in progress by resource name, with the bytes received so far.
    uploads: Arc<Mutex<HashMap<String, u64>>>,
}

impl ByteStreamService {
    pub fn new(store: Arc<CasStore>, config: ServiceConfig) -> Self {
        ByteStreamService {
            store,
            config,
            uploads: Default::default(),
        }
    }
}

/// Keeps the upload table honest however the stream ends.
struct UploadGuard {
    uploads: Arc<Mutex<HashMap<String, u64>>>,
    name: String,
}

impl UploadGuard {
    fn progress(&self, bytes: u64) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.name.clone(), bytes);
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

async fn write_chunk(mut writer: BlobWriter, data: Vec<u8>) -> Result<BlobWriter, Status> {
    blocking(move || {
        writer.write(&data).map_err(cas_status)?;
        Ok(writer)
    })
    .await
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let req = request.into_inner();
        let name = parse_read(&req.resource_name)?;
        self.config.instances.check(&name.instance)?;
        let digest = name.digest;
        if req.read_offset < 0 {
            return Err(Status::out_of_range("read_offset must not be negative"));
        }
        if req.read_limit < 0 {
            return Err(Status::out_of_range("read_limit must not be negative"));
        }
        let offset = req.read_offset as u64;
        if offset > digest.size() {
            return Err(Status::out_of_range(format!(
                "read_offset {offset} is past the end of blob {digest}"
            )));
        }
        let end = match req.read_limit as u64 {
            0 => digest.size(),
            limit => digest.size().min(offset.saturating_add(limit)),
        };
        let store = self.store.clone();
        let d = digest.clone();
        let reader =
            blocking(move || store.open_reader(&d, offset, end).map_err(cas_status)).await?;
        let Some(mut reader) = reader else {
            return Err(Status::not_found(format!("blob {digest} not found")));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let store = self.store.clone();
        tokio::spawn(async move {
            loop {
                let store = store.clone();
                let step = blocking(move || {
                    let chunk = reader.next_chunk(READ_CHUNK, &store).map_err(cas_status)?;
                    Ok((reader, chunk))
                })
                .await;
                match step {
                    Ok((r, Some(data))) => {
                        reader = r;
                        if tx.send(Ok(ReadResponse { data })).await.is_err() {
                            return;
                        }
                    }
                    Ok((_, None)) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        if !self.config.allow_push {
            return Err(push_disabled());
        }
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("Write stream carried no request"));
        };
        let resource = first.resource_name.clone();
        let name = parse_write(&resource)?;
        self.config.instances.check(&name.instance)?;
        let digest = name.digest;
        let guard = UploadGuard {
            uploads: self.uploads.clone(),
            name: resource.clone(),
        };
        guard.progress(0);
        let store = self.store.clone();
        let d = digest.clone();
        let mut writer = blocking(move || store.begin_write(d).map_err(cas_status)).await?;
        let mut msg = first;
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != resource {
                return Err(Status::failed_precondition(
                    "resource_name changed in the middle of a Write stream",
                ));
            }
            if msg.write_offset != writer.written() as i64 {
                return Err(Status::failed_precondition(format!(
                    "write_offset {} does not match the {} bytes received so far",
                    msg.write_offset,
                    writer.written()
                )));
            }
            if !msg.data.is_empty() {
                writer = write_chunk(writer, msg.data).await?;
                guard.progress(writer.written());
            }
            if msg.finish_write {
                break;
            }
            msg = match stream.message().await? {
                Some(m) => m,
                None => {
                    return Err(Status::failed_precondition(format!(
                        "Write stream for {digest} ended after {} bytes without finish_write",
                        writer.written()
                    )))
                }
            };
        }
        blocking(move || writer.commit().map_err(cas_status)).await?;
        Ok(Response::new(WriteResponse {
            committed_size: digest.size() as i64,
        }))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let req = request.into_inner();
        let name = parse_write(&req.resource_name)?;
        self.config.instances.check(&name.instance)?;
        let store = self.store.clone();
        let d = name.digest.clone();
        if blocking(move || Ok(store.contains(&d))).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: name.digest.size() as i64,
                complete: true,
            }));
        }
        let progress = self
            .uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&req.resource_name)
            .copied();
        match progress {
            Some(bytes) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: bytes as i64,
                complete: false,
            })),
            None => Err(Status::not_found(format!(
                "no upload in progress for {:?} and the blob is not stored",
                crate::storage::digest::truncate_for_message(&req.resource_name)
            ))),
        }
    }
}

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
use crate::storage::cas::{CasError, CasStore};
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

/// Received chunks an upload may queue for storing, on top of the one being stored.
const WRITE_QUEUE: usize = 1;

/// Upload data received but not yet written and hashed, across all uploads. An upload
/// that would pass it stops reading its stream (HTTP/2 flow control then holds the
/// client back), so memory stays bounded however many clients upload at once.
pub const UPLOAD_BUFFER_BUDGET: usize = 16 << 20;

/// How long an upload may hold budget for a message its client has not sent yet.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_millis(50);

/// Units of [`UPLOAD_BUFFER_BUDGET`] accounting.
const BUDGET_UNIT: usize = 1024;

/// Budget reserved for an upload's first message, before its size is known: the chunk
/// size buildbox-casd uses.
const FIRST_MESSAGE_ESTIMATE: usize = 2 << 20;

async fn acquire_budget(
    budget: &Arc<tokio::sync::Semaphore>,
    bytes: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
    budget
        .clone()
        .acquire_many_owned(budget_units(bytes))
        .await
        .map_err(|_| Status::unavailable("the server is shutting down"))
}

/// Reads the next message of an upload holding `reserved` (budget for it, reserved
/// before reading so that a waiting upload leaves its data in the client). A client that
/// sends nothing for [`IDLE_RELEASE`] gives the reservation back meanwhile, so idle
/// clients cannot starve busy ones.
async fn next_message(
    stream: &mut Streaming<WriteRequest>,
    reserved: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Option<WriteRequest>, Status> {
    match tokio::time::timeout(IDLE_RELEASE, stream.message()).await {
        Ok(next) => next,
        Err(_) => {
            *reserved = None;
            stream.message().await
        }
    }
}

fn budget_units(bytes: usize) -> u32 {
    bytes
        .div_ceil(BUDGET_UNIT)
        .min(UPLOAD_BUFFER_BUDGET / BUDGET_UNIT) as u32
}

pub struct ByteStreamService {
    pub store: Arc<CasStore>,
    pub config: ServiceConfig,
    /// Uploads in progress by resource name, with the bytes received so far.
    uploads: Arc<Mutex<HashMap<String, u64>>>,
    /// See [`UPLOAD_BUFFER_BUDGET`].
    budget: Arc<tokio::sync::Semaphore>,
}

impl ByteStreamService {
    pub fn new(store: Arc<CasStore>, config: ServiceConfig) -> Self {
        ByteStreamService {
            store,
            config,
            uploads: Default::default(),
            budget: Arc::new(tokio::sync::Semaphore::new(
                UPLOAD_BUFFER_BUDGET / BUDGET_UNIT,
            )),
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
        // One blocking thread reads the whole range, a short queue ahead of the sender.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || loop {
            match reader.next_chunk(READ_CHUNK, &store).map_err(cas_status) {
                Ok(Some(data)) => {
                    if tx.blocking_send(Ok(ReadResponse { data })).is_err() {
                        return; // the client went away
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = tx.blocking_send(Err(status));
                    return;
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
        let budget = self.budget.clone();
        let mut reserved = Some(acquire_budget(&budget, FIRST_MESSAGE_ESTIMATE).await?);
        let Some(first) = next_message(&mut stream, &mut reserved).await? else {
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
        let writer = blocking(move || store.begin_write(d).map_err(cas_status)).await?;
        // Receiving the next message overlaps with storing the previous one: the storage
        // side runs on its own blocking thread, fed through a short queue. Each chunk
        // carries its share of the upload budget until it has been hashed.
        type Budgeted = (bytes::Bytes, Option<tokio::sync::OwnedSemaphorePermit>);
        let (chunks, mut queued) = tokio::sync::mpsc::channel::<Budgeted>(WRITE_QUEUE);
        let storing = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            while let Some((chunk, permit)) = queued.blocking_recv() {
                writer
                    .write_bytes(chunk, Box::new(permit))
                    .map_err(cas_status)?;
            }
            Ok::<_, Status>(writer)
        });
        let mut received = 0u64;
        let mut msg = first;
        let outcome: Result<(), Status> = loop {
            if !msg.resource_name.is_empty() && msg.resource_name != resource {
                break Err(Status::failed_precondition(
                    "resource_name changed in the middle of a Write stream",
                ));
            }
            if msg.write_offset != received as i64 {
                break Err(Status::failed_precondition(format!(
                    "write_offset {} does not match the {received} bytes received so far",
                    msg.write_offset,
                )));
            }
            if !msg.data.is_empty() {
                received += msg.data.len() as u64;
                if received > digest.size() {
                    break Err(cas_status(CasError::Overrun {
                        expected: digest.size(),
                        actual: received,
                    }));
                }
                let size = msg.data.len();
                let held = reserved.as_ref().map_or(0, |p| p.num_permits());
                if budget_units(size) as usize > held {
                    // Never wait holding part of the budget: two uploads doing that
                    // could each hold what the other waits for.
                    drop(reserved.take());
                    reserved = match acquire_budget(&budget, size).await {
                        Ok(p) => Some(p),
                        Err(e) => break Err(e),
                    };
                }
                if chunks
                    .send((msg.data.into(), reserved.take()))
                    .await
                    .is_err()
                {
                    // The storing side stopped on an error, reported below.
                    break Ok(());
                }
                if !msg.finish_write {
                    // Budget for the next message, sized like this one.
                    reserved = match acquire_budget(&budget, size).await {
                        Ok(p) => Some(p),
                        Err(e) => break Err(e),
                    };
                }
                guard.progress(received);
            }
            if msg.finish_write {
                break Ok(());
            }
            msg = match next_message(&mut stream, &mut reserved).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    break Err(Status::failed_precondition(format!(
                    "Write stream for {digest} ended after {received} bytes without finish_write"
                )))
                }
                Err(e) => break Err(e),
            };
        };
        drop(chunks);
        let stored = storing
            .await
            .map_err(|e| Status::internal(format!("storage task failed: {e}")))?;
        outcome?;
        let writer = stored?;
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

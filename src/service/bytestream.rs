//! google.bytestream.ByteStream over the CAS: streaming reads and writes of blobs of
//! any size with memory bounded by the chunk size.
//!
//! Status codes (see docs/protocol.md):
//! - malformed names, unknown instances, data that contradicts the digest in the name
//!   (wrong hash, too few or too many bytes): INVALID_ARGUMENT;
//! - a stream that breaks the write protocol (wrong `write_offset`, a rewind included, a
//!   changed `resource_name`, no `finish_write`, anything after `finish_write`):
//!   FAILED_PRECONDITION;
//! - `read_offset`/`read_limit` outside the blob: OUT_OF_RANGE.

use super::grpc_http::{
    body_response, check_encoding, status_response, unary_request, unary_response, HttpRequest,
    HttpResponse,
};
use super::read_body::ReadBody;
use super::resource_name::{parse_read, parse_write};
use super::upload_buffers::{Filling, UploadBuffers, BUFFERS};
use super::write_decoder::{DecodeError, Event, WriteDecoder};
use super::{blocking, cas_status, push_disabled, ServiceConfig, MAX_MESSAGE_BYTES};
use crate::client_limit::ClientSlot;
use crate::storage::cas::{BlobWriter, CasError, CasStore};
use crate::storage::digest::Digest;
use bazel_remote_apis::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, WriteResponse,
};
use bytes::Bytes;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tonic::body::Body;
use tonic::Status;

/// How long an upload's storing thread waits for the next buffer before it is given back.
const STORE_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Filled buffers an upload may queue for storing, on top of the one being stored.
const WRITE_QUEUE: usize = 1;

/// How long an upload may keep a buffer it is filling: then what the buffer holds is
/// stored as it is and the buffer goes back to the shared set. A fast client fills one
/// in about a millisecond; a slow or stalled one cannot keep a buffer from the others.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_millis(50);

/// How long the request body may take to end after the message with `finish_write`.
/// Clients half-close with or right after that message, so this is no delay for them;
/// it bounds the wait for one that keeps its side open until it has the response.
const FINISH_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

const SERVICE: &str = "google.bytestream.ByteStream";

pub struct ByteStreamService {
    pub store: Arc<CasStore>,
    pub config: ServiceConfig,
    /// Uploads in progress by resource name, with the bytes received so far.
    uploads: Arc<Mutex<HashMap<String, u64>>>,
    /// Memory for upload data, shared by all uploads.
    buffers: Arc<UploadBuffers>,
}

impl ByteStreamService {
    pub fn new(store: Arc<CasStore>, config: ServiceConfig) -> Self {
        ByteStreamService {
            store,
            config,
            uploads: Default::default(),
            buffers: UploadBuffers::new(BUFFERS),
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

/// The service as tonic's router sees it: ByteStream's three methods, served from raw
/// HTTP/2 requests (see [`super::grpc_http`]).
#[derive(Clone)]
pub struct ByteStreamServer(Arc<ByteStreamService>);

impl ByteStreamServer {
    pub fn new(service: ByteStreamService) -> Self {
        ByteStreamServer(Arc::new(service))
    }
}

impl tonic::server::NamedService for ByteStreamServer {
    const NAME: &'static str = SERVICE;
}

impl tonic::codegen::Service<HttpRequest> for ByteStreamServer {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<HttpResponse, Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let method = req
                .uri()
                .path()
                .strip_prefix("/google.bytestream.ByteStream/")
                .unwrap_or_default()
                .to_owned();
            if let Err(status) = check_encoding(&req) {
                return Ok(status_response(status));
            }
            let slot = req.extensions().get::<ClientSlot>().cloned();
            let body = req.into_body();
            Ok(match method.as_str() {
                "Read" => match svc.read(body, slot).await {
                    Ok(response) => response,
                    Err(status) => status_response(status),
                },
                "Write" => match svc.write(body).await {
                    Ok(done) => unary_response(&done),
                    Err(status) => status_response(status),
                },
                "QueryWriteStatus" => match svc.query_write_status(body).await {
                    Ok(status) => unary_response(&status),
                    Err(status) => status_response(status),
                },
                other => status_response(Status::unimplemented(format!(
                    "{SERVICE} has no method {:?}",
                    crate::storage::digest::truncate_for_message(other)
                ))),
            })
        })
    }
}

/// An upload once its resource name is known: the blob, the buffer being filled, and
/// the thread storing it.
struct Started {
    resource: String,
    digest: Digest,
    progress: UploadGuard,
    buffers: Arc<UploadBuffers>,
    filling: Option<Filling>,
    chunks: tokio::sync::mpsc::Sender<Bytes>,
    storing: tokio::task::JoinHandle<Result<BlobWriter, Status>>,
}

impl Started {
    /// Copies `data` into the upload's buffer, storing each buffer that fills up.
    async fn accept(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            let buf = match &mut self.filling {
                Some(buf) => buf,
                None => self.filling.insert(
                    self.buffers
                        .take()
                        .await
                        .ok_or_else(|| Status::resource_exhausted("out of memory for uploads"))?,
                ),
            };
            let n = buf.push(data);
            data = &data[n..];
            if buf.is_full() {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// How much longer the buffer may be held before what it has is stored anyway;
    /// None when no buffer holds data.
    fn hold_left(&self) -> Option<std::time::Duration> {
        let buf = self.filling.as_ref().filter(|f| !f.is_empty())?;
        Some(HOLD_LIMIT.saturating_sub(buf.age()))
    }

    /// Queues what the buffer holds for storing; an error if storing has failed.
    async fn flush(&mut self) -> Result<(), Status> {
        let Some(filled) = self.filling.take().filter(|f| !f.is_empty()) else {
            return Ok(());
        };
        if self.chunks.send(filled.freeze()).await.is_ok() {
            return Ok(());
        }
        // The storing side stopped: on an error, which is the one to report.
        let (closed, _) = tokio::sync::mpsc::channel(1);
        drop(std::mem::replace(&mut self.chunks, closed));
        match (&mut self.storing).await {
            Ok(Err(status)) => Err(status),
            Ok(Ok(_)) => Err(Status::internal("upload storage stopped early")),
            Err(e) => Err(Status::internal(format!("storage task failed: {e}"))),
        }
    }

    /// Waits for everything queued to be stored, then verifies and commits the blob.
    async fn commit(self) -> Result<WriteResponse, Status> {
        drop(self.chunks);
        let writer = self
            .storing
            .await
            .map_err(|e| Status::internal(format!("storage task failed: {e}")))??;
        blocking(move || writer.commit().map_err(cas_status)).await?;
        Ok(WriteResponse {
            committed_size: self.digest.size() as i64,
        })
    }
}

/// The codes tonic gives for the same faults in other services (docs/protocol.md):
/// bytes that are not a message are INTERNAL, as gRPC's status code specification has it,
/// and so is a compressed flag without an encoding, as gRPC's compression specification
/// requires.
fn decode_status(e: DecodeError) -> Status {
    match e {
        DecodeError::Compressed => Status::internal(e.to_string()),
        DecodeError::Malformed(_) | DecodeError::Truncated => {
            Status::internal(format!("failed to decode Protobuf message: {e}"))
        }
        DecodeError::DataTwice | DecodeError::FieldTooLarge { .. } => {
            Status::invalid_argument(e.to_string())
        }
    }
}

impl ByteStreamService {
    async fn read(&self, body: Body, slot: Option<ClientSlot>) -> Result<HttpResponse, Status> {
        let req: ReadRequest = unary_request(body, "ReadRequest").await?;
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
        let Some(reader) = reader else {
            return Err(Status::not_found(format!("blob {digest} not found")));
        };
        let body = ReadBody::new(
            self.store.clone(),
            reader,
            self.config.stream_idle_timeout,
            slot,
        );
        Ok(body_response(Body::new(body)))
    }

    async fn write(&self, mut body: Body) -> Result<WriteResponse, Status> {
        if !self.config.allow_push {
            return Err(push_disabled());
        }
        let mut decoder = WriteDecoder::default();
        let mut started: Option<Started> = None;
        // Data of a first message that names its resource only after the data (valid
        // protobuf, though no encoder we know does it): kept aside until the name comes.
        let mut unnamed = Vec::new();
        // Data bytes received in all, and when the current message began.
        let mut received = 0u64;
        let mut message_start = 0u64;
        let mut messages = 0u64;
        loop {
            let idle = self.config.stream_idle_timeout;
            let frame = match started.as_mut().and_then(|u| u.hold_left().map(|t| (u, t))) {
                Some((upload, left)) => match tokio::time::timeout(left, body.frame()).await {
                    Ok(frame) => frame,
                    Err(_) => {
                        upload.flush().await?;
                        next_frame(&mut body, idle.saturating_sub(left)).await?
                    }
                },
                None => next_frame(&mut body, idle).await?,
            };
            let mut data = match frame {
                None => break,
                Some(frame) => match frame?.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
            };
            while let Some(event) = decoder.next(&mut data).map_err(decode_status)? {
                match event {
                    Event::Data(piece) => {
                        received += piece.len() as u64;
                        if started.is_none() && !decoder.resource_name().is_empty() {
                            started = Some(self.start(decoder.resource_name(), received).await?);
                        }
                        match &mut started {
                            Some(upload) => {
                                if received > upload.digest.size() {
                                    // More bytes than the blob has: a client that rewound
                                    // and resends breaks the protocol, whatever its data.
                                    check_offset(decoder.write_offset(), message_start)?;
                                }
                                check_overrun(&upload.digest, received)?;
                                upload.accept(&piece).await?;
                            }
                            None if unnamed.len() + piece.len() > MAX_MESSAGE_BYTES => {
                                return Err(Status::out_of_range(format!(
                                    "the first WriteRequest carries more than {MAX_MESSAGE_BYTES} \
                                     bytes of data before its resource_name"
                                )));
                            }
                            None => unnamed.extend_from_slice(&piece),
                        }
                    }
                    Event::End(header) => {
                        messages += 1;
                        let upload = match &mut started {
                            Some(upload) => upload,
                            None => {
                                let mut upload =
                                    self.start(&header.resource_name, received).await?;
                                upload.accept(&std::mem::take(&mut unnamed)).await?;
                                started.insert(upload)
                            }
                        };
                        if !header.resource_name.is_empty()
                            && header.resource_name != upload.resource
                        {
                            return Err(Status::failed_precondition(
                                "resource_name changed in the middle of a Write stream",
                            ));
                        }
                        check_offset(header.write_offset, message_start)?;
                        message_start = received;
                        upload.progress.progress(received);
                        if header.finish_write {
                            upload.flush().await?;
                            let upload = started.take().expect("started above");
                            // Nothing is committed unless the stream really ends here.
                            body_ends_after_finish_write(&mut body, &data).await?;
                            return upload.commit().await;
                        }
                    }
                }
            }
        }
        if !decoder.at_boundary() {
            return Err(decode_status(DecodeError::Truncated));
        }
        Err(match started {
            None if messages == 0 => Status::invalid_argument("Write stream carried no request"),
            _ => Status::failed_precondition(format!(
                "Write stream ended after {received} bytes without finish_write"
            )),
        })
    }

    /// Begins storing the upload named `resource`, `received` bytes into it.
    async fn start(&self, resource: &str, received: u64) -> Result<Started, Status> {
        let name = parse_write(resource)?;
        self.config.instances.check(&name.instance)?;
        let digest = name.digest;
        check_overrun(&digest, received)?;
        let progress = UploadGuard {
            uploads: self.uploads.clone(),
            name: resource.to_owned(),
        };
        progress.progress(0);
        let store = self.store.clone();
        let d = digest.clone();
        let writer = blocking(move || store.begin_write(d).map_err(cas_status)).await?;
        // Receiving the next buffer overlaps with storing the previous one: the storage
        // side runs on its own blocking thread, fed through a short queue.
        let (chunks, mut queued) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        // Stored on a blocking thread while buffers keep coming; one that waits
        // [`STORE_LINGER`] for the next buffer gives the thread back, so an upload whose
        // client has gone quiet holds no thread, and one that streams pays one thread
        // hand-off per burst rather than per buffer.
        let storing = tokio::spawn(async move {
            let mut writer = writer;
            while let Some(first) = queued.recv().await {
                let (w, q, closed) = blocking(move || {
                    let mut writer = writer;
                    writer.write_bytes(first).map_err(cas_status)?;
                    loop {
                        match recv_within(&mut queued, STORE_LINGER) {
                            Some(Some(chunk)) => writer.write_bytes(chunk).map_err(cas_status)?,
                            Some(None) => return Ok((writer, queued, true)),
                            None => return Ok((writer, queued, false)),
                        }
                    }
                })
                .await?;
                writer = w;
                queued = q;
                if closed {
                    break;
                }
            }
            Ok::<_, Status>(writer)
        });
        Ok(Started {
            resource: resource.to_owned(),
            digest,
            progress,
            buffers: self.buffers.clone(),
            filling: None,
            chunks,
            storing,
        })
    }

    async fn query_write_status(&self, body: Body) -> Result<QueryWriteStatusResponse, Status> {
        let req: QueryWriteStatusRequest = unary_request(body, "QueryWriteStatusRequest").await?;
        let name = parse_write(&req.resource_name)?;
        self.config.instances.check(&name.instance)?;
        let store = self.store.clone();
        let d = name.digest.clone();
        if blocking(move || Ok(store.contains(&d))).await? {
            return Ok(QueryWriteStatusResponse {
                committed_size: name.digest.size() as i64,
                complete: true,
            });
        }
        let progress = self
            .uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&req.resource_name)
            .copied();
        match progress {
            Some(bytes) => Ok(QueryWriteStatusResponse {
                committed_size: bytes as i64,
                complete: false,
            }),
            None => Err(Status::not_found(format!(
                "no upload in progress for {:?} and the blob is not stored",
                crate::storage::digest::truncate_for_message(&req.resource_name)
            ))),
        }
    }
}

/// Waits on this (blocking) thread for the next queued buffer: `Some(None)` once the
/// queue is closed, `None` after `limit` without one. Parks the thread rather than using
/// the runtime's timer, which may already be shut down while a server stops.
fn recv_within(
    queued: &mut tokio::sync::mpsc::Receiver<Bytes>,
    limit: std::time::Duration,
) -> Option<Option<Bytes>> {
    struct Unpark(std::thread::Thread);
    impl futures::task::ArcWake for Unpark {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.unpark();
        }
    }
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let std::task::Poll::Ready(next) = queued.poll_recv(&mut cx) {
            return Some(next);
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// The next frame of a Write's body, or DEADLINE_EXCEEDED if the client sends nothing
/// for `idle` (a stalled upload must not hold its reservation and file for ever).
async fn next_frame(
    body: &mut Body,
    idle: std::time::Duration,
) -> Result<Option<Result<http_body::Frame<bytes::Bytes>, Status>>, Status> {
    tokio::time::timeout(idle, body.frame()).await.map_err(|_| {
        tracing::info!("abandoned a ByteStream write whose client sent nothing for {idle:?}");
        Status::deadline_exceeded(format!(
            "the Write stream sent nothing for {idle:?} and was abandoned"
        ))
    })
}

fn check_offset(write_offset: i64, received_before: u64) -> Result<(), Status> {
    if write_offset != received_before as i64 {
        return Err(Status::failed_precondition(format!(
            "write_offset {write_offset} does not match the {received_before} bytes received \
             before it"
        )));
    }
    Ok(())
}

/// The ByteStream contract makes any request after the one with `finish_write` an error:
/// `rest` (what followed that message in its frame) and the remainder of the body must be
/// empty. A body still open after [`FINISH_GRACE`] counts as ended.
async fn body_ends_after_finish_write(body: &mut Body, rest: &Bytes) -> Result<(), Status> {
    let after = || {
        Status::failed_precondition(
            "the Write stream carried more after the WriteRequest with finish_write",
        )
    };
    if !rest.is_empty() {
        return Err(after());
    }
    let deadline = tokio::time::Instant::now() + FINISH_GRACE;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) | Ok(None) => return Ok(()),
            Ok(Some(frame)) => frame?,
        };
        match frame.into_data() {
            Ok(data) if !data.is_empty() => return Err(after()),
            _ => {} // an empty frame, or trailers
        }
    }
}

fn check_overrun(digest: &Digest, received: u64) -> Result<(), Status> {
    if received > digest.size() {
        return Err(cas_status(CasError::Overrun {
            expected: digest.size(),
            actual: received,
        }));
    }
    Ok(())
}

//! REAPI ContentAddressableStorage: FindMissingBlobs, the batch calls and GetTree.

use super::{
    blocking, cas_status, check_digest_function, digest_arg, ok_status, push_disabled, rpc_status,
    tree_status, ServiceConfig, MAX_BATCH_TOTAL_BYTES,
};
use crate::storage::cas::CasStore;
use crate::storage::digest::{Digest, DigestError};
use crate::storage::tree;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use futures::Stream;
use reapi::content_addressable_storage_server::ContentAddressableStorage;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// GetTree page size when the client leaves it to us.
const DEFAULT_TREE_PAGE: usize = 1000;
/// Upper bound on directories per GetTree response, so one response stays well under the
/// message limit whatever page size a client asks for.
const MAX_TREE_PAGE: usize = 10_000;

pub struct CasService {
    pub store: Arc<CasStore>,
    pub config: ServiceConfig,
    /// GetTree walks waiting for their client's next page.
    pub tree_walks: Arc<tree::SuspendedWalks>,
}

fn identity_only(compressor: i32) -> Result<(), Status> {
    if compressor == reapi::compressor::Value::Identity as i32 {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "compressor {compressor} is not supported; this server advertises no compressors"
        )))
    }
}

fn check_batch_total(total: u64, what: &str) -> Result<(), Status> {
    if total > MAX_BATCH_TOTAL_BYTES {
        Err(Status::invalid_argument(format!(
            "{what} totals {total} bytes, over the advertised max_batch_total_size_bytes of {MAX_BATCH_TOTAL_BYTES}; use ByteStream for large blobs"
        )))
    } else {
        Ok(())
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let req = request.into_inner();
        self.config.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let digests = req
            .blob_digests
            .iter()
            .map(|d| digest_arg(Some(d), "blob_digests"))
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.store.clone();
        let missing = blocking(move || {
            Ok(store
                .find_missing(digests)
                .into_iter()
                .map(|d| d.to_proto())
                .collect())
        })
        .await?;
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        if !self.config.allow_push {
            return Err(push_disabled());
        }
        let req = request.into_inner();
        self.config.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        check_batch_total(total, "BatchUpdateBlobs data")?;
        let store = self.store.clone();
        let responses = blocking(move || {
            Ok(req
                .requests
                .into_iter()
                .map(|r| {
                    let result = (|| {
                        identity_only(r.compressor)?;
                        let d = digest_arg(r.digest.as_ref(), "digest")?;
                        store.put(&d, &r.data).map_err(cas_status)
                    })();
                    reapi::batch_update_blobs_response::Response {
                        digest: r.digest,
                        status: match result {
                            Ok(()) => ok_status(),
                            Err(s) => Some(rpc_status(&s)),
                        },
                    }
                })
                .collect())
        })
        .await?;
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let req = request.into_inner();
        self.config.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let digests: Vec<Result<Digest, DigestError>> = req
            .digests
            .iter()
            .map(|d| Digest::from_proto(Some(d)))
            .collect();
        let total: u64 = digests.iter().flatten().map(Digest::size).sum();
        check_batch_total(total, "BatchReadBlobs digests")?;
        let store = self.store.clone();
        let responses = blocking(move || {
            Ok(req
                .digests
                .into_iter()
                .zip(digests)
                .map(|(proto, parsed)| {
                    let result = parsed
                        .map_err(|e| super::digest_status("digest", e))
                        .and_then(|d| match store.read_all(&d) {
                            Ok(Some(data)) => Ok(data),
                            Ok(None) => Err(Status::not_found(format!("blob {d} not found"))),
                            Err(e) => Err(cas_status(e)),
                        });
                    let (data, status) = match result {
                        Ok(data) => (data, ok_status()),
                        Err(s) => (Vec::new(), Some(rpc_status(&s))),
                    };
                    reapi::batch_read_blobs_response::Response {
                        digest: Some(proto),
                        data,
                        status,
                        ..Default::default()
                    }
                })
                .collect())
        })
        .await?;
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let req = request.into_inner();
        self.config.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let root = digest_arg(req.root_digest.as_ref(), "root_digest")?;
        if req.page_size < 0 {
            return Err(Status::invalid_argument("page_size must not be negative"));
        }
        let token = tree::PageToken::parse(&req.page_token).map_err(|_| {
            Status::invalid_argument(format!(
                "page_token {:?} was not issued by this server",
                crate::storage::digest::truncate_for_message(&req.page_token)
            ))
        })?;
        // With an explicit page size the client pages itself: one page per call.
        // Without, the whole tree is streamed in pages of our choosing.
        let (page, single_page) = match req.page_size {
            0 => (DEFAULT_TREE_PAGE, false),
            n => ((n as usize).min(MAX_TREE_PAGE), true),
        };
        let store = self.store.clone();
        let walks = self.tree_walks.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let first = {
            let (store, walks, root) = (store.clone(), walks.clone(), root.clone());
            blocking(move || {
                let mut read = |d: &Digest| tree::read_directory(&store, d);
                let mut first_page = || {
                    let Some(mut walk) = walks.resume(&root, token, &mut read)? else {
                        return Ok(None);
                    };
                    Ok(walk.next_page(page, &mut read)?.map(|p| (walk, p)))
                };
                first_page().map_err(tree_status)
            })
            .await?
        };
        let Some((walk, first)) = first else {
            return Err(Status::not_found(format!(
                "root directory {root} not found"
            )));
        };
        // The walk goes on from page to page; no directory is read twice.
        tokio::spawn(async move {
            let (mut walk, mut next) = (walk, first);
            loop {
                let (directories, more) = next;
                if single_page {
                    // The client asks for the next page with the token: keep the walk.
                    let token = if more {
                        walks.suspend(walk)
                    } else {
                        String::new()
                    };
                    let response = reapi::GetTreeResponse {
                        directories,
                        next_page_token: token,
                    };
                    let _ = tx.send(Ok(response)).await;
                    return;
                }
                let token = if more {
                    walk.listed().to_string()
                } else {
                    String::new()
                };
                let response = reapi::GetTreeResponse {
                    directories,
                    next_page_token: token,
                };
                if tx.send(Ok(response)).await.is_err() || !more {
                    return;
                }
                let store = store.clone();
                let paged = blocking(move || {
                    let mut read = |d: &Digest| tree::read_directory(&store, d);
                    let page = walk.next_page(page, &mut read).map_err(tree_status)?;
                    Ok((walk, page))
                })
                .await;
                match paged {
                    Ok((w, Some(p))) => (walk, next) = (w, p),
                    // Only a walk that has listed nothing finds no root.
                    Ok((_, None)) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    // Blob splitting and splicing (REAPI 2.4 chunking) is not offered; Capabilities
    // advertises no support, so conforming clients never call these.
    async fn split_blob(
        &self,
        _: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported by this server",
        ))
    }

    type GetChunkMappingStream =
        Pin<Box<dyn Stream<Item = Result<reapi::GetChunkMappingResponse, Status>> + Send>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<reapi::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented(
            "GetChunkMapping is not supported by this server",
        ))
    }

    async fn splice_blob(
        &self,
        _: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported by this server",
        ))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<reapi::RegisterChunkMappingRequest>>,
    ) -> Result<Response<reapi::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "RegisterChunkMapping is not supported by this server",
        ))
    }
}

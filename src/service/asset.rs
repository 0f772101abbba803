//! Remote Asset v1 Fetch and Push over the asset index.
//!
//! The asset-integrity policy (docs/adr/0007): with a CAS on this server, a push whose
//! closure is stored here is recorded as checked, and a fetch of it answers NOT_FOUND
//! once any of its closure has gone, rather than pointing the client at holes. A push
//! whose own blob or root directory is stored here but whose closure is not is refused
//! (FAILED_PRECONDITION): the client stores this asset's content here, so some of it is
//! missing. A push whose blob or root directory is not stored here either is an index
//! entry for content stored elsewhere (a split set-up): recorded unchecked, unless
//! `--require-asset-content` asks for FAILED_PRECONDITION. Without a CAS
//! (`--index-only`) every entry is an index entry.

use super::{blocking, cas_status, check_digest_function, digest_arg, tree_status, ServiceConfig};
use crate::storage::asset::{AssetEntry, AssetKind, AssetStore, Qualifiers};
use crate::storage::cas::CasStore;
use crate::storage::digest::{truncate_for_message, Digest};
use crate::storage::tree::TreeError;
use crate::storage::{entry_missing_content, first_missing_in_closure};
use bazel_remote_apis::build::bazel::remote::asset::v1 as ra;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::protobuf::Timestamp;
use ra::fetch_server::Fetch;
use ra::push_server::Push;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// How long after refusing an upload for lack of space the server treats every
/// incomplete asset push as a failed upload rather than an index entry (ADR 0007).
const SPACE_REFUSAL_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Clone)]
pub struct AssetService {
    pub assets: Arc<AssetStore>,
    /// `None` in `--index-only` mode.
    pub cas: Option<Arc<CasStore>>,
    pub config: ServiceConfig,
    /// Refuse pushes whose content is not stored here even when none of it is (no
    /// index entries for content stored elsewhere).
    pub require_content: bool,
}

fn rpc_name(kind: AssetKind, push: bool) -> &'static str {
    match (kind, push) {
        (AssetKind::Blob, false) => "FetchBlob",
        (AssetKind::Directory, false) => "FetchDirectory",
        (AssetKind::Blob, true) => "PushBlob",
        (AssetKind::Directory, true) => "PushDirectory",
    }
}

fn qualifiers(kind: AssetKind, push: bool, q: &[ra::Qualifier]) -> Result<Qualifiers, Status> {
    let q = Qualifiers::from_proto(q);
    if let Some(name) = q.duplicate_name() {
        return Err(Status::invalid_argument(format!(
            "{}: qualifier {:?} is given more than once",
            rpc_name(kind, push),
            truncate_for_message(name)
        )));
    }
    Ok(q)
}

fn check_uris(kind: AssetKind, push: bool, uris: &[String]) -> Result<(), Status> {
    // The BuildStream client probes with empty uris and accepts only INVALID_ARGUMENT.
    if uris.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{}: Missing URI",
            rpc_name(kind, push)
        )));
    }
    if uris.iter().any(String::is_empty) {
        return Err(Status::invalid_argument(format!(
            "{}: empty URI",
            rpc_name(kind, push)
        )));
    }
    Ok(())
}

impl AssetService {
    async fn fetch(
        &self,
        kind: AssetKind,
        instance: &str,
        uris: Vec<String>,
        q: &[ra::Qualifier],
        digest_function: i32,
    ) -> Result<AssetEntry, Status> {
        self.config.instances.check(instance)?;
        check_digest_function(digest_function)?;
        check_uris(kind, false, &uris)?;
        let q = qualifiers(kind, false, q)?;
        let assets = self.assets.clone();
        let cas = self.cas.clone();
        blocking(move || {
            let now = std::time::SystemTime::now();
            let mut incomplete = None;
            // The first URI, in request order, that resolves wins.
            for uri in &uris {
                let entry = assets
                    .get(kind, uri, &q)
                    .map_err(|e| Status::internal(e.to_string()))?;
                let Some(entry) = entry else { continue };
                if entry.is_expired(now) {
                    continue;
                }
                if let Some(cas) = cas.as_ref().filter(|_| !entry.content_elsewhere) {
                    let unusable = match entry_missing_content(cas, kind, &entry) {
                        Ok(missing) => missing.map(|d| {
                            format!("the content it references is no longer stored (first missing: {d})")
                        }),
                        Err(TreeError::Cas(e)) => return Err(cas_status(e)),
                        // A tree that cannot be walked (casd stores entries unchecked) is
                        // as useless as an incomplete one, and BuildStream reports any
                        // code but NOT_FOUND as a failure of the remote.
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(why) = unusable {
                        tracing::info!(uri = %uri, %why, "asset is unusable; answering NOT_FOUND");
                        incomplete = Some(why);
                        continue;
                    }
                }
                return Ok(entry);
            }
            Err(Status::not_found(match incomplete {
                Some(why) => format!("asset found, but {why}"),
                None => "asset not found".to_owned(),
            }))
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn push(
        &self,
        kind: AssetKind,
        instance: &str,
        uris: Vec<String>,
        q: &[ra::Qualifier],
        expire_at: Option<Timestamp>,
        digest: Option<&reapi::Digest>,
        references_blobs: &[reapi::Digest],
        references_directories: &[reapi::Digest],
        digest_function: i32,
    ) -> Result<(), Status> {
        let name = rpc_name(kind, true);
        self.config.instances.check(instance)?;
        check_digest_function(digest_function)?;
        check_uris(kind, true, &uris)?;
        let q = qualifiers(kind, true, q)?;
        let what = match kind {
            AssetKind::Blob => "blob_digest",
            AssetKind::Directory => "root_directory_digest",
        };
        let digest = digest_arg(digest, &format!("{name} {what}"))?;
        let parse_all = |v: &[reapi::Digest], what: &str| {
            v.iter()
                .map(|d| digest_arg(Some(d), &format!("{name} {what}")))
                .collect::<Result<Vec<Digest>, _>>()
        };
        let references_blobs = parse_all(references_blobs, "references_blobs")?;
        let references_directories = parse_all(references_directories, "references_directories")?;
        let assets = self.assets.clone();
        let cas = self.cas.clone();
        let require_content = self.require_content;
        blocking(move || {
            // One walk of the closure, which starts with the asset's own blob (or root
            // directory). That one absent means nothing says the content belongs here: an
            // index entry for content stored elsewhere. Unless uploads were just refused
            // for lack of space: BuildStream pushes the asset even then, and its content
            // may be exactly what was refused.
            let content_elsewhere = match &cas {
                None => true,
                Some(cas) => match first_missing_in_closure(
                    cas,
                    kind,
                    &digest,
                    &references_blobs,
                    &references_directories,
                )
                .map_err(tree_status)?
                {
                    None => false,
                    Some(missing)
                        if missing == digest
                            && !require_content
                            && !cas.refused_space_within(SPACE_REFUSAL_MEMORY) =>
                    {
                        tracing::debug!(
                            uris = ?uris,
                            %digest,
                            "{name}: content not stored here; recording an index entry"
                        );
                        true
                    }
                    Some(missing) => {
                        return Err(Status::failed_precondition(format!(
                            "{name}: referenced content {missing} is not stored; upload it before pushing the asset"
                        )));
                    }
                },
            };
            for uri in uris {
                let entry = AssetEntry {
                    uri,
                    qualifiers: q.clone(),
                    expires_at: expire_at,
                    digest: digest.clone(),
                    references_blobs: references_blobs.clone(),
                    references_directories: references_directories.clone(),
                    content_elsewhere,
                };
                assets
                    .put(kind, &entry)
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            Ok(())
        })
        .await
    }
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(
        &self,
        request: Request<ra::FetchBlobRequest>,
    ) -> Result<Response<ra::FetchBlobResponse>, Status> {
        let r = request.into_inner();
        let e = self
            .fetch(
                AssetKind::Blob,
                &r.instance_name,
                r.uris,
                &r.qualifiers,
                r.digest_function,
            )
            .await?;
        Ok(Response::new(ra::FetchBlobResponse {
            status: None,
            qualifiers: e.qualifiers_proto(),
            uri: e.uri,
            expires_at: e.expires_at,
            blob_digest: Some(e.digest.to_proto()),
            digest_function: reapi::digest_function::Value::Sha256 as i32,
        }))
    }

    async fn fetch_directory(
        &self,
        request: Request<ra::FetchDirectoryRequest>,
    ) -> Result<Response<ra::FetchDirectoryResponse>, Status> {
        let r = request.into_inner();
        let e = self
            .fetch(
                AssetKind::Directory,
                &r.instance_name,
                r.uris,
                &r.qualifiers,
                r.digest_function,
            )
            .await?;
        Ok(Response::new(ra::FetchDirectoryResponse {
            status: None,
            qualifiers: e.qualifiers_proto(),
            uri: e.uri,
            expires_at: e.expires_at,
            root_directory_digest: Some(e.digest.to_proto()),
            digest_function: reapi::digest_function::Value::Sha256 as i32,
        }))
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(
        &self,
        request: Request<ra::PushBlobRequest>,
    ) -> Result<Response<ra::PushBlobResponse>, Status> {
        let r = request.into_inner();
        self.push(
            AssetKind::Blob,
            &r.instance_name,
            r.uris,
            &r.qualifiers,
            r.expire_at,
            r.blob_digest.as_ref(),
            &r.references_blobs,
            &r.references_directories,
            r.digest_function,
        )
        .await?;
        Ok(Response::new(ra::PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<ra::PushDirectoryRequest>,
    ) -> Result<Response<ra::PushDirectoryResponse>, Status> {
        let r = request.into_inner();
        self.push(
            AssetKind::Directory,
            &r.instance_name,
            r.uris,
            &r.qualifiers,
            r.expire_at,
            r.root_directory_digest.as_ref(),
            &r.references_blobs,
            &r.references_directories,
            r.digest_function,
        )
        .await?;
        Ok(Response::new(ra::PushDirectoryResponse {}))
    }
}

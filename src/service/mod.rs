//! gRPC protocol adapters. Each file is one protocol surface; they validate requests,
//! translate errors into precise gRPC statuses and call the storage layer.

pub mod asset;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod grpc_http;
pub mod http_guard;
pub mod read_body;
pub mod resource_name;
pub mod upload_buffers;
pub mod write_decoder;

use crate::storage::cas::CasError;
use crate::storage::digest::{truncate_for_message, Digest, DigestError};
use crate::storage::tree::TreeError;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use std::collections::BTreeSet;
use tonic::Status;

/// Largest total of blob sizes in one BatchUpdateBlobs/BatchReadBlobs, advertised in
/// Capabilities. buildbox-casd's own default (4 MiB - 64 KiB) leaves room for the
/// message envelope under gRPC's common 4 MiB receive limit.
pub const MAX_BATCH_TOTAL_BYTES: u64 = 4 * 1024 * 1024 - 64 * 1024;

/// gRPC message size limit: a full batch plus generous room for per-blob overhead.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Settings shared by every service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub instances: Instances,
    pub allow_push: bool,
    /// How long a ByteStream stream may make no progress before it is abandoned.
    pub stream_idle_timeout: std::time::Duration,
}

/// The instance names this server answers to. All of them share one store: an instance
/// name selects nothing, it is only checked, so that a client configured for another
/// server's instance fails loudly instead of silently mixing caches.
#[derive(Clone, Debug)]
pub struct Instances(BTreeSet<String>);

impl Instances {
    pub fn new(extra: impl IntoIterator<Item = String>) -> Self {
        let mut set: BTreeSet<String> = extra.into_iter().collect();
        set.insert(String::new());
        Instances(set)
    }

    pub fn check(&self, name: &str) -> Result<(), Status> {
        if self.0.contains(name) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "unknown instance name {:?} (this server answers to {})",
                truncate_for_message(name),
                self.describe()
            )))
        }
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Refuses any digest function but SHA-256 (0, "unknown", means the server's default).
pub fn check_digest_function(f: i32) -> Result<(), Status> {
    use reapi::digest_function::Value;
    if f == Value::Unknown as i32 || f == Value::Sha256 as i32 {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "digest function {f} is not supported; this server only stores SHA-256"
        )))
    }
}

pub fn digest_arg(d: Option<&reapi::Digest>, what: &str) -> Result<Digest, Status> {
    Digest::from_proto(d).map_err(|e| digest_status(what, e))
}

pub fn digest_status(what: &str, e: DigestError) -> Status {
    Status::invalid_argument(format!("{what}: {e}"))
}

/// Runs blocking storage work off the async executor.
pub async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
}

pub fn cas_status(e: CasError) -> Status {
    match &e {
        CasError::HashMismatch { .. } | CasError::SizeMismatch { .. } => {
            Status::invalid_argument(e.to_string())
        }
        CasError::Overrun { .. } => Status::invalid_argument(e.to_string()),
        CasError::Corrupt { .. } => {
            tracing::error!(error = %e, "served object failed verification");
            Status::data_loss(e.to_string())
        }
        CasError::TooLarge { .. } | CasError::NoSpace { .. } => {
            tracing::warn!(error = %e, "refusing an upload");
            Status::resource_exhausted(e.to_string())
        }
        CasError::Io { .. } if e.is_out_of_space() => {
            tracing::error!(error = %e, "storage is full");
            Status::resource_exhausted(format!("the server's storage is full: {e}"))
        }
        CasError::Io { .. } => {
            tracing::error!(error = %e, "storage failure");
            Status::internal(e.to_string())
        }
    }
}

pub fn tree_status(e: TreeError) -> Status {
    match e {
        TreeError::Cas(e) => cas_status(e),
        other => Status::failed_precondition(other.to_string()),
    }
}

pub fn rpc_status(s: &Status) -> bazel_remote_apis::google::rpc::Status {
    bazel_remote_apis::google::rpc::Status {
        code: s.code() as i32,
        message: s.message().to_owned(),
        details: vec![],
    }
}

pub fn ok_status() -> Option<bazel_remote_apis::google::rpc::Status> {
    Some(bazel_remote_apis::google::rpc::Status::default())
}

pub fn push_disabled() -> Status {
    Status::permission_denied(
        "this server is read-only: start it with --enable-push to accept uploads",
    )
}

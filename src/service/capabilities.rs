//! REAPI Capabilities: what this cache supports. It answers for any instance name, as
//! buildbox-casd does, so that a client learns the limits before it is told off.

use super::MAX_BATCH_TOTAL_BYTES;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::build::bazel::semver::SemVer;
use reapi::capabilities_server::Capabilities;
use tonic::{Request, Response, Status};

pub struct CapabilitiesService {
    /// Whether a CAS is served (false in `--index-only` mode).
    pub has_cas: bool,
}

fn version(minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major: 2,
        minor,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let cache = reapi::CacheCapabilities {
            digest_functions: vec![reapi::digest_function::Value::Sha256 as i32],
            action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                update_enabled: false,
            }),
            max_batch_total_size_bytes: if self.has_cas {
                MAX_BATCH_TOTAL_BYTES as i64
            } else {
                0
            },
            symlink_absolute_path_strategy: reapi::symlink_absolute_path_strategy::Value::Allowed
                as i32,
            ..Default::default()
        };
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: None,
            deprecated_api_version: version(0),
            low_api_version: version(0),
            // 2.3 adds the per-request digest_function fields, which we honour (SHA-256 only).
            high_api_version: version(3),
        }))
    }
}

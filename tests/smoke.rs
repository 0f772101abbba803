//! The server starts, answers Capabilities, and stops cleanly on SIGTERM.
mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use common::Server;
use reapi::capabilities_client::CapabilitiesClient;

#[tokio::test(flavor = "multi_thread")]
async fn capabilities_and_clean_sigterm() {
    let repo = tempfile::tempdir().unwrap();
    let mut server = Server::start(repo.path(), &[]);
    let mut client = CapabilitiesClient::new(server.channel().await);
    let caps = client
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![reapi::digest_function::Value::Sha256 as i32]
    );
    assert!(cache.max_batch_total_size_bytes >= 1 << 20);
    assert_eq!(caps.low_api_version.unwrap().major, 2);
    let status = server.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

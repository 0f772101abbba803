//! What can go wrong in a store, by who is at fault. `service::store_status` maps each
//! variant to one gRPC code, the table docs/protocol.md documents.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The client's data does not match the digest it named (wrong hash, too short, too
    /// long): INVALID_ARGUMENT, nothing stored.
    #[error("{0}")]
    Mismatch(String),
    /// Quota, reserve or disk: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    NoSpace(String),
    /// A stored object failed verification while being read: DATA_LOSS in a stream,
    /// NOT_FOUND per blob in a batch. The store has taken it out of service.
    #[error("stored object {digest} failed verification ({reason}); it has been quarantined")]
    Corrupt { digest: String, reason: String },
    /// Anything else the server cannot do: INTERNAL.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

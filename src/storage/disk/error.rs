//! The disk engine's one error type.

use std::io;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CasError {
    #[error("uploaded data has SHA-256 {actual}, but the digest says {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("uploaded data is {actual} bytes, but the digest says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("upload overruns the digest size {expected} (got {actual} bytes so far)")]
    Overrun { expected: u64, actual: u64 },
    #[error("blob {digest} is {size} bytes, larger than the whole cache quota of {quota} bytes")]
    TooLarge {
        digest: String,
        size: u64,
        quota: u64,
    },
    #[error("no room for {size} more bytes: {reason}")]
    NoSpace { size: u64, reason: String },
    #[error("stored object {digest} failed verification ({reason}); it has been quarantined")]
    Corrupt { digest: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl CasError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        CasError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the disk (not the client) is the problem and the client may retry later.
    pub(crate) fn is_out_of_space(&self) -> bool {
        match self {
            CasError::TooLarge { .. } | CasError::NoSpace { .. } => true,
            CasError::Io { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
            }
            _ => false,
        }
    }
}

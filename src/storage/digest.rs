//! A validated SHA-256 content digest.
//!
//! Every digest that reaches the storage layer has been through [`Digest::new`], so
//! storage code can build file paths from `hash` without re-checking: a hash is exactly
//! 64 lowercase hex characters, which rules out path tricks by construction.

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use sha2::{Digest as _, Sha256};
use std::fmt;

/// Hash of the empty blob; REAPI says it is always present.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: String,
    size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest hash {0:?} is not 64 lowercase hex characters (only SHA-256 is supported)")]
    BadHash(String),
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    #[error("digest size {0:?} is not a non-negative integer")]
    BadSize(String),
    #[error("digest is missing")]
    Missing,
}

impl Digest {
    pub fn new(hash: &str, size: i64) -> Result<Self, DigestError> {
        if !is_sha256_hex(hash) {
            return Err(DigestError::BadHash(truncate_for_message(hash)));
        }
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        Ok(Digest {
            hash: hash.to_owned(),
            size: size as u64,
        })
    }

    /// Parses the `<hash>/<size>` pair of a ByteStream resource name.
    pub fn parse_parts(hash: &str, size: &str) -> Result<Self, DigestError> {
        // Reject "+1", " 1", "01"-style oddities only where they are not plain digits.
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DigestError::BadSize(truncate_for_message(size)));
        }
        let size: i64 = size
            .parse()
            .map_err(|_| DigestError::BadSize(truncate_for_message(size)))?;
        Digest::new(hash, size)
    }

    pub fn from_proto(d: Option<&reapi::Digest>) -> Result<Self, DigestError> {
        let d = d.ok_or(DigestError::Missing)?;
        Digest::new(&d.hash, d.size_bytes)
    }

    /// The digest of the empty blob.
    pub fn empty() -> Self {
        Digest {
            hash: EMPTY_SHA256.to_owned(),
            size: 0,
        }
    }

    pub fn of_bytes(data: &[u8]) -> Self {
        Digest {
            hash: hex::encode(Sha256::digest(data)),
            size: data.len() as u64,
        }
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.hash == EMPTY_SHA256
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash.clone(),
            size_bytes: self.size as i64,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash, self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Keeps error messages readable when a client sends megabytes of garbage as a name.
pub fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 100;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_hash_and_size() {
        assert!(Digest::new(EMPTY_SHA256, 0).unwrap().is_empty_blob());
        assert!(matches!(
            Digest::new(&EMPTY_SHA256.to_uppercase(), 0),
            Err(DigestError::BadHash(_))
        ));
        assert!(matches!(
            Digest::new("../../etc/passwd", 0),
            Err(DigestError::BadHash(_))
        ));
        assert_eq!(
            Digest::new(EMPTY_SHA256, -1),
            Err(DigestError::NegativeSize(-1))
        );
        assert!(Digest::parse_parts(EMPTY_SHA256, "+0").is_err());
        assert!(Digest::parse_parts(EMPTY_SHA256, "99999999999999999999").is_err());
        assert_eq!(Digest::parse_parts(EMPTY_SHA256, "0").unwrap().size(), 0);
    }

    #[test]
    fn of_bytes_matches_known_value() {
        assert_eq!(Digest::of_bytes(b"").hash(), EMPTY_SHA256);
        assert_eq!(Digest::of_bytes(b""), Digest::empty());
    }

    #[test]
    fn long_names_are_truncated_in_messages() {
        let long = "é".repeat(200);
        assert!(truncate_for_message(&long).len() < 110);
    }
}

//! Remote Asset index on local disk, in buildbox-casd's format, so an existing
//! repository's asset entries are served in place and ours stay readable by casd.
//!
//! An entry lives at `REPO/assets/objects/<k[0:2]>/<k[2:]>` where `k` is the hex SHA-256
//! of `Any{type_url: ".../FetchBlobRequest" (or FetchDirectoryRequest), value:
//! Request{uris: [uri], qualifiers: sorted}}`. The file holds `Any{type_url:
//! ".../FetchBlobResponse" (or FetchDirectoryResponse), value: Response}`.
//!
//! We also record the pushed `references_blobs` / `references_directories` in extra fields
//! (16, 17) of that Any message, and in field 18 whether the content was stored elsewhere
//! when the entry was pushed (docs/adr/0007). casd's parser keeps them as unknown fields,
//! so the file stays casd-compatible, and we can check and refresh an asset's whole
//! closure.

use super::digest::Digest;
use super::disk::layout;
use super::disk::rename_into_place;
use bazel_remote_apis::build::bazel::remote::asset::v1 as ra;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::protobuf::Timestamp;
use prost::Message;
use sha2::{Digest as _, Sha256};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const TYPE_PREFIX: &str = "type.googleapis.com/build.bazel.remote.asset.v1.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssetKind {
    Blob,
    Directory,
}

impl AssetKind {
    fn request_type(self) -> &'static str {
        match self {
            AssetKind::Blob => "FetchBlobRequest",
            AssetKind::Directory => "FetchDirectoryRequest",
        }
    }
    fn response_type(self) -> &'static str {
        match self {
            AssetKind::Blob => "FetchBlobResponse",
            AssetKind::Directory => "FetchDirectoryResponse",
        }
    }
}

/// A qualifier list in canonical (sorted) order: asset lookups match the exact set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Qualifiers(Vec<(String, String)>);

impl Qualifiers {
    pub fn new(mut pairs: Vec<(String, String)>) -> Self {
        pairs.sort();
        Qualifiers(pairs)
    }

    /// The first name that appears more than once, if any (REAPI forbids repeats).
    pub fn duplicate_name(&self) -> Option<&str> {
        self.0
            .windows(2)
            .find(|w| w[0].0 == w[1].0)
            .map(|w| w[0].0.as_str())
    }

    fn to_proto(&self) -> Vec<ra::Qualifier> {
        self.0
            .iter()
            .map(|(name, value)| ra::Qualifier {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }

    pub fn from_proto(q: &[ra::Qualifier]) -> Self {
        Qualifiers::new(
            q.iter()
                .map(|q| (q.name.clone(), q.value.clone()))
                .collect(),
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AssetEntry {
    pub uri: String,
    pub qualifiers: Qualifiers,
    pub expires_at: Option<Timestamp>,
    pub digest: Digest,
    pub references_blobs: Vec<Digest>,
    pub references_directories: Vec<Digest>,
    /// The content was not stored here when the entry was pushed (this server is the
    /// index of a split set-up, or `--index-only`): a fetch cannot check it here.
    pub content_elsewhere: bool,
}

impl AssetEntry {
    pub fn qualifiers_proto(&self) -> Vec<ra::Qualifier> {
        self.qualifiers.to_proto()
    }

    pub fn is_expired(&self, now: std::time::SystemTime) -> bool {
        let Some(ts) = &self.expires_at else {
            return false;
        };
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let now_secs = now.as_secs() as i64;
        (ts.seconds, ts.nanos) <= (now_secs, now.subsec_nanos() as i32)
    }
}

/// The on-disk message: a `google.protobuf.Any` plus our reference lists.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredEntry {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
    #[prost(message, repeated, tag = "16")]
    references_blobs: Vec<reapi::Digest>,
    #[prost(message, repeated, tag = "17")]
    references_directories: Vec<reapi::Digest>,
    #[prost(bool, tag = "18")]
    content_elsewhere: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct AssetError {
    context: String,
    #[source]
    source: io::Error,
}

pub struct AssetStore {
    objects: PathBuf,
    tmp: PathBuf,
}

impl AssetStore {
    pub fn open(repo: &Path) -> Result<Self, AssetError> {
        let objects = repo.join("assets").join("objects");
        let tmp = repo.join("assets").join("tmp");
        for dir in [&objects, &tmp] {
            fs::create_dir_all(dir).map_err(|source| AssetError {
                context: format!("creating {}", dir.display()),
                source,
            })?;
        }
        Ok(AssetStore { objects, tmp })
    }

    pub fn key(kind: AssetKind, uri: &str, qualifiers: &Qualifiers) -> String {
        let request = match kind {
            AssetKind::Blob => ra::FetchBlobRequest {
                uris: vec![uri.to_owned()],
                qualifiers: qualifiers.to_proto(),
                ..Default::default()
            }
            .encode_to_vec(),
            AssetKind::Directory => ra::FetchDirectoryRequest {
                uris: vec![uri.to_owned()],
                qualifiers: qualifiers.to_proto(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let any = bazel_remote_apis::google::protobuf::Any {
            type_url: format!("{TYPE_PREFIX}{}", kind.request_type()),
            value: request,
        };
        hex::encode(Sha256::digest(any.encode_to_vec()))
    }

    fn path_of(&self, key: &str) -> PathBuf {
        layout::sharded_path(&self.objects, key)
    }

    /// Looks an entry up. A hit refreshes the entry's LRU stamp. Unreadable or corrupt
    /// entries are logged and treated as absent.
    pub fn get(
        &self,
        kind: AssetKind,
        uri: &str,
        qualifiers: &Qualifiers,
    ) -> Result<Option<AssetEntry>, AssetError> {
        let path = self.path_of(&Self::key(kind, uri, qualifiers));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(AssetError {
                    context: format!("reading asset entry {}", path.display()),
                    source,
                })
            }
        };
        match decode_entry(kind, &bytes) {
            Ok(entry) => {
                super::disk::objects_dir::touch_path(&path);
                Ok(Some(entry))
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring corrupt asset entry");
                Ok(None)
            }
        }
    }

    /// Every entry file with what it decodes to (`Err` with a reason when it does not).
    pub fn for_each_entry(
        &self,
        mut f: impl FnMut(&Path, Result<(AssetKind, AssetEntry), String>),
    ) {
        let Ok(shards) = fs::read_dir(&self.objects) else {
            return;
        };
        for shard in shards.flatten() {
            let Ok(entries) = fs::read_dir(shard.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let decoded = fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        decode_entry(AssetKind::Blob, &bytes)
                            .map(|e| (AssetKind::Blob, e))
                            .or_else(|_| {
                                decode_entry(AssetKind::Directory, &bytes)
                                    .map(|e| (AssetKind::Directory, e))
                            })
                    });
                f(&path, decoded);
            }
        }
    }

    /// Writes (or replaces: the last push wins) the entry for `entry.uri`.
    pub fn put(&self, kind: AssetKind, entry: &AssetEntry) -> Result<(), AssetError> {
        let key = Self::key(kind, &entry.uri, &entry.qualifiers);
        let bytes = encode_entry(kind, entry);
        let path = self.path_of(&key);
        let tmp = self.tmp.join(format!(
            "{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let err = |context: String| move |source| AssetError { context, source };
        write_new_file(&tmp, &bytes).map_err(err(format!("writing {}", tmp.display())))?;
        rename_into_place(&tmp, &path).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            AssetError {
                context: format!("storing asset entry {}", path.display()),
                source,
            }
        })
    }
}

fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    };
    let mut f = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            open()?
        }
        other => other?,
    };
    let r = f.write_all(bytes);
    if r.is_err() {
        let _ = fs::remove_file(path);
    }
    r
}

fn encode_entry(kind: AssetKind, e: &AssetEntry) -> Vec<u8> {
    let value = match kind {
        AssetKind::Blob => ra::FetchBlobResponse {
            uri: e.uri.clone(),
            qualifiers: e.qualifiers.to_proto(),
            expires_at: e.expires_at,
            blob_digest: Some(e.digest.to_proto()),
            ..Default::default()
        }
        .encode_to_vec(),
        AssetKind::Directory => ra::FetchDirectoryResponse {
            uri: e.uri.clone(),
            qualifiers: e.qualifiers.to_proto(),
            expires_at: e.expires_at,
            root_directory_digest: Some(e.digest.to_proto()),
            ..Default::default()
        }
        .encode_to_vec(),
    };
    StoredEntry {
        type_url: format!("{TYPE_PREFIX}{}", kind.response_type()),
        value,
        references_blobs: e.references_blobs.iter().map(Digest::to_proto).collect(),
        references_directories: e
            .references_directories
            .iter()
            .map(Digest::to_proto)
            .collect(),
        content_elsewhere: e.content_elsewhere,
    }
    .encode_to_vec()
}

fn decode_entry(kind: AssetKind, bytes: &[u8]) -> Result<AssetEntry, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let stored = StoredEntry::decode(bytes).map_err(|e| e.to_string())?;
    let expected = format!("{TYPE_PREFIX}{}", kind.response_type());
    if stored.type_url != expected {
        return Err(format!("type {:?}, expected {expected:?}", stored.type_url));
    }
    let (uri, qualifiers, expires_at, digest) = match kind {
        AssetKind::Blob => {
            let r = ra::FetchBlobResponse::decode(stored.value.as_slice())
                .map_err(|e| e.to_string())?;
            (r.uri, r.qualifiers, r.expires_at, r.blob_digest)
        }
        AssetKind::Directory => {
            let r = ra::FetchDirectoryResponse::decode(stored.value.as_slice())
                .map_err(|e| e.to_string())?;
            (r.uri, r.qualifiers, r.expires_at, r.root_directory_digest)
        }
    };
    let digests = |v: &[reapi::Digest]| {
        v.iter()
            .map(|d| Digest::from_proto(Some(d)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(AssetEntry {
        uri,
        qualifiers: Qualifiers::from_proto(&qualifiers),
        expires_at,
        digest: Digest::from_proto(digest.as_ref()).map_err(|e| e.to_string())?,
        references_blobs: digests(&stored.references_blobs)?,
        references_directories: digests(&stored.references_directories)?,
        content_elsewhere: stored.content_elsewhere,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Qualifiers {
        Qualifiers::new(
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn key_ignores_qualifier_order_and_separates_kinds() {
        let a = AssetStore::key(AssetKind::Blob, "u", &q(&[("a", "1"), ("b", "2")]));
        let b = AssetStore::key(AssetKind::Blob, "u", &q(&[("b", "2"), ("a", "1")]));
        assert_eq!(a, b);
        assert_ne!(
            a,
            AssetStore::key(AssetKind::Directory, "u", &q(&[("a", "1"), ("b", "2")]))
        );
        assert_ne!(a, AssetStore::key(AssetKind::Blob, "u", &q(&[])));
    }

    #[test]
    fn key_matches_casd_encoding_by_hand() {
        // Any{1: type_url, 2: FetchBlobRequest{4: "u"}}, built byte by byte.
        let type_url = b"type.googleapis.com/build.bazel.remote.asset.v1.FetchBlobRequest";
        let inner = [0x22u8, 1, b'u'];
        let mut any = vec![0x0a, type_url.len() as u8];
        any.extend_from_slice(type_url);
        any.extend_from_slice(&[0x12, inner.len() as u8]);
        any.extend_from_slice(&inner);
        assert_eq!(
            AssetStore::key(AssetKind::Blob, "u", &Qualifiers::default()),
            hex::encode(Sha256::digest(&any))
        );
    }

    #[test]
    fn round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let mut e = AssetEntry {
            uri: "urn:x".into(),
            qualifiers: q(&[("k", "v")]),
            expires_at: None,
            digest: Digest::of_bytes(b"one"),
            references_blobs: vec![Digest::of_bytes(b"r")],
            references_directories: vec![],
            content_elsewhere: false,
        };
        store.put(AssetKind::Blob, &e).unwrap();
        assert_eq!(
            store.get(AssetKind::Blob, "urn:x", &e.qualifiers).unwrap(),
            Some(e.clone())
        );
        assert_eq!(
            store
                .get(AssetKind::Directory, "urn:x", &e.qualifiers)
                .unwrap(),
            None
        );
        e.digest = Digest::of_bytes(b"two");
        e.content_elsewhere = true;
        store.put(AssetKind::Blob, &e).unwrap();
        assert_eq!(
            store.get(AssetKind::Blob, "urn:x", &e.qualifiers).unwrap(),
            Some(e.clone())
        );
        assert_eq!(
            store
                .get(AssetKind::Blob, "urn:x", &e.qualifiers)
                .unwrap()
                .unwrap()
                .digest,
            e.digest
        );
    }

    #[test]
    fn casd_readable_any() {
        let e = AssetEntry {
            uri: "urn:x".into(),
            qualifiers: Qualifiers::default(),
            expires_at: None,
            digest: Digest::of_bytes(b"one"),
            references_blobs: vec![Digest::of_bytes(b"r")],
            references_directories: vec![],
            content_elsewhere: false,
        };
        let bytes = encode_entry(AssetKind::Blob, &e);
        // A plain Any decoder (what casd uses) still reads the entry.
        let any = bazel_remote_apis::google::protobuf::Any::decode(bytes.as_slice()).unwrap();
        let r = ra::FetchBlobResponse::decode(any.value.as_slice()).unwrap();
        assert_eq!(r.blob_digest.unwrap().hash, e.digest.hash());
    }

    #[test]
    fn corrupt_entry_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::open(dir.path()).unwrap();
        let key = AssetStore::key(AssetKind::Blob, "u", &Qualifiers::default());
        let p = store.path_of(&key);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"\xff\xff garbage").unwrap();
        assert_eq!(
            store
                .get(AssetKind::Blob, "u", &Qualifiers::default())
                .unwrap(),
            None
        );
    }
}

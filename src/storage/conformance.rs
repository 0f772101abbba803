//! The contract every `BlobStore` keeps, one suite run against each implementation (the
//! memory store and the disk engine today; the next backend adds one test at the end).
use super::blob_store::{BlobStore, ByteRange};
use super::cas::CasStore;
use super::digest::Digest;
use super::disk_store::DiskStore;
use super::memory::MemoryStore;
use super::store_error::StoreError;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

fn digest_of(data: &[u8]) -> Digest {
    Digest::new(&hex::encode(Sha256::digest(data)), data.len() as i64).unwrap()
}

fn data(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<_>>()
        .into()
}

async fn read_range(store: &dyn BlobStore, d: &Digest, start: u64, end: u64) -> Option<Vec<u8>> {
    let mut read = store.read(d, ByteRange { start, end }).await.unwrap()?;
    assert_eq!(read.len, end - start, "BlobRead::len");
    let mut out = Vec::new();
    while let Some(piece) = read.pieces.next().await {
        out.extend_from_slice(&piece.unwrap());
    }
    Some(out)
}

/// Every case of the contract, against one store.
async fn contract(store: Arc<dyn BlobStore>) {
    let name = store.name().to_owned();
    let small = data(1, 1000);
    let big = data(2, 3 << 20);
    let (ds, db) = (digest_of(&small), digest_of(&big));
    let empty = digest_of(b"");

    // Absent blobs are missing, in request order; the empty blob is always present.
    let missing = store
        .find_missing(vec![db.clone(), empty.clone(), ds.clone()])
        .await
        .unwrap();
    assert_eq!(
        missing,
        vec![db.clone(), ds.clone()],
        "{name}: find_missing"
    );
    assert!(store
        .read(&ds, ByteRange::whole(&ds))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.read_all(&empty).await.unwrap().as_deref(),
        Some(&b""[..])
    );

    // Whole small blobs.
    store.put(&ds, small.clone()).await.unwrap();
    assert_eq!(
        store.read_all(&ds).await.unwrap(),
        Some(small.clone()),
        "{name}"
    );
    // Storing it again is fine.
    store.put(&ds, small.clone()).await.unwrap();

    // A streamed upload in uneven pieces, then whole and ranged reads.
    let mut sink = store.write(&db).await.unwrap();
    for piece in big.chunks(777_777) {
        sink.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    sink.commit().await.unwrap();
    assert_eq!(store.find_missing(vec![db.clone()]).await.unwrap(), vec![]);
    assert_eq!(
        read_range(&*store, &db, 0, db.size()).await.unwrap(),
        big,
        "{name}"
    );
    let (a, b) = (1_000_001u64, 2_500_000u64);
    assert_eq!(
        read_range(&*store, &db, a, b).await.unwrap(),
        &big[a as usize..b as usize],
        "{name}: ranged read"
    );
    assert!(read_range(&*store, &db, db.size(), db.size())
        .await
        .unwrap()
        .is_empty());

    // Data that does not match its digest is refused and leaves nothing behind.
    let other = data(3, 1000);
    let wrong = Digest::new(digest_of(&other).hash(), 1000).unwrap();
    let claimed = digest_of(&data(4, 1000));
    let err = store.put(&claimed, other.clone()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Mismatch(_)),
        "{name}: wrong hash: {err:?}"
    );
    let short = Digest::new(wrong.hash(), 1001).unwrap();
    let err = store.put(&short, other.clone()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Mismatch(_)),
        "{name}: too short: {err:?}"
    );
    let long = Digest::new(wrong.hash(), 999).unwrap();
    let mut sink = store.write(&long).await.unwrap();
    let err = match sink.write(other.clone()).await {
        Err(e) => e,
        Ok(()) => sink.commit().await.unwrap_err(),
    };
    assert!(
        matches!(err, StoreError::Mismatch(_)),
        "{name}: too long: {err:?}"
    );
    let missing = store
        .find_missing(vec![claimed.clone(), short, long])
        .await
        .unwrap();
    assert_eq!(missing.len(), 3, "{name}: a refused upload was stored");

    // An upload dropped before commit stores nothing.
    let dropped = data(5, 5000);
    let dd = digest_of(&dropped);
    let mut sink = store.write(&dd).await.unwrap();
    sink.write(dropped.clone()).await.unwrap();
    drop(sink);
    assert_eq!(
        store.find_missing(vec![dd.clone()]).await.unwrap(),
        vec![dd.clone()]
    );

    // Two identical uploads at once both succeed.
    let twice = data(6, 200_000);
    let dt = digest_of(&twice);
    let (r1, r2) = tokio::join!(store.put(&dt, twice.clone()), store.put(&dt, twice.clone()));
    r1.unwrap();
    r2.unwrap();
    assert_eq!(store.read_all(&dt).await.unwrap(), Some(twice), "{name}");
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_store_keeps_the_contract() {
    let repo = tempfile::tempdir().unwrap();
    let engine = Arc::new(CasStore::open(repo.path()).unwrap());
    contract(Arc::new(DiskStore::new(engine))).await;
}
